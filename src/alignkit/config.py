"""Typed run configuration: one pydantic class per recipe, a description per field.

A run is configured from an optional YAML file plus ``key=value`` overrides (dotted keys for
nested sections). Unknown keys are rejected with the nearest valid key suggested; values are
validated and coerced by pydantic, and every problem is reported as one line (``UserError``).
"""

from __future__ import annotations

import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from alignkit.errors import UserError


class Section(BaseModel):
    """Base of every config block: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class TrainConfig(Section):
    """Keys shared by every training recipe."""

    model: str = Field("", description="Base model: a Hugging Face hub id or a local folder")
    data: str = Field("", description="Training data: a .jsonl/.json/.parquet/.csv file or a hub dataset name")
    data_split: str = Field("train", description="Split to read when `data` is a hub dataset")
    eval_data: str | None = Field(None, description="Held-out data in the same format as `data` (optional)")
    eval_split: str = Field("test", description="Split to read when `eval_data` is a hub dataset")
    output_dir: str = Field("runs/run", description="Run folder: final model, checkpoints, metrics.jsonl, plots")
    max_steps: int = Field(-1, description="Optimizer steps to run; -1 = derive from `epochs`")
    epochs: float = Field(1.0, description="Passes over the data when max_steps is -1")
    batch_size: int = Field(8, ge=1, description="Rows per micro-batch on each process")
    grad_accum: int = Field(1, ge=1, description="Micro-batches accumulated per optimizer step")
    lr: float = Field(2e-5, gt=0, description="Peak learning rate (AdamW)")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    adam_betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas")
    warmup_steps: int = Field(0, ge=0, description="Linear warmup steps from 0 to `lr`")
    schedule: Literal["cosine", "linear", "constant"] = Field("cosine", description="LR decay after warmup")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="Final LR as a fraction of `lr` (cosine/linear)")
    max_grad_norm: float | None = Field(1.0, description="Clip the global gradient norm; null disables")
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
    logits_chunk_size: int = Field(
        1024, ge=1, description="Tokens per chunk when computing log-probs without materialising full logits"
    )
    tensorboard: bool = Field(True, description="Also write TensorBoard events when tensorboard is installed")
    progress: bool = Field(True, description="Show a progress bar")
    chat_template: str | None = Field(
        None, description="Jinja chat template (text or path) used when the tokenizer has none, or to override it"
    )
    overwrite: bool = Field(False, description="Allow writing into a non-empty output_dir without resume")


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
    try:
        val = yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw
    # YAML 1.1 reads '2e-5' as a string; pydantic coerces numeric strings itself.
    return val


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
        if dotted not in valid:
            near = suggest(dotted, valid)
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
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
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
        loc = ".".join(str(x) for x in err["loc"] if not isinstance(x, int)) or "config"
        where = path or source
        raise UserError(f"{where}: bad value for '{loc}': {err['msg']} (got {err.get('input')!r})") from None


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
        default = f.default
        rows.append((prefix + name, _type_name(f.annotation), repr(default), f.description or ""))
    return rows


def dump_config(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
