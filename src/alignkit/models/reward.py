"""Reward models: a transformer backbone and a linear head read at the last real token.

    h(x, y)  = final hidden state of the backbone at the last real token of prompt x + response y
    scalar          r(x, y)          = w . h(x, y)                              (Bradley-Terry)
    distributional  p(s = i | x, y)  = softmax(W h(x, y) / T)_i,  i = 1..K     (K = num_scores)
                    r(x, y)          = E[s] = sum_i i p_i   (or another `reward_stat`, see below)

"Last real token" is the rightmost position whose attention_mask is 1; it is never found by
searching for a pad id, which may equal eos (and eos is usually the last real token). The base
model's LM head is not part of the model: the backbone is loaded as a transformers
`*ForSequenceClassification` (decoder + a bias-free `score` Linear with K outputs; the LM head
weights are dropped), and only the decoder runs, so no vocabulary logits are ever computed.

Saved layout: a plain transformers sequence-classification folder (safetensors + config.json +
tokenizer) whose config.json carries an `alignkit_reward` entry (kind, num_scores, temperature,
reward_stat, max_length). `AutoModelForSequenceClassification.from_pretrained(folder)` loads it
as is; `RewardModel.from_pretrained(folder).score(prompts, responses)` scores text. transformers'
own forward picks the rightmost token that is not `config.pad_token_id`: the same token as ours
whenever pad differs from every token that can end a sequence. When the tokenizer pads with eos,
the saved config has pad_token_id = null, and transformers then scores the last position of an
unpadded single sequence (same as ours) and refuses padded batches instead of reading the wrong
token.

Calibration (distributional): a scalar temperature T > 0 divides the K logits. It is fitted on
held-out pairs to minimise the negative log-likelihood of the observed preference under the
model's pairwise probability (`preference_probability`), and stored in the saved config.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from alignkit.data.chat import Encoded, encode_prompt_completion, end_of_turn_ids, setup_chat_template
from alignkit.data.collate import pad_collate
from alignkit.data.preference import _fit_pair
from alignkit.data.sft import EncodeStats
from alignkit.errors import UserError
from alignkit.models.arch import quiet_peft
from alignkit.models.load import (DTYPES, _check_source, _first_line, hf_load_kwargs, load_model, load_tokenizer,
                                  save_pretrained)
from alignkit.ops.masks import last_token_index as mask_last_index

__all__ = [
    "REWARD_KINDS",
    "REWARD_STATS",
    "RewardSpec",
    "RewardModel",
    "load_reward_backbone",
    "reward_parts",
    "last_token_index",
    "sequence_logits",
    "shared_prompt_logits",
    "shared_prompt_mask",
    "shared_prompt_unsupported",
    "pair_batch_logits",
    "rewards_from_logits",
    "score_probs",
    "score_entropy",
    "preference_probability",
    "preference_nll",
    "expected_calibration_error",
    "fit_temperature",
]

REWARD_KINDS = ("scalar", "distributional")
# mean: E[s]; median: smallest i with P(s <= i) >= 1/2; mode: argmax_i p_i;
# mean_minus_std: E[s] - std[s] (risk-averse: uncertain answers score lower).
REWARD_STATS = ("mean", "median", "mode", "mean_minus_std")
CONFIG_KEY = "alignkit_reward"


@dataclass
class RewardSpec:
    """What the head means; stored as `alignkit_reward` in config.json.

    kind "scalar": one output, the Bradley-Terry reward (Bradley & Terry 1952; Ouyang et al.
    2022, arXiv:2203.02155); kind "distributional": `num_scores` = K >= 2 outputs, a
    distribution over scores 1..K read out by `reward_stat` at `temperature` (see the module
    docstring). Raises ValueError for an inconsistent combination."""

    kind: str = "scalar"
    num_scores: int = 1  # outputs of the head: 1 for scalar, K for distributional
    temperature: float = 1.0  # divides the logits of a distributional head (fitted on held-out pairs)
    reward_stat: str = "mean"  # statistic of the score distribution handed out as the reward
    max_length: int | None = None  # longest scored sequence (prompt + response), as in training
    max_prompt_length: int | None = None  # prompt tokens kept when cutting (default max_length // 2), as in training

    def __post_init__(self) -> None:
        if self.kind not in REWARD_KINDS:
            raise ValueError(f"unknown reward kind {self.kind!r}; valid: {', '.join(REWARD_KINDS)}")
        if self.reward_stat not in REWARD_STATS:
            raise ValueError(f"unknown reward_stat {self.reward_stat!r}; valid: {', '.join(REWARD_STATS)}")
        if self.kind == "scalar" and self.num_scores != 1:
            raise ValueError("a scalar reward head has num_scores = 1")
        if self.kind == "distributional" and self.num_scores < 2:
            raise ValueError("a distributional reward head needs num_scores >= 2")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")

    def to_dict(self) -> dict:
        """The spec as the plain dict stored under config.json's `alignkit_reward`."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RewardSpec":
        """The spec of a saved config dict; unknown keys (from newer versions) are ignored.
        Raises ValueError for inconsistent values (see __post_init__)."""
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


# --------------------------------------------------------------------------- backbone + head


@contextlib.contextmanager
def _quiet_transformers():
    """transformers warns that the new head is untrained and the LM head unused: both are the plan."""
    from transformers.utils import logging as hf_logging

    old = hf_logging.get_verbosity()
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(old)
        if bar:
            hf_logging.enable_progress_bar()


def load_reward_backbone(name_or_path: str, spec: RewardSpec, dtype: str = "float32"):
    """A transformers `*ForSequenceClassification` with `spec.num_scores` outputs.

    From a causal LM (hub id or folder): its decoder weights, the LM head dropped, a new head
    (normal init, std = config.initializer_range). From a saved reward model of the same shape:
    its head too. A peft adapter folder is merged into its base first. Returns (model, fresh_head).
    """
    from transformers import AutoConfig, AutoModelForSequenceClassification

    _check_source(name_or_path)
    path = os.path.expanduser(name_or_path)
    if (Path(path) / "adapter_config.json").is_file() and not (Path(path) / "config.json").is_file():
        path = _merged_adapter_copy(path)
    try:
        config = AutoConfig.from_pretrained(path, **hf_load_kwargs(path))
    except Exception as e:
        raise UserError(f"{name_or_path}: could not read the model config ({_first_line(e)})") from None
    saved = getattr(config, CONFIG_KEY, None)
    if isinstance(saved, dict) and int(saved.get("num_scores", 1)) != spec.num_scores:
        raise UserError(
            f"{name_or_path}: a reward model with {saved.get('num_scores')} outputs, but this run needs "
            f"{spec.num_scores} ({spec.kind}); start from its base model or match num_scores/kind"
        )
    text_cfg = config.get_text_config()
    config.num_labels = spec.num_scores
    labels = ["reward"] if spec.kind == "scalar" else [f"score_{i + 1}" for i in range(spec.num_scores)]
    config.id2label = dict(enumerate(labels))
    config.label2id = {v: k for k, v in config.id2label.items()}
    setattr(config, CONFIG_KEY, spec.to_dict())
    try:
        with _quiet_transformers():
            model, info = AutoModelForSequenceClassification.from_pretrained(
                path, config=config, dtype=DTYPES.get(dtype, torch.float32), output_loading_info=True,
                **hf_load_kwargs(path, weights=True)
            )
    except ValueError as e:
        if "Unrecognized configuration class" in str(e):
            raise UserError(
                f"{name_or_path}: transformers has no sequence-classification class for model type "
                f"'{text_cfg.model_type}', which reward models need; pick a decoder family that has one "
                "(Llama, Qwen2, Mistral, Gemma, GPT-2, ...)"
            ) from None
        raise UserError(f"{name_or_path}: could not load the model ({_first_line(e)})") from None
    except Exception as e:
        raise UserError(f"{name_or_path}: could not load the model ({_first_line(e)})") from None
    _, head = reward_parts(model)
    head_names = {n for n, p in model.named_parameters() if any(p is q for q in head.parameters())}
    missing = set(info.get("missing_keys", ()))
    other = sorted(k for k in missing if k not in head_names)
    if other:
        raise UserError(f"{name_or_path}: the backbone weights do not match the model (missing {other[:3]})")
    fresh = bool(missing & head_names)
    return model, fresh


def _merged_adapter_copy(path: str) -> str:
    """Merge a peft adapter into its base and save the result to a temporary folder."""
    import tempfile

    model = load_model(path)
    model = model.merge_and_unload()
    out = tempfile.mkdtemp(prefix="alignkit-merged-")
    model.save_pretrained(out, safe_serialization=True)
    load_tokenizer(path).save_pretrained(out)
    return out


def is_adapter_model(model) -> bool:
    """True when `model` (possibly DDP-wrapped) is a peft.PeftModel, i.e. a reward model trained
    as an adapter on a frozen backbone."""
    model = getattr(model, "module", model)  # DDP
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


def reward_parts(model):
    """(decoder, head) of a `*ForSequenceClassification` model (or a peft model around one).

    decoder(input_ids, attention_mask, position_ids) -> last hidden state (final norm applied);
    head: the `score` module (called as a module, so a peft wrapper around it is honoured)."""
    base = model
    peft = sys.modules.get("peft")
    if peft is not None and isinstance(model, peft.PeftModel):
        if model.active_peft_config.is_prompt_learning:
            raise UserError("prompt-learning adapters (prompt / prefix tuning) are not supported for reward models; "
                            "use LoRA or full fine-tuning")
        base = model.get_base_model()
    decoder = getattr(base, getattr(base, "base_model_prefix", "model"), None)
    head = getattr(base, "score", None)
    if decoder is None or head is None or decoder is base:
        raise UserError(f"{type(base).__name__}: not a sequence-classification model with a `score` head")
    return decoder, head


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B,) index of the rightmost position with attention_mask == 1 (any padding side)."""
    idx = mask_last_index(attention_mask)
    if bool((idx < 0).any()):
        raise ValueError("a row of the batch has no real token (attention_mask all 0)")
    return idx


def sequence_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """(B, K) float32 head outputs at the last real token of each row. Runs the decoder only."""
    decoder, head = reward_parts(model)
    B, T = input_ids.shape
    if attention_mask is None:
        idx = torch.full((B,), T - 1, dtype=torch.long, device=input_ids.device)
    else:
        idx = last_token_index(attention_mask)
    out = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    h_last = hidden[torch.arange(B, device=hidden.device), idx]
    return head(h_last).float()


SHARED_PROMPT_ATTENTION = ("sdpa", "eager")  # attention implementations that take a custom 4D mask as is


def shared_prompt_unsupported(model) -> str | None:
    """Why `shared_prompt_logits` cannot run on this model (None: it can). It needs an attention
    implementation that applies a custom (B, 1, T, T) mask as given, and no sliding-window or
    chunked attention (a custom mask replaces the model's own per-layer masks)."""
    decoder, _ = reward_parts(model)
    config = decoder.config
    impl = getattr(config, "_attn_implementation", None) or "eager"
    if impl not in SHARED_PROMPT_ATTENTION:
        return f"attention implementation {impl!r} (needs {' or '.join(SHARED_PROMPT_ATTENTION)})"
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(text, "sliding_window", None) and getattr(text, "use_sliding_window", True):
        return "sliding-window attention"
    if getattr(text, "attention_chunk_size", None):
        return "chunked attention"
    return None


def shared_prompt_mask(segments: torch.Tensor, impl: str, dtype: torch.dtype) -> torch.Tensor:
    """(B, 1, T, T) attention mask of pair rows [prompt | chosen | rejected | padding].

    segments (B, T): 0 prompt, 1 chosen response, 2 rejected response, 3 padding. Query t may see
    key s <= t when s is a prompt token or in t's own segment: the prompt is causal, each response
    sees the prompt and its own earlier tokens, never the other response. A padding query sees only
    itself (a row with no visible key would give NaN). sdpa: boolean (True = attend); eager: additive
    float (0 or the dtype's minimum)."""
    B, T = segments.shape
    ar = torch.arange(T, device=segments.device)
    causal = ar[:, None] >= ar[None, :]
    sq, sk = segments[:, :, None], segments[:, None, :]
    allowed = causal[None] & ((sk == 0) | (sk == sq)) & (sq != 3)
    allowed = allowed | torch.eye(T, dtype=torch.bool, device=segments.device)[None]
    allowed = allowed[:, None]
    if impl == "sdpa":
        return allowed
    zero = torch.zeros((), dtype=dtype, device=segments.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)


def shared_prompt_logits(model, input_ids: torch.Tensor, segments: torch.Tensor, position_ids: torch.Tensor,
                         last_index: torch.Tensor) -> torch.Tensor:
    """(2B, K) head outputs of B pairs, each pair one row: its prompt once, then both responses.

    input_ids (B, T): [prompt | chosen response | rejected response | padding]; segments (B, T):
    0 / 1 / 2 / 3 for those parts; position_ids (B, T): both responses continue the prompt (the
    rejected one restarts where the chosen one started); last_index (B, 2): the last token of
    each response. With the mask of `shared_prompt_mask`, every real token sees exactly the
    tokens it sees in a full (prompt + response) sequence at the same positions, so rewards and
    gradients equal the two-row computation up to float rounding, for P + R_w + R_l instead of
    2P + R_w + R_l token positions per pair, in one forward pass of B rows. Output rows: the B
    chosen, then the B rejected (the order of `pair_collate`)."""
    decoder, head = reward_parts(model)
    impl = getattr(decoder.config, "_attn_implementation", None) or "eager"
    dtype = next(decoder.parameters()).dtype
    mask = shared_prompt_mask(segments, impl, dtype if dtype.is_floating_point else torch.float32)
    out = decoder(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, use_cache=False)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    rows = torch.arange(input_ids.shape[0], device=hidden.device)
    h = torch.cat([hidden[rows, last_index[:, 0]], hidden[rows, last_index[:, 1]]])
    return head(h).float()


def pair_batch_logits(model, batch: dict) -> torch.Tensor:
    """(2B, K) head outputs (B chosen rows, then B rejected) of a pair batch in either layout:
    one row per pair with the prompt shared (`segments` present, see `shared_prompt_logits`) or
    2B full sequences (`pair_collate`). Either way one forward pass."""
    if "segments" in batch:
        return shared_prompt_logits(model, batch["input_ids"], batch["segments"], batch["position_ids"],
                                    batch["last_index"])
    return sequence_logits(model, batch["input_ids"], batch["attention_mask"], batch.get("position_ids"))


# --------------------------------------------------------------------------- rewards from head outputs


def score_probs(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """p(s = i), i = 1..K: softmax(logits / T) in float64-safe float32 (float64 stays float64)."""
    z = logits.double() if logits.dtype == torch.float64 else logits.float()
    return torch.softmax(z / temperature, dim=-1)


def score_entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy (nats) of each row's score distribution."""
    z = (logits.double() if logits.dtype == torch.float64 else logits.float()) / temperature
    logp = F.log_softmax(z, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def rewards_from_logits(logits: torch.Tensor, spec: RewardSpec, temperature: float | None = None) -> torch.Tensor:
    """(B,) rewards. Scalar: the head output. Distributional: `spec.reward_stat` of
    p = softmax(logits / T) over the scores 1..K (T = spec.temperature unless given)."""
    if spec.kind == "scalar":
        return logits[:, 0]
    T = spec.temperature if temperature is None else temperature
    p = score_probs(logits, T)
    scores = torch.arange(1, p.shape[-1] + 1, dtype=p.dtype, device=p.device)
    mean = (p * scores).sum(-1)
    if spec.reward_stat == "mean":
        return mean
    if spec.reward_stat == "mode":
        return p.argmax(-1).to(p.dtype) + 1
    if spec.reward_stat == "median":
        below = torch.cumsum(p, -1) < 0.5
        return below.sum(-1).to(p.dtype) + 1
    var = (p * (scores - mean.unsqueeze(-1)) ** 2).sum(-1)
    return mean - var.clamp(min=0).sqrt()


def preference_probability(chosen_logits: torch.Tensor, rejected_logits: torch.Tensor, kind: str,
                           temperature: float = 1.0) -> torch.Tensor:
    """The model's probability that the first response is preferred, (N,) float64.

    scalar:          q = sigmoid((r_w - r_l) / T)
    distributional:  q = P(s_w > s_l) + 1/2 P(s_w = s_l),   s_w ~ p(y_w), s_l ~ p(y_l) independent
                       = sum_i p_i(w) [ P_l(s < i) + 1/2 p_i(l) ]
    Ties are split evenly, so q(w, l) + q(l, w) = 1. (The training loss uses the strict
    P(s_w > s_l), which also pushes probability mass off ties.)"""
    zw, zl = chosen_logits.double(), rejected_logits.double()
    if kind == "scalar":
        return torch.sigmoid((zw[:, 0] - zl[:, 0]) / temperature)
    pw, pl = torch.softmax(zw / temperature, -1), torch.softmax(zl / temperature, -1)
    below = torch.cumsum(pl, -1) - pl
    return (pw * (below + 0.5 * pl)).sum(-1).clamp(0.0, 1.0)


def preference_nll(q: torch.Tensor) -> float:
    """Mean -log q over pairs whose observed outcome is 'first preferred' (q clamped at 1e-12)."""
    return float(-torch.log(q.double().clamp(min=1e-12)).mean()) if q.numel() else float("nan")


def expected_calibration_error(q: torch.Tensor, n_bins: int = 10) -> float:
    """ECE of pairwise predictions (Guo et al. 2017, "On Calibration of Modern Neural Networks").

    Each pair is a binary prediction: the model picks the side it thinks better (the first when
    q > 1/2) with confidence c = max(q, 1 - q) in [1/2, 1]; it is right when q > 1/2 (the first
    side is the observed winner; q = 1/2 counts as half right). With `n_bins` equal-width bins of
    c over [1/2, 1]:  ECE = sum_b (n_b / N) |accuracy_b - mean confidence_b|."""
    if q.numel() == 0:
        return float("nan")
    q = q.double()
    conf = torch.maximum(q, 1 - q)
    correct = torch.where(q > 0.5, 1.0, torch.where(q < 0.5, 0.0, 0.5)).double()
    b = ((conf - 0.5) * 2 * n_bins).floor().long().clamp(0, n_bins - 1)
    gap = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, b, correct - conf)
    return float(gap.abs().sum() / q.numel())


def fit_temperature(chosen_logits: torch.Tensor, rejected_logits: torch.Tensor, kind: str = "distributional",
                    t_min: float = 0.01, t_max: float = 100.0) -> float:
    """T in [t_min, t_max] minimising `preference_nll(preference_probability(w, l, kind, T))`.

    A grid of 161 log-spaced values plus T = 1, then golden-section refinement around the best
    grid point. Deterministic; never returns a T with a higher NLL than T = 1."""
    zw, zl = chosen_logits.detach().double().cpu(), rejected_logits.detach().double().cpu()
    if zw.shape[0] == 0:
        return 1.0

    def nll(log_t: float) -> float:
        return preference_nll(preference_probability(zw, zl, kind, math.exp(log_t)))

    lo, hi = math.log(t_min), math.log(t_max)
    grid = sorted({lo + (hi - lo) * i / 160 for i in range(161)} | {0.0})
    vals = [nll(g) for g in grid]
    k = min(range(len(grid)), key=lambda i: (vals[i], abs(grid[i])))
    a, b = grid[max(k - 1, 0)], grid[min(k + 1, len(grid) - 1)]
    best_x, best_v = grid[k], vals[k]
    g = (math.sqrt(5) - 1) / 2
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = nll(c), nll(d)
    for _ in range(40):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = nll(c)
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = nll(d)
    for x, v in ((c, fc), (d, fd)):
        if v < best_v:
            best_x, best_v = x, v
    return float(math.exp(best_x))


# --------------------------------------------------------------------------- the user-facing API


def hf_pad_token_id(tokenizer) -> int | None:
    """pad_token_id for the saved config: the tokenizer's pad id when transformers' "rightmost
    non-pad token" rule finds the same token as ours, else None (see the module docstring)."""
    pad = tokenizer.pad_token_id
    if pad is None:
        return None
    enders = end_of_turn_ids(tokenizer) | {tokenizer.bos_token_id, tokenizer.eos_token_id}
    return None if pad in enders else int(pad)


class RewardModel(torch.nn.Module):
    """A trained reward model: `.score(prompts, responses) -> list[float]`.

        rm = RewardModel.from_pretrained("runs/rm")
        rm.score(["2 + 2 = ?"], ["4"])                       # text prompts and responses
        rm.score([[{"role": "user", "content": "Hi"}]], ["Hello!"])   # message-list prompts

    Prompts and responses are encoded exactly as training encoded a pair's sides (chat template
    for message lists; bos + prompt + response + eos for text). `model` is the transformers
    sequence-classification module; `spec` says what its head means (`RewardSpec`).
    """

    def __init__(self, model, tokenizer, spec: RewardSpec | None = None):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        if spec is None:
            saved = getattr(model.config, CONFIG_KEY, None)
            spec = RewardSpec.from_dict(saved) if isinstance(saved, dict) else _spec_of_plain_model(model.config)
        self.spec = spec

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: str | torch.device = "cpu",
                        dtype: str = "float32") -> "RewardModel":
        """Load a folder written by `alignkit rm` (or any transformers sequence-classification
        reward model with one output)."""
        from transformers import AutoModelForSequenceClassification

        path = os.path.expanduser(str(path))
        _check_source(path)
        tok = load_tokenizer(path)
        setup_chat_template(tok)
        if (Path(path) / "adapter_config.json").is_file() and not (Path(path) / "config.json").is_file():
            model = _load_adapter_reward_model(path, dtype)
            model.to(device).eval()
            return cls(model, tok)
        try:
            with _quiet_transformers():
                model = AutoModelForSequenceClassification.from_pretrained(
                    path, dtype=DTYPES.get(dtype, torch.float32), **hf_load_kwargs(path, weights=True))
        except Exception as e:
            raise UserError(f"{path}: could not load a reward model ({_first_line(e)})") from None
        model.to(device).eval()
        return cls(model, tok)

    def save_pretrained(self, out_dir: str | os.PathLike) -> None:
        """A transformers folder (weights, config.json with `alignkit_reward`, tokenizer)."""
        model = getattr(self.model, "module", self.model)
        model.config.update({CONFIG_KEY: self.spec.to_dict()})
        save_pretrained(model, self.tokenizer, out_dir)

    @property
    def device(self) -> torch.device:
        """The device of the backbone's parameters (where `score` puts its batches)."""
        return next(self.model.parameters()).device

    def forward(self, input_ids, attention_mask=None, position_ids=None) -> torch.Tensor:
        """(B, K) head outputs at each row's last real token."""
        return sequence_logits(self.model, input_ids, attention_mask, position_ids)

    def rewards(self, input_ids, attention_mask=None, position_ids=None) -> torch.Tensor:
        """(B,) rewards of token batches (see `rewards_from_logits`)."""
        return rewards_from_logits(self.forward(input_ids, attention_mask, position_ids), self.spec)

    def encode(self, prompt, response) -> list[int]:
        """Token ids of prompt + response as the reward model was trained on them
        (`data.chat.encode_prompt_completion`), cut to the spec's max_length by the rule that cuts
        training pairs (the prompt's start first, then the response's end)."""
        if isinstance(prompt, list) and isinstance(response, str):
            response = [{"role": "assistant", "content": response}]
        enc = encode_prompt_completion(self.tokenizer, prompt, response)
        max_len = self.spec.max_length
        if max_len and len(enc) > max_len:
            plen = next((i for i, x in enumerate(enc.labels) if x != -100), len(enc))
            fitted = _fit_pair(enc, enc, plen, max_len, self.spec.max_prompt_length or max_len // 2, "truncate",
                               EncodeStats())
            return fitted[0].input_ids if fitted is not None else enc.input_ids[-max_len:]
        return enc.input_ids

    @torch.no_grad()
    def _logits(self, prompts: list, responses: list, batch_size: int) -> torch.Tensor:
        if len(prompts) != len(responses):
            raise ValueError(f"got {len(prompts)} prompts and {len(responses)} responses; pass one prompt per response")
        ids = [self.encode(p, r) for p, r in zip(prompts, responses)]
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths together: less padding
        out = torch.empty(len(ids), self.spec.num_scores)
        was_training = self.model.training
        self.model.eval()
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        for s in range(0, len(order), batch_size):
            chunk = order[s:s + batch_size]
            b = pad_collate([Encoded(ids[i], ids[i]) for i in chunk], pad)
            logits = self.forward(b["input_ids"].to(self.device), b["attention_mask"].to(self.device),
                                  b["position_ids"].to(self.device))
            out[chunk] = logits.cpu()
        self.model.train(was_training)
        return out

    def score(self, prompts: list, responses: list, batch_size: int = 16) -> list[float]:
        """One reward per (prompt, response): the scalar head's output, or `spec.reward_stat`
        (default: the expected score E[s] in [1, K]) of the temperature-scaled score distribution."""
        return rewards_from_logits(self._logits(list(prompts), list(responses), batch_size), self.spec).tolist()

    def score_distribution(self, prompts: list, responses: list, batch_size: int = 16) -> list[list[float]]:
        """p(s = 1..K) per (prompt, response), temperature applied (distributional models only)."""
        if self.spec.kind != "distributional":
            raise ValueError("score_distribution needs a distributional reward model")
        logits = self._logits(list(prompts), list(responses), batch_size)
        return score_probs(logits, self.spec.temperature).tolist()


def _load_adapter_reward_model(path: str, dtype: str):
    """An adapter run folder (adapter + head weights + reward_config.json): load the base as a
    sequence-classification model, put the adapter and the trained head on it, merge."""
    import json

    from peft import PeftModel

    spec_file = Path(path) / "reward_config.json"
    if not spec_file.is_file():
        raise UserError(f"{path}: an adapter folder without reward_config.json is not a reward model saved by alignkit")
    spec = RewardSpec.from_dict(json.loads(spec_file.read_text(encoding="utf-8")))
    aconf = json.loads((Path(path) / "adapter_config.json").read_text(encoding="utf-8"))
    base = aconf.get("base_model_name_or_path")
    if not base:
        raise UserError(f"{path}/adapter_config.json: records no base model")
    model, _ = load_reward_backbone(base, spec, dtype)
    if not hasattr(model, "prepare_inputs_for_generation"):  # see recipes.rm.prepare_reward_trainable
        model.prepare_inputs_for_generation = _no_generation
    try:
        with quiet_peft():
            model = PeftModel.from_pretrained(model, path).merge_and_unload()
    except Exception as e:
        raise UserError(f"{path}: could not load the adapter onto {base} ({_first_line(e)})") from None
    model.config.update({CONFIG_KEY: spec.to_dict()})
    return model


def _no_generation(*args, **kwargs):
    raise NotImplementedError("a reward model does not generate")


def _spec_of_plain_model(config) -> RewardSpec:
    if int(getattr(config, "num_labels", 1)) != 1:
        raise UserError(
            f"a sequence-classification model with {config.num_labels} outputs and no `{CONFIG_KEY}` entry in its "
            "config: cannot tell what its outputs mean; use a model trained with `alignkit rm`"
        )
    return RewardSpec()
