"""The one outer loop every recipe runs in.

A recipe hands `run_loop` a step function; the loop owns everything around it:

    resume            run folder, checkpoint to resume from, restored state (`Trainer`)
    for each step     result = step_fn(index, clock)        (the recipe's algorithm)
                      log every optimizer step the step made, with its timings and rates
                      write samples.jsonl from the rollout the step returned
                      checkpoint / evaluate on their cadence
    at the end        evaluate, final checkpoint, final model

Offline recipes (SFT, reward models, DPO) make one optimizer step per loop step: next batch,
accumulate, update (`run_offline`). Online recipes make one *rollout step* per loop step:
collect a rollout, score it, compute advantages, then one or more optimizer steps on it
(`updates_per_step`: GRPO's μ, PPO's epochs x minibatches, rejection sampling's SFT steps).
`max_steps`, `save_every`, `eval_every` and `sample_every` count loop steps. In metrics.jsonl,
`step` is the loop step too: the optimizer step offline, the rollout step online, where each
record (one per optimizer step) also carries `optimizer_step`, so the records of one rollout
share their `step` (see docs/methods.md).

Rates, measured over the wall time of the loop steps since the last record written:
`tokens_per_s` = non-padding tokens through the trained model's forward and backward passes
(every micro-batch of every optimizer step) per second; `generated_tokens_per_s` = sampled
tokens per second (online recipes). Both include all the step's phases (generation, scoring,
no-grad passes, updates) in the time.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from alignkit.config import TrainConfig
from alignkit.data.order import epoch_order
from alignkit.errors import UserError
from alignkit.training.dist import all_reduce_sum

__all__ = ["StepClock", "StepResult", "run_loop", "run_offline", "steps_for", "to_device", "write_samples"]


def to_device(batch: dict, device) -> dict:
    """The batch dict with every tensor moved to `device` (other values as they are)."""
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


class StepClock:
    """Wall time of one loop step split by phase: `lap(name)` adds the time since the previous lap
    to `name`; `metrics()` gives them as `time_<name>_s` (seconds)."""

    def __init__(self):
        self.t: dict[str, float] = {}
        self._last = time.time()

    def lap(self, name: str) -> None:
        """Add the time since the previous lap (or the clock's start) to phase `name`."""
        now = time.time()
        self.t[name] = self.t.get(name, 0.0) + now - self._last
        self._last = now

    def add(self, name: str, seconds: float) -> None:
        """Add a phase timed elsewhere; the next lap starts now."""
        self.t[name] = self.t.get(name, 0.0) + seconds
        self._last = time.time()

    def metrics(self) -> dict:
        """{'time_<phase>_s': seconds} of every phase so far."""
        return {f"time_{k}_s": v for k, v in self.t.items()}


@dataclass
class StepResult:
    """What one loop step returns.

    updates: the metrics of each optimizer step it made, in order (each as returned by
    `Trainer.optimizer_step` / `Trainer.skip_update`, with the step's shared metrics merged in).
    rollout: the rollout it trained on (`alignkit.rollout.Rollout`), for samples.jsonl; None offline.
    generated_tokens: tokens sampled by this process in the step (all draws, kept or not)."""

    updates: list[dict] = field(default_factory=list)
    rollout: object | None = None
    generated_tokens: int = 0


def write_samples(path: Path, step: int, rollout, k: int = 4) -> None:
    """Append the first `k` samples of `rollout` to `path` (JSON lines): step, the prompt each
    completion was drawn for (its last message's text), the completion, the reward it was trained
    with (null when the reward source could not score it) and its finish reason; of a multi-turn
    episode also its `turns` (the model's turns and the environment's messages after the prompt)."""
    with path.open("a", encoding="utf-8") as f:
        for i in range(min(k, len(rollout))):
            s = rollout.samples[i]
            p = rollout.prompt_of(i)
            r = float(rollout.rewards[i])
            rec = {"step": step, "prompt": p[-1]["content"] if isinstance(p, list) else p, "completion": s.text,
                   "reward": None if r != r else r, "finish": s.finish_reason}
            if getattr(s, "messages", None):
                rec["turns"] = s.messages[len(p) if isinstance(p, list) else 0:]
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")


def run_loop(trainer, step_fn: Callable[[int, StepClock], StepResult], *, updates_per_step: int = 1,
             eval_fn: Callable[[], dict] | None = None, sample_every: int = 0, online: bool = False,
             prepare: Callable[[], None] | None = None, describe: str | None = None) -> dict:
    """Run `step_fn(index, clock)` for loop steps index = trainer.step // updates_per_step until
    `trainer.total_steps` optimizer steps are done; returns the last evaluation's metrics.

    `prepare()` runs after the run folder is set up and before a checkpoint is loaded (work that
    needs the starting weights, e.g. DPO's cached reference log-probs). `describe` is printed
    once resumed. Evaluation runs under the trainer's FSDP gathering and autocast, like training.
    Raises what the step raises; `TrainingDiverged` leaves the last good state as a checkpoint."""
    cfg: TrainConfig = trainer.cfg
    counters = {"generated_tokens": 0}
    trainer.register_state("loop", lambda: dict(counters), lambda s: counters.update(s))
    resume = trainer.prepare_run_dir()
    if prepare is not None:
        prepare()
    if resume is not None:
        trainer.load_checkpoint(resume)
    if describe:
        trainer.info(describe)

    def evaluate() -> dict:
        with trainer.gathered(), trainer.autocast():
            out = eval_fn()
        if online:  # filed under the rollout step, with the optimizer step for resume's truncation
            trainer.log_eval({**out, "optimizer_step": trainer.step}, record_step=trainer.step // updates_per_step)
        else:
            trainer.log_eval(out)
        return out

    last_eval: dict = {}
    made = {"updates": 0, "skipped": 0}
    since = {"trained": 0.0, "generated": 0.0, "t": time.time()}
    trainer.start_progress()
    try:
        while trainer.step < trainer.total_steps:
            index = trainer.step // updates_per_step
            first = trainer.step
            clock = StepClock()
            result = step_fn(index, clock)
            if trainer.step != first + len(result.updates):
                raise AssertionError(f"step {index}: {len(result.updates)} updates returned, "
                                     f"{trainer.step - first} made")
            clock.lap("train")
            done = index + 1
            generated = int(all_reduce_sum(result.generated_tokens, trainer.dist)) if online else 0
            counters["generated_tokens"] += generated
            since["generated"] += generated
            since["trained"] += sum(u.pop("trained_tokens", 0.0) for u in result.updates)
            made["updates"] += len(result.updates)
            made["skipped"] += sum(int(u.get("skipped_steps", 0)) for u in result.updates)
            logged = {}
            for i, m in enumerate(result.updates):
                step = first + i + 1
                if online:
                    m["optimizer_step"] = step
                    m["generated_tokens"] = counters["generated_tokens"]
                if online and i == len(result.updates) - 1:
                    m.update(clock.metrics())
                if trainer.wants_log(step):
                    if not logged:  # one rate for every record of this step
                        dt = max(time.time() - since["t"], 1e-9)
                        if since["trained"]:
                            logged["tokens_per_s"] = since["trained"] / dt
                        if since["generated"]:
                            logged["generated_tokens_per_s"] = since["generated"] / dt
                        since.update(trained=0.0, generated=0.0, t=time.time())
                    m.update(logged)
                trainer.log_step(m, step, record_step=done if online else step)
            if trainer.dist.main and sample_every and result.rollout is not None and done % sample_every == 0:
                write_samples(trainer.run_dir / "samples.jsonl", done, result.rollout)
            if cfg.save_every and done % cfg.save_every == 0 and trainer.step < trainer.total_steps:
                trainer.save_checkpoint()
            if eval_fn and cfg.eval_every and done % cfg.eval_every == 0 and trainer.step < trainer.total_steps:
                last_eval = evaluate()
        if made["updates"] and made["skipped"] == made["updates"]:
            raise UserError(f"{trainer.recipe}: none of the {made['updates']} optimizer steps had anything to train on "
                            "(every loss token masked, every group tied or no sample kept); check the data's answers "
                            "and max_length, or max_new_tokens, truncated, threshold and the reward")
        if eval_fn:
            last_eval = evaluate()
        trainer.save_checkpoint()
        trainer.save_final()
    finally:
        trainer.close()
    return last_eval


def steps_for(cfg: TrainConfig, n_rows: int, world: int) -> int:
    """Optimizer steps of an offline run: `max_steps` when set, else `epochs` x full global
    batches per epoch (at least 1). Raises UserError when `n_rows` is less than one global batch
    (before the Trainer creates the run folder)."""
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


def run_offline(trainer, n_rows: int, make_batch: Callable[[list[int]], dict], loss_fn, units: Callable[[dict], float],
                eval_fn: Callable[[], dict] | None = None, prepare: Callable[[], None] | None = None) -> dict:
    """Drive a dataset recipe (SFT, reward models, DPO): each loop step takes the next
    `batch_size x grad_accum x world` rows of a seeded per-epoch permutation
    (`alignkit.data.order.epoch_order`), this rank's contiguous share split into `grad_accum`
    micro-batches of `make_batch(row indices)`, and makes one optimizer step. The position in the
    data is a pure function of the step, so resume needs no iterator state. Rows past the last
    full global batch of an epoch are not used in that epoch. Raises UserError when the data
    holds less than one global batch."""
    cfg, d = trainer.cfg, trainer.dist
    per_rank = cfg.batch_size * cfg.grad_accum
    global_batch = per_rank * d.world
    steps_per_epoch = n_rows // global_batch
    if steps_per_epoch == 0:
        raise UserError(
            f"the data has {n_rows} usable rows, fewer than one global batch of {global_batch} "
            f"(batch_size x grad_accum x processes); lower batch_size/grad_accum or add rows"
        )
    order = epoch_order(n_rows, global_batch, cfg.seed)
    left_out = n_rows % global_batch
    if left_out:
        trainer.info(f"data order: {steps_per_epoch} steps of {global_batch} rows per epoch; {left_out} of the "
                     f"{n_rows} rows are left out of each epoch (a new permutation each epoch, so not the same rows)")

    def step(index: int, clock: StepClock) -> StepResult:
        mine = order(index)[d.rank * per_rank:(d.rank + 1) * per_rank]
        mbs = [make_batch(mine[i * cfg.batch_size:(i + 1) * cfg.batch_size]) for i in range(cfg.grad_accum)]
        metrics = trainer.accumulate(mbs, loss_fn, units)
        metrics["epoch"] = index / steps_per_epoch
        return StepResult([trainer.optimizer_step(metrics)])

    return run_loop(trainer, step, eval_fn=eval_fn, prepare=prepare)
