"""alignkit.advantages against hand-computed values and plain-python references."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from alignkit.advantages import (
    MovingAverageBaseline,
    gae,
    group_normalized,
    leave_one_out,
    scored_mask,
    whiten,
    zero_std_groups,
)


pytestmark = pytest.mark.usefixtures("one_thread")


def t64(x):
    return torch.tensor(x, dtype=torch.float64)


# --------------------------------------------------------------------------- moving average


def test_moving_average_baseline_updates_before_advantage():
    b = MovingAverageBaseline(alpha=0.9)
    assert b.value == 0.0
    a1 = b.update(t64([1.0, 3.0]))  # b1 = 0.9 * 0 + 0.1 * 2 = 0.2
    assert b.value == pytest.approx(0.2)
    assert a1.tolist() == pytest.approx([0.8, 2.8])
    a2 = b.update(t64([0.0, 4.0, 5.0]))  # b2 = 0.9 * 0.2 + 0.1 * 3 = 0.48
    assert b.value == pytest.approx(0.48)
    assert a2.tolist() == pytest.approx([-0.48, 3.52, 4.52])
    b0 = MovingAverageBaseline(alpha=0.5, init=1.0)
    assert b0.update(t64([3.0])).tolist() == pytest.approx([1.0])  # b1 = 0.5 * 1 + 0.5 * 3 = 2
    with pytest.raises(ValueError):
        MovingAverageBaseline(alpha=1.5)


def test_moving_average_baseline_resumes_exactly():
    g = torch.Generator().manual_seed(0)
    batches = [torch.rand(8, generator=g, dtype=torch.float64) for _ in range(6)]
    straight = MovingAverageBaseline(0.8)
    want = [straight.update(r) for r in batches]
    first = MovingAverageBaseline(0.8)
    for r in batches[:3]:
        first.update(r)
    resumed = MovingAverageBaseline(0.8)
    resumed.load_state_dict(first.state_dict())
    got = [resumed.update(r) for r in batches[3:]]
    for a, b in zip(got, want[3:]):
        assert torch.equal(a, b)
    assert resumed.value == straight.value and resumed.steps == straight.steps == 6


def test_moving_average_baseline_global_mean():
    b = MovingAverageBaseline(0.5)
    adv = b.update(t64([1.0, 1.0]), mean=3.0)  # another rank's rewards moved the global mean
    assert b.value == pytest.approx(1.5) and adv.tolist() == pytest.approx([-0.5, -0.5])


# --------------------------------------------------------------------------- grouped estimators


REWARDS = [1.0, 0.0, 0.5, 0.5, 2.0, 2.0, 2.0, 2.0, -1.0, 3.0, 0.0, 1.0]  # three groups of four


def test_leave_one_out_by_loop():
    got = leave_one_out(t64(REWARDS), 4).tolist()
    want = []
    for g in range(3):
        grp = REWARDS[4 * g:4 * g + 4]
        for i, r in enumerate(grp):
            others = grp[:i] + grp[i + 1:]
            want.append(r - sum(others) / len(others))
    assert got == pytest.approx(want, rel=1e-12, abs=1e-12)
    assert leave_one_out(t64([1.0, 3.0]), 2).tolist() == pytest.approx([-2.0, 2.0])


@pytest.mark.parametrize("fn", [leave_one_out, group_normalized, zero_std_groups])
def test_grouped_argument_errors(fn):
    with pytest.raises(ValueError, match="group_size"):
        fn(t64(REWARDS), 1)
    with pytest.raises(ValueError, match="multiple"):
        fn(t64(REWARDS), 5)
    with pytest.raises(ValueError, match="1-D"):
        fn(t64([REWARDS]), 4)


def test_group_normalized_scales():
    r = t64(REWARDS)
    eps = 1e-6
    groups = [REWARDS[4 * g:4 * g + 4] for g in range(3)]
    batch_std = statistics.stdev(REWARDS)  # sample std (n - 1)
    want_group, want_batch, want_none = [], [], []
    for grp in groups:
        mu, sd = statistics.fmean(grp), statistics.stdev(grp)
        want_group += [(x - mu) / (sd + eps) for x in grp]
        want_batch += [(x - mu) / (batch_std + eps) for x in grp]
        want_none += [x - mu for x in grp]
    assert group_normalized(r, 4).tolist() == pytest.approx(want_group, rel=1e-12, abs=1e-12)
    assert group_normalized(r, 4, scale="batch").tolist() == pytest.approx(want_batch, rel=1e-12, abs=1e-12)
    assert group_normalized(r, 4, scale="none").tolist() == pytest.approx(want_none, rel=1e-12, abs=1e-12)
    assert group_normalized(r, 4)[4:8].tolist() == [0.0] * 4  # constant group: exactly zero, not NaN
    with pytest.raises(ValueError, match="group"):
        group_normalized(r, 4, scale="std")


def test_zero_std_groups():
    assert zero_std_groups(t64(REWARDS), 4).tolist() == [False, True, False]
    assert zero_std_groups(t64([1.0, 1.0, 0.0, 0.0]), 2).tolist() == [True, True]
    assert zero_std_groups(t64([1.0, 1.0 + 1e-9]), 2).tolist() == [False]


# --------------------------------------------------------------------------- GAE


def gae_reference(rewards, values, length, gamma, lam):
    """Textbook recursion over one response of `length` tokens; V = 0 after the end."""
    adv = [0.0] * length
    last = 0.0
    for t in reversed(range(length)):
        next_v = values[t + 1] if t + 1 < length else 0.0
        delta = rewards[t] + gamma * next_v - values[t]
        last = delta + gamma * lam * last
        adv[t] = last
    return adv


def test_gae_matches_python_recursion_with_ragged_lengths():
    g = torch.Generator().manual_seed(0)
    B, T = 4, 7
    lengths = [7, 3, 5, 1]
    rewards = torch.randn(B, T, generator=g, dtype=torch.float64)
    values = torch.randn(B, T, generator=g, dtype=torch.float64)
    mask = torch.zeros(B, T, dtype=torch.bool)
    for b, n in enumerate(lengths):
        mask[b, :n] = True
    gamma, lam = 0.9, 0.8
    adv, ret = gae(rewards, values, mask, gamma=gamma, lam=lam)
    for b, n in enumerate(lengths):
        want = gae_reference(rewards[b].tolist(), values[b].tolist(), n, gamma, lam)
        assert adv[b, :n].tolist() == pytest.approx(want, rel=1e-12, abs=1e-12)
        assert ret[b, :n].tolist() == pytest.approx([a + v for a, v in zip(want, values[b, :n].tolist())], rel=1e-12)
        assert (adv[b, n:] == 0).all() and (ret[b, n:] == 0).all()


def test_gae_terminal_reward_by_hand():
    # Reward 1 on the last of three tokens, V = [0.5, 0.2, 0.1], gamma = 1, lam = 1: A_t = 1 - V_t.
    adv, ret = gae(t64([[0.0, 0.0, 1.0, 7.0]]), t64([[0.5, 0.2, 0.1, 9.0]]), torch.tensor([[1, 1, 1, 0]]), 1.0, 1.0)
    assert adv[0].tolist() == pytest.approx([0.5, 0.8, 0.9, 0.0])
    assert ret[0].tolist() == pytest.approx([1.0, 1.0, 1.0, 0.0])
    # lam = 0: one-step TD errors.
    adv, _ = gae(t64([[0.0, 0.0, 1.0]]), t64([[0.5, 0.2, 0.1]]), torch.ones(1, 3), 0.9, 0.0)
    assert adv[0].tolist() == pytest.approx([0.9 * 0.2 - 0.5, 0.9 * 0.1 - 0.2, 1.0 - 0.1])


def test_gae_skips_unmasked_positions_inside_a_row():
    # Positions 0 (prompt) and 2 (e.g. tool output) are not steps: the episode is tokens 1, 3, 4.
    r = t64([[5.0, 0.1, 9.0, 0.2, 1.0]])
    v = t64([[3.0, 0.4, 8.0, 0.3, 0.6]])
    mask = torch.tensor([[0, 1, 0, 1, 1]])
    adv, _ = gae(r, v, mask, gamma=0.9, lam=0.7)
    want = gae_reference([0.1, 0.2, 1.0], [0.4, 0.3, 0.6], 3, 0.9, 0.7)
    assert adv[0, [1, 3, 4]].tolist() == pytest.approx(want, rel=1e-12)
    assert adv[0, [0, 2]].tolist() == [0.0, 0.0]


# --------------------------------------------------------------------------- whiten


def test_whiten_masked():
    x = t64([[1.0, 2.0, 100.0], [3.0, 6.0, -50.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    vals = [1.0, 2.0, 3.0, 6.0]
    mu, sd = statistics.fmean(vals), statistics.stdev(vals)
    y = whiten(x, mask, eps=0.0)
    assert y[mask.bool()].tolist() == pytest.approx([(v - mu) / sd for v in vals], rel=1e-12)
    assert y[0, 2] == 0 and y[1, 2] == 0
    y2 = whiten(x, mask, shift_mean=False, eps=0.0)
    assert y2[mask.bool()].tolist() == pytest.approx([(v - mu) / sd + mu for v in vals], rel=1e-12)
    full = whiten(t64([1.0, 2.0, 3.0, 6.0]), eps=1e-8)
    assert full.tolist() == pytest.approx([(v - mu) / math.sqrt(sd ** 2 + 1e-8) for v in vals], rel=1e-12)
    assert whiten(x, torch.zeros_like(mask)).abs().sum() == 0


# --------------------------------------------------------------------------- flat and missing rewards


FLAT = [0.1, 0.3, 1.0 / 3.0, -7.77, 1e6 + 0.1, 0.7, 2.0 ** -20]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("G", [2, 3, 7, 8, 16])
def test_flat_groups_give_exactly_zero(dtype, G):
    """Any constant group: advantage exactly 0.0 in every scale and in RLOO (8 x 0.1 in float32
    gave -0.0074 per sample: a mean residue of ~6e-8 divided by std + eps)."""
    for c in FLAT:
        r = torch.full((2 * G,), c, dtype=dtype)
        for scale in ("group", "batch", "none"):
            adv = group_normalized(r, G, scale)
            assert adv.dtype == dtype and (adv == 0).all(), (c, scale, adv)
        assert (leave_one_out(r, G) == 0).all(), c
        assert zero_std_groups(r, G).all()
        assert (whiten(r) == 0).all() and torch.equal(whiten(r, shift_mean=False), r)
    # A flat group next to a live one stays exactly 0 under batch scaling too.
    live = torch.linspace(0, 1, G, dtype=dtype)
    mixed = torch.cat([torch.full((G,), 0.1, dtype=dtype), live])
    for scale in ("group", "batch", "none"):
        adv = group_normalized(mixed, G, scale)
        assert (adv[:G] == 0).all() and (adv[G:] != 0).any()
    assert (leave_one_out(mixed, G)[:G] == 0).all()


def test_flat_group_gives_zero_loss_and_gradient():
    from alignkit.losses import policy_loss_terms

    adv = group_normalized(torch.full((8,), 0.1), 8)
    lp = torch.randn(8, 5, dtype=torch.float32, requires_grad=True)
    mask = torch.ones(8, 5, dtype=torch.bool)
    for agg in ("token_mean", "seq_mean_token_mean"):
        terms = policy_loss_terms(lp, lp.detach(), adv, mask, 0.2, 0.2, agg)
        terms.loss_sum.backward()
        assert terms.loss_sum.item() == 0.0 and (lp.grad == 0).all()
        lp.grad = None


NAN = float("nan")


def test_missing_rewards_take_no_part_in_group_statistics():
    r = torch.tensor([NAN, 1.0, 0.0, 0.0])
    s = math.sqrt(1.0 / 3.0)  # sample std of the scored [1, 0, 0]
    assert group_normalized(r, 4).tolist() == pytest.approx([0.0, (2 / 3) / (s + 1e-6), (-1 / 3) / (s + 1e-6),
                                                             (-1 / 3) / (s + 1e-6)], abs=1e-6)
    assert group_normalized(r, 4).tolist() == pytest.approx([0.0, 1.1547, -0.57735, -0.57735], abs=1e-4)
    assert group_normalized(r, 4, "none").tolist() == pytest.approx([0.0, 2 / 3, -1 / 3, -1 / 3], abs=1e-6)
    assert leave_one_out(r, 4).tolist() == pytest.approx([0.0, 1.0, -0.5, -0.5])
    assert group_normalized(r, 4)[0].item() == 0.0 and leave_one_out(r, 4)[0].item() == 0.0
    # batch scale: the std of the scored rewards of the whole batch
    rb = torch.tensor([NAN, 1.0, 0.0, 0.0, 2.0, 2.0, NAN, 4.0], dtype=torch.float64)
    sd = statistics.stdev([1.0, 0.0, 0.0, 2.0, 2.0, 4.0])
    want = [0.0, (2 / 3) / (sd + 1e-6), (-1 / 3) / (sd + 1e-6), (-1 / 3) / (sd + 1e-6),
            (2 - 8 / 3) / (sd + 1e-6), (2 - 8 / 3) / (sd + 1e-6), 0.0, (4 - 8 / 3) / (sd + 1e-6)]
    assert group_normalized(rb, 4, "batch").tolist() == pytest.approx(want, rel=1e-12, abs=1e-12)
    assert not torch.isnan(group_normalized(rb, 4, "batch")).any()


def test_groups_with_fewer_than_two_scored_samples_carry_no_signal():
    r = torch.tensor([NAN, 1.0, NAN, NAN, NAN, NAN, NAN, NAN, 0.0, 1.0, NAN, 1.0])
    for scale in ("group", "batch", "none"):
        adv = group_normalized(r, 4, scale)
        assert (adv[:8] == 0).all() and not torch.isnan(adv).any() and (adv[8:][[0, 1, 3]] != 0).all()
    assert (leave_one_out(r, 4)[:8] == 0).all()
    assert zero_std_groups(r, 4).tolist() == [True, True, False]
    assert scored_mask(r).tolist() == [not math.isnan(x) for x in r.tolist()]


def test_moving_average_baseline_skips_missing_rewards():
    b = MovingAverageBaseline(alpha=0.5)
    adv = b.update(t64([NAN, 2.0, 4.0]))  # mean of the scored = 3, b = 1.5
    assert b.value == pytest.approx(1.5) and adv.tolist() == pytest.approx([0.0, 0.5, 2.5])
    adv = b.update(t64([NAN, NAN]))  # nothing scored: baseline unchanged, no signal
    assert b.value == pytest.approx(1.5) and adv.tolist() == [0.0, 0.0]
    adv = b.update(t64([1.0, NAN]), mean=float("nan"))  # no rank scored anything
    assert b.value == pytest.approx(1.5) and adv.tolist() == pytest.approx([-0.5, 0.0])
