"""Rollout throughput on CPU: alignkit's RolloutEngine vs `transformers` `generate`.

Both sides sample G completions for each of the same prompts from the same random-init tiny
Llama (built offline, see bench/common.py), at temperature 1 with no top-k / top-p, the same
`max_new_tokens`, the same set of stop ids, float32, KV cache on, each run in a fresh process:

* alignkit: `RolloutEngine(tok, stop_token_ids=S).generate(model, prompts, SamplingParams(n=G, ...))`
  — one prefill per prompt, its cache repeated for the G samples; finished samples leave the batch.
* transformers: `model.generate(input_ids=left_padded_prompts, attention_mask=..., do_sample=True,
  num_return_sequences=G, eos_token_id=sorted(S), top_k=0, ...)` — the prompts are expanded to
  P x G rows before the prefill; every row stays in the batch until the last one finishes.

A random model almost never emits its one end-of-turn token, so without help every sample would
run to `max_new_tokens` and "finished samples leave the batch" would never be exercised. Both
sides therefore get the same stop set S: the tokenizer's eos plus a seeded random `--stop-frac`
share of the vocabulary (default 1/32, 256 ids), so samples end after a roughly geometric number
of tokens, as RL completions of uneven length do. `--variants fixed` turns stopping off on both
sides (every sample runs to max_new_tokens), which isolates what prefill sharing alone buys.

Counted: generated tokens up to and including the stop token (nothing after it), per second of
wall time inside the generate call. Each child does one small warm-up call first, then `--calls`
timed calls (different seeds), and reports their median.

    python bench/bench_rollout.py                  # eos + fixed variants, 5 alternating repeats
    python bench/bench_rollout.py --write          # also replaces the "## Rollout engine (CPU)" section
    python bench/bench_rollout.py --variants eos --repeats 1    # quick look
"""

from __future__ import annotations

import argparse
import datetime as _dt
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

SECTION = "Rollout engine (CPU)"
VARIANTS = ("eos", "fixed")
SIDES = ("alignkit", "hf")
SIDE_NAMES = {"alignkit": "alignkit RolloutEngine", "hf": "transformers generate"}


# ============================================================================================
# Workspace: model, tokenizer, prompts, stop ids (shared with bench_grpo.py)
# ============================================================================================


def add_model_args(p: argparse.ArgumentParser, hidden=256, layers=4, heads=4, kv_heads=2, intermediate=768,
                   vocab=8192) -> None:
    p.add_argument("--hidden", type=int, default=hidden)
    p.add_argument("--layers", type=int, default=layers)
    p.add_argument("--heads", type=int, default=heads)
    p.add_argument("--kv-heads", type=int, default=kv_heads)
    p.add_argument("--intermediate", type=int, default=intermediate)
    p.add_argument("--vocab", type=int, default=vocab)


def shape_of(args) -> common.ModelShape:
    return common.ModelShape(hidden=args.hidden, layers=args.layers, heads=args.heads, kv_heads=args.kv_heads,
                             intermediate=args.intermediate, vocab=args.vocab)


def make_prompt_rows(tok, src: common.TextSource, n: int, min_tokens: int, max_tokens: int, seed: int = 0) -> list[dict]:
    """`prompt` rows (a message list: optional system turn, one user turn) whose chat-template
    rendering with the generation prompt has a token count uniform in [min_tokens, max_tokens]."""
    rng = random.Random(seed)
    src.rng = random.Random(seed + 1)
    cache: dict = {}
    rows = []
    while len(rows) < n:
        target = rng.randint(min_tokens, max_tokens)
        msgs = []
        if rng.random() < 0.3 and target > 40:
            msgs.append({"role": "system", "content": common._text_of_tokens(tok, src, cache, rng.randint(6, 12))})
        for _ in range(4):  # adjust the user text until the rendered prompt lands in range
            fixed = len(prompt_ids(tok, msgs + [{"role": "user", "content": "x"}])) - 1
            body = max(3, target - fixed)
            user = {"role": "user", "content": common._text_of_tokens(tok, src, cache, body)}
            n_tok = len(prompt_ids(tok, msgs + [user]))
            if min_tokens <= n_tok <= max_tokens:
                rows.append({"prompt": msgs + [user]})
                break
    return rows


def prompt_ids(tok, messages: list[dict]) -> list[int]:
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tok(text, add_special_tokens=False)["input_ids"]


def stop_ids_for(tok, vocab_size: int, frac: float, seed: int = 0) -> list[int]:
    """The tokenizer's eos plus a seeded random `frac` share of the other ids (specials excluded)."""
    specials = set(tok.all_special_ids)
    pool = [i for i in range(vocab_size) if i not in specials]
    k = int(round(frac * vocab_size))
    chosen = random.Random(seed).sample(pool, k) if k > 0 else []
    return sorted({int(tok.eos_token_id), *chosen})


class RLWorkspace:
    """model/ (tokenizer + random-init Llama), prompts.jsonl (`prompt` message lists), meta.json
    (token ids of every prompt, stop ids, shape)."""

    def __init__(self, root: Path, shape: common.ModelShape, n_prompts: int, min_tokens: int, max_tokens: int,
                 stop_frac: float, seed: int = 0):
        self.root, self.shape = Path(root), shape
        self.model_dir = self.root / "model"
        self.prompts_path = self.root / "prompts.jsonl"
        self.meta_path = self.root / "meta.json"
        key = dict(shape=common.as_dict(shape), n_prompts=n_prompts, min_tokens=min_tokens, max_tokens=max_tokens,
                   stop_frac=stop_frac, seed=seed)
        if self.meta_path.is_file() and json.loads(self.meta_path.read_text()).get("key") == key:
            meta = json.loads(self.meta_path.read_text())
        else:
            self.root.mkdir(parents=True, exist_ok=True)
            tok, src = common.build_tokenizer(self.model_dir, shape.vocab, seed)
            n_params = common.build_model(self.model_dir, shape, tok, seed)
            rows = make_prompt_rows(tok, src, n_prompts, min_tokens, max_tokens, seed)
            with self.prompts_path.open("w", encoding="utf-8") as f:
                for r in rows:
                    f.write(json.dumps(r) + "\n")
            ids = [prompt_ids(tok, r["prompt"]) for r in rows]
            vocab = max(shape.vocab, len(tok))
            meta = dict(key=key, n_params=n_params, prompt_ids=ids, vocab=vocab,
                        stop_ids=stop_ids_for(tok, vocab, stop_frac, seed), eos_id=int(tok.eos_token_id),
                        pad_id=int(tok.pad_token_id))
            self.meta_path.write_text(json.dumps(meta))
        self.meta = meta
        self.n_params = meta["n_params"]
        self.prompt_ids: list[list[int]] = meta["prompt_ids"]
        self.stop_ids: list[int] = meta["stop_ids"]
        lens = [len(x) for x in self.prompt_ids]
        self.prompt_len = (min(lens), statistics.mean(lens), max(lens))


# ============================================================================================
# Children: one run each
# ============================================================================================


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5, help="runs per side and variant (alternating)")
    p.add_argument("--variants", default="eos,fixed", help="comma list of: eos (stop set on), fixed (no stopping)")
    p.add_argument("--sides", default="alignkit,hf", help="comma list of: alignkit, hf")
    p.add_argument("--prompts", type=int, default=16, help="prompts per generate call")
    p.add_argument("--group", "-G", type=int, default=8, help="samples per prompt (G)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--min-prompt-tokens", type=int, default=30)
    p.add_argument("--max-prompt-tokens", type=int, default=80)
    p.add_argument("--stop-frac", type=float, default=1 / 32,
                   help="share of the vocabulary that ends a sample (eos variant), besides the eos token")
    p.add_argument("--calls", type=int, default=2, help="timed generate calls per child (median reported)")
    add_model_args(p)
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", 0)) or os.cpu_count(),
                   help="OMP_NUM_THREADS for both sides (default: $OMP_NUM_THREADS or all cores)")
    p.add_argument("--workdir", default=None, help="where to build the model/prompts (default: a temp dir)")
    p.add_argument("--write", action="store_true", help=f"replace the '## {SECTION}' section of BENCHMARKS.md")
    p.add_argument("--json", default=None, help="also write every run's raw measurements to this file")
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="run one child per side and variant under torch.profiler; op tables go to DIR")
    p.add_argument("--child", choices=SIDES, help=argparse.SUPPRESS)
    p.add_argument("--variant", choices=VARIANTS, default="eos", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _count_until_stop(row: list[int], stop: set[int]) -> tuple[int, bool]:
    for k, t in enumerate(row):
        if t in stop:
            return k + 1, True
    return len(row), False


def child_run(args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    meta = json.loads((Path(args.workdir) / "meta.json").read_text())
    model_dir = Path(args.workdir) / "model"
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    prompts = meta["prompt_ids"][: args.prompts]
    use_stop = args.variant == "eos"
    stop = set(meta["stop_ids"]) if use_stop else set()
    G, M = args.group, args.max_new_tokens
    prof = None
    if os.environ.get("BENCH_PROFILE"):
        prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True)

    if args.child == "alignkit":
        from alignkit.rollout.engine import RolloutEngine, SamplingParams

        # {-1}: an id no sample can take, so nothing stops before max_new_tokens (fixed variant)
        engine = RolloutEngine(tok, stop_token_ids=stop if use_stop else {-1})

        def call(seed: int, n_prompts: int, n: int, max_new: int) -> dict:
            params = SamplingParams(n=n, max_new_tokens=max_new, temperature=1.0, top_p=1.0, top_k=0, seed=seed,
                                    batch_size=max(1, n_prompts))
            t0 = time.perf_counter()
            batch = engine.generate(model, prompts[:n_prompts], params)
            dt = time.perf_counter() - t0
            lens = [len(s.completion_ids) for s in batch.samples]
            return dict(seconds=dt, tokens=sum(lens), lens=lens,
                        stopped=sum(s.finish_reason == "eos" for s in batch.samples),
                        decode_steps=batch.stats.get("decode_steps", 0) + 1,
                        row_steps=batch.stats.get("decode_tokens", 0),
                        prefill_rows=len(prompts[:n_prompts]),
                        prefill_cols=max(len(x) for x in prompts[:n_prompts]))
    else:
        pad = int(tok.pad_token_id)
        model.generation_config.eos_token_id = None  # only what the call passes

        def call(seed: int, n_prompts: int, n: int, max_new: int) -> dict:
            ps = prompts[:n_prompts]
            Tp = max(len(x) for x in ps)
            ids = torch.full((len(ps), Tp), pad, dtype=torch.long)
            attn = torch.zeros((len(ps), Tp), dtype=torch.long)
            for i, x in enumerate(ps):
                ids[i, Tp - len(x):] = torch.tensor(x)
                attn[i, Tp - len(x):] = 1
            gc = GenerationConfig(do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=max_new,
                                  num_return_sequences=n, eos_token_id=sorted(stop) if use_stop else None,
                                  pad_token_id=pad, use_cache=True)
            torch.manual_seed(seed)
            t0 = time.perf_counter()
            out = model.generate(input_ids=ids, attention_mask=attn, generation_config=gc)
            dt = time.perf_counter() - t0
            comp = out[:, Tp:].tolist()
            counted = [_count_until_stop(r, stop) for r in comp]
            lens = [c for c, _ in counted]
            return dict(seconds=dt, tokens=sum(lens), lens=lens, stopped=sum(s for _, s in counted),
                        decode_steps=len(comp[0]) if comp else 0, row_steps=len(comp) * (len(comp[0]) if comp else 0),
                        prefill_rows=len(ps) * n, prefill_cols=Tp)

    call(10_000, min(2, len(prompts)), 2, 4)  # warm-up: thread pool, allocator, lazy inits
    rss_start = common.current_rss_mib()
    calls = []
    for c in range(args.calls):
        if prof is not None and c == 0:
            prof.__enter__()
        calls.append(call(c, len(prompts), G, M))
        if prof is not None and c == 0:
            prof.__exit__(None, None, None)
            ka = prof.key_averages()
            with open(os.environ["BENCH_PROFILE"], "w") as f:
                f.write(f"{args.child} {args.variant}: {calls[0]['seconds']:.3f}s, {calls[0]['tokens']} tokens\n\n")
                f.write(ka.table(sort_by="self_cpu_time_total", row_limit=40))
                f.write("\n\n")
                f.write(ka.table(sort_by="cpu_time_total", row_limit=40))
    tps = [c["tokens"] / c["seconds"] for c in calls]
    mid = sorted(range(len(calls)), key=lambda i: tps[i])[len(calls) // 2]
    best = calls[mid]
    all_lens = [x for c in calls for x in c["lens"]]
    return dict(side=args.child, variant=args.variant, tokens_per_s=statistics.median(tps), tps_calls=tps,
                seconds=best["seconds"], tokens=best["tokens"], mean_len=statistics.mean(all_lens),
                stopped_frac=sum(c["stopped"] for c in calls) / len(all_lens),
                decode_steps=best["decode_steps"], row_steps=best["row_steps"],
                prefill_rows=best["prefill_rows"], prefill_cols=best["prefill_cols"],
                rss_at_start_mib=rss_start, torch_threads=torch.get_num_threads(),
                load_avg_1m=os.getloadavg()[0])


# ============================================================================================
# Parent
# ============================================================================================


def child_argv(args, side: str, variant: str) -> list[str]:
    argv = [str(Path(__file__).resolve()), "--child", side, "--variant", variant, "--workdir", str(args.workdir),
            "--prompts", str(args.prompts), "--group", str(args.group), "--max-new-tokens", str(args.max_new_tokens),
            "--calls", str(args.calls)]
    return argv


def report(args, runs: list[dict], variants: list[str], sides: list[str]) -> str:
    headers = ["variant", "side", "generated tok/s median (min-max)", "s per call", "mean length", "stopped early",
               "decode steps", "row-steps (rows x steps)", "prefill rows x cols", "peak RSS MiB", "runs"]
    rows, ratio_rows = [], []
    for v in variants:
        per = {}
        for s in sides:
            rs = [r for r in runs if r["side"] == s and r["variant"] == v and r.get("ok")]
            per[s] = rs
            if not rs:
                rows.append([v, SIDE_NAMES[s], "FAILED"] + [""] * 7 + [0])
                continue
            rows.append([
                v, SIDE_NAMES[s], common.spread([r["tokens_per_s"] for r in rs]),
                f"{common.med([r['seconds'] for r in rs]):.2f}", f"{common.med([r['mean_len'] for r in rs]):.1f}",
                f"{100 * common.med([r['stopped_frac'] for r in rs]):.0f}%",
                f"{common.med([r['decode_steps'] for r in rs]):.0f}", f"{common.med([r['row_steps'] for r in rs]):,.0f}",
                f"{rs[0]['prefill_rows']} x {rs[0]['prefill_cols']}",
                f"{common.med([r['peak_rss_mib'] for r in rs]):,.0f}", len(rs),
            ])
        if per.get("alignkit") and per.get("hf"):
            a, h = per["alignkit"], per["hf"]
            # per-pair ratios (run i of each side ran back to back), median over pairs
            pairs = [x["tokens_per_s"] / y["tokens_per_s"] for x, y in zip(a, h)]
            ratio_rows.append([
                v, f"{common.med([r['tokens_per_s'] for r in a]) / common.med([r['tokens_per_s'] for r in h]):.2f}x",
                f"{common.med(pairs):.2f}x ({min(pairs):.2f}-{max(pairs):.2f})",
                f"{common.med([r['peak_rss_mib'] for r in a]) / common.med([r['peak_rss_mib'] for r in h]):.2f}x",
            ])
    out = common.markdown_table(headers, rows)
    if ratio_rows:
        out += "\n\n" + common.markdown_table(
            ["variant", "tok/s alignkit / generate (ratio of medians)", "per back-to-back pair: median (min-max)",
             "peak RSS alignkit / generate"], ratio_rows)
    return out


def section_body(args, ws: RLWorkspace, tables: str, when: str, cmd: str, load: list[float]) -> str:
    shape = ws.shape
    lo, mean, hi = ws.prompt_len
    loaded = ""
    if load and max(load) > args.threads * 1.2:
        loaded = (f" The machine was shared with other jobs while this ran (1-minute load average "
                  f"{min(load):.1f}-{max(load):.1f} on {os.cpu_count()} cores), so absolute figures are noisy; runs "
                  "alternate sides so both see the same load, and the ratios are the robust part.")
    return f"""Measured {when} on {common.machine()}, `OMP_NUM_THREADS={args.threads}` for both sides.{loaded}
Versions: {common.versions("torch", "transformers", "alignkit")}.

Command: `{cmd}`

{tables}

Setup (`bench/bench_rollout.py`):

- Model: random-init {shape.describe(ws.n_params)}, float32, SDPA attention, KV cache
  (`DynamicCache`) on both sides, built offline with the byte-level BPE tokenizer of `bench/common.py`.
- Prompts: {args.prompts} chat prompts (optional system turn + one user turn, ChatML with the generation
  prompt), {lo}-{hi} tokens (mean {mean:.0f}), given to both sides as the same token ids;
  G = {args.group} samples each ({args.prompts * args.group} sequences per call), `max_new_tokens` = {args.max_new_tokens},
  temperature 1, no top-k / top-p (transformers: `top_k=0`, which removes its default top-50).
- Stopping. eos variant: the same stop set on both sides, the tokenizer's eos plus a seeded random
  {args.stop_frac:.4g} of the vocabulary ({len(ws.stop_ids)} ids; alignkit `RolloutEngine(tok, stop_token_ids=...)`,
  transformers `eos_token_id=[...]`): a random model then ends samples after a roughly geometric number of
  tokens, so lengths are uneven as in RL. fixed variant: no stop id on either side, every sample runs to
  `max_new_tokens` (what prefill sharing alone buys). The "mean length" and "stopped early" columns
  show both sides sampled the same length distribution.
- alignkit: `RolloutEngine.generate(model, prompt_ids, SamplingParams(n=G, ...))`: {args.prompts} prompts
  prefilled once, the cache repeated G times, finished samples dropped from the batch and the cache; it
  also returns each token's sampling log-prob. transformers: `model.generate(input_ids, attention_mask,
  do_sample=True, num_return_sequences=G, ...)` on the left-padded prompts: the {args.prompts * args.group}
  expanded rows are all prefilled, and finished rows keep being computed (and padded) until the last one
  stops. "row-steps" = model rows fed over the decode steps (alignkit: live samples only).
- Timed: wall time of the generate call only; tokens = generated tokens up to and including the stop
  token. Each run is a fresh process (one warm-up call on 2 prompts, then {args.calls} timed calls with
  different seeds, median reported); runs alternate alignkit, transformers, alignkit, ... ({args.repeats} each).
  Peak RSS: the child's `ru_maxrss` (whole process).
"""


def main() -> int:
    args = parse_args()
    if args.child:
        common.child_finish(child_run(args))
        return 0
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    for v in variants:
        if v not in VARIANTS:
            raise SystemExit(f"--variants: unknown {v!r}; use {', '.join(VARIANTS)}")
    for s in sides:
        if s not in SIDES:
            raise SystemExit(f"--sides: unknown {s!r}; use {', '.join(SIDES)}")
    cmd = common.command_line()
    tmp = None
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench-rollout-")
        args.workdir = tmp.name
    t0 = time.perf_counter()
    print(f"building model/tokenizer/prompts in {args.workdir} ...", file=sys.stderr, flush=True)
    ws = RLWorkspace(Path(args.workdir), shape_of(args), args.prompts, args.min_prompt_tokens, args.max_prompt_tokens,
                     args.stop_frac)
    print(f"  {ws.shape.describe(ws.n_params)}; {len(ws.prompt_ids)} prompts of {ws.prompt_len[0]}-"
          f"{ws.prompt_len[2]} tokens; {len(ws.stop_ids)} stop ids [{time.perf_counter() - t0:.1f}s]",
          file=sys.stderr, flush=True)
    env = common.child_env(args.threads)

    if args.profile:
        out_dir = Path(args.profile)
        out_dir.mkdir(parents=True, exist_ok=True)
        for v in variants:
            for s in sides:
                res = common.run_child(child_argv(args, s, v), dict(env, BENCH_PROFILE=str(out_dir / f"{s}-{v}.txt")))
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
                res = common.run_child(child_argv(args, s, v), env)
                rec = dict(res.data, side=s, variant=v, repeat=rep, ok=res.ok, wall_s=res.wall_s,
                           returncode=res.returncode)
                runs.append(rec)
                if res.ok:
                    print(f"{v:>5} {s:>8} #{rep + 1}: {rec['tokens_per_s']:8,.0f} tok/s  {rec['seconds']:.2f} s/call  "
                          f"mean len {rec['mean_len']:.1f}  stopped {100 * rec['stopped_frac']:.0f}%  "
                          f"peak RSS {rec['peak_rss_mib']:,.0f} MiB  load {rec['load_avg_1m']:.1f}  [{res.wall_s:.0f}s]",
                          file=sys.stderr, flush=True)
                else:
                    failed = True
                    print(f"{v} {s} #{rep + 1}: FAILED (exit {res.returncode})\n{res.log_tail}", file=sys.stderr,
                          flush=True)
    tables = report(args, runs, variants, sides)
    when = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    print(tables)
    print(f"\n[total {time.perf_counter() - t0:.0f}s]", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "runs": runs}, indent=1, default=str))
    if args.write:
        load = [r["load_avg_1m"] for r in runs if r.get("ok")]
        common.write_section(SECTION, section_body(args, ws, tables, when, cmd, load))
        print(f"wrote the '## {SECTION}' section of {common.BENCHMARKS_MD}", file=sys.stderr)
    if tmp is not None:
        tmp.cleanup()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
