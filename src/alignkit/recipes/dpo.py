"""Direct preference optimisation and its relatives: IPO, hinge (SLiC), cDPO / robust DPO, SimPO.

For a prompt x, a preferred answer y_w and a dispreferred one y_l, with log pi(y|x) the summed
log-probability of the answer tokens under the policy and log pi_ref(y|x) under the reference
(the starting model):

    h    = [log pi(y_w|x) - log pi_ref(y_w|x)] - [log pi(y_l|x) - log pi_ref(y_l|x)]
    loss = -log sigmoid(beta * h)                   (DPO; the variants: `alignkit.losses.dpo_loss`)
         + sft_weight * ( -log pi(y_w|x) / |y_w| )  (optional NLL on the chosen answer, token mean)

The derivation and every variant's formula are in docs/dpo.md. The recipe, top to bottom:

1. Load the pairs (explicit `prompt` or implicit shared prompt), the model, and make it trainable
   (`prepare_trainable`: adapters or partial freezing from `peft.*`, `train_last_layers`,
   `train_modules`).
2. The reference never sits in memory next to the policy:
   - `precompute`: before the first update, one batched no-grad pass over the pairs gives
     log pi_ref(y_w|x) and log pi_ref(y_l|x); they are cached in `output_dir/ref_logps.pt` under a
     hash of everything they depend on (model files, data, tokenisation) and reused on resume;
   - `adapter_off`: with an adapter, the reference is the same network with the adapter switched
     off, run per micro-batch without gradients;
   - `simpo` and `orpo` are reference-free: no reference is loaded or computed.
3. Each micro-batch holds the chosen rows followed by the rejected rows (`pair_collate`);
   `pair_logps` runs each pair's shared prompt once ([prompt, chosen, rejected] under a 4D mask,
   `shared_prompt_pair_logps`) where the model allows it, else the 2B rows as they are; per-token
   log-probs are chunked through the LM head (never the full tokens x vocab log-softmax) and
   summed over the answer tokens.
4. The micro-batch returns the SUM of its per-pair losses; the trainer divides by the number of
   pairs in the whole global batch (units = pairs), so 1 x 8, 4 x 2 and 2 ranks x 4 give the same
   gradient. Metrics are sums over pairs too, so they are logged as means over the global batch.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from array import array
from pathlib import Path

import torch

from alignkit.config import DPOConfig
from alignkit.data.chat import setup_chat_template
from alignkit.data.collate import IGNORE
from alignkit.data.preference import Pair, load_pairs, pair_collate
from alignkit.errors import UserError
from alignkit.losses import dpo_loss, log1mexp, orpo_loss
from alignkit.models import load_tokenizer
from alignkit.models.peft import is_peft_model, load_base_model, prepare_trainable, reference_logps_context
from alignkit.ops.logprobs import causal_lm_token_logps, shared_prompt_pair_logps
from alignkit.training.dist import DistInfo, all_reduce_sum, barrier, broadcast_object, init_distributed
from alignkit.training.loop import run_offline, steps_for, to_device
from alignkit.training.trainer import Trainer, seed_everything

__all__ = [
    "DPOConfig",
    "train_dpo",
    "sequence_logps",
    "pair_logps",
    "length_groups",
    "pair_loss",
    "dpo_loss_fn",
    "compute_reference_logps",
    "reference_cache_key",
    "weights_fingerprint",
    "resolve_reference",
    "evaluate_pairs",
    "METRICS",
    "REF_FILE",
]

REF_FILE = "ref_logps.pt"
REFERENCE_FREE = ("simpo", "orpo")  # losses that load and compute no reference
CACHE_VERSION = 1

# Logged for every step and every evaluation (means over pairs), plus `nll` when sft_weight > 0.
METRICS = (
    "rewards/chosen",  # implicit reward beta * (log pi - log pi_ref) of y_w (SimPO: beta * mean log pi)
    "rewards/rejected",
    "rewards/accuracy",  # fraction of pairs with reward(y_w) > reward(y_l)
    "rewards/margin",  # reward(y_w) - reward(y_l)
    "logps/chosen",  # summed log pi(y_w|x)
    "logps/rejected",
    "logps/chosen_mean",  # per-token mean log pi(y_w|x)
    "logps/rejected_mean",
)


# ----------------------------------------------------------------------------------------------
# Log-probs of whole answers
# ----------------------------------------------------------------------------------------------


def sequence_logps(model, batch: dict, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of log p over each row's answer tokens (R,), number of answer tokens (R,)) for a padded
    batch of R rows with `targets` (-100 = not an answer token).

    In one process, rows of very different lengths go through the model in up to three groups of
    similar length (`length_groups`), each cut after its longest row: the padding a single (R, T)
    batch would push through every layer is not computed. Exact: a causal LM's outputs at
    position t do not depend on later positions nor on other rows; only float rounding differs
    (the matmuls' shapes change), well below 1e-6 relative."""
    mask = batch["targets"] != IGNORE
    counts = mask.sum(-1)
    keys = ("input_ids", "attention_mask", "position_ids", "targets")
    # how far each row must run: its last real token or its last scored position
    pos = torch.arange(mask.shape[1], device=mask.device)
    need = (torch.where(mask | batch["attention_mask"].bool(), pos + 1, 0).amax(-1)).tolist()
    groups = length_groups(need) if _may_group() else [(list(range(len(need))), mask.shape[1])]
    sums, order = [], []
    for rows, T in groups:
        if len(groups) == 1:
            sub = {k: batch[k][:, :T] for k in keys}
        else:
            idx = torch.as_tensor(rows, device=mask.device)
            sub = {k: batch[k].index_select(0, idx)[:, :T] for k in keys}
        lp = causal_lm_token_logps(model, sub["input_ids"], attention_mask=sub["attention_mask"],
                                   position_ids=sub["position_ids"], targets=sub["targets"], chunk_size=chunk_size)
        m = sub["targets"] != IGNORE
        sums.append(torch.where(m, lp, torch.zeros((), dtype=lp.dtype, device=lp.device)).sum(-1))
        order += rows
    if len(groups) == 1:
        return sums[0], counts
    inv = torch.empty(len(order), dtype=torch.long)
    inv[torch.as_tensor(order)] = torch.arange(len(order))
    return torch.cat(sums).index_select(0, inv.to(sums[0].device)), counts


def pair_logps(model, mb: dict, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`sequence_logps` for a `pair_collate` batch (chosen rows, then rejected rows): the same
    (2B,) sums and counts, but with each pair's shared prompt run once where the model allows it
    (`alignkit.ops.logprobs.shared_prompt_pair_logps`), pairs grouped by packed length in one
    process; otherwise `sequence_logps` on the rows as they are."""
    sums = shared_prompt_pair_logps(model, mb["input_ids"], mb["attention_mask"], mb["targets"], int(mb["n_pairs"]),
                                    chunk_size, group_fn=length_groups if _may_group() else None)
    if sums is None:
        return sequence_logps(model, mb, chunk_size)
    return sums, (mb["targets"] != IGNORE).sum(-1)


def _may_group() -> bool:
    # DDP / FSDP expect one forward per backward; several processes keep the single batch
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()
                and torch.distributed.get_world_size() > 1)


def length_groups(need: list[int], max_groups: int = 3, overhead: float = 0.05) -> list[tuple[list[int], int]]:
    """Split rows of lengths `need` into at most `max_groups` groups of similar length, as
    [(row indices, group length), ...]: the groups of the sorted rows that minimise the tokens
    computed, sum over groups of rows x longest row, plus `overhead` x the single batch's tokens
    per group (the cost of one more forward). One group [(all rows, max(need))] when splitting
    does not pay. Dynamic programming over cut points, O(max_groups x R^2)."""
    n = len(need)
    order = sorted(range(n), key=need.__getitem__)
    L = [need[i] for i in order]
    if n < 2 or L[0] == L[-1]:
        return [(list(range(n)), max(need, default=0))]
    pen = overhead * n * L[-1]
    inf = float("inf")
    cost = [[inf] * (n + 1) for _ in range(max_groups + 1)]
    cut = [[0] * (n + 1) for _ in range(max_groups + 1)]
    cost[0][0] = 0.0
    for g in range(1, max_groups + 1):
        for j in range(1, n + 1):
            for i in range(g - 1, j):
                c = cost[g - 1][i] + (j - i) * L[j - 1] + pen
                if c < cost[g][j]:
                    cost[g][j], cut[g][j] = c, i
    g = min(range(1, max_groups + 1), key=lambda k: (cost[k][n], k))
    if g == 1:
        return [(list(range(n)), L[-1])]
    out, j = [], n
    while g:
        i = cut[g][j]
        out.append((order[i:j], L[j - 1]))
        j, g = i, g - 1
    return out[::-1]


def _has_adapter(model) -> bool:
    return is_peft_model(model)


def resolve_reference(cfg: DPOConfig, model) -> str:
    """'none' (simpo, orpo), 'precompute' or 'adapter_off', from `cfg.reference` and the model."""
    if cfg.loss in REFERENCE_FREE:
        return "none"
    adapter = _has_adapter(model)
    if cfg.reference == "auto":
        return "adapter_off" if adapter else "precompute"
    if cfg.reference == "adapter_off" and not adapter:
        raise UserError("reference=adapter_off needs an adapter (set peft.method=lora, ...); without one use "
                        "reference=precompute")
    return cfg.reference


# ----------------------------------------------------------------------------------------------
# The loss of one micro-batch
# ----------------------------------------------------------------------------------------------


def pair_loss(model, mb: dict, cfg: DPOConfig, reference: str) -> tuple[torch.Tensor, dict]:
    """(sum over the micro-batch's pairs of the per-pair loss, metric sums over pairs).

    mb: `pair_collate` output (chosen rows, then rejected rows) plus `ref_chosen` / `ref_rejected`
    (B,) when reference == 'precompute'."""
    B = int(mb["n_pairs"])
    if reference == "precompute":
        rc, rr = mb["ref_chosen"].float(), mb["ref_rejected"].float()
    elif reference == "adapter_off":
        # First, while no graph is held: the no-grad pass's temporaries never add to the policy's.
        with reference_logps_context(model):
            ref, _ = pair_logps(model, mb, cfg.logits_chunk_size)
        rc, rr = ref[:B], ref[B:]
    else:
        rc = rr = None
    logps, lengths = pair_logps(model, mb, cfg.logits_chunk_size)  # each prompt once, both answers
    pc, pr = logps[:B], logps[B:]
    nc, nr = lengths[:B], lengths[B:]
    if rc is not None:
        rc, rr = rc.to(pc.dtype), rr.to(pr.dtype)
    if cfg.loss == "orpo":
        return _orpo_pair_loss(pc, pr, nc, nr, cfg)
    losses, r_c, r_r = dpo_loss(pc, pr, rc, rr, beta=cfg.beta, loss_type=cfg.loss,
                                label_smoothing=cfg.label_smoothing,
                                gamma=cfg.simpo_gamma if cfg.loss == "simpo" else 0.0,
                                chosen_lengths=nc, rejected_lengths=nr)
    loss_sum = losses.sum()
    with torch.no_grad():
        mean_c, mean_r = pc.detach() / nc.clamp(min=1), pr.detach() / nr.clamp(min=1)
        metrics = {
            "rewards/chosen": r_c.sum(),
            "rewards/rejected": r_r.sum(),
            "rewards/accuracy": (r_c > r_r).sum(),
            "rewards/margin": (r_c - r_r).sum(),
            "logps/chosen": pc.detach().sum(),
            "logps/rejected": pr.detach().sum(),
            "logps/chosen_mean": mean_c.sum(),
            "logps/rejected_mean": mean_r.sum(),
        }
    if cfg.sft_weight > 0:
        # Per pair: the token-mean NLL of its chosen answer; summed here, divided by the global
        # number of pairs by the trainer -> a mean over pairs, whatever the micro-batching.
        nll = -pc / nc.clamp(min=1)
        loss_sum = loss_sum + cfg.sft_weight * nll.sum()
        metrics["nll"] = nll.detach().sum()
    return loss_sum, metrics


def _orpo_pair_loss(pc, pr, nc, nr, cfg: DPOConfig) -> tuple[torch.Tensor, dict]:
    """ORPO (`alignkit.losses.orpo_loss`): summed over pairs; the 'rewards' logged are the answers'
    log-odds, log p/(1-p) with p the geometric-mean token probability."""
    losses, nll, log_odds_ratio = orpo_loss(pc, pr, nc, nr, cfg.orpo_lambda)
    with torch.no_grad():
        mean_c, mean_r = pc.detach() / nc.clamp(min=1), pr.detach() / nr.clamp(min=1)
        tiny = torch.finfo(mean_c.dtype).tiny
        odds_c = mean_c - log1mexp(mean_c.clamp(max=-tiny))
        odds_r = mean_r - log1mexp(mean_r.clamp(max=-tiny))
        metrics = {
            "rewards/chosen": odds_c.sum(),
            "rewards/rejected": odds_r.sum(),
            "rewards/accuracy": (log_odds_ratio > 0).sum(),
            "rewards/margin": log_odds_ratio.sum(),
            "logps/chosen": pc.detach().sum(),
            "logps/rejected": pr.detach().sum(),
            "logps/chosen_mean": mean_c.sum(),
            "logps/rejected_mean": mean_r.sum(),
            "nll": nll.detach().sum(),
        }
    return losses.sum(), metrics


def dpo_loss_fn(cfg: DPOConfig, reference: str):
    """loss_fn(model, mb) -> (summed pair losses of the micro-batch, metrics) for `cfg.loss`; loss
    units: pairs. Reference log-probs come from the batch (cached) or from `reference`."""
    def loss_fn(model, mb: dict):
        return pair_loss(model, mb, cfg, reference)

    return loss_fn


def _pairs_batch(pairs: list[Pair], idx: list[int], pad_id: int, ref: tuple | None) -> dict:
    mb = pair_collate([pairs[i] for i in idx], pad_id)
    if ref is not None:
        t = torch.as_tensor(idx, dtype=torch.long)
        mb["ref_chosen"] = ref[0].index_select(0, t)
        mb["ref_rejected"] = ref[1].index_select(0, t)
    return mb


# ----------------------------------------------------------------------------------------------
# Reference log-probs: computed once, cached in the run folder
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def compute_reference_logps(model, pairs: list[Pair], pad_id: int, batch_size: int, chunk_size: int,
                            dist: DistInfo | None = None, autocast=None, adapter_off: bool = False,
                            device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """log pi_ref(y_w|x) and log pi_ref(y_l|x) for every pair, ((N,), (N,)) float32, in data order.

    One no-grad pass in eval mode, pairs sorted by length to keep padding low, split across ranks
    and summed back. `adapter_off`: with the model's adapter switched off (reference = base)."""
    dist = dist or DistInfo()
    device = device or next(model.parameters()).device
    N = len(pairs)
    out = torch.zeros(2, N, dtype=torch.float64)
    mine = list(range(dist.rank, N, dist.world))
    mine.sort(key=lambda i: max(len(pairs[i].chosen), len(pairs[i].rejected)))
    was_training = model.training
    model.eval()
    ctx = reference_logps_context(model) if adapter_off else contextlib.nullcontext()
    try:
        with ctx:
            for s in range(0, len(mine), batch_size):
                idx = mine[s:s + batch_size]
                mb = to_device(pair_collate([pairs[i] for i in idx], pad_id), device)
                with (autocast() if autocast else contextlib.nullcontext()):
                    lp, _ = pair_logps(model, mb, chunk_size)
                lp = lp.double().cpu()
                t = torch.as_tensor(idx)
                out[0, t] = lp[:len(idx)]
                out[1, t] = lp[len(idx):]
    finally:
        model.train(was_training)
    out = all_reduce_sum(out, dist)
    return out[0].float(), out[1].float()


def _files_fingerprint(path: str) -> list:
    """(name, size, mtime) of the files in a local folder or of a local file; [] for a hub id."""
    p = Path(os.path.expanduser(path)) if path else None
    if p is None or not p.exists():
        return []
    files = sorted(p.iterdir()) if p.is_dir() else [p]
    out = []
    for f in files:
        if f.is_file() and f.suffix in (".safetensors", ".bin", ".json", ".jsonl", ".parquet", ".csv", ".pt",
                                        ".model", ".txt", ".gz"):
            st = f.stat()
            out.append([f.name, st.st_size, st.st_mtime_ns])
    return out


@torch.no_grad()
def weights_fingerprint(model) -> str:
    """sha256 over every parameter's name, shape, sum and sum of absolute values: tells two sets
    of weights apart without hashing them byte by byte."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        t = p.detach()
        t = t.float() if t.is_floating_point() else t.to(torch.float32)
        h.update(f"{name}:{tuple(p.shape)}:{float(t.sum()):.8e}:{float(t.abs().sum()):.8e};".encode())
    return h.hexdigest()


def reference_cache_key(cfg: DPOConfig, data_path: str, split: str, pairs: list[Pair], model=None) -> str:
    """sha256 of what the reference log-probs depend on: the model (name, its files' size and
    mtime, and a fingerprint of the weights in memory when `model` is given), the data source,
    the settings that shape the tokens, and the token ids themselves."""
    meta = {
        "weights": weights_fingerprint(model) if model is not None else None,
        "version": CACHE_VERSION,
        "model": cfg.model,
        "model_files": _files_fingerprint(cfg.model),
        "data": data_path,
        "data_files": _files_fingerprint(data_path),
        "split": split,
        "max_length": cfg.max_length,
        "max_prompt_length": cfg.max_prompt_length,
        "truncation": cfg.truncation,
        "chat_template": cfg.chat_template,
        "dtype": cfg.dtype,
    }
    h = hashlib.sha256(json.dumps(meta, sort_keys=True).encode("utf-8"))
    for p in pairs:
        for enc in (p.chosen, p.rejected):
            h.update(array("q", enc.input_ids).tobytes())
            h.update(array("q", enc.labels).tobytes())
            h.update(b"|")
    return h.hexdigest()


def cached_reference_logps(trainer: Trainer, cfg: DPOConfig, pairs: list[Pair], data_path: str, split: str,
                           name: str, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference log-probs of `pairs` from output_dir/ref_logps.pt when its entry `name` has the
    same key, else computed (with the model as it is now: call before loading a checkpoint) and
    written there."""
    path = trainer.run_dir / REF_FILE
    with trainer.gathered():  # under FSDP: the full weights, and ranks may run different batch counts
        key = reference_cache_key(cfg, data_path, split, pairs, trainer.model)
    entry = None
    if trainer.dist.main and path.is_file():
        try:
            cache = torch.load(path, map_location="cpu", weights_only=True)
            e = cache.get(name)
            if e is not None and e.get("key") == key and len(e["chosen"]) == len(pairs):
                entry = (e["chosen"], e["rejected"])
        except Exception:  # unreadable cache: recompute
            entry = None
    entry = broadcast_object(entry, trainer.dist)
    if entry is not None:
        trainer.info(f"reference log-probs ({name}): {len(pairs)} pairs reused from {path}")
        return entry
    trainer.info(f"reference log-probs ({name}): computing for {len(pairs)} pairs (one no-grad pass)")
    bs = cfg.ref_batch_size or 2 * cfg.batch_size
    with trainer.gathered():
        ref = compute_reference_logps(trainer.model, pairs, pad_id, bs, cfg.logits_chunk_size, trainer.dist,
                                      trainer.autocast, adapter_off=_has_adapter(trainer.model), device=trainer.device)
    if trainer.dist.main:
        cache = {}
        if path.is_file():
            try:
                cache = torch.load(path, map_location="cpu", weights_only=True)
            except Exception:
                cache = {}
        cache[name] = {"key": key, "chosen": ref[0], "rejected": ref[1]}
        tmp = path.with_name(f".{REF_FILE}.tmp-{os.getpid()}")
        torch.save(cache, tmp)
        os.replace(tmp, path)
    barrier(trainer.dist)
    return ref


# ----------------------------------------------------------------------------------------------
# Evaluation on held-out pairs
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate_pairs(model, pairs: list[Pair], cfg: DPOConfig, reference: str, pad_id: int,
                   ref: tuple | None = None, dist: DistInfo | None = None, autocast=None, device=None) -> dict:
    """The training loss and metrics over `pairs` without gradients, as means over pairs, each
    key prefixed with `eval_` (eval_loss, eval_rewards/accuracy, ...)."""
    dist = dist or DistInfo()
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    keys = ["loss", *METRICS] + (["nll"] if cfg.sft_weight > 0 or cfg.loss == "orpo" else [])
    sums = dict.fromkeys(keys, 0.0)
    mine = list(range(dist.rank, len(pairs), dist.world))
    try:
        for s in range(0, len(mine), cfg.batch_size):
            mb = to_device(_pairs_batch(pairs, mine[s:s + cfg.batch_size], pad_id, ref), device)
            with (autocast() if autocast else contextlib.nullcontext()):
                loss_sum, m = pair_loss(model, mb, cfg, reference)
            sums["loss"] += float(loss_sum)
            for k, v in m.items():
                sums[k] += float(v)
    finally:
        model.train(was_training)
    red = all_reduce_sum(torch.tensor([sums[k] for k in keys] + [float(len(mine))], dtype=torch.float64), dist)
    n = max(float(red[-1]), 1.0)
    return {f"eval_{k}": float(red[i]) / n for i, k in enumerate(keys)} | {"eval_pairs": int(red[-1])}


# ----------------------------------------------------------------------------------------------
# The recipe
# ----------------------------------------------------------------------------------------------


def _check(cfg: DPOConfig) -> None:
    if not cfg.data:
        raise UserError("no training data; pass data=PATH (rows with prompt/chosen/rejected, or chosen/rejected)")
    if cfg.loss == "orpo" and cfg.reference != "auto":
        raise UserError(f"loss=orpo is reference-free: reference={cfg.reference} is not used; drop it (or pick a "
                        "loss with a reference: sigmoid, ipo, hinge, robust)")
    if cfg.loss == "orpo" and cfg.sft_weight:
        raise UserError("loss=orpo already holds the chosen answer's NLL; set sft_weight=0 and weigh the odds-ratio "
                        "term with orpo_lambda")
    if (cfg.reference == "adapter_off" and cfg.loss not in REFERENCE_FREE and cfg.peft.method == "none"
            and not (Path(os.path.expanduser(cfg.model)) / "adapter_config.json").is_file()):
        raise UserError("reference=adapter_off needs an adapter (set peft.method=lora, ...); without one use "
                        "reference=precompute")
    if cfg.label_smoothing and cfg.loss in ("ipo", "hinge", "orpo"):
        raise UserError(f"label_smoothing is not defined for loss={cfg.loss}; use loss=sigmoid (cDPO), robust or "
                        "simpo, or set label_smoothing=0")


def train_dpo(cfg: DPOConfig, model=None, tokenizer=None) -> dict:
    """Run DPO (or a variant) as configured; returns the final evaluation metrics (empty without
    eval_data). `model` / `tokenizer` may be passed in already loaded. loss=kto is a recipe of
    its own (`alignkit.recipes.kto.train_kto`, which builds on this file); `alignkit dpo
    loss=kto` dispatches there in the CLI."""
    if cfg.loss == "kto":
        raise ValueError("loss=kto: call alignkit.recipes.kto.train_kto (KTO trains on unpaired rows)")
    _check(cfg)
    dist = init_distributed()
    seed_everything(cfg.seed)
    tok = tokenizer or load_tokenizer(cfg.model)
    setup_chat_template(tok, cfg.chat_template)
    pairs, stats = load_pairs(cfg.data, cfg.data_split, tok, cfg.max_length, cfg.truncation, cfg.max_prompt_length)
    eval_pairs = None
    if cfg.eval_data:
        eval_pairs, _ = load_pairs(cfg.eval_data, cfg.eval_split, tok, cfg.max_length, cfg.truncation,
                                   cfg.max_prompt_length, what="eval_data")
    if model is None:
        model = load_base_model(cfg)
    model = prepare_trainable(model, cfg)  # adapters (peft.*) or partial freezing
    reference = resolve_reference(cfg, model)
    if hasattr(model, "config"):
        model.config.use_cache = False
    total_steps = steps_for(cfg, len(pairs), dist.world)
    trainer = Trainer(cfg, model, tok, recipe="dpo", total_steps=total_steps, dist_info=dist)
    trainer.info(f"data: {cfg.data}: {stats.summary()}")
    extra = f", simpo_gamma={cfg.simpo_gamma}" if cfg.loss == "simpo" else ""
    extra += f", orpo_lambda={cfg.orpo_lambda}" if cfg.loss == "orpo" else ""
    trainer.info(f"dpo: loss={cfg.loss}, beta={cfg.beta}{extra}, label_smoothing={cfg.label_smoothing}, "
                 f"sft_weight={cfg.sft_weight}, reference={reference}")
    pad = tok.pad_token_id
    cache: dict = {"train": None, "eval": None}

    def prepare():
        # Before any checkpoint is loaded: the model is still the starting point, i.e. the reference.
        if reference == "precompute":
            cache["train"] = cached_reference_logps(trainer, cfg, pairs, cfg.data, cfg.data_split, "train", pad)
            if eval_pairs is not None:
                cache["eval"] = cached_reference_logps(trainer, cfg, eval_pairs, cfg.eval_data, cfg.eval_split,
                                                       "eval", pad)

    def make_batch(idx):
        return _pairs_batch(pairs, idx, pad, cache["train"])

    eval_fn = None
    if eval_pairs is not None:
        def eval_fn():
            return evaluate_pairs(trainer.model, eval_pairs, cfg, reference, pad, cache["eval"], dist,
                                  trainer.autocast, trainer.device)

    return run_offline(trainer, len(pairs), make_batch, dpo_loss_fn(cfg, reference), lambda mb: mb["n_pairs"],
                       eval_fn=eval_fn, prepare=prepare)
