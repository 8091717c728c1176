"""GRPO and RLOO steps on CPU: alignkit vs TRL's GRPOTrainer / RLOOTrainer (no vLLM).

Both sides train the same random-init tiny Llama (bench/common.py) on the same chat prompts with
the same G, generation length, stop set, reward function, optimizer settings and number of
optimizer steps, each run in a fresh process, runs alternating alignkit, TRL, alignkit, ...

One optimizer step = one rollout of `--prompts-per-step` prompts x G samples, scored by the same
Python reward function, then one update over those samples in `--grad-accum` micro-batches
(alignkit `batch_size` counts prompts, TRL `per_device_train_batch_size` counts completions; the
mapping of every setting is in `settings_table()` and in BENCHMARKS.md).

Stopping: as in bench_rollout.py, a random model almost never emits its end-of-turn token, so both
sides get the same stop set (eos + a seeded `--stop-frac` share of the vocabulary): alignkit through
the rollout engine's `stop_token_ids`, TRL through `model.generation_config.eos_token_id` (GRPOTrainer
and RLOOTrainer end a completion at any of those ids and mask what follows).

What is timed: wall time (and process CPU time) from the end of optimizer step `--skip-steps` to the
end of the last step, recorded inside each training loop (alignkit: a wrapper on
`Trainer.optimizer_step`; TRL: a `TrainerCallback.on_step_end`); rollout tok/s = generated tokens
(up to and including the stop token) / wall time inside the generation call (alignkit:
`RolloutEngine.generate`; TRL: `_generate_single_turn`, i.e. its `model.generate`), over the same steps.

    python bench/bench_grpo.py                  # grpo + rloo, 3 alternating repeats each
    python bench/bench_grpo.py --write          # also replaces the "## GRPO / RLOO (CPU)" section
    python bench/bench_grpo.py --variants grpo --repeats 1 --steps 4    # quick look
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

import bench_rollout as br  # noqa: E402
import common  # noqa: E402

SECTION = "GRPO / RLOO (CPU)"
VARIANTS = ("grpo", "rloo")
SIDES = ("alignkit", "trl")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3, help="runs per side and variant (alternating)")
    p.add_argument("--variants", default="grpo,rloo", help="comma list of: grpo, rloo")
    p.add_argument("--sides", default="alignkit,trl", help="comma list of: alignkit, trl")
    p.add_argument("--steps", type=int, default=5, help="optimizer steps per run")
    p.add_argument("--skip-steps", type=int, default=1, help="leading steps left out of the timing")
    p.add_argument("--group", "-G", type=int, default=8, help="samples per prompt (G / k)")
    p.add_argument("--prompts-per-step", type=int, default=4, help="prompts per optimizer step")
    p.add_argument("--grad-accum", type=int, default=2, help="micro-batches per optimizer step")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--n-prompts", type=int, default=64, help="prompts in the prompt set")
    p.add_argument("--min-prompt-tokens", type=int, default=30)
    p.add_argument("--max-prompt-tokens", type=int, default=80)
    p.add_argument("--stop-frac", type=float, default=1 / 32,
                   help="share of the vocabulary that ends a sample, besides the eos token")
    p.add_argument("--lr", type=float, default=1e-6)
    p.add_argument("--rloo-beta", type=float, default=0.05, help="β of RLOO's KL-in-reward (k1), both sides")
    common.add_model_args(p)
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", 0)) or os.cpu_count(),
                   help="OMP_NUM_THREADS for both sides (default: $OMP_NUM_THREADS or all cores)")
    p.add_argument("--workdir", default=None, help="where to build the model/prompts (default: a temp dir)")
    p.add_argument("--write", action="store_true", help=f"replace the '## {SECTION}' section of BENCHMARKS.md")
    p.add_argument("--json", default=None, help="also write every run's raw measurements to this file")
    p.add_argument("--from-json", default=None, metavar="FILE",
                   help="measure nothing: print (and with --write, write) the tables of an earlier --json file")
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="run one child per side and variant under torch.profiler (timed steps); tables go to DIR")
    p.add_argument("--child", choices=SIDES, help=argparse.SUPPRESS)
    p.add_argument("--variant", choices=VARIANTS, default="grpo", help=argparse.SUPPRESS)
    p.add_argument("--run-dir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    common.add_device_arg(p)
    args = p.parse_args(argv)
    common.use_device(args.device)
    if args.prompts_per_step % args.grad_accum:
        p.error("--prompts-per-step must be a multiple of --grad-accum (micro-batches hold whole groups)")
    return args


# ============================================================================================
# The shared reward: a plain Python function of the completion text
# ============================================================================================


def score_text(text: str) -> float:
    """Share of the letter 'a' among the completion's letters, plus a small length term: cheap,
    deterministic, and different across the samples of a group (so advantages are non-zero)."""
    letters = [c for c in text.lower() if c.isalpha()]
    return (letters.count("a") / len(letters) if letters else 0.0) + 0.01 * min(len(text.split()), 50)


def _text(completion) -> str:
    # TRL gives conversational completions as [{"role": "assistant", "content": ...}]
    if isinstance(completion, list):
        return completion[-1]["content"] if completion else ""
    return completion


def reward_alignkit(prompts, completions, **columns):
    return [score_text(_text(c)) for c in completions]


def reward_trl(prompts, completions, **kwargs):
    return [score_text(_text(c)) for c in completions]


# ============================================================================================
# Children
# ============================================================================================


class Recorder:
    """Step ends (wall + CPU) and every generation call: (step index, seconds, cpu, tokens, lengths)."""

    def __init__(self):
        self.clock = common.StepClock()
        self.gens: list[dict] = []
        self.logps: list[dict] = []
        self.rewards: list[float] = []

    def logp(self, seconds: float, cpu: float, real: int, fed: int) -> None:
        self.logps.append(dict(step=len(self.clock.ends), seconds=seconds, cpu=cpu, real=real, fed=fed))

    def gen(self, seconds: float, cpu: float, lens: list[int], stopped: int) -> None:
        self.gens.append(dict(step=len(self.clock.ends), seconds=seconds, cpu=cpu, tokens=sum(lens),
                              n=len(lens), stopped=stopped))

    def summary(self, skip: int) -> dict:
        c = self.clock
        out = c.summary(skip)
        n = len(c.ends)
        skip = min(skip, n - 1) if n > 1 else 0
        g = [x for x in self.gens if x["step"] >= skip]
        gs, gc, gt = sum(x["seconds"] for x in g), sum(x["cpu"] for x in g), sum(x["tokens"] for x in g)
        steps = max(1, n - skip)
        lp = [x for x in self.logps if x["step"] >= skip]
        out.update(
            logp_s_per_step=sum(x["seconds"] for x in lp) / steps, logp_cpu_per_step=sum(x["cpu"] for x in lp) / steps,
            rest_cpu_per_step=(out["cpu_s"] - gc - sum(x["cpu"] for x in lp)) / steps,
            logp_fed_per_step=sum(x["fed"] for x in lp) / steps,
            logp_real_share=sum(x["real"] for x in lp) / max(1, sum(x["fed"] for x in lp)),
            cpu_s_per_step=out["cpu_s"] / steps,
            gen_s_per_step=gs / steps, gen_cpu_per_step=gc / steps,
            rollout_tokens_per_s=gt / gs if gs else 0.0, rollout_tokens_per_cpu_s=gt / gc if gc else 0.0,
            gen_tokens_per_step=gt / steps, completions_per_step=sum(x["n"] for x in g) / steps,
            mean_len=gt / max(1, sum(x["n"] for x in g)),
            stopped_frac=sum(x["stopped"] for x in g) / max(1, sum(x["n"] for x in g)),
            rest_s_per_step=(out["timed_s"] - gs) / steps,
            reward_mean=statistics.mean(self.rewards) if self.rewards else None,
        )
        return out


def _profiler_hooks(rec: Recorder, args):
    out = os.environ.get("BENCH_PROFILE")
    if not out:
        return lambda: None
    prof = common.profiler(record_shapes=False)
    state = {"on": False, "done": False}
    n_prof = max(1, min(3, args.steps - args.skip_steps))

    def after_step():
        n = len(rec.clock.ends)
        if state["done"]:
            return
        if not state["on"] and n == args.skip_steps:
            prof.__enter__()
            state["on"], state["t0"] = True, time.perf_counter()
        elif state["on"] and n == args.skip_steps + n_prof:
            prof.__exit__(None, None, None)
            state["done"] = True
            common.sync()
            with open(out, "w") as f:
                f.write(f"{args.child} {args.variant}: {n_prof} steps profiled, "
                        f"{time.perf_counter() - state['t0']:.2f}s wall\n\n")
                f.write(common.profile_tables(prof, 40, total_rows=60))

    return after_step


def child_alignkit(args) -> dict:
    import torch

    import alignkit.training.trainer as T
    from alignkit.recipes import online as ol
    from alignkit.rollout.engine import RolloutEngine

    wd = Path(args.workdir)
    meta = json.loads((wd / "meta.json").read_text())
    stop = set(meta["stop_ids"])
    rec = Recorder()
    after_step = _profiler_hooks(rec, args)

    class BenchEngine(RolloutEngine):
        """The recipe's engine with the benchmark's stop set; times every generate call."""

        def __init__(self, tokenizer, stop_token_ids=None):
            super().__init__(tokenizer, stop_token_ids=stop)

        def generate(self, model, prompts, params):
            t0, c0 = time.perf_counter(), time.process_time()
            batch = super().generate(model, prompts, params)
            rec.gen(time.perf_counter() - t0, time.process_time() - c0, [len(s.completion_ids) for s in batch.samples],
                    sum(s.finish_reason == "eos" for s in batch.samples))
            return batch

    ol.RolloutEngine = BenchEngine
    import alignkit.rollout.engines as engines_mod  # where the recipes build their engine

    engines_mod.RolloutEngine = BenchEngine
    orig_token_logps = ol.token_logps

    def token_logps(model, mb, *a, **kw):  # every log-prob forward: the policy's (with grad) and the reference's
        t0, c0 = time.perf_counter(), time.process_time()
        out = orig_token_logps(model, mb, *a, **kw)
        am = mb["attention_mask"]
        rec.logp(time.perf_counter() - t0, time.process_time() - c0, int(am.sum()), am.numel())
        return out

    ol.token_logps = token_logps
    orig_step, orig_start = T.Trainer.optimizer_step, T.Trainer.start_progress

    def optimizer_step(self, metrics):
        out = orig_step(self, metrics)
        rec.clock.step_end()
        if "reward_mean" in out:
            rec.rewards.append(float(out["reward_mean"]))
        after_step()
        return out

    def start_progress(self):
        rec.clock.start()
        return orig_start(self)

    T.Trainer.optimizer_step, T.Trainer.start_progress = optimizer_step, start_progress

    common_kw = dict(
        model=str(wd / "model"), data=str(wd / "prompts.jsonl"), output_dir=args.run_dir, overwrite=True,
        max_steps=args.steps, batch_size=args.prompts_per_step // args.grad_accum, grad_accum=args.grad_accum,
        lr=args.lr, weight_decay=0.0, adam_betas=(0.9, 0.999), warmup_steps=0, schedule="constant",
        max_grad_norm=1.0, seed=args.seed, dtype=common.alignkit_dtype(), gradient_checkpointing=False, progress=False,
        tensorboard=False, plot=False, save_every=0, eval_every=0, log_every=10, sample_every=0, eval_prompts=0,
        num_generations=args.group, max_new_tokens=args.max_new_tokens, temperature=1.0, top_p=1.0, top_k=0,
        generation_batch_size=64, compute_entropy=True, prompt_column="prompt", chat_prompts=True,
    )
    if args.variant == "grpo":
        from alignkit.recipes.grpo import GRPOConfig, train_grpo as train

        cfg_cls = GRPOConfig
        kw = dict(common_kw, kl_coef=0.0, clip_low=0.2, clip_high=0.2, iterations=1, aggregation="token_mean",
                  scale="group", truncated="keep", dynamic_sampling=False)
    else:
        from alignkit.recipes.rloo import RLOOConfig, train_rloo as train

        cfg_cls = RLOOConfig
        kw = dict(common_kw, kl_coef=args.rloo_beta, kl_in_reward=True)
    kw = {k: v for k, v in kw.items() if k in cfg_cls.model_fields}
    cfg = cfg_cls(**kw)
    t0 = time.perf_counter()
    train(cfg, reward_fn=reward_alignkit)
    total = time.perf_counter() - t0
    out = rec.summary(args.skip_steps)
    out.update(side="alignkit", variant=args.variant, process_s=total, torch_threads=torch.get_num_threads())
    return out


def child_trl(args) -> dict:
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    wd = Path(args.workdir)
    meta = json.loads((wd / "meta.json").read_text())
    rec = Recorder()
    after_step = _profiler_hooks(rec, args)
    if args.variant == "grpo":
        from trl import GRPOConfig as Cfg, GRPOTrainer as Base
    else:
        from trl import RLOOConfig as Cfg, RLOOTrainer as Base

    clock_cb = common.trl_clock_callback(rec.clock, rec.rewards, key="reward", after_step=after_step)

    eos_ids = set(meta["stop_ids"])

    class Timed(Base):
        def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, *a, **kw):
            # policy (with grad), old-policy and reference passes
            t0, c0 = time.perf_counter(), time.process_time()
            out = super()._get_per_token_logps_and_entropies(model, input_ids, attention_mask, *a, **kw)
            rec.logp(time.perf_counter() - t0, time.process_time() - c0, int(attention_mask.sum()),
                     attention_mask.numel())
            return out

        def _generate_single_turn(self, *a, **kw):
            t0, c0 = time.perf_counter(), time.process_time()
            out = super()._generate_single_turn(*a, **kw)
            comp = out[0] if isinstance(out, tuple) else out  # GRPO: (ids, logprobs); RLOO: ids
            rec.gen(time.perf_counter() - t0, time.process_time() - c0, [len(c) for c in comp],
                    sum(1 for c in comp if c and c[-1] in eos_ids))
            return out

    tok = AutoTokenizer.from_pretrained(wd / "model")
    model = AutoModelForCausalLM.from_pretrained(wd / "model", dtype=torch.float32)
    model.generation_config.eos_token_id = list(meta["stop_ids"])  # the trainer ends completions at any of these
    ds = load_dataset("json", data_files=str(wd / "prompts.jsonl"), split="train")
    kw = dict(
        output_dir=args.run_dir, max_steps=args.steps,
        per_device_train_batch_size=(args.prompts_per_step // args.grad_accum) * args.group,
        gradient_accumulation_steps=args.grad_accum, learning_rate=args.lr, weight_decay=0.0, adam_beta1=0.9,
        adam_beta2=0.999, warmup_steps=0, lr_scheduler_type="constant", max_grad_norm=1.0, seed=args.seed,
        data_seed=args.seed, **common.trl_precision(), gradient_checkpointing=False, logging_steps=1,
        save_strategy="no", report_to="none", disable_tqdm=True, dataloader_num_workers=0,
        num_generations=args.group, max_completion_length=args.max_new_tokens, temperature=1.0, top_p=1.0, top_k=0,
        num_iterations=1, epsilon=0.2, log_completions=False, mask_truncated_completions=False,
    )
    if args.variant == "grpo":
        kw.update(beta=0.0, loss_type="dapo", scale_rewards="group")
    else:
        kw.update(beta=args.rloo_beta, normalize_advantages=False)
    targs = Cfg(**kw)
    trainer = Timed(model=model, reward_funcs=[reward_trl], args=targs, train_dataset=ds, processing_class=tok,
                    callbacks=[clock_cb])
    t0 = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - t0
    out = rec.summary(args.skip_steps)
    out.update(side="trl", variant=args.variant, process_s=total, torch_threads=torch.get_num_threads(),
               optim=str(targs.optim), generation_batch_size=targs.generation_batch_size,
               steps_per_generation=targs.steps_per_generation)
    return out


# ============================================================================================
# Parent
# ============================================================================================


def settings_table(args) -> str:
    bs = args.prompts_per_step // args.grad_accum
    G = args.group
    rows = [
        ["samples per prompt", f"`num_generations={G}`", f"`num_generations={G}`"],
        ["prompts per optimizer step", f"`batch_size={bs}` (prompts) x `grad_accum={args.grad_accum}`",
         f"`per_device_train_batch_size={bs * G}` (completions) x `gradient_accumulation_steps={args.grad_accum}` "
         f"-> `generation_batch_size={bs * G * args.grad_accum}` = {args.prompts_per_step} prompts x {G}"],
        ["generation", f"`max_new_tokens={args.max_new_tokens}`, `temperature=1`, `top_p=1`, `top_k=0`, "
         "`generation_batch_size=64` (all prompts of a step prefilled together)",
         f"`max_completion_length={args.max_new_tokens}`, `temperature=1`, `top_p=1`, `top_k=0`, `use_vllm=False` "
         "(one `model.generate` per step on the prompts repeated G times)"],
        ["micro-batches", f"{args.grad_accum} of {bs} whole groups each, in prompt order",
         f"`steps_per_generation={args.grad_accum}` (derived): one generation per optimizer step, the generated "
         f"batch shuffled and split into {args.grad_accum} micro-batches"],
        ["stop set", "rollout engine `stop_token_ids`", "`model.generation_config.eos_token_id`"],
        ["optimizer", f"AdamW lr {args.lr:g}, betas 0.9/0.999, no weight decay, `schedule=constant`, no warmup, "
         "clip 1.0", f"`learning_rate={args.lr:g}`, `lr_scheduler_type=constant`, `warmup_steps=0`, "
         "`max_grad_norm=1.0`, `weight_decay=0` (optimizer `adamw_torch_fused`)"],
        ["precision / memory", "`dtype=float32`, `gradient_checkpointing=false`",
         "`bf16=False`, `use_cpu=True`, `gradient_checkpointing=False` (TRL's default is True)"],
        ["GRPO loss", "`kl_coef=0` (no reference model), `clip_low=clip_high=0.2`, `iterations=1`, "
         "`aggregation=token_mean`, `scale=group`, `truncated=keep`, `compute_entropy=true`",
         "`beta=0` (no reference model), `epsilon=0.2`, `num_iterations=1`, `loss_type=dapo` (token mean over the "
         "global batch), `scale_rewards=group`, `mask_truncated_completions=False` (entropy always computed)"],
        ["RLOO loss", f"`kl_coef={args.rloo_beta:g}`, `kl_in_reward=true` (k1 summed per sequence), leave-one-out "
         "baseline, sequence-level REINFORCE loss, mean over sequences",
         f"`beta={args.rloo_beta:g}` (k1 summed per sequence, in the reward), `normalize_advantages=False`, "
         "`num_iterations=1`, clipped sequence ratio (= 1 at μ = 1), mean over sequences"],
        ["reward", "`reward_fn=` a Python function (same `score_text`)", "`reward_funcs=[...]` the same function"],
        ["logging, saving", "`log_every=10`, no eval, no samples file, final save after the timed steps",
         "`logging_steps=1` (the benchmark reads the reward from the logs), `save_strategy=no`, "
         "`log_completions=False`, `report_to=none`"],
    ]
    return common.markdown_table(["setting", "alignkit", "TRL"], rows)


def child_argv(args, side: str, variant: str, run_dir: str, seed: int = 0) -> list[str]:
    return [
        str(Path(__file__).resolve()), "--seed", str(seed), "--child", side, "--variant", variant,
        "--workdir", str(args.workdir), "--run-dir", run_dir, "--steps", str(args.steps),
        "--skip-steps", str(args.skip_steps),
        "--group", str(args.group), "--prompts-per-step", str(args.prompts_per_step),
        "--grad-accum", str(args.grad_accum), "--max-new-tokens", str(args.max_new_tokens), "--lr", str(args.lr),
        "--rloo-beta", str(args.rloo_beta),
    ]


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "n/a"


def report(args, runs: list[dict], variants: list[str], sides: list[str]) -> str:
    headers = ["recipe", "side", "s/step median (min-max)", "CPU-s/step: generate / log-prob forwards / rest",
               "positions fed to log-prob forwards per step (real share)", "rollout tok/s", "rollout tok per CPU-s",
               "gen tokens/step", "mean length", "peak RSS MiB", "runs"]
    rows, ratio_rows = [], []
    for v in variants:
        per = {}
        for s in sides:
            rs = [r for r in runs if r["side"] == s and r["variant"] == v and r.get("ok")]
            per[s] = rs
            if not rs:
                rows.append([v, s, "FAILED"] + [""] * 7 + [0])
                continue
            m = lambda k: common.med([r[k] for r in rs])  # noqa: E731
            sps = [r["s_per_step"] for r in rs]
            rows.append([
                v.upper(), "alignkit" if s == "alignkit" else "TRL",
                f"{common.med(sps):.2f} ({min(sps):.2f}-{max(sps):.2f})",
                f"{m('cpu_s_per_step'):.2f}: {m('gen_cpu_per_step'):.2f} / {m('logp_cpu_per_step'):.2f} / "
                f"{m('rest_cpu_per_step'):.2f}",
                f"{m('logp_fed_per_step'):,.0f} ({100 * m('logp_real_share'):.0f}%)",
                f"{m('rollout_tokens_per_s'):,.0f}",
                f"{m('rollout_tokens_per_cpu_s'):,.0f}", f"{m('gen_tokens_per_step'):,.0f}", f"{m('mean_len'):.1f}",
                f"{m('peak_rss_mib'):,.0f}", len(rs),
            ])
        if per.get("alignkit") and per.get("trl"):
            a, t = per["alignkit"], per["trl"]
            ma = lambda k: common.med([r[k] for r in a])  # noqa: E731
            mt = lambda k: common.med([r[k] for r in t])  # noqa: E731
            pairs = [y["s_per_step"] / x["s_per_step"] for x, y in zip(a, t)]
            ratio_rows.append([
                v.upper(), f"**{_ratio(mt('s_per_step'), ma('s_per_step'))}**",
                f"{common.med(pairs):.2f}x ({min(pairs):.2f}-{max(pairs):.2f})",
                _ratio(mt("cpu_s_per_step"), ma("cpu_s_per_step")),
                _ratio(ma("rollout_tokens_per_s"), mt("rollout_tokens_per_s")),
                _ratio(mt("cpu_s_per_step") - mt("gen_cpu_per_step"), ma("cpu_s_per_step") - ma("gen_cpu_per_step")),
                _ratio(ma("peak_rss_mib"), mt("peak_rss_mib")),
            ])
    out = common.markdown_table(headers, rows)
    if ratio_rows:
        out += "\n\n" + common.markdown_table(
            ["recipe", "step throughput alignkit / TRL (ratio of median s/step)",
             "per back-to-back pair: median (min-max)", "same, in CPU time", "rollout tok/s alignkit / TRL",
             "non-generation CPU time TRL / alignkit", "peak RSS alignkit / TRL"], ratio_rows)
    return out


def analysis(args, runs: list[dict], variants: list[str]) -> str:
    """Where the time goes, from each run's CPU split (medians)."""

    def m(side, v, key):
        xs = [r[key] for r in runs if r.get("ok") and r["side"] == side and r["variant"] == v]
        return common.med(xs) if xs else float("nan")

    lines = ["Where the time goes (CPU-s per step, medians; CPU time is what the work costs, wall time adds "
             "waiting for a core on a loaded machine):", ""]
    for v in variants:
        if not any(r.get("ok") and r["variant"] == v for r in runs):
            continue
        a_non = m("alignkit", v, "cpu_s_per_step") - m("alignkit", v, "gen_cpu_per_step")
        t_non = m("trl", v, "cpu_s_per_step") - m("trl", v, "gen_cpu_per_step")
        lines.append(
            f"- {v.upper()}: generation {m('trl', v, 'gen_cpu_per_step'):.2f} (TRL) vs "
            f"{m('alignkit', v, 'gen_cpu_per_step'):.2f} (alignkit); log-prob forwards "
            f"{m('trl', v, 'logp_cpu_per_step'):.2f} vs {m('alignkit', v, 'logp_cpu_per_step'):.2f} over "
            f"{m('trl', v, 'logp_fed_per_step'):,.0f} vs {m('alignkit', v, 'logp_fed_per_step'):,.0f} positions "
            f"({100 * m('trl', v, 'logp_real_share'):.0f}% / {100 * m('alignkit', v, 'logp_real_share'):.0f}% of them "
            f"real tokens, the rest padding); everything else (backward, optimizer, scoring, batching) "
            f"{m('trl', v, 'rest_cpu_per_step'):.2f} vs {m('alignkit', v, 'rest_cpu_per_step'):.2f}. Outside "
            f"generation TRL spends {t_non / a_non:.1f}x alignkit's CPU time.")
    lines += [
        "",
        "Why: (1) generation, as in the rollout section: TRL's `generate` prefills every prompt G times and keeps "
        "finished rows in the batch. (2) TRL computes the training log-probs (and entropies) through its fused "
        "LM-head kernel (`trl/kernels/chunked_logprob.py`): a Triton kernel on GPU, which on CPU falls back to "
        "torch ops over vocabulary tiles with an online logsumexp, and whose backward rebuilds the tiles. In a "
        "`--profile` run on this machine its forward and backward (`ChunkedLogProbFunction`) were about half of "
        "TRL's profiled CPU time, in GRPO and in RLOO alike. "
        "alignkit projects only the completion positions through the head, one `logsumexp` per chunk of rows, "
        "under activation checkpointing. (3) RLOO: TRL's RLOOTrainer runs a third, no-grad forward over the "
        "batch for the old-policy log-probs at every step even at `num_iterations=1`; alignkit takes the sampling "
        "log-probs the rollout engine already returned (and logs their gap to the trainer's as "
        "`logprob_mismatch`).",
        "",
        "What alignkit could still change in `src/`: the rollout engine's sampling (see the rollout section: "
        "`torch.multinomial` draws noise for every vocabulary entry of every row at every step; inverse-CDF "
        "sampling draws one number per row), and padding-free micro-batches for the teacher-forced passes "
        "(`ol.split_groups` / `RolloutBatch.tensors` right-pad prompt + completion to the longest row, so only "
        "the share of real positions shown above does useful work in the decoder forward and backward; packing "
        "the rows with per-document positions, as the SFT recipe's `packing=true` does, would remove the rest).",
    ]
    return "\n".join(lines)


def section_body(args, ws: br.RLWorkspace, tables: str, when: str, cmd: str, load: list[float],
                 notes: str = "") -> str:
    lo, mean, hi = ws.prompt_len
    loaded = ""
    if load and max(load) > args.threads * 1.2:
        loaded = (f" The machine was shared with other jobs while this ran (1-minute load average "
                  f"{min(load):.1f}-{max(load):.1f} on {os.cpu_count()} cores), so absolute times are inflated and "
                  "noisy; runs alternate sides so both see the same load, CPU-time columns are less sensitive to it, "
                  "and the ratios are the robust part.")
    return f"""Measured {when} on {common.machine()}, `OMP_NUM_THREADS={args.threads}` for both sides.{loaded}
Versions: {common.versions("torch", "transformers", "trl", "accelerate", "alignkit")}.

Command: `{cmd}`

{tables}

{notes}

Setup (`bench/bench_grpo.py`; model, prompts and stop set built by `bench/bench_rollout.py`'s workspace):

- Model: random-init {ws.shape.describe(ws.n_params)}, float32, SDPA attention; KV cache on for generation.
- Prompts: a set of {len(ws.prompt_ids)} chat prompts of {lo}-{hi} tokens (mean {mean:.0f}) in a `prompt` column
  (message lists), read by each side's own loader and chat template; each side draws its own prompt
  order and samples (seed = the repeat's index on both sides, so repeats average over different draws), {args.prompts_per_step} prompts x G = {args.group} samples per step, {args.max_new_tokens} new tokens at most.
- Stop set: the tokenizer's eos plus a seeded random {args.stop_frac:.4g} of the vocabulary ({len(ws.stop_ids)} ids) on
  both sides, so a random model's samples end at uneven lengths ("mean length" column).
- Reward: the same Python function (share of the letter "a" in the completion text plus 0.01 x words).
- {args.steps} optimizer steps per run, the first {args.skip_steps} left out of the timing; each run a fresh process,
  runs alternating alignkit, TRL ({args.repeats} each). s/step = wall time per optimizer step (rollout + scoring +
  update). The CPU split (process CPU time per step, less sensitive to the machine's load than wall time):
  "generate" = inside the generation call; "log-prob forwards" = every teacher-forced log-prob pass (the
  policy's with grad for the loss, plus the reference / old-policy no-grad passes: alignkit `token_logps`, TRL
  `_get_per_token_logps_and_entropies`); "rest" = everything else (backward, optimizer, tokenizing, scoring,
  batching, logging). Rollout tok/s = generated tokens / wall time inside the generation call. Peak RSS: the
  child's `VmHWM` (whole process; RLOO's includes the reference model on both sides).

Settings, side by side (read from the installed TRL source: `GRPOConfig`/`RLOOConfig` and the trainers):

{settings_table(args)}

Structural differences that are part of what is measured (not settings): TRL expands each prompt
to G rows before `generate`, so every prompt is prefilled G times and finished rows are computed
until the longest one stops; alignkit prefills each prompt once and drops finished samples. TRL's
RLOOTrainer also runs a no-grad forward over the whole batch for the old log-probs at every step,
even at `num_iterations=1`; alignkit uses the rollout engine's sampling log-probs for RLOO's k1
KL-in-reward (the trainer/sampler gap is logged as `logprob_mismatch`).
"""


def main() -> int:
    args = parse_args()
    if args.child:
        fn = child_alignkit if args.child == "alignkit" else child_trl
        common.child_finish(fn(args))
        return 0
    saved = br.load_saved(args)
    variants = common.choices(args.variants, VARIANTS, "--variants")
    sides = common.choices(args.sides, SIDES, "--sides")
    cmd = saved.get("cmd", common.command_line()) if saved else common.command_line()
    tmp = None
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench-grpo-")
        args.workdir = tmp.name
    t0 = time.perf_counter()
    print(f"building model/tokenizer/prompts in {args.workdir} ...", file=sys.stderr, flush=True)
    ws = br.RLWorkspace(Path(args.workdir), common.shape_of(args), args.n_prompts, args.min_prompt_tokens,
                        args.max_prompt_tokens, args.stop_frac)
    print(f"  {ws.shape.describe(ws.n_params)}; {len(ws.prompt_ids)} prompts of {ws.prompt_len[0]}-"
          f"{ws.prompt_len[2]} tokens; {len(ws.stop_ids)} stop ids [{time.perf_counter() - t0:.1f}s]",
          file=sys.stderr, flush=True)
    env = common.child_env(args.threads)

    if args.profile:
        out_dir = Path(args.profile)
        out_dir.mkdir(parents=True, exist_ok=True)
        for v in variants:
            for s in sides:
                run_dir = str(Path(args.workdir) / f"prof-{s}-{v}")
                res = common.run_child(child_argv(args, s, v, run_dir),
                                       dict(env, BENCH_PROFILE=str(out_dir / f"{s}-{v}.txt")))
                print(f"profile {s}/{v}: {'ok' if res.ok else 'FAILED'} -> {out_dir / f'{s}-{v}.txt'}",
                      file=sys.stderr, flush=True)
                if not res.ok:
                    print(res.log_tail, file=sys.stderr)
        return 0

    def launch(cell, s, rep):
        v = cell["variant"]
        return child_argv(args, s, v, str(Path(args.workdir) / f"run-{v}-{s}-{rep}"), seed=rep), env

    def summary(rec):
        return (f"{rec['s_per_step']:.2f} s/step (cpu {rec['cpu_s_per_step']:.2f}, generate "
                f"{rec['gen_s_per_step']:.2f})  rollout {rec['rollout_tokens_per_s']:,.0f} tok/s  "
                f"len {rec['mean_len']:.1f}  peak RSS {rec['peak_rss_mib']:,.0f} MiB  load {rec['load_avg_1m']:.1f}")

    runs: list[dict] = saved["runs"] if saved else []
    failed = False
    if not saved:
        runs, failed = common.alternate_sides([{"variant": v} for v in variants], sides, args.repeats, launch,
                                              summary)
    tables = report(args, runs, variants, sides)
    notes = analysis(args, runs, variants) if len(sides) == 2 else ""
    when = (saved.get("when") if saved else None) or _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    print(tables)
    print("\n" + notes)
    print(f"\n[total {time.perf_counter() - t0:.0f}s]", file=sys.stderr)
    if args.json and not saved:
        Path(args.json).write_text(json.dumps({"args": vars(args), "cmd": cmd, "when": when, "runs": runs}, indent=1,
                                              default=str))
    if args.write:
        load = [r["load_avg_1m"] for r in runs if r.get("ok")]
        common.write_section(common.section_title(SECTION), section_body(args, ws, tables, when, cmd, load, notes))
        print(f"wrote the '## {SECTION}' section of {common.BENCHMARKS_MD}", file=sys.stderr)
    if tmp is not None:
        tmp.cleanup()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
