"""What a saved model needs so that plain `transformers` generation stops where it was trained to,
and the current names of transformers APIs that were renamed.

A model learns to end an assistant turn with the token its chat template writes there. When that
token is not the tokenizer's eos (Llama-3 style: turns end with `<|eot_id|>`, eos is
`<|end_of_text|>`), `AutoModelForCausalLM.generate()` would stop only at eos and run on to
`max_new_tokens`. `write_generation_config` therefore lists every stop token in the saved
`generation_config.json`, the template's end-of-turn token first.
"""

from __future__ import annotations

from pathlib import Path


def _base(model):
    model = getattr(model, "module", model)  # DDP
    return model.get_base_model() if hasattr(model, "get_base_model") else model  # peft


def write_generation_config(out_dir: str | Path, tokenizer, model=None) -> list[int] | None:
    """Write `out_dir/generation_config.json` with `eos_token_id` = `stop_token_ids(tokenizer)`
    (end-of-turn first, then eos), and pad/bos from the tokenizer where the config has none.

    Starts from the model's own generation config (sampling defaults are kept), else the file
    already in `out_dir`, else transformers' defaults. Models that cannot generate (reward and
    value models) get nothing. Returns the stop ids written, or None when nothing was written."""
    from transformers import GenerationConfig

    from alignkit.data.chat import stop_token_ids

    if tokenizer is None:
        return None
    out_dir = Path(out_dir)
    base = _base(model) if model is not None else None
    if base is not None:
        can = getattr(base, "can_generate", None)
        if callable(can) and not can():
            return None
    ids = stop_token_ids(tokenizer)
    if not ids:
        return None
    gc = getattr(base, "generation_config", None) if base is not None else None
    if gc is not None:
        gc = GenerationConfig.from_dict(gc.to_dict())
    elif (out_dir / "generation_config.json").is_file():
        gc = GenerationConfig.from_pretrained(out_dir)
    else:
        gc = GenerationConfig()
    gc.eos_token_id = ids if len(ids) > 1 else ids[0]
    # A config marked as derived from the model config may be rebuilt from it at generate time,
    # which would drop the end-of-turn id; this file is the authority now.
    gc._from_model_config = False
    if gc.pad_token_id is None and tokenizer.pad_token_id is not None:
        gc.pad_token_id = int(tokenizer.pad_token_id)
    if gc.bos_token_id is None and tokenizer.bos_token_id is not None:
        gc.bos_token_id = int(tokenizer.bos_token_id)
    out_dir.mkdir(parents=True, exist_ok=True)
    gc.save_pretrained(out_dir)
    return ids


def enable_activation_checkpointing(model) -> None:
    """Recompute activations in backward (non-reentrant), through the current transformers name
    (`activation_checkpointing_enable`) where it exists, the older one otherwise; the older name
    emits a FutureWarning on transformers 5.x."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
