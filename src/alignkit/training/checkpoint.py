"""Run folders and checkpoints.

A checkpoint is a folder `checkpoints/step-NNNNNNN` holding the HF model (or adapter) and
tokenizer, `config.yaml`, and the training state: optimizer, LR schedule, loss scaler, recipe
state (`Trainer.register_state`), one RNG file per process and a health record. It is written
to a staging folder and renamed into place, so a killed run never leaves half a checkpoint.

No pickle, anywhere on the resume path: a checkpoint folder may come from someone else, and
unpickling runs whatever code the file names. State is stored as a JSON tree (scalars,
structure) plus one safetensors file (every tensor / numpy array of the tree, bit for bit);
sharded FSDP checkpoints are read with a reader that only rebuilds torch's own metadata classes
and loads byte items with `torch.load(weights_only=True)`.

The run folder holds an advisory lock (`.alignkit.lock`, the owner's PID inside) while a run
uses it, so two runs never write into one folder.
"""

from __future__ import annotations

import errno
import io
import json
import math
import os
import pickle
import random
import re
import shutil
import socket
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from alignkit.errors import UserError
# The atomic folder writes live one layer down (models/ saves folders too); re-exported here.
from alignkit.io import atomic_dir_write, commit_dir  # noqa: F401

STATE_FILE = "trainer_state.json"  # marks a complete checkpoint; tensors in STATE_TENSORS
STATE_TENSORS = "trainer_state.safetensors"
LEGACY_STATE_FILE = "trainer_state.pt"  # pickle, written before the safe format; refused on resume
LOCK_FILE = ".alignkit.lock"
DIVERGED_FILE = "diverged.json"
FORMAT = 2
_STEP_RE = re.compile(r"^step-(\d+)$")


class UnsafeCheckpoint(UserError):
    """A checkpoint that could only be read by unpickling (running code named in the file)."""


# ---------------------------------------------------------------------------------------------
# State trees: JSON structure + safetensors tensors
# ---------------------------------------------------------------------------------------------


def _encode(obj: Any, tensors: dict[str, torch.Tensor], seen: dict[int, str], where: str) -> Any:
    """Replace every tensor / ndarray in `obj` by a reference into `tensors`; keep tuples, int
    dict keys and numpy scalars recognisable so that `_decode` rebuilds `obj` exactly."""
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int) and not isinstance(obj, bool):
        return obj
    if isinstance(obj, float):
        return obj  # json writes repr(): the exact double; inf/nan as Infinity/NaN
    if isinstance(obj, torch.Tensor):
        if type(obj) is not torch.Tensor and not isinstance(obj, torch.nn.Parameter):
            raise TypeError(f"checkpoint state {where}: cannot store a {type(obj).__name__} (a sharded tensor?)")
        key = seen.get(id(obj))  # a tensor met twice is stored once (safetensors refuses shared memory)
        if key is None:
            key = seen[id(obj)] = f"t{len(tensors)}"
            tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        key = f"t{len(tensors)}"
        tensors[key] = torch.from_numpy(np.ascontiguousarray(obj)).clone()
        return {"__ndarray__": key}
    if isinstance(obj, np.generic):
        return {"__npscalar__": obj.dtype.str, "v": _encode(np.asarray(obj).reshape(1), tensors, seen, where)}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors, seen, f"{where}[{i}]") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, tensors, seen, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        # plain JSON objects when every key is a string that cannot be taken for one of our markers
        if all(isinstance(k, str) and not (k.startswith("__") and k.endswith("__")) for k in obj):
            return {k: _encode(v, tensors, seen, f"{where}.{k}") for k, v in obj.items()}
        return {"__items__": [[_encode(k, tensors, seen, where), _encode(v, tensors, seen, f"{where}[{k!r}]")]
                              for k, v in obj.items()]}
    raise TypeError(f"checkpoint state {where}: cannot store a {type(obj).__name__}; "
                    "state_dict() must return tensors, numbers, strings, lists, tuples and dicts")


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__ndarray__" in obj:
        return tensors[obj["__ndarray__"]].numpy().copy()
    if "__npscalar__" in obj:
        return _decode(obj["v"], tensors).astype(np.dtype(obj["__npscalar__"]))[0]
    if "__tuple__" in obj:
        return tuple(_decode(v, tensors) for v in obj["__tuple__"])
    if "__items__" in obj:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__items__"]}
    return {k: _decode(v, tensors) for k, v in obj.items()}


def save_state(obj: dict, json_path: Path, tensor_path: Path) -> None:
    """Write `obj` (nested dicts / lists / tuples of numbers, strings, tensors, numpy arrays) as a
    JSON tree plus a safetensors file. Raises TypeError for anything else (a pickled object is
    exactly what this format refuses to hold)."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    tree = _encode(obj, tensors, {}, "state")
    save_file(tensors, str(tensor_path))
    json_path.write_text(json.dumps({"format": FORMAT, "tensors": tensor_path.name, "state": tree}, indent=1),
                         encoding="utf-8")


def load_state(json_path: Path) -> dict:
    """Read what `save_state` wrote; never unpickles. Raises UserError on an unreadable file."""
    from safetensors.torch import load_file

    try:
        doc = json.loads(json_path.read_text(encoding="utf-8"))
        tensors = load_file(str(json_path.parent / doc["tensors"])) if doc.get("tensors") else {}
        return _decode(doc["state"], tensors)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{json_path}: unreadable training state ({type(e).__name__}: {str(e)[:160]}); "
                        "resume from another checkpoint") from None


def read_state_json(ck: Path) -> dict:
    """The JSON part of a checkpoint's state (step, health, ...) without loading its tensors."""
    try:
        return json.loads((ck / STATE_FILE).read_text(encoding="utf-8")).get("state", {})
    except (OSError, ValueError):
        return {}


# ---------------------------------------------------------------------------------------------
# RNG streams
# ---------------------------------------------------------------------------------------------


def rng_state() -> dict:
    """This process's RNG states: Python, NumPy, torch CPU and (when present) every CUDA device."""
    st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    """Restore the RNG states `rng_state` returned (after a JSON + safetensors round trip)."""
    py = st["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    np.random.set_state(tuple(st["numpy"]))
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def rng_files(ck: Path, rank: int) -> tuple[Path, Path]:
    """(structure JSON, tensors safetensors) of process `rank`'s RNG states in checkpoint `ck`."""
    return ck / f"rng-{rank}.json", ck / f"rng-{rank}.safetensors"


# ---------------------------------------------------------------------------------------------
# Checkpoint folders
# ---------------------------------------------------------------------------------------------


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    """run_dir/checkpoints/step-NNNNNNN, the folder of the checkpoint after optimizer step `step`."""
    return run_dir / "checkpoints" / f"step-{step:07d}"


def step_of(ck: Path) -> int:
    """The optimizer step of a `step-N` checkpoint folder; -1 for any other name."""
    m = _STEP_RE.match(ck.name)
    return int(m.group(1)) if m else -1


def list_checkpoints(run_dir: Path, legacy: bool = False) -> list[Path]:
    """Complete checkpoints, oldest first. legacy=True also lists old pickle checkpoints (so
    that resume can refuse them by name instead of silently starting over)."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    names = (STATE_FILE, LEGACY_STATE_FILE) if legacy else (STATE_FILE,)
    found = [p for p in root.iterdir() if _STEP_RE.match(p.name) and any((p / n).is_file() for n in names)]
    return sorted(found, key=step_of)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of the run (legacy pickle ones included, to refuse them), or None."""
    cks = list_checkpoints(run_dir, legacy=True)
    return cks[-1] if cks else None


def is_sane(ck: Path) -> bool:
    """Whether the checkpoint's health record says its weights were finite and not blown up
    (checkpoints without a record count as sane)."""
    return bool(read_state_json(ck).get("health", {}).get("sane", True))


def latest_sane_checkpoint(run_dir: Path, at_most: int | None = None) -> Path | None:
    """The newest checkpoint (at step <= `at_most` when given) whose weights were recorded as
    finite and not blown up (`is_sane`), or None."""
    for ck in reversed(list_checkpoints(run_dir)):
        if (at_most is None or step_of(ck) <= at_most) and is_sane(ck):
            return ck
    return None


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    """Keep the newest `keep` checkpoints, and also the newest sane one: when the weights have
    blown up, the state to go back to must survive however many checkpoints follow it."""
    cks = list_checkpoints(run_dir)
    protect = latest_sane_checkpoint(run_dir)
    for p in cks[:-keep]:
        if p != protect:
            shutil.rmtree(p, ignore_errors=True)


def clean_stale_tmp(run_dir: Path) -> None:
    """Remove leftovers of a write that was killed half-way. Call only while holding the run
    folder's lock: a live run's staging folders look the same."""
    for root in (run_dir, run_dir / "checkpoints"):
        if root.is_dir():
            for p in root.iterdir():
                n = p.name
                if n.startswith(".") and (".tmp-" in n or ".old-" in n or n.startswith((".rng-step-", ".replaced-"))):
                    shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def holds_run(run_dir: Path) -> bool:
    """Whether the folder holds (part of) an earlier run: a checkpoint, a final model or a
    metrics log (a run killed before its first checkpoint leaves only that)."""
    return run_dir.is_dir() and ((run_dir / "config.json").exists() or (run_dir / "metrics.jsonl").exists()
                                 or bool(list_checkpoints(run_dir, legacy=True)))


def clear_run_dir(run_dir: Path) -> int:
    """Remove everything in the run folder but its lock: `overwrite=true` starts clean. Entries are
    first renamed into one hidden folder, so a kill half-way leaves a stale folder that the next
    run cleans, never a mix of two runs. Returns the number of entries removed."""
    trash = run_dir / f".replaced-{os.getpid()}"
    trash.mkdir(exist_ok=True)
    n = 0
    for p in list(run_dir.iterdir()):
        if p.name in (LOCK_FILE, trash.name):
            continue
        os.replace(p, trash / p.name)
        n += 1
    shutil.rmtree(trash, ignore_errors=True)
    return n


def truncate_metrics(path: Path, step: int) -> int:
    """Drop metrics records after `step` (a resumed run writes them again) and a torn last line
    (a kill during a write). Atomic; returns the number of records dropped."""
    if not path.is_file():
        return 0
    keep, dropped = [], 0
    for ln in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not ln.strip():
            continue
        try:
            rec = json.loads(ln)
        except ValueError:
            dropped += 1
            continue
        if isinstance(rec, dict) and int(rec.get("step", 0)) <= step:
            keep.append(ln)
        else:
            dropped += 1
    if dropped:
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text("".join(ln + "\n" for ln in keep), encoding="utf-8")
        os.replace(tmp, path)
    return dropped


# ---------------------------------------------------------------------------------------------
# One run per folder
# ---------------------------------------------------------------------------------------------

_HELD: dict[str, "RunLock"] = {}  # locks this process holds, by folder


class RunLock:
    """Advisory lock on a run folder: `flock` on `<run_dir>/.alignkit.lock`, which holds the
    owner's PID, host and start time. The kernel drops the lock when its process dies, so a lock
    file left by a killed run is stale by construction and is simply taken over; where `flock`
    does not work (some network filesystems) the PID in the file decides, and a PID that is not
    running on this host is stale."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self.fd: int | None = None
        self.previous: str = ""  # what the file said when it was taken over (a stale owner)

    def acquire(self) -> None:
        """Raise UserError (one line) if another live process holds the folder."""
        key = str(self.run_dir.resolve())
        mine = _HELD.pop(key, None)
        if mine is not None:  # this process started another run here before: that one is over
            mine.release()
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                got = _try_flock(fd)
            except OSError:
                os.close(fd)
                raise
            if got is None:  # no flock here: PID file semantics
                owner = _read_owner(self.path)
                if owner and owner != _me() and _alive(owner):
                    os.close(fd)
                    raise self._busy(owner)
            elif not got:
                owner = _read_owner(self.path)
                os.close(fd)
                raise self._busy(owner)
            # Between our open and flock the holder may have released and unlinked the file: then
            # we locked a file nobody else sees; start over on the current one.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            break
        self.previous = _read_owner(self.path)
        os.ftruncate(fd, 0)
        os.write(fd, _me().encode())
        os.fsync(fd)
        self.fd = fd
        _HELD[key] = self

    def _busy(self, owner: str) -> UserError:
        who = f"PID {owner.split()[0]} on {owner.split()[1]}" if len(owner.split()) >= 2 else "another process"
        return UserError(f"{self.run_dir}: output_dir is in use by another run ({who}); wait for it to end, "
                         "or pick another output_dir")

    def release(self) -> None:
        """Drop the lock and remove the lock file (idempotent)."""
        if self.fd is None:
            return
        try:
            if _read_owner(self.path) == _me():
                self.path.unlink(missing_ok=True)  # while still locked: nobody else is inside
        except OSError:
            pass
        os.close(self.fd)  # drops the flock
        self.fd = None
        key = str(self.run_dir.resolve())
        if _HELD.get(key) is self:
            del _HELD[key]


def _me() -> str:
    return f"{os.getpid()} {socket.gethostname()} {_START}"


_START = time.strftime("%Y-%m-%dT%H:%M:%S")


def _read_owner(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return ""


def _alive(owner: str) -> bool:
    parts = owner.split()
    if len(parts) < 2 or not parts[0].isdigit():
        return False
    if parts[1] != socket.gethostname():
        return True  # another host: cannot tell, assume alive
    try:
        os.kill(int(parts[0]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _try_flock(fd: int) -> bool | None:
    """True: locked; False: held by another process; None: flock unsupported here."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
            return None
        raise


# ---------------------------------------------------------------------------------------------
# Config changes on resume
# ---------------------------------------------------------------------------------------------

# Keys a resumed run may change: they decide how long the run goes, when it saves, evaluates and
# logs, where it writes, and how much memory it uses, never what one optimizer step computes.
RESUME_MAY_CHANGE = {
    "max_steps", "epochs", "save_every", "save_total_limit", "eval_every", "eval_data", "eval_split",
    "eval_prompts", "log_every", "sample_every", "progress", "plot", "tensorboard", "resume", "overwrite",
    "output_dir", "distributed", "fsdp", "gradient_checkpointing", "logits_chunk_size", "ref_batch_size",
    "save_critic",
}
# After a divergence, resuming from a checkpoint before it may also change the step size: the same
# settings would only replay the same blow-up (resume is exact).
RESUME_AFTER_DIVERGENCE = {"lr", "warmup_steps", "schedule", "min_lr_ratio", "max_grad_norm"}


def _flat(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict) and k not in ("args",):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        try:
            return float(a) == float(b) or (math.isnan(float(a)) and math.isnan(float(b)))
        except (TypeError, ValueError):
            return False
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def config_changes(old: dict, new: dict, old_world: int, new_world: int,
                   diverged: bool = False) -> tuple[list[str], list[str]]:
    """Compare a checkpoint's config with the resuming run's (both as `model_dump(mode="json")`).
    Returns (refused, applied): "key: old -> new" strings. batch_size / grad_accum may change
    only together with the process count so that batch_size x grad_accum x processes (the
    global batch, which fixes the data order) stays the same."""
    fo, fn = _flat(old), _flat(new)
    refused, applied = [], []
    for k in sorted(set(fo) | set(fn)):
        if k in fo and k in fn and _same(fo[k], fn[k]):
            continue
        if k not in fo or k not in fn:  # a key added / removed between versions: not a user change
            continue
        top = k.split(".")[0]
        desc = f"{k}: {fo[k]!r} -> {fn[k]!r}"
        if top in RESUME_MAY_CHANGE:
            if top not in ("resume", "overwrite", "output_dir"):
                applied.append(desc)
        elif top in ("batch_size", "grad_accum"):
            continue  # judged on the global batch below
        elif diverged and top in RESUME_AFTER_DIVERGENCE:
            applied.append(desc)
        else:
            refused.append(desc)
    gb_old = int(fo.get("batch_size", 1)) * int(fo.get("grad_accum", 1)) * old_world
    gb_new = int(fn.get("batch_size", 1)) * int(fn.get("grad_accum", 1)) * new_world
    local = [f"{k}: {fo[k]!r} -> {fn[k]!r}" for k in ("batch_size", "grad_accum") if k in fo and k in fn
             and fo[k] != fn[k]]
    if gb_old != gb_new:
        refused.append(f"global batch (batch_size x grad_accum x processes): {fo.get('batch_size')} x "
                       f"{fo.get('grad_accum', 1)} x {old_world} -> {fn.get('batch_size')} x {fn.get('grad_accum', 1)} "
                       f"x {new_world}")
    elif local or old_world != new_world:
        applied += local + ([f"processes: {old_world} -> {new_world}"] if old_world != new_world else [])
    return refused, applied


# ---------------------------------------------------------------------------------------------
# Sharded (torch.distributed.checkpoint) folders without unpickling
# ---------------------------------------------------------------------------------------------

# What the metadata file of a torch.distributed.checkpoint folder may name: torch's own plain data
# classes, dtypes, sizes, paths. Anything else (os.system, builtins.eval, ...) is refused.
_DCP_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem",
                "torch.distributed.checkpoint.planner")
_DCP_GLOBALS = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
                ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"),
                ("pathlib", "PureWindowsPath"), ("builtins", "set"), ("builtins", "frozenset"),
                ("builtins", "slice"), ("builtins", "complex"), ("enum", "Enum")}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        obj = None
        if (module, name) in _DCP_GLOBALS:
            obj = super().find_class(module, name)
        elif module in _DCP_MODULES and "." not in name:
            cand = super().find_class(module, name)
            obj = cand if isinstance(cand, type) else None  # plain classes only, no functions
        elif module == "torch" and "." not in name and isinstance(getattr(torch, name, None), torch.dtype):
            obj = getattr(torch, name)
        if obj is None:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed")
        return obj


def safe_dcp_load(state: dict, path: Path, no_dist: bool) -> None:
    """`torch.distributed.checkpoint.load` that never runs code from the folder: its metadata is
    rebuilt from an allow-list of classes and its byte items go through weights_only loading.
    Raises UnsafeCheckpoint (one line) when the folder names anything else."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    where = path.parent if path.parent.name.startswith("step-") else path
    refused: list[UnsafeCheckpoint] = []

    class Reader(dcp.FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            rank = kwargs.get("rank")
            mpath = Path(self.path) / (".metadata" if rank is None else f"__{rank}.metadata")
            try:
                with open(mpath, "rb") as f:
                    md = _MetadataUnpickler(f).load()
            except pickle.UnpicklingError as e:
                # torch wraps reader errors in its own; keep ours to raise after it
                refused.append(UnsafeCheckpoint(f"{where}: refused to load {mpath.name}: it names code to run ({e}); "
                                                "resume only from checkpoints this toolkit wrote"))
                raise refused[-1] from None
            if getattr(md, "storage_meta", None) is None:
                from torch.distributed.checkpoint.metadata import StorageMeta

                md.storage_meta = StorageMeta()
            md.storage_meta.load_id = self.load_id
            return md

    class Planner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value: io.BytesIO) -> None:
            try:
                obj = torch.load(value, weights_only=True)
            except pickle.UnpicklingError as e:
                msg = str(e).strip().splitlines()[0][:160]
                refused.append(UnsafeCheckpoint(f"{where}: refused to load item {read_item.dest_index.fqn}: it is "
                                                f"not plain data ({msg}); resume only from checkpoints this toolkit "
                                                "wrote"))
                raise refused[-1] from None
            if self.flatten_state_dict:
                from torch.distributed.checkpoint._traverse import set_element

                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
            else:
                self.state_dict[read_item.dest_index.fqn] = obj

    from torch.distributed.checkpoint.api import CheckpointException

    reader = Reader(str(path))
    if (path / ".metadata").is_file():
        reader.read_metadata()  # refuse before torch's loader, which logs a traceback and retries elsewhere
    try:
        dcp.load(state, storage_reader=reader, planner=Planner(), no_dist=no_dist)
    except CheckpointException as e:
        if refused:
            raise refused[0] from None
        excs = [f[0] if isinstance(f, tuple) else f for f in (e.failures or {}).values()]
        # CheckpointException is a BaseException: hand the callers an Exception they can report
        first = next((x for x in excs if isinstance(x, Exception)), None)
        raise (first if first is not None else RuntimeError(str(e))) from None
    except Exception:
        if refused:
            raise refused[0] from None
        raise
