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
both sides. Peak RSS = the child's own VmHWM (whole process, imports included); the parent's
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
    p.add_argument("--steps", type=int, default=20, help="optimizer steps per run")
    p.add_argument("--skip-steps", type=int, default=1, help="leading steps left out of the timing")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--rows", type=int, default=512, help="conversations in the data set")
    p.add_argument("--min-tokens", type=int, default=100)
    p.add_argument("--max-tokens", type=int, default=300)
    common.add_model_args(p)
    p.add_argument("--threads", default=os.environ.get("OMP_NUM_THREADS") or str(os.cpu_count()),
                   help="OMP_NUM_THREADS for both sides (default: $OMP_NUM_THREADS or all cores); a comma list "
                        "(e.g. 2,1) runs the whole comparison once per value")
    p.add_argument("--workdir", default=None, help="where to build the model/data (default: a temp dir)")
    p.add_argument("--write", action="store_true", help="replace the '## SFT (CPU)' section of BENCHMARKS.md")
    p.add_argument("--json", default=None, help="also write every run's raw measurements to this file")
    p.add_argument("--breakdown", action="store_true",
                   help="time the pieces of a training step for both sides in one process (A/B interleaved)")
    p.add_argument("--breakdown-batches", type=int, default=4)
    p.add_argument("--breakdown-rounds", type=int, default=6)
    p.add_argument("--render-json", default=None, metavar="FILE",
                   help="re-render the tables (and with --write the section) from a --json file of an earlier "
                        "invocation, without running anything; the recorded command and date are kept")
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="run one child per side under torch.profiler and write the op tables to DIR")
    # internal: one measured run
    p.add_argument("--child", choices=SIDES, help=argparse.SUPPRESS)
    p.add_argument("--variant", choices=VARIANTS, default="padded", help=argparse.SUPPRESS)
    p.add_argument("--run-dir", default=None, help=argparse.SUPPRESS)
    common.add_device_arg(p)
    args = p.parse_args(argv)
    common.use_device(args.device)
    try:
        args.thread_list = [int(t) for t in str(args.threads).split(",") if t.strip()]
    except ValueError:
        p.error(f"--threads: expected integers, got {args.threads!r}")
    args.threads = args.thread_list[0]
    return args


# ============================================================================================
# Children: one training run each
# ============================================================================================


def _profiler(args):
    """torch.profiler over timed steps when BENCH_PROFILE names an output file, else None."""
    out = os.environ.get("BENCH_PROFILE")
    if not out:
        return None
    prof = common.profiler(record_shapes=False, profile_memory=True, with_stack=False)
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
            common.sync()
            with open(prof.out, "w") as f:
                f.write(common.profile_tables(prof, 45))
                f.write("\n\n")
                f.write(prof.key_averages().table(sort_by="self_cpu_memory_usage", row_limit=25))

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
        dtype=common.alignkit_dtype(), gradient_checkpointing=False, packing=args.variant == "packed",
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
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    clock = common.StepClock()
    prof = _profiler(args)
    after_step = _profile_hooks(prof, clock, args)
    losses: list[float] = []

    clock_cb = common.trl_clock_callback(clock, losses, after_step=after_step)

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
        **common.trl_precision(), gradient_checkpointing=False,
        assistant_only_loss=True, packing=False, padding_free=packed,
        # padding-free without packing requires max_length=None in TRL; every row is already
        # shorter than --max-length (checked by the parent), so nothing would be cut anyway.
        max_length=None if packed else args.max_length,
        logging_steps=10, save_strategy="no", report_to="none", disable_tqdm=True,
        dataloader_num_workers=0, dataset_num_proc=None,
    )
    targs = SFTConfig(**kwargs)
    trainer = TimedSFTTrainer(model=model, args=targs, train_dataset=ds, processing_class=tok, callbacks=[clock_cb])
    t0 = time.perf_counter()
    trainer.train()
    trainer.save_model(args.run_dir)
    total = time.perf_counter() - t0
    out = clock.summary(args.skip_steps)
    out.update(side="trl", variant=args.variant, loss_last10=losses[-1] if losses else None,
               loss_first=None, process_s=total, torch_threads=torch.get_num_threads(),
               optim=str(targs.optim))
    return out


# ============================================================================================
# Breakdown: the two training steps taken apart, A/B interleaved in one process
# ============================================================================================


def _register_varlen_attention() -> bool:
    """Register 'bench_varlen_sdpa' with transformers: causal SDPA per document of a packed row,
    the boundaries given as `cu_seq_lens_q` (no mask is built for unknown implementations)."""
    try:
        import torch.nn.functional as F
        from transformers import AttentionInterface
    except ImportError:
        return False

    def varlen_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, cu_seq_lens_q=None, **kw):
        bounds = cu_seq_lens_q.tolist()
        outs = [F.scaled_dot_product_attention(query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], is_causal=True,
                                               scale=scaling, enable_gqa=query.shape[1] != key.shape[1])
                for s, e in zip(bounds[:-1], bounds[1:])]
        return torch.cat(outs, dim=2).transpose(1, 2).contiguous(), None

    import torch

    AttentionInterface.register("bench_varlen_sdpa", varlen_sdpa)
    return True


def breakdown(args, ws: common.Workspace) -> tuple[str, dict]:
    """Time each piece of one training step for both sides in ONE process, alternating A and B
    round by round (A,B then B,A), on the same micro-batches, so that load from other processes
    hits both sides alike. Reports per-micro-batch medians and the median of per-round ratios.

    Pieces: the decoder forward+backward; the LM head + loss forward+backward on the decoder's
    output (alignkit: `ops.logprobs._chunked` over the trained rows in chunks of
    `logits_chunk_size` under checkpointing; TRL: its fused LM head, `ChunkedLogProbFunction`,
    which on CPU scores every position); gradient clipping + AdamW (both
    fused); the whole step as each trainer computes it; the collator."""
    import copy
    import statistics as st

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignkit.data.chat import encode_messages
    from alignkit.data.collate import IGNORE, pack_collate, pad_collate
    from alignkit.ops import logprobs as LP
    from alignkit.recipes.sft import sft_loss_fn
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling
    from trl.trainer.utils import add_fused_lm_head

    try:
        from trl.kernels import ChunkedLogProbFunction
        from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE
    except ImportError:  # other TRL versions
        ChunkedLogProbFunction = None

    torch.manual_seed(0)
    wd = Path(args.workdir)
    tok = AutoTokenizer.from_pretrained(wd / "model")
    rows = [json.loads(line) for line in (wd / "data.jsonl").open()]
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(rows), generator=g).tolist()  # the order both trainers use with seed 0
    n_mb = args.breakdown_batches
    encs = [encode_messages(tok, rows[i]["messages"]) for i in order[: n_mb * args.batch_size]]
    packed = args.variant == "packed"
    trl_collate = DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id, padding_free=packed)
    a_mbs, t_mbs = [], []
    for k in range(n_mb):
        part = encs[k * args.batch_size:(k + 1) * args.batch_size]
        a_mbs.append(pack_collate(part) if packed else pad_collate(part, tok.pad_token_id))
        t_mbs.append(trl_collate([{"input_ids": e.input_ids, "labels": e.labels} for e in part]))

    base = AutoModelForCausalLM.from_pretrained(wd / "model", dtype=torch.float32)
    base.config.use_cache = False
    m_a = copy.deepcopy(base).train()
    m_t = copy.deepcopy(base).train()
    add_fused_lm_head(m_t, outputs=("log_probs", "entropy", "is_top1"))
    chunk = 1024
    loss_a = sft_loss_fn(chunk)

    def params(m):
        return [p for p in m.parameters() if p.requires_grad]

    def groups(m):
        ps = params(m)
        return [{"params": [p for p in ps if p.ndim >= 2], "weight_decay": 0.0},
                {"params": [p for p in ps if p.ndim < 2], "weight_decay": 0.0}]

    from alignkit.training.trainer import fused_adamw_ok

    opt_a = torch.optim.AdamW(groups(m_a), lr=args.lr, betas=(0.9, 0.999),
                              fused=fused_adamw_ok(params(m_a)))  # as alignkit's trainer builds it
    opt_t = torch.optim.AdamW(groups(m_t), lr=args.lr, betas=(0.9, 0.999), fused=True)

    # --- the pieces -----------------------------------------------------------------------
    def a_decoder(k):
        mb = a_mbs[k]
        dec = m_a.get_decoder()
        h = dec(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"], position_ids=mb["position_ids"],
                use_cache=False).last_hidden_state
        h.sum().backward()

    def t_decoder(k):
        mb = t_mbs[k]
        kw = {x: mb[x] for x in ("input_ids", "attention_mask", "position_ids") if x in mb}
        h = m_t.model(**kw, use_cache=False).last_hidden_state
        h.sum().backward()

    hid_cache = {}

    def hidden_for(k):
        if k not in hid_cache:
            mb = a_mbs[k]
            with torch.no_grad():
                h = m_a.get_decoder()(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"],
                                      position_ids=mb["position_ids"], use_cache=False).last_hidden_state
            hid_cache[k] = h
        return hid_cache[k]

    W = base.get_output_embeddings().weight.detach().clone().requires_grad_(True)

    def a_head(k, chunk_size=chunk):
        h = hidden_for(k).detach().requires_grad_(True)
        B, T, H = h.shape
        tg = a_mbs[k]["targets"].reshape(-1)
        lp, _ = LP._chunked(h.reshape(B * T, H), tg, lambda x: torch.nn.functional.linear(x, W), chunk_size, 1.0,
                            LP.IGNORE_INDEX, False, skip_ignored=True)
        (-lp.sum()).backward()

    def t_head(k):
        h = hidden_for(k).detach().requires_grad_(True)
        labels = t_mbs[k]["labels"]
        hs = h[:, :-1]
        lab = labels[:, 1:]
        mask = lab != -100
        outs = ChunkedLogProbFunction.apply(hs.reshape(-1, hs.size(-1)), W, None, lab.clamp(min=0).reshape(-1), 1.0,
                                            _CHUNKED_LOGPROB_CHUNK_SIZE, None, 1.0, ("log_probs", "entropy", "is_top1"))
        lp = outs[0].view(mask.shape).masked_fill(~mask, 0)
        (-lp.sum()).backward()

    def fill_grads(m):
        for p in params(m):
            if p.grad is None:
                p.grad = torch.randn_like(p) * 1e-3

    def a_optim(k):
        fill_grads(m_a)
        torch.nn.utils.clip_grad_norm_(params(m_a), 1.0)
        opt_a.step()

    def t_optim(k):
        fill_grads(m_t)
        torch.nn.utils.clip_grad_norm_(params(m_t), 1.0)
        opt_t.step()

    def a_step(k):
        mb = a_mbs[k]
        n = int((mb["targets"] != IGNORE).sum())
        loss_sum, _ = loss_a(m_a, mb)
        (loss_sum / n).backward()

    def t_step(k):
        mb = dict(t_mbs[k])
        out = m_t(**mb, fused_lm_head=True, use_cache=False)
        out.loss.backward()
        # what SFTTrainer.compute_loss adds per micro-batch: metric reductions + .item() calls
        n = out.label_mask.sum()
        (out.entropy.detach().sum() / n).item()
        (out.is_top1.sum() / n).item()

    def a_collate(k):
        part = encs[k * args.batch_size:(k + 1) * args.batch_size]
        pack_collate(part) if packed else pad_collate(part, tok.pad_token_id)

    def t_collate(k):
        part = encs[k * args.batch_size:(k + 1) * args.batch_size]
        trl_collate([{"input_ids": e.input_ids, "labels": e.labels} for e in part])

    # What-if: the same rows packed into one sequence, attention run per document (plain causal
    # SDPA on each document's slice, no (T x T) mask built), as a varlen kernel would.
    m_v = copy.deepcopy(base).train()
    varlen_ok = _register_varlen_attention()
    if varlen_ok:
        m_v.set_attn_implementation("bench_varlen_sdpa")
    v_mbs = []
    for k in range(n_mb):
        part = encs[k * args.batch_size:(k + 1) * args.batch_size]
        mb = pack_collate(part)
        lens = torch.tensor([len(e.input_ids) for e in part])
        mb["cu_seq_lens_q"] = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)])
        v_mbs.append(mb)
    if varlen_ok:  # sanity: equals the block-mask path
        with torch.no_grad():
            mb = v_mbs[0]
            ref = m_a.get_decoder()(input_ids=mb["input_ids"], position_ids=mb["position_ids"]).last_hidden_state
            got = m_v.get_decoder()(input_ids=mb["input_ids"], position_ids=mb["position_ids"],
                                    cu_seq_lens_q=mb["cu_seq_lens_q"]).last_hidden_state
            diff = float((ref - got).abs().max())
        print(f"  per-document attention vs block mask: max |diff| {diff:.2e}", file=sys.stderr)

    def v_decoder(k):
        mb = v_mbs[k]
        h = m_v.get_decoder()(input_ids=mb["input_ids"], position_ids=mb["position_ids"],
                              cu_seq_lens_q=mb["cu_seq_lens_q"], use_cache=False).last_hidden_state
        h.sum().backward()

    def zero(m):
        for p in m.parameters():
            p.grad = None

    pieces = [
        ("decoder fwd+bwd", a_decoder, t_decoder),
        ("LM head + loss fwd+bwd", a_head, t_head if ChunkedLogProbFunction else None),
        ("clip + AdamW step", a_optim, t_optim),
        ("whole fwd+bwd (model + loss)", a_step, t_step),
        ("collate", a_collate, t_collate),
        ("what-if: alignkit head chunk 4096", lambda k: a_head(k, 4096), t_head if ChunkedLogProbFunction else None),
        ("what-if: decoder on the rows packed, attention per document", v_decoder if varlen_ok else None, t_decoder),
    ]
    rounds = args.breakdown_rounds
    lines = []
    stats: dict = {"pieces": {}}
    for name, fa, ft in pieces:
        if ft is None or fa is None:
            continue
        ca, ct, ratios, wratios = [], [], [], []
        models = {"a": m_v if fa is v_decoder else m_a, "t": m_t}
        for r in range(rounds + 1):  # round 0 is a warm-up
            res = {}
            order = (("a", fa), ("t", ft)) if r % 2 else (("t", ft), ("a", fa))
            for side, fn in order:
                m = models[side]
                w0, c0 = time.perf_counter(), time.process_time()
                for k in range(n_mb):
                    fn(k)
                    if "AdamW" not in name:
                        zero(m)
                        W.grad = None
                res[side] = ((time.perf_counter() - w0) / n_mb, (time.process_time() - c0) / n_mb)
            if r:
                ca.append(res["a"][1])
                ct.append(res["t"][1])
                ratios.append(res["t"][1] / res["a"][1])
                wratios.append(res["t"][0] / res["a"][0])
        stats["pieces"][name] = (1000 * st.median(ca), 1000 * st.median(ct), st.median(ratios))
        lines.append([name, f"{1000 * st.median(ca):.0f}", f"{1000 * st.median(ct):.0f}",
                      f"{st.median(ratios):.2f}x", f"{st.median(wratios):.2f}x"])
        print(f"  {name}: alignkit {1000 * st.median(ca):.0f} ms, TRL {1000 * st.median(ct):.0f} ms CPU", file=sys.stderr,
              flush=True)
    toks = st.mean(int(mb["attention_mask"].sum()) if mb["attention_mask"] is not None else mb["input_ids"].numel()
                   for mb in a_mbs)
    scored_a = st.mean(int((mb["targets"] != IGNORE).sum()) for mb in a_mbs)
    scored_t = st.mean(mb["labels"][:, 1:].numel() for mb in t_mbs)
    head = (f"Per micro-batch ({args.variant}, batch {args.batch_size}, {toks:.0f} real tokens, "
            f"{st.mean(mb['input_ids'].numel() for mb in a_mbs):.0f} positions incl. padding; LM-head rows: "
            f"alignkit {scored_a:.0f} (trained tokens only), TRL {scored_t:.0f} (every position: its CPU path "
            f"does not compact)). Process CPU time (all threads), median of {rounds} interleaved rounds x "
            f"{n_mb} micro-batches, {torch.get_num_threads()} thread(s); the last column is the same ratio in wall time:")
    stats.update(variant=args.variant, tokens=toks, positions=st.mean(mb["input_ids"].numel() for mb in a_mbs),
                 scored_a=scored_a, scored_t=scored_t, chunk=chunk, threads=torch.get_num_threads(),
                 varlen_diff=diff if varlen_ok else None)
    return head + "\n\n" + common.markdown_table(
        ["piece", "alignkit CPU ms", "TRL CPU ms", "TRL/alignkit (CPU)", "TRL/alignkit (wall)"], lines), stats


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
    settings = [(t, v) for t in args.thread_list for v in variants]
    label = (lambda t, v: f"{v}, {t} thr") if len(args.thread_list) > 1 else (lambda t, v: v)  # noqa: E731
    headers = ["variant", "side", "tokens/s median (min-max)", "trained tok/s", "tokens/CPU-s", "peak RSS MiB (min-max)",
               "RSS growth in training MiB", "s/step", "loss (last 10 steps)", "runs"]
    rows = []
    ratio_rows = []
    for t, v in settings:
        per = {}
        for s in sides:
            rs = [r for r in runs if r["side"] == s and r["variant"] == v and r.get("threads") == t and r.get("ok")]
            per[s] = rs
            if not rs:
                rows.append([label(t, v), s, "FAILED", "", "", "", "", "", "", 0])
                continue
            tps = [r["tokens_per_s"] for r in rs]
            rss = [r["peak_rss_mib"] for r in rs]
            grow = [r["peak_rss_mib"] - r["rss_at_train_start_mib"] for r in rs]
            loss = [r["loss_last10"] for r in rs if r.get("loss_last10") is not None]
            rows.append([
                label(t, v), s, common.spread(tps), f"{common.med([r['trained_tokens_per_s'] for r in rs]):,.0f}",
                f"{common.med([r['tokens_per_cpu_s'] for r in rs]):,.0f}", common.spread(rss), f"{common.med(grow):,.0f}", f"{common.med([r['s_per_step'] for r in rs]):.3f}",
                f"{common.med(loss):.3f}" if loss else "n/a", len(rs),
            ])
        if "alignkit" in per and "trl" in per and per["alignkit"] and per["trl"]:
            a, t = per["alignkit"], per["trl"]
            ratio_rows.append([
                label(t, v),
                fmt_ratio(common.med([r["tokens_per_s"] for r in a]), common.med([r["tokens_per_s"] for r in t])),
                fmt_ratio(common.med([r["tokens_per_cpu_s"] for r in a]), common.med([r["tokens_per_cpu_s"] for r in t])),
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
        ["variant", "tokens/s alignkit/TRL", "tokens/CPU-s alignkit/TRL", "peak RSS alignkit/TRL", "RSS growth alignkit/TRL",
         "tokens per step alignkit / TRL", "trained share alignkit / TRL"], ratio_rows) if ratio_rows else ""
    return table + ("\n\n" + ratios if ratios else "")


def section_body(args, ws: common.Workspace, tables: str, when: str, cmd: str, runs: list[dict]) -> str:
    shape = ws.shape
    loads = [r["load_avg_1m"] for r in runs if r.get("ok") and "load_avg_1m" in r]
    busy = bool(loads) and max(loads) > 1.5 * (os.cpu_count() or 1)
    load = (f" The machine was shared: 1-minute load average {min(loads):.1f}-{max(loads):.1f} during the runs "
            f"(on {os.cpu_count()} cores), so absolute figures are depressed and noisy; compare the ratios and "
            f"tokens per CPU-second." if busy else "")
    if busy and max(args.thread_list) == 1 and (os.cpu_count() or 1) > 1:
        load += (" One thread per side (not the default, all cores): on a busy machine multi-threaded OpenMP "
                 "runs lose far more to the other jobs than single-threaded ones, and the spread swamps the "
                 "difference being measured.")
    thr = " and ".join(f"`OMP_NUM_THREADS={t}`" for t in args.thread_list)
    return f"""Measured {when} on {common.machine()}, {thr} for both sides.{load}
Versions: {common.versions("torch", "transformers", "trl", "accelerate", "alignkit")}.

Command: `{cmd}`

{tables}

Setup (`bench/bench_sft.py`, helpers in `bench/common.py`):

- Model: random-init {shape.describe(ws.n_params)}, float32, SDPA attention, built offline.
  The vocabulary sets the LM-head share of the work (forward: {2 * shape.vocab * shape.hidden / 1e6:.1f} MFLOP
  per projected position for the head vs about {2 * (ws.n_params - shape.vocab * shape.hidden) / 1e6:.1f} MFLOP
  per position in the decoder's matmuls), so it is the knob that most changes the outcome: a
  bigger vocabulary favours alignkit, which projects only the trained positions.
- Tokenizer: byte-level BPE ({shape.vocab} entries) trained offline, ChatML template with
  `{{% generation %}}` markers around each answer and its `<|im_end|>`.
- Data: {ws.n_rows} `messages` rows (a third with a system turn, a quarter with two exchanges),
  {ws.row_tokens[0]}-{ws.row_tokens[1]} tokens each (mean {ws.mean_tokens:.0f}, of which
  {ws.mean_trained:.0f} assistant tokens are trained).
- Both sides: batch {args.batch_size} x grad accumulation {args.grad_accum}, {args.steps} optimizer steps,
  max length {args.max_length}, AdamW lr {args.lr:g} (betas 0.9/0.999, no weight decay), cosine to 0, no
  warmup, clip 1.0, no gradient checkpointing, float32, seed 0. Loss on the assistant tokens only:
  alignkit by default; TRL with `assistant_only_loss=True` (the same token set, checked by
  decoding both masks; the "trained share" column shows the same fraction on both sides). Both
  sides step with torch's fused AdamW kernel (alignkit: `torch.optim.AdamW(fused=True)` where the
  kernel exists, CPU included; TRL: the transformers default `adamw_torch_fused`).
- padded: right-padded micro-batches (alignkit `packing=false`; TRL `packing=False,
  padding_free=False`). packed: the {args.batch_size} rows of a micro-batch concatenated into one
  sequence, positions restarting per document, no padding (alignkit `packing=true`; TRL
  `padding_free=True` with `packing=False` and `max_length=None`, which is the same micro-batch
  content — TRL's `packing=True` would instead fill {args.batch_size} blocks of `max_length` tokens
  per micro-batch, {args.max_length / ws.mean_tokens:.1f}x the tokens per step).
- Runs alternate alignkit, TRL, alignkit, ... each in a fresh process.
- tokens/s: non-padding tokens fed to the model per second over optimizer steps
  {args.skip_steps + 1}..{args.steps} (from the end of step {args.skip_steps} to the end of the last step, recorded
  inside each training loop: alignkit via wrappers on `Trainer.accumulate`/`optimizer_step`,
  TRL via a `training_step` override and a `TrainerCallback`); model loading, tokenisation and the
  final save are not timed. "trained tok/s" counts only the tokens that carry loss.
- peak RSS: the child's `VmHWM` (whole process, imports included). "RSS growth in training" =
  peak RSS minus the RSS when the first step starts (what training itself adds).
- tokens/CPU-s: the same tokens per second of process CPU time (all threads) over the same steps;
  less sensitive than wall time to other load on the machine.
- loss: mean training loss over the last 10 steps (TRL: its last logged loss, a mean over the last
  `logging_steps=10` steps). With seed 0 both trainers draw the same permutation of the rows, so
  they train on the same micro-batches in the same order; equal losses show that both optimise
  the same objective on the same tokens.
"""


BREAKDOWN_HEADING = "### Where the time goes (`--breakdown`)"


def breakdown_reading(all_stats: list[dict]) -> str:
    """Plain-words reading of the breakdown numbers (shares, what differs, what-ifs)."""
    out = []
    by = {s["variant"]: s for s in all_stats}
    for v, s in by.items():
        P = s["pieces"]
        if not all(k in P for k in ("decoder fwd+bwd", "LM head + loss fwd+bwd", "clip + AdamW step")):
            continue
        (da, dt, dr), (ha, ht, hr), (oa, ot, _) = (P["decoder fwd+bwd"], P["LM head + loss fwd+bwd"],
                                                   P["clip + AdamW step"])
        sa, stt = da + ha + oa, dt + ht + ot
        out.append(
            f"- {v}: alignkit's step = decoder {da:.0f} + LM head/loss {ha:.0f} + clip/AdamW {oa:.0f} = {sa:.0f} ms "
            f"CPU ({100 * da / sa:.0f}% decoder); TRL's = {dt:.0f} + {ht:.0f} + {ot:.0f} = {stt:.0f} ms "
            f"({stt / sa:.2f}x). The decoder is the same transformers module on both sides (TRL/alignkit time "
            f"{dr:.2f}x); the difference is the LM head: alignkit projects only the {s['scored_a']:.0f} trained "
            f"positions ({s['chunk']}-row chunks under checkpointing), TRL's fused head on CPU projects all "
            f"{s['scored_t']:.0f} positions ({'prompt and padding' if v == 'padded' else 'prompt'} included), "
            f"{hr:.1f}x the time. With the "
            f"decoder as it is, alignkit's ceiling at this model shape is {stt / (da + oa):.2f}x "
            f"(a free LM head).")
    if "padded" in by and "packed" in by:
        pa, pk = by["padded"]["pieces"], by["packed"]["pieces"]
        key = "what-if: decoder on the rows packed, attention per document"
        if "decoder fwd+bwd" in pa and "decoder fwd+bwd" in pk:
            line = (f"- packed vs padded: the packed decoder costs {pk['decoder fwd+bwd'][0]:.0f} ms for "
                    f"{by['packed']['tokens']:.0f} tokens, more than the padded one ({pa['decoder fwd+bwd'][0]:.0f} ms "
                    f"for {by['padded']['positions']:.0f} positions with padding): with `attention_mask=None` and "
                    f"restarting `position_ids`, transformers builds a dense (T x T) block-diagonal mask and SDPA "
                    f"computes all T x T scores of the packed row.")
            if key in pk:
                diff = by["packed"].get("varlen_diff")
                line += (f" Attention per document (the what-if row: causal SDPA on each document's slice, no "
                         f"mask; outputs equal to {diff:.0e}) costs {pk[key][0]:.0f} ms, "
                         f"{pk['decoder fwd+bwd'][0] / pk[key][0]:.2f}x less than packed today and "
                         f"{pa['decoder fwd+bwd'][0] / pk[key][0]:.2f}x less than padded.")
            out.append(line)
    return "Reading:\n\n" + "\n".join(out) if out else ""


def _section_text(path: Path = common.BENCHMARKS_MD) -> str:
    """The current body of the '## SFT (CPU)' section ('' when absent)."""
    if not path.exists():
        return ""
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    start = next((i for i, ln in enumerate(lines) if ln.rstrip("\n") == f"## {SECTION}"), None)
    if start is None:
        return ""
    end = next((j for j in range(start + 1, len(lines)) if lines[j].startswith("## ")), len(lines))
    return "".join(lines[start + 1:end])


def _split_breakdown(body: str) -> tuple[str, str]:
    """(main part, breakdown subsection incl. its heading or '')."""
    i = body.find(BREAKDOWN_HEADING)
    return (body, "") if i < 0 else (body[:i], body[i:])


def write_breakdown(text: str, when: str, cmd: str, reading: str = "") -> None:
    """Replace the breakdown subsection of the SFT section, keeping the rest of the section."""
    main_part, _ = _split_breakdown(_section_text())
    sub = f"""{BREAKDOWN_HEADING}

Measured {when}, command: `{cmd}`. One process, both sides' pieces timed on the same
micro-batches, alternating which side goes first each round; process CPU time, so other load on
the machine affects both sides alike.

{text.strip()}
""" + (f"\n{reading.strip()}\n" if reading else "")
    main_part = main_part.strip() or "(no throughput table yet: run `python bench/bench_sft.py --write`)"
    common.write_section(common.section_title(SECTION), main_part + "\n\n" + sub)


def main() -> int:
    args = parse_args()
    if args.child:
        run_one_child(args)
        return 0
    variants = common.choices(args.variants, VARIANTS, "--variants")
    sides = common.choices(args.sides, SIDES, "--sides")
    if args.max_tokens > args.max_length:
        raise SystemExit("--max-tokens must be <= --max-length (the packed TRL row runs with max_length=None)")
    cmd = common.command_line()
    if args.render_json:
        saved = json.loads(Path(args.render_json).read_text())
        write = args.write
        for k, val in saved["args"].items():
            if k not in ("write", "json", "render_json", "workdir"):
                setattr(args, k, val)
        args.write = write
        variants = common.choices(args.variants)
        sides = common.choices(args.sides)
        cmd, when_saved = saved.get("cmd", cmd), saved.get("when")
    tmp = None
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench-sft-")
        args.workdir = tmp.name
    shape = common.shape_of(args)
    t0 = time.perf_counter()
    print(f"building model/tokenizer/data in {args.workdir} ...", file=sys.stderr, flush=True)
    ws = common.build_workspace(Path(args.workdir), shape, args.rows, args.min_tokens, args.max_tokens)
    print(f"  {shape.describe(ws.n_params)}; {ws.n_rows} rows, mean {ws.mean_tokens:.0f} tokens "
          f"({ws.mean_trained:.0f} trained) [{time.perf_counter() - t0:.1f}s]", file=sys.stderr, flush=True)
    env = common.child_env(args.threads)

    if args.render_json:
        runs = saved["runs"]
        tables = report(args, ws, runs, variants, sides)
        print(tables)
        if args.write:
            _, kept = _split_breakdown(_section_text())
            common.write_section(common.section_title(SECTION), section_body(args, ws, tables, when_saved or "(unknown date)", cmd, runs)
                                 + ("\n" + kept if kept else ""))
            print(f"wrote the '## {SECTION}' section of {common.BENCHMARKS_MD}", file=sys.stderr)
        if tmp is not None:
            tmp.cleanup()
        return 0

    if args.breakdown:
        import torch

        torch.set_num_threads(args.threads)
        outs, all_stats = [], []
        for v in variants:
            args.variant = v
            text, st_ = breakdown(args, ws)
            outs.append(text)
            all_stats.append(st_)
        reading = breakdown_reading(all_stats)
        print("\n\n".join(outs) + ("\n\n" + reading if reading else ""))
        if args.write:
            write_breakdown("\n\n".join(outs), _dt.datetime.now().strftime("%Y-%m-%d %H:%M"), cmd, reading)
            print(f"wrote the breakdown into the '## {SECTION}' section of {common.BENCHMARKS_MD}", file=sys.stderr)
        return 0

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

    def launch(cell, s, rep):
        thr, v = cell["threads"], cell["variant"]
        return child_argv(args, s, v, str(Path(args.workdir) / f"run-{thr}-{v}-{s}-{rep}")), common.child_env(thr)

    def summary(rec):
        return (f"{rec['tokens_per_s']:8,.0f} tok/s  {rec['s_per_step']:.3f} s/step  peak RSS "
                f"{rec['peak_rss_mib']:7,.0f} MiB (polled {rec['peak_rss_mib_polled']:,.0f}, at start "
                f"{rec['rss_at_train_start_mib']:,.0f})  loss {rec.get('loss_last10') or float('nan'):.3f}")

    cells = [{"threads": t, "variant": v} for t in args.thread_list for v in variants]
    runs, failed = common.alternate_sides(cells, sides, args.repeats, launch, summary)
    tables = report(args, ws, runs, variants, sides)
    when = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    print(tables)
    print(f"\n[total {time.perf_counter() - t0:.0f}s]", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "runs": runs, "cmd": cmd, "when": when,
                                               "machine": common.machine()}, indent=1, default=str))
    if args.write:
        _, kept = _split_breakdown(_section_text())  # a breakdown written by --breakdown --write stays
        common.write_section(common.section_title(SECTION), section_body(args, ws, tables, when, cmd, runs) + ("\n" + kept if kept else ""))
        print(f"wrote the '## {SECTION}' section of {common.BENCHMARKS_MD}", file=sys.stderr)
    if tmp is not None:
        tmp.cleanup()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
