"""Chat templates and loss masks.

A conversation is rendered with the tokenizer's own chat template (or a configured one) and
cut into segments at the assistant-turn boundaries: the text up to and including the
generation prompt is context, the assistant's text up to and including its end-of-turn token
is trained. Each segment is tokenized on its own and the ids are concatenated, so the
context tokens are exactly what the model sees at generation time (the generation prompt
tokenized alone) and the mask boundary can never drift by a re-tokenisation at the join.

End of a turn: exactly one end token is trained per answer. Text that already ends in the
tokenizer's eos (or the template's end-of-turn token) gets no second one, and for a tokenizer
without a chat template the built-in template closes turns with the tokenizer's eos, the token
generation stops on.

Templates that re-render history (reasoning templates in the Qwen3 style drop the `<think>`
block of every assistant turn before the last user turn) cannot be cut into one row: the
context of turn 2 is not a prefix of the text that trained turn 1. Such a conversation becomes
one row per trained assistant turn, each with exactly its own generation-time context
(`encode_conversation`); a conversation that trains only its last turn stays one row.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from alignkit.errors import UserError

# Used only when the tokenizer has no chat template and none is configured (a base model). Each
# turn ends with the tokenizer's eos, so the token trained at the end of an answer is the one
# generation stops on; a `<|im_end|>` that is not in the vocabulary would be trained as plain
# characters and the model would never stop. `<|im_end|>` is used only without an eos.
DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token if bos_token else '' }}"
    "{% for m in messages %}"
    "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + (eos_token if eos_token else '<|im_end|>') + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
DEFAULT_END_OF_TURN = "<|im_end|>"


def setup_chat_template(tokenizer, template: str | None = None) -> str | None:
    """Give the tokenizer a chat template: `template` (text or a file path) if given, its own
    otherwise, or the built-in ChatML-style default, whose turns end with the tokenizer's eos.
    Returns a one-line note for the run log when the built-in default was chosen, else None."""
    if template:
        p = Path(template)
        if len(template) < 4096 and "{" not in template:
            if not p.is_file():
                raise UserError(f"chat_template: {template} is neither a Jinja template nor an existing file")
            template = p.read_text(encoding="utf-8")
        tokenizer.chat_template = template
    elif not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
        end = tokenizer.eos_token or DEFAULT_END_OF_TURN
        return (f"chat template: the tokenizer has none; using the built-in ChatML-style template, "
                f"assistant turns end with {end!r} (the token generation stops on)")
    return None


def template_end_of_turn_id(tokenizer) -> int | None:
    """The single special token the chat template writes right after an assistant's content
    (`<|eot_id|>`, `<|im_end|>`, ...), found by rendering a probe conversation; None when the
    template writes plain text there or there is no template. Cached per template."""
    tmpl = getattr(tokenizer, "chat_template", None)
    if not tmpl:
        return None
    cached = getattr(tokenizer, "_alignkit_eot_probe", None)
    if cached is not None and cached[0] == tmpl:
        return cached[1]
    found = None
    marker = "Zq7x"
    try:
        text = _render(tokenizer, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}],
                       add_generation_prompt=False)
    except Exception:  # a template that refuses the probe: fall back to known names
        text = ""
    k = text.rfind(marker)
    if k >= 0:
        after = _tok(tokenizer, text[k + len(marker):])
        special = set(getattr(tokenizer, "all_special_ids", []) or [])
        special |= set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
        if after and after[0] in special:
            found = int(after[0])
    try:
        tokenizer._alignkit_eot_probe = (tmpl, found)
    except AttributeError:
        pass
    return found


def end_of_turn_ids(tokenizer) -> set[int]:
    """Token ids that end an assistant turn: eos, the template's end marker (found by rendering a
    probe conversation), and known end markers that are single tokens of this vocabulary."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    probe = template_end_of_turn_id(tokenizer)
    if probe is not None:
        ids.add(probe)
    for tok in (DEFAULT_END_OF_TURN, "<|end|>", "<|eot_id|>", "<|im_end|>", "<end_of_turn>"):
        tid = tokenizer.convert_tokens_to_ids(tok)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid is not None and tid >= 0:
            # only when it is a real single token of this vocabulary
            if tokenizer.convert_ids_to_tokens(tid) == tok:
                ids.add(tid)
    return ids


def stop_token_ids(tokenizer) -> list[int]:
    """The ids generation must stop on, in order: the template's end-of-turn token first, then
    the tokenizer's eos, then other known end markers of the vocabulary. This is the list saved
    as `eos_token_id` in generation_config.json so plain `transformers` generation stops where
    the model was trained to end a turn (Llama-3 style: `<|eot_id|>` ends a turn while eos is
    `<|end_of_text|>`)."""
    out: list[int] = []
    for t in (template_end_of_turn_id(tokenizer), tokenizer.eos_token_id, *sorted(end_of_turn_ids(tokenizer))):
        if t is not None and int(t) not in out:
            out.append(int(t))
    return out


@dataclass
class Encoded:
    """One tokenised row: `input_ids` (T,) and `labels` (T,), where labels[t] = input_ids[t] for a
    trained token and -100 otherwise (prompt, system and user turns, template markup). Labels are
    not shifted: the collators (`data.collate`) shift them into next-token targets per document.
    `extra`: the row's other columns, carried along for rewards and logging."""

    input_ids: list[int]
    labels: list[int]  # labels[t] = input_ids[t] when token t is trained, else -100
    extra: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def n_trained(self) -> int:
        """Number of tokens that carry loss once shifted into targets (labels[1:] != -100)."""
        # position 0 is never a target: nothing precedes it
        return sum(1 for x in self.labels[1:] if x != -100)


def _render(tokenizer, messages, add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _tok(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def render_prompt(tokenizer, messages: list[dict]) -> str:
    """The text a model is given to answer `messages` (template + generation prompt)."""
    return _render(tokenizer, messages, add_generation_prompt=True)


def encode_prompt(tokenizer, prompt) -> list[int]:
    """Token ids of a prompt (messages through the template, or plain text with bos)."""
    if isinstance(prompt, str):
        return bos_ids(tokenizer) + _tok(tokenizer, prompt)
    return _tok(tokenizer, render_prompt(tokenizer, prompt))


def bos_ids(tokenizer) -> list[int]:
    """[bos] when the tokenizer normally starts text with it (as it would with add_special_tokens)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return []
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    return [bos] if probe and probe[0] == bos else []


def _trim_after_end(tokenizer, ids: list[int], eot: set[int]) -> int:
    """Number of leading answer tokens to train: up to and including the first end-of-turn token.
    Template text after it (a newline, say) is never generated, so it is not trained."""
    for i, t in enumerate(ids):
        if t in eot:
            return i + 1
    return len(ids)


class TemplateNotPrefixStable(UserError):
    """The template renders an earlier turn differently once later turns exist (reasoning
    templates), so one row cannot hold every turn with its exact generation-time context."""


def _end_texts(tokenizer) -> list[str]:
    """Texts of the tokens that end a turn (eos, the template's end-of-turn token)."""
    out = []
    for t in (tokenizer.eos_token, _token_text(tokenizer, template_end_of_turn_id(tokenizer))):
        if t and t not in out:
            out.append(t)
    return out


def _token_text(tokenizer, tid: int | None) -> str | None:
    if tid is None:
        return None
    return tokenizer.convert_ids_to_tokens(tid)


def strip_end_token(tokenizer, text: str) -> str:
    """`text` without a trailing end token written into the data ("Paris.</s>"): the encoder adds
    exactly one end token itself, so keeping it would train the end twice. Whitespace after the
    end token is dropped with it (nothing is generated after the end)."""
    ends = _end_texts(tokenizer)
    while True:
        t = text.rstrip()
        hit = next((e for e in ends if t.endswith(e)), None)
        if hit is None:
            return text
        text = t[: -len(hit)]


def _clean_messages(tokenizer, messages: list[dict]) -> list[dict]:
    out = []
    for m in messages:
        if m.get("role") == "assistant" and isinstance(m.get("content"), str):
            c = strip_end_token(tokenizer, m["content"])
            if c != m["content"]:
                m = {**m, "content": c}
        out.append(m)
    return out


def encode_messages(tokenizer, messages: list[dict], train_from: int = 0, train_on_prompt: bool = False) -> Encoded:
    """Tokenize a conversation into one row; assistant turns at index >= `train_from` are trained
    (each up to and including its end-of-turn token). Raises TemplateNotPrefixStable (a UserError)
    when the template re-renders history; `encode_conversation` handles those templates."""
    messages = _clean_messages(tokenizer, messages)
    eot = end_of_turn_ids(tokenizer)
    ids: list[int] = []
    labels: list[int] = []
    done = ""  # text already turned into tokens
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = _render(tokenizer, messages[:i], add_generation_prompt=True)
        full = _render(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if not prefix.startswith(done) or not full.startswith(prefix):
            raise TemplateNotPrefixStable(
                "the chat template does not render conversations prefix by prefix, so the loss mask "
                "cannot be placed exactly; set chat_template= to a template that renders each turn in order"
            )
        ctx = _tok(tokenizer, prefix[len(done):])
        ans = _tok(tokenizer, full[len(prefix):])
        ids += ctx
        labels += ctx if train_on_prompt else [-100] * len(ctx)
        trained = i >= train_from
        n = _trim_after_end(tokenizer, ans, eot) if trained else 0
        ids += ans
        labels += ans[:n] + [-100] * (len(ans) - n)
        done = full
    rest = _render(tokenizer, messages, add_generation_prompt=False)
    if rest.startswith(done) and len(rest) > len(done):
        tail = _tok(tokenizer, rest[len(done):])
        ids += tail
        labels += tail if train_on_prompt else [-100] * len(tail)
    return Encoded(ids, labels)


def encode_turn(tokenizer, messages: list[dict], i: int, train_on_prompt: bool = False) -> Encoded:
    """One row training assistant turn `i` of `messages` alone: context = the template's rendering
    of messages[:i] with the generation prompt (what the model is given at generation time), then
    the text turn i adds, trained up to and including its end-of-turn token."""
    messages = _clean_messages(tokenizer, messages)
    prefix = _render(tokenizer, messages[:i], add_generation_prompt=True)
    full = _render(tokenizer, messages[: i + 1], add_generation_prompt=False)
    if not full.startswith(prefix):
        raise UserError(
            "the chat template renders an assistant turn in a way that does not start with its own "
            "generation prompt, so the loss mask cannot be placed; set chat_template= to a template "
            "whose add_generation_prompt text begins each assistant turn"
        )
    ctx = _tok(tokenizer, prefix)
    ans = _tok(tokenizer, full[len(prefix):])
    n = _trim_after_end(tokenizer, ans, end_of_turn_ids(tokenizer))
    return Encoded(ctx + ans, (ctx if train_on_prompt else [-100] * len(ctx)) + ans[:n] + [-100] * (len(ans) - n))


def encode_conversation(tokenizer, messages: list[dict], train_from: int = 0,
                        train_on_prompt: bool = False) -> list[Encoded]:
    """Rows that train the assistant turns at index >= `train_from`.

    Rule: a template that renders conversations prefix by prefix gives one row holding every
    turn (`encode_messages`). A template that re-renders history (Qwen3-style reasoning templates
    drop earlier `<think>` blocks) gives one row per trained assistant turn, each with its own
    generation-time context (`encode_turn`): turn k is trained exactly as the model produces it
    when asked with the first k-1 turns. When only the last turn is trained (prompt/completion
    rows) that is one row: template(prompt, add_generation_prompt=True) + completion."""
    try:
        return [encode_messages(tokenizer, messages, train_from, train_on_prompt)]
    except TemplateNotPrefixStable:
        pass
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant" and i >= train_from]
    return [encode_turn(tokenizer, messages, i, train_on_prompt) for i in turns]


def encode_prompt_completion(tokenizer, prompt, completion, train_on_prompt: bool = False) -> Encoded:
    """`prompt` + `completion`: message lists go through the chat template (only the completion's
    assistant turns trained); plain strings are concatenated, with bos before and exactly one eos
    after (a completion that already ends in the eos text keeps just that one)."""
    if isinstance(prompt, list) or isinstance(completion, list):
        if not (isinstance(prompt, list) and isinstance(completion, list)):
            raise UserError("prompt and completion must both be text or both be message lists")
        rows = encode_conversation(tokenizer, prompt + completion, train_from=len(prompt),
                                   train_on_prompt=train_on_prompt)
        if len(rows) != 1:
            raise UserError(
                "the completion holds several assistant turns and the chat template re-renders history "
                "(a reasoning template), so they cannot share one row; put one assistant turn in "
                "'completion' and the earlier ones in 'prompt'"
            )
        return rows[0]
    p = bos_ids(tokenizer) + _tok(tokenizer, prompt)
    c = _with_eos(tokenizer, _tok(tokenizer, strip_end_token(tokenizer, completion)))
    return Encoded(p + c, (p if train_on_prompt else [-100] * len(p)) + c)


def _with_eos(tokenizer, ids: list[int]) -> list[int]:
    eos = tokenizer.eos_token_id
    if eos is None or (ids and ids[-1] == eos):
        return ids
    return ids + [eos]


def encode_text(tokenizer, text: str) -> Encoded:
    """Plain `text` row: bos (when the tokenizer has one) + text + exactly one eos (when it has
    one; a text that already ends in the eos text keeps just that one); every token is trained
    (continued pretraining). No chat template is applied."""
    ids = _with_eos(tokenizer, bos_ids(tokenizer) + _tok(tokenizer, strip_end_token(tokenizer, text)))
    return Encoded(ids, list(ids))
