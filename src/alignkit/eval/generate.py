"""Batched generation for evaluation through `transformers.generate` (left padding).

The RL recipes use the rollout engine; evaluation only needs completions, greedy or sampled."""

from __future__ import annotations

import torch

from alignkit.data.chat import encode_prompt, end_of_turn_ids


@torch.no_grad()
def generate_texts(model, tokenizer, prompts: list, max_new_tokens: int = 64, batch_size: int = 32,
                   temperature: float = 0.0, top_p: float = 1.0, seed: int = 0) -> list[str]:
    """Completions (text, special tokens dropped) for prompts given as message lists or text."""
    model.eval()
    device = next(model.parameters()).device
    stop = sorted(end_of_turn_ids(tokenizer))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop[0]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    out: list[str] = []
    encoded = [encode_prompt(tokenizer, p) for p in prompts]
    for i in range(0, len(encoded), batch_size):
        chunk = encoded[i:i + batch_size]
        T = max(len(x) for x in chunk)
        ids = torch.full((len(chunk), T), pad, dtype=torch.long)
        attn = torch.zeros((len(chunk), T), dtype=torch.long)
        for j, x in enumerate(chunk):
            ids[j, T - len(x):] = torch.tensor(x)
            attn[j, T - len(x):] = 1
        kwargs = dict(max_new_tokens=max_new_tokens, eos_token_id=stop, pad_token_id=pad)
        if temperature > 0:
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
            kwargs.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
        else:
            kwargs.update(do_sample=False)
        res = model.generate(input_ids=ids.to(device), attention_mask=attn.to(device), **kwargs)
        for row in res[:, T:].tolist():
            cut = next((k for k, t in enumerate(row) if t in stop), len(row))
            out.append(tokenizer.decode(row[:cut], skip_special_tokens=True))
    return out
