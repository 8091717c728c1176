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
"""

from __future__ import annotations

import torch

from alignkit.advantages import MovingAverageBaseline
from alignkit.config import ReinforceConfig
from alignkit.losses import kl_estimate
from alignkit.recipes import online as ol
from alignkit.training.dist import all_reduce_sum

__all__ = ["ReinforceConfig", "train_reinforce", "sequence_pg_loss_fn"]


def sequence_pg_loss_fn(cfg, kl_in_loss: bool):
    """L_i = −A_i · Σ_t log π(y_t) [+ β Σ_t KL_t]; summed over the micro-batch (units: sequences)."""

    def loss_fn(model, mb: dict):
        out = ol.seq_logps(model, mb, cfg.temperature, cfg.logits_chunk_size, entropy=cfg.compute_entropy)
        lp, ent = out if cfg.compute_entropy else (out, None)
        m = mb["completion_mask"]
        seq_lp = (lp * m).sum(-1)
        loss = -(mb["advantages"] * seq_lp).sum()
        metrics = {"logprob_mismatch": ((mb["old_logps"] - lp.detach()).abs()[m].sum(), m.sum()),
                   "seq_logp": seq_lp.detach().sum()}
        if "ref_logps" in mb:
            kl = kl_estimate(lp, mb["ref_logps"], cfg.kl_estimator) * m
            if kl_in_loss and cfg.kl_coef:
                loss = loss + cfg.kl_coef * kl.sum()
            metrics["kl"] = (kl.detach().sum(), m.sum())
            metrics["kl_seq"] = kl.detach().sum()
        if ent is not None:
            metrics["entropy"] = ((ent.detach() * m).sum(), m.sum())
        return loss, metrics

    return loss_fn


def n_sequences(mb: dict) -> float:
    return float(mb["input_ids"].shape[0])


def train_reinforce(cfg: ReinforceConfig, model=None, tokenizer=None, reward_fn=None) -> dict:
    run = ol.OnlineRun(cfg, "reinforce", model, tokenizer, reward_fn=reward_fn)
    baseline = MovingAverageBaseline(cfg.baseline_alpha)
    run.trainer.register_state("baseline", baseline.state_dict, baseline.load_state_dict)
    loss_fn = sequence_pg_loss_fn(cfg, kl_in_loss=True)

    def step(rstep: int, clock: ol.StepClock) -> dict:
        ps, cols, batch, rewards, info = run.rollout(rstep)
        # the baseline sees the mean reward of the whole global batch, on every rank alike
        tot = all_reduce_sum(torch.tensor([float(rewards.sum()), float(rewards.numel())], dtype=torch.float64),
                             run.dist)
        adv = baseline.update(rewards, mean=float(tot[0] / tot[1]))  # b is updated first, then A = r - b
        info["baseline"] = baseline.value
        clock.lap("score")
        mbs = ol.split_groups(batch, cfg.batch_size, cfg.grad_accum, run.pad_id, {"advantages": adv})
        run.add_ref_logps(mbs)
        metrics = run.trainer.accumulate(mbs, loss_fn, n_sequences)
        metrics.update(info)
        run.update(metrics, clock)
        return info

    return run.loop(step)
