"""alignkit.ops.logprobs against naive full-logits references (values and gradients)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from alignkit.ops import (
    causal_lm_token_logps,
    chunked_token_logps,
    selective_log_softmax,
    shift_targets,
    split_causal_lm,
)


pytestmark = pytest.mark.usefixtures("one_thread")


TINY = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)


def naive_token_logps(logits, targets, ignore_index=-100, temperature=1.0):
    """Full log-softmax reference: (..., V) logits, (...) targets."""
    logp = torch.log_softmax(logits.to(torch.float64) / temperature, dim=-1)
    got = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return torch.where(targets != ignore_index, got, torch.zeros_like(got))


def naive_entropy(logits, targets, ignore_index=-100, temperature=1.0):
    logp = torch.log_softmax(logits.to(torch.float64) / temperature, dim=-1)
    ent = -(logp.exp() * logp).sum(-1)
    return torch.where(targets != ignore_index, ent, torch.zeros_like(ent))


# --------------------------------------------------------------------------- selective_log_softmax


@pytest.mark.parametrize("chunk_size", [None, 1, 4, 1000])
def test_selective_log_softmax_matches_full_log_softmax(chunk_size):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 41, generator=g) * 4
    index = torch.randint(0, 41, (3, 5), generator=g)
    got = selective_log_softmax(logits, index, chunk_size=chunk_size)
    want = torch.log_softmax(logits, -1).gather(-1, index[..., None]).squeeze(-1)
    assert got.shape == (3, 5) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=2e-6)


def test_selective_log_softmax_on_a_sliced_tensor():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 6, 11, generator=g)
    ids = torch.randint(0, 11, (2, 6), generator=g)
    got = selective_log_softmax(logits[:, :-1], ids[:, 1:], chunk_size=2)  # not flattenable as a view
    want = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(got, want, rtol=0, atol=2e-6)


def test_selective_log_softmax_bf16_is_computed_in_fp32():
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(6, 300, generator=g) * 8).to(torch.bfloat16)
    index = torch.randint(0, 300, (6,), generator=g)
    got = selective_log_softmax(logits, index, chunk_size=2)
    assert got.dtype == torch.float32
    want = torch.log_softmax(logits.double(), -1).gather(-1, index[:, None]).squeeze(-1)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5)
    # A bf16 log-softmax would be off by far more than that.
    bf16_naive = torch.log_softmax(logits, -1).gather(-1, index[:, None]).squeeze(-1).double()
    assert (bf16_naive - want).abs().max() > 1e-3


def test_selective_log_softmax_gradient_matches_naive():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(4, 7, 13, generator=g, dtype=torch.float64, requires_grad=True)
    index = torch.randint(0, 13, (4, 7), generator=g)
    w = torch.randn(4, 7, generator=g, dtype=torch.float64)
    (selective_log_softmax(logits, index, chunk_size=3) * w).sum().backward()
    got = logits.grad.clone()
    logits.grad = None
    (torch.log_softmax(logits, -1).gather(-1, index[..., None]).squeeze(-1) * w).sum().backward()
    torch.testing.assert_close(got, logits.grad)
    small, small_index = logits.detach()[:2, :3, :5].clone().requires_grad_(), index[:2, :3] % 5
    assert torch.autograd.gradcheck(lambda z: selective_log_softmax(z, small_index, chunk_size=4), (small,))


# --------------------------------------------------------------------------- chunked_token_logps


def _head_problem(N=11, H=5, V=9, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g, dtype=dtype)
    weight = torch.randn(V, H, generator=g, dtype=dtype)
    bias = torch.randn(V, generator=g, dtype=dtype)
    targets = torch.randint(0, V, (N,), generator=g)
    targets[[1, 4, 5]] = -100
    return hidden, weight, bias, targets


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("chunk_size", [1, 3, 64])
def test_chunked_token_logps_values(temperature, chunk_size):
    hidden, weight, bias, targets = _head_problem()
    lp, ent = chunked_token_logps(hidden, weight, targets, chunk_size=chunk_size, bias=bias, temperature=temperature,
                                  return_entropy=True)
    logits = hidden @ weight.T + bias
    torch.testing.assert_close(lp, naive_token_logps(logits, targets, temperature=temperature))
    torch.testing.assert_close(ent, naive_entropy(logits, targets, temperature=temperature))
    assert (lp[[1, 4, 5]] == 0).all() and (ent[[1, 4, 5]] == 0).all()
    assert (lp[targets != -100] < 0).all()


def test_chunked_token_logps_gradcheck_float64():
    hidden, weight, bias, targets = _head_problem(N=6, H=2, V=4)

    def fn(h, w, b):
        lp, ent = chunked_token_logps(h, w, targets, chunk_size=3, bias=b, temperature=0.9, return_entropy=True)
        return lp, ent

    args = tuple(t.clone().requires_grad_() for t in (hidden, weight, bias))
    assert torch.autograd.gradcheck(fn, args)


def test_chunked_token_logps_float32_grads_match_naive():
    hidden, weight, bias, targets = _head_problem(N=40, H=16, V=50, dtype=torch.float32, seed=3)
    g = torch.Generator().manual_seed(4)
    w_lp, w_ent = torch.randn(40, generator=g), torch.randn(40, generator=g)

    def run(chunked):
        h, w, b = (t.clone().requires_grad_() for t in (hidden, weight, bias))
        if chunked:
            lp, ent = chunked_token_logps(h, w, targets, chunk_size=7, bias=b, return_entropy=True)
        else:
            logits = h @ w.T + b
            logp = torch.log_softmax(logits, -1)
            lp = torch.where(targets != -100, logp.gather(-1, targets.clamp(min=0)[:, None]).squeeze(-1), 0.0)
            ent = torch.where(targets != -100, -(logp.exp() * logp).sum(-1), 0.0)
        ((lp * w_lp).sum() + (ent * w_ent).sum()).backward()
        return lp.detach(), h.grad, w.grad, b.grad

    for got, want in zip(run(True), run(False)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_chunked_token_logps_never_saves_tokens_by_vocab_tensors():
    """Autograd must keep nothing of size N x V: only inputs and O(N) / O(chunk x V) tensors."""
    N, H, V, chunk = 64, 8, 500, 8
    hidden, weight, _, targets = _head_problem(N=N, H=H, V=V, dtype=torch.float32)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    def largest_saved(fn):
        saved.clear()
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = fn(h, w)
        out.sum().backward()
        return max(saved)

    naive = largest_saved(lambda h, w: torch.log_softmax(h @ w.T, -1).gather(-1, targets.clamp(min=0)[:, None]))
    chunked = largest_saved(lambda h, w: chunked_token_logps(h, w, targets, chunk_size=chunk, return_entropy=True)[1])
    assert naive >= N * V  # the probe sees the naive (N, V) tensors...
    assert chunked <= max(N * H, V * H)  # ...and nothing bigger than the inputs in the chunked version


def test_chunked_token_logps_all_ignored_still_backpropagates():
    hidden, weight, bias, _ = _head_problem(dtype=torch.float32)
    targets = torch.full((hidden.shape[0],), -100)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    lp = chunked_token_logps(h, w, targets)
    assert lp.shape == targets.shape and (lp == 0).all()
    lp.sum().backward()  # connected to the graph: no "does not require grad" error
    assert h.grad is not None and (h.grad == 0).all() and w.grad is not None and (w.grad == 0).all()


def test_chunked_token_logps_rejects_bad_shapes():
    hidden, weight, bias, targets = _head_problem()
    with pytest.raises(ValueError, match="weight"):
        chunked_token_logps(hidden, weight[:, :2], targets)
    with pytest.raises(ValueError, match="targets"):
        chunked_token_logps(hidden, weight, targets[:3])


# --------------------------------------------------------------------------- the hand-written head backward


def _via_checkpoint(h, w, b, targets, chunk_size, temperature):
    """The checkpointed path (the only one before `_LinearTargetLogp`): logits_fn not marked linear."""
    from alignkit.ops.logprobs import _chunked

    lp, _ = _chunked(h, targets, lambda x: torch.nn.functional.linear(x, w, b), chunk_size, temperature, -100,
                     False, skip_ignored=True)
    return lp


@pytest.mark.parametrize("temperature, with_bias", [(1.0, True), (0.7, True), (1.0, False)])
def test_linear_target_logp_equals_the_checkpointed_path(temperature, with_bias):
    """Without entropy, chunked_token_logps takes the hand-written backward: the same log-probs,
    bit for bit, and the same gradients (to float32 rounding) as the checkpointed autograd path."""
    hidden, weight, bias, targets = _head_problem(N=40, H=16, V=50, dtype=torch.float32, seed=5)
    bias = bias if with_bias else None
    up = torch.randn(40, generator=torch.Generator().manual_seed(6))

    def run(fast):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        b = bias.clone().requires_grad_() if bias is not None else None
        lp = (chunked_token_logps(h, w, targets, chunk_size=7, bias=b, temperature=temperature) if fast
              else _via_checkpoint(h, w, b, targets, 7, temperature))
        (lp * up).sum().backward()
        return [lp.detach(), h.grad, w.grad] + ([b.grad] if b is not None else [])

    fast, slow = run(True), run(False)
    assert torch.equal(fast[0], slow[0])
    for got, want in zip(fast[1:], slow[1:]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    naive = naive_token_logps(hidden @ weight.T + (bias if bias is not None else 0), targets, temperature=temperature)
    torch.testing.assert_close(fast[0].double(), naive, rtol=1e-5, atol=1e-6)


def test_linear_target_logp_gradcheck_float64():
    hidden, weight, bias, targets = _head_problem(N=6, H=2, V=4)
    args = tuple(t.clone().requires_grad_() for t in (hidden, weight, bias))
    assert torch.autograd.gradcheck(
        lambda h, w, b: chunked_token_logps(h, w, targets, chunk_size=4, bias=b, temperature=0.8), args)


def test_linear_target_logp_bf16_head_matches_checkpointed_path():
    hidden, weight, _, targets = _head_problem(N=24, H=16, V=40, dtype=torch.float32, seed=7)
    hidden, weight = hidden.bfloat16(), weight.bfloat16()

    def run(fast):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        lp = chunked_token_logps(h, w, targets, chunk_size=5) if fast else _via_checkpoint(h, w, None, targets, 5, 1.0)
        lp.sum().backward()
        return lp.detach(), h.grad, w.grad

    fast, slow = run(True), run(False)
    assert fast[0].dtype == torch.float32 and torch.equal(fast[0], slow[0])
    assert fast[1].dtype == torch.bfloat16 and fast[2].dtype == torch.bfloat16
    for got, want in zip(fast[1:], slow[1:]):
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=1e-2)  # a bf16 ulp or two


@pytest.mark.parametrize("hidden_dtype", [torch.bfloat16, torch.float32])
def test_linear_target_logp_under_autocast_matches_checkpointed_path(hidden_dtype):
    """bf16 autocast over float32 master weights (dtype=auto on a GPU): the backward runs outside
    autocast, so it must cast as autocast did; it raised a dtype mismatch when it did not. Values
    equal the checkpointed path bit for bit, gradients come back in each input's dtype."""
    hidden, weight, _, targets = _head_problem(N=24, H=16, V=40, dtype=torch.float32, seed=3)
    hidden = hidden.to(hidden_dtype)

    def run(fast):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            lp = chunked_token_logps(h, w, targets, chunk_size=5) if fast else _via_checkpoint(h, w, None, targets, 5,
                                                                                                1.0)
        lp.sum().backward()
        return lp.detach(), h.grad, w.grad

    fast, slow = run(True), run(False)
    assert torch.equal(fast[0], slow[0])
    assert fast[1].dtype == hidden_dtype and fast[2].dtype == torch.float32
    for got, want in zip(fast[1:], slow[1:]):
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=1e-2)  # a bf16 ulp or two


def test_linear_target_logp_saves_nothing_of_tokens_by_vocab_size():
    N, H, V = 64, 8, 500
    hidden, weight, _, targets = _head_problem(N=N, H=H, V=V, dtype=torch.float32)
    saved = []
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        lp = chunked_token_logps(h, w, targets, chunk_size=8)
    lp.sum().backward()
    assert max(saved) <= max(N * H, V * H)


def test_in_place_logsumexp_is_torch_logsumexp_bit_for_bit():
    from alignkit.ops.logprobs import _logsumexp_

    z = torch.randn(6, 300, generator=torch.Generator().manual_seed(8)) * 30
    z[1, 5] = float("inf")
    z[2] = float("-inf")
    want = torch.logsumexp(z, -1)
    got = _logsumexp_(z.clone())
    assert torch.equal(got[[0, 3, 4, 5]], want[[0, 3, 4, 5]])
    assert got[1] == float("inf") and got[2] == float("-inf")


# --------------------------------------------------------------------------- pairs sharing a prompt


def _pair_batch(prompt_lens=(5, 9, 2), answer_lens=((4, 6), (3, 3), (7, 2)), seed=0):
    """A pair_collate-like batch: B pairs, chosen rows then rejected rows, right-padded; each pair's
    rows share their prompt; targets score the answer tokens only."""
    from alignkit.data.collate import pad_collate

    g = torch.Generator().manual_seed(seed)

    class Row:
        def __init__(self, ids, labels):
            self.input_ids, self.labels = ids, labels

    chosen, rejected = [], []
    for p, (a, b) in zip(prompt_lens, answer_lens):
        prompt = torch.randint(3, 97, (p,), generator=g).tolist()
        for out, n in ((chosen, a), (rejected, b)):
            ans = torch.randint(3, 97, (n,), generator=g).tolist()
            out.append(Row(prompt + ans, [-100] * p + ans))
    return pad_collate(chosen + rejected, 0), len(prompt_lens)


@pytest.mark.parametrize("impl, grouped", [("sdpa", False), ("sdpa", True), ("eager", False)])
def test_shared_prompt_pair_logps_equals_the_rows_as_they_are(impl, grouped):
    """Each pair packed as [prompt, chosen, rejected] under a 4D mask gives the same summed
    log-probs and gradients as the 2B padded rows (`causal_lm_token_logps`)."""
    from alignkit.ops.logprobs import shared_prompt_pair_logps

    model = _llama(tie=True, seed=2)
    model.config._attn_implementation = impl
    mb, B = _pair_batch()
    up = torch.linspace(0.5, 1.5, 2 * B)

    def run(shared):
        model.zero_grad()
        if shared:
            group_fn = (lambda need: [([0, 2], 0), ([1], 0)]) if grouped else None
            sums = shared_prompt_pair_logps(model, mb["input_ids"], mb["attention_mask"], mb["targets"], B,
                                            chunk_size=5, group_fn=group_fn)
        else:
            lp = causal_lm_token_logps(model, mb["input_ids"], mb["attention_mask"], mb["position_ids"],
                                       targets=mb["targets"], chunk_size=5)
            sums = torch.where(mb["targets"] != -100, lp, 0.0).sum(-1)
        (sums * up).sum().backward()
        return sums.detach(), [p.grad.clone() for p in model.parameters()]

    (got, g_got), (want, g_want) = run(True), run(False)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))


def test_shared_prompt_pair_logps_runs_each_prompt_once():
    from alignkit.ops.logprobs import shared_prompt_pair_logps

    model = _llama(tie=False, seed=3)
    mb, B = _pair_batch()
    seen = []
    hook = model.model.register_forward_pre_hook(lambda m, a, k: seen.append(k["input_ids"].shape), with_kwargs=True)
    try:
        shared_prompt_pair_logps(model, mb["input_ids"], mb["attention_mask"], mb["targets"], B, chunk_size=4)
    finally:
        hook.remove()
    # one row per pair, as long as its prompt + both answers: (5+4+6, 9+3+3, 2+7+2) -> 15
    assert seen == [torch.Size([B, 15])]


def test_shared_prompt_pair_logps_declines_what_it_cannot_pack():
    from alignkit.ops.logprobs import shared_prompt_pair_logps

    model = _llama(tie=True)
    mb, B = _pair_batch()
    args = (mb["input_ids"], mb["attention_mask"], mb["targets"], B)
    assert shared_prompt_pair_logps(model, *args) is not None
    left = mb["attention_mask"].flip(-1)  # left padding
    assert shared_prompt_pair_logps(model, mb["input_ids"], left, mb["targets"], B) is None
    other = mb["input_ids"].clone()
    other[B, 0] = other[0, 0] + 1  # pair 0's rows share no first token
    assert shared_prompt_pair_logps(model, other, mb["attention_mask"], mb["targets"], B) is None
    model.config.sliding_window, model.config.use_sliding_window = 4, True
    assert shared_prompt_pair_logps(model, *args) is None
    model.config.sliding_window = None
    model.config._attn_implementation = "flash_attention_2"
    assert shared_prompt_pair_logps(model, *args) is None

# --------------------------------------------------------------------------- causal LMs


def _llama(tie=False, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**TINY, tie_word_embeddings=tie)).eval()


def _padded_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 97, (3, 10), generator=g)
    attn = torch.ones_like(ids)
    attn[1, 7:] = 0
    attn[2, 4:] = 0
    ids = ids.masked_fill(attn == 0, 0)
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    return ids, attn, pos


def _naive_model_logps(model, ids, attn=None, pos=None, targets=None, temperature=1.0):
    kwargs = {"input_ids": ids, "attention_mask": attn}
    if pos is not None:
        kwargs["position_ids"] = pos
    logits = model(**kwargs).logits[:, -ids.shape[1]:]
    if targets is None:
        targets = shift_targets(ids, attn)
    return naive_token_logps(logits, targets, temperature=temperature), naive_entropy(logits, targets,
                                                                                      temperature=temperature)


def test_shift_targets():
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 0, 0]])
    attn = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    assert shift_targets(ids).tolist() == [[6, 7, 8, -100], [10, 0, 0, -100]]
    assert shift_targets(ids, attn).tolist() == [[6, 7, 8, -100], [10, -100, -100, -100]]


@pytest.mark.parametrize("tie", [False, True])
def test_causal_lm_token_logps_matches_full_forward(tie):
    model = _llama(tie=tie)
    if tie:
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    ids, attn, pos = _padded_batch()
    assert split_causal_lm(model) is not None
    lp, ent = causal_lm_token_logps(model, ids, attn, pos, chunk_size=4, temperature=0.8, return_entropy=True)
    want_lp, want_ent = _naive_model_logps(model, ids, attn, pos, temperature=0.8)
    assert lp.shape == ids.shape and lp.dtype == torch.float32
    torch.testing.assert_close(lp.double(), want_lp, rtol=0, atol=1e-5)
    torch.testing.assert_close(ent.double(), want_ent, rtol=0, atol=1e-5)
    assert (lp[2, 3:] == 0).all() and (lp[:, -1] == 0).all()  # padding and last position unscored


def test_causal_lm_token_logps_explicit_targets_and_grads():
    model = _llama(tie=True, seed=1)
    ids, attn, pos = _padded_batch(seed=1)
    targets = shift_targets(ids, attn)
    targets[0, :3] = -100  # a "prompt" that is not scored
    w = torch.randn(ids.shape, generator=torch.Generator().manual_seed(5))

    model.zero_grad()
    lp = causal_lm_token_logps(model, ids, attn, pos, targets=targets, chunk_size=3)
    (lp * w).sum().backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}

    model.zero_grad()
    logits = model(input_ids=ids, attention_mask=attn, position_ids=pos).logits
    ref = torch.log_softmax(logits, -1).gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
    ref = torch.where(targets != -100, ref, 0.0)
    (ref * w).sum().backward()
    torch.testing.assert_close(lp, ref, rtol=0, atol=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)


def test_causal_lm_token_logps_packed_equals_unpacked():
    model = _llama(seed=2)
    g = torch.Generator().manual_seed(6)
    docs = [torch.randint(3, 97, (1, n), generator=g) for n in (5, 7, 3)]
    packed = torch.cat(docs, 1)
    pos = torch.cat([torch.arange(d.shape[1]) for d in docs])[None]
    targets = torch.cat([shift_targets(d) for d in docs], 1)
    lp = causal_lm_token_logps(model, packed, None, pos, targets=targets)
    want = torch.cat([_naive_model_logps(model, d)[0] for d in docs], 1)
    torch.testing.assert_close(lp.double(), want, rtol=0, atol=1e-5)


def test_causal_lm_token_logps_bf16_model():
    model = _llama(seed=3).to(torch.bfloat16)
    ids, attn, pos = _padded_batch(seed=3)
    lp = causal_lm_token_logps(model, ids, attn, pos)
    want, _ = _naive_model_logps(model, ids, attn, pos)  # upcasts the model's bf16 logits
    assert lp.dtype == torch.float32
    torch.testing.assert_close(lp.double(), want, rtol=0, atol=1e-4)


def test_causal_lm_token_logps_lora_uses_adapters():
    from peft import LoraConfig, get_peft_model

    base = _llama(seed=4)
    ids, attn, pos = _padded_batch(seed=4)
    base_lp, _ = _naive_model_logps(base, ids, attn, pos)
    cfg = LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "lm_head"],
                     init_lora_weights=False)  # random B so the adapter changes the outputs
    model = get_peft_model(copy.deepcopy(base), cfg)
    assert split_causal_lm(model) is not None
    w = torch.randn(ids.shape, generator=torch.Generator().manual_seed(7))

    lp = causal_lm_token_logps(model, ids, attn, pos, chunk_size=5)
    (lp * w).sum().backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    logits = model(input_ids=ids, attention_mask=attn, position_ids=pos).logits
    t = shift_targets(ids, attn)
    ref = torch.where(t != -100, torch.log_softmax(logits, -1).gather(-1, t.clamp(min=0)[..., None]).squeeze(-1), 0.0)
    (ref * w).sum().backward()

    assert (ref.double() - base_lp).abs().max() > 1e-2  # the adapter matters...
    torch.testing.assert_close(lp, ref, rtol=0, atol=1e-5)  # ...and the split path applies it
    assert any("lora_B" in n for n in got) and any("lm_head" in n for n in got)
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(got[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("kind", ["prompt", "prefix"])
def test_causal_lm_token_logps_prompt_learning_falls_back(kind):
    from peft import PrefixTuningConfig, PromptTuningConfig, get_peft_model

    cls = PromptTuningConfig if kind == "prompt" else PrefixTuningConfig
    model = get_peft_model(_llama(seed=5), cls(task_type="CAUSAL_LM", num_virtual_tokens=3))
    assert split_causal_lm(model) is None
    ids, attn, _ = _padded_batch(seed=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lp, ent = causal_lm_token_logps(model, ids, attn, return_entropy=True)
    logits = model(input_ids=ids, attention_mask=attn).logits
    if kind == "prompt":
        assert logits.shape[1] == ids.shape[1] + 3  # virtual tokens are prepended
    t = shift_targets(ids, attn)
    torch.testing.assert_close(lp.double(), naive_token_logps(logits[:, -ids.shape[1]:], t), rtol=0, atol=1e-5)
    torch.testing.assert_close(ent.double(), naive_entropy(logits[:, -ids.shape[1]:], t), rtol=0, atol=1e-5)


def test_final_logit_softcapping_is_reproduced():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(6)
    # A small cap so the tanh is far from linear: a missing softcap would be caught.
    model = Gemma2ForCausalLM(Gemma2Config(**TINY, head_dim=8, final_logit_softcapping=0.5)).eval()
    assert split_causal_lm(model) is not None
    ids, attn, pos = _padded_batch(seed=6)
    lp = causal_lm_token_logps(model, ids, attn, pos, chunk_size=4)
    want, _ = _naive_model_logps(model, ids, attn, pos)
    torch.testing.assert_close(lp.double(), want, rtol=0, atol=1e-5)
    decoder, head, _ = split_causal_lm(model)
    hidden = decoder(input_ids=ids, attention_mask=attn, position_ids=pos).last_hidden_state
    uncapped = chunked_token_logps(hidden, head.weight, shift_targets(ids, attn))
    assert (uncapped.double() - want).abs().max() > 1e-2


def test_unreproduced_logit_scaling_falls_back_to_full_forward():
    from transformers import GraniteConfig, GraniteForCausalLM

    torch.manual_seed(7)
    model = GraniteForCausalLM(GraniteConfig(**TINY, logits_scaling=4.0)).eval()
    assert split_causal_lm(model) is None
    ids, attn, pos = _padded_batch(seed=7)
    lp = causal_lm_token_logps(model, ids, attn, pos)
    want, _ = _naive_model_logps(model, ids, attn, pos)
    torch.testing.assert_close(lp.double(), want, rtol=0, atol=1e-5)
    model.config.logits_scaling = 1.0  # a no-op scaling keeps the lean path
    assert split_causal_lm(model) is not None


def test_causal_lm_token_logps_no_grad_and_all_masked():
    model = _llama(seed=8)
    ids, attn, pos = _padded_batch(seed=8)
    with torch.no_grad():
        lp = causal_lm_token_logps(model, ids, attn, pos)
    assert not lp.requires_grad
    want, _ = _naive_model_logps(model, ids, attn, pos)
    torch.testing.assert_close(lp.double(), want, rtol=0, atol=1e-5)
    lp = causal_lm_token_logps(model, ids, attn, pos, targets=torch.full_like(ids, -100))
    assert (lp == 0).all()
    lp.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_post_training_sdpa_leaves_out_cudnn_on_cuda_only_and_restores():
    """On a CUDA device the context turns cuDNN attention off (its per-shape graph builds made
    rollouts and SFT CPU-bound on an H200) and keeps flash / memory-efficient / math; the previous
    settings return on exit; on the CPU it changes nothing."""
    from alignkit.ops.attention import post_training_sdpa

    b = torch.backends.cuda
    before = (b.cudnn_sdp_enabled(), b.flash_sdp_enabled(), b.mem_efficient_sdp_enabled(), b.math_sdp_enabled())
    assert before[0]  # torch's default: cuDNN allowed
    with post_training_sdpa("cuda"):
        assert not b.cudnn_sdp_enabled()
        assert b.flash_sdp_enabled() and b.mem_efficient_sdp_enabled() and b.math_sdp_enabled()
    assert (b.cudnn_sdp_enabled(), b.flash_sdp_enabled(), b.mem_efficient_sdp_enabled(), b.math_sdp_enabled()) == before
    with post_training_sdpa(torch.device("cpu")):
        assert b.cudnn_sdp_enabled()
