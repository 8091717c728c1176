"""REINFORCE with a moving-average baseline (the seed report's Algorithm 1).

    for each step:
        sample a batch of prompts x_1..x_N, generate y_i ~ π(·|x_i), score r_i = R(x_i, y_i)
        b ← α·b + (1 − α)·mean(r)              (the baseline is updated first ...)
        A_i = r_i − b                           (... then used)
        L = −(1/N) Σ_i A_i · log π(y_i | x_i)  [+ β · (1/N) Σ_i KL_i]

log π(y|x) is the sum of the answer's token log-probs, KL_i the sum over its tokens of the
per-token estimator against the reference (β = 0 loads no reference). The gradient of L is the
policy-gradient estimate ∇E[r] ≈ (1/N) Σ (r_i − b) ∇log π(y_i|x_i): the baseline lowers its
variance without biasing it, since E[b ∇log π] = b ∇Σ π = 0.

A sample the reward source cannot score (None) is left out: not in the baseline's mean, advantage
0, no loss term and no unit of N. `overlong_buffer` adds DAPO's overlong shaping to the rewards.
"""

from __future__ import annotations

import torch

from alignkit.advantages import MovingAverageBaseline, scored_mask
from alignkit.config import ReinforceConfig
from alignkit.losses import kl_estimate
from alignkit.recipes import online as ol
from alignkit.training.dist import all_reduce_sum
from alignkit.training.loop import StepClock, StepResult

__all__ = ["ReinforceConfig", "train_reinforce", "sequence_pg_loss_fn", "n_sequences"]


def sequence_pg_loss_fn(cfg, kl_in_loss: bool):
    """loss_fn(model, mb) -> (Σ_i w_i · (−A_i · Σ_t c_t log π(y_t) [+ β Σ_t KL_t]), metrics), summed
    over the micro-batch's sequences (loss units: scored sequences, `n_sequences`). mb: rollout rows
    with `advantages` (B,), `scored` (B,) float (w_i: 0 for a sample the reward source could not
    score, so it gives no gradient), `sampler_logps` and, with a reference, `ref_logps` (B, T).

    c_t is `cfg.rollout_correction` (`alignkit.losses.rollout_correction`) with the trainer's own
    log-probs of this forward as π_trainer: one update per rollout, so they are the rollout
    weights' log-probs. tis: c_t = min(π_trainer/π_sampler, cap); mis: c_t = 0 for a token whose
    ratio leaves [1/cap, cap] (the units are sequences, so the normaliser does not move); none: 1."""
    from alignkit.losses import rollout_correction

    def loss_fn(model, mb: dict):
        out = ol.token_logps(model, mb, cfg.temperature, cfg.logits_chunk_size, entropy=cfg.compute_entropy)
        logps, entropy = out if cfg.compute_entropy else (out, None)
        w = mb["scored"]
        m = mb["completion_mask"] & (w[:, None] > 0)
        c = rollout_correction(logps, mb["sampler_logps"], m, cfg.rollout_correction, cfg.rollout_correction_cap)
        pg = logps * c.mask if c.weights is None else logps * c.weights
        sequence_logps = (logps * m).sum(-1)
        loss = -(mb["advantages"] * pg.sum(-1)).sum()
        metrics = {"logprob_mismatch": ((mb["sampler_logps"] - logps.detach()).abs()[m].sum(), m.sum()),
                   "seq_logp": sequence_logps.detach().sum()}
        if cfg.rollout_correction != "none":
            metrics[ol.CORRECTION_KEY[cfg.rollout_correction]] = (c.stats.get("capped", c.stats.get("dropped")),
                                                                  c.stats["tokens"])
        loss_fn.ratio_max = max(loss_fn.ratio_max, ol.ratio_max(mb["sampler_logps"], logps, m))  # a max: aside
        if "ref_logps" in mb:
            kl = kl_estimate(logps, mb["ref_logps"], cfg.kl_estimator) * m
            if kl_in_loss and cfg.kl_coef:
                loss = loss + cfg.kl_coef * kl.sum()
            metrics["kl"] = (kl.detach().sum(), m.sum())
            metrics["kl_seq"] = kl.detach().sum()
        if entropy is not None:
            metrics["entropy"] = ((entropy.detach() * m).sum(), m.sum())
        return loss, metrics

    loss_fn.ratio_max = 1.0
    return loss_fn


def n_sequences(mb: dict) -> float:
    """Loss units of a micro-batch: its scored sequences (all of them when every sample was scored)."""
    return float(mb["scored"].sum())


def train_reinforce(cfg: ReinforceConfig, model=None, tokenizer=None, reward_fn=None) -> dict:
    """Run REINFORCE with a moving-average baseline (Algorithm 1 above); `reward_fn(prompts,
    completions, **columns)` overrides cfg.reward. One optimizer step per rollout step
    (`max_steps` of them). Returns the last held-out evaluation (empty without eval_data)."""
    run = ol.OnlineRun(cfg, "reinforce", model, tokenizer, reward_fn=reward_fn)
    baseline = MovingAverageBaseline(cfg.baseline_alpha)
    run.trainer.register_state("baseline", baseline.state_dict, baseline.load_state_dict)
    loss_fn = sequence_pg_loss_fn(cfg, kl_in_loss=True)
    rows_per_mb = cfg.batch_size * cfg.num_generations

    def step(rstep: int, clock: StepClock) -> StepResult:
        # sample a batch of prompts, generate y_i ~ π(·|x_i), score r_i
        rollout = ol.shape_rewards(run.collect(rstep, *run.prompts_for(rstep), clock), cfg)
        r = rollout.rewards
        # b ← α·b + (1 − α)·mean(r) over the whole global batch (scored samples only; NaN = not
        # scored), then A_i = r_i − b (0 for an unscored sample)
        ok = scored_mask(r)
        total = all_reduce_sum(torch.tensor([float(r[ok].sum()), float(ok.sum())], dtype=torch.float64), run.dist)
        adv = baseline.update(r, mean=float(total[0] / total[1]) if total[1] > 0 else float("nan"))
        info = {**ol.rollout_metrics(rollout), "baseline": baseline.value}
        # L = −(1/N) Σ_i A_i · log π(y_i|x_i) [+ β KL], N = scored samples of the global batch
        mbs = ol.row_batches(rollout, rows_per_mb, cfg.grad_accum, run.pad_id,
                             {"advantages": adv, "scored": ol.scored_rows(r)})
        run.add_ref_logps(mbs)
        loss_fn.ratio_max = 1.0
        metrics = run.trainer.accumulate(mbs, loss_fn, n_sequences)
        metrics["mismatch_ratio_max"] = ol.max_over_ranks(loss_fn.ratio_max, run.dist)
        metrics.update(info)
        return StepResult([run.trainer.optimizer_step(metrics)], rollout, rollout.generated_tokens)

    return run.loop(step)
