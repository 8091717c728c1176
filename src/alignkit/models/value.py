"""Critics (value models) for PPO: a linear value head on the last hidden state, per token.

    V(x, y_<k) = w · h_t + b        h_t = final hidden state (final norm applied) at position t,
                                    the position that predicts token y_k

so values line up with the per-token log-probs of `alignkit.ops.causal_lm_token_logps` and the
`completion_mask` of a rollout batch: entry t holds the value of the state in which y_k is chosen.

Two layouts (config key `critic`):

* `ValueModel` (critic=separate): a backbone of its own (a transformer decoder, no LM head) plus
  the head, trained in full. Initialised from the starting policy (head zero: V = 0 everywhere
  at first) or from a reward model (its backbone and, for a scalar model, its head: V starts as
  the reward model's score of every prefix).
* `AdapterValueModel` (critic=shared_base): a second LoRA adapter named "critic" on the policy's
  own frozen base, plus the head. Policy (adapter "default"), reference (adapters off) and critic
  (adapter "critic") then share one copy of the base weights.

The PPO recipe trains a critic through a second `alignkit.training.trainer.Trainer` (same
accumulation, clipping, precision and divergence stop as the policy); `weights()` /
`load_weights()` carry it in the policy trainer's checkpoints. Under FSDP a `ValueModel` is
sharded like the policy (its backbone's blocks one group each, embeddings, norm and head the
root group) and its checkpoints go through torch.distributed.checkpoint instead (see
`alignkit.recipes.ppo.register_critic_state`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path
from typing import Callable

import torch

from alignkit.errors import UserError

__all__ = [
    "ValueHead",
    "ValueModel",
    "AdapterValueModel",
    "CRITIC_ADAPTER",
    "is_reward_model_folder",
    "load_value_model",
    "empty_value_model",
    "load_critic_weights",
]

CRITIC_ADAPTER = "critic"
HEAD_FILE = "value_head.safetensors"
CONFIG_FILE = "value_config.json"


class ValueHead(torch.nn.Module):
    """Linear (H -> 1) read per token, computed in float32. Zero-initialised unless weights are
    given (a zero head is OpenAI's choice in lm-human-preferences: every value starts at 0)."""

    def __init__(self, hidden_size: int, weight: torch.Tensor | None = None, bias: float = 0.0):
        super().__init__()
        self.linear = torch.nn.Linear(hidden_size, 1, dtype=torch.float32)
        with torch.no_grad():
            if weight is None:
                self.linear.weight.zero_()
            else:
                self.linear.weight.copy_(weight.reshape(1, hidden_size).float())
            self.linear.bias.fill_(float(bias))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (B, T, H) -> values (B, T) float32."""
        # float32 even under bf16 autocast, and under FSDP mixed precision (which hands the head
        # its gathered weights in the compute dtype)
        with torch.autocast(hidden.device.type, enabled=False):
            w, b = self.linear.weight, self.linear.bias
            # a tensor of its own, not a view: FSDP warns that in-place ops on a view returned by
            # a sharded module (the critic's output) would skip its pre-backward hook
            return torch.nn.functional.linear(hidden.float(), w.float(), b.float()).squeeze(-1).clone()


def _last_hidden(decoder, input_ids, attention_mask, position_ids) -> torch.Tensor:
    out = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def hidden_size_of(module) -> int:
    """The hidden size of a transformers model (its text config's hidden_size / n_embd / d_model);
    UserError when it has none."""
    config = getattr(module, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    size = getattr(text, "hidden_size", None) or getattr(text, "n_embd", None) or getattr(text, "d_model", None)
    if not size:
        raise UserError(f"{type(module).__name__}: cannot tell its hidden size for the value head")
    return int(size)


class ValueModel(torch.nn.Module):
    """A separate critic: `backbone` (decoder returning hidden states) + `head`. forward -> (B, T)."""

    def __init__(self, backbone: torch.nn.Module, head: ValueHead, source: str = ""):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.source = source

    def forward(self, input_ids, attention_mask=None, position_ids=None) -> torch.Tensor:
        """(B, T) token ids -> V (B, T) float32, entry t = value of the state predicting token t + 1."""
        return self.head(_last_hidden(self.backbone, input_ids, attention_mask, position_ids))

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """Every parameter that requires grad (the whole backbone and the head)."""
        return [p for p in self.parameters() if p.requires_grad]

    def active(self):
        """Context for a forward + backward of the critic (nothing to switch for a separate model)."""
        return contextlib.nullcontext()

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        """Activation checkpointing in the backbone's blocks (non-reentrant; the kwargs the trainer
        passes are accepted for the transformers-style signature)."""
        from alignkit.models.generation import enable_activation_checkpointing

        enable_activation_checkpointing(self.backbone)

    def weights(self) -> dict:
        """CPU copy of the state dict (for the trainer's checkpoints)."""
        return {k: v.detach().cpu() for k, v in self.state_dict().items()}

    def load_weights(self, sd: dict) -> None:
        """Load what `weights` returned."""
        self.load_state_dict(sd)

    def save_pretrained(self, out_dir: str | os.PathLike, state_dict: dict | None = None) -> None:
        """backbone as a transformers folder (loads with AutoModel) + value_head.safetensors.
        `state_dict`: this module's full weights (keys backbone.* and head.*) to write instead of
        its own, e.g. gathered from FSDP shards (`FSDPModel.full_state_dict`)."""
        from safetensors.torch import save_file

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        if state_dict is None:
            backbone_sd, head_sd = None, self.head.state_dict()
        else:
            backbone_sd = {k[len("backbone."):]: v for k, v in state_dict.items() if k.startswith("backbone.")}
            head_sd = {k[len("head."):]: v for k, v in state_dict.items() if k.startswith("head.")}
        self.backbone.save_pretrained(out, safe_serialization=True, state_dict=backbone_sd)
        save_file({k: v.detach().cpu().contiguous() for k, v in head_sd.items()}, str(out / HEAD_FILE))
        (out / CONFIG_FILE).write_text(json.dumps({"layout": "separate", "source": self.source}), encoding="utf-8")


@contextlib.contextmanager
def use_adapter(model, name: str):
    """Make adapter `name` of a peft model the active one inside the block (peft also makes only
    the active adapter require grad); the previous adapter is active again afterwards."""
    prev = model.active_adapter
    if prev == name:
        yield
        return
    model.set_adapter(name)
    try:
        yield
    finally:
        model.set_adapter(prev)


class AdapterValueModel(torch.nn.Module):
    """critic=shared_base: adapter "critic" on the policy's base + a value head.

    The policy is held by reference, not as a submodule, so this module's own parameters are the
    head only; `trainable_parameters()` adds the critic adapter's weights."""

    def __init__(self, policy, head: ValueHead):
        super().__init__()
        from alignkit.ops.logprobs import split_causal_lm

        object.__setattr__(self, "_policy", policy)
        self.head = head
        parts = split_causal_lm(policy)
        if parts is None:
            raise UserError("critic=shared_base: the policy cannot be split into decoder and head; use critic=separate")
        object.__setattr__(self, "_decoder", parts[0])
        self._rx = re.compile(rf"\.{re.escape(CRITIC_ADAPTER)}(\.|$)")

    def forward(self, input_ids, attention_mask=None, position_ids=None) -> torch.Tensor:
        """(B, T) token ids -> V (B, T) float32 through the base with adapter "critic" active."""
        with use_adapter(self._policy, CRITIC_ADAPTER):
            return self.head(_last_hidden(self._decoder, input_ids, attention_mask, position_ids))

    def active(self):
        """Context for a forward + backward of the critic: adapter "critic" active (and, as peft
        does, the only one requiring grad) until the block ends. The backward pass must run inside
        it: autograd drops the gradient of a leaf whose requires_grad was switched off."""
        return use_adapter(self._policy, CRITIC_ADAPTER)

    def adapter_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        """(name, parameter) of the critic adapter's weights inside the policy."""
        return [(n, p) for n, p in self._policy.named_parameters() if self._rx.search(n)]

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """The critic adapter's weights and the head's (not module parameters of this object)."""
        return [p for _, p in self.adapter_parameters()] + list(self.head.parameters())

    def weights(self) -> dict:
        """CPU copies of the adapter weights (adapter.*) and the head (head.*)."""
        sd = {f"adapter.{n}": p.detach().cpu() for n, p in self.adapter_parameters()}
        sd.update({f"head.{k}": v.detach().cpu() for k, v in self.head.state_dict().items()})
        return sd

    def load_weights(self, sd: dict) -> None:
        """Load what `weights` returned; UserError when the adapter layout differs."""
        params = dict(self.adapter_parameters())
        with torch.no_grad():
            for k, v in sd.items():
                if k.startswith("adapter."):
                    name = k[len("adapter."):]
                    if name not in params:
                        raise UserError(f"checkpoint critic adapter has {name}, which this run's adapter lacks; "
                                        "resume with the same peft.* keys")
                    params[name].copy_(v)
        self.head.load_state_dict({k[len("head."):]: v for k, v in sd.items() if k.startswith("head.")})

    def save_pretrained(self, out_dir: str | os.PathLike) -> None:
        """The adapter as a peft folder (adapter_model.safetensors + adapter_config.json) + the head."""
        from safetensors.torch import save_file

        import shutil

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        staging = out / "_peft"
        self._policy.save_pretrained(staging, selected_adapters=[CRITIC_ADAPTER], safe_serialization=True)
        for f in (staging / CRITIC_ADAPTER).iterdir():
            os.replace(f, out / f.name)
        shutil.rmtree(staging, ignore_errors=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.head.state_dict().items()}, str(out / HEAD_FILE))
        (out / CONFIG_FILE).write_text(json.dumps({"layout": "shared_base"}), encoding="utf-8")


# --------------------------------------------------------------------------- building a critic


def is_reward_model_folder(path: str) -> bool:
    """True for a folder written by `alignkit rm` (or any single-output sequence-classification model)."""
    p = Path(os.path.expanduser(str(path)))
    if not p.is_dir():
        return False
    if (p / "reward_config.json").is_file():
        return True
    conf = p / "config.json"
    if not conf.is_file():
        return False
    try:
        c = json.loads(conf.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    archs = c.get("architectures") or []
    return "alignkit_reward" in c or any(str(a).endswith("ForSequenceClassification") for a in archs)


def _same_vocab(tok_a, tok_b) -> bool:
    return tok_a is None or tok_b is None or tok_a.get_vocab() == tok_b.get_vocab()


def load_value_model(source: str, path: str, tokenizer=None, log: Callable[[str], None] | None = None) -> ValueModel:
    """A separate critic. source="policy": backbone of the causal LM at `path`, zero head.
    source="reward": backbone of the reward model at `path`, its head when scalar (a
    distributional head cannot serve as one value: zero head then). The reward model's tokenizer
    must equal the policy's (`tokenizer`), since the critic reads the policy's token ids."""
    say = log or (lambda s: None)
    if source == "reward":
        from alignkit.models.load import load_tokenizer
        from alignkit.models.reward import RewardModel, reward_parts

        if not _same_vocab(load_tokenizer(path), tokenizer):
            raise UserError(f"critic_init: the reward model {path} uses another tokenizer than the policy, so it "
                            "cannot read the policy's tokens; use critic_init=policy")
        rm = RewardModel.from_pretrained(path)
        backbone, score = reward_parts(rm.model)
        H = hidden_size_of(rm.model)
        w = score.weight.detach() if rm.spec.kind == "scalar" and score.weight.shape[0] == 1 else None
        b = float(score.bias.detach()[0]) if w is not None and getattr(score, "bias", None) is not None else 0.0
        if w is None:
            say(f"critic: {path} is a distributional reward model; its backbone is used, the value head starts at 0")
        backbone.train()
        for p in backbone.parameters():
            p.requires_grad_(True)
        return ValueModel(backbone, ValueHead(H, w, b), source=f"reward:{path}")
    from alignkit.models.load import load_model

    lm = load_model(path)
    if hasattr(lm, "merge_and_unload"):  # an adapter folder: its merged weights
        lm = lm.merge_and_unload()
    return ValueModel(_trained_decoder(lm, path), ValueHead(hidden_size_of(lm)), source=f"policy:{path}")


def _trained_decoder(lm, path: str) -> torch.nn.Module:
    """The decoder (no LM head) of causal LM `lm`, every parameter requiring grad."""
    try:
        backbone = lm.get_decoder()
    except (AttributeError, NotImplementedError):
        backbone = getattr(lm, getattr(lm, "base_model_prefix", "model"), None)
    if backbone is None or backbone is lm:
        raise UserError(f"{path}: cannot take the decoder out of {type(lm).__name__} for the critic")
    backbone.config = getattr(backbone, "config", lm.config)
    for p in backbone.parameters():
        p.requires_grad_(True)
    return backbone


def empty_value_model(path: str) -> ValueModel | None:
    """The critic `load_value_model("policy", path)` builds, on the meta device (shapes only, no
    memory, nothing read): for the processes other than rank 0 of an FSDP run, whose shards
    `alignkit.training.fsdp.FSDPModel` fills from rank 0's weights. None when the model cannot be
    built that way (an adapter folder, say); load it then."""
    from alignkit.models.sharding import meta_model

    lm = meta_model(path)
    if lm is None:
        return None
    with torch.device("meta"):
        head = ValueHead(hidden_size_of(lm))
    return ValueModel(_trained_decoder(lm, path), head, source=f"policy:{path}")


def load_critic_weights(path: str | os.PathLike) -> dict:
    """The value head saved by `save_pretrained` (for tools that rebuild a critic)."""
    from safetensors.torch import load_file

    return load_file(str(Path(path) / HEAD_FILE))
