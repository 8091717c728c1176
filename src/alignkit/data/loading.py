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


def _open_text_bytes(p: Path):
    """The file's bytes, decompressed (gz, bz2, xz); None for a compression we do not read here."""
    name = p.name.lower()
    if name.endswith(".gz"):
        import gzip

        return gzip.open(p, "rb")
    if name.endswith(".bz2"):
        import bz2

        return bz2.open(p, "rb")
    if name.endswith(".xz"):
        import lzma

        return lzma.open(p, "rb")
    if name.endswith(".zst"):
        return None
    return open(p, "rb")


def _decode_lines(path: str, what: str):
    """Yield (line number from 1, text) of a local text file, stopping at the first byte that is
    not UTF-8 with one line naming the file, the line and the byte offset (in the file and in
    the line). A UTF-8 BOM is accepted."""
    fh = _open_text_bytes(Path(path))
    if fh is None:
        return
    offset = 0
    with fh:
        for n, raw in enumerate(fh, 1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                bad = raw[e.start:e.start + 4].hex(" ")
                raise UserError(f"{path}: line {n}: byte {offset + e.start} of the file (byte {e.start + 1} of the "
                                f"line: {bad}) is not UTF-8; save the {what} file as UTF-8 (e.g. iconv -f cp1251 -t "
                                f"utf-8)") from None
            if n == 1 and text.startswith("\ufeff"):
                text = text[1:]
            offset += len(raw)
            yield n, text


_KINDS = ((bool, "true/false"), (str, "text"), ((int, float), "a number"), (list, "a list"), (dict, "an object"))


def _kind(v) -> str:
    for t, name in _KINDS:
        if isinstance(v, t):
            return name
    return "null" if v is None else type(v).__name__


class _RowKinds:
    """Each row must be a JSON object (a column may mix kinds: datasets stores such a column as
    JSON values)."""

    def __init__(self, path: str):
        self.path = path

    def check(self, n: int, row) -> None:
        if not isinstance(row, dict):
            raise UserError(f"{self.path}: line {n}: expected one JSON object per row ({{\"key\": value, ...}}), got "
                            f"{_kind(row)}")


def _json_error(path: str, e, hint: str) -> UserError:
    return UserError(f"{path}: line {e.lineno}, column {e.colno}: invalid JSON ({e.msg}); {hint}")


def _validate_json(path: str, what: str) -> None:
    """Parse a local .jsonl / .json file ourselves before `datasets` reads it, so that a syntax
    error names its real line (datasets reports none, or one off by one) and column. JSON lines
    are checked one line at a time; a .json file may also be one document (an array of rows)."""
    import json

    name = path.lower()
    for comp in (".gz", ".bz2", ".xz"):
        name = name.removesuffix(comp)
    lines = _decode_lines(path, what)
    first = next(((n, t) for n, t in lines if t.strip()), None)
    if first is None:
        return
    kinds = _RowKinds(path)
    n0, t0 = first
    try:
        row0 = json.loads(t0)
    except json.JSONDecodeError as e:
        if not name.endswith(".json"):
            raise UserError(f"{path}: line {n0}, column {e.colno}: invalid JSON ({e.msg}); each line must be one JSON "
                            f"object") from None
        row0 = None  # maybe a pretty-printed document spanning lines
    if row0 is None or (isinstance(row0, list) and name.endswith(".json")):  # one document: rows or columns
        text = "\n" * (n0 - 1) + t0 + "".join(t for _, t in lines)
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            raise _json_error(path, e, "fix that line") from None
        if isinstance(doc, list):
            for i, r in enumerate(doc):
                kinds.check(i + 1, r)
        return
    kinds.check(n0, row0)
    for n, t in lines:
        if not t.strip():
            continue
        try:
            row = json.loads(t)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: line {n}, column {e.colno}: invalid JSON ({e.msg}); each line must be one "
                            f"JSON object") from None
        kinds.check(n, row)


def _validate_csv(path: str, what: str) -> None:
    """Read a local .csv with Python's csv module first: undecodable bytes, unterminated quotes
    and rows with a different number of fields than the header are named by line."""
    import csv
    import io

    lines = list(_decode_lines(path, what))
    if not lines:
        return
    reader = csv.reader(io.StringIO("".join(t for _, t in lines)), strict=True)
    header = None
    start = 1
    try:
        for row in reader:
            if header is None:
                header = row
                start = reader.line_num + 1
                continue
            if not row:
                start = reader.line_num + 1
                continue
            if len(row) != len(header):
                raise UserError(f"{path}: line {start}: {len(row)} fields, but the header has {len(header)} "
                                f"({', '.join(header)}); quote fields that contain commas")
            start = reader.line_num + 1
    except csv.Error as e:
        raise UserError(f"{path}: line {start}: bad CSV ({e}); close the quote or escape it as \"\"") from None


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
                if builder == "json":
                    _validate_json(path, what)
                elif builder == "csv":
                    _validate_csv(path, what)
                ds = datasets.load_dataset(builder, data_files=str(p), split="train")
            else:
                ds = datasets.load_dataset(str(p), split=split)
        else:
            name, _, config = path.partition(":")
            offline = any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
                          for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
            if not offline:
                from alignkit.models.load import _hub_reachable

                if not _hub_reachable():
                    raise UserError(f"{path}: no such local file, and the hub cannot be reached (no network); pass "
                                    f"{what}=PATH of a local .jsonl/.json/.parquet/.csv file")
            try:
                ds = datasets.load_dataset(name, config or None, split=split)
            except Exception as e:
                if offline:
                    raise UserError(f"{path}: no such local file, and HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set and "
                                    f"the dataset is not in the local cache; pass {what}=PATH of a local file, or "
                                    f"unset the variable to download it") from None
                raise e
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
        if isinstance(m, dict) and m.get("role") == "assistant" and m.get("tool_calls") and m.get("content") is None:
            m = {**m, "content": ""}  # a turn that only calls tools (content null in most tool-use data)
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
