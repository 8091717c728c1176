"""Multi-turn, tool-using rollouts: loss masks, token identity, tool failures, turn limits, the
recipes on episodes, SFT on tool transcripts and bad input.

Tokenizers are built here with the `tokenizers` library in the styles of real tool-calling
families: ChatML with a Hermes tool block (Qwen2.5-like), Llama-3 (tool results as `ipython`
turns) and a reasoning template that drops the <think> block of every assistant turn before the
latest user or tool message (so history re-renders differently after each tool result)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from alignkit.rollout.agents import Agent, ToolEnv, load_tools, make_tool, parse_tool_calls, run_tool
from alignkit.rollout.engine import RolloutBatch, RolloutEngine, Sample, SamplingParams
from alignkit.rollout.multiturn import collect, collect_episodes

pytestmark = pytest.mark.usefixtures("one_thread")

CORPUS = [
    "What is the capital of France? The capital of France is Paris.",
    'lookup key value tool_call name arguments {"a": 1} answer think',
    "The quick brown fox jumps over the lazy dog. 0123456789 + - * /",
] * 20

TOOLS_BLOCK = (
    "{%- if tools %}{{- '<|im_start|>system\\n# Tools\\n<tools>' }}{%- for t in tools %}{{- '\\n' + (t | tojson) }}"
    "{%- endfor %}{{- '\\n</tools><|im_end|>\\n' }}{%- endif %}"
)
CHATML_TOOLS = TOOLS_BLOCK + (
    "{%- for m in messages %}"
    "{%- if m.role == 'tool' %}"
    "{{- '<|im_start|>user\\n<tool_response>\\n' + m.content + '\\n</tool_response><|im_end|>\\n' }}"
    "{%- elif m.role == 'assistant' %}{{- '<|im_start|>assistant\\n' + m.content }}"
    "{%- for c in m.tool_calls or [] %}"
    "{{- '<tool_call>' + ({'name': c.function.name, 'arguments': c.function.arguments} | tojson) + '</tool_call>' }}"
    "{%- endfor %}{{- '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
LLAMA3_TOOLS = (
    "{{- bos_token }}"
    "{%- if tools %}{{- '<|start_header_id|>system<|end_header_id|>\\n\\nTools: ' + (tools | tojson) + '<|eot_id|>' }}"
    "{%- endif %}"
    "{%- for m in messages %}{%- set role = 'ipython' if m.role == 'tool' else m.role %}"
    "{{- '<|start_header_id|>' + role + '<|end_header_id|>\\n\\n' + m.content | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
# reasoning kept only for assistant turns after the last user *or tool* message
REASONING_TOOLS = TOOLS_BLOCK + (
    "{%- set ns = namespace(last=-1) %}"
    "{%- for m in messages %}{%- if m.role in ['user', 'tool'] %}{%- set ns.last = loop.index0 %}{%- endif %}"
    "{%- endfor %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'assistant' %}"
    "{%- set body = m.content %}{%- set thought = '' %}"
    "{%- if '</think>' in body %}"
    "{%- set thought = body.split('</think>')[0].split('<think>')[-1].strip('\\n') %}"
    "{%- set body = body.split('</think>')[-1].lstrip('\\n') %}{%- endif %}"
    "{%- if loop.index0 > ns.last %}"
    "{{- '<|im_start|>assistant\\n<think>\\n' + thought + '\\n</think>\\n\\n' + body + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>assistant\\n' + body + '<|im_end|>\\n' }}{%- endif %}"
    "{%- elif m.role == 'tool' %}"
    "{{- '<|im_start|>user\\n<tool_response>\\n' + m.content + '\\n</tool_response><|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
STYLES = {"chatml": CHATML_TOOLS, "llama3": LLAMA3_TOOLS, "reasoning": REASONING_TOOLS}


def build_tokenizer(kind: str, out: Path | None = None):
    """A byte-level BPE tokenizer in the style `kind` (chatml | llama3 | reasoning)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    llama = kind == "llama3"
    specials = (["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
                if llama else ["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainer=trainers.BpeTrainer(
        vocab_size=400, min_frequency=2, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    if llama:
        bos = "<|begin_of_text|>"
        tok.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                          special_tokens=[(bos, tok.token_to_id(bos))])])
        kw = dict(bos_token=bos, eos_token="<|eot_id|>", pad_token="<|end_of_text|>",
                  additional_special_tokens=specials[2:])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        kw = dict(eos_token="<|im_end|>", pad_token="<|endoftext|>", additional_special_tokens=specials[1:])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, **kw)
    hf.chat_template = STYLES[kind]
    if out is not None:
        hf.save_pretrained(out)
    return hf


def lookup(key: str) -> str:
    """Look a key up in the store.

    Args:
        key: The key to look up.
    """
    return f"got-{key}"


SCRIPT = [
    '<think>\nneed a</think>\n<tool_call>{"name": "lookup", "arguments": {"key": "a"}}</tool_call>',
    '<think>\nneed b</think>\n<tool_call>{"name": "lookup", "arguments": {"key": "b"}}</tool_call>',
    "<think>\ndone</think>\nThe answer is ab.",
]


def char_ids(tok, text: str) -> list[int]:
    """A valid but non-canonical tokenisation (one piece per character), as a sampler may produce."""
    return [i for ch in text for i in tok(ch, add_special_tokens=False)["input_ids"]]


class ScriptedEngine:
    """An engine whose 'model' follows SCRIPT: turn k (k = tool results seen so far) answers SCRIPT[k],
    sampled character by character, then the end-of-turn token. Records every id it returns."""

    def __init__(self, tok, script=SCRIPT):
        self.tok, self.script = tok, script
        self.stop_ids = {tok.eos_token_id}
        self.pad_id = tok.pad_token_id
        self.sampled: list[list[int]] = []

    def generate(self, model, prompts, params):
        samples = []
        for pi, ids in enumerate(prompts):
            k = min(self.tok.decode(ids).count("got-"), len(self.script) - 1)
            for _ in range(params.n):
                comp = char_ids(self.tok, self.script[k]) + [self.tok.eos_token_id]
                self.sampled.append(comp)
                samples.append(Sample(pi, list(ids), comp, [-0.5] * len(comp), self.script[k], "eos"))
        return RolloutBatch(samples, params.n)


def tool_agent(tools, max_turns=4, timeout=2.0):
    by_name = {t.name: t for t in tools}
    return Agent(lambda: ToolEnv(by_name, "hermes", timeout), [t.schema for t in tools], max_turns)


PROMPT = [{"role": "user", "content": "What is a and b?"}]


@pytest.mark.parametrize("kind", ["chatml", "llama3", "reasoning"])
def test_trained_tokens_are_the_models_own_text_and_end_of_turn(kind):
    tok = build_tokenizer(kind)
    eng = ScriptedEngine(tok)
    eps, stats = collect_episodes(eng, None, [PROMPT], {}, SamplingParams(n=2, max_new_tokens=200),
                                  tool_agent([make_tool(lookup)]))
    eot = tok.decode([tok.eos_token_id])
    for e in eps:
        assert e.turns == 3 and e.tool_calls == 2 and e.tool_errors == 0 and e.finish_reason == "eos"
        assert tok.decode(e.sampled_ids) == "".join(s + eot for s in SCRIPT)
        # everything else is the template's and the tools': tool results appear there, never trained
        env_text = tok.decode([t for t, m in zip(e.completion_ids, e.trained) if not m])
        assert "got-a" in env_text and "got-b" in env_text and "need" not in env_text
        assert e.text == SCRIPT[-1]
        # the loss mask built by the recipes' tensors covers exactly those tokens
        t = RolloutBatch([e], 1).tensors(eng.pad_id)
        assert t["targets"][t["completion_mask"]].tolist() == e.sampled_ids
        assert (t["old_logps"] != 0).sum() == len(e.sampled_ids)
    assert stats["tool_calls"] == 4 and stats["generated_tokens"] == sum(len(s) for s in eng.sampled)
    if kind != "reasoning":  # prefix-stable templates: the whole sequence reads as the template renders it
        full = tok.decode(eps[0].prompt_ids + eps[0].completion_ids)
        rendered = tok.apply_chat_template(eps[0].messages, tools=[make_tool(lookup).schema], tokenize=False)
        assert rendered.startswith(full) and not rendered[len(full):].strip()  # the newline after the last turn


@pytest.mark.parametrize("kind", ["chatml", "reasoning"])
def test_trained_ids_are_the_sampled_ids_and_rerendering_would_differ(kind):
    tok = build_tokenizer(kind)
    eng = ScriptedEngine(tok)
    eps, _ = collect_episodes(eng, None, [PROMPT, PROMPT], {}, SamplingParams(n=2, max_new_tokens=200),
                              tool_agent([make_tool(lookup)]))
    # every episode's trained ids are, turn by turn, the ids the engine returned
    turns = iter(eng.sampled)
    by_turn = {}
    for e in eps:
        for a, b in e.spans:
            by_turn.setdefault(id(e), []).append(e.completion_ids[a:b])
    flat = [x for e in eps for x in by_turn[id(e)]]
    assert sorted(map(tuple, flat)) == sorted(map(tuple, turns))
    for e in eps:
        assert e.sampled_ids == [t for a, b in e.spans for t in e.completion_ids[a:b]]
    # re-rendering the conversation and tokenising it again gives other ids: the sampled turns are
    # non-canonical, and the reasoning template even rewrites the earlier turns' text
    e = eps[0]
    again = tok(tok.apply_chat_template(e.messages, tools=[make_tool(lookup).schema], tokenize=False),
                add_special_tokens=False)["input_ids"]
    assert again != e.prompt_ids + e.completion_ids
    if kind == "reasoning":
        assert "need a" not in tok.decode(again) and "need a" in tok.decode(e.completion_ids)


def raises(x: int) -> int:
    """Always fails.

    Args:
        x: Anything.
    """
    raise RuntimeError("boom")


def sleeps(x: int) -> int:
    """Sleeps too long.

    Args:
        x: Anything.
    """
    time.sleep(3)
    return x


def returns_object(x: int) -> int:
    """Returns something that is not text.

    Args:
        x: Anything.
    """
    return object()


@pytest.mark.parametrize("fn,err", [(raises, "raised RuntimeError: boom"), (sleeps, "timed out after 0.2 s"),
                                    (returns_object, "returned object, not text")])
def test_tool_failures_become_tool_messages_and_the_episode_goes_on(fn, err):
    tok = build_tokenizer("chatml")
    name = fn.__name__
    script = [f'<tool_call>{{"name": "{name}", "arguments": {{"x": 1}}}}</tool_call>', "got- final"]
    eng = ScriptedEngine(tok, script)
    # ScriptedEngine moves on when it sees "got-": make every tool message carry it via an env wrapper
    tools = [make_tool(fn)]
    agent = tool_agent(tools, timeout=0.2)
    base = agent.make_env

    class Tagged:
        def __init__(self):
            self.inner = base()
            self.stats = self.inner.stats

        def reset(self, row):
            return self.inner.reset(row)

        def step(self, msg):
            new, r, done = self.inner.step(msg)
            return [{**m, "content": m["content"] + " got-"} for m in new], r, done

    agent.make_env = Tagged
    t0 = time.time()
    eps, stats = collect_episodes(eng, None, [PROMPT], {}, SamplingParams(n=1, max_new_tokens=200), agent)
    e = eps[0]
    assert e.turns == 2 and e.tool_calls == 1 and e.tool_errors == 1
    tool_msg = [m for m in e.messages if m["role"] == "tool"][0]
    assert err in tool_msg["content"] and tool_msg["content"].startswith("Error:")
    assert time.time() - t0 < 2.5


def test_run_tool_results_and_malformed_calls():
    tools = {t.name: t for t in [make_tool(lookup)]}
    assert run_tool(tools, parse_tool_calls('<tool_call>{"name": "lookup", "arguments": {"key": "k"}}</tool_call>')[0],
                    1) == ("got-k", False)
    bad = parse_tool_calls("<tool_call>{not json}</tool_call> and <tool_call>{")
    assert len(bad) == 2 and all(c.error for c in bad)
    text, err = run_tool(tools, parse_tool_calls('<tool_call>{"name": "nope", "arguments": {}}</tool_call>')[0], 1)
    assert err and "unknown tool 'nope'" in text
    calls = parse_tool_calls("CALL lookup(k1)", r"CALL (?P<name>\w+)\((?P<arguments>)\w+\)")
    assert calls[0].name == "lookup"


def test_max_turns_is_honoured():
    tok = build_tokenizer("chatml")
    eng = ScriptedEngine(tok, [SCRIPT[0]])  # calls a tool forever
    eps, stats = collect_episodes(eng, None, [PROMPT], {}, SamplingParams(n=1, max_new_tokens=200),
                                  tool_agent([make_tool(lookup)], max_turns=3))
    assert eps[0].turns == 3 and eps[0].finish_reason == "max_turns" and len(eng.sampled) == 3


class Quiz:
    """An environment with per-turn rewards: asks twice, 0.5 per turn that says 'Paris'."""

    def __init__(self):
        self.n = 0

    def reset(self, row):
        return list(row["prompt"])

    def step(self, message):
        self.n += 1
        r = 0.5 if "Paris" in message["content"] else 0.0
        return [{"role": "user", "content": "Again?"}], r, self.n >= 2


def test_environment_rewards_sum_over_turns_and_real_engine_ids_are_kept(tmp_path):
    from conftest import build_tiny_model

    tok = build_tokenizer("chatml", tmp_path)
    model = build_tiny_model(tmp_path, len(tok))
    eng = RolloutEngine(tok)
    calls = []
    real = eng.generate

    def spy(model, prompts, params):
        out = real(model, prompts, params)
        calls.extend(s.completion_ids for s in out.samples)
        return out

    eng.generate = spy
    agent = Agent(Quiz, None, 4)
    ro = collect(eng, model, [PROMPT, PROMPT], {}, SamplingParams(n=2, max_new_tokens=6, seed=3), None, agent)
    assert len(ro) == 4 and all(e.turns == 2 for e in ro.samples)
    assert sorted(map(tuple, calls)) == sorted(tuple(e.completion_ids[a:b]) for e in ro.samples for a, b in e.spans)
    for e, r in zip(ro.samples, ro.rewards.tolist()):
        assert r == sum(x for x in e.env_rewards if x is not None)


def test_sft_on_tool_transcripts_trains_only_assistant_turns_with_their_calls(tmp_path):
    from alignkit.data.sft import load_sft_data

    tok = build_tokenizer("chatml")
    call = {"type": "function", "function": {"name": "lookup", "arguments": {"key": "a"}}}
    rows = [{"messages": [{"role": "user", "content": "What is a?"},
                          {"role": "assistant", "content": None, "tool_calls": [call]},
                          {"role": "tool", "name": "lookup", "content": "got-a"},
                          {"role": "assistant", "content": "It is got-a."}],
             "tools": json.dumps([make_tool(lookup).schema])}] * 2
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    encs, _ = load_sft_data(str(path), "train", tok, 512)
    e = encs[0]
    trained = tok.decode([t for t, l in zip(e.input_ids, e.labels) if l != -100])
    assert trained == ('<tool_call>{"name": "lookup", "arguments": {"key": "a"}}</tool_call><|im_end|>'
                       "It is got-a.<|im_end|>")
    full = tok.decode(e.input_ids)
    assert "<tools>" in full and "<tool_response>\ngot-a" in full  # tools listed, result given as context


# --------------------------------------------------------------------------- recipes on episodes

ENV_SRC = '''
class Quiz:
    """Two turns; each turn's reward is half its share of digits (per-turn rewards)."""

    def __init__(self):
        self.n = 0

    def reset(self, row):
        return list(row["prompt"])

    def step(self, message):
        self.n += 1
        t = message["content"]
        return [{"role": "user", "content": "Again?"}], sum(c.isdigit() for c in t) / max(len(t), 1) / 2, self.n >= 2
'''


@pytest.fixture(scope="module")
def env_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("env") / "quiz_env.py"
    p.write_text(ENV_SRC)
    return p


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    from conftest import write_jsonl

    d = tmp_path_factory.mktemp("agent_prompts")
    return write_jsonl(d / "p.jsonl", [{"prompt": f"Сколько будет {i} плюс {i}?"} for i in range(16)])


@pytest.mark.parametrize("name", ["grpo", "rloo", "reinforce", "rs", "ppo"])
def test_recipes_train_on_episodes(name, tiny_model_dir, prompts, env_file, tmp_path, monkeypatch):
    import test_resume
    from alignkit.recipes import online as ol

    monkeypatch.setattr("alignkit.training.trainer.plot_metrics", lambda *a, **k: None)
    seen = []
    real = ol.OnlineRun.collect

    def spy(self, *a, **k):
        ro = real(self, *a, **k)
        seen.append(ro)
        return ro

    monkeypatch.setattr(ol.OnlineRun, "collect", spy)
    train, Config, kw, _ = test_resume.recipe(name)
    out = tmp_path / name
    train(Config(model=str(tiny_model_dir), data=str(prompts), output_dir=str(out), max_new_tokens=5, lr=1e-3,
                 progress=False, tensorboard=False, log_every=1, seed=0, env=f"{env_file}:Quiz", max_turns=3,
                 **{**kw, "save_every": 0, "sample_every": 1}))
    assert seen and all(len(ro) for ro in seen)
    for ro in seen:
        for e, r in zip(ro.samples, ro.rewards.tolist()):
            assert e.turns == 2 and len(e.spans) == 2
            assert not all(e.trained)  # the user's 'Again?' turn sits between the model's turns, untrained
            assert abs(r - sum(x for x in e.env_rewards if x is not None)) < 1e-6
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("turns" in r for r in recs)
    if (out / "samples.jsonl").exists():  # the transcript after the prompt: model turns and the env's messages
        s = json.loads((out / "samples.jsonl").read_text().splitlines()[0])
        assert [m["role"] for m in s["turns"]] == ["assistant", "user", "assistant"]


def test_grpo_on_episodes_resumes_bitwise(tiny_model_dir, env_file, tmp_path, monkeypatch):
    import test_resume

    real = test_resume.recipe

    def with_env(name):
        train, Config, kw, kill = real(name)
        return train, Config, {**kw, "env": f"{env_file}:Quiz", "max_turns": 2}, kill

    monkeypatch.setattr(test_resume, "recipe", with_env)
    monkeypatch.setattr("alignkit.training.trainer.plot_metrics", lambda *a, **k: None)
    from conftest import write_jsonl

    pf = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"Сколько будет {i} плюс {i}?"} for i in range(32)])
    test_resume.check_resume_equals_uninterrupted("grpo", tiny_model_dir, pf, tmp_path, monkeypatch)


def test_eval_reports_multi_turn_accuracy_and_tool_use(tiny_model_dir, env_file, tmp_path):
    from alignkit.config import EvalConfig
    from alignkit.eval.run import evaluate
    from conftest import write_jsonl

    pf = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"{i} + {i}?", "total": 2 * i} for i in range(4)])
    res = evaluate(EvalConfig(model=str(tiny_model_dir), prompts=str(pf), env=f"{env_file}:Quiz", max_turns=3,
                              max_new_tokens=4, temperature=1.0, ref_model=str(tiny_model_dir),
                              output_dir=str(tmp_path / "e")), verbose=False)
    row = res["modes"]["zero_shot"]
    assert row["turns"] == 2 and row["tool_calls"] == 0 and "accuracy" in row
    assert abs(row["kl_seq"]) < 1e-5  # the same weights: the per-turn segments line up with the sampled ids


def test_grpo_on_episodes_learns_the_per_turn_reward(tiny_model_dir, prompts, env_file, tmp_path, monkeypatch):
    from alignkit.config import GRPOConfig
    from alignkit.recipes.grpo import train_grpo

    monkeypatch.setattr("alignkit.training.trainer.plot_metrics", lambda *a, **k: None)
    out = tmp_path / "g"
    train_grpo(GRPOConfig(model=str(tiny_model_dir), data=str(prompts), output_dir=str(out), max_steps=24, iterations=2,
                          batch_size=4, num_generations=8, max_new_tokens=8, lr=3e-3, progress=False, tensorboard=False,
                          log_every=1, seed=0, env=f"{env_file}:Quiz", max_turns=2))
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"train"' in x]
    first = sum(r["reward_mean"] for r in recs[:4]) / 4
    last = sum(r["reward_mean"] for r in recs[-4:]) / 4
    assert last > first + 0.03, (first, last)


TURNS_ENV_SRC = '''
class Turns:
    """As many model turns as the row's `turns` column."""

    def reset(self, row):
        self.left = int(row["turns"])
        return list(row["prompt"])

    def step(self, message):
        self.left -= 1
        return [{"role": "user", "content": "Again?"}], 0.0, self.left <= 0
'''


def test_eval_kl_of_episodes_with_different_turn_counts(tiny_model_dir, tmp_path):
    """The KL to a reference is summed per episode over its own model turns, when episodes have
    different numbers of them (a first episode of 3 turns, then 1-turn ones: slicing every episode by
    the first one's count ran off the end); the environment sees the row's columns, as in training."""
    from conftest import write_jsonl

    from alignkit.config import EvalConfig
    from alignkit.eval.run import evaluate

    env = tmp_path / "turns_env.py"
    env.write_text(TURNS_ENV_SRC)
    pf = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"{i} + {i}?", "turns": 3 if i == 0 else 1} for i in range(4)])
    res = evaluate(EvalConfig(model=str(tiny_model_dir), prompts=str(pf), env=f"{env}:Turns", max_turns=3,
                              max_new_tokens=4, temperature=1.0, ref_model=str(tiny_model_dir), task="none",
                              output_dir=str(tmp_path / "e")), verbose=False)
    row = res["modes"]["zero_shot"]
    assert row["turns"] == (3 + 1 + 1 + 1) / 4
    assert abs(row["kl_seq"]) < 1e-5 and abs(row["kl_token"]) < 1e-6  # the same weights, segments aligned
