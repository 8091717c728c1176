"""Batched KV-cached sampling for RL rollouts and evaluation.

One call samples `n` completions for each of a list of prompts:

1. The prompts are left-padded into one batch and *prefilled once*; only the last position's
   logits are computed. The prefilled cache is then repeated `n` times along the batch, so the
   `n` samples of a prompt share its prefill instead of recomputing it (as
   `generate(num_return_sequences=n)` does on an expanded batch).
2. Each layer's keys and values go into buffers sized for prompt + max_new_tokens, written in
   place at each step (a growing cache would copy itself at every token).
   Each decode step feeds one token per live sample. A sample stops at an end-of-turn/eos token,
   at a stop string, or at `max_new_tokens`; finished samples are dropped from the batch and
   from the cache, so they stop costing compute.
3. For every generated token the engine returns the log-probability under the distribution it
   sampled from before truncation: log softmax(logits / temperature) (temperature 1 for greedy).
   A trainer recomputing log-probs with the same temperature on the same tokens gets the same
   numbers up to float noise; the gap is measured (`logprob_mismatch`), never assumed zero.

Randomness comes from one `torch.Generator` seeded per call, so a seed gives the same samples.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch

from alignkit.data.chat import encode_prompt, end_of_turn_ids
from alignkit.ops.attention import post_training_sdpa


@dataclass
class SamplingParams:
    """How to sample: `n` completions per prompt of at most `max_new_tokens` tokens, from
    softmax(logits / temperature) (0 = greedy) truncated to the `top_k` most likely tokens (0 =
    off) and to the smallest set of mass >= `top_p` (nucleus sampling, Holtzman et al. 2019,
    arXiv:1904.09751); `stop`: strings that end a completion; `seed`: the call's generator seed;
    `batch_size`: prompts prefilled together (each becomes n sequences)."""

    n: int = 1
    max_new_tokens: int = 128
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    stop: tuple[str, ...] = ()
    seed: int = 0
    batch_size: int = 64  # prompts prefilled together (each becomes n sequences)


@dataclass
class Sample:
    """One completion: which prompt it answers (`prompt_index` into the call's prompts), the
    prompt's and the completion's token ids, `logprobs` (one per completion token, nats, under
    softmax(logits / temperature) before truncation), the decoded `text` and why it ended
    (`finish_reason`: "eos" = an end-of-turn token, kept as the last id; "stop" = a stop
    string; "length" = max_new_tokens reached without either)."""

    prompt_index: int
    prompt_ids: list[int]
    completion_ids: list[int]
    logprobs: list[float]
    text: str
    finish_reason: str  # "eos" | "stop" | "length"


@dataclass
class RolloutBatch:
    """The samples of one `RolloutEngine.generate` call, grouped by prompt (prompt i's
    `group_size` samples at [i * group_size, (i + 1) * group_size)), and the call's counters
    (`stats`: prefill_tokens, decode_steps, decode_tokens)."""

    samples: list[Sample]
    group_size: int
    stats: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def texts(self) -> list[str]:
        """The decoded completions, in sample order."""
        return [s.text for s in self.samples]

    def tensors(self, pad_id: int) -> dict:
        """Right-padded prompt+completion batch for a teacher-forced pass: input_ids, attention_mask,
        position_ids, targets (completion tokens only, aligned to the position predicting them; of a
        multi-turn `Episode`, only the tokens it marks `trained`),
        completion_mask (B, T) and the sampling log-probs at those positions (old_logps)."""
        B = len(self.samples)
        T = max(len(s.prompt_ids) + len(s.completion_ids) for s in self.samples)
        input_ids = torch.full((B, T), pad_id, dtype=torch.long)
        attn = torch.zeros((B, T), dtype=torch.long)
        targets = torch.full((B, T), -100, dtype=torch.long)
        old = torch.zeros((B, T), dtype=torch.float32)
        for i, s in enumerate(self.samples):
            p, c = len(s.prompt_ids), len(s.completion_ids)
            input_ids[i, : p + c] = torch.tensor(s.prompt_ids + s.completion_ids)
            attn[i, : p + c] = 1
            if c:
                comp = torch.tensor(s.completion_ids)
                trained = getattr(s, "trained", None)  # multi-turn: environment tokens are context only
                if trained is not None:
                    comp = comp.masked_fill(~torch.tensor(trained, dtype=torch.bool), -100)
                targets[i, p - 1: p + c - 1] = comp
                old[i, p - 1: p + c - 1] = torch.tensor(s.logprobs)
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        return {"input_ids": input_ids, "attention_mask": attn, "position_ids": pos, "targets": targets,
                "completion_mask": targets != -100, "old_logps": old}


def sample_tokens(logits: torch.Tensor, p: SamplingParams, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Next tokens and their log-probs under softmax(logits / T) (before top-k/top-p truncation)."""
    logits = logits.float()
    if p.temperature <= 0:
        tok = logits.argmax(-1)
        return tok, torch.log_softmax(logits, -1).gather(-1, tok[:, None])[:, 0]
    scaled = logits / p.temperature if p.temperature != 1.0 else logits
    logp = torch.log_softmax(scaled, -1)
    masked = scaled
    if p.top_k and p.top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, p.top_k, dim=-1).values[:, -1:]
        masked = masked.masked_fill(masked < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, idx = torch.sort(masked, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, -1)
        # drop a token when the mass before it already reaches top_p (the top token always stays)
        drop = probs.cumsum(-1) - probs >= p.top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        masked = torch.full_like(masked, float("-inf")).scatter(-1, idx, sorted_logits)
    probs = logp.exp() if masked is scaled else torch.softmax(masked, -1)
    # Inverse-CDF sampling: one uniform per row instead of multinomial's noise over the whole
    # vocabulary (a third of the decode cost on CPU). right=True never lands on a zero-probability
    # token: its CDF value equals its predecessor's, which is found first.
    cdf = probs.cumsum(-1)
    u = torch.rand((cdf.shape[0], 1), generator=gen).to(cdf.device) * cdf[:, -1:]
    tok = torch.searchsorted(cdf, u, right=True)[:, 0].clamp(max=cdf.shape[-1] - 1)
    return tok, logp.gather(-1, tok[:, None])[:, 0]


def _needs_hf_generate(model) -> bool:
    """Prompt/prefix tuning inject virtual tokens in forward; leave those to peft's generate."""
    cfg = getattr(model, "peft_config", None)
    if not cfg:
        return False
    active = getattr(model, "active_adapter", "default")
    pc = cfg.get(active) if isinstance(cfg, dict) else None
    return bool(pc is not None and getattr(pc, "is_prompt_learning", False))


class RolloutEngine:
    """Batched, KV-cached sampling from a causal LM (see the module docstring).

    Holds the tokenizer-derived settings: the ids that end a turn (`stop_token_ids`, default the
    tokenizer's end-of-turn / eos ids) and the pad id. `generate` samples completions."""

    def __init__(self, tokenizer, stop_token_ids: set[int] | None = None):
        self.tok = tokenizer
        self.stop_ids = set(stop_token_ids) if stop_token_ids else end_of_turn_ids(tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.stop_ids)

    def encode(self, prompts: list) -> list[list[int]]:
        """Token ids of each prompt: message lists through the chat template with the generation
        prompt, text as is (see `data.chat.encode_prompt`), token-id lists unchanged."""
        return [list(p) if _is_ids(p) else encode_prompt(self.tok, p) for p in prompts]

    @torch.inference_mode()
    def generate(self, model, prompts: list, params: SamplingParams,
                 on_chunk: Callable[[int], None] | None = None) -> RolloutBatch:
        """prompts: message lists, text, or token-id lists. Samples come grouped by prompt:
        prompt i's n samples are at positions [i*n, (i+1)*n). on_chunk(k) is called after each
        chunk of k prompts (a progress bar's update)."""
        was_training = model.training
        model.eval()
        gen = torch.Generator().manual_seed(params.seed)
        ids = self.encode(prompts)
        samples: list[Sample] = []
        stats = {"prefill_tokens": 0, "decode_steps": 0, "decode_tokens": 0}
        try:
            with post_training_sdpa(next(model.parameters()).device):
                for start in range(0, len(ids), params.batch_size):
                    chunk = ids[start:start + params.batch_size]
                    samples += self._generate_chunk(model, chunk, start, params, gen, stats)
                    if on_chunk is not None:
                        on_chunk(len(chunk))
        finally:
            model.train(was_training)
        return RolloutBatch(samples, params.n, stats)

    def _generate_chunk(self, model, chunk: list[list[int]], offset: int, p: SamplingParams,
                        gen: torch.Generator, stats: dict) -> list[Sample]:
        from transformers import DynamicCache

        if _needs_hf_generate(model):
            return self._hf_generate_chunk(model, chunk, offset, p, gen)
        device = next(model.parameters()).device
        P, n = len(chunk), p.n
        Tp = max(len(x) for x in chunk)
        input_ids = torch.full((P, Tp), self.pad_id, dtype=torch.long)
        attn = torch.zeros((P, Tp), dtype=torch.long)
        for i, x in enumerate(chunk):
            input_ids[i, Tp - len(x):] = torch.tensor(x)
            attn[i, Tp - len(x):] = 1
        input_ids, attn = input_ids.to(device), attn.to(device)
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=getattr(model, "config", None))
        cache_kw = _cache_kwarg(model)
        out = model(input_ids=input_ids, attention_mask=attn, position_ids=pos, use_cache=True, logits_to_keep=1,
                    **{cache_kw: cache})
        stats["prefill_tokens"] += int(attn.sum())
        cache = _out_cache(out)
        logits = out.logits[:, -1]
        # share the prefill (repeat the cache, not the computation) and give each layer room for every
        # token still to come, so decoding writes in place instead of re-concatenating the cache
        _preallocate(cache, n, Tp + p.max_new_tokens)
        if n > 1:
            logits = logits.repeat_interleave(n, 0)
            attn = attn.repeat_interleave(n, 0)
            pos = pos.repeat_interleave(n, 0)
        B = P * n
        next_pos = pos[:, -1] + 1
        live = torch.arange(B, device=device)  # sample index of each batch row
        comp: list[list[int]] = [[] for _ in range(B)]
        lps: list[list[float]] = [[] for _ in range(B)]
        reason: list[str | None] = [None] * B
        stop_ids = torch.tensor(sorted(self.stop_ids), device=device)
        max_stop = max((len(s) for s in p.stop), default=0)  # characters
        for step in range(p.max_new_tokens):
            tok, lp = sample_tokens(logits, p, gen)
            stats["decode_tokens"] += int(tok.numel())
            tok_l, lp_l, live_l = tok.tolist(), lp.tolist(), live.tolist()
            is_eos = torch.isin(tok, stop_ids).tolist()
            keep = []
            for j, b in enumerate(live_l):
                comp[b].append(tok_l[j])
                lps[b].append(lp_l[j])
                if is_eos[j]:
                    reason[b] = "eos"
                elif max_stop and self._hit_stop(comp[b], p.stop, max_stop):
                    reason[b] = "stop"
                elif step + 1 == p.max_new_tokens:
                    reason[b] = "length"
                else:
                    keep.append(j)
            if not keep:
                break
            if len(keep) < len(live_l):  # finished samples leave the batch and the cache
                k = torch.tensor(_fill_holes(keep), device=device)
                cache.batch_select_indices(k)
                live, tok, attn, next_pos = live[k], tok[k], attn[k], next_pos[k]
            attn = torch.cat([attn, attn.new_ones((attn.shape[0], 1))], dim=1)
            out = model(input_ids=tok[:, None], attention_mask=attn, position_ids=next_pos[:, None],
                        use_cache=True, **{cache_kw: cache})
            stats["decode_steps"] += 1
            cache = _out_cache(out)
            logits = out.logits[:, -1]
            next_pos = next_pos + 1
        return [self._finish(offset + b // n, chunk[b // n], comp[b], lps[b], reason[b] or "length", p)
                for b in range(B)]

    def _hit_stop(self, comp: list[int], stops, max_stop: int) -> bool:
        """Whether a stop string appears in the decoded completion. Only its end can be new, so
        only a tail is decoded: a window of tokens grown until its text holds the longest stop
        string plus a guard of characters. A token can carry a fraction of a character (byte-level
        tokenizers split CJK and emoji into up to 4 byte tokens), so the window is counted in
        decoded characters, never assumed from the stop string's length; the guard covers the
        partial character a window can start inside."""
        need = max_stop + _WINDOW_GUARD_CHARS
        w = 4 * max_stop + 8  # enough tokens for most tokenizers at once
        while True:
            tail = self.tok.decode(comp[-w:], skip_special_tokens=False)
            if w >= len(comp) or len(tail) >= need:
                return any(s in tail for s in stops)
            w *= 2

    def _finish(self, pi: int, prompt: list[int], comp: list[int], lps: list[float], reason: str,
                p: SamplingParams) -> Sample:
        body = comp[:-1] if reason == "eos" else comp
        text = self.tok.decode(body, skip_special_tokens=True)
        if reason == "stop":
            cut = min((text.find(s) for s in p.stop if s in text), default=-1)
            if cut >= 0:
                text = text[:cut]
        return Sample(pi, prompt, comp, lps, text, reason)

    def _hf_generate_chunk(self, model, chunk, offset, p: SamplingParams, gen) -> list[Sample]:
        """Fallback for prompt-learning adapters: peft's generate, log-probs from its scores."""
        device = next(model.parameters()).device
        P, Tp = len(chunk), max(len(x) for x in chunk)
        ids = torch.full((P, Tp), self.pad_id, dtype=torch.long)
        attn = torch.zeros((P, Tp), dtype=torch.long)
        for i, x in enumerate(chunk):
            ids[i, Tp - len(x):] = torch.tensor(x)
            attn[i, Tp - len(x):] = 1
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
        kw = dict(do_sample=p.temperature > 0, max_new_tokens=p.max_new_tokens, num_return_sequences=p.n,
                  eos_token_id=sorted(self.stop_ids), pad_token_id=self.pad_id, output_scores=True,
                  return_dict_in_generate=True)
        if p.temperature > 0:
            kw.update(temperature=p.temperature, top_p=p.top_p, top_k=p.top_k or 0)
        with warnings.catch_warnings():
            # peft's generate passes position ids it then ignores (virtual tokens shift them): not the user's concern
            warnings.filterwarnings("ignore", message="Position ids are not supported", category=UserWarning)
            res = model.generate(input_ids=ids.to(device), attention_mask=attn.to(device), **kw)
        seqs = res.sequences[:, Tp:]
        out = []
        for b in range(seqs.shape[0]):
            row = seqs[b].tolist()
            cut = next((k + 1 for k, t in enumerate(row) if t in self.stop_ids), len(row))
            comp = row[:cut]
            reason = "eos" if comp and comp[-1] in self.stop_ids else "length"
            if p.stop and reason != "eos":  # stop strings, as the engine applies them token by token
                max_stop = max(len(s) for s in p.stop)
                end = next((k for k in range(1, len(comp) + 1) if self._hit_stop(comp[:k], p.stop, max_stop)), None)
                if end is not None:
                    comp, reason = comp[:end], "stop"
            lps = [float(torch.log_softmax(res.scores[k][b].float(), -1)[t]) for k, t in enumerate(comp)]
            out.append(self._finish(offset + b // p.n, chunk[b // p.n], comp, lps, reason, p))
        return out


# Characters of decoded text ahead of the longest stop string in the window `_hit_stop` decodes:
# the window's first token may start inside a character and decode to replacement characters.
_WINDOW_GUARD_CHARS = 4


@functools.cache
def _cache_renamed() -> bool:
    """Whether this transformers names the KV cache `cache` (its forward and outputs), as
    transformers 5.x does, where `past_key_values` still works but emits a FutureWarning."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    return "cache" in getattr(CausalLMOutputWithPast, "__dataclass_fields__", {})


def _cache_kwarg(model) -> str:
    """The forward keyword that takes the KV cache for this model: the name its own forward
    declares (a model from the hub may predate the rename), else this transformers' name."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        params = inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        params = {}
    if "cache" in params:
        return "cache"
    if "past_key_values" in params:
        return "past_key_values"
    return "cache" if _cache_renamed() else "past_key_values"


def _out_cache(out):
    """The KV cache a forward returned, under either name, without touching a deprecated one."""
    cache = getattr(out, "cache", None) if _cache_renamed() else None
    return cache if cache is not None else out.past_key_values


@functools.cache
def _preallocated_layer_class():
    from transformers.cache_utils import DynamicLayer

    class PreallocatedLayer(DynamicLayer):
        """A cache layer whose keys and values live in buffers sized for prompt + max_new_tokens.

        DynamicLayer grows with torch.cat, a copy of the whole layer cache at every decoded token;
        here a token is one in-place write, and `keys`/`values` are views of the filled part."""

        def __init__(self, keys: torch.Tensor, values: torch.Tensor, n: int, capacity: int):
            super().__init__()
            self.dtype, self.device = keys.dtype, keys.device
            self.is_initialized = True
            self._k, self._v = _repeat_into(keys, n, capacity), _repeat_into(values, n, capacity)
            self._len = keys.shape[-2]
            self._views()

        def _views(self) -> None:
            self.keys = self._k[:, :, : self._len]
            self.values = self._v[:, :, : self._len]

        def update(self, key_states, value_states, *args, **kwargs):
            end = self._len + key_states.shape[-2]
            if end > self._k.shape[-2]:  # more tokens than planned: grow
                extra = end - self._k.shape[-2]
                self._k = torch.cat([self._k, self._k.new_empty(self._k.shape[:2] + (extra,) + self._k.shape[3:])], -2)
                self._v = torch.cat([self._v, self._v.new_empty(self._v.shape[:2] + (extra,) + self._v.shape[3:])], -2)
            self._k[:, :, self._len:end].copy_(key_states)
            self._v[:, :, self._len:end].copy_(value_states)
            self._len = end
            self._views()
            return self.keys, self.values

        def get_seq_length(self) -> int:
            return self._len

        def crop(self, tokens_to_remove: int) -> None:
            if tokens_to_remove > 0:
                raise ValueError("crop takes a negative number of tokens to remove")
            self._len = max(0, self._len + tokens_to_remove)
            self._views()

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            n = len(indices)
            idx = indices.to(self._k.device)
            moved = (idx != torch.arange(n, device=idx.device)).nonzero()[:, 0]
            if bool((idx[moved] >= n).all()):  # rows from beyond the new size fill the holes: copy just those
                if len(moved):
                    self._k[moved, :, : self._len] = self._k[idx[moved], :, : self._len]
                    self._v[moved, :, : self._len] = self._v[idx[moved], :, : self._len]
                self._k, self._v = self._k[:n], self._v[:n]
                self._views()
                return
            # any other order: a new buffer with the filled part of the kept rows
            k = self._k.new_empty((len(indices),) + self._k.shape[1:])
            v = self._v.new_empty((len(indices),) + self._v.shape[1:])
            k[:, :, : self._len] = self.keys[indices]
            v[:, :, : self._len] = self.values[indices]
            self._k, self._v = k, v
            self._views()

        def batch_repeat_interleave(self, repeats: int) -> None:
            self._k = self._k.repeat_interleave(repeats, 0)
            self._v = self._v.repeat_interleave(repeats, 0)
            self._views()

        def reset(self) -> None:
            self._len = 0
            self._views()

    return PreallocatedLayer


def _fill_holes(keep: list[int]) -> list[int]:
    """The new row order when only the rows `keep` (ascending) stay: a kept row below the new size
    stays where it is, and each freed row there takes a kept row from beyond it. A cache then
    compacts by copying a few rows (as many as finished) instead of shifting every row after the
    first finished one."""
    n, kept = len(keep), set(keep)
    order = list(range(n))
    for hole, row in zip((i for i in range(n) if i not in kept), (i for i in keep if i >= n)):
        order[hole] = row
    return order


def _repeat_into(x: torch.Tensor, n: int, capacity: int) -> torch.Tensor:
    """(B, H, T, D) -> a (B*n, H, capacity, D) buffer whose first T positions hold each row n times."""
    B, H, T, D = x.shape
    buf = x.new_empty((B, n, H, max(capacity, T), D))
    buf[:, :, :, :T] = x[:, None]
    return buf.view(B * n, H, -1, D)


def _preallocate(cache, n: int, capacity: int) -> None:
    """Repeat each prompt's prefilled cache n times into preallocated layers. Only plain dynamic
    layers are converted; others (sliding windows, quantized, ...) keep their own update rules."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    for i, layer in enumerate(layers or []):
        if type(layer) is DynamicLayer and layer.is_initialized and layer.keys is not None and layer.keys.dim() == 4:
            layers[i] = _preallocated_layer_class()(layer.keys, layer.values, n, capacity)
        elif n > 1:
            layer.batch_repeat_interleave(n)
    if layers is None and n > 1:
        cache.batch_repeat_interleave(n)


def _is_ids(p) -> bool:
    return isinstance(p, (list, tuple)) and len(p) > 0 and isinstance(p[0], int)
