"""Batches for training: right-padded or padding-free packed.

Batches carry `targets` rather than HF-style `labels`: targets[b, t] is the token predicted at
position t (-100 = not scored). The shift is done per document, so in a packed row the last
token of one document never gets the first token of the next as its target.
"""

from __future__ import annotations

import torch

IGNORE = -100


def _targets(labels: list[int]) -> list[int]:
    return labels[1:] + [IGNORE]


def pad_collate(rows: list, pad_id: int) -> dict:
    """Right-padded batch of B rows (objects with `input_ids` / `labels` lists, e.g. `Encoded`).

    Returns int64 tensors, all (B, T) with T the longest row: input_ids (pad_id after the row),
    attention_mask (1 on real tokens), position_ids (0..n-1, then n-1 on padding) and targets
    (labels shifted left by one: targets[b, t] = labels[b, t + 1]; -100 at each row's last token,
    on untrained tokens and on padding)."""
    T = max(len(r.input_ids) for r in rows)
    B = len(rows)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    attn = torch.zeros((B, T), dtype=torch.long)
    targets = torch.full((B, T), IGNORE, dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r.input_ids)
        input_ids[i, :n] = torch.tensor(r.input_ids)
        attn[i, :n] = 1
        targets[i, :n] = torch.tensor(_targets(r.labels))
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": input_ids, "attention_mask": attn, "position_ids": pos, "targets": targets}


def pack_collate(rows: list) -> dict:
    """All rows in one sequence (batch dimension 1), no padding. Positions restart at 0 for every
    document; with no attention mask, transformers reads the restarts as document boundaries and
    builds a block-diagonal causal mask, so documents never attend to each other."""
    ids: list[int] = []
    pos: list[int] = []
    tgt: list[int] = []
    for r in rows:
        ids += r.input_ids
        pos += list(range(len(r.input_ids)))
        tgt += _targets(r.labels)
    return {
        "input_ids": torch.tensor([ids]),
        "attention_mask": None,
        "position_ids": torch.tensor([pos]),
        "targets": torch.tensor([tgt]),
    }


def n_trained(batch: dict) -> int:
    """Tokens of a collated batch that carry loss (targets != -100): the unit a token-mean loss
    is normalised by (summed over micro-batches and ranks by the trainer)."""
    return int((batch["targets"] != IGNORE).sum())

