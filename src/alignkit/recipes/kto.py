"""Kahneman-Tversky optimisation (Ethayarajh et al. 2024, arXiv:2402.01306) on unpaired feedback.

Each row is a prompt x, a completion y and a label: desirable or undesirable. With
r(x, y) = log pi(y|x) - log pi_ref(y|x) (summed over the completion's tokens):

    z0   = max(0, mean over mismatched pairs (x_i, y_j) of r(x_i, y_j))    detached, per global batch
    loss = desirable_weight   * (1 - sigmoid(beta (r - z0)))    desirable rows
         + undesirable_weight * (1 - sigmoid(beta (z0 - r)))    undesirable rows

summed over rows and divided by the global batch's row count (`alignkit.losses.kto_loss`). The
math and the config keys are in docs/kto.md. The recipe, top to bottom:

1. Load the rows (`load_kto_examples`): unpaired {prompt, completion, label} or preference pairs
   split into a desirable and an undesirable row. Row i also gets its mismatched partner: its
   prompt with the completion of another row (fixed for the run, so its reference log-prob can
   be cached like the matched one).
2. The reference is DPO's (`alignkit.recipes.dpo`): log-probs precomputed once and cached in
   output_dir/ref_logps.pt, or the same network with its adapter switched off.
3. Before each optimizer step, while its micro-batches are built, a no-grad pass over their
   mismatched pairs sums log pi - log pi_ref; the sums of all micro-batches and ranks give the
   step's one z0. So every row of a global batch sees the same reference point, and 1 x 8, 4 x 2
   and 2 ranks x 4 give the same gradient (the paper estimates z0 per micro-batch instead).
4. Each micro-batch is one forward over its rows; the loss is the SUM over rows, the trainer
   divides by the global row count.
"""

from __future__ import annotations

import contextlib

import torch

from alignkit.config import DPOConfig, KTOConfig
from alignkit.data.chat import setup_chat_template
from alignkit.data.collate import pad_collate
from alignkit.data.preference import Pair, load_kto_examples
from alignkit.errors import UserError
from alignkit.losses import kto_loss
from alignkit.models import load_tokenizer
from alignkit.models.peft import load_base_model, prepare_trainable, reference_logps_context
from alignkit.recipes.dpo import _check as _dpo_check
from alignkit.recipes.dpo import cached_reference_logps, resolve_reference, sequence_logps
from alignkit.training.dist import DistInfo, all_reduce_sum, init_distributed
from alignkit.training.loop import run_offline, steps_for
from alignkit.training.trainer import Trainer, seed_everything

__all__ = ["KTOConfig", "train_kto", "kto_batch", "kto_row_loss", "mismatched_kl_sums", "evaluate_kto", "step_functions",
           "METRICS"]

# Logged per step and per evaluation: means over the rows of each kind.
METRICS = (
    "rewards/desirable",  # beta * (log pi - log pi_ref) of the desirable completions
    "rewards/undesirable",
    "logps/desirable",  # summed log pi(y|x)
    "logps/undesirable",
    "kl",  # the reference point z0 used by the step
)


def kto_batch(examples: list[Pair], idx: list[int], pad_id: int, ref: tuple | None) -> dict:
    """Rows `idx`: their own prompt + completion (`input_ids`... as `pad_collate`), `desirable`
    (R,) bool, and their mismatched pairs under the `mis_` prefix; `ref` / `mis_ref` (R,) when
    the reference log-probs are precomputed (ref = (matched (N,), mismatched (N,)))."""
    rows = [examples[i] for i in idx]
    mb = pad_collate([e.chosen for e in rows], pad_id)
    mis = pad_collate([e.rejected for e in rows], pad_id)
    mb.update({f"mis_{k}": v for k, v in mis.items()})
    mb["desirable"] = torch.tensor([bool(e.extra["label"]) for e in rows])
    mb["n_rows"] = len(rows)
    if ref is not None:
        t = torch.as_tensor(idx, dtype=torch.long)
        mb["ref"] = ref[0].index_select(0, t)
        mb["mis_ref"] = ref[1].index_select(0, t)
    return mb


def _mis(mb: dict) -> dict:
    return {k[4:]: v for k, v in mb.items() if k.startswith("mis_") and k != "mis_ref"}


@torch.no_grad()
def mismatched_kl_sums(model, mb: dict, reference: str, chunk_size: int) -> tuple[float, float]:
    """(sum over the micro-batch's mismatched pairs with >= 1 answer token of log pi - log pi_ref,
    their number): the pieces of z0."""
    mis = _mis(mb)
    lp, n = sequence_logps(model, mis, chunk_size)
    if reference == "precompute":
        ref = mb["mis_ref"].to(lp)
    else:
        with reference_logps_context(model):
            ref, _ = sequence_logps(model, mis, chunk_size)
    ok = n > 0
    return float(torch.where(ok, lp - ref, torch.zeros_like(lp)).sum()), float(ok.sum())


def kto_row_loss(model, mb: dict, cfg: DPOConfig, reference: str, z0: float) -> tuple[torch.Tensor, dict]:
    """(sum over the micro-batch's rows of the KTO loss, metric sums) for a given z0."""
    good = mb["desirable"].bool()
    if reference == "adapter_off":
        with reference_logps_context(model):  # first, while no graph is held
            ref, _ = sequence_logps(model, mb, cfg.logits_chunk_size)
    logps, _ = sequence_logps(model, mb, cfg.logits_chunk_size)
    if reference == "precompute":
        ref = mb["ref"]
    ref = ref.to(logps.dtype)
    losses, rewards = kto_loss(logps, ref, good, z0, cfg.beta, cfg.desirable_weight, cfg.undesirable_weight)
    bad = ~good
    n_good, n_bad = good.sum().double(), bad.sum().double()
    lp = logps.detach()
    zero = torch.zeros((), dtype=lp.dtype, device=lp.device)
    metrics = {
        "rewards/desirable": (torch.where(good, rewards, zero).sum(), n_good),
        "rewards/undesirable": (torch.where(bad, rewards, zero).sum(), n_bad),
        "logps/desirable": (torch.where(good, lp, zero).sum(), n_good),
        "logps/undesirable": (torch.where(bad, lp, zero).sum(), n_bad),
        "kl": float(z0) * len(good),  # a sum over rows: logged as z0
    }
    return losses.sum(), metrics


@torch.no_grad()
def evaluate_kto(model, examples: list[Pair], cfg: DPOConfig, reference: str, pad_id: int, ref: tuple | None = None,
                 dist: DistInfo | None = None, autocast=None, device=None) -> dict:
    """KTO loss and metrics over `examples` without gradients, z0 from all their mismatched pairs;
    keys prefixed with `eval_` (eval_loss, eval_rewards/desirable, ..., eval_kl, eval_rows)."""
    dist = dist or DistInfo()
    device = device or next(model.parameters()).device
    ac = autocast or contextlib.nullcontext
    was_training = model.training
    model.eval()
    mine = list(range(dist.rank, len(examples), dist.world))
    batches = [mine[s:s + cfg.batch_size] for s in range(0, len(mine), cfg.batch_size)]

    def batch(idx):
        return {k: (v.to(device) if isinstance(v, torch.Tensor) else v)
                for k, v in kto_batch(examples, idx, pad_id, ref).items()}

    try:
        kl = torch.zeros(2, dtype=torch.float64)
        for idx in batches:
            with ac():
                s, n = mismatched_kl_sums(model, batch(idx), reference, cfg.logits_chunk_size)
            kl += torch.tensor([s, n], dtype=torch.float64)
        kl = all_reduce_sum(kl, dist)
        z0 = max(float(kl[0]) / max(float(kl[1]), 1.0), 0.0)
        keys = ["loss", *METRICS]
        sums = torch.zeros(2 * len(keys) + 1, dtype=torch.float64)
        for idx in batches:
            with ac():
                loss, m = kto_row_loss(model, batch(idx), cfg, reference, z0)
            vals = [(float(loss), len(idx))] + [m[k] if isinstance(m[k], tuple) else (m[k], len(idx))
                                                for k in METRICS]
            for i, (a, b) in enumerate(vals):
                sums[2 * i] += float(a)
                sums[2 * i + 1] += float(b)
            sums[-1] += len(idx)
    finally:
        model.train(was_training)
    red = all_reduce_sum(sums, dist)
    out = {f"eval_{k}": float(red[2 * i]) / max(float(red[2 * i + 1]), 1.0) for i, k in enumerate(keys)}
    return out | {"eval_rows": int(red[-1])}


def step_functions(trainer: Trainer, examples: list[Pair], cfg: DPOConfig, reference: str, pad_id: int,
                   ref: tuple | None):
    """(make_batch, loss_fn) for `run_offline` / `Trainer.accumulate`, sharing one z0 per step.

    make_batch(idx) builds a micro-batch and adds its mismatched pairs' sums of log pi - log pi_ref
    to the step's running totals (the model is the same for every micro-batch of a step: the
    update comes after); the first loss_fn call of the step reduces the totals over ranks into z0.
    Raises RuntimeError if a loss is asked before all `grad_accum` micro-batches were built."""
    z = {"step": None, "sum": 0.0, "n": 0.0, "mbs": 0, "z0": None}

    def make_batch(idx):
        if z["step"] != trainer.step:
            z.update(step=trainer.step, sum=0.0, n=0.0, mbs=0, z0=None)
        mb = kto_batch(examples, idx, pad_id, ref)
        with trainer.autocast():
            mis = trainer.to_device({k: v for k, v in mb.items() if k.startswith("mis_")})
            s, n = mismatched_kl_sums(trainer.model, mis, reference, cfg.logits_chunk_size)
        z["sum"] += s
        z["n"] += n
        z["mbs"] += 1
        return {k: v for k, v in mb.items() if not k.startswith("mis_")}

    def loss_fn(model, mb):
        if z["z0"] is None:
            if z["step"] != trainer.step or z["mbs"] != cfg.grad_accum:
                raise RuntimeError("kto: the step's micro-batches must all be built before the first loss "
                                   "(the reference point z0 is a global-batch statistic)")
            red = all_reduce_sum(torch.tensor([z["sum"], z["n"]], dtype=torch.float64), trainer.dist)
            z["z0"] = max(float(red[0]) / max(float(red[1]), 1.0), 0.0)
        return kto_row_loss(model, mb, cfg, reference, z["z0"])

    return make_batch, loss_fn


def _check(cfg: DPOConfig) -> None:
    if not cfg.data:
        raise UserError("no training data; pass data=PATH (rows with prompt/completion/label, or "
                        "prompt/chosen/rejected pairs)")
    _dpo_check(cfg)
    if cfg.sft_weight or cfg.label_smoothing:
        raise UserError("sft_weight and label_smoothing do not apply to KTO; set them to 0 (weigh the two kinds "
                        "of rows with desirable_weight / undesirable_weight)")


def train_kto(cfg: DPOConfig, model=None, tokenizer=None) -> dict:
    """Run KTO as configured (a `KTOConfig`, or a `DPOConfig` with loss=kto); returns the final
    evaluation metrics (empty without eval_data)."""
    _check(cfg)
    dist = init_distributed()
    seed_everything(cfg.seed)
    tok = tokenizer or load_tokenizer(cfg.model)
    setup_chat_template(tok, cfg.chat_template)
    examples, stats, (n_good, n_bad) = load_kto_examples(cfg.data, cfg.data_split, tok, cfg.max_length,
                                                         cfg.truncation, cfg.max_prompt_length)
    eval_examples = None
    if cfg.eval_data:
        eval_examples, _, _ = load_kto_examples(cfg.eval_data, cfg.eval_split, tok, cfg.max_length, cfg.truncation,
                                                cfg.max_prompt_length, what="eval_data")
    if model is None:
        model = load_base_model(cfg)
    model = prepare_trainable(model, cfg)
    reference = resolve_reference(cfg, model)
    if hasattr(model, "config"):
        model.config.use_cache = False
    trainer = Trainer(cfg, model, tok, recipe="kto", total_steps=steps_for(cfg, len(examples), dist.world),
                      dist_info=dist)
    trainer.info(f"data: {cfg.data}: {stats.summary()}; {n_good} desirable, {n_bad} undesirable")
    if n_good == 0 or n_bad == 0:
        trainer.info("kto: warning: only one kind of row; the loss still trains against the reference point z0")
    ratio = (cfg.desirable_weight * n_good) / max(cfg.undesirable_weight * n_bad, 1e-12)
    trainer.info(f"kto: beta={cfg.beta}, desirable_weight={cfg.desirable_weight}, undesirable_weight="
                 f"{cfg.undesirable_weight} (weighted desirable:undesirable = {ratio:.3g}; the paper keeps it in "
                 f"[1, 4/3]), reference={reference}")
    pad = tok.pad_token_id
    state: dict = {"eval_ref": None}

    def prepare():
        # Before any checkpoint is loaded: the model is still the starting point, i.e. the reference.
        ref = None
        if reference == "precompute":
            # Matched and mismatched rows ride in the chosen / rejected slots of DPO's cached pass.
            ref = cached_reference_logps(trainer, cfg, examples, cfg.data, cfg.data_split, "kto_train", pad)
            if eval_examples is not None:
                state["eval_ref"] = cached_reference_logps(trainer, cfg, eval_examples, cfg.eval_data,
                                                           cfg.eval_split, "kto_eval", pad)
        state["make_batch"], state["loss_fn"] = step_functions(trainer, examples, cfg, reference, pad, ref)

    eval_fn = None
    if eval_examples is not None:
        def eval_fn():
            return evaluate_kto(trainer.model, eval_examples, cfg, reference, pad, state["eval_ref"], dist,
                                trainer.autocast, trainer.device)

    return run_offline(trainer, len(examples), lambda idx: state["make_batch"](idx),
                       lambda model, mb: state["loss_fn"](model, mb), lambda mb: mb["n_rows"], eval_fn=eval_fn,
                       prepare=prepare)
