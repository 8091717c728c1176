"""A rollout as a value: what one sampling round produced, held in one object that the recipe
passes on and the loop reads (samples.jsonl, token counts), instead of attributes of a runner.

`collect` draws `n` samples per prompt with the rollout engine and scores them; `Rollout.concat`
merges rollouts drawn separately (dynamic sampling), `Rollout.select_groups` keeps some groups.
Every sample, however it was drawn, goes through the same `collect`, so the same autocast,
token counting and (in the recipe) the same truncation rule apply to it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, replace
from typing import Callable, ContextManager

import torch

from alignkit.rollout.engine import RolloutBatch, RolloutEngine, Sample, SamplingParams

__all__ = ["Rollout", "collect", "score"]


@dataclass
class Rollout:
    """P prompts with `group_size` samples each.

    prompts: P prompts (message lists or text). columns: the prompt set's other columns, P values
    each (reward functions receive them per sample). samples: P x group_size `Sample`s, group by
    group (sample i belongs to prompt samples[i].prompt_index). rewards: (P x group_size,) float32,
    the scores the recipe trains on (a recipe's truncation rule applied, see `with_rewards`);
    NaN marks a sample the reward source could not score (it returned None): the recipes give it
    no gradient and leave it out of every reward statistic (`alignkit.advantages.scored_mask`).
    stats: counts over everything drawn to build it, also samples dropped on the way:
    `generated_tokens` (sampled tokens), `reward_missing` (scores that were None)."""

    prompts: list
    columns: dict[str, list]
    samples: list[Sample]
    group_size: int
    rewards: torch.Tensor
    stats: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def n_groups(self) -> int:
        """Number of prompts (groups)."""
        return len(self.samples) // self.group_size

    @property
    def texts(self) -> list[str]:
        """Decoded completions, one per sample."""
        return [s.text for s in self.samples]

    @property
    def finish_reasons(self) -> list[str]:
        """"eos" | "stop" | "length" per sample."""
        return [s.finish_reason for s in self.samples]

    @property
    def truncated(self) -> torch.Tensor:
        """(N,) bool: samples cut at max_new_tokens without an end-of-turn token or stop string."""
        return torch.tensor([s.finish_reason == "length" for s in self.samples], dtype=torch.bool)

    @property
    def generated_tokens(self) -> int:
        """Tokens sampled to build this rollout (dropped draws included)."""
        return int(self.stats.get("generated_tokens", 0))

    def prompt_of(self, i: int):
        """The prompt sample i was drawn for."""
        return self.prompts[self.samples[i].prompt_index]

    def with_rewards(self, rewards: torch.Tensor) -> "Rollout":
        """The same rollout with other rewards (N,), e.g. after a truncation penalty."""
        if rewards.shape != self.rewards.shape:
            raise ValueError(f"rewards of shape {tuple(rewards.shape)} for a rollout of {len(self)} samples")
        return replace(self, rewards=rewards)

    def batch(self, lo: int = 0, hi: int | None = None) -> RolloutBatch:
        """Samples [lo, hi) as the engine's `RolloutBatch`."""
        return RolloutBatch(self.samples[lo:hi], self.group_size)

    def tensors(self, pad_id: int, rows: list[int] | None = None) -> dict:
        """Right-padded teacher-forcing batch of samples `rows` (default all), (B, T) each:
        input_ids, attention_mask, position_ids, targets (-100 off the completion),
        completion_mask, and `sampler_logps`: the engine's log-probs of the sampled tokens at the
        positions predicting them (0 elsewhere), natural log, at the sampling temperature."""
        samples = self.samples if rows is None else [self.samples[i] for i in rows]
        out = RolloutBatch(samples, self.group_size).tensors(pad_id)
        out["sampler_logps"] = out.pop("old_logps")
        return out

    def select_groups(self, groups: list[int]) -> "Rollout":
        """A rollout of the given groups, in that order (prompt indices renumbered). Stats are kept:
        they count what was drawn, not what was kept."""
        G = self.group_size
        samples = []
        for new, g in enumerate(groups):
            samples += [replace(s, prompt_index=new) for s in self.samples[g * G:(g + 1) * G]]
        rows = [g * G + k for g in groups for k in range(G)]
        return Rollout([self.prompts[g] for g in groups], {k: [v[g] for g in groups] for k, v in self.columns.items()},
                       samples, G, self.rewards[rows] if rows else self.rewards[:0], dict(self.stats))

    @staticmethod
    def concat(parts: list["Rollout"]) -> "Rollout":
        """One rollout of all groups of `parts` in order; numeric stats are summed."""
        if not parts:
            raise ValueError("concat of no rollouts")
        G = parts[0].group_size
        prompts, samples, rewards, stats = [], [], [], {}
        columns: dict[str, list] = {k: [] for k in parts[0].columns}
        for p in parts:
            if p.group_size != G:
                raise ValueError("rollouts of different group sizes")
            base = len(prompts)
            prompts += p.prompts
            for k in columns:
                columns[k] += p.columns[k]
            samples += [replace(s, prompt_index=base + s.prompt_index) for s in p.samples]
            rewards.append(p.rewards)
            for k, v in p.stats.items():
                if isinstance(v, (int, float)):
                    stats[k] = stats.get(k, 0) + v
        return Rollout(prompts, columns, samples, G, torch.cat(rewards), stats)


def collect(engine: RolloutEngine, model, prompts: list, columns: dict[str, list], params: SamplingParams,
            reward_fn: Callable, context: Callable[[], ContextManager] = contextlib.nullcontext) -> Rollout:
    """Sample `params.n` completions per prompt with `engine` (inside `context()`: the trainer's
    autocast, FSDP gathering) and `score` them."""
    with context():
        batch = engine.generate(model, prompts, params)
    return score(batch, prompts, columns, reward_fn)


def score(batch: RolloutBatch, prompts: list, columns: dict[str, list], reward_fn: Callable) -> Rollout:
    """The rollout of an engine batch drawn for `prompts`, scored by
    `reward_fn(prompts, completions, **columns) -> list[float | None]`, which receives one entry
    per sample (its prompt and column values repeated). A None score becomes NaN ("not scored",
    as `alignkit.rewards.rewards_tensor` makes it) and is counted in stats["reward_missing"];
    stats["generated_tokens"] counts the sampled tokens.
    Raises ValueError when the reward function returns another number of scores."""
    ps = [prompts[s.prompt_index] for s in batch.samples]
    cols = {k: [v[s.prompt_index] for s in batch.samples] for k, v in columns.items()}
    vals = reward_fn(ps, batch.texts, **cols)
    if len(vals) != len(batch.samples):
        raise ValueError(f"the reward function returned {len(vals)} scores for {len(batch.samples)} samples")
    # None -> NaN, not 0: a 0 would enter its group's mean and std and bias every advantage there
    rewards = torch.tensor([float("nan") if v is None else float(v) for v in vals], dtype=torch.float32)
    stats = {"generated_tokens": sum(len(s.completion_ids) for s in batch.samples),
             "reward_missing": sum(v is None for v in vals)}
    return Rollout(list(prompts), {k: list(v) for k, v in columns.items()}, batch.samples, batch.group_size, rewards,
                   stats)
