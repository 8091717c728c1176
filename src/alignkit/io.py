"""Atomic folder writes, below every other layer (models, training and eval all save folders).

A folder is written under a temporary name next to its final place, fsynced, and renamed into
place, so a killed process never leaves a half-written model or checkpoint behind: readers see
the old folder or the new one, never a mix. Renames are atomic on POSIX file systems when the
temporary folder and the final one share a parent (they do here).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable

__all__ = ["atomic_dir_write", "commit_dir", "fsync_dir"]


def atomic_dir_write(final: Path, writer: Callable[[Path], object]) -> Path:
    """Run `writer(tmp_dir)`, then move `tmp_dir` to `final`, replacing an older `final`.

    `tmp_dir` is `.<name>.tmp-<pid>` beside `final`; a leftover of an earlier killed write with the
    same name is removed first. Returns `final`. Errors: whatever `writer` raises (the temporary
    folder is then left for `training.checkpoint.clean_stale_tmp`), OSError from the file system."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    writer(tmp)
    return commit_dir(tmp, final)


def commit_dir(tmp: Path, final: Path) -> Path:
    """fsync every file of the fully written folder `tmp` and rename it to `final`.

    An existing `final` is first renamed aside (`.<name>.old-<pid>`) and removed after the swap, so
    at every moment one complete version sits at `final` or at its aside name. Returns `final`."""
    fsync_dir(tmp)
    if final.exists():
        old = final.parent / f".{final.name}.old-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    return final


def fsync_dir(d: Path) -> None:
    """fsync every file below `d`, so its bytes are on disk before the folder is renamed."""
    for p in Path(d).rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
