"""The CUDA paths: bf16 autocast training, generation on the GPU, QLoRA, and the online and
preference recipes on a GPU. Marked `gpu` and skipped without a CUDA device; run them on a GPU
machine with `pytest -m gpu tests/gpu` (docs/gpu.md)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from alignkit.config import DPOConfig, GRPOConfig, SFTConfig, load_config
from alignkit.models import load_model, load_tokenizer
from alignkit.recipes.dpo import train_dpo
from alignkit.recipes.grpo import train_grpo
from alignkit.recipes.sft import train_sft
from alignkit.rollout.engine import RolloutEngine, SamplingParams

from conftest import chat_rows, digits, metrics, write_jsonl

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
              pytest.mark.usefixtures("no_curve_plots")]

QUIET = ["progress=false", "tensorboard=false", "log_every=1"]


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("gpu_data") / "d.jsonl", chat_rows(16))


def _sft(model_dir, data, out, *extra) -> SFTConfig:
    return load_config(SFTConfig, None, [f"model={model_dir}", f"data={data}", f"output_dir={out}", "batch_size=8",
                                         "schedule=constant", *QUIET, *extra])


def _losses(run: Path) -> list[float]:
    return [r["loss"] for r in metrics(run)]


def test_sft_bf16_autocast_learns_and_saves_float32_master_weights(tiny_model_dir, sft_data, tmp_path):
    """dtype=auto on a bf16 GPU: forward passes under bf16 autocast, float32 master weights; the
    loss falls and the saved folder loads in plain transformers with float32 weights."""
    from transformers import AutoModelForCausalLM

    torch.cuda.reset_peak_memory_stats()
    out = tmp_path / "sft"
    train_sft(_sft(tiny_model_dir, sft_data, out, "max_steps=40", "lr=3e-3"))
    ls = _losses(out)
    assert torch.cuda.max_memory_allocated() > 0  # the run used the GPU
    assert all(math.isfinite(x) for x in ls) and sum(ls[-5:]) / 5 < 0.6 * sum(ls[:5]) / 5, ls
    m = AutoModelForCausalLM.from_pretrained(out)
    assert {p.dtype for p in m.parameters()} == {torch.float32}


def test_bf16_and_float32_runs_agree_on_the_first_loss(tiny_model_dir, sft_data, tmp_path):
    """The first step's loss under bf16 autocast is the float32 loss within bf16 rounding."""
    a, b = tmp_path / "bf16", tmp_path / "fp32"
    train_sft(_sft(tiny_model_dir, sft_data, a, "max_steps=1", "dtype=bfloat16"))
    train_sft(_sft(tiny_model_dir, sft_data, b, "max_steps=1", "dtype=float32"))
    la, lb = _losses(a)[0], _losses(b)[0]
    assert abs(la - lb) / lb < 2e-2, (la, lb)


def test_cuda_engine_greedy_equals_transformers_generate_and_logps_equal_a_forward(tiny_model_dir):
    """float32 on the GPU: greedy samples are transformers' greedy `generate`, token for token,
    and each sampled token's log-prob is the teacher-forced forward's to 1e-4."""
    tok = load_tokenizer(str(tiny_model_dir))
    model = load_model(str(tiny_model_dir)).to("cuda").eval()
    prompts = [tok.encode(p) for p in ("Хлеб: 55\nМолоко: 80", "The quick brown", "Human: what is two")]
    eng = RolloutEngine(tok, stop_token_ids={-1})
    batch = eng.generate(model, prompts, SamplingParams(n=1, max_new_tokens=12, temperature=0.0))
    for p, s in zip(prompts, batch.samples):
        ids = torch.tensor([p], device="cuda")
        ref = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=12,
                             eos_token_id=None, pad_token_id=0)[0, len(p):].tolist()
        assert s.completion_ids == ref
        full = torch.tensor([p + s.completion_ids], device="cuda")
        with torch.no_grad():
            lp = torch.log_softmax(model(full).logits[0, len(p) - 1:-1].float(), -1)
        want = lp.gather(-1, torch.tensor(s.completion_ids, device="cuda")[:, None])[:, 0].cpu()
        assert torch.allclose(torch.tensor(s.logprobs), want, atol=1e-4)


def test_cuda_sampling_is_seeded(tiny_model_dir):
    """Same seed, same samples on the GPU; another seed, other samples."""
    tok = load_tokenizer(str(tiny_model_dir))
    model = load_model(str(tiny_model_dir)).to("cuda").eval()
    eng = RolloutEngine(tok, stop_token_ids={-1})
    run = lambda seed: [s.completion_ids for s in eng.generate(  # noqa: E731
        model, ["Хлеб: 55"], SamplingParams(n=4, max_new_tokens=10, seed=seed)).samples]
    assert run(1) == run(1) and run(1) != run(2)


def test_qlora_sft_trains_the_adapter_over_a_4bit_base(tiny_model_dir, sft_data, tmp_path):
    """peft.method=qlora: the base is loaded in 4-bit (bitsandbytes Linear4bit), only the adapter
    trains, the loss falls, and the adapter folder loads in plain peft over the float base."""
    pytest.importorskip("bitsandbytes")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "qlora"
    train_sft(_sft(tiny_model_dir, sft_data, out, "max_steps=40", "lr=1e-2", "peft.method=qlora",
                   "peft.target_modules=all-linear"))
    ls = _losses(out)
    # one H200 run (2026-11-29): mean of the first 5 losses 5.58, of the last 5 5.18 (rank-8 adapter on a
    # 32-wide model: few trainable weights, so a modest but clear fall)
    assert all(math.isfinite(x) for x in ls) and sum(ls[-5:]) / 5 < 0.96 * sum(ls[:5]) / 5, ls
    assert (out / "adapter_model.safetensors").exists()
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA"
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    m = PeftModel.from_pretrained(base, out)
    assert any("lora_A" in n for n, _ in m.named_parameters())


def test_grpo_on_cuda_raises_reward_and_measures_a_small_mismatch(tiny_model_dir, prompt_file, tmp_path):
    """GRPO on the GPU in float32: reward rises, and the sampler/trainer log-prob gap stays small."""
    out = tmp_path / "grpo"
    train_grpo(GRPOConfig(model=str(tiny_model_dir), data=str(prompt_file), output_dir=str(out), max_steps=24,
                          batch_size=4, num_generations=8, max_new_tokens=12, lr=3e-3, kl_coef=0.01, iterations=2,
                          progress=False, log_every=1, dtype="float32", seed=0), reward_fn=digits)
    tr = metrics(out)
    first = sum(r["reward_mean"] for r in tr[:8]) / 8
    last = sum(r["reward_mean"] for r in tr[-8:]) / 8
    assert last > first + 0.03, (first, last)
    assert max(r["logprob_mismatch"] for r in tr) < 1e-3


def test_grpo_bf16_runs_and_logs_the_bf16_mismatch(tiny_model_dir, prompt_file, tmp_path):
    """dtype=auto (bf16) GRPO: finite losses, KL and mismatch are logged; the gap is bf16-sized."""
    out = tmp_path / "grpo16"
    train_grpo(GRPOConfig(model=str(tiny_model_dir), data=str(prompt_file), output_dir=str(out), max_steps=4,
                          batch_size=4, num_generations=4, max_new_tokens=12, lr=1e-3, kl_coef=0.05,
                          progress=False, log_every=1, seed=0), reward_fn=digits)
    tr = metrics(out)
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["kl"]) for r in tr)
    assert 0 <= max(r["logprob_mismatch"] for r in tr) < 0.1


def test_dpo_on_cuda_separates_chosen_from_rejected(tiny_model_dir, tmp_path):
    """DPO on the GPU (bf16 autocast): the reward margin grows and accuracy reaches 1 on the data."""
    rows = [{"prompt": f"Хлеб: {i}", "chosen": f"Итого: {i} рублей.", "rejected": "The quick brown fox."}
            for i in range(16)]
    data = write_jsonl(tmp_path / "p.jsonl", rows)
    out = tmp_path / "dpo"
    train_dpo(load_config(DPOConfig, None, [f"model={tiny_model_dir}", f"data={data}", f"output_dir={out}",
                                            "batch_size=8", "max_steps=20", "lr=3e-3", *QUIET]))
    tr = metrics(out)
    assert tr[-1]["rewards/margin"] > tr[0]["rewards/margin"] + 0.1, (tr[0], tr[-1])
    assert tr[-1]["rewards/accuracy"] == 1.0
