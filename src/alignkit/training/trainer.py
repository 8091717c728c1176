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
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from alignkit.config import TrainConfig, dump_config
from alignkit.errors import UserError
from alignkit.training import checkpoint as ckpt
from alignkit.training.dist import DistInfo, all_reduce_sum, barrier, init_distributed
from alignkit.training.logging import MetricsLog, plot_metrics, progress_bar, say

# loss_fn(model, micro_batch) -> (loss_sum: scalar tensor, metric_sums: dict[str, float|tensor])
LossFn = Callable[[torch.nn.Module, dict], tuple[torch.Tensor, dict]]


class TrainingDiverged(UserError):
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
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def param_counts(model: torch.nn.Module) -> tuple[int, int]:
    if hasattr(model, "get_nb_trainable_parameters"):  # peft: counts packed 4-bit weights at their real size
        return model.get_nb_trainable_parameters()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def autocast_dtype(cfg_dtype: str, device: torch.device) -> torch.dtype | None:
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
    ):
        self.cfg = cfg
        self.recipe = recipe
        self.tokenizer = tokenizer
        self.dist = dist_info or init_distributed()
        self.run_dir = Path(cfg.output_dir)
        self.total_steps = total_steps
        self.step = 0
        self.extra_state: dict[str, Callable] = {}  # name -> (get, set) pairs registered by recipes
        self._print = log or say  # tqdm.write: never on the line of a bar (this run's or an outer one)
        self.device = self.dist.device
        self.amp_dtype = autocast_dtype(cfg.dtype, self.device)

        trainable, total = param_counts(model)
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
        self.metrics = MetricsLog(self.run_dir, enabled=self.dist.main, tensorboard=cfg.tensorboard,
                                  report_to=getattr(cfg, "report_to", None), name=f"{recipe}:{self.run_dir.name}",
                                  config=cfg.model_dump(mode="json") if self.dist.main else None)
        self._t0 = time.time()
        self._tokens_since = 0
        self._time_since = time.time()
        self._bar = None

    # ------------------------------------------------------------------ helpers
    def info(self, msg: str) -> None:
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

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _fused_adamw(self, params) -> bool:
        """Not with FSDP on CPU (sharded DTensor params there go through the foreach path) or with
        CPU offload; otherwise whenever the kernel takes the parameters."""
        if self.fsdp:
            return self.device.type == "cuda" and not self.cfg.fsdp.cpu_offload
        return fused_adamw_ok(params)

    def _trainable(self) -> list[torch.Tensor]:
        if self.fsdp is not None:
            return self.fsdp.params
        return [p for p in self.model.parameters() if p.requires_grad]

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
        return {k: (v.to(self.device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}

    def register_state(self, name: str, get: Callable[[], dict], set_: Callable[[dict], None]) -> None:
        """Recipe state (a moving-average baseline, a KL controller) saved in checkpoints."""
        self.extra_state[name] = (get, set_)

    # ------------------------------------------------------------------ the step
    def accumulate(self, micro_batches: list[dict], loss_fn: LossFn, units: Callable[[dict], float]) -> dict:
        """Forward/backward over the micro-batches of one optimizer step (this rank's share).

        `loss_fn` returns (loss_sum, metrics): a metric given as a number is a sum over units and
        is reported divided by the global units; one given as a (numerator, denominator) pair is
        reported as the ratio of their global sums (e.g. a token-mean under a sequence-mean loss).
        Returns the metrics of the global batch."""
        local_units = float(sum(units(mb) for mb in micro_batches))
        global_units = float(all_reduce_sum(local_units, self.dist))
        if global_units <= 0:
            raise UserError(
                f"step {self.step + 1}: nothing to train on in this batch (every label is masked); "
                "check the data's answers and max_length"
            )
        scale = self.dist.world / global_units
        if self.fsdp is not None:
            self.fsdp.model.unshard()  # the root group is kept gathered (no-op when it is)
        sums: dict[str, float] = {}
        loss_total = torch.zeros((), dtype=torch.float64)
        self.train_model.train()
        for i, mb in enumerate(micro_batches):
            mb = self.to_device(mb)
            last = i == len(micro_batches) - 1
            ddp = self.mode == "ddp"  # FSDP reduce-scatters every micro-batch: sharded gradients, less memory
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
        keys = sorted(sums)
        red = all_reduce_sum(torch.tensor([float(loss_total)] + [sums[k] for k in keys], dtype=torch.float64), self.dist)
        got = {k: float(red[i + 1]) for i, k in enumerate(keys)}
        out = {"loss": float(red[0]) / global_units}
        for k, v in got.items():
            if k.endswith("\0num"):
                name = k[:-4]
                out[name] = v / max(got[name + "\0den"], 1e-12)
            elif not k.endswith("\0den"):
                out[k] = v / global_units
        out["units"] = global_units
        return out

    def optimizer_step(self, metrics: dict) -> dict:
        """Clip, step, schedule. A non-finite loss or gradient stops the run before the update,
        after saving the (still good) state as a checkpoint."""
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
            path = self.save_checkpoint()
            raise TrainingDiverged(
                f"step {self.step + 1}: loss is {metrics['loss']} (grad norm {float(gnorm):.3g}); stopped before the "
                f"update, last good state saved at {path}; lower lr or check the data"
            )
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
        self.step += 1
        return metrics

    # ------------------------------------------------------------------ run folder
    def prepare_run_dir(self) -> Path | None:
        """Create the run folder; return the checkpoint to resume from, if any."""
        cfg = self.cfg
        resume_from: Path | None = None
        if self.dist.main:
            ckpt.clean_stale_tmp(self.run_dir)
        if cfg.resume:
            if isinstance(cfg.resume, str) and cfg.resume.lower() not in ("true", "latest"):
                resume_from = Path(cfg.resume)
                if not (resume_from / ckpt.STATE_FILE).is_file():
                    raise UserError(f"resume={cfg.resume}: not a checkpoint folder (no {ckpt.STATE_FILE})")
            else:
                resume_from = ckpt.latest_checkpoint(self.run_dir)
                if resume_from is None:
                    self.info(f"resume: no checkpoint in {self.run_dir}/checkpoints; starting from scratch")
        elif self.run_dir.exists() and any(self.run_dir.iterdir()) and not cfg.overwrite:
            if (self.run_dir / "config.json").exists() or ckpt.list_checkpoints(self.run_dir):
                raise UserError(
                    f"{self.run_dir}: output_dir already holds a run; pass resume=true to continue it, "
                    "overwrite=true to replace it, or another output_dir"
                )
        barrier(self.dist)
        if self.dist.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(dump_config(cfg), encoding="utf-8")
            if not cfg.resume and cfg.overwrite:
                for name in ("metrics.jsonl",):
                    (self.run_dir / name).unlink(missing_ok=True)
        barrier(self.dist)
        return resume_from

    def _state(self) -> dict:
        return {
            "step": self.step,
            "optimizer": self.optimizer.state_dict() if self.fsdp is None else None,
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "extra": {k: g() for k, (g, _) in self.extra_state.items()},
            "world": self.dist.world,
            "distributed": self.mode,
        }

    def save_checkpoint(self) -> Path:
        if self.fsdp is not None:
            return self._save_sharded_checkpoint()
        final = ckpt.checkpoint_dir(self.run_dir, self.step)
        tmp_holder: dict = {}

        def write(tmp: Path) -> None:
            tmp_holder["tmp"] = tmp
            from alignkit.models import save_pretrained

            save_pretrained(self.model, self.tokenizer, tmp)
            torch.save(self._state(), tmp / ckpt.STATE_FILE)
            (tmp / "config.yaml").write_text(dump_config(self.cfg), encoding="utf-8")

        # RNG streams are per rank: each rank writes its own file into a shared staging folder.
        stage = self.run_dir / "checkpoints" / f".rng-step-{self.step:07d}"
        if self.dist.main:
            stage.mkdir(parents=True, exist_ok=True)
        barrier(self.dist)
        torch.save(ckpt.rng_state(), stage / f"rng-{self.dist.rank}.pt")
        barrier(self.dist)
        if self.dist.main:
            def write_all(tmp: Path) -> None:
                write(tmp)
                for f in stage.iterdir():
                    os.replace(f, tmp / f.name)

            ckpt.atomic_dir_write(final, write_all)
            stage.rmdir()
            ckpt.prune_checkpoints(self.run_dir, self.cfg.save_total_limit)
        barrier(self.dist)
        return final

    def _save_sharded_checkpoint(self) -> Path:
        """FSDP: every process writes its shards (torch.distributed.checkpoint) into a staging folder
        named the same on every process; rank 0 adds the trainer state and renames it into place."""
        from alignkit.training.fsdp import SHARDED_DIR

        final = ckpt.checkpoint_dir(self.run_dir, self.step)
        stage = final.parent / f".{final.name}.tmp-sharded"
        if self.dist.main:
            if stage.exists():
                import shutil

                shutil.rmtree(stage)
            stage.mkdir(parents=True)
        barrier(self.dist)
        self.fsdp.save(stage / SHARDED_DIR, self.optimizer)
        torch.save(ckpt.rng_state(), stage / f"rng-{self.dist.rank}.pt")
        full = self.fsdp.full_state_dict() if self.cfg.fsdp.consolidate_checkpoints else None
        barrier(self.dist)
        if self.dist.main:
            if full is not None:
                self._save_hf(stage, full)
            torch.save(self._state(), stage / ckpt.STATE_FILE)
            (stage / "config.yaml").write_text(dump_config(self.cfg), encoding="utf-8")
            ckpt.commit_dir(stage, final)
            ckpt.prune_checkpoints(self.run_dir, self.cfg.save_total_limit)
        barrier(self.dist)
        return final

    def _save_hf(self, out_dir: Path, state_dict: dict | None = None) -> None:
        from alignkit.models import save_pretrained

        save_pretrained(self.model, self.tokenizer, out_dir, state_dict=state_dict)
        if self.fsdp is not None:
            from alignkit.training.fsdp import fix_saved_architectures

            fix_saved_architectures(out_dir)

    def load_checkpoint(self, path: Path) -> None:
        from alignkit.training.fsdp import SHARDED_DIR, load_sharded

        state = torch.load(path / ckpt.STATE_FILE, map_location="cpu", weights_only=False)
        if (path / SHARDED_DIR).is_dir():
            # Written under FSDP: loads into any number of processes, sharded or not.
            if self.fsdp is not None:
                self.fsdp.load(path / SHARDED_DIR, self.optimizer)
            else:
                load_sharded(self.model, self.optimizer, path / SHARDED_DIR)
        elif self.fsdp is not None:
            raise UserError(f"{path}: checkpoint was written without FSDP (distributed="
                            f"{state.get('distributed', 'ddp')}); resume it with that setting")
        else:
            _load_weights(self.model, path)
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        for k, (_, set_) in self.extra_state.items():
            if k in state.get("extra", {}):
                set_(state["extra"][k])
        self.step = int(state["step"])
        rng_file = path / f"rng-{self.dist.rank}.pt"
        if rng_file.exists():
            ckpt.set_rng_state(torch.load(rng_file, weights_only=False))
        elif self.dist.main:
            self.info(f"resume: {path} has no RNG state for rank {self.dist.rank} (world size changed); reseeding")
            seed_everything(self.cfg.seed + 1000 * self.dist.rank + self.step)
        self.metrics.truncate_after(self.step)
        self.info(f"resumed from {path} at step {self.step}")

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
        if self.dist.main and self.cfg.progress:
            # a bar on a terminal, plain periodic lines in a log (alignkit.training.logging.progress_bar)
            self._bar = progress_bar(total=self.total_steps, initial=self.step, desc=self.recipe, unit="step",
                                     leave=None)  # stays on its own, vanishes when nested under another bar

    def count_tokens(self, n: int) -> None:
        self._tokens_since += n

    def log_step(self, metrics: dict, force: bool = False) -> None:
        now = time.time()
        if self._bar is not None:
            self._bar.update(1)
        if not (force or self.step % self.cfg.log_every == 0 or self.step == self.total_steps):
            return
        dt = max(now - self._time_since, 1e-9)
        tokens = float(all_reduce_sum(self._tokens_since, self.dist))
        if tokens:
            metrics["tokens_per_s"] = tokens / dt
        metrics["elapsed_s"] = now - self._t0
        metrics.update(peak_memory(self.device))
        self._tokens_since, self._time_since = 0, now
        self.metrics.write(self.step, metrics)
        if self._bar is not None:
            show = {k: metrics[k] for k in ("loss", "lr", "tokens_per_s") if k in metrics}
            self._bar.set_postfix({k: (f"{v:.3g}" if k != "lr" else f"{v:.2e}") for k, v in show.items()})
        elif self.dist.main and self.cfg.progress is False and os.environ.get("ALIGNKIT_LOG_STEPS"):
            self._print(f"step {self.step}: " + " ".join(f"{k}={v:.4g}" for k, v in metrics.items()
                                                         if isinstance(v, float)))

    def log_eval(self, metrics: dict) -> None:
        self.metrics.write(self.step, metrics, kind="eval")
        self.info(f"eval @ step {self.step}: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()
                                                           if isinstance(v, (int, float))))

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self.metrics.close()


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


def run_offline(
    trainer: Trainer,
    n_rows: int,
    make_batch: Callable[[list[int]], dict],
    loss_fn: LossFn,
    units: Callable[[dict], float],
    eval_fn: Callable[[], dict] | None = None,
    tokens: Callable[[dict], int] | None = None,
) -> dict:
    """Drive a dataset-based recipe (SFT, reward models, DPO) through the trainer.

    Data order: a permutation of the rows per epoch from (seed, epoch); each optimizer step takes
    the next `batch_size * grad_accum * world` rows, incomplete global batches are dropped. Rank r
    takes its contiguous share and splits it into `grad_accum` micro-batches. The position in the
    data is a pure function of the step, so resume needs no iterator state.
    """
    cfg, d = trainer.cfg, trainer.dist
    per_rank = cfg.batch_size * cfg.grad_accum
    global_batch = per_rank * d.world
    steps_per_epoch = n_rows // global_batch
    if steps_per_epoch == 0:
        raise UserError(
            f"the data has {n_rows} usable rows, fewer than one global batch of {global_batch} "
            f"(batch_size x grad_accum x processes); lower batch_size/grad_accum or add rows"
        )
    order_cache: dict[int, torch.Tensor] = {}

    def rows_for_step(step: int) -> list[int]:
        epoch, k = divmod(step, steps_per_epoch)
        if epoch not in order_cache:
            order_cache.clear()
            g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
            order_cache[epoch] = torch.randperm(n_rows, generator=g)
        idx = order_cache[epoch][k * global_batch:(k + 1) * global_batch].tolist()
        return idx[d.rank * per_rank:(d.rank + 1) * per_rank]

    last_eval: dict = {}
    trainer.start_progress()
    try:
        while trainer.step < trainer.total_steps:
            mine = rows_for_step(trainer.step)
            mbs = [make_batch(mine[i * cfg.batch_size:(i + 1) * cfg.batch_size]) for i in range(cfg.grad_accum)]
            if tokens is not None:
                trainer.count_tokens(sum(tokens(mb) for mb in mbs))
            metrics = trainer.accumulate(mbs, loss_fn, units)
            metrics["epoch"] = trainer.step / steps_per_epoch
            metrics = trainer.optimizer_step(metrics)
            trainer.log_step(metrics)
            if cfg.save_every and trainer.step % cfg.save_every == 0 and trainer.step < trainer.total_steps:
                trainer.save_checkpoint()
            if eval_fn and cfg.eval_every and trainer.step % cfg.eval_every == 0 and trainer.step < trainer.total_steps:
                with trainer.gathered():
                    last_eval = eval_fn()
                trainer.log_eval(last_eval)
        if eval_fn:
            with trainer.gathered():
                last_eval = eval_fn()
            trainer.log_eval(last_eval)
        trainer.save_checkpoint()
        trainer.save_final()
    finally:
        trainer.close()
    return last_eval


def steps_for(cfg: TrainConfig, n_rows: int, world: int) -> int:
    global_batch = cfg.batch_size * cfg.grad_accum * world
    per_epoch = n_rows // global_batch
    if per_epoch == 0:  # checked here, before the Trainer creates the run folder
        raise UserError(
            f"the data has {n_rows} usable rows, fewer than one global batch of {global_batch} "
            f"(batch_size x grad_accum x processes); lower batch_size/grad_accum or add rows"
        )
    if cfg.max_steps and cfg.max_steps > 0:
        return cfg.max_steps
    return max(1, math.ceil(cfg.epochs * per_epoch))
