"""`alignkit data inspect`: every token of a few rows with its loss mask, to check masking
before training."""

from __future__ import annotations

import sys

from pydantic import Field, field_validator

from alignkit.config import Section, check_chat_template
from alignkit.errors import UserError


class InspectConfig(Section):
    """Print each token of the first rows with its loss mask (T = trained, . = context)."""

    data: str = Field("", description="Data file (or hub dataset) to inspect")
    data_split: str = Field("train", description="Split to read when `data` is a hub dataset")
    model: str = Field("", description="Model whose tokenizer (and chat template) to use")
    rows: int = Field(2, ge=1, description="How many rows to show")
    offset: int = Field(0, ge=0, description="Index of the first row to show")
    max_length: int = Field(1024, ge=2, description="Truncate rows as training would")
    chat_template: str | None = Field(None, description="Chat template override (text or path)")
    train_on_prompt: bool = Field(False, description="Show the mask as train_on_prompt=true would build it")
    color: bool | None = Field(None, description="Colour trained tokens (default: when writing to a terminal)")

    _template_compiles = field_validator("chat_template")(classmethod(lambda cls, v: check_chat_template(v)))


def inspect_data(cfg: InspectConfig, out=None) -> None:
    """`alignkit data inspect`: print rows `cfg.offset`.. of `cfg.data` token by token with their
    loss mask, encoded exactly as SFT training would encode them, to `out` (default stdout).
    Raises UserError for a missing model / data file or rows in no SFT format."""
    from alignkit.data.chat import setup_chat_template
    from alignkit.data.loading import load_rows, require_format
    from alignkit.data.sft import SFT_FORMATS, encode_row_parts
    from alignkit.models import load_tokenizer

    out = out or sys.stdout
    tok = load_tokenizer(cfg.model)
    from alignkit.rollout.agents import resolve_chat_template

    note = setup_chat_template(tok, resolve_chat_template(cfg.chat_template))
    if note:
        print(note, file=out)
    ds = load_rows(cfg.data, cfg.data_split)
    fmt = require_format(ds, cfg.data, SFT_FORMATS)
    if cfg.offset >= len(ds):
        raise UserError(f"{cfg.data}: offset={cfg.offset} is past the end ({len(ds)} rows); use offset=0.."
                        f"{len(ds) - 1}")
    color = out.isatty() if cfg.color is None else cfg.color
    green, dim, reset = ("\033[32m", "\033[2m", "\033[0m") if color else ("", "", "")
    end = min(len(ds), cfg.offset + cfg.rows)
    for i in range(cfg.offset, end):
        parts = encode_row_parts(tok, ds[i], fmt, f"{cfg.data} row {i + 1}", cfg.train_on_prompt)
        for k, enc in enumerate(parts):
            part = f", training row {k + 1} of {len(parts)}" if len(parts) > 1 else ""
            _show(tok, enc, f"row {i + 1} ({fmt}{part})", cfg.max_length, green, dim, reset, out)
        if len(parts) > 1:
            print(f"--- row {i + 1}: the chat template re-renders earlier turns (a reasoning template), so each "
                  "assistant turn is trained in its own row with the context it is generated from", file=out)


def _show(tok, enc, title: str, max_length: int, green: str, dim: str, reset: str, out) -> None:
    cut = len(enc) > max_length
    ids, labels = enc.input_ids[:max_length], enc.labels[:max_length]
    trained = sum(1 for x in labels[1:] if x != -100)
    print(f"=== {title}: {len(ids)} tokens, {trained} trained"
          + (f", truncated from {len(enc)}" if cut else ""), file=out)
    print(f"{'pos':>5} {'id':>7}  mask  token", file=out)
    for t, (tid, lab) in enumerate(zip(ids, labels)):
        on = lab != -100 and t > 0
        piece = tok.convert_ids_to_tokens(tid)
        text = tok.decode([tid])
        shown = repr(text) if text else repr(piece)
        mark = "T" if on else "."
        line = f"{t:>5} {tid:>7}   {mark}    {shown}"
        print((green if on else dim) + line + reset, file=out)
    trained_text = tok.decode([tid for t, (tid, lab) in enumerate(zip(ids, labels)) if lab != -100 and t > 0])
    print(f"--- trained text: {trained_text!r}", file=out)
