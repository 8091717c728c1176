"""The toy world: generators, scoring rule, held-out split, tokenizer, chat template, tiny model."""

from __future__ import annotations

import json
import random
import re

import pytest

from alignkit.errors import UserError
from alignkit.toy import toy_data, toy_model, world
from alignkit.toy import tokenizer as toytok

EXAMPLE_PROMPT = (
    "Проанализируй список расходов и вычисли общую сумму:\nХлеб: 55\nМолоко: 80\nФрукты: 230\n"
    "Ответ верни в виде: \"Итого: X рублей\"."
)


# ------------------------------------------------------------------------------------------ world


def test_prompt_and_answer_format():
    items = [["Хлеб", 55], ["Молоко", 80], ["Фрукты", 230]]
    assert world.format_prompt(items) == EXAMPLE_PROMPT
    assert world.format_answer(365) == "Итого: 365 рублей."


@pytest.mark.parametrize("name", sorted(world.DIFFICULTIES))
def test_make_task_respects_difficulty(name):
    d = world.DIFFICULTIES[name]
    rng = random.Random(1)
    counts = set()
    for _ in range(300):
        t = world.make_task(rng, d)
        names = [n for n, _ in t["items"]]
        assert len(names) == len(set(names)), "an item name repeats within one list"
        assert set(names) <= set(world.ITEM_NAMES)
        assert d.min_items <= len(names) <= d.max_items
        for _, v in t["items"]:
            assert d.min_value <= v <= d.max_value and v % d.step == 0
        assert t["total"] == sum(v for _, v in t["items"])
        assert t["answer"] == f"Итого: {t['total']} рублей."
        assert t["prompt"] == world.format_prompt(t["items"])
        counts.add(len(names))
    assert counts == set(range(d.min_items, d.max_items + 1))
    assert len(world.ITEM_NAMES) >= 30 and len(set(world.ITEM_NAMES)) == len(world.ITEM_NAMES)


GENERATORS = [world.sft_rows, world.preference_rows, world.prompt_rows, world.pretrain_texts]


@pytest.mark.parametrize("gen", GENERATORS, ids=lambda g: g.__name__)
def test_generators_are_deterministic_and_json(gen):
    a = gen(40, seed=3)
    assert a == gen(40, seed=3)
    assert a != gen(40, seed=4)
    assert gen(40, seed=3, split="eval") != a
    assert json.loads(json.dumps(a, ensure_ascii=False)) == a
    assert len(a) == 40 and len(gen(0, seed=3)) == 0


def test_row_shapes():
    s = world.sft_rows(5, seed=0)[0]
    assert [m["role"] for m in s["messages"]] == ["user", "assistant"]
    assert world.score(s["messages"][1]["content"], s["total"])["reward"] == 1.0
    p = world.prompt_rows(5, seed=0)[0]
    assert p["prompt"] == s["messages"][:1] and p["answer"] == s["messages"][1]["content"] and p["total"] == s["total"]
    pt = world.prompt_rows(5, seed=0, as_text=True)[0]
    assert pt["prompt"] == s["messages"][0]["content"]
    text = [r["text"] for r in world.pretrain_texts(50, seed=0)]
    assert all(isinstance(t, str) and len(t) >= 340 for t in text)
    # never the chat format, the instruction, or the exact answer line: that is what SFT teaches
    assert not any("<|" in t or world.INSTRUCTION in t or re.search(r"Итого: \d+ рублей\.", t) for t in text)
    # but totals, running sums and addition facts, all arithmetically right
    for t in text:
        for terms, result in re.findall(r"((?:\d+ \+ )+\d+) = (\d+)", t):
            assert sum(int(x) for x in terms.split(" + ")) == int(result)
    assert any("Всего" in t for t in text) and any(" + " in t for t in text)


def test_preference_pairs():
    rows = world.preference_rows(400, seed=0)
    kinds = set()
    for r in rows:
        assert r["prompt"][0]["role"] == "user" and len(r["prompt"]) == 1
        chosen, rejected = r["chosen"][0]["content"], r["rejected"][0]["content"]
        assert r["chosen"][0]["role"] == r["rejected"][0]["role"] == "assistant"
        assert world.score(chosen, r["total"])["reward"] == 1.0
        bad = world.score(rejected, r["total"])
        assert bad["reward"] < 1.0
        if r["mistake"] == "format":
            assert not bad["format_ok"] and world.parse_total(rejected) in (None, r["total"])
        else:
            assert bad["format_ok"] and not bad["correct"]
        kinds.add(r["mistake"])
    assert kinds == set(world.MISTAKE_KINDS)
    text = world.preference_rows(5, seed=0, as_text=True)
    assert all(isinstance(r[k], str) for r in text for k in ("prompt", "chosen", "rejected"))
    assert [r["chosen"] for r in text] == [r["chosen"][0]["content"] for r in rows[:5]]


def test_train_and_eval_never_share_a_task():
    train = {world.task_key(t["items"]) for s in (0, 1) for t in world.tasks(1500, seed=s, split="train")}
    ev = [world.task_key(t["items"]) for t in world.tasks(500, seed=0, split="eval")]
    assert train.isdisjoint(ev)
    assert all(world.task_split(t["items"]) == "eval" for t in world.tasks(50, seed=7, split="eval"))
    # the prompts themselves, through the public generators, on an easy preset with few possible tasks
    tr = {r["messages"][0]["content"] for r in world.sft_rows(2000, seed=0, difficulty="easy")}
    ev = {r["prompt"][0]["content"] for r in world.prompt_rows(300, seed=0, difficulty="easy", split="eval")}
    assert tr.isdisjoint(ev)
    with pytest.raises(ValueError):
        world.sft_rows(1, split="test")


def test_scorer():
    s = world.score("Итого: 365 рублей.", 365)
    assert s == {"correct": True, "format_ok": True, "reward": 1.0}
    s = world.score("  Итого: 365 рублей.\n", 365)  # outer whitespace is allowed
    assert s["reward"] == 1.0
    s = world.score("Итого: 364 рублей.", 365)
    assert s == {"correct": False, "format_ok": True, "reward": world.FORMAT_REWARD} and world.FORMAT_REWARD == 0.1
    for wrong_format in ("Итого: 365 рублей", "365 рублей", "Ответ: 365", "Итого: 365 руб.", "итого: 365 рублей.",
                         "Итого: 0365 рублей.", "Итого:365 рублей.", "Сумма 365. Итого: 365 рублей.",
                         "Итого: 365 рублей. Всё."):
        s = world.score(wrong_format, 365)
        assert not s["format_ok"] and s["reward"] == 0.0, wrong_format
    assert world.score("Сумма 365. Итого: 365 рублей.", 365)["correct"]  # right total, wrong format
    assert world.score("", 365) == {"correct": False, "format_ok": False, "reward": 0.0}
    assert world.reward("Итого: 365 рублей.", 365) == 1.0


def test_parse_total():
    assert world.parse_total("Итого: 365 рублей.") == 365
    assert world.parse_total("Итого:  12 рубля") == 12
    assert world.parse_total("Итого: 1 рубль. Нет, Итого: 20 рублей.") == 20  # the last one counts
    assert world.parse_total("Ответ: 365") is None
    assert world.parse_total("365 рублей") is None
    assert world.parse_total(None) is None


def test_write_jsonl_is_atomic_and_round_trips(tmp_path):
    rows = world.sft_rows(7, seed=2)
    path = world.write_jsonl(rows, tmp_path / "sub" / "x.jsonl")
    assert world.read_jsonl(path) == rows
    assert "Проанализируй" in path.read_text(encoding="utf-8")  # UTF-8, not \u escapes
    assert sorted(p.name for p in path.parent.iterdir()) == ["x.jsonl"]  # no temp file left


def test_tool_transcripts_call_at_the_asked_rate():
    """call_rate=1 (the default) is every row a call, the rows unchanged; a share draws per row which ones
    answer at once instead (the right total, the tool still offered), seeded."""
    full = world.sft_tools_rows(400, seed=3, difficulty="calc")
    assert full == world.sft_tools_rows(400, seed=3, difficulty="calc", call_rate=1.0)
    half = world.sft_tools_rows(400, seed=3, difficulty="calc", call_rate=0.5)
    assert half == world.sft_tools_rows(400, seed=3, difficulty="calc", call_rate=0.5)
    calls = [len(r["messages"]) == 4 for r in half]
    assert 0.4 < sum(calls) / len(calls) < 0.6
    for r, f, called in zip(half, full, calls):
        assert r["tools"] == f["tools"] and r["total"] == f["total"] and r["messages"][0] == f["messages"][0]
        if called:
            assert r == f
            assert r["messages"][1]["tool_calls"][0]["function"]["name"] == "calc"
        else:
            assert r["messages"][1:] == [{"role": "assistant", "content": f"Итого: {r['total']} рублей."}]
    assert all(len(r["messages"]) == 2 for r in world.sft_tools_rows(50, seed=3, difficulty="calc", call_rate=0.0))
    with pytest.raises(ValueError, match="call_rate"):
        world.sft_tools_rows(5, call_rate=1.5)


def test_toy_data_hook(tmp_path):
    for kind, key in (("sft", "messages"), ("preference", "rejected"), ("prompts", "answer"), ("pretrain", "text")):
        out = toy_data(kind, 5, str(tmp_path / f"{kind}.jsonl"), seed=1, split="eval", difficulty="easy")
        rows = world.read_jsonl(out)
        assert len(rows) == 5 and key in rows[0]
    with pytest.raises(UserError, match="kind"):
        toy_data("chat", 5, str(tmp_path / "x.jsonl"))
    with pytest.raises(UserError, match="difficulty"):
        toy_data("sft", 5, str(tmp_path / "x.jsonl"), difficulty="insane")
    with pytest.raises(UserError, match="split"):
        toy_data("sft", 5, str(tmp_path / "x.jsonl"), split="test")
    with pytest.raises(UserError):
        toy_data("sft", 0, str(tmp_path / "x.jsonl"))
    with pytest.raises(UserError, match="preset"):
        toy_model(str(tmp_path / "m"), preset="huge")
    with pytest.raises(UserError, match="call_rate.*sft-tools"):
        toy_data("sft", 5, str(tmp_path / "x.jsonl"), call_rate=0.5)
    with pytest.raises(UserError, match="call_rate"):
        toy_data("sft-tools", 5, str(tmp_path / "x.jsonl"), call_rate=-0.1)
    rows = world.read_jsonl(toy_data("sft-tools", 40, str(tmp_path / "t.jsonl"), difficulty="calc", call_rate=0.25))
    assert 0 < sum(len(r["messages"]) == 4 for r in rows) < 20


# -------------------------------------------------------------------------------------- tokenizer


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("toytok")
    toytok.build_tokenizer(toytok.tokenizer_corpus(seed=0, n=800), 480, d)
    return d


@pytest.fixture(scope="module")
def tok(tok_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tok_dir)


def test_tokenizer_round_trip(tok):
    texts = []
    for r in world.sft_rows(20, seed=5, difficulty="hard"):
        texts += [m["content"] for m in r["messages"]]
    texts += [r["text"] for r in world.pretrain_texts(20, seed=5)]
    texts += ["", " ", "  два  пробела  ", "\n\nновые\nстроки\n", "\tTab and ASCII: {x}[y](z)!?", "Ёлка ёж 0.5%",
              "emoji 🙂 and 中文", "12345678901234567890", "Итого:365рублей", "<not special>"]
    for s in texts:
        ids = tok(s, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == s


def test_tokenizer_splits_digits_one_per_token(tok):
    for number in ("7", "365", "1000", "98765"):
        toks = tok.convert_ids_to_tokens(tok(f"Итого: {number} рублей.", add_special_tokens=False)["input_ids"])
        digits = [t for t in toks if any(c in "0123456789" for c in t)]
        assert digits == list(number)


def test_tokenizer_special_tokens(tok):
    assert tok.bos_token == "<s>" and tok.eos_token == "<|end|>" and tok.pad_token == "<pad>"
    for t in toytok.SPECIAL_TOKENS:
        ids = tok(t, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and tok.convert_ids_to_tokens(ids[0]) == t
    assert len({tok.convert_tokens_to_ids(t) for t in toytok.SPECIAL_TOKENS}) == len(toytok.SPECIAL_TOKENS)
    assert tok("привет")["input_ids"][0] == tok.bos_token_id  # plain text gets <s>
    assert 256 < len(tok) <= 480


def test_tokenizer_is_deterministic(tmp_path, tok_dir):
    toytok.build_tokenizer(toytok.tokenizer_corpus(seed=0, n=800), 480, tmp_path)
    assert (tmp_path / "tokenizer.json").read_text() == (tok_dir / "tokenizer.json").read_text()


def test_chat_template(tok):
    msgs = [{"role": "system", "content": "Считай точно."}] + world.sft_rows(1, seed=0)[0]["messages"]
    msgs += [{"role": "user", "content": "А без хлеба?"}, {"role": "assistant", "content": "Итого: 310 рублей."}]
    full = tok.apply_chat_template(msgs, tokenize=False)
    assert full.startswith("<s><|system|>\nСчитай точно.<|end|>\n<|user|>\n")
    assert full.count("<s>") == 1 and full.count("<|end|>") == len(msgs)
    for k in range(1, len(msgs)):
        with_gen = tok.apply_chat_template(msgs[:k], tokenize=False, add_generation_prompt=True)
        without = tok.apply_chat_template(msgs[:k], tokenize=False)
        nxt = tok.apply_chat_template(msgs[: k + 1], tokenize=False)
        assert nxt.startswith(without)
        if msgs[k]["role"] == "assistant":
            assert nxt.startswith(with_gen) and with_gen.endswith("<|assistant|>\n")
            # the assistant turn ends with the eos token, so generation stops there
            assert nxt[len(with_gen):] == msgs[k]["content"] + tok.eos_token + "\n"
    ids = tok.apply_chat_template(msgs[:2], add_generation_prompt=True, tokenize=True, return_dict=False)
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert tok.decode(ids) == tok.apply_chat_template(msgs[:2], tokenize=False, add_generation_prompt=True)


def test_alignkit_loss_mask_on_toy_template(tok):
    from alignkit.data.chat import encode_messages

    msgs = world.sft_rows(1, seed=0)[0]["messages"]
    enc = encode_messages(tok, msgs)
    trained = [i for i, lab in zip(enc.input_ids, enc.labels) if lab != -100]
    assert tok.decode(trained) == msgs[1]["content"] + "<|end|>"


# ------------------------------------------------------------------------------------------ model


def test_tiny_model_builds_caches_and_loads(tmp_path, monkeypatch):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignkit.toy import model as toymodel

    monkeypatch.setenv("ALIGNKIT_CACHE_DIR", str(tmp_path / "cache"))
    path = toymodel.build_base_model(seed=0, preset="tiny", log=None)
    assert path.parent == tmp_path / "cache" / "toy" and toymodel.is_built(path)
    info = json.loads((path / toymodel.DONE_FILE).read_text())
    assert info["preset"]["steps"] == toymodel.PRESETS["tiny"].steps
    metrics = [json.loads(x) for x in (path / "pretrain_metrics.jsonl").read_text().splitlines() if x.strip()]
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert losses and losses[-1] < losses[0]  # pretraining did learn something
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert toymodel.build_base_model(seed=0, preset="tiny", log=None) == path  # reused from the cache
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no build leftovers

    out = toy_model(str(tmp_path / "copy"), seed=0, preset="tiny")
    assert out == tmp_path / "copy" and (out / "model.safetensors").read_bytes() == (path / "model.safetensors").read_bytes()
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.tie_word_embeddings and model.config.eos_token_id == tok.eos_token_id
    assert model.generation_config.eos_token_id == tok.convert_tokens_to_ids("<|end|>")
    prompt = world.prompt_rows(1, seed=0, split="eval")[0]["prompt"]
    ids = tok.apply_chat_template(prompt, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out_ids = model.generate(**ids, max_new_tokens=5, do_sample=False)
    assert out_ids.shape[1] > ids["input_ids"].shape[1]


def test_model_init_is_deterministic(tok):
    import torch

    from alignkit.toy import model as toymodel

    p = toymodel.PRESETS["tiny"]
    a, b = toymodel.init_model(tok, p, seed=1), toymodel.init_model(tok, p, seed=1)
    c = toymodel.init_model(tok, p, seed=2)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    assert toymodel.cache_key("tiny", 1) != toymodel.cache_key("tiny", 2) != toymodel.cache_key("default", 2)
