"""Chat templates and loss masks.

A conversation is rendered with the tokenizer's own chat template (or a configured one) and
cut into segments at the assistant-turn boundaries: the text up to and including the
generation prompt is context, the assistant's text up to and including its end-of-turn token
is trained. Each segment is tokenized on its own and the ids are concatenated, so the
context tokens are exactly what the model sees at generation time (the generation prompt
tokenized alone) and the mask boundary can never drift by a re-tokenisation at the join.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from alignkit.errors import UserError

# Used only when the tokenizer has no chat template and none is configured.
DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token if bos_token else '' }}"
    "{% for m in messages %}"
    "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
DEFAULT_END_OF_TURN = "<|im_end|>"


def setup_chat_template(tokenizer, template: str | None = None) -> None:
    """Give the tokenizer a chat template: `template` (text or a file path) if given, its own
    otherwise, or the built-in ChatML-style default."""
    if template:
        p = Path(template)
        if len(template) < 4096 and "{" not in template:
            if not p.is_file():
                raise UserError(f"chat_template: {template} is neither a Jinja template nor an existing file")
            template = p.read_text(encoding="utf-8")
        tokenizer.chat_template = template
    elif not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE


def end_of_turn_ids(tokenizer) -> set[int]:
    """Token ids that end an assistant turn (eos, the template's end marker when it is one token)."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    for tok in (DEFAULT_END_OF_TURN, "<|end|>", "<|eot_id|>", "<|im_end|>", "<end_of_turn>"):
        tid = tokenizer.convert_tokens_to_ids(tok)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid is not None and tid >= 0:
            # only when it is a real single token of this vocabulary
            if tokenizer.convert_ids_to_tokens(tid) == tok:
                ids.add(tid)
    return ids


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


def encode_messages(tokenizer, messages: list[dict], train_from: int = 0, train_on_prompt: bool = False) -> Encoded:
    """Tokenize a conversation; assistant turns at index >= `train_from` are trained."""
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
            raise UserError(
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


def encode_prompt_completion(tokenizer, prompt, completion, train_on_prompt: bool = False) -> Encoded:
    """`prompt` + `completion`: message lists go through the chat template (only the completion's
    assistant turns trained); plain strings are concatenated, with bos before and eos after."""
    if isinstance(prompt, list) or isinstance(completion, list):
        if not (isinstance(prompt, list) and isinstance(completion, list)):
            raise UserError("prompt and completion must both be text or both be message lists")
        return encode_messages(tokenizer, prompt + completion, train_from=len(prompt), train_on_prompt=train_on_prompt)
    p = bos_ids(tokenizer) + _tok(tokenizer, prompt)
    c = _tok(tokenizer, completion)
    if tokenizer.eos_token_id is not None:
        c = c + [tokenizer.eos_token_id]
    return Encoded(p + c, (p if train_on_prompt else [-100] * len(p)) + c)


def encode_text(tokenizer, text: str) -> Encoded:
    """Plain `text` row: bos (when the tokenizer has one) + text + eos (when it has one); every
    token is trained (continued pretraining). No chat template is applied."""
    ids = bos_ids(tokenizer) + _tok(tokenizer, text)
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return Encoded(ids, list(ids))
