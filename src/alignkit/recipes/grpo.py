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

The objective's options (docs/objectives.md): `ratio_level=sequence` uses one ratio per answer,
the geometric mean of its token ratios (GSPO); `loss_type=cispo` replaces the clipped surrogate by
−sg(min(ρ_t, 1 + clip_high)) · A · log π(y_t) (CISPO); `dual_clip=c` bounds the loss of negative
advantages by −c·A. `overlong_buffer` adds DAPO's overlong shaping to the rewards before the
advantages. A sample the reward source cannot score (None) gets advantage 0, is left out of its
group's mean and std and is masked out of the loss.
"""

from __future__ import annotations

import torch

from alignkit.advantages import group_normalized, scored_mask, zero_std_groups
from alignkit.config import GRPOConfig
from alignkit.losses import policy_loss_terms
from alignkit.recipes import online as ol
from alignkit.rollout.rollout import Rollout
from alignkit.training.dist import all_reduce_sum
from alignkit.training.loop import StepClock, StepResult

__all__ = ["GRPOConfig", "train_grpo", "grpo_loss_fn", "grpo_units", "refill", "global_std"]


def grpo_loss_fn(cfg: GRPOConfig):
    """loss_fn(model, mb) -> (clipped surrogate [+ β KL] summed as `aggregation` says, metrics).
    mb: the rollout rows' tensors with `advantages` (B,), `loss_mask` (B, T), `sampler_logps`,
    optional `old_logps` (π_old; default π detached, μ = 1) and `ref_logps`."""

    def loss_fn(model, mb: dict):
        out = ol.token_logps(model, mb, cfg.temperature, cfg.logits_chunk_size, entropy=cfg.compute_entropy)
        logps, entropy = out if cfg.compute_entropy else (out, None)
        old = mb["old_logps"] if "old_logps" in mb else logps.detach()
        terms = policy_loss_terms(logps, old, mb["advantages"], mb["loss_mask"], cfg.clip_low, cfg.clip_high,
                                  cfg.aggregation, ref_logps=mb.get("ref_logps"), kl_coef=cfg.kl_coef,
                                  kl_estimator=cfg.kl_estimator, max_length=cfg.max_new_tokens,
                                  dual_clip=cfg.dual_clip, ratio_level=cfg.ratio_level, loss_type=cfg.loss_type,
                                  is_weights=mb.get("is_weights"))
        stats, n_tok = terms.stats, terms.stats["tokens"]
        completion = mb["completion_mask"]
        # the largest per-token probability ratio, either way: a max, so kept aside, not summed
        loss_fn.ratio_max = max(loss_fn.ratio_max, ol.ratio_max(mb["sampler_logps"], old, completion))
        metrics = {
            "clip_frac": (stats["clipped"], n_tok),
            "ratio_mean": (stats["ratio_sum"], n_tok),
            # sampler vs trainer log-probs of the same tokens, before any update of this batch
            "logprob_mismatch": ((mb["sampler_logps"] - old).abs()[completion].sum(), completion.sum()),
        }
        if "dual_clipped" in stats:
            metrics["dual_clip_frac"] = (stats["dual_clipped"], n_tok)
        if "kl_sum" in stats:
            metrics["kl"] = (stats["kl_sum"], n_tok)
        if entropy is not None:
            metrics["entropy"] = ((entropy.detach() * completion).sum(), completion.sum())
        return terms.loss_sum, metrics

    loss_fn.ratio_max = 1.0
    return loss_fn


def grpo_units(aggregation: str):
    """The loss units of a micro-batch: trained tokens (token_mean) or trained sequences."""

    def units(mb: dict) -> float:
        m = mb["loss_mask"]
        return float(m.sum()) if aggregation == "token_mean" else float((m.sum(-1) > 0).sum())

    return units


def train_grpo(cfg: GRPOConfig, model=None, tokenizer=None, reward_fn=None) -> dict:
    """Run GRPO; `reward_fn(prompts, completions, **columns) -> list[float | None]` overrides
    cfg.reward. `max_steps` counts rollout steps, each making `iterations` optimizer steps.
    Returns the last held-out evaluation (empty without eval_data)."""
    run = ol.OnlineRun(cfg, "grpo", model, tokenizer, updates_per_step=cfg.iterations, reward_fn=reward_fn)
    G, tr = cfg.num_generations, run.trainer
    loss_fn, units = grpo_loss_fn(cfg), grpo_units(cfg.aggregation)

    def draw(rstep: int, prompts: list, columns: dict, clock: StepClock, stream: int | None = None) -> Rollout:
        """Sample and score G answers per prompt; the truncation rule and the overlong shaping
        apply to every draw."""
        rollout = run.collect(rstep, prompts, columns, clock, stream)
        if cfg.truncated == "penalty":
            cut = rollout.truncated
            rollout = rollout.with_rewards(torch.where(cut, torch.full_like(rollout.rewards, cfg.truncated_reward),
                                                       rollout.rewards))
        return ol.shape_rewards(rollout, cfg)

    def step(rstep: int, clock: StepClock) -> StepResult:
        # 1. sample G answers for each of this rank's prompts, score them
        rollout = draw(rstep, *run.prompts_for(rstep), clock)
        info = ol.rollout_metrics(rollout)  # of the policy's own samples, before any selection
        # 2. groups with one reward for everyone carry no signal: count, optionally replace
        flat = zero_std_groups(rollout.rewards, G)
        info["zero_std_groups"] = int(flat.sum())
        if cfg.dynamic_sampling and flat.any():
            rollout, info["refilled_groups"] = refill(run, rstep, rollout, draw, clock)
        rewards = rollout.rewards
        if cfg.scale == "batch" and run.dist.enabled:  # the batch is every process's samples
            adv = group_normalized(rewards, G, "none") / (global_std(rewards, run.dist) + 1e-6)
        else:
            adv = group_normalized(rewards, G, cfg.scale)
        # 3. micro-batches of whole groups; loss mask = completion tokens (minus masked truncations
        #    and the samples the reward source could not score)
        mbs = ol.split_groups(rollout, cfg.batch_size, cfg.grad_accum, run.pad_id,
                              {"advantages": adv, "truncated": rollout.truncated, "scored": scored_mask(rewards)})
        for mb in mbs:
            mb["loss_mask"] = mb["completion_mask"] & mb.pop("scored")[:, None]
            if cfg.truncated == "mask":
                mb["loss_mask"][mb["truncated"]] = False
            del mb["truncated"]
        # 4. old (μ > 1) and reference log-probs, no grad, same numerics as the update
        if cfg.iterations > 1 or cfg.rollout_correction != "none":
            for mb, lp in zip(mbs, run.old_logps(mbs)):
                mb["old_logps"] = lp
            info.update(ol.correct_rollout(mbs, cfg, run.dist))  # sampler vs trainer: TIS / MIS
        run.add_ref_logps(mbs)
        clock.lap("prepare")
        # 5. μ updates on the same batch
        updates = []
        for _ in range(cfg.iterations):
            loss_fn.ratio_max = 1.0
            metrics = tr.accumulate(mbs, loss_fn, units)
            metrics["mismatch_ratio_max"] = ol.max_over_ranks(loss_fn.ratio_max, run.dist)
            metrics.update(info)
            updates.append(tr.optimizer_step(metrics))
        return StepResult(updates, rollout, rollout.generated_tokens)

    return run.loop(step)


def global_std(x: torch.Tensor, dist) -> float:
    """Sample std (n - 1) of `x` over every process, as one process holding all of it would compute;
    NaN entries (unscored samples) are left out."""
    x = x[scored_mask(x)]
    n, total = all_reduce_sum(torch.tensor([float(x.numel()), float(x.double().sum())], dtype=torch.float64),
                              dist).tolist()
    mean = total / n if n else 0.0
    sq = float(all_reduce_sum(float(((x.double() - mean) ** 2).sum()), dist))
    return (sq / (n - 1)) ** 0.5 if n > 1 else 0.0


def refill(run: "ol.OnlineRun", rstep: int, rollout: Rollout, draw, clock: StepClock) -> tuple[Rollout, int]:
    """Dynamic sampling (DAPO): replace groups whose rewards are all equal by groups of fresh
    prompts, drawn with `draw` (so they get the same autocast, truncation rule and token count),
    up to `max_refill_rounds` extra generations. Returns the merged rollout of as many groups as
    `rollout` (groups with signal first, in draw order, then flat ones, which keep advantage 0)
    whose stats count every draw, and the number of groups with signal the refills gave."""
    G, need = rollout.group_size, rollout.n_groups
    keep: list[Rollout] = []
    flat: list[Rollout] = []
    drawn = [rollout]

    def sort(r: Rollout) -> int:
        is_flat = zero_std_groups(r.rewards, G).tolist()
        keep.append(r.select_groups([g for g, f in enumerate(is_flat) if not f]))
        flat.append(r.select_groups([g for g, f in enumerate(is_flat) if f]))
        return keep[-1].n_groups

    sort(rollout)
    refilled = 0
    for rnd in range(run.cfg.max_refill_rounds):
        have = sum(r.n_groups for r in keep)
        if have >= need:
            break
        extra = draw(rstep, *run.extra_prompts(rstep, rnd, need - have), clock, run.dist.rank + 64 * (rnd + 1))
        drawn.append(extra)
        refilled += sort(extra)
    merged = Rollout.concat(keep + flat).select_groups(list(range(need)))
    stats = Rollout.concat(drawn).stats  # what was drawn, kept or not
    return Rollout(merged.prompts, merged.columns, merged.samples, G, merged.rewards, stats), refilled
