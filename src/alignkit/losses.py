"""Loss functions of the toolkit: pure functions of tensors, callable on their own.

Shapes: B = batch (sequences or pairs), T = tokens per sequence, K = reward-score classes.
Conventions:
  * `mask` tensors are bool or {0, 1}; masked-out entries never contribute, even if they hold
    inf / NaN (selection uses `torch.where`, not multiplication).
  * Functions that feed global normalisation (`sft_loss`, `policy_loss_terms`,
    `value_loss_terms`) return an un-normalised sum and its normaliser separately, so a trainer
    can sum both over micro-batches and ranks and divide once (see DESIGN.md, rule 2).

Contents: sft_loss, bradley_terry_loss, distributional_preference_loss, dpo_loss (sigmoid /
cDPO, robust, ipo, hinge, simpo), kl_estimate (k1/k2/k3), policy_loss(_terms) (clipped
surrogate with named aggregations, dual clip, KL penalty, GSPO's sequence-level ratio, CISPO),
value_loss(_terms), overlong_penalty (DAPO), kto_loss + kto_reference_point, orpo_loss,
distill_reverse_kl_sampled, generalized_jsd + chunked_distill_divergence (on-policy distillation),
rollout_correction + correction_metrics (sampler vs trainer gap: TIS / MIS).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

__all__ = [
    "sft_loss",
    "bradley_terry_loss",
    "distributional_preference_loss",
    "dpo_loss",
    "DPO_LOSS_TYPES",
    "kl_estimate",
    "KL_ESTIMATORS",
    "policy_loss",
    "policy_loss_terms",
    "PolicyLossTerms",
    "stats_to_metrics",
    "AGGREGATIONS",
    "value_loss",
    "value_loss_terms",
    "ValueLossTerms",
    "RATIO_LEVELS",
    "POLICY_LOSS_TYPES",
    "overlong_penalty",
    "kto_reference_point",
    "kto_loss",
    "log1mexp",
    "orpo_loss",
    "distill_reverse_kl_sampled",
    "generalized_jsd",
    "chunked_distill_divergence",
    "ROLLOUT_CORRECTIONS",
    "RolloutCorrection",
    "rollout_correction",
    "correction_metrics",
]

DPO_LOSS_TYPES = ("sigmoid", "robust", "ipo", "hinge", "simpo")
KL_ESTIMATORS = ("k1", "k2", "k3")
AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")
RATIO_LEVELS = ("token", "sequence")
POLICY_LOSS_TYPES = ("clip", "cispo")
ROLLOUT_CORRECTIONS = ("none", "tis", "mis")


def _bool(mask: torch.Tensor) -> torch.Tensor:
    return mask if mask.dtype == torch.bool else mask != 0


def _masked(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))


# --------------------------------------------------------------------------- SFT / reward models


def sft_loss(logps: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed negative log-likelihood and its token count.

        loss_sum = -sum_{b,t : mask[b,t]} logps[b, t],     count = sum mask

    logps, mask: same shape (e.g. (B, T)); logps in nats (natural log). Returns (loss_sum scalar,
    count int64 scalar). The caller divides by the count of the whole global batch, not of this
    micro-batch. The maximum-likelihood (next-token cross-entropy) objective of supervised
    fine-tuning (e.g. the SFT stage of Ouyang et al. 2022, arXiv:2203.02155). Raises nothing of
    its own; mismatched shapes raise torch's RuntimeError.
    """
    m = _bool(mask)
    return -_masked(logps, m).sum(), m.sum()


def bradley_terry_loss(
    chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, margin: torch.Tensor | float | None = None
) -> torch.Tensor:
    """Pairwise reward-model loss (Bradley & Terry 1952, Biometrika 39; Ouyang et al. 2022,
    arXiv:2203.02155; the margin term of Llama 2, Touvron et al. 2023, arXiv:2307.09288).

        L = mean_b  -log sigmoid(r_w[b] - r_l[b] - margin[b])

    chosen_rewards, rejected_rewards: (B,); margin: (B,), scalar or None (= 0). Uses logsigmoid,
    stable for any reward gap. Returns a scalar.
    """
    diff = chosen_rewards - rejected_rewards
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff).mean()


def distributional_preference_loss(chosen_logits: torch.Tensor, rejected_logits: torch.Tensor) -> torch.Tensor:
    """Preference loss for a reward model that predicts a distribution over scores 1..K.

    With p(y) = softmax(logits(y)) over the K scores, the probability that the chosen response
    scores strictly higher than the rejected one is

        P(s_w > s_l) = sum_{i > j} p_i(y_w) p_j(y_l) = sum_i p_i(y_w) * P_l(s < i)

        L = mean_b  -log P(s_w > s_l)

    computed in log space: logsumexp_i( log p_i(w) + log cdf_l(< i) ), where the exclusive
    log-CDF is a `logcumsumexp` of log p(l) shifted by one (log 0 = -inf for i = 1).
    chosen_logits, rejected_logits: (B, K) with K >= 2. Returns a scalar (nats). Raises
    ValueError for other shapes or K < 2. The pairwise probability is the Bradley-Terry event
    "chosen scores higher" taken under two independent score distributions; ties (s_w = s_l)
    count as not preferred. Derivation: docs/reward-models.md.
    """
    if chosen_logits.shape != rejected_logits.shape or chosen_logits.dim() != 2:
        raise ValueError(f"expected two (B, K) logits tensors, got {tuple(chosen_logits.shape)} "
                         f"and {tuple(rejected_logits.shape)}")
    if chosen_logits.shape[-1] < 2:
        raise ValueError("distributional_preference_loss needs K >= 2 score classes")
    logp_w = F.log_softmax(chosen_logits, dim=-1)
    logp_l = F.log_softmax(rejected_logits, dim=-1)
    neg_inf = torch.full_like(logp_l[:, :1], float("-inf"))
    log_cdf_below = torch.cat([neg_inf, torch.logcumsumexp(logp_l, dim=-1)[:, :-1]], dim=-1)
    return -torch.logsumexp(logp_w + log_cdf_below, dim=-1).mean()


# --------------------------------------------------------------------------- DPO family


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None,
    ref_rejected_logps: torch.Tensor | None,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    gamma: float = 0.0,
    chosen_lengths: torch.Tensor | int | None = None,
    rejected_lengths: torch.Tensor | int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Offline preference losses on summed sequence log-probs (all inputs (B,)).

    With h = (logpi(y_w) - logref(y_w)) - (logpi(y_l) - logref(y_l)) and eps = label_smoothing:

      sigmoid  DPO (Rafailov et al. 2023, "Direct Preference Optimization"):
                   -log sigmoid(beta h)
               with eps > 0 this is conservative DPO, cDPO (Mitchell 2023, "A note on DPO with
               noisy preferences"): -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)
      robust   robust DPO (Chowdhury, Kini & Natarajan 2024, "Provably Robust DPO: Aligning
               Language Models with Noisy Feedback"), the unbiased loss under a label-flip
               rate eps < 1/2:
                   [(1 - eps)(-log sigmoid(beta h)) - eps(-log sigmoid(-beta h))] / (1 - 2 eps)
               (eps = 0 gives plain DPO; note the *minus* sign, unlike cDPO.)
      ipo      IPO (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning
               from Human Preferences"): (h - 1/(2 beta))^2; beta plays the role of the
               paper's tau. The paper's h uses summed log-likelihoods; some libraries feed
               per-token means instead: pass mean log-probs to get that.
      hinge    SLiC (Zhao et al. 2023, "SLiC-HF"): relu(1 - beta h)
      simpo    SimPO (Meng, Xia & Chen 2024, "SimPO: Simple Preference Optimization with a
               Reference-Free Reward"), reference-free and length-normalised:
                   -log sigmoid(beta (logpi(y_w)/|y_w| - logpi(y_l)/|y_l|) - gamma)
               needs chosen_lengths / rejected_lengths ((B,) or int, response token counts);
               ref logps are ignored (may be None); eps > 0 applies the cDPO smoothing to it.
               gamma is the paper's absolute target margin (its recommended gamma/beta ~ 0.5).

    Returns (losses (B,), chosen_rewards (B,), rejected_rewards (B,)); the implicit rewards are
    beta (logpi - logref) (beta logpi / |y| for simpo), detached, for logging. Log-probs are
    sums over response tokens in nats; the caller averages the losses.

    Papers: DPO arXiv:2305.18290, robust DPO arXiv:2403.00409, IPO arXiv:2310.12036, SLiC-HF
    arXiv:2305.10425, SimPO arXiv:2405.14734.
    Raises ValueError: unknown loss_type; label_smoothing outside [0, 0.5) or given to ipo /
    hinge; gamma with a loss other than simpo; simpo without lengths; missing reference
    log-probs for a loss that needs them.
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; valid: {', '.join(DPO_LOSS_TYPES)}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if label_smoothing and loss_type in ("ipo", "hinge"):
        raise ValueError(f"label_smoothing is not defined for loss_type={loss_type!r}")
    if gamma and loss_type != "simpo":
        raise ValueError(f"gamma (the SimPO margin) only applies to loss_type='simpo', not {loss_type!r}")
    eps = label_smoothing

    if loss_type == "simpo":
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError("loss_type='simpo' needs chosen_lengths and rejected_lengths")
        lw = torch.as_tensor(chosen_lengths, dtype=policy_chosen_logps.dtype, device=policy_chosen_logps.device)
        ll = torch.as_tensor(rejected_lengths, dtype=policy_rejected_logps.dtype, device=policy_rejected_logps.device)
        chosen = policy_chosen_logps / lw
        rejected = policy_rejected_logps / ll
        z = beta * (chosen - rejected) - gamma
        losses = -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)
        return losses, (beta * chosen).detach(), (beta * rejected).detach()

    if ref_chosen_logps is None or ref_rejected_logps is None:
        raise ValueError(f"loss_type={loss_type!r} needs reference log-probs (only 'simpo' is reference-free)")
    chosen = policy_chosen_logps - ref_chosen_logps
    rejected = policy_rejected_logps - ref_rejected_logps
    h = chosen - rejected
    if loss_type == "sigmoid":
        losses = -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    elif loss_type == "robust":
        losses = ((1 - eps) * -F.logsigmoid(beta * h) - eps * -F.logsigmoid(-beta * h)) / (1 - 2 * eps)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:  # hinge
        losses = torch.relu(1 - beta * h)
    return losses, (beta * chosen).detach(), (beta * rejected).detach()


# --------------------------------------------------------------------------- KL


def kl_estimate(logps: torch.Tensor, ref_logps: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Per-token estimators of KL(pi || pi_ref) from tokens sampled from pi (Schulman 2020,
    "Approximating KL divergence"). With d = logpi - logpi_ref:

        k1 = d                      unbiased, high variance, can be negative
        k2 = d^2 / 2                biased, low variance, >= 0
        k3 = exp(-d) - (-d) - 1     unbiased, low variance, >= 0

    Elementwise; shapes broadcast; log-probs and the result in nats. No clamping: exact for any
    input (k3 overflows only when the policy gives a sampled token e^-88 less probability than
    the reference). Source: J. Schulman, "Approximating KL Divergence", 2020,
    http://joschu.net/blog/kl-approx.html. Raises ValueError for an unknown estimator.
    """
    d = logps - ref_logps
    if estimator == "k1":
        return d
    if estimator == "k2":
        return 0.5 * d * d
    if estimator == "k3":
        return torch.expm1(-d) + d
    raise ValueError(f"unknown KL estimator {estimator!r}; valid: {', '.join(KL_ESTIMATORS)}")


# --------------------------------------------------------------------------- policy gradient


class PolicyLossTerms(NamedTuple):
    """Un-normalised pieces of `policy_loss` for one micro-batch.

    loss_sum: differentiable scalar, the numerator of the chosen aggregation.
    count:    float scalar, its normaliser (tokens for token_mean, sequences with at least one
              masked token for the seq_* modes). Global loss = sum(loss_sum) / sum(count).
    stats:    detached float64 sums over masked tokens, additive across micro-batches except
              ratio_max / ratio_min (take max / min): tokens, clipped, ratio_sum, approx_kl_sum,
              dual_clipped (with dual_clip), kl_sum (with ref_logps). `stats_to_metrics` turns
              summed stats into the means `policy_loss` reports.
    """

    loss_sum: torch.Tensor
    count: torch.Tensor
    stats: dict

    def metrics(self) -> dict:
        """The token means of this micro-batch's stats (see `stats_to_metrics`)."""
        return stats_to_metrics(self.stats)


def stats_to_metrics(stats: dict) -> dict:
    """Token means from (possibly micro-batch-summed) `PolicyLossTerms.stats`: clip_frac,
    ratio_mean, ratio_max, ratio_min, approx_kl (nats per token), plus dual_clip_frac and kl when
    those stats are present. Raises KeyError when a required stat is missing."""
    n = max(float(stats["tokens"]), 1.0)
    out = {
        "clip_frac": float(stats["clipped"]) / n,
        "ratio_mean": float(stats["ratio_sum"]) / n,
        "ratio_max": float(stats["ratio_max"]),
        "ratio_min": float(stats["ratio_min"]),
        "approx_kl": float(stats["approx_kl_sum"]) / n,
    }
    if "dual_clipped" in stats:
        out["dual_clip_frac"] = float(stats["dual_clipped"]) / n
    if "kl_sum" in stats:
        out["kl"] = float(stats["kl_sum"]) / n
    return out


def policy_loss_terms(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    aggregation: str = "token_mean",
    ref_logps: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    max_length: int | None = None,
    dual_clip: float | None = None,
    ratio_level: str = "token",
    loss_type: str = "clip",
    is_weights: torch.Tensor | None = None,
) -> PolicyLossTerms:
    """The per-token clipped surrogate of `policy_loss`, summed but not normalised.

    Per token (rho = exp(logps - old_logps), A = advantages, both detached except logps):

        l = -min(rho A, clip(rho, 1 - clip_low, 1 + clip_high) A)        (PPO, Schulman et al. 2017)
        if dual_clip = c (> 1) and A < 0:  l = min(l, -c A)             (Ye et al. 2020, dual-clip,
                                                                         arXiv:1912.09729; verl's
                                                                         clip_ratio_c)
        if ref_logps given:                l = l + kl_coef * kl_estimate(logps, ref_logps, kl_estimator)

    ratio_level (GSPO, Zheng et al. 2025, arXiv:2507.18071):
        token     rho as above, one ratio per token.
        sequence  every token of sequence b uses the sequence ratio
                      s_b = exp( (1/n_b) sum_t (logps - old_logps) ) = (pi/pi_old)(y_b)^(1/|y_b|)
                  (geometric mean of the token ratios over the mask), so the clip acts on whole
                  sequences. Written as GSPO-token: rho_{b,t} = sg(s_b) * pi(y_t)/sg(pi(y_t)), whose
                  value is s_b and whose gradient is s_b grad log pi(y_t); with advantages (B,) and
                  aggregation=seq_mean_token_mean this is exactly GSPO's gradient A_b grad s_b, and
                  token-level advantages (B, T) are allowed (the paper's GSPO-token). GSPO's clip
                  ranges are small (the paper: clip_low 3e-4, clip_high 4e-4).
    loss_type:
        clip      the clipped surrogate above.
        cispo     CISPO (MiniMax-M1, arXiv:2506.13585): the importance weight is clipped from
                  above and detached, and every token keeps its gradient:
                      l = -sg(min(rho, 1 + clip_high)) * A * logps
                  (clip_low is unused; dual_clip is refused: the weight is already bounded). Its
                  value is not a surrogate of the return; only its gradient
                  -sg(min(rho, 1 + clip_high)) A grad log pi is meaningful. clip_frac counts
                  tokens whose weight was capped (their gradient is kept, unlike `clip`).

    is_weights: (B, T) per-token weights of the policy-gradient term, detached (rollout
        correction: `rollout_correction(...).weights`, TIS); the KL term is not weighted.

    Aggregations (over masked tokens; n_b = masked tokens of sequence b; only sequences with
    n_b > 0 count as sequences):
        token_mean               loss_sum = sum_{b,t} l,                  count = sum_b n_b
        seq_mean_token_mean      loss_sum = sum_b (sum_t l) / n_b,        count = #sequences
        seq_mean_token_sum_norm  loss_sum = sum_b (sum_t l) / max_length, count = #sequences
                                 (Dr. GRPO's constant normaliser; max_length required)

    logps, old_logps, mask, ref_logps: (B, T) log-probs in nats; advantages: (B,) or (B, T).
    clip_frac counts masked tokens whose clipped branch was taken (the gradient is cut there).

    Papers: PPO arXiv:1707.06347; dual clip arXiv:1912.09729; Dr. GRPO (constant normaliser)
    arXiv:2503.20783; DAPO (token-mean aggregation, clip_high > clip_low) arXiv:2503.14476;
    GSPO (ratio_level='sequence') arXiv:2507.18071; CISPO (loss_type='cispo') arXiv:2506.13585.
    Raises ValueError: unknown aggregation / ratio_level / loss_type; seq_mean_token_sum_norm
    without max_length; dual_clip <= 1 or with loss_type='cispo'; kl_coef without ref_logps;
    logps not (B, T); any other tensor of another shape.
    """
    if ratio_level not in RATIO_LEVELS:
        raise ValueError(f"unknown ratio_level {ratio_level!r}; valid: {', '.join(RATIO_LEVELS)}")
    if loss_type not in POLICY_LOSS_TYPES:
        raise ValueError(f"unknown policy loss_type {loss_type!r}; valid: {', '.join(POLICY_LOSS_TYPES)}")
    if loss_type == "cispo" and dual_clip is not None:
        raise ValueError("dual_clip applies to loss_type='clip'; CISPO's weight is already capped at 1 + clip_high")
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {aggregation!r}; valid: {', '.join(AGGREGATIONS)}")
    if aggregation == "seq_mean_token_sum_norm" and not max_length:
        raise ValueError("aggregation='seq_mean_token_sum_norm' needs max_length (the constant normaliser)")
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1 (it bounds the loss at -dual_clip * A for A < 0), got {dual_clip}")
    if kl_coef and ref_logps is None:
        raise ValueError("kl_coef > 0 needs ref_logps")
    if logps.dim() != 2:
        raise ValueError(f"logps must be (B, T), got {tuple(logps.shape)}")
    named = {"old_logps": old_logps, "mask": mask, "ref_logps": ref_logps, "is_weights": is_weights}
    for name, x in named.items():
        if x is not None and x.shape != logps.shape:
            raise ValueError(f"{name} shape {tuple(x.shape)} must equal logps shape {tuple(logps.shape)}")
    if advantages.shape not in (logps.shape[:1], logps.shape):
        raise ValueError(f"advantages must be (B,) or (B, T) = {tuple(logps.shape)}, got {tuple(advantages.shape)}")
    m = _bool(mask)
    A = advantages.detach().to(logps.dtype)
    if A.dim() == 1:
        A = A.unsqueeze(-1)
    A = A.expand_as(logps)

    log_ratio = _masked(logps - old_logps.detach(), m)
    if ratio_level == "sequence":
        # GSPO-token: value = the sequence's mean log-ratio, gradient = grad log pi of the token.
        seq = (log_ratio.sum(-1) / m.sum(-1).clamp(min=1)).detach().unsqueeze(-1)
        log_ratio = _masked(seq + logps - logps.detach(), m)
    ratio = torch.exp(log_ratio)
    if loss_type == "cispo":
        weight = torch.clamp(ratio.detach(), max=1.0 + clip_high)
        is_clipped = (ratio.detach() > 1.0 + clip_high) & m
        per_token = -weight * A * _masked(logps, m)
    else:
        unclipped = -A * ratio
        clipped_obj = -A * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
        is_clipped = (clipped_obj > unclipped) & m
        # torch.where (not max) so the unclipped branch gets the whole gradient on ties.
        per_token = torch.where(clipped_obj > unclipped, clipped_obj, unclipped)
    dual = None
    if dual_clip is not None:
        bound = -dual_clip * A
        dual = (A < 0) & (per_token > bound)
        per_token = torch.where(dual, bound, per_token)
        dual = dual & m
    if is_weights is not None:
        per_token = per_token * is_weights.detach().to(per_token.dtype)
    kl = None
    if ref_logps is not None:
        kl = _masked(kl_estimate(logps, ref_logps.detach(), kl_estimator), m)
        if kl_coef:
            per_token = per_token + kl_coef * kl
    per_token = _masked(per_token, m)

    n_tok = m.sum(-1)  # (B,)
    has = n_tok > 0
    if aggregation == "token_mean":
        loss_sum = per_token.sum()
        count = n_tok.sum()
    elif aggregation == "seq_mean_token_mean":
        loss_sum = (per_token.sum(-1) / n_tok.clamp(min=1)).sum()
        count = has.sum()
    else:
        loss_sum = (per_token.sum(-1) / float(max_length)).sum()
        count = has.sum()

    with torch.no_grad():
        r = ratio.detach()
        big = torch.finfo(r.dtype).max
        stats = {
            "tokens": m.sum().double(),
            "clipped": is_clipped.sum().double(),
            "ratio_sum": _masked(r, m).sum().double(),
            "ratio_max": torch.where(m, r, -big).max().double() if m.any() else torch.tensor(1.0, dtype=torch.float64),
            "ratio_min": torch.where(m, r, big).min().double() if m.any() else torch.tensor(1.0, dtype=torch.float64),
            "approx_kl_sum": _masked(kl_estimate(old_logps.detach(), logps.detach(), "k3"), m).sum().double(),
        }
        if dual is not None:
            stats["dual_clipped"] = dual.sum().double()
        if kl is not None:
            stats["kl_sum"] = kl.detach().sum().double()
    return PolicyLossTerms(loss_sum, count.to(logps.dtype), stats)


def policy_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    aggregation: str = "token_mean",
    ref_logps: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    max_length: int | None = None,
    dual_clip: float | None = None,
    ratio_level: str = "token",
    loss_type: str = "clip",
    is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict]:
    """Clipped policy-gradient loss of one batch: `policy_loss_terms(...)` loss_sum / count.

    See `policy_loss_terms` for the per-token formula, the aggregations, GSPO's sequence-level
    ratio (ratio_level='sequence') and CISPO (loss_type='cispo'). clip_low != clip_high
    gives DAPO's asymmetric "clip-higher". With old_logps = logps.detach() (one update per batch)
    rho = 1 and this is REINFORCE with the given advantages (GRPO / RLOO on-policy).

    Returns (loss scalar, metrics) with metrics: clip_frac, ratio_mean, ratio_max, ratio_min,
    approx_kl (k3 estimate of KL(pi_old || pi) on the sampled tokens), kl (token mean of the
    chosen estimator) when ref_logps is given, dual_clip_frac with dual_clip. An empty mask
    gives loss 0. To normalise across micro-batches, use `policy_loss_terms`.
    """
    terms = policy_loss_terms(logps, old_logps, advantages, mask, clip_low, clip_high, aggregation, ref_logps,
                              kl_coef, kl_estimator, max_length, dual_clip, ratio_level, loss_type, is_weights)
    return terms.loss_sum / terms.count.clamp(min=1), terms.metrics()


# --------------------------------------------------------------------------- sampler vs trainer


class RolloutCorrection(NamedTuple):
    """What `rollout_correction` returns for one micro-batch.

    weights: (B, T) float, detached: the per-token weight of the policy-gradient term (pass as
             `policy_loss_terms(..., is_weights=)`); None when the mode weights nothing.
    mask:    (B, T) bool: the loss mask to train on (MIS drops tokens from it).
    stats:   detached float64 sums over the *input* mask, additive across micro-batches except
             ratio_max (take the max): tokens, mismatch_sum (sum |trainer - sampler|, nats),
             ratio_max (the largest per-token probability ratio either way,
             max exp|trainer - sampler|), capped (TIS: tokens whose weight hit the cap), dropped
             (MIS: tokens removed). `correction_metrics` turns them into means."""

    weights: torch.Tensor | None
    mask: torch.Tensor
    stats: dict


def rollout_correction(trainer_logps: torch.Tensor, sampler_logps: torch.Tensor, mask: torch.Tensor,
                       mode: str = "none", cap: float = 2.0) -> RolloutCorrection:
    """Correct for the gap between the engine that sampled and the trainer that learns.

    The sampler (vLLM, other kernels, other precision) draws tokens from pi_sampler, close to
    but not equal to the trainer's pi_trainer of the same weights; the policy gradient assumes
    samples from pi_trainer. Per completion token, with r = pi_trainer / pi_sampler =
    exp(trainer_logps - sampler_logps) (detached):

        none  weights none, mask unchanged (only the gap is measured)
        tis   truncated importance sampling: the token's policy-gradient loss is multiplied by
              min(r, cap) (Ionides 2008; applied to sampler/trainer mismatch by Yao et al. 2025,
              "Your efficient RL framework secretly brings you off-policy RL training")
        mis   masked importance sampling: tokens with r outside [1/cap, cap] leave the loss mask
              (they no longer count in the normaliser either: the aggregation is taken over the
              kept tokens); kept tokens are not reweighted

    trainer_logps: the trainer's log-probs of the sampled tokens under the rollout's weights
    (pi_old; `old_logps`), sampler_logps: the engine's (`sampler_logps`), mask: completion
    tokens; all (B, T), nats. cap: C > 1. Raises ValueError: unknown mode, cap <= 1, shapes.
    """
    if mode not in ROLLOUT_CORRECTIONS:
        raise ValueError(f"unknown rollout_correction {mode!r}; valid: {', '.join(ROLLOUT_CORRECTIONS)}")
    if not cap > 1.0:
        raise ValueError(f"rollout_correction_cap must be > 1, got {cap}")
    for name, x in (("sampler_logps", sampler_logps), ("mask", mask)):
        if x.shape != trainer_logps.shape:
            raise ValueError(f"{name} shape {tuple(x.shape)} must equal trainer_logps shape {tuple(trainer_logps.shape)}")
    m = _bool(mask)
    with torch.no_grad():
        delta = _masked(trainer_logps.detach().float() - sampler_logps.detach().float(), m)
        ratio = torch.exp(delta)
        stats = {"tokens": m.sum().double(), "mismatch_sum": delta.abs().sum().double(),
                 "ratio_max": torch.exp(delta.abs().max()).double() if m.any() else torch.tensor(1.0, dtype=torch.float64)}
        weights, keep = None, m
        if mode == "tis":
            weights = _masked(torch.clamp(ratio, max=cap), m)
            stats["capped"] = ((ratio > cap) & m).sum().double()
        elif mode == "mis":
            keep = m & (ratio >= 1.0 / cap) & (ratio <= cap)
            stats["dropped"] = (m & ~keep).sum().double()
    return RolloutCorrection(weights, keep, stats)


def correction_metrics(stats: dict) -> dict:
    """Means of (summed) `RolloutCorrection.stats`: logprob_mismatch (mean |trainer - sampler|
    per completion token, nats), mismatch_ratio_max, and rollout_capped_frac (tis) /
    rollout_dropped_frac (mis) when present."""
    n = max(float(stats["tokens"]), 1.0)
    out = {"logprob_mismatch": float(stats["mismatch_sum"]) / n, "mismatch_ratio_max": float(stats["ratio_max"])}
    if "capped" in stats:
        out["rollout_capped_frac"] = float(stats["capped"]) / n
    if "dropped" in stats:
        out["rollout_dropped_frac"] = float(stats["dropped"]) / n
    return out


# --------------------------------------------------------------------------- value function


class ValueLossTerms(NamedTuple):
    """loss_sum (differentiable), count (masked tokens) and detached float64 sums: tokens,
    clipped, value_sum, sq_error_sum. Global loss = sum(loss_sum) / sum(count)."""

    loss_sum: torch.Tensor
    count: torch.Tensor
    stats: dict

    def metrics(self) -> dict:
        """Token means of the stats: value_clip_frac, value_mean, value_mse (squared error of the
        unclipped prediction)."""
        n = max(float(self.stats["tokens"]), 1.0)
        return {"value_clip_frac": float(self.stats["clipped"]) / n, "value_mean": float(self.stats["value_sum"]) / n,
                "value_mse": float(self.stats["sq_error_sum"]) / n}


def value_loss_terms(
    values: torch.Tensor,
    old_values: torch.Tensor | None,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float | None = None,
) -> ValueLossTerms:
    """Summed PPO value loss over masked tokens and the token count (see `value_loss`).

    values, old_values, returns, mask: (B, T). Raises ValueError for a shape mismatch or for
    clip_range without old_values."""
    for name, x in {"old_values": old_values, "returns": returns, "mask": mask}.items():
        if x is not None and x.shape != values.shape:
            raise ValueError(f"{name} shape {tuple(x.shape)} must equal values shape {tuple(values.shape)}")
    m = _bool(mask)
    R = returns.detach()
    err = (values - R) ** 2
    if clip_range is not None and old_values is None:
        raise ValueError("clip_range needs old_values")
    if clip_range is None:
        per_token = 0.5 * err
        clipped = torch.zeros_like(m)
    else:
        old = old_values.detach()
        v_clip = old + torch.clamp(values - old, -clip_range, clip_range)
        err_clip = (v_clip - R) ** 2
        clipped = (err_clip > err) & m
        per_token = 0.5 * torch.where(err_clip > err, err_clip, err)
    per_token = _masked(per_token, m)
    with torch.no_grad():
        stats = {
            "tokens": m.sum().double(),
            "clipped": clipped.sum().double(),
            "value_sum": _masked(values.detach(), m).sum().double(),
            "sq_error_sum": _masked(err.detach(), m).sum().double(),
        }
    return ValueLossTerms(per_token.sum(), m.sum().to(values.dtype), stats)


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor | None,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float | None = None,
) -> tuple[torch.Tensor, dict]:
    """PPO value loss, token mean over masked tokens (all inputs (B, T)):

        l = 1/2 max( (V - R)^2, (clip(V, V_old - eps, V_old + eps) - R)^2 )     eps = clip_range
        l = 1/2 (V - R)^2                                                       clip_range None
                                                                  (old_values may then be None)

    Returns (loss, metrics: value_clip_frac (fraction of masked tokens where the clipped error
    was the larger one), value_mean, value_mse). An empty mask gives loss 0.

    Source: the clipped value loss of PPO's reference implementation (OpenAI baselines ppo2),
    studied in Engstrom et al. 2020, arXiv:2005.12729. Raises ValueError as `value_loss_terms`.
    """
    t = value_loss_terms(values, old_values, returns, mask, clip_range)
    return t.loss_sum / t.count.clamp(min=1), t.metrics()


# --------------------------------------------------------------------------- DAPO reward shaping


def overlong_penalty(
    lengths: torch.Tensor, max_new_tokens: int, overlong_buffer: int, penalty: float = 1.0
) -> torch.Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, arXiv:2503.14476, eq. 13), to add to rewards.

    With L = max_new_tokens, c = overlong_buffer and n = the completion's length in tokens:

        shaping(n) = 0                                   n <= L - c
                   = -penalty * (n - (L - c)) / c         L - c < n <= L   (linear in the buffer)
                   = -penalty                             n > L

    lengths: (B,) completion token counts (int or float). Returns (B,) float32 (float64 for
    float64 lengths), in reward units; 0 everywhere when overlong_buffer == 0.
    Raises ValueError for max_new_tokens < 1, overlong_buffer outside [0, max_new_tokens] or
    penalty < 0.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not 0 <= overlong_buffer <= max_new_tokens:
        raise ValueError(f"overlong_buffer must be in [0, max_new_tokens={max_new_tokens}], got {overlong_buffer}")
    if penalty < 0:
        raise ValueError(f"overlong penalty must be >= 0 (it is subtracted), got {penalty}")
    n = torch.as_tensor(lengths)
    n = n.to(torch.float64 if n.dtype == torch.float64 else torch.float32)
    if overlong_buffer == 0:
        return torch.zeros_like(n)
    start = max_new_tokens - overlong_buffer
    return -penalty * torch.clamp((n - start) / overlong_buffer, 0.0, 1.0)


# --------------------------------------------------------------------------- KTO


def kto_reference_point(kl_policy_logps: torch.Tensor, kl_ref_logps: torch.Tensor,
                        mask: torch.Tensor | None = None) -> torch.Tensor:
    """KTO's reference point z0 (Ethayarajh et al. 2024, arXiv:2402.01306, sec. 4.1):

        z0 = max(0, mean_i [log pi(y_j|x_i) - log pi_ref(y_j|x_i)])      detached

    over mismatched prompt-completion pairs (x_i, y_j), j != i: a biased but cheap estimate of
    KL(pi || pi_ref) that carries no gradient. kl_policy_logps, kl_ref_logps: (M,) summed answer
    log-probs in nats; mask: (M,) rows to count (e.g. rows with >= 1 answer token), default all.
    Returns a 0-dim tensor; 0 when no row counts. To use the same z0 for a whole global batch
    (equal gradients for any micro-batching), sum `(kl_policy_logps - kl_ref_logps)[mask]` and the
    row count over micro-batches and ranks and clamp their ratio at 0 instead.
    Raises ValueError when the shapes differ.
    """
    if kl_policy_logps.shape != kl_ref_logps.shape:
        raise ValueError(f"kl_policy_logps {tuple(kl_policy_logps.shape)} and kl_ref_logps "
                         f"{tuple(kl_ref_logps.shape)} must have the same shape")
    d = (kl_policy_logps - kl_ref_logps).detach()
    m = torch.ones_like(d, dtype=torch.bool) if mask is None else _bool(mask)
    n = m.sum()
    return (_masked(d, m).sum() / n.clamp(min=1)).clamp(min=0.0)


def kto_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    z0: torch.Tensor | float,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Kahneman-Tversky optimisation loss per row (Ethayarajh et al. 2024, arXiv:2402.01306, eq. 8).

    With r = log pi(y|x) - log pi_ref(y|x) (summed over the completion's tokens) and the detached
    reference point z0 (`kto_reference_point`):

        desirable rows:    desirable_weight   * (1 - sigmoid(beta (r - z0)))
        undesirable rows:  undesirable_weight * (1 - sigmoid(beta (z0 - r)))

    policy_logps, ref_logps: (B,) summed log-probs in nats; desirable: (B,) bool (True =
    desirable); z0: scalar (a float or a 0-dim tensor; detached here). As beta -> 0 every row's
    loss tends to weight / 2. The caller sums the rows and divides by the global row count.
    Returns (losses (B,), rewards (B,)) with rewards = beta * r, detached, for logging.
    Raises ValueError for beta <= 0, negative weights or mismatched shapes.
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if desirable_weight < 0 or undesirable_weight < 0:
        raise ValueError("desirable_weight and undesirable_weight must be >= 0")
    if not (policy_logps.shape == ref_logps.shape == desirable.shape) or policy_logps.dim() != 1:
        raise ValueError(f"policy_logps, ref_logps and desirable must be (B,) alike, got {tuple(policy_logps.shape)}, "
                         f"{tuple(ref_logps.shape)}, {tuple(desirable.shape)}")
    z = torch.as_tensor(z0, dtype=policy_logps.dtype, device=policy_logps.device).detach()
    r = policy_logps - ref_logps.detach()
    good = _bool(desirable)
    # 1 - sigmoid(x) = sigmoid(-x): exact for any |x|.
    losses = torch.where(good, desirable_weight * torch.sigmoid(-beta * (r - z)),
                         undesirable_weight * torch.sigmoid(-beta * (z - r)))
    return losses, (beta * r).detach()


# --------------------------------------------------------------------------- ORPO


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, accurate over the whole range (Maechler 2012, "Accurately
    computing log(1 - exp(-|a|))"): log(-expm1(x)) near 0, log1p(-exp(x)) below -log 2."""
    near = x > -0.6931471805599453
    # each branch sees only inputs where it is finite, so the unused one cannot send NaN back
    hi = torch.where(near, x, torch.full_like(x, -1.0))
    lo = torch.where(near, torch.full_like(x, -1.0), x)
    return torch.where(near, torch.log(-torch.expm1(hi)), torch.log1p(-torch.exp(lo)))


def orpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    chosen_lengths: torch.Tensor | int,
    rejected_lengths: torch.Tensor | int,
    lam: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Odds-ratio preference optimisation per pair (Hong, Lee & Thorne 2024, arXiv:2403.07691, eq. 6-7).

    Reference-free. With p(y) = exp(log pi(y|x) / |y|), the geometric-mean token probability, and
    odds(y) = p / (1 - p):

        log odds(y) = log p - log(1 - p)                 (`log1mexp`, stable for p -> 0 and p -> 1)
        loss        = NLL(y_w) - lam * log sigmoid(log odds(y_w) - log odds(y_l))
        NLL(y_w)    = -log pi(y_w|x) / |y_w|             (token mean over the chosen answer)

    chosen_logps, rejected_logps: (B,) summed answer log-probs in nats; lengths: (B,) or int,
    answer token counts (>= 1). log p is kept at or below -tiny so a completion the model is
    certain of gives a large finite log-odds, not inf. Returns (losses (B,), nll (B,),
    log_odds_ratio (B,) detached). Raises ValueError for lam < 0 or a zero length.
    """
    if lam < 0:
        raise ValueError(f"lam (the odds-ratio weight) must be >= 0, got {lam}")
    lw = torch.as_tensor(chosen_lengths, dtype=chosen_logps.dtype, device=chosen_logps.device)
    ll = torch.as_tensor(rejected_lengths, dtype=rejected_logps.dtype, device=rejected_logps.device)
    if bool((lw < 1).any()) or bool((ll < 1).any()):
        raise ValueError("orpo_loss needs every answer to have >= 1 token (a zero-length answer has no probability)")
    tiny = torch.finfo(chosen_logps.dtype).tiny
    mean_w = torch.clamp(chosen_logps / lw, max=-tiny)
    mean_l = torch.clamp(rejected_logps / ll, max=-tiny)
    log_odds = (mean_w - log1mexp(mean_w)) - (mean_l - log1mexp(mean_l))
    nll = -chosen_logps / lw
    losses = nll - lam * F.logsigmoid(log_odds)
    return losses, nll, log_odds.detach()


# --------------------------------------------------------------------------- on-policy distillation


def distill_reverse_kl_sampled(student_logps: torch.Tensor, teacher_logps: torch.Tensor,
                               mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token reverse KL(pi_student || pi_teacher) on the student's own samples, sampled-token
    estimator (on-policy distillation: Agarwal et al. 2024, arXiv:2306.13649; Gu et al. 2024, MiniLLM).

    With d_t = log pi_s(y_t) - log pi_t(y_t) at the sampled token y_t ~ pi_s (d_t detached):

        l_t = d_t + d_t * (log pi_s(y_t) - sg(log pi_s(y_t)))

    Its value is d_t, the k1 estimate of the token's reverse KL; its gradient d_t grad log pi_s(y_t)
    is the score-function gradient of KL(pi_s(.|prefix) || pi_t(.|prefix)) at that position (the
    effect on later positions is not included: each token is its own one-step problem). The
    teacher gets no gradient.

    student_logps, teacher_logps, mask: (B, T), log-probs in nats. Returns (loss_sum, count): the
    sum over masked tokens and their number, for global token-mean normalisation. Raises
    ValueError for mismatched shapes.
    """
    if not (student_logps.shape == teacher_logps.shape == mask.shape):
        raise ValueError(f"student_logps {tuple(student_logps.shape)}, teacher_logps {tuple(teacher_logps.shape)} "
                         f"and mask {tuple(mask.shape)} must have the same shape")
    m = _bool(mask)
    d = _masked(student_logps.detach() - teacher_logps.detach(), m)
    per_token = d + d * (student_logps - student_logps.detach())
    return _masked(per_token, m).sum(), m.sum()


def generalized_jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float = 0.5,
                    temperature: float = 1.0) -> torch.Tensor:
    """Generalised Jensen-Shannon divergence per row over the full vocabulary (GKD, Agarwal et al.
    2024, arXiv:2306.13649, eq. 4), P = teacher, Q = student (both softmax(logits / temperature)):

        M         = beta P + (1 - beta) Q
        JSD_beta  = beta KL(P || M) + (1 - beta) KL(Q || M)          0 < beta < 1
        beta = 0: KL(P || Q)  (forward KL, the limit of JSD_beta / beta)
        beta = 1: KL(Q || P)  (reverse KL, the limit of JSD_beta / (1 - beta))

    logits: (..., V), any float dtype (computed in float32, float64 stays float64). Returns (...)
    in nats; the teacher's logits are detached. Holds a few (..., V) tensors: call it on chunks of
    tokens (`chunked_distill_divergence`). Raises ValueError for beta outside [0, 1], temperature
    <= 0 or mismatched shapes.
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} must have the same shape (same vocabulary)")
    dt = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    log_q = F.log_softmax(student_logits.to(dt) / temperature, dim=-1)
    log_p = F.log_softmax(teacher_logits.detach().to(dt) / temperature, dim=-1)
    # a -inf logit (a masked vocabulary entry) becomes the most negative float: probability 0
    # as before, but log M stays finite, so no NaN reaches the gradient
    low = torch.finfo(dt).min
    log_q, log_p = log_q.clamp(min=low), log_p.clamp(min=low)

    def kl(log_a, log_b):  # KL(A || B), 0 log 0 = 0
        a = log_a.exp()
        # select before multiplying: a masked (-inf) logit must give 0, not 0 * inf = NaN
        diff = torch.where(a > 0, log_a - log_b, torch.zeros((), dtype=dt, device=a.device))
        return (a * diff).sum(-1)

    if beta == 0.0:
        return kl(log_p, log_q)
    if beta == 1.0:
        return kl(log_q, log_p)
    log_m = torch.logsumexp(torch.stack([log_p + math.log(beta), log_q + math.log(1 - beta)]), dim=0)
    return beta * kl(log_p, log_m) + (1 - beta) * kl(log_q, log_m)


def chunked_distill_divergence(
    student_hidden: torch.Tensor,
    student_head,
    teacher_hidden: torch.Tensor,
    teacher_head,
    mask: torch.Tensor,
    beta: float = 0.5,
    temperature: float = 1.0,
    chunk_size: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed full-vocabulary `generalized_jsd` over masked tokens, never holding the (tokens x V)
    logits of all tokens at once.

    student_hidden: (B, T, H_s) or (N, H_s); teacher_hidden: same leading shape, (..., H_t);
    student_head / teacher_head: an `nn.Module` or function mapping hidden -> logits (..., V), or a
    (V, H) weight tensor (applied as `F.linear`); mask: the leading shape, True = scored token.
    Only masked rows are taken; they are processed `chunk_size` at a time under
    `torch.utils.checkpoint` (as `alignkit.ops.logprobs` does for log-probs), so a chunk's two
    (chunk, V) logits blocks are built, reduced to one number per row and freed, and backward
    rebuilds them one chunk at a time. The teacher gets no gradient.

    Returns (loss_sum, count): the sum of the per-token divergences (nats) and the number of masked
    tokens, for global token-mean normalisation. An empty mask gives (0 connected to the
    student's graph, 0). Raises ValueError for mismatched leading shapes, chunk_size < 1 and the
    `generalized_jsd` argument errors.
    """
    from torch.utils.checkpoint import checkpoint

    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if student_hidden.shape[:-1] != teacher_hidden.shape[:-1] or student_hidden.shape[:-1] != mask.shape:
        raise ValueError(f"student_hidden {tuple(student_hidden.shape)}, teacher_hidden {tuple(teacher_hidden.shape)} "
                         f"and mask {tuple(mask.shape)} must share their leading shape")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")

    def as_fn(head):
        if isinstance(head, torch.Tensor):
            return lambda h: F.linear(h, head)
        return head

    s_fn, t_fn = as_fn(student_head), as_fn(teacher_head)
    m = _bool(mask).reshape(-1)
    idx = m.nonzero().squeeze(-1)
    hs = student_hidden.reshape(-1, student_hidden.shape[-1]).index_select(0, idx)
    ht = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1]).index_select(0, idx)

    def chunk(a, b):
        with torch.no_grad():
            zt = t_fn(b)
        return generalized_jsd(s_fn(a), zt, beta, temperature).sum()

    total = None
    for s in range(0, hs.shape[0], chunk_size):
        args = (hs[s:s + chunk_size], ht[s:s + chunk_size])
        part = checkpoint(chunk, *args, use_reentrant=False) if torch.is_grad_enabled() else chunk(*args)
        total = part if total is None else total + part
    if total is None:  # nothing scored: a zero still connected to the student's graph
        total = student_hidden.sum() * 0.0
    return total, m.sum()
