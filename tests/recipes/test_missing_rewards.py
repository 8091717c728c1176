"""Missing rewards end to end (issue 14 item 7): a reward source that returns None ("cannot
score") gives that sample no gradient, and every reward statistic, group baseline and pair or
best-of-N choice uses the scored samples only."""

from __future__ import annotations

import json
import math

import pytest
import torch

from alignkit.config import GRPOConfig, OnlineDPOConfig, PPOConfig, ReinforceConfig, RLOOConfig, RSConfig
from alignkit.models import load_model, load_tokenizer
from alignkit.recipes import online as ol
from alignkit.recipes.grpo import train_grpo
from alignkit.recipes.online_dpo import build_pairs, train_online_dpo
from alignkit.recipes.ppo import train_ppo
from alignkit.recipes.reinforce import n_sequences, sequence_pg_loss_fn, train_reinforce
from alignkit.recipes.rloo import train_rloo
from alignkit.recipes.rs import best_of_n, train_rs
from alignkit.rollout.engine import RolloutEngine, SamplingParams
from alignkit.rollout.rollout import score
from alignkit.training.trainer import Trainer

from conftest import digits, metrics

pytestmark = pytest.mark.usefixtures("no_curve_plots")


def first_of_four_unscored(prompts, completions, **cols):
    """Group layout [None, 1, 0, 0] for groups of 4 contiguous samples."""
    return [(None, 1.0, 0.0, 0.0)[i % 4] for i in range(len(completions))]


def some_unscored(prompts, completions, **cols):
    """`digits`, but every third sample cannot be scored."""
    return [None if i % 3 == 0 else v for i, v in enumerate(digits(prompts, completions))]


def test_score_keeps_none_as_nan(tiny_model_dir):
    tok = load_tokenizer(str(tiny_model_dir))
    batch = RolloutEngine(tok).generate(load_model(str(tiny_model_dir)), ["a", "b"],
                                        SamplingParams(n=4, max_new_tokens=4, seed=0))
    r = score(batch, ["a", "b"], {}, first_of_four_unscored)
    assert torch.isnan(r.rewards[[0, 4]]).all() and r.rewards[[1, 2, 3, 5, 6, 7]].tolist() == [1, 0, 0, 1, 0, 0]
    assert r.stats["reward_missing"] == 2
    m = ol.rollout_metrics(r)
    assert m["reward_mean"] == pytest.approx(1 / 3) and m["reward_missing"] == 2


def test_grpo_group_stats_from_scored_samples_reach_the_loss(tiny_model_dir, prompt_file, tmp_path, monkeypatch):
    seen = []
    real = Trainer.accumulate

    def spy(self, mbs, loss_fn, units):
        seen.extend({"advantages": mb["advantages"].clone(), "loss_mask": mb["loss_mask"].clone()} for mb in mbs)
        return real(self, mbs, loss_fn, units)

    monkeypatch.setattr(Trainer, "accumulate", spy)
    out = tmp_path / "g"
    train_grpo(GRPOConfig(model=str(tiny_model_dir), data=str(prompt_file), output_dir=str(out), max_steps=2,
                          batch_size=2, num_generations=4, max_new_tokens=6, lr=1e-3, progress=False, log_every=1,
                          sample_every=1), reward_fn=first_of_four_unscored)
    s = 1 / math.sqrt(3)  # std (n - 1) of [1, 0, 0] is 1/sqrt(3); mean 1/3
    want = torch.tensor([0.0, (2 / 3) / s, (-1 / 3) / s, (-1 / 3) / s])  # [0, 1.1547, -0.5774, -0.5774]
    assert len(seen) == 2
    for mb in seen:
        adv = mb["advantages"].view(-1, 4)
        torch.testing.assert_close(adv, want.expand_as(adv), atol=1e-4, rtol=0)
        lm = mb["loss_mask"].view(-1, 4, mb["loss_mask"].shape[-1])
        assert not lm[:, 0].any() and lm[:, 1:].any(-1).all()  # the unscored sample trains no token
    rec = metrics(out)
    assert all(math.isfinite(r["loss"]) for r in rec)
    assert rec[0]["reward_missing"] == 2 and rec[0]["reward_mean"] == pytest.approx(1 / 3)
    rows = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert rows[0]["reward"] is None and rows[1]["reward"] == 1.0


def test_unscored_sample_gives_no_gradient_not_even_kl(tiny_model_dir):
    """REINFORCE/RLOO loss with β·KL in the loss: the batch with sample 0 unscored gives exactly
    the gradient of the batch without sample 0."""
    tok = load_tokenizer(str(tiny_model_dir))
    model = load_model(str(tiny_model_dir))
    batch = RolloutEngine(tok).generate(model, ["a", "b"], SamplingParams(n=2, max_new_tokens=6, seed=0))
    cfg = RLOOConfig(model="x", kl_coef=0.5, compute_entropy=False)
    loss_fn = sequence_pg_loss_fn(cfg, kl_in_loss=True)
    adv = torch.tensor([0.0, 0.7, -0.3, 0.4])

    def grads(rows, scored):
        model.zero_grad()
        mb = ol.row_batches(batch, 4, 1, tok.pad_token_id, {"advantages": adv, "scored": scored})[0]
        mb["ref_logps"] = mb["sampler_logps"] - 0.1  # any reference, so that the KL term is not 0
        mb = {k: v[rows] for k, v in mb.items()}
        loss, _ = loss_fn(model, mb)
        loss.backward()
        return {k: p.grad.clone() for k, p in model.named_parameters()}, n_sequences(mb)

    g_masked, n_masked = grads([0, 1, 2, 3], torch.tensor([0.0, 1.0, 1.0, 1.0]))
    g_without, n_without = grads([1, 2, 3], torch.tensor([0.0, 1.0, 1.0, 1.0]))
    assert n_masked == n_without == 3
    for k in g_masked:
        torch.testing.assert_close(g_masked[k], g_without[k], atol=1e-7, rtol=1e-5)


def test_pairs_and_best_of_n_skip_unscored():
    nan = float("nan")
    r = torch.tensor([nan, 0.2, 0.9, 0.1, nan, nan, nan, 0.5, 2.0, 1.0, 0.0, nan])
    pairs, ties = build_pairs(r, 4)
    assert pairs == [(2, 3), (8, 10)] and ties == 1  # group 2 has one scored sample: no pair

    class B:
        group_size = 4
        samples = [None] * 12

    assert best_of_n(B, r, None) == [(2, pytest.approx(0.9)), (7, 0.5), (8, 2.0)]
    assert best_of_n(B, torch.full((12,), nan), None) == []


@pytest.mark.parametrize("recipe", ["reinforce", "rloo", "ppo", "online-dpo", "rs"])
def test_runs_with_unscored_samples_finish_with_finite_losses(recipe, tiny_model_dir, prompt_file, tmp_path):
    base = dict(model=str(tiny_model_dir), data=str(prompt_file), output_dir=str(tmp_path / recipe),
                batch_size=2, max_new_tokens=6, lr=1e-3, progress=False, log_every=1)
    if recipe == "reinforce":
        train_reinforce(ReinforceConfig(max_steps=2, num_generations=2, **base), reward_fn=some_unscored)
    elif recipe == "rloo":
        train_rloo(RLOOConfig(max_steps=2, num_generations=3, kl_coef=0.1, **base), reward_fn=some_unscored)
    elif recipe == "ppo":
        train_ppo(PPOConfig(max_steps=2, ppo_epochs=1, reward_norm="batch", save_critic=False, **base),
                  reward_fn=some_unscored)
    elif recipe == "online-dpo":
        train_online_dpo(OnlineDPOConfig(max_steps=2, num_generations=3, **base), reward_fn=some_unscored)
    else:
        train_rs(RSConfig(rounds=1, sft_steps=2, prompts_per_round=4, num_generations=3, **base),
                 reward_fn=some_unscored)
    rec = metrics(tmp_path / recipe)
    assert rec and all(math.isfinite(r["loss"]) for r in rec)
    assert all(math.isfinite(r["reward_mean"]) for r in rec)
    assert rec[0]["reward_missing"] > 0
