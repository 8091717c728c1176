"""In-context prompting modes for evaluation, so prompting can be compared with fine-tuning.

    zero_shot  the prompt as it is
    few_shot   k worked examples drawn from a pool, then the prompt; layout `chat` (alternating
               user / assistant turns) or `plain` (one text block: question, answer, blank line)
    cot        the prompt plus a chain-of-thought instruction; the answer is read from the
               completion's last non-empty line
    reflect    zero-shot first turn, then a second user turn asking the model to check and
               correct its answer; the second answer's last non-empty line is scored

A prompt is a message list (chat) or plain text; every builder returns the same kind it is
given. Few-shot draws are seeded per (seed, prompt index), so a run is reproducible and each
prompt gets its own examples; an example whose question equals the prompt's is never drawn.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from alignkit.data.loading import check_messages, load_rows
from alignkit.errors import UserError

MODES = ("zero_shot", "few_shot", "cot", "reflect")
# Modes whose answer is read from the last non-empty line of the (final) completion.
FINAL_LINE_MODES = ("cot", "reflect")


@dataclass(frozen=True)
class Example:
    prompt: object  # message list (no assistant turn at the end) or text
    answer: str


def prompt_text(prompt) -> str:
    """The question of a prompt as text: the text itself, or the last user message's content."""
    if isinstance(prompt, str):
        return prompt
    users = [m["content"] for m in prompt if m["role"] == "user"]
    return users[-1] if users else (prompt[-1]["content"] if prompt else "")


def load_pool(path: str, prompt_column: str = "prompt", chat: bool = True) -> list[Example]:
    """Worked examples for few-shot prompting. Rows are `messages` (the last assistant message is
    the answer, the turns before it the question), or `<prompt_column>` with a `completion` or
    `answer` column (text, or an assistant message list)."""
    ds = load_rows(path, "train", "few_shot_pool")
    cols = ds.column_names
    if "messages" in cols:
        kind = "messages"
    elif prompt_column in cols and ("completion" in cols or "answer" in cols):
        kind = "completion" if "completion" in cols else "answer"
    else:
        raise UserError(f"{path}: few-shot pool rows need `messages`, or `{prompt_column}` with `completion` or "
                        f"`answer` (found: {', '.join(cols)})")
    pool = []
    for i, row in enumerate(ds):
        where = f"{path} row {i + 1}"
        if kind == "messages":
            msgs = check_messages(row["messages"], where)
            last = max(j for j, m in enumerate(msgs) if m["role"] == "assistant")
            prompt = msgs[:last]
            if not any(m["role"] == "user" for m in prompt):
                raise UserError(f"{where}: no user message before the answer")
            pool.append(Example(prompt if chat else prompt_text(prompt), msgs[last]["content"]))
            continue
        p, a = row[prompt_column], row[kind]
        if isinstance(a, list):
            a = check_messages(a, f"{where} '{kind}'")
            a = "\n".join(m["content"] for m in a if m["role"] == "assistant")
        if not isinstance(a, str) or not a.strip():
            raise UserError(f"{where}: '{kind}' must be non-empty text")
        if isinstance(p, list):
            p = check_messages(p, f"{where} '{prompt_column}'", need_assistant=False)
            p = p if chat else prompt_text(p)
        elif isinstance(p, str) and p.strip():
            p = [{"role": "user", "content": p}] if chat else p
        else:
            raise UserError(f"{where}: '{prompt_column}' must be text or a message list")
        pool.append(Example(p, a))
    return pool


def draw_examples(pool: list[Example], k: int, seed: int, index: int, query=None) -> list[Example]:
    """k distinct examples for prompt number `index`, seeded by (seed, index); examples whose
    question equals the query's are left out."""
    q = prompt_text(query).strip() if query is not None else None
    cands = [e for e in pool if q is None or prompt_text(e.prompt).strip() != q]
    if len(cands) < k:
        raise UserError(f"the few-shot pool has {len(cands)} usable examples, fewer than few_shot_k={k}; add examples "
                        f"or lower few_shot_k")
    rng = random.Random(f"alignkit-few-shot/{seed}/{index}")
    return rng.sample(cands, k)


def _split_system(msgs: list[dict]) -> tuple[list[dict], list[dict]]:
    n = 0
    while n < len(msgs) and msgs[n]["role"] == "system":
        n += 1
    return msgs[:n], msgs[n:]


def few_shot_prompt(prompt, examples: list[Example], layout: str = "chat"):
    """The prompt preceded by worked examples.

    chat:  [system...] user(q1) assistant(a1) ... user(qk) assistant(ak) [the prompt's turns]
    plain: one block "q1\\na1\\n\\n...qk\\nak\\n\\n" + question, as the last user message's content
           (message prompts) or as the text (text prompts)."""
    if layout == "chat":
        if isinstance(prompt, str):
            raise UserError("few_shot_layout=chat needs chat prompts; set chat_prompts=true or few_shot_layout=plain")
        system, rest = _split_system(prompt)
        turns: list[dict] = []
        for e in examples:
            ex = e.prompt if isinstance(e.prompt, list) else [{"role": "user", "content": e.prompt}]
            turns += _split_system(ex)[1] + [{"role": "assistant", "content": e.answer}]
        return system + turns + rest
    if layout != "plain":
        raise ValueError(f"unknown few-shot layout {layout!r}")
    block = "".join(f"{prompt_text(e.prompt)}\n{e.answer}\n\n" for e in examples)
    return _edit_last_user(prompt, lambda c: block + c)


def _edit_last_user(prompt, fn):
    if isinstance(prompt, str):
        return fn(prompt)
    out = [dict(m) for m in prompt]
    for m in reversed(out):
        if m["role"] == "user":
            m["content"] = fn(m["content"])
            return out
    out.append({"role": "user", "content": fn("")})
    return out


def cot_prompt(prompt, instruction: str):
    """The prompt with the chain-of-thought instruction after the (last user) question."""
    return _edit_last_user(prompt, lambda c: f"{c.rstrip()}\n\n{instruction}" if c else instruction)


def reflect_prompt(prompt, first_answer: str, instruction: str):
    """The second turn of reflect mode: prompt, the model's first answer, then the instruction."""
    if isinstance(prompt, str):
        return f"{prompt}{first_answer}\n{instruction}\n"
    return list(prompt) + [{"role": "assistant", "content": first_answer}, {"role": "user", "content": instruction}]


def final_answer(text: str) -> str:
    """The last non-empty line of a completion (stripped): where cot / reflect answers are read."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def build_prompts(prompts: list, mode: str, *, pool: list[Example] | None = None, k: int = 3,
                  layout: str = "chat", seed: int = 0, cot_instruction: str = "") -> list:
    """The first-turn prompts of a mode (reflect: the zero-shot prompts; its second turn is built
    from the answers with `reflect_prompt`)."""
    if mode in ("zero_shot", "reflect"):
        return list(prompts)
    if mode == "few_shot":
        if not pool:
            raise UserError("mode few_shot needs few_shot_pool=FILE with worked examples")
        return [few_shot_prompt(p, draw_examples(pool, k, seed, i, p), layout) for i, p in enumerate(prompts)]
    if mode == "cot":
        return [cot_prompt(p, cot_instruction) for p in prompts]
    raise UserError(f"unknown mode '{mode}'; choose one of {', '.join(MODES)}")
