"""Read rows from local files or hub datasets through one code path (`datasets.load_dataset`),
and recognise which of the supported row formats they are in."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from alignkit.errors import UserError

_LOCAL_BUILDERS = {
    ".jsonl": "json",
    ".json": "json",
    ".parquet": "parquet",
    ".csv": "csv",
}


def _builder_for(path: str) -> str | None:
    name = path.lower()
    for comp in (".gz", ".bz2", ".xz", ".zst"):
        if name.endswith(comp):
            name = name[: -len(comp)]
    for ext, builder in _LOCAL_BUILDERS.items():
        if name.endswith(ext):
            return builder
    return None


def _looks_local(path: str) -> bool:
    # Anything else is taken as a hub id (`owner/name`), loaded through the same `load_dataset`.
    return os.path.exists(path) or path.startswith((".", "/", "~")) or _builder_for(path) is not None


def load_rows(path: str, split: str = "train", what: str = "data"):
    """Load a dataset as a `datasets.Dataset`.

    `path` is a local .jsonl/.json/.parquet/.csv file (optionally compressed), a local folder
    that `datasets` understands, or a hub dataset id (`owner/name`, optionally `owner/name:config`).
    """
    import datasets

    datasets.disable_progress_bars()
    if not path:
        raise UserError(f"no {what} given; pass {what}=PATH (a .jsonl/.json/.parquet/.csv file or a hub dataset)")
    path = os.path.expanduser(path)
    try:
        if _looks_local(path):
            p = Path(path)
            if not p.exists():
                raise UserError(f"{path}: {what} file not found; check the path")
            if p.is_file():
                builder = _builder_for(path)
                if builder is None:
                    raise UserError(
                        f"{path}: unknown {what} file type; use .jsonl, .json, .parquet or .csv (optionally .gz)"
                    )
                if p.stat().st_size == 0:
                    raise UserError(f"{path}: {what} file is empty; it needs at least one row")
                ds = datasets.load_dataset(builder, data_files=str(p), split="train")
            else:
                ds = datasets.load_dataset(str(p), split=split)
        else:
            name, _, config = path.partition(":")
            ds = datasets.load_dataset(name, config or None, split=split)
    except UserError:
        raise
    except Exception as e:  # datasets raises many types; the user needs the file and the reason
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path}: could not read {what} ({msg[:300]}); check the file's format") from None
    if len(ds) == 0:
        raise UserError(f"{path}: {what} has no rows; it needs at least one")
    return ds


FORMATS = {
    "messages": "conversational: a `messages` list of {role, content}",
    "prompt_completion": "`prompt` and `completion` (text or message lists)",
    "text": "plain `text` (all tokens trained)",
    "preference": "`chosen` and `rejected`, with `prompt` or a shared prefix",
    "prompts": "`prompt` only (for sampling)",
}


def detect_format(columns: list[str]) -> str | None:
    """The row format (a key of FORMATS) that `columns` hold, checked in the order preference,
    messages, prompt_completion, text, prompts; None when no format matches."""
    cols = set(columns)
    if {"chosen", "rejected"} <= cols:
        return "preference"
    if "messages" in cols:
        return "messages"
    if {"prompt", "completion"} <= cols:
        return "prompt_completion"
    if "text" in cols:
        return "text"
    if "prompt" in cols:
        return "prompts"
    return None


def require_format(ds, path: str, allowed: tuple[str, ...]) -> str:
    """The format of dataset `ds` (read from `path`) when it is one of `allowed`; otherwise
    UserError naming the columns expected and the columns found."""
    fmt = detect_format(ds.column_names)
    if fmt not in allowed:
        want = "; or ".join(FORMATS[a] for a in allowed)
        found = ", ".join(ds.column_names)
        got = f" (looks like {fmt} data)" if fmt else ""
        raise UserError(f"{path}: missing columns{got}: expected {want}; found: {found}")
    return fmt


def check_messages(msgs: Any, where: str, need_assistant: bool = True) -> list[dict]:
    """Validate one conversation; return it as a list of plain {role, content} dicts."""
    if not isinstance(msgs, list) or not msgs:
        raise UserError(f"{where}: expected a non-empty list of {{role, content}} messages, got {type(msgs).__name__}")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise UserError(f"{where}: message {i} must be an object with 'role' and 'content'")
        if m["role"] not in ("system", "user", "assistant", "tool"):
            raise UserError(
                f"{where}: message {i} has role {m['role']!r}; use system, user, assistant or tool"
            )
        if not isinstance(m["content"], str):
            raise UserError(f"{where}: message {i} content must be text, got {type(m['content']).__name__}")
        out.append({k: v for k, v in m.items() if v is not None})
    if need_assistant and not any(m["role"] == "assistant" for m in out):
        raise UserError(f"{where}: no assistant message to train on; add an assistant turn")
    return out
