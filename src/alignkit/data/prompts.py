"""Prompt sets for the online recipes: the prompt column (messages or text) and every other
column, which reward functions receive per sample (`total`, GSM8K's `answer`, ...), plus the
seeded order in which a run consumes them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

from alignkit.data.order import epoch_order
from alignkit.errors import UserError

__all__ = ["PromptSet", "load_prompts", "load_prompt_set", "columns_of", "prompt_order"]


@dataclass
class PromptSet:
    """prompts: N message lists (or texts with chat_prompts=false); columns: name -> N values."""

    prompts: list
    columns: dict[str, list] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.prompts)

    def take(self, idx: list[int]) -> tuple[list, dict]:
        """(prompts, columns) of rows `idx`, in that order."""
        return [self.prompts[i] for i in idx], {k: [v[i] for i in idx] for k, v in self.columns.items()}


def load_prompts(path: str, split: str, column: str, chat: bool, what: str = "data") -> PromptSet:
    """The prompt set at `path` (local file / folder or hub dataset, split `split`), prompts read
    from `column`. Raises UserError (one line: file, row, fix) for a missing column, an empty
    prompt or a prompt ending with an assistant turn."""
    rows = load_prompt_set(path, split, prompt_column=column, chat=chat, what=what)
    return PromptSet([r["prompt"] for r in rows], columns_of(rows))


def prompt_order(n: int, per_step: int, seed: int):
    """`for_step(rollout_step) -> list[int]`: the global prompt indices of a rollout step, a seeded
    permutation per epoch consumed in order (`alignkit.data.order.epoch_order`). Raises UserError
    when one step needs more prompts than the set holds."""
    if per_step > n:
        raise UserError(f"the prompt set has {n} prompts, fewer than one step's {per_step} "
                        "(batch_size x grad_accum x processes); lower batch_size or add prompts")
    return epoch_order(n, per_step, seed)


def load_prompt_set(path: str, split: str = "train", prompt_column: str = "prompt", chat: bool = True,
                    what: str = "prompts", limit: int | None = None) -> list[dict]:
    """Rows of a prompt set as dicts: `prompt` (a message list, or text) plus every other column.

    The prompt is read from `prompt_column` (e.g. `question` for GSM8K); text there becomes one
    user message when `chat` is true, or stays plain text (given to the model as is) when false.
    Message lists are validated. `limit`: keep the first rows only."""
    from alignkit.data.loading import check_messages, load_rows

    ds = load_rows(path, split, what)
    if prompt_column not in ds.column_names:
        found = ", ".join(ds.column_names)
        raise UserError(f"{path}: no '{prompt_column}' column for prompts (found: {found}); set prompt_column=NAME")
    n = len(ds) if limit is None or limit < 0 else min(limit, len(ds))
    rows = []
    for i in range(n):
        row = dict(ds[i])
        p = row[prompt_column]
        where = f"{path} row {i + 1}"
        if isinstance(p, str):
            if not p.strip():
                raise UserError(f"{where}: empty prompt in '{prompt_column}'")
            p = [{"role": "user", "content": p}] if chat else p
        elif isinstance(p, list):
            p = check_messages(p, f"{where} '{prompt_column}'", need_assistant=False)
            if p[-1]["role"] == "assistant":
                raise UserError(f"{where}: the prompt ends with an assistant message; a prompt must end with a user "
                                f"(or system) turn")
        else:
            raise UserError(f"{where}: '{prompt_column}' must be text or a message list, got {type(p).__name__}")
        row["prompt"] = p
        rows.append(row)
    return rows




def columns_of(rows: Iterable[dict], exclude: tuple[str, ...] = ("prompt",)) -> dict[str, list]:
    """Rows -> column lists (every key of the first row except `exclude`), for reward calls."""
    rows = list(rows)
    if not rows:
        return {}
    keys = [k for k in rows[0] if k not in exclude]
    return {k: [r.get(k) for r in rows] for k in keys}
