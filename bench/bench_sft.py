"""SFT throughput and peak memory: alignkit vs TRL's SFTTrainer, on CPU.

Both sides train the same random-init tiny Llama (built offline, see bench/common.py) on the
same `messages` rows with the same settings: float32, batch size, gradient accumulation, max
length, steps, AdamW with lr / betas / weight decay / clipping / cosine schedule, loss on the
assistant tokens only (alignkit: its default; TRL: `assistant_only_loss=True`, the chat template
has `{% generation %}` markers around exactly the span alignkit trains: the answer and its
end-of-turn token). Runs alternate (alignkit, TRL, alignkit, TRL, ...), each in a fresh process.

What is timed: the optimizer steps only (model load, tokenisation and the final save are
outside). Each side records, inside its training loop, the non-padding tokens of every
micro-batch it feeds the model and the wall time at the end of every optimizer step; tokens/s =
tokens of steps 2..N / (end of step N - end of step 1), so step 1's one-off costs are left out on
both sides. Peak RSS = the child's own ru_maxrss (whole process, imports included); the parent's
psutil polling (every 20 ms) is kept as a cross-check.

    python bench/bench_sft.py                 # padded + packed rows, 3 repeats each, prints the table
    python bench/bench_sft.py --write         # also replaces the "## SFT (CPU)" section of BENCHMARKS.md
    python bench/bench_sft.py --variants padded --repeats 1 --steps 10   # quick look
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

SECTION = "SFT (CPU)"
VARIANTS = ("padded", "packed")
SIDES = ("alignkit", "trl")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3, help="runs per side and variant (alternating)")
    p.add_argument("--variants", default="padded,packed", help="comma list of: padded (main row), packed")
    p.add_argument("--sides", default="alignkit,trl", help="comma list of: alignkit, trl")
    p.add_argument("--steps", type=int, default=30, help="optimizer steps per run")
    p.add_argument("--skip-steps", type=int, default=1, help="leading steps left out of the timing")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--rows", type=int, default=512, help="conversations in the data set")
    p.add_argument("--min-tokens", type=int, default=100)
    p.add_argument("--max-tokens", type=int, default=300)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--intermediate", type=int, default=768)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", 0)) or os.cpu_count(),
                   help="OMP_NUM_THREADS for both sides (default: $OMP_NUM_THREADS or all cores)")
    p.add_argument("--workdir", default=None, help="where to build the model/data (default: a temp dir)")
    p.add_argument("--write", action="store_true", help="replace the '## SFT (CPU)' section of BENCHMARKS.md")
    p.add_argument("--json", default=None, help="also write every run's raw measurements to this file")
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="run one child per side under torch.profiler and write the op tables to DIR")
    # internal: one measured run
    p.add_argument("--child", choices=SIDES, help=argparse.SUPPRESS)
    p.add_argument("--variant", choices=VARIANTS, default="padded", help=argparse.SUPPRESS)
    p.add_argument("--run-dir", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ============================================================================================
# Children: one training run each
# ============================================================================================


def _profiler(args):
    """torch.profiler over timed steps when BENCH_PROFILE names an output file, else None."""
    out = os.environ.get("BENCH_PROFILE")
    if not out:
        return None
    import torch

    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=False,
                                  profile_memory=True, with_stack=False)
    prof.out = out
    return prof


def _profile_hooks(prof, clock, args):
    """Start the profiler after `skip` steps, stop after 5 more; write the tables."""
    state = {"on": False, "done": False}

    def after_step():
        n = len(clock.ends)
        if prof is None or state["done"]:
            return
        if not state["on"] and n == args.skip_steps + 1:
            prof.__enter__()
            state["on"] = True
        elif state["on"] and n == args.skip_steps + 6:
            prof.__exit__(None, None, None)
            state["done"] = True
            ka = prof.key_averages()
            with open(prof.out, "w") as f:
                f.write(ka.table(sort_by="self_cpu_time_total", row_limit=45))
                f.write("\n\n")
                f.write(ka.table(sort_by="cpu_time_total", row_limit=45))
                f.write("\n\n")
                f.write(ka.table(sort_by="self_cpu_memory_usage", row_limit=25))

    return after_step


def child_alignkit(args) -> dict:
    import torch

    import alignkit
    import alignkit.training.trainer as T
    from alignkit.data.collate import IGNORE
    from alignkit.recipes.sft import SFTConfig, train_sft

    clock = common.StepClock()
    losses: list[float] = []
    prof = _profiler(args)
    after_step = _profile_hooks(prof, clock, args)
    orig_accumulate, orig_step = T.Trainer.accumulate, T.Trainer.optimizer_step

    def accumulate(self, micro_batches, loss_fn, units):
        for mb in micro_batches:
            am = mb.get("attention_mask")
            toks = int(am.sum()) if am is not None else int(mb["input_ids"].numel())
            clock.micro(toks, int((mb["targets"] != IGNORE).sum()))
        return orig_accumulate(self, micro_batches, loss_fn, units)

    def optimizer_step(self, metrics):
        out = orig_step(self, metrics)
        clock.step_end()
        losses.append(float(out["loss"]))
        after_step()
        return out

    T.Trainer.accumulate, T.Trainer.optimizer_step = accumulate, optimizer_step

    orig_start = T.Trainer.start_progress

    def start_progress(self):  # called right before the step loop
        clock.start()
        return orig_start(self)

    T.Trainer.start_progress = start_progress

    cfg = SFTConfig(
        model=str(Path(args.workdir) / "model"), data=str(Path(args.workdir) / "data.jsonl"),
        output_dir=args.run_dir, overwrite=True, max_steps=args.steps, batch_size=args.batch_size,
        grad_accum=args.grad_accum, lr=args.lr, weight_decay=0.0, adam_betas=(0.9, 0.999), warmup_steps=0,
        schedule="cosine", min_lr_ratio=0.0, max_grad_norm=1.0, max_length=args.max_length, seed=0,
        dtype="float32", gradient_checkpointing=False, packing=args.variant == "packed",
        progress=False, tensorboard=False, save_every=0, eval_every=0, log_every=10,
    )
    t0 = time.perf_counter()
    train_sft(cfg)
    total = time.perf_counter() - t0
    out = clock.summary(args.skip_steps)
    out.update(side="alignkit", variant=args.variant, loss_last10=sum(losses[-10:]) / max(1, len(losses[-10:])),
               loss_first=losses[0] if losses else None, process_s=total, torch_threads=torch.get_num_threads(),
               version=alignkit.__version__ if hasattr(alignkit, "__version__") else None)
    return out


def child_trl(args) -> dict:
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    clock = common.StepClock()
    prof = _profiler(args)
    after_step = _profile_hooks(prof, clock, args)
    losses: list[float] = []

    class Clock(TrainerCallback):
        def on_train_begin(self, a, state, control, **kw):
            clock.start()

        def on_step_end(self, a, state, control, **kw):
            clock.step_end()
            after_step()

        def on_log(self, a, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    class TimedSFTTrainer(SFTTrainer):
        def training_step(self, model, inputs, *rest, **kw):
            am = inputs.get("attention_mask")
            toks = int(am.sum()) if am is not None else int(inputs["input_ids"].numel())
            clock.micro(toks, int((inputs["labels"][:, 1:] != -100).sum()))
            return super().training_step(model, inputs, *rest, **kw)

    wd = Path(args.workdir)
    tok = AutoTokenizer.from_pretrained(wd / "model")
    model = AutoModelForCausalLM.from_pretrained(wd / "model", dtype=torch.float32)
    ds = load_dataset("json", data_files=str(wd / "data.jsonl"), split="train")
    packed = args.variant == "packed"
    kwargs = dict(
        output_dir=args.run_dir, max_steps=args.steps,
        per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999, warmup_steps=0,
        lr_scheduler_type="cosine", max_grad_norm=1.0, seed=0, data_seed=0,
        bf16=False, fp16=False, use_cpu=True, gradient_checkpointing=False,
        assistant_only_loss=True, packing=False, padding_free=packed,
        # padding-free without packing requires max_length=None in TRL; every row is already
        # shorter than --max-length (checked by the parent), so nothing would be cut anyway.
        max_length=None if packed else args.max_length,
        logging_steps=10, save_strategy="no", report_to="none", disable_tqdm=True,
        dataloader_num_workers=0, dataset_num_proc=None,
    )
    targs = SFTConfig(**kwargs)
    trainer = TimedSFTTrainer(model=model, args=targs, train_dataset=ds, processing_class=tok, callbacks=[Clock()])
    t0 = time.perf_counter()
    trainer.train()
    trainer.save_model(args.run_dir)
    total = time.perf_counter() - t0
    out = clock.summary(args.skip_steps)
    out.update(side="trl", variant=args.variant, loss_last10=losses[-1] if losses else None,
               loss_first=None, process_s=total, torch_threads=torch.get_num_threads(),
               optim=str(targs.optim))
    return out


def run_one_child(args) -> None:
    fn = child_alignkit if args.child == "alignkit" else child_trl
    common.child_finish(fn(args))


# ============================================================================================
# Parent: build once, alternate runs, report
# ============================================================================================


def child_argv(args, side: str, variant: str, run_dir: str) -> list[str]:
    return [
        str(Path(__file__).resolve()), "--child", side, "--variant", variant, "--workdir", str(args.workdir),
        "--run-dir", run_dir, "--steps", str(args.steps), "--skip-steps", str(args.skip_steps),
        "--batch-size", str(args.batch_size), "--grad-accum", str(args.grad_accum),
        "--max-length", str(args.max_length), "--lr", str(args.lr),
    ]


def fmt_ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "n/a"


def report(args, ws: common.Workspace, runs: list[dict], variants: list[str], sides: list[str]) -> str:
    headers = ["variant", "side", "tokens/s median (min-max)", "trained tok/s", "peak RSS MiB (min-max)",
               "RSS growth in training MiB", "s/step", "loss (last 10 steps)", "runs"]
    rows = []
    ratio_rows = []
    for v in variants:
        per = {}
        for s in sides:
            rs = [r for r in runs if r["side"] == s and r["variant"] == v and r.get("ok")]
            per[s] = rs
            if not rs:
                rows.append([v, s, "FAILED", "", "", "", "", "", 0])
                continue
            tps = [r["tokens_per_s"] for r in rs]
            rss = [r["peak_rss_mib"] for r in rs]
            grow = [r["peak_rss_mib"] - r["rss_at_train_start_mib"] for r in rs]
            loss = [r["loss_last10"] for r in rs if r.get("loss_last10") is not None]
            rows.append([
                v, s, common.spread(tps), f"{common.med([r['trained_tokens_per_s'] for r in rs]):,.0f}",
                common.spread(rss), f"{common.med(grow):,.0f}", f"{common.med([r['s_per_step'] for r in rs]):.3f}",
                f"{common.med(loss):.3f}" if loss else "n/a", len(rs),
            ])
        if "alignkit" in per and "trl" in per and per["alignkit"] and per["trl"]:
            a, t = per["alignkit"], per["trl"]
            ratio_rows.append([
                v,
                fmt_ratio(common.med([r["tokens_per_s"] for r in a]), common.med([r["tokens_per_s"] for r in t])),
                fmt_ratio(common.med([r["peak_rss_mib"] for r in a]), common.med([r["peak_rss_mib"] for r in t])),
                fmt_ratio(common.med([r["peak_rss_mib"] - r["rss_at_train_start_mib"] for r in a]),
                          common.med([r["peak_rss_mib"] - r["rss_at_train_start_mib"] for r in t])),
                f"{common.med([r['tokens'] / r['timed_steps'] for r in a]):,.0f} / "
                f"{common.med([r['tokens'] / r['timed_steps'] for r in t]):,.0f}",
                f"{common.med([r['trained_tokens'] / r['tokens'] for r in a]):.3f} / "
                f"{common.med([r['trained_tokens'] / r['tokens'] for r in t]):.3f}",
            ])
    table = common.markdown_table(headers, rows)
    ratios = common.markdown_table(
        ["variant", "tokens/s alignkit/TRL", "peak RSS alignkit/TRL", "RSS growth alignkit/TRL",
         "tokens per step alignkit / TRL", "trained share alignkit / TRL"], ratio_rows) if ratio_rows else ""
    return table + ("\n\n" + ratios if ratios else "")


def section_body(args, ws: common.Workspace, tables: str, when: str, cmd: str) -> str:
    shape = ws.shape
    return f"""Measured {when} on {common.machine()}, `OMP_NUM_THREADS={args.threads}` for both sides.
Versions: {common.versions("torch", "transformers", "trl", "accelerate", "alignkit")}.

Command: `{cmd}`

{tables}

Setup (`bench/bench_sft.py`, helpers in `bench/common.py`):

- Model: random-init {shape.describe(ws.n_params)}, float32, SDPA attention, built offline.
  The vocabulary sets the LM-head share of the work ({2 * shape.vocab * shape.hidden / 1e6:.1f} MFLOP
  per scored token for the head vs about {2 * (ws.n_params - shape.vocab * shape.hidden) / 1e6:.1f} MFLOP
  in the decoder), so it is the knob that most changes the outcome.
- Tokenizer: byte-level BPE ({shape.vocab} entries) trained offline, ChatML template with
  `{{% generation %}}` markers around each answer and its `<|im_end|>`.
- Data: {ws.n_rows} `messages` rows (a third with a system turn, a quarter with two exchanges),
  {ws.row_tokens[0]}-{ws.row_tokens[1]} tokens each (mean {ws.mean_tokens:.0f}, of which
  {ws.mean_trained:.0f} assistant tokens are trained).
- Both sides: batch {args.batch_size} x grad accumulation {args.grad_accum}, {args.steps} optimizer steps,
  max length {args.max_length}, AdamW lr {args.lr:g} (betas 0.9/0.999, no weight decay), cosine to 0, no
  warmup, clip 1.0, no gradient checkpointing, float32, seed 0. Loss on the assistant tokens only:
  alignkit by default; TRL with `assistant_only_loss=True` (the same token set, checked by
  decoding both masks; the "trained share" column shows the same fraction on both sides). Each side
  uses its own AdamW implementation (alignkit: `torch.optim.AdamW` foreach; TRL: the transformers
  default `adamw_torch_fused`).
- padded: right-padded micro-batches (alignkit `packing=false`; TRL `packing=False,
  padding_free=False`). packed: the {args.batch_size} rows of a micro-batch concatenated into one
  sequence, positions restarting per document, no padding (alignkit `packing=true`; TRL
  `padding_free=True` with `packing=False` and `max_length=None`, which is the same micro-batch
  content — TRL's `packing=True` would instead fill {args.batch_size} blocks of `max_length` tokens
  per micro-batch, 2.5x the tokens per step).
- Runs alternate alignkit, TRL, alignkit, ... each in a fresh process.
- tokens/s: non-padding tokens fed to the model per second over optimizer steps
  {args.skip_steps + 1}..{args.steps} (from the end of step {args.skip_steps} to the end of the last step, recorded
  inside each training loop: alignkit via wrappers on `Trainer.accumulate`/`optimizer_step`,
  TRL via a `training_step` override and a `TrainerCallback`); model loading, tokenisation and the
  final save are not timed. "trained tok/s" counts only the tokens that carry loss.
- peak RSS: the child's `ru_maxrss` (whole process, imports included). "RSS growth in training" =
  peak RSS minus the RSS when the first step starts (what training itself adds).
- loss: mean training loss over the last 10 steps (a sanity check that both train the same thing).
"""


def main() -> int:
    args = parse_args()
    if args.child:
        run_one_child(args)
        return 0
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    for v in variants:
        if v not in VARIANTS:
            raise SystemExit(f"--variants: unknown {v!r}; use {', '.join(VARIANTS)}")
    for s in sides:
        if s not in SIDES:
            raise SystemExit(f"--sides: unknown {s!r}; use {', '.join(SIDES)}")
    if args.max_tokens > args.max_length:
        raise SystemExit("--max-tokens must be <= --max-length (the packed TRL row runs with max_length=None)")
    cmd = common.command_line()
    tmp = None
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench-sft-")
        args.workdir = tmp.name
    shape = common.ModelShape(hidden=args.hidden, layers=args.layers, heads=args.heads, kv_heads=args.kv_heads,
                              intermediate=args.intermediate, vocab=args.vocab)
    t0 = time.perf_counter()
    print(f"building model/tokenizer/data in {args.workdir} ...", file=sys.stderr, flush=True)
    ws = common.build_workspace(Path(args.workdir), shape, args.rows, args.min_tokens, args.max_tokens)
    print(f"  {shape.describe(ws.n_params)}; {ws.n_rows} rows, mean {ws.mean_tokens:.0f} tokens "
          f"({ws.mean_trained:.0f} trained) [{time.perf_counter() - t0:.1f}s]", file=sys.stderr, flush=True)
    env = common.child_env(args.threads)

    if args.profile:
        out_dir = Path(args.profile)
        out_dir.mkdir(parents=True, exist_ok=True)
        for v in variants:
            for s in sides:
                prof_env = dict(env, BENCH_PROFILE=str(out_dir / f"{s}-{v}.txt"))
                run_dir = str(Path(args.workdir) / f"prof-{s}-{v}")
                res = common.run_child(child_argv(args, s, v, run_dir), prof_env)
                print(f"profile {s}/{v}: {'ok' if res.ok else 'FAILED'} -> {out_dir / f'{s}-{v}.txt'}",
                      file=sys.stderr, flush=True)
                if not res.ok:
                    print(res.log_tail, file=sys.stderr)
        return 0

    runs: list[dict] = []
    failed = False
    for v in variants:
        for rep in range(args.repeats):
            for s in sides:
                run_dir = str(Path(args.workdir) / f"run-{v}-{s}-{rep}")
                res = common.run_child(child_argv(args, s, v, run_dir), env)
                rec = dict(res.data, side=s, variant=v, repeat=rep, ok=res.ok, wall_s=res.wall_s,
                           peak_rss_mib_polled=res.peak_rss_mib_polled, returncode=res.returncode)
                runs.append(rec)
                if res.ok:
                    print(f"{v:>6} {s:>8} #{rep + 1}: {rec['tokens_per_s']:8,.0f} tok/s  "
                          f"{rec['s_per_step']:.3f} s/step  peak RSS {rec['peak_rss_mib']:7,.0f} MiB "
                          f"(polled {rec['peak_rss_mib_polled']:,.0f}, at start {rec['rss_at_train_start_mib']:,.0f})"
                          f"  loss {rec.get('loss_last10') or float('nan'):.3f}  [{res.wall_s:.0f}s]",
                          file=sys.stderr, flush=True)
                else:
                    failed = True
                    print(f"{v} {s} #{rep + 1}: FAILED (exit {res.returncode})\n{res.log_tail}", file=sys.stderr,
                          flush=True)
    tables = report(args, ws, runs, variants, sides)
    when = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    print(tables)
    print(f"\n[total {time.perf_counter() - t0:.0f}s]", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "runs": runs}, indent=1, default=str))
    if args.write:
        common.write_section(SECTION, section_body(args, ws, tables, when, cmd))
        print(f"wrote the '## {SECTION}' section of {common.BENCHMARKS_MD}", file=sys.stderr)
    if tmp is not None:
        tmp.cleanup()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
