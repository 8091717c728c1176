"""A small byte-level BPE tokenizer for the toy world, trained offline with `tokenizers`.

* Byte-level BPE: every string (Russian, ASCII, anything UTF-8, spaces and newlines included)
  round-trips exactly through encode/decode; the base alphabet is the 256 bytes.
* Digits are split one per token before BPE (``Digits(individual_digits=True)``), so numbers
  are always spelled digit by digit -- arithmetic is learnable and totals are parseable.
* Special tokens: ``<s>`` (bos), ``</s>``, ``<pad>``, ``<unk>`` and the chat markers
  ``<|system|>``, ``<|user|>``, ``<|assistant|>``, ``<|end|>``.
* End of sequence: ``eos_token`` is ``<|end|>``, the token that closes every assistant turn,
  so anything that stops at ``tokenizer.eos_token_id`` (generate, rollouts) stops at the end of
  an assistant turn, and plain-text documents encoded with eos end with it too. ``</s>`` is
  kept in the vocabulary as a spare special token but is never produced by the template.
* The tokenizer adds ``<s>`` in front of plain text (``add_special_tokens=True``); the chat
  template writes ``<s>`` itself, and `apply_chat_template` tokenizes without adding another.

Chat template (saved in tokenizer_config.json / chat_template.jinja)::

    <s><|user|>
    {content}<|end|>
    <|assistant|>
    {content}<|end|>
    ...

With ``add_generation_prompt=True`` it ends with ``<|assistant|>\\n``. It is prefix-stable:
the rendering of messages[:k] (with the generation prompt when messages[k] is the assistant's)
is a string prefix of the rendering of messages[:k+1].
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

BOS, EOS_DOC, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
SYSTEM, USER, ASSISTANT, END = "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"
SPECIAL_TOKENS = [PAD, BOS, EOS_DOC, UNK, SYSTEM, USER, ASSISTANT, END]
EOS = END  # generation stops at the end of an assistant turn

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('roles must be system, user or assistant') }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

# A tool-calling variant of the toy chat template (`chat_template=toy-tools`): the tool list is
# a short system line (name and arguments only: the tiny model has 512 positions), calls are
# Hermes-style JSON blocks, and a tool's answer comes back as a user turn in <tool_response>.
TOOLS_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if tools %}{{ '<|system|>\nTools:' }}{% for t in tools %}{% set f = t.function if t.function else t %}"
    "{{ ' ' + f.name + '(' + (f.parameters.properties | list | join(', ')) + ')' }}{% endfor %}"
    "{{ '<|end|>\n' }}{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'tool' %}"
    "{{ '<|user|>\n<tool_response>' + message['content'] + '</tool_response><|end|>\n' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ '<|assistant|>\n' + (message['content'] or '') }}"
    "{% for c in message.get('tool_calls') or [] %}{% set f = c.function if c.function else c %}"
    "{{ '<tool_call>{\"name\": \"' + f.name + '\", \"arguments\": ' + (f.arguments | tojson) + '}</tool_call>' }}"
    "{% endfor %}{{ '<|end|>\n' }}"
    "{% else %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

# chat templates a config may name instead of giving the text (chat_template=toy-tools)
NAMED_TEMPLATES = {"toy-tools": TOOLS_CHAT_TEMPLATE}

DEFAULT_VOCAB_SIZE = 640


def _training_corpus(texts: Iterable[str]) -> list[str]:
    return [t for t in texts if t]


def build_tokenizer(texts: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE, out_dir: str | os.PathLike | None = None):
    """Train the byte-level BPE on `texts` and return a `PreTrainedTokenizerFast` (saved to
    out_dir when given, loadable with `AutoTokenizer.from_pretrained(out_dir)`).

    Deterministic: the same texts and vocab_size give the same vocabulary and merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)} (bytes + special tokens)")
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Single-threaded training keeps the merge order deterministic.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    tok.train_from_iterator(_training_corpus(texts), trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS}:0 $A:0", pair=f"{BOS}:0 $A:0 $B:1", special_tokens=[(BOS, bos_id)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        additional_special_tokens=[EOS_DOC, SYSTEM, USER, ASSISTANT],
        clean_up_tokenization_spaces=False,
        model_max_length=512,
        padding_side="right",
    )
    fast.chat_template = CHAT_TEMPLATE
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        fast.save_pretrained(out_dir)
    return fast


def tokenizer_corpus(seed: int = 0, n: int = 4000, difficulty=None) -> list[str]:
    """Text the toy tokenizer is trained on: pretraining documents, prompts and answers of the
    train split, and the wrong-format answers (so every phrase the world uses has merges)."""
    from alignkit.toy import world

    texts = [r["text"] for r in world.pretrain_texts(max(1, n // 4), seed=seed, difficulty=difficulty)]
    for t in world.tasks(n // 4, seed=seed, difficulty=difficulty):
        texts.append(t["prompt"])
        texts.append(t["answer"])
    rng = world._stream("tokenizer", "train", seed)
    texts += [world.wrong_format(rng.randint(10, 999), rng) for _ in range(200)]
    texts += [name.lower() for name in world.ITEM_NAMES] + list(world.ITEM_NAMES)
    return texts
