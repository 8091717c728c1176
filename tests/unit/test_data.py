"""Data pipeline: formats, loss masks decoded back to text, truncation, loaders, bad input."""

from __future__ import annotations

import json

import pytest
import torch

from alignkit.data.chat import encode_messages, encode_prompt, encode_prompt_completion, encode_text, setup_chat_template
from alignkit.data.collate import IGNORE, pack_collate, pad_collate
from alignkit.data.loading import load_rows
from alignkit.data.sft import load_sft_data
from alignkit.errors import UserError
from alignkit.models import load_tokenizer

from conftest import chat_rows, write_jsonl


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return load_tokenizer(str(tiny_model_dir))


def trained_segments(enc) -> list[list[int]]:
    """Maximal runs of trained token ids."""
    segs, cur = [], []
    for t, lab in zip(enc.input_ids, enc.labels):
        if lab != IGNORE:
            cur.append(t)
        elif cur:
            segs.append(cur)
            cur = []
    if cur:
        segs.append(cur)
    return segs


def test_multi_turn_trains_every_assistant_turn_exactly(tok):
    msgs = chat_rows(1)[0]["messages"]
    enc = encode_messages(tok, msgs)
    segs = trained_segments(enc)
    answers = [m["content"] for m in msgs if m["role"] == "assistant"]
    assert [tok.decode(s) for s in segs] == [a + "<|im_end|>" for a in answers]
    # nothing of the system / user turns is trained
    untrained = tok.decode([t for t, lab in zip(enc.input_ids, enc.labels) if lab == IGNORE])
    for m in msgs:
        if m["role"] != "assistant":
            assert m["content"] in untrained
    # the whole sequence is the template's text
    assert tok.decode(enc.input_ids) == tok.apply_chat_template(msgs, tokenize=False)


def test_mask_boundary_matches_generation_prompt(tok):
    """The context before each answer is exactly the token sequence a model gets at generation time."""
    msgs = chat_rows(1)[0]["messages"]
    enc = encode_messages(tok, msgs)
    for k, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        prompt_ids = encode_prompt(tok, msgs[:k])
        n = len(prompt_ids)
        assert enc.input_ids[:n] == prompt_ids
        assert enc.labels[n] != IGNORE and enc.labels[n - 1] == IGNORE


def test_prompt_completion_text_and_messages(tok):
    enc = encode_prompt_completion(tok, "2+2=", " 4")
    segs = trained_segments(enc)
    assert len(segs) == 1 and tok.decode(segs[0]) == " 4<|im_end|>"
    assert tok.decode([t for t, lab in zip(enc.input_ids, enc.labels) if lab == IGNORE]) == "2+2="
    prompt = [{"role": "user", "content": "Сколько?"}]
    completion = [{"role": "assistant", "content": "Итого: 5 рублей."}]
    enc = encode_prompt_completion(tok, prompt, completion)
    assert [tok.decode(s) for s in trained_segments(enc)] == ["Итого: 5 рублей.<|im_end|>"]


def test_prompt_assistant_turns_are_context(tok):
    prompt = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    completion = [{"role": "assistant", "content": "d"}]
    enc = encode_prompt_completion(tok, prompt, completion)
    assert [tok.decode(s) for s in trained_segments(enc)] == ["d<|im_end|>"]


def test_text_trains_everything(tok):
    enc = encode_text(tok, "hello world")
    assert tok.decode(enc.input_ids, skip_special_tokens=True) == "hello world"
    assert all(lab != IGNORE for lab in enc.labels)
    assert enc.input_ids[-1] == tok.eos_token_id


def test_default_template_when_tokenizer_has_none(tok):
    tok2 = load_tokenizer(tok.name_or_path)
    tok2.chat_template = None
    setup_chat_template(tok2, None)
    msgs = chat_rows(1)[0]["messages"]
    segs = trained_segments(encode_messages(tok2, msgs))
    assert tok2.decode(segs[0]) == "Итого: 10 рублей.<|im_end|>".replace("10", str(10 + 3))


def test_truncate_and_drop_are_counted(tok, tmp_path):
    rows = [{"prompt": "short", "completion": " yes"}, {"prompt": "x " * 200, "completion": " long answer"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    kept, st = load_sft_data(str(path), "train", tok, max_length=40, truncation="drop")
    assert st.kept == 1 and st.dropped_long == 1 and len(kept) == 1
    kept, st = load_sft_data(str(path), "train", tok, max_length=40, truncation="truncate")
    # truncating the long row cuts its answer away entirely, so it is dropped as empty
    assert st.truncated == 1 and st.dropped_empty == 1 and st.kept == 1
    assert "dropped" in st.summary()


def test_loaders_jsonl_json_parquet_csv_agree(tmp_path):
    import pandas as pd

    rows = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(5)]
    write_jsonl(tmp_path / "a.jsonl", rows)
    (tmp_path / "a.json").write_text(json.dumps(rows))
    pd.DataFrame(rows).to_parquet(tmp_path / "a.parquet")
    pd.DataFrame(rows).to_csv(tmp_path / "a.csv", index=False)
    got = [list(load_rows(str(tmp_path / f"a.{ext}"))) for ext in ("jsonl", "json", "parquet", "csv")]
    for g in got:
        assert g == rows


@pytest.mark.parametrize(
    "rows, needle",
    [
        ([{"foo": 1}], "missing columns"),
        ([{"messages": "hi"}], "row 1"),
        ([{"messages": [{"role": "user", "content": "hi"}]}], "no assistant message"),
        ([{"messages": [{"role": "robot", "content": "hi"}]}], "role 'robot'"),
        ([{"prompt": "a", "completion": ""}], "completion"),
    ],
)
def test_bad_rows_name_file_and_row(tok, tmp_path, rows, needle):
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(UserError) as e:
        load_sft_data(str(path), "train", tok, max_length=64)
    assert needle in str(e.value) and "bad.jsonl" in str(e.value)


def test_missing_and_empty_files(tok, tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_rows(str(tmp_path / "nope.jsonl"))
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(UserError, match="empty"):
        load_rows(str(tmp_path / "empty.jsonl"))


def test_pad_and_pack_collate_targets_never_cross_documents(tok):
    encs = [encode_messages(tok, r["messages"]) for r in chat_rows(3)]
    packed = pack_collate(encs)
    pos = packed["position_ids"][0].tolist()
    tgt = packed["targets"][0].tolist()
    start = 0
    for e in encs:
        n = len(e)
        assert pos[start:start + n] == list(range(n))
        assert tgt[start + n - 1] == IGNORE  # last token of a document predicts nothing
        start += n
    padded = pad_collate(encs, tok.pad_token_id)
    assert padded["input_ids"].shape[0] == 3
    assert int((padded["targets"] != IGNORE).sum()) == int((packed["targets"] != IGNORE).sum())
    assert torch.equal(padded["attention_mask"].sum(1), torch.tensor([len(e) for e in encs]))
