"""SFT rows: any supported format -> token ids with the answer-only loss mask."""

from __future__ import annotations

from dataclasses import dataclass

from alignkit.data.chat import Encoded, encode_conversation, encode_prompt_completion, encode_text, end_of_turn_ids
from alignkit.data.loading import check_messages, load_rows, require_format
from alignkit.errors import UserError

SFT_FORMATS = ("messages", "prompt_completion", "text")


@dataclass
class EncodeStats:
    """Counts of one data file's encoding: rows read, kept, truncated, dropped (too long /
    nothing left to train), and tokens (all / trained) of the kept rows."""

    rows: int = 0
    kept: int = 0
    truncated: int = 0
    dropped_long: int = 0
    dropped_empty: int = 0
    trained_tokens: int = 0
    tokens: int = 0
    split_rows: int = 0  # conversations trained one assistant turn per row (reasoning templates)
    training_rows: int = 0  # rows handed to training (more than `kept` when conversations were split)
    no_stop: int = 0  # rows whose trained answer holds no token generation stops on

    def summary(self) -> str:
        """One line for the run log, e.g. "98/100 rows, 12034 tokens (4410 trained); 2 truncated"."""
        s = f"{self.kept}/{self.rows} rows, {self.tokens} tokens ({self.trained_tokens} trained)"
        if self.truncated:
            s += f"; {self.truncated} truncated to max_length"
        if self.dropped_long:
            s += f"; {self.dropped_long} dropped as longer than max_length"
        if self.dropped_empty:
            s += f"; {self.dropped_empty} dropped with no trained token left"
        if self.split_rows:
            s += (f"; {self.split_rows} conversations trained one assistant turn per row, as the chat template "
                  f"re-renders earlier turns ({self.training_rows} training rows)")
        if self.no_stop:
            s += (f"; WARNING: {self.no_stop} rows train no end-of-turn/eos token, so the model will not learn to "
                  "stop (the chat template's end-of-turn text is not a single token of this tokenizer): add it as a "
                  "special token or use a template that ends assistant turns with the eos token")
        return s


def encode_row_parts(tokenizer, row: dict, fmt: str, where: str, train_on_prompt: bool = False) -> list[Encoded]:
    """Encode one SFT row of format `fmt` (messages, prompt_completion or text) with the
    answer-only loss mask (assistant turns / completion; every token of `text`; the prompt too
    with `train_on_prompt`) into the training rows it gives: one, except a multi-turn
    conversation under a template that re-renders history (reasoning templates), which gives one
    row per trained assistant turn (see `alignkit.data.chat.encode_conversation`). `where`
    ("file row N") prefixes the UserError a bad row raises. A row with a `tools` column (tool-use
    transcripts) is rendered with those tools listed by the template (`alignkit.agents.with_tools`)."""
    if row.get("tools"):
        from alignkit.rollout.agents import with_tools

        tokenizer = with_tools(tokenizer, row["tools"], where)
    if fmt == "messages":
        msgs = check_messages(row["messages"], where)
        try:
            return encode_conversation(tokenizer, msgs, train_on_prompt=train_on_prompt)
        except UserError as e:
            raise UserError(f"{where}: {e}") from None
    if fmt == "prompt_completion":
        p, c = row["prompt"], row["completion"]
        if isinstance(p, list):
            p = check_messages(p, f"{where} prompt", need_assistant=False)
        if isinstance(c, list):
            c = check_messages(c, f"{where} completion")
        elif not isinstance(c, str) or not c:
            raise UserError(f"{where}: 'completion' must be non-empty text or a message list")
        if not isinstance(p, (str, list)):
            raise UserError(f"{where}: 'prompt' must be text or a message list, got {type(p).__name__}")
        try:
            if isinstance(p, list) and isinstance(c, list):
                return encode_conversation(tokenizer, p + c, train_from=len(p), train_on_prompt=train_on_prompt)
            return [encode_prompt_completion(tokenizer, p, c, train_on_prompt=train_on_prompt)]
        except UserError as e:
            raise UserError(f"{where}: {e}") from None
    if fmt == "text":
        t = row["text"]
        if not isinstance(t, str) or not t:
            raise UserError(f"{where}: 'text' must be non-empty text")
        return [encode_text(tokenizer, t)]
    raise AssertionError(fmt)


def encode_row(tokenizer, row: dict, fmt: str, where: str, train_on_prompt: bool = False) -> Encoded:
    """One data row as one training row (the first when it gives several; see `encode_row_parts`)."""
    return encode_row_parts(tokenizer, row, fmt, where, train_on_prompt)[0]


def fit_length(enc: Encoded, max_length: int, mode: str, stats: EncodeStats) -> Encoded | None:
    """`enc` cut to `max_length` tokens (mode "truncate": the end is cut) or None (mode "drop"
    and too long, or no trained token left after the cut); counts what happened in `stats`."""
    if len(enc) > max_length:
        if mode == "drop":
            stats.dropped_long += 1
            return None
        stats.truncated += 1
        enc = Encoded(enc.input_ids[:max_length], enc.labels[:max_length], enc.extra)
    # The first token is never a target (nothing precedes it), so count from position 1.
    if not any(x != -100 for x in enc.labels[1:]):
        stats.dropped_empty += 1
        return None
    return enc


def load_sft_data(path: str, split: str, tokenizer, max_length: int, truncation: str = "truncate",
                  train_on_prompt: bool = False, what: str = "data") -> tuple[list[Encoded], EncodeStats]:
    """Read and encode the SFT file `path` (split `split`): every row through `encode_row` and
    `fit_length`. Returns (rows, stats). Raises UserError for a missing file, rows in no SFT
    format, a bad row (naming file and row), and when every row was dropped."""
    ds = load_rows(path, split, what)
    fmt = require_format(ds, path, SFT_FORMATS)
    stats = EncodeStats()
    out: list[Encoded] = []
    stops = end_of_turn_ids(tokenizer)
    for i, row in enumerate(ds):
        stats.rows += 1
        parts = encode_row_parts(tokenizer, row, fmt, f"{path} row {i + 1}", train_on_prompt)
        if stops and fmt != "text" and not any(lab in stops for p in parts for lab in p.labels):
            stats.no_stop += 1
        if len(parts) > 1:
            stats.split_rows += 1
        kept = False
        for enc in parts:
            enc = fit_length(enc, max_length, truncation, stats)
            if enc is None:
                continue
            kept = True
            stats.training_rows += 1
            stats.tokens += len(enc)
            stats.trained_tokens += enc.n_trained
            out.append(enc)
        stats.kept += kept
    if not out:
        raise UserError(
            f"{path}: every row was dropped ({stats.summary()}); raise max_length or check that rows have an answer"
        )
    return out, stats
