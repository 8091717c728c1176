"""Load and save Hugging Face models and tokenizers: hub ids and local folders share one path."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from alignkit.errors import UserError
from alignkit.models.arch import quiet_peft

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _check_source(name_or_path: str) -> None:
    if not name_or_path:
        raise UserError("no model given; pass model=HUB_ID or model=PATH")
    p = Path(os.path.expanduser(name_or_path))
    if p.exists() and not (p / "config.json").is_file():
        if (p / "adapter_config.json").is_file():
            return
        raise UserError(f"{name_or_path}: not a model folder (no config.json); point model= at a saved model")


def load_tokenizer(name_or_path: str):
    """The tokenizer of a hub id or local folder, with a pad token set (eos, else unk, when it has
    none: padding is always masked, so any id serves). Raises UserError for a folder that holds
    no model or a tokenizer that cannot be loaded."""
    from transformers import AutoTokenizer

    _check_source(name_or_path)
    try:
        tok = AutoTokenizer.from_pretrained(os.path.expanduser(name_or_path))
    except Exception as e:
        raise UserError(f"{name_or_path}: could not load a tokenizer ({_first_line(e)})") from None
    if tok.pad_token_id is None:
        # Padding is masked everywhere, so any id serves; eos is the usual choice.
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    return tok


def load_model(name_or_path: str, dtype: str = "float32", device: str | torch.device = "cpu", **kwargs):
    """A causal LM in `dtype` ("float32", "bfloat16", "float16"; anything else is float32) on
    `device`, from a hub id or a local folder through the same path. An adapter folder
    (adapter_config.json) is loaded onto its recorded base as a peft model. `kwargs` go to
    `from_pretrained` (e.g. quantization_config). Raises UserError, one line, when nothing is
    named, the folder holds no model, or transformers / peft cannot load it."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress display owns the terminal
    _check_source(name_or_path)
    path = os.path.expanduser(name_or_path)
    torch_dtype = DTYPES.get(dtype, torch.float32)
    try:
        if (Path(path) / "adapter_config.json").is_file():
            from peft import AutoPeftModelForCausalLM

            with quiet_peft():
                model = AutoPeftModelForCausalLM.from_pretrained(path, dtype=torch_dtype, **kwargs)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, **kwargs)
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"{name_or_path}: could not load a causal language model ({_first_line(e)})") from None
    return model.to(device)


def save_pretrained(model, tokenizer, out_dir: str | Path, state_dict: dict | None = None) -> None:
    """Save in Hugging Face format (safetensors) so plain transformers loads it. `state_dict`:
    the full weights when the model itself holds shards (FSDP)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # no "Writing model shards" bar inside our own progress display
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = getattr(model, "module", model)  # unwrap DDP
    kw = {"state_dict": state_dict} if state_dict is not None else {}
    model.save_pretrained(out_dir, safe_serialization=True, **kw)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
        from alignkit.models.generation import write_generation_config

        write_generation_config(out_dir, tokenizer, model)  # stop at the end of a turn, not only at eos


def _first_line(e: Exception) -> str:
    s = str(e).strip()
    return (s.splitlines()[0] if s else type(e).__name__)[:300]
