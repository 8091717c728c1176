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
surrogate with named aggregations, dual clip, KL penalty), value_loss(_terms).
"""

from __future__ import annotations

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
]

DPO_LOSS_TYPES = ("sigmoid", "robust", "ipo", "hinge", "simpo")
KL_ESTIMATORS = ("k1", "k2", "k3")
AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")


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
) -> PolicyLossTerms:
    """The per-token clipped surrogate of `policy_loss`, summed but not normalised.

    Per token (rho = exp(logps - old_logps), A = advantages, both detached except logps):

        l = -min(rho A, clip(rho, 1 - clip_low, 1 + clip_high) A)        (PPO, Schulman et al. 2017)
        if dual_clip = c (> 1) and A < 0:  l = min(l, -c A)             (Ye et al. 2020, dual-clip)
        if ref_logps given:                l = l + kl_coef * kl_estimate(logps, ref_logps, kl_estimator)

    Aggregations (over masked tokens; n_b = masked tokens of sequence b; only sequences with
    n_b > 0 count as sequences):
        token_mean               loss_sum = sum_{b,t} l,                  count = sum_b n_b
        seq_mean_token_mean      loss_sum = sum_b (sum_t l) / n_b,        count = #sequences
        seq_mean_token_sum_norm  loss_sum = sum_b (sum_t l) / max_length, count = #sequences
                                 (Dr. GRPO's constant normaliser; max_length required)

    logps, old_logps, mask, ref_logps: (B, T); advantages: (B,) or (B, T).
    clip_frac counts masked tokens whose clipped branch was taken (the gradient is cut there).

    Papers: PPO arXiv:1707.06347; dual clip arXiv:1912.09729; Dr. GRPO (constant normaliser)
    arXiv:2503.20783; DAPO (token-mean aggregation, clip_high > clip_low) arXiv:2503.14476.
    Raises ValueError: unknown aggregation; seq_mean_token_sum_norm without max_length;
    dual_clip <= 1; kl_coef without ref_logps; logps not (B, T); any other tensor of another
    shape.
    """
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
    named = {"old_logps": old_logps, "mask": mask, "ref_logps": ref_logps}
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
    ratio = torch.exp(log_ratio)
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
) -> tuple[torch.Tensor, dict]:
    """Clipped policy-gradient loss of one batch: `policy_loss_terms(...)` loss_sum / count.

    See `policy_loss_terms` for the per-token formula and the aggregations. clip_low != clip_high
    gives DAPO's asymmetric "clip-higher". With old_logps = logps.detach() (one update per batch)
    rho = 1 and this is REINFORCE with the given advantages (GRPO / RLOO on-policy).

    Returns (loss scalar, metrics) with metrics: clip_frac, ratio_mean, ratio_max, ratio_min,
    approx_kl (k3 estimate of KL(pi_old || pi) on the sampled tokens), kl (token mean of the
    chosen estimator) when ref_logps is given, dual_clip_frac with dual_clip. An empty mask
    gives loss 0. To normalise across micro-batches, use `policy_loss_terms`.
    """
    terms = policy_loss_terms(logps, old_logps, advantages, mask, clip_low, clip_high, aggregation, ref_logps,
                              kl_coef, kl_estimator, max_length, dual_clip)
    return terms.loss_sum / terms.count.clamp(min=1), terms.metrics()


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
