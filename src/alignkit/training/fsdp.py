"""FSDP2 (`torch.distributed.fsdp.fully_shard`) for the shared trainer.

Layout: every transformer block is one FSDP group (its weights gathered for its forward and
its backward, sharded otherwise); the root group holds everything else: embeddings, final
norm, output head (tied to the embeddings or not), score / value heads, adapters outside the
blocks.

Recipes call parts of a model directly: the chunked log-prob path runs the decoder and then
the head chunk by chunk, reward models run the backbone and then the score head. The root
module's forward is therefore not a reliable place to gather the root group, so alignkit keeps
the root group gathered outside the optimizer step (it is the embeddings and the head, and
FSDP2 keeps a root gathered from forward to backward anyway) and gathers it again after each
step. Blocks gather themselves through their own hooks, whichever module a recipe calls.

Work that differs between processes (sampling, evaluation on each process's share of rows)
must not run collectives: `gathered()` gathers every block once, on every process, and no
collective runs inside it.

Checkpoints: the training state is written with torch.distributed.checkpoint (each process
writes its shards; loading reshards to any number of processes, or to one process without a
process group), the model in Hugging Face format from a full state dict gathered to rank 0.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from pathlib import Path

import torch

from alignkit.errors import UserError
from alignkit.models.arch import transformer_blocks

# Which mode a run uses and what each rank loads are decided while loading, one layer down, and
# re-exported here for the trainer and the recipes.
from alignkit.models.sharding import (  # noqa: F401
    check_fsdp_config,
    empty_model_for_fsdp,
    meta_model,
    resolve_mode,
    total_params,
)
from alignkit.training import checkpoint as ckpt

SHARDED_DIR = "sharded"  # torch.distributed.checkpoint folder inside a checkpoint


def _blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    try:
        _, blocks = transformer_blocks(model)
    except UserError:
        raise UserError(f"distributed=fsdp: found no stack of transformer blocks in {type(model).__name__} to "
                        "shard; use distributed=ddp") from None
    return list(blocks)


class FSDPModel:
    """A model sharded in place with FSDP2, plus what the trainer needs around it."""

    def __init__(self, model: torch.nn.Module, device: torch.device, world: int, *, cpu_offload: bool = False,
                 reshard_after_forward: bool = True, param_dtype: torch.dtype | None = None):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

        self.model = model
        self.reshard_after_forward = reshard_after_forward
        self._depth = 0
        mesh = init_device_mesh(device.type, (world,))
        kw: dict = {"mesh": mesh}
        if param_dtype is not None:
            # Gathered weights and compute in param_dtype; gradients reduced in float32 and the
            # sharded master weights and optimizer state stay float32.
            kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
        if cpu_offload:
            kw["offload_policy"] = CPUOffloadPolicy()
        # Ranks other than 0 may hold an empty (meta) model (`empty_model_for_fsdp`): rank 0's
        # weights then fill every rank's shards.
        empty = any(p.is_meta for p in model.parameters())
        from_rank0 = bool(all_reduce_max(float(empty), device))
        full = model.state_dict() if from_rank0 and torch.distributed.get_rank() == 0 else None
        self.blocks = _blocks(model)
        for b in self.blocks:
            fully_shard(b, reshard_after_forward=reshard_after_forward, **kw)
        fully_shard(model, **kw)
        if empty:
            model.to_empty(device=device)
        # The root group stays gathered through backward and between steps (see the module doc).
        model.set_reshard_after_backward(False, recurse=False)
        # FSDP2 picks the root as the first module whose forward runs; a recipe may start with a
        # block (through the decoder), so the root is initialised here, before any forward.
        model._get_fsdp_state()._lazy_init()
        if from_rank0:
            _fill_from_rank0(model, full or {})
            del full
        # The sharded parameters are what the optimizer steps and the norm is taken over; once the
        # root group is gathered, model.parameters() yields its gathered copies instead.
        self.params = [p for p in model.parameters() if p.requires_grad]
        # Tied weights (lm_head = embeddings) appear under each name in a full state dict, as copies;
        # a Hugging Face folder stores them once, under the first name.
        seen: set[int] = set()
        self._tied_names = []
        for name, p in model.named_parameters(remove_duplicate=False):
            if id(p) in seen:
                self._tied_names.append(name)
            seen.add(id(p))
        model.unshard()

    # ---------------------------------------------------------------- runtime
    def refresh(self) -> None:
        """Gather the root group again from its shards (after an optimizer step or a load)."""
        self.model.reshard()
        self.model.unshard()

    @contextlib.contextmanager
    def gathered(self):
        """Every block's full weights on every process; no collective runs inside, so processes may
        do different amounts of work (sampling, evaluation on their share of rows)."""
        if self._depth == 0:
            self.model.unshard()  # no-op unless something (a state dict) put the root back to shards
            for b in self.blocks:
                b.unshard()
                b.set_reshard_after_forward(False, recurse=False)
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
            if self._depth == 0:
                for b in self.blocks:
                    b.set_reshard_after_forward(self.reshard_after_forward, recurse=False)
                    b.reshard()

    @staticmethod
    def clip_grad_norm_(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
        """Global gradient norm over the shards of every process, then clip like clip_grad_norm_."""
        from torch.distributed.tensor import DTensor

        grads = [p.grad for p in params if p.grad is not None]
        total = torch.nn.utils.get_total_norm(grads, 2.0)
        if isinstance(total, DTensor):  # a partial sum per process: reduce to the global norm
            total = total.full_tensor()
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
        return total

    # ---------------------------------------------------------------- checkpoints
    def save(self, path: Path, optimizer: torch.optim.Optimizer) -> None:
        """Collective: each process writes its shards of the weights and the optimizer state."""
        # State dicts name the registered parameters: the shards (the optimizer's), not the gathered root.
        self.model.reshard()
        save_sharded(self.model, optimizer, path)
        self.model.unshard()

    def load(self, path: Path, optimizer: torch.optim.Optimizer) -> None:
        """Collective: read a sharded checkpoint written by `save` (any number of processes)."""
        self.model.reshard()
        load_sharded(self.model, optimizer, path)
        self.model.unshard()

    def full_state_dict(self) -> dict:
        """Collective: the full weights on rank 0 (on CPU), {} on the other processes."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        self.model.reshard()
        sd = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        self.model.unshard()
        for name in self._tied_names:
            sd.pop(name, None)
        return sd


def all_reduce_max(x: float, device: torch.device) -> float:
    """Collective: the largest `x` over all processes."""
    t = torch.tensor([x], dtype=torch.float32, device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return float(t[0])


def _fill_from_rank0(model: torch.nn.Module, full: dict) -> None:
    """Every rank's shards (and buffers, e.g. rotary frequencies, which state dicts may omit) from
    rank 0's full weights."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    for b in model.buffers():
        torch.distributed.broadcast(b, src=0)
    # Every process seeded alike and would have drawn alike while loading from disk; building on
    # the meta device must not leave them on different random streams (modules added later, such
    # as PPO's critic adapter, are initialised from them on every process).
    box = [ckpt.rng_state() if torch.distributed.get_rank() == 0 else None]
    torch.distributed.broadcast_object_list(box, src=0)
    ckpt.set_rng_state(box[0])


# Frozen weights (a LoRA base, layers left untrained) never change: the checkpoint holds the
# trained ones and the optimizer state; a resume reloads the rest from `model` as the run did.
def _options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=True, strict=False)


def save_sharded(model: torch.nn.Module, optimizer: torch.optim.Optimizer, path: Path) -> None:
    """Collective: write the trainable weights and the optimizer state to the folder `path` with
    torch.distributed.checkpoint, each process its own shards (frozen weights are left out)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, optimizer, options=_options())
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(path))


def load_sharded(model: torch.nn.Module, optimizer: torch.optim.Optimizer, path: Path) -> None:
    """Load a sharded checkpoint into `model` / `optimizer`, sharded or not, on any number of
    processes (torch.distributed.checkpoint reshards as it reads)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from alignkit.training.checkpoint import safe_dcp_load

    msd, osd = get_state_dict(model, optimizer, options=_options())
    state = {"model": msd, "optim": osd}
    try:
        with warnings.catch_warnings():
            # One process without a process group (a multi-GPU run resumed on one) reads every shard:
            # intended, so torch's notice about it is noise.
            warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
            # Never unpickles: the folder may come from someone else (see checkpoint.safe_dcp_load).
            safe_dcp_load(state, path, no_dist=not torch.distributed.is_initialized())
    except UserError:
        raise
    except Exception as e:  # a different model / trainable set / adapter than the run that wrote it
        msg = str(e).strip().splitlines()
        raise UserError(f"{path.parent}: sharded checkpoint does not match this run ({(msg[0] if msg else '')[:200]}); "
                        "resume with the same model and peft / freezing settings") from None
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=_options())


def fix_saved_architectures(out_dir: Path) -> None:
    """FSDP2 renames the sharded model's class (FSDPLlamaForCausalLM); config.json must name the
    original class for tools that read `architectures`."""
    f = Path(out_dir) / "config.json"
    if not f.is_file():
        return
    cfg = json.loads(f.read_text(encoding="utf-8"))
    archs = cfg.get("architectures") or []
    fixed = [a[4:] if a.startswith("FSDP") and len(a) > 4 else a for a in archs]
    if fixed != archs:
        cfg["architectures"] = fixed
        f.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
