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
wall time inside the generate call. Each child does one untimed full-size warm-up call first, then
`--calls` timed calls (different seeds), and reports their median.

    python bench/bench_rollout.py                  # eos + fixed variants, 3 alternating repeats
    python bench/bench_rollout.py --write          # also replaces the "## Rollout engine (CPU)" section
    python bench/bench_rollout.py --variants eos --repeats 1    # quick look
"""

from __future__ import annotations

import argparse
import datetime as _dt
import functools
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


def make_prompt_rows(tok, src: common.TextSource, n: int, min_tokens: int, max_tokens: int,
                     seed: int = 0) -> list[dict]:
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


def _enable_cache(model_dir: Path) -> None:
    """`common.build_model` saves `use_cache: false` (right for training benchmarks). Generation
    must find the cache on, as in any released model: TRL's GRPOTrainer, for one, builds its
    GenerationConfig without `use_cache` and inherits the model's setting, so a false there would
    make it recompute the whole sequence at every generated token."""
    for name in ("config.json", "generation_config.json"):
        path = model_dir / name
        if path.is_file():
            cfg = json.loads(path.read_text())
            cfg["use_cache"] = True
            path.write_text(json.dumps(cfg, indent=2))


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
        _enable_cache(self.model_dir)
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
    p.add_argument("--repeats", type=int, default=3, help="runs per side and variant (alternating)")
    p.add_argument("--variants", default="eos,fixed", help="comma list of: eos (stop set on), fixed (no stopping)")
    p.add_argument("--sides", default="alignkit,hf", help="comma list of: alignkit, hf")
    p.add_argument("--prompts", type=int, default=16, help="prompts per generate call")
    p.add_argument("--group", "-G", type=int, default=8, help="samples per prompt (G)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--min-prompt-tokens", type=int, default=30)
    p.add_argument("--max-prompt-tokens", type=int, default=80)
    p.add_argument("--stop-frac", type=float, default=1 / 32,
                   help="share of the vocabulary that ends a sample (eos variant), besides the eos token")
    p.add_argument("--calls", type=int, default=1, help="timed generate calls per child (median reported)")
    common.add_model_args(p)
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", 0)) or os.cpu_count(),
                   help="OMP_NUM_THREADS for both sides (default: $OMP_NUM_THREADS or all cores)")
    p.add_argument("--workdir", default=None, help="where to build the model/prompts (default: a temp dir)")
    p.add_argument("--write", action="store_true", help=f"replace the '## {SECTION}' section of BENCHMARKS.md")
    p.add_argument("--json", default=None, help="also write every run's raw measurements to this file")
    p.add_argument("--from-json", default=None, metavar="FILE",
                   help="measure nothing: print (and with --write, write) the tables of an earlier --json file")
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="run one child per side and variant under torch.profiler; op tables go to DIR")
    p.add_argument("--child", choices=SIDES + ("micro",), help=argparse.SUPPRESS)
    p.add_argument("--variant", choices=VARIANTS, default="eos", help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    common.add_device_arg(p)
    args = p.parse_args(argv)
    common.use_device(args.device)
    return args


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
    # on a GPU both sides sample from the same bf16 weights (what an RL run's rollout uses there)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16 if common.on_gpu() else torch.float32)
    model.to("cuda" if common.on_gpu() else "cpu").eval()
    fwd = {"cpu": 0.0, "n": 0, "prefill": 0.0}
    orig_forward = model.forward

    # functools.wraps keeps the signature visible: generate() inspects forward's parameters (e.g. to
    # pass `logits_to_keep=1` at the prefill and `position_ids`), so a bare (*a, **kw) would change what it does
    @functools.wraps(orig_forward)
    def timed_forward(*a, **kw):  # CPU time of every model forward; the first of a call is the prefill
        c = time.process_time()
        out = orig_forward(*a, **kw)
        d = time.process_time() - c
        fwd["cpu"] += d
        fwd["n"] += 1
        if fwd["n"] == 1:
            fwd["prefill"] = d
        return out

    model.forward = timed_forward
    prompts = meta["prompt_ids"][: args.prompts]
    use_stop = args.variant == "eos"
    stop = set(meta["stop_ids"]) if use_stop else set()
    G, M = args.group, args.max_new_tokens
    prof = None
    if os.environ.get("BENCH_PROFILE"):
        prof = common.profiler(record_shapes=True)

    if args.child == "alignkit":
        from alignkit.rollout.engine import RolloutEngine, SamplingParams

        # {-1}: an id no sample can take, so nothing stops before max_new_tokens (fixed variant)
        engine = RolloutEngine(tok, stop_token_ids=stop if use_stop else {-1})

        def call(seed: int, n_prompts: int, n: int, max_new: int) -> dict:
            params = SamplingParams(n=n, max_new_tokens=max_new, temperature=1.0, top_p=1.0, top_k=0, seed=seed,
                                    batch_size=max(1, n_prompts))
            t0, c0 = time.perf_counter(), time.process_time()
            batch = engine.generate(model, prompts[:n_prompts], params)
            common.sync()
            dt, cpu = time.perf_counter() - t0, time.process_time() - c0
            lens = [len(s.completion_ids) for s in batch.samples]
            return dict(seconds=dt, cpu_s=cpu, tokens=sum(lens), lens=lens,
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
            t0, c0 = time.perf_counter(), time.process_time()
            out = model.generate(input_ids=ids.to(model.device), attention_mask=attn.to(model.device),
                                 generation_config=gc)
            common.sync()
            dt, cpu = time.perf_counter() - t0, time.process_time() - c0
            comp = out[:, Tp:].tolist()
            counted = [_count_until_stop(r, stop) for r in comp]
            lens = [c for c, _ in counted]
            return dict(seconds=dt, cpu_s=cpu, tokens=sum(lens), lens=lens, stopped=sum(s for _, s in counted),
                        decode_steps=len(comp[0]) if comp else 0, row_steps=len(comp) * (len(comp[0]) if comp else 0),
                        prefill_rows=len(ps) * n, prefill_cols=Tp)

    # warm-up at full size: lazy inits, and the allocator settles (glibc's mmap threshold adapts
    # after the first large frees; before that every new cache tensor is fresh, page-faulting memory)
    call(10_000, len(prompts), G, M)
    rss_start = common.current_rss_mib()
    calls = []
    for c in range(args.calls):
        if prof is not None and c == 0:
            prof.__enter__()
        fwd.update(cpu=0.0, n=0, prefill=0.0)
        calls.append(call(1000 * args.seed + c, len(prompts), G, M))
        calls[-1].update(prefill_cpu=fwd["prefill"], forward_cpu=fwd["cpu"], forwards=fwd["n"])
        if prof is not None and c == 0:
            prof.__exit__(None, None, None)
            with open(os.environ["BENCH_PROFILE"], "w") as f:
                f.write(f"{args.child} {args.variant}: {calls[0]['seconds']:.3f}s, {calls[0]['tokens']} tokens\n\n")
                f.write(common.profile_tables(prof, 40))
    tps = [c["tokens"] / c["seconds"] for c in calls]
    tpc = [c["tokens"] / c["cpu_s"] for c in calls]
    mid = sorted(range(len(calls)), key=lambda i: tps[i])[len(calls) // 2]
    best = calls[mid]
    all_lens = [x for c in calls for x in c["lens"]]
    return dict(side=args.child, variant=args.variant, tokens_per_s=statistics.median(tps), tps_calls=tps,
                tokens_per_cpu_s=statistics.median(tpc), seconds=best["seconds"], cpu_s=best["cpu_s"],
                prefill_cpu=statistics.median(c["prefill_cpu"] for c in calls),
                decode_cpu=statistics.median(c["forward_cpu"] - c["prefill_cpu"] for c in calls),
                other_cpu=statistics.median(c["cpu_s"] - c["forward_cpu"] for c in calls),
                call_cpu=statistics.median(c["cpu_s"] for c in calls), tokens=best["tokens"],
                mean_len=statistics.mean(all_lens),
                stopped_frac=sum(c["stopped"] for c in calls) / len(all_lens),
                decode_steps=best["decode_steps"], row_steps=best["row_steps"],
                prefill_rows=best["prefill_rows"], prefill_cols=best["prefill_cols"],
                rss_at_start_mib=rss_start, torch_threads=torch.get_num_threads(),
                load_avg_1m=os.getloadavg()[0])


def child_micro(args) -> dict:
    """CPU milliseconds of the per-decode-step sampling ops at the full batch (P x G rows, the
    vocabulary): torch.multinomial (what both sides call) vs inverse-CDF sampling."""
    import torch

    meta = json.loads((Path(args.workdir) / "meta.json").read_text())
    B, V = args.prompts * args.group, meta["vocab"]
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(B, V, generator=gen)
    probs = torch.softmax(logits, -1)

    def ms(fn, n=30) -> float:
        fn()
        c = time.process_time()
        for _ in range(n):
            fn()
        return (time.process_time() - c) / n * 1e3

    return dict(rows=B, vocab=V,
                multinomial_ms=ms(lambda: torch.multinomial(probs, 1, generator=gen)),
                inverse_cdf_ms=ms(lambda: torch.searchsorted(probs.cumsum(-1), torch.rand(B, 1, generator=gen))),
                log_softmax_ms=ms(lambda: torch.log_softmax(logits, -1)),
                softmax_ms=ms(lambda: torch.softmax(logits, -1)))


# ============================================================================================
# Parent
# ============================================================================================


def child_argv(args, side: str, variant: str, seed: int = 0) -> list[str]:
    argv = [str(Path(__file__).resolve()), "--child", side, "--variant", variant, "--workdir", str(args.workdir),
            "--seed", str(seed),
            "--prompts", str(args.prompts), "--group", str(args.group), "--max-new-tokens", str(args.max_new_tokens),
            "--calls", str(args.calls)]
    return argv


def report(args, runs: list[dict], variants: list[str], sides: list[str]) -> str:
    headers = ["variant", "side", "generated tok/s (wall), median (min-max)", "tok per CPU-s", "s per call",
               "CPU-s per call: prefill / decode forwards / sampling + rest", "mean length", "stopped early",
               "row-steps (rows x steps)", "prefill rows x cols", "peak RSS MiB", "runs"]
    rows, ratio_rows = [], []
    for v in variants:
        per = {}
        for s in sides:
            rs = [r for r in runs if r["side"] == s and r["variant"] == v and r.get("ok")]
            per[s] = rs
            if not rs:
                rows.append([v, SIDE_NAMES[s], "FAILED"] + [""] * 8 + [0])
                continue
            rows.append([
                v, SIDE_NAMES[s], common.spread([r["tokens_per_s"] for r in rs]),
                f"{common.med([r['tokens_per_cpu_s'] for r in rs]):,.0f}",
                f"{common.med([r['seconds'] for r in rs]):.2f}",
                f"{common.med([r['call_cpu'] for r in rs]):.2f}: {common.med([r['prefill_cpu'] for r in rs]):.2f} / "
                f"{common.med([r['decode_cpu'] for r in rs]):.2f} / {common.med([r['other_cpu'] for r in rs]):.2f}",
                f"{common.med([r['mean_len'] for r in rs]):.1f}",
                f"{100 * common.med([r['stopped_frac'] for r in rs]):.0f}%",
                f"{common.med([r['row_steps'] for r in rs]):,.0f}",
                f"{rs[0]['prefill_rows']} x {rs[0]['prefill_cols']}",
                f"{common.med([r['peak_rss_mib'] for r in rs]):,.0f}", len(rs),
            ])
        if per.get("alignkit") and per.get("hf"):
            a, h = per["alignkit"], per["hf"]
            # per-pair ratios (run i of each side ran back to back), median over pairs
            pairs = [x["tokens_per_s"] / y["tokens_per_s"] for x, y in zip(a, h)]
            ma = lambda k: common.med([r[k] for r in a])  # noqa: E731
            mh = lambda k: common.med([r[k] for r in h])  # noqa: E731
            ratio_rows.append([
                v, f"**{ma('tokens_per_s') / mh('tokens_per_s'):.2f}x**",
                f"{common.med(pairs):.2f}x ({min(pairs):.2f}-{max(pairs):.2f})",
                f"{ma('tokens_per_cpu_s') / mh('tokens_per_cpu_s'):.2f}x",
                f"{common.med([r['peak_rss_mib'] for r in a]) / common.med([r['peak_rss_mib'] for r in h]):.2f}x",
            ])
    out = common.markdown_table(headers, rows)
    if ratio_rows:
        out += "\n\n" + common.markdown_table(
            ["variant", "tok/s alignkit / generate (ratio of medians)", "per back-to-back pair: median (min-max)",
             "tok per CPU-s alignkit / generate", "peak RSS alignkit / generate"], ratio_rows)
    return out


def analysis(args, runs: list[dict], micro: dict) -> str:
    """Where the time goes, from the CPU split of each run and the sampling micro-benchmark."""

    def m(side, variant, key):
        xs = [r[key] for r in runs if r.get("ok") and r["side"] == side and r["variant"] == variant]
        return common.med(xs) if xs else float("nan")

    lines = ["Where the time goes (medians of the CPU split column; CPU time is what the work costs, "
             "wall time adds waiting for a core on a loaded machine):", ""]
    for v in ("eos", "fixed"):
        if not any(r.get("ok") and r["variant"] == v for r in runs):
            continue
        ratio = m("alignkit", v, "tokens_per_cpu_s") / m("hf", v, "tokens_per_cpu_s")
        lines.append(
            f"- {v}: prefill {m('hf', v, 'prefill_cpu'):.2f} CPU-s in transformers ({args.prompts * args.group} "
            f"rows) vs {m('alignkit', v, 'prefill_cpu'):.2f} in alignkit ({args.prompts} rows); decode forwards "
            f"{m('hf', v, 'decode_cpu'):.2f} vs {m('alignkit', v, 'decode_cpu'):.2f} for "
            f"{m('hf', v, 'row_steps'):,.0f} vs {m('alignkit', v, 'row_steps'):,.0f} row-steps; sampling and "
            f"bookkeeping {m('hf', v, 'other_cpu'):.2f} vs {m('alignkit', v, 'other_cpu'):.2f}. "
            + ("Both gains (prefill once, finished samples out) apply: "
               f"{ratio:.1f}x the tokens per CPU-second, the 2x target met." if v == "eos" else
               "Nothing finishes early, so both sides decode the same row-steps; prefilling once, the cheaper "
               "sampling and the cache written in place (decode forwards above) are alignkit's gains: "
               f"{ratio:.1f}x" + (", short of 2x." if ratio < 2 else ".")))
    if micro:
        lines += ["", f"Sampling: transformers draws the next token with `torch.multinomial`, which on CPU draws "
                  f"exponential noise for every entry of the (rows x vocab) probability matrix: "
                  f"{micro['multinomial_ms']:.1f} ms CPU per decode step at {micro['rows']} x {micro['vocab']}; "
                  f"alignkit's engine samples by inverse CDF (`cumsum`, one uniform per row, `searchsorted`: the "
                  f"same distribution), {micro['inverse_cdf_ms']:.1f} ms, plus {micro['log_softmax_ms']:.1f} ms for "
                  "the log-probs it returns.", "",
                  "KV cache: transformers' `DynamicCache` grows every layer's keys and values with `torch.cat` at "
                  "each step, a copy of the whole cache per token; alignkit's engine moves the prefilled cache into "
                  "buffers sized for prompt + max_new_tokens and writes each token in place. When samples finish, "
                  "the last live rows move into the freed slots (a copy of as many rows as finished) instead of "
                  "every row being gathered into a new cache."]
    return "\n".join(lines)


def section_body(args, ws: RLWorkspace, tables: str, when: str, cmd: str, load: list[float],
                 notes: str = "") -> str:
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

{notes}

Setup (`bench/bench_rollout.py`):

- Model: random-init {shape.describe(ws.n_params)}, float32, SDPA attention, KV cache on both
  sides (transformers: `DynamicCache`; alignkit: preallocated buffers), built offline with the byte-level BPE
  tokenizer of `bench/common.py`.
- Prompts: {args.prompts} chat prompts (optional system turn + one user turn, ChatML with the generation
  prompt), {lo}-{hi} tokens (mean {mean:.0f}), given to both sides as the same token ids;
  G = {args.group} samples each ({args.prompts * args.group} sequences per call),
  `max_new_tokens` = {args.max_new_tokens},
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
  token. Each run is a fresh process (one untimed full-size warm-up call, then {args.calls} timed call(s) with
  other seeds, median reported); runs alternate alignkit, transformers, alignkit, ... ({args.repeats} each).
  Peak RSS: the child's `VmHWM` (whole process).
"""


def load_saved(args) -> dict | None:
    """--from-json: the saved run, its settings copied onto args (the workdir is rebuilt: it is seeded)."""
    if not args.from_json:
        return None
    saved = json.loads(Path(args.from_json).read_text())
    keep = {k: getattr(args, k) for k in ("write", "from_json", "json", "workdir", "profile")}
    for k, v in saved["args"].items():
        setattr(args, k, v)
    for k, v in keep.items():
        setattr(args, k, v)
    args.profile = None
    return saved


def main() -> int:
    args = parse_args()
    if args.child:
        common.child_finish(child_micro(args) if args.child == "micro" else child_run(args))
        return 0
    saved = load_saved(args)
    variants = common.choices(args.variants, VARIANTS, "--variants")
    sides = common.choices(args.sides, SIDES, "--sides")
    cmd = saved.get("cmd", common.command_line()) if saved else common.command_line()
    tmp = None
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench-rollout-")
        args.workdir = tmp.name
    t0 = time.perf_counter()
    print(f"building model/tokenizer/prompts in {args.workdir} ...", file=sys.stderr, flush=True)
    ws = RLWorkspace(Path(args.workdir), common.shape_of(args), args.prompts, args.min_prompt_tokens, args.max_prompt_tokens,
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

    def summary(rec):
        return (f"{rec['tokens_per_s']:8,.0f} tok/s  {rec['seconds']:.2f} s/call  mean len {rec['mean_len']:.1f}  "
                f"stopped {100 * rec['stopped_frac']:.0f}%  peak RSS {rec['peak_rss_mib']:,.0f} MiB  "
                f"load {rec['load_avg_1m']:.1f}")

    runs: list[dict] = saved["runs"] if saved else []
    failed = False
    if not saved:
        runs, failed = common.alternate_sides(
            [{"variant": v} for v in variants], sides, args.repeats,
            lambda cell, s, rep: (child_argv(args, s, cell["variant"], seed=rep), env), summary)
    tables = report(args, runs, variants, sides)
    micro = saved.get("micro", {}) if saved else {}
    if "alignkit" in sides and not saved:
        res = common.run_child([str(Path(__file__).resolve()), "--child", "micro", "--workdir", str(args.workdir),
                                "--prompts", str(args.prompts), "--group", str(args.group)], env)
        micro = res.data if res.ok else {}
    notes = analysis(args, runs, micro)
    when = saved.get("when") if saved else None
    when = when or _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    print(tables)
    print("\n" + notes)
    print(f"\n[total {time.perf_counter() - t0:.0f}s]", file=sys.stderr)
    if args.json and not saved:
        Path(args.json).write_text(json.dumps({"args": vars(args), "cmd": cmd, "when": when, "runs": runs,
                                               "micro": micro}, indent=1, default=str))
    if args.write:
        load = [r["load_avg_1m"] for r in runs if r.get("ok")]
        common.write_section(common.section_title(SECTION), section_body(args, ws, tables, when, cmd, load, notes))
        print(f"wrote the '## {SECTION}' section of {common.BENCHMARKS_MD}", file=sys.stderr)
    if tmp is not None:
        tmp.cleanup()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
