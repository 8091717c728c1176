"""Run metrics: metrics.jsonl, optional TensorBoard, and a PNG of the curves at the end."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path


class MetricsLog:
    def __init__(self, run_dir: Path, enabled: bool = True, tensorboard: bool = True):
        self.path = run_dir / "metrics.jsonl"
        self.enabled = enabled
        self.tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tensorboard"))
            except Exception:  # tensorboard is optional
                self.tb = None

    def truncate_after(self, step: int) -> None:
        """On resume, forget records written after optimizer step `step` (the checkpoint's) so the log
        has no duplicates. Online records are filed under the rollout step and carry `optimizer_step`."""
        if not (self.enabled and self.path.exists()):
            return

        def optimizer_step(rec: dict) -> int:
            return rec.get("optimizer_step", rec.get("step", 0))

        keep = [ln for ln in self.path.read_text().splitlines() if ln.strip() and optimizer_step(json.loads(ln)) <= step]
        self.path.write_text("".join(ln + "\n" for ln in keep))

    def write(self, step: int, metrics: dict, kind: str = "train") -> None:
        if not self.enabled:
            return
        rec = {"step": step, "kind": kind, "time": round(time.time(), 3)}
        for k, v in metrics.items():
            rec[k] = _clean(v)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        if self.tb is not None:
            for k, v in rec.items():
                if k not in ("step", "time") and isinstance(v, (int, float)):
                    self.tb.add_scalar(f"{kind}/{k}", v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _clean(v):
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float):
        return v if math.isfinite(v) else str(v)
    return v


def read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(ln) for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]


def plot_metrics(metrics_path: Path, out_png: Path, keys: list[str] | None = None) -> Path | None:
    """One panel per numeric metric against step; train and eval records drawn separately."""
    recs = read_metrics(metrics_path)
    if not recs:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    skip = {"step", "time", "kind", "epoch"}
    series: dict[str, dict[str, tuple[list, list]]] = {}
    for r in recs:
        for k, v in r.items():
            if k in skip or not isinstance(v, (int, float)) or isinstance(v, bool):
                continue
            if keys and k not in keys:
                continue
            xs, ys = series.setdefault(k, {}).setdefault(r.get("kind", "train"), ([], []))
            xs.append(r["step"])
            ys.append(v)
    if not series:
        return None
    names = sorted(series)
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.8 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        for kind, (xs, ys) in series[name].items():
            ax.plot(xs, ys, marker="o" if len(xs) < 20 else None, ms=3, label=kind)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        if len(series[name]) > 1:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
