"""Where a model's weights come from under data parallelism, decided while loading it.

`resolve_mode` picks none / DDP / FSDP for a run; under FSDP, ranks other than 0 build the model
on the meta device (`empty_model_for_fsdp`) and receive their shards from rank 0 in
`alignkit.training.fsdp.FSDPModel`, so only one process reads the weights. These live below
`training` because `models.peft.load_base_model` needs them to load a recipe's base model.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from alignkit.errors import UserError
from alignkit.models.load import DTYPES, hf_load_kwargs

__all__ = ["total_params", "resolve_mode", "empty_model_for_fsdp", "meta_model", "check_fsdp_config"]


def total_params(model: torch.nn.Module) -> int:
    """Number of parameter elements of `model` (shared tensors counted once), trainable or not."""
    return sum(p.numel() for p in model.parameters())


def resolve_mode(cfg, world: int, model: torch.nn.Module) -> str:
    """'none' | 'ddp' | 'fsdp' for `cfg.distributed` with `world` processes."""
    mode = cfg.distributed
    if world <= 1:
        return "none"
    if mode == "none":
        raise UserError(f"distributed=none, but {world} processes were started; use distributed=ddp or "
                        "distributed=fsdp, or start one process")
    if mode == "auto":
        if cfg.peft.method in ("qlora", "prefix", "prompt"):
            return "ddp"
        return "fsdp" if total_params(model) >= cfg.fsdp.auto_min_params else "ddp"
    return mode


def empty_model_for_fsdp(cfg, dtype: str = "float32") -> torch.nn.Module | None:
    """On ranks other than 0 of a run that will use FSDP: the model built on the meta device (no
    memory, no reading of the weights); `FSDPModel` fills its shards from rank 0. None otherwise
    (load as usual). Each process would otherwise hold the whole float32 model in CPU memory before
    sharding: 8 x 282 GB on a node for a 70B model."""
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    if world <= 1 or rank == 0 or getattr(cfg, "distributed", "none") not in ("fsdp", "auto"):
        return None
    model = meta_model(cfg.model, dtype)
    if model is None or resolve_mode(cfg, world, model) != "fsdp":
        return None
    return model


def meta_model(name_or_path: str, dtype: str = "float32") -> torch.nn.Module | None:
    """The causal LM of `name_or_path`'s config on the meta device (shapes only), or None when it
    cannot be built that way (the normal loading path then reports any problem)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(os.path.expanduser(name_or_path))
    if (path / "adapter_config.json").is_file():  # an adapter folder: peft loads it onto its base
        return None
    try:
        trust = hf_load_kwargs(path)
        config = AutoConfig.from_pretrained(str(path) if path.exists() else name_or_path, **trust)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, dtype=DTYPES.get(dtype, torch.float32), **trust)
    except Exception:
        return None


def check_fsdp_config(cfg) -> None:
    """Refuse settings FSDP2 cannot run, before anything is loaded: QLoRA's 4-bit weights, prompt
    learning adapters, float16 (no loss scaling under FSDP). Raises UserError naming the fix."""
    method = cfg.peft.method
    if method == "qlora":
        raise UserError("distributed=fsdp with peft.method=qlora: bitsandbytes 4-bit weights cannot be sharded "
                        "by FSDP2; use distributed=ddp (each GPU holds the 4-bit base) or peft.method=lora")
    if method in ("prefix", "prompt"):
        raise UserError(f"distributed=fsdp with peft.method={method}: prompt-learning adapters are not supported "
                        "under FSDP; use distributed=ddp or peft.method=lora")
    if cfg.dtype == "float16":
        raise UserError("distributed=fsdp with dtype=float16: float16 needs loss scaling, which alignkit does "
                        "not run under FSDP; use dtype=bfloat16 or dtype=float32")
