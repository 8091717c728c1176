"""`alignkit eval`: how good is a model, and how far has it moved from a reference?

For each prompting mode (zero_shot, few_shot, cot, reflect) the policy samples `n_samples`
answers per prompt and we measure

    reward        mean and std of the reward source(s) over the samples
    accuracy      exact-number accuracy and format rate on a verifiable task (toy, gsm8k, ...)
    KL            KL(policy ‖ reference) on the policy's own samples, per token and per sequence
    win rate      policy vs reference samples, judged by a reward source (ties count half)
    diversity     distinct-1 / distinct-2 over the samples
    length        generated tokens per sample, fraction cut at max_new_tokens

plus the perplexity of the policy (and reference) on a text / SFT set. Results go to the terminal
as a table (one row per mode) and to `output_dir/eval.json` with a few sample completions.
Definitions: docs/eval.md.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import time
from pathlib import Path

import torch

from alignkit.config import EvalConfig
from alignkit.data.chat import setup_chat_template
from alignkit.data.collate import pad_collate
from alignkit.data.sft import load_sft_data
from alignkit.errors import UserError
from alignkit.eval import prompting
from alignkit.eval.metrics import (completion_logps, distinct_n, eval_nll, kl_metrics, mean_std, task_metrics,
                                   win_rate)
from alignkit.models import load_model, load_tokenizer
from alignkit.rewards import build_reward, load_prompt_set
from alignkit.rollout.engine import RolloutEngine, SamplingParams
from alignkit.training.dist import DistInfo
from alignkit.training.logging import progress_bar

__all__ = ["evaluate", "EvalConfig", "sample", "format_table"]


def _say(msg: str) -> None:
    from alignkit.training.logging import say

    say(msg)  # above any progress bar


# --------------------------------------------------------------------------- generation
# The one place evaluation samples from a model: swap the engine here and nothing else changes.


def sample(model, engine, prompts: list, n: int, cfg: EvalConfig, seed: int, desc: str | None = None):
    """n samples per prompt (grouped by prompt: prompt i's samples at [i*n, (i+1)*n)), each with
    prompt_ids, completion_ids (ending with the stop token when it stopped), text and
    finish_reason ("eos" or "length"). desc: show a progress bar over the prompts with this label."""
    params = SamplingParams(n=n, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                            top_k=0, seed=seed, batch_size=cfg.batch_size)
    if desc is None:
        return engine.generate(model, prompts, params).samples
    with progress_bar(total=len(prompts), desc=desc, unit="prompt", leave=False) as bar:
        return engine.generate(model, prompts, params, on_chunk=bar.update).samples


# --------------------------------------------------------------------------- setup


def _resolve_task(task: str, rows: list[dict]) -> str:
    if not rows:
        return "none"
    cols = rows[0].keys()
    if task == "auto":
        if "total" in cols:
            return "toy"
        if "answer" in cols and any(isinstance(r.get("answer"), str) and "####" in r["answer"] for r in rows[:50]):
            return "gsm8k"
        return "none"
    if task != "none" and _task_column(task, rows) not in cols:
        want = "total" if task == "toy" else "answer"
        raise UserError(f"task={task} needs a '{want}' column with the reference answer in the prompt set "
                        f"(columns: {', '.join(cols)})")
    return task


def _task_column(task: str, rows: list[dict]) -> str:
    if task == "toy":
        return "total"
    if task == "last_number" and rows and "answer" not in rows[0] and "total" in rows[0]:
        return "total"
    return "answer"


def _device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _dtype(cfg: EvalConfig, device: torch.device) -> str:
    if cfg.dtype != "auto":
        return cfg.dtype
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bfloat16"
    return "float32"


def _same_vocab(a, b) -> bool:
    return a is b or a.get_vocab() == b.get_vocab()


# --------------------------------------------------------------------------- one mode


class _Side:
    """A model with its tokenizer and engine (policy or reference)."""

    def __init__(self, name, model, tok):
        self.name, self.model, self.tok = name, model, tok
        self.engine = RolloutEngine(tok)
        self.pad_id = self.engine.pad_id
        self.agent = None  # multi-turn episodes (tools= / env=) when set


def _run_mode(side: _Side, prompts: list, mode: str, cfg: EvalConfig, desc: str | None = None,
              columns: dict | None = None) -> list[dict]:
    """Sample a mode's answers. Per sample: text (final turn), answer (what is scored), segments
    [(context ids, generated ids)] for log-probs, first_text (reflect), finish. columns: the rows'
    other columns (name -> one value per prompt), which an environment's reset(row) sees."""
    if getattr(side, "agent", None) is not None:  # multi-turn episodes with tools / an environment
        return _run_episodes(side, prompts, cfg, columns or {})
    first = sample(side.model, side.engine, prompts, cfg.n_samples, cfg, cfg.seed, desc=desc)
    out = []
    for s in first:
        out.append({"prompt_index": s.prompt_index, "text": s.text, "segments": [(s.prompt_ids, s.completion_ids)],
                    "finish": [s.finish_reason], "tokens": len(s.completion_ids)})
    if mode == "reflect":
        second_prompts = [prompting.reflect_prompt(prompts[o["prompt_index"]], o["text"], cfg.reflect_instruction)
                          for o in out]
        second = sample(side.model, side.engine, second_prompts, 1, cfg, cfg.seed + 1,
                        desc=desc and desc + " (2nd turn)")
        for o, s in zip(out, second):
            o["first_text"] = o["text"]
            o["text"] = s.text
            o["segments"].append((s.prompt_ids, s.completion_ids))
            o["finish"].append(s.finish_reason)
            o["tokens"] += len(s.completion_ids)
    for o in out:
        o["answer"] = prompting.final_answer(o["text"]) if mode in prompting.FINAL_LINE_MODES else o["text"]
    return out


def _run_episodes(side: _Side, prompts: list, cfg: EvalConfig, columns: dict) -> list[dict]:
    """`_run_mode` for multi-turn episodes: text = the last turn, segments = one per model turn
    (its context: everything before it), plus turns / tool_calls / tool_errors / malformed_calls."""
    from alignkit.rollout.engine import SamplingParams
    from alignkit.rollout.multiturn import collect_episodes

    params = SamplingParams(n=cfg.n_samples, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                            top_p=cfg.top_p, top_k=0, seed=cfg.seed, batch_size=cfg.batch_size)
    # the environment's reset(row) sees the row's columns, as in training
    episodes, _ = collect_episodes(side.engine, side.model, prompts, columns, params, side.agent)
    out = []
    for e in episodes:
        segs = [(e.prompt_ids + e.completion_ids[:a], e.completion_ids[a:b]) for a, b in e.spans]
        out.append({"prompt_index": e.prompt_index, "text": e.text, "answer": e.text, "segments": segs,
                    "finish": [e.finish_reason], "tokens": sum(e.trained), "turns": e.turns,
                    "tool_calls": e.tool_calls, "tool_errors": e.tool_errors, "malformed_calls": e.malformed_calls})
    return out


def _score(reward, prompts: list, answers: list[str], columns: dict, chunk: int) -> tuple[dict, list]:
    """Per-source values and combined rewards, calling the sources `chunk` samples at a time."""
    per: dict[str, list] = {k: [] for k in reward.keys}
    for s in range(0, len(answers), chunk):
        part = reward.score_terms(prompts[s:s + chunk], answers[s:s + chunk],
                                  **{k: v[s:s + chunk] for k, v in columns.items()})
        for k in per:
            per[k] += part[k]
    return per, reward.combine(per)


def _eval_mode(mode: str, rows: list[dict], pol: _Side, ref: _Side | None, reward, judge, task: str,
               pool, cfg: EvalConfig, progress: bool = False) -> tuple[dict, list[dict]]:
    t0 = time.time()
    base_prompts = [r["prompt"] for r in rows]
    mode_prompts = prompting.build_prompts(base_prompts, mode, pool=pool, k=cfg.few_shot_k,
                                           layout=cfg.few_shot_layout, seed=cfg.seed,
                                           cot_instruction=cfg.cot_instruction)
    row_columns = {k: [r.get(k) for r in rows] for k in rows[0] if k != "prompt"}
    samples = _run_mode(pol, mode_prompts, mode, cfg, desc=f"eval {mode}: model" if progress else None,
                        columns=row_columns)
    idx = [s["prompt_index"] for s in samples]
    prompts = [base_prompts[i] for i in idx]
    columns = {k: [v[i] for i in idx] for k, v in row_columns.items()}
    answers = [s["answer"] for s in samples]
    chunk = cfg.batch_size * cfg.n_samples
    res: dict = {"mode": mode, "samples": len(samples)}

    rewards = None
    if reward is not None:
        timeouts_before = reward.timeouts
        per, rewards = _score(reward, prompts, answers, columns, chunk)
        ms = mean_std(rewards)
        res.update(reward=ms["mean"], reward_std=ms["std"], reward_none=ms["none"])
        if len(per) > 1:
            res["reward_terms"] = {k: mean_std(v)["mean"] for k, v in per.items()}
        if reward.timeouts > timeouts_before:
            res["reward_timeouts"] = reward.timeouts - timeouts_before
    if task != "none":
        tm = task_metrics(answers, columns[_task_column(task, rows)], task)
        res.update(accuracy=tm["accuracy"], format_rate=tm["format_rate"])
        if tm["unscored"]:
            res["accuracy_unscored"] = tm["unscored"]
        if mode == "reflect":
            first = [prompting.final_answer(s["first_text"]) for s in samples]
            res["accuracy_first_turn"] = task_metrics(first, columns[_task_column(task, rows)], task)["accuracy"]

    texts = [s["text"] for s in samples]
    res["distinct_1"] = distinct_n(texts, 1)
    res["distinct_2"] = distinct_n(texts, 2)
    res["tokens"] = sum(s["tokens"] for s in samples) / len(samples)
    res["truncated"] = sum(s["finish"][-1] == "length" for s in samples) / len(samples)
    for k in ("turns", "tool_calls", "tool_errors", "malformed_calls"):  # multi-turn: means per answer
        if k in samples[0]:
            res[k] = sum(s[k] for s in samples) / len(samples)

    if ref is not None and cfg.temperature > 0 and _same_vocab(pol.tok, ref.tok):
        segs = [seg for s in samples for seg in s["segments"]]
        lp = completion_logps(pol.model, segs, pol.pad_id, cfg.batch_size, cfg.logits_chunk_size, cfg.temperature)
        lr = completion_logps(ref.model, segs, pol.pad_id, cfg.batch_size, cfg.logits_chunk_size, cfg.temperature)
        # episodes may have different numbers of model turns (segments): slice by each one's count
        ends = list(itertools.accumulate(len(s["segments"]) for s in samples))
        per_pol = [torch.cat(lp[e - len(s["segments"]):e]) for s, e in zip(samples, ends)]
        per_ref = [torch.cat(lr[e - len(s["segments"]):e]) for s, e in zip(samples, ends)]
        res.update(kl_metrics(per_pol, per_ref))

    ref_samples = None
    if ref is not None and judge is not None:
        ref_samples = _run_mode(ref, mode_prompts, mode, cfg, desc=f"eval {mode}: reference" if progress else None,
                                columns=row_columns)
        ref_answers = [s["answer"] for s in ref_samples]
        mine = rewards if judge is reward else _score(judge, prompts, answers, columns, chunk)[1]
        theirs = _score(judge, prompts, ref_answers, columns, chunk)[1]
        wr = win_rate(mine, theirs)
        res.update(win_rate=wr["win_rate"], win_pairs=wr["pairs"], wins=wr["wins"], ties=wr["ties"],
                   losses=wr["losses"])
        if wr["skipped"]:
            res["win_skipped"] = wr["skipped"]
        ref_ms = mean_std(theirs)
        res["ref_judge_reward"] = ref_ms["mean"]

    show = len(samples) if cfg.num_show < 0 else min(cfg.num_show, len(samples))
    shown = []
    ref_col = _task_column(task, rows) if task != "none" else ("answer" if "answer" in columns else None)
    for j in range(show):
        s = samples[j]
        # ref_answer: the reference answer from the data; ref_model_*: what the reference model wrote
        item = {"prompt": prompting.prompt_text(prompts[j])}
        if ref_col is not None and columns.get(ref_col) and columns[ref_col][j] is not None:
            row = rows[idx[j]]
            item["ref_answer"] = row["answer"] if isinstance(row.get("answer"), str) else str(columns[ref_col][j])
        item["completion"] = s["text"]
        if mode == "reflect":
            item["first_completion"] = s["first_text"]
        if mode in prompting.FINAL_LINE_MODES:
            item["answer"] = s["answer"]
        if task != "none":
            item["correct"] = _is_correct(s["answer"], columns[_task_column(task, rows)][j], task)
        if rewards is not None:
            item["reward"] = rewards[j]
        if ref_samples is not None:
            item["ref_model_completion"] = ref_samples[j]["text"]
            if mode in prompting.FINAL_LINE_MODES:
                item["ref_model_answer"] = ref_samples[j]["answer"]
            if task != "none":
                item["ref_model_correct"] = _is_correct(ref_samples[j]["answer"],
                                                        columns[_task_column(task, rows)][j], task)
        shown.append(item)
    res["seconds"] = time.time() - t0
    return res, shown


def _is_correct(answer: str, reference, task: str) -> bool | None:
    """Whether one answer is exactly right (None: the reference has no number to compare)."""
    tm = task_metrics([answer], [reference], task)
    return None if tm["accuracy"] is None else tm["accuracy"] == 1.0


# --------------------------------------------------------------------------- perplexity


def _ppl_rows(tok, cfg: EvalConfig) -> list:
    rows, _ = load_sft_data(cfg.ppl_data, cfg.ppl_split, tok, cfg.max_length, "truncate", False, what="ppl_data")
    return rows


def _perplexity(model, tok, rows: list, cfg: EvalConfig) -> dict:
    """Token-mean NLL over the answer tokens of `rows` (SFT masks) and its exp."""
    device = next(model.parameters()).device
    res = eval_nll(model, rows, lambda idx: pad_collate([rows[i] for i in idx], tok.pad_token_id), cfg.batch_size,
                   cfg.logits_chunk_size, DistInfo(device=device), contextlib.nullcontext)
    return {"nll": res["eval_loss"], "ppl": res["eval_ppl"], "tokens": res["eval_tokens"], "rows": len(rows)}


# --------------------------------------------------------------------------- entry point


def _check(cfg: EvalConfig, modes: list[str], need_model: bool) -> None:
    if need_model and not cfg.model:
        raise UserError("no model given; pass model=PATH (a model folder or hub id)")
    if not cfg.prompts and not cfg.ppl_data:
        raise UserError("nothing to evaluate: pass prompts=FILE (a prompt set) and/or ppl_data=FILE (text / SFT rows)")
    if "few_shot" in modes and not cfg.few_shot_pool:
        raise UserError("mode few_shot needs few_shot_pool=FILE (rows with prompt + completion/answer, or messages)")
    if cfg.judge is not None and cfg.ref_model is None:
        raise UserError("judge= scores policy vs reference: also pass ref_model=PATH")
    if len(set(modes)) != len(modes):
        raise UserError(f"modes lists a mode twice: {modes}")


def evaluate(cfg: EvalConfig, model=None, tokenizer=None, ref_model=None, ref_tokenizer=None,
             verbose: bool = True) -> dict:
    """Run the evaluation described by `cfg`; returns what eval.json holds.

    `model` / `tokenizer` (and `ref_model` / `ref_tokenizer`) may be passed in already loaded;
    otherwise they are loaded from cfg.model / cfg.ref_model."""
    modes = list(cfg.modes or [cfg.mode])
    _check(cfg, modes, need_model=model is None or tokenizer is None)
    t0 = time.time()
    device = _device()
    dtype = _dtype(cfg, device)

    tok = tokenizer or load_tokenizer(cfg.model)
    from alignkit.rollout.agents import build_agent, resolve_chat_template

    setup_chat_template(tok, resolve_chat_template(cfg.chat_template))
    agent = build_agent(cfg, tok)
    rows: list[dict] = []
    if cfg.prompts:
        rows = load_prompt_set(cfg.prompts, cfg.split, cfg.prompt_column, cfg.chat_prompts,
                               limit=cfg.max_prompts if cfg.max_prompts >= 0 else None)
        if not rows:
            raise UserError(f"{cfg.prompts}: no prompts to evaluate (max_prompts={cfg.max_prompts})")
    task = _resolve_task(cfg.task, rows)
    reward = build_reward(cfg.reward, tokenizer=tok) if cfg.reward is not None else None
    judge = build_reward(cfg.judge, tokenizer=tok) if cfg.judge is not None else reward
    pool = None
    if rows and "few_shot" in modes:
        pool = prompting.load_pool(cfg.few_shot_pool, cfg.prompt_column, cfg.chat_prompts)
    ppl_rows = _ppl_rows(tok, cfg) if cfg.ppl_data else None

    if model is None:
        model = load_model(cfg.model, dtype, device)
    pol = _Side(cfg.model, model, tok)
    pol.agent = agent
    ref = None
    if cfg.ref_model is not None or ref_model is not None:
        rtok = ref_tokenizer or (load_tokenizer(cfg.ref_model) if cfg.ref_model else tok)
        setup_chat_template(rtok, resolve_chat_template(cfg.chat_template))
        rmodel = ref_model if ref_model is not None else load_model(cfg.ref_model, dtype, device)
        ref = _Side(cfg.ref_model, rmodel, rtok)
        ref.agent = agent if agent is not None and rtok is tok else None

    result: dict = {
        "model": cfg.model, "ref_model": cfg.ref_model, "prompts": cfg.prompts, "n_prompts": len(rows),
        "n_samples": cfg.n_samples, "temperature": cfg.temperature, "top_p": cfg.top_p,
        "reward": reward.name if reward is not None else None,
        "judge": judge.name if judge is not None and ref is not None else None,
        "task": task, "modes": {}, "samples": {}, "notes": [],
    }
    if ref is not None and cfg.temperature <= 0:
        result["notes"].append("KL not computed: it needs sampled answers (temperature > 0)")
    if ref is not None and not _same_vocab(pol.tok, ref.tok):
        result["notes"].append("KL not computed: the reference has a different tokenizer")
    if ref is not None and judge is None and rows:
        result["notes"].append("win rate not computed: set reward= or judge= to judge it")
    if cfg.temperature > 0 and cfg.top_p < 1 and ref is not None:
        result["notes"].append("top_p < 1: samples come from the truncated distribution, so KL is estimated on them "
                               "but is not exactly KL of the full distributions")

    for mode in modes if rows else []:
        if verbose:
            _say(f"eval: {mode}: {len(rows)} prompts x {cfg.n_samples} samples")
        res, shown = _eval_mode(mode, rows, pol, ref, reward, judge, task, pool, cfg, progress=verbose)
        result["modes"][mode] = res
        result["samples"][mode] = shown

    if cfg.ppl_data:
        if verbose:
            _say(f"eval: perplexity on {cfg.ppl_data}")
        result["ppl"] = _perplexity(pol.model, pol.tok, ppl_rows, cfg)
        if ref is not None:
            same = _same_vocab(pol.tok, ref.tok) and pol.tok.chat_template == ref.tok.chat_template
            rows_ref = ppl_rows if same else _ppl_rows(ref.tok, cfg)
            result["ref_ppl"] = _perplexity(ref.model, ref.tok, rows_ref, cfg)
    result["seconds"] = time.time() - t0
    result["config"] = json.loads(json.dumps(cfg.model_dump(mode="json")))

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "eval.json"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(result, ensure_ascii=False, indent=2), encoding="utf-8")
    os.replace(tmp, path)
    if verbose:
        print(format_table(result))
        print(format_samples(result))
        print(f"wrote {path}")
    return result


# --------------------------------------------------------------------------- output

_COLUMNS = [  # (key, header, format)
    ("reward", "reward", "{:.4f}"),
    ("reward_std", "± std", "{:.4f}"),
    ("accuracy", "accuracy", "{:.3f}"),
    ("format_rate", "format", "{:.3f}"),
    ("kl_token", "KL/token", "{:.4f}"),
    ("kl_seq", "KL/seq", "{:.4f}"),
    ("k3_seq", "k3/seq", "{:.4f}"),
    ("win_rate", "win", "{:.3f}"),
    ("distinct_1", "dist-1", "{:.3f}"),
    ("distinct_2", "dist-2", "{:.3f}"),
    ("tokens", "tokens", "{:.1f}"),
    ("truncated", "cut", "{:.2f}"),
    ("tool_calls", "calls", "{:.2f}"),
    ("tool_errors", "tool err", "{:.2f}"),
    ("malformed_calls", "malformed", "{:.2f}"),
]


def format_table(result: dict) -> str:
    """One row per mode with the metrics any mode has."""
    rows = result.get("modes", {})
    lines = []
    if rows:
        cols = [c for c in _COLUMNS if any(r.get(c[0]) is not None for r in rows.values())]
        header = ["mode"] + [c[1] for c in cols]
        body = []
        for mode, r in rows.items():
            body.append([mode] + [c[2].format(r[c[0]]) if r.get(c[0]) is not None else "-" for c in cols])
        widths = [max(len(x[i]) for x in [header] + body) for i in range(len(header))]

        def fmt(cells):
            return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

        title = f"eval of {result.get('model')}"
        if result.get("ref_model"):
            title += f" vs reference {result['ref_model']}"
        title += f" on {result.get('n_prompts')} prompts x {result.get('n_samples')} samples"
        if result.get("reward"):
            title += f"; reward: {result['reward']}"
        if result.get("task") and result["task"] != "none":
            title += f"; task: {result['task']}"
        lines += [title, fmt(header), fmt(["-" * w for w in widths])] + [fmt(b) for b in body]
    for key, label in (("ppl", "perplexity"), ("ref_ppl", "reference perplexity")):
        if key in result:
            p = result[key]
            lines.append(f"{label} on {result['config']['ppl_data']}: {p['ppl']:.4f} (nll {p['nll']:.4f} over "
                         f"{p['tokens']} answer tokens)")
    for note in result.get("notes", []):
        lines.append(f"note: {note}")
    return "\n".join(lines)


def _clip(s: str, n: int = 160) -> str:
    s = s.replace("\n", "⏎ ")
    return s if len(s) <= n else s[:n] + "…"


def _verdict(correct) -> str:
    return "" if correct is None else ("  [right]" if correct else "  [wrong]")


def format_samples(result: dict) -> str:
    lines = []
    for mode, items in result.get("samples", {}).items():
        if not items:
            continue
        lines.append(f"samples ({mode}):")
        for k, it in enumerate(items, 1):
            r = f" [reward {it['reward']:.3g}]" if isinstance(it.get("reward"), float) else ""
            lines.append(f"  #{k} prompt:                        {_clip(it['prompt'])}")
            if "ref_answer" in it:
                lines.append(f"     reference answer (from data):  {_clip(it['ref_answer'])}")
            lines.append(f"     completion (model):            {_clip(it['completion'])}{r}"
                         f"{_verdict(it.get('correct'))}")
            if "ref_model_completion" in it:
                lines.append(f"     completion (reference model):  {_clip(it['ref_model_completion'])}"
                             f"{_verdict(it.get('ref_model_correct'))}")
    return "\n".join(lines)

