"""What trains: adapters through `peft`, or a frozen model with a chosen part left trainable.

Every recipe loads its model and hands it to `prepare_trainable(model, cfg)`, which reads
`cfg.peft`, `cfg.train_last_layers` and `cfg.train_modules` (see `alignkit.config.TrainConfig`):

    peft.method=lora|dora|qlora|oft|boft|ia3   adapters injected into the chosen linear layers
    peft.method=prefix|prompt                  learned virtual tokens (prompt) / per-layer KV prefix
    peft.method=none                           full fine-tuning, optionally restricted to the last
                                               k blocks and/or parameters matching a regex

Frozen parameters get `requires_grad=False`; the trainer builds its optimizer from the
parameters that require grad only, so frozen ones hold no optimizer state and never change.

With an adapter the reference model of DPO / RL is the same network with the adapter switched
off: `reference_logps_context(model)`. `merge_adapter` folds a saved adapter into its base.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
from pathlib import Path
from typing import Iterator, Literal

import torch
from pydantic import Field

from alignkit.config import PeftConfig, Section, TrainConfig
from alignkit.errors import UserError
from alignkit.io import atomic_dir_write
from alignkit.models.arch import is_peft_model, quiet_peft, transformer_blocks, unwrap
from alignkit.models.load import DTYPES, _first_line, load_model, load_tokenizer
from alignkit.models.sharding import check_fsdp_config, empty_model_for_fsdp

__all__ = [
    "PeftConfig",
    "MergeConfig",
    "prepare_trainable",
    "load_base_model",
    "is_peft_model",
    "reference_logps_context",
    "transformer_blocks",
    "merge_adapter",
    "build_peft_config",
]

ADAPTER_METHODS = ("lora", "dora", "qlora", "oft", "boft", "ia3")
PROMPT_METHODS = ("prefix", "prompt")


# ----------------------------------------------------------------------------------- loading


def load_base_model(cfg: TrainConfig, dtype: str = "float32"):
    """The base model a recipe trains: `cfg.model` in `dtype`, or for QLoRA its 4-bit quantised
    form placed on this process's GPU (bitsandbytes). Not yet wrapped: pass it to `prepare_trainable`."""
    if cfg.peft.method != "qlora":
        # Under FSDP only rank 0 reads the weights; the others get an empty (meta) model to shard.
        return empty_model_for_fsdp(cfg, dtype) or load_model(cfg.model, dtype)
    if getattr(cfg, "distributed", None) == "fsdp":  # say so before loading anything
        check_fsdp_config(cfg)
    _check_qlora_possible()
    from transformers import BitsAndBytesConfig

    compute = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    qcfg = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=cfg.peft.quant_type, bnb_4bit_use_double_quant=cfg.peft.double_quant,
        bnb_4bit_compute_dtype=compute,
    )
    device = torch.device("cuda", torch.cuda.current_device())
    return load_model(cfg.model, dtype, device=device, quantization_config=qcfg, device_map={"": device.index})


def _check_qlora_possible() -> None:
    if not torch.cuda.is_available():
        raise UserError(
            "peft.method=qlora needs a CUDA GPU (bitsandbytes 4-bit weights); this machine has none: "
            "use peft.method=lora here"
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise UserError("peft.method=qlora needs bitsandbytes: pip install bitsandbytes") from None


def _is_4bit(model) -> bool:
    return bool(getattr(model, "is_loaded_in_4bit", False)) or getattr(
        getattr(model, "config", None), "quantization_config", None
    ) is not None


# ----------------------------------------------------------------------------------- freezing


def _last_blocks_params(model, k: int) -> tuple[set[int], str]:
    name, blocks = transformer_blocks(model)
    if k > len(blocks):
        raise UserError(f"train_last_layers={k}, but the model has {len(blocks)} transformer blocks; "
                        f"pick 1..{len(blocks)}")
    chosen = {id(p) for b in list(blocks)[-k:] for p in b.parameters()}
    # The final norm (the decoder's norm sitting after the last block) belongs to the top of the
    # network: it trains with the last blocks. Embeddings and the LM head (often tied to the
    # embeddings) stay frozen; add them with train_modules if wanted.
    parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
    norms = [c for c in parent.children() if c is not blocks and "norm" in type(c).__name__.lower()]
    for c in norms:
        chosen |= {id(p) for p in c.parameters()}
    first = len(blocks) - k
    desc = f"blocks {first}..{len(blocks) - 1} of {len(blocks)} ({name})" + (" + final norm" if norms else "")
    return chosen, desc


def _regex_params(model, pattern: str) -> set[int]:
    try:
        rx = re.compile(pattern)
    except re.error as e:
        raise UserError(f"train_modules={pattern!r} is not a valid regular expression ({e})") from None
    # remove_duplicate=False: a tied LM head matches by either of its names.
    chosen = {id(p) for n, p in model.named_parameters(remove_duplicate=False) if rx.search(n)}
    if not chosen:
        example = next(iter(n for n, _ in model.named_parameters()), "")
        raise UserError(
            f"train_modules={pattern!r} matches no parameter, so nothing would train; parameter names look like "
            f"'{example}'"
        )
    return chosen


def _freeze_except(model, keep: set[int]) -> None:
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)


def _mark_adapter_trainable(model) -> int:
    """A PeftModel loaded for inference (a saved adapter folder): make its adapter trainable again."""
    name = model.active_adapter if isinstance(model.active_adapter, str) else model.active_adapter[0]
    rx = re.compile(rf"(^|\.){re.escape(name)}(\.|$)")
    n = 0
    for pname, p in model.named_parameters():
        train = bool(rx.search(pname))
        p.requires_grad_(train)
        n += train
    for c in model.peft_config.values():
        c.inference_mode = False
    return n


# ----------------------------------------------------------------------------------- peft configs


def build_peft_config(pc: PeftConfig, model, cfg: TrainConfig | None = None):
    """The `peft` config object for `pc` (task CAUSAL_LM).

    Methods and their papers: lora (Hu et al. 2021, arXiv:2106.09685; `rslora` scaling,
    Kalajdzievski 2023, arXiv:2312.03732), dora (Liu et al. 2024, arXiv:2402.09353), qlora
    (Dettmers et al. 2023, arXiv:2305.14314: LoRA on a 4-bit base), oft (Qiu et al. 2023,
    arXiv:2306.07280), boft (Liu et al. 2023, arXiv:2311.06243), ia3 (Liu et al. 2022,
    arXiv:2205.05638), prefix (Li & Liang 2021, arXiv:2101.00190), prompt (Lester et al. 2021,
    arXiv:2104.08691). `cfg.train_last_layers` restricts the target modules to the last k
    blocks. Raises UserError when train_last_layers cannot apply (prompt methods, a regex
    target, more layers than the model has), ValueError for an unknown method."""
    import peft

    method = pc.method
    targets = pc.target_modules
    if isinstance(targets, str) and targets.lower() == "all-linear":
        targets = "all-linear"
    ff = pc.feedforward_modules
    if method == "ia3" and targets == "all-linear" and ff is None:
        # peft's per-architecture IA3 default (Llama: keys, values and the MLP output projection)
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as ia3_targets

        mtype = getattr(getattr(model, "config", None), "model_type", "")
        targets = list(ia3_targets[mtype]) if mtype in ia3_targets else None
        ff = ia3_default_ff(model) if targets is not None else None
    if cfg is not None and cfg.train_last_layers:
        if method in PROMPT_METHODS:
            raise UserError(f"train_last_layers cannot restrict peft.method={method} (it has no per-layer adapters)")
        targets = _last_layers_regex(model, targets, cfg.train_last_layers)
    common = {"task_type": peft.TaskType.CAUSAL_LM, "modules_to_save": pc.modules_to_save}
    if method in ("lora", "dora", "qlora"):
        return peft.LoraConfig(
            r=pc.r, lora_alpha=pc.alpha, lora_dropout=pc.dropout, target_modules=targets, use_rslora=pc.rslora,
            use_dora=method == "dora", **common,
        )
    if method == "oft":
        return peft.OFTConfig(
            r=0, oft_block_size=pc.block_size or 32, module_dropout=pc.dropout, target_modules=targets,
            **common,
        )
    if method == "boft":
        _boft_without_cuda(pc)
        if pc.boft_blocks:
            size = {"boft_block_num": pc.boft_blocks, "boft_block_size": 0}
        else:
            size = {"boft_block_size": pc.block_size or 4, "boft_block_num": 0}
        return peft.BOFTConfig(
            boft_n_butterfly_factor=pc.boft_butterfly_factor, boft_dropout=pc.dropout, target_modules=targets,
            **size, **common,
        )
    if method == "ia3":
        return peft.IA3Config(target_modules=targets, feedforward_modules=ff if ff is not None else
                              ([] if targets is not None else None), **common)
    if method == "prefix":
        return peft.PrefixTuningConfig(
            task_type=peft.TaskType.CAUSAL_LM, num_virtual_tokens=pc.num_virtual_tokens,
            prefix_projection=pc.prefix_projection,
        )
    if method == "prompt":
        kw = {}
        if pc.prompt_init_text:
            name = getattr(getattr(model, "config", None), "_name_or_path", None) or (cfg.model if cfg else None)
            kw = {"prompt_tuning_init": peft.PromptTuningInit.TEXT, "prompt_tuning_init_text": pc.prompt_init_text,
                  "tokenizer_name_or_path": name}
        return peft.PromptTuningConfig(task_type=peft.TaskType.CAUSAL_LM, num_virtual_tokens=pc.num_virtual_tokens,
                                       **kw)
    raise ValueError(f"no peft config for method {method!r}")


def _boft_without_cuda(pc: PeftConfig) -> None:
    """peft's BOFT tries to compile a CUDA kernel for every adapted layer and, failing that, uses a
    butterfly factor of 1. Without CUDA, skip the doomed compile attempts and say what happens."""
    if torch.cuda.is_available():
        return
    try:
        from peft.tuners.boft import layer as boft_layer
    except ImportError:
        return
    if getattr(boft_layer, "_FBD_CUDA", None) is None:
        boft_layer._FBD_CUDA = False  # "tried, not available"
    if pc.boft_butterfly_factor > 1:
        print(f"boft: peft.boft_butterfly_factor={pc.boft_butterfly_factor} needs a CUDA GPU; using 1 "
              "(block-diagonal) on this machine", file=sys.stderr, flush=True)


def _last_layers_regex(model, targets, k: int) -> str:
    """A target_modules regex (peft full-matches it against module names) selecting the `targets`
    modules inside the last k transformer blocks; 'all-linear' = every linear layer of those blocks."""
    blocks_name, blocks = transformer_blocks(model)
    if k > len(blocks):
        raise UserError(f"train_last_layers={k}, but the model has {len(blocks)} transformer blocks; "
                        f"pick 1..{len(blocks)}")
    first = len(blocks) - k
    if targets == "all-linear" or targets is None:
        from transformers.pytorch_utils import Conv1D

        names = sorted({n.rsplit(".", 1)[-1] for b in list(blocks)[first:] for n, m in b.named_modules()
                        if isinstance(m, (torch.nn.Linear, Conv1D))})
    elif isinstance(targets, list):
        names = list(targets)
    else:
        raise UserError("train_last_layers with a peft adapter needs peft.target_modules as 'all-linear' or a list of "
                        "module names (a regex cannot be restricted); put the layer numbers into the regex instead")
    idx = "|".join(str(i) for i in range(first, len(blocks)))
    return rf"(.*\.)?{re.escape(blocks_name)}\.({idx})\.(.*\.)?({'|'.join(map(re.escape, names))})"


def ia3_default_ff(model) -> list[str]:
    """peft's default IA3 feed-forward module names for `model`'s architecture ([] when peft
    has none for its model_type). IA3: Liu et al. 2022, arXiv:2205.05638."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as ff_default

    return list(ff_default.get(getattr(model.config, "model_type", ""), []))


def _base_name(model, cfg: TrainConfig) -> str | None:
    """What the saved adapter records as its base: an absolute path for a local folder (so the
    adapter loads from any working directory), the hub id otherwise."""
    name = cfg.model or getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None),
                                                                        "_name_or_path", None)
    if not name:
        return None
    p = Path(os.path.expanduser(name))
    return str(p.resolve()) if p.exists() else name


# ----------------------------------------------------------------------------------- the entry point


def prepare_trainable(model, cfg: TrainConfig, log=None):
    """Return the model to train, as configured by `cfg.peft`, `cfg.train_last_layers`, `cfg.train_modules`.

    - peft.method=lora|dora|qlora|oft|boft|ia3|prefix|prompt: a `peft.PeftModel` around `model`;
      only the adapter (plus `peft.modules_to_save`) trains. With train_last_layers=k the
      adapters go into the last k blocks only. QLoRA needs a CUDA GPU (else UserError, exit 2);
      pass a model from `load_base_model(cfg)` to avoid loading the base twice.
    - peft.method=none: full fine-tuning; train_last_layers=k keeps only the last k transformer
      blocks and the final norm trainable (embeddings and LM head frozen); train_modules=REGEX
      keeps only parameters whose name matches (re.search). Both given: a parameter trains if
      either selects it. Neither given: the model is returned unchanged.
    - `model` already a PeftModel (model= pointed at a saved adapter folder) with method=none:
      that adapter trains further.
    Everything not trained gets requires_grad=False.
    """
    say = log or (lambda s: print(s, file=sys.stderr, flush=True))
    pc = cfg.peft
    method = pc.method
    if method in PROMPT_METHODS and getattr(cfg, "packing", False):
        raise UserError(f"peft.method={method} cannot be combined with packing=true (its virtual tokens would be "
                        "shared across packed documents); set packing=false")
    if is_peft_model(model):
        if method != "none" or cfg.train_last_layers or cfg.train_modules:
            raise UserError(
                f"model={cfg.model} is already an adapter; with peft.method=none it trains further as is. To put a "
                "new adapter or freezing on top, first merge it: alignkit merge adapter=DIR output=DIR"
            )
        _mark_adapter_trainable(model)
        return model
    if method == "none":
        keep: set[int] = set()
        what = []
        if cfg.train_last_layers:
            ids, desc = _last_blocks_params(model, cfg.train_last_layers)
            keep |= ids
            what.append(desc)
        if cfg.train_modules:
            keep |= _regex_params(model, cfg.train_modules)
            what.append(f"parameters matching {cfg.train_modules!r}")
        if what:
            _freeze_except(model, keep)
            say("training only " + " and ".join(what) + "; everything else is frozen")
        return model
    if cfg.train_modules:
        raise UserError(f"train_modules applies to full fine-tuning (peft.method=none); with peft.method={method} "
                        "choose the adapted layers with peft.target_modules and full layers with peft.modules_to_save")

    import peft

    if method == "qlora":
        if not _is_4bit(model):
            _check_qlora_possible()
            say("qlora: reloading the base model in 4-bit")
            model = load_base_model(cfg)
        model = peft.prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=cfg.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    pconf = build_peft_config(pc, model, cfg)
    try:
        with quiet_peft():
            wrapped = peft.get_peft_model(model, pconf)
    except UserError:
        raise
    except (ValueError, TypeError, KeyError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"peft.method={method}: could not add the adapter to {cfg.model or 'the model'} ({msg[:300]}); "
                        "check peft.target_modules") from None
    base = _base_name(model, cfg)
    if base:
        for c in wrapped.peft_config.values():
            c.base_model_name_or_path = base
    return wrapped


# ----------------------------------------------------------------------------------- reference


@contextlib.contextmanager
def reference_logps_context(model) -> Iterator[torch.nn.Module]:
    """Inside the block `model` (a PeftModel, possibly DDP-wrapped) computes as its base model:
    the adapter is switched off, dropout is off (eval mode) and no graph is built. The same
    weights then serve as the frozen reference of DPO / RL without a second copy in memory.

        with reference_logps_context(model) as ref:
            ref_logps = causal_lm_token_logps(ref, ...)

    Yields the unwrapped PeftModel. Train mode is restored on exit.
    """
    inner = unwrap(model)
    if not is_peft_model(inner):
        raise ValueError("reference_logps_context needs a peft model (an adapter to switch off)")
    was_training = inner.training
    inner.eval()
    try:
        with inner.disable_adapter(), torch.no_grad():
            yield inner
    finally:
        inner.train(was_training)


# ----------------------------------------------------------------------------------- merge


class MergeConfig(Section):
    """`alignkit merge adapter=DIR output=DIR`: fold a saved adapter into its base model and save
    a plain transformers model (+ tokenizer) that loads without peft."""

    adapter: str = Field(
        "", description="Adapter folder (adapter_config.json + adapter_model.safetensors), e.g. a run folder"
    )
    output: str = Field("", description="Folder for the merged model; written atomically")
    base: str | None = Field(
        None, description="Base model (hub id or folder); default: the base recorded in adapter_config.json"
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="Weights dtype of the merged model")
    overwrite: bool = Field(False, description="Replace a non-empty output folder")


def merge_adapter(cfg: MergeConfig, log=None) -> Path:
    """Merge `cfg.adapter` into its base (W + the adapter's update, peft's `merge_and_unload`)
    and write a plain transformers model with the adapter's (or the base's) tokenizer to
    `cfg.output`, atomically; returns the output folder. Raises UserError, one line, for a
    missing adapter / output, an unreadable adapter_config.json, prompt-learning adapters
    (nothing to merge), a non-empty output without overwrite=true, no recorded base, or an
    adapter that does not load onto the base."""
    say = log or (lambda s: print(s, file=sys.stderr, flush=True))
    if not cfg.adapter:
        raise UserError("no adapter given; pass adapter=DIR (a folder with adapter_config.json)")
    if not cfg.output:
        raise UserError("no output given; pass output=DIR for the merged model")
    if cfg.dtype not in DTYPES:
        raise UserError(f"dtype={cfg.dtype!r}: use one of {', '.join(DTYPES)}")
    adir = Path(os.path.expanduser(cfg.adapter))
    conf_file = adir / "adapter_config.json"
    if not conf_file.is_file():
        what = "does not exist" if not adir.exists() else "has no adapter_config.json"
        raise UserError(f"adapter={cfg.adapter}: {what}; point adapter= at a folder saved by a peft.method=... run")
    try:
        aconf = json.loads(conf_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{conf_file}: not readable JSON ({_first_line(e)})") from None
    ptype = str(aconf.get("peft_type", "")).upper()
    if ptype in ("PROMPT_TUNING", "PREFIX_TUNING", "P_TUNING", "MULTITASK_PROMPT_TUNING", "CARTRIDGE"):
        raise UserError(
            f"adapter={cfg.adapter}: {ptype.lower()} cannot be merged: it adds learned virtual tokens at run time, "
            "not weight changes; load it with peft.PeftModel.from_pretrained(base, DIR) instead"
        )
    out = Path(os.path.expanduser(cfg.output))
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not cfg.overwrite:
        raise UserError(f"output={cfg.output}: already exists and is not empty; pass overwrite=true or another folder")
    base = cfg.base or aconf.get("base_model_name_or_path")
    if not base:
        raise UserError(f"{conf_file}: records no base model; pass base=MODEL")

    from peft import PeftModel

    say(f"merge: loading base {base}")
    base_model = load_model(base, cfg.dtype)
    try:
        with quiet_peft():
            model = PeftModel.from_pretrained(base_model, str(adir))
    except Exception as e:
        raise UserError(f"adapter={cfg.adapter}: could not load onto {base} ({_first_line(e)})") from None
    try:
        merged = model.merge_and_unload()
    except Exception as e:
        raise UserError(f"adapter={cfg.adapter}: {ptype.lower() or 'this adapter'} cannot be merged "
                        f"({_first_line(e)}); load it with peft.PeftModel.from_pretrained instead") from None
    has_tok = any((adir / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))
    tok = load_tokenizer(str(adir) if has_tok else base)

    def write(tmp: Path) -> None:
        merged.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        from alignkit.models.generation import write_generation_config

        write_generation_config(tmp, tok, merged)  # stop at the end of a turn, not only at eos

    if out.exists() and not out.is_dir():
        out.unlink()  # overwrite=true of a plain file
    atomic_dir_write(out, write)
    say(f"merge: folded adapter {cfg.adapter} into base {base}; wrote the merged model to {out.resolve()}")
    return out
