"""Reward sources: built-ins on hand-written strings, user functions, reward models, combination,
and the errors a user meets when a reward function misbehaves."""

from __future__ import annotations

import textwrap
import time

import pytest
import torch

from alignkit.config import EvalConfig, RewardSection, load_config
from alignkit.errors import UserError
from alignkit.rewards import (
    build_reward,
    extract_answer,
    gsm8k_number,
    last_number,
    load_gsm8k,
    load_prompt_set,
    parse_number,
    reference_number,
)

from conftest import SHARED_DATA, write_jsonl

TOY_OK = "Итого: 365 рублей."


def call(spec, completions, prompts=None, **cols):
    r = build_reward(spec)
    return r(prompts or ["p"] * len(completions), completions, **cols)


# --------------------------------------------------------------------------- numbers


@pytest.mark.parametrize("text, want", [
    ("1,000", 1000.0), ("1000.0", 1000.0), ("$72", 72.0), (" -3 ", -3.0), ("12,345,678.5", 12345678.5),
    ("abc", None), ("1,00", None), ("", None), ("7 8", None),
])
def test_parse_number(text, want):
    assert parse_number(text) == want


def test_number_extraction():
    assert last_number("We had 12 apples, gave 1,000 away, so -3.5 remain.") == -3.5
    assert last_number("no digits here") is None
    assert last_number("Итого: 365 рублей.") == 365.0  # the sentence period is not a decimal point
    assert gsm8k_number("48/2 = <<48/2=24>>24\n#### 72") == 72.0
    assert gsm8k_number("#### 1,000\nlater #### $5") == 5.0  # the last one counts
    assert gsm8k_number("72") is None
    assert reference_number("Natalia sold ... \n#### 72") == 72.0
    assert reference_number("Итого: 365 рублей.") == 365.0
    assert reference_number(365) == 365.0 and reference_number(None) is None and reference_number("none") is None
    assert extract_answer("Сначала 100 + 265. Итого: 365 рублей.", "toy") == 365.0
    assert extract_answer("365", "toy") is None


# --------------------------------------------------------------------------- built-ins


def test_toy_reward_is_the_toy_rule():
    comps = [TOY_OK, "Итого: 360 рублей.", "Итого: 365 рублей", "Ответ: 365", "  Итого: 365 рублей.\n", TOY_OK]
    got = call("toy", comps, total=[365, 365, 365, 365, 365, None])
    assert got == [1.0, 0.1, 0.0, 0.0, 1.0, None]
    # a total given as text works the same
    assert call("toy", [TOY_OK], total=["365"]) == [1.0]


def test_toy_reward_needs_total_column():
    with pytest.raises(UserError, match=r"reward 'toy' needs a 'total' column .*columns: answer"):
        call("toy", [TOY_OK], answer=["x"])


def test_exact_number_modes():
    ref = ["Natalia sold 48/2 = 24 clips in May.\n#### 72"] * 6
    comps = ["So 48 + 24 = 72.\n#### 72", "#### 72.0", "The answer is 72", "#### 71", "no idea", "#### 1,072"]
    assert call("gsm8k", comps, answer=ref) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    assert call("last_number", comps, answer=ref) == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    # thousands separators and trailing .0 on either side
    refs = ["#### 1000", "#### 1,000", "x #### 1000.00"]
    assert call("gsm8k", ["#### 1,000", "#### 1000.0", "#### 1000"], answer=refs) == [1.0, 1.0, 1.0]
    # toy mode reads `Итого: X рубл...` against the total column (default column when present)
    spec = [{"source": "exact_number", "args": {"mode": "toy"}}]
    assert call(spec, ["Считаю: 100 + 265 = 365. Итого: 365 рублей.", "365"], total=[365, 365]) == [1.0, 0.0]
    # no number in the reference: cannot score
    assert call("gsm8k", ["#### 3"], answer=["no final answer"]) == [None]
    # explicit reference column
    spec = [{"source": "last_number", "args": {"column": "target"}}]
    assert call(spec, ["it is 3", "it is 4"], target=[3, "3"]) == [1.0, 0.0]


def test_regex_and_length_penalty():
    fmt = [{"source": "regex", "args": {"pattern": r"Итого: \d+ рублей\.", "fullmatch": True}}]
    assert call(fmt, [TOY_OK, f"Ответ. {TOY_OK}", " Итого: 12 рублей. "]) == [1.0, 0.0, 1.0]
    anywhere = [{"source": "regex", "args": {"pattern": r"\d+ рублей"}}]
    assert call(anywhere, [f"Ответ. {TOY_OK}", "нет"]) == [1.0, 0.0]

    lp = [{"source": "length_penalty", "args": {"target": 5, "coef": 0.5}}]
    assert call(lp, ["abcdefg", "abc", ""]) == [-1.0, 0.0, 0.0]
    words = [{"source": "length_penalty", "args": {"target": 1, "coef": 2.0, "unit": "words"}}]
    assert call(words, ["one two three", "one"]) == [-4.0, 0.0]

    class Tok:  # two characters per token
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": list(range((len(text) + 1) // 2))}

    toks = build_reward([{"source": "length_penalty", "args": {"target": 2, "coef": 1.0, "unit": "tokens"}}],
                        tokenizer=Tok())
    assert toks(["p", "p"], ["abcdefgh", "ab"]) == [-2.0, 0.0]


def test_builtin_argument_errors():
    with pytest.raises(UserError, match=r"reward 'regex' needs a pattern"):
        build_reward("regex")
    with pytest.raises(UserError, match=r"reward 'regex': bad pattern"):
        build_reward([{"source": "regex", "args": {"pattern": "("}}])
    with pytest.raises(UserError, match=r"reward 'exact_number': unknown argument 'mdoe'; valid: mode, column, tol"):
        build_reward([{"source": "exact_number", "args": {"mdoe": "toy"}}])
    with pytest.raises(UserError, match=r"unit=tokens needs a tokenizer"):
        build_reward([{"source": "length_penalty", "args": {"unit": "tokens"}}])
    with pytest.raises(UserError, match=r"unknown reward source 'toyy': did you mean 'toy'"):
        build_reward("toyy")


# --------------------------------------------------------------------------- user functions


def _write(tmp_path, name, body):
    p = tmp_path / name
    p.write_text(textwrap.dedent(body))
    return p


def test_function_from_file_and_module(tmp_path, monkeypatch):
    f = _write(tmp_path, "myrew.py", """
        def by_total(prompts, completions, total):
            return [float(len(c)) - t for c, t in zip(completions, total)]

        def with_kwargs(prompts, completions, **columns):
            return [float(sorted(columns) == ["answer", "total"]) for _ in completions]
    """)
    # file path: gets only the column it names, even when the data has more
    got = call(f"{f}:by_total", ["ab", "abcd"], total=[1, 2], answer=["x", "y"])
    assert got == [1.0, 2.0]
    # module name: a function with **columns gets every column
    monkeypatch.syspath_prepend(str(tmp_path))
    assert call("myrew:with_kwargs", ["a"], total=[1], answer=["x"]) == [1.0]

    with pytest.raises(UserError, match=r"takes 'total' but the prompt set has no such column \(columns: answer\)"):
        call(f"{f}:by_total", ["a"], answer=["x"])
    with pytest.raises(UserError, match=r"has no function 'nope'; it defines: by_total, with_kwargs"):
        build_reward(f"{f}:nope")
    with pytest.raises(UserError, match=r"no module named 'not_a_module_xyz'"):
        build_reward("not_a_module_xyz:fn")
    with pytest.raises(UserError, match=r"file .*missing.py not found"):
        build_reward(f"{tmp_path}/missing.py:fn")


def test_a_function_may_return_tensors_and_none():
    def fn(prompts, completions):
        return torch.tensor([0.5, 2.0])

    assert call(fn, ["a", "b"]) == [0.5, 2.0]
    assert call(lambda p, c: [None, 1], ["a", "b"]) == [None, 1.0]


def test_bad_functions_give_one_clear_line(tmp_path):
    f = _write(tmp_path, "bad.py", """
        def raises(prompts, completions):
            out = []
            for c in completions:
                if c == "bad":
                    raise ValueError("cannot parse " + c)
                out.append(1.0)
            return out

        def short(prompts, completions):
            return [1.0]

        def text(prompts, completions):
            return [1.0, "high"]

        def scalar(prompts, completions):
            return 1.0

        def nan(prompts, completions):
            return [float("nan")] * len(completions)

        def no_args():
            return []
    """)
    cases = [
        ("raises", r"reward '.*bad.py:raises' raised ValueError: cannot parse bad on sample 2 \(completion 'bad'\)"),
        ("short", r"reward '.*bad.py:short' returned 1 values for 3 completions"),
        ("scalar", r"reward '.*bad.py:scalar' returned a single float; it must return a list"),
        ("nan", r"reward '.*bad.py:nan' returned nan for sample 0"),
    ]
    for fn, pattern in cases:
        with pytest.raises(UserError, match=pattern) as e:
            call(f"{f}:{fn}", ["ok", "ok2", "bad"])
        assert "\n" not in str(e.value)
    with pytest.raises(UserError, match=r"reward '.*:text' returned str 'high' for sample 1"):
        call(f"{f}:text", ["a", "b"])
    with pytest.raises(UserError, match=r"must accept \(prompts, completions, \*\*columns\)"):
        build_reward(f"{f}:no_args")


def test_slow_function_timeout():
    def slow(prompts, completions):
        time.sleep(1.5)
        return [1.0] * len(completions)

    t0 = time.time()
    with pytest.raises(UserError, match=r"reward 'test_slow_function_timeout.<locals>.slow' took longer than its "
                                        r"timeout of 0.2 s on a call with 2 samples"):
        build_reward([{"source": "length_penalty"}, _term(slow, timeout=0.2)])(["p", "p"], ["a", "b"])
    assert time.time() - t0 < 1.2
    r = build_reward([_term(slow, timeout=0.2, on_timeout="none")])
    assert r(["p", "p"], ["a", "b"]) == [None, None] and r.timeouts == 1
    # fast enough: the value comes through the thread unchanged
    quick = build_reward([_term(lambda p, c: [3.0] * len(c), timeout=5)])
    assert quick(["p"], ["a"]) == [3.0]


def _term(fn, **kw):
    from alignkit.rewards import RewardTermFn, _Callable

    name = getattr(fn, "__qualname__", "fn")
    return RewardTermFn(_Callable(fn, name), name, **kw)


def test_timeout_config_reaches_the_term(tmp_path):
    f = _write(tmp_path, "sl.py", """
        import time
        def fn(prompts, completions):
            time.sleep(1.0)
            return [0.0] * len(completions)
    """)
    r = build_reward([{"source": f"{f}:fn", "timeout": 0.1, "on_timeout": "none"}])
    assert r(["p"], ["a"]) == [None]


# --------------------------------------------------------------------------- reward models


class StandIn(torch.nn.Module):
    """A reward-model stand-in: a linear score of (completion length, digits in it)."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(2, 1)
        with torch.no_grad():
            self.lin.weight.copy_(torch.tensor([[0.5, -2.0]]))
            self.lin.bias.fill_(1.0)
        self.calls = []

    def score(self, prompts, responses):
        self.calls.append((list(prompts), list(responses)))
        x = torch.tensor([[float(len(r)), float(sum(ch.isdigit() for ch in r))] for r in responses])
        return self.lin(x).squeeze(-1).detach()


def test_reward_model_object_and_folder(tmp_path, monkeypatch):
    rm = StandIn()
    prompts = [[{"role": "user", "content": "q"}], "plain"]
    got = build_reward(rm)(prompts, ["ab", "a1"], total=[1, 2])
    assert got == pytest.approx([0.5 * 2 + 1, 0.5 * 2 - 2 + 1])
    assert rm.calls[-1] == (prompts, ["ab", "a1"])  # prompts reach the model as given

    # a folder goes through RewardModel.from_pretrained(path)
    import sys
    import types

    loaded = {}

    class FakeRM:
        @classmethod
        def from_pretrained(cls, path, device="cpu"):
            loaded["path"] = path
            return rm

    fake = types.ModuleType("alignkit.models.reward")
    fake.RewardModel = FakeRM
    monkeypatch.setitem(sys.modules, "alignkit.models.reward", fake)
    folder = tmp_path / "rm"
    folder.mkdir()
    (folder / "config.json").write_text('{"architectures": ["LlamaForSequenceClassification"]}')
    r = build_reward(f"{folder} + 2*toy")
    assert loaded["path"] == str(folder)
    assert r(["p"], [TOY_OK], total=[365]) == pytest.approx([0.5 * len(TOY_OK) - 2 * 3 + 1 + 2.0])

    class Broken:
        @classmethod
        def from_pretrained(cls, path, device="cpu"):
            raise OSError("no weights in folder")

    fake.RewardModel = Broken
    with pytest.raises(UserError, match=r"could not load a reward model \(OSError: no weights in folder\)"):
        build_reward(str(folder))


# --------------------------------------------------------------------------- combination and config


def test_weighted_combination_and_none():
    r = build_reward("toy + 0.5*last_number + -0.1*length_penalty")
    comps = [TOY_OK, "Итого: 300 рублей.", "nothing"]
    per = r.score_terms(["p"] * 3, comps, total=[365, 365, None])
    assert per["toy"] == [1.0, 0.1, None]
    assert per["last_number"] == [1.0, 0.0, None]
    lens = [len(c) for c in comps]
    assert per["length_penalty"] == [-0.01 * n for n in lens]
    got = r(["p"] * 3, comps, total=[365, 365, None])
    assert got[0] == pytest.approx(1.0 + 0.5 + 0.1 * 0.01 * lens[0])
    assert got[1] == pytest.approx(0.1 + 0.0 + 0.1 * 0.01 * lens[1])
    assert got[2] is None  # some source could not score it
    filled = build_reward({"terms": [{"source": "toy"}], "none_as": 0.0})
    assert filled(["p"], ["x"], total=[None]) == [0.0]
    assert r.name == "toy + 0.5*last_number + -0.1*length_penalty"
    # the same source twice gets distinct keys
    twice = build_reward("toy + 2*toy")
    assert list(twice.score_terms(["p"], [TOY_OK], total=[365])) == ["toy#0", "toy#1"]
    assert twice(["p"], [TOY_OK], total=[365]) == [3.0]


def test_reward_section_from_cli_and_yaml(tmp_path):
    cfg = load_config(EvalConfig, None, ["reward=toy"])
    assert [t.source for t in cfg.reward.terms] == ["toy"]
    cfg = load_config(EvalConfig, None, ["reward=toy + 0.5*mymod:fn"])
    assert [(t.source, t.weight) for t in cfg.reward.terms] == [("toy", 1.0), ("mymod:fn", 0.5)]
    y = tmp_path / "e.yaml"
    y.write_text('reward:\n  - {source: toy, weight: 1.0}\n  - {source: "mymod:fn", weight: 0.5, timeout: 2}\n'
                 'judge: gsm8k\n')
    cfg = load_config(EvalConfig, str(y))
    t = cfg.reward.terms[1]
    assert (t.source, t.weight, t.timeout, t.on_timeout) == ("mymod:fn", 0.5, 2.0, "error")
    assert cfg.judge.terms[0].source == "gsm8k"
    with pytest.raises(UserError, match=r"bad value for 'reward.terms.wieght'"):
        load_config(EvalConfig, None, ["reward=[{source: toy, wieght: 2}]"])
    with pytest.raises(UserError, match=r"bad value for 'reward'.*bad weight 'x'"):
        load_config(EvalConfig, None, ["reward=x*toy"])
    sec = RewardSection.model_validate([{"source": "toy", "timeout": 1}])
    assert build_reward(sec)(["p"], [TOY_OK], total=[365]) == [1.0]


# --------------------------------------------------------------------------- prompt sets


def test_gsm8k_prompt_set_and_reward():
    path = SHARED_DATA / "gsm8k-test.jsonl"
    if not path.is_file():
        pytest.skip("shared GSM8K data not present")
    rows = load_gsm8k(str(path), limit=25)
    assert len(rows) == 25
    r0 = rows[0]
    assert r0["prompt"] == [{"role": "user", "content": r0["question"]}] and "####" in r0["answer"]
    # the reference solution scores 1 against itself; its last line's number is the target
    answers = [r["answer"] for r in rows]
    assert call("gsm8k", answers, answer=answers) == [1.0] * 25
    targets = [float(a.rsplit("####", 1)[1].strip().replace(",", "")) for a in answers]
    wrong = [f"#### {t + 1:g}" for t in targets]
    assert call("gsm8k", wrong, answer=answers) == [0.0] * 25
    text_rows = load_prompt_set(str(path), prompt_column="question", chat=False, limit=2)
    assert text_rows[1]["prompt"] == text_rows[1]["question"]


def test_prompt_set_errors(tmp_path):
    p = write_jsonl(tmp_path / "p.jsonl", [{"question": "q", "answer": "#### 1"}])
    with pytest.raises(UserError, match=r"no 'prompt' column for prompts \(found: question, answer\); set "
                                        r"prompt_column=NAME"):
        load_prompt_set(str(p))
    bad = write_jsonl(tmp_path / "b.jsonl", [{"prompt": "ok"}, {"prompt": [{"role": "user", "content": "a"},
                                                                          {"role": "assistant", "content": "b"}]}])
    with pytest.raises(UserError, match=r"b.jsonl row 2: the prompt ends with an assistant message"):
        load_prompt_set(str(bad))
    nohash = write_jsonl(tmp_path / "g.jsonl", [{"question": "q", "answer": "72"}])
    with pytest.raises(UserError, match=r"g.jsonl row 1: 'answer' has no '#### <number>'"):
        load_gsm8k(str(nohash))


def test_a_none_reward_is_not_counted_as_zero():
    """A function that cannot score a sample returns None: it reaches the advantages as NaN, gets
    advantage 0 and a masked loss, and the group's statistics use the scored samples only."""
    from alignkit.advantages import group_normalized, leave_one_out, scored_mask
    from alignkit.rewards import rewards_tensor

    def judge(prompts, completions, **cols):
        return [None if c == "?" else float(c) for c in completions]

    vals = build_reward(judge)(["p"] * 4, ["?", "1", "0", "0"])
    assert vals == [None, 1.0, 0.0, 0.0]
    r = rewards_tensor(vals)
    assert r.dtype == torch.float32 and torch.isnan(r[0]) and r[1:].tolist() == [1.0, 0.0, 0.0]
    assert scored_mask(r).tolist() == [False, True, True, True]
    assert group_normalized(r, 4).tolist() == pytest.approx([0.0, 1.1547, -0.57735, -0.57735], abs=1e-4)
    assert leave_one_out(r, 4).tolist() == pytest.approx([0.0, 1.0, -0.5, -0.5])
    # none_as still substitutes a value inside the reward itself when a user asks for it
    assert rewards_tensor(build_reward({"terms": [{"source": "toy"}], "none_as": 0.0})(
        ["p"], ["x"], total=[None])).tolist() == [0.0]
