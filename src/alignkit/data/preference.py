"""Preference pairs (`prompt`/`chosen`/`rejected`, or implicit prompt) for reward models and DPO.

Two row forms are accepted:
- explicit: `prompt` + `chosen` + `rejected`, each text or a message list;
- implicit: only `chosen` and `rejected`, whole transcripts that share the prompt. The prompt is
  their longest common prefix cut back to a turn boundary: for message lists, whole messages up
  to the first assistant message where they differ; for text, the prefix up to and including
  the last assistant marker ("\n\nAssistant:" as in HH-RLHF, or another in `TURN_MARKERS`).

Each side is encoded as prompt + answer with the loss mask on the answer only, exactly as SFT
encodes a row, so a pair's two sequences share their prompt tokens.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

import torch

from alignkit.data.chat import Encoded, encode_prompt_completion
from alignkit.data.collate import IGNORE, pad_collate
from alignkit.data.loading import check_messages, load_rows, require_format
from alignkit.data.sft import EncodeStats
from alignkit.errors import UserError

TURN_MARKERS = ("\n\nAssistant:", "\nAssistant:", "<|im_start|>assistant\n", "[/INST]", "\nassistant\n")


@dataclass
class Pair:
    """One preference pair, tokenised: `chosen` / `rejected` share their first `prompt_len`
    tokens (the prompt; labels -100 there) and train only the response tokens. `margin`: the
    row's optional preference strength (reward-model margin loss), None when absent; `extra`:
    the row's other columns."""

    chosen: Encoded
    rejected: Encoded
    prompt_len: int
    margin: float | None = None
    extra: dict = field(default_factory=dict)


def split_implicit_text(chosen: str, rejected: str) -> tuple[str, str, str]:
    """(prompt, chosen response, rejected response) of two texts with an implicit shared prompt:
    the prompt ends after the last assistant turn marker (TURN_MARKERS) inside their common
    prefix. Raises ValueError when the common prefix holds no marker."""
    n = len(os.path.commonprefix([chosen, rejected]))
    common = chosen[:n]
    best = -1
    for m in TURN_MARKERS:
        k = common.rfind(m)
        if k >= 0:
            best = max(best, k + len(m))
    if best < 0:
        raise ValueError("chosen and rejected share no prefix ending in an assistant turn marker "
                         f"({', '.join(repr(m) for m in TURN_MARKERS[:2])}, ...); add a 'prompt' column")
    return chosen[:best], chosen[best:], rejected[best:]


def split_implicit_messages(chosen: list[dict], rejected: list[dict]) -> tuple[list, list, list]:
    """(prompt turns, chosen turns, rejected turns) of two conversations with shared leading
    turns: the prompt is the longest common run of messages, backed up to the start of the
    assistant turns where they differ. Raises ValueError when nothing is shared or one side has
    no turn left after the prompt."""
    k = 0
    while k < min(len(chosen), len(rejected)) and chosen[k] == rejected[k]:
        k += 1
    # back up to the start of the assistant turn(s) where they differ
    while k > 0 and chosen[k - 1]["role"] == "assistant":
        k -= 1
    if k == 0 or k >= len(chosen) or k >= len(rejected):
        raise ValueError("chosen and rejected share no prompt turns before differing assistant turns; add a "
                         "'prompt' column")
    return chosen[:k], chosen[k:], rejected[k:]


def _as_messages(x, where: str, need_assistant: bool) -> list[dict]:
    return check_messages(x, where, need_assistant=need_assistant)


def pair_parts(row: dict, where: str):
    """(prompt, chosen, rejected), each text or messages, from either row form."""
    c, r = row["chosen"], row["rejected"]
    if "prompt" in row and row["prompt"] is not None:
        p = row["prompt"]
    else:
        try:
            if isinstance(c, str) and isinstance(r, str):
                return split_implicit_text(c, r)
            if isinstance(c, list) and isinstance(r, list):
                c = _as_messages(c, f"{where} chosen", True)
                r = _as_messages(r, f"{where} rejected", True)
                return split_implicit_messages(c, r)
        except ValueError as e:
            raise UserError(f"{where}: {e}") from None
        raise UserError(f"{where}: 'chosen' and 'rejected' must both be text or both be message lists")
    if isinstance(p, list):
        p = _as_messages(p, f"{where} prompt", False)
        if isinstance(c, str):
            c = [{"role": "assistant", "content": c}]
        if isinstance(r, str):
            r = [{"role": "assistant", "content": r}]
        c = _as_messages(c, f"{where} chosen", True)
        r = _as_messages(r, f"{where} rejected", True)
    elif isinstance(p, str):
        if not (isinstance(c, str) and isinstance(r, str)):
            raise UserError(f"{where}: with a text 'prompt', 'chosen' and 'rejected' must be text too")
    else:
        raise UserError(f"{where}: 'prompt' must be text or a message list, got {type(p).__name__}")
    for name, v in (("chosen", c), ("rejected", r)):
        if not v:
            raise UserError(f"{where}: '{name}' is empty")
    return p, c, r


def encode_pair(tokenizer, prompt, chosen, rejected) -> tuple[Encoded, Encoded, int]:
    """Encode prompt + chosen and prompt + rejected (text or messages, through the chat
    template) with response-only labels; returns (chosen, rejected, prompt_len), prompt_len
    being the shared run of untrained leading tokens."""
    ce = encode_prompt_completion(tokenizer, prompt, chosen)
    re_ = encode_prompt_completion(tokenizer, prompt, rejected)
    # prompt tokens: the shared run of untrained tokens at the start
    n = 0
    while n < min(len(ce), len(re_)) and ce.input_ids[n] == re_.input_ids[n] and ce.labels[n] == IGNORE:
        n += 1
    return ce, re_, n


def _fit_pair(ce: Encoded, re_: Encoded, plen: int, max_length: int, max_prompt_length: int, mode: str,
              stats: EncodeStats) -> tuple[Encoded, Encoded, int] | None:
    longest = max(len(ce), len(re_))
    if longest <= max_length:
        return ce, re_, plen
    if mode == "drop":
        stats.dropped_long += 1
        return None
    stats.truncated += 1
    # Keep the end of a long prompt (the turn being answered), then cut the answers' ends.
    cut = max(0, plen - max_prompt_length)
    if cut:
        ce = Encoded(ce.input_ids[cut:], ce.labels[cut:])
        re_ = Encoded(re_.input_ids[cut:], re_.labels[cut:])
        plen -= cut
    ce = Encoded(ce.input_ids[:max_length], ce.labels[:max_length])
    re_ = Encoded(re_.input_ids[:max_length], re_.labels[:max_length])
    if ce.n_trained == 0 or re_.n_trained == 0:
        stats.dropped_empty += 1
        return None
    return ce, re_, plen


def load_pairs(path: str, split: str, tokenizer, max_length: int, truncation: str = "truncate",
               max_prompt_length: int | None = None, what: str = "data") -> tuple[list[Pair], EncodeStats]:
    """Read and encode the preference file `path` (split `split`) into Pairs.

    Rows: `prompt` + `chosen` + `rejected` (text or messages) or `chosen` + `rejected` with an
    implicit shared prompt; optional numeric `margin`. Pairs longer than `max_length` tokens are
    truncated (the prompt's start first, down to `max_prompt_length`, default max_length // 2;
    then the responses' ends) or dropped (truncation="drop"). Returns (pairs, stats).
    Raises UserError (naming file and row) for a bad row, and when every pair was dropped."""
    ds = load_rows(path, split, what)
    require_format(ds, path, ("preference",))
    has_margin = "margin" in ds.column_names
    max_prompt_length = max_prompt_length or max_length // 2
    stats = EncodeStats()
    out: list[Pair] = []
    same = 0  # pairs whose chosen equals their rejected: no preference signal
    for i, row in enumerate(ds):
        where = f"{path} row {i + 1}"
        stats.rows += 1
        p, c, r = pair_parts(row, where)
        same += c == r
        ce, re_, plen = encode_pair(tokenizer, p, c, r)
        fitted = _fit_pair(ce, re_, plen, max_length, max_prompt_length, truncation, stats)
        if fitted is None:
            continue
        ce, re_, plen = fitted
        margin = None
        if has_margin and row["margin"] is not None:  # null: this pair has no margin (0 in the loss)
            try:
                margin = float(row["margin"])
            except (TypeError, ValueError):
                raise UserError(f"{where}: 'margin' must be a number, got {row['margin']!r}") from None
        extra = {k: v for k, v in row.items() if k not in ("prompt", "chosen", "rejected", "margin")}
        out.append(Pair(ce, re_, plen, margin, extra))
        stats.kept += 1
        stats.tokens += len(ce) + len(re_)
        stats.trained_tokens += ce.n_trained + re_.n_trained
    if not out:
        raise UserError(f"{path}: every pair was dropped ({stats.summary()}); raise max_length")
    if same == stats.rows:
        print(f"alignkit: warning: {path}: every 'chosen' equals its 'rejected' ({same} pairs), so the preference loss "
              f"has no signal; check the columns", file=sys.stderr, flush=True)
    return out, stats


def pair_collate(pairs: list[Pair], pad_id: int) -> dict:
    """One batch holding the chosen sides then the rejected sides (2B rows), for one forward pass."""
    batch = pad_collate([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id)
    batch["n_pairs"] = len(pairs)
    if any(p.margin is not None for p in pairs):
        batch["margin"] = torch.tensor([p.margin or 0.0 for p in pairs], dtype=torch.float32)
    return batch


# ---------------------------------------------------------------------------------------------- KTO


def _kto_label(value, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise UserError(f"{where}: 'label' must be true (desirable) or false (undesirable), got {value!r}")


def _prompt_len(enc: Encoded) -> int:
    n = 0
    while n < len(enc) and enc.labels[n] == IGNORE:
        n += 1
    return n


def load_kto_examples(path: str, split: str, tokenizer, max_length: int, truncation: str = "truncate",
                      max_prompt_length: int | None = None,
                      what: str = "data") -> tuple[list[Pair], EncodeStats, tuple[int, int]]:
    """KTO rows as `Pair`s: `chosen` = the row's prompt + completion, `rejected` = the same prompt
    with another row's completion (the mismatched pair behind KTO's reference point z0), and
    `extra["label"]` = True for a desirable row.

    Accepted rows: unpaired {prompt, completion, label: true|false} (text or message lists), or
    preference pairs (explicit or implicit prompt), each split into a desirable row (chosen) and
    an undesirable one (rejected). The mismatched completion of row i is that of row
    (i + N/2) mod N, moved on to the next row with a different prompt if it has the same one.
    Returns (examples, stats, (n_desirable, n_undesirable)). Raises UserError (one line, file and
    row) for unlabelled prompt/completion data, a bad label, and a dataset left empty.
    """
    ds = load_rows(path, split, what)
    fmt = require_format(ds, path, ("preference", "prompt_completion"))
    if fmt == "prompt_completion" and "label" not in ds.column_names:
        raise UserError(f"{path}: KTO rows need a 'label' column (true = desirable answer, false = undesirable) "
                        f"next to 'prompt' and 'completion'; or give prompt/chosen/rejected pairs")
    items: list[tuple] = []  # (prompt, completion, label, where)
    for i, row in enumerate(ds):
        where = f"{path} row {i + 1}"
        if fmt == "preference":
            p, c, r = pair_parts(row, where)
            items += [(p, c, True, where), (p, r, False, where)]
            continue
        p, c = row["prompt"], row["completion"]
        if row["label"] is None:
            raise UserError(f"{where}: 'label' is missing; set it to true (desirable) or false (undesirable)")
        label = _kto_label(row["label"], where)
        if isinstance(p, list):
            p = _as_messages(p, f"{where} prompt", False)
            c = _as_messages([{"role": "assistant", "content": c}] if isinstance(c, str) else c, f"{where} completion",
                             True)
        elif not isinstance(p, str) or not isinstance(c, str):
            raise UserError(f"{where}: 'prompt' and 'completion' must be text or message lists")
        if not c:
            raise UserError(f"{where}: 'completion' is empty")
        items.append((p, c, label, where))
    max_prompt_length = max_prompt_length or max_length // 2
    stats, quiet = EncodeStats(), EncodeStats()
    encoded: list[tuple] = []
    for p, c, label, where in items:
        stats.rows += 1
        try:
            enc = encode_prompt_completion(tokenizer, p, c)
        except UserError as e:
            raise UserError(f"{where}: {e}") from None
        fitted = _fit_pair(enc, enc, _prompt_len(enc), max_length, max_prompt_length, truncation, stats)
        if fitted is None:
            continue
        encoded.append((p, c, label, where, fitted[0]))
        stats.kept += 1
        stats.tokens += len(fitted[0])
        stats.trained_tokens += fitted[0].n_trained
    if not encoded:
        raise UserError(f"{path}: every row was dropped ({stats.summary()}); raise max_length")
    N = len(encoded)
    out: list[Pair] = []
    for i, (p, _, label, where, enc) in enumerate(encoded):
        j = (i + N // 2) % N
        for k in range(N):  # the first row from there on with another prompt (any, if all share one)
            if encoded[(j + k) % N][0] != p:
                j = (j + k) % N
                break
        try:
            mis = encode_prompt_completion(tokenizer, p, encoded[j][1])
        except UserError as e:
            raise UserError(f"{where}: mismatched with {encoded[j][3]}: {e}") from None
        fitted = _fit_pair(mis, mis, _prompt_len(mis), max_length, max_prompt_length, "truncate", quiet)
        # a mismatched pair with no answer token left counts for nothing in z0 (kl_ok False)
        mis_enc = fitted[0] if fitted is not None else Encoded(enc.input_ids, [IGNORE] * len(enc))
        out.append(Pair(enc, mis_enc, _prompt_len(enc), None, {"label": label}))
    n_good = sum(1 for e in out if e.extra["label"])
    return out, stats, (n_good, len(out) - n_good)
