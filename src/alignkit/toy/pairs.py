"""Toy preference pairs from a model's own mistakes (the demo's `pairs_onpolicy` data).

Sits in the application layer with the rest of `alignkit.toy` except `world` and `tokenizer`:
it samples from a trained model (eval) and scores with the toy world's rule.
"""

from __future__ import annotations

from alignkit.eval.generate import generate_texts
from alignkit.models import load_model, load_tokenizer
from alignkit.toy import world

__all__ = ["onpolicy_pairs"]


def onpolicy_pairs(model_dir: str, prompts: list[dict], samples: int = 1, temperature: float = 1.0,
                   seed: int = 0, max_new_tokens: int = 24, stats: dict | None = None) -> list[dict]:
    """Preference rows from the model's own mistakes on toy prompts.

    For each of `samples` rounds, the model in `model_dir` writes one completion per prompt at
    `temperature` (sampling seed `seed * 1000 + round`). Every completion that is not fully right
    (`world.score(...)["reward"] < world.CORRECT_REWARD`: wrong total or wrong format) becomes the
    rejected answer of a row whose chosen answer is the prompt's reference answer.

    prompts: toy prompt rows (`world.prompt_rows`) with `prompt`, `answer` and `total`.
    Returns rows {prompt, chosen, rejected, total} (chosen / rejected as one assistant message);
    no row for a prompt the model got right. stats: if given, gets `generated_tokens`, the answer
    tokens sampled (kept or not; each answer re-tokenized, plus its stop token when it stopped
    before max_new_tokens). Errors: UserError when `model_dir` is not a model."""
    tok = load_tokenizer(model_dir)
    model = load_model(model_dir)
    rows = []
    for s in range(samples):
        texts = generate_texts(model, tok, [p["prompt"] for p in prompts], max_new_tokens=max_new_tokens,
                               batch_size=64, temperature=temperature, seed=seed * 1000 + s)
        if stats is not None:
            n = [len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts]
            stats["generated_tokens"] = stats.get("generated_tokens", 0) + sum(
                k + 1 if k < max_new_tokens else k for k in n)
        for p, text in zip(prompts, texts):
            if world.score(text, p["total"])["reward"] < world.CORRECT_REWARD:
                rows.append({"prompt": p["prompt"], "chosen": [{"role": "assistant", "content": p["answer"]}],
                             "rejected": [{"role": "assistant", "content": text}], "total": p["total"]})
    return rows
