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


def test_preallocated_cache_matches_growing_cache(mt, monkeypatch):
    """Decoding into preallocated buffers gives the samples and log-probs of a cache that grows by
    concatenation, with finished samples leaving the batch along the way."""
    from alignkit.rollout import engine as eng_mod

    model, tok = mt
    eng = RolloutEngine(tok)
    p = SamplingParams(n=5, temperature=1.3, max_new_tokens=14, seed=2)
    fast = eng.generate(model, PROMPTS, p)

    def grow_only(cache, n, capacity):
        if n > 1:
            cache.batch_repeat_interleave(n)

    monkeypatch.setattr(eng_mod, "_preallocate", grow_only)
    slow = eng.generate(model, PROMPTS, p)
    assert any(s.finish_reason == "eos" for s in slow.samples)  # rows did leave the batch
    assert [s.completion_ids for s in fast.samples] == [s.completion_ids for s in slow.samples]
    for a, b in zip(fast.samples, slow.samples):
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=1e-5)


def test_preallocated_layer_against_dynamic_layer():
    from transformers.cache_utils import DynamicLayer

    from alignkit.rollout.engine import _fill_holes, _preallocated_layer_class

    assert _fill_holes([0, 2, 3, 5]) == [0, 5, 2, 3]  # row 1 finished: the last live row takes its place
    g = torch.Generator().manual_seed(0)
    k0, v0 = torch.randn(2, 3, 4, 5, generator=g), torch.randn(2, 3, 4, 5, generator=g)
    ref = DynamicLayer()
    ref.update(k0, v0)
    ref.batch_repeat_interleave(3)
    fast = _preallocated_layer_class()(k0, v0, n=3, capacity=7)  # room for 3 more tokens, then it must grow
    selects = {2: [0, 2, 3, 5], 3: _fill_holes([0, 2, 3]), 4: [2, 0]}  # any order; fill the holes; any order
    rows = 6
    for step in range(5):
        if step in selects:
            keep = torch.tensor(selects[step])
            ref.batch_select_indices(keep)
            fast.batch_select_indices(keep)
            rows = len(keep)
        k, v = torch.randn(rows, 3, 1, 5, generator=g), torch.randn(rows, 3, 1, 5, generator=g)
        rk, rv = ref.update(k, v)
        fk, fv = fast.update(k, v)
        assert torch.equal(rk, fk) and torch.equal(rv, fv)
        assert fast.get_seq_length() == ref.get_seq_length() == 5 + step


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
