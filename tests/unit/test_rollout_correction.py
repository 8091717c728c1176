"""Sampler-vs-trainer correction (losses.rollout_correction, TIS / MIS) against hand computations,
and the aggregation staying exact with it."""

from __future__ import annotations

import math

import pytest
import torch

from alignkit.losses import correction_metrics, policy_loss, policy_loss_terms, rollout_correction

# per token: pi_trainer, pi_sampler -> ratio r = pi_trainer / pi_sampler
TRAINER = torch.log(torch.tensor([[0.5, 0.2, 0.9, 0.3], [0.6, 0.1, 0.7, 0.7]]))
SAMPLER = torch.log(torch.tensor([[0.25, 0.4, 0.9, 0.3], [0.2, 0.1, 0.7, 0.35]]))
# r:                                [[2, 0.5, 1, pad],     [3, 1, 1, 2]]
MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)


def test_measured_gap_by_hand():
    c = rollout_correction(TRAINER, SAMPLER, MASK, "none")
    assert c.weights is None and torch.equal(c.mask, MASK)
    m = correction_metrics(c.stats)
    # |log r| over the 7 completion tokens: ln2, ln2, 0, ln3, 0, 0, ln2
    assert m["logprob_mismatch"] == pytest.approx((3 * math.log(2) + math.log(3)) / 7, rel=1e-6)
    assert m["mismatch_ratio_max"] == pytest.approx(3.0, rel=1e-6)


def test_tis_weights_by_hand():
    c = rollout_correction(TRAINER, SAMPLER, MASK, "tis", cap=1.5)
    want = torch.tensor([[1.5, 0.5, 1.0, 0.0], [1.5, 1.0, 1.0, 1.5]])
    torch.testing.assert_close(c.weights, want, rtol=1e-6, atol=1e-6)
    assert torch.equal(c.mask, MASK)
    assert correction_metrics(c.stats)["rollout_capped_frac"] == pytest.approx(3 / 7)


def test_mis_mask_by_hand():
    c = rollout_correction(TRAINER, SAMPLER, MASK, "mis", cap=1.5)  # keep r in [2/3, 1.5]
    assert c.weights is None
    assert c.mask.tolist() == [[False, False, True, False], [False, True, True, False]]
    assert correction_metrics(c.stats)["rollout_dropped_frac"] == pytest.approx(4 / 7)


def test_tis_loss_and_gradient_by_hand_in_every_aggregation():
    """On-policy (old = logps): per-token loss -A * rho = -A, times the TIS weight; the gradient
    w.r.t. logps is -A * w / normaliser."""
    c = rollout_correction(TRAINER, SAMPLER, MASK, "tis", cap=1.5)
    w = c.weights
    A = torch.tensor([1.0, -2.0])
    n_b = MASK.sum(-1).float()  # 3, 4
    expect = {
        "token_mean": (-(1.5 + 0.5 + 1.0) + 2 * (1.5 + 1 + 1 + 1.5)) / 7,
        "seq_mean_token_mean": (-(3.0) / 3 + 2 * 5.0 / 4) / 2,
        "seq_mean_token_sum_norm": (-(3.0) / 8 + 2 * 5.0 / 8) / 2,
    }
    for agg, want in expect.items():
        logps = torch.zeros(2, 4, requires_grad=True)
        loss, _ = policy_loss(logps, logps.detach(), A, c.mask, aggregation=agg, max_length=8, is_weights=w)
        assert float(loss.detach()) == pytest.approx(want, rel=1e-6), agg
        loss.backward()
        norm = {"token_mean": torch.full((2, 1), 7.0), "seq_mean_token_mean": 2 * n_b[:, None],
                "seq_mean_token_sum_norm": torch.full((2, 1), 16.0)}[agg]
        torch.testing.assert_close(logps.grad, (-A[:, None] * w / norm) * MASK, rtol=1e-6, atol=1e-7)


def test_mis_normalises_over_kept_tokens_and_split_batches_agree():
    c = rollout_correction(TRAINER, SAMPLER, MASK, "mis", cap=1.5)
    logps = torch.zeros(2, 4)
    A = torch.tensor([1.0, -2.0])
    loss, _ = policy_loss(logps, logps, A, c.mask)
    assert float(loss) == pytest.approx((-1 + 2 * 2) / 3)  # kept: 1 token of row 0, 2 of row 1
    # global normalisation: two micro-batches summed, divided once, equal one batch
    parts = [policy_loss_terms(logps[i:i + 1], logps[i:i + 1], A[i:i + 1], c.mask[i:i + 1]) for i in range(2)]
    assert float(sum(p.loss_sum for p in parts) / sum(p.count for p in parts)) == pytest.approx(float(loss))


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown rollout_correction"):
        rollout_correction(TRAINER, SAMPLER, MASK, "ppo")
    with pytest.raises(ValueError, match="> 1"):
        rollout_correction(TRAINER, SAMPLER, MASK, "tis", cap=1.0)
    with pytest.raises(ValueError, match="shape"):
        rollout_correction(TRAINER, SAMPLER[:, :2], MASK, "tis")


def test_grpo_with_correction_runs_and_logs(tiny_model_dir, prompt_file, tmp_path):
    """GRPO on alignkit's engine with TIS and MIS: the trainer's log-probs are taken up front, the
    correction applied before the loss units are counted, and the fractions logged."""
    from alignkit.config import GRPOConfig, RLOOConfig, load_config
    from alignkit.errors import UserError
    from alignkit.recipes.grpo import train_grpo
    from conftest import digits, metrics

    for mode, key in (("tis", "rollout_capped_frac"), ("mis", "rollout_dropped_frac")):
        out = tmp_path / mode
        train_grpo(GRPOConfig(model=str(tiny_model_dir), data=str(prompt_file), output_dir=str(out), max_steps=2,
                              batch_size=2, num_generations=2, max_new_tokens=4, progress=False, log_every=1,
                              rollout_correction=mode, rollout_correction_cap=1.5, tensorboard=False, plot=False),
                   reward_fn=digits)
        tr = metrics(out)
        assert len(tr) == 2
        for r in tr:  # same weights, fp32: nothing to correct, and the gap is float noise
            assert r[key] == 0.0 and r["logprob_mismatch"] < 1e-4 and 1.0 <= r["mismatch_ratio_max"] < 1.001
    with pytest.raises(UserError, match="unknown config key 'rollout_correction'"):
        load_config(RLOOConfig, None, ["rollout_correction=tis"])  # GRPO only
