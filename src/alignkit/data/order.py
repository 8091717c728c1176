"""Seeded data order: the one place where a run's random streams are derived from its seed.

Every random choice of a run (DESIGN rule 7) comes from a `torch.Generator` seeded with
`stream_seed(seed, index, salt, sub)`, so the position in the data is a pure function of the
step and a resumed run needs no iterator state:

    stream_seed(seed, i)               = seed · 1_000_003 + i            (epoch i, rollout step i)
    stream_seed(seed, i, salt, sub)    = (seed · 1_000_003 + i) · salt + sub

Salts in use: 0 (none) for per-epoch permutations of rows and prompts, 64 for the sampler
(sub = rank), 101 for PPO's minibatch shuffle (sub = PPO epoch), 131 for dynamic sampling's
extra prompts, 7919 for rejection sampling's SFT draws (sub = SFT step of the round).
"""

from __future__ import annotations

import torch

__all__ = ["stream_seed", "seeded_generator", "seeded_permutation", "epoch_order"]


def stream_seed(seed: int, index: int, salt: int = 0, sub: int = 0) -> int:
    """The integer seed of random stream (index, salt, sub) of a run seeded with `seed`."""
    base = seed * 1_000_003 + index
    return base * salt + sub if salt else base + sub


def seeded_generator(seed: int, index: int, salt: int = 0, sub: int = 0) -> torch.Generator:
    """A CPU `torch.Generator` on stream `stream_seed(seed, index, salt, sub)`."""
    return torch.Generator().manual_seed(stream_seed(seed, index, salt, sub))


def seeded_permutation(n: int, seed: int, index: int, salt: int = 0, sub: int = 0) -> list[int]:
    """A permutation of range(n) drawn from stream (index, salt, sub)."""
    return torch.randperm(n, generator=seeded_generator(seed, index, salt, sub)).tolist()


def epoch_order(n: int, per_step: int, seed: int):
    """`for_step(step) -> list[int]`: the `per_step` global indices (of n) used by optimizer or
    rollout step `step`: a seeded permutation of range(n) per epoch, consumed in order; the
    n mod per_step rows left over at an epoch's end are not used in that epoch (they are in
    other epochs' batches, since each epoch draws a new permutation).
    Raises ValueError when per_step > n or per_step < 1."""
    if not 1 <= per_step <= n:
        raise ValueError(f"{per_step} rows per step from {n} rows")
    steps_per_epoch = n // per_step
    cache: dict[int, list[int]] = {}

    def for_step(step: int) -> list[int]:
        epoch, k = divmod(step, steps_per_epoch)
        if epoch not in cache:
            cache.clear()
            cache[epoch] = seeded_permutation(n, seed, epoch)
        return cache[epoch][k * per_step:(k + 1) * per_step]

    return for_step
