"""What the online recipes (REINFORCE, RLOO, GRPO, rejection sampling, PPO, online DPO) set up
and do the same way: the prompt set, the policy and its `Trainer`, the reference model, the
rollout engine, drawing rollouts (`OnlineRun.collect` -> `alignkit.rollout.Rollout`),
teacher-forced log-probs, micro-batches of rollout rows and held-out greedy evaluation.

The loop itself is `alignkit.training.loop.run_loop`: a recipe's step function takes the rollout
step's index and returns a `StepResult` (its optimizer steps' metrics and the rollout).

Log-prob names: `sampler_logps` are the engine's, recorded while sampling; `old_logps` are π_old's,
recomputed by the trainer before the first update of a rollout (PPO, GRPO with μ > 1); `ref_logps`
the reference's. All are per token (B, T), 0 off the completion (`token_logps`), at the sampling
temperature unless a recipe says otherwise (rejection sampling trains plain SFT at 1).
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import torch

from alignkit.advantages import scored_mask
from alignkit.config import OnlineConfig
from alignkit.data.order import seeded_generator, stream_seed
from alignkit.data.prompts import PromptSet, load_prompts, prompt_order
from alignkit.losses import overlong_penalty
from alignkit.ops.logprobs import causal_lm_token_logps
from alignkit.rollout.engine import RolloutBatch, RolloutEngine, SamplingParams
from alignkit.rollout.agents import build_agent, resolve_chat_template
from alignkit.rollout import multiturn
from alignkit.rollout.rollout import Rollout, collect, score
from alignkit.training.dist import DistInfo, all_reduce_sum
from alignkit.training.loop import StepClock, StepResult, run_loop, to_device

__all__ = ["OnlineRun", "PromptSet", "load_prompts", "prompt_order", "token_logps", "sampling_params",
           "shape_rewards", "scored_rows", "split_groups", "row_batches", "rollout_metrics", "mismatch",
           "correct_rollout", "max_over_ranks", "ratio_max", "evaluate_greedy", "StepClock", "StepResult"]


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
    """The adapter switched off when the reference is the policy itself; else nothing."""
    if ref is policy and hasattr(policy, "disable_adapter"):
        return policy.disable_adapter()
    return contextlib.nullcontext()


def token_logps(model, mb: dict, temperature: float, chunk: int, entropy: bool = False):
    """Per-token log-probs (B, T) float32 of mb["targets"] (the completion tokens, aligned to the
    positions predicting them; 0 elsewhere) under softmax(logits / temperature) (1 when
    temperature is 0), computed in chunks of `chunk` positions; with `entropy`, also the
    per-position entropy (B, T). Sum over a row for a sequence log-prob."""
    return causal_lm_token_logps(model, mb["input_ids"], mb["attention_mask"], mb["position_ids"], mb["targets"],
                                 chunk_size=chunk, temperature=temperature if temperature > 0 else 1.0,
                                 return_entropy=entropy)


@torch.no_grad()
def forward_logps(model, mbs: list[dict], temperature: float, chunk: int, device, autocast) -> list[torch.Tensor]:
    """`token_logps` of each micro-batch without grad, under `autocast()`; (B, T) float32 on the CPU."""
    out = []
    for mb in mbs:
        with autocast():
            out.append(token_logps(model, to_device(mb, device), temperature, chunk).float().cpu())
    return out


# --------------------------------------------------------------------------- rollouts


def sampling_params(cfg: OnlineConfig, step: int, stream: int, n: int | None = None, greedy=False) -> SamplingParams:
    """Sampling settings of rollout step `step`; the sampler seed is stream `stream` (the rank, or
    rank + 64·round for dynamic sampling's extra rounds) of `alignkit.data.order` salt 64."""
    return SamplingParams(
        n=n or cfg.num_generations, max_new_tokens=cfg.max_new_tokens, temperature=0.0 if greedy else cfg.temperature,
        top_p=cfg.top_p, top_k=cfg.top_k, stop=tuple(cfg.stop),
        seed=stream_seed(cfg.seed, step, 64, stream), batch_size=cfg.generation_batch_size,
    )


def shape_rewards(rollout: Rollout, cfg: OnlineConfig) -> Rollout:
    """The rollout with DAPO's overlong shaping added to its rewards (`alignkit.losses.overlong_penalty`
    of each completion's token count, with L = max_new_tokens, c = overlong_buffer and
    `overlong_penalty`); unchanged when overlong_buffer is 0. Unscored samples (NaN) stay NaN."""
    if not cfg.overlong_buffer:
        return rollout
    lengths = torch.tensor([len(s.completion_ids) for s in rollout.samples], dtype=torch.float32)
    shaping = overlong_penalty(lengths, cfg.max_new_tokens, cfg.overlong_buffer, cfg.overlong_penalty)
    return rollout.with_rewards(rollout.rewards + shaping)


def scored_rows(rewards: torch.Tensor) -> torch.Tensor:
    """(N,) float32: 1 for a scored sample, 0 for one the reward source could not score (NaN).
    Recipes multiply it into their per-sample loss weights, so an unscored sample gives no
    gradient (no policy-gradient term, no KL term) and no loss units."""
    return scored_mask(rewards).float()


def row_batches(rollout, rows_per_mb: int, n_mb: int, pad_id: int, extra: dict[str, torch.Tensor]) -> list[dict]:
    """`n_mb` micro-batches of `rows_per_mb` consecutive samples of `rollout` (a `Rollout` or the
    engine's `RolloutBatch`), each its right-padded tensors with `sampler_logps`, plus the rows of
    every per-sample tensor in `extra` (advantages, rewards) under its key."""
    out = []
    for i in range(n_mb):
        lo, hi = i * rows_per_mb, (i + 1) * rows_per_mb
        part = RolloutBatch(rollout.samples[lo:hi], rollout.group_size)
        if not part.samples:
            raise AssertionError("empty micro-batch")
        mb = part.tensors(pad_id)
        mb["sampler_logps"] = mb.pop("old_logps")
        for k, v in extra.items():
            mb[k] = v[lo:hi]
        out.append(mb)
    return out


def split_groups(rollout, per_mb: int, n_mb: int, pad_id: int, extra: dict[str, torch.Tensor]) -> list[dict]:
    """Micro-batches of whole groups: micro-batch i holds prompts [i·per_mb, (i+1)·per_mb) with all
    their samples (`row_batches` of per_mb · group_size rows)."""
    return row_batches(rollout, per_mb * rollout.group_size, n_mb, pad_id, extra)


def rollout_metrics(rollout: Rollout) -> dict:
    """reward_mean / reward_std (of the scored `rollout.rewards`; NaN = not scored is left out, and
    both are 0 when nothing was scored), response_len (mean tokens), truncated_frac and
    reward_missing (samples the reward source could not score, every draw counted) of this
    process's samples; of multi-turn rollouts also turns, tool_calls, tool_errors and
    malformed_calls per episode (response_len counts the model's tokens only)."""
    r = rollout.rewards[scored_mask(rollout.rewards)]
    lens = [sum(s.trained) if hasattr(s, "trained") else len(s.completion_ids) for s in rollout.samples]
    n = max(len(lens), 1)
    out = {
        "reward_mean": float(r.mean()) if r.numel() else 0.0,
        "reward_std": float(r.std()) if r.numel() > 1 else 0.0,
        "response_len": sum(lens) / n,
        "truncated_frac": float(rollout.truncated.sum()) / n,
        "reward_missing": int(rollout.stats.get("reward_missing", 0)),
    }
    for k in ("turns", "tool_calls", "tool_errors", "malformed_calls"):
        if k in rollout.stats:
            out[k] = rollout.stats[k] / n
    return out


# The logged share of completion tokens a rollout correction touched, by mode.
CORRECTION_KEY = {"tis": "rollout_capped_frac", "mis": "rollout_dropped_frac"}


def correct_rollout(mbs: list[dict], cfg: OnlineConfig, dist: DistInfo) -> dict:
    """Apply `rollout_correction` to micro-batches that hold `old_logps` (the trainer's log-probs
    under the rollout's weights), `sampler_logps` and `loss_mask` (see
    `alignkit.losses.rollout_correction`): MIS narrows each `loss_mask` (before the loss units
    are counted, so the aggregation stays exact over the kept tokens), TIS sets `is_weights`.
    Returns the fraction of completion tokens capped / dropped over every process."""
    from alignkit.losses import rollout_correction

    touched, tokens = 0.0, 0.0
    for mb in mbs:
        c = rollout_correction(mb["old_logps"], mb["sampler_logps"], mb["loss_mask"], cfg.rollout_correction,
                               cfg.rollout_correction_cap)
        mb["loss_mask"] = c.mask
        if c.weights is not None:
            mb["is_weights"] = c.weights
        touched += float(c.stats.get("capped", 0.0) + c.stats.get("dropped", 0.0))
        tokens += float(c.stats["tokens"])
    if cfg.rollout_correction == "none":
        return {}
    touched, tokens = all_reduce_sum(torch.tensor([touched, tokens], dtype=torch.float64), dist).tolist()
    return {CORRECTION_KEY[cfg.rollout_correction]: touched / max(tokens, 1.0)}


def ratio_max(sampler_logps: torch.Tensor, trainer_logps: torch.Tensor, mask: torch.Tensor) -> float:
    """The largest per-token probability ratio between sampler and trainer, either way:
    max exp|sampler_logps - trainer_logps| over `mask` (1.0 for an empty mask). All (B, T)."""
    m = mask.bool()
    if not m.any():
        return 1.0
    return float(torch.exp((sampler_logps.detach() - trainer_logps.detach()).abs()[m].max()))


def max_over_ranks(x: float, dist: DistInfo) -> float:
    """The largest `x` over every process (x itself in one process)."""
    if not dist.enabled:
        return x
    from alignkit.training.fsdp import all_reduce_max

    return all_reduce_max(x, dist.device)


def mismatch(sampler_logps: torch.Tensor, trainer_logps: torch.Tensor, mask: torch.Tensor) -> tuple[float, float]:
    """(sum |Δ log p|, token count) between the engine's sampling log-probs and the trainer's."""
    m = mask.bool()
    return float((sampler_logps - trainer_logps).abs()[m].sum()), float(m.sum())


@torch.no_grad()
def evaluate_greedy(model, engine: RolloutEngine, reward_fn, prompts: PromptSet, cfg: OnlineConfig,
                    dist: DistInfo, agent=None) -> dict:
    """Greedy answers to the first `eval_prompts` held-out prompts, split across processes:
    eval_reward (mean reward of the scored answers) and eval_solved (fraction of all answers
    reaching reward 1; an answer the reward source cannot score is not solved); with an `agent`
    (multi-turn), also eval_tool_calls, eval_tool_errors and eval_malformed_calls per episode."""
    n = min(cfg.eval_prompts, len(prompts))
    mine = list(range(dist.rank, n, dist.world))
    if not mine:
        return {}
    prompt_list, columns = prompts.take(mine)
    params = sampling_params(cfg, 0, 0, n=1, greedy=True)
    ro = (multiturn.collect(engine, model, prompt_list, columns, params, reward_fn, agent) if agent is not None
          else collect(engine, model, prompt_list, columns, params, reward_fn))
    r = ro.rewards
    ok = scored_mask(r)
    sums = all_reduce_sum(torch.tensor([float(r[ok].sum()), float((r[ok] >= 1.0).sum()), float(len(r)),
                                        float(ok.sum())], dtype=torch.float64), dist)
    out = {"eval_reward": float(sums[0] / max(float(sums[3]), 1.0)), "eval_solved": float(sums[1] / sums[2])}
    if agent is not None:
        st = all_reduce_sum(torch.tensor([float(ro.stats[k]) for k in ("tool_calls", "tool_errors", "malformed_calls")],
                                         dtype=torch.float64), dist)
        out.update(eval_tool_calls=float(st[0] / sums[2]), eval_tool_errors=float(st[1] / sums[2]),
                   eval_malformed_calls=float(st[2] / sums[2]))
    return out


# --------------------------------------------------------------------------- the run


def rollout_engine(cfg: OnlineConfig, tok, policy, run_dir) -> RolloutEngine:
    """The engine `cfg.rollout_engine` asks for (see `alignkit.rollout.engines.build_engine`).
    vLLM starts from `cfg.model`; a policy handed in without a model folder is saved to
    <run_dir>/vllm_start first (the engine reads a folder, then takes the trainer's weights)."""
    from alignkit.rollout.engines import build_engine
    from alignkit.rollout.vllm_engine import check_engine_config

    path = cfg.model
    if check_engine_config(cfg) == "vllm" and cfg.vllm.mode == "colocate" and not path:
        from alignkit.rollout.weight_sync import unwrap

        base = unwrap(policy)
        base = base.get_base_model() if hasattr(base, "peft_config") else base
        path = str(Path(run_dir) / "vllm_start")
        base.save_pretrained(path)
        tok.save_pretrained(path)
    return build_engine(cfg, tok, path, sampling=sampling_params(cfg, 0, 0))



class OnlineRun:
    """Setup of an online recipe: tokenizer, prompt sets, reward, policy + `Trainer`, reference,
    rollout engine. `loop(step)` runs `step(rollout_step, clock) -> StepResult` in the shared
    loop for `rollout_steps` rollout steps of `updates_per_step` optimizer steps each.

    rollout_steps: default `max_steps`, or `epochs` passes over the prompts when max_steps is -1.
    prompts_per_step: prompts per process per rollout step (default batch_size x grad_accum).
    need_reference: None = as β says (`reference_policy`); True / False = the recipe decides.
    Raises UserError for a prompt set smaller than one step's prompts."""

    def __init__(self, cfg: OnlineConfig, recipe: str, model=None, tokenizer=None, updates_per_step: int = 1,
                 reward_fn=None, rollout_steps: int | None = None, prompts_per_step: int | None = None,
                 need_reference: bool | None = None):
        from alignkit.data.chat import setup_chat_template
        from alignkit.models import load_tokenizer
        from alignkit.models.peft import load_base_model, prepare_trainable
        from alignkit.training.dist import init_distributed
        from alignkit.training.trainer import Trainer, seed_everything

        self.cfg = cfg
        self.recipe = recipe
        self.dist = init_distributed()
        seed_everything(cfg.seed)
        self.tok = tokenizer or load_tokenizer(cfg.model)
        setup_chat_template(self.tok, resolve_chat_template(cfg.chat_template))
        self.agent = build_agent(cfg, self.tok)  # None: single-turn; else tools / environment episodes
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
        self.engine = rollout_engine(cfg, self.tok, self.trainer.model, self.trainer.run_dir)
        self._engine_step: int | None = None  # optimizer step whose weights the engine holds
        self.pad_id = self.engine.pad_id
        self.run_dir = self.trainer.run_dir

    # -- sampling
    def prompts_for(self, rstep: int) -> tuple[list, dict]:
        """This process's prompts of rollout step `rstep` and their columns."""
        d = self.dist
        return self.prompts.take(self.order(rstep)[d.rank * self.per_rank:(d.rank + 1) * self.per_rank])

    def extra_prompts(self, rstep: int, rnd: int, k: int) -> tuple[list, dict]:
        """`k` prompts drawn with replacement for dynamic sampling's round `rnd` (seeded, salt 131)."""
        g = seeded_generator(self.cfg.seed, rstep, 131, rnd * 7 + self.dist.rank)
        idx = torch.randint(0, len(self.prompts), (k,), generator=g).tolist()
        return self.prompts.take(idx)

    def sync_engine(self) -> bool:
        """For an engine that holds its own weights (vLLM): push the policy's changed weights once
        per optimizer step and return True; False for alignkit's engine, which samples from the
        policy itself. Called outside FSDP's gathering, so a sharded policy is gathered one unit at
        a time; every process calls it at the same optimizer step (the first rollout or
        evaluation after it), so the collectives of the gathering match even when processes draw
        a different number of rollouts in a step (dynamic sampling)."""
        if not hasattr(self.engine, "sync_weights"):
            return False
        if self._engine_step != self.trainer.step:
            self.engine.sync_weights(self.trainer.model)
            self._engine_step = self.trainer.step
        return True

    def collect(self, rstep: int, prompts: list, columns: dict, clock: StepClock, stream: int | None = None,
                n: int | None = None) -> Rollout:
        """`alignkit.rollout.collect` with the current policy on full weights (FSDP gathered) under
        the trainer's autocast; sampler stream `stream` (default: the rank). Generation and
        scoring time go to the clock's `generate` and `score` phases."""
        stream = self.dist.rank if stream is None else stream
        params = sampling_params(self.cfg, rstep, stream, n=n)
        t0 = time.time()
        if self.agent is not None:  # episodes: generation, tool calls and scoring interleave
            if self.sync_engine():  # vLLM holds the weights
                rollout = multiturn.collect(self.engine, None, prompts, columns, params, self.reward_fn, self.agent)
            else:
                with self.trainer.gathered(), self.trainer.autocast():
                    rollout = multiturn.collect(self.engine, self.trainer.model, prompts, columns, params,
                                                self.reward_fn, self.agent)
            clock.add("generate", time.time() - t0)
            return rollout
        if self.sync_engine():  # vLLM holds the weights: nothing to gather for sampling
            batch = self.engine.generate(None, prompts, params)
        else:
            with self.trainer.gathered(), self.trainer.autocast():
                batch = self.engine.generate(self.trainer.model, prompts, params)
        t1 = time.time()
        rollout = score(batch, prompts, columns, self.reward_fn)
        clock.add("generate", t1 - t0)
        clock.add("score", time.time() - t1)
        return rollout

    # -- log-probs without grad
    def old_logps(self, mbs: list[dict]) -> list[torch.Tensor]:
        """π_old: the policy's `token_logps` before this rollout's first update, per micro-batch."""
        with self.trainer.gathered():
            return forward_logps(self.trainer.model, mbs, self.cfg.temperature, self.cfg.logits_chunk_size,
                                 self.dist.device, self.trainer.autocast)

    def add_ref_logps(self, mbs: list[dict], temperature: float | None = None) -> None:
        """Set mb["ref_logps"] (B, T) on each micro-batch: the reference's `token_logps` at
        `temperature` (default the sampling temperature; it must be the policy's in the loss);
        nothing without a reference."""
        if self.ref is None:
            return
        if self.ref is self.trainer.model:  # the policy with its adapter off
            gather = self.trainer.gathered()
        else:
            gather = self.ref_fsdp.gathered() if self.ref_fsdp is not None else contextlib.nullcontext()
        temp = self.cfg.temperature if temperature is None else temperature
        with gather, ref_context(self.ref, self.trainer.model):
            lps = forward_logps(self.ref, mbs, temp, self.cfg.logits_chunk_size, self.dist.device,
                                self.trainer.autocast)
        for mb, lp in zip(mbs, lps):
            mb["ref_logps"] = lp

    # -- the loop
    def loop(self, step_fn) -> dict:
        """Run the recipe's step function in `alignkit.training.loop.run_loop`; returns the last
        evaluation's metrics (empty without eval_data)."""
        cfg = self.cfg
        per_step = self.per_rank * self.dist.world
        left_out = len(self.prompts) % per_step
        describe = (f"prompts: {len(self.prompts)}; {self.rollout_steps} rollout steps of {per_step} prompts x "
                    f"{cfg.num_generations} samples, {self.updates_per_step} optimizer step(s) each"
                    + (f"; {left_out} prompts are left out of each pass over the prompt set" if left_out else ""))
        return run_loop(self.trainer, step_fn, updates_per_step=self.updates_per_step,
                        eval_fn=self.evaluate if self.eval_prompts else None, sample_every=cfg.sample_every,
                        online=True, describe=describe)

    def evaluate(self) -> dict:
        """`evaluate_greedy` on the eval prompts (the loop enters gathering and autocast)."""
        model = None if self.sync_engine() else self.trainer.model
        return evaluate_greedy(model, self.engine, self.reward_fn, self.eval_prompts, self.cfg, self.dist,
                               self.agent)
