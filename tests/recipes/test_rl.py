"""Online RL recipes: GRPO accumulation invariance per aggregation, reward rises on an easy
setting, REINFORCE follows Algorithm 1 exactly, RLOO / rejection sampling run and learn."""

from __future__ import annotations

import json

import pytest
import torch

from alignkit.advantages import group_normalized
from alignkit.config import GRPOConfig, ReinforceConfig, RLOOConfig, RSConfig
from alignkit.models import load_model, load_tokenizer
from alignkit.recipes import online as ol
from alignkit.recipes.grpo import grpo_loss_fn, grpo_units, train_grpo
from alignkit.recipes.reinforce import train_reinforce
from alignkit.recipes.rloo import train_rloo
from alignkit.recipes.rs import best_of_n, train_rs
from alignkit.rollout.engine import RolloutEngine, SamplingParams
from alignkit.training.trainer import Trainer

from conftest import digits, metrics


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"])
def test_grpo_gradients_1x8_equal_4x2(tiny_model_dir, tmp_path, aggregation):
    tok = load_tokenizer(str(tiny_model_dir))
    model = load_model(str(tiny_model_dir))
    prompts = [[{"role": "user", "content": f"{i} + {i}"}] for i in range(8)]
    batch = RolloutEngine(tok).generate(model, prompts, SamplingParams(n=4, max_new_tokens=10, seed=0))
    rewards = torch.tensor(digits(None, batch.texts)) + torch.arange(32) % 3 * 0.1
    adv = group_normalized(rewards, 4)
    cfg = GRPOConfig(model="x", output_dir=str(tmp_path / "r"), aggregation=aggregation, max_new_tokens=10,
                     kl_coef=0.0, progress=False, tensorboard=False, compute_entropy=False)

    def grads(per_mb, n_mb):
        m = load_model(str(tiny_model_dir))
        tr = Trainer(cfg, m, tok, recipe="t", total_steps=1, log=lambda s: None)
        mbs = ol.split_groups(batch, per_mb, n_mb, tok.pad_token_id, {"advantages": adv})
        for mb in mbs:
            mb["loss_mask"] = mb["completion_mask"]
        out = tr.accumulate(mbs, grpo_loss_fn(cfg), grpo_units(aggregation))
        return {k: p.grad.clone() for k, p in m.named_parameters()}, out["loss"]

    g1, l1 = grads(8, 1)
    g4, l4 = grads(2, 4)
    assert abs(l1 - l4) < 1e-6
    for k in g1:
        torch.testing.assert_close(g1[k], g4[k], atol=1e-7, rtol=1e-4)
    assert any(float(g.abs().sum()) > 0 for g in g1.values())


def test_grpo_raises_reward_and_logs_everything(tiny_model_dir, prompt_file, tmp_path):
    out = tmp_path / "grpo"
    train_grpo(GRPOConfig(model=str(tiny_model_dir), data=str(prompt_file), eval_data=str(prompt_file),
                          output_dir=str(out), max_steps=24, batch_size=4, num_generations=8, max_new_tokens=12,
                          lr=3e-3, kl_coef=0.01, iterations=2, progress=False, log_every=1, eval_prompts=8,
                          sample_every=5, seed=0), reward_fn=digits)
    tr = metrics(out)
    first = sum(r["reward_mean"] for r in tr[:8]) / 8
    last = sum(r["reward_mean"] for r in tr[-8:]) / 8
    assert last > first + 0.03, (first, last)
    for key in ("reward_mean", "reward_std", "kl", "entropy", "clip_frac", "response_len", "truncated_frac",
                "time_generate_s", "time_score_s", "time_train_s", "tokens_per_s", "logprob_mismatch",
                "zero_std_groups"):
        assert any(key in r for r in tr), key
    # the sampler/trainer log-prob gap is measured, and small for the same weights in fp32
    assert max(r["logprob_mismatch"] for r in tr) < 1e-4
    assert (out / "samples.jsonl").exists() and metrics(out, "eval")


def test_grpo_without_kl_loads_no_reference(tiny_model_dir, prompt_file, tmp_path, monkeypatch):
    loaded = []
    monkeypatch.setattr(ol, "reference_policy", lambda cfg, policy, device: loaded.append(cfg.kl_coef) or None)
    train_grpo(GRPOConfig(model=str(tiny_model_dir), data=str(prompt_file), output_dir=str(tmp_path / "g"),
                          max_steps=1, batch_size=2, num_generations=2, max_new_tokens=4, progress=False),
               reward_fn=digits)
    assert loaded == [0.0]
    assert "kl" not in metrics(tmp_path / "g")[0]


def test_reinforce_is_algorithm_1(tiny_model_dir, prompt_file, tmp_path):
    out = tmp_path / "rf"
    alpha = 0.8
    train_reinforce(ReinforceConfig(model=str(tiny_model_dir), data=str(prompt_file), output_dir=str(out),
                                    max_steps=6, batch_size=8, max_new_tokens=8, lr=1e-3, baseline_alpha=alpha,
                                    progress=False, log_every=1), reward_fn=digits)
    b = 0.0
    for r in metrics(out):
        b = alpha * b + (1 - alpha) * r["reward_mean"]  # updated before A = r - b
        assert abs(r["baseline"] - b) < 1e-6


def test_rloo_and_rs_learn(tiny_model_dir, prompt_file, tmp_path):
    out = tmp_path / "rloo"
    train_rloo(RLOOConfig(model=str(tiny_model_dir), data=str(prompt_file), output_dir=str(out), max_steps=30,
                          batch_size=8, num_generations=4, max_new_tokens=12, lr=3e-3, kl_coef=0.01,
                          progress=False, log_every=1), reward_fn=digits)
    tr = metrics(out)
    assert sum(r["reward_mean"] for r in tr[-8:]) > sum(r["reward_mean"] for r in tr[:8]) + 0.1
    rs = tmp_path / "rs"
    train_rs(RSConfig(model=str(tiny_model_dir), data=str(prompt_file), output_dir=str(rs), rounds=2, sft_steps=8,
                      prompts_per_round=16, batch_size=8, num_generations=4, max_new_tokens=12, lr=3e-3,
                      progress=False, log_every=1), reward_fn=digits)
    kept = [json.loads(x) for x in (rs / "round-1" / "best-rank0.jsonl").read_text().splitlines()]
    assert len(kept) == 16
    tr = metrics(rs)
    assert tr[7]["loss"] < tr[0]["loss"]  # SFT on the winners of round 1


def test_best_of_n_picks_group_maximum():
    from alignkit.rollout.engine import RolloutBatch, Sample

    samples = [Sample(g, [1], [2], [0.0], "", "eos") for g in range(2) for _ in range(3)]
    r = torch.tensor([0.1, 0.7, 0.7, 0.2, 0.1, 0.0])
    assert best_of_n(RolloutBatch(samples, 3), r, None) == [(1, pytest.approx(0.7)), (3, pytest.approx(0.2))]
    assert best_of_n(RolloutBatch(samples, 3), r, 0.5) == [(1, pytest.approx(0.7))]


def test_gsm8k_prompt_set_and_a_few_grpo_steps(tiny_model_dir, tmp_path):
    from conftest import SHARED_DATA

    gsm = SHARED_DATA / "gsm8k-train.jsonl"
    ps = ol.load_prompts(str(gsm), "train", "question", True)
    assert len(ps) == 7473 and ps.prompts[0][0]["role"] == "user"
    assert ps.columns["answer"][0].rstrip().endswith("#### 72")
    out = tmp_path / "gsm"
    train_grpo(GRPOConfig(model=str(tiny_model_dir), data=str(gsm), prompt_column="question", reward="gsm8k",
                          output_dir=str(out), max_steps=2, batch_size=2, num_generations=4, max_new_tokens=8,
                          max_length=512, progress=False, log_every=1))
    tr = metrics(out)
    assert len(tr) == 2 and all(r["reward_mean"] == 0.0 for r in tr)  # a random tiny model solves nothing
    assert (out / "model.safetensors").exists()


# --------------------------------------------------------------------------- faults of the old loop


def _prompt_text(p) -> str:
    return p[-1]["content"] if isinstance(p, list) else p


def test_grpo_refill_pairs_prompts_with_their_own_completions(tiny_model_dir, prompt_file, tmp_path, monkeypatch):
    """Dynamic sampling: every samples.jsonl row's prompt is the prompt its completion was drawn
    for, a refilled sample that was cut gets the truncation penalty, and refilled generations are
    counted in generated_tokens. (Fault 1 of issue 13: the old loop wrote the first rollout's
    completions beside the refilled prompts, skipped the penalty and the count.)"""
    drawn: set[tuple[str, str]] = set()
    calls = {"n": 0}

    def first_call_flat(prompts, completions, **cols):
        # the first scoring of each step gives every group one reward (all flat: refill them all)
        calls["n"] += 1
        for p, c in zip(prompts, completions):
            drawn.add((_prompt_text(p), c))
        if calls["n"] % 2 == 1:
            return [0.5] * len(completions)
        return [sum(ch.isdigit() for ch in t) / max(len(t), 1) + 0.01 * i for i, t in enumerate(completions)]

    generated = {"tokens": 0}
    real_generate = RolloutEngine.generate

    def counting_generate(self, model, prompts, params):
        batch = real_generate(self, model, prompts, params)
        generated["tokens"] += sum(len(s.completion_ids) for s in batch.samples)
        return batch

    monkeypatch.setattr(RolloutEngine, "generate", counting_generate)
    out = tmp_path / "refill"
    train_grpo(GRPOConfig(model=str(tiny_model_dir), data=str(prompt_file), output_dir=str(out), max_steps=2,
                          batch_size=2, num_generations=4, max_new_tokens=5, stop=["�"], dynamic_sampling=True,
                          max_refill_rounds=1, truncated="penalty", truncated_reward=-3.0, sample_every=1,
                          progress=False, log_every=1, seed=0), reward_fn=first_call_flat)
    rows = [json.loads(x) for x in (out / "samples.jsonl").read_text(encoding="utf-8").splitlines()]
    assert rows
    bad = [r for r in rows if (r["prompt"], r["completion"]) not in drawn]
    assert not bad, (bad, [d for d in drawn if d[0] == bad[0]["prompt"]])
    assert all(r["reward"] == -3.0 for r in rows if r["finish"] == "length"), rows
    assert {r["finish"] for r in rows} == {"length", "stop"}  # the penalty rule was exercised
    tr = metrics(out)
    assert all(r["refilled_groups"] > 0 for r in tr)  # refilled groups were trained and written
    assert tr[-1]["generated_tokens"] == generated["tokens"]


def test_rs_resumed_mid_round_with_samples_on_equals_uninterrupted(tiny_model_dir, prompt_file, tmp_path):
    """Resume inside round 2, whose best-of-N data is already on disk, with sample_every=1: the
    run finishes (fault 2 of issue 13: AttributeError) and ends with the weights of the
    uninterrupted run, bit for bit."""
    import shutil

    from safetensors.torch import load_file

    def cfg(out, **kw):
        return RSConfig(model=str(tiny_model_dir), data=str(prompt_file), output_dir=str(out), rounds=2,
                        sft_steps=2, prompts_per_round=4, batch_size=2, num_generations=2, max_new_tokens=6,
                        lr=3e-3, save_every=1, sample_every=1, progress=False, log_every=1, seed=0, **kw)

    a = tmp_path / "a"
    train_rs(cfg(a), reward_fn=digits)
    b = tmp_path / "b"
    shutil.copytree(a, b)
    for f in b.glob("*.safetensors"):
        f.unlink()
    train_rs(cfg(b, resume=str(b / "checkpoints" / "step-0000002")), reward_fn=digits)
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_rs_reference_logps_use_the_policy_temperature(tiny_model_dir, prompt_file, tmp_path):
    """Before the first update the policy equals its reference, so the logged KL of the first
    SFT step is 0 whatever the sampling temperature (fault 3 of issue 13: the reference was read
    at `temperature`, the policy at 1)."""
    out = tmp_path / "rs_t"
    train_rs(RSConfig(model=str(tiny_model_dir), data=str(prompt_file), output_dir=str(out), rounds=1, sft_steps=1,
                      prompts_per_round=4, batch_size=4, num_generations=2, max_new_tokens=6, temperature=0.5,
                      kl_coef=0.1, progress=False, log_every=1, seed=0), reward_fn=digits)
    first = metrics(out)[0]
    assert abs(first["kl"]) < 1e-6, first["kl"]
