"""Reward models from preference pairs.

A pair is a prompt x, a preferred response y_w and a dispreferred one y_l. The network reads the
last real token of x + y (its final hidden state h) through a linear head (see
`alignkit.models.reward`); the base model's LM head is not used.

Scalar (Bradley & Terry 1952; the RLHF reward model of Ouyang et al. 2022):

    r(x, y) = w . h(x, y)
    P(y_w > y_l) = sigmoid(r_w - r_l)
    loss per pair = -log sigmoid(r_w - r_l - m)  +  c (r_w + r_l)^2

m is the optional per-pair `margin` column (a pair known to be clearly separated must win by at
least m); c = `center_coef` pulls the rewards of each pair towards 0 (Eisenstein et al. 2023), since
the Bradley-Terry likelihood only fixes reward differences.

Distributional (K = `num_scores` score classes):

    p(s = i | x, y) = softmax(W h(x, y))_i,  i = 1..K
    P(s_w > s_l) = sum_{i > j} p_i(y_w) p_j(y_l)            (s_w, s_l drawn independently)
    loss per pair = -log P(s_w > s_l)

The reward handed out is the expected score E[s] = sum_i i p_i (or `reward_stat`). After each
evaluation a temperature T (logits / T) is fitted on the held-out pairs and stored with the model.

The chosen and rejected sides of a micro-batch go through the network in one forward pass. With
`share_prompt` (default) each pair is one row, [prompt | y_w | y_l], whose attention mask lets each
response see the prompt and itself only, at positions that continue the prompt: the prompt is
computed once, and the rewards and gradients are those of two full sequences. Without it, 2B
full rows (B chosen, then B rejected). A step's loss is the sum over the pairs of the global batch
divided by their number (units = pairs; see `alignkit.training.trainer`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from alignkit.config import RMConfig
from alignkit.data.chat import setup_chat_template
from alignkit.data.preference import load_pairs, pair_collate
from alignkit.errors import UserError
from alignkit.losses import bradley_terry_loss, distributional_preference_loss
from alignkit.models import load_tokenizer
from alignkit.models.reward import (
    CONFIG_KEY,
    RewardSpec,
    _no_generation,
    expected_calibration_error,
    fit_temperature,
    hf_pad_token_id,
    is_adapter_model,
    load_reward_backbone,
    pair_batch_logits,
    shared_prompt_unsupported,
    preference_nll,
    preference_probability,
    reward_parts,
    rewards_from_logits,
    score_entropy,
)
from alignkit.training.dist import init_distributed
from alignkit.data.order import seeded_permutation
from alignkit.training.loop import run_offline, steps_for, to_device
from alignkit.training.trainer import Trainer, seed_everything

__all__ = ["RMConfig", "train_rm", "rm_loss_fn", "evaluate_pairs"]

REWARD_CONFIG_FILE = "reward_config.json"  # written next to an adapter (no config.json of its own)


# ---------------------------------------------------------------------------------------- the loss


def rm_loss_fn(spec: RewardSpec, center_coef: float = 0.0):
    """loss_fn(model, micro_batch) -> (sum of the per-pair losses, metric sums)."""

    def loss_fn(model, mb: dict):
        logits = pair_batch_logits(model, mb)  # (2B, K): B chosen rows, then B rejected
        n = mb["n_pairs"]
        chosen, rejected = logits[:n], logits[n:]
        if spec.kind == "scalar":
            r_w, r_l = chosen[:, 0], rejected[:, 0]
            loss_sum = bradley_terry_loss(r_w, r_l, mb.get("margin")) * n
            if center_coef:
                loss_sum = loss_sum + center_coef * ((r_w + r_l) ** 2).sum()
        else:
            loss_sum = distributional_preference_loss(chosen, rejected) * n
            r_w = rewards_from_logits(chosen, spec, temperature=1.0)
            r_l = rewards_from_logits(rejected, spec, temperature=1.0)
        with torch.no_grad():
            gap = (r_w - r_l).detach()
            won = (gap > 0).sum() + 0.5 * (gap == 0).sum()
        return loss_sum, {"accuracy": won, "margin": gap.sum()}

    return loss_fn


# ---------------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def pair_logits(model, pairs, batch_size: int, collate, dist, autocast, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Head outputs (N, K) for the chosen and the rejected side of every pair, in pair order.
    Each rank scores its share (pairs rank, rank + world, ...); every rank gets the whole result."""
    was_training = model.training
    model.eval()
    mine = list(range(dist.rank, len(pairs), dist.world))
    idx, ws, ls = [], [], []
    for s in range(0, len(mine), batch_size):
        chunk = mine[s:s + batch_size]
        mb = collate([pairs[i] for i in chunk])
        mb = to_device(mb, dist.device)
        with autocast():
            logits = pair_batch_logits(model, mb).float().cpu()
        idx += chunk
        ws.append(logits[:len(chunk)])
        ls.append(logits[len(chunk):])
    model.train(was_training)
    part = (idx, torch.cat(ws) if ws else torch.empty(0, k), torch.cat(ls) if ls else torch.empty(0, k))
    parts = [part]
    if dist.enabled:
        import torch.distributed as tdist

        parts = [None] * dist.world
        tdist.all_gather_object(parts, part)
    order = torch.tensor([i for p in parts for i in p[0]], dtype=torch.long)
    chosen, rejected = torch.cat([p[1] for p in parts]), torch.cat([p[2] for p in parts])
    out_w, out_l = torch.empty_like(chosen), torch.empty_like(rejected)
    out_w[order], out_l[order] = chosen, rejected
    return out_w, out_l


def evaluate_pairs(chosen: torch.Tensor, rejected: torch.Tensor, spec: RewardSpec, calibrate: bool = True,
                   margins: torch.Tensor | None = None, n_bins: int = 10) -> tuple[dict, float]:
    """Held-out metrics from the head outputs of N pairs; returns (metrics, temperature).

    eval_loss        the training loss (without the centering term)
    eval_accuracy    fraction of pairs with r_w > r_l (ties count 1/2), rewards as the model hands them out
    eval_margin      mean r_w - r_l
    eval_nll, eval_ece   -log q and the ECE of q = the model's P(y_w preferred), at T = 1 (before calibration)
    distributional only:
    eval_entropy     mean entropy (nats) of the score distributions of both sides, at the fitted T
    eval_temperature the fitted T (1 without calibration)
    eval_nll_calibrated, eval_ece_calibrated   the same after temperature scaling, cross-fitted: the
                     pairs are split into two halves (even / odd index) and each half is scored with the
                     T fitted on the other, so no pair is scored by a T fitted on itself. The T stored
                     with the model is fitted on all held-out pairs.
    """
    n = chosen.shape[0]
    T, q_cal = 1.0, None
    if spec.kind == "scalar":
        loss = bradley_terry_loss(chosen[:, 0].double(), rejected[:, 0].double(),
                                  None if margins is None else margins.double())
    else:
        loss = distributional_preference_loss(chosen.double(), rejected.double())
        if calibrate and n >= 2:
            T = fit_temperature(chosen, rejected, spec.kind)
            if n >= 4:
                even, odd = torch.arange(0, n, 2), torch.arange(1, n, 2)
                t_even = fit_temperature(chosen[even], rejected[even], spec.kind)
                t_odd = fit_temperature(chosen[odd], rejected[odd], spec.kind)
                q_cal = torch.empty(n, dtype=torch.float64)
                q_cal[odd] = preference_probability(chosen[odd], rejected[odd], spec.kind, t_even)
                q_cal[even] = preference_probability(chosen[even], rejected[even], spec.kind, t_odd)
            else:
                q_cal = preference_probability(chosen, rejected, spec.kind, T)
    r_w = rewards_from_logits(chosen, spec, temperature=T)
    r_l = rewards_from_logits(rejected, spec, temperature=T)
    gap = (r_w - r_l).double()
    q_raw = preference_probability(chosen, rejected, spec.kind, 1.0)
    out: dict = {
        "eval_pairs": n,
        "eval_loss": float(loss),
        "eval_accuracy": float(((gap > 0).double() + 0.5 * (gap == 0).double()).mean()),
        "eval_margin": float(gap.mean()),
    }
    if spec.kind == "distributional":
        out["eval_entropy"] = float(torch.cat([score_entropy(chosen, T), score_entropy(rejected, T)]).mean())
    out["eval_nll"] = preference_nll(q_raw)
    out["eval_ece"] = expected_calibration_error(q_raw, n_bins)
    if spec.kind == "distributional":
        out["eval_temperature"] = T
        if q_cal is not None:
            out["eval_nll_calibrated"] = preference_nll(q_cal)
            out["eval_ece_calibrated"] = expected_calibration_error(q_cal, n_bins)
    return out, T


# ---------------------------------------------------------------------------------------- data + model


def shared_prompt_collate(pairs: list, pad_id: int) -> dict | None:
    """One row per pair: [prompt | chosen response | rejected response], right-padded, for
    `shared_prompt_logits`. A pair's prompt is its shared leading tokens, shortened if needed so
    that each response keeps at least one token. None when some pair has no shared token (then
    use `pair_collate`)."""
    rows, segs, poss, last, n_tokens = [], [], [], [], 0
    for p in pairs:
        c, r = p.chosen.input_ids, p.rejected.input_ids
        k = min(p.prompt_len, len(c) - 1, len(r) - 1)
        if k < 1:
            return None
        rows.append(c + r[k:])
        segs.append([0] * k + [1] * (len(c) - k) + [2] * (len(r) - k))
        poss.append(list(range(len(c))) + list(range(k, len(r))))
        last.append((len(c) - 1, len(c) + len(r) - k - 1))
        n_tokens += len(c) + len(r)
    B, T = len(rows), max(len(x) for x in rows)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    seg = torch.full((B, T), 3, dtype=torch.long)
    pos = torch.zeros((B, T), dtype=torch.long)
    for i in range(B):
        n = len(rows[i])
        ids[i, :n] = torch.tensor(rows[i], dtype=torch.long)
        seg[i, :n] = torch.tensor(segs[i], dtype=torch.long)
        pos[i, :n] = torch.tensor(poss[i], dtype=torch.long)
    batch = {"input_ids": ids, "segments": seg, "position_ids": pos, "last_index": torch.tensor(last),
             "n_pairs": B, "n_tokens": n_tokens}
    if any(p.margin is not None for p in pairs):
        batch["margin"] = torch.tensor([p.margin or 0.0 for p in pairs], dtype=torch.float32)
    return batch


def batch_tokens(mb: dict) -> int:
    """Real tokens of the pair sequences in a batch (both sides in full, whichever the layout)."""
    return int(mb["n_tokens"]) if "n_tokens" in mb else int(mb["attention_mask"].sum())


@torch.no_grad()
def shared_prompt_agrees(model, pairs: list, pad_id: int, tol: float = 1e-3) -> tuple[bool, float]:
    """Check on a few pairs that the shared-prompt pass gives the one-pass head outputs (a model
    family whose attention or cache does not fit the scheme shows up here). Returns (ok, max gap)."""
    sample = pairs[:4]
    shared = shared_prompt_collate(sample, pad_id)
    if shared is None:
        return True, 0.0
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        a = pair_batch_logits(model, to_device(pair_collate(sample, pad_id), device))
        b = pair_batch_logits(model, to_device(shared, device))
    except Exception:  # a model whose forward refuses the cache arguments
        return False, float("inf")
    finally:
        model.train(was_training)
    gap = float((a - b).abs().max())
    return gap <= tol * (1.0 + float(a.abs().max())), gap


def split_holdout(pairs: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, held-out): a seeded random `fraction` of the pairs held out."""
    n_eval = int(round(len(pairs) * fraction))
    if n_eval == 0:
        return pairs, []
    perm = seeded_permutation(len(pairs), seed, 17)
    held = set(perm[:n_eval])
    return [p for i, p in enumerate(pairs) if i not in held], [pairs[i] for i in sorted(held)]


def prepare_reward_trainable(model, cfg: RMConfig, log=None):
    """`prepare_trainable` for a reward model: the head always trains in full.

    With an adapter (peft.method=lora, ...) the head is added to `peft.modules_to_save`, so it
    trains next to the adapter and is saved with it. `prepare_trainable` wraps models in peft's
    causal-LM class, whose constructor looks up `prepare_inputs_for_generation`; a sequence-
    classification model has none, so it gets a stub that refuses to be called (only the wrapped
    model's decoder and head are ever used)."""
    from alignkit.models.peft import prepare_trainable

    pc = cfg.peft
    if pc.method in ("prefix", "prompt"):
        raise UserError(f"peft.method={pc.method} is not supported for reward models (learned virtual tokens change "
                        "which token is last); use peft.method=lora or full fine-tuning")
    if pc.method == "qlora":
        raise UserError("peft.method=qlora is not supported for reward models yet; use peft.method=lora")
    if pc.method == "none":
        model = prepare_trainable(model, cfg, log=log)
        for p in reward_parts(model)[1].parameters():
            p.requires_grad_(True)
        return model
    keep = list(pc.modules_to_save or [])
    if "score" not in keep:
        keep.append("score")
    cfg = cfg.model_copy(update={"peft": pc.model_copy(update={"modules_to_save": keep})})
    if not hasattr(model, "prepare_inputs_for_generation"):
        model.prepare_inputs_for_generation = _no_generation
    return prepare_trainable(model, cfg, log=log)


def _write_reward_config(run_dir: Path, spec: RewardSpec) -> None:
    tmp = run_dir / f".{REWARD_CONFIG_FILE}.tmp"
    tmp.write_text(json.dumps(spec.to_dict(), indent=2), encoding="utf-8")
    os.replace(tmp, run_dir / REWARD_CONFIG_FILE)


# ---------------------------------------------------------------------------------------- the recipe


def train_rm(cfg: RMConfig, model=None, tokenizer=None) -> dict:
    """Train a reward model as configured; returns the final held-out metrics (empty without any).

    `model` may be passed in: a transformers `*ForSequenceClassification` with the right number of
    outputs (e.g. from `alignkit.models.reward.load_reward_backbone`)."""
    dist = init_distributed()
    seed_everything(cfg.seed)
    spec = RewardSpec(kind=cfg.kind, num_scores=1 if cfg.kind == "scalar" else cfg.num_scores,
                      reward_stat=cfg.reward_stat, max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length)
    tok = tokenizer or load_tokenizer(cfg.model)
    setup_chat_template(tok, cfg.chat_template)

    pairs, stats = load_pairs(cfg.data, cfg.data_split, tok, cfg.max_length, cfg.truncation, cfg.max_prompt_length)
    held_from = "eval_data"
    if cfg.eval_data:
        held, _ = load_pairs(cfg.eval_data, cfg.eval_split, tok, cfg.max_length, cfg.truncation,
                             cfg.max_prompt_length, what="eval_data")
    else:
        pairs, held = split_holdout(pairs, cfg.eval_fraction, cfg.seed)
        held_from = f"{len(held)} pairs held out of data (eval_fraction={cfg.eval_fraction})"

    fresh = None
    if model is None:
        model, fresh = load_reward_backbone(cfg.model, spec, "float32")
    model.config.use_cache = False
    model.config.pad_token_id = hf_pad_token_id(tok)
    model.config.update({CONFIG_KEY: spec.to_dict()})
    model = prepare_reward_trainable(model, cfg)

    total_steps = steps_for(cfg, len(pairs), dist.world)
    trainer = Trainer(cfg, model, tok, recipe=f"rm-{cfg.kind}", total_steps=total_steps, dist_info=dist)
    trainer.info(f"data: {cfg.data}: {stats.summary()}")
    head = "a new" if fresh else "the loaded" if fresh is False else "the given"
    trainer.info(f"reward model: {cfg.kind}, {spec.num_scores} output(s), {head} head on the last real token "
                 f"(no LM head); held-out: {held_from if held else 'none'}")
    if cfg.kind == "distributional" and any(p.margin is not None for p in pairs):
        trainer.info("note: the 'margin' column only applies to kind=scalar; ignored")
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    share = cfg.share_prompt
    if share:
        why = shared_prompt_unsupported(trainer.model)
        if why is None:
            with trainer.gathered():  # under FSDP: full weights, no collectives inside
                share, gap = shared_prompt_agrees(trainer.model, pairs, pad_id)
            why = None if share else f"it differs from full sequences on this model (gap {gap:.3g})"
        if why is not None:
            share = False
            trainer.info(f"share_prompt: off ({why}); each side goes through as a full sequence")

    def collate(batch_pairs):
        return (shared_prompt_collate(batch_pairs, pad_id) if share else None) or pair_collate(batch_pairs, pad_id)

    def make_batch(idx):
        return collate([pairs[i] for i in idx])

    eval_fn = None
    if held:
        margins = None
        if any(p.margin is not None for p in held):
            margins = torch.tensor([p.margin or 0.0 for p in held], dtype=torch.float64)

        def eval_fn():
            w, l = pair_logits(trainer.model, held, cfg.batch_size, collate, dist, trainer.autocast, spec.num_scores)
            metrics, T = evaluate_pairs(w, l, spec, calibrate=cfg.calibrate, margins=margins)
            spec.temperature = T  # belongs to the weights just evaluated; saved with them
            trainer.model.config.update({CONFIG_KEY: spec.to_dict()})
            return metrics

    result = run_offline(trainer, len(pairs), make_batch, rm_loss_fn(spec, cfg.center_coef),
                         units=lambda mb: mb["n_pairs"], eval_fn=eval_fn)
    if dist.main and is_adapter_model(trainer.model):
        _write_reward_config(Path(cfg.output_dir), spec)
    return result

