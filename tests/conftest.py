"""Shared fixtures: a tiny tokenizer + random Llama model saved as a normal HF folder, built
offline in about a second, so every test exercises the same loading path as a hub model."""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models: one thread each is faster than two contending ones, and subprocesses inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

CHATML = (
    "{{ bos_token }}{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CORPUS = [
    "Проанализируй список расходов и вычисли общую сумму:\nХлеб: 55\nМолоко: 80\nИтого: 135 рублей.",
    "The quick brown fox jumps over the lazy dog. 0123456789",
    "Human: what is two plus two?\n\nAssistant: Four. Hello there, general question!",
    "system user assistant answer prompt completion text Ответ верни в виде",
] * 20


def free_port() -> int:
    """A port nobody holds now: torchrun launches take one each, since a fixed port can still be held by
    the previous launch's store."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_tiny_tokenizer(out_dir: Path, vocab_size: int = 300):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tk.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(CORPUS, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="<|im_end|>", pad_token="<pad>")
    tok.chat_template = CHATML
    tok.save_pretrained(out_dir)
    return tok


def build_tiny_model(out_dir: Path, vocab_size: int, seed: int = 0, **kw):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=kw.get("hidden", 32), intermediate_size=64,
                      num_hidden_layers=kw.get("layers", 2), num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256, tie_word_embeddings=kw.get("tie", True),
                      bos_token_id=1, eos_token_id=4, pad_token_id=0)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(out_dir)
    return model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tiny_model")
    tok = build_tiny_tokenizer(d)
    build_tiny_model(d, len(tok))
    return d


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


def chat_rows(n: int = 16) -> list[dict]:
    rows = []
    for i in range(n):
        a, b = 10 + i, 7 * i + 3
        rows.append({"messages": [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": f"Хлеб: {a}\nМолоко: {b}"},
            {"role": "assistant", "content": f"Итого: {a + b} рублей."},
            {"role": "user", "content": "And twice that?"},
            {"role": "assistant", "content": f"{2 * (a + b)}"},
        ]})
    return rows


# ----------------------------------------------------------------------------- shared fixtures


@pytest.fixture(scope="module")
def one_thread():
    """Tensors in the unit tests are tiny: intra-op threads only add synchronisation, which
    dominates on a busy 2-core machine (5 s vs 25 s for test_losses.py). Restored afterwards.
    Use per file: `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def no_curve_plots(monkeypatch):
    """curves.png (matplotlib: seconds per run, ~40 panels for PPO) is not what the recipe tests
    check. Use per file: `pytestmark = pytest.mark.usefixtures("no_curve_plots")`."""
    monkeypatch.setattr("alignkit.training.trainer.plot_metrics", lambda *a, **k: None)


# ----------------------------------------------------------------------------- toy rewards for RL tests


def digits(prompts, completions, **cols):
    """Easy dense reward for a random tiny model: the share of digit characters."""
    return [sum(c.isdigit() for c in t) / max(len(t), 1) for t in completions]


# The same function as the source of a reward file, for `reward=FILE.py:digits` on the CLI.
DIGITS_SRC = inspect.getsource(digits)


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory) -> Path:
    """64 short prompts with an extra column `k` (passed to reward functions as a keyword)."""
    d = tmp_path_factory.mktemp("prompts")
    return write_jsonl(d / "p.jsonl", [{"prompt": f"Сколько будет {i} плюс {i}?", "k": i} for i in range(64)])


def metrics(run_dir, kind: str = "train") -> list[dict]:
    """The records of one kind (train, eval, ...) from a run folder's metrics.jsonl."""
    rows = map(json.loads, (Path(run_dir) / "metrics.jsonl").read_text(encoding="utf-8").splitlines())
    return [r for r in rows if r["kind"] == kind]


# ----------------------------------------------------------------------------- source checks


def assert_only_allowed(found: list[tuple[object, str]], allowed: set, title: str) -> None:
    """`found`: (key, message) per violation of a source check. Fails listing the messages of the
    violations whose key is not in `allowed`, and fails when `allowed` names a key that no
    longer occurs (so allow-lists of known violations shrink as the code is fixed)."""
    bad = [msg for key, msg in found if key not in allowed]
    assert not bad, f"{title}:\n" + "\n".join(bad)
    stale = allowed - {key for key, _ in found}
    assert not stale, f"the allow-list names violations that no longer occur; remove them: {sorted(stale, key=str)}"
