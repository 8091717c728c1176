"""Load and save Hugging Face models and tokenizers: hub ids and local folders share one path."""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path

import torch

from alignkit.errors import UserError
from alignkit.models.arch import quiet_peft

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Remote code: Python files a model folder or hub repo ships (config.json `auto_map`). Off unless a
# run's config says `trust_remote_code: true`; every transformers loader gets the flag explicitly,
# so transformers never falls back to its interactive "[y/N]" prompt (a `y` on stdin ran the code).
_TRUST_REMOTE_CODE = False

# Files any transformers tokenizer is saved with (one of them at least).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                    "spiece.model", "sentencepiece.bpe.model")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@contextlib.contextmanager
def allow_remote_code(enabled: bool):
    """Within the block, loaders default to `trust_remote_code=enabled` (the CLI wraps each run
    in it with the config's `trust_remote_code`)."""
    global _TRUST_REMOTE_CODE
    old, _TRUST_REMOTE_CODE = _TRUST_REMOTE_CODE, bool(enabled)
    try:
        yield
    finally:
        _TRUST_REMOTE_CODE = old


def hf_load_kwargs(name_or_path: str | os.PathLike, trust_remote_code: bool | None = None,
                   weights: bool = False) -> dict:
    """Keyword arguments for every transformers `from_pretrained`: `trust_remote_code` always
    given (False unless opted in), and with `weights`, `use_safetensors=True` when a local
    folder holds .safetensors files (never unpickle a .bin beside them)."""
    kw: dict = {"trust_remote_code": _TRUST_REMOTE_CODE if trust_remote_code is None else bool(trust_remote_code)}
    if weights:
        p = Path(os.path.expanduser(str(name_or_path)))
        if p.is_dir() and any(p.glob("*.safetensors")):
            kw["use_safetensors"] = True
    return kw


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Can this machine open a connection to the hub endpoint? (a few seconds at most, instead of
    the minute of retries a download attempt spends before failing)"""
    import socket
    import threading
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    ok: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout):
                ok.append(True)
        except OSError:
            pass

    # A thread bounds the name lookup too, which the socket timeout does not cover.
    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout + 0.5)
    return bool(ok)


def _in_hub_cache(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:
        return False


def check_source(name_or_path: str, what: str = "model", key: str = "model") -> None:
    """Fail early, in one line, when `name_or_path` cannot be a model: empty; a local path that
    does not exist (not a hub-id error); a folder without config.json or that cannot be read; a
    hub id while offline (HF_HUB_OFFLINE set, or no connection) that is not in the local cache."""
    if not name_or_path:
        raise UserError(f"no {what} given; pass {key}=HUB_ID or {key}=PATH")
    raw = str(name_or_path)
    p = Path(os.path.expanduser(raw))
    if p.exists():
        if not p.is_dir():
            raise UserError(f"{raw}: {what} is a file, not a model folder; point {key}= at the folder holding "
                            f"config.json")
        if not os.access(p, os.R_OK | os.X_OK):
            raise UserError(f"{raw}: cannot read the {what} folder (permission denied); fix its permissions")
        if (p / "adapter_config.json").is_file() and not (p / "config.json").is_file():
            return
        cfg = p / "config.json"
        if not cfg.is_file():
            raise UserError(f"{raw}: not a model folder (no config.json); point {key}= at a saved model")
        try:
            json.loads(cfg.read_text(encoding="utf-8"))
        except PermissionError:
            raise UserError(f"{raw}/config.json: cannot be read (permission denied); fix its permissions") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UserError(f"{raw}/config.json: not valid JSON ({_first_line(e)}); the folder is damaged, save the "
                            f"model again") from None
        except OSError as e:
            raise UserError(f"{raw}/config.json: cannot be read ({_first_line(e)})") from None
        return
    looks_like_path = (raw.startswith((".", "/", "~")) or raw.endswith(("/", os.sep)) or raw.count("/") > 1
                       or os.sep != "/" and os.sep in raw or not _HUB_ID.match(raw))
    if looks_like_path:
        raise UserError(f"{raw}: {what} folder does not exist; check the path (or give a hub id like owner/name)")
    if _in_hub_cache(raw):
        return
    if _offline():
        raise UserError(f"{raw}: no such local folder, and HF_HUB_OFFLINE is set so the hub is not asked; pass "
                        f"{key}=PATH of a saved model folder, or unset HF_HUB_OFFLINE to download '{raw}'")
    if not _hub_reachable():
        raise UserError(f"{raw}: no such local folder, and the hub cannot be reached (no network); pass {key}=PATH "
                        f"of a saved model folder, or download '{raw}' on a connected machine first")


_check_source = check_source  # older name, kept for callers


def _refuse_remote_code(name_or_path: str, trust_remote_code: bool | None) -> None:
    """Without trust, a local folder whose config maps to its own code (auto_map) for a model
    type transformers does not know is refused before transformers is asked at all."""
    if (_TRUST_REMOTE_CODE if trust_remote_code is None else trust_remote_code):
        return
    p = Path(os.path.expanduser(name_or_path))
    try:
        cfg = json.loads((p / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    if not isinstance(cfg, dict) or not cfg.get("auto_map"):
        return
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    if cfg.get("model_type") not in CONFIG_MAPPING_NAMES:
        raise _remote_code_error(name_or_path, ValueError("custom code"))


def _remote_code_error(name_or_path: str, e: Exception) -> UserError | None:
    msg = str(e)
    if "trust_remote_code" in msg or "custom code" in msg:
        return UserError(f"{name_or_path}: this model ships its own Python code (config.json auto_map), which "
                         f"alignkit does not run unless asked; read that code, then set trust_remote_code=true")
    return None


def load_tokenizer(name_or_path: str, trust_remote_code: bool | None = None):
    """The tokenizer of a hub id or local folder, with a pad token set (eos, else unk, when it has
    none: padding is always masked, so any id serves).

    Raises UserError (one line) for a missing folder, a folder without tokenizer files, custom
    tokenizer code without `trust_remote_code`, or any other load failure."""
    from transformers import AutoTokenizer

    check_source(name_or_path)
    _refuse_remote_code(name_or_path, trust_remote_code)
    path = os.path.expanduser(name_or_path)
    if Path(path).is_dir() and not any((Path(path) / f).is_file() for f in _TOKENIZER_FILES):
        raise UserError(f"{name_or_path}: the folder has no tokenizer (none of tokenizer.json, tokenizer_config.json, "
                        f"tokenizer.model); save the tokenizer with the model (tokenizer.save_pretrained(folder))")
    try:
        tok = AutoTokenizer.from_pretrained(path, **hf_load_kwargs(path, trust_remote_code))
    except Exception as e:
        raise (_remote_code_error(name_or_path, e)
               or UserError(f"{name_or_path}: could not load a tokenizer ({_first_line(e)})")) from None
    if tok.pad_token_id is None:
        # Padding is masked everywhere, so any id serves; eos is the usual choice.
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    return tok


def load_model(name_or_path: str, dtype: str = "float32", device: str | torch.device = "cpu",
               trust_remote_code: bool | None = None, **kwargs):
    """A causal LM in `dtype` ("float32", "bfloat16", "float16"; anything else is float32) on
    `device`, from a hub id or a local folder through the same path. An adapter folder
    (adapter_config.json) is loaded onto its recorded base as a peft model. Safetensors weights
    are used where the folder has them; custom model code only with `trust_remote_code`.
    `kwargs` go to `from_pretrained` (e.g. quantization_config). Raises UserError, one line, when
    nothing is named, the folder holds no model, its code is not trusted, or transformers / peft
    cannot load it."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress display owns the terminal
    check_source(name_or_path)
    _refuse_remote_code(name_or_path, trust_remote_code)
    path = os.path.expanduser(name_or_path)
    torch_dtype = DTYPES.get(dtype, torch.float32)
    adapter = (Path(path) / "adapter_config.json").is_file()
    # use_safetensors only for a plain model folder: an adapter's base lives elsewhere
    kw = {**hf_load_kwargs(path, trust_remote_code, weights=not adapter), **kwargs}
    try:
        if adapter:
            from peft import AutoPeftModelForCausalLM

            with quiet_peft():
                model = AutoPeftModelForCausalLM.from_pretrained(path, dtype=torch_dtype, **kw)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, **kw)
    except UserError:
        raise
    except Exception as e:
        raise (_remote_code_error(name_or_path, e)
               or UserError(f"{name_or_path}: could not load a causal language model ({_first_line(e)})")) from None
    return model.to(device)


def save_pretrained(model, tokenizer, out_dir: str | Path, state_dict: dict | None = None) -> None:
    """Save in Hugging Face format (safetensors) so plain transformers loads it. `state_dict`:
    the full weights when the model itself holds shards (FSDP). A peft model with several
    adapters saves its "default" (trained) adapter only."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # no "Writing model shards" bar inside our own progress display
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = getattr(model, "module", model)  # unwrap DDP
    kw = {"state_dict": state_dict} if state_dict is not None else {}
    adapters = getattr(model, "peft_config", None)
    if isinstance(adapters, dict) and len(adapters) > 1:
        # A model carrying other adapters beside the trained one (PPO's shared-base critic adapter,
        # which travels in the trainer state and output_dir/critic): the folder holds the
        # policy's adapter only, as a single-adapter folder plain peft loads.
        kw["selected_adapters"] = ["default"] if "default" in adapters else [model.active_adapter]
    model.save_pretrained(out_dir, safe_serialization=True, **kw)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
        from alignkit.models.generation import write_generation_config

        write_generation_config(out_dir, tokenizer, model)  # stop at the end of a turn, not only at eos


def _first_line(e: Exception) -> str:
    s = str(e).strip()
    return (s.splitlines()[0] if s else type(e).__name__)[:300]
