"""Multi-turn rollouts, token in and token out.

An episode alternates model turns and environment (tool) messages:

    ids = prompt ids                                   rendered once through the chat template
    loop up to max_turns:
        sampled = engine.generate(ids)                 the model's exact ids, kept as they are
        ids += sampled              trained            (its end-of-turn token included)
        new_messages, reward, done = env.step(assistant text)
        if done: stop
        ids += delta(new_messages)  not trained        rendered once, appended as ids

Nothing is ever re-tokenised: the model's ids are the engine's output, and an environment
message is turned into ids once, when it arrives. Its ids are the *delta* of the chat template:
the text the template writes after the assistant's turn (after its end-of-turn marker, e.g.
ChatML's newline), then the new messages, then the next generation prompt. It is read off a
rendering of the conversation whose last assistant turn is a placeholder, as the text after the
placeholder, so templates that re-render history (a reasoning template dropping earlier <think>
blocks) cannot shift it, and the history they re-render is never used: the ids trained are the
ids sampled, byte for byte.

Each turn of every live episode is generated in one engine call (the first turn shares each
prompt's prefill across its group). The result is a `Rollout` whose samples are `Episode`s: a
`Sample` whose `completion_ids` hold every token after the prompt, with `trained` marking the
model's own tokens; `RolloutBatch.tensors` puts targets (hence completion_mask, the loss mask
of every recipe) on those only, and the sampler log-probs are 0 elsewhere.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, replace
from typing import Callable

import torch

from alignkit.rollout.agents import Agent
from alignkit.rollout.engine import RolloutEngine, Sample, SamplingParams
from alignkit.rollout.rollout import Rollout

__all__ = ["Episode", "collect_episodes", "collect", "message_delta"]

PLACEHOLDER = "ALIGNKIT_TURN_PLACEHOLDER"


@dataclass
class Episode(Sample):
    """A multi-turn sample. completion_ids: every token after the prompt (the model's and the
    environment's); trained: one flag per completion token, True for the model's own sampled
    tokens; logprobs: the sampler's per completion token (0 on environment tokens); text: the
    last turn's text (what `reward=` scores); finish_reason: the last turn's, or "max_turns" /
    "context" when the episode was cut. spans: [start, end) of each model turn in
    completion_ids. messages: the conversation (prompt, assistant texts, environment messages)."""

    trained: list[bool] = field(default_factory=list)
    spans: list[tuple[int, int]] = field(default_factory=list)
    messages: list[dict] = field(default_factory=list)
    turns: int = 0
    tool_calls: int = 0
    tool_errors: int = 0
    malformed_calls: int = 0
    env_rewards: list = field(default_factory=list)

    @property
    def sampled_ids(self) -> list[int]:
        """The model's tokens, turn after turn (what was trained)."""
        return [t for t, m in zip(self.completion_ids, self.trained) if m]


def _render(tok, messages, tools, gen: bool) -> str:
    return tok.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=gen)


def message_delta(tok, history: list[dict], new_messages: list[dict], tools, end_text: str | None) -> list[int]:
    """Ids to append after a model turn that ended with `end_text` (the decoded end-of-turn token
    it sampled; None when it stopped without one) so the sequence reads as the chat template
    would write `history` + `new_messages` + the generation prompt. Only template text after the
    assistant's turn is produced; the model's tokens are never rendered. Raises ValueError when
    the template does not render the new messages after the history (not prefix-stable)."""
    base = [dict(m) for m in history] + [{"role": "assistant", "content": PLACEHOLDER}]
    after = _render(tok, base + list(new_messages), tools, True)
    if after.count(PLACEHOLDER) != 1:
        raise ValueError("the chat template does not render an assistant turn's content as it is; "
                         "set chat_template= to a template that does")
    tail = after[after.index(PLACEHOLDER) + len(PLACEHOLDER):]
    if end_text:  # the model already wrote the end-of-turn marker: keep only what follows it
        k = tail.find(end_text)
        if k >= 0:
            tail = tail[k + len(end_text):]
    text = tail
    return tok(text, add_special_tokens=False)["input_ids"] if text else []


def _context_limit(model) -> int | None:
    n = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return int(n) if n else None


@torch.inference_mode()
def collect_episodes(engine: RolloutEngine, model, prompts: list, columns: dict[str, list], params: SamplingParams,
                     agent: Agent) -> tuple[list[Episode], dict]:
    """Run `params.n` episodes per prompt, all live episodes of a turn generated together.
    Returns the episodes (grouped by prompt, like the engine's samples) and stats: generated
    tokens, turns, tool calls, tool errors, malformed calls."""
    tok = engine.tok
    eot_ids = engine.stop_ids
    limit = _context_limit(model)
    episodes: list[Episode] = []
    envs, convs = [], []
    for pi, p in enumerate(prompts):
        if not isinstance(p, list):
            raise ValueError("multi-turn rollouts need chat prompts (message lists); set chat_prompts=true")
        row = {"prompt": p, **{k: v[pi] for k, v in columns.items()}}
        for _ in range(params.n):
            env = agent.make_env()
            msgs = list(env.reset(row))
            ids = tok(_render(tok, msgs, agent.schemas, True), add_special_tokens=False)["input_ids"]
            envs.append(env)
            convs.append(msgs)
            episodes.append(Episode(pi, ids, [], [], "", "length", messages=list(msgs)))
    live = list(range(len(episodes)))
    turn = 0
    while live:
        turn += 1
        # the first turn of a group shares the prompt's prefill when every episode starts alike
        G = params.n
        shared = turn == 1 and all(
            episodes[g * G + k].prompt_ids == episodes[g * G].prompt_ids for g in range(len(prompts)) for k in range(G))
        if shared:
            batch = engine.generate(model, [episodes[g * G].prompt_ids for g in range(len(prompts))],
                                    replace(params, seed=params.seed))
        else:
            batch = engine.generate(model, [episodes[i].prompt_ids + episodes[i].completion_ids for i in live],
                                    replace(params, n=1, seed=params.seed + 7919 * turn))
        nxt = []
        for i, s in zip(live, batch.samples):
            e = episodes[i]
            start = len(e.completion_ids)
            e.completion_ids += s.completion_ids
            e.logprobs += s.logprobs
            e.trained += [True] * len(s.completion_ids)
            e.spans.append((start, len(e.completion_ids)))
            e.turns, e.text, e.finish_reason = turn, s.text, s.finish_reason
            msg = {"role": "assistant", "content": s.text}
            e.messages.append(msg)
            before = dict(getattr(envs[i], "stats", {}) or {})
            new, reward, done = envs[i].step(msg)
            after = getattr(envs[i], "stats", {}) or {}
            for k in ("tool_calls", "tool_errors", "malformed_calls"):
                setattr(e, k, getattr(e, k) + int(after.get(k, 0)) - int(before.get(k, 0)))
            e.env_rewards.append(reward)
            if done or not new:  # a turn cut at max_new_tokens goes on: the environment judges it
                continue
            new = [dict(m) for m in new]
            e.messages += new
            if turn >= agent.max_turns:
                e.finish_reason = "max_turns"
                continue
            end = s.completion_ids[-1] if s.finish_reason == "eos" and s.completion_ids else None
            end_text = tok.decode([end], skip_special_tokens=False) if end is not None else None
            delta = message_delta(tok, convs[i], new, agent.schemas, end_text)
            convs[i] = convs[i] + [msg] + new
            if limit and len(e.prompt_ids) + len(e.completion_ids) + len(delta) + params.max_new_tokens > limit:
                e.finish_reason = "context"
                continue
            e.completion_ids += delta
            e.logprobs += [0.0] * len(delta)
            e.trained += [False] * len(delta)
            nxt.append(i)
        live = nxt
    stats = {"generated_tokens": sum(sum(e.trained) for e in episodes),
             "turns": sum(e.turns for e in episodes),
             "tool_calls": sum(e.tool_calls for e in episodes),
             "tool_errors": sum(e.tool_errors for e in episodes),
             "malformed_calls": sum(e.malformed_calls for e in episodes)}
    return episodes, stats


def collect(engine: RolloutEngine, model, prompts: list, columns: dict[str, list], params: SamplingParams,
            reward_fn: Callable | None, agent: Agent,
            context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> Rollout:
    """Episodes for `prompts` (inside `context()`, e.g. the trainer's autocast) as a `Rollout`.

    Reward of an episode: the sum of the rewards its environment returned over its turns (per-turn
    rewards allowed) when it returned any; otherwise `reward_fn(prompts, final texts, **columns)`
    on its last turn's text. A None score becomes NaN ("not scored", as in `alignkit.rollout.rollout.score`)
    and is counted in stats["reward_missing"]."""
    with context():
        episodes, stats = collect_episodes(engine, model, prompts, columns, params, agent)
    env_r = [[r for r in e.env_rewards if r is not None] for e in episodes]
    need = [i for i, r in enumerate(env_r) if not r]
    scores: list = [float(sum(r)) if r else None for r in env_r]
    if need:
        if reward_fn is None:
            raise ValueError("an episode ended without an environment reward and no reward= is set")
        vals = reward_fn([prompts[episodes[i].prompt_index] for i in need], [episodes[i].text for i in need],
                         **{k: [v[episodes[i].prompt_index] for i in need] for k, v in columns.items()})
        if len(vals) != len(need):
            raise ValueError(f"the reward function returned {len(vals)} scores for {len(need)} samples")
        for i, v in zip(need, vals):
            scores[i] = v
    stats["reward_missing"] = sum(v is None for v in scores)
    # None -> NaN ("not scored"), as single-turn rollouts do: the recipes leave it out of baselines
    rewards = torch.tensor([float("nan") if v is None else float(v) for v in scores], dtype=torch.float32)
    return Rollout(list(prompts), {k: list(v) for k, v in columns.items()}, episodes, params.n, rewards, stats)
