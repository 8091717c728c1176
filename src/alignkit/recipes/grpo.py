"""GRPO: group-relative policy optimisation.

For each prompt x, sample a group of G answers y_1..y_G from the current policy and score them:
r_1..r_G. Each answer's advantage is its reward relative to its group:

    A_i = (r_i - mean(r)) / (std(r) + eps)      scale=group  (GRPO)
    A_i = (r_i - mean(r)) / (std_batch + eps)   scale=batch
    A_i =  r_i - mean(r)                        scale=none   (Dr. GRPO)

and every token of y_i gets A_i. The policy is updated `iterations` (μ) times on the batch with
the clipped surrogate, the old log-probs held fixed:

    l_t = -min(ρ_t A, clip(ρ_t, 1 - clip_low, 1 + clip_high) A) + β · KL_t(π ‖ π_ref),
    ρ_t = π(y_t | x, y_<t) / π_old(y_t | x, y_<t)

aggregated over tokens as `aggregation` says (see alignkit.losses.policy_loss). β = 0 loads no
reference model. With μ = 1, π_old = π (detached) and the update is a plain policy gradient.
"""

from __future__ import annotations

import torch

from alignkit.advantages import group_normalized, zero_std_groups
from alignkit.config import GRPOConfig
from alignkit.losses import policy_loss_terms
from alignkit.recipes import online as ol
from alignkit.rollout.engine import RolloutBatch

__all__ = ["GRPOConfig", "train_grpo", "grpo_loss_fn"]


def grpo_loss_fn(cfg: GRPOConfig):
    def loss_fn(model, mb: dict):
        out = ol.seq_logps(model, mb, cfg.temperature, cfg.logits_chunk_size, entropy=cfg.compute_entropy)
        lp, ent = out if cfg.compute_entropy else (out, None)
        mask = mb["loss_mask"]
        old = mb["old_trainer_logps"] if "old_trainer_logps" in mb else lp.detach()
        terms = policy_loss_terms(lp, old, mb["advantages"], mask, cfg.clip_low, cfg.clip_high, cfg.aggregation,
                                  ref_logps=mb.get("ref_logps"), kl_coef=cfg.kl_coef, kl_estimator=cfg.kl_estimator,
                                  max_length=cfg.max_new_tokens)
        st, n_tok = terms.stats, terms.stats["tokens"]
        cm = mb["completion_mask"]
        metrics = {
            "clip_frac": (st["clipped"], n_tok),
            "ratio_mean": (st["ratio_sum"], n_tok),
            # sampler vs trainer log-probs of the same tokens, before any update of this batch
            "logprob_mismatch": ((mb["old_logps"] - old).abs()[cm].sum(), cm.sum()),
        }
        if "kl_sum" in st:
            metrics["kl"] = (st["kl_sum"], n_tok)
        if ent is not None:
            metrics["entropy"] = ((ent.detach() * cm).sum(), cm.sum())
        return terms.loss_sum, metrics

    return loss_fn


def grpo_units(aggregation: str):
    def units(mb: dict) -> float:
        m = mb["loss_mask"]
        return float(m.sum()) if aggregation == "token_mean" else float((m.sum(-1) > 0).sum())

    return units


def train_grpo(cfg: GRPOConfig, model=None, tokenizer=None, reward_fn=None) -> dict:
    """Run GRPO; `reward_fn(prompts, completions, **columns) -> list[float | None]` overrides cfg.reward."""
    run = ol.OnlineRun(cfg, "grpo", model, tokenizer, updates_per_step=cfg.iterations, reward_fn=reward_fn)
    G = cfg.num_generations
    loss_fn, units = grpo_loss_fn(cfg), grpo_units(cfg.aggregation)

    def step(rstep: int, clock: ol.StepClock) -> dict:
        # 1. sample G answers for each of this rank's prompts, score them
        ps, cols, batch, rewards, info = run.rollout(rstep)
        if cfg.truncated == "penalty":
            cut = torch.tensor([s.finish_reason == "length" for s in batch.samples])
            rewards = torch.where(cut, torch.full_like(rewards, cfg.truncated_reward), rewards)
        # 2. groups with one reward for everyone carry no signal: count, optionally replace
        flat = zero_std_groups(rewards, G)
        info["zero_std_groups"] = int(flat.sum())
        if cfg.dynamic_sampling and flat.any():
            batch, rewards, info["refilled_groups"] = refill(run, rstep, ps, cols, batch, rewards)
            ps, cols = run.last_prompts
        if cfg.scale == "batch" and run.dist.enabled:  # the batch is every process's samples
            adv = group_normalized(rewards, G, "none") / (global_std(rewards, run.dist) + 1e-6)
        else:
            adv = group_normalized(rewards, G, cfg.scale)
        clock.lap("score")
        # 3. micro-batches of whole groups; loss mask = completion tokens (minus masked truncations)
        mbs = ol.split_groups(batch, cfg.batch_size, cfg.grad_accum, run.pad_id, {"advantages": adv})
        for mb, lo in zip(mbs, range(0, len(batch.samples), cfg.batch_size * G)):
            mb["loss_mask"] = mb["completion_mask"].clone()
            if cfg.truncated == "mask":
                cut = torch.tensor([s.finish_reason == "length" for s in batch.samples[lo:lo + len(mb["input_ids"])]])
                mb["loss_mask"][cut] = False
        # 4. old (μ > 1) and reference log-probs, no grad, same numerics as the update
        if cfg.iterations > 1:
            for mb, lp in zip(mbs, run.policy_logps(mbs)):
                mb["old_trainer_logps"] = lp
        run.add_ref_logps(mbs)
        # 5. μ updates on the same batch
        for _ in range(cfg.iterations):
            metrics = run.trainer.accumulate(mbs, loss_fn, units)
            metrics.update(info)
            run.update(metrics, clock, last=_ == cfg.iterations - 1)
        return info

    return run.loop(step)


def global_std(x: torch.Tensor, dist) -> float:
    """Sample std (n - 1) of `x` over every process, as one process holding all of it would compute."""
    from alignkit.training.dist import all_reduce_sum

    n, total = all_reduce_sum(torch.tensor([float(x.numel()), float(x.double().sum())], dtype=torch.float64),
                              dist).tolist()
    mean = total / n
    sq = float(all_reduce_sum(float(((x.double() - mean) ** 2).sum()), dist))
    return (sq / (n - 1)) ** 0.5 if n > 1 else 0.0


def refill(run: "ol.OnlineRun", rstep: int, ps: list, cols: dict, batch: RolloutBatch, rewards: torch.Tensor):
    """Dynamic sampling: replace groups whose rewards are all equal by groups of fresh prompts, up to
    `max_refill_rounds` extra generations. Groups still flat after that stay (advantage 0)."""
    cfg, G = run.cfg, run.cfg.num_generations
    keep_ps, keep_cols = [], {k: [] for k in cols}
    pool_flat = []

    def add(ps_, cols_, batch_, r_):
        flat = zero_std_groups(r_, G).tolist()
        for g, is_flat in enumerate(flat):
            item = (ps_[g], {k: v[g] for k, v in cols_.items()}, batch_.samples[g * G:(g + 1) * G], r_[g * G:(g + 1) * G])
            (pool_flat if is_flat else keep).append(item)

    keep: list = []
    add(ps, cols, batch, rewards)
    need = len(ps)
    refilled = 0
    for rnd in range(cfg.max_refill_rounds):
        if len(keep) >= need:
            break
        extra_ps, extra_cols = run.extra_prompts(rstep, rnd, need - len(keep))
        with run.trainer.gathered():
            b2 = run.engine.generate(run.trainer.model, extra_ps,
                                     ol.sampling_params(cfg, rstep, run.dist.rank + 64 * (rnd + 1)))
        r2, _ = ol.score(run.reward_fn, extra_ps, extra_cols, b2)
        before = len(keep)
        add(extra_ps, extra_cols, b2, r2)
        refilled += len(keep) - before
    chosen = (keep + pool_flat)[:need]
    samples, rs = [], []
    for gi, (p, c, smp, r) in enumerate(chosen):
        keep_ps.append(p)
        for k in keep_cols:
            keep_cols[k].append(c[k])
        for s in smp:
            s.prompt_index = gi
        samples += smp
        rs.append(r)
    run.last_prompts = (keep_ps, keep_cols)
    return RolloutBatch(samples, G), torch.cat(rs), refilled
