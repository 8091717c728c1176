"""Reward-model training throughput and peak memory: alignkit vs TRL's RewardTrainer, on CPU.

Both sides train the same random-init tiny Llama, loaded as a sequence-classification model with
one output (a scalar Bradley-Terry reward model), on the same preference pairs with the same
settings: float32, batch size (pairs), max length, steps, AdamW with lr / betas / weight decay /
clipping / cosine schedule, no gradient checkpointing, no centering term. Runs alternate
(alignkit, alignkit-full, TRL, alignkit, ...), each in a fresh process.

Sides:
  alignkit       `alignkit rm` as configured by default (share_prompt=true: one row per pair,
                 [prompt | chosen | rejected], the prompt computed once)
  alignkit-full  `alignkit rm share_prompt=false`: one pass over the 2B full sequences, the same
                 computation as TRL's (chosen and rejected rows concatenated, right-padded)
  trl            `trl.RewardTrainer`

Data variants:
  hh         the HH-RLHF harmless-base test pairs (../shared/data), implicit-prompt text, exactly
             as the file holds them; a byte-level BPE trained on their text. Pairs whose longer
             side exceeds --max-length tokens are left out for both sides (TRL drops them, alignkit
             would truncate them).
  synthetic  conversational pairs built from bench/common.py's pseudo-text conversations:
             prompt = the turns before the last answer, chosen = that answer, rejected = the last
             answer of another conversation.

What is timed: the optimizer steps only (model load, tokenisation and the final save are
outside). Each side records, inside its training loop, the real (non-padding) tokens of both
full sequences of every pair it trains on, and the wall time at the end of every optimizer step;
throughput = pairs (and pair tokens) of steps 2..N / (end of step N - end of step 1). The token
count is the same quantity on both sides (2 x prompt + both responses per pair), whatever each
side actually feeds its network. Peak RSS = the child's own VmHWM (whole process).

    python bench/bench_rm.py                  # both variants, 3 repeats, prints the table
    python bench/bench_rm.py --write          # also replaces "## Reward model (CPU)" in BENCHMARKS.md
    python bench/bench_rm.py --variants hh --repeats 1 --steps 8    # quick look
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gzip
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

SECTION = "Reward model (CPU)"
VARIANTS = ("hh", "synthetic")
SIDES = ("alignkit", "alignkit-full", "trl")
HH = common.ROOT.parent / "shared" / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3, help="runs per side and variant (alternating)")
    p.add_argument("--variants", default="hh,synthetic", help="comma list of: hh, synthetic")
    p.add_argument("--sides", default=",".join(SIDES), help="comma list of: " + ", ".join(SIDES))
    p.add_argument("--steps", type=int, default=20, help="optimizer steps per run")
    p.add_argument("--skip-steps", type=int, default=1, help="leading steps left out of the timing")
    p.add_argument("--batch-size", type=int, default=8, help="pairs per micro-batch")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--rows", type=int, default=512, help="synthetic: pairs in the data set")
    p.add_argument("--min-tokens", type=int, default=100, help="synthetic: shortest conversation")
    p.add_argument("--max-tokens", type=int, default=300, help="synthetic: longest conversation")
    common.add_model_args(p)
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", 0)) or os.cpu_count(),
                   help="OMP_NUM_THREADS for both sides (default: $OMP_NUM_THREADS or all cores)")
    p.add_argument("--workdir", default=None, help="where to build the models/data (default: a temp dir)")
    p.add_argument("--write", action="store_true", help=f"replace the '## {SECTION}' section of BENCHMARKS.md")
    p.add_argument("--json", default=None, help="also write every run's raw measurements to this file")
    p.add_argument("--from-json", default=None, metavar="FILE",
                   help="no runs: rebuild the tables (and with --write the section) from a --json file of an "
                   "earlier invocation")
    p.add_argument("--breakdown", action="store_true",
                   help="no training runs: time one forward+backward of each side's loss on the same batches in one "
                   "process, interleaved (robust to load from other processes)")
    p.add_argument("--extra-md", default=None, metavar="FILE",
                   help="with --write: append this Markdown (e.g. saved --breakdown output) to the section")
    p.add_argument("--breakdown-batches", type=int, default=6)
    p.add_argument("--breakdown-rounds", type=int, default=3)
    # internal: one measured run
    p.add_argument("--child", choices=SIDES, help=argparse.SUPPRESS)
    p.add_argument("--variant", choices=VARIANTS, default="hh", help=argparse.SUPPRESS)
    p.add_argument("--run-dir", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ============================================================================================
# Workspaces: tokenizer + model + pairs per variant
# ============================================================================================


def _train_bpe(texts, out_dir: Path, vocab: int):
    """Byte-level BPE with ChatML specials (eos <|im_end|>, pad <|pad|>, no bos), as common.py."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token=None))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, min_frequency=2, special_tokens=common.SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(texts, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|pad|>")
    tok.chat_template = common.CHAT_TEMPLATE
    tok.model_max_length = 1 << 20
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(out_dir)
    return tok


def _full_len(tok, prompt, answer) -> int:
    """Tokens of prompt + answer as one sequence (text: + eos; messages: the chat template)."""
    if isinstance(prompt, str):
        return len(tok(prompt + answer, add_special_tokens=False)["input_ids"]) + 1
    return len(tok.apply_chat_template(prompt + answer, tokenize=True, return_dict=True)["input_ids"])


def build_variant(root: Path, variant: str, shape: common.ModelShape, args) -> dict:
    """Tokenizer + model in root/model, pairs in root/data.jsonl; returns a description. A folder
    built before with the same settings is reused."""
    root.mkdir(parents=True, exist_ok=True)
    key = {"shape": vars(shape), "max_length": args.max_length, "rows": args.rows, "min_tokens": args.min_tokens,
           "max_tokens": args.max_tokens}
    info_file = root / "info.json"
    if info_file.is_file():
        saved = json.loads(info_file.read_text())
        if saved.get("key") == key and (root / "data.jsonl").is_file() and (root / "model" / "config.json").is_file():
            return saved["info"]
    model_dir = root / "model"
    if variant == "hh":
        with gzip.open(HH, "rt", encoding="utf-8") as f:
            raw = [json.loads(line) for line in f]
        tok = _train_bpe([r["chosen"] for r in raw] + [r["rejected"] for r in raw], model_dir, shape.vocab)
        from alignkit.data.preference import split_implicit_text

        rows, lens = [], []
        for r in raw:
            p, c, j = split_implicit_text(r["chosen"], r["rejected"])
            lc, lj, lp = _full_len(tok, p, c), _full_len(tok, p, j), len(tok(p, add_special_tokens=False)["input_ids"])
            if max(lc, lj) <= args.max_length:
                rows.append({"chosen": r["chosen"], "rejected": r["rejected"]})
                lens.append((lp, lc, lj))
        source = f"HH-RLHF harmless-base test, {len(rows)} of {len(raw)} pairs (those within {args.max_length} tokens)"
    else:
        tok, src = common.build_tokenizer(model_dir, shape.vocab, seed=0)
        convs = common.make_conversations(tok, src, args.rows, args.min_tokens, args.max_tokens, seed=0)
        rng = random.Random(1)
        rows, lens = [], []
        for i, c in enumerate(convs):
            other = convs[(i + rng.randint(1, len(convs) - 1)) % len(convs)]["messages"][-1]
            prompt, chosen, rejected = c["messages"][:-1], [c["messages"][-1]], [other]
            lc, lj = _full_len(tok, prompt, chosen), _full_len(tok, prompt, rejected)
            lp = len(tok.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True,
                                             return_dict=True)["input_ids"])
            if max(lc, lj) <= args.max_length:
                rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
                lens.append((lp, lc, lj))
        source = (f"{len(rows)} synthetic conversational pairs ({args.min_tokens}-{args.max_tokens}-token conversations"
                  f" from bench/common.py; rejected = another conversation's last answer)")
    n_params = common.build_model(model_dir, shape, tok, seed=0)
    with (root / "data.jsonl").open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    lp = statistics.mean(x[0] for x in lens)
    lc = statistics.mean(x[1] for x in lens)
    lj = statistics.mean(x[2] for x in lens)
    info = {"variant": variant, "source": source, "n_pairs": len(rows), "n_params": n_params,
            "mean_prompt": lp, "mean_chosen_full": lc, "mean_rejected_full": lj,
            "prompt_share": 2 * lp / (lc + lj)}
    info_file.write_text(json.dumps({"key": key, "info": info}))
    return info


# ============================================================================================
# Children: one measured run each
# ============================================================================================


def child_alignkit(args, share: bool) -> dict:
    import torch

    import alignkit.training.trainer as T
    from alignkit.config import RMConfig
    from alignkit.recipes.rm import batch_tokens, train_rm

    clock = common.StepClock()
    losses: list[float] = []
    orig_accumulate, orig_step, orig_start = T.Trainer.accumulate, T.Trainer.optimizer_step, T.Trainer.start_progress

    def accumulate(self, micro_batches, loss_fn, units):
        for mb in micro_batches:
            clock.micro(batch_tokens(mb), mb["n_pairs"])
        return orig_accumulate(self, micro_batches, loss_fn, units)

    def optimizer_step(self, metrics):
        out = orig_step(self, metrics)
        clock.step_end()
        losses.append(float(out["loss"]))
        return out

    def start_progress(self):  # called right before the step loop
        clock.start()
        return orig_start(self)

    T.Trainer.accumulate, T.Trainer.optimizer_step = accumulate, optimizer_step
    T.Trainer.start_progress = start_progress
    wd = Path(args.workdir) / args.variant
    cfg = RMConfig(
        model=str(wd / "model"), data=str(wd / "data.jsonl"), output_dir=args.run_dir, overwrite=True,
        max_steps=args.steps, batch_size=args.batch_size, grad_accum=1, lr=args.lr, weight_decay=0.0,
        adam_betas=(0.9, 0.999), warmup_steps=0, schedule="cosine", min_lr_ratio=0.0, max_grad_norm=1.0,
        max_length=args.max_length, seed=0, dtype="float32", gradient_checkpointing=False, share_prompt=share,
        eval_fraction=0.0, progress=False, tensorboard=False, save_every=0, eval_every=0, log_every=10,
    )
    t0 = time.perf_counter()
    train_rm(cfg)
    out = clock.summary(args.skip_steps)
    out.update(loss_last=statistics.mean(losses[-5:]) if losses else None, process_s=time.perf_counter() - t0,
               torch_threads=torch.get_num_threads())
    return out


def child_trl(args) -> dict:
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    clock = common.StepClock()
    losses: list[float] = []

    clock_cb = common.trl_clock_callback(clock, losses)

    class TimedRewardTrainer(RewardTrainer):
        def training_step(self, model, inputs, *rest, **kw):
            clock.micro(int(inputs["attention_mask"].sum()), inputs["input_ids"].shape[0] // 2)
            return super().training_step(model, inputs, *rest, **kw)

    wd = Path(args.workdir) / args.variant
    tok = AutoTokenizer.from_pretrained(wd / "model")
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(wd / "model", num_labels=1, dtype=torch.float32)
    ds = load_dataset("json", data_files=str(wd / "data.jsonl"), split="train")
    targs = RewardConfig(
        output_dir=args.run_dir, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1, learning_rate=args.lr, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999,
        warmup_steps=0, lr_scheduler_type="cosine", max_grad_norm=1.0, seed=0, data_seed=0, bf16=False, fp16=False,
        use_cpu=True, gradient_checkpointing=False, max_length=args.max_length, center_rewards_coefficient=None,
        logging_steps=5, save_strategy="no", report_to="none", disable_tqdm=True, dataloader_num_workers=0,
        dataset_num_proc=None,
    )
    trainer = TimedRewardTrainer(model=model, args=targs, train_dataset=ds, processing_class=tok, callbacks=[clock_cb])
    t0 = time.perf_counter()
    trainer.train()
    out = clock.summary(args.skip_steps)
    out.update(loss_last=losses[-1] if losses else None, process_s=time.perf_counter() - t0,
               torch_threads=torch.get_num_threads(), optim=str(targs.optim))
    return out


def breakdown(args, variant: str) -> tuple[str, dict]:
    """Forward + backward of one micro-batch's loss, the three computations interleaved batch by
    batch in one process, on identical weights and pairs:

      alignkit       `alignkit.recipes.rm.rm_loss_fn` on `shared_prompt_collate` rows (B rows)
      alignkit-full  `rm_loss_fn` on `pair_collate` rows (2B rows)
      trl            what `RewardTrainer.compute_loss` does: the sequence-classification model's own
                     forward on the 2B right-padded rows, then -logsigmoid(r_w - r_l).mean()
    """
    import torch
    import torch.nn.functional as F

    from alignkit.data.chat import setup_chat_template
    from alignkit.data.preference import load_pairs, pair_collate
    from alignkit.models import load_tokenizer
    from alignkit.models.reward import RewardSpec, load_reward_backbone
    from alignkit.recipes.rm import rm_loss_fn, shared_prompt_collate

    wd = Path(args.workdir) / variant
    tok = load_tokenizer(str(wd / "model"))
    setup_chat_template(tok)
    pairs, _ = load_pairs(str(wd / "data.jsonl"), "train", tok, args.max_length)
    torch.manual_seed(0)
    model, _ = load_reward_backbone(str(wd / "model"), RewardSpec())
    model.config.pad_token_id = tok.pad_token_id
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(pairs), generator=g).tolist()
    bs = args.batch_size
    batches = [[pairs[i] for i in order[k * bs:(k + 1) * bs]] for k in range(args.breakdown_batches)]
    loss_fn = rm_loss_fn(RewardSpec())

    def ours(b, shared):
        mb = shared_prompt_collate(b, tok.pad_token_id) if shared else pair_collate(b, tok.pad_token_id)
        loss, _ = loss_fn(model, mb)
        return loss

    def trl_like(b):
        mb = pair_collate(b, tok.pad_token_id)
        logits = model(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"], use_cache=False).logits
        r_w, r_l = torch.chunk(logits.squeeze(-1), chunks=2)
        return -F.logsigmoid(r_w - r_l).mean()

    fns = {"alignkit": lambda b: ours(b, True), "alignkit-full": lambda b: ours(b, False), "trl": trl_like}
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(args.breakdown_rounds):
        for b in batches:
            for name, fn in fns.items():
                t = time.perf_counter()
                fn(b).backward()
                times[name].append(time.perf_counter() - t)
                model.zero_grad(set_to_none=True)
    total = {k: sum(v) for k, v in times.items()}
    rows = [[variant, k, f"{1000 * common.med(v):,.0f}", f"{total['trl'] / total[k]:.2f}x"] for k, v in times.items()]
    table = common.markdown_table(["data", "computation", "ms per micro-batch (median)", "speed vs trl (sum)"], rows)
    return table, {k: v for k, v in times.items()}


def run_one_child(args) -> None:
    if args.child == "trl":
        common.child_finish(child_trl(args))
    else:
        common.child_finish(child_alignkit(args, share=args.child == "alignkit"))


# ============================================================================================
# Parent: build once, alternate runs, report
# ============================================================================================


def child_argv(args, side: str, variant: str, run_dir: str) -> list[str]:
    return [
        str(Path(__file__).resolve()), "--child", side, "--variant", variant, "--workdir", str(args.workdir),
        "--run-dir", run_dir, "--steps", str(args.steps), "--skip-steps", str(args.skip_steps),
        "--batch-size", str(args.batch_size), "--max-length", str(args.max_length), "--lr", str(args.lr),
    ]


def _ratio(a: list[float], b: list[float]) -> str:
    return f"{common.med(a) / common.med(b):.2f}x" if a and b and common.med(b) else "n/a"


def report(runs: list[dict], variants: list[str], sides: list[str]) -> str:
    headers = ["data", "side", "pairs/s median (min-max)", "pair tokens/s", "s/step", "peak RSS MiB (min-max)",
               "RSS growth in training MiB", "loss (end)", "runs"]
    rows, ratio_rows = [], []
    for v in variants:
        per = {}
        for s in sides:
            rs = [r for r in runs if r["side"] == s and r["variant"] == v and r.get("ok")]
            per[s] = rs
            if not rs:
                rows.append([v, s, "FAILED", "", "", "", "", "", 0])
                continue
            pps = [r["trained_tokens_per_s"] for r in rs]  # the 'trained' slot of StepClock counts pairs here
            loss = [r["loss_last"] for r in rs if r.get("loss_last") is not None]
            rows.append([
                v, s, f"{common.med(pps):.2f} ({min(pps):.2f}-{max(pps):.2f})",
                f"{common.med([r['tokens_per_s'] for r in rs]):,.0f}",
                f"{common.med([r['s_per_step'] for r in rs]):.3f}",
                common.spread([r["peak_rss_mib"] for r in rs]),
                f"{common.med([r['peak_rss_mib'] - r['rss_at_train_start_mib'] for r in rs]):,.0f}",
                f"{common.med(loss):.3f}" if loss else "n/a", len(rs),
            ])
        t = per.get("trl") or []
        for s in ("alignkit", "alignkit-full"):
            a = per.get(s) or []
            if a and t:
                ratio_rows.append([
                    v, s, _ratio([r["trained_tokens_per_s"] for r in a], [r["trained_tokens_per_s"] for r in t]),
                    _ratio([r["peak_rss_mib"] for r in a], [r["peak_rss_mib"] for r in t]),
                    _ratio([r["peak_rss_mib"] - r["rss_at_train_start_mib"] for r in a],
                           [r["peak_rss_mib"] - r["rss_at_train_start_mib"] for r in t]),
                    f"{common.med([r['tokens'] / r['timed_steps'] for r in a]):,.0f} / "
                    f"{common.med([r['tokens'] / r['timed_steps'] for r in t]):,.0f}",
                ])
    out = common.markdown_table(headers, rows)
    if ratio_rows:
        out += "\n\n" + common.markdown_table(
            ["data", "alignkit side", "throughput vs TRL", "peak RSS vs TRL", "RSS growth vs TRL",
             "pair tokens per step (side / TRL)"], ratio_rows)
    return out


def section_body(args, infos: list[dict], tables: str, when: str, cmd: str, shape: common.ModelShape) -> str:
    body = _section_body(args, infos, tables, when, cmd, shape)
    if args.extra_md:
        body += "\n" + Path(args.extra_md).read_text(encoding="utf-8").strip() + "\n"
    return body


def _section_body(args, infos: list[dict], tables: str, when: str, cmd: str, shape: common.ModelShape) -> str:
    data_lines = "\n".join(
        f"  - {i['variant']}: {i['source']}; mean prompt {i['mean_prompt']:.0f} tokens, full sequences "
        f"{i['mean_chosen_full']:.0f} (chosen) / {i['mean_rejected_full']:.0f} (rejected) tokens, so the prompt is "
        f"{100 * i['prompt_share']:.0f}% of a pair's tokens." for i in infos)
    n_params = infos[0]["n_params"] if infos else None
    return f"""Measured {when} on {common.machine()}, `OMP_NUM_THREADS={args.threads}` for both sides.
Versions: {common.versions("torch", "transformers", "trl", "accelerate", "alignkit")}.

Command: `{cmd}`

{tables}

Setup (`bench/bench_rm.py`, helpers in `bench/common.py`):

- Model: random-init {shape.describe(n_params)}, float32, SDPA attention, loaded on both sides as
  `LlamaForSequenceClassification` with one output (the LM head is not part of either model).
- Data (byte-level BPE, {shape.vocab} entries, trained offline; eos `<|im_end|>` ends every sequence):
{data_lines}
- Both sides: {args.batch_size} pairs per step (2 x {args.batch_size} sequences), {args.steps} optimizer steps,
  max length {args.max_length}, AdamW lr {args.lr:g} (betas 0.9/0.999, no weight decay), cosine to 0, no warmup,
  clip 1.0, no gradient checkpointing (TRL's default is on: turned off), float32, seed 0, loss
  -log sigmoid(r_w - r_l), no centering term. Each side uses its own AdamW implementation and its own
  sampler (both draw the same seeded permutation here: the pair tokens per step agree).
- alignkit: `share_prompt=true` (the default): each pair is one row, [prompt | chosen | rejected],
  with an attention mask that lets each response see the prompt and itself only, at positions that
  continue the prompt, so the prompt is computed once; rewards and gradients equal the full-sequence
  computation to float rounding (tests/recipes/test_rm.py). alignkit-full: `share_prompt=false`, one pass over
  the 2B right-padded full sequences, which is also what TRL computes.
- Throughput: pairs per second over optimizer steps {args.skip_steps + 1}..{args.steps}, recorded inside each
  training loop (alignkit via wrappers on `Trainer.accumulate`/`optimizer_step`, TRL via a
  `training_step` override and a `TrainerCallback`); model loading, tokenisation and the final save
  are not timed. "pair tokens" = the real tokens of both full sequences of each pair, the same count on
  every side whatever it feeds its network.
- peak RSS: the child's `VmHWM` (whole process, imports included). "RSS growth in training" = peak
  RSS minus the RSS when the first step starts.
"""


def main() -> int:
    args = parse_args()
    if args.child:
        run_one_child(args)
        return 0
    variants = common.choices(args.variants, VARIANTS, "--variants")
    sides = common.choices(args.sides, SIDES, "--sides")
    cmd = common.command_line()
    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        for k in ("steps", "skip_steps", "batch_size", "max_length", "lr", "threads", "repeats", "hidden", "layers",
                  "heads", "kv_heads", "intermediate", "vocab"):
            setattr(args, k, saved["args"][k])
        cmd = saved.get("command", cmd)
        shape = common.shape_of(args)
        tables = report(saved["runs"], [i["variant"] for i in saved["infos"]], saved.get("sides", sides))
        print(tables)
        if args.write:
            when = saved.get("when") or _dt.datetime.fromtimestamp(Path(args.from_json).stat().st_mtime).strftime(
                "%Y-%m-%d %H:%M")
            common.write_section(SECTION, section_body(args, saved["infos"], tables, when, cmd, shape))
            print(f"wrote the '## {SECTION}' section of {common.BENCHMARKS_MD}", file=sys.stderr)
        return 0
    tmp = None
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench-rm-")
        args.workdir = tmp.name
    shape = common.shape_of(args)
    t0 = time.perf_counter()
    infos = []
    for v in variants:
        print(f"building {v} tokenizer/model/pairs in {args.workdir}/{v} ...", file=sys.stderr, flush=True)
        info = build_variant(Path(args.workdir) / v, v, shape, args)
        infos.append(info)
        print(f"  {info['source']}; prompt {100 * info['prompt_share']:.0f}% of pair tokens "
              f"[{time.perf_counter() - t0:.0f}s]", file=sys.stderr, flush=True)
    env = common.child_env(args.threads)
    if args.breakdown:
        import torch

        torch.set_num_threads(args.threads)
        outs = [breakdown(args, v)[0] for v in variants]
        print("\n\n".join(outs))
        return 0
    launch = common.run_dir_launch(args.workdir, lambda s, v, run_dir: child_argv(args, s, v, run_dir), env)

    def summary(rec):
        return (f"{rec['trained_tokens_per_s']:6.2f} pairs/s {rec['tokens_per_s']:8,.0f} tok/s  "
                f"{rec['s_per_step']:.3f} s/step  peak RSS {rec['peak_rss_mib']:6,.0f} MiB  "
                f"loss {rec.get('loss_last') or float('nan'):.3f}")

    runs, failed = common.alternate_sides([{"variant": v} for v in variants], sides, args.repeats, launch, summary)
    tables = report(runs, variants, sides)
    print(tables)
    print(f"\n[total {time.perf_counter() - t0:.0f}s]", file=sys.stderr)
    when = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "infos": infos, "runs": runs, "sides": sides,
                                               "when": when, "command": cmd}, indent=1, default=str))
    if args.write:
        common.write_section(SECTION, section_body(args, infos, tables, when, cmd, shape))
        print(f"wrote the '## {SECTION}' section of {common.BENCHMARKS_MD}", file=sys.stderr)
    if tmp is not None:
        tmp.cleanup()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
