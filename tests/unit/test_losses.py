"""alignkit.losses against hand-computed values (python `math`) and naive loop references."""

from __future__ import annotations

import math

import pytest
import torch

from alignkit.losses import (
    AGGREGATIONS,
    bradley_terry_loss,
    distributional_preference_loss,
    dpo_loss,
    kl_estimate,
    policy_loss,
    policy_loss_terms,
    sft_loss,
    value_loss,
    value_loss_terms,
)


pytestmark = pytest.mark.usefixtures("one_thread")


def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def t64(x):
    return torch.tensor(x, dtype=torch.float64)


# --------------------------------------------------------------------------- SFT / reward models


def test_sft_loss_sum_and_count():
    logps = torch.tensor([[-1.0, -2.0, float("-inf")], [-0.5, -0.25, -4.0]])
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])
    loss_sum, count = sft_loss(logps, mask)
    assert loss_sum.item() == pytest.approx(1.0 + 2.0 + 0.25 + 4.0)  # the masked -inf never leaks in
    assert int(count) == 4


def test_sft_loss_equals_cross_entropy_on_shifted_logits():
    """sft_loss on per-token log-probs is the summed cross-entropy of the trained targets: what the
    SFT recipe and rejection sampling compute, against torch's own implementation."""
    g = torch.Generator().manual_seed(0)
    B, T, V = 3, 7, 11
    logits = torch.randn(B, T, V, dtype=torch.float64, generator=g)
    targets = torch.randint(0, V, (B, T), generator=g)
    targets[0, :3] = -100  # a prompt, not trained
    targets[2, 5:] = -100  # padding
    logps = torch.log_softmax(logits, -1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    loss_sum, count = sft_loss(logps, targets != -100)
    want = torch.nn.functional.cross_entropy(logits.reshape(-1, V), targets.reshape(-1), ignore_index=-100,
                                             reduction="sum")
    assert loss_sum.item() == pytest.approx(want.item(), rel=1e-12)
    assert int(count) == int((targets != -100).sum()) == B * T - 3 - 2
    # global normalisation: two micro-batches summed then divided equal the whole batch's mean
    parts = [sft_loss(logps[:1], targets[:1] != -100), sft_loss(logps[1:], targets[1:] != -100)]
    mean = sum(p[0] for p in parts) / sum(p[1] for p in parts)
    assert mean.item() == pytest.approx(torch.nn.functional.cross_entropy(
        logits.reshape(-1, V), targets.reshape(-1), ignore_index=-100).item(), rel=1e-12)


def test_bradley_terry_loss_values_and_margin():
    rc, rr = [1.5, -0.3, 2.0], [0.5, 0.7, 2.0]
    want = sum(-logsig(a - b) for a, b in zip(rc, rr)) / 3
    assert bradley_terry_loss(t64(rc), t64(rr)).item() == pytest.approx(want, rel=1e-12)
    margin = [0.2, 1.0, 0.0]
    want_m = sum(-logsig(a - b - m) for a, b, m in zip(rc, rr, margin)) / 3
    assert bradley_terry_loss(t64(rc), t64(rr), t64(margin)).item() == pytest.approx(want_m, rel=1e-12)
    assert bradley_terry_loss(t64(rc), t64(rr), 0.5).item() == pytest.approx(
        sum(-logsig(a - b - 0.5) for a, b in zip(rc, rr)) / 3, rel=1e-12)


def test_bradley_terry_loss_is_stable_for_huge_gaps():
    loss = bradley_terry_loss(torch.tensor([1000.0, -1000.0]), torch.tensor([0.0, 0.0]))
    assert loss.item() == pytest.approx((0.0 + 1000.0) / 2)


def test_bradley_terry_gradcheck():
    g = torch.Generator().manual_seed(0)
    a, b, m = (torch.randn(5, dtype=torch.float64, generator=g, requires_grad=True) for _ in range(3))
    assert torch.autograd.gradcheck(bradley_terry_loss, (a, b, m))


def _brute_force_distributional(cw, cl):
    total = 0.0
    for row_w, row_l in zip(cw, cl):
        zw = sum(math.exp(x) for x in row_w)
        zl = sum(math.exp(x) for x in row_l)
        pw = [math.exp(x) / zw for x in row_w]
        pl = [math.exp(x) / zl for x in row_l]
        K = len(pw)
        prob = sum(pw[i] * pl[j] for i in range(K) for j in range(K) if i > j)
        total += -math.log(prob)
    return total / len(cw)


def test_distributional_preference_loss_matches_double_loop():
    g = torch.Generator().manual_seed(1)
    cw = torch.randn(4, 5, dtype=torch.float64, generator=g) * 2
    cl = torch.randn(4, 5, dtype=torch.float64, generator=g) * 2
    want = _brute_force_distributional(cw.tolist(), cl.tolist())
    assert distributional_preference_loss(cw, cl).item() == pytest.approx(want, rel=1e-10)


def test_distributional_preference_loss_two_classes_by_hand():
    # K = 2: P(w > l) = p_2(w) * p_1(l).
    cw, cl = [[0.0, 1.0]], [[0.5, -0.5]]
    p2w = math.exp(1) / (1 + math.exp(1))
    p1l = math.exp(0.5) / (math.exp(0.5) + math.exp(-0.5))
    assert distributional_preference_loss(t64(cw), t64(cl)).item() == pytest.approx(-math.log(p2w * p1l), rel=1e-12)


def test_distributional_preference_loss_stable_and_gradcheck():
    # Chosen almost surely scores 1, rejected almost surely 5: probability ~ e^-160, still finite.
    cw = torch.tensor([[40.0, 0, 0, 0, -40.0]], dtype=torch.float64)
    cl = torch.tensor([[-40.0, 0, 0, 0, 40.0]], dtype=torch.float64)
    loss = distributional_preference_loss(cw, cl)
    assert torch.isfinite(loss) and loss.item() > 70
    g = torch.Generator().manual_seed(2)
    a = torch.randn(3, 4, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(3, 4, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(distributional_preference_loss, (a, b))
    with pytest.raises(ValueError):
        distributional_preference_loss(a[:, :1], b[:, :1])


# --------------------------------------------------------------------------- DPO family

PW, PL, RW, RL = [-10.0, -22.0, -5.0], [-12.0, -20.0, -14.0], [-11.0, -21.0, -6.0], [-11.5, -21.5, -7.0]
BETA = 0.3


def _h():
    return [(pw - rw) - (pl - rl) for pw, pl, rw, rl in zip(PW, PL, RW, RL)]


def _dpo(loss_type, **kw):
    return dpo_loss(t64(PW), t64(PL), t64(RW), t64(RL), beta=BETA, loss_type=loss_type, **kw)


def test_dpo_sigmoid_and_rewards():
    losses, cr, rr = _dpo("sigmoid")
    assert losses.tolist() == pytest.approx([-logsig(BETA * h) for h in _h()], rel=1e-12)
    assert cr.tolist() == pytest.approx([BETA * (pw - rw) for pw, rw in zip(PW, RW)], rel=1e-12)
    assert rr.tolist() == pytest.approx([BETA * (pl - rl) for pl, rl in zip(PL, RL)], rel=1e-12)
    assert not cr.requires_grad


def test_dpo_sigmoid_label_smoothing_is_cdpo():
    eps = 0.1
    losses, _, _ = _dpo("sigmoid", label_smoothing=eps)
    want = [-(1 - eps) * logsig(BETA * h) - eps * logsig(-BETA * h) for h in _h()]
    assert losses.tolist() == pytest.approx(want, rel=1e-12)


def test_dpo_robust_is_chowdhury_unbiased_loss():
    eps = 0.1
    losses, _, _ = _dpo("robust", label_smoothing=eps)
    want = [((1 - eps) * -logsig(BETA * h) - eps * -logsig(-BETA * h)) / (1 - 2 * eps) for h in _h()]
    assert losses.tolist() == pytest.approx(want, rel=1e-12)
    cdpo, _, _ = _dpo("sigmoid", label_smoothing=eps)
    assert (losses - cdpo).abs().max() > 1e-3  # a different estimator from cDPO
    plain, _, _ = _dpo("sigmoid")
    assert _dpo("robust")[0].tolist() == pytest.approx(plain.tolist(), rel=1e-12)  # eps = 0 -> DPO


def test_dpo_ipo_and_hinge():
    ipo, _, _ = _dpo("ipo")
    assert ipo.tolist() == pytest.approx([(h - 1 / (2 * BETA)) ** 2 for h in _h()], rel=1e-12)
    hinge, _, _ = _dpo("hinge")
    assert hinge.tolist() == pytest.approx([max(0.0, 1 - BETA * h) for h in _h()], rel=1e-12, abs=1e-12)
    assert any(v == 0 for v in hinge.tolist()) and any(v > 0 for v in hinge.tolist())  # both hinge regimes


def test_dpo_simpo():
    lw, ll, gamma = [4, 10, 2], [5, 8, 3], 0.5
    losses, cr, rr = dpo_loss(t64(PW), t64(PL), None, None, beta=2.0, loss_type="simpo", gamma=gamma,
                              chosen_lengths=torch.tensor(lw), rejected_lengths=torch.tensor(ll))
    want = [-logsig(2.0 * (pw / a - pl / b) - gamma) for pw, pl, a, b in zip(PW, PL, lw, ll)]
    assert losses.tolist() == pytest.approx(want, rel=1e-12)
    assert cr.tolist() == pytest.approx([2.0 * pw / a for pw, a in zip(PW, lw)], rel=1e-12)
    assert rr.tolist() == pytest.approx([2.0 * pl / b for pl, b in zip(PL, ll)], rel=1e-12)
    with pytest.raises(ValueError, match="lengths"):
        dpo_loss(t64(PW), t64(PL), None, None, loss_type="simpo")


def test_dpo_argument_errors():
    with pytest.raises(ValueError, match="sigmoid"):
        _dpo("nope")
    with pytest.raises(ValueError, match="gamma"):
        _dpo("sigmoid", gamma=1.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        _dpo("ipo", label_smoothing=0.1)
    with pytest.raises(ValueError, match="label_smoothing"):
        _dpo("robust", label_smoothing=0.5)
    with pytest.raises(ValueError, match="reference"):
        dpo_loss(t64(PW), t64(PL), None, None)


def test_dpo_sigmoid_gradcheck():
    g = torch.Generator().manual_seed(3)
    args = tuple(torch.randn(4, dtype=torch.float64, generator=g, requires_grad=True) for _ in range(4))
    assert torch.autograd.gradcheck(lambda *a: dpo_loss(*a, beta=0.5, label_smoothing=0.1)[0], args)


# --------------------------------------------------------------------------- KL


def test_kl_estimates_by_hand_and_zero_for_equal():
    lp, ref = t64([-1.0, -2.0]), t64([-1.5, -1.0])
    d = [0.5, -1.0]
    assert kl_estimate(lp, ref, "k1").tolist() == pytest.approx(d)
    assert kl_estimate(lp, ref, "k2").tolist() == pytest.approx([0.5 * x * x for x in d])
    assert kl_estimate(lp, ref, "k3").tolist() == pytest.approx([math.exp(-x) + x - 1 for x in d], rel=1e-12)
    x = torch.randn(10)
    for est in ("k1", "k2", "k3"):
        assert kl_estimate(x, x, est).abs().max() == 0
    with pytest.raises(ValueError, match="k1"):
        kl_estimate(x, x, "k4")


def test_kl_estimators_expectation_under_pi():
    p = [0.1, 0.4, 0.2, 0.25, 0.05]
    q = [0.3, 0.1, 0.2, 0.15, 0.25]
    exact = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    lp, lq = t64([math.log(x) for x in p]), t64([math.log(x) for x in q])
    w = t64(p)
    assert (w * kl_estimate(lp, lq, "k1")).sum().item() == pytest.approx(exact, rel=1e-12)
    assert (w * kl_estimate(lp, lq, "k3")).sum().item() == pytest.approx(exact, rel=1e-12)
    k2 = (w * kl_estimate(lp, lq, "k2")).sum().item()
    assert k2 >= 0 and k2 != pytest.approx(exact)  # biased


# --------------------------------------------------------------------------- policy loss


def naive_policy_loss(logps, old, adv, mask, cl, ch, agg, ref=None, kl_coef=0.0, max_length=None, dual=None):
    """Loop reference: lists of lists, python math only."""
    seq_sums, seq_counts = [], []
    for b in range(len(logps)):
        s, n = 0.0, 0
        for t in range(len(logps[b])):
            if not mask[b][t]:
                continue
            a = adv[b] if not isinstance(adv[b], list) else adv[b][t]
            r = math.exp(logps[b][t] - old[b][t])
            loss = -min(r * a, min(max(r, 1 - cl), 1 + ch) * a)
            if dual is not None and a < 0:
                loss = min(loss, -dual * a)
            if ref is not None:
                d = ref[b][t] - logps[b][t]
                loss += kl_coef * (math.exp(d) - d - 1)
            s += loss
            n += 1
        seq_sums.append(s)
        seq_counts.append(n)
    if agg == "token_mean":
        return sum(seq_sums) / sum(seq_counts)
    seqs = [i for i, n in enumerate(seq_counts) if n]
    if agg == "seq_mean_token_mean":
        return sum(seq_sums[i] / seq_counts[i] for i in seqs) / len(seqs)
    return sum(seq_sums[i] / max_length for i in seqs) / len(seqs)


def _pg_batch(seed=0, B=4, T=6):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, dtype=torch.float64, generator=g) * 3
    logps = old + torch.randn(B, T, dtype=torch.float64, generator=g) * 0.4  # ratios well outside [0.8, 1.2]
    ref = old + torch.randn(B, T, dtype=torch.float64, generator=g) * 0.2
    adv = torch.randn(B, dtype=torch.float64, generator=g)
    lengths = [6, 3, 5, 1][:B]
    mask = torch.zeros(B, T, dtype=torch.bool)
    for i, n in enumerate(lengths):
        mask[i, :n] = True
    return logps, old, adv, mask, ref


@pytest.mark.parametrize("agg", AGGREGATIONS)
def test_policy_loss_matches_loop_reference(agg):
    logps, old, adv, mask, ref = _pg_batch()
    kw = dict(max_length=8) if agg == "seq_mean_token_sum_norm" else {}
    loss, metrics = policy_loss(logps, old, adv, mask, clip_low=0.2, clip_high=0.28, aggregation=agg, **kw)
    want = naive_policy_loss(logps.tolist(), old.tolist(), adv.tolist(), mask.tolist(), 0.2, 0.28, agg,
                             max_length=kw.get("max_length"))
    assert loss.item() == pytest.approx(want, rel=1e-12)
    assert 0 < metrics["clip_frac"] < 1


def test_policy_loss_token_advantages_dual_clip_and_kl():
    logps, old, _, mask, ref = _pg_batch(seed=1)
    g = torch.Generator().manual_seed(9)
    adv = torch.randn(logps.shape, dtype=torch.float64, generator=g) * 2
    logps = logps.clone()
    logps[0, 0] = old[0, 0] + 2.0  # ratio e^2 with a negative advantage: the dual clip binds
    adv[0, 0] = -1.0
    loss, metrics = policy_loss(logps, old, adv, mask, aggregation="token_mean", ref_logps=ref, kl_coef=0.05,
                                dual_clip=3.0)
    want = naive_policy_loss(logps.tolist(), old.tolist(), adv.tolist(), mask.tolist(), 0.2, 0.2, "token_mean",
                             ref=ref.tolist(), kl_coef=0.05, dual=3.0)
    assert loss.item() == pytest.approx(want, rel=1e-12)
    assert metrics["dual_clip_frac"] > 0
    m = mask
    d = (ref - logps)[m]
    assert metrics["kl"] == pytest.approx(float((d.exp() - d - 1).mean()), rel=1e-10)
    with pytest.raises(ValueError, match="dual_clip"):
        policy_loss(logps, old, adv, mask, dual_clip=0.5)
    with pytest.raises(ValueError, match="ref_logps"):
        policy_loss(logps, old, adv, mask, kl_coef=0.1)


def test_policy_loss_metrics_by_hand():
    # One sequence, three tokens: ratios e^0.5 (A>0: clipped), e^-0.5 (A>0: not clipped), 1.
    old = torch.zeros(1, 4, dtype=torch.float64)
    logps = t64([[0.5, -0.5, 0.0, 7.0]])
    adv = t64([[1.0, 1.0, -1.0, 5.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    loss, m = policy_loss(logps, old, adv, mask)
    want = (-1.2 - math.exp(-0.5) + 1.0) / 3
    assert loss.item() == pytest.approx(want, rel=1e-12)
    assert m["clip_frac"] == pytest.approx(1 / 3)
    assert m["ratio_max"] == pytest.approx(math.exp(0.5))  # the masked e^7 is not counted
    assert m["ratio_min"] == pytest.approx(math.exp(-0.5))
    assert m["ratio_mean"] == pytest.approx((math.exp(0.5) + math.exp(-0.5) + 1) / 3)
    r = [math.exp(0.5), math.exp(-0.5), 1.0]
    assert m["approx_kl"] == pytest.approx(sum(x - 1 - math.log(x) for x in r) / 3)
    assert "kl" not in m


def test_policy_loss_gradcheck():
    logps, old, adv, mask, ref = _pg_batch(seed=2)

    def f(lp):
        return policy_loss(lp, old, adv, mask, aggregation="seq_mean_token_mean", ref_logps=ref, kl_coef=0.1,
                           clip_high=0.3)[0]

    assert torch.autograd.gradcheck(f, (logps.clone().requires_grad_(),))


def test_policy_loss_gradient_is_cut_where_clipped():
    old = torch.zeros(1, 2, dtype=torch.float64)
    logps = t64([[0.5, 0.0]]).requires_grad_()
    loss, _ = policy_loss(logps, old, t64([1.0]), torch.ones(1, 2))
    loss.backward()
    assert logps.grad[0].tolist() == pytest.approx([0.0, -0.5])  # d/dlp of -rho*A/2 at rho=1


@pytest.mark.parametrize("agg", AGGREGATIONS)
def test_policy_loss_terms_micro_batches_equal_full_batch(agg):
    logps, old, adv, mask, ref = _pg_batch(seed=3, B=4)
    kw = dict(aggregation=agg, kl_coef=0.02, max_length=8)
    full, _ = policy_loss(logps, old, adv, mask, ref_logps=ref, **kw)
    lp = logps.clone().requires_grad_()
    full_g = torch.autograd.grad(policy_loss(lp, old, adv, mask, ref_logps=ref, **kw)[0], lp)[0]

    for splits in ([0, 1, 2, 3, 4], [0, 3, 4], [0, 2, 4]):
        lp = logps.clone().requires_grad_()
        terms = [policy_loss_terms(lp[a:b], old[a:b], adv[a:b], mask[a:b], ref_logps=ref[a:b], **kw)
                 for a, b in zip(splits, splits[1:])]
        total = sum(t.count for t in terms)
        loss = sum(t.loss_sum for t in terms) / total
        assert loss.item() == pytest.approx(full.item(), rel=1e-12)
        torch.testing.assert_close(torch.autograd.grad(loss, lp)[0], full_g)


def test_policy_loss_aggregation_errors():
    logps, old, adv, mask, ref = _pg_batch()
    with pytest.raises(ValueError, match="ref_logps"):
        policy_loss(logps, old, adv, mask, ref_logps=ref[:1])  # no silent broadcasting
    with pytest.raises(ValueError, match="advantages"):
        policy_loss(logps, old, adv[:2], mask)
    with pytest.raises(ValueError) as e:
        policy_loss(logps, old, adv, mask, aggregation="mean")
    assert all(a in str(e.value) for a in AGGREGATIONS)
    with pytest.raises(ValueError, match="max_length"):
        policy_loss(logps, old, adv, mask, aggregation="seq_mean_token_sum_norm")


def test_policy_loss_empty_mask_is_zero():
    logps, old, adv, _, _ = _pg_batch()
    loss, m = policy_loss(logps, old, adv, torch.zeros_like(logps, dtype=torch.bool))
    assert loss.item() == 0.0 and m["clip_frac"] == 0.0


# --------------------------------------------------------------------------- value loss


def test_value_loss_by_hand():
    v = t64([[1.0, 0.0, 2.0, 9.0]])
    old = t64([[0.5, 0.5, 2.0, 0.0]])
    R = t64([[2.0, 1.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    # clip_range 0.2: clip(V) = [0.7, 0.3, 2.0]; errors unclipped [1, 1, 4], clipped [1.69, 0.49, 4]
    loss, m = value_loss(v, old, R, mask, clip_range=0.2)
    assert loss.item() == pytest.approx(0.5 * (1.69 + 1.0 + 4.0) / 3, rel=1e-12)
    assert m["value_clip_frac"] == pytest.approx(1 / 3)
    loss, m = value_loss(v, old, R, mask)
    assert loss.item() == pytest.approx(0.5 * (1.0 + 1.0 + 4.0) / 3, rel=1e-12)
    assert m["value_clip_frac"] == 0.0
    t = value_loss_terms(v, old, R, mask, clip_range=0.2)
    assert t.loss_sum.item() == pytest.approx(0.5 * (1.69 + 1.0 + 4.0)) and t.count.item() == 3
