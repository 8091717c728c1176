"""Run metrics (metrics.jsonl, trackers, curves.png) and progress output.

Progress: `progress_bar` gives a tqdm bar on a terminal and, when the stream is a file or a pipe
(a log), plain periodic lines without control codes; `say` prints a message above any bar
(tqdm.write) so messages and bars never share a line.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import time
from pathlib import Path

# report_to names are checked when the config is read; the check lives with the config
from alignkit.config import TRACKERS, _installed, check_report_to  # noqa: F401

# Seconds between progress lines in logs (not a terminal); ALIGNKIT_PROGRESS_INTERVAL overrides.
LOG_INTERVAL_S = 30.0
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def _is_tty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class _LineStream:
    """File wrapper for tqdm in logs: each refresh becomes one plain line (no carriage returns,
    no cursor moves, no blank lines)."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, s: str) -> None:
        for part in _ANSI.sub("", s).replace("\r", "\n").split("\n"):
            part = part.rstrip()
            if part:
                self.stream.write(part + "\n")

    def flush(self) -> None:
        try:
            self.stream.flush()
        except (AttributeError, ValueError):
            pass

    def isatty(self) -> bool:
        return False


def progress_bar(total: float | None = None, desc: str = "", unit: str = "it", initial: float = 0,
                 file=None, disable: bool = False, **kwargs):
    """A tqdm progress bar: steps, rate and ETA.

    On a terminal: an ordinary in-place bar. In a log (file or pipe): one plain line every
    LOG_INTERVAL_S seconds (env ALIGNKIT_PROGRESS_INTERVAL) plus the first and the last, with no
    control codes. Extra keyword arguments go to tqdm."""
    from tqdm.auto import tqdm

    file = file or sys.stderr
    if _is_tty(file):
        _warnings_above_bars()
        kwargs.setdefault("dynamic_ncols", True)
        return tqdm(total=total, desc=desc, unit=unit, initial=initial, file=file, disable=disable, **kwargs)
    interval = float(os.environ.get("ALIGNKIT_PROGRESS_INTERVAL", LOG_INTERVAL_S))
    from tqdm import tqdm as plain  # not the notebook widget

    kwargs.pop("dynamic_ncols", None)
    kwargs.pop("position", None)  # one line each, nothing to stack
    fmt = kwargs.pop("bar_format", None)
    if fmt:  # no bar drawing in a log: the numbers say it
        fmt = fmt.replace("|{bar}|", " ").replace("{bar}", "")
    elif total:
        fmt = "{desc}: {percentage:3.0f}% {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"
    bar = plain(total=total, desc=desc, unit=unit, initial=initial, file=_LineStream(file), disable=disable,
                mininterval=interval, maxinterval=max(interval, 10.0), ascii=True, bar_format=fmt, **kwargs)
    bar.line_interval = interval  # callers that refresh by hand keep to it (see `refresh_due`)
    return bar


def refresh_due(bar) -> bool:
    """Whether a hand-made refresh of `bar` should print now: always on a terminal, at most once
    per interval in a log."""
    interval = getattr(bar, "line_interval", None)
    if interval is None:
        return True
    now = time.time()
    if now - getattr(bar, "_last_line", 0.0) >= interval:
        bar._last_line = now
        return True
    return False


def _warnings_above_bars() -> None:
    """Python warnings printed while a bar is drawn go through tqdm.write (their own lines)."""
    import warnings

    if getattr(warnings.showwarning, "_alignkit", False):
        return
    plain_show = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if file is not None and file not in (sys.stderr, sys.stdout):
            return plain_show(message, category, filename, lineno, file, line)
        say(warnings.formatwarning(message, category, filename, lineno, line).rstrip("\n"))

    show._alignkit = True
    warnings.showwarning = show


def say(msg: str, file=None) -> None:
    """Print a message on its own line above any progress bar (stderr by default)."""
    from tqdm import tqdm

    tqdm.write(msg, file=file or sys.stderr)
    try:
        (file or sys.stderr).flush()
    except (AttributeError, ValueError):
        pass


class library_bars_off:
    """Context: no transformers / huggingface_hub bars inside (e.g. "Writing model shards" while
    alignkit's own bar runs); their previous state is restored after."""

    def __enter__(self):
        from transformers.utils import logging as tl

        self._was = tl.is_progress_bar_enabled()
        tl.disable_progress_bar()
        return self

    def __exit__(self, *exc):
        from transformers.utils import logging as tl

        if self._was:
            tl.enable_progress_bar()
        return False


def quiet_library_bars() -> None:
    """In logs, silence the shard-loading bars of transformers / huggingface_hub (they write
    carriage returns and escape codes). Must run before transformers is imported to take
    effect through the environment; afterwards it switches them off directly."""
    if _is_tty(sys.stderr):
        return
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    tl = sys.modules.get("transformers.utils.logging")
    if tl is not None:
        tl.disable_progress_bar()


# ---------------------------------------------------------------------------------------- trackers

def resolve_report_to(report_to: list[str] | str | None, tensorboard: bool = True) -> list[str]:
    """The trackers a run logs to. "auto" (and None): TensorBoard when it is installed and
    `tensorboard` is true. A comma-separated string or a list names them; "none" means none.

    Raises UserError for an unknown name or a tracker whose client library is not installed."""
    from alignkit.errors import UserError

    if report_to is None:
        report_to = ["auto"]
    try:
        names = check_report_to(report_to.split(",") if isinstance(report_to, str) else report_to)
    except ValueError as e:
        raise UserError(f"report_to: {e}") from None
    out = []
    for n in names:
        if n == "auto":
            if tensorboard and _installed("tensorboard"):
                out.append("tensorboard")
        elif n != "tensorboard" or tensorboard:
            out.append(n)
    return list(dict.fromkeys(out))


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v if isinstance(v, (int, float, str, bool)) or v is None else json.dumps(v)
    return out


class _Tracker:
    """One tracker client: scalars by step, the run config once, the final samples once."""

    def log(self, step: int, scalars: dict) -> None: ...

    def samples(self, rows: list[dict]) -> None: ...

    def close(self) -> None: ...

    def resume_at(self, step: int) -> None:
        """A resumed run logs again from step + 1 (only TensorBoard can hide later records)."""


class _TensorBoard(_Tracker):
    def __init__(self, run_dir: Path, config: dict):
        from torch.utils.tensorboard import SummaryWriter

        self.w = SummaryWriter(str(run_dir / "tensorboard"))
        if config:
            self.w.add_text("config", "```\n" + json.dumps(config, indent=2, ensure_ascii=False) + "\n```", 0)

    def log(self, step, scalars):
        for k, v in scalars.items():
            self.w.add_scalar(k, v, step)

    def samples(self, rows):
        text = "\n\n".join(f"**prompt:** {r.get('prompt')}\n\n**completion:** {r.get('completion')}\n\n"
                           f"**reward:** {r.get('reward')}" for r in rows)
        self.w.add_text("samples", text, rows[0].get("step", 0) if rows else 0)

    def close(self):
        self.w.close()

    def resume_at(self, step):
        from torch.utils.tensorboard import SummaryWriter

        self.w.close()
        self.w = SummaryWriter(self.w.log_dir, purge_step=step + 1)


class _WandB(_Tracker):
    """Weights & Biases; WANDB_MODE=offline keeps it on disk (run_dir/wandb), WANDB_PROJECT names the project."""

    def __init__(self, run_dir: Path, config: dict, name: str):
        import wandb

        self.wandb = wandb
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "alignkit"), name=name, dir=str(run_dir),
                              config=config, reinit="finish_previous")

    def log(self, step, scalars):
        self.run.log(scalars, step=step)

    def samples(self, rows):
        cols = ["step", "prompt", "completion", "reward"]
        self.run.log({"samples": self.wandb.Table(columns=cols, data=[[r.get(c) for c in cols] for r in rows])})

    def close(self):
        self.run.finish()


class _MLflow(_Tracker):
    """MLflow; MLFLOW_TRACKING_URI picks the server or store (unset: a file store in
    run_dir/mlruns, which needs no database), MLFLOW_EXPERIMENT_NAME the experiment."""

    def __init__(self, run_dir: Path, config: dict, name: str):
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            # mlflow >= 3 refuses its file store unless asked; a local run needs no server or database
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        import mlflow

        if not os.environ.get("MLFLOW_TRACKING_URI"):
            mlflow.set_tracking_uri((run_dir / "mlruns").resolve().as_uri())
        self.mlflow = mlflow
        if os.environ.get("MLFLOW_EXPERIMENT_NAME"):
            mlflow.set_experiment(os.environ["MLFLOW_EXPERIMENT_NAME"])
        self.run = mlflow.start_run(run_name=name)
        flat = _flat(config)
        # mlflow caps a param value at a few thousand characters; long lists are kept whole in config.yaml
        mlflow.log_params({k: str(v)[:500] for k, v in flat.items()})

    def log(self, step, scalars):
        self.mlflow.log_metrics({re.sub(r"[^\w\-. /]", "_", k): v for k, v in scalars.items()}, step=step)

    def samples(self, rows):
        self.mlflow.log_table({c: [r.get(c) for r in rows] for c in ("step", "prompt", "completion", "reward")},
                              artifact_file="samples.json")

    def close(self):
        self.mlflow.end_run()


class _Trackio(_Tracker):
    """trackio (local by default: its store under ~/.cache/huggingface/trackio, or TRACKIO_DIR)."""

    def __init__(self, run_dir: Path, config: dict, name: str):
        import trackio

        self.trackio = trackio
        self.run = trackio.init(project=os.environ.get("TRACKIO_PROJECT", "alignkit"), name=name, config=config)

    def log(self, step, scalars):
        self.trackio.log(scalars, step=step)

    def samples(self, rows):
        import pandas as pd

        cols = ["step", "prompt", "completion", "reward"]
        self.trackio.log({"samples": self.trackio.Table(dataframe=pd.DataFrame([{c: r.get(c) for c in cols}
                                                                                for r in rows]))})

    def close(self):
        self.trackio.finish()


def _open_tracker(kind: str, run_dir: Path, config: dict, name: str) -> _Tracker:
    if kind == "tensorboard":
        return _TensorBoard(run_dir, config)
    return {"wandb": _WandB, "mlflow": _MLflow, "trackio": _Trackio}[kind](run_dir, config, name)


class MetricsLog:
    """metrics.jsonl (always) plus the trackers named by `report_to` (see `resolve_report_to`).

    Every tracker gets the same numbers: each record's numeric values as `<kind>/<key>` at its
    step, the run config at the start, and at `close` the last step's samples from
    run_dir/samples.jsonl (online recipes write it)."""

    def __init__(self, run_dir: Path, enabled: bool = True, tensorboard: bool = True,
                 report_to: list[str] | str | None = None, config: dict | None = None, name: str | None = None):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "metrics.jsonl"
        self.enabled = enabled
        self.trackers: dict[str, _Tracker] = {}
        if not enabled:
            return
        kinds = resolve_report_to(report_to, tensorboard)
        for kind in kinds:
            try:
                self.trackers[kind] = _open_tracker(kind, self.run_dir, config or {}, name or self.run_dir.name)
            except Exception as e:  # a tracker that cannot start must not stop the training run
                say(f"report_to: {kind} could not start ({str(e).splitlines()[0][:200] if str(e) else type(e).__name__}); "
                    "logging to metrics.jsonl only for it")

    @property
    def tb(self):
        """The TensorBoard SummaryWriter when TensorBoard is on, else None."""
        t = self.trackers.get("tensorboard")
        return t.w if t is not None else None

    def resume_at(self, step: int) -> None:
        """A resumed run continues after `step`: trackers that can (TensorBoard) hide what a killed
        run logged after it."""
        for t in self.trackers.values():
            t.resume_at(step)

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
        """Append one record {step, kind, time, **metrics} to metrics.jsonl and send its numbers to
        every tracker as `<kind>/<key>` (non-finite floats are written as strings)."""
        if not self.enabled:
            return
        rec = {"step": step, "kind": kind, "time": round(time.time(), 3)}
        for k, v in metrics.items():
            rec[k] = _clean(v)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        scalars = {f"{kind}/{k}": v for k, v in rec.items()
                   if k not in ("step", "time", "kind") and isinstance(v, (int, float)) and not isinstance(v, bool)}
        for t in self.trackers.values():
            t.log(step, scalars)

    def close(self) -> None:
        """Send the last step's samples to the trackers and close them (idempotent)."""
        if not self.trackers:
            return
        rows = read_metrics(self.run_dir / "samples.jsonl")
        if rows:
            last = max(r.get("step", 0) for r in rows)
            rows = [r for r in rows if r.get("step", 0) == last]
        for kind, t in list(self.trackers.items()):
            try:
                if rows:
                    t.samples(rows)
            finally:
                t.close()
        self.trackers = {}


def _clean(v):
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float):
        return v if math.isfinite(v) else str(v)
    return v


def read_metrics(path: Path) -> list[dict]:
    """The records of a JSONL metrics / samples file ([] when missing; a line being written is skipped)."""
    if not path.exists():
        return []
    out = []
    for ln in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if ln.strip():
            try:
                out.append(json.loads(ln))
            except json.JSONDecodeError:  # a line being written right now
                continue
    return out


# The curves a user reads, one panel each, in this order; each panel draws the first keys of its
# list that the run logged (train and eval records). Everything else stays in metrics.jsonl.
CURVE_PANELS: list[tuple[str, list[str]]] = [
    ("loss", ["loss", "policy_loss", "eval_loss"]),
    ("reward", ["reward_mean", "reward", "eval_reward"]),
    ("KL to reference", ["kl", "kl_seq"]),
    ("accuracy", ["accuracy", "eval_accuracy", "eval_solved"]),
    ("entropy", ["entropy", "eval_entropy"]),
    ("grad norm", ["grad_norm"]),
    ("clip fraction", ["clip_frac"]),
    ("value loss", ["value_loss", "value_mse"]),
]


def plot_metrics(metrics_path: Path, out_png: Path, panels: list[tuple[str, list[str]]] | None = None) -> Path | None:
    """curves.png of a run: one panel per entry of CURVE_PANELS the run logged (loss, reward, KL,
    accuracy, entropy, grad norm, clip fraction, value loss) against the optimizer step; train and
    eval records drawn as separate lines. Returns None when nothing to draw."""
    recs = read_metrics(metrics_path)
    if not recs:
        return None
    drawn: list[tuple[str, list[tuple[str, list, list]]]] = []
    for title, keys in panels or CURVE_PANELS:
        lines = []
        for kind in ("train", "eval"):
            for k in keys:
                pts = [(r["step"], r[k]) for r in recs if r.get("kind", "train") == kind
                       and isinstance(r.get(k), (int, float)) and not isinstance(r.get(k), bool)
                       and math.isfinite(r[k])]
                if pts:
                    lines.append((f"{kind}: {k}", [p[0] for p in pts], [p[1] for p in pts]))
        if lines:
            drawn.append((title, lines))
    if not drawn:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, len(drawn))
    rows = math.ceil(len(drawn) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.8 * rows), squeeze=False)
    for ax, (title, lines) in zip(axes.flat, drawn):
        for label, xs, ys in lines:
            ax.plot(xs, ys, marker="o" if len(xs) < 20 else None, ms=3, label=label)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("optimizer step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if len(lines) > 1:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(drawn):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
