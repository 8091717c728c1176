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

`CriticOptimizer` is the critic's own AdamW with the trainer's schedule shape, global
normalisation over micro-batches and processes, gradient clipping, and a state dict (weights
included) that the PPO recipe registers with the trainer's checkpoints.
"""

from __future__ import annotations

import contextlib
import json
import math
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
    "CriticOptimizer",
    "CRITIC_ADAPTER",
    "is_reward_model_folder",
    "load_value_model",
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
        with torch.autocast(hidden.device.type, enabled=False):  # float32 even under bf16 autocast
            return self.linear(hidden.float()).squeeze(-1)


def _last_hidden(decoder, input_ids, attention_mask, position_ids) -> torch.Tensor:
    out = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def _hidden_size(module) -> int:
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
        return self.head(_last_hidden(self.backbone, input_ids, attention_mask, position_ids))

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def active(self):
        """Context for a forward + backward of the critic (nothing to switch for a separate model)."""
        return contextlib.nullcontext()

    def gradient_checkpointing_enable(self) -> None:
        from alignkit.models.generation import enable_activation_checkpointing

        enable_activation_checkpointing(self.backbone)

    def weights(self) -> dict:
        return {k: v.detach().cpu() for k, v in self.state_dict().items()}

    def load_weights(self, sd: dict) -> None:
        self.load_state_dict(sd)

    def save_pretrained(self, out_dir: str | os.PathLike) -> None:
        """backbone as a transformers folder (loads with AutoModel) + value_head.safetensors."""
        from safetensors.torch import save_file

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.backbone.save_pretrained(out, safe_serialization=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.head.state_dict().items()}, str(out / HEAD_FILE))
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
        with use_adapter(self._policy, CRITIC_ADAPTER):
            return self.head(_last_hidden(self._decoder, input_ids, attention_mask, position_ids))

    def active(self):
        """Context for a forward + backward of the critic: adapter "critic" active (and, as peft
        does, the only one requiring grad) until the block ends. The backward pass must run inside
        it: autograd drops the gradient of a leaf whose requires_grad was switched off."""
        return use_adapter(self._policy, CRITIC_ADAPTER)

    def adapter_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        return [(n, p) for n, p in self._policy.named_parameters() if self._rx.search(n)]

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for _, p in self.adapter_parameters()] + list(self.head.parameters())

    def weights(self) -> dict:
        sd = {f"adapter.{n}": p.detach().cpu() for n, p in self.adapter_parameters()}
        sd.update({f"head.{k}": v.detach().cpu() for k, v in self.head.state_dict().items()})
        return sd

    def load_weights(self, sd: dict) -> None:
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
        H = _hidden_size(rm.model)
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
    try:
        backbone = lm.get_decoder()
    except (AttributeError, NotImplementedError):
        backbone = getattr(lm, getattr(lm, "base_model_prefix", "model"), None)
    if backbone is None or backbone is lm:
        raise UserError(f"{path}: cannot take the decoder out of {type(lm).__name__} for the critic")
    backbone.config = getattr(backbone, "config", lm.config)
    for p in backbone.parameters():
        p.requires_grad_(True)
    return ValueModel(backbone, ValueHead(_hidden_size(lm)), source=f"policy:{path}")


def load_critic_weights(path: str | os.PathLike) -> dict:
    """The value head saved by `save_pretrained` (for tools that rebuild a critic)."""
    from safetensors.torch import load_file

    return load_file(str(Path(path) / HEAD_FILE))


# --------------------------------------------------------------------------- the critic's optimizer


class CriticOptimizer:
    """AdamW for the critic's parameters with the trainer's LR schedule shape (lr_lambda), global
    normalisation and gradient clipping.

    `accumulate(mbs, loss_fn, units)` mirrors `Trainer.accumulate`: each micro-batch backpropagates
    loss_sum / global_units, where global_units is summed over all micro-batches and processes, and
    gradients are then summed across processes (all-reduce), so the update is the same for any
    split of the global batch. `step()` clips, steps and advances the schedule."""

    def __init__(self, params: list[torch.nn.Parameter], lr: float, weight_decay: float, betas, max_grad_norm,
                 lr_lambda: Callable[[int], float], dist, autocast=None, weights: Callable[[], dict] | None = None,
                 load_weights: Callable[[dict], None] | None = None):
        self.params = list(params)
        if not self.params:
            raise UserError("the critic has no trainable parameters")
        from alignkit.training.trainer import fused_adamw_ok

        decay = [p for p in self.params if p.ndim >= 2]
        no_decay = [p for p in self.params if p.ndim < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=lr, betas=tuple(betas), fused=fused_adamw_ok(self.params))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda)
        self.max_grad_norm = max_grad_norm
        self.dist = dist
        self.autocast = autocast or contextlib.nullcontext
        self._weights, self._load_weights = weights, load_weights

    def accumulate(self, micro_batches: list[dict], loss_fn, units: Callable[[dict], float], device,
                   context: Callable = contextlib.nullcontext) -> dict:
        from alignkit.training.dist import all_reduce_sum

        global_units = float(all_reduce_sum(float(sum(units(mb) for mb in micro_batches)), self.dist))
        if global_units <= 0:
            raise UserError("critic: nothing to train on in this batch (every response token is masked)")
        sums: dict[str, float] = {}
        loss_total = 0.0
        with context():
            for mb in micro_batches:
                mb = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in mb.items()}
                with self.autocast():
                    loss_sum, msums = loss_fn(mb)
                (loss_sum.float() / global_units).backward()
                loss_total += float(loss_sum.detach())
                for k, v in msums.items():
                    sums[k] = sums.get(k, 0.0) + float(v)
        keys = sorted(sums)
        red = all_reduce_sum(torch.tensor([loss_total] + [sums[k] for k in keys], dtype=torch.float64), self.dist)
        if self.dist.enabled:
            for p in self.params:
                if p.grad is not None:
                    torch.distributed.all_reduce(p.grad)
        out = {"value_loss": float(red[0]) / global_units}
        out.update({k: float(red[i + 1]) / global_units for i, k in enumerate(keys)})
        return out

    def step(self) -> dict:
        max_norm = self.max_grad_norm if self.max_grad_norm else float("inf")
        gnorm = float(torch.nn.utils.clip_grad_norm_(self.params, max_norm))
        if not math.isfinite(gnorm):
            from alignkit.training.trainer import TrainingDiverged

            self.optimizer.zero_grad(set_to_none=True)
            raise TrainingDiverged(f"critic: gradient norm is {gnorm}; lower critic_lr or normalise the rewards "
                            "(reward_norm=running)")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        return {"value_grad_norm": gnorm, "critic_lr": lr}

    def state_dict(self) -> dict:
        state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}
        if self._weights is not None:
            state["weights"] = self._weights()
        return state

    def load_state_dict(self, state: dict) -> None:
        if self._load_weights is not None and "weights" in state:
            self._load_weights(state["weights"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
