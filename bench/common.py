"""Shared helpers for the side-by-side benchmarks in bench/.

* a tiny random-init Llama and a byte-level BPE tokenizer with a ChatML chat template, both
  built offline (`build_workspace`), and synthetic conversational rows of a chosen length;
* a child-process runner that measures the peak RSS of *one* run (`run_child`), the driver that
  alternates the sides (`alternate_sides`), and the helpers a child uses to report its
  measurements (`StepClock`, `child_finish`);
* markdown tables, machine / version info, and the writer that replaces one `## ...` section of
  BENCHMARKS.md (`write_section`).

Every benchmark runs each side in a fresh Python process, so imports, allocator state and the
peak RSS of one run never leak into the next one.
"""

from __future__ import annotations

import json
import math
import os
import platform
import random
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS_MD = ROOT / "BENCHMARKS.md"
BENCHMARKS_HEADER = """# Benchmarks

Side-by-side runs of alignkit and its peers on the same model, data and settings. Each section
is written by one script in `bench/` (`python bench/<script>.py --write`; `make bench` runs them
all); see `bench/README.md` for what each one measures and how.
"""

# ChatML with `{% generation %}` markers around what an assistant turn trains on: its content and
# the end-of-turn token (not the newline after it, which is never generated). transformers uses
# the markers for `return_assistant_tokens_mask` (TRL's `assistant_only_loss`); alignkit ignores
# them and finds the same span by rendering the conversation prefix by prefix.
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' }}{% generation %}{{ m['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|pad|>", "<|im_start|>", "<|im_end|>"]


# --------------------------------------------------------------------------------------------
# Device: CPU (float32, the default) or one CUDA GPU (bf16 autocast over float32 master weights
# on both sides: alignkit `dtype=bfloat16`, TRL `bf16=True`). The parent's `--device` travels to
# its children through BENCH_DEVICE, so the child code reads one place.
# --------------------------------------------------------------------------------------------


def add_device_arg(p) -> None:
    """Add `--device cpu|cuda` to a benchmark's argument parser."""
    p.add_argument("--device", choices=("cpu", "cuda"), default=os.environ.get("BENCH_DEVICE", "cpu"),
                   help="cpu: float32 on both sides; cuda: one GPU, bf16 autocast on both sides")


def use_device(name: str) -> None:
    """Set the device for this process and the children it starts."""
    os.environ["BENCH_DEVICE"] = name


def on_gpu() -> bool:
    return os.environ.get("BENCH_DEVICE", "cpu") == "cuda"


def alignkit_dtype() -> str:
    """alignkit's `dtype=` for the benchmark's device."""
    return "bfloat16" if on_gpu() else "float32"


def trl_precision() -> dict:
    """TRL / transformers TrainingArguments for the benchmark's device."""
    return dict(bf16=on_gpu(), fp16=False, use_cpu=not on_gpu())


def section_title(cpu_title: str) -> str:
    """A script's BENCHMARKS.md section for the current device: 'SFT (CPU)' -> 'SFT (GPU: NVIDIA H200)'."""
    if not on_gpu():
        return cpu_title
    import torch

    return cpu_title.replace("(CPU)", f"(GPU: {torch.cuda.get_device_name(0)})")


def sync() -> None:
    """Wait for queued GPU work, so a host clock read after it times the work itself."""
    torch = sys.modules.get("torch")
    if torch is not None and on_gpu() and torch.cuda.is_available():
        torch.cuda.synchronize()


def profiler(**kw):
    """torch.profiler over CPU ops, plus CUDA kernels when the benchmark runs on a GPU."""
    import torch

    acts = [torch.profiler.ProfilerActivity.CPU]
    if on_gpu():
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    return torch.profiler.profile(activities=acts, **kw)


def profile_tables(prof, rows: int = 40, total_rows: int | None = None) -> str:
    """The op tables of a finished profile: by self CPU time, by total CPU time (`total_rows` rows,
    default `rows`), and on a GPU by self CUDA time (what the device spent in each kernel)."""
    ka = prof.key_averages()
    parts = [ka.table(sort_by="self_cpu_time_total", row_limit=rows),
             ka.table(sort_by="cpu_time_total", row_limit=total_rows or rows)]
    if on_gpu():
        parts.append(ka.table(sort_by="self_cuda_time_total", row_limit=rows))
    return "\n\n".join(parts)

# --------------------------------------------------------------------------------------------
# Model, tokenizer and data, built offline
# --------------------------------------------------------------------------------------------


@dataclass
class ModelShape:
    """A Llama shape. Defaults: a scaled-down SmolLM2 (GQA, tied embeddings, SiLU MLP)."""

    hidden: int = 256
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 768
    vocab: int = 8192
    max_positions: int = 2048

    def describe(self, n_params: int | None = None) -> str:
        s = (f"Llama, hidden {self.hidden}, {self.layers} layers, {self.heads} heads ({self.kv_heads} KV), "
             f"MLP {self.intermediate}, vocab {self.vocab}, tied embeddings")
        if n_params:
            s += f", {n_params / 1e6:.2f}M parameters"
        return s



def add_model_args(p, shape: "ModelShape | None" = None) -> None:
    """The model-shape flags every benchmark takes (--hidden ... --vocab), defaulting to `shape`."""
    d = shape or ModelShape()
    p.add_argument("--hidden", type=int, default=d.hidden)
    p.add_argument("--layers", type=int, default=d.layers)
    p.add_argument("--heads", type=int, default=d.heads)
    p.add_argument("--kv-heads", type=int, default=d.kv_heads)
    p.add_argument("--intermediate", type=int, default=d.intermediate)
    p.add_argument("--vocab", type=int, default=d.vocab)


def shape_of(args) -> ModelShape:
    """The `ModelShape` of parsed `add_model_args` flags."""
    return ModelShape(hidden=args.hidden, layers=args.layers, heads=args.heads, kv_heads=args.kv_heads,
                      intermediate=args.intermediate, vocab=args.vocab)

def _pseudo_words(n: int, rng: random.Random) -> list[str]:
    onsets = ["", "b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "z",
              "br", "ch", "dr", "gl", "kr", "pl", "sh", "st", "th", "tr"]
    vowels = ["a", "e", "i", "o", "u", "ai", "ea", "ou", "ie"]
    codas = ["", "", "n", "r", "s", "t", "l", "m", "nd", "st", "ck"]
    words: set[str] = set()
    while len(words) < n:
        k = rng.choice([1, 2, 2, 3, 3, 4])
        words.add("".join(rng.choice(onsets) + rng.choice(vowels) + rng.choice(codas) for _ in range(k)))
    return sorted(words)


class TextSource:
    """Zipf-distributed pseudo-words with punctuation: text that a BPE of several thousand
    entries tokenizes at a realistic ~1.2-1.5 tokens per word."""

    def __init__(self, seed: int = 0, n_words: int = 30000):
        self.rng = random.Random(seed)
        self.words = _pseudo_words(n_words, self.rng)
        weights = [1.0 / (r + 10) ** 1.05 for r in range(len(self.words))]
        total = sum(weights)
        self.cum = []
        acc = 0.0
        for w in weights:
            acc += w / total
            self.cum.append(acc)

    def word(self) -> str:
        import bisect

        return self.words[min(bisect.bisect_left(self.cum, self.rng.random()), len(self.words) - 1)]

    def sentence(self) -> list[str]:
        n = self.rng.randint(4, 14)
        ws = [self.word() for _ in range(n)]
        ws[0] = ws[0].capitalize()
        ws[-1] += self.rng.choice([".", ".", ".", "?", "!"])
        if n > 6 and self.rng.random() < 0.4:
            ws[self.rng.randint(1, n - 3)] += ","
        return ws


def build_tokenizer(out_dir: Path, vocab_size: int, seed: int = 0, corpus_sentences: int = 60000):
    """Byte-level BPE (GPT-2 style pre-tokenisation) trained offline on pseudo-text, with the
    ChatML specials, eos = <|im_end|> (ends every assistant turn), pad = <|pad|>, no bos, and
    `CHAT_TEMPLATE`. Saved to out_dir; returns (tokenizer, text source)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    src = TextSource(seed)
    corpus = [" ".join(src.sentence()) for _ in range(corpus_sentences)]
    tk = Tokenizer(models.BPE(unk_token=None))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(corpus, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|pad|>")
    tok.chat_template = CHAT_TEMPLATE
    tok.model_max_length = 1 << 20
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(out_dir)
    return tok, src


def build_model(out_dir: Path, shape: ModelShape, tokenizer, seed: int = 0) -> int:
    """Random-init LlamaForCausalLM of `shape` (vocab = the tokenizer's, padded to `shape.vocab`),
    saved in float32 next to the tokenizer. Returns the parameter count."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab = max(shape.vocab, len(tokenizer))
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
        max_position_embeddings=shape.max_positions, tie_word_embeddings=True, rms_norm_eps=1e-5,
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        use_cache=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).to(torch.float32)
    model.save_pretrained(out_dir, safe_serialization=True)
    return sum(p.numel() for p in model.parameters())


def _word_tokens(tok, src: TextSource, cache: dict, w: str, lead: bool) -> int:
    key = (" " if lead else "") + w
    n = cache.get(key)
    if n is None:
        n = cache[key] = len(tok(key, add_special_tokens=False)["input_ids"])
    return n


def _text_of_tokens(tok, src: TextSource, cache: dict, target: int) -> str:
    """Pseudo-text whose tokenization has about `target` tokens (words are tokenized alone:
    byte-level pre-tokenisation never merges across a leading space)."""
    words: list[str] = []
    n = 0
    while n < target:
        for w in src.sentence():
            if n >= target:
                break
            n += _word_tokens(tok, src, cache, w, lead=bool(words))
            words.append(w)
    return " ".join(words)


def make_conversations(tok, src: TextSource, n_rows: int, min_tokens: int, max_tokens: int,
                       seed: int = 0) -> list[dict]:
    """`messages` rows (optional system, user, assistant; a quarter of them two exchanges) whose
    chat-template token count is uniform in [min_tokens, max_tokens]. Roughly 40% of the tokens
    are prompt, 60% answer."""
    rng = random.Random(seed)
    src.rng = random.Random(seed + 1)
    cache: dict = {}
    rows = []
    while len(rows) < n_rows:
        total = rng.randint(min_tokens, max_tokens)
        turns = 2 if rng.random() < 0.25 else 1
        msgs = []
        if rng.random() < 0.3:
            msgs.append({"role": "system", "content": _text_of_tokens(tok, src, cache, rng.randint(8, 20))})
        overhead = 6 * (2 * turns + len(msgs))  # role markers, newlines, end-of-turn tokens
        body = max(20, total - overhead - (sum(_len(tok, [m]) for m in msgs)))
        for _ in range(turns):
            share = body / turns
            p = max(4, int(share * rng.uniform(0.25, 0.55)))
            msgs.append({"role": "user", "content": _text_of_tokens(tok, src, cache, p)})
            msgs.append({"role": "assistant", "content": _text_of_tokens(tok, src, cache, max(4, int(share) - p))})
        n = _len(tok, msgs)
        if min_tokens <= n <= max_tokens:
            rows.append({"messages": msgs})
    return rows


def _len(tok, msgs) -> int:
    return len(tok(tok.apply_chat_template(msgs, tokenize=False), add_special_tokens=False)["input_ids"])


@dataclass
class Workspace:
    root: Path
    model_dir: Path
    data_path: Path
    shape: ModelShape
    n_params: int
    n_rows: int
    row_tokens: tuple[int, int]
    mean_tokens: float
    mean_trained: float


def build_workspace(root: Path, shape: ModelShape, n_rows: int = 512, min_tokens: int = 100,
                    max_tokens: int = 300, seed: int = 0) -> Workspace:
    """Tokenizer + model in root/model, `messages` rows in root/data.jsonl."""
    root.mkdir(parents=True, exist_ok=True)
    model_dir = root / "model"
    tok, src = build_tokenizer(model_dir, shape.vocab, seed)
    n_params = build_model(model_dir, shape, tok, seed)
    rows = make_conversations(tok, src, n_rows, min_tokens, max_tokens, seed)
    data = root / "data.jsonl"
    with data.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    lens, trained = [], []
    for r in rows[:64]:
        out = tok.apply_chat_template(r["messages"], tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        lens.append(len(out["input_ids"]))
        trained.append(sum(out["assistant_masks"]))
    return Workspace(root, model_dir, data, shape, n_params, n_rows, (min_tokens, max_tokens),
                     statistics.mean(lens), statistics.mean(trained))


# --------------------------------------------------------------------------------------------
# Child processes: one run per process, peak RSS per run
# --------------------------------------------------------------------------------------------


def child_env(threads: int, extra: dict | None = None) -> dict:
    """Environment for a benchmark child: equal thread counts, offline, quiet."""
    env = dict(os.environ)
    env.update({
        "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
        "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "DISABLE_MLFLOW_INTEGRATION": "TRUE",
        "WANDB_DISABLED": "true", "TRANSFORMERS_VERBOSITY": "error", "PYTHONWARNINGS": "ignore",
    })
    env.update(extra or {})
    return env


@dataclass
class ChildResult:
    ok: bool
    data: dict = field(default_factory=dict)
    peak_rss_mib_polled: float = 0.0
    wall_s: float = 0.0
    returncode: int = 0
    log_tail: str = ""


def run_child(argv: list[str], env: dict, timeout: float = 1800, poll_s: float = 0.02,
              cwd: str | os.PathLike | None = None) -> ChildResult:
    """Run `python argv...` in a fresh process. The child writes its JSON report to the file named
    by $BENCH_RESULT (see `child_finish`). The parent polls the RSS of the child and its
    descendants every `poll_s` seconds (psutil) as a cross-check of the child's own VmHWM."""
    import psutil

    with tempfile.TemporaryDirectory(prefix="bench-child-") as td:
        result_path = Path(td) / "result.json"
        log_path = Path(td) / "log.txt"
        env = dict(env, BENCH_RESULT=str(result_path))
        t0 = time.perf_counter()
        with log_path.open("wb") as log:
            proc = subprocess.Popen([sys.executable, *argv], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=cwd)
            ps = psutil.Process(proc.pid)
            peak = 0
            while proc.poll() is None:
                try:
                    rss = ps.memory_info().rss + sum(c.memory_info().rss for c in ps.children(recursive=True))
                    peak = max(peak, rss)
                except psutil.Error:
                    pass
                if time.perf_counter() - t0 > timeout:
                    proc.kill()
                    break
                time.sleep(poll_s)
            proc.wait()
        wall = time.perf_counter() - t0
        tail = log_path.read_text(errors="replace")[-6000:]
        data = json.loads(result_path.read_text()) if result_path.is_file() else {}
        return ChildResult(ok=proc.returncode == 0 and bool(data), data=data, peak_rss_mib_polled=peak / 2**20,
                           wall_s=wall, returncode=proc.returncode, log_tail=tail)


def alternate_sides(cells: list[dict], sides: list[str], repeats: int,
                    launch: Callable[[dict, str, int], tuple[list[str], dict]], summary: Callable[[dict], str],
                    sides_for: Callable[[dict], list[str]] | None = None) -> tuple[list[dict], bool]:
    """The one driver of the side-by-side benchmarks.

    For each cell (the settings one table row compares, e.g. {"variant": "lora"} or {"threads": 2,
    "variant": "packed"}), `repeats` rounds each run every side once, in the given order, each in a
    fresh process (`run_child`): alignkit, TRL, alignkit, TRL, ... Alternating inside a round,
    instead of all runs of one side and then the other, lets both sides see the same drift of the
    machine's load. `sides_for(cell)` restricts the sides of a cell (default: all).

    `launch(cell, side, repeat)` returns the child's (argv, env); `summary(record)` the progress
    line's measurements for a successful run. Returns (records, failed): one record per run,
    the child's JSON report plus the cell's keys, side, repeat, ok, wall_s, peak_rss_mib_polled
    and returncode; failed is True when any run failed (its log tail is printed)."""
    runs: list[dict] = []
    failed = False
    for cell in cells:
        label = " ".join(str(v) for v in cell.values())
        for rep in range(repeats):
            for side in (sides_for(cell) if sides_for else sides):
                argv, env = launch(cell, side, rep)
                res = run_child(argv, env)
                rec = dict(res.data, **cell, side=side, repeat=rep, ok=res.ok, wall_s=res.wall_s,
                           peak_rss_mib_polled=res.peak_rss_mib_polled, returncode=res.returncode)
                runs.append(rec)
                if res.ok:
                    print(f"{label} {side} #{rep + 1}: {summary(rec)}  [{res.wall_s:.0f}s]", file=sys.stderr,
                          flush=True)
                else:
                    failed = True
                    print(f"{label} {side} #{rep + 1}: FAILED (exit {res.returncode})\n{res.log_tail}",
                          file=sys.stderr, flush=True)
    return runs, failed


def run_dir_launch(workdir: str | os.PathLike, argv_of: Callable[[str, str, str], list[str]],
                   env: dict) -> Callable[[dict, str, int], tuple[list[str], dict]]:
    """A `launch` for `alternate_sides` whose child gets its own run folder,
    `workdir/run-<variant>-<side>-<repeat>`: argv_of(side, variant, run_dir) gives its argv."""
    def launch(cell: dict, side: str, rep: int) -> tuple[list[str], dict]:
        v = cell["variant"]
        return argv_of(side, v, str(Path(workdir) / f"run-{v}-{side}-{rep}")), env

    return launch


def current_rss_mib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def peak_rss_mib() -> float:
    """This process's high-water RSS (VmHWM on Linux: ru_maxrss would carry the parent's peak over exec)."""
    from alignkit.training.trainer import peak_rss_mb

    return peak_rss_mb()


class StepClock:
    """Per-optimizer-step timestamps and token counts, recorded inside a child.

    `micro(tokens, trained)` for every micro-batch fed to the model, `step_end()` after every
    optimizer step. `summary(skip)` reports tokens/s over steps skip+1..N: from the end of step
    `skip` to the end of step N, the tokens of those steps (skip=1 leaves out the first step's
    one-off costs: allocator growth, thread-pool start, lazy inits)."""

    def __init__(self):
        self.t_start: float | None = None
        self.c_start: float = 0.0
        self.ends: list[float] = []
        self.cpu_ends: list[float] = []  # process CPU time (all threads) at each step end
        self.tokens: list[int] = [0]
        self.trained: list[int] = [0]
        self.rss_at_start: float = 0.0

    def start(self) -> None:
        if self.t_start is None:
            self.t_start = time.perf_counter()
            self.c_start = time.process_time()
            self.rss_at_start = current_rss_mib()

    def micro(self, tokens: int, trained: int) -> None:
        self.start()
        self.tokens[-1] += int(tokens)
        self.trained[-1] += int(trained)

    def step_end(self) -> None:
        sync()
        self.ends.append(time.perf_counter())
        self.cpu_ends.append(time.process_time())
        self.tokens.append(0)
        self.trained.append(0)

    def summary(self, skip: int = 1) -> dict:
        n = len(self.ends)
        tok, trn = self.tokens[:n], self.trained[:n]
        skip = min(skip, n - 1) if n > 1 else 0
        t0 = self.ends[skip - 1] if skip else self.t_start
        dt = self.ends[-1] - t0
        cpu = self.cpu_ends[-1] - (self.cpu_ends[skip - 1] if skip else self.c_start)
        toks, trained = sum(tok[skip:]), sum(trn[skip:])
        return {
            "steps": n, "timed_steps": n - skip, "timed_s": dt, "tokens": toks, "trained_tokens": trained,
            "tokens_per_s": toks / dt, "trained_tokens_per_s": trained / dt,
            "s_per_step": dt / max(1, n - skip), "cpu_s": cpu, "tokens_per_cpu_s": toks / cpu if cpu else 0.0,
            "load_avg_1m": os.getloadavg()[0], "all_steps_s": self.ends[-1] - self.t_start,
            "all_tokens": sum(tok), "rss_at_train_start_mib": self.rss_at_start,
        }


def trl_clock_callback(clock: "StepClock", values: list, key: str = "loss", after_step=None):
    """A transformers TrainerCallback for the TRL side of a benchmark: starts `clock` with
    training, marks each optimizer step's end (then calls `after_step`, e.g. a memory poll), and
    appends each logged `key` (loss, reward) to `values`."""
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def on_train_begin(self, a, state, control, **kw):
            clock.start()

        def on_step_end(self, a, state, control, **kw):
            clock.step_end()
            if after_step is not None:
                after_step()

        def on_log(self, a, state, control, logs=None, **kw):
            if logs and key in logs:
                values.append(float(logs[key]))

    return Clock()


def child_finish(data: dict) -> None:
    """Write a child's report (plus its own peak RSS) to $BENCH_RESULT."""
    data = dict(data, peak_rss_mib=peak_rss_mib(), rss_at_exit_mib=current_rss_mib())
    torch = sys.modules.get("torch")
    if on_gpu() and torch is not None and torch.cuda.is_available():
        # the device's own peak: what decides the batch size that fits on a GPU
        data.update(peak_gpu_mib=torch.cuda.max_memory_allocated() / 2**20,
                    peak_gpu_reserved_mib=torch.cuda.max_memory_reserved() / 2**20,
                    gpu=torch.cuda.get_device_name(0))
    path = os.environ.get("BENCH_RESULT")
    if path:
        Path(path).write_text(json.dumps(data))
    else:
        print(json.dumps(data, indent=1))


# --------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------


def markdown_table(headers: list[str], rows: list[list]) -> str:
    cells = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(headers), sep] + [line(r) for r in cells])


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else math.nan


def spread(xs: list[float]) -> str:
    """'median (min-max)' for repeated measurements."""
    if not xs:
        return "n/a"
    if len(xs) == 1:
        return f"{xs[0]:,.0f}"
    return f"{med(xs):,.0f} ({min(xs):,.0f}-{max(xs):,.0f})"


def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        m = re.search(r"^Model name:\s*(.+)$", out, re.M)
        if m:
            model = m.group(1).strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        import psutil

        mem = f", {psutil.virtual_memory().total / 2**30:.0f} GiB RAM"
    except ImportError:
        mem = ""
    gpu = ""
    if on_gpu():
        import torch

        props = torch.cuda.get_device_properties(0)
        gpu = f"; GPU: {props.name}, {props.total_memory / 2**30:.0f} GiB, torch {torch.__version__}"
    return f"{model}, {os.cpu_count()} logical cores{mem}, {platform.system()} {platform.release()}{gpu}"


def versions(*names: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    out = [f"python {platform.python_version()}"]
    for n in names:
        try:
            out.append(f"{n} {version(n)}")
        except PackageNotFoundError:
            out.append(f"{n} (not installed)")
    return ", ".join(out)


def choices(text: str, allowed=None, flag: str = "") -> list[str]:
    """A comma-separated option value as a list; with `allowed`, an unknown entry stops the run
    naming the flag and the valid values."""
    picked = [x.strip() for x in str(text).split(",") if x.strip()]
    for x in picked:
        if allowed is not None and x not in allowed:
            raise SystemExit(f"{flag}: unknown {x!r}; use {', '.join(allowed)}")
    return picked


def command_line() -> str:
    """The invocation, as a command a reader can paste (relative to the repository root)."""
    script = Path(sys.argv[0]).resolve()
    try:
        script = script.relative_to(ROOT)
    except ValueError:
        pass
    threads = os.environ.get("OMP_NUM_THREADS")
    prefix = f"OMP_NUM_THREADS={threads} " if threads else ""
    return prefix + "python " + " ".join(shlex.quote(a) for a in [str(script), *sys.argv[1:]])


def write_section(title: str, body: str, path: Path = BENCHMARKS_MD) -> None:
    """Replace the `## {title}` section of BENCHMARKS.md (from its heading to the next `## `
    heading or the end) with `body`; append it when absent; create the file when missing.
    Other sections are left byte for byte as they are."""
    heading = f"## {title}"
    text = path.read_text(encoding="utf-8") if path.exists() else BENCHMARKS_HEADER
    section = f"{heading}\n\n{body.strip()}\n"
    lines = text.splitlines(keepends=True)
    start = next((i for i, ln in enumerate(lines) if ln.rstrip("\n") == heading), None)
    if start is None:
        new = text.rstrip("\n") + "\n\n" + section
    else:
        end = next((j for j in range(start + 1, len(lines)) if lines[j].startswith("## ")), len(lines))
        tail = "".join(lines[end:])
        new = "".join(lines[:start]) + section + ("\n" + tail if tail else "")
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(new, encoding="utf-8")
    os.replace(tmp, path)


def as_dict(obj) -> dict:
    return asdict(obj)
