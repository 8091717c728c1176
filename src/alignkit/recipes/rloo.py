"""RLOO: REINFORCE with the leave-one-out baseline.

For each prompt, sample k ≥ 2 answers and score them. Each answer's baseline is the mean reward
of the *other* k − 1 answers to the same prompt, which does not depend on the answer itself, so
the estimate stays unbiased:

    A_i = r_i − (1/(k−1)) Σ_{j≠i} r_j
    L   = −(1/N) Σ_i A_i · log π(y_i | x_i)

With `kl_in_reward` (default), the reward carries the KL penalty as in RLHF:
r_i ← r_i − β · Σ_t (log π(y_t) − log π_ref(y_t)) (k1, summed over the answer's tokens), so the
baseline covers it too; otherwise β · KL goes into the loss per token (`kl_estimator`).

A sample the reward source cannot score (None) is left out of the baselines of the others, gets
advantage 0 and no loss term; N counts scored samples. `overlong_buffer` adds DAPO's overlong
shaping to the rewards before the baseline.
"""

from __future__ import annotations

import torch

from alignkit.advantages import leave_one_out
from alignkit.config import RLOOConfig
from alignkit.recipes import online as ol
from alignkit.recipes.reinforce import n_sequences, sequence_pg_loss_fn
from alignkit.training.loop import StepClock, StepResult

__all__ = ["RLOOConfig", "train_rloo"]


def train_rloo(cfg: RLOOConfig, model=None, tokenizer=None, reward_fn=None) -> dict:
    """Run RLOO; `reward_fn(prompts, completions, **columns)` overrides cfg.reward. One optimizer
    step per rollout step (`max_steps` of them). Returns the last held-out evaluation."""
    run = ol.OnlineRun(cfg, "rloo", model, tokenizer, reward_fn=reward_fn)
    k = cfg.num_generations
    loss_fn = sequence_pg_loss_fn(cfg, kl_in_loss=not cfg.kl_in_reward)

    def step(rstep: int, clock: StepClock) -> StepResult:
        # k answers per prompt, scored
        rollout = ol.shape_rewards(run.collect(rstep, *run.prompts_for(rstep), clock), cfg)
        info = ol.rollout_metrics(rollout)
        # an unscored sample (NaN reward) has weight 0: no gradient, no unit of N
        mbs = ol.split_groups(rollout, cfg.batch_size, cfg.grad_accum, run.pad_id,
                              {"scored": ol.scored_rows(rollout.rewards)})
        run.add_ref_logps(mbs)
        rewards = rollout.rewards
        if cfg.kl_in_reward and run.ref is not None:
            # r_i ← r_i − β · Σ_t (log π_sampler(y_t) − log π_ref(y_t))   (sequence k1 KL)
            seq_kl = [((mb["sampler_logps"] - mb["ref_logps"]) * mb["completion_mask"]).sum(-1) for mb in mbs]
            rewards = rewards - cfg.kl_coef * torch.cat(seq_kl)
            info["reward_with_kl"] = float(rewards.nanmean()) if bool((rewards == rewards).any()) else 0.0
        # A_i = r_i − mean of the other scored rewards of its prompt (0 for an unscored sample)
        adv = leave_one_out(rewards, k)
        lo = 0
        for mb in mbs:
            n = mb["input_ids"].shape[0]
            mb["advantages"] = adv[lo:lo + n]
            lo += n
        clock.lap("prepare")
        loss_fn.ratio_max = 1.0
        metrics = run.trainer.accumulate(mbs, loss_fn, n_sequences)
        metrics["mismatch_ratio_max"] = ol.max_over_ranks(loss_fn.ratio_max, run.dist)
        metrics.update(info)
        return StepResult([run.trainer.optimizer_step(metrics)], rollout, rollout.generated_tokens)

    return run.loop(step)
