"""The newer objectives of alignkit.losses (GSPO, CISPO, dual-clip, DAPO overlong shaping, KTO,
ORPO, on-policy distillation) against hand computations in python `math`."""

from __future__ import annotations

import math

import pytest
import torch

from alignkit.losses import (
    AGGREGATIONS,
    chunked_distill_divergence,
    distill_reverse_kl_sampled,
    generalized_jsd,
    kto_loss,
    kto_reference_point,
    log1mexp,
    orpo_loss,
    overlong_penalty,
    policy_loss,
    policy_loss_terms,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def t64(x):
    return torch.tensor(x, dtype=torch.float64)


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def _batch(seed=0, B=8, T=5, spread=0.3):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, dtype=torch.float64, generator=g) * 2 - 0.1
    logps = old + torch.randn(B, T, dtype=torch.float64, generator=g) * spread
    adv = torch.randn(B, dtype=torch.float64, generator=g)
    lengths = [5, 3, 4, 1, 5, 2, 0, 4][:B]  # row 6: a zero-length completion
    mask = torch.zeros(B, T, dtype=torch.bool)
    for i, n in enumerate(lengths):
        mask[i, :n] = True
    return logps, old, adv, mask


# --------------------------------------------------------------------------- GSPO


def test_gspo_sequence_ratio_and_per_sequence_clip_by_hand():
    old = torch.zeros(2, 3, dtype=torch.float64)
    logps = t64([[0.3, -0.1, 9.0], [0.01, 0.02, 0.03]])  # row 0's third token is masked (its 9.0 must not count)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    adv = t64([1.0, -2.0])
    eps = 0.05
    loss, m = policy_loss(logps, old, adv, mask, clip_low=eps, clip_high=eps, aggregation="seq_mean_token_mean",
                          ratio_level="sequence")
    s0, s1 = math.exp((0.3 - 0.1) / 2), math.exp((0.01 + 0.02 + 0.03) / 3)  # geometric means of token ratios
    l0 = -min(s0 * 1.0, min(max(s0, 1 - eps), 1 + eps) * 1.0)  # s0 = 1.105 > 1.05, A > 0: clipped
    l1 = -min(s1 * -2.0, min(max(s1, 1 - eps), 1 + eps) * -2.0)  # s1 = 1.02: inside the range
    assert loss.item() == pytest.approx((l0 + l1) / 2, rel=1e-12)
    assert m["clip_frac"] == pytest.approx(2 / 5)  # both tokens of sequence 0, none of sequence 1
    assert m["ratio_max"] == pytest.approx(s0) and m["ratio_min"] == pytest.approx(s1)

    # The clip acts on whole sequences: sequence 0 gets no gradient at all, though its second
    # token alone (ratio e^-0.1 < 1 + eps) would keep one at token level.
    lp = logps.clone().requires_grad_()
    g = torch.autograd.grad(policy_loss(lp, old, adv, mask, clip_low=eps, clip_high=eps,
                                        aggregation="seq_mean_token_mean", ratio_level="sequence")[0], lp)[0]
    assert g[0].abs().max().item() == 0.0
    # sequence 1: d/dlp_t of -(1/2) A s1 = -(1/2) A s1 / 3
    assert g[1].tolist() == pytest.approx([-0.5 * -2.0 * s1 / 3] * 3, rel=1e-12)
    gt = torch.autograd.grad(policy_loss(lp, old, adv, mask, clip_low=eps, clip_high=eps,
                                         aggregation="seq_mean_token_mean")[0], lp)[0]
    assert gt[0, 1].item() != 0.0


@pytest.mark.parametrize("agg", ["seq_mean_token_mean", "token_mean"])
def test_gspo_gradient_equals_sequence_level_objective(agg):
    """Unclipped, GSPO's gradient is that of -A_b s_b with s_b the differentiable geometric-mean
    ratio (weighted per the aggregation); with pi_old = pi and one update (mu = 1) it is the
    sequence-level policy gradient -A_b grad mean_t log pi."""
    logps, old, adv, mask = _batch(seed=1, spread=0.01)
    n = mask.sum(-1)
    has = n > 0
    kw = dict(clip_low=10.0, clip_high=10.0, aggregation=agg, ratio_level="sequence")

    def reference(lp, old_lp):
        s = torch.exp(torch.where(mask, lp - old_lp, torch.zeros((), dtype=lp.dtype)).sum(-1) / n.clamp(min=1))
        if agg == "seq_mean_token_mean":
            return -(adv * s)[has].sum() / has.sum()
        return -(adv * s * n).sum() / n.sum()  # token_mean: each sequence weighs its token count

    lp = logps.clone().requires_grad_()
    got = torch.autograd.grad(policy_loss(lp, old, adv, mask, **kw)[0], lp)[0]
    want = torch.autograd.grad(reference(lp, old), lp)[0]
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)

    # mu = 1, pi_old = pi: the sequence-level policy gradient.
    lp = logps.clone().requires_grad_()
    loss, m = policy_loss(lp, logps.detach(), adv, mask, **kw)
    got = torch.autograd.grad(loss, lp)[0]
    mean_lp = torch.where(mask, lp, torch.zeros((), dtype=lp.dtype)).sum(-1) / n.clamp(min=1)
    pg = -(adv * mean_lp)[has].sum() / has.sum() if agg == "seq_mean_token_mean" else -(adv * mean_lp * n).sum() / n.sum()
    torch.testing.assert_close(got, torch.autograd.grad(pg, lp)[0], rtol=1e-12, atol=1e-14)
    assert m["ratio_mean"] == pytest.approx(1.0) and m["clip_frac"] == 0.0


def test_gspo_allows_token_advantages_and_zero_length_rows():
    logps, old, _, mask = _batch(seed=2)
    adv = torch.randn(logps.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    lp = logps.clone().requires_grad_()
    loss, _ = policy_loss(lp, old, adv, mask, ratio_level="sequence", clip_low=1.0, clip_high=1.0)
    # GSPO-token: token t's gradient is -s_b A_{b,t} / (masked tokens), here unclipped
    g = torch.autograd.grad(loss, lp)[0]
    n = mask.sum(-1, keepdim=True).clamp(min=1)
    s = torch.exp(torch.where(mask, logps - old, torch.zeros((), dtype=torch.float64)).sum(-1, keepdim=True) / n)
    want = torch.where(mask, -s * adv / mask.sum(), torch.zeros((), dtype=torch.float64))
    torch.testing.assert_close(g, want, rtol=1e-12, atol=1e-14)
    assert torch.isfinite(loss) and g[6].abs().max().item() == 0.0  # the zero-length row adds nothing


# --------------------------------------------------------------------------- CISPO


def test_cispo_by_hand_every_token_keeps_its_gradient():
    old = torch.zeros(1, 4, dtype=torch.float64)
    logps = t64([[0.5, -0.5, 0.0, 3.0]])
    adv = t64([[1.0, 1.0, -2.0, 4.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    eps_max = 0.28
    lp = logps.clone().requires_grad_()
    loss, m = policy_loss(lp, old, adv, mask, clip_high=eps_max, loss_type="cispo")
    w = [min(math.exp(0.5), 1 + eps_max), math.exp(-0.5), 1.0]
    want = -(w[0] * 1.0 * 0.5 + w[1] * 1.0 * -0.5 + w[2] * -2.0 * 0.0) / 3
    assert loss.item() == pytest.approx(want, rel=1e-12)
    assert m["clip_frac"] == pytest.approx(1 / 3)
    g = torch.autograd.grad(loss, lp)[0]
    # d l_t / d logp_t = -sg(w_t) A_t / 3: the capped token (e^0.5 > 1.28, A > 0) keeps a gradient,
    # where PPO's clip would cut it to 0.
    assert g[0].tolist() == pytest.approx([-w[0] / 3, -w[1] / 3, 2.0 / 3, 0.0], rel=1e-12)
    g_clip = torch.autograd.grad(policy_loss(lp, old, adv, mask, clip_high=eps_max)[0], lp)[0]
    assert g_clip[0, 0].item() == 0.0


def test_cispo_at_ratio_one_is_the_policy_gradient():
    logps, _, adv, mask = _batch(seed=4)
    lp = logps.clone().requires_grad_()
    for lt in ("cispo", "clip"):
        g = torch.autograd.grad(policy_loss(lp, logps.detach(), adv, mask, loss_type=lt)[0], lp)[0]
        want = torch.where(mask, -adv.unsqueeze(-1).expand_as(lp) / mask.sum(), torch.zeros((), dtype=torch.float64))
        torch.testing.assert_close(g, want, rtol=1e-12, atol=1e-14)


def test_cispo_with_sequence_ratio_caps_the_sequence_weight():
    old = torch.zeros(1, 2, dtype=torch.float64)
    logps = t64([[0.4, 0.2]])  # s = e^0.3 = 1.35 > 1.2
    lp = logps.clone().requires_grad_()
    loss, _ = policy_loss(lp, old, t64([1.0]), torch.ones(1, 2), loss_type="cispo", ratio_level="sequence")
    assert loss.item() == pytest.approx(-1.2 * (0.4 + 0.2) / 2, rel=1e-12)
    assert torch.autograd.grad(loss, lp)[0][0].tolist() == pytest.approx([-0.6, -0.6], rel=1e-12)


def test_policy_loss_new_argument_errors():
    logps, old, adv, mask = _batch()
    with pytest.raises(ValueError, match="ratio_level"):
        policy_loss(logps, old, adv, mask, ratio_level="seq")
    with pytest.raises(ValueError, match="clip, cispo"):
        policy_loss(logps, old, adv, mask, loss_type="ppo")
    with pytest.raises(ValueError, match="dual_clip"):
        policy_loss(logps, old, adv, mask, loss_type="cispo", dual_clip=3.0)


# --------------------------------------------------------------------------- dual clip


def test_dual_clip_by_hand_token_and_sequence_level():
    old = torch.zeros(1, 2, dtype=torch.float64)
    logps = t64([[2.0, 0.1]])
    adv = t64([[-1.0, -1.0]])
    lp = logps.clone().requires_grad_()
    loss, m = policy_loss(lp, old, adv, torch.ones(1, 2), dual_clip=3.0)
    # token 0: -min(e^2 * -1, 1.2 * -1) = e^2 = 7.39 > 3 -> bounded at -c A = 3 (no gradient);
    # token 1: -min(e^0.1 * -1, min(e^0.1, 1.2) * -1) = e^0.1
    assert loss.item() == pytest.approx((3.0 + math.exp(0.1)) / 2, rel=1e-12)
    assert m["dual_clip_frac"] == pytest.approx(0.5)
    assert torch.autograd.grad(loss, lp)[0][0].tolist() == pytest.approx([0.0, math.exp(0.1) / 2], rel=1e-12)
    # sequence level: s = e^1.05 = 2.86 < 3: not bounded, but above 1.2 with A < 0 it is unclipped
    loss, m = policy_loss(logps, old, t64([-1.0]), torch.ones(1, 2), dual_clip=3.0, ratio_level="sequence",
                          aggregation="seq_mean_token_mean")
    assert loss.item() == pytest.approx(math.exp(1.05), rel=1e-12) and m["dual_clip_frac"] == 0.0
    loss, m = policy_loss(logps, old, t64([-1.0]), torch.ones(1, 2), dual_clip=2.5, ratio_level="sequence",
                          aggregation="seq_mean_token_mean")
    assert loss.item() == pytest.approx(2.5, rel=1e-12) and m["dual_clip_frac"] == 1.0


# --------------------------------------------------------------------------- shared edges and micro-batching


@pytest.mark.parametrize("kw", [dict(ratio_level="sequence"), dict(loss_type="cispo"),
                                dict(ratio_level="sequence", loss_type="cispo"), dict(dual_clip=2.0)])
def test_all_tokens_masked_gives_zero_loss_and_zero_gradient(kw):
    logps, old, adv, _ = _batch()
    lp = logps.clone().requires_grad_()
    loss, m = policy_loss(lp, old, adv, torch.zeros_like(lp, dtype=torch.bool), **kw)
    assert loss.item() == 0.0 and m["clip_frac"] == 0.0
    assert torch.autograd.grad(loss, lp, allow_unused=True)[0].abs().max().item() == 0.0


@pytest.mark.parametrize("agg", AGGREGATIONS)
@pytest.mark.parametrize("kw", [dict(ratio_level="sequence", clip_low=0.05, clip_high=0.05),
                                dict(loss_type="cispo", clip_high=0.1),
                                dict(dual_clip=1.5, clip_low=0.1)])
def test_new_policy_losses_micro_batches_1x8_4x2_equal(agg, kw):
    logps, old, adv, mask = _batch(seed=5)
    adv = adv * 3  # some negative advantages with large ratios for the dual clip
    kw = dict(kw, aggregation=agg, max_length=6)
    lp = logps.clone().requires_grad_()
    full = policy_loss(lp, old, adv, mask, **kw)[0]
    full_g = torch.autograd.grad(full, lp)[0]
    for splits in ([0, 8], [0, 2, 4, 6, 8], [0, 4, 8], [0, 1, 2, 3, 4, 5, 6, 7, 8]):
        lp = logps.clone().requires_grad_()
        terms = [policy_loss_terms(lp[a:b], old[a:b], adv[a:b], mask[a:b], **kw) for a, b in zip(splits, splits[1:])]
        loss = sum(t.loss_sum for t in terms) / sum(t.count for t in terms)
        assert loss.item() == pytest.approx(full.item(), rel=1e-12)
        torch.testing.assert_close(torch.autograd.grad(loss, lp)[0], full_g, rtol=1e-12, atol=1e-14)


# --------------------------------------------------------------------------- DAPO overlong shaping


def test_overlong_penalty_by_hand():
    got = overlong_penalty(torch.tensor([3, 6, 7, 8, 10, 12]), max_new_tokens=10, overlong_buffer=4, penalty=0.5)
    assert got.tolist() == pytest.approx([0.0, 0.0, -0.125, -0.25, -0.5, -0.5])
    assert overlong_penalty(torch.tensor([10, 2]), 10, 0).tolist() == [0.0, 0.0]  # no buffer: no shaping
    assert overlong_penalty(t64([9.0]), 10, 10).dtype == torch.float64
    assert overlong_penalty(torch.tensor([0]), 10, 10).item() == 0.0  # zero-length completion
    for bad in (dict(overlong_buffer=11), dict(overlong_buffer=-1), dict(penalty=-1.0)):
        with pytest.raises(ValueError):
            overlong_penalty(torch.tensor([1]), **(dict(max_new_tokens=10, overlong_buffer=2) | bad))


# --------------------------------------------------------------------------- KTO


def test_kto_by_hand_and_reference_point():
    pol, ref = [-3.0, -5.0, -2.0], [-3.5, -4.0, -2.0]
    good = [True, False, True]
    # mismatched pairs: policy minus reference = 0.6, -0.2, 0.5 (row 3 masked) -> z0 = 0.2
    z0 = kto_reference_point(t64([-1.0, -2.2, -3.0]), t64([-1.6, -2.0, -3.5]), torch.tensor([1, 1, 0]))
    assert z0.item() == pytest.approx(0.2, rel=1e-12)
    assert kto_reference_point(t64([-2.0]), t64([-1.0])).item() == 0.0  # clamped at 0
    assert kto_reference_point(t64([-2.0]), t64([-1.0]), torch.tensor([0])).item() == 0.0  # nothing counts
    beta, wd, wu = 0.5, 1.0, 1.33
    lp = t64(pol).requires_grad_()
    losses, rewards = kto_loss(lp, t64(ref), torch.tensor(good), z0, beta, wd, wu)
    want = []
    for p, r, gd in zip(pol, ref, good):
        x = p - r
        want.append(wd * (1 - sig(beta * (x - 0.2))) if gd else wu * (1 - sig(beta * (0.2 - x))))
    assert losses.tolist() == pytest.approx(want, rel=1e-12)
    assert rewards.tolist() == pytest.approx([beta * (p - r) for p, r in zip(pol, ref)])
    # gradient: desirable rows are pushed up, undesirable ones down, none at the tie-free limits
    g = torch.autograd.grad(losses.sum(), lp)[0]
    assert g[0] < 0 and g[1] > 0 and g[2] < 0
    x0 = pol[0] - ref[0] - 0.2
    assert g[0].item() == pytest.approx(-wd * beta * sig(beta * x0) * (1 - sig(beta * x0)), rel=1e-12)


def test_kto_reference_point_is_detached_and_beta_to_zero():
    kp = t64([-1.0, -0.5]).requires_grad_()
    z0 = kto_reference_point(kp, t64([-2.0, -2.0]))
    assert not z0.requires_grad
    losses, _ = kto_loss(t64([-1.0, -9.0]), t64([-4.0, -1.0]), torch.tensor([True, False]), 0.3, beta=1e-9,
                         desirable_weight=2.0, undesirable_weight=0.5)
    assert losses.tolist() == pytest.approx([1.0, 0.25], rel=1e-6)  # weight / 2 as beta -> 0
    with pytest.raises(ValueError, match="beta"):
        kto_loss(t64([0.0]), t64([0.0]), torch.tensor([True]), 0.0, beta=0.0)
    with pytest.raises(ValueError, match="weight"):
        kto_loss(t64([0.0]), t64([0.0]), torch.tensor([True]), 0.0, undesirable_weight=-1.0)
    with pytest.raises(ValueError, match="shape"):
        kto_reference_point(t64([0.0, 1.0]), t64([0.0]))


def test_kto_micro_batches_with_the_global_reference_point():
    g = torch.Generator().manual_seed(7)
    pol = -torch.rand(8, dtype=torch.float64, generator=g) * 10
    ref = pol + torch.randn(8, dtype=torch.float64, generator=g)
    kl_p, kl_r = -torch.rand(8, dtype=torch.float64, generator=g) * 10, -torch.rand(8, dtype=torch.float64, generator=g) * 10
    good = torch.tensor([True, False] * 4)
    z0 = kto_reference_point(kl_p, kl_r)
    lp = pol.clone().requires_grad_()
    full = kto_loss(lp, ref, good, z0, 0.2, 1.0, 1.5)[0].mean()
    full_g = torch.autograd.grad(full, lp)[0]
    for splits in ([0, 2, 4, 6, 8], [0, 4, 8]):
        lp = pol.clone().requires_grad_()
        # what the recipe does: sums of the mismatched log-ratios and row counts, then one z0
        d = sum((kl_p[a:b] - kl_r[a:b]).sum() for a, b in zip(splits, splits[1:]))
        z = (d / 8).clamp(min=0)
        loss = sum(kto_loss(lp[a:b], ref[a:b], good[a:b], z, 0.2, 1.0, 1.5)[0].sum()
                   for a, b in zip(splits, splits[1:])) / 8
        assert loss.item() == pytest.approx(full.item(), rel=1e-12)
        torch.testing.assert_close(torch.autograd.grad(loss, lp)[0], full_g, rtol=1e-12, atol=1e-15)


# --------------------------------------------------------------------------- ORPO


def test_log1mexp_is_accurate_everywhere():
    for x in (-1e-12, -1e-6, -0.3, -0.6931, -0.7, -5.0, -50.0, -800.0):
        want = math.log(-math.expm1(x)) if x > -0.69 else math.log1p(-math.exp(x))
        assert log1mexp(t64(x)).item() == pytest.approx(want, rel=1e-12)


def test_orpo_by_hand():
    cw, cl, nw, nl = [-2.0, -9.0], [-6.0, -3.0], [4, 3], [3, 2]
    lam = 0.25
    lw = t64(cw).requires_grad_()
    losses, nll, lor = orpo_loss(lw, t64(cl), torch.tensor(nw), torch.tensor(nl), lam)
    for i in range(2):
        pw, pl = math.exp(cw[i] / nw[i]), math.exp(cl[i] / nl[i])
        log_odds = math.log(pw / (1 - pw)) - math.log(pl / (1 - pl))
        assert lor[i].item() == pytest.approx(log_odds, rel=1e-12)
        assert nll[i].item() == pytest.approx(-cw[i] / nw[i], rel=1e-12)
        assert losses[i].item() == pytest.approx(-cw[i] / nw[i] - lam * logsig(log_odds), rel=1e-12)
    assert torch.autograd.gradcheck(lambda a: orpo_loss(a, t64(cl), torch.tensor(nw), torch.tensor(nl), lam)[0],
                                     (lw.detach().clone().requires_grad_(),))
    # lam = 0: plain token-mean NLL of the chosen answer
    assert orpo_loss(t64(cw), t64(cl), 2, 2, 0.0)[0].tolist() == pytest.approx([1.0, 4.5])


def test_orpo_edges():
    # the model certain of the chosen answer: a large finite log-odds, finite gradient
    lw = t64([0.0, -1e-300]).requires_grad_()
    losses, _, lor = orpo_loss(lw, t64([-3.0, -3.0]), 3, 3, 0.1)
    assert torch.isfinite(lor).all() and lor[0].item() > 600
    assert torch.isfinite(torch.autograd.grad(losses.sum(), lw)[0]).all()
    f32 = orpo_loss(torch.tensor([-1e-9]), torch.tensor([-1e-9]), 1, 1, 0.1)[2]
    assert f32.item() == pytest.approx(0.0, abs=1e-3)  # equal answers: log odds ratio 0 (no inf - inf)
    with pytest.raises(ValueError, match=">= 1 token"):
        orpo_loss(t64([-1.0]), t64([-1.0]), torch.tensor([0]), torch.tensor([2]))
    with pytest.raises(ValueError, match="lam"):
        orpo_loss(t64([-1.0]), t64([-1.0]), 1, 1, -0.5)


# --------------------------------------------------------------------------- on-policy distillation


def test_distill_reverse_kl_sampled_value_and_gradient():
    s = t64([[-1.0, -0.5, -7.0], [-2.0, -0.1, -0.2]])
    t = t64([[-1.5, -0.5, 0.0], [-1.0, -0.3, -0.2]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    sp = s.clone().requires_grad_()
    loss_sum, count = distill_reverse_kl_sampled(sp, t, mask)
    assert int(count) == 4
    assert loss_sum.item() == pytest.approx(0.5 + 0.0 - 1.0 + 0.2, rel=1e-12)  # sum of log pi_s - log pi_t
    g = torch.autograd.grad(loss_sum, sp)[0]
    assert g.flatten().tolist() == pytest.approx([0.5, 0.0, 0.0, -1.0, 0.2, 0.0], rel=1e-12)
    z, n = distill_reverse_kl_sampled(sp, t, torch.zeros_like(mask))
    assert z.item() == 0.0 and int(n) == 0


def test_distill_reverse_kl_expected_gradient_is_the_kl_gradient():
    """Averaged over the student's samples, the estimator's gradient is grad KL(pi_s || pi_t)."""
    zs = torch.tensor([0.3, -0.2, 0.5, 0.0], dtype=torch.float64, requires_grad=True)
    zt = t64([1.0, 0.0, -1.0, 0.2])
    ls, lt = torch.log_softmax(zs, -1), torch.log_softmax(zt, -1)
    exact = torch.autograd.grad((ls.exp() * (ls - lt)).sum(), zs)[0]
    # expectation over y ~ pi_s, written out exactly over the 4 outcomes
    expect = torch.zeros(4, dtype=torch.float64)
    for y in range(4):
        lsy = torch.log_softmax(zs, -1)[y].view(1, 1)
        loss, _ = distill_reverse_kl_sampled(lsy, lt[y].view(1, 1), torch.ones(1, 1))
        expect += ls[y].exp().detach() * torch.autograd.grad(loss, zs)[0]
    torch.testing.assert_close(expect, exact, rtol=1e-12, atol=1e-14)


def _kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)


def _softmax(z):
    m = max(z)
    e = [math.exp(x - m) for x in z]
    return [x / sum(e) for x in e]


def test_generalized_jsd_by_hand_and_limits():
    zs, zt = [0.2, -1.0, 0.7], [1.5, 0.1, -0.4]
    q, p = _softmax(zs), _softmax(zt)
    for beta in (0.1, 0.5, 0.9):
        m = [beta * a + (1 - beta) * b for a, b in zip(p, q)]
        want = beta * _kl(p, m) + (1 - beta) * _kl(q, m)
        assert generalized_jsd(t64(zs), t64(zt), beta).item() == pytest.approx(want, rel=1e-12)
    assert generalized_jsd(t64(zs), t64(zt), 0.0).item() == pytest.approx(_kl(p, q), rel=1e-12)
    assert generalized_jsd(t64(zs), t64(zt), 1.0).item() == pytest.approx(_kl(q, p), rel=1e-12)
    # beta -> 0: JSD_beta / beta tends to the forward KL (and to the reverse KL as beta -> 1)
    assert generalized_jsd(t64(zs), t64(zt), 1e-6).item() / 1e-6 == pytest.approx(_kl(p, q), rel=1e-4)
    assert generalized_jsd(t64(zs), t64(zt), 1 - 1e-6).item() / 1e-6 == pytest.approx(_kl(q, p), rel=1e-4)
    # temperature divides both sets of logits; equal distributions give 0
    half = generalized_jsd(t64(zs), t64(zt), 0.5, temperature=2.0).item()
    q2, p2 = _softmax([x / 2 for x in zs]), _softmax([x / 2 for x in zt])
    m2 = [(a + b) / 2 for a, b in zip(p2, q2)]
    assert half == pytest.approx((_kl(p2, m2) + _kl(q2, m2)) / 2, rel=1e-12)
    assert generalized_jsd(t64(zs), t64(zs), 0.5).item() == pytest.approx(0.0, abs=1e-15)
    # a vocabulary entry masked with -inf in both: no NaN, same value as without it
    zi = torch.tensor([0.2, -1.0, 0.7, float("-inf")], dtype=torch.float64, requires_grad=True)
    v = generalized_jsd(zi, torch.tensor(zt + [float("-inf")], dtype=torch.float64), 0.5)
    assert v.item() == pytest.approx(generalized_jsd(t64(zs), t64(zt), 0.5).item(), rel=1e-12)
    assert torch.isfinite(torch.autograd.grad(v, zi)[0][:3]).all()
    for bad in (dict(beta=1.5), dict(temperature=0.0)):
        with pytest.raises(ValueError):
            generalized_jsd(t64(zs), t64(zt), **bad)
    with pytest.raises(ValueError, match="vocabulary"):
        generalized_jsd(t64(zs), t64(zt + [0.0]))


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_chunked_distill_divergence_equals_unchunked_and_micro_batches(beta):
    g = torch.Generator().manual_seed(11)
    B, T, Hs, Ht, V = 8, 5, 6, 4, 13
    hs = torch.randn(B, T, Hs, dtype=torch.float64, generator=g)
    ht = torch.randn(B, T, Ht, dtype=torch.float64, generator=g)
    Ws = torch.randn(V, Hs, dtype=torch.float64, generator=g)
    Wt = torch.randn(V, Ht, dtype=torch.float64, generator=g, requires_grad=True)
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[3] = False  # a sequence with every token masked

    h = hs.clone().requires_grad_()
    ref = torch.where(mask, generalized_jsd(h @ Ws.T, ht @ Wt.T, beta), torch.zeros((), dtype=torch.float64)).sum()
    ref_g = torch.autograd.grad(ref, h)[0]
    for chunk in (1, 3, 1000):
        h = hs.clone().requires_grad_()
        total, n = chunked_distill_divergence(h, Ws, ht, Wt, mask, beta, chunk_size=chunk)
        assert int(n) == int(mask.sum())
        assert total.item() == pytest.approx(ref.item(), rel=1e-12)
        gh, gw = torch.autograd.grad(total, [h, Wt], allow_unused=True)
        torch.testing.assert_close(gh, ref_g, rtol=1e-12, atol=1e-14)
        assert gw is None  # the teacher gets no gradient
    # 1 x 8 == 4 x 2 == 2 x 4 under global token-mean normalisation
    h = hs.clone().requires_grad_()
    full = chunked_distill_divergence(h, Ws, ht, Wt, mask, beta, chunk_size=4)
    full_g = torch.autograd.grad(full[0] / full[1], h)[0]
    for splits in ([0, 2, 4, 6, 8], [0, 4, 8]):
        h = hs.clone().requires_grad_()
        parts = [chunked_distill_divergence(h[a:b], Ws, ht[a:b], Wt, mask[a:b], beta, chunk_size=4)
                 for a, b in zip(splits, splits[1:])]
        loss = sum(p[0] for p in parts) / sum(p[1] for p in parts)
        torch.testing.assert_close(torch.autograd.grad(loss, h)[0], full_g, rtol=1e-12, atol=1e-14)
    # all masked: zero, still differentiable
    h = hs.clone().requires_grad_()
    z, n = chunked_distill_divergence(h, Ws, ht, Wt, torch.zeros(B, T, dtype=torch.bool), beta)
    assert z.item() == 0.0 and int(n) == 0 and torch.autograd.grad(z, h)[0].abs().max().item() == 0.0


# =========================================================================== recipes: KTO and ORPO

import json  # noqa: E402

from conftest import write_jsonl  # noqa: E402

from alignkit.cli import main  # noqa: E402
from alignkit.config import DPOConfig, KTOConfig  # noqa: E402
from alignkit.data.preference import load_kto_examples, load_pairs  # noqa: E402
from alignkit.errors import UserError  # noqa: E402
from alignkit.models import load_model, load_tokenizer  # noqa: E402
from alignkit.toy import world  # noqa: E402


def kto_rows(n, seed=0, split="train"):
    """Unpaired toy rows: each pair gives a desirable and an undesirable row, shuffled apart."""
    rows = []
    for r in world.preference_rows(n, seed=seed, split=split):
        rows.append({"prompt": r["prompt"], "completion": r["chosen"], "label": True})
        rows.append({"prompt": r["prompt"], "completion": r["rejected"], "label": False})
    return rows[0::2] + rows[1::2]


def _base(model_dir, data, out, **kw):
    base = dict(model=str(model_dir), data=str(data), output_dir=str(out), progress=False, tensorboard=False,
                plot=False, batch_size=4, lr=5e-3, log_every=1, logits_chunk_size=16)
    return base | kw


def _metrics(out):
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]


def test_kto_data_unpaired_and_paired(tiny_model_dir, tmp_path):
    tok = load_tokenizer(str(tiny_model_dir))
    un = write_jsonl(tmp_path / "kto.jsonl", kto_rows(4))
    ex, stats, (ng, nb) = load_kto_examples(str(un), "train", tok, 1024)
    assert (ng, nb) == (4, 4) and [e.extra["label"] for e in ex] == [True] * 4 + [False] * 4
    for e in ex:
        own = tok.decode([t for t, lab in zip(e.chosen.input_ids, e.chosen.labels) if lab == -100])
        mis = tok.decode([t for t, lab in zip(e.rejected.input_ids, e.rejected.labels) if lab == -100])
        assert own == mis  # same prompt tokens ...
        got = tok.decode([t for t, lab in zip(e.chosen.input_ids, e.chosen.labels) if lab != -100])
        other = tok.decode([t for t, lab in zip(e.rejected.input_ids, e.rejected.labels) if lab != -100])
        assert got != other  # ... another row's completion
    # the mismatched completion comes from a row with another prompt
    rows = kto_rows(4)
    for i, e in enumerate(ex):
        other = tok.decode([t for t, lab in zip(e.rejected.input_ids, e.rejected.labels) if lab != -100])
        src = [r for r in rows if r["completion"][0]["content"] in other]
        assert src and all(r["prompt"] != rows[i]["prompt"] for r in src)
    paired = write_jsonl(tmp_path / "pairs.jsonl", world.preference_rows(3))
    ex2, _, (ng2, nb2) = load_kto_examples(str(paired), "train", tok, 1024)
    assert (ng2, nb2) == (3, 3) and [e.extra["label"] for e in ex2] == [True, False] * 3


@pytest.mark.parametrize("rows, needle", [
    ([{"prompt": "a", "completion": "b"}], "need a 'label' column"),
    ([{"prompt": "a", "completion": "b", "label": True}, {"prompt": "c", "completion": "d", "label": None}],
     "row 2: 'label' is missing"),
    ([{"prompt": "a", "completion": "b", "label": "yes"}], "row 1: 'label' must be true"),
])
def test_kto_bad_data_one_line_exit_2(tiny_model_dir, tmp_path, capsys, rows, needle):
    data = write_jsonl(tmp_path / "bad.jsonl", rows)
    out = tmp_path / "out"
    assert main(["kto", f"model={tiny_model_dir}", f"data={data}", f"output_dir={out}", "progress=false"]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("alignkit: error:") and needle in err[0], err
    assert not (out / "config.json").exists()


def test_kto_z0_is_global_micro_batching_1x4_equals_2x2(tiny_model_dir, tmp_path):
    import alignkit.recipes.kto as kto_mod
    from alignkit.recipes.dpo import compute_reference_logps
    from alignkit.training.trainer import Trainer

    tok = load_tokenizer(str(tiny_model_dir))
    data = write_jsonl(tmp_path / "kto.jsonl", kto_rows(2))
    ex, _, _ = load_kto_examples(str(data), "train", tok, 1024)

    def grads(split):
        model = load_model(str(tiny_model_dir))
        cfg = KTOConfig(**_base(tiny_model_dir, data, tmp_path / "g", batch_size=len(split[0]),
                                grad_accum=len(split), beta=0.3, undesirable_weight=1.5))
        ref = compute_reference_logps(model, ex, tok.pad_token_id, 4, 16)
        # a reference that differs from the policy: z0 = 2 > 0 and rows off their symmetric point
        ref = (ref[0] + torch.tensor([1.0, -2.0, 0.5, 3.0]), ref[1] - 2.0)
        tr = Trainer(cfg, model, tok, recipe="kto", total_steps=1, log=lambda s: None)
        make_batch, loss_fn = kto_mod.step_functions(tr, ex, cfg, "precompute", tok.pad_token_id, ref)
        m = tr.accumulate([make_batch(idx) for idx in split], loss_fn, lambda mb: mb["n_rows"])
        return {n: p.grad.clone() for n, p in model.named_parameters()}, m

    g14, m14 = grads([[0, 1, 2, 3]])
    g22, m22 = grads([[0, 2], [1, 3]])  # each micro-batch alone would have another z0
    assert m14["kl"] == pytest.approx(2.0, rel=1e-4) and m22["kl"] == pytest.approx(2.0, rel=1e-4)
    for k in g14:
        torch.testing.assert_close(g14[k], g22[k], atol=1e-6, rtol=1e-4, msg=k)
    for k in m14:
        assert m14[k] == pytest.approx(m22[k], rel=1e-5, abs=1e-6), k


def test_kto_short_run_raises_desirable_over_undesirable(tiny_model_dir, tmp_path):
    from alignkit.recipes.kto import train_kto

    data = write_jsonl(tmp_path / "kto.jsonl", kto_rows(8))
    out = tmp_path / "run"
    res = train_kto(KTOConfig(**_base(tiny_model_dir, data, out, eval_data=str(data), max_steps=24, lr=1e-2,
                                      beta=0.5, warmup_steps=2)))
    # at the start policy == reference: both rewards 0; after training, desirable log-ratios
    # are above the undesirable ones by a clear margin (both may rise: z0, the KL, rises too)
    assert res["eval_rewards/desirable"] - res["eval_rewards/undesirable"] > 1.0
    assert res["eval_rewards/desirable"] > 0
    train = [r for r in _metrics(out) if r["kind"] == "train"]
    assert len(train) == 24 and train[0]["units"] == 4
    assert train[0]["loss"] == pytest.approx(0.5, abs=1e-4)  # r = z0 = 0: every row 1 - sigmoid(0)
    assert res["eval_loss"] < 0.45  # 0.5 at the start
    for k in ("rewards/desirable", "rewards/undesirable", "logps/desirable", "logps/undesirable", "kl"):
        assert k in train[-1], k
    assert (out / "ref_logps.pt").exists() and (out / "model.safetensors").exists()


def test_dpo_loss_kto_on_paired_data(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", world.preference_rows(4))
    out = tmp_path / "run"
    assert main(["dpo", "loss=kto", *[f"{k}={v}" for k, v in _base(tiny_model_dir, data, out).items()],
                 "max_steps=2"]) == 0
    train = [r for r in _metrics(out) if r["kind"] == "train"]
    assert len(train) == 2 and "rewards/desirable" in train[0] and train[0]["units"] == 4


# --------------------------------------------------------------------------- ORPO


def test_orpo_short_run_lowers_loss_and_raises_chosen_log_odds(tiny_model_dir, tmp_path, monkeypatch):
    import alignkit.recipes.dpo as dpo_mod

    def forbidden(*a, **k):
        raise AssertionError("orpo must not compute reference log-probs")

    monkeypatch.setattr(dpo_mod, "compute_reference_logps", forbidden)
    data = write_jsonl(tmp_path / "pairs.jsonl", world.preference_rows(16))
    out = tmp_path / "run"
    cfg = DPOConfig(**_base(tiny_model_dir, data, out, eval_data=str(data), loss="orpo", orpo_lambda=0.5,
                            max_steps=16, lr=1e-2, warmup_steps=2))
    tok = load_tokenizer(str(tiny_model_dir))
    pairs, _ = load_pairs(str(data), "train", tok, 1024)
    before = dpo_mod.evaluate_pairs(load_model(str(tiny_model_dir)), pairs, cfg, "none", tok.pad_token_id)
    res = dpo_mod.train_dpo(cfg)
    assert res["eval_loss"] < 0.7 * before["eval_loss"]
    assert res["eval_rewards/margin"] > before["eval_rewards/margin"] + 0.5  # log odds(chosen) - log odds(rejected)
    assert res["eval_rewards/accuracy"] >= 0.9
    assert res["eval_nll"] < before["eval_nll"]
    assert not (out / "ref_logps.pt").exists()


def test_orpo_loss_in_the_recipe_by_hand(tiny_model_dir, tmp_path):
    import alignkit.recipes.dpo as dpo_mod
    from alignkit.data.preference import pair_collate

    tok = load_tokenizer(str(tiny_model_dir))
    pairs, _ = load_pairs(str(write_jsonl(tmp_path / "p.jsonl", world.preference_rows(3))), "train", tok, 1024)
    model = load_model(str(tiny_model_dir)).eval()
    cfg = DPOConfig(model="x", data="x", loss="orpo", orpo_lambda=0.3)
    mb = pair_collate(pairs, tok.pad_token_id)
    with torch.no_grad():
        loss, m = dpo_mod.pair_loss(model, mb, cfg, "none")
        lp, n = dpo_mod.sequence_logps(model, mb, 16)
    want = 0.0
    for i in range(3):
        pw, pl = math.exp(float(lp[i]) / int(n[i])), math.exp(float(lp[3 + i]) / int(n[3 + i]))
        lor = math.log(pw / (1 - pw)) - math.log(pl / (1 - pl))
        want += -float(lp[i]) / int(n[i]) - 0.3 * logsig(lor)
    assert float(loss) == pytest.approx(want, rel=1e-5)
    assert "nll" in m


@pytest.mark.parametrize("extra, needle", [
    (["reference=precompute"], "loss=orpo is reference-free"),
    (["reference=adapter_off"], "loss=orpo is reference-free"),
    (["sft_weight=0.5"], "already holds the chosen answer's NLL"),
])
def test_orpo_bad_input_one_line_exit_2(tiny_model_dir, tmp_path, capsys, extra, needle):
    data = write_jsonl(tmp_path / "pairs.jsonl", world.preference_rows(4))
    out = tmp_path / "out"
    assert main(["dpo", "loss=orpo", f"model={tiny_model_dir}", f"data={data}", f"output_dir={out}",
                 "progress=false", *extra]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("alignkit: error:") and needle in err[0], err


# --------------------------------------------------------------------------- distillation: tokenizer check


def test_distill_teacher_vocabulary_check(tiny_model_dir, tmp_path):
    from conftest import build_tiny_model, build_tiny_tokenizer

    from alignkit.models.compat import check_same_vocabulary

    student_tok = load_tokenizer(str(tiny_model_dir))
    same = load_tokenizer(str(tiny_model_dir))
    student = load_model(str(tiny_model_dir))
    assert check_same_vocabulary(student_tok, same, "s", "t", student, student) == len(student_tok)
    # a bigger output layer (padded vocabulary) is fine; a smaller one is not
    big = tmp_path / "big"
    big.mkdir()
    padded = build_tiny_model(big, len(student_tok) + 64)
    assert check_same_vocabulary(student_tok, same, "s", "t", student, padded) == len(student_tok)
    small = tmp_path / "small"
    small.mkdir()
    with pytest.raises(UserError, match="output layer has 200 rows"):
        check_same_vocabulary(student_tok, same, "s", "t", student, build_tiny_model(small, 200))
    other_dir = tmp_path / "other"
    other_dir.mkdir()
    other = build_tiny_tokenizer(other_dir, vocab_size=280)
    with pytest.raises(UserError) as e:
        check_same_vocabulary(student_tok, other, "runs/sft", str(other_dir))
    msg = str(e.value)
    assert "\n" not in msg and "different vocabulary" in msg and str(other_dir) in msg and "runs/sft" in msg
    assert f"({len(other.get_vocab())} vs {len(student_tok.get_vocab())} tokens; first difference: token" in msg


@pytest.mark.slow
def test_kto_two_ranks_equal_one_process(tiny_model_dir, tmp_path):
    """2 ranks x 2 rows == 1 process x 4 rows, z0 included (its sums are reduced over ranks)."""
    import os
    import subprocess
    import sys

    from conftest import ROOT, free_port

    data = write_jsonl(tmp_path / "kto.jsonl", kto_rows(4))
    common = [f"model={tiny_model_dir}", f"data={data}", "max_steps=4", "lr=1e-2", "beta=0.5", "progress=false",
              "tensorboard=false", "plot=false", "logits_chunk_size=16", "log_every=1"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    one = subprocess.run([sys.executable, "-m", "alignkit", "kto", *common, "batch_size=4",
                          f"output_dir={tmp_path / 'one'}"], capture_output=True, text=True, env=env, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(free_port()), "-m", "alignkit", "kto", *common, "batch_size=2", f"output_dir={tmp_path / 'two'}"],
                         capture_output=True, text=True, env=env, timeout=300, cwd=str(ROOT))
    assert two.returncode == 0, two.stderr[-3000:]
    ma = [r for r in _metrics(tmp_path / "one") if r["kind"] == "train"]
    mb = [r for r in _metrics(tmp_path / "two") if r["kind"] == "train"]
    assert len(ma) == len(mb) == 4 and max(r["kl"] for r in ma) > 0.1  # a z0 > 0 was exercised
    for ra, rb in zip(ma, mb):
        for k in ("loss", "grad_norm", "kl", "rewards/desirable", "units"):
            assert ra[k] == pytest.approx(rb[k], rel=1e-4, abs=1e-5), (k, ra["step"])
