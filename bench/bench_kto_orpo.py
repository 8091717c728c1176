"""KTO and ORPO step time and peak memory: alignkit vs TRL's KTOTrainer / ORPOTrainer, on CPU.

Both sides train the same random-init tiny Llama as bench_dpo.py (built offline, see
bench/common.py) on the same conversational preference data, with the same settings: float32,
micro-batch, gradient accumulation, max length, steps, AdamW with lr / betas / weight decay /
clipping / cosine schedule, beta, no gradient checkpointing. Runs alternate (alignkit, TRL,
alignkit, TRL, ...), each in a fresh process. The settings each side actually ran with are read
back from the configs the children built (alignkit's pydantic config, TRL's KTOConfig /
ORPOConfig after `__post_init__`) and printed side by side.

Variants:

    kto    alignkit `train_kto` (recipes/kto.py) vs TRL `trl.KTOTrainer` (stable API in TRL 1.x), on
           unpaired rows {prompt, completion, label}: each preference pair split into a desirable
           row (chosen) and an undesirable one (rejected). alignkit's reference: log-probs
           precomputed once (its default without an adapter; the pre-pass is timed on its own);
           TRL's default: a second copy of the model, run every step.
    orpo   alignkit `train_dpo` with loss=orpo (recipes/dpo.py) vs TRL
           `trl.experimental.orpo.ORPOTrainer`, on the prompt/chosen/rejected pairs.
           Reference-free on both sides.

What is timed: the optimizer steps (model load, tokenisation, the reference pre-pass and the
final save are outside). rows/s counts training rows (KTO: labelled completions; ORPO: pairs);
both wall time and process CPU time over steps skip+1..N are recorded, so a shared machine can
be judged by the CPU-time ratio too. Peak RSS = the child's own VmHWM (imports included).

    python bench/bench_kto_orpo.py                  # kto + orpo, 2 repeats, 8 steps; prints the tables
    python bench/bench_kto_orpo.py --write          # also replaces the "## KTO and ORPO (CPU)" section
    python bench/bench_kto_orpo.py --variants orpo --repeats 1 --steps 4   # quick look
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
from bench_dpo import build_pairs  # noqa: E402  (the same pairs as the DPO benchmark)

SECTION = "KTO and ORPO (CPU)"
VARIANTS = ("kto", "orpo")
SIDES = ("alignkit", "trl")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=2, help="runs per side and variant (alternating)")
    p.add_argument("--variants", default="kto,orpo", help="comma list of: kto, orpo")
    p.add_argument("--sides", default="alignkit,trl", help="comma list of sides to run")
    p.add_argument("--steps", type=int, default=8, help="optimizer steps per run")
    p.add_argument("--skip-steps", type=int, default=1, help="leading steps left out of the timing")
    p.add_argument("--batch-size", type=int, default=4,
                   help="pairs per micro-batch; KTO takes 2x as many rows, so both see the same sequences")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--beta", type=float, default=0.1, help="KTO beta; ORPO's odds-ratio weight (lambda)")
    p.add_argument("--pairs", type=int, default=128, help="preference pairs in the data set")
    p.add_argument("--min-tokens", type=int, default=100)
    p.add_argument("--max-tokens", type=int, default=300)
    common.add_model_args(p)
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", 0)) or os.cpu_count(),
                   help="OMP_NUM_THREADS for both sides (default: $OMP_NUM_THREADS or all cores)")
    p.add_argument("--workdir", default=None, help="where to build the model/data (default: a temp dir)")
    p.add_argument("--write", action="store_true", help=f"replace the '## {SECTION}' section of BENCHMARKS.md")
    p.add_argument("--json", default=None, help="also write every run's raw measurements to this file")
    p.add_argument("--note", default="", help="a sentence added under the tables (e.g. about machine load)")
    p.add_argument("--from-json", default=None, metavar="FILE",
                   help="no runs: print (and with --write, record) the tables of a file written by --json")
    # internal: one measured run
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--variant", choices=VARIANTS, default="kto", help=argparse.SUPPRESS)
    p.add_argument("--run-dir", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ============================================================================================
# Data: KTO rows from the preference pairs
# ============================================================================================


def build_kto_rows(pairs_path: Path) -> Path:
    """Unpaired {prompt, completion, label} rows: pair i gives row 2i (its chosen answer,
    desirable) and row 2i+1 (its rejected answer, undesirable). Both sides read this file."""
    out = pairs_path.with_name("kto.jsonl")
    with pairs_path.open(encoding="utf-8") as f, out.open("w", encoding="utf-8") as g:
        for ln in f:
            if not ln.strip():
                continue
            r = json.loads(ln)
            g.write(json.dumps({"prompt": r["prompt"], "completion": r["chosen"], "label": True}) + "\n")
            g.write(json.dumps({"prompt": r["prompt"], "completion": r["rejected"], "label": False}) + "\n")
    return out


def _rows_per_micro(args) -> int:
    return 2 * args.batch_size if args.variant == "kto" else args.batch_size


# ============================================================================================
# Children: one training run each
# ============================================================================================


def child_alignkit(args) -> dict:
    import torch

    import alignkit.recipes.dpo as D
    import alignkit.recipes.kto as K
    import alignkit.training.trainer as T
    from alignkit.config import DPOConfig, KTOConfig

    clock = common.StepClock()
    losses: list[float] = []
    prepass = {"s": 0.0}
    orig_accumulate, orig_step, orig_start = T.Trainer.accumulate, T.Trainer.optimizer_step, T.Trainer.start_progress
    orig_ref = D.cached_reference_logps

    def cached_reference_logps(*a, **k):
        t = time.perf_counter()
        out = orig_ref(*a, **k)
        prepass["s"] += time.perf_counter() - t
        return out

    K.cached_reference_logps = cached_reference_logps  # kto.py imported the name; ORPO computes none

    def accumulate(self, micro_batches, loss_fn, units):
        for mb in micro_batches:
            clock.micro(int(mb["attention_mask"].sum()), int(mb.get("n_rows", mb.get("n_pairs", 0))))
        return orig_accumulate(self, micro_batches, loss_fn, units)

    def optimizer_step(self, metrics):
        out = orig_step(self, metrics)
        clock.step_end()
        losses.append(float(out["loss"]))
        return out

    def start_progress(self):  # right before the step loop
        clock.start()
        return orig_start(self)

    T.Trainer.accumulate, T.Trainer.optimizer_step, T.Trainer.start_progress = accumulate, optimizer_step, start_progress
    wd = Path(args.workdir)
    common_kw = dict(
        model=str(wd / "model"), output_dir=args.run_dir, overwrite=True, max_steps=args.steps,
        batch_size=_rows_per_micro(args), grad_accum=args.grad_accum, lr=args.lr, weight_decay=0.0,
        adam_betas=(0.9, 0.999), warmup_steps=0, schedule="cosine", min_lr_ratio=0.0, max_grad_norm=1.0,
        max_length=args.max_length, seed=0, dtype="float32", gradient_checkpointing=False, progress=False,
        tensorboard=False, save_every=0, eval_every=0, log_every=10,
    )
    if args.variant == "kto":
        cfg = KTOConfig(data=str(wd / "kto.jsonl"), beta=args.beta, reference="auto",
                        ref_batch_size=_rows_per_micro(args), **common_kw)
        run = K.train_kto
    else:
        cfg = DPOConfig(data=str(wd / "pairs.jsonl"), loss="orpo", orpo_lambda=args.beta, **common_kw)
        run = D.train_dpo
    t0 = time.perf_counter()
    run(cfg)
    total = time.perf_counter() - t0
    out = clock.summary(args.skip_steps)
    settings = {k: getattr(cfg, k) for k in ("batch_size", "grad_accum", "lr", "weight_decay", "adam_betas", "schedule",
                                             "warmup_steps", "max_grad_norm", "max_length", "dtype",
                                             "gradient_checkpointing", "seed", "loss",
                                             *(("beta", "reference") if args.variant == "kto" else ("orpo_lambda",)))}
    out.update(side="alignkit", variant=args.variant, loss_last=losses[-1] if losses else None,
               loss_first=losses[0] if losses else None, process_s=total, prepass_s=prepass["s"],
               torch_threads=torch.get_num_threads(), settings=json.loads(json.dumps(settings, default=str)))
    return out


TRL_SETTINGS = ("per_device_train_batch_size", "gradient_accumulation_steps", "learning_rate", "weight_decay",
                "adam_beta1", "adam_beta2", "optim", "lr_scheduler_type", "warmup_steps", "max_grad_norm",
                "max_length", "bf16", "fp16", "gradient_checkpointing", "seed", "loss_type", "beta",
                "precompute_ref_log_probs", "train_sampling_strategy", "disable_dropout")


def child_trl(args) -> dict:
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    clock = common.StepClock()
    losses: list[float] = []

    clock_cb = common.trl_clock_callback(clock, losses)

    wd = Path(args.workdir)
    tok = AutoTokenizer.from_pretrained(wd / "model")
    model = AutoModelForCausalLM.from_pretrained(wd / "model", dtype=torch.float32)
    shared = dict(
        output_dir=args.run_dir, max_steps=args.steps, per_device_train_batch_size=_rows_per_micro(args),
        gradient_accumulation_steps=args.grad_accum, learning_rate=args.lr, weight_decay=0.0, adam_beta1=0.9,
        adam_beta2=0.999, warmup_steps=0, lr_scheduler_type="cosine", max_grad_norm=1.0, seed=0, data_seed=0,
        bf16=False, fp16=False, use_cpu=True, gradient_checkpointing=False, max_length=args.max_length,
        beta=args.beta, logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True,
        dataloader_num_workers=0, dataset_num_proc=None,
    )
    if args.variant == "kto":
        from trl import KTOConfig, KTOTrainer

        ds = load_dataset("json", data_files=str(wd / "kto.jsonl"), split="train")
        targs = KTOConfig(loss_type="kto", precompute_ref_log_probs=False, **shared)

        class Timed(KTOTrainer):
            def training_step(self, model, inputs, *rest, **kw):
                clock.micro(int(inputs["attention_mask"].sum()), int(inputs["input_ids"].shape[0]))
                return super().training_step(model, inputs, *rest, **kw)
    else:
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        ds = load_dataset("json", data_files=str(wd / "pairs.jsonl"), split="train")
        targs = ORPOConfig(**shared)

        class Timed(ORPOTrainer):
            def training_step(self, model, inputs, *rest, **kw):
                clock.micro(int(inputs["chosen_attention_mask"].sum() + inputs["rejected_attention_mask"].sum()),
                            int(inputs["chosen_input_ids"].shape[0]))
                return super().training_step(model, inputs, *rest, **kw)

    trainer = Timed(model=model, args=targs, train_dataset=ds, processing_class=tok, callbacks=[clock_cb])
    t0 = time.perf_counter()
    trainer.train()
    trainer.save_model(args.run_dir)
    total = time.perf_counter() - t0
    out = clock.summary(args.skip_steps)
    settings = {k: getattr(targs, k) for k in TRL_SETTINGS if hasattr(targs, k)}
    out.update(side="trl", variant=args.variant, loss_last=losses[-1] if losses else None,
               loss_first=losses[0] if losses else None, process_s=total, prepass_s=0.0,
               torch_threads=torch.get_num_threads(), trainer_class=f"{type(trainer).__mro__[1].__module__}."
               f"{type(trainer).__mro__[1].__name__}", config_class=f"{type(targs).__module__}.{type(targs).__name__}",
               resident_reference=getattr(trainer, "ref_model", None) is not None,
               settings=json.loads(json.dumps(settings, default=str)))
    return out


def run_one_child(args) -> None:
    if args.child == "alignkit":
        res = child_alignkit(args)
    elif args.child == "trl":
        res = child_trl(args)
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
    ]


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "n/a"


def _spread2(xs: list[float]) -> str:
    if len(xs) == 1:
        return f"{xs[0]:.2f}"
    return f"{common.med(xs):.2f} ({min(xs):.2f}-{max(xs):.2f})"


def _rows_per_cpu_s(r: dict) -> float:
    # StepClock's second counter holds rows (KTO) / pairs (ORPO) here
    return r["trained_tokens"] / r["cpu_s"] if r.get("cpu_s") else 0.0


def _epoch_rows_per_s(r: dict, n_rows: int) -> float:
    """Throughput of a one-epoch run over the data: the reference pre-pass charged to its rows."""
    return 1.0 / (1.0 / r["trained_tokens_per_s"] + r.get("prepass_s", 0.0) / n_rows)


def report(args, runs: list[dict], variants: list[str], sides: list[str]) -> str:
    med = common.med
    headers = ["variant", "side", "rows/s median (min-max)", "rows per CPU-s", "tokens/s", "s/step",
               "reference pre-pass s", "1-epoch rows/s", "peak RSS MiB (min-max)", "RSS growth in training MiB", "load avg (1 min)",
               "loss (last step)", "runs"]
    rows, ratio_rows = [], []
    for v in variants:
        n_rows = 2 * args.pairs if v == "kto" else args.pairs
        per = {}
        for s in sides:
            rs = [r for r in runs if r["side"] == s and r["variant"] == v and r.get("ok")]
            per[s] = rs
            if not rs:
                rows.append([v, s, "FAILED"] + [""] * 9 + [0])
                continue
            loss = [r["loss_last"] for r in rs if r.get("loss_last") is not None]
            rows.append([
                v, s, _spread2([r["trained_tokens_per_s"] for r in rs]), f"{med([_rows_per_cpu_s(r) for r in rs]):.2f}",
                f"{med([r['tokens_per_s'] for r in rs]):,.0f}", f"{med([r['s_per_step'] for r in rs]):.3f}",
                f"{med([r.get('prepass_s', 0.0) for r in rs]):.1f}",
                f"{med([_epoch_rows_per_s(r, n_rows) for r in rs]):.2f}", common.spread([r["peak_rss_mib"] for r in rs]),
                f"{med([r['peak_rss_mib'] - r['rss_at_train_start_mib'] for r in rs]):,.0f}",
                _spread2([r["load_avg_1m"] for r in rs]), f"{med(loss):.3f}" if loss else "n/a", len(rs),
            ])
        a, t = per.get("alignkit"), per.get("trl")
        if a and t:
            ratio_rows.append([
                v, _ratio(med([r["trained_tokens_per_s"] for r in a]), med([r["trained_tokens_per_s"] for r in t])),
                _ratio(med([_rows_per_cpu_s(r) for r in a]), med([_rows_per_cpu_s(r) for r in t])),
                _ratio(med([_epoch_rows_per_s(r, n_rows) for r in a]), med([_epoch_rows_per_s(r, n_rows) for r in t])),
                _ratio(med([r["peak_rss_mib"] for r in a]), med([r["peak_rss_mib"] for r in t])),
                _ratio(med([r["peak_rss_mib"] - r["rss_at_train_start_mib"] for r in a]),
                       med([r["peak_rss_mib"] - r["rss_at_train_start_mib"] for r in t])),
                f"{med([r['tokens'] / r['timed_steps'] for r in a]):,.0f} / "
                f"{med([r['tokens'] / r['timed_steps'] for r in t]):,.0f}",
            ])
    out = common.markdown_table(headers, rows)
    if ratio_rows:
        out += "\n\n" + common.markdown_table(
            ["variant", "alignkit / TRL: rows/s (wall)", "rows per CPU-s", "1-epoch rows/s", "peak RSS", "RSS growth in training",
             "tokens per step (alignkit / TRL)"], ratio_rows)
    return out


def settings_table(runs: list[dict], variants: list[str]) -> str:
    """Each side's settings as its child's config object held them (TRL's after `__post_init__`)."""
    rows = []
    for v in variants:
        for side in SIDES:
            r = next((r for r in runs if r["variant"] == v and r["side"] == side and r.get("ok")), None)
            if r is None:
                continue
            where = r.get("config_class", "alignkit.config." + ("KTOConfig" if v == "kto" else "DPOConfig"))
            s = ", ".join(f"`{k}={val}`" for k, val in r.get("settings", {}).items())
            rows.append([v, side, f"`{where}`", s])
    return common.markdown_table(["variant", "side", "config class", "settings (as read back from the config)"], rows)


def _trl_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("trl")
    except PackageNotFoundError:
        return "?"


def section_body(args, ws: common.Workspace, tables: str, settings: str, when: str, cmd: str, load: str) -> str:
    shape = ws.shape
    return f"""Measured {when} on {common.machine()}, `OMP_NUM_THREADS={args.threads}` for both sides.
Versions: {common.versions("torch", "transformers", "trl", "accelerate", "alignkit")}.
Machine load: {load}.

Command: `{cmd}`

{tables}
{("" if not args.note else chr(10) + args.note + chr(10))}
Settings, as each child's config object held them when it trained:

{settings}

Setup (`bench/bench_kto_orpo.py`, helpers in `bench/common.py`):

- Model: random-init {shape.describe(ws.n_params)}, float32, SDPA attention, built offline
  (the same as `bench_dpo.py`).
- Data: {args.pairs} conversational pairs built as in `bench_dpo.py` (`prompt` = the turns before the last
  answer of the benchmark's `messages` rows, {ws.row_tokens[0]}-{ws.row_tokens[1]} tokens per conversation;
  `chosen` = that answer; `rejected` = pseudo-text of 0.8-1.2x its token count). ORPO trains on the
  pairs; KTO on the same pairs split into {2 * args.pairs} unpaired rows `{{prompt, completion, label}}`
  (chosen: desirable, rejected: undesirable), one file read by both sides.
- Both sides: {args.steps} optimizer steps of {args.batch_size} pairs (ORPO) or {2 * args.batch_size} rows (KTO) per micro-batch x
  grad accumulation {args.grad_accum}, so a step sees the same {2 * args.batch_size} sequences' worth of data; max length
  {args.max_length}; AdamW lr {args.lr:g} (betas 0.9/0.999, no weight decay), cosine to 0, no warmup, clip 1.0;
  float32; no gradient checkpointing (TRL's default is on; it is turned off); seed 0. KTO beta
  {args.beta:g}, desirable and undesirable weights 1; ORPO lambda {args.beta:g} (TRL calls it `beta`).
- KTO: alignkit precomputes the reference log-probs (matched and mismatched rows) in one no-grad
  pass before training (its default without an adapter; timed apart as "reference pre-pass") and
  runs one no-grad forward over each micro-batch's mismatched rows for the reference point z0; TRL's
  default keeps a second copy of the model and runs it every step on the matched and the
  mismatched (KL) rows. TRL reads the rows in file order (its KL pairing requires
  `train_sampling_strategy="sequential"`); alignkit shuffles them. Both estimate z0 from
  mismatched prompt/completion pairs, alignkit once per optimizer step, TRL per micro-batch (the same
  thing here, with grad accumulation {args.grad_accum}).
- ORPO: reference-free on both sides, chosen and rejected rows in one forward. The objectives
  differ in one detail (reading TRL {_trl_version()}'s code): TRL's NLL term averages over the prompt
  *and* the chosen answer's tokens, alignkit's over the answer only, so their losses are not
  expected to match.
- "rows" are KTO's labelled rows and ORPO's pairs. "1-epoch rows/s" charges the reference
  pre-pass (KTO on alignkit's side) to a one-epoch run over the data:
  1 / (1 / rows_per_s + pre-pass s / rows in the data).
- Runs alternate between the sides, each in a fresh process. rows/s and tokens/s (non-padding
  tokens of the trained rows; KTO's mismatched rows are not counted on either side) over
  optimizer steps {args.skip_steps + 1}..{args.steps}, recorded inside each training loop; "rows per CPU-s"
  divides by the child's process CPU time over the same steps, which a shared machine disturbs
  less than wall time. Peak RSS is the child's `VmHWM` (imports included); "RSS growth in
  training" = peak RSS minus the RSS when the first step starts.
"""


def _load_line() -> str:
    one, five, fifteen = os.getloadavg()
    return (f"load average {one:.2f} / {five:.2f} / {fifteen:.2f} (1 / 5 / 15 min, `uptime`) on "
            f"{os.cpu_count()} cores when the tables were written")


def from_json(args) -> int:
    """Tables (and with --write the BENCHMARKS.md section) from the raw runs of an earlier --json."""
    saved = json.loads(Path(args.from_json).read_text())
    a = argparse.Namespace(**{**vars(args), **saved["args"], "write": args.write, "from_json": args.from_json,
                              "note": args.note or saved["args"].get("note", "")})
    runs = saved["runs"]
    variants = common.choices(a.variants)
    sides = common.choices(a.sides)
    tables = report(a, runs, variants, sides)
    print(tables)
    if args.write:
        when = saved.get("when") or "?"
        shape = common.shape_of(a)
        with tempfile.TemporaryDirectory(prefix="bench-kto-orpo-") as td:  # rebuilt only to describe it
            ws = common.build_workspace(Path(td), shape, a.pairs, a.min_tokens, a.max_tokens)
            common.write_section(SECTION, section_body(a, ws, tables, settings_table(runs, variants), when,
                                                       saved.get("command", ""), saved.get("load", "?")))
        print(f"wrote the '## {SECTION}' section of {common.BENCHMARKS_MD}", file=sys.stderr)
    return 0


def main() -> int:
    args = parse_args()
    if args.child:
        run_one_child(args)
        return 0
    variants = common.choices(args.variants, VARIANTS, "--variants")
    sides = common.choices(args.sides, SIDES, "--sides")
    cmd = common.command_line()
    if args.from_json:
        return from_json(args)
    tmp = None
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench-kto-orpo-")
        args.workdir = tmp.name
    shape = common.shape_of(args)
    t0 = time.perf_counter()
    print(f"building model/tokenizer/data in {args.workdir} ...", file=sys.stderr, flush=True)
    ws = common.build_workspace(Path(args.workdir), shape, args.pairs, args.min_tokens, args.max_tokens)
    build_kto_rows(build_pairs(ws, args.pairs))
    print(f"  {shape.describe(ws.n_params)}; {args.pairs} pairs / {2 * args.pairs} KTO rows "
          f"[{time.perf_counter() - t0:.1f}s]", file=sys.stderr, flush=True)
    env = common.child_env(args.threads)
    launch = common.run_dir_launch(args.workdir, lambda s, v, run_dir: child_argv(args, s, v, run_dir), env)

    def summary(rec):
        return (f"{rec['trained_tokens_per_s']:6.2f} rows/s ({_rows_per_cpu_s(rec):.2f} per CPU-s) "
                f"{rec['s_per_step']:.3f} s/step  pre-pass {rec.get('prepass_s', 0):.1f}s  peak RSS "
                f"{rec['peak_rss_mib']:7,.0f} MiB  load {rec['load_avg_1m']:.1f}  loss {rec.get('loss_last') or 0:.3f}")

    runs, failed = common.alternate_sides([{"variant": v} for v in variants], sides, args.repeats, launch, summary)
    tables = report(args, runs, variants, sides)
    settings = settings_table(runs, variants)
    when = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    load = _load_line()
    print(tables + "\n\n" + settings + "\n\n" + load)
    print(f"\n[total {time.perf_counter() - t0:.0f}s]", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "runs": runs, "command": cmd, "when": when,
                                               "load": load}, indent=1, default=str))
    if args.write:
        common.write_section(SECTION, section_body(args, ws, tables, settings, when, cmd, load))
        print(f"wrote the '## {SECTION}' section of {common.BENCHMARKS_MD}", file=sys.stderr)
    if tmp is not None:
        tmp.cleanup()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
