"""Which rollout engine a run samples with: alignkit's own, vLLM in-process, or a vLLM server.

`build_engine(cfg, tokenizer, model_path)` reads an online config's `rollout_engine` and
`vllm.*` keys (see docs/vllm.md); everything vLLM is imported only when it is chosen.
"""

from __future__ import annotations

from pathlib import Path

import torch

from alignkit.rollout.engine import RolloutEngine, SamplingParams
from alignkit.rollout.vllm_engine import VLLMEngine, check_engine_config

__all__ = ["build_engine"]


def build_engine(cfg, tokenizer, model_path: str, sampling: SamplingParams | None = None,
                 stop_token_ids: set[int] | None = None) -> RolloutEngine:
    """The rollout engine a config asks for: alignkit's `RolloutEngine`, a `VLLMServerEngine`
    (vllm.mode=server: the server must answer), or a `VLLMEngine` on `model_path` with the
    config's vllm.* settings (dtype auto = the training dtype, float32 on
    CPU; vllm.max_model_len: default the model's context). See `check_engine_config` for the errors."""
    if check_engine_config(cfg) != "vllm":
        return RolloutEngine(tokenizer, stop_token_ids)
    v = cfg.vllm
    if v.mode == "server":
        from alignkit.rollout.vllm_server import VLLMServerEngine

        sync_dir = v.sync_dir or str(Path(cfg.output_dir) / "vllm_sync")
        return VLLMServerEngine(tokenizer, v.host, v.port, sync_dir, timeout=v.timeout, bucket_mb=v.sync_bucket_mb,
                                stop_token_ids=stop_token_ids)
    dtype = v.dtype
    if dtype == "auto":
        dtype = cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if torch.cuda.is_available() else "float32")
    return VLLMEngine(tokenizer, model_path, dtype=dtype, seed=cfg.seed, sampling=sampling,
                      max_model_len=v.max_model_len, gpu_memory_utilization=v.gpu_memory_utilization,
                      kv_cache_gb=v.kv_cache_gb, enable_sleep_mode=v.enable_sleep_mode, bucket_mb=v.sync_bucket_mb,
                      stop_token_ids=stop_token_ids)
