"""Index helpers on (B, T) masks, shared by reward models, PPO's reward placement and the critic."""

from __future__ import annotations

import torch

__all__ = ["last_token_index"]


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """(B,) long: the index of the last nonzero entry of each row of `mask` (B, T), any padding
    side; -1 for a row with no nonzero entry. Used for "the last real token" (attention mask) and
    "the response's last token" (completion mask), DESIGN rule 5."""
    m = mask != 0
    pos = torch.arange(m.shape[-1], device=m.device).expand_as(m)
    return torch.where(m, pos, torch.full_like(pos, -1)).amax(-1)
