"""Machinery shared by the online RL recipes (REINFORCE, RLOO, GRPO, rejection sampling).

Each recipe file holds its algorithm; this module holds what they all do the same way:
loading the prompt set, the reference model, sampling with the rollout engine, scoring with a
reward source, building micro-batches of (prompt + completion) rows, teacher-forced log-probs,
per-step logging and held-out evaluation.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from alignkit.config import OnlineConfig
from alignkit.errors import UserError
from alignkit.ops.logprobs import causal_lm_token_logps
from alignkit.rollout.engine import RolloutBatch, RolloutEngine, SamplingParams
from alignkit.training.dist import DistInfo, all_reduce_sum


# --------------------------------------------------------------------------- prompts


@dataclass
class PromptSet:
    prompts: list  # message lists or text
    columns: dict[str, list] = field(default_factory=dict)  # the dataset's other columns

    def __len__(self) -> int:
        return len(self.prompts)

    def take(self, idx: list[int]) -> tuple[list, dict]:
        return [self.prompts[i] for i in idx], {k: [v[i] for i in idx] for k, v in self.columns.items()}


def load_prompts(path: str, split: str, column: str, chat: bool, what: str = "data") -> PromptSet:
    """A prompt set: the prompt (messages, or text when chat=false) and the other columns, which
    reward functions receive (e.g. `total`, or GSM8K's `answer` with prompt_column=question)."""
    from alignkit.rewards import columns_of, load_prompt_set

    rows = load_prompt_set(path, split, prompt_column=column, chat=chat, what=what)
    return PromptSet([r["prompt"] for r in rows], columns_of(rows))


def prompt_order(n: int, per_step: int, seed: int):
    """Global prompt indices of a rollout step: a seeded permutation per epoch, consumed in order."""
    if per_step > n:
        raise UserError(f"the prompt set has {n} prompts, fewer than one step's {per_step} "
                        "(batch_size x grad_accum x processes); lower batch_size or add prompts")
    steps_per_epoch = n // per_step
    cache: dict[int, list[int]] = {}

    def for_step(step: int) -> list[int]:
        epoch, k = divmod(step, steps_per_epoch)
        if epoch not in cache:
            cache.clear()
            g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            cache[epoch] = torch.randperm(n, generator=g).tolist()
        return cache[epoch][k * per_step:(k + 1) * per_step]

    return for_step


# --------------------------------------------------------------------------- models


def reference_policy(cfg: OnlineConfig, policy, device):
    """None when β = 0 (nothing is loaded). With an adapter, the policy itself is returned and
    the caller switches the adapter off (`ref_context`); otherwise a frozen copy is loaded."""
    if cfg.kl_coef <= 0:
        return None
    return load_reference(cfg, policy, device)


def load_reference(cfg: OnlineConfig, policy, device):
    """The reference whatever β: the policy itself with an adapter (switched off by
    `ref_context`), else a frozen copy of `cfg.ref_model` (default: the starting `cfg.model`)."""
    if cfg.ref_model is None and hasattr(policy, "disable_adapter"):
        return policy
    from alignkit.models import load_model

    ref = None
    if torch.device(device).type == "meta":  # FSDP, rank > 0: shapes only, rank 0 fills the shards
        from alignkit.training.fsdp import meta_model

        ref = meta_model(cfg.ref_model or cfg.model)
    if ref is None:
        ref = load_model(cfg.ref_model or cfg.model, "float32", "cpu" if torch.device(device).type == "meta" else device)
    ref.eval().requires_grad_(False)
    return ref


def ref_context(ref, policy):
    import contextlib

    if ref is policy and hasattr(policy, "disable_adapter"):
        return policy.disable_adapter()
    return contextlib.nullcontext()


def seq_logps(model, mb: dict, temperature: float, chunk: int, entropy: bool = False):
    """Per-token log-probs (B, T) of the completion tokens (0 elsewhere), optionally entropy."""
    return causal_lm_token_logps(model, mb["input_ids"], mb["attention_mask"], mb["position_ids"], mb["targets"],
                                 chunk_size=chunk, temperature=temperature if temperature > 0 else 1.0,
                                 return_entropy=entropy)


@torch.no_grad()
def forward_logps(model, mbs: list[dict], temperature: float, chunk: int, device, autocast) -> list[torch.Tensor]:
    out = []
    for mb in mbs:
        d = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in mb.items()}
        with autocast():
            out.append(seq_logps(model, d, temperature, chunk).float().cpu())
    return out


# --------------------------------------------------------------------------- rollouts


def sampling_params(cfg: OnlineConfig, step: int, rank: int, n: int | None = None, greedy=False) -> SamplingParams:
    return SamplingParams(
        n=n or cfg.num_generations, max_new_tokens=cfg.max_new_tokens, temperature=0.0 if greedy else cfg.temperature,
        top_p=cfg.top_p, top_k=cfg.top_k, stop=tuple(cfg.stop),
        seed=(cfg.seed * 1_000_003 + step) * 64 + rank, batch_size=cfg.generation_batch_size,
    )


def score(reward_fn, prompts: list, cols: dict, batch: RolloutBatch) -> tuple[torch.Tensor, int]:
    """Rewards of every sample (prompt columns repeated per sample); None counts as 0 and is reported."""
    n = batch.group_size
    ps = [prompts[s.prompt_index % len(prompts)] for s in batch.samples]
    rep = {k: [v[s.prompt_index % len(prompts)] for s in batch.samples] for k, v in cols.items()}
    vals = reward_fn(ps, batch.texts, **rep)
    missing = sum(v is None for v in vals)
    assert len(vals) == len(batch.samples) == len(prompts) * n
    return torch.tensor([0.0 if v is None else float(v) for v in vals], dtype=torch.float32), missing


def split_groups(batch: RolloutBatch, per_mb: int, n_mb: int, pad_id: int, extra: dict[str, torch.Tensor]) -> list[dict]:
    """Micro-batches of whole groups: micro-batch i holds prompts [i*per_mb, (i+1)*per_mb) with all
    their samples. `extra` holds per-sample tensors (advantages, rewards) to slice alongside."""
    G = batch.group_size
    out = []
    for i in range(n_mb):
        lo, hi = i * per_mb * G, (i + 1) * per_mb * G
        part = RolloutBatch(batch.samples[lo:hi], G)
        if not part.samples:
            raise AssertionError("empty micro-batch")
        mb = part.tensors(pad_id)
        for k, v in extra.items():
            mb[k] = v[lo:hi]
        out.append(mb)
    return out


def rollout_stats(batch: RolloutBatch, rewards: torch.Tensor) -> dict:
    lens = [len(s.completion_ids) for s in batch.samples]
    return {
        "reward_mean": float(rewards.mean()),
        "reward_std": float(rewards.std()) if rewards.numel() > 1 else 0.0,
        "response_len": sum(lens) / max(len(lens), 1),
        "truncated_frac": sum(s.finish_reason == "length" for s in batch.samples) / max(len(lens), 1),
    }


def mismatch(rollout_lp: torch.Tensor, trainer_lp: torch.Tensor, mask: torch.Tensor) -> tuple[float, float]:
    """(sum |Δ log p|, token count) between the engine's sampling log-probs and the trainer's."""
    m = mask.bool()
    return float((rollout_lp - trainer_lp).abs()[m].sum()), float(m.sum())


class StepClock:
    """Wall time split by phase (generate / score / train) for the step's log line."""

    def __init__(self):
        self.t = {}
        self._last = time.time()

    def lap(self, name: str) -> None:
        now = time.time()
        self.t[name] = self.t.get(name, 0.0) + now - self._last
        self._last = now

    def metrics(self) -> dict:
        return {f"time_{k}_s": v for k, v in self.t.items()}


def write_samples(run_dir: Path, step: int, prompts: list, batch: RolloutBatch, rewards: torch.Tensor, k: int = 4):
    with (run_dir / "samples.jsonl").open("a", encoding="utf-8") as f:
        for s, r in list(zip(batch.samples, rewards.tolist()))[:k]:
            p = prompts[s.prompt_index % len(prompts)]
            p = p[-1]["content"] if isinstance(p, list) else p
            f.write(json.dumps({"step": step, "prompt": p, "completion": s.text, "reward": r,
                                "finish": s.finish_reason}, ensure_ascii=False) + "\n")


@torch.no_grad()
def evaluate_greedy(model, engine: RolloutEngine, reward_fn, prompts: PromptSet, cfg: OnlineConfig,
                    dist: DistInfo) -> dict:
    """Greedy answers on held-out prompts: mean reward, and the fraction reaching the top reward."""
    n = min(cfg.eval_prompts, len(prompts))
    mine = list(range(dist.rank, n, dist.world))
    if not mine:
        return {}
    ps, cols = prompts.take(mine)
    batch = engine.generate(model, ps, sampling_params(cfg, 0, 0, n=1, greedy=True))
    r, _ = score(reward_fn, ps, cols, batch)
    red = all_reduce_sum(torch.tensor([float(r.sum()), float((r >= 1.0).sum()), float(len(r))],
                                      dtype=torch.float64), dist)
    return {"eval_reward": float(red[0] / red[2]), "eval_solved": float(red[1] / red[2])}


# --------------------------------------------------------------------------- the run


class OnlineRun:
    """Setup and the outer loop of an online recipe. A recipe supplies `step(rstep, clock)`, which
    samples, scores and calls `update` after each optimizer step it makes."""

    def __init__(self, cfg: OnlineConfig, recipe: str, model=None, tokenizer=None, updates_per_step: int = 1,
                 reward_fn=None, rollout_steps: int | None = None, prompts_per_step: int | None = None,
                 need_reference: bool | None = None):
        from alignkit.data.chat import setup_chat_template
        from alignkit.models import load_tokenizer
        from alignkit.models.peft import load_base_model, prepare_trainable
        from alignkit.training.dist import init_distributed
        from alignkit.training.trainer import Trainer, seed_everything

        self.cfg = cfg
        self.dist = init_distributed()
        seed_everything(cfg.seed)
        self.tok = tokenizer or load_tokenizer(cfg.model)
        setup_chat_template(self.tok, cfg.chat_template)
        self.prompts = load_prompts(cfg.data, cfg.data_split, cfg.prompt_column, cfg.chat_prompts)
        self.eval_prompts = (load_prompts(cfg.eval_data, cfg.eval_split, cfg.prompt_column, cfg.chat_prompts,
                                          "eval_data") if cfg.eval_data else None)
        if reward_fn is None:
            from alignkit.rewards import build_reward

            reward_fn = build_reward(cfg.reward, tokenizer=self.tok)
        self.reward_fn = reward_fn
        policy = model if model is not None else load_base_model(cfg)
        policy = prepare_trainable(policy, cfg)
        if hasattr(policy, "config"):
            policy.config.use_cache = True  # generation needs the cache; training passes use_cache=False
        self.per_rank = prompts_per_step or cfg.batch_size * cfg.grad_accum
        self.order = prompt_order(len(self.prompts), self.per_rank * self.dist.world, cfg.seed)
        steps = rollout_steps or (cfg.max_steps if cfg.max_steps > 0 else max(
            1, int(cfg.epochs * (len(self.prompts) // (self.per_rank * self.dist.world)))))
        self.rollout_steps = steps
        self.updates_per_step = updates_per_step
        self.trainer = Trainer(cfg, policy, self.tok, recipe=recipe, total_steps=steps * updates_per_step,
                               dist_info=self.dist)
        # need_reference: None = as β says (reference_policy); True / False = the recipe decides (online DPO)
        # Under FSDP a separate reference is sharded like the policy: read by rank 0 only (on the CPU),
        # its shards moved to the device, and gathered only for the no-grad reference pass.
        ref_device = self.dist.device
        if self.trainer.fsdp is not None:
            ref_device = torch.device("cpu" if self.dist.main else "meta")
        if need_reference is None:
            self.ref = reference_policy(cfg, self.trainer.model, ref_device)
        else:
            self.ref = load_reference(cfg, self.trainer.model, ref_device) if need_reference else None
        self.ref_fsdp = None
        if self.ref is not None and self.ref is not self.trainer.model:
            self.ref_fsdp = self.trainer.shard_frozen(self.ref)
        self.engine = RolloutEngine(self.tok)
        self.pad_id = self.engine.pad_id
        self.run_dir = self.trainer.run_dir
        self.last_prompts: tuple[list, dict] = ([], {})
        self._gen_tokens = 0
        self.generated_total = 0  # tokens generated by all processes so far (logged as generated_tokens)

    # -- sampling
    def rollout(self, rstep: int, n: int | None = None):
        d = self.dist
        idx = self.order(rstep)[d.rank * self.per_rank:(d.rank + 1) * self.per_rank]
        ps, cols = self.prompts.take(idx)
        self.last_prompts = (ps, cols)
        # gathered: under FSDP each process samples on full weights, its own number of decode steps.
        with self.trainer.gathered(), self.trainer.autocast():
            batch = self.engine.generate(self.trainer.model, ps, sampling_params(self.cfg, rstep, d.rank, n=n))
        self.clock.lap("generate")
        rewards, missing = score(self.reward_fn, ps, cols, batch)
        info = rollout_stats(batch, rewards)
        info["reward_missing"] = missing
        n_gen = sum(len(s.completion_ids) for s in batch.samples)
        self._gen_tokens += n_gen
        self.generated_total += int(all_reduce_sum(n_gen, self.dist))
        info["generated_tokens"] = self.generated_total
        self._batch, self._rewards = batch, rewards
        return ps, cols, batch, rewards, info

    def extra_prompts(self, rstep: int, rnd: int, k: int) -> tuple[list, dict]:
        g = torch.Generator().manual_seed((self.cfg.seed * 1_000_003 + rstep) * 131 + rnd * 7 + self.dist.rank)
        idx = torch.randint(0, len(self.prompts), (k,), generator=g).tolist()
        return self.prompts.take(idx)

    # -- log-probs without grad
    def policy_logps(self, mbs: list[dict]) -> list[torch.Tensor]:
        with self.trainer.gathered():
            return forward_logps(self.trainer.model, mbs, self.cfg.temperature, self.cfg.logits_chunk_size,
                                 self.dist.device, self.trainer.autocast)

    def add_ref_logps(self, mbs: list[dict]) -> None:
        if self.ref is None:
            return
        if self.ref is self.trainer.model:  # the policy with its adapter off
            gather = self.trainer.gathered()
        else:
            gather = self.ref_fsdp.gathered() if self.ref_fsdp is not None else contextlib.nullcontext()
        with gather, ref_context(self.ref, self.trainer.model):
            lps = forward_logps(self.ref, mbs, self.cfg.temperature, self.cfg.logits_chunk_size, self.dist.device,
                                self.trainer.autocast)
        for mb, lp in zip(mbs, lps):
            mb["ref_logps"] = lp

    # -- one optimizer step done
    def update(self, metrics: dict, clock: StepClock, last: bool = True) -> None:
        tr = self.trainer
        tr.count_tokens(self._gen_tokens)
        self._gen_tokens = 0
        metrics = tr.optimizer_step(metrics)
        if last:
            clock.lap("train")
            metrics.update(clock.metrics())
        tr.log_step(metrics)

    def loop(self, step_fn) -> dict:
        tr, cfg = self.trainer, self.cfg
        resume = tr.prepare_run_dir()
        if resume is not None:
            tr.load_checkpoint(resume)
        tr.info(f"prompts: {len(self.prompts)}; {self.rollout_steps} rollout steps of "
                f"{self.per_rank * self.dist.world} prompts x {cfg.num_generations} samples")
        last_eval: dict = {}
        tr.start_progress()
        try:
            while tr.step < tr.total_steps:
                rstep = tr.step // self.updates_per_step
                self.clock = StepClock()
                step_fn(rstep, self.clock)
                done = rstep + 1
                if self.dist.main and cfg.sample_every and done % cfg.sample_every == 0:
                    write_samples(self.run_dir, done, self.last_prompts[0], self._batch, self._rewards)
                if cfg.save_every and done % cfg.save_every == 0 and tr.step < tr.total_steps:
                    tr.save_checkpoint()
                if self.eval_prompts and cfg.eval_every and done % cfg.eval_every == 0 and tr.step < tr.total_steps:
                    tr.log_eval(self.evaluate())
            if self.eval_prompts:
                last_eval = self.evaluate()
                tr.log_eval(last_eval)
            tr.save_checkpoint()
            tr.save_final()
        finally:
            tr.close()
        return last_eval

    def evaluate(self) -> dict:
        with self.trainer.gathered(), self.trainer.autocast():
            return evaluate_greedy(self.trainer.model, self.engine, self.reward_fn, self.eval_prompts, self.cfg,
                                   self.dist)
