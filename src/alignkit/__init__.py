"""alignkit: post-training for causal language models.

    from alignkit import SFTConfig, train_sft
    train_sft(SFTConfig(model="HuggingFaceTB/SmolLM2-135M", data="train.jsonl", output_dir="runs/sft"))
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# Public names, imported on first use so that `import alignkit` stays cheap.
_LAZY = {
    "SFTConfig": "alignkit.config",
    "TrainConfig": "alignkit.config",
    "load_config": "alignkit.config",
    "train_sft": "alignkit.recipes.sft",
    "RMConfig": "alignkit.config",
    "train_rm": "alignkit.recipes.rm",
    "RewardModel": "alignkit.models.reward",
    "DPOConfig": "alignkit.config",
    "train_dpo": "alignkit.recipes.dpo",
    "EvalConfig": "alignkit.config",
    "RewardSection": "alignkit.config",
    "evaluate": "alignkit.eval.run",
    "build_reward": "alignkit.rewards",
    "load_prompt_set": "alignkit.rewards",
    "load_gsm8k": "alignkit.rewards",
    "PPOConfig": "alignkit.config",
    "train_ppo": "alignkit.recipes.ppo",
    "OnlineDPOConfig": "alignkit.config",
    "train_online_dpo": "alignkit.recipes.online_dpo",
    "DistillConfig": "alignkit.config",
    "train_distill": "alignkit.recipes.distill",
    "UserError": "alignkit.errors",
    "load_model": "alignkit.models",
    "load_tokenizer": "alignkit.models",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'alignkit' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))


__all__ = list(_LAZY) + ["__version__"]
