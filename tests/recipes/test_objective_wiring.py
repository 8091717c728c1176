"""The policy-gradient objectives reach the recipes (issue 17): `ratio_level` (GSPO), `loss_type`
(CISPO) and `dual_clip` in grpo / ppo, DAPO's overlong shaping on every online recipe, and the
combinations that would change nothing refused with one line and exit 2."""

from __future__ import annotations

import math

import pytest
import torch

from alignkit.cli import main
from alignkit.config import GRPOConfig
from alignkit.losses import policy_loss_terms
from alignkit.models import load_model, load_tokenizer
from alignkit.recipes import online as ol
from alignkit.recipes.grpo import grpo_loss_fn, train_grpo
from alignkit.rollout.engine import RolloutEngine, SamplingParams

from conftest import digits, metrics

pytestmark = pytest.mark.usefixtures("no_curve_plots")


@pytest.mark.parametrize("opts", [dict(ratio_level="sequence"), dict(loss_type="cispo"),
                                  dict(dual_clip=2.0), dict(ratio_level="sequence", loss_type="cispo")])
def test_grpo_loss_uses_the_configured_objective(tiny_model_dir, opts):
    """grpo's loss equals `policy_loss_terms` with the same options, and (ratios ≠ 1) differs from
    the default token-level clipped loss."""
    tok = load_tokenizer(str(tiny_model_dir))
    model = load_model(str(tiny_model_dir))
    batch = RolloutEngine(tok).generate(model, ["a", "b"], SamplingParams(n=2, max_new_tokens=8, seed=0))
    mb = ol.row_batches(batch, 4, 1, tok.pad_token_id, {"advantages": torch.tensor([1.0, -1.0, 0.5, -2.0])})[0]
    mb["loss_mask"] = mb["completion_mask"]
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        logps = ol.token_logps(model, mb, 1.0, 64)
    # an old policy far enough away that clips and caps bind
    mb["old_logps"] = (logps + 0.6 * torch.randn(logps.shape, generator=g)) * mb["completion_mask"]
    kw = dict(clip_low=0.1, clip_high=0.1, kl_coef=0.0, compute_entropy=False, aggregation="seq_mean_token_mean")
    loss, _ = grpo_loss_fn(GRPOConfig(model="x", **kw, **opts))(model, mb)
    want = policy_loss_terms(logps, mb["old_logps"], mb["advantages"], mb["loss_mask"], 0.1, 0.1,
                             "seq_mean_token_mean", **opts).loss_sum
    base, _ = grpo_loss_fn(GRPOConfig(model="x", **kw))(model, mb)
    assert float(loss.detach()) == pytest.approx(float(want), rel=1e-5, abs=1e-7)
    assert abs(float(loss.detach()) - float(base.detach())) > 1e-4


@pytest.mark.parametrize("opts", [dict(ratio_level="sequence", clip_low=3e-4, clip_high=4e-4,
                                       aggregation="seq_mean_token_mean"),
                                  dict(loss_type="cispo", clip_high=0.28), dict(dual_clip=3.0)])
def test_grpo_runs_with_the_objective(tiny_model_dir, prompt_file, tmp_path, opts):
    out = tmp_path / "g"
    train_grpo(GRPOConfig(model=str(tiny_model_dir), data=str(prompt_file), output_dir=str(out), max_steps=2,
                          batch_size=2, num_generations=4, max_new_tokens=8, lr=1e-2, iterations=2,
                          progress=False, log_every=1, **opts), reward_fn=digits)
    rec = metrics(out)
    assert len(rec) == 4 and all(math.isfinite(r["loss"]) for r in rec)
    # the second update of each rollout sees π ≠ π_old: ratios away from 1
    assert any(abs(r["ratio_mean"] - 1.0) > 1e-6 for r in rec[1::2])
    if "dual_clip" in opts:
        assert "dual_clip_frac" in rec[0]


def test_overlong_shaping_follows_the_formula(tiny_model_dir, prompt_file, tmp_path, monkeypatch):
    """DAPO eq. 13 with L = 8, c = 4, penalty 0.5: reward 1 − 0.5·clamp((n − 4)/4, 0, 1)."""
    seen = []
    real = ol.shape_rewards

    def spy(rollout, cfg):
        out = real(rollout, cfg)
        seen.append(([len(s.completion_ids) for s in rollout.samples], rollout.rewards.clone(), out.rewards.clone()))
        return out

    monkeypatch.setattr(ol, "shape_rewards", spy)
    out = tmp_path / "g"
    train_grpo(GRPOConfig(model=str(tiny_model_dir), data=str(prompt_file), output_dir=str(out), max_steps=2,
                          batch_size=2, num_generations=4, max_new_tokens=8, overlong_buffer=4, overlong_penalty=0.5,
                          stop=["e", "o", "i", "d", "h", "a"], progress=False, log_every=1), reward_fn=lambda p, c, **k: [1.0] * len(c))
    assert len(seen) == 2
    lengths = [n for lens, _, _ in seen for n in lens]
    # stop strings vary the lengths: some answers end before the buffer, some inside it, some at L
    assert min(lengths) <= 4 and any(4 < n < 8 for n in lengths) and max(lengths) == 8, lengths
    for lens, before, after in seen:
        assert before.tolist() == [1.0] * len(lens)
        want = [1.0 - 0.5 * min(max((n - 4) / 4, 0.0), 1.0) for n in lens]
        assert after.tolist() == pytest.approx(want, abs=1e-7)
    rec = metrics(out)
    assert rec[0]["reward_mean"] == pytest.approx(sum(seen[0][2].tolist()) / 8, abs=1e-6)


@pytest.mark.parametrize("cmd, extra, needle", [
    ("rloo", ["ratio_level=sequence"], "ratio_level=sequence changes nothing"),
    ("reinforce", ["loss_type=cispo"], "loss_type=cispo changes nothing"),
    ("rloo", ["dual_clip=3"], "dual_clip=3.0 changes nothing"),
    ("grpo", ["loss_type=cispo", "dual_clip=3"], "loss_type=cispo caps the importance weight"),
    ("ppo", ["loss_type=cispo", "dual_clip=3"], "loss_type=cispo caps the importance weight"),
    ("grpo", ["ratio_level=seq"], "ratio_level"),
    ("grpo", ["clip_ratio_c=3"], "did you mean 'dual_clip'"),
    ("grpo", ["overlong_buffer=100", "max_new_tokens=16"], "overlong_buffer=100 is longer than max_new_tokens"),
])
def test_bad_objective_options_exit_2(tiny_model_dir, prompt_file, tmp_path, capsys, cmd, extra, needle):
    out = tmp_path / "bad"
    code = main([cmd, f"model={tiny_model_dir}", f"data={prompt_file}", f"output_dir={out}", "progress=false",
                 *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert needle in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_ppo_runs_with_gspo_and_cispo(tiny_model_dir, prompt_file, tmp_path):
    from alignkit.config import PPOConfig
    from alignkit.recipes.ppo import train_ppo

    out = tmp_path / "p"
    train_ppo(PPOConfig(model=str(tiny_model_dir), data=str(prompt_file), output_dir=str(out), max_steps=1,
                        batch_size=2, num_generations=2, max_new_tokens=6, lr=1e-2, ppo_epochs=2,
                        ratio_level="sequence", loss_type="cispo", clip_high=0.28, progress=False, log_every=1,
                        save_critic=False), reward_fn=digits)
    rec = metrics(out)
    assert len(rec) == 2 and all(math.isfinite(r["loss"]) for r in rec)
    assert abs(rec[1]["ratio_mean"] - 1.0) > 1e-6  # the second epoch sees π ≠ π_old
