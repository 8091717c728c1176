"""Atomic checkpoints: HF model + tokenizer + the full training state (optimizer, scheduler,
RNG streams, data position, recipe state), written to a temporary folder and renamed into
place, so a killed run never leaves a half-written checkpoint behind."""

from __future__ import annotations

import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

# The atomic folder writes live one layer down (models/ saves folders too); re-exported here.
from alignkit.io import atomic_dir_write, commit_dir  # noqa: F401

STATE_FILE = "trainer_state.pt"
_STEP_RE = re.compile(r"^step-(\d+)$")


def rng_state() -> dict:
    st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step-{step:07d}"


def list_checkpoints(run_dir: Path) -> list[Path]:
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_RE.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(_STEP_RE.match(p.name).group(1)))


def latest_checkpoint(run_dir: Path) -> Path | None:
    cks = list_checkpoints(run_dir)
    return cks[-1] if cks else None


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    for p in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(p, ignore_errors=True)


def clean_stale_tmp(run_dir: Path) -> None:
    """Remove leftovers of a write that was killed half-way."""
    for root in (run_dir, run_dir / "checkpoints"):
        if root.is_dir():
            for p in root.iterdir():
                if p.name.startswith(".") and (".tmp-" in p.name or ".old-" in p.name):
                    shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
