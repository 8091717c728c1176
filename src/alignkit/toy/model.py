"""The tiny base model of the toy world, pretrained by alignkit's own SFT recipe.

Build, all deterministic given the seed:

1. a byte-level BPE tokenizer trained on toy-world text (`alignkit.toy.tokenizer`);
2. a small Llama (`transformers.LlamaConfig`, tied embeddings) with random weights, saved with
   the tokenizer as an ordinary Hugging Face folder;
3. pretraining on plain-text documents of the task world (`world.pretrain_texts`: expense lists
   with totals in varied phrasings, running sums, addition facts -- never the chat format)
   through `alignkit.recipes.sft.train_sft` with `text` rows (every token trained).

The result is cached under ``platformdirs.user_cache_dir("alignkit")/toy/<key>`` (or
``$ALIGNKIT_CACHE_DIR/toy/<key>``), where the key hashes the preset, the seed and
`BUILD_VERSION`; a cached build is reused. Builds happen in a temporary folder next to the
cache entry and are renamed into place when complete, so a killed build never leaves a
half-written model behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

# Bump when anything that changes the built model changes (data, tokenizer, architecture, training).
BUILD_VERSION = 3  # 3: built with the fused AdamW step

DONE_FILE = "toy_build.json"  # written last: its presence marks a complete build
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors")


@dataclass(frozen=True)
class ModelPreset:
    """Everything that determines a toy base model (with the seed)."""

    # tokenizer
    vocab_size: int = 640
    tokenizer_docs: int = 4000
    # architecture (Llama)
    hidden: int = 128
    layers: int = 4
    heads: int = 4
    intermediate: int = 512
    max_positions: int = 512
    # pretraining (train_sft on `text` rows)
    difficulty: str = "default"
    steps: int = 400
    batch_size: int = 16  # documents per step, about 250 tokens each (world.pretrain_texts)
    docs: int = 0  # pretraining documents; 0: steps x batch_size (one pass)
    max_length: int = 512
    packing: bool = False  # see `pretrain`
    lr: float = 3e-3
    warmup_steps: int = 20
    weight_decay: float = 0.0

    @property
    def n_docs(self) -> int:
        return self.docs or self.steps * self.batch_size


PRESETS: dict[str, ModelPreset] = {
    "default": ModelPreset(),
    # for tests and smoke runs: same tokenizer recipe, a much smaller and shorter build
    "tiny": ModelPreset(tokenizer_docs=1000, hidden=64, layers=2, heads=4, intermediate=256,
                        steps=20, batch_size=8, warmup_steps=2),
}
PRESETS["quick"] = PRESETS["tiny"]


def get_preset(preset: str | ModelPreset) -> ModelPreset:
    if isinstance(preset, ModelPreset):
        return preset
    if preset not in PRESETS:
        raise ValueError(f"unknown toy model preset {preset!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[preset]


def cache_root() -> Path:
    """Where built toy models are kept: $ALIGNKIT_CACHE_DIR/toy, else the user cache dir."""
    env = os.environ.get("ALIGNKIT_CACHE_DIR")
    if env:
        return Path(env).expanduser() / "toy"
    import platformdirs

    return Path(platformdirs.user_cache_dir("alignkit")) / "toy"


def cache_key(preset: str | ModelPreset, seed: int = 0) -> str:
    p = get_preset(preset)
    from alignkit.toy.world import difficulty_dict

    blob = json.dumps({"version": BUILD_VERSION, "seed": int(seed), "preset": asdict(p),
                       "difficulty": difficulty_dict(p.difficulty)}, sort_keys=True)
    name = preset if isinstance(preset, str) else "custom"
    return f"{name}-s{int(seed)}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


def is_built(path: str | os.PathLike) -> bool:
    p = Path(path)
    return (p / DONE_FILE).is_file() and all((p / f).is_file() for f in MODEL_FILES)


# ----------------------------------------------------------------------------------------------
# Pieces
# ----------------------------------------------------------------------------------------------


def make_tokenizer(preset: ModelPreset, seed: int, out_dir: Path):
    from alignkit.toy.tokenizer import build_tokenizer, tokenizer_corpus

    texts = tokenizer_corpus(seed=seed, n=preset.tokenizer_docs, difficulty=preset.difficulty)
    return build_tokenizer(texts, preset.vocab_size, out_dir)


def init_model(tokenizer, preset: ModelPreset, seed: int):
    """A randomly initialised Llama for `tokenizer`, deterministic given the seed."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=preset.hidden,
        intermediate_size=preset.intermediate,
        num_hidden_layers=preset.layers,
        num_attention_heads=preset.heads,
        num_key_value_heads=preset.heads,
        max_position_embeddings=preset.max_positions,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    cpu_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    finally:
        torch.random.set_rng_state(cpu_state)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,  # <|end|>: generation stops at the end of the turn
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )
    return model


def pretrain(init_dir: str | os.PathLike, data: str | os.PathLike, output_dir: str | os.PathLike,
             preset: ModelPreset, seed: int = 0, progress: bool = False) -> Path:
    """Pretrain the model in `init_dir` on the `text` rows of `data` with alignkit's SFT recipe
    (plain `text` rows: every token trained); the trained model lands in `output_dir`.

    Rows are whole documents of nearly equal length (~250 tokens), batched with right padding.
    Packing is off by default: on CPU, one packed row of ~4000 tokens is attended with a dense
    block-diagonal mask and measured 2-3x slower per token than 16 padded rows."""
    from alignkit.recipes.sft import SFTConfig, train_sft

    cfg = SFTConfig(
        model=str(init_dir), data=str(data), output_dir=str(output_dir), max_steps=preset.steps,
        batch_size=preset.batch_size, grad_accum=1, lr=preset.lr, warmup_steps=preset.warmup_steps,
        schedule="cosine", weight_decay=preset.weight_decay, adam_betas=(0.9, 0.95), max_length=preset.max_length,
        packing=preset.packing, seed=seed, progress=progress, tensorboard=False, save_every=0,
        log_every=max(1, preset.steps // 10), overwrite=True, dtype="float32",
    )
    train_sft(cfg)
    return Path(output_dir)


# ----------------------------------------------------------------------------------------------
# Build + cache
# ----------------------------------------------------------------------------------------------


def _log(msg: str) -> None:
    from alignkit.training.logging import say

    say(f"[toy] {msg}")  # above any progress bar, never on its line


def _build_into(work: Path, final: Path, preset: ModelPreset, seed: int, progress: bool,
                log: Callable[[str], None]) -> None:
    """Build in `work` (scratch) and leave the finished model files in `final` (a fresh folder)."""
    from alignkit.toy import world

    t0 = time.time()
    init_dir, data_path, run_dir = work / "init", work / "pretrain.jsonl", work / "run"
    tok = make_tokenizer(preset, seed, init_dir)
    model = init_model(tok, preset, seed)
    model.save_pretrained(init_dir, safe_serialization=True)
    n_params = sum(p.numel() for p in model.parameters())
    del model
    docs = world.pretrain_texts(preset.n_docs, seed=seed, difficulty=preset.difficulty)
    world.write_jsonl(docs, data_path)
    log(f"tokenizer ({len(tok)} tokens) + model ({n_params / 1e6:.2f}M parameters) ready in {time.time() - t0:.1f}s; "
        f"pretraining {preset.steps} steps on {len(docs)} documents")
    t1 = time.time()
    pretrain(init_dir, data_path, run_dir, preset, seed=seed, progress=progress)
    pretrain_s = time.time() - t1
    final.mkdir(parents=True, exist_ok=True)
    for f in run_dir.iterdir():
        if f.is_file() and f.suffix in (".json", ".safetensors", ".jinja", ".txt", ".model"):
            shutil.copy2(f, final / f.name)
    if (run_dir / "metrics.jsonl").is_file():
        shutil.copy2(run_dir / "metrics.jsonl", final / "pretrain_metrics.jsonl")
    info = {
        "build_version": BUILD_VERSION, "seed": seed, "preset": asdict(preset), "parameters": n_params,
        "vocab_size": len(tok), "pretrain_seconds": round(pretrain_s, 1), "build_seconds": round(time.time() - t0, 1),
    }
    (final / DONE_FILE).write_text(json.dumps(info, indent=2), encoding="utf-8")
    log(f"built in {time.time() - t0:.0f}s (pretraining {pretrain_s:.0f}s)")


def _build_locked(entry: Path, p: ModelPreset, seed: int, progress: bool, log: Callable[[str], None]) -> None:
    """Build into a scratch folder beside `entry`, then rename it into place (caller holds the lock)."""
    work = Path(tempfile.mkdtemp(prefix=f".{entry.name}.build-", dir=entry.parent))
    try:
        log(f"building the toy base model ({entry.name}) in {entry.parent}")
        staged = work / "final"
        from alignkit.training.logging import library_bars_off

        with library_bars_off():  # alignkit's pretraining bar is the one to watch
            _build_into(work, staged, p, seed, progress, log)
        if entry.exists():
            shutil.rmtree(entry)  # a stale or forced-out entry
        os.replace(staged, entry)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def build_info(path: str | os.PathLike) -> dict:
    """What a built toy model's build recorded (toy_build.json): build_seconds, pretrain_seconds,
    parameters, ...; {} when absent."""
    f = Path(path) / DONE_FILE
    try:
        return json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _atomic_copytree(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    try:
        from alignkit.toy.world import current_umask

        tmp.chmod(0o777 & ~current_umask())  # mkdtemp makes it 0700; the copy is an ordinary folder
        for f in src.iterdir():
            if f.is_file():
                shutil.copy2(f, tmp / f.name)
        if dst.exists():
            shutil.rmtree(dst)
        os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def build_base_model(output_dir: str | os.PathLike | None = None, seed: int = 0, preset: str | ModelPreset = "default",
                     *, force: bool = False, progress: bool = True,
                     log: Callable[[str], None] | None = _log, **overrides) -> Path:
    """Build (or reuse) the toy base model and return its folder.

    output_dir: None -> the cache entry itself is returned; a path -> the model is also copied
        there (atomically) and that path is returned.
    seed: seeds the tokenizer corpus, the initial weights, the pretraining data and its order.
    preset: "default" (the calibrated model, a few minutes on 2 CPU cores) or "tiny"/"quick"
        (seconds; for tests), or a `ModelPreset`.
    overrides: ModelPreset fields to change (e.g. steps=100); they are part of the cache key.
    force: rebuild even when a cached build exists.
    progress: a pretraining progress bar on a terminal, periodic plain lines in a log.

    Builds of the same cache entry are serialised by a file lock (`<entry>.lock` beside it): a
    second process waits with a message, then reuses the first one's model.
    """
    p = get_preset(preset)
    if overrides:
        try:
            changed = replace(p, **overrides)
        except TypeError as e:
            raise ValueError(f"unknown toy model preset field in {sorted(overrides)}: {e}") from None
        if changed != p:
            p = preset = changed
    log = log or (lambda _msg: None)
    entry = cache_root() / cache_key(preset, seed)
    if force or not is_built(entry):
        from filelock import FileLock, Timeout

        entry.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(entry.parent / f"{entry.name}.lock"))
        waited = False
        try:
            lock.acquire(timeout=0)
        except Timeout:
            waited = True
            log(f"another process is building this toy base model ({entry.name}); waiting for it to finish, "
                "then reusing it")
            lock.acquire()
        try:
            # a build that finished while we waited is reused, even with force (it is brand new)
            if not is_built(entry) or (force and not waited):
                _build_locked(entry, p, seed, progress, log)
            elif waited:
                log(f"reusing the model the other process built: {entry}")
        finally:
            lock.release()
    if output_dir is None:
        return entry
    out = Path(output_dir)
    _atomic_copytree(entry, out)
    return out
