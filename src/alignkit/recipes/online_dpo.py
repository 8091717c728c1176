"""Online DPO: preference pairs sampled from the current policy, ranked by a reward source.

Every rollout step:

  1. Sample G ≥ 2 answers y_1..y_G per prompt x from the current policy π; score them with the
     reward source (a response cut at max_new_tokens without eos loses `missing_eos_penalty`).
  2. Per prompt, the best answer (highest score) is `chosen`, the worst (lowest) `rejected`; a
     group whose scores are all equal (or whose best − worst gap is at most `min_score_gap`) gives
     no pair: it is skipped and counted (`tied_groups`).
  3. One optimizer step of the DPO loss (`loss`: sigmoid | ipo | hinge | robust | simpo) on the pairs,
         h = [log π(y_w|x) − log π_ref(y_w|x)] − [log π(y_l|x) − log π_ref(y_l|x)]
         sigmoid: −log σ(β h)   (the other variants: see alignkit.losses.dpo_loss)
     with sequence log-probs summed over the answer tokens, chosen and rejected in one forward
     pass, and the loss averaged over the pairs of the whole global batch.

The reference π_ref is the starting policy: the same network with its adapter switched off under
LoRA, otherwise a frozen copy; loss=simpo is reference-free and loads none. Log-probs of policy and
reference are taken at the sampling `temperature` (1.0 by default), like the other online recipes.
See docs/online-dpo.md.
"""

from __future__ import annotations

import time

import torch

from alignkit.advantages import scored_mask
from alignkit.config import OnlineDPOConfig
from alignkit.losses import dpo_loss
from alignkit.recipes import online as ol
from alignkit.rollout.engine import RolloutBatch
from alignkit.training.dist import all_reduce_sum
from alignkit.training.loop import StepClock, StepResult

__all__ = ["OnlineDPOConfig", "train_online_dpo", "build_pairs", "online_dpo_loss_fn", "pair_batches"]


def build_pairs(rewards: torch.Tensor, group_size: int, min_gap: float = 0.0) -> tuple[list[tuple[int, int]], int]:
    """(chosen, rejected) sample indices per group of `group_size` contiguous samples: the highest
    and the lowest score (the first one among equals) among the scored samples (NaN = the reward
    source could not score it; such a sample is never in a pair). Groups whose best − worst gap is
    at most `min_gap` (0: groups whose scores are all equal), or with fewer than 2 scored samples,
    are skipped; returns (pairs, skipped groups)."""
    if rewards.dim() != 1 or rewards.numel() % group_size or group_size < 2:
        raise ValueError(f"need (n_groups x group_size,) rewards with group_size >= 2, got shape "
                         f"{tuple(rewards.shape)} and group_size {group_size}")
    r = rewards.view(-1, group_size)
    ok = scored_mask(r)
    inf = torch.tensor(float("inf"), dtype=r.dtype)
    best, worst = torch.where(ok, r, -inf).argmax(-1), torch.where(ok, r, inf).argmin(-1)
    pairs, ties = [], 0
    for g in range(r.shape[0]):
        hi, lo = int(best[g]), int(worst[g])
        if int(ok[g].sum()) < 2 or float(r[g, hi] - r[g, lo]) <= min_gap:
            ties += 1
            continue
        pairs.append((g * group_size + hi, g * group_size + lo))
    return pairs, ties


def pair_batches(batch, pairs: list[tuple[int, int]], weights: list[float], per_mb: int, pad_id: int) -> list[dict]:
    """Micro-batches of at most `per_mb` pairs from `batch` (a `Rollout` or the engine's
    `RolloutBatch`): rows [chosen_1..chosen_P, rejected_1..rejected_P] in one padded batch (one
    forward pass) with `sampler_logps`, plus `weight` (P,) (0 marks a filler pair)."""
    out = []
    for i in range(0, len(pairs), per_mb):
        chunk = pairs[i:i + per_mb]
        samples = [batch.samples[c] for c, _ in chunk] + [batch.samples[r] for _, r in chunk]
        mb = RolloutBatch(samples, 1).tensors(pad_id)
        mb["sampler_logps"] = mb.pop("old_logps")
        mb["weight"] = torch.tensor(weights[i:i + per_mb], dtype=torch.float32)
        out.append(mb)
    return out


def online_dpo_loss_fn(cfg: OnlineDPOConfig):
    """Sum over the micro-batch's pairs of weight x (DPO loss + sft_weight x token-mean NLL of the chosen
    answer) (units: pairs)."""

    def loss_fn(model, mb: dict):
        lp = ol.token_logps(model, mb, cfg.temperature, cfg.logits_chunk_size)
        m = mb["completion_mask"]
        w = mb["weight"]
        P = w.shape[0]
        seq = (lp * m).sum(-1)
        lens = m.sum(-1).to(seq.dtype)
        ref = (mb["ref_logps"].to(seq.dtype) * m).sum(-1) if "ref_logps" in mb else None
        losses, rc, rr = dpo_loss(seq[:P], seq[P:], None if ref is None else ref[:P], None if ref is None else ref[P:],
                                  beta=cfg.beta, loss_type=cfg.loss, label_smoothing=cfg.label_smoothing,
                                  gamma=cfg.simpo_gamma if cfg.loss == "simpo" else 0.0,
                                  chosen_lengths=lens[:P], rejected_lengths=lens[P:])
        if cfg.sft_weight:
            nll = -seq[:P] / lens[:P].clamp(min=1)
            losses = losses + cfg.sft_weight * nll
        wr = torch.cat([w, w])[:, None] * m  # token weights of both rows of each pair
        metrics = {
            "reward_margin": ((rc - rr) * w).sum(),
            "reward_accuracy": ((rc > rr).float() * w).sum(),
            "logp_chosen": (seq[:P].detach() * w).sum(),
            "logp_rejected": (seq[P:].detach() * w).sum(),
            "logprob_mismatch": (((mb["sampler_logps"] - lp.detach()).abs() * wr).sum(), wr.sum()),
        }
        if ref is not None:
            metrics["kl"] = (((lp.detach() - mb["ref_logps"]) * wr).sum(), wr.sum())
        return (losses * w).sum(), metrics

    return loss_fn


def train_online_dpo(cfg: OnlineDPOConfig, model=None, tokenizer=None, reward_fn=None) -> dict:
    """Run online DPO; `reward_fn(prompts, completions, **columns) -> list[float | None]` overrides
    cfg.reward. One optimizer step per rollout step (`max_steps` of them); a step whose groups all
    tie on every process is a skipped step (no update, `skipped_steps`). Returns the last held-out
    evaluation plus `wall_s`."""
    run = ol.OnlineRun(cfg, "online-dpo", model, tokenizer, reward_fn=reward_fn,
                       need_reference=cfg.loss != "simpo")
    G, dist, tr = cfg.num_generations, run.dist, run.trainer
    loss_fn = online_dpo_loss_fn(cfg)

    def step(rstep: int, clock: StepClock) -> StepResult:
        # 1. sample G answers per prompt and score them; a cut answer loses missing_eos_penalty
        rollout = ol.shape_rewards(run.collect(rstep, *run.prompts_for(rstep), clock), cfg)
        info = ol.rollout_metrics(rollout)
        rollout = rollout.with_rewards(rollout.rewards - cfg.missing_eos_penalty * rollout.truncated.float())
        scores = rollout.rewards
        # 2. best vs worst per prompt; ties skipped and counted
        pairs, ties = build_pairs(scores, G, cfg.min_score_gap)
        gap = sum(float(scores[c] - scores[r]) for c, r in pairs)
        n_pairs, n_tied, gap = all_reduce_sum(torch.tensor([len(pairs), ties, gap], dtype=torch.float64),
                                              dist).tolist()
        info.update(pairs=n_pairs, tied_groups=n_tied, score_gap=gap / max(n_pairs, 1.0))
        if n_pairs == 0:  # every group tied, on every process: nothing to learn from
            return StepResult([tr.skip_update(info)], rollout, rollout.generated_tokens)
        weights = [1.0] * len(pairs)
        if not pairs:  # none here but some elsewhere: a zero-weight filler keeps the processes in step
            pairs, weights = [(0, 1)], [0.0]
        # 3. reference log-probs (adapter off / frozen copy), then the DPO step
        mbs = pair_batches(rollout, pairs, weights, cfg.batch_size, run.pad_id)
        run.add_ref_logps(mbs)
        clock.lap("prepare")
        metrics = tr.accumulate(mbs, loss_fn, lambda mb: float(mb["weight"].sum()))
        metrics.update(info)
        return StepResult([tr.optimizer_step(metrics)], rollout, rollout.generated_tokens)

    t0 = time.time()
    result = dict(run.loop(step))
    result["wall_s"] = time.time() - t0
    return result
