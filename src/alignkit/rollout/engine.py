"""Batched KV-cached sampling for RL rollouts and evaluation.

One call samples `n` completions for each of a list of prompts:

1. The prompts are left-padded into one batch and *prefilled once*; only the last position's
   logits are computed. The prefilled cache is then repeated `n` times along the batch, so the
   `n` samples of a prompt share its prefill instead of recomputing it (as
   `generate(num_return_sequences=n)` does on an expanded batch).
2. Each decode step feeds one token per live sample. A sample stops at an end-of-turn/eos token,
   at a stop string, or at `max_new_tokens`; finished samples are dropped from the batch and
   from the cache, so they stop costing compute.
3. For every generated token the engine returns the log-probability under the distribution it
   sampled from before truncation: log softmax(logits / temperature) (temperature 1 for greedy).
   A trainer recomputing log-probs with the same temperature on the same tokens gets the same
   numbers up to float noise; the gap is measured (`logprob_mismatch`), never assumed zero.

Randomness comes from one `torch.Generator` seeded per call, so a seed gives the same samples.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from alignkit.data.chat import encode_prompt, end_of_turn_ids


@dataclass
class SamplingParams:
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
    prompt_index: int
    prompt_ids: list[int]
    completion_ids: list[int]
    logprobs: list[float]
    text: str
    finish_reason: str  # "eos" | "stop" | "length"


@dataclass
class RolloutBatch:
    samples: list[Sample]
    group_size: int
    stats: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def texts(self) -> list[str]:
        return [s.text for s in self.samples]

    def tensors(self, pad_id: int) -> dict:
        """Right-padded prompt+completion batch for a teacher-forced pass: input_ids, attention_mask,
        position_ids, targets (completion tokens only, aligned to the position predicting them),
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
                targets[i, p - 1: p + c - 1] = torch.tensor(s.completion_ids)
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
    """Holds the tokenizer-derived settings; `generate` samples completions."""

    def __init__(self, tokenizer, stop_token_ids: set[int] | None = None):
        self.tok = tokenizer
        self.stop_ids = set(stop_token_ids) if stop_token_ids else end_of_turn_ids(tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.stop_ids)

    def encode(self, prompts: list) -> list[list[int]]:
        return [list(p) if _is_ids(p) else encode_prompt(self.tok, p) for p in prompts]

    @torch.inference_mode()
    def generate(self, model, prompts: list, params: SamplingParams) -> RolloutBatch:
        """prompts: message lists, text, or token-id lists. Samples come grouped by prompt:
        prompt i's n samples are at positions [i*n, (i+1)*n)."""
        was_training = model.training
        model.eval()
        gen = torch.Generator().manual_seed(params.seed)
        ids = self.encode(prompts)
        samples: list[Sample] = []
        stats = {"prefill_tokens": 0, "decode_steps": 0, "decode_tokens": 0}
        try:
            for start in range(0, len(ids), params.batch_size):
                chunk = ids[start:start + params.batch_size]
                samples += self._generate_chunk(model, chunk, start, params, gen, stats)
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
        out = model(input_ids=input_ids, attention_mask=attn, position_ids=pos, past_key_values=cache,
                    use_cache=True, logits_to_keep=1)
        stats["prefill_tokens"] += int(attn.sum())
        cache = out.past_key_values
        logits = out.logits[:, -1]
        if n > 1:  # share the prefill: repeat the cache, not the computation
            cache.batch_repeat_interleave(n)
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
        max_stop = max((len(s) for s in p.stop), default=0)
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
                k = torch.tensor(keep, device=device)
                cache.batch_select_indices(k)
                live, tok, attn, next_pos = live[k], tok[k], attn[k], next_pos[k]
            attn = torch.cat([attn, attn.new_ones((attn.shape[0], 1))], dim=1)
            out = model(input_ids=tok[:, None], attention_mask=attn, position_ids=next_pos[:, None],
                        past_key_values=cache, use_cache=True)
            stats["decode_steps"] += 1
            cache = out.past_key_values
            logits = out.logits[:, -1]
            next_pos = next_pos + 1
        return [self._finish(offset + b // n, chunk[b // n], comp[b], lps[b], reason[b] or "length", p)
                for b in range(B)]

    def _hit_stop(self, comp: list[int], stops, max_stop: int) -> bool:
        tail = self.tok.decode(comp[-(max_stop + 8):], skip_special_tokens=False)
        return any(s in tail for s in stops)

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
        res = model.generate(input_ids=ids.to(device), attention_mask=attn.to(device), **kw)
        seqs = res.sequences[:, Tp:]
        out = []
        for b in range(seqs.shape[0]):
            row = seqs[b].tolist()
            cut = next((k + 1 for k, t in enumerate(row) if t in self.stop_ids), len(row))
            comp = row[:cut]
            lps = [float(torch.log_softmax(res.scores[k][b].float(), -1)[t]) for k, t in enumerate(comp)]
            reason = "eos" if comp and comp[-1] in self.stop_ids else "length"
            out.append(self._finish(offset + b // p.n, chunk[b // p.n], comp, lps, reason, p))
        return out


def _is_ids(p) -> bool:
    return isinstance(p, (list, tuple)) and len(p) > 0 and isinstance(p[0], int)
