"""Per-token log-probabilities (and entropies) without materialising (tokens x vocab) tensors.

For a causal LM with hidden states h_t (N, H) and LM head W (V, H), the quantities every
post-training loss needs are

    log p(y_t | x_<t) = z_t[y_t] - logsumexp(z_t),        z_t = (W h_t + b) / temperature
    H_t               = logsumexp(z_t) - sum_v softmax(z_t)_v z_t[v]

A plain `log_softmax(model(...).logits)` holds logits, log-softmax and, for backward, their
float32 copies: several (N x V) tensors, which dominate memory for large vocabularies (150k
entries x 8k tokens x 4 bytes = 4.9 GB each). Here rows are processed `chunk_size` at a time
inside `torch.utils.checkpoint`, so a chunk's logits are built, reduced to one number per row
and freed; backward rebuilds them one chunk at a time. Peak extra memory is O(chunk x V) in
forward and backward, at the price of one extra head matmul per chunk in backward.

Rows whose target is `ignore_index` (prompt, padding) are skipped: no logits are computed for
them at all, which also saves the head matmul for long prompts in RL.

When the head is a plain linear layer and no entropy is asked for (SFT, DPO, ORPO, KTO, SimPO,
the reference passes), a hand-written backward (`_LinearTargetLogp`) replaces the checkpoint: forward
keeps only each row's logsumexp (N floats); backward rebuilds a chunk's logits once and turns
them into softmax - one-hot in place, where the checkpointed autograd graph would recompute the
logsumexp, scatter the target's gradient into a fresh zero (chunk x V) tensor and add two
(chunk x V) gradients. Same values, fewer (chunk x V) passes and temporaries.

Precision: logits are cast to float32 (float64 stays float64) per chunk before the softmax, so
bf16 / fp16 models (or autocast) get float32 log-probs; results are float32 (float64 for float64
inputs).
"""

from __future__ import annotations

import sys
import warnings
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

__all__ = [
    "selective_log_softmax",
    "chunked_token_logps",
    "causal_lm_token_logps",
    "split_causal_lm",
    "shift_targets",
    "shared_prompt_pair_logps",
    "SHARED_PROMPT_MODEL_TYPES",
]

IGNORE_INDEX = -100
# selective_log_softmax chunk budget, in logits elements (64 MiB of float32 per chunk).
_SELECTIVE_CHUNK_ELEMENTS = 1 << 24

# Model types whose forward changes the logits in a way `split_causal_lm` does not reproduce
# and that its config scan would not catch. Callers may add to this set.
FULL_LOGITS_MODEL_TYPES: set[str] = {"chameleon", "xlstm", "recurrent_gemma"}

# Config attributes that mention logits / the head but act inside the decoder (or not at all),
# so the split path stays exact.
_HARMLESS_LOGIT_KEYS = {
    "attn_logit_softcapping", "attention_logit_cap", "conf_attention_logit_cap", "attention_logits_soft_cap",
    "router_logit_softcapping", "moe_router_logit_softcapping", "output_router_logits", "logit_scale_init_value",
    "logits_to_keep", "num_logits_to_keep", "final_logit_softcapping",  # the last one is reproduced below
}


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _row_stats(x: torch.Tensor, tgt: torch.Tensor, logits_fn: Callable, temperature: float, entropy: bool):
    """One chunk: logits -> (log p(target), entropy). Everything (c, V)-sized dies here."""
    z = logits_fn(x)
    z = z.to(_compute_dtype(z))
    if temperature != 1.0:
        z = z / temperature
    lse = torch.logsumexp(z, dim=-1)
    lp = z.gather(-1, tgt.unsqueeze(-1)).squeeze(-1) - lse
    if not entropy:
        return (lp,)
    ent = lse - (torch.softmax(z, dim=-1) * z).sum(-1)
    return lp, ent


class _LinearTargetLogp(torch.autograd.Function):
    """log p(t_n) = z_n[t_n] - logsumexp(z_n), z_n = (x_n W^T + b) / temperature, chunk by chunk.

    x: (n, H); weight: (V, H); bias: (V,) or None; targets: (n,) in [0, V). Returns (n,) in the
    compute dtype (float32; float64 for float64 logits). Forward saves x, weight, bias, targets
    and the (n,) logsumexp; nothing of size n x V. Backward, per chunk, with g the upstream
    gradient: dlogp/dz = onehot(t) - softmax(z), so grad_z = (onehot(t) - softmax(z)) g / temperature,
    grad_x = grad_z W, grad_W = grad_z^T x, grad_b = sum_n grad_z. The softmax is rebuilt in
    place from the saved logsumexp: one head matmul and one (chunk x V) buffer per chunk.
    grad_z is cast to the head's dtype before the matmuls, as autograd would do for a bf16 head.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, targets, chunk_size, temperature):
        lps, lses = [], []
        mm_dtype = None  # the head matmul's dtype: the weight's, or autocast's (bf16 / fp16)
        for s in range(0, x.shape[0], chunk_size):
            z = F.linear(x[s:s + chunk_size], weight, bias)
            mm_dtype = z.dtype
            z = z.to(_compute_dtype(z))  # fresh either way: free to overwrite below
            if temperature != 1.0:
                z.div_(temperature)
            picked = z.gather(-1, targets[s:s + chunk_size].unsqueeze(-1)).squeeze(-1)
            lse = _logsumexp_(z)
            lps.append(picked - lse)
            lses.append(lse)
        lse = torch.cat(lses)
        ctx.save_for_backward(x, weight, bias, targets, lse)
        ctx.chunk_size, ctx.temperature, ctx.mm_dtype = chunk_size, temperature, mm_dtype or weight.dtype
        return torch.cat(lps)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, bias, targets, lse = ctx.saved_tensors
        c, temp, dt = ctx.chunk_size, ctx.temperature, ctx.mm_dtype
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        # Backward runs outside autocast: cast as autocast did in forward (x, W, b to the matmul dtype),
        # so the rebuilt logits are the forward's bit for bit; gradients return in each input's dtype.
        w = weight.to(dt)
        b = bias.to(dt) if bias is not None else None
        grad_x = torch.empty_like(x) if need_x else None
        grad_w = None
        grad_b = torch.zeros_like(bias) if need_b and bias is not None else None
        for s in range(0, x.shape[0], c):
            xc, tc = x[s:s + c].to(dt), targets[s:s + c].unsqueeze(-1)
            gc = grad_out[s:s + c].to(lse.dtype).unsqueeze(-1)
            z = F.linear(xc, w, b)
            z = z.to(_compute_dtype(z))  # a fresh tensor in either case: safe to overwrite
            if temp != 1.0:
                z.div_(temp)
            # z -> softmax(z) * (-g) -> + g at the target -> / temperature: grad wrt the raw logits
            p = z.sub_(lse[s:s + c].unsqueeze(-1)).exp_().mul_(-gc)
            p.scatter_add_(-1, tc, gc)
            if temp != 1.0:
                p.div_(temp)
            gz = p.to(dt)
            if need_x:
                if grad_x.dtype == dt:
                    torch.mm(gz, w, out=grad_x[s:s + c])
                else:
                    grad_x[s:s + c] = gz.mm(w)
            if need_w:
                if grad_w is None:
                    grad_w = gz.t().mm(xc).to(weight.dtype)
                elif dt == weight.dtype:
                    grad_w.addmm_(gz.t(), xc)
                else:  # each chunk's gradient in the matmul dtype, summed in the weight's (as autograd would)
                    grad_w.add_(gz.t().mm(xc).to(weight.dtype))
            if grad_b is not None:
                grad_b += gz.sum(0).to(grad_b.dtype)
        if need_w and grad_w is None:
            grad_w = torch.zeros_like(weight)
        return grad_x, grad_w, grad_b, None, None, None


def _logsumexp_(z: torch.Tensor) -> torch.Tensor:
    """torch.logsumexp(z, -1), the same operations in the same order (so the same bits), but
    z's own storage holds exp(z - max): no second (rows x V) buffer. z is overwritten."""
    m = z.amax(-1, keepdim=True)
    m.masked_fill_(m.abs() == float("inf"), 0)
    return z.sub_(m).exp_().sum(-1).log_().add_(m.squeeze(-1))


def _plain_linear(module) -> bool:
    """True for an exact `nn.Linear` without hooks (not LoRA / quantised / FSDP-wrapped): its
    output is F.linear(x, weight, bias), which `_LinearTargetLogp` reproduces."""
    return (type(module) is torch.nn.Linear and not module._forward_hooks and not module._forward_pre_hooks
            and not getattr(module, "_forward_hooks_with_kwargs", None))


def _chunked(
    rows: torch.Tensor,
    targets: torch.Tensor,
    logits_fn: Callable,
    chunk_size: int,
    temperature: float,
    ignore_index: int | None,
    return_entropy: bool,
    skip_ignored: bool,
    linear: tuple | None = None,
):
    """rows (N, D) -> logits_fn -> (N, V); returns log p(targets) (N,) [and entropy (N,)], 0 where ignored.

    linear: (weight, bias) when logits_fn(x) is exactly F.linear(x, weight, bias); without entropy
    the chunks then go through `_LinearTargetLogp` instead of activation checkpointing.

    skip_ignored: gather the scored rows first (cheap when rows are hidden states); when rows
    are already logits, copying them would cost what we are trying to save, so ignored rows
    are computed with a dummy target and zeroed instead."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    N = rows.shape[0]
    scored = targets != ignore_index if ignore_index is not None else torch.ones_like(targets, dtype=torch.bool)
    if skip_ignored:
        idx = scored.nonzero().squeeze(-1)
        if idx.numel() == N:  # everything scored: no need to copy the rows
            x, t, skip_ignored = rows, targets, False
        else:
            x, t = rows.index_select(0, idx), targets.index_select(0, idx)
    else:
        x, t = rows, targets.masked_fill(~scored, 0)

    def fn(xc, tc):
        return _row_stats(xc, tc, logits_fn, temperature, return_entropy)

    # Checkpointing only matters when a graph is being built; under no_grad run plainly.
    use_ckpt = torch.is_grad_enabled()
    outs = []
    if linear is not None and not return_entropy and x.shape[0]:
        outs = [(_LinearTargetLogp.apply(x, linear[0], linear[1], t, chunk_size, temperature),)]
        x = x[:0]  # done: skip the loop below
    for s in range(0, x.shape[0], chunk_size):
        args = (x[s:s + chunk_size], t[s:s + chunk_size])
        outs.append(checkpoint(fn, *args, use_reentrant=False) if use_ckpt else fn(*args))

    if not outs:
        # Nothing scored (e.g. a micro-batch whose every label is masked). Return zeros that are
        # still connected to the graph through every parameter logits_fn touches, so backward
        # works and DDP sees all parameters used.
        dummy = fn(rows[:1], torch.zeros(rows[:1].shape[0], dtype=torch.long, device=rows.device)) if N else None
        zero = dummy[0].sum() * 0 if dummy is not None else 0.0
        dtype = dummy[0].dtype if dummy is not None else _compute_dtype(rows)
        base = torch.zeros(N, dtype=dtype, device=rows.device) + zero
        return base, (base.clone() if return_entropy else None)

    lp = torch.cat([o[0] for o in outs])
    ent = torch.cat([o[1] for o in outs]) if return_entropy else None
    if skip_ignored:
        lp = lp.new_zeros(N).index_copy(0, idx, lp)
        ent = ent.new_zeros(N).index_copy(0, idx, ent) if ent is not None else None
    else:
        lp = lp.masked_fill(~scored, 0.0)
        ent = ent.masked_fill(~scored, 0.0) if ent is not None else None
    return lp, ent


def selective_log_softmax(logits: torch.Tensor, index: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
    """log_softmax(logits, -1) gathered at `index`, without allocating the full log-softmax.

        out[...] = logits[..., index[...]] - logsumexp(logits[..., :])

    logits: (..., V) any float dtype; index: (...) int64 in [0, V). Returns (...) in float32
    (float64 for float64 logits). Rows are processed `chunk_size` at a time (default: as many as
    fit in 2**24 logits elements), each upcast to float32 on its own, under activation
    checkpointing, so neither forward nor backward holds more than one chunk's temporaries
    beyond the input itself. Exact (same math) versus `log_softmax(logits.float()).gather(...)`.
    Log-probs in nats. Raises ValueError when index.shape != logits.shape[:-1].
    """
    if logits.shape[:-1] != index.shape:
        raise ValueError(f"index shape {tuple(index.shape)} must equal logits.shape[:-1] {tuple(logits.shape[:-1])}")
    V = logits.shape[-1]
    rows = max(1, _SELECTIVE_CHUNK_ELEMENTS // max(V, 1)) if chunk_size is None else chunk_size
    lp, _ = _chunked_logits(logits, index, rows, 1.0, None, False)
    return lp


def _chunked_logits(logits, targets, chunk_size, temperature, ignore_index, return_entropy):
    """`_chunked` on ready-made logits (..., V) without copying them: a sliced tensor such as
    logits[:, :-1] cannot be flattened as a view, so it is walked along its leading dimension."""
    V = logits.shape[-1]
    if logits.dim() <= 2:
        lp, ent = _chunked(logits.reshape(-1, V), targets.reshape(-1), lambda z: z, chunk_size, temperature,
                           ignore_index, return_entropy, skip_ignored=False)
        return lp.view(targets.shape), (ent.view(targets.shape) if ent is not None else None)
    try:
        flat = logits.view(-1, V)
    except RuntimeError:
        outs = [_chunked_logits(z, t, chunk_size, temperature, ignore_index, return_entropy)
                for z, t in zip(logits, targets)]
        lp = torch.stack([o[0] for o in outs])
        return lp, (torch.stack([o[1] for o in outs]) if return_entropy else None)
    lp, ent = _chunked(flat, targets.reshape(-1), lambda z: z, chunk_size, temperature, ignore_index,
                       return_entropy, skip_ignored=False)
    return lp.view(targets.shape), (ent.view(targets.shape) if ent is not None else None)


def chunked_token_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk_size: int = 1024,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = IGNORE_INDEX,
    return_entropy: bool = False,
):
    """Per-token log p(target) through an LM head, `chunk_size` rows at a time.

        z_n = (hidden_n @ weight.T + bias) / temperature
        logp_n = z_n[targets_n] - logsumexp(z_n)           (0 where targets_n == ignore_index)
        H_n    = logsumexp(z_n) - sum_v softmax(z_n)_v z_n[v]   (0 where targets_n == ignore_index)

    hidden: (N, H) (or (..., H)); weight: (V, H); bias: (V,) or None; targets: (N,) (or (...)).
    Returns logps shaped like `targets`, or (logps, entropy) with `return_entropy=True`.

    Each chunk runs under `torch.utils.checkpoint`, so autograd keeps only the (N, H) inputs and
    backward rebuilds one (chunk, V) block at a time: memory O(chunk x V), not O(N x V).
    Gradients w.r.t. hidden, weight and bias equal those of the naive computation. Log-probs and
    entropies in nats. The idea (never materialise the logits of all rows) is that of fused
    linear cross-entropy kernels (Liger Kernel, Hsu et al. 2024, arXiv:2410.10989), here in plain
    PyTorch with activation checkpointing. Without entropy the checkpoint is replaced by a
    hand-written backward (`_LinearTargetLogp`: same values, the softmax rebuilt in place from the
    saved logsumexp). Raises ValueError when weight's last dimension is not hidden's or
    targets.shape != hidden.shape[:-1].
    """
    H = hidden.shape[-1]
    if weight.shape[-1] != H:
        raise ValueError(f"weight {tuple(weight.shape)} does not match hidden size {H}")
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(f"targets shape {tuple(targets.shape)} must equal hidden.shape[:-1] {tuple(hidden.shape[:-1])}")
    lp, ent = _chunked(
        hidden.reshape(-1, H), targets.reshape(-1), lambda h: F.linear(h, weight, bias),
        chunk_size, temperature, ignore_index, return_entropy, skip_ignored=True, linear=(weight, bias),
    )
    lp = lp.view(targets.shape)
    return (lp, ent.view(targets.shape)) if return_entropy else lp


# --------------------------------------------------------------------------- causal LMs


def shift_targets(input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """targets[b, t] = input_ids[b, t + 1]; -100 at the last position and wherever position t or
    t + 1 is padding (attention_mask == 0). input_ids, attention_mask: (B, T); returns (B, T)
    int64, aligned so that logits at position t score targets[:, t]."""
    targets = F.pad(input_ids[:, 1:], (0, 1), value=IGNORE_INDEX)
    if attention_mask is not None:
        real = attention_mask.bool()
        ok = real & F.pad(real[:, 1:], (0, 1), value=False)
        targets = targets.masked_fill(~ok, IGNORE_INDEX)
    return targets


def _text_config(config):
    try:
        return config.get_text_config()
    except Exception:  # composite configs with several text configs refuse to pick one
        return config


def _config_value(config, key):
    val = getattr(config, key, None)
    if val is None:
        val = getattr(_text_config(config), key, None)
    return val


def _unhandled_logit_setting(config) -> str | None:
    """Name of a config setting that changes logits after the head in a way we do not reproduce
    (Cohere logit_scale, Granite logits_scaling, muP output multipliers, padded vocabularies...)."""
    configs = [config]
    if _text_config(config) is not config:
        configs.append(_text_config(config))
    for cfg in configs:
        for key, val in vars(cfg).items():
            k = key.lower()
            if key.startswith("_") or key in _HARMLESS_LOGIT_KEYS:
                continue
            if not any(s in k for s in ("logit", "lm_head_mult", "output_mult", "unpadded_vocab", "head_mult")):
                continue
            if val is None or val is False:
                continue
            if "vocab" in k:
                if val == getattr(cfg, "vocab_size", None):
                    continue
            elif isinstance(val, (int, float)) and not isinstance(val, bool) and float(val) == 1.0:
                continue
            return f"{key}={val!r}"
    return None


def split_causal_lm(model):
    """(decoder, head, logits_transform) for a transformers `*ForCausalLM` (or a peft model whose
    adapters are injected in place, e.g. LoRA), or None when the model cannot be split safely.

    decoder(input_ids, attention_mask, position_ids) -> last hidden state (final norm applied);
    head: the output-embedding module (called as a module, so LoRA / modules_to_save on the head
    are honoured, and tied embeddings are the same parameter); logits_transform: None or a
    function applied to the head's output (Gemma-style final_logit_softcapping).

    None for: prompt-learning peft models (prompt / prefix / p-tuning: their forward injects
    virtual tokens or a KV prefix), peft methods with forward-time arguments (Poly, aLoRA),
    non-`ForCausalLM` classes (multimodal wrappers), DDP/FSDP wrappers, model types in
    FULL_LOGITS_MODEL_TYPES, and configs with an unreproduced logit setting (see
    `_unhandled_logit_setting`). Callers then use the full forward.
    """
    base = model
    peft = sys.modules.get("peft")
    if peft is not None and isinstance(model, peft.PeftModel):
        pcfg = model.active_peft_config
        peft_type = str(getattr(pcfg.peft_type, "value", pcfg.peft_type)).upper()
        if pcfg.is_prompt_learning or peft_type == "POLY" or getattr(pcfg, "alora_invocation_tokens", None):
            return None
        base = model.get_base_model()
    from transformers import PreTrainedModel

    if not isinstance(base, PreTrainedModel) or not type(base).__name__.endswith("ForCausalLM"):
        return None
    config = base.config
    if getattr(config, "model_type", None) in FULL_LOGITS_MODEL_TYPES:
        return None
    if _unhandled_logit_setting(config) is not None:
        return None
    head = base.get_output_embeddings()
    try:
        decoder = base.get_decoder()
    except (AttributeError, NotImplementedError):
        decoder = getattr(base, getattr(base, "base_model_prefix", ""), None)
    if head is None or decoder is None or decoder is base:
        return None
    transform = None
    cap = _config_value(config, "final_logit_softcapping")
    if cap:
        cap = float(cap)

        def transform(z, cap=cap):
            # float32 like the softmax after it: bf16 tanh is coarse near saturation.
            z = z.float() if z.dtype in (torch.bfloat16, torch.float16) else z
            return torch.tanh(z / cap) * cap

    return decoder, head, transform


def causal_lm_token_logps(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    targets: torch.Tensor | None = None,
    chunk_size: int = 1024,
    temperature: float = 1.0,
    return_entropy: bool = False,
):
    """log p(targets[b, t] | input_ids[b, :t+1]) for a transformers causal LM, (B, T) float32.

    targets: (B, T), already aligned: targets[b, t] is the token predicted at position t, -100 =
    not scored (log-prob and entropy 0 there). None: `shift_targets(input_ids, attention_mask)`
    (next token, -100 at the last position and at padding).

    Lean path (`split_causal_lm` succeeds): run the decoder to its last hidden state (no logits),
    then `chunked_token_logps`-style chunks through the model's own head module. Fallback (model
    cannot be split, see `split_causal_lm`): the model's full forward, logits of the last T
    positions (prompt tuning prepends virtual tokens), then the chunked log-softmax on them;
    exact but holds the (B, T, V) logits like any plain forward.

    Returns logps (B, T), or (logps, entropy) with `return_entropy=True`, in nats.
    `temperature` divides the logits (after any softcapping), as sampling does, so "old" and
    reference log-probs computed here match the sampler's numerics (DESIGN.md rule 6).
    Raises ValueError when targets.shape != input_ids.shape.
    """
    if targets is None:
        targets = shift_targets(input_ids, attention_mask)
    if targets.shape != input_ids.shape:
        raise ValueError(f"targets shape {tuple(targets.shape)} must equal input_ids shape {tuple(input_ids.shape)}")
    B, T = input_ids.shape
    parts = split_causal_lm(model)
    if parts is not None:
        decoder, head, transform = parts
        out = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        logits_fn = head if transform is None else (lambda h: transform(head(h)))
        linear = (head.weight, head.bias) if transform is None and _plain_linear(head) else None
        lp, ent = _chunked(hidden.reshape(B * T, -1), targets.reshape(-1), logits_fn, chunk_size, temperature,
                           IGNORE_INDEX, return_entropy, skip_ignored=True, linear=linear)
    else:
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
        if position_ids is not None and not _drops_position_ids(model):
            kwargs["position_ids"] = position_ids
        logits = model(**kwargs).logits
        if logits.shape[1] != T:  # virtual tokens prepended by prompt tuning
            logits = logits[:, -T:]
        lp, ent = _chunked_logits(logits, targets, chunk_size, temperature, IGNORE_INDEX, return_entropy)
    lp = lp.view(B, T)
    return (lp, ent.view(B, T)) if return_entropy else lp


def _drops_position_ids(model) -> bool:
    """peft prompt tuning / p-tuning ignore position_ids (with a warning per call); skip passing them."""
    peft = sys.modules.get("peft")
    if peft is None or not isinstance(model, peft.PeftModel):
        return False
    pcfg = model.active_peft_config
    if not pcfg.is_prompt_learning:
        return False
    peft_type = str(getattr(pcfg.peft_type, "value", pcfg.peft_type)).upper()
    if peft_type not in ("PREFIX_TUNING", "CARTRIDGE"):
        warnings.warn(f"peft {peft_type} ignores position_ids; packed sequences are not supported with it",
                      stacklevel=3)
        return True
    return False


# --------------------------------------------------------------------------- pairs sharing a prompt

# Decoders known to take a ready 4D attention mask as given and to place tokens by position_ids
# alone (RoPE, no learned absolute positions): the ones `shared_prompt_pair_logps` packs for.
SHARED_PROMPT_MODEL_TYPES: set[str] = {"llama", "mistral", "qwen2", "qwen3", "gemma", "phi3"}


def _shared_prompt_decoder(model):
    """(decoder, head, transform, attention implementation) when `shared_prompt_pair_logps` can
    pack for this model, else None."""
    parts = split_causal_lm(model)
    if parts is None:
        return None
    cfg = parts[0].config
    impl = getattr(cfg, "_attn_implementation", None)
    if getattr(cfg, "model_type", None) not in SHARED_PROMPT_MODEL_TYPES or impl not in ("sdpa", "eager"):
        return None
    if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True):
        return None  # a window would need its own mask
    if any(t != "full_attention" for t in (getattr(cfg, "layer_types", None) or [])):
        return None
    return (*parts, impl)


def shared_prompt_pair_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, targets: torch.Tensor,
                             n_pairs: int, chunk_size: int = 1024, group_fn: Callable | None = None):
    """Summed log p(targets) per row of a batch of preference pairs, each prompt run once.

    input_ids, attention_mask, targets: (2B, T), right-padded, rows 0..B-1 the chosen answers and
    B..2B-1 the rejected ones of the same B pairs (`pair_collate`), targets aligned as in
    `causal_lm_token_logps` (-100 = not scored). Row b and row B + b share their first P_b tokens
    (the prompt: the common prefix, up to the first scored position). Instead of 2B rows of
    P_b + answer, each pair becomes ONE row [prompt, chosen answer, rejected answer] with positions
    0..P-1, P..Lc-1, P..Lr-1 and a 4D mask under which the rejected answer sees the prompt and
    itself but not the chosen answer. Every token then sees exactly the tokens and positions it sees
    in its own row, so the log-probs are the same (float rounding aside), and the prompt's tokens
    go through the decoder once instead of twice. Both answers' first tokens are scored from the
    prompt's last hidden state.

    group_fn: None (one forward) or a function from the packed rows' lengths (a list of B ints) to
    [(pair indices, length), ...] (e.g. `alignkit.recipes.dpo.length_groups`): each group is a
    separate forward cut to its longest packed row. Returns (sums (2B,) float32, or float64 for float64 models) or None when the model
    cannot be packed this way (see SHARED_PROMPT_MODEL_TYPES: an unlisted architecture, an attention
    implementation other than sdpa / eager, a sliding window), a row is not right-padded, or a pair
    shares no first token; the caller then runs the rows as they are.
    """
    parts = _shared_prompt_decoder(model)
    if parts is None:
        return None
    decoder, head, transform, impl = parts
    B = int(n_pairs)
    if input_ids.shape[0] != 2 * B or B < 1:
        return None
    am = attention_mask.bool()
    if bool((am[:, 1:] & ~am[:, :-1]).any()):  # not right-padded
        return None
    dev, T = input_ids.device, input_ids.shape[1]
    scored = targets != IGNORE_INDEX
    L = am.sum(-1).tolist()
    first = torch.where(scored, torch.arange(T, device=dev), T).amin(-1).tolist()
    same = (input_ids[:B] == input_ids[B:]).long().cumprod(-1).sum(-1).tolist()
    P = [min(same[b], L[b], L[B + b], first[b] + 1, first[B + b] + 1) for b in range(B)]
    if min(P) < 1:
        return None
    logits_fn = head if transform is None else (lambda h: transform(head(h)))
    linear = (head.weight, head.bias) if transform is None and _plain_linear(head) else None
    packed = [L[b] + L[B + b] - P[b] for b in range(B)]
    groups = [pairs for pairs, _ in group_fn(packed)] if group_fn is not None else [list(range(B))]
    sums = []
    for pairs in groups:
        M = max(packed[b] for b in pairs)
        G = len(pairs)
        ids = input_ids.new_full((G, M), int(input_ids[pairs[0], 0]))
        pos = torch.zeros((G, M), dtype=torch.long, device=dev)
        seg = torch.full((G, M), 3, dtype=torch.long, device=dev)  # 0 prompt, 1 chosen, 2 rejected, 3 padding
        gidx, gtgt, grow = [], [], []
        for g, b in enumerate(pairs):
            c, r, p, lc, lr = b, B + b, P[b], L[b], L[B + b]
            ids[g, :lc] = input_ids[c, :lc]
            ids[g, lc:lc + lr - p] = input_ids[r, p:lr]
            pos[g, :lc] = torch.arange(lc, device=dev)
            pos[g, lc:lc + lr - p] = torch.arange(p, lr, device=dev)
            seg[g, :p], seg[g, p:lc], seg[g, lc:lc + lr - p] = 0, 1, 2
            tc = scored[c].nonzero().squeeze(-1)
            tr = scored[r].nonzero().squeeze(-1)
            # the rejected row's scored position t sits at lc + t - p in the packed row; t = p - 1
            # (its first answer token, predicted from the prompt's end) is the prompt's own position
            gidx += [g * M + tc, g * M + torch.where(tr < p, tr, lc + tr - p)]
            gtgt += [targets[c, tc], targets[r, tr]]
            grow += [torch.full_like(tc, g), torch.full_like(tr, G + g)]
        i = torch.arange(M, device=dev)
        sq, sk = seg[:, :, None], seg[:, None, :]
        allowed = (i[:, None] >= i[None, :]) & ((sk == 0) | (sk == sq)) & (sq != 3)
        allowed |= torch.eye(M, dtype=torch.bool, device=dev)  # padding sees itself: no empty softmax row
        allowed = allowed[:, None]
        if impl == "eager":  # eager attention adds the mask to the scores
            dt = decoder.get_input_embeddings().weight.dtype
            mask = torch.zeros(allowed.shape, dtype=dt, device=dev).masked_fill_(~allowed, torch.finfo(dt).min)
        else:
            mask = allowed
        out = decoder(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        idx, row = torch.cat(gidx), torch.cat(grow)
        lp, _ = _chunked(hidden.reshape(G * M, -1).index_select(0, idx), torch.cat(gtgt), logits_fn, chunk_size, 1.0,
                         IGNORE_INDEX, False, skip_ignored=True, linear=linear)
        sums.append(lp.new_zeros(2 * G).index_add(0, row, lp))
    # back to the batch's order: chosen rows 0..B-1, then rejected rows
    order = [b for pairs in groups for b in pairs]
    inv = torch.empty(B, dtype=torch.long)
    inv[torch.as_tensor(order)] = torch.arange(B)
    inv = inv.to(dev)
    Gs = [len(pairs) for pairs in groups]
    chosen = torch.cat([s[:g] for s, g in zip(sums, Gs)]).index_select(0, inv)
    rejected = torch.cat([s[g:] for s, g in zip(sums, Gs)]).index_select(0, inv)
    return torch.cat([chosen, rejected])
