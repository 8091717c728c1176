"""vLLM as the rollout engine (alignkit.rollout.vllm_engine), on a tiny random Llama on CPU.

Run with the vLLM environment: `pytest -m vllm` (docs/vllm.md has the install line). Skipped
where vLLM is not installed. One engine serves the module (starting one takes 5-100 s on CPU);
each test syncs its own model into it first."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import build_tiny_model, build_tiny_tokenizer

pytestmark = [pytest.mark.vllm, pytest.mark.usefixtures("one_thread")]
pytest.importorskip("vllm")

from alignkit.ops.logprobs import causal_lm_token_logps  # noqa: E402
from alignkit.rollout.engine import RolloutEngine, SamplingParams  # noqa: E402
from alignkit.rollout.vllm_engine import VLLMEngine  # noqa: E402

PROMPT = [1, 40, 41, 42, 43, 44]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("vllm_tiny")
    tok = build_tiny_tokenizer(d)
    build_tiny_model(d, len(tok), hidden=128)  # 4 heads of 32: a head size vLLM's CPU kernels take
    return d, tok


@pytest.fixture(scope="module")
def engine(folder):
    d, tok = folder
    return VLLMEngine(tok, str(d), dtype="float32", max_model_len=128, seed=0)


def load(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder[0], dtype=torch.float32)


def trainer_logps(model, prompt, completion, temperature=1.0):
    """alignkit's teacher-forced log-probs of `completion` after `prompt`, (len(completion),)."""
    ids = torch.tensor([prompt + completion])
    tgt = torch.full_like(ids, -100)
    tgt[0, len(prompt) - 1:-1] = torch.tensor(completion)
    with torch.no_grad():
        lp = causal_lm_token_logps(model, ids, targets=tgt, temperature=temperature)
    return lp[0, len(prompt) - 1:-1]


def train_step(model, lr=0.05):
    """One high-learning-rate AdamW step that raises the log-prob of a fixed sequence."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    ids = torch.tensor([PROMPT + [7, 8, 9, 10]])
    causal_lm_token_logps(model, ids).sum().neg().backward()
    opt.step()
    opt.zero_grad()


def test_samples_with_sampler_logps_equal_to_the_trainers(engine, folder):
    model = load(folder)
    p = SamplingParams(n=4, max_new_tokens=6, temperature=0.7, seed=3)
    batch = engine.generate(model, [PROMPT, PROMPT[:3]], p)
    assert len(batch) == 8 and batch.group_size == 4
    assert [s.prompt_index for s in batch.samples] == [0] * 4 + [1] * 4
    assert len({tuple(s.completion_ids) for s in batch.samples[:4]}) > 1  # n samples differ
    for s in batch.samples:
        assert s.prompt_ids == (PROMPT if s.prompt_index == 0 else PROMPT[:3])
        assert 1 <= len(s.completion_ids) <= 6 and len(s.logprobs) == len(s.completion_ids)
        assert s.finish_reason in ("eos", "stop", "length")
        assert (s.finish_reason == "length") == (len(s.completion_ids) == 6 and s.completion_ids[-1] not in engine.stop_ids)
        # the sampler's log-probs are log softmax(logits / T) of the trainer, token for token
        ref = trainer_logps(model, s.prompt_ids, s.completion_ids, temperature=0.7)
        torch.testing.assert_close(torch.tensor(s.logprobs), ref, rtol=0, atol=1e-3)
    again = engine.generate(model, [PROMPT, PROMPT[:3]], p)  # same seed, same samples
    assert [s.completion_ids for s in again.samples] == [s.completion_ids for s in batch.samples]
    # greedy equals alignkit's own engine
    g = SamplingParams(n=1, max_new_tokens=5, temperature=0.0)
    ours = RolloutEngine(folder[1]).generate(model, [PROMPT], g).samples[0]
    theirs = engine.generate(model, [PROMPT], g).samples[0]
    assert theirs.completion_ids == ours.completion_ids
    torch.testing.assert_close(torch.tensor(theirs.logprobs), torch.tensor(ours.logprobs), rtol=0, atol=1e-3)


def test_stop_strings_and_end_of_turn(engine, folder):
    model = load(folder)
    free = engine.generate(model, [PROMPT], SamplingParams(n=1, max_new_tokens=8, temperature=0.0)).samples[0]
    text = folder[1].decode(free.completion_ids[:4], skip_special_tokens=True)
    stop = text[-2:] if len(text) >= 2 else text
    s = engine.generate(model, [PROMPT], SamplingParams(n=1, max_new_tokens=8, temperature=0.0, stop=(stop,))).samples[0]
    assert s.finish_reason == "stop" and stop not in s.text
    assert s.completion_ids == free.completion_ids[:len(s.completion_ids)]
    # an end-of-turn id ends the sample and stays its last id
    k = next((i for i, t in enumerate(free.completion_ids) if i and t not in free.completion_ids[:i]), 0)
    eot = free.completion_ids[k]
    e = VLLMEngine.generate.__get__(engine)  # same engine, another stop set
    engine.stop_ids, saved = {eot}, engine.stop_ids
    try:
        r = e(model, [PROMPT], SamplingParams(n=1, max_new_tokens=8, temperature=0.0)).samples[0]
    finally:
        engine.stop_ids = saved
    assert r.finish_reason == "eos" and r.completion_ids == free.completion_ids[:k + 1]


def test_weights_reach_the_engine_after_a_step(engine, folder):
    model = load(folder)
    completion = [50, 60, 70, 80, 90]
    engine.sync_weights(model)
    before = torch.tensor(engine.score(PROMPT, completion))
    torch.testing.assert_close(before, trainer_logps(model, PROMPT, completion), rtol=0, atol=1e-3)
    for n, p in model.named_parameters():  # the norms stay put; the tied embedding/head trains
        p.requires_grad_("norm" not in n)
    engine.sync_weights(model, full=True)
    train_step(model)
    after = trainer_logps(model, PROMPT, completion)
    stale = torch.tensor(engine.score(PROMPT, completion))
    assert (stale - after).abs().max() > 1e-2  # differed before the sync
    info = engine.sync_weights(model)
    trained = sum(1 for n, _ in model.named_parameters() if "norm" not in n)
    assert info["tensors"] == trained and info["buckets"] >= 1  # only what changed, the tied head once
    torch.testing.assert_close(torch.tensor(engine.score(PROMPT, completion)), after, rtol=0, atol=1e-3)
    assert engine.sync_weights(model)["tensors"] == 0


def test_lora_adapter_reaches_the_engine(engine, folder):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(load(folder), LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                    target_modules=["q_proj", "v_proj", "down_proj"]))
    completion = [50, 60, 70, 80, 90]
    engine.sync_weights(model)
    start = trainer_logps(model, PROMPT, completion)
    torch.testing.assert_close(torch.tensor(engine.score(PROMPT, completion)), start, rtol=0, atol=1e-3)
    base_before = copy.deepcopy(model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight)
    train_step(model)
    after = trainer_logps(model, PROMPT, completion)
    assert (after - start).abs().max() > 1e-2  # the adapter trained
    assert (torch.tensor(engine.score(PROMPT, completion)) - after).abs().max() > 1e-2  # not yet in the engine
    b = engine.generate(model, [PROMPT], SamplingParams(n=1, max_new_tokens=4, temperature=0.0))  # syncs first
    assert engine.last_sync["tensors"] == 2 * (3 + 1)  # per block: q,k,v (one fused layer) and down_proj
    torch.testing.assert_close(torch.tensor(engine.score(PROMPT, completion)), after, rtol=0, atol=1e-3)
    torch.testing.assert_close(torch.tensor(b.samples[0].logprobs),
                               trainer_logps(model, PROMPT, b.samples[0].completion_ids), rtol=0, atol=1e-3)
    # the training model was never merged
    assert torch.equal(model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight, base_before)


def test_models_vllm_cannot_run_are_refused_in_one_line(tmp_path, tiny_model_dir):
    import json

    from alignkit.errors import UserError
    from alignkit.rollout.vllm_engine import check_vllm_model

    with pytest.raises(UserError, match="head size 8 is not supported by vLLM's CPU kernels"):
        check_vllm_model(str(tiny_model_dir), "cpu")  # hidden 32 / 4 heads
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    cfg["architectures"] = ["NoSuchModelForCausalLM"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="architecture NoSuchModelForCausalLM is not supported by vLLM"):
        check_vllm_model(str(tmp_path), "cpu")


def test_many_seeded_prompts_of_uneven_length(engine, folder):
    """16 prompts x 8 seeded samples: with vLLM's chunked prefill a CPU generator was asked to
    rewind (RuntimeError: CPU Generator does not use offset); the engine prefills whole prompts."""
    import random

    rng = random.Random(0)
    prompts = [[1] + [rng.randrange(5, 290) for _ in range(rng.randint(30, 80))] for _ in range(16)]
    batch = engine.generate(None, prompts, SamplingParams(n=8, max_new_tokens=16, temperature=1.0, seed=5))
    assert len(batch) == 128 and all(len(s.logprobs) == len(s.completion_ids) for s in batch.samples)


def test_server_mode_weights_through_files_and_clean_shutdown(folder, tmp_path):
    """`alignkit vllm-serve` in a subprocess; the trainer's weights reach it through safetensors
    files after a step; the server shuts down on request and exits 0."""
    import subprocess
    import sys
    import time

    from alignkit.rollout.vllm_server import VLLMServerEngine
    from conftest import free_port

    port = free_port()
    ready = tmp_path / "ready"
    proc = subprocess.Popen([sys.executable, "-m", "alignkit", "vllm-serve", f"model={folder[0]}", f"port={port}",
                             "dtype=float32", "max_model_len=128", f"ready_file={ready}"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        t0 = time.time()
        while not ready.exists():
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            assert time.time() - t0 < 600, "server did not start"
            time.sleep(0.5)
        eng = VLLMServerEngine(folder[1], "127.0.0.1", port, str(tmp_path / "sync"), timeout=120)
        model = load(folder)
        train_step(model)  # the server holds the folder's weights; the trainer has moved on
        p = SamplingParams(n=2, max_new_tokens=5, temperature=1.0, seed=1)
        batch = eng.generate(model, [PROMPT], p)  # syncs through files first
        assert eng.last_sync["tensors"] == len({id(t) for t in model.parameters()}) and eng.last_sync["buckets"] >= 1
        assert not any((tmp_path / "sync").glob("*/*.safetensors"))  # bucket files removed
        for s in batch.samples:
            torch.testing.assert_close(torch.tensor(s.logprobs), trainer_logps(model, PROMPT, s.completion_ids),
                                       rtol=0, atol=1e-3)
        train_step(model)
        eng.generate(model, [PROMPT], p)
        assert 0 < eng.last_sync["tensors"]
        # a GRPO run of 2 steps through the server: every step's weights reach it
        from alignkit.config import GRPOConfig
        from alignkit.recipes.grpo import train_grpo

        data = tmp_path / "p.jsonl"
        data.write_text("".join(f'{{"prompt": "{i} + {i}?"}}\n' for i in range(8)))
        train_grpo(GRPOConfig(model=str(folder[0]), data=str(data), output_dir=str(tmp_path / "g"), max_steps=2,
                              batch_size=4, num_generations=2, max_new_tokens=6, lr=0.02, progress=False,
                              log_every=1, dtype="float32", rollout_engine="vllm", tensorboard=False, plot=False,
                              eval_prompts=0, vllm={"mode": "server", "port": port, "timeout": 120}),
                   reward_fn=digits)
        tr = run_metrics(tmp_path / "g")
        assert len(tr) == 2 and all(r["logprob_mismatch"] < 1e-3 for r in tr), [r["logprob_mismatch"] for r in tr]
        eng.shutdown()
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ------------------------------------------------------------------------ recipes on vLLM


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    from conftest import write_jsonl

    d = tmp_path_factory.mktemp("vllm_prompts")
    return write_jsonl(d / "p.jsonl", [{"prompt": f"Сколько будет {i} плюс {i}?"} for i in range(32)])


def digits(prompts, completions, **cols):
    return [sum(c.isdigit() for c in t) / max(len(t), 1) for t in completions]


@pytest.fixture
def vllm_calls(monkeypatch):
    """Counts the rollouts vLLM draws (and the tokens), whatever engine object a run builds."""
    calls = []
    real = VLLMEngine.generate

    def spy(self, model, prompts_, params):
        b = real(self, model, prompts_, params)
        calls.append(sum(len(s.completion_ids) for s in b.samples))
        return b

    monkeypatch.setattr(VLLMEngine, "generate", spy)
    return calls


def run_metrics(out):
    from conftest import metrics

    return metrics(out)


@pytest.mark.parametrize("peft", ["none", "lora"])
def test_grpo_on_vllm_weights_follow_every_step(folder, prompts, tmp_path, vllm_calls, monkeypatch, peft):
    """3 GRPO steps at a high learning rate, sampled by vLLM: each step's sampler log-probs equal
    the trainer's (fp32, < 1e-3), which holds only if every step's new weights reached the engine;
    with the sync cut after the first step, the gap is large."""
    from alignkit.config import GRPOConfig
    from alignkit.recipes.grpo import train_grpo

    def cfg(out):
        return GRPOConfig(model=str(folder[0]), data=str(prompts), output_dir=str(out), max_steps=3, batch_size=4,
                          num_generations=4, max_new_tokens=8, lr=0.05 if peft == "lora" else 0.02,
                          progress=False, log_every=1, dtype="float32", rollout_engine="vllm",
                          peft={"method": peft, "r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj", "down_proj"]},
                          vllm={"kv_cache_gb": 1}, max_length=128, tensorboard=False, plot=False, eval_prompts=0)

    train_grpo(cfg(tmp_path / "a"), reward_fn=digits)
    tr = run_metrics(tmp_path / "a")
    assert len(vllm_calls) == 3 and all(n > 0 for n in vllm_calls)  # the samples came from vLLM
    assert len(tr) == 3 and all(r["logprob_mismatch"] < 1e-3 for r in tr), [r["logprob_mismatch"] for r in tr]
    assert all(r["mismatch_ratio_max"] < 1.01 for r in tr)
    # the same run with the engine stuck on its first weights
    real = VLLMEngine.sync_weights
    monkeypatch.setattr(VLLMEngine, "sync_weights",
                        lambda self, model, full=False: real(self, model, full) if not self._synced else {})
    train_grpo(cfg(tmp_path / "b"), reward_fn=digits)
    stale = run_metrics(tmp_path / "b")
    assert stale[0]["logprob_mismatch"] < 1e-3 and stale[-1]["logprob_mismatch"] > 1e-2, \
        [r["logprob_mismatch"] for r in stale]


@pytest.mark.parametrize("recipe", ["rloo", "reinforce", "rs", "ppo", "online-dpo", "distill"])
def test_other_online_recipes_run_two_steps_on_vllm(recipe, folder, prompts, tmp_path, vllm_calls):
    import importlib

    from alignkit.config import DistillConfig, OnlineDPOConfig, PPOConfig, ReinforceConfig, RLOOConfig, RSConfig

    common = dict(model=str(folder[0]), data=str(prompts), output_dir=str(tmp_path / recipe), batch_size=4,
                  max_new_tokens=6, lr=1e-3, progress=False, log_every=1, dtype="float32", rollout_engine="vllm",
                  max_length=128, tensorboard=False, plot=False, eval_prompts=0)
    cfgs = {"rloo": lambda: RLOOConfig(max_steps=2, num_generations=2, **common),
            "reinforce": lambda: ReinforceConfig(max_steps=2, **common),
            "rs": lambda: RSConfig(rounds=2, sft_steps=1, prompts_per_round=4, num_generations=2, **common),
            "ppo": lambda: PPOConfig(max_steps=2, ppo_epochs=1, save_critic=False, **common),
            "online-dpo": lambda: OnlineDPOConfig(max_steps=2, **common),
            # the student samples through vLLM; the teacher (here the same weights) scores on the trainer side
            "distill": lambda: DistillConfig(max_steps=2, teacher=str(folder[0]), **common)}
    fn = {"rloo": "train_rloo", "reinforce": "train_reinforce", "rs": "train_rs", "ppo": "train_ppo",
          "online-dpo": "train_online_dpo", "distill": "train_distill"}[recipe]
    mod = importlib.import_module(f"alignkit.recipes.{recipe.replace('-', '_')}")
    getattr(mod, fn)(cfgs[recipe](), reward_fn=digits)
    assert len(vllm_calls) == 2 and all(n > 0 for n in vllm_calls)
    tr = run_metrics(tmp_path / recipe)
    assert tr and all(r["loss"] == r["loss"] for r in tr)  # logged, finite
    gaps = [r["logprob_mismatch"] for r in tr if "logprob_mismatch" in r]
    assert all(g < 1e-3 for g in gaps), gaps
    if recipe in ("rloo", "reinforce", "ppo"):
        assert gaps and all(1.0 <= r["mismatch_ratio_max"] < 1.01 for r in tr)


def test_grpo_on_multi_turn_episodes_samples_every_turn_with_vllm(folder, prompts, tmp_path, vllm_calls,
                                                                  monkeypatch):
    """Multi-turn GRPO with vLLM as the sampler: each turn is a vLLM call over the token ids so far
    (prompt, earlier turns, the environment's messages), the trained ids are those vLLM sampled, and
    the trainer's log-probs of them equal vLLM's (fp32, < 1e-3) though the environment's tokens sit
    between the model's turns."""
    from alignkit.config import GRPOConfig
    from alignkit.recipes import online as ol
    from alignkit.recipes.grpo import train_grpo

    from test_agents import ENV_SRC  # the two-turn Quiz environment of the agent tests

    env = tmp_path / "quiz_env.py"
    env.write_text(ENV_SRC)
    seen = []
    real = ol.OnlineRun.collect

    def spy(self, *a, **k):
        ro = real(self, *a, **k)
        seen.append(ro)
        return ro

    monkeypatch.setattr(ol.OnlineRun, "collect", spy)
    out = tmp_path / "mt"
    train_grpo(GRPOConfig(model=str(folder[0]), data=str(prompts), output_dir=str(out), max_steps=2, batch_size=2,
                          num_generations=2, max_new_tokens=5, lr=0.02, progress=False, log_every=1,
                          dtype="float32", rollout_engine="vllm", vllm={"kv_cache_gb": 1}, max_length=128,
                          env=f"{env}:Quiz", max_turns=3, tensorboard=False, plot=False, eval_prompts=0))
    assert len(vllm_calls) >= 4 and all(n > 0 for n in vllm_calls)  # two steps x two turns, at least
    assert seen
    for ro in seen:
        for e in ro.samples:
            assert e.turns == 2 and len(e.spans) == 2 and not all(e.trained)
            assert e.sampled_ids == [t for a, b in e.spans for t in e.completion_ids[a:b]]
    tr = run_metrics(out)
    assert len(tr) == 2 and all(r["logprob_mismatch"] < 1e-3 for r in tr), [r["logprob_mismatch"] for r in tr]


def test_rs_generate_on_vllm(folder, prompts, tmp_path, vllm_calls):
    import json

    from alignkit.config import RSConfig
    from alignkit.recipes.rs import generate_best_of_n

    out = tmp_path / "best.jsonl"
    generate_best_of_n(RSConfig(model=str(folder[0]), data=str(prompts), output=str(out), num_generations=3,
                                max_new_tokens=5, generation_batch_size=16, rollout_engine="vllm", max_length=128,
                                dtype="float32"), reward_fn=digits)
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 32 and len(vllm_calls) == 2  # 32 prompts in 2 calls of 16
    assert all(r["messages"][-1]["role"] == "assistant" for r in rows)


def test_cli_refuses_a_model_vllm_cannot_run_before_training(tiny_model_dir, prompts, tmp_path, capsys):
    from alignkit.cli import main

    out = tmp_path / "run"
    rc = main(["grpo", f"model={tiny_model_dir}", f"data={prompts}", f"output_dir={out}", "rollout_engine=vllm"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "head size 8 is not supported by vLLM's CPU kernels" in err[0], err
    assert not out.exists()


def test_prompt_longer_than_the_engine_is_one_line(engine):
    from alignkit.errors import UserError

    with pytest.raises(UserError, match=r"a prompt of 125 tokens \+ max_new_tokens 8 exceeds the engine's 128 tokens"):
        engine.generate(None, [[1] * 125], SamplingParams(n=1, max_new_tokens=8))


DDP_GRPO = r"""
import sys
sys.path.insert(0, sys.argv[3])
from conftest import digits
from alignkit.config import GRPOConfig
from alignkit.recipes.grpo import train_grpo
train_grpo(GRPOConfig(model=sys.argv[1], data=sys.argv[2], output_dir=sys.argv[4], max_steps=2, batch_size=2,
                      num_generations=2, max_new_tokens=4, lr=0.02, progress=False, log_every=1, dtype="float32",
                      rollout_engine="vllm", distributed=sys.argv[5], tensorboard=False, plot=False, eval_prompts=0),
           reward_fn=digits)
"""


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_each_with_its_engine(folder, prompts, tmp_path, mode):
    """torchrun with 2 processes on CPU: each samples with its own in-process engine and syncs the
    weights (under FSDP gathered from the shards unit by unit, outside the trainer's gathering);
    the gap stays float noise at every step."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from conftest import free_port

    tests = Path(__file__).resolve().parents[1]  # tests/, where conftest lives
    script = tmp_path / "ddp_grpo.py"
    script.write_text(DDP_GRPO)
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(free_port()), str(script), str(folder[0]), str(prompts), str(tests), str(tmp_path / "r"), mode],
                         capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    tr = run_metrics(tmp_path / "r")
    assert len(tr) == 2 and all(r["logprob_mismatch"] < 1e-3 and r["mismatch_ratio_max"] < 1.01 for r in tr)
