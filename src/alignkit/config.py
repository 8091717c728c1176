"""Typed run configuration: one pydantic class per recipe, a description per field.

A run is configured from an optional YAML file plus ``key=value`` overrides (dotted keys for
nested sections). Unknown keys are rejected with the nearest valid key suggested; values are
validated and coerced by pydantic, and every problem is reported as one line (``UserError``).
"""

from __future__ import annotations

import difflib
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from alignkit.errors import UserError



# Trackers `report_to` accepts; each is its own client library (the package of the same name).
TRACKERS = ("tensorboard", "wandb", "mlflow", "trackio")


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def check_report_to(names) -> list[str]:
    """Validate tracker names (config time): known names whose client library is installed.
    "none" drops out, "auto" stays (resolved by `resolve_report_to`). Raises ValueError
    (pydantic turns it into the config error line) naming the extra to install."""
    out = []
    for n in names:
        n = str(n).strip().lower()
        if not n or n == "none":
            continue
        if n != "auto" and n not in TRACKERS:
            raise ValueError(f"unknown tracker {n!r}; choose from {', '.join(TRACKERS)}, auto or none")
        if n != "auto" and not _installed(n):
            raise ValueError(f"{n}: its client library is not installed; pip install 'alignkit[{n}]' or drop it")
        if n not in out:
            out.append(n)
    return out


def check_chat_template(value: str | None) -> str | None:
    """A `chat_template` value (Jinja text, or the path of a file holding it) must be readable
    UTF-8 and compile; the error names the file and line. Checked when the config is read, so a
    typo in a template stops the run before anything loads. Returns the value unchanged."""
    if not value:
        return value
    from alignkit.toy.tokenizer import NAMED_TEMPLATES

    if value in NAMED_TEMPLATES:  # a built-in template's name (chat_template=toy-tools)
        return value
    source, text = "chat_template", value
    if len(value) < 4096 and "{" not in value:  # a path (the same rule data.chat applies)
        p = Path(value).expanduser()
        if not p.is_file():
            raise ValueError(f"{value} is neither a Jinja template nor an existing file")
        raw = p.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            line = raw[:e.start].count(b"\n") + 1
            raise ValueError(f"{value}: line {line}: byte {e.start} is not UTF-8; save the template as UTF-8") from None
        source = value
    import jinja2

    try:  # transformers' own compiler knows its extra tags ({% generation %})
        from transformers.utils.chat_template_utils import _compile_jinja_template as compile_
    except ImportError:
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def compile_(t):
            return ImmutableSandboxedEnvironment(extensions=["jinja2.ext.loopcontrols"]).parse(t)
    try:
        compile_(text)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"{source}: line {e.lineno}: Jinja syntax error ({e.message}); fix the template") from None
    return value


class Section(BaseModel):
    """Base of every config block: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


PeftMethod = Literal["none", "lora", "dora", "qlora", "prefix", "prompt", "oft", "boft", "ia3"]


class PeftConfig(Section):
    """Parameter-efficient training through `peft` (see docs/peft.md). method=none: no adapter."""

    method: PeftMethod = Field(
        "none",
        description="none (full or partial fine-tuning) | lora | dora | qlora (LoRA on a 4-bit base, CUDA only) | "
        "prefix | prompt | oft | boft | ia3",
    )
    r: int = Field(8, ge=1, description="LoRA / DoRA / QLoRA rank")
    alpha: float = Field(16.0, gt=0, description="LoRA scale numerator: scale = alpha/r (alpha/sqrt(r) with rslora)")
    dropout: float = Field(
        0.0, ge=0, lt=1,
        description="Adapter dropout: on the adapter input for LoRA/DoRA/QLoRA; OFT/BOFT: randomly drops rotation blocks",
    )
    target_modules: Union[str, list[str]] = Field(
        "all-linear",
        description="Modules that get an adapter: 'all-linear' (every linear layer but the output head), a list of "
        "module-name suffixes (e.g. [q_proj, v_proj]) or a regex matched against the full module name",
    )
    rslora: bool = Field(False, description="Rank-stabilised LoRA: scale alpha/sqrt(r) instead of alpha/r")
    modules_to_save: list[str] | None = Field(
        None, description="Modules trained in full next to the adapter and saved with it (e.g. [lm_head])"
    )
    feedforward_modules: list[str] | None = Field(
        None,
        description="IA3: target modules whose input (not output) is scaled, i.e. MLP output projections; default: "
        "the peft choice for the architecture when target_modules is all-linear (Llama: down_proj), else none",
    )
    num_virtual_tokens: int = Field(16, ge=1, description="Prefix / prompt tuning: number of virtual tokens")
    prompt_init_text: str | None = Field(
        None, description="Prompt tuning: initialise the virtual tokens from this text's embeddings (else random)"
    )
    prefix_projection: bool = Field(False, description="Prefix tuning: reparametrise the prefix through an MLP")
    block_size: int = Field(
        0, ge=0, description="OFT / BOFT block size (0: 32 for OFT, 4 for BOFT; ignored by BOFT when boft_blocks > 0)"
    )
    boft_blocks: int = Field(0, ge=0, description="BOFT: number of blocks per layer instead of a block size (0: off)")
    boft_butterfly_factor: int = Field(1, ge=1, description="BOFT: butterfly factors (1 = plain block-diagonal OFT)")
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="QLoRA: 4-bit data type of the frozen base")
    double_quant: bool = Field(True, description="QLoRA: also quantise the quantisation constants")

    @field_validator("method", mode="before")
    @classmethod
    def _none_is_a_method(cls, v):
        # `peft.method=none` on the command line (and `method: null` in YAML) read as null
        return "none" if v is None else v

    @field_validator("target_modules", mode="before")
    @classmethod
    def _one_name_is_a_list(cls, v):
        # One plain module name (`target_modules=q_proj`, or `target_modules: q_proj` in YAML) means
        # that suffix, as `[q_proj]` does; peft would read the bare string as a regex over the full
        # name and match nothing. 'all-linear' and regexes (any other character) stay strings.
        if isinstance(v, str) and v.lower() != "all-linear" and re.fullmatch(r"[A-Za-z0-9_.]+", v):
            return [v]
        return v


class FSDPConfig(Section):
    """FSDP2 settings, used when `distributed=fsdp` (see docs/distributed.md)."""

    cpu_offload: bool = Field(
        False, description="Keep sharded weights, gradients and optimizer state in CPU memory; the GPU holds one "
        "block's gathered weights at a time (slower; GPU only)")
    reshard_after_forward: bool = Field(
        True, description="Free each block's gathered weights after its forward and gather them again in backward "
        "(false: less communication, more memory)")
    auto_min_params: int = Field(
        1_000_000_000, ge=0, description="distributed=auto picks fsdp for models with at least this many parameters "
        "(with more than one process), ddp below")
    consolidate_checkpoints: bool = Field(
        False, description="Also write a full Hugging Face model into every intermediate checkpoint (the run's "
        "final model is always written in full)")


class TrainConfig(Section):
    """Keys shared by every training recipe."""

    model: str = Field("", description="Base model: a Hugging Face hub id or a local folder")
    data: str = Field("", description="Training data: a .jsonl/.json/.parquet/.csv file or a hub dataset name")
    data_split: str = Field("train", description="Split to read when `data` is a hub dataset")
    eval_data: str | None = Field(None, description="Held-out data in the same format as `data` (optional)")
    eval_split: str = Field("test", description="Split to read when `eval_data` is a hub dataset")
    output_dir: str = Field("runs/run", description="Run folder: final model, checkpoints, metrics.jsonl, plots")
    max_steps: int = Field(-1, description="Optimizer steps to run (at least 1); -1 = derive from `epochs`")
    epochs: float = Field(1.0, gt=0, description="Passes over the data when max_steps is -1 (> 0)")
    batch_size: int = Field(8, ge=1, description="Rows per micro-batch on each process")
    grad_accum: int = Field(1, ge=1, description="Micro-batches accumulated per optimizer step")
    lr: float = Field(2e-5, gt=0, description="Peak learning rate (AdamW)")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    adam_betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas")
    warmup_steps: int = Field(0, ge=0, description="Linear warmup steps from 0 to `lr`")
    schedule: Literal["cosine", "linear", "constant"] = Field("cosine", description="LR decay after warmup")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="Final LR as a fraction of `lr` (cosine/linear)")
    max_grad_norm: float | None = Field(
        1.0, gt=0, description="Clip the global gradient norm to this (> 0); null disables clipping")
    max_length: int = Field(1024, ge=2, description="Longest tokenized row (prompt + answer)")
    truncation: Literal["truncate", "drop"] = Field(
        "truncate", description="Rows longer than max_length: cut to max_length or drop (the count is reported)"
    )
    seed: int = Field(0, description="Seed for data order, init and dropout: a CPU run is reproducible bit for bit")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Compute dtype: auto = bf16 autocast on a GPU that supports it, float32 elsewhere"
    )
    resume: Union[bool, str] = Field(
        False, description="true: continue from the newest checkpoint in output_dir; or a checkpoint path"
    )
    log_every: int = Field(10, ge=1, description="Log metrics every N optimizer steps")
    eval_every: int = Field(0, ge=0, description="Evaluate on eval_data every N steps (0: only at the end)")
    save_every: int = Field(0, ge=0, description="Write a resumable checkpoint every N steps (0: only at the end)")
    save_total_limit: int = Field(2, ge=1, description="Keep at most this many intermediate checkpoints")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory")
    distributed: Literal["auto", "none", "ddp", "fsdp"] = Field(
        "auto", description="Data parallelism under torchrun: ddp (replicas), fsdp (FSDP2: weights, gradients and "
        "optimizer state sharded per transformer block), auto (fsdp from fsdp.auto_min_params, else ddp), none")
    fsdp: FSDPConfig = Field(default_factory=FSDPConfig, description="FSDP2 settings (distributed=fsdp)")
    logits_chunk_size: int = Field(
        1024, ge=1, description="Tokens per chunk when computing log-probs without materialising full logits"
    )
    tensorboard: bool = Field(True, description="Also write TensorBoard events when tensorboard is installed")
    report_to: list[str] = Field(
        default_factory=lambda: ["auto"], description="Trackers that get the same metrics, config and final "
        "samples: comma-separated names from tensorboard, wandb, mlflow, trackio; none for no tracker; auto: "
        "tensorboard when installed (and tensorboard=true)")
    plot: bool = Field(True, description="Draw curves.png of the logged metrics at the end of the run")
    progress: bool = Field(True, description="Show a progress bar")
    chat_template: str | None = Field(
        None, description="Jinja chat template (text or path) used when the tokenizer has none, or to override it"
    )
    overwrite: bool = Field(False, description="Allow writing into a non-empty output_dir without resume")
    peft: PeftConfig = Field(default_factory=PeftConfig, description="Adapter training (peft.method=lora, ...)")
    train_last_layers: int = Field(
        0,
        ge=0,
        description="Train only the last k transformer blocks plus the final norm (embeddings and LM head frozen); "
        "with an adapter method: put adapters only in the last k blocks. 0 = no restriction",
    )
    train_modules: str | None = Field(
        None,
        description="Regex searched in each parameter name (e.g. 'mlp|norm'): only matching parameters train, the "
        "rest is frozen. Full fine-tuning only",
    )
    trust_remote_code: bool = Field(
        False, description="Run Python code shipped in a model folder or hub repo (custom architectures). Off: such "
        "a model is refused, and no prompt ever asks"
    )

    _template_compiles = field_validator("chat_template")(classmethod(lambda cls, v: check_chat_template(v)))

    @field_validator("adam_betas")
    @classmethod
    def _betas_below_one(cls, v: tuple[float, float]) -> tuple[float, float]:
        # beta = 1 divides by 1 - beta^t = 0 in Adam's bias correction: NaN from the first step
        if not all(0.0 <= b < 1.0 for b in v):
            raise ValueError("each AdamW beta must be in [0, 1), e.g. [0.9, 0.999]")
        return v

    @model_validator(mode="after")
    def _prompt_leaves_room(self):
        mpl = getattr(self, "max_prompt_length", None)
        if mpl is not None and mpl >= self.max_length:
            raise ValueError(f"max_prompt_length={mpl} leaves no room for the answer within max_length="
                             f"{self.max_length}; set max_prompt_length below max_length")
        return self

    @field_validator("max_steps")
    @classmethod
    def _steps_positive_or_derived(cls, v: int) -> int:
        # 0 used to run a whole epoch and -3 one step: neither is what anyone means.
        if v != -1 and v < 1:
            raise ValueError("max_steps must be at least 1, or -1 to derive it from epochs")
        return v

    @field_validator("report_to", mode="before")
    @classmethod
    def _report_to_list(cls, v):
        # `report_to=wandb,mlflow` on the command line arrives as one string, `report_to=none` as null
        if v is None:
            return []
        if isinstance(v, str):
            v = v.split(",")
        return check_report_to(v)


class SFTConfig(TrainConfig):
    """Supervised fine-tuning: loss on the answer tokens only."""

    output_dir: str = Field("runs/sft", description="Run folder: final model, checkpoints, metrics.jsonl, plots")
    packing: bool = Field(
        False,
        description="Padding-free packing: rows are concatenated into one sequence per micro-batch, "
        "positions restart per document and documents never attend across boundaries",
    )
    train_on_prompt: bool = Field(False, description="Also train on prompt/user tokens (off: answer tokens only)")


# ----------------------------------------------------------------------------------------------
# Loading: YAML + dotted overrides -> validated config
# ----------------------------------------------------------------------------------------------


def _field_names(cls: type[BaseModel]) -> list[str]:
    """All dotted keys accepted by a config class (nested sections expanded)."""
    names: list[str] = []
    for name, f in cls.model_fields.items():
        names.append(name)
        sub = _section_type(f.annotation)
        if sub is not None:
            names += [f"{name}.{n}" for n in _field_names(sub)]
    return names


def _section_type(ann: Any) -> type[BaseModel] | None:
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    for arg in typing.get_args(ann):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None


def _annotation(cls: type[BaseModel], dotted: str) -> Any:
    node: Any = cls
    ann = None
    for part in dotted.split("."):
        sub = node if isinstance(node, type) and issubclass(node, BaseModel) else None
        if sub is None or part not in sub.model_fields:
            return None
        ann = sub.model_fields[part].annotation
        node = _section_type(ann)
    return ann


def _parse_value(raw: str, ann: Any) -> Any:
    """Parse a command-line value for a field: strings stay strings (paths like '1e3' or 'true'
    are kept as typed); everything else is read as YAML (3, 2e-5, true, [0.9, 0.95], null)."""
    if ann is str:
        return raw
    if raw.strip().lower() in ("null", "none", "~"):
        return None
    if typing.get_origin(ann) in (Union, types.UnionType) and [a for a in typing.get_args(ann)
                                                              if a is not type(None)] == [str]:
        return raw  # `str | None`: text such as 'Answer:' must not turn into a YAML mapping
    try:
        val = yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw
    if isinstance(val, str) and _is_list_field(ann) and not ("," not in val and _accepts_str(ann)):
        # `methods=grpo,gspo` means the list [grpo, gspo], as `methods=[grpo,gspo]` does; one word
        # stays a string where the field takes one (`peft.target_modules=all-linear` is a keyword)
        return [yaml.safe_load(x) if x.strip() else x for x in val.split(",")]
    # YAML 1.1 reads '2e-5' as a string; pydantic coerces numeric strings itself.
    return val


def _accepts_str(ann: Any) -> bool:
    """Whether a field's annotation takes a plain string besides a list (`str | list[str]`)."""
    return ann is str or (typing.get_origin(ann) in (Union, types.UnionType)
                          and any(_accepts_str(a) for a in typing.get_args(ann)))


def _is_list_field(ann: Any) -> bool:
    """Whether a field's annotation is a list (or an optional list)."""
    if typing.get_origin(ann) in (Union, types.UnionType):
        return any(_is_list_field(a) for a in typing.get_args(ann) if a is not type(None))
    return typing.get_origin(ann) is list or ann is list


def _set_dotted(tree: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for p in parts[:-1]:
        if not isinstance(node.get(p), dict):
            node[p] = {}
        node = node[p]
    node[parts[-1]] = value


# Names users bring from other toolkits, mapped to ours for the "did you mean" hint.
ALIASES = {
    "learning_rate": "lr",
    "num_train_epochs": "epochs",
    "num_epochs": "epochs",
    "per_device_train_batch_size": "batch_size",
    "train_batch_size": "batch_size",
    "micro_batch_size": "batch_size",
    "gradient_accumulation_steps": "grad_accum",
    "model_name_or_path": "model",
    "base_model": "model",
    "dataset": "data",
    "train_file": "data",
    "max_seq_length": "max_length",
    "sequence_len": "max_length",
    "lr_scheduler_type": "schedule",
    "lr_scheduler": "schedule",
    "resume_from_checkpoint": "resume",
    "torch_dtype": "dtype",
    "bf16": "dtype",
    "output": "output_dir",
    "clip_ratio_c": "dual_clip",  # verl's name
}


def suggest(key: str, valid: list[str]) -> str | None:
    leaf = key.rsplit(".", 1)[-1]
    alias = ALIASES.get(leaf)
    if alias:
        cand = key[: len(key) - len(leaf)] + alias
        if cand in valid:
            return cand
    # A typo of a known key or of a familiar alias ('lerning_rate').
    pool = valid + [a for a, target in ALIASES.items() if target in valid]
    near = difflib.get_close_matches(key, pool, n=1, cutoff=0.6)
    if not near:
        return None
    return ALIASES.get(near[0], near[0])


def _check_keys(cls: type[BaseModel], tree: dict, prefix: str, source: str) -> None:
    valid = _field_names(cls)
    for key, val in tree.items():
        dotted = f"{prefix}{key}"
        if key not in valid:  # `valid` is relative to this section
            near = suggest(key, valid)
            near = f"{prefix}{near}" if near else None
            hint = f"; did you mean '{near}'?" if near else "; see `alignkit <command> --help` for the keys"
            raise UserError(f"{source}: unknown config key '{dotted}'{hint}")
        sub = _section_type(cls.model_fields[key].annotation)
        if sub is not None and isinstance(val, dict):
            _check_keys(sub, val, f"{dotted}.", source)


def load_config(cls: type[BaseModel], path: str | None = None, overrides: list[str] | dict | None = None):
    """Build a config of type `cls` from an optional YAML file and `key=value` overrides."""
    tree: dict = {}
    source = "command line"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"{path}: config file not found; pass an existing .yaml file or only key=value pairs")
        raw = b""
        try:
            raw = p.read_bytes()
            loaded = yaml.safe_load(raw.decode("utf-8")) or {}
        except UnicodeDecodeError as e:
            line = raw[:e.start].count(b"\n") + 1
            raise UserError(f"{path}: line {line}: byte {e.start} is not UTF-8; save the config file as UTF-8"
                            ) from None
        except OSError as e:
            raise UserError(f"{path}: cannot read the config file ({e.strerror or type(e).__name__})") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark else ""
            raise UserError(f"{path}:{where} is not valid YAML ({getattr(e, 'problem', e)}); fix the syntax") from None
        if not isinstance(loaded, dict):
            raise UserError(f"{path}: a config file must be a mapping of key: value")
        for k, v in loaded.items():
            _set_dotted(tree, str(k), v)
        _check_keys(cls, tree, "", path)
    over_tree: dict = {}
    items = overrides.items() if isinstance(overrides, dict) else [_split_override(o) for o in overrides or []]
    for k, v in items:
        if isinstance(v, str) and not isinstance(overrides, dict):
            v = _parse_value(v, _annotation(cls, k))
        _set_dotted(over_tree, k, v)
    _check_keys(cls, over_tree, "", source)
    _deep_update(tree, over_tree)
    try:
        return cls.model_validate(tree)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"] if not isinstance(x, int))
        where = path or source
        msg = err["msg"].removeprefix("Value error, ")
        if not loc:  # a check across several keys: its message names them
            raise UserError(f"{where}: {msg}") from None
        raise UserError(f"{where}: bad value for '{loc}': {msg} (got {err.get('input')!r})") from None


def check_output_dir(path: str, key: str = "output_dir") -> None:
    """Fail in one line, before anything loads or is written, when `path` cannot become a
    folder this run writes into: it is a file, it lies under a file, or the nearest existing
    folder above it (or itself) cannot be written (read-only, permission denied)."""
    import os
    import tempfile

    if not path:
        raise UserError(f"{key} is empty; pass {key}=PATH")
    p = Path(os.path.expanduser(path))
    if p.exists() and not p.is_dir():
        raise UserError(f"{path}: {key} is a file, not a folder; pick another {key} or move the file away")
    anc = p
    while not anc.exists() and anc.parent != anc:
        anc = anc.parent
    if anc.exists() and not anc.is_dir():
        raise UserError(f"{path}: {key} lies under {anc}, which is a file, not a folder; pick another {key}")
    try:  # a real probe: os.access says yes to root on a read-only file system
        os.rmdir(tempfile.mkdtemp(prefix=".alignkit-probe-", dir=anc))
    except OSError as e:
        why = e.strerror or type(e).__name__
        raise UserError(f"{path}: {key} cannot be written ({anc}: {why}); pick a writable folder") from None


def _split_override(item: str) -> tuple[str, str]:
    if "=" not in item:
        raise UserError(f"'{item}': expected key=value (for example lr=2e-5)")
    k, v = item.split("=", 1)
    if not k:
        raise UserError(f"'{item}': empty key; expected key=value")
    return k.strip(), v


def _deep_update(base: dict, new: dict) -> None:
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _deep_update(base[k], v)
        else:
            base[k] = v


def _type_name(ann: Any) -> str:
    origin = typing.get_origin(ann)
    if origin is Literal:
        return "|".join(str(a) for a in typing.get_args(ann))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(ann) if a is not type(None)) + (
            " or null" if type(None) in typing.get_args(ann) else ""
        )
    if origin is not None:
        return str(ann).replace("typing.", "")
    return getattr(ann, "__name__", str(ann))


def help_table(cls: type[BaseModel], prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(key, type, default, doc) for every key, nested sections expanded."""
    rows = []
    for name, f in cls.model_fields.items():
        sub = _section_type(f.annotation)
        if sub is not None:
            rows += help_table(sub, f"{prefix}{name}.")
            continue
        default = f.default_factory() if f.default_factory is not None else f.default
        if isinstance(default, BaseModel):
            default = default.model_dump(mode="json")
        rows.append((prefix + name, _type_name(f.annotation), repr(default), f.description or ""))
    return rows


def dump_config(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


class DPOConfig(TrainConfig):
    """Offline preference optimisation on prompt/chosen/rejected pairs: DPO and its variants (docs/dpo.md)."""

    output_dir: str = Field("runs/dpo", description="Run folder: final model, checkpoints, metrics.jsonl, plots")
    lr: float = Field(1e-6, gt=0, description="Peak learning rate (AdamW); DPO wants a small one on real models")
    loss: Literal["sigmoid", "ipo", "hinge", "robust", "simpo", "orpo", "kto"] = Field(
        "sigmoid",
        description="sigmoid: DPO (cDPO with label_smoothing > 0) | ipo | hinge: SLiC-style | robust: unbiased "
        "under label noise (label_smoothing = flip rate) | simpo: reference-free, length-normalised, margin "
        "simpo_gamma | orpo: reference-free odds ratio + NLL, weight orpo_lambda (docs/orpo.md) | kto: "
        "unpaired desirable/undesirable rows, as `alignkit kto` (docs/kto.md)",
    )
    beta: float = Field(0.1, gt=0, description="beta: strength of the KL tie to the reference (IPO: tau; SimPO: "
                                                "reward scale, the paper uses 2-2.5)")
    label_smoothing: float = Field(
        0.0, ge=0, lt=0.5, description="Assumed preference-flip rate eps for sigmoid (cDPO), robust and simpo"
    )
    simpo_gamma: float = Field(0.5, description="SimPO target reward margin gamma (loss=simpo only)")
    sft_weight: float = Field(
        0.0, ge=0, description="Weight of an NLL term on the chosen answer: per pair its token-mean NLL, averaged "
        "over pairs like the preference loss"
    )
    reference: Literal["auto", "precompute", "adapter_off"] = Field(
        "auto",
        description="Where reference log-probs come from: precompute (one pass before training, cached in "
        "output_dir/ref_logps.pt) | adapter_off (the same model with its adapter switched off, per batch) | auto "
        "(adapter_off with an adapter, else precompute). loss=simpo uses none",
    )
    max_prompt_length: int | None = Field(
        None, ge=1, description="Prompt tokens kept (the end of the prompt) when a pair exceeds max_length; "
        "null = max_length // 2"
    )
    ref_batch_size: int = Field(0, ge=0, description="Pairs per batch when precomputing reference log-probs "
                                                     "(0: 2 x batch_size)")
    orpo_lambda: float = Field(0.1, ge=0, description="ORPO: weight λ of the odds-ratio term added to the chosen "
                               "answer's token-mean NLL (loss=orpo only)")
    desirable_weight: float = Field(1.0, ge=0, description="KTO: weight of the desirable rows' loss (loss=kto); "
                                    "the paper keeps desirable_weight·n_desirable / (undesirable_weight·"
                                    "n_undesirable) in [1, 4/3]")
    undesirable_weight: float = Field(1.0, ge=0, description="KTO: weight of the undesirable rows' loss (loss=kto)")


class KTOConfig(DPOConfig):
    """Kahneman-Tversky optimisation (docs/kto.md) on unpaired rows {prompt, completion, label: true|false},
    or on prompt/chosen/rejected pairs split into a desirable and an undesirable row."""

    output_dir: str = Field("runs/kto", description="Run folder: final model, checkpoints, metrics.jsonl, plots")
    loss: Literal["kto"] = Field("kto", description="Always kto here (`alignkit dpo loss=kto` runs the same recipe)")
    batch_size: int = Field(8, ge=1, description="Rows (prompt + completion) per micro-batch on each process")


class RewardTerm(Section):
    """One reward source with its weight (see docs/rewards.md)."""

    source: str = Field(
        "",
        description="A built-in (toy, exact_number, gsm8k, last_number, regex, length_penalty), module:function, "
        "path/to/file.py:function, or a reward model folder. On the command line the whole section can be one "
        "string: reward=toy, reward='toy + 0.5*mymod:fn' (see docs/rewards.md)",
    )
    weight: float = Field(1.0, description="Weight of this source in the sum")
    timeout: float | None = Field(None, gt=0, description="Seconds per call before on_timeout applies (null: none)")
    on_timeout: Literal["error", "none"] = Field(
        "error", description="A call past its timeout: stop with an error, or give None for its samples"
    )
    args: dict[str, Any] = Field(
        {}, description="Arguments of a built-in, e.g. {pattern: '...'} for regex, {mode: gsm8k}"
    )


def _parse_reward_shorthand(text: str) -> list[dict]:
    """'toy + 0.5*mymod:fn' -> [{source: toy}, {source: mymod:fn, weight: 0.5}]."""
    terms = []
    for part in text.split("+"):
        part = part.strip()
        if not part:
            raise ValueError(f"empty term in reward {text!r}; write e.g. 'toy + 0.5*mymod:fn'")
        weight, star, source = part.partition("*")
        if star:
            try:
                w = float(weight)
            except ValueError:
                raise ValueError(f"bad weight {weight.strip()!r} in reward {text!r}; write WEIGHT*SOURCE") from None
            terms.append({"source": source.strip(), "weight": w})
        else:
            terms.append({"source": part})
    return terms


class RewardSection(Section):
    """Reward sources combined as a weighted sum. On the command line a string is enough:
    `reward=toy`, `reward=mymod:fn`, `reward=runs/rm`, `reward='toy + 0.1*length_penalty'`; in
    YAML also a list of terms: `reward: [{source: toy}, {source: "mymod:fn", weight: 0.5, timeout: 2}]`."""

    terms: list[RewardTerm] = Field([], description="The sources and their weights")
    none_as: float | None = Field(
        None, description="Reward of a sample some source cannot score (returns None); null: leave it None"
    )

    @classmethod
    def _coerce(cls, value: Any) -> Any:
        if isinstance(value, str):
            return {"terms": _parse_reward_shorthand(value)}
        if isinstance(value, (list, tuple)):
            items = []
            for x in value:
                items += _parse_reward_shorthand(x) if isinstance(x, str) else [x]
            return {"terms": items}
        if isinstance(value, dict) and "source" in value:
            return {"terms": [value]}
        return value

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        return cls._coerce(value)


EvalMode = Literal["zero_shot", "few_shot", "cot", "reflect"]

DEFAULT_COT_INSTRUCTION = "Think step by step, then write the final answer on the last line."
DEFAULT_REFLECT_INSTRUCTION = (
    "Check your answer step by step and correct it if needed. Write the final answer on the last line."
)


# ----------------------------------------------------------------------------------------------
# Online RL recipes (REINFORCE, RLOO, GRPO, rejection sampling)
# ----------------------------------------------------------------------------------------------


class VLLMSection(Section):
    """vLLM as the rollout engine (rollout_engine=vllm; see docs/vllm.md)."""

    mode: Literal["colocate", "server"] = Field(
        "colocate", description="colocate: an in-process engine per training process; server: `alignkit vllm-serve`")
    gpu_memory_utilization: float = Field(
        0.3, gt=0, le=1, description="Share of the GPU for vLLM's weights + KV cache (colocate; the rest trains)")
    enable_sleep_mode: bool = Field(False, description="Free vLLM's KV cache while training (GPU, colocate)")
    kv_cache_gb: float = Field(1.0, gt=0, description="KV-cache GiB on CPU (VLLM_CPU_KVCACHE_SPACE)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Engine dtype; auto = the training dtype")
    sync_bucket_mb: float = Field(256.0, gt=0, description="Weight-sync bucket size (MiB): tensors in flight at once")
    max_model_len: int | None = Field(
        None, ge=2, description="Longest prompt + completion the engine holds (default: the model's context)")
    host: str = Field("127.0.0.1", description="Server mode: the vllm-serve host")
    port: int = Field(8765, ge=1, le=65535, description="Server mode: the vllm-serve port")
    timeout: float = Field(300.0, gt=0, description="Server mode: seconds before a request fails (never hangs)")
    sync_dir: str | None = Field(
        None, description="Server mode without NCCL: shared folder the weights go through (default: in output_dir)")


class MultiTurnKeys(Section):
    """Keys of multi-turn episodes (tools or an environment), shared by the online recipes and eval."""

    tools: list[str] | None = Field(None, description="Tools the model may call, as module:function (comma-separated); "
                                    "schemas from type hints + docstrings; makes rollouts multi-turn (docs/agents.md)")
    env: str | None = Field(None, description="Environment class module:Class with reset(row) and step(message) "
                            "(docs/agents.md); makes rollouts multi-turn")
    max_turns: int = Field(4, ge=1, description="Multi-turn: model turns per episode at most")
    tool_timeout: float = Field(5.0, gt=0, description="Multi-turn: seconds a tool call may run")
    tool_parser: str = Field("hermes", description="Tool-call format: hermes (<tool_call>{json}</tool_call>) or a "
                             "regex with named groups name and arguments")

    @field_validator("tools", mode="before")
    @classmethod
    def _split_tools(cls, v):
        return [x.strip() for x in v.split(",") if x.strip()] if isinstance(v, str) else v


class OnlineConfig(TrainConfig, MultiTurnKeys):
    """Keys shared by the online RL recipes: sample from the policy, score, update."""

    lr: float = Field(1e-6, gt=0, description="Peak learning rate (AdamW)")
    max_steps: int = Field(100, description="Rollout steps (generate, score, update); -1 = derive from `epochs`")
    batch_size: int = Field(8, ge=1, description="Prompts per micro-batch on each process (each gives its samples)")
    prompt_column: str = Field("prompt", description="Column holding the prompt (text or messages); e.g. question")
    chat_prompts: bool = Field(True, description="Wrap text prompts as one user message and apply the chat template")
    reward: RewardSection = Field(
        default_factory=lambda: RewardSection(terms=[RewardTerm(source="toy")]),
        description="Reward source(s): a built-in name, a reward model folder, module:function, or a weighted sum "
        "'toy + 0.5*mymod:fn' (see docs/rewards.md)",
    )
    num_generations: int = Field(8, ge=1, description="Samples per prompt (the group size G)")
    max_new_tokens: int = Field(64, ge=1, description="Generation budget per sample")
    temperature: float = Field(1.0, ge=0, description="Sampling temperature (log-probs are taken at this temperature)")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass")
    top_k: int = Field(0, ge=0, description="Top-k sampling (0: off)")
    stop: list[str] = Field(default_factory=list, description="Stop strings (besides eos / end of turn)")
    generation_batch_size: int = Field(64, ge=1, description="Prompts prefilled together by the rollout engine")
    kl_coef: float = Field(0.0, ge=0, description="β of the KL-to-reference term; 0 loads no reference model")
    kl_estimator: Literal["k1", "k2", "k3"] = Field("k3", description="Per-token KL estimator")
    ref_model: str | None = Field(None, description="Reference model (default: the starting policy, or the "
                                  "adapter switched off with an adapter)")
    eval_prompts: int = Field(64, ge=0, description="Held-out prompts scored greedily at each evaluation")
    sample_every: int = Field(10, ge=0, description="Write a few sample completions to samples.jsonl every N steps")
    compute_entropy: bool = Field(True, description="Log the policy's token entropy (costs a little compute)")
    overlong_buffer: int = Field(0, ge=0, description="DAPO overlong shaping: the reward falls linearly by up to "
                                 "`overlong_penalty` over the last N tokens of max_new_tokens (0: off)")
    overlong_penalty: float = Field(1.0, ge=0, description="DAPO overlong shaping: the penalty at and past "
                                    "max_new_tokens (reward units)")
    rollout_engine: Literal["alignkit", "vllm", "auto"] = Field(
        "alignkit", description="Who samples: alignkit's engine, vLLM, or auto (vLLM when installed and a GPU is "
        "present)")
    vllm: VLLMSection = Field(default_factory=VLLMSection, description="vLLM engine settings (rollout_engine=vllm)")
    @model_validator(mode="after")
    def _engine_keys(self):
        # keys set to a non-default value (a dumped config.yaml read back holds every key)
        changed = sorted(k for k in self.vllm.model_fields_set
                         if getattr(self.vllm, k) != type(self.vllm).model_fields[k].default)
        if self.rollout_engine == "alignkit" and changed:
            keys = ", ".join(f"vllm.{k}" for k in changed)
            raise UserError(f"{keys} given with rollout_engine=alignkit; set rollout_engine=vllm (or auto), or drop "
                            "the vllm.* keys")
        return self

    # Recipes whose update is a policy gradient need samples drawn from the policy (temperature > 0).
    _policy_gradient: typing.ClassVar[bool] = True

    @model_validator(mode="after")
    def _sampling_is_not_degenerate(self):
        if self.temperature == 0 and self.num_generations > 1:
            raise ValueError(f"temperature=0 (greedy) makes all {self.num_generations} samples of a prompt the "
                             "same, so there is nothing to compare; set temperature > 0 (e.g. 1.0)")
        if self.temperature == 0 and self._policy_gradient:
            raise ValueError("temperature=0 (greedy) samples are not draws from the policy, so the policy gradient "
                             "is wrong; set temperature > 0 (e.g. 1.0)")
        if self.overlong_buffer > self.max_new_tokens:
            raise ValueError(f"overlong_buffer={self.overlong_buffer} is longer than max_new_tokens="
                             f"{self.max_new_tokens}; the buffer is the last part of the budget, so lower it")
        return self


class VLLMServeConfig(Section):
    """`alignkit vllm-serve`: one vLLM engine behind an HTTP interface for vllm.mode=server runs."""

    model: str = Field("", description="The model to serve: a local folder or a hub id (the policy's start)")
    host: str = Field("127.0.0.1", description="Address to listen on")
    port: int = Field(8765, ge=1, le=65535, description="Port to listen on")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="Engine dtype")
    max_model_len: int | None = Field(None, ge=2, description="Longest prompt + completion (default: the model's)")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="Share of the GPU for weights + KV cache")
    kv_cache_gb: float = Field(1.0, gt=0, description="KV-cache GiB on CPU")
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs the served model is split over")
    seed: int = Field(0, description="Engine seed")
    ready_file: str | None = Field(None, description="Write the server's address to this file once it listens")


def _check_objective(cfg):
    """CISPO's weight is already bounded above, so a dual clip on it is refused (docs/objectives.md)."""
    if cfg.loss_type == "cispo" and cfg.dual_clip is not None:
        raise ValueError("loss_type=cispo caps the importance weight already, so dual_clip does not apply; "
                         "remove dual_clip (or use loss_type=clip)")
    return cfg


class RolloutCorrectionKeys(Section):
    """Sampler-vs-trainer mismatch correction of the policy-gradient recipes (grpo, ppo, rloo,
    reinforce; docs/vllm.md): the ratio is π_trainer / π_sampler of each sampled token."""

    rollout_correction: Literal["none", "tis", "mis"] = Field(
        "none", description="Sampler-vs-trainer correction (docs/vllm.md): tis = loss x min(ratio, cap); "
        "mis = drop tokens whose ratio leaves [1/cap, cap]")
    rollout_correction_cap: float = Field(2.0, gt=1, description="C of rollout_correction")


class PolicyRatioKeys(Section):
    """The importance-ratio keys of recipes that update several times per rollout (GRPO with
    iterations > 1, PPO): GSPO's sequence ratio, CISPO, dual clip."""

    ratio_level: Literal["token", "sequence"] = Field(
        "token", description="Importance ratio per token (PPO) or per sequence, the geometric mean of its token "
        "ratios (GSPO, docs/objectives.md)")
    loss_type: Literal["clip", "cispo"] = Field(
        "clip", description="clip: PPO's clipped surrogate; cispo: the clipped, detached importance weight times "
        "log π, every token keeps its gradient (CISPO, docs/objectives.md)")
    dual_clip: float | None = Field(None, gt=1, description="Dual-clip bound c > 1 for negative advantages "
                                    "(loss ≤ −c·A; verl's clip_ratio_c); null: off")

    @model_validator(mode="after")
    def _objective(self):
        return _check_objective(self)


def _refuse_ratio_keys(cfg):
    """REINFORCE and RLOO make one update per rollout (π_old = π): every ratio is 1, and the ratio
    options would silently change nothing, so they are refused."""
    for key, default in (("ratio_level", "token"), ("loss_type", "clip"), ("dual_clip", None)):
        if getattr(cfg, key) != default:
            raise ValueError(f"{key}={getattr(cfg, key)} changes nothing here: this recipe makes one update per "
                             "rollout, so every importance ratio is 1; use `alignkit grpo iterations=2` (or ppo) "
                             f"with {key}")
    return cfg


class GRPOConfig(OnlineConfig, PolicyRatioKeys, RolloutCorrectionKeys):
    """GRPO: G samples per prompt, group-normalised advantages, clipped ratio, KL in the loss."""

    output_dir: str = Field("runs/grpo", description="Run folder")
    num_generations: int = Field(
        8, ge=2, description="Samples per prompt, the group size G (>= 2: with one sample every group-normalised "
        "advantage is 0)")
    scale: Literal["group", "batch", "none"] = Field(
        "group", description="Advantage scale: group std (GRPO), batch std, or none (Dr. GRPO)"
    )
    clip_low: float = Field(0.2, ge=0, description="Ratio clip below: 1 - clip_low")
    clip_high: float = Field(0.2, ge=0, description="Ratio clip above: 1 + clip_high (clip-higher when > clip_low)")
    iterations: int = Field(1, ge=1, description="Updates (μ) per rollout batch, old log-probs held fixed")
    aggregation: Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"] = Field(
        "token_mean", description="Loss aggregation: token_mean (DAPO), seq_mean_token_mean (GRPO), "
        "seq_mean_token_sum_norm (Dr. GRPO, divides by max_new_tokens)"
    )
    truncated: Literal["keep", "mask", "penalty"] = Field(
        "keep", description="Samples cut at max_new_tokens without eos: keep, mask out of the loss, or give "
        "`truncated_reward`"
    )
    truncated_reward: float = Field(0.0, description="Reward of a truncated sample when truncated=penalty")
    dynamic_sampling: bool = Field(
        False, description="Drop groups whose rewards are all equal (no signal) and refill with new prompts"
    )
    max_refill_rounds: int = Field(3, ge=0, description="Dynamic sampling: extra generation rounds per step at most")


class _OneUpdateOnline(OnlineConfig, RolloutCorrectionKeys):
    """Online recipes that make one update per rollout (RLOO, REINFORCE): every importance ratio
    is 1, so the ratio-shaping keys are accepted only at their defaults, to refuse a setting
    that would silently do nothing."""

    ratio_level: Literal["token", "sequence"] = Field(
        "token", description="Only `token`: one update per rollout makes every ratio 1 (use grpo iterations>1 "
        "for GSPO)")
    loss_type: Literal["clip", "cispo"] = Field(
        "clip", description="Only `clip`: one update per rollout makes every ratio 1 (use grpo iterations>1 for "
        "CISPO)")
    dual_clip: float | None = Field(None, gt=1, description="Only null: one update per rollout makes every ratio "
                                    "1, so the bound never binds (use grpo iterations>1)")

    @model_validator(mode="after")
    def _objective(self):
        return _refuse_ratio_keys(self)


class RLOOConfig(_OneUpdateOnline):
    """RLOO: k samples per prompt, REINFORCE with the leave-one-out mean of the others as baseline."""

    output_dir: str = Field("runs/rloo", description="Run folder")
    num_generations: int = Field(4, ge=2, description="Samples per prompt (k >= 2)")
    kl_in_reward: bool = Field(True, description="Subtract β·(sequence k1 KL) from the reward (else KL in the loss)")


class ReinforceConfig(_OneUpdateOnline):
    """REINFORCE with a moving-average baseline (the seed report's Algorithm 1)."""

    output_dir: str = Field("runs/reinforce", description="Run folder")
    num_generations: int = Field(1, ge=1, description="Samples per prompt")
    baseline_alpha: float = Field(0.9, ge=0, le=1, description="α of the baseline b ← αb + (1−α)·mean(r)")
    batch_size: int = Field(16, ge=1, description="Prompts per micro-batch on each process")


class RSConfig(OnlineConfig):
    """Rejection sampling (best-of-N): sample N per prompt, keep the best, SFT on the kept answers."""

    output_dir: str = Field("runs/rs", description="Run folder")
    num_generations: int = Field(8, ge=1, description="Samples per prompt (N)")
    _policy_gradient: typing.ClassVar[bool] = False
    rounds: int = Field(2, ge=1, description="Generate-then-SFT rounds")
    prompts_per_round: int = Field(256, ge=1, description="Prompts sampled in each round")
    threshold: float | None = Field(None, description="Keep the best sample only if its reward is at least this")
    sft_steps: int = Field(50, ge=1, description="SFT optimizer steps per round")
    max_steps: int = Field(-1, description="Unused by rs: the length is rounds x sft_steps")
    kl_coef: float = Field(0.0, ge=0, description="Weight of a KL(π‖π_start) term on the kept answers in the SFT loss")
    output: str | None = Field(None, description="rs generate: where to write the best-of-N rows (JSONL)")


class DistillConfig(OnlineConfig):
    """On-policy distillation (docs/distill.md): the student samples answers, the teacher scores
    every sampled token, and the student moves towards the teacher token by token."""

    output_dir: str = Field("runs/distill", description="Run folder")
    teacher: str = Field("", description="The teacher: a hub id or local folder sharing the student's tokenizer")
    loss: Literal["reverse_kl", "jsd"] = Field(
        "reverse_kl", description="reverse_kl: per-token KL(student ‖ teacher) on the student's samples (sampled-"
        "token estimator); jsd: generalized Jensen–Shannon over the full vocabulary (GKD), computed in chunks")
    beta: float = Field(0.5, ge=0, le=1, description="loss=jsd: β of JSD_β (0: forward KL(teacher ‖ student), "
                        "1: reverse KL(student ‖ teacher))")
    lmbda: float = Field(1.0, ge=0, le=1, description="Share of rollout steps trained on the student's own samples; "
                         "the others train on the data's answers (`completion_column`); 1: fully on-policy")
    completion_column: str = Field("completion", description="Column holding a dataset answer (text), used when "
                                   "lmbda < 1")
    num_generations: int = Field(1, ge=1, description="Samples per prompt on on-policy steps")
    reward: RewardSection | None = Field(
        None, description="Optional reward source(s), only to log reward_mean and score eval_data (distillation "
        "itself trains on no reward); null: none")
    kl_coef: float = Field(0.0, ge=0, description="Unused by distill: the teacher is the target, not a tie")

    @model_validator(mode="after")
    def _distill_keys(self):
        if self.overlong_buffer:
            raise ValueError("overlong_buffer shapes a reward, and distill trains on none; remove overlong_buffer")
        return self


# ----------------------------------------------------------------------------------------------
# Rewards and evaluation
# ----------------------------------------------------------------------------------------------



class EvalConfig(MultiTurnKeys):
    """Evaluate a model on a prompt set: reward, KL to a reference, accuracy and format rate, win rate,
    perplexity, sample diversity, under one or several prompting modes (see docs/eval.md)."""

    model: str = Field("", description="The policy to evaluate: a hub id or a local folder")
    ref_model: str | None = Field(
        None, description="Reference model for KL(policy‖reference) and the win rate (null: neither is computed)"
    )
    prompts: str | None = Field(
        None, description="Prompt set: a file or hub dataset with a prompt column (text or messages) and reference "
        "columns such as total or answer"
    )
    split: str = Field("test", description="Split to read when `prompts` is a hub dataset")
    prompt_column: str = Field("prompt", description="Column holding the prompt, e.g. question for GSM8K")
    chat_prompts: bool = Field(True, description="Text prompts become one user message (chat template); "
                                                 "false: text is given to the model as is")
    max_prompts: int = Field(-1, description="Evaluate the first N prompts only (-1: all)")
    trust_remote_code: bool = Field(
        False, description="Run Python code shipped in a model folder or hub repo (custom architectures)")
    reward: RewardSection | None = Field(None, description="Reward source(s) scoring the samples")
    judge: RewardSection | None = Field(None, description="Source judging the win rate (default: `reward`)")
    task: Literal["auto", "toy", "gsm8k", "last_number", "none"] = Field(
        "auto", description="Verifiable task for accuracy and format rate: toy (`Итого: X рублей.` vs column total), "
        "gsm8k (`#### X` vs column answer), last_number; auto: toy with a total column, gsm8k with an answer column "
        "holding `####`, else none"
    )
    mode: EvalMode = Field("zero_shot", description="Prompting mode: zero_shot | few_shot | cot | reflect")
    modes: list[EvalMode] | None = Field(None, description="Several modes, one result row each (overrides `mode`)")
    few_shot_pool: str | None = Field(None, description="File of worked examples for few_shot (prompt + completion "
                                                        "or answer columns, or messages)")
    few_shot_k: int = Field(3, ge=1, description="Examples per prompt in few_shot mode")
    few_shot_layout: Literal["chat", "plain"] = Field(
        "chat", description="chat: examples as alternating user/assistant turns; plain: one text block"
    )
    cot_instruction: str = Field(DEFAULT_COT_INSTRUCTION, description="Appended to the prompt in cot mode")
    reflect_instruction: str = Field(DEFAULT_REFLECT_INSTRUCTION,
                                     description="The second user turn in reflect mode")
    n_samples: int = Field(1, ge=1, description="Samples per prompt")
    temperature: float = Field(1.0, ge=0, description="Sampling temperature (0: greedy; KL needs > 0)")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass")
    max_new_tokens: int = Field(128, ge=1, description="Generation budget per answer (per turn in reflect mode)")
    batch_size: int = Field(16, ge=1, description="Prompts per generation batch; also sequences per log-prob batch")
    ppl_data: str | None = Field(None, description="Text / SFT file for perplexity on its answer tokens")
    ppl_split: str = Field("test", description="Split to read when `ppl_data` is a hub dataset")
    max_length: int = Field(1024, ge=2, description="Longest tokenized row of ppl_data (longer rows are cut)")
    output_dir: str = Field("runs/eval", description="Folder for eval.json")
    num_show: int = Field(3, ge=-1, description="Sample completions per mode printed and kept in eval.json (-1: all)")
    seed: int = Field(0, description="Seed of sampling and of the few-shot draws")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Model weights dtype: auto = bfloat16 on a GPU that supports it, float32 elsewhere"
    )
    logits_chunk_size: int = Field(1024, ge=1, description="Tokens per chunk when computing log-probs")
    chat_template: str | None = Field(None, description="Jinja chat template (text or path) overriding the "
                                                        "tokenizer's")
    _template_compiles = field_validator("chat_template")(classmethod(lambda cls, v: check_chat_template(v)))

    @field_validator("max_prompts")
    @classmethod
    def _some_prompts(cls, v: int) -> int:
        if v != -1 and v < 1:
            raise ValueError("max_prompts must be at least 1, or -1 for every prompt")
        return v

    @model_validator(mode="after")
    def _samples_can_differ(self):
        if self.temperature == 0 and self.n_samples > 1:
            raise ValueError(f"temperature=0 (greedy) makes all {self.n_samples} samples of a prompt the same; set "
                             "temperature > 0, or n_samples=1")
        return self


class RMConfig(TrainConfig):
    """Reward model from preference pairs (prompt/chosen/rejected, or implicit prompt): a linear head on
    the last real token, trained as a scalar Bradley-Terry model or as a distribution over K scores."""

    output_dir: str = Field("runs/rm", description="Run folder: final model, checkpoints, metrics.jsonl, plots")
    batch_size: int = Field(8, ge=1, description="Pairs per micro-batch on each process (2 x batch_size sequences "
                            "in one forward pass)")
    lr: float = Field(1e-5, gt=0, description="Peak learning rate (AdamW)")
    kind: Literal["scalar", "distributional"] = Field(
        "scalar", description="scalar: one reward, loss -log sigmoid(r_w - r_l - margin); distributional: "
        "p(score = 1..num_scores), loss -log P(score_w > score_l)"
    )
    num_scores: int = Field(10, ge=2, description="Distributional: number of score classes K")
    reward_stat: Literal["mean", "median", "mode", "mean_minus_std"] = Field(
        "mean", description="Distributional: the statistic of the score distribution handed out as the reward "
        "(mean = expected score in [1, K])"
    )
    center_coef: float = Field(
        0.0, ge=0, description="Scalar: reward-centering term center_coef * (r_w + r_l)^2 per pair (0: off)"
    )
    calibrate: bool = Field(
        True, description="Distributional: fit a temperature on the held-out pairs at each evaluation and store it "
        "with the model"
    )
    eval_fraction: float = Field(
        0.05, ge=0, lt=1, description="Without eval_data: hold out this fraction of the pairs (seeded) for the "
        "held-out metrics; 0 = no evaluation"
    )
    max_prompt_length: int | None = Field(
        None, ge=1, description="When a pair exceeds max_length: keep at most this many prompt tokens (its end) "
        "before cutting the responses (default max_length // 2)"
    )
    share_prompt: bool = Field(
        True, description="One row per pair, [prompt | chosen | rejected], with an attention mask that lets each "
        "response see the prompt and itself only: the prompt is computed once, with the same rewards and gradients "
        "as two full sequences. false: the 2 x batch_size full sequences (also used where the model's attention "
        "cannot take such a mask)"
    )


# ----------------------------------------------------------------------------------------------
# Online RL, part 2: PPO with a critic, online DPO
# ----------------------------------------------------------------------------------------------


class PPOConfig(OnlineConfig, PolicyRatioKeys, RolloutCorrectionKeys):
    """PPO with a critic (docs/ppo.md): per-token reward −β·KL plus the score on the last token, GAE,
    clipped surrogate and clipped value loss, several epochs of minibatches over each rollout batch."""

    output_dir: str = Field("runs/ppo", description="Run folder")
    num_generations: int = Field(1, ge=1, description="Samples per prompt (PPO needs no groups; more is allowed)")
    kl_coef: float = Field(0.05, ge=0, description="β of the per-token KL penalty in the reward (the starting value "
                           "with kl_control=adaptive); 0 loads no reference model")
    kl_estimator: Literal["k1", "k2", "k3"] = Field(
        "k1", description="Per-token KL estimator in the reward penalty (k1 = log π_old − log π_ref, as Ziegler et al.)"
    )
    kl_control: Literal["fixed", "adaptive"] = Field(
        "fixed", description="fixed β, or adaptive: β ← β·(1 + clip((KL − kl_target)/kl_target, ±0.2)·n/kl_horizon) "
        "after each rollout step (KL = mean over samples of the summed per-token KL, n = samples in the step)"
    )
    kl_target: float = Field(6.0, gt=0, description="Adaptive β: target KL per response (nats, summed over tokens)")
    kl_horizon: float = Field(10000.0, gt=0, description="Adaptive β: horizon, in samples")
    critic: Literal["separate", "shared_base"] = Field(
        "separate", description="separate: a value model of its own (a full copy, trained in full); shared_base: a "
        "second LoRA adapter + value head on the policy's frozen base (needs peft.method=lora|dora|qlora)"
    )
    critic_init: str = Field(
        "auto", description="Critic backbone: policy (the starting policy), reward (the reward model given as "
        "reward=FOLDER, its scalar head too), a model folder PATH, or auto (reward when the reward source is a "
        "reward-model folder, else policy). shared_base always starts from the policy's base"
    )
    critic_lr: float = Field(1e-5, gt=0, description="Peak learning rate of the critic (its own AdamW, same schedule)")
    gamma: float = Field(1.0, ge=0, le=1, description="GAE discount γ")
    lam: float = Field(0.95, ge=0, le=1, description="GAE λ")
    ppo_epochs: int = Field(4, ge=1, description="Passes over each rollout batch")
    num_minibatches: int = Field(1, ge=1, description="Minibatches (= optimizer steps) per pass; the rollout step "
                                 "takes batch_size x grad_accum x num_minibatches prompts per process")
    clip_low: float = Field(0.2, ge=0, description="Ratio clip below: 1 − clip_low")
    clip_high: float = Field(0.2, ge=0, description="Ratio clip above: 1 + clip_high")
    value_clip: float | None = Field(0.2, ge=0, description="Value clip ε: V is kept within V_old ± ε in the clipped "
                                     "value loss; null: plain squared error")
    whiten_advantages: bool = Field(True, description="Standardise advantages over the rollout batch (all processes)")
    whiten_rewards: bool = Field(False, description="Scale the per-token rewards to unit variance over the rollout "
                                 "batch, mean kept (as lm-human-preferences' option)")
    reward_norm: Literal["none", "batch", "running"] = Field(
        "none", description="Normalise the reward source's score: batch (mean 0, std 1 over the rollout batch) or "
        "running (mean and std of every score seen so far, saved in checkpoints)"
    )
    reward_clip: float | None = Field(None, gt=0, description="Clip the (normalised) score to [−c, c]; null: off")
    missing_eos_penalty: float = Field(
        0.0, ge=0, description="Subtracted from the score of a response cut at max_new_tokens without eos/stop"
    )
    save_critic: bool = Field(True, description="Write the trained critic to output_dir/critic at the end")


class OnlineDPOConfig(OnlineConfig):
    """Online DPO (docs/online-dpo.md): sample answers from the current policy, rank them with the reward
    source, apply the DPO loss to best vs worst; the reference is the starting policy."""

    output_dir: str = Field("runs/online_dpo", description="Run folder")
    num_generations: int = Field(2, ge=2, description="Samples per prompt; the best and the worst form the pair")
    _policy_gradient: typing.ClassVar[bool] = False
    loss: Literal["sigmoid", "ipo", "hinge", "robust", "simpo"] = Field(
        "sigmoid", description="DPO variant (see `alignkit dpo --help`); simpo needs no reference model"
    )
    beta: float = Field(0.1, gt=0, description="β of the DPO loss (IPO: τ; SimPO: reward scale)")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="Assumed preference-flip rate (sigmoid, robust, "
                                   "simpo)")
    simpo_gamma: float = Field(0.5, description="SimPO target reward margin (loss=simpo only)")
    sft_weight: float = Field(
        0.0, ge=0, description="Weight of an NLL term on the chosen answer: per pair its token-mean NLL, averaged "
        "over pairs like the preference loss (iterative RPO)"
    )
    min_score_gap: float = Field(
        0.0, ge=0, description="Skip a prompt when its best − worst score gap is at most this (0: only exact ties "
        "are skipped); e.g. 0.5 with the toy reward keeps only right-vs-wrong-total pairs"
    )
    missing_eos_penalty: float = Field(
        0.0, ge=0, description="Subtracted from the score of a response cut at max_new_tokens without eos/stop, "
        "before ranking"
    )
    kl_coef: float = Field(0.0, ge=0, description="Unused by online-dpo: β ties the policy to the reference")
