"""PPO with a critic: the classic RLHF loop (Ziegler et al. 2019; Stiennon et al. 2020; Ouyang et al. 2022).

Objective: maximise  E_{x ~ D, y ~ π(·|x)} [ Q(x, y) ] − β · KL(π ‖ π_0).

Every rollout step:

  1. Sample answers y for a batch of prompts x; score Q(x, y) with the reward source. A response
     cut at max_new_tokens without eos loses `missing_eos_penalty`; the score may be normalised
     (`reward_norm`) and clipped (`reward_clip`).
  2. Teacher-forced passes without gradient: log π_old(y_t), log π_ref(y_t) and the critic's V_t.
     Everything is per token, aligned to the position that *predicts* y_t (completion_mask).
  3. Per-token reward, the KL penalty on every token and the score on the last real one:
         r_t = −β · KL_t  (+ Q(x, y) when y_t is the response's last token),
         KL_t = log π_old(y_t) − log π_ref(y_t)        (k1; `kl_estimator`)
  4. GAE over the response tokens (the step after the last token is terminal, V = 0):
         δ_t = r_t + γ V_{t+1} − V_t,   A_t = δ_t + γ λ A_{t+1},   R_t = A_t + V_t
     and the advantages are whitened over the rollout batch (all processes).
  5. `ppo_epochs` passes, each over `num_minibatches` shuffled minibatches; per minibatch one
     optimizer step of the policy and one of the critic:
         policy  l_t = −min(ρ_t A_t, clip(ρ_t, 1 − ε_lo, 1 + ε_hi) A_t),   ρ_t = π(y_t) / π_old(y_t)
         critic  l_t = ½ max((V_t − R_t)², (clip(V_t, V_old,t ± ε_v) − R_t)²)
     both token means over the whole global minibatch.
  6. kl_control=adaptive: β ← β · (1 + clip(KL/target − 1, −0.2, 0.2) · n / horizon), with KL the
     mean summed KL per response of this rollout and n its number of responses.

The critic (`alignkit.models.value`) has its own AdamW (`critic_lr`, same schedule shape) and
its weights and optimizer state go into the trainer's checkpoints; under FSDP a separate critic
is sharded like the policy (`critic_trainer`). See docs/ppo.md.
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from alignkit.advantages import gae, scored_mask, whiten
from alignkit.config import PPOConfig
from alignkit.data.order import seeded_permutation
from alignkit.errors import UserError
from alignkit.losses import kl_estimate, policy_loss_terms, value_loss_terms
from alignkit.models.value import ValueModel
from alignkit.ops.masks import last_token_index
from alignkit.recipes import online as ol
from alignkit.training.dist import DistInfo, all_reduce_sum
from alignkit.training.loop import StepClock, StepResult, to_device
from alignkit.training.trainer import Trainer

__all__ = [
    "PPOConfig",
    "train_ppo",
    "KLController",
    "RunningMoments",
    "token_rewards",
    "last_token_index",
    "global_whiten",
    "explained_variance",
    "ppo_policy_loss_fn",
    "ppo_value_loss_fn",
    "build_critic",
]


# --------------------------------------------------------------------------- pieces


class KLController:
    """β of the KL penalty. Fixed, or adaptive (Ziegler et al. 2019, sec. 2.2):

        e = clip(KL / target − 1, −0.2, 0.2),     β ← β · (1 + e · n_steps / horizon)

    KL is the measured KL of the last rollout (summed over each response's tokens, averaged over
    responses), n_steps the number of responses it held, horizon in responses. State (β and the
    update count) is saved in checkpoints."""

    def __init__(self, kl_coef: float, adaptive: bool = False, target: float = 6.0, horizon: float = 10000.0):
        if adaptive and kl_coef <= 0:
            raise UserError("kl_control=adaptive multiplies β, so it needs kl_coef > 0 to start from")
        self.value = float(kl_coef)
        self.adaptive = adaptive
        self.target = float(target)
        self.horizon = float(horizon)
        self.updates = 0

    def update(self, current_kl: float, n_steps: int) -> float:
        """Adapt β to the last rollout's KL (summed per response, averaged) over n_steps responses; returns β."""
        if self.adaptive:
            err = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
            self.value *= 1.0 + err * n_steps / self.horizon
        self.updates += 1
        return self.value

    def state_dict(self) -> dict:
        """β and the update count, for checkpoints."""
        return {"value": self.value, "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` returned."""
        self.value = float(state["value"])
        self.updates = int(state.get("updates", 0))


class RunningMoments:
    """Mean and (sample) standard deviation of every score seen so far, merged batch by batch
    (Chan et al.'s parallel update, float64). Saved in checkpoints."""

    def __init__(self):
        self.count, self.mean, self.m2 = 0.0, 0.0, 0.0

    def update(self, n: float, total: float, total_sq: float) -> None:
        """Merge a batch given by its count, sum and sum of squares."""
        if n <= 0:
            return
        mean_b = total / n
        m2_b = max(total_sq - n * mean_b * mean_b, 0.0)
        tot = self.count + n
        delta = mean_b - self.mean
        self.mean += delta * n / tot
        self.m2 += m2_b + delta * delta * self.count * n / tot
        self.count = tot

    @property
    def std(self) -> float:
        """Sample standard deviation (n − 1) of every score seen; 0 before two."""
        return math.sqrt(self.m2 / (self.count - 1)) if self.count > 1 else 0.0

    def state_dict(self) -> dict:
        """Count, mean and M2, for checkpoints."""
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, s: dict) -> None:
        """Restore what `state_dict` returned."""
        self.count, self.mean, self.m2 = float(s["count"]), float(s["mean"]), float(s["m2"])


def token_rewards(scores: torch.Tensor, kl: torch.Tensor | None, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """Per-token rewards (B, T): −kl_coef · kl on every masked token, plus scores[b] on the last
    masked token of row b (the response's last real token; DESIGN rule 5). 0 where mask is 0."""
    m = mask.bool()
    r = torch.zeros(m.shape, dtype=torch.float32)
    if kl is not None and kl_coef:
        r = torch.where(m, -kl_coef * kl.float(), r)
    last = last_token_index(m)
    rows = torch.nonzero(last >= 0).squeeze(-1)
    r[rows, last[rows]] += scores.float()[rows]
    return r


def global_whiten(x: torch.Tensor, mask: torch.Tensor, dist: DistInfo, shift_mean: bool = True,
                  eps: float = 1e-8) -> torch.Tensor:
    """`alignkit.advantages.whiten` over the masked entries of every process (its moments summed
    across processes): (x − mean)/sqrt(var + eps), var unbiased; with shift_mean=False the mean is
    added back (only the scale changes)."""
    return whiten(x, mask, shift_mean=shift_mean, eps=eps, reduce=lambda t: all_reduce_sum(t, dist))


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, dist: DistInfo) -> float:
    """1 − Var[R − V] / Var[R] over the masked tokens of every process (1: perfect critic, 0: no
    better than a constant, < 0: worse). NaN when the returns do not vary."""
    m = mask.bool()
    v, r = values.double()[m], returns.double()[m]
    d = r - v
    s = all_reduce_sum(torch.tensor([float(m.sum()), float(r.sum()), float((r * r).sum()), float(d.sum()),
                                     float((d * d).sum())], dtype=torch.float64), dist).tolist()
    n = s[0]
    if n < 2:
        return float("nan")
    var_r = s[2] / n - (s[1] / n) ** 2
    var_d = s[4] / n - (s[3] / n) ** 2
    return 1.0 - var_d / var_r if var_r > 1e-12 else float("nan")


# --------------------------------------------------------------------------- losses


def ppo_policy_loss_fn(cfg: PPOConfig):
    """Clipped surrogate summed over the micro-batch's policy-gradient tokens `loss_mask` (the response
    tokens, less those `rollout_correction=mis` dropped; units: `n_pg_tokens`), each weighted by
    `is_weights` under `rollout_correction=tis`."""

    def loss_fn(model, mb: dict):
        out = ol.token_logps(model, mb, cfg.temperature, cfg.logits_chunk_size, entropy=cfg.compute_entropy)
        lp, ent = out if cfg.compute_entropy else (out, None)
        m = mb["loss_mask"]
        terms = policy_loss_terms(lp, mb["old_logps"], mb["advantages"], m, cfg.clip_low, cfg.clip_high,
                                  "token_mean", dual_clip=cfg.dual_clip, ratio_level=cfg.ratio_level,
                                  loss_type=cfg.loss_type, is_weights=mb.get("is_weights"))
        stats, n = terms.stats, terms.stats["tokens"]
        metrics = {"clip_frac": (stats["clipped"], n), "ratio_mean": (stats["ratio_sum"], n),
                   "approx_kl": (stats["approx_kl_sum"], n)}
        if "dual_clipped" in stats:
            metrics["dual_clip_frac"] = (stats["dual_clipped"], n)
        if ent is not None:
            metrics["entropy"] = ((ent.detach() * m).sum(), m.sum())
        return terms.loss_sum, metrics

    return loss_fn


def ppo_value_loss_fn(cfg: PPOConfig):
    """loss_fn(critic, mb): clipped value loss summed over the micro-batch's response tokens
    (units: tokens); mb holds `old_values` and `returns` (B, T)."""

    def loss_fn(critic, mb: dict):
        values = critic(mb["input_ids"], mb["attention_mask"], mb["position_ids"])
        terms = value_loss_terms(values, mb["old_values"], mb["returns"], mb["completion_mask"], cfg.value_clip)
        stats = terms.stats
        return terms.loss_sum, {"value_clip_frac": stats["clipped"], "value_mean": stats["value_sum"],
                                "value_mse": stats["sq_error_sum"]}

    return loss_fn


def n_tokens(mb: dict) -> float:
    """Loss units of a micro-batch: its response tokens."""
    return float(mb["completion_mask"].sum())


def n_pg_tokens(mb: dict) -> float:
    """Policy-loss units of a micro-batch: its response tokens that the policy gradient trains on."""
    return float(mb["loss_mask"].sum())


# --------------------------------------------------------------------------- the critic


def _reward_model_path(reward) -> str | None:
    """The folder of the reward source when it is one reward model, else None."""
    from alignkit.config import RewardSection
    from alignkit.models.value import is_reward_model_folder

    if isinstance(reward, RewardSection):
        sec = reward
    elif isinstance(reward, (str, list, tuple, dict)):
        try:
            sec = RewardSection.model_validate(reward)
        except Exception:
            return None
    else:
        return None
    paths = [t.source for t in sec.terms if is_reward_model_folder(t.source)]
    return paths[0] if len(paths) == 1 else None


def check_config(cfg: PPOConfig) -> None:
    """Mistakes found before any model is loaded (one line each, exit code 2)."""
    if cfg.kl_control == "adaptive" and cfg.kl_coef <= 0:
        raise UserError("kl_control=adaptive multiplies β, so it needs kl_coef > 0 to start from")
    if cfg.critic == "shared_base":
        if cfg.peft.method not in ("lora", "dora", "qlora"):
            raise UserError("critic=shared_base puts the critic as a second adapter on the policy's base: it needs "
                            "peft.method=lora (or dora / qlora); use critic=separate for full fine-tuning")
        if cfg.peft.modules_to_save:
            raise UserError("critic=shared_base cannot be combined with peft.modules_to_save (those modules would be "
                            "shared by policy and critic); drop modules_to_save or use critic=separate")
        if cfg.critic_init not in ("auto", "policy"):
            raise UserError(f"critic_init={cfg.critic_init}: with critic=shared_base the critic always starts from the "
                            "policy's base; use critic_init=auto or critic=separate")
    elif cfg.critic_init not in ("auto", "policy", "reward") and not Path(cfg.critic_init).expanduser().is_dir():
        raise UserError(f"critic_init={cfg.critic_init}: not policy, reward, auto or an existing model folder")
    elif cfg.critic_init == "reward" and _reward_model_path(cfg.reward) is None:
        raise UserError("critic_init=reward needs the reward source to be one reward-model folder (reward=PATH); "
                        "use critic_init=policy or critic_init=PATH")


def build_critic(cfg: PPOConfig, run: "ol.OnlineRun"):
    """The critic of `cfg.critic` / `cfg.critic_init`, on the trainer's device (see models/value.py)."""
    from alignkit.models.peft import is_peft_model
    from alignkit.models.value import (CRITIC_ADAPTER, AdapterValueModel, ValueHead, empty_value_model,
                                       hidden_size_of, is_reward_model_folder, load_value_model)

    tr = run.trainer
    if cfg.critic == "shared_base":
        from alignkit.models.peft import build_peft_config

        policy = tr.model
        check_config(cfg)
        if not is_peft_model(policy):
            raise UserError("critic=shared_base needs the policy to be a peft model with a LoRA adapter")
        pconf = build_peft_config(cfg.peft, policy.get_base_model(), cfg)
        policy.add_adapter(CRITIC_ADAPTER, pconf)
        policy.set_adapter("default")
        # Checkpoints and the final folder hold the policy's adapter only (models.load.save_pretrained
        # saves the "default" adapter of a multi-adapter model); the critic travels in the trainer
        # state and output_dir/critic.
        critic = AdapterValueModel(policy, ValueHead(hidden_size_of(policy.get_base_model())))
        critic.head.to(tr.device)
        tr.info("critic: adapter 'critic' + value head on the policy's base (one copy of the base weights)")
        return critic
    rm_path = _reward_model_path(cfg.reward)
    init = cfg.critic_init
    if init == "auto":
        init = "reward" if rm_path else "policy"
    if init == "reward":
        if rm_path is None:
            raise UserError("critic_init=reward needs the reward source to be one reward-model folder (reward=PATH); "
                            "use critic_init=policy or critic_init=PATH")
        source, path = "reward", rm_path
    elif init == "policy":
        if not cfg.model:
            raise UserError("critic_init=policy loads the critic from `model`; set model=PATH")
        source, path = "policy", cfg.model
    else:
        source, path = ("reward" if is_reward_model_folder(init) else "policy"), init
    critic = None
    if tr.fsdp is not None and not tr.dist.main and source == "policy":
        # Sharded like the policy (critic_trainer): only rank 0 reads the weights, the other processes
        # build the critic on the meta device and receive their shards from rank 0.
        critic = empty_value_model(path)
    if critic is None:
        critic = load_value_model(source, path, run.tok, log=tr.info)
        critic.to(tr.device)  # activation checkpointing, if on, is switched on by the critic's Trainer
    n = sum(p.numel() for p in critic.parameters())
    tr.info(f"critic: separate value model from the {source} at {path} ({n:,} parameters, all trained)")
    return critic


# --------------------------------------------------------------------------- batches


def take_rows(full: dict, rows) -> dict:
    """Rows of a right-padded (B, T) batch dict, trimmed to their longest row."""
    idx = torch.as_tensor(list(rows), dtype=torch.long)
    T = max(int(full["attention_mask"].index_select(0, idx).sum(-1).max()), 1)
    return {k: v.index_select(0, idx)[:, :T] for k, v in full.items()}


def _pad_cat(parts: list[torch.Tensor], T: int) -> torch.Tensor:
    return torch.cat([F.pad(p, (0, T - p.shape[1])) for p in parts])


@torch.no_grad()
def critic_values(critic, chunks: list[dict], device, autocast, gathered=contextlib.nullcontext) -> list[torch.Tensor]:
    """V (B, T) float32 on the CPU of each chunk, no grad, under `autocast()`; inside `gathered()`
    (a sharded critic's `Trainer.gathered`: its blocks gathered once for all chunks, no collective
    per chunk)."""
    out = []
    with gathered():
        for mb in chunks:
            mb = to_device(mb, device)
            with critic.active(), autocast():
                out.append(critic(mb["input_ids"], mb["attention_mask"], mb["position_ids"]).float().cpu())
    return out


def critic_trainer(cfg: PPOConfig, critic, policy_trainer: Trainer) -> Trainer:
    """The critic's own `Trainer`: AdamW at `critic_lr` with the policy's schedule shape and length,
    the same accumulation, clipping, precision and divergence stop (which saves the policy
    trainer's checkpoint, holding the critic's state).

    Distributed mode: the policy trainer's. Under FSDP a separate critic (`ValueModel`) is
    sharded like the policy: each transformer block of its backbone is one FSDP group, the
    embeddings, final norm and value head form the root group, and its AdamW state is sharded
    with it (about 1/world of the critic's weights and optimizer state per process). The
    shared_base critic's adapter is added to the policy after the policy was sharded, so FSDP
    leaves it alone: adapter and head (small) are replicated, and their gradients are averaged
    by the critic trainer (mode ddp with explicit parameters)."""
    mode = policy_trainer.mode  # one process: "none", whatever cfg.distributed says
    distributed = "ddp" if mode == "fsdp" and not isinstance(critic, ValueModel) else mode
    ccfg = cfg.model_copy(update={"lr": cfg.critic_lr, "distributed": distributed})
    explicit = None if isinstance(critic, torch.nn.Module) and critic.trainable_parameters() == [
        p for p in critic.parameters() if p.requires_grad] else critic.trainable_parameters()
    return Trainer(ccfg, critic, recipe="ppo-critic", total_steps=policy_trainer.total_steps,
                   dist_info=policy_trainer.dist, log=policy_trainer.info, params=explicit, log_metrics=False,
                   on_diverge=policy_trainer.save_checkpoint)


CRITIC_SHARDED_DIR = "critic_sharded"  # the sharded critic's folder inside an FSDP checkpoint


def register_critic_state(tr: Trainer, critic, critic_tr: Trainer) -> None:
    """Put the critic into the policy trainer's checkpoints, key "critic": weights (`critic.weights()`)
    plus optimizer, schedule and step in the trainer state; a critic sharded under FSDP writes its
    weights and AdamW state with torch.distributed.checkpoint (each process its shards) into the
    checkpoint's folder `critic_sharded` instead, which resumes on any number of processes."""
    sharded = critic_tr.fsdp is not None

    def get() -> dict:
        state = critic_tr.optimizer_state()
        return state if sharded else {"weights": critic.weights(), **state}

    def set_(state: dict) -> None:
        if "weights" in state:
            if sharded:
                raise UserError("the checkpoint holds a replicated critic (written before the critic was sharded "
                                "under FSDP); resume it with distributed=ddp")
            critic.load_weights(state["weights"])
        critic_tr.load_optimizer_state(state)

    tr.register_state("critic", get, set_)
    if sharded:
        tr.register_sharded_state(CRITIC_SHARDED_DIR, critic_tr.save_sharded_state, critic_tr.load_sharded_state)
    else:  # a checkpoint written under FSDP, resumed without it
        tr.register_sharded_state(CRITIC_SHARDED_DIR, lambda path: None, critic_tr.load_sharded_state)


def save_critic(critic, critic_tr: Trainer, out_dir: Path) -> None:
    """Write the trained critic to `out_dir` (`save_pretrained` of the critic), atomically, from the
    main process. Under FSDP every process takes part: the critic's full weights are gathered to
    rank 0 (on the CPU) first."""
    from alignkit.training import checkpoint as ckpt
    from alignkit.training.dist import barrier

    full = critic_tr.fsdp.full_state_dict() if critic_tr.fsdp is not None else None
    if critic_tr.dist.main:
        ckpt.atomic_dir_write(out_dir, lambda d: critic.save_pretrained(d, state_dict=full) if full is not None
                              else critic.save_pretrained(d))
    if critic_tr.fsdp is not None:
        barrier(critic_tr.dist)


def rollout_diagnostics(full: dict, kl, values, returns, dist: DistInfo) -> dict:
    """Global means of a prepared rollout: returns, values, KL per token and per response, the
    explained variance and the sampler/trainer log-prob gap."""
    mask = full["completion_mask"]
    gap_sum, gap_count = ol.mismatch(full["sampler_logps"], full["old_logps"], mask)
    n_samples, n_tok, kl_sum, gap_sum, gap_count, returns_sum, values_sum = all_reduce_sum(torch.tensor([
        float(mask.shape[0]), float(mask.sum()), float(kl.sum()) if kl is not None else 0.0, gap_sum, gap_count,
        float(returns.sum()), float(values.sum())], dtype=torch.float64), dist).tolist()
    out = {"returns_mean": returns_sum / n_tok, "values_mean": values_sum / n_tok,
           "explained_variance": explained_variance(values, returns, mask, dist),
           "logprob_mismatch": gap_sum / max(gap_count, 1.0),
           "mismatch_ratio_max": ol.max_over_ranks(ol.ratio_max(full["sampler_logps"], full["old_logps"], mask), dist)}
    if kl is not None:
        out.update(kl=kl_sum / n_tok, kl_seq=kl_sum / n_samples, kl_per_response=kl_sum / n_samples)
    return out


# --------------------------------------------------------------------------- the recipe


def train_ppo(cfg: PPOConfig, model=None, tokenizer=None, reward_fn=None) -> dict:
    """Run PPO; `reward_fn(prompts, completions, **columns) -> list[float | None]` overrides
    cfg.reward. `max_steps` counts rollout steps, each making ppo_epochs x num_minibatches
    optimizer steps of the policy and of the critic. Returns the last held-out evaluation plus
    `wall_s`; writes the critic to output_dir/critic with save_critic."""
    check_config(cfg)
    kl_ctl = KLController(cfg.kl_coef, cfg.kl_control == "adaptive", cfg.kl_target, cfg.kl_horizon)
    prompts_per_mb = cfg.batch_size * cfg.grad_accum  # one optimizer step's prompts, per process
    run = ol.OnlineRun(cfg, "ppo", model, tokenizer, updates_per_step=cfg.ppo_epochs * cfg.num_minibatches,
                       reward_fn=reward_fn, prompts_per_step=prompts_per_mb * cfg.num_minibatches)
    tr, dist = run.trainer, run.dist
    critic = build_critic(cfg, run)
    critic_tr = critic_trainer(cfg, critic, tr)
    moments = RunningMoments()
    tr.register_state("kl_controller", kl_ctl.state_dict, kl_ctl.load_state_dict)
    register_critic_state(tr, critic, critic_tr)
    tr.register_state("reward_moments", moments.state_dict, moments.load_state_dict)
    policy_loss, value_loss = ppo_policy_loss_fn(cfg), ppo_value_loss_fn(cfg)
    micro_rows = cfg.batch_size * cfg.num_generations
    normalise = score_normaliser(cfg, moments, dist)

    def step(rstep: int, clock: StepClock) -> StepResult:
        # 1. rollout: sample, score; overlong shaping, EOS penalty, normalisation and clipping of the score
        rollout = ol.shape_rewards(run.collect(rstep, *run.prompts_for(rstep), clock), cfg)
        info = ol.rollout_metrics(rollout)
        rollout = rollout.with_rewards(rollout.rewards - cfg.missing_eos_penalty * rollout.truncated.float())
        scored = scored_mask(rollout.rewards)
        scores = torch.where(scored, normalise(rollout.rewards), torch.zeros(()))
        # 2. no-grad passes over the whole rollout in micro-batch chunks: π_old, π_ref, V.
        #    A sample the reward source could not score leaves the mask: no reward, no advantage,
        #    no policy or value loss, no part in any whitening
        full = rollout.tensors(run.pad_id)
        full["completion_mask"] = full["completion_mask"] & scored[:, None]
        B, T = full["input_ids"].shape
        chunks = [take_rows(full, range(i, min(i + micro_rows, B))) for i in range(0, B, micro_rows)]
        full["old_logps"] = _pad_cat(run.old_logps(chunks), T)
        mask = full["completion_mask"]
        kl = None
        if run.ref is not None:
            run.add_ref_logps(chunks)
            ref_logps = _pad_cat([c["ref_logps"] for c in chunks], T)
            kl = torch.where(mask, kl_estimate(full["old_logps"], ref_logps, cfg.kl_estimator), torch.zeros(()))
        # sampler vs trainer (π_old): TIS weights or MIS drops for the policy loss; the critic keeps every token
        full["loss_mask"] = mask.clone()
        info.update(ol.correct_rollout([full], cfg, dist))
        values = _pad_cat(critic_values(critic, chunks, tr.device, tr.autocast, critic_tr.gathered), T)
        values = torch.where(mask, values, torch.zeros(()))
        # 3. reward with KL: r_t = −β KL_t, plus the score on the response's last token
        rewards = token_rewards(scores, kl, mask, kl_ctl.value)
        if cfg.whiten_rewards:
            rewards = global_whiten(rewards, mask, dist, shift_mean=False)
        # 4. GAE, then whitening of the advantages over the rollout
        adv, returns = gae(rewards, values, mask, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:
            adv = global_whiten(adv, mask, dist)
        full.update(advantages=adv, returns=returns, old_values=values)
        diagnostics = rollout_diagnostics(full, kl, values, returns, dist)
        kl_per_response = diagnostics.pop("kl_per_response", None)
        info.update(diagnostics, kl_coef=kl_ctl.value,
                    score_mean=float(all_reduce_sum(float(scores.sum()), dist)) / max(float(
                        all_reduce_sum(float(scored.sum()), dist)), 1.0))
        clock.lap("prepare")
        # 5. ppo_epochs passes over shuffled minibatches: clipped policy loss, clipped value loss
        per_mb = B // cfg.num_minibatches
        updates = []
        for epoch in range(cfg.ppo_epochs):
            perm = seeded_permutation(B, cfg.seed, rstep, 101, epoch)
            for k in range(cfg.num_minibatches):
                rows = perm[k * per_mb:(k + 1) * per_mb]
                mbs = [take_rows(full, rows[i:i + micro_rows]) for i in range(0, len(rows), micro_rows)]
                metrics = tr.accumulate(mbs, policy_loss, n_pg_tokens)
                with critic.active():
                    value = critic_tr.accumulate(mbs, value_loss, n_tokens)
                value = critic_tr.optimizer_step(value)
                metrics = tr.optimizer_step(metrics)
                metrics.update(info, policy_loss=metrics["loss"], ppo_epoch=epoch, value_loss=value["loss"],
                               value_grad_norm=value["grad_norm"], critic_lr=value["lr"],
                               **{k2: value[k2] for k2 in ("value_clip_frac", "value_mean", "value_mse")})
                updates.append(metrics)
        # 6. adaptive β from this rollout's KL per response
        if kl is not None:
            kl_ctl.update(kl_per_response, int(all_reduce_sum(B, dist)))
        return StepResult(updates, rollout, rollout.generated_tokens)

    t0 = time.time()
    try:
        result = dict(run.loop(step))
    finally:
        critic_tr.close()
    if cfg.save_critic:
        save_critic(critic, critic_tr, Path(cfg.output_dir) / "critic")
    result["wall_s"] = time.time() - t0
    return result


def score_normaliser(cfg: PPOConfig, moments: RunningMoments, dist: DistInfo):
    """scores (N,) -> scores normalised as `reward_norm` says (none | batch | running: by the mean
    and std of the global batch, or of every score so far) and clipped to ±reward_clip. NaN
    scores (not scored) take no part in the statistics and stay NaN."""

    def normalise(scores: torch.Tensor) -> torch.Tensor:
        if cfg.reward_norm == "none":
            out = scores
        else:
            ok = scores[scored_mask(scores)].double()
            s = all_reduce_sum(torch.tensor([float(ok.numel()), float(ok.sum()), float((ok ** 2).sum())],
                                            dtype=torch.float64), dist).tolist()
            if cfg.reward_norm == "running":
                moments.update(*s)
                mean, std = moments.mean, moments.std
            else:
                n = s[0]
                mean = s[1] / n if n else 0.0
                std = math.sqrt(max(s[2] - n * mean * mean, 0.0) / (n - 1)) if n > 1 else 0.0
            out = (scores - mean) / (std if std > 0 else 1.0)
        if cfg.reward_clip is not None:
            out = out.clamp(-cfg.reward_clip, cfg.reward_clip)
        return out

    return normalise
