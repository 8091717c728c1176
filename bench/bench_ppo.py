"""PPO and online DPO on CPU: rollout-step time and peak memory per memory configuration.

Every configuration trains the same random-init Llama (built offline, see bench/common.py and
bench/bench_rollout.py's workspace) on the same prompts with the same sampling settings, in a
fresh process, through the public training functions (`train_ppo`, `train_online_dpo`,
`train_grpo`), with a cheap rule reward (the share of distinct tokens in the answer):

* ppo full + separate critic: full fine-tuning; a frozen reference copy; a critic of its own
  (initialised from the policy, trained in full) -- three copies of the weights, two trained.
* ppo LoRA + separate critic: the reference is the adapter switched off; the critic is a full copy.
* ppo LoRA + shared base: policy, reference and critic (a second adapter + value head) share one
  copy of the base weights.
* online DPO (full, frozen reference copy) and online DPO (LoRA, adapter off).
* GRPO (full, β > 0: a reference copy) as the part-1 point of comparison.

PPO samples 1 answer for each of 16 prompts per rollout step; online DPO and GRPO sample 4 for
each of 4 prompts: 16 answers per rollout step everywhere. Answers run to `max_new_tokens` (a
random model rarely ends a turn). PPO makes `ppo_epochs x num_minibatches` = 2 x 2 optimizer
steps per rollout step; GRPO makes 2 (`iterations`); online DPO 1.

Measured per configuration: seconds per rollout step after a warm-up step (median over the
timed steps), its split (generate / score / no-grad passes / train), and the child's peak RSS
(VmHWM: the whole process, Python and torch included). The RSS of a process that only
imports torch + transformers and loads the model once is reported as the floor.

    python bench/bench_ppo.py                 # all configurations, one run each
    python bench/bench_ppo.py --write         # also replaces "## PPO and online DPO (CPU)" in BENCHMARKS.md
    python bench/bench_ppo.py --configs ppo_lora_shared,ppo_lora_separate --steps 2
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from bench_rollout import RLWorkspace  # noqa: E402

SECTION = "PPO and online DPO (CPU)"

LORA = {"method": "lora", "r": 16, "alpha": 32}
CONFIGS = {
    "ppo_full_separate": ("PPO, full, separate critic", "ppo", dict(critic="separate")),
    "ppo_lora_separate": ("PPO, LoRA, separate critic", "ppo", dict(critic="separate", peft=LORA)),
    "ppo_lora_shared": ("PPO, LoRA, shared base", "ppo", dict(critic="shared_base", peft=LORA)),
    "odpo_full": ("online DPO, full", "online_dpo", dict()),
    "odpo_lora": ("online DPO, LoRA", "online_dpo", dict(peft=LORA)),
    "grpo_full": ("GRPO, full (part 1)", "grpo", dict()),
    "floor": ("floor: imports + one model", "floor", dict()),
}
# what each configuration holds in memory (copies of the base weights; trained parameters)
HOLDS = {
    "ppo_full_separate": "3 copies (policy, reference, critic); policy + critic trained",
    "ppo_lora_separate": "2 copies (policy = reference, critic); adapter + critic trained",
    "ppo_lora_shared": "1 copy; two adapters + value head trained",
    "odpo_full": "2 copies (policy, reference); policy trained",
    "odpo_lora": "1 copy; adapter trained",
    "grpo_full": "2 copies (policy, reference); policy trained",
    "floor": "1 copy, no training",
}


def distinct_share(prompts, completions, **cols):
    """Rule reward: distinct characters / length (cheap, varies between samples)."""
    return [len(set(c)) / max(len(c), 1) for c in completions]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default=",".join(CONFIGS), help="comma list of: " + ", ".join(CONFIGS))
    p.add_argument("--steps", type=int, default=3, help="timed rollout steps (after one warm-up step)")
    p.add_argument("--answers", type=int, default=16, help="answers sampled per rollout step")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--min-prompt-tokens", type=int, default=30)
    p.add_argument("--max-prompt-tokens", type=int, default=80)
    common.add_model_args(p, common.ModelShape(hidden=384, layers=6, heads=6, kv_heads=2, intermediate=1024))
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", 0)) or os.cpu_count())
    p.add_argument("--workdir", default=None, help="where to build the model/prompts (default: a temp dir)")
    p.add_argument("--write", action="store_true", help=f"replace the '## {SECTION}' section of BENCHMARKS.md")
    p.add_argument("--json", default=None, help="also write the raw measurements to this file")
    p.add_argument("--from-json", default=None, metavar="FILE",
                   help="no runs: build the table (and with --write the section) from a file written by --json")
    p.add_argument("--child", choices=list(CONFIGS), help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ============================================================================================
# Child: one configuration
# ============================================================================================


def child_run(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    model_dir = str(Path(args.workdir) / "model")
    prompts = str(Path(args.workdir) / "prompts.jsonl")
    if args.child == "floor":
        from alignkit.models import load_model, load_tokenizer

        load_tokenizer(model_dir)
        load_model(model_dir)
        return {"config": "floor"}
    name, kind, extra = CONFIGS[args.child]
    out = Path(args.workdir) / "runs" / args.child
    common_kw = dict(model=model_dir, data=prompts, output_dir=str(out), overwrite=True, progress=False,
                     tensorboard=False, log_every=1, max_steps=args.steps + 1, max_new_tokens=args.max_new_tokens,
                     sample_every=0, eval_prompts=0, seed=0, lr=1e-5, warmup_steps=0, schedule="constant")
    import alignkit.training.trainer as trainer_mod

    trainer_mod.plot_metrics = lambda *a, **k: None  # curves.png is not what is measured here
    G = 1 if kind == "ppo" else 4
    if kind == "ppo":
        from alignkit.config import PPOConfig
        from alignkit.recipes.ppo import train_ppo

        cfg = PPOConfig(**common_kw, **extra, batch_size=args.answers // 2, num_minibatches=2, ppo_epochs=2,
                        num_generations=1, kl_coef=0.05, critic_lr=1e-5, save_critic=False)
        train_ppo(cfg, reward_fn=distinct_share)
        per_rollout = 4
    elif kind == "online_dpo":
        from alignkit.config import OnlineDPOConfig
        from alignkit.recipes.online_dpo import train_online_dpo

        cfg = OnlineDPOConfig(**common_kw, **extra, batch_size=args.answers // G, num_generations=G)
        train_online_dpo(cfg, reward_fn=distinct_share)
        per_rollout = 1
    else:
        from alignkit.config import GRPOConfig
        from alignkit.recipes.grpo import train_grpo

        cfg = GRPOConfig(**common_kw, **extra, batch_size=args.answers // G, num_generations=G, kl_coef=0.04,
                         iterations=2)
        train_grpo(cfg, reward_fn=distinct_share)
        per_rollout = 2
    recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    recs = [r for r in recs if r.get("kind") == "train"]
    last_of_rollout = recs[per_rollout - 1::per_rollout]  # carries the rollout step's time split
    timed = last_of_rollout[1:]
    split = {}
    for k in ("generate", "score", "prepare", "train"):
        vals = [r.get(f"time_{k}_s", 0.0) for r in timed]
        split[k] = statistics.median(vals) if vals else 0.0
    totals = [sum(r.get(f"time_{k}_s", 0.0) for k in ("generate", "score", "prepare", "train")) for r in timed]
    return {"config": args.child, "name": name, "rollout_steps": len(last_of_rollout),
            "s_per_step": statistics.median(totals), "s_per_step_all": totals, "split": split,
            "optimizer_steps_per_rollout": per_rollout}


# ============================================================================================
# Parent
# ============================================================================================


def report(runs: dict[str, dict]) -> str:
    floor = runs.get("floor", {}).get("data", {}).get("peak_rss_mib")
    rows = []
    for key, r in runs.items():
        if key == "floor" or not r.get("ok"):
            if key != "floor":
                rows.append([CONFIGS[key][0], "failed", "", "", "", "", HOLDS[key]])
            continue
        d = r["data"]
        s = d["split"]
        rows.append([
            d["name"], f"{d['s_per_step']:.2f}",
            f"{s['generate']:.2f} / {s['score']:.2f} / {s['prepare']:.2f} / {s['train']:.2f}",
            str(d["optimizer_steps_per_rollout"]), f"{d['peak_rss_mib']:,.0f}",
            f"{d['peak_rss_mib'] - floor:,.0f}" if floor else "n/a", HOLDS[key],
        ])
    if floor:
        rows.append([CONFIGS["floor"][0], "", "", "", f"{floor:,.0f}", "0", HOLDS["floor"]])
    return common.markdown_table(
        ["configuration", "s / rollout step", "generate / score / no-grad passes / train (s)", "optimizer steps",
         "peak RSS (MiB)", "above floor (MiB)", "holds"], rows)


def main() -> int:
    args = parse_args()
    if args.child:
        common.child_finish(child_run(args))
        return 0
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    for c in configs:
        if c not in CONFIGS:
            raise SystemExit(f"unknown config {c!r}; choose from {', '.join(CONFIGS)}")
    saved = None
    cmd = common.command_line()
    if args.from_json:  # re-render a finished run: its settings, not this command line's
        saved = json.loads(Path(args.from_json).read_text())
        for k, v in saved.get("args", {}).items():
            if k not in ("write", "from_json", "json", "child"):
                setattr(args, k, v)
        cmd = saved.get("cmd") or _command_of(args)
    tmp = None
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench-ppo-")
        args.workdir = tmp.name
    shape = common.shape_of(args)
    ws = RLWorkspace(Path(args.workdir), shape, n_prompts=128, min_tokens=args.min_prompt_tokens,
                     max_tokens=args.max_prompt_tokens, stop_frac=0.0)
    env = common.child_env(args.threads)
    load = []
    runs: dict[str, dict] = {}
    if saved is not None:
        runs, load = saved.get("runs", saved), saved.get("load", [])
        configs = []
    for c in configs:
        argv = [str(Path(__file__).resolve()), "--child", c, "--workdir", args.workdir, "--threads",
                str(args.threads), "--steps", str(args.steps), "--answers", str(args.answers),
                "--max-new-tokens", str(args.max_new_tokens)]
        t0 = time.time()
        res = common.run_child(argv, env, cwd=str(common.ROOT))
        load.append(os.getloadavg()[0])
        runs[c] = {"ok": res.ok, "data": dict(res.data, peak_rss_mib=res.data.get("peak_rss_mib", 0.0)),
                   "polled_peak_mib": res.peak_rss_mib_polled, "wall_s": time.time() - t0}
        if not res.ok:
            print(f"{c}: failed (exit {res.returncode})\n{res.log_tail[-2000:]}", file=sys.stderr)
        else:
            d = res.data
            step = f"{d['s_per_step']:.2f} s/rollout step, " if "s_per_step" in d else ""
            print(f"{c}: {step}peak RSS {d['peak_rss_mib']:,.0f} MiB", file=sys.stderr)
    table = report(runs)
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": runs, "load": load, "args": vars(args), "cmd": cmd}, indent=1))
    if args.write:
        when = _dt.date.today().isoformat()
        body = section_body(args, ws, table, when, cmd, load, runs)
        common.write_section(SECTION, body)
        print(f"wrote '## {SECTION}' in {common.BENCHMARKS_MD}", file=sys.stderr)
    if tmp is not None:
        tmp.cleanup()
    return 0 if all(r["ok"] for r in runs.values()) else 1


def _command_of(args) -> str:
    keys = ("threads", "steps", "answers", "max_new_tokens", "hidden", "layers", "heads", "kv_heads", "intermediate",
            "vocab")
    opts = " ".join(f"--{k.replace('_', '-')} {getattr(args, k)}" for k in keys)
    return f"OMP_NUM_THREADS={args.threads} python bench/bench_ppo.py {opts}"


def _gap(runs: dict, a: str, b: str) -> str:
    try:
        return f"{runs[a]['data']['peak_rss_mib'] - runs[b]['data']['peak_rss_mib']:,.0f}"
    except KeyError:
        return "n/a"


def section_body(args, ws, table: str, when: str, cmd: str, load: list[float], runs: dict | None = None) -> str:
    runs = runs or {}
    p = ws.prompt_len
    load_txt = (f"load average during the runs {min(load):.1f}-{max(load):.1f}" if load else
                "load average not recorded")
    busy = bool(load) and max(load) > args.threads * 1.2
    load_txt += (" (the machine was shared with other jobs: times are indicative only, memory is not affected)"
                 if busy else " (the machine was otherwise idle)")
    times = ("the times of this shared machine vary by 2x from run to run, so compare memory, not seconds, across "
             "rows." if busy else "times are medians of a few steps on an idle machine: differences under about 10% "
             "are noise.")
    return f"""Measured {when} by `bench/bench_ppo.py`: `{cmd}`

- Machine: {common.machine()}; {args.threads} threads per run; {load_txt}.
- Versions: {common.versions('torch', 'transformers', 'peft')}
- Model: {ws.shape.describe(ws.n_params)}, float32, random init. Prompts: chat-templated, {p[0]}-{p[2]} tokens
  (mean {p[1]:.0f}); answers: {args.max_new_tokens} new tokens (a random model rarely ends a turn); reward: a
  rule (distinct characters / length).
- Every rollout step samples {args.answers} answers: PPO 1 answer x {args.answers} prompts, 2 epochs x 2
  minibatches (4 optimizer steps); online DPO and GRPO 4 answers x {args.answers // 4} prompts (1 and 2 optimizer
  steps). Time per rollout step = median over {args.steps} step{'s' if args.steps != 1 else ''} after one warm-up step, split into generate /
  score / no-grad passes (old, reference, critic values, GAE) / train.
- Peak RSS: the child process's VmHWM (Python, torch, data and everything); "floor" is a process that
  imports the stack and loads the model once. LoRA: r = 16 on every linear layer. The separate critic is a full
  copy of the backbone trained with its own AdamW; the shared-base critic is a second adapter + value head.

{table}

How to read it: a full copy of the weights costs its size once when frozen (a reference) and about four
times when trained (weights, gradients, two AdamW moments), plus the activations of its passes. Among the PPO
configurations the shared base holds one copy and the separate critic one more, trained in full: in this run the
shared base needed {_gap(runs, "ppo_lora_separate", "ppo_lora_shared")} MiB less than the LoRA policy with a
separate critic and {_gap(runs, "ppo_full_separate", "ppo_lora_shared")} MiB less than full fine-tuning with a
separate critic (one copy of this model is {ws.n_params * 4 / 2**20:.0f} MiB in float32). PPO's extra work per
rollout step is the critic's no-grad pass, its forward/backward and twice as many optimizer steps as GRPO here;
{times}
"""


if __name__ == "__main__":
    sys.exit(main())
