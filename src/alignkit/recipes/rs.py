"""Rejection sampling (best-of-N), then SFT on the winners.

    for round in 1..rounds:
        for each prompt x of the round: sample y_1..y_N ~ π(·|x), score r_1..r_N
        keep y* = argmax_i r_i   (only if r* ≥ threshold, when one is set)
        SFT on the kept (x, y*) for `sft_steps`:
            L = −(1/T) Σ_tokens log π(y*_t | x, y*_<t)  [+ β · (1/T) Σ_tokens KL_t(π ‖ π_start)]

The kept answers are trained as the exact tokens that were sampled (no re-tokenisation), up to
and including their end-of-turn token. Each round's kept set is written to
`round-K/best-rank<r>.jsonl`, its rollout metrics to `round-K/stats-rank<r>.json` (both reused
on resume inside the round; that round's samples are not written again to samples.jsonl). The policy's log-probs in the
SFT loss and the reference's in the KL term are both taken at temperature 1 (plain SFT), whatever
the sampling temperature. A round whose samples all miss the threshold makes `sft_steps` skipped
steps (logged, no update). `max_steps` is unused: a run is `rounds` rollout steps of `sft_steps`
optimizer steps. `alignkit rs generate` writes the best-of-N set only,
as SFT-ready `messages` rows: data curation without training.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from alignkit.config import RSConfig
from alignkit.data.chat import Encoded
from alignkit.advantages import scored_mask
from alignkit.data.collate import IGNORE, n_trained, pad_collate
from alignkit.data.order import seeded_generator
from alignkit.data.prompts import load_prompts
from alignkit.losses import kl_estimate
from alignkit.recipes import online as ol
from alignkit.rollout.rollout import Rollout, collect
from alignkit.training.loop import StepClock, StepResult

__all__ = ["RSConfig", "train_rs", "best_of_n", "generate_best_of_n"]


def best_of_n(batch, rewards: torch.Tensor, threshold: float | None) -> list[tuple[int, float]]:
    """(sample index, reward) of each group's best scored sample (first on ties), if it passes the
    threshold. `batch`: a `Rollout` or the engine's `RolloutBatch`; rewards (N,), NaN = the reward
    source could not score the sample: it is never kept, and a group with no scored sample keeps
    nothing."""
    G = batch.group_size
    out = []
    for g in range(len(batch.samples) // G):
        r = rewards[g * G:(g + 1) * G]
        ok = scored_mask(r)
        if not bool(ok.any()):
            continue
        i = int(torch.argmax(torch.where(ok, r, torch.tensor(float("-inf"), dtype=r.dtype))))
        if threshold is None or float(r[i]) >= threshold:
            out.append((g * G + i, float(r[i])))
    return out


def _kept_rows(batch, kept: list[tuple[int, float]]) -> list[dict]:
    rows = []
    for i, r in kept:
        s = batch.samples[i]
        row = {"prompt_ids": s.prompt_ids, "completion_ids": s.completion_ids, "completion": s.text,
               "reward": r, "prompt_index": s.prompt_index}
        if getattr(s, "trained", None) is not None:  # multi-turn: only the model's own tokens are trained
            row["trained"] = list(s.trained)
        rows.append(row)
    return rows


def rs_loss_fn(cfg: RSConfig):
    """loss_fn(model, mb) -> (summed NLL of the kept answers' tokens [+ β Σ KL_t], metrics), at
    temperature 1 (loss units: trained tokens). mb: padded SFT rows, optional `ref_logps` (B, T)."""

    def loss_fn(model, mb: dict):
        logps = ol.token_logps(model, mb, 1.0, cfg.logits_chunk_size)
        m = mb["targets"] != IGNORE
        loss = -(logps * m).sum()
        metrics = {}
        if "ref_logps" in mb:
            kl = kl_estimate(logps, mb["ref_logps"], cfg.kl_estimator) * m
            loss = loss + cfg.kl_coef * kl.sum()
            metrics["kl"] = kl.detach().sum()
        return loss, metrics

    return loss_fn


def train_rs(cfg: RSConfig, model=None, tokenizer=None, reward_fn=None) -> dict:
    """Run rejection sampling (best-of-N, then SFT on the winners) for `rounds` rounds;
    `reward_fn(prompts, completions, **columns)` overrides cfg.reward. Returns the last held-out
    evaluation (empty without eval_data)."""
    run = ol.OnlineRun(cfg, "rs", model, tokenizer, updates_per_step=cfg.sft_steps, reward_fn=reward_fn,
                       rollout_steps=cfg.rounds, prompts_per_step=_per_rank(cfg))
    tr = run.trainer
    loss_fn = rs_loss_fn(cfg)

    def step(rnd: int, clock: StepClock) -> StepResult:
        path = run.run_dir / f"round-{rnd + 1}" / f"best-rank{run.dist.rank}.jsonl"
        stats_path = path.with_name(f"stats-rank{run.dist.rank}.json")
        rollout = None
        if path.exists() and stats_path.exists():  # resumed inside the round: its best-of-N set was drawn
            rows = [json.loads(ln) for ln in path.read_text(encoding="utf-8").splitlines()]
            stats = json.loads(stats_path.read_text(encoding="utf-8"))
            info, generated = stats["info"], stats["generated_tokens"]
        else:
            # best of N per prompt
            rollout = ol.shape_rewards(run.collect(rnd, *run.prompts_for(rnd), clock), cfg)
            kept = best_of_n(rollout, rollout.rewards, cfg.threshold)
            rows = _kept_rows(rollout, kept)
            info = {**ol.rollout_metrics(rollout), "kept_frac": len(kept) / max(rollout.n_groups, 1),
                    "best_reward": sum(r for _, r in kept) / max(len(kept), 1)}
            generated = rollout.generated_tokens
            path.parent.mkdir(parents=True, exist_ok=True)
            _write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
            _write_atomic(stats_path, json.dumps({"info": info, "generated_tokens": generated}))
        encs = [Encoded(r["prompt_ids"] + r["completion_ids"],
                        [IGNORE] * len(r["prompt_ids"]) + [t if m else IGNORE for t, m in zip(
                            r["completion_ids"], r.get("trained") or [True] * len(r["completion_ids"]))])
                for r in rows]
        if not encs:
            tr.info(f"round {rnd + 1}: no sample passed the threshold; skipping its SFT")
        # SFT on the kept answers: sft_steps steps of rows drawn with replacement (seeded per round)
        per_step = cfg.batch_size * cfg.grad_accum
        draws = torch.randint(0, max(len(encs), 1), (cfg.sft_steps, per_step), generator=seeded_generator(
            cfg.seed, rnd, 7919))
        updates = []
        for k in range(tr.step - rnd * cfg.sft_steps, cfg.sft_steps):  # from inside the round on resume
            if not encs:
                updates.append(tr.skip_update(dict(info)))
                continue
            idx = draws[k].tolist()
            mbs = [pad_collate([encs[i] for i in idx[j * cfg.batch_size:(j + 1) * cfg.batch_size]], run.pad_id)
                   for j in range(cfg.grad_accum)]
            run.add_ref_logps(mbs, temperature=1.0)  # the policy's numerics in the loss
            metrics = tr.accumulate(mbs, loss_fn, n_trained)
            metrics.update(info)
            updates.append(tr.optimizer_step(metrics))
        return StepResult(updates, rollout, generated)

    return run.loop(step)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def _per_rank(cfg: RSConfig) -> int:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return max(1, cfg.prompts_per_round // world)


def generate_best_of_n(cfg: RSConfig, model=None, tokenizer=None, reward_fn=None) -> Path:
    """Write the best-of-N answer of every prompt (passing the threshold) as `messages` rows."""
    from alignkit.data.chat import setup_chat_template
    from alignkit.errors import UserError
    from alignkit.models import load_model, load_tokenizer
    from alignkit.rewards import build_reward
    if not cfg.output:
        raise UserError("rs generate: pass output=FILE.jsonl for the best-of-N rows")
    tok = tokenizer or load_tokenizer(cfg.model)
    setup_chat_template(tok, cfg.chat_template)
    prompts = load_prompts(cfg.data, cfg.data_split, cfg.prompt_column, cfg.chat_prompts)
    reward_fn = reward_fn or build_reward(cfg.reward, tokenizer=tok)
    from alignkit.rollout.engines import build_engine

    engine = build_engine(cfg, tok, cfg.model, sampling=ol.sampling_params(cfg, 0, 0))
    model = model or load_model(cfg.model)
    out = Path(cfg.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    kept_total = 0
    with tmp.open("w", encoding="utf-8") as f:
        for lo in range(0, len(prompts), cfg.generation_batch_size):
            idx = list(range(lo, min(lo + cfg.generation_batch_size, len(prompts))))
            ps, cols = prompts.take(idx)
            batch: Rollout = collect(engine, model, ps, cols, ol.sampling_params(cfg, lo, 0), reward_fn)
            for i, r in best_of_n(batch, batch.rewards, cfg.threshold):
                s = batch.samples[i]
                p = ps[s.prompt_index]
                msgs = (p if isinstance(p, list) else [{"role": "user", "content": p}])
                row = {"messages": msgs + [{"role": "assistant", "content": s.text}], "reward": r}
                row.update({k: v[s.prompt_index] for k, v in cols.items()})
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                kept_total += 1
    tmp.replace(out)
    print(f"best-of-{cfg.num_generations}: kept {kept_total}/{len(prompts)} prompts -> {out}")
    return out
