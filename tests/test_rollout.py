"""Rollout engine: greedy = transformers greedy generate, seeded reproducibility, returned
log-probs = teacher-forced log-probs, stop reasons, group layout."""

from __future__ import annotations

import pytest
import torch

from alignkit.models import load_model, load_tokenizer
from alignkit.ops.logprobs import causal_lm_token_logps
from alignkit.rollout.engine import RolloutEngine, SamplingParams

PROMPTS = [
    [{"role": "user", "content": "Хлеб: 55\nМолоко: 80"}],
    [{"role": "user", "content": "The quick brown fox jumps over the lazy dog, twice over and again"}],
    [{"role": "user", "content": "2"}],
]


@pytest.fixture(scope="module")
def mt(tiny_model_dir):
    torch.manual_seed(0)
    return load_model(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))


def test_greedy_equals_transformers_generate(mt):
    model, tok = mt
    eng = RolloutEngine(tok)
    out = eng.generate(model, PROMPTS, SamplingParams(temperature=0, max_new_tokens=12))
    for i, prompt in enumerate(PROMPTS):
        ids = torch.tensor([eng.encode([prompt])[0]])
        ref = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=12,
                             eos_token_id=sorted(eng.stop_ids), pad_token_id=tok.pad_token_id)
        ref_ids = ref[0, ids.shape[1]:].tolist()
        assert out.samples[i].completion_ids == ref_ids[: len(out.samples[i].completion_ids)]
        assert len(out.samples[i].completion_ids) == len(ref_ids)


def test_same_seed_same_samples_and_different_seed_differs(mt):
    model, tok = mt
    eng = RolloutEngine(tok)
    p = SamplingParams(n=4, temperature=1.0, max_new_tokens=10, seed=3)
    a = eng.generate(model, PROMPTS, p)
    b = eng.generate(model, PROMPTS, p)
    c = eng.generate(model, PROMPTS, SamplingParams(n=4, temperature=1.0, max_new_tokens=10, seed=4))
    assert [s.completion_ids for s in a.samples] == [s.completion_ids for s in b.samples]
    assert [s.completion_ids for s in a.samples] != [s.completion_ids for s in c.samples]
    assert len(a) == 12 and [s.prompt_index for s in a.samples] == [0] * 4 + [1] * 4 + [2] * 4


@pytest.mark.parametrize("temperature, top_p, top_k", [(1.0, 1.0, 0), (0.7, 0.9, 20), (0.0, 1.0, 0)])
def test_logprobs_equal_teacher_forced(mt, temperature, top_p, top_k):
    model, tok = mt
    eng = RolloutEngine(tok)
    out = eng.generate(model, PROMPTS, SamplingParams(n=3, temperature=temperature, top_p=top_p, top_k=top_k,
                                                      max_new_tokens=16, seed=1))
    batch = out.tensors(tok.pad_token_id)
    with torch.no_grad():
        tf = causal_lm_token_logps(model, batch["input_ids"], batch["attention_mask"], batch["position_ids"],
                                   batch["targets"], temperature=temperature if temperature > 0 else 1.0)
    m = batch["completion_mask"]
    assert m.sum() > 0
    torch.testing.assert_close(tf[m], batch["old_logps"][m], atol=2e-5, rtol=1e-4)


def test_prefill_is_shared_and_finished_samples_leave_the_batch(mt):
    model, tok = mt
    eng = RolloutEngine(tok)
    out = eng.generate(model, PROMPTS, SamplingParams(n=8, temperature=1.0, max_new_tokens=20, seed=0))
    prompt_tokens = sum(len(x) for x in eng.encode(PROMPTS))
    assert out.stats["prefill_tokens"] == prompt_tokens  # once per prompt, not once per sample
    generated = sum(len(s.completion_ids) for s in out.samples)
    assert out.stats["decode_tokens"] == generated  # no token computed for a finished sample


def test_stop_reasons(mt):
    model, tok = mt
    eng = RolloutEngine(tok)
    out = eng.generate(model, PROMPTS, SamplingParams(n=6, temperature=1.5, max_new_tokens=6, seed=0))
    for s in out.samples:
        if s.finish_reason == "eos":
            assert s.completion_ids[-1] in eng.stop_ids
        else:
            assert s.finish_reason == "length" and len(s.completion_ids) == 6
    # a stop string cuts the text and ends the sample
    greedy = eng.generate(model, PROMPTS[:1], SamplingParams(temperature=0, max_new_tokens=12))
    text = greedy.samples[0].text
    assert len(text) >= 3, text
    stop = text[1:3]
    cut = eng.generate(model, PROMPTS[:1], SamplingParams(temperature=0, max_new_tokens=12, stop=(stop,)))
    s = cut.samples[0]
    assert s.finish_reason == "stop" and stop not in s.text and text.startswith(s.text)


def test_sampler_matches_the_distribution():
    """Inverse-CDF sampling draws from softmax(logits / T) after top-k / top-p truncation."""
    from alignkit.rollout.engine import sample_tokens

    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -30.0]]).repeat(20000, 1)
    gen = torch.Generator().manual_seed(0)
    tok, lp = sample_tokens(logits, SamplingParams(temperature=1.0), gen)
    freq = torch.bincount(tok, minlength=5).float() / len(tok)
    torch.testing.assert_close(freq, torch.softmax(logits[0], -1), atol=0.01, rtol=0)
    torch.testing.assert_close(lp, torch.log_softmax(logits[0], -1)[tok])
    tok, _ = sample_tokens(logits, SamplingParams(temperature=1.0, top_k=2), gen)
    p2 = torch.softmax(logits[0, :2], -1)
    freq = torch.bincount(tok, minlength=5).float() / len(tok)
    assert freq[2:].sum() == 0
    torch.testing.assert_close(freq[:2], p2, atol=0.015, rtol=0)
