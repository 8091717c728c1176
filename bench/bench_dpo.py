"""DPO step time and peak memory: alignkit vs TRL's DPOTrainer, on CPU.

Both sides train the same random-init tiny Llama (built offline, see bench/common.py) on the
same conversational preference pairs (`prompt` messages, `chosen` / `rejected` assistant turns)
with the same settings: float32, batch size (pairs), gradient accumulation, max length, steps,
AdamW with lr / betas / weight decay / clipping / cosine schedule, sigmoid loss with the same
beta. Runs alternate (alignkit, TRL, ...), each in a fresh process.

Sides and variants:

    full   alignkit          reference log-probs precomputed once (its default without an adapter)
           trl               TRL's default: a second copy of the model as the reference, one
                             reference forward per step
           trl-precompute    TRL with precompute_ref_log_probs=True (no resident reference)
    lora   alignkit          LoRA r=16 on every linear layer; reference = adapter switched off
           trl               the same LoRA (peft_config); reference = adapter switched off

What is timed: the optimizer steps (model load, tokenisation, the reference pre-pass and the
final save are outside; the pre-pass is timed on its own and reported). Each side records the
non-padding tokens of every micro-batch it feeds the model and the wall time at the end of
every optimizer step; pairs/s and tokens/s are over steps skip+1..N. "1-epoch pairs/s" adds the
pre-pass cost per pair: 1 / (1 / pairs_per_s + prepass_s / pairs_in_data), the throughput of a
one-epoch run. Peak RSS = the child's own VmHWM (whole process, imports included).

    python bench/bench_dpo.py                  # full + lora, 3 repeats each, prints the tables
    python bench/bench_dpo.py --write          # also replaces the "## DPO (CPU)" section of BENCHMARKS.md
    python bench/bench_dpo.py --variants full --repeats 1 --steps 10   # quick look
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

SECTION = "DPO (CPU)"
VARIANTS = ("full", "lora")
SIDES = {"full": ("alignkit", "trl", "trl-precompute"), "lora": ("alignkit", "trl")}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3, help="runs per side and variant (alternating)")
    p.add_argument("--variants", default="full,lora", help="comma list of: full, lora")
    p.add_argument("--sides", default="alignkit,trl,trl-precompute", help="comma list of sides to run")
    p.add_argument("--steps", type=int, default=30, help="optimizer steps per run")
    p.add_argument("--skip-steps", type=int, default=1, help="leading steps left out of the timing")
    p.add_argument("--batch-size", type=int, default=4, help="pairs per micro-batch (2x rows)")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--pairs", type=int, default=256, help="preference pairs in the data set")
    p.add_argument("--min-tokens", type=int, default=100)
    p.add_argument("--max-tokens", type=int, default=300)
    common.add_model_args(p)
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", 0)) or os.cpu_count(),
                   help="OMP_NUM_THREADS for both sides (default: $OMP_NUM_THREADS or all cores)")
    p.add_argument("--workdir", default=None, help="where to build the model/data (default: a temp dir)")
    p.add_argument("--write", action="store_true", help="replace the '## DPO (CPU)' section of BENCHMARKS.md")
    p.add_argument("--json", default=None, help="also write every run's raw measurements to this file")
    p.add_argument("--note", default="", help="a sentence added under the tables (e.g. about machine load)")
    p.add_argument("--from-json", default=None, metavar="FILE",
                   help="no runs: print (and with --write, record) the tables of a file written by --json")
    # internal: one measured run
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--variant", choices=VARIANTS, default="full", help=argparse.SUPPRESS)
    p.add_argument("--run-dir", default=None, help=argparse.SUPPRESS)
    common.add_device_arg(p)
    args = p.parse_args(argv)
    common.use_device(args.device)
    return args


# ============================================================================================
# Data: preference pairs from the benchmark's conversations
# ============================================================================================


def build_pairs(ws: common.Workspace, n_pairs: int, seed: int = 0) -> Path:
    """`prompt` = every turn before the last answer, `chosen` = the last answer, `rejected` = other
    pseudo-text of about the same number of tokens (so both sides of a pair cost the same)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ws.model_dir)
    src = common.TextSource(seed + 7)
    src.rng = random.Random(seed + 8)
    rng = random.Random(seed + 9)
    cache: dict = {}
    rows = [json.loads(ln) for ln in ws.data_path.read_text().splitlines() if ln.strip()]
    out = []
    for r in rows[:n_pairs]:
        msgs = r["messages"]
        answer = msgs[-1]["content"]
        n = len(tok(answer, add_special_tokens=False)["input_ids"])
        bad = common._text_of_tokens(tok, src, cache, max(4, int(n * rng.uniform(0.8, 1.2))))
        out.append({"prompt": msgs[:-1], "chosen": [msgs[-1]], "rejected": [{"role": "assistant", "content": bad}]})
    path = ws.root / "pairs.jsonl"
    with path.open("w", encoding="utf-8") as f:
        for r in out:
            f.write(json.dumps(r) + "\n")
    return path


# ============================================================================================
# Children: one training run each
# ============================================================================================


def child_alignkit(args) -> dict:
    import torch

    import alignkit.recipes.dpo as D
    import alignkit.training.trainer as T
    from alignkit.config import DPOConfig

    clock = common.StepClock()
    losses: list[float] = []
    prepass = {"s": 0.0}
    orig_accumulate, orig_step = T.Trainer.accumulate, T.Trainer.optimizer_step
    orig_ref = D.compute_reference_logps

    def compute_reference_logps(*a, **k):
        t = time.perf_counter()
        out = orig_ref(*a, **k)
        prepass["s"] += time.perf_counter() - t
        return out

    D.compute_reference_logps = compute_reference_logps

    def accumulate(self, micro_batches, loss_fn, units):
        for mb in micro_batches:
            clock.micro(int(mb["attention_mask"].sum()), int(mb["n_pairs"]))
        return orig_accumulate(self, micro_batches, loss_fn, units)

    def optimizer_step(self, metrics):
        out = orig_step(self, metrics)
        clock.step_end()
        losses.append(float(out["loss"]))
        return out

    T.Trainer.accumulate, T.Trainer.optimizer_step = accumulate, optimizer_step
    orig_start = T.Trainer.start_progress

    def start_progress(self):  # right before the step loop
        clock.start()
        return orig_start(self)

    T.Trainer.start_progress = start_progress
    extra = {}
    if args.variant == "lora":
        extra["peft"] = {"method": "lora", "r": args.lora_r, "alpha": 2 * args.lora_r, "dropout": 0.0,
                         "target_modules": "all-linear"}
    cfg = DPOConfig(
        model=str(Path(args.workdir) / "model"), data=str(Path(args.workdir) / "pairs.jsonl"),
        output_dir=args.run_dir, overwrite=True, max_steps=args.steps, batch_size=args.batch_size,
        grad_accum=args.grad_accum, lr=args.lr, weight_decay=0.0, adam_betas=(0.9, 0.999), warmup_steps=0,
        schedule="cosine", min_lr_ratio=0.0, max_grad_norm=1.0, max_length=args.max_length, seed=0,
        dtype=common.alignkit_dtype(), gradient_checkpointing=False, loss="sigmoid", beta=args.beta, reference="auto",
        ref_batch_size=args.batch_size, progress=False, tensorboard=False, save_every=0, eval_every=0, log_every=10,
        **extra,
    )
    t0 = time.perf_counter()
    D.train_dpo(cfg)
    total = time.perf_counter() - t0
    out = clock.summary(args.skip_steps)
    out.update(side="alignkit", variant=args.variant, loss_last10=sum(losses[-10:]) / max(1, len(losses[-10:])),
               loss_first=losses[0] if losses else None, process_s=total, prepass_s=prepass["s"],
               torch_threads=torch.get_num_threads())
    return out


def child_trl(args, precompute: bool) -> dict:
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    clock = common.StepClock()
    losses: list[float] = []
    prepass = {"s": 0.0}

    clock_cb = common.trl_clock_callback(clock, losses)

    class TimedDPOTrainer(DPOTrainer):
        def training_step(self, model, inputs, *rest, **kw):
            # chosen rows then rejected rows: 2 x pairs
            clock.micro(int(inputs["attention_mask"].sum()), int(inputs["input_ids"].shape[0] // 2))
            return super().training_step(model, inputs, *rest, **kw)

        def _precompute_ref_logps(self, *a, **k):
            t = time.perf_counter()
            out = super()._precompute_ref_logps(*a, **k)
            prepass["s"] += time.perf_counter() - t
            return out

    wd = Path(args.workdir)
    tok = AutoTokenizer.from_pretrained(wd / "model")
    model = AutoModelForCausalLM.from_pretrained(wd / "model", dtype=torch.float32)
    ds = load_dataset("json", data_files=str(wd / "pairs.jsonl"), split="train")
    peft_config = None
    if args.variant == "lora":
        from peft import LoraConfig

        peft_config = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0,
                                 target_modules="all-linear", task_type="CAUSAL_LM")
    targs = DPOConfig(
        output_dir=args.run_dir, max_steps=args.steps,
        per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999, warmup_steps=0,
        lr_scheduler_type="cosine", max_grad_norm=1.0, seed=0, data_seed=0,
        **common.trl_precision(), gradient_checkpointing=False,
        max_length=args.max_length, beta=args.beta, loss_type=["sigmoid"],
        precompute_ref_log_probs=precompute, precompute_ref_batch_size=args.batch_size,
        logging_steps=10, save_strategy="no", report_to="none", disable_tqdm=True,
        dataloader_num_workers=0, dataset_num_proc=None,
    )
    trainer = TimedDPOTrainer(model=model, args=targs, train_dataset=ds, processing_class=tok, callbacks=[clock_cb],
                              peft_config=peft_config)
    t0 = time.perf_counter()
    trainer.train()
    trainer.save_model(args.run_dir)
    total = time.perf_counter() - t0
    out = clock.summary(args.skip_steps)
    out.update(side="trl-precompute" if precompute else "trl", variant=args.variant,
               loss_last10=sum(losses[-1:]) if losses else None, loss_first=None, process_s=total,
               prepass_s=prepass["s"], torch_threads=torch.get_num_threads(),
               resident_reference=trainer.ref_model is not None)
    return out


def run_one_child(args) -> None:
    if args.child == "alignkit":
        res = child_alignkit(args)
    elif args.child in ("trl", "trl-precompute"):
        res = child_trl(args, precompute=args.child == "trl-precompute")
    else:
        raise SystemExit(f"unknown side {args.child!r}")
    common.child_finish(res)


# ============================================================================================
# Parent: build once, alternate runs, report
# ============================================================================================


def child_argv(args, side: str, variant: str, run_dir: str) -> list[str]:
    return [
        str(Path(__file__).resolve()), "--child", side, "--variant", variant, "--workdir", str(args.workdir),
        "--run-dir", run_dir, "--steps", str(args.steps), "--skip-steps", str(args.skip_steps),
        "--batch-size", str(args.batch_size), "--grad-accum", str(args.grad_accum),
        "--max-length", str(args.max_length), "--lr", str(args.lr), "--beta", str(args.beta),
        "--lora-r", str(args.lora_r),
    ]


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "n/a"


def _spread2(xs: list[float]) -> str:
    if len(xs) == 1:
        return f"{xs[0]:.2f}"
    return f"{common.med(xs):.2f} ({min(xs):.2f}-{max(xs):.2f})"


def _epoch_pairs_per_s(r: dict, n_pairs: int) -> float:
    pps = r["trained_tokens_per_s"]  # StepClock's second counter holds pairs here
    return 1.0 / (1.0 / pps + r.get("prepass_s", 0.0) / n_pairs)


def report(args, runs: list[dict], variants: list[str], sides: list[str], n_pairs: int) -> str:
    headers = ["variant", "side", "pairs/s median (min-max)", "tokens/s", "s/step", "reference pre-pass s",
               "1-epoch pairs/s", "peak RSS MiB (min-max)", "RSS growth in training MiB", "loss (end)", "runs"]
    rows, ratio_rows = [], []
    for v in variants:
        per = {}
        for s in [s for s in sides if s in SIDES[v]]:
            rs = [r for r in runs if r["side"] == s and r["variant"] == v and r.get("ok")]
            per[s] = rs
            if not rs:
                rows.append([v, s, "FAILED", "", "", "", "", "", "", "", 0])
                continue
            med = common.med
            rows.append([
                v, s, _spread2([r["trained_tokens_per_s"] for r in rs]),
                f"{med([r['tokens_per_s'] for r in rs]):,.0f}", f"{med([r['s_per_step'] for r in rs]):.3f}",
                f"{med([r.get('prepass_s', 0.0) for r in rs]):.1f}",
                f"{med([_epoch_pairs_per_s(r, n_pairs) for r in rs]):.2f}",
                common.spread([r["peak_rss_mib"] for r in rs]),
                f"{med([r['peak_rss_mib'] - r['rss_at_train_start_mib'] for r in rs]):,.0f}",
                f"{med([r['loss_last10'] for r in rs if r.get('loss_last10') is not None]):.3f}", len(rs),
            ])
        a = per.get("alignkit")
        for other in ("trl", "trl-precompute"):
            t = per.get(other)
            if not a or not t:
                continue
            med = common.med
            ratio_rows.append([
                v, f"alignkit / {other}",
                _ratio(med([r["trained_tokens_per_s"] for r in a]), med([r["trained_tokens_per_s"] for r in t])),
                _ratio(med([_epoch_pairs_per_s(r, n_pairs) for r in a]), med([_epoch_pairs_per_s(r, n_pairs) for r in t])),
                _ratio(med([r["peak_rss_mib"] for r in a]), med([r["peak_rss_mib"] for r in t])),
                _ratio(med([r["peak_rss_mib"] - r["rss_at_train_start_mib"] for r in a]),
                       med([r["peak_rss_mib"] - r["rss_at_train_start_mib"] for r in t])),
                f"{med([r['tokens'] / r['timed_steps'] for r in a]):,.0f} / "
                f"{med([r['tokens'] / r['timed_steps'] for r in t]):,.0f}",
            ])
    table = common.markdown_table(headers, rows)
    ratios = common.markdown_table(
        ["variant", "pair", "pairs/s (steps)", "1-epoch pairs/s", "peak RSS", "RSS growth in training",
         "tokens per step"], ratio_rows) if ratio_rows else ""
    return table + ("\n\n" + ratios if ratios else "")


def _trl_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("trl")
    except PackageNotFoundError:
        return "?"


def section_body(args, ws: common.Workspace, n_pairs: int, tables: str, when: str, cmd: str) -> str:
    shape = ws.shape
    return f"""Measured {when} on {common.machine()}, `OMP_NUM_THREADS={args.threads}` for both sides.
Versions: {common.versions("torch", "transformers", "trl", "peft", "accelerate", "alignkit")}.

Command: `{cmd}`

{tables}
{("" if not args.note else chr(10) + args.note + chr(10))}
Setup (`bench/bench_dpo.py`, helpers in `bench/common.py`):

- Model: random-init {shape.describe(ws.n_params)}, float32, SDPA attention, built offline.
- Data: {n_pairs} conversational pairs: `prompt` = the turns before the last answer of the
  benchmark's `messages` rows ({ws.row_tokens[0]}-{ws.row_tokens[1]} tokens per conversation), `chosen` =
  that answer, `rejected` = pseudo-text of 0.8-1.2x its token count. Each pair is two sequences.
- Both sides: batch {args.batch_size} pairs x grad accumulation {args.grad_accum}, {args.steps} optimizer steps,
  max length {args.max_length}, sigmoid loss, beta {args.beta:g}, AdamW lr {args.lr:g} (betas 0.9/0.999, no weight
  decay), cosine to 0, no warmup, clip 1.0, no gradient checkpointing, float32, seed 0. Chosen and
  rejected rows go through the model in one forward on both sides; log-probs come from
  alignkit's chunked head (plain PyTorch) and from TRL 1.x's fused LM head (see below).
- full: alignkit precomputes the reference log-probs in one no-grad pass before training (its
  default); TRL by default loads a second copy of the model and runs it every step;
  `trl-precompute` is TRL with `precompute_ref_log_probs=True`. The pre-pass is not in the step
  timing; its wall time is the "reference pre-pass" column, and "1-epoch pairs/s" charges it to
  a one-epoch run over the {n_pairs} pairs.
- lora: LoRA r={args.lora_r}, alpha={2 * args.lora_r}, no dropout, every linear layer but the head, on both
  sides; the reference is the same model with the adapter switched off, one extra no-grad forward
  per step on both sides.
- Where the difference comes from (reading TRL {_trl_version()}'s code, not profiled here): on a device
  without Triton (this CPU) TRL's fused head scores *every* position of the batch — prompt and
  padding included — in tiles of up to 32768 rows, so it builds the (positions x vocab) logits of
  the whole micro-batch at once; alignkit scores only the answer positions, 1024 rows at a time
  under activation checkpointing. In `full`, TRL's default also keeps the second model and runs it
  every step. Both sides end at the same loss, so they optimise the same objective.
- Runs alternate between the sides, each in a fresh process. pairs/s and tokens/s (non-padding
  tokens fed to the model) over optimizer steps {args.skip_steps + 1}..{args.steps}, recorded inside each
  training loop; peak RSS is the child's `VmHWM` (imports included); "RSS growth in training"
  = peak RSS minus the RSS when the first step starts.
"""


def from_json(args) -> int:
    """Tables (and with --write the BENCHMARKS.md section) from the raw runs of an earlier --json."""
    saved = json.loads(Path(args.from_json).read_text())
    a = argparse.Namespace(**{**vars(args), **saved["args"], "write": args.write, "from_json": args.from_json,
                              "note": args.note or saved["args"].get("note", "")})
    runs = saved["runs"]
    variants = common.choices(a.variants)
    sides = common.choices(a.sides)
    tables = report(a, runs, variants, sides, a.pairs)
    print(tables)
    if args.write:
        when = saved.get("when") or _dt.datetime.fromtimestamp(Path(args.from_json).stat().st_mtime).strftime(
            "%Y-%m-%d %H:%M")
        cmd = saved.get("command") or f"OMP_NUM_THREADS={a.threads} python bench/bench_dpo.py --threads {a.threads}"
        shape = common.shape_of(a)
        with tempfile.TemporaryDirectory(prefix="bench-dpo-") as td:  # rebuilt only to describe it
            ws = common.build_workspace(Path(td), shape, a.pairs, a.min_tokens, a.max_tokens)
            common.write_section(common.section_title(SECTION), section_body(a, ws, a.pairs, tables, when, cmd))
        print(f"wrote the '## {SECTION}' section of {common.BENCHMARKS_MD}", file=sys.stderr)
    return 0


def main() -> int:
    args = parse_args()
    if args.child:
        run_one_child(args)
        return 0
    variants = common.choices(args.variants, VARIANTS, "--variants")
    sides = common.choices(args.sides, None, "--sides")
    cmd = common.command_line()
    if args.from_json:
        return from_json(args)
    tmp = None
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench-dpo-")
        args.workdir = tmp.name
    shape = common.shape_of(args)
    t0 = time.perf_counter()
    print(f"building model/tokenizer/data in {args.workdir} ...", file=sys.stderr, flush=True)
    ws = common.build_workspace(Path(args.workdir), shape, args.pairs, args.min_tokens, args.max_tokens)
    build_pairs(ws, args.pairs)
    print(f"  {shape.describe(ws.n_params)}; {args.pairs} pairs [{time.perf_counter() - t0:.1f}s]",
          file=sys.stderr, flush=True)
    env = common.child_env(args.threads)

    launch = common.run_dir_launch(args.workdir, lambda s, v, run_dir: child_argv(args, s, v, run_dir), env)

    def summary(rec):
        return (f"{rec['trained_tokens_per_s']:6.2f} pairs/s {rec['tokens_per_s']:8,.0f} tok/s  "
                f"{rec['s_per_step']:.3f} s/step  pre-pass {rec.get('prepass_s', 0):.1f}s  peak RSS "
                f"{rec['peak_rss_mib']:7,.0f} MiB (at start {rec['rss_at_train_start_mib']:,.0f})  "
                f"loss {rec.get('loss_last10') or 0:.3f}")

    runs, failed = common.alternate_sides([{"variant": v} for v in variants], sides, args.repeats, launch, summary,
                                          sides_for=lambda cell: [s for s in sides if s in SIDES[cell["variant"]]])
    tables = report(args, runs, variants, sides, args.pairs)
    when = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    print(tables)
    print(f"\n[total {time.perf_counter() - t0:.0f}s]", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "runs": runs, "command": cmd, "when": when},
                                              indent=1, default=str))
    if args.write:
        common.write_section(common.section_title(SECTION), section_body(args, ws, args.pairs, tables, when, cmd))
        print(f"wrote the '## {SECTION}' section of {common.BENCHMARKS_MD}", file=sys.stderr)
    if tmp is not None:
        tmp.cleanup()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
