"""Evaluation: the KL estimators against an exact computation on a tiny vocabulary, win rate,
prompting modes, perplexity, and `alignkit eval` end to end on the tiny test model."""

from __future__ import annotations

import itertools
import json
import math
import shutil
from collections import Counter

import pytest
import torch

from alignkit.cli import main
from alignkit.config import EvalConfig
from alignkit.eval import prompting
from alignkit.eval.metrics import completion_logps, distinct_n, kl_metrics, mean_std, task_metrics, win_rate
from alignkit.eval.run import evaluate
from alignkit.toy import world

from conftest import build_tiny_model

# --------------------------------------------------------------------------- KL on a tiny vocabulary

V, STOP, CTX = 5, 4, [0, 1, 2]


def tiny_vocab_lm(seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=16, tie_word_embeddings=False,
                      initializer_range=0.6, bos_token_id=0, eos_token_id=STOP, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def exact_sequences(model):
    """Every completion of at most 2 tokens (stopping at STOP) with its exact log-probability,
    from plain full-vocabulary forwards (independent of the code under test)."""
    def next_logp(prefix):
        with torch.no_grad():
            return torch.log_softmax(model(torch.tensor([CTX + prefix])).logits[0, -1].double(), -1)

    out = {}
    first = next_logp([])
    for a in range(V):
        if a == STOP:
            out[(a,)] = float(first[a])
            continue
        second = next_logp([a])
        for b in range(V):
            out[(a, b)] = float(first[a] + second[b])
    return out


def test_kl_estimators_match_exact_kl_on_tiny_vocabulary():
    pol, ref = tiny_vocab_lm(0), tiny_vocab_lm(1)
    P, Q = exact_sequences(pol), exact_sequences(ref)
    assert sum(math.exp(v) for v in P.values()) == pytest.approx(1.0, abs=1e-9)
    exact = sum(math.exp(lp) * (lp - Q[s]) for s, lp in P.items())
    assert exact > 0.05  # the two models really differ

    seqs = list(P)
    segs = [(CTX, list(s)) for s in seqs]
    lp = completion_logps(pol, segs, pad_id=0, batch_size=7)
    lr = completion_logps(ref, segs, pad_id=0, batch_size=5)
    # the per-token log-probs are the exact ones
    for s, a, b in zip(seqs, lp, lr):
        assert float(a.double().sum()) == pytest.approx(P[s], abs=1e-5)
        assert float(b.double().sum()) == pytest.approx(Q[s], abs=1e-5)

    # expectation of each per-sample estimator under the policy, computed exactly
    w = [math.exp(P[s]) for s in seqs]
    seq_k1 = [float((a.double() - b.double()).sum()) for a, b in zip(lp, lr)]
    seq_k3 = [float(torch.expm1(b.double() - a.double()).add(a.double() - b.double()).sum()) for a, b in zip(lp, lr)]
    assert sum(wi * x for wi, x in zip(w, seq_k1)) == pytest.approx(exact, abs=1e-5)
    assert sum(wi * x for wi, x in zip(w, seq_k3)) == pytest.approx(exact, abs=1e-5)

    # Monte Carlo: the rollout engine's samples through kl_metrics
    from alignkit.rollout.engine import RolloutEngine, SamplingParams

    class IdsTokenizer:
        pad_token_id = 0

        def decode(self, ids, skip_special_tokens=True):
            return " ".join(map(str, ids))

    eng = RolloutEngine(IdsTokenizer(), stop_token_ids={STOP})
    N = 5000
    batch = eng.generate(pol, [CTX], SamplingParams(n=N, max_new_tokens=2, temperature=1.0, seed=1, batch_size=1))
    segs = [(s.prompt_ids, s.completion_ids) for s in batch.samples]
    # the samples follow the policy's sequence distribution (chi-square, 20 degrees of freedom, p ~ 0.001)
    counts = Counter(tuple(s.completion_ids) for s in batch.samples)
    assert set(counts) <= set(P)
    chi2 = sum((counts[s] - N * math.exp(lp)) ** 2 / (N * math.exp(lp)) for s, lp in P.items())
    assert chi2 < 45, chi2
    m = kl_metrics(completion_logps(pol, segs, 0, 1024), completion_logps(ref, segs, 0, 1024))
    assert 0 < m["kl_seq_stderr"] < 0.05 * exact
    assert abs(m["kl_seq"] - exact) < 4 * m["kl_seq_stderr"], (m, exact)
    assert abs(m["k3_seq"] - exact) < 4 * m["kl_seq_stderr"], (m, exact)
    exp_len = sum(math.exp(P[s]) * len(s) for s in seqs)
    assert m["kl_token"] == pytest.approx(exact / exp_len, rel=0.15)
    # the same model on both sides: exactly zero
    z = kl_metrics(completion_logps(pol, segs[:50], 0, 16), completion_logps(pol, segs[:50], 0, 16))
    assert z["kl_seq"] == 0.0 and z["k3_seq"] == 0.0 and z["kl_token"] == 0.0


def test_kl_metrics_definitions_by_hand():
    a = [torch.tensor([-1.0, -2.0]), torch.tensor([-0.5])]
    b = [torch.tensor([-1.5, -1.0]), torch.tensor([-0.5])]
    m = kl_metrics(a, b)
    d = [[0.5, -1.0], [0.0]]
    assert m["kl_seq"] == pytest.approx((0.5 - 1.0 + 0.0) / 2)
    assert m["kl_token"] == pytest.approx((0.5 - 1.0) / 3)
    k3 = lambda x: math.exp(-x) - 1 + x  # noqa: E731
    assert m["k3_seq"] == pytest.approx(sum(k3(x) for s in d for x in s) / 2)
    assert m["k3_token"] == pytest.approx(sum(k3(x) for s in d for x in s) / 3)
    assert m["kl_tokens"] == 3


# --------------------------------------------------------------------------- small metrics


def test_win_rate_distinct_mean_std_and_task_metrics():
    wr = win_rate([1.0, 2.0, 3.0, None, 0.5], [1.0, 1.0, 4.0, 0.0, 0.4])
    assert (wr["wins"], wr["ties"], wr["losses"], wr["skipped"]) == (2, 1, 1, 1)
    assert wr["win_rate"] == pytest.approx((2 + 0.5) / 4)
    assert win_rate([None], [1.0])["win_rate"] is None

    texts = ["a b a b", "a c"]  # 1-grams: a b a b a c -> {a, b, c}; 2-grams: ab ba ab ac -> 3 distinct of 4
    assert distinct_n(texts, 1) == pytest.approx(3 / 6)
    assert distinct_n(texts, 2) == pytest.approx(3 / 4)
    assert distinct_n(["", "a"], 2) == 0.0

    ms = mean_std([1.0, None, 3.0])
    assert (ms["mean"], ms["std"], ms["none"], ms["n"]) == (2.0, 1.0, 1, 2)

    toy = task_metrics(["Итого: 365 рублей.", "Итого: 365 рублей", "Итого: 300 рублей.", "365"],
                       [365, 365, 365, 365], "toy")
    assert toy["accuracy"] == 0.5 and toy["format_rate"] == 0.5
    g = task_metrics(["#### 72", "72", "x"], ["... #### 72", "#### 72", "no number"], "gsm8k")
    assert g["accuracy"] == 0.5 and g["format_rate"] == 0.5 and g["unscored"] == 1


# --------------------------------------------------------------------------- prompting modes


def test_few_shot_prompts_are_seeded_and_have_k_examples():
    pool = [prompting.Example([{"role": "user", "content": f"q{i}"}], f"a{i}") for i in range(10)]
    query = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "q3"}]
    ex = prompting.draw_examples(pool, 3, seed=0, index=5, query=query)
    assert len(ex) == 3 and len(set(e.answer for e in ex)) == 3
    assert all(e.prompt[0]["content"] != "q3" for e in ex)  # the query itself is never an example
    assert ex == prompting.draw_examples(pool, 3, seed=0, index=5, query=query)
    draws = {tuple(e.answer for e in prompting.draw_examples(pool, 3, seed=s, index=i, query=query))
             for s in range(3) for i in range(3)}
    assert len(draws) > 5  # different seeds / prompts get different examples

    chat = prompting.few_shot_prompt(query, ex, "chat")
    assert chat[0] == {"role": "system", "content": "be brief"}
    roles = [m["role"] for m in chat[1:]]
    assert roles == ["user", "assistant"] * 3 + ["user"]
    assert [m["content"] for m in chat[2:7:2]] == [e.answer for e in ex] and chat[-1]["content"] == "q3"

    plain = prompting.few_shot_prompt(query, ex, "plain")
    assert [m["role"] for m in plain] == ["system", "user"]
    want = "".join(f"{e.prompt[0]['content']}\n{e.answer}\n\n" for e in ex) + "q3"
    assert plain[1]["content"] == want
    assert prompting.few_shot_prompt("Q:", ex, "plain") == want[:-2] + "Q:"

    built = prompting.build_prompts([query, query], "few_shot", pool=pool, k=2, seed=1)
    assert len(built[0]) == len(built[1]) == 1 + 2 * 2 + 1
    with pytest.raises(Exception, match="fewer than few_shot_k=20"):
        prompting.build_prompts([query], "few_shot", pool=pool, k=20)


def test_cot_reflect_and_final_answer():
    p = [{"role": "user", "content": "2+2?"}]
    assert prompting.cot_prompt(p, "Think.")[-1]["content"] == "2+2?\n\nThink."
    assert p[-1]["content"] == "2+2?"  # not modified in place
    r = prompting.reflect_prompt(p, "5", "Check it.")
    assert r == p + [{"role": "assistant", "content": "5"}, {"role": "user", "content": "Check it."}]
    assert prompting.reflect_prompt("Q: 2+2?\nA:", " 5", "Check it.") == "Q: 2+2?\nA: 5\nCheck it.\n"
    assert prompting.final_answer("2 + 2 = 4\nИтого: 4 рублей.\n\n") == "Итого: 4 рублей."
    assert prompting.final_answer("") == ""


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def toy_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("evaldata")
    prompts = world.write_jsonl(world.prompt_rows(4, seed=0, split="eval"), d / "prompts.jsonl")
    pool = world.write_jsonl(world.prompt_rows(12, seed=0, split="train"), d / "pool.jsonl")
    sft = world.write_jsonl(world.sft_rows(5, seed=0, split="eval"), d / "sft.jsonl")
    return prompts, pool, sft


@pytest.fixture(scope="module")
def other_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model's tokenizer with differently initialised weights."""
    d = tmp_path_factory.mktemp("other_model")
    for f in tiny_model_dir.iterdir():
        if "token" in f.name or f.name.endswith(".jinja"):
            shutil.copy(f, d / f.name)
    from transformers import AutoTokenizer

    build_tiny_model(d, len(AutoTokenizer.from_pretrained(d)), seed=7)
    return d


def _independent_ppl(model_dir, sft_path) -> float:
    from alignkit.data.sft import load_sft_data
    from alignkit.models import load_model, load_tokenizer

    tok = load_tokenizer(str(model_dir))
    model = load_model(str(model_dir))
    rows, _ = load_sft_data(str(sft_path), "train", tok, 1024)
    total, count = 0.0, 0
    with torch.no_grad():
        for r in rows:
            logits = model(torch.tensor([r.input_ids])).logits[0, :-1].double()
            labels = torch.tensor(r.labels[1:])
            keep = labels != -100
            total += float(torch.nn.functional.cross_entropy(logits[keep], labels[keep], reduction="sum"))
            count += int(keep.sum())
    return math.exp(total / count)


def test_cli_eval_end_to_end_policy_equals_reference(tiny_model_dir, toy_files, tmp_path, capsys):
    prompts, pool, sft = toy_files
    out = tmp_path / "ev"
    rc = main(["eval", f"model={tiny_model_dir}", f"ref_model={tiny_model_dir}", f"prompts={prompts}", "reward=toy",
               "modes=[zero_shot,few_shot,cot,reflect]", f"few_shot_pool={pool}", "few_shot_k=2", "n_samples=2",
               "max_new_tokens=6", f"ppl_data={sft}", f"output_dir={out}", "batch_size=3", "num_show=2"])
    assert rc == 0
    printed = capsys.readouterr().out
    res = json.loads((out / "eval.json").read_text())
    assert list(res["modes"]) == ["zero_shot", "few_shot", "cot", "reflect"]
    assert res["task"] == "toy" and res["reward"] == "toy" and res["n_prompts"] == 4
    for mode, row in res["modes"].items():
        assert row["samples"] == 8
        assert row["kl_token"] == pytest.approx(0.0, abs=1e-6) and row["kl_seq"] == pytest.approx(0.0, abs=1e-5)
        assert row["k3_seq"] == pytest.approx(0.0, abs=1e-6)
        assert row["win_rate"] == 0.5 and row["ties"] == 8  # identical samples: every pair ties
        assert 0.0 <= row["accuracy"] <= 1.0 and row["reward"] is not None
        assert 0 < row["distinct_1"] <= 1 and 0 < row["tokens"] <= (12 if mode == "reflect" else 6)
        assert mode in printed
        assert len(res["samples"][mode]) == 2
    assert "first_completion" in res["samples"]["reflect"][0] and "answer" in res["samples"]["cot"][0]
    assert res["ppl"]["ppl"] == pytest.approx(_independent_ppl(tiny_model_dir, sft), rel=1e-4)
    assert res["ref_ppl"]["ppl"] == pytest.approx(res["ppl"]["ppl"])
    assert "KL/token" in printed and "perplexity on" in printed and "completion (model):" in printed


def test_win_rate_and_kl_against_another_model(tiny_model_dir, other_model_dir, toy_files, tmp_path):
    prompts, _, _ = toy_files
    rew = tmp_path / "lenrew.py"
    rew.write_text("def fn(prompts, completions):\n    return [float(len(c)) for c in completions]\n")
    cfg = EvalConfig(model=str(tiny_model_dir), ref_model=str(other_model_dir), prompts=str(prompts),
                     reward=f"{rew}:fn", n_samples=3, max_new_tokens=8, num_show=-1, output_dir=str(tmp_path / "o"),
                     task="none")
    res = evaluate(cfg, verbose=False)
    row = res["modes"]["zero_shot"]
    items = res["samples"]["zero_shot"]
    assert len(items) == 12
    pol = [float(len(it["completion"])) for it in items]
    ref = [float(len(it["ref_model_completion"])) for it in items]
    assert [it["reward"] for it in items] == pol
    wins = sum(p > r for p, r in zip(pol, ref)) + 0.5 * sum(p == r for p, r in zip(pol, ref))
    assert row["win_rate"] == pytest.approx(wins / 12)
    assert row["reward"] == pytest.approx(sum(pol) / 12)
    assert row["kl_seq"] != 0.0 and row["k3_seq"] > 0 and "accuracy" not in row

    # greedy answers: no KL (it needs samples), a note says so
    cfg2 = cfg.model_copy(update={"temperature": 0.0, "output_dir": str(tmp_path / "g"), "n_samples": 1})
    res2 = evaluate(cfg2, verbose=False)
    assert "kl_seq" not in res2["modes"]["zero_shot"]
    assert any("temperature > 0" in n for n in res2["notes"])


def test_eval_bad_input_is_one_line(tiny_model_dir, toy_files, tmp_path, capsys):
    prompts, _, _ = toy_files
    base = [f"model={tiny_model_dir}", f"output_dir={tmp_path}"]
    cases = [
        ([f"prompts={tmp_path}/missing.jsonl"], "missing.jsonl: prompts file not found"),
        ([f"prompts={prompts}", "reward=toyy"], "unknown reward source 'toyy': did you mean 'toy'"),
        ([f"prompts={prompts}", "mode=few_shot"], "mode few_shot needs few_shot_pool=FILE"),
        ([f"prompts={prompts}", "mode=fewshot"], "bad value for 'mode'"),
        ([], "nothing to evaluate"),
        ([f"prompts={prompts}", "prompt_column=question"], "no 'question' column for prompts"),
    ]
    for extra, needle in cases:
        assert main(["eval", *base, *extra]) == 2, extra
        err = capsys.readouterr().err.strip()
        assert needle in err and len(err.splitlines()) == 1, err


def test_prompt_combinations_are_enumerated_once():
    # guard for the exact-KL enumeration: 1 stop-first sequence + 4 x 5 two-token sequences
    seqs = [(STOP,)] + [(a, b) for a, b in itertools.product(range(V), range(V)) if a != STOP]
    assert len(seqs) == len(exact_sequences(tiny_vocab_lm(0))) == 21
