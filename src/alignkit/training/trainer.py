"""The shared loop machinery every recipe calls.

A recipe owns its algorithm (what a micro-batch's loss is); the `Trainer` owns everything else:
the optimizer and schedule, gradient accumulation with *global* normalisation, precision,
clipping, DDP / FSDP2 (`alignkit.training.fsdp`), checkpoints with exact resume, metrics and the
progress bar.

Global normalisation: a loss is written as (sum over units) / (number of units in the whole
global batch), where a unit is what the recipe averages over (trained tokens for SFT, pairs for
DPO, ...). Before any forward pass the trainer adds up the units of every micro-batch on every
rank, and each micro-batch backpropagates `loss_sum * world / global_units` (DDP then averages
over ranks; FSDP's reduce-scatter averages the same way). The gradient is therefore the same
for 1 x 8, 4 x 2 and 2 ranks x 4.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from alignkit.config import TrainConfig, dump_config
from alignkit.errors import UserError
from alignkit.ops.attention import post_training_sdpa
from alignkit.training import checkpoint as ckpt
from alignkit.training.dist import DistInfo, all_reduce_sum, barrier, broadcast_object, init_distributed
from alignkit.training.logging import MetricsLog, plot_metrics, progress_bar, say
from alignkit.training.loop import to_device

# loss_fn(model, micro_batch) -> (loss_sum: scalar tensor, metric_sums: dict[str, float|tensor])
LossFn = Callable[[torch.nn.Module, dict], tuple[torch.Tensor, dict]]


class TrainingDiverged(UserError):
    """A non-finite loss or gradient norm; the run stopped before the update (exit code 3)."""

    exit_code = 3


def peak_rss_mb() -> float:
    """This process's high-water resident memory in MiB. Linux: VmHWM, because ru_maxrss survives
    fork+exec, so a process started by a large parent would report the parent's peak."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024.0  # bytes on macOS, KiB elsewhere


def fused_adamw_ok(params) -> bool:
    """Whether AdamW's fused kernel takes these parameters: plain floating-point tensors on CPU or
    CUDA. It makes one pass over each tensor instead of a dozen elementwise ops (measured 7-8x
    faster per step than the foreach path on CPU, torch 2.13)."""
    return all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point and type(p.data) is torch.Tensor
               for p in params)


def peak_memory(device: torch.device) -> dict:
    """Peak resident memory of this process so far (and peak CUDA memory on a GPU), in MiB."""
    out = {"peak_rss_mb": peak_rss_mb()}
    if device.type == "cuda":
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (DESIGN rule 7)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def param_counts(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; peft's own count for adapters (packed 4-bit at real size)."""
    if hasattr(model, "get_nb_trainable_parameters"):  # peft: counts packed 4-bit weights at their real size
        return model.get_nb_trainable_parameters()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def autocast_dtype(cfg_dtype: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of `dtype` on `device`: auto = bf16 on a bf16-capable GPU, else none (float32)."""
    if cfg_dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return None
    return {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}[cfg_dtype]


def _f(v) -> float:
    return float(v.detach() if isinstance(v, torch.Tensor) else v)


class _Forward(torch.nn.Module):
    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, fn, batch):
        return fn(self.model, batch)


class Trainer:
    """One trained network and its optimizer step: AdamW + LR schedule, gradient accumulation
    with global normalisation (module docstring), precision (autocast, fp16 GradScaler), gradient
    clipping, DDP / FSDP, checkpoints with exact resume, the divergence stop, metrics and progress.

    `total_steps` is the number of optimizer steps (the schedule's length). A second network
    trained beside the policy (PPO's critic) gets a second `Trainer` with `params` (its
    trainable tensors, when they are not all parameters of `model`), `log_metrics=False` (the
    first trainer owns metrics.jsonl) and `on_diverge` (the first trainer's `save_checkpoint`,
    whose state holds this one's via `register_state`). Raises UserError for a model with 0
    trainable parameters."""

    def __init__(
        self,
        cfg: TrainConfig,
        model: torch.nn.Module,
        tokenizer=None,
        *,
        recipe: str,
        total_steps: int,
        dist_info: DistInfo | None = None,
        log: Callable[[str], None] | None = None,
        find_unused_parameters: bool = False,
        params: list[torch.nn.Parameter] | None = None,
        log_metrics: bool = True,
        on_diverge: Callable[[], Path] | None = None,
    ):
        self.cfg = cfg
        self._explicit_params = list(params) if params is not None else None
        self._on_diverge = on_diverge
        self.recipe = recipe
        self.tokenizer = tokenizer
        self.dist = dist_info or init_distributed()
        self.run_dir = Path(cfg.output_dir)
        self.total_steps = total_steps
        self.step = 0
        self.extra_state: dict[str, Callable] = {}  # name -> (get, set) pairs registered by recipes
        self.sharded_state: dict[str, tuple[Callable, Callable]] = {}  # name -> (save, load) of folders
        self._print = log or say  # tqdm.write: never on the line of a bar (this run's or an outer one)
        self.device = self.dist.device
        self.amp_dtype = autocast_dtype(cfg.dtype, self.device)

        trainable, total = param_counts(model)
        if self._explicit_params is not None:
            trainable = sum(p.numel() for p in self._explicit_params)
            total = max(total, trainable)
        if trainable == 0:
            raise UserError("the model has 0 trainable parameters; check the PEFT / freezing settings")
        self.info(f"parameters: {trainable:,} trainable of {total:,} ({100 * trainable / total:.2f}%)")
        if cfg.gradient_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
            from alignkit.models.generation import enable_activation_checkpointing

            enable_activation_checkpointing(model)
            if hasattr(model, "config"):
                model.config.use_cache = False
        from alignkit.training import fsdp as fsdp_lib

        self.mode = fsdp_lib.resolve_mode(cfg, self.dist.world, model)
        if self.mode == "none" and cfg.distributed in ("ddp", "fsdp"):
            self.info(f"distributed={cfg.distributed}: one process, nothing to distribute")
        elif cfg.distributed == "auto" and self.dist.world > 1:
            self.info(f"distributed=auto: {self.mode} ({total:,} parameters, fsdp from {cfg.fsdp.auto_min_params:,})")
        self.fsdp: fsdp_lib.FSDPModel | None = None
        if self.mode != "fsdp":
            model.to(self.device)
        self.model = model  # unwrapped: for saving and for eval
        # The recipe's loss function runs *inside* the wrapper's forward, so under DDP the
        # gradient hooks see every parameter use, whatever the recipe calls on the model.
        self.train_model: torch.nn.Module = _Forward(model)
        if self.mode == "fsdp":
            fsdp_lib.check_fsdp_config(cfg)
            # Mixed precision through FSDP's policy on a GPU (bf16 gathered weights, fp32 reduce and
            # master weights); on CPU autocast as without FSDP.
            mp = self.amp_dtype if self.device.type == "cuda" else None
            self._fsdp_param_dtype = mp
            self.fsdp = fsdp_lib.FSDPModel(model, self.device, self.dist.world, param_dtype=mp,
                                           cpu_offload=cfg.fsdp.cpu_offload and self.device.type == "cuda",
                                           reshard_after_forward=cfg.fsdp.reshard_after_forward)
            if mp is not None:
                self.amp_dtype = None
            if cfg.fsdp.cpu_offload and self.device.type != "cuda":
                self.info("fsdp.cpu_offload: no GPU here, the weights already live in CPU memory")
        elif self.mode == "ddp" and self._explicit_params is not None:
            pass  # tensors outside the module: gradients are averaged by `_all_reduce_grads`
        elif self.mode == "ddp":
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.train_model = DDP(
                self.train_model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=find_unused_parameters,
            )
        params = self._trainable()
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr, betas=tuple(cfg.adam_betas),
            fused=self._fused_adamw(params),
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_lambda)
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None
        # Trackers create their folders and files at once (TensorBoard's events file): opened in
        # prepare_run_dir, once the folder is this run's (locked, and cleared under overwrite=true).
        self._log_metrics = log_metrics
        self.metrics = MetricsLog(self.run_dir, enabled=self.dist.main and log_metrics, report_to="none")
        self._lock: ckpt.RunLock | None = None
        # Staging folders carry rank 0's PID: unique per run, the same on every process of it.
        self._tag = int(all_reduce_sum(os.getpid() if self.dist.main else 0, self.dist))
        self._ref_norm = self._param_norm()[0]  # the weights' norm where the run started (health checks)
        self._last = {"loss": None, "grad_norm": None}
        self._retune = False  # resuming a diverged run with a new lr / schedule (see prepare_run_dir)
        self._t0 = time.time()
        self._bar = None

    # ------------------------------------------------------------------ helpers
    def info(self, msg: str) -> None:
        """Print `msg` on the main process (above the progress bar when one is shown)."""
        if self.dist.main:
            if self._bar_active():
                self._bar.write(msg, file=sys.stderr)
            else:
                self._print(msg)

    def _bar_active(self) -> bool:
        return getattr(self, "_bar", None) is not None

    def _lr_lambda(self, step: int) -> float:
        cfg = self.cfg
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        span = max(1, self.total_steps - cfg.warmup_steps)
        frac = min(1.0, max(0.0, (step - cfg.warmup_steps) / span))
        lo = cfg.min_lr_ratio
        if cfg.schedule == "linear":
            return lo + (1 - lo) * (1 - frac)
        return lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * frac))

    @contextlib.contextmanager
    def autocast(self):
        """Context for forward passes: torch.autocast at the run's dtype (nothing in float32), and
        on a GPU the attention kernels of `ops.attention.post_training_sdpa`."""
        amp = (contextlib.nullcontext() if self.amp_dtype is None
               else torch.autocast(self.device.type, dtype=self.amp_dtype))
        with post_training_sdpa(self.device), amp:
            yield

    def _fused_adamw(self, params) -> bool:
        """Not with FSDP on CPU (sharded DTensor params there go through the foreach path) or with
        CPU offload; otherwise whenever the kernel takes the parameters."""
        if self.fsdp:
            return self.device.type == "cuda" and not self.cfg.fsdp.cpu_offload
        return fused_adamw_ok(params)

    def _trainable(self) -> list[torch.Tensor]:
        if self.fsdp is not None:
            return self.fsdp.params
        if self._explicit_params is not None:
            return self._explicit_params
        return [p for p in self.model.parameters() if p.requires_grad]

    def _all_reduce_grads(self) -> None:
        """DDP's average for explicit `params` (not wrapped in DDP): one flat all-reduce."""
        grads = [p.grad for p in self._explicit_params if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        torch.distributed.all_reduce(flat)
        flat /= self.dist.world
        off = 0
        for g in grads:
            g.copy_(flat[off:off + g.numel()].view_as(g))
            off += g.numel()

    def shard_frozen(self, model: torch.nn.Module):
        """Under FSDP, shard a frozen model (an RL reference) like the trained one, with the same
        compute dtype; returns its `FSDPModel` (use `.gathered()` around its no-grad passes).
        Without FSDP: None, and the model stays as it is."""
        if self.fsdp is None:
            return None
        from alignkit.training.fsdp import FSDPModel

        return FSDPModel(model, self.device, self.dist.world, param_dtype=self._fsdp_param_dtype)

    def gathered(self):
        """Under FSDP, full weights on every process for work that differs between processes
        (sampling, evaluation of each process's share): no collective runs inside."""
        return self.fsdp.gathered() if self.fsdp is not None else contextlib.nullcontext()

    def to_device(self, batch: dict) -> dict:
        """`alignkit.training.loop.to_device` onto this trainer's device."""
        return to_device(batch, self.device)

    def optimizer_state(self) -> dict:
        """Optimizer, schedule, loss-scaler state and step count, for a second trainer whose state
        travels inside the first one's checkpoints (`register_state`). Under FSDP the optimizer
        state is sharded and left out (None): it goes through `save_sharded_state`."""
        return {"optimizer": self.optimizer.state_dict() if self.fsdp is None else None,
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler else None, "step": self.step}

    def load_optimizer_state(self, state: dict) -> None:
        """Restore what `optimizer_state` returned (an optimizer state of None is restored by
        `load_sharded_state`)."""
        if state.get("optimizer") is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.step = int(state.get("step", self.step))

    def register_state(self, name: str, get: Callable[[], dict], set_: Callable[[dict], None]) -> None:
        """Recipe state (a moving-average baseline, a KL controller) saved in checkpoints."""
        self.extra_state[name] = (get, set_)

    def register_sharded_state(self, name: str, save: Callable[[Path], None], load: Callable[[Path], None]) -> None:
        """State written collectively into the folder `name` of each checkpoint (a second network
        sharded under FSDP: PPO's critic, see `save_sharded_state`). `save(folder)` runs on every
        process while an FSDP checkpoint is written; `load(folder)` on every process when the
        checkpoint being resumed has that folder."""
        self.sharded_state[name] = (save, load)

    def save_sharded_state(self, path: Path) -> None:
        """Collective, under FSDP: this trainer's weights (the trainable ones) and optimizer state
        into the torch.distributed.checkpoint folder `path`, each process its shards."""
        self.fsdp.save(path, self.optimizer)

    def load_sharded_state(self, path: Path) -> None:
        """What `save_sharded_state` wrote, into this trainer's model and optimizer, sharded or not
        (torch.distributed.checkpoint reshards to any number of processes). UserError on a folder
        written for another model."""
        from alignkit.training.fsdp import load_sharded

        if self.fsdp is not None:
            self.fsdp.load(path, self.optimizer)
        else:
            load_sharded(self.model, self.optimizer, path)

    # ------------------------------------------------------------------ the step
    def accumulate(self, micro_batches: list[dict], loss_fn: LossFn, units: Callable[[dict], float]) -> dict:
        """Forward/backward over the micro-batches of one optimizer step (this rank's share).

        `loss_fn` returns (loss_sum, metrics): a metric given as a number is a sum over units and
        is reported divided by the global units; one given as a (numerator, denominator) pair is
        reported as the ratio of their global sums (e.g. a token-mean under a sequence-mean loss).
        Returns the metrics of the global batch, with `loss` (loss_sum / global units), `units`
        (the global count) and `trained_tokens` (non-padding input tokens of every micro-batch of
        every process). A global batch with no unit (every label masked, every sample cut under
        truncated=mask) runs no pass and returns units 0; `optimizer_step` then skips the update."""
        local_units = float(sum(units(mb) for mb in micro_batches))
        global_units = float(all_reduce_sum(local_units, self.dist))
        if global_units <= 0:  # the same on every process, so no collective is left waiting
            return {"loss": 0.0, "units": 0.0, "trained_tokens": 0.0}
        scale = self.dist.world / global_units
        if self.fsdp is not None:
            self.fsdp.model.unshard()  # the root group is kept gathered (no-op when it is)
        sums: dict[str, float] = {}
        loss_total = torch.zeros((), dtype=torch.float64)
        tokens = 0
        self.train_model.train()
        for i, mb in enumerate(micro_batches):
            am = mb.get("attention_mask")  # a micro-batch may state its own count (shared-prompt pairs)
            tokens += int(mb["n_tokens"]) if "n_tokens" in mb else int(am.sum()) if am is not None else int(
                mb["input_ids"].numel())
            mb = self.to_device(mb)
            last = i == len(micro_batches) - 1
            ddp = self.mode == "ddp" and hasattr(self.train_model, "no_sync")  # FSDP reduce-scatters every micro-batch: sharded gradients, less memory
            sync = contextlib.nullcontext() if (last or not ddp) else self.train_model.no_sync()
            with sync:
                with self.autocast():
                    loss_sum, msums = self.train_model(loss_fn, mb)
                loss = loss_sum.float() * scale
                if self.scaler is not None:
                    self.scaler.scale(loss).backward()
                else:
                    loss.backward()
            loss_total += loss_sum.detach().double().cpu()
            for k, v in msums.items():
                if isinstance(v, tuple):
                    sums[k + "\0num"] = sums.get(k + "\0num", 0.0) + _f(v[0])
                    sums[k + "\0den"] = sums.get(k + "\0den", 0.0) + _f(v[1])
                else:
                    sums[k] = sums.get(k, 0.0) + _f(v)
        if self._explicit_params is not None and self.mode == "ddp":
            self._all_reduce_grads()
        keys = sorted(sums)
        red = all_reduce_sum(torch.tensor([float(loss_total), float(tokens)] + [sums[k] for k in keys],
                                          dtype=torch.float64), self.dist)
        got = {k: float(red[i + 2]) for i, k in enumerate(keys)}
        out = {"loss": float(red[0]) / global_units}
        for k, v in got.items():
            if k.endswith("\0num"):
                name = k[:-4]
                out[name] = v / max(got[name + "\0den"], 1e-12)
            elif not k.endswith("\0den"):
                out[k] = v / global_units
        out["units"] = global_units
        out["trained_tokens"] = float(red[1])
        return out

    def optimizer_step(self, metrics: dict) -> dict:
        """Clip, step, schedule. A non-finite loss or gradient stops the run before the update,
        after saving the (still good) state as a checkpoint. Metrics of a batch with nothing to
        train on (units 0) make a skipped step instead (`skip_update`)."""
        if metrics.get("units", 1.0) <= 0:
            return self.skip_update(metrics)
        params = self._trainable()
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        max_norm = self.cfg.max_grad_norm if self.cfg.max_grad_norm else float("inf")
        if self.fsdp is not None:
            gnorm = self.fsdp.clip_grad_norm_(params, max_norm)
        else:
            gnorm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        if not math.isfinite(metrics["loss"]) or (not torch.isfinite(gnorm) and self.scaler is None):
            self.optimizer.zero_grad(set_to_none=True)
            self._diverged(metrics["loss"], float(gnorm))
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.fsdp is not None:
            self.fsdp.refresh()
        metrics["lr"] = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        metrics["grad_norm"] = float(gnorm)
        self._last = {"loss": metrics["loss"], "grad_norm": float(gnorm)}
        self.step += 1
        return metrics

    # ------------------------------------------------------------------ health of the weights
    def _param_norm(self) -> tuple[float, int]:
        """(L2 norm, element count) of the trainable weights, over all shards under FSDP."""
        params = [p.detach() for p in self._trainable()]
        if not params:
            return 0.0, 0
        total = torch.nn.utils.get_total_norm(params, 2.0)
        if hasattr(total, "full_tensor"):  # FSDP: a partial norm per process
            total = total.full_tensor()
        return float(total), int(sum(p.numel() for p in params))

    def _health(self) -> dict:
        """Whether the weights are usable: finite, and their norm not blown up. Blown up means
        above 10x the norm where the run started plus sqrt(n) (an RMS of 1 per weight, so that
        weights that start near 0, such as a LoRA B or a fresh head, may grow). An optimizer step
        that throws the weights to |w| ~ 1e10 leaves the loss finite for a step or two; resuming
        from such a state fails again, so it never counts as the state to go back to."""
        norm, numel = self._param_norm()
        limit = 10.0 * self._ref_norm + math.sqrt(numel)
        sane = math.isfinite(norm) and norm <= limit
        return {"sane": sane, "param_norm": norm, "ref_param_norm": self._ref_norm, "limit": limit,
                "loss": self._last["loss"], "grad_norm": self._last["grad_norm"]}

    def _diverged(self, loss: float, gnorm: float) -> None:
        """The non-finite stop: keep a state that can be resumed, say which, and raise."""
        h = self._health()  # collective under FSDP, as is save_checkpoint
        head = (f"step {self.step + 1}: loss is {loss} (grad norm {gnorm:.3g})" if not math.isfinite(loss) else
                f"step {self.step + 1}: grad norm is {gnorm} (loss {loss:.4g})") + "; stopped before the update"
        if h["sane"]:
            # the critic's Trainer saves the whole run's checkpoint (policy and critic) through on_diverge
            good: Path | None = (self._on_diverge or self.save_checkpoint)()
            what = f"last good state saved at {good}"
            fix = f"resume from it with a lower lr (resume={good} lr=...) or check the data"
        else:
            good = ckpt.latest_sane_checkpoint(self.run_dir, at_most=self.step)
            ratio = h["param_norm"] / max(self._ref_norm, 1e-12)
            what = (f"the weights had already blown up (parameter norm {h['param_norm']:.3g}, {ratio:.3g}x the "
                    "start), so this state is not saved")
            if good is not None:
                what += f"; the last checkpoint with sane weights is {good}"
                fix = f"resume from it with a lower lr (resume={good} lr=...)"
            else:
                fix = "no checkpoint holds sane weights: start again with a lower lr (overwrite=true lr=...)"
        if self.dist.main:
            rec = {"step": self.step + 1, "loss": str(loss), "grad_norm": str(gnorm), "resume_from":
                   str(good) if good is not None else None, "param_norm": str(h["param_norm"])}
            (self.run_dir / ckpt.DIVERGED_FILE).write_text(json.dumps(rec, indent=1) + "\n", encoding="utf-8")
        raise TrainingDiverged(f"{head}; {what}; {fix}")

    def skip_update(self, metrics: dict) -> dict:
        """Count an optimizer step that has nothing to train on (every sample masked, every group
        tied, no sample kept): no update, gradients dropped, the schedule advances as after an
        update. Returns `metrics` with loss 0, grad_norm 0, lr and `skipped_steps` = 1."""
        self.optimizer.zero_grad(set_to_none=True)
        metrics = {"loss": 0.0, **metrics, "grad_norm": 0.0, "skipped_steps": 1}
        metrics["lr"] = self.scheduler.get_last_lr()[0]
        with warnings.catch_warnings():
            # the schedule is meant to advance without an update here; torch warns when that
            # happens before the first optimizer.step(), which is not the user's concern
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step", category=UserWarning)
            self.scheduler.step()
        self.step += 1
        return metrics

    # ------------------------------------------------------------------ run folder
    def prepare_run_dir(self) -> Path | None:
        """Take the run folder for this run; return the checkpoint to resume from, if any.

        Rank 0 creates the folder and takes its lock (a second run on it: UserError), then,
        under the lock: removes staging leftovers of killed writes; with `overwrite=true`
        removes the earlier run; with `resume` picks the checkpoint (the newest with sane
        weights; after a divergence the one the stop named), refuses old pickle checkpoints and
        settings that change the run's arithmetic (see `checkpoint.config_changes`), and drops
        metrics records after the checkpoint's step. Every process gets the same answer or the
        same error."""
        err: UserError | None = None
        resume_from: Path | None = None
        if self.dist.main:
            created = not self.run_dir.exists()
            try:
                resume_from = self._prepare_main()
            except UserError as e:
                err = e
                if self._lock is not None:
                    self._lock.release()
                    self._lock = None
                if created and self.run_dir.is_dir() and not any(self.run_dir.iterdir()):
                    self.run_dir.rmdir()  # nothing of this run is left behind
        failed = float(all_reduce_sum(1.0 if err is not None else 0.0, self.dist))
        if err is not None:
            raise err
        if failed:
            raise UserError(f"{self.run_dir}: the main process could not prepare output_dir (see its message)")
        got = broadcast_object(str(resume_from) if resume_from is not None else None, self.dist)
        resume_from = Path(got) if got is not None else None
        self._retune = bool(broadcast_object(self._retune, self.dist))
        barrier(self.dist)
        return resume_from

    def _prepare_main(self) -> Path | None:
        cfg = self.cfg
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"{self.run_dir}: cannot create output_dir ({e.strerror or e}); pick another "
                            "output_dir") from None
        if not self.run_dir.is_dir():
            raise UserError(f"{self.run_dir}: output_dir is not a folder; pick another output_dir")
        lock = ckpt.RunLock(self.run_dir)
        try:
            lock.acquire()
        except OSError as e:
            raise UserError(f"{self.run_dir}: cannot write into output_dir ({e.strerror or e}); pick another "
                            "output_dir") from None
        self._lock = lock
        if self._lock.previous and not self._lock.previous.startswith(f"{os.getpid()} "):
            self.info(f"{self.run_dir}: taking over the lock of a run that ended without releasing it "
                      f"(PID {self._lock.previous.split()[0]})")
        ckpt.clean_stale_tmp(self.run_dir)  # only now: under the lock no live run has staging folders here
        resume_from: Path | None = None
        diverged = self._read_diverged(self.run_dir)
        if cfg.resume:
            if isinstance(cfg.resume, str) and cfg.resume.lower() not in ("true", "latest"):
                resume_from = Path(cfg.resume)
                if not ((resume_from / ckpt.STATE_FILE).is_file() or (resume_from / ckpt.LEGACY_STATE_FILE).is_file()):
                    raise UserError(f"resume={cfg.resume}: not a checkpoint folder (no {ckpt.STATE_FILE})")
                if resume_from.resolve().parent.parent != self.run_dir.resolve():
                    diverged = self._read_diverged(resume_from.resolve().parent.parent)
            else:
                resume_from = self._pick_checkpoint(diverged)
            if resume_from is None:
                dropped = ckpt.truncate_metrics(self.run_dir / "metrics.jsonl", 0)
                (self.run_dir / ckpt.DIVERGED_FILE).unlink(missing_ok=True)  # a new start: no lr changes later
                if ckpt.latest_checkpoint(self.run_dir) is None:  # else _pick_checkpoint said why
                    self.info(f"resume: no checkpoint in {self.run_dir}/checkpoints; starting from scratch"
                              + (f" (dropped {dropped} metrics records of the earlier attempt)" if dropped else ""))
            else:
                self._check_resume(resume_from, diverged)
        elif ckpt.holds_run(self.run_dir):
            if not cfg.overwrite:
                raise UserError(
                    f"{self.run_dir}: output_dir already holds a run; pass resume=true to continue it, "
                    "overwrite=true to replace it, or another output_dir"
                )
            reads = ("model", "data", "eval_data", "ref_model")
            inside = [f"{k}={v}" for k, v in cfg.model_dump().items() if k in reads and isinstance(v, str) and v
                      and Path(v).exists() and Path(v).resolve().is_relative_to(self.run_dir.resolve())]
            if inside:
                raise UserError(f"{inside[0]} lies inside output_dir {self.run_dir}, which overwrite=true would "
                                "remove; copy it out first or pick another output_dir")
            n = ckpt.clear_run_dir(self.run_dir)
            self.info(f"overwrite=true: removed the earlier run in {self.run_dir} ({n} entries)")
        (self.run_dir / "config.yaml").write_text(dump_config(cfg), encoding="utf-8")
        self.metrics.close()
        self.metrics = MetricsLog(self.run_dir, enabled=self._log_metrics, tensorboard=cfg.tensorboard,
                                  report_to=getattr(cfg, "report_to", None), name=f"{self.recipe}:{self.run_dir.name}",
                                  config=cfg.model_dump(mode="json"))
        return resume_from

    @staticmethod
    def _read_diverged(run_dir: Path) -> dict | None:
        f = run_dir / ckpt.DIVERGED_FILE
        try:
            return json.loads(f.read_text(encoding="utf-8")) if f.is_file() else None
        except (OSError, ValueError):
            return None

    def _pick_checkpoint(self, diverged: dict | None) -> Path | None:
        """resume=true: the newest checkpoint whose weights were sane (after a divergence, the one
        its stop named; blown-up ones saved before the stop are skipped)."""
        latest = ckpt.latest_checkpoint(self.run_dir)
        if latest is None or not (latest / ckpt.STATE_FILE).is_file():
            return latest  # none, or an old pickle one: refused by name in _check_resume
        good = ckpt.latest_sane_checkpoint(self.run_dir)
        if good == latest:
            return latest
        why = f"the run diverged at step {diverged.get('step')}" if diverged else f"{latest} holds blown-up weights"
        if good is None:
            self.info(f"resume: {why} and no checkpoint holds sane weights; starting from scratch")
            return None
        self.info(f"resume: {why}; resuming from {good}, the last checkpoint with sane weights")
        return good

    def _check_resume(self, path: Path, diverged: dict | None) -> None:
        """Refuse a pickle checkpoint and changed settings that would silently not apply (or
        change the arithmetic half-way); log the ones that do apply."""
        import yaml

        if not (path / ckpt.STATE_FILE).is_file():
            raise ckpt.UnsafeCheckpoint(
                f"{path}: written in the old pickle format ({ckpt.LEGACY_STATE_FILE}), which resume no longer "
                f"loads because unpickling runs code named in the file; start a new run from its weights "
                f"(model={path}) or resume from a checkpoint written by this version")
        old_cfg = path / "config.yaml"
        try:
            old = yaml.safe_load(old_cfg.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError):
            old = None
        if not isinstance(old, dict):
            self.info(f"resume: {path} has no readable config.yaml; changed settings cannot be checked")
            return
        old_world = int(ckpt.read_state_json(path).get("world", self.dist.world))
        after_divergence = diverged is not None and ckpt.step_of(path) < int(diverged.get("step", 0))
        refused, applied = ckpt.config_changes(old, self.cfg.model_dump(mode="json"), old_world, self.dist.world,
                                               diverged=after_divergence)
        if refused:
            more = f" (+{len(refused) - 3} more)" if len(refused) > 3 else ""
            raise UserError(
                f"{path}: resuming with settings that change the run's arithmetic: {'; '.join(refused[:3])}{more}; "
                "resume with the checkpoint's values" + (" (the same peft.* keys)" if any(r.startswith("peft.") for r in
                                                                                  refused) else "")
                + ", or start a new run (another output_dir, or overwrite=true)")
        if applied:
            self.info(f"resume: applying changed settings: {'; '.join(applied)}")
        self._retune = after_divergence and any(c.split(":")[0] in ckpt.RESUME_AFTER_DIVERGENCE for c in applied)

    def _state(self, health: dict | None = None) -> dict:
        return {
            "format": ckpt.FORMAT,
            "step": self.step,
            "optimizer": self.optimizer.state_dict() if self.fsdp is None else None,
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "extra": {k: g() for k, (g, _) in self.extra_state.items()},
            "world": self.dist.world,
            "distributed": self.mode,
            "health": health,
        }

    def _write_state(self, d: Path, health: dict) -> None:
        ckpt.save_state(self._state(health), d / ckpt.STATE_FILE, d / ckpt.STATE_TENSORS)
        (d / "config.yaml").write_text(dump_config(self.cfg), encoding="utf-8")

    def _warn_unsane(self, health: dict, path: Path) -> None:
        if not health["sane"]:
            good = ckpt.latest_sane_checkpoint(self.run_dir)
            self.info(f"warning: {path} holds blown-up weights (parameter norm {health['param_norm']:.3g}, "
                      f"start {self._ref_norm:.3g}); it is kept but never resumed from; last sane: {good}")

    def save_checkpoint(self) -> Path:
        """Write checkpoints/step-N atomically (every process takes part): weights, training
        state (JSON + safetensors, no pickle), one RNG file per process, config, health record."""
        health = self._health()
        if self.fsdp is not None:
            return self._save_sharded_checkpoint(health)
        final = ckpt.checkpoint_dir(self.run_dir, self.step)

        def write(tmp: Path) -> None:
            from alignkit.models import save_pretrained

            save_pretrained(self.model, self.tokenizer, tmp)
            self._write_state(tmp, health)

        # RNG streams are per rank: each rank writes its own files into a staging folder of this run.
        stage = self.run_dir / "checkpoints" / f".rng-step-{self.step:07d}-{self._tag}"
        if self.dist.main:
            stage.mkdir(parents=True, exist_ok=True)
        barrier(self.dist)
        ckpt.save_state(ckpt.rng_state(), *ckpt.rng_files(stage, self.dist.rank))
        barrier(self.dist)
        if self.dist.main:
            def write_all(tmp: Path) -> None:
                write(tmp)
                for f in stage.iterdir():
                    os.replace(f, tmp / f.name)

            ckpt.atomic_dir_write(final, write_all)
            stage.rmdir()
            ckpt.prune_checkpoints(self.run_dir, self.cfg.save_total_limit)
            self._warn_unsane(health, final)
        barrier(self.dist)
        return final

    def _save_sharded_checkpoint(self, health: dict | None = None) -> Path:
        """FSDP: every process writes its shards (torch.distributed.checkpoint) into a staging folder
        named the same on every process; rank 0 adds the trainer state and renames it into place."""
        from alignkit.training.fsdp import SHARDED_DIR

        health = health if health is not None else self._health()
        final = ckpt.checkpoint_dir(self.run_dir, self.step)
        stage = final.parent / f".{final.name}.tmp-{self._tag}"
        if self.dist.main:
            if stage.exists():
                import shutil

                shutil.rmtree(stage)
            stage.mkdir(parents=True)
        barrier(self.dist)
        self.fsdp.save(stage / SHARDED_DIR, self.optimizer)
        for name, (save, _) in self.sharded_state.items():
            save(stage / name)
        ckpt.save_state(ckpt.rng_state(), *ckpt.rng_files(stage, self.dist.rank))
        full = self.fsdp.full_state_dict() if self.cfg.fsdp.consolidate_checkpoints else None
        barrier(self.dist)
        if self.dist.main:
            if full is not None:
                self._save_hf(stage, full)
            self._write_state(stage, health)
            ckpt.commit_dir(stage, final)
            ckpt.prune_checkpoints(self.run_dir, self.cfg.save_total_limit)
            self._warn_unsane(health, final)
        barrier(self.dist)
        return final

    def _save_hf(self, out_dir: Path, state_dict: dict | None = None) -> None:
        from alignkit.models import save_pretrained

        save_pretrained(self.model, self.tokenizer, out_dir, state_dict=state_dict)
        if self.fsdp is not None:
            from alignkit.training.fsdp import fix_saved_architectures

            fix_saved_architectures(out_dir)

    def load_checkpoint(self, path: Path) -> None:
        """Restore weights, optimizer, schedule, scaler, recipe state, step and this process's RNG
        streams from checkpoint `path`, bit for bit. Nothing here unpickles: a checkpoint in the
        old pickle format is refused (UnsafeCheckpoint, one line)."""
        from alignkit.training.fsdp import SHARDED_DIR

        path = Path(path)
        if not (path / ckpt.STATE_FILE).is_file():
            raise ckpt.UnsafeCheckpoint(
                f"{path}: no {ckpt.STATE_FILE}" + (f"; its {ckpt.LEGACY_STATE_FILE} is in the old pickle format, which "
                                                   "resume no longer loads because unpickling runs code named in "
                                                   "the file" if (path / ckpt.LEGACY_STATE_FILE).exists() else "")
                + f"; start a new run from its weights (model={path}) or resume from a checkpoint written by this "
                  "version")
        state = ckpt.load_state(path / ckpt.STATE_FILE)
        if (path / SHARDED_DIR).is_dir():
            # Written under FSDP: loads into any number of processes, sharded or not.
            self.load_sharded_state(path / SHARDED_DIR)
        elif self.fsdp is not None:
            raise UserError(f"{path}: checkpoint was written without FSDP (distributed="
                            f"{state.get('distributed', 'ddp')}); resume it with that setting")
        else:
            _load_weights(self.model, path)
            self.optimizer.load_state_dict(state["optimizer"])
        for name, (_, load) in self.sharded_state.items():
            if (path / name).is_dir():
                load(path / name)
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        for k, (_, set_) in self.extra_state.items():
            if k in state.get("extra", {}):
                set_(state["extra"][k])
        self.step = int(state["step"])
        health = state.get("health") or {}
        if health.get("ref_param_norm") is not None:
            self._ref_norm = float(health["ref_param_norm"])  # the run's start, not this resume's
        if self._retune:
            self._apply_lr()
        rng_json, _ = ckpt.rng_files(path, self.dist.rank)
        if rng_json.is_file():
            ckpt.set_rng_state(ckpt.load_state(rng_json))
        else:
            if self.dist.main:
                self.info(f"resume: {path} has no RNG state for rank {self.dist.rank} (world size changed); "
                          "reseeding")
            seed_everything(self.cfg.seed + 1000 * self.dist.rank + self.step)
        if self.dist.main:
            ckpt.truncate_metrics(self.metrics.path, self.step)
            self.metrics.resume_at(self.step)  # trackers hide the killed run's records after the checkpoint
        self.info(f"resumed from {path} at step {self.step}")

    def _apply_lr(self) -> None:
        """After a divergence, resume with this run's lr: the loaded schedule holds the old peak
        (LambdaLR keeps base_lrs); the schedule's shape keys are read from the config each step."""
        sched = self.scheduler
        sched.base_lrs = [self.cfg.lr for _ in self.optimizer.param_groups]
        for g in self.optimizer.param_groups:
            g["initial_lr"] = self.cfg.lr
            g["lr"] = self.cfg.lr * self._lr_lambda(sched.last_epoch)
        sched._last_lr = [g["lr"] for g in self.optimizer.param_groups]
        self.info(f"resume: lr {self.cfg.lr:g} from step {self.step + 1} (this step: {sched._last_lr[0]:.3g})")

    def save_final(self) -> None:
        """Write the final model (HF format) into the run folder root, atomically per file."""
        # Under FSDP every process takes part in gathering the full weights to rank 0.
        full = self.fsdp.full_state_dict() if self.fsdp is not None else None
        if self.dist.main:
            tmp = self.run_dir / f".final.tmp-{os.getpid()}"
            ckpt.atomic_dir_write(tmp, lambda d: self._save_hf(d, full))
            for f in tmp.iterdir():
                os.replace(f, self.run_dir / f.name)
            tmp.rmdir()
            if self.cfg.plot:
                plot_metrics(self.run_dir / "metrics.jsonl", self.run_dir / "curves.png")
        barrier(self.dist)

    # ------------------------------------------------------------------ progress + logging
    def start_progress(self) -> None:
        """Show the progress bar (main process, progress=true), counting optimizer steps."""
        if self.dist.main and self.cfg.progress:
            # a bar on a terminal, plain periodic lines in a log (alignkit.training.logging.progress_bar)
            self._bar = progress_bar(total=self.total_steps, initial=self.step, desc=self.recipe, unit="step",
                                     leave=None)  # stays on its own, vanishes when nested under another bar

    def wants_log(self, step: int) -> bool:
        """Whether optimizer step `step` gets a metrics record (every `log_every`, and the last)."""
        return step % self.cfg.log_every == 0 or step == self.total_steps

    def log_step(self, metrics: dict, step: int | None = None, record_step: int | None = None) -> None:
        """Advance the progress bar by one optimizer step; write `metrics` as the record of
        optimizer step `step` (default: the current one) when `wants_log(step)`, filed under
        `record_step` (default `step`; the loop passes the rollout step for online recipes)."""
        step = self.step if step is None else step
        if self._bar is not None:
            self._bar.update(1)
        if not self.wants_log(step):
            return
        metrics["elapsed_s"] = time.time() - self._t0
        metrics.update(peak_memory(self.device))
        self.metrics.write(step if record_step is None else record_step, metrics)
        if self._bar is not None:
            show = {k: metrics[k] for k in ("loss", "lr", "tokens_per_s") if k in metrics}
            self._bar.set_postfix({k: (f"{v:.3g}" if k != "lr" else f"{v:.2e}") for k, v in show.items()})
        elif self.dist.main and self.cfg.progress is False and os.environ.get("ALIGNKIT_LOG_STEPS"):
            self._print(f"step {step}: " + " ".join(f"{k}={v:.4g}" for k, v in metrics.items()
                                                    if isinstance(v, float)))

    def log_eval(self, metrics: dict, record_step: int | None = None) -> None:
        """Write an evaluation record (kind "eval") at `record_step` (default the optimizer step)
        and print it."""
        step = self.step if record_step is None else record_step
        self.metrics.write(step, metrics, kind="eval")
        self.info(f"eval @ step {step}: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()
                                                      if isinstance(v, (int, float))))

    def close(self) -> None:
        """End of the run (also on error): close the bar and the metrics; release the run folder."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self.metrics.close()
        if self._lock is not None:
            self._lock.release()
            self._lock = None


def _load_weights(model: torch.nn.Module, path: Path) -> None:
    """Load the weights saved in checkpoint `path` into `model` (full model or peft adapter)."""
    from safetensors.torch import load_file

    peft = sys.modules.get("peft")
    is_peft = peft is not None and isinstance(model, peft.PeftModel)
    if (path / "adapter_model.safetensors").is_file():
        if not is_peft:
            raise UserError(f"{path}: checkpoint holds an adapter, but this run trains without one; resume with the "
                            "same peft.method as the run that wrote it")
        from peft import set_peft_model_state_dict

        try:
            res = set_peft_model_state_dict(model, load_file(str(path / "adapter_model.safetensors")))
        except RuntimeError as e:  # shape mismatch: r / block size / targets changed
            lines = [ln.strip() for ln in str(e).splitlines() if "mismatch" in ln] or [str(e).strip()]
            raise UserError(f"{path}: adapter does not match this run's peft settings ({lines[0][:240]}); "
                            "resume with the same peft.* keys") from None
        # The base weights are "missing" by design; adapter weights missing means another adapter layout.
        name = model.active_adapter if isinstance(model.active_adapter, str) else model.active_adapter[0]
        missing = [k for k in res.missing_keys if f".{name}." in f".{k}."]
        if res.unexpected_keys or missing:
            raise UserError(f"{path}: adapter does not match this run's peft settings ("
                            f"{'unexpected' if res.unexpected_keys else 'missing'} "
                            f"{(res.unexpected_keys or missing)[:2]}); resume with the same peft.* keys")
        return
    if is_peft:
        raise UserError(f"{path}: checkpoint holds a full model, but this run trains an adapter; "
                        "resume with the same peft.method as the run that wrote it")
    weights = {}
    for f in sorted(path.glob("*.safetensors")):
        weights.update(load_file(str(f)))
    res = model.load_state_dict(weights, strict=False)
    sd = model.state_dict()
    # Tied weights (lm_head = embeddings) are stored once; a missing key sharing storage is fine.
    loaded = {sd[k].data_ptr() for k in weights if k in sd}
    missing = [k for k in res.missing_keys if sd[k].data_ptr() not in loaded]
    if missing:
        raise UserError(f"{path}: checkpoint does not match the model (missing {missing[:3]})")
