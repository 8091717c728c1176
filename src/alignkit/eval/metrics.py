"""Evaluation metrics (definitions in docs/eval.md).

Pure functions on lists and tensors, plus `completion_logps`, the one place that runs a model to
score given tokens. Everything here is independent of how the samples were generated.
"""

from __future__ import annotations

import math
from typing import Callable, ContextManager, Sequence

import torch

from alignkit.losses import kl_estimate
from alignkit.ops.logprobs import IGNORE_INDEX, causal_lm_token_logps
from alignkit.rewards import answer_format_ok, extract_answer, numbers_equal, reference_number
from alignkit.training.dist import DistInfo, all_reduce_sum

__all__ = [
    "mean_std",
    "distinct_n",
    "win_rate",
    "kl_metrics",
    "completion_logps",
    "eval_nll",
    "task_metrics",
]


def mean_std(values: Sequence[float | None]) -> dict:
    """Mean and population standard deviation of the values that are not None; `none`: how many
    were None (left out)."""
    xs = [float(v) for v in values if v is not None]
    none = len(values) - len(xs)
    if not xs:
        return {"mean": None, "std": None, "n": 0, "none": none}
    m = sum(xs) / len(xs)
    var = sum((x - m) ** 2 for x in xs) / len(xs)
    return {"mean": m, "std": math.sqrt(var), "n": len(xs), "none": none}


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Corpus-level distinct-n: the number of different word n-grams over all texts divided by
    the number of word n-grams (words = whitespace-separated). 0.0 when there is no n-gram."""
    seen = set()
    total = 0
    for t in texts:
        words = t.split()
        for i in range(len(words) - n + 1):
            seen.add(tuple(words[i:i + n]))
            total += 1
    return len(seen) / total if total else 0.0


def win_rate(policy: Sequence[float | None], reference: Sequence[float | None]) -> dict:
    """Pairwise comparison of policy and reference rewards, pair i against pair i.

    win_rate = (wins + ties / 2) / pairs, where a pair is a win when policy > reference and a tie
    when they are equal; pairs with a None on either side are skipped (counted in `skipped`)."""
    if len(policy) != len(reference):
        raise ValueError(f"{len(policy)} policy rewards vs {len(reference)} reference rewards")
    wins = ties = losses = skipped = 0
    for p, r in zip(policy, reference):
        if p is None or r is None:
            skipped += 1
        elif p > r:
            wins += 1
        elif p == r:
            ties += 1
        else:
            losses += 1
    pairs = wins + ties + losses
    rate = (wins + 0.5 * ties) / pairs if pairs else None
    return {"win_rate": rate, "wins": wins, "ties": ties, "losses": losses, "pairs": pairs, "skipped": skipped}


def kl_metrics(logps: Sequence[torch.Tensor], ref_logps: Sequence[torch.Tensor]) -> dict:
    """KL(policy ‖ reference) estimated on samples drawn from the policy.

    logps[i], ref_logps[i]: log π(y_t | x, y_<t) and log π_ref(y_t | x, y_<t) of sample i's
    generated tokens (the same tokens), t = 1..T_i. With d_it = logps[i][t] - ref_logps[i][t]:

        kl_token   = sum_i sum_t d_it / sum_i T_i             (mean over all generated tokens)
        kl_seq     = (1/N) sum_i sum_t d_it                   (per-sample sum, mean over samples)
        k3_token   = sum_i sum_t k3(d_it) / sum_i T_i,  k3(d) = exp(-d) - 1 + d  (>= 0)
        k3_seq     = (1/N) sum_i sum_t k3(d_it)
        kl_seq_stderr = std_i(sum_t d_it) / sqrt(N)

    kl_seq and k3_seq are unbiased estimates of the KL between the two distributions over whole
    completions; kl_token is a ratio estimate of KL per generated token."""
    if len(logps) != len(ref_logps):
        raise ValueError(f"{len(logps)} policy samples vs {len(ref_logps)} reference samples")
    if not logps:
        return {}
    seq_k1, seq_k3, tokens = [], [], 0
    for a, b in zip(logps, ref_logps):
        if a.shape != b.shape:
            raise ValueError(f"sample log-probs of shapes {tuple(a.shape)} and {tuple(b.shape)}")
        a, b = a.double(), b.double()
        seq_k1.append(float(kl_estimate(a, b, "k1").sum()))
        seq_k3.append(float(kl_estimate(a, b, "k3").sum()))
        tokens += a.numel()
    n = len(seq_k1)
    mean = sum(seq_k1) / n
    var = sum((x - mean) ** 2 for x in seq_k1) / (n - 1) if n > 1 else 0.0
    return {
        "kl_token": sum(seq_k1) / max(tokens, 1),
        "kl_seq": mean,
        "k3_token": sum(seq_k3) / max(tokens, 1),
        "k3_seq": sum(seq_k3) / n,
        "kl_seq_stderr": math.sqrt(var / n),
        "kl_tokens": tokens,
    }


@torch.no_grad()
def completion_logps(model, segments: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int,
                     batch_size: int = 16, chunk_size: int = 1024, temperature: float = 1.0) -> list[torch.Tensor]:
    """log p(generated token | context, earlier generated tokens) for each (context ids, generated
    ids) segment, as a float32 CPU tensor of length len(generated ids) per segment.

    Segments are right-padded into batches of `batch_size`; targets are the generated tokens only
    (context and padding are -100), and log-probs come from `causal_lm_token_logps` at
    `temperature` (logits / temperature), so two models scored here see identical tokens and
    masking."""
    model.eval()
    device = next(model.parameters()).device
    out: list[torch.Tensor] = [torch.zeros(0)] * len(segments)
    order = sorted(range(len(segments)), key=lambda i: -(len(segments[i][0]) + len(segments[i][1])))
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        T = max(len(segments[i][0]) + len(segments[i][1]) for i in idx)
        B = len(idx)
        ids = torch.full((B, T), pad_id, dtype=torch.long)
        attn = torch.zeros((B, T), dtype=torch.long)
        tgt = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
        for j, i in enumerate(idx):
            ctx, gen = list(segments[i][0]), list(segments[i][1])
            if not ctx:
                raise ValueError("a segment needs at least one context token")
            p, c = len(ctx), len(gen)
            ids[j, :p + c] = torch.tensor(ctx + gen)
            attn[j, :p + c] = 1
            if c:
                tgt[j, p - 1:p + c - 1] = torch.tensor(gen)
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        lp = causal_lm_token_logps(model, ids.to(device), attention_mask=attn.to(device),
                                   position_ids=pos.to(device), targets=tgt.to(device), chunk_size=chunk_size,
                                   temperature=temperature).float().cpu()
        for j, i in enumerate(idx):
            p, c = len(segments[i][0]), len(segments[i][1])
            out[i] = lp[j, p - 1:p + c - 1].clone()
    return out


@torch.no_grad()
def eval_nll(model, rows: Sequence, make_batch: Callable[[list[int]], dict], batch_size: int, chunk_size: int,
             dist: DistInfo, autocast: Callable[[], ContextManager]) -> dict:
    """Token-mean negative log-likelihood of the trained tokens of `rows`, and its perplexity.

    Rows are split across data-parallel ranks (rank r takes rows r, r + world, ...);
    `make_batch(indices)` collates rows into a batch with `input_ids`, `attention_mask`,
    `position_ids` (B, T) and `targets` (B, T, already shifted; IGNORE_INDEX where not trained).
    Summed NLL and token count are all-reduced before dividing, so the result is the mean over
    every trained token of the set, whatever the number of ranks:

        eval_loss = - sum log p(target token) / #trained tokens     (nats per token)
        eval_ppl  = exp(eval_loss)   (exponent capped at 50 so a diverged model stays finite)

    Returns {"eval_loss", "eval_ppl", "eval_tokens"}. Leaves `model` in eval mode.
    `autocast`: a factory of the context the forward runs in (the trainer's mixed precision, or
    contextlib.nullcontext)."""
    model.eval()
    total, count = 0.0, 0
    mine = list(range(dist.rank, len(rows), dist.world))
    for i in range(0, len(mine), batch_size):
        mb = make_batch(mine[i:i + batch_size])
        mb = {k: (v.to(dist.device) if isinstance(v, torch.Tensor) else v) for k, v in mb.items()}
        with autocast():
            lp = causal_lm_token_logps(model, mb["input_ids"], attention_mask=mb["attention_mask"],
                                       position_ids=mb["position_ids"], targets=mb["targets"], chunk_size=chunk_size)
        mask = mb["targets"] != IGNORE_INDEX
        total += float(-(lp.float() * mask).sum())
        count += int(mask.sum())
    summed = all_reduce_sum(torch.tensor([total, float(count)], dtype=torch.float64), dist)
    nll = float(summed[0] / max(summed[1], 1))
    return {"eval_loss": nll, "eval_ppl": math.exp(min(nll, 50.0)), "eval_tokens": int(summed[1])}


def task_metrics(answers: Sequence[str], references: Sequence, mode: str) -> dict:
    """Exact accuracy and format rate of answers on a verifiable task (`mode`: toy, gsm8k or
    last_number; see `alignkit.rewards.extract_answer` / `answer_format_ok`).

    accuracy    = correct / scored, correct: the answer's number equals the reference number
    format_rate = answers in the task's format / scored
    Samples whose reference has no number are not scored (`unscored`)."""
    correct = fmt = scored = 0
    for a, ref in zip(answers, references):
        r = reference_number(ref)
        if r is None:
            continue
        scored += 1
        correct += numbers_equal(extract_answer(a, mode), r)
        fmt += answer_format_ok(a, mode)
    if not scored:
        return {"accuracy": None, "format_rate": None, "scored": 0, "unscored": len(answers)}
    return {"accuracy": correct / scored, "format_rate": fmt / scored, "scored": scored,
            "unscored": len(answers) - scored}
