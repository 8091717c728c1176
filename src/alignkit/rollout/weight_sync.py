"""Which weights of a training model an inference engine needs, and which of them changed.

An engine that samples for the trainer (vLLM, in-process or as a server) holds its own copy of
the policy's weights in Hugging Face checkpoint names. After an optimizer step only the trained
tensors differ; a LoRA run changes no base weight at all, but every adapted layer's *merged*
weight. This module turns a training model into those checkpoint-named tensors:

* **Units.** Tensors go to the engine in units that it reloads as a whole: one module's
  parameters, and the modules an engine fuses into one layer (q/k/v into `qkv_proj`,
  gate/up into `gate_up_proj`; `packed` names them) travel together, so a partly sent fused
  layer never mixes new and stale halves.
* **Changes.** A unit is sent when one of its source tensors changed since the last sync. A
  trained tensor is fingerprinted (integer sums of its bits, see `_sig`): no copy is held, and
  it catches writers that bypass PyTorch's in-place counter (the fused AdamW kernel does). A
  frozen tensor is judged by its address and in-place counter alone, so a LoRA run does not
  re-read its base weights every step. A replaced tensor (`p.data = ...`) counts as changed.
* **Tied embeddings.** A parameter reached under two names (the output head tied to the input
  embeddings) is sent once, under the first name met (the embeddings); the engine ties its head
  to it.
* **LoRA** (peft, Hu et al. 2021, arXiv:2106.09685): an adapted linear layer is sent as
  W + scaling * B @ A (transposed for fan_in_fan_out layers), computed on the fly into a new
  tensor; the training model is never merged or mutated. Adapter tensors themselves are not sent.
* **FSDP2**: sharded parameters (DTensors) are gathered one unit (about one layer's projection)
  at a time with `full_tensor()`, which every rank must call in the same order; the ranks agree
  on the changed set first (an all-reduce of one flag per unit).
* **Buckets.** Units are grouped into buckets of at most `bucket_bytes` (a unit larger than that
  goes alone), so at most one bucket of gathered or merged tensors is alive at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from alignkit.errors import UserError

__all__ = ["DEFAULT_PACKED", "Unit", "weight_units", "changed_buckets", "check_syncable", "unwrap"]

# Fused layers of Llama-like models in vLLM: the checkpoint modules loaded into one engine layer.
DEFAULT_PACKED: dict[str, list[str]] = {"qkv_proj": ["q_proj", "k_proj", "v_proj"],
                                        "gate_up_proj": ["gate_proj", "up_proj"]}


@dataclass
class Unit:
    """Tensors an engine reloads together. key: a stable name (module path, or parent path +
    fused layer name); names: their checkpoint names; signature: the in-place write counters and
    addresses of every source tensor (changes when any of them is written); tensors(): builds
    the [(checkpoint name, tensor)] list (gathers FSDP shards, merges LoRA) when called."""

    key: str
    names: list[str]
    signature: tuple
    tensors: Callable[[], list[tuple[str, torch.Tensor]]]
    nbytes: int


def unwrap(model):
    """The module under DDP / torch.compile wrappers (`module`, `_orig_mod`)."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, torch.nn.Module):
            return model
        model = inner


def _local(t: torch.Tensor) -> torch.Tensor:
    return getattr(t, "_local_tensor", t)


_INT_OF = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_CHUNK = 1 << 24  # elements fingerprinted at once


@torch.no_grad()
def _sig(t: torch.Tensor) -> tuple:
    """What identifies the current values of `t`. Frozen tensors: their address and in-place
    write counter (nothing trains them). Trained tensors: a fingerprint of their bits, because
    not every writer bumps the counter (the fused AdamW kernel does not): the sum of the bits
    read as integers and the sum weighted by position, so any single changed element changes it.
    Under FSDP the fingerprint is the local shard's; ranks OR their verdicts (`_agree`)."""
    loc = _local(t).detach()
    if not t.requires_grad:
        return (id(t), t._version, loc._version, loc.data_ptr())
    bits = loc.contiguous().view(-1).view(_INT_OF[loc.element_size()])
    plain = weighted = torch.zeros((), dtype=torch.int64, device=bits.device)
    for lo in range(0, bits.numel(), _CHUNK):  # chunks: a few hundred MB at most, even for an embedding
        part = bits[lo:lo + _CHUNK].long()
        pos = (torch.arange(lo, lo + part.numel(), device=bits.device) % 65521) + 1
        plain = plain + part.sum()
        weighted = weighted + (part * pos).sum()
    return (id(t), loc.data_ptr(), int(plain), int(weighted))


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: gathered when it is an FSDP2 shard (a collective), as is otherwise."""
    t = t.detach()
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def check_syncable(model) -> None:
    """Raise UserError (one line) for an adapter or a quantised base whose weights an engine
    cannot take as merged checkpoint tensors: adapters other than LoRA, DoRA (its magnitude
    vector rescales the merged weight), and a quantised (e.g. QLoRA 4-bit) base."""
    model = unwrap(model)
    cfgs = getattr(model, "peft_config", None) or {}
    for name, cfg in cfgs.items():
        kind = str(getattr(cfg, "peft_type", "")).split(".")[-1].upper()
        if kind != "LORA":
            raise UserError(f"rollout_engine=vllm: adapter {name!r} is {kind}; only LoRA adapters can be merged into "
                            "the engine's weights; use rollout_engine=alignkit or peft.method=lora")
        if getattr(cfg, "use_dora", False):
            raise UserError("rollout_engine=vllm: DoRA adapters are not supported (the magnitude vector rescales each "
                            "merged weight); use peft.method=lora or rollout_engine=alignkit")
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False) or \
            getattr(getattr(model, "config", None), "quantization_config", None) is not None:
        raise UserError("rollout_engine=vllm: a quantised base model (QLoRA / bitsandbytes) cannot be synced to the "
                        "engine; use a bf16/fp32 base with peft.method=lora, or rollout_engine=alignkit")


def _lora_classes():
    try:
        from peft.tuners.lora import LoraLayer
        from peft.utils import ModulesToSaveWrapper
    except ImportError:  # pragma: no cover - peft is a dependency
        return (), ()
    return (LoraLayer,), (ModulesToSaveWrapper,)


def _active(module) -> list[str]:
    a = getattr(module, "active_adapters", None) or getattr(module, "active_adapter", "default")
    return [a] if isinstance(a, str) else list(a)


def _merged_linear(module, adapters: list[str]) -> Callable[[], torch.Tensor]:
    """W + sum_a scaling_a * B_a @ A_a (transposed when the layer stores W as (in, out)), a new
    tensor in W's dtype; the computation runs in float32."""
    base = module.get_base_layer()

    def build() -> torch.Tensor:
        w = _full(base.weight)
        out = w.float().clone()
        for a in adapters:
            if a in getattr(module, "merged_adapters", []):
                continue  # already inside W
            if a in getattr(module, "lora_A", {}) and isinstance(module.lora_A[a], torch.nn.Linear):
                A, B = _full(module.lora_A[a].weight).float(), _full(module.lora_B[a].weight).float()
                delta = (B @ A) * float(module.scaling[a])
                if getattr(module, "fan_in_fan_out", False):
                    delta = delta.T
            else:  # embeddings / convolutions: peft's own formula (not under FSDP)
                delta = module.get_delta_weight(a).float()
            out += delta.reshape(out.shape)
        return out.to(w.dtype)

    return build


def weight_units(model, packed: dict[str, list[str]] | None = None) -> list[Unit]:
    """The units of `model` (a transformers model, a peft model, or either under DDP / FSDP2),
    in module order, with checkpoint names relative to the transformers model (what
    `save_pretrained` writes). `packed`: fused engine layer -> the checkpoint module names it
    loads (default `DEFAULT_PACKED`). Raises UserError for what `check_syncable` refuses."""
    check_syncable(model)
    model = unwrap(model)
    packed = DEFAULT_PACKED if packed is None else packed
    member = {m: g for g, ms in packed.items() for m in ms}
    root = model.get_base_model() if hasattr(model, "get_base_model") and hasattr(model, "peft_config") else model
    lora_cls, mts_cls = _lora_classes()
    seen: set[int] = set()
    names_of: dict[int, int] = {}
    for _, p in root.named_parameters(remove_duplicate=False):
        names_of[id(p)] = names_of.get(id(p), 0) + 1
    groups: dict[str, list[tuple[str, tuple, Callable[[], torch.Tensor], int]]] = {}
    order: list[str] = []
    skip: list[str] = []

    def add(path: str, name: str, src: list[torch.Tensor], build: Callable[[], torch.Tensor]) -> None:
        parent, _, leaf = path.rpartition(".")
        key = f"{parent}.{member[leaf]}" if leaf in member else path
        if key not in groups:
            groups[key] = []
            order.append(key)
        groups[key].append((name, tuple(_sig(t) for t in src), build, _nbytes(src[0])))

    for path, module in root.named_modules():
        if any(path == s or path.startswith(s + ".") for s in skip):
            continue
        prefix = f"{path}." if path else ""
        if lora_cls and isinstance(module, lora_cls):
            skip.append(path)
            base = module.get_base_layer()
            if names_of.get(id(base.weight), 0) > 1:
                raise UserError(f"rollout_engine=vllm: a LoRA adapter on {path}, whose weight is tied to another "
                                "layer (tied embeddings), cannot be merged into the engine (it keeps one tied "
                                "tensor); leave it out of peft.target_modules")
            adapters = _active(module)
            src = [base.weight] + [t for a in adapters for t in (
                [module.lora_A[a].weight, module.lora_B[a].weight] if a in getattr(module, "lora_A", {}) else
                list(module.parameters()))]
            if id(base.weight) not in seen:
                seen.add(id(base.weight))
                add(path, prefix + "weight", src, _merged_linear(module, adapters))
            for pname, p in base.named_parameters(recurse=False):
                if pname != "weight" and id(p) not in seen:
                    seen.add(id(p))
                    add(path, prefix + pname, [p], lambda p=p: _full(p))
            continue
        if mts_cls and isinstance(module, mts_cls):
            skip.append(path)
            inner = module.modules_to_save[_active(module)[0]] if _active(module)[0] in module.modules_to_save \
                else module.original_module
            for sub, p in inner.named_parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    add(f"{path}.{sub}".rpartition(".")[0], prefix + sub, [p], lambda p=p: _full(p))
            continue
        for pname, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue  # tied: the engine ties it back
            seen.add(id(p))
            add(path, prefix + pname, [p], lambda p=p: _full(p))

    units = []
    for key in order:
        items = groups[key]

        def tensors(items=items) -> list[tuple[str, torch.Tensor]]:
            return [(name, build()) for name, _, build, _ in items]

        units.append(Unit(key, [i[0] for i in items], tuple(s for i in items for s in i[1]), tensors,
                          sum(i[3] for i in items)))
    return units


def _agree(flags: list[bool], sharded: bool) -> list[bool]:
    """With sharded (FSDP2) parameters every rank must gather the same units: OR the flags
    across ranks. Unsharded weights (one process, DDP, or inside FSDP's `gathered()`, where ranks
    may sample a different number of times) are the same on every rank: no collective."""
    import torch.distributed as dist

    if not sharded or not (dist.is_available() and dist.is_initialized()) or not flags:
        return flags
    t = torch.tensor(flags, dtype=torch.uint8)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(x) for x in t.tolist()]


def changed_buckets(model, last: dict[str, tuple], bucket_bytes: int, packed: dict[str, list[str]] | None = None,
                    full: bool = False) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Buckets of [(checkpoint name, tensor)] holding the units of `model` whose signature
    differs from `last` (all of them when `full` or `last` is empty), each bucket at most
    `bucket_bytes` (a larger unit goes alone). `last` is updated as each bucket is handed out,
    so a sync interrupted by an error resends the rest next time."""
    units = weight_units(model, packed)
    sharded = any(hasattr(p, "full_tensor") for p in unwrap(model).parameters())
    flags = _agree([full or last.get(u.key) != u.signature for u in units], sharded)
    bucket: list[tuple[str, torch.Tensor]] = []
    pending: list[Unit] = []
    size = 0
    for u, changed in zip(units, flags):
        if not changed:
            continue
        if bucket and size + u.nbytes > bucket_bytes:
            yield bucket
            for p in pending:
                last[p.key] = p.signature
            bucket, pending, size = [], [], 0
        bucket += u.tensors()
        pending.append(u)
        size += u.nbytes
    if bucket:
        yield bucket
        for p in pending:
            last[p.key] = p.signature
