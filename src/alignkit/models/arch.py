"""What a loaded model is made of: the wrappers around it, whether it carries a `peft` adapter,
and its stack of transformer blocks.

The lowest module of `alignkit.models`: loading (`models.load`), adapters (`models.peft`) and
sharding (`training.fsdp`) all ask these questions, so the answers live here and import nothing
from alignkit.
"""

from __future__ import annotations

import contextlib
import sys
import warnings

import torch

from alignkit.errors import UserError

__all__ = ["unwrap", "is_peft_model", "transformer_blocks", "quiet_peft"]


def unwrap(model):
    """The model inside a DistributedDataParallel wrapper and/or the trainer's forward wrapper
    (`alignkit.training.trainer._Forward`, matched by name so this module stays below training)."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module
    if type(model).__name__ == "_Forward":
        model = model.model
    return model


def is_peft_model(model) -> bool:
    """True when `model` (possibly wrapped, see `unwrap`) is a `peft.PeftModel`. Never imports
    peft: a model can only be a PeftModel when peft is already loaded."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(unwrap(model), peft.PeftModel)


@contextlib.contextmanager
def quiet_peft():
    """Silence the FutureWarning that peft 0.21 triggers on every wrap / load by calling a
    transformers method deprecated in 5.x: it is not the user's concern."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def transformer_blocks(model) -> tuple[str, torch.nn.ModuleList]:
    """(qualified name, ModuleList) of the model's stack of transformer blocks: the module list
    whose length is the config's number of layers (e.g. `model.layers` in Llama, `transformer.h`
    in GPT-2); of a PeftModel, its base model's stack.

    Raises UserError when the model has no non-empty ModuleList (nothing to restrict or shard)."""
    base = model.get_base_model() if is_peft_model(model) else model
    config = getattr(base, "config", None)
    n = None
    if config is not None:
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        n = getattr(text, "num_hidden_layers", None) or getattr(text, "n_layer", None)
    lists = [(name, m) for name, m in base.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m) > 0]
    if n is not None:
        lists = [(name, m) for name, m in lists if len(m) == n] or lists
    if not lists:
        raise UserError(f"{type(base).__name__}: found no stack of transformer blocks; use train_modules=REGEX instead")
    # Outermost first: the decoder's list, not a list nested inside a block.
    return min(lists, key=lambda nm: (nm[0].count("."), -len(nm[1])))
