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
    from alignkit.config import GRPOConfig, OnlineDPOConfig, RLOOConfig, load_config
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
    assert load_config(RLOOConfig, None, ["rollout_correction=tis"]).rollout_correction == "tis"
    with pytest.raises(UserError, match="unknown config key 'rollout_correction'"):
        load_config(OnlineDPOConfig, None, ["rollout_correction=tis"])  # a pairwise loss: no per-token weight


@pytest.mark.parametrize("recipe", ["grpo", "rloo", "reinforce", "ppo"])
@pytest.mark.parametrize("mode", ["tis", "mis"])
def test_every_policy_gradient_recipe_corrects_a_planted_mismatch(recipe, mode, tiny_model_dir, prompt_file,
                                                                   tmp_path, monkeypatch):
    """The sampler reports every even token id 4x less likely than the trainer finds it (ratio 4 >
    cap 2): TIS caps exactly those tokens, MIS drops exactly those, in each recipe's one step."""
    import alignkit.rollout.engine as engine_mod
    from alignkit.config import GRPOConfig, PPOConfig, ReinforceConfig, RLOOConfig
    from alignkit.recipes.grpo import train_grpo
    from alignkit.recipes.ppo import train_ppo
    from alignkit.recipes.reinforce import train_reinforce
    from alignkit.recipes.rloo import train_rloo
    from conftest import digits, metrics

    counts = {"even": 0, "all": 0}
    orig = engine_mod.sample_tokens

    def planted(logits, p, gen):
        tok, lp = orig(logits, p, gen)
        even = tok % 2 == 0
        counts["even"] += int(even.sum())
        counts["all"] += tok.numel()
        return tok, torch.where(even, lp - math.log(4.0), lp)

    monkeypatch.setattr(engine_mod, "sample_tokens", planted)
    cls, train = {"grpo": (GRPOConfig, train_grpo), "rloo": (RLOOConfig, train_rloo),
                  "reinforce": (ReinforceConfig, train_reinforce), "ppo": (PPOConfig, train_ppo)}[recipe]
    out = tmp_path / f"{recipe}-{mode}"
    train(cls(model=str(tiny_model_dir), data=str(prompt_file), output_dir=str(out), max_steps=1, batch_size=2,
              num_generations=2, max_new_tokens=6, progress=False, log_every=1, rollout_correction=mode,
              rollout_correction_cap=2.0, tensorboard=False, plot=False, eval_prompts=0), reward_fn=digits)
    key = "rollout_capped_frac" if mode == "tis" else "rollout_dropped_frac"
    got = [r[key] for r in metrics(out)]
    assert counts["all"] > 0 and 0 < counts["even"] < counts["all"]
    assert got and all(g == pytest.approx(counts["even"] / counts["all"]) for g in got), (got, counts)


def test_sequence_loss_weights_each_token_by_its_correction(monkeypatch):
    """RLOO / REINFORCE loss by hand: −Σ_i A_i Σ_t c_t log π(y_t), c_t = min(r_t, cap) under TIS and
    1[r_t in [1/cap, cap]] under MIS, r_t = π_trainer / π_sampler with this forward's log-probs."""
    from types import SimpleNamespace

    from alignkit.recipes import online as ol
    from alignkit.recipes.reinforce import sequence_pg_loss_fn

    logps = TRAINER.clone().requires_grad_(True)
    monkeypatch.setattr(ol, "token_logps", lambda model, mb, *a, **k: logps)
    adv = torch.tensor([1.0, -2.0])
    mb = {"completion_mask": MASK, "scored": torch.ones(2), "advantages": adv, "sampler_logps": SAMPLER}
    r = torch.tensor([[2.0, 0.5, 1.0, 0.0], [3.0, 1.0, 1.0, 2.0]])
    for mode, c in (("tis", torch.clamp(r, max=1.5)), ("mis", ((r >= 1 / 1.5) & (r <= 1.5)).float()),
                    ("none", torch.ones_like(r))):
        cfg = SimpleNamespace(temperature=1.0, logits_chunk_size=64, compute_entropy=False, kl_coef=0.0,
                              kl_estimator="k3", rollout_correction=mode, rollout_correction_cap=1.5)
        loss, _ = sequence_pg_loss_fn(cfg, kl_in_loss=False)(None, mb)
        want = -(adv * (c * MASK * TRAINER).sum(-1)).sum()
        assert float(loss.detach()) == pytest.approx(float(want), rel=1e-6), mode
