"""Reports over run folders: the measured table, curves, sample completions; Markdown and a
self-contained HTML page (images inline, sortable table).

Input is any mix of
- demo folders (`results.json` from `alignkit demo`): one row per method, seeds aggregated;
- training run folders (`config.yaml` + `metrics.jsonl`, optionally `eval.json`): one row each,
  a user's own runs included. A run with no final model yet is "in progress"; a run whose loss
  went non-finite is "diverged".
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import statistics
from pathlib import Path

from alignkit.errors import UserError
from alignkit.training.logging import read_metrics

COLUMNS = [  # key, header, format
    ("method", "method", "{}"),
    ("needs", "data it needs", "{}"),
    ("wall_s", "wall time (s)", "{:.0f}"),
    ("generated_tokens", "tokens generated", "{:,}"),
    ("peak_rss_mb", "peak memory (MiB)", "{:.0f}"),
    ("accuracy", "exact accuracy (greedy)", "{:.3f}"),
    ("accuracy_t1", "exact accuracy (samples, T=1)", "{:.3f}"),
    ("format_rate", "format rate", "{:.3f}"),
    ("reward", "mean reward", "{:.3f}"),
    ("kl_token", "KL to SFT (per token)", "{:.4f}"),
    # tool-using rows (the demo's grpo_calc stage); absent elsewhere, so the column is dropped
    ("tool_calls", "tool calls / answer (greedy)", "{:.2f}"),
    ("malformed_calls", "malformed calls / answer (greedy)", "{:.3f}"),
    ("malformed_calls_t1", "malformed calls / answer (T=1)", "{:.3f}"),
    ("spread", "greedy accuracy spread (std over seeds)", "{:.3f}"),
    ("spread_t1", "T=1 accuracy spread", "{:.3f}"),
    ("diverged", "diverged runs", "{}"),
    ("status", "status", "{}"),
]

# One colour per method, the same in every plot and table (matplotlib's tab10 and tab20 hues).
METHOD_COLORS = {
    "base": "#7f7f7f", "sft": "#000000", "dpo": "#1f77b4", "dpo_lora": "#17becf", "reinforce": "#ff7f0e",
    "rloo": "#bcbd22", "grpo": "#2ca02c", "rs": "#9467bd", "ppo": "#d62728", "online_dpo": "#e377c2",
    "rm_scalar": "#8c564b", "rm_distributional": "#c49c94",
}
_EXTRA_COLORS = ["#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#f7b6d2", "#dbdb8d", "#9edae5"]


def method_of(label: str) -> str:
    """The method a run label belongs to: `grpo-s1` -> `grpo`."""
    import re

    return re.sub(r"-s\d+$", "", label)


def method_color(name: str, others: list[str] | None = None) -> str:
    """The fixed colour of a method; methods without one get the next spare colour in `others` order."""
    m = method_of(name)
    if m in METHOD_COLORS:
        return METHOD_COLORS[m]
    extra = sorted({method_of(o) for o in (others or [m]) if method_of(o) not in METHOD_COLORS})
    return _EXTRA_COLORS[(extra.index(m) if m in extra else 0) % len(_EXTRA_COLORS)]


def _is_finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def run_status(run_dir: Path, recs: list[dict]) -> str:
    if any(isinstance(r.get("loss"), str) or (isinstance(r.get("loss"), float) and not math.isfinite(r["loss"]))
           for r in recs):
        return "diverged"
    if (run_dir / "config.json").exists() or (run_dir / "adapter_config.json").exists():
        return "finished"
    return "in progress"


def _single_run_row(run_dir: Path) -> dict:
    recs = read_metrics(run_dir / "metrics.jsonl")
    train = [r for r in recs if r.get("kind", "train") == "train"]
    evals = [r for r in recs if r.get("kind") == "eval"]
    row: dict = {"method": run_dir.name, "dir": str(run_dir), "status": run_status(run_dir, recs)}
    cfg = run_dir / "config.yaml"
    if cfg.exists():
        import yaml

        try:
            c = yaml.safe_load(cfg.read_text(encoding="utf-8")) or {}
            row["needs"] = c.get("data", "")
        except yaml.YAMLError:
            pass
    if train:
        last = train[-1]
        row["steps"] = last.get("step")
        row["wall_s"] = last.get("elapsed_s")
        peaks = [r["peak_rss_mb"] for r in train if _is_finite(r.get("peak_rss_mb"))]
        if peaks:
            row["peak_rss_mb"] = max(peaks)
        gen = [r["generated_tokens"] for r in train if _is_finite(r.get("generated_tokens"))]
        if gen:
            row["generated_tokens"] = int(max(gen))
        tail = [r["reward_mean"] for r in train[-5:] if _is_finite(r.get("reward_mean"))]
        if tail:
            row["reward"] = sum(tail) / len(tail)
    if evals:
        last = evals[-1]
        for src, dst in (("eval_solved", "accuracy"), ("eval_reward", "reward"), ("eval_accuracy", "accuracy")):
            if _is_finite(last.get(src)):
                row[dst] = last[src]
    ev = run_dir / "eval.json"
    if ev.exists():
        mode = next(iter(json.loads(ev.read_text(encoding="utf-8")).get("modes", {}).values()), {})
        for k in ("accuracy", "format_rate", "reward", "kl_token"):
            if _is_finite(mode.get(k)):
                row[k] = mode[k]
    row["diverged"] = int(row["status"] == "diverged")
    return row


def _demo_rows(results: dict) -> tuple[list[dict], list[dict], dict]:
    """Rows per method (seeds aggregated), reward-model rows, and per-run records."""
    runs = results.get("runs", {})
    groups: dict[str, list[dict]] = {}
    rm_rows = []
    for key, rec in runs.items():
        if key.startswith("rm_"):
            ev = rec.get("eval", {})
            rm_rows.append({"model": key, "accuracy": ev.get("eval_accuracy"), "margin": ev.get("eval_margin"),
                            "ece_before": ev.get("eval_ece_before", ev.get("eval_ece")),
                            "ece_after": ev.get("eval_ece_after", ev.get("eval_ece_calibrated")),
                            "wall_s": rec.get("wall_s"),
                            **{f"acc_{k}": v for k, v in (ev.get("accuracy_by_mistake") or {}).items()}})
            continue
        groups.setdefault(rec.get("method", key), []).append(rec)
    rows = []
    for name, recs in groups.items():
        ok = [r for r in recs if r.get("returncode", 0) == 0 and "eval" in r]
        row: dict = {"method": name, "needs": recs[0].get("needs", ""), "seeds": len(recs)}
        row["diverged"] = sum(1 for r in recs if r.get("diverged") or (r.get("returncode", 0) not in (0,)))
        row["status"] = "finished" if len(ok) == len(recs) else ("failed" if not ok else "partly failed")
        if not ok:
            row["error"] = next((r.get("error") for r in recs if r.get("error")), "")
        for k in ("wall_s", "generated_tokens", "peak_rss_mb"):
            vals = [r[k] for r in ok if _is_finite(r.get(k))]
            if vals:
                row[k] = sum(vals) / len(vals)
        row["cached"] = any(r.get("cached") for r in ok)
        for k in ("accuracy", "accuracy_t1", "format_rate", "reward", "kl_token", "tool_calls", "malformed_calls",
                  "malformed_calls_t1"):
            vals = [r["eval"][k] for r in ok if _is_finite(r["eval"].get(k))]
            if vals:
                row[k] = sum(vals) / len(vals)
            if len(vals) > 1 and k.startswith("accuracy"):
                row["spread" + k[len("accuracy"):]] = statistics.stdev(vals)
        row["samples"] = ok[0]["eval"].get("samples", []) if ok else []
        row["dirs"] = [r.get("dir") for r in recs]
        rows.append(row)
    return rows, rm_rows, runs


def _fmt(key: str, fmt: str, v) -> str:
    if v is None or v == "":
        return "–"
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    try:
        return fmt.format(int(v) if fmt == "{:,}" else v)
    except (ValueError, TypeError):
        return str(v)


def _cell(r: dict, k: str, f: str) -> str:
    text = _fmt(k, f, r.get(k))
    if k == "wall_s" and r.get("cached") and text != "–":
        text += " (cached build)"  # what building it took once; this run reused it
    return text


def markdown_table(rows: list[dict], columns=COLUMNS) -> str:
    cols = [c for c in columns if any(r.get(c[0]) not in (None, "") for r in rows)]
    head = "| " + " | ".join(h for _, h, _ in cols) + " |"
    sep = "|" + "|".join("---" if k in ("method", "needs", "status") else "---:" for k, _, _ in cols) + "|"
    lines = [head, sep]
    for r in rows:
        lines.append("| " + " | ".join(_cell(r, k, f) for k, _, f in cols) + " |")
    return "\n".join(lines)


def _series(run_dir: Path, keys: list[str], kind: str) -> tuple[list, list, list]:
    recs = [r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("kind", "train") == kind]
    train = [r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("kind", "train") == "train"]
    # eval records carry no elapsed time: take the train record of the same step
    t_at = {r["step"]: r.get("elapsed_s") for r in train}
    xs, ts, ys = [], [], []
    for r in recs:
        for k in keys:
            if _is_finite(r.get(k)):
                xs.append(r["step"])
                ts.append(r.get("elapsed_s", t_at.get(r["step"])))
                ys.append(r[k])
                break
    return xs, ts, ys


CURVES = [  # figure name, title (which data it uses), y label, metric keys tried in order, record kind, table key
    ("reward", "Mean reward of the training samples (temperature 1) during training", "mean reward",
     ["reward_mean"], "train", "reward"),
    ("accuracy", "Greedy exact accuracy during training, on the first {n_curve} held-out prompts", "exact accuracy",
     ["eval_solved", "eval_accuracy"], "eval", "accuracy"),
    ("kl", "KL to the SFT model per token: lines during training (its samples), markers at the end ({n_table} "
     "held-out prompts x 4 samples)", "KL per token", ["kl"], "train", "kl_token"),
]


FIGURE_TITLES = {"reward": "Reward during training", "accuracy": "Held-out accuracy during training",
                 "kl": "KL to the SFT model"}


def _run_config(run_dir: Path) -> dict:
    cfg = run_dir / "config.yaml"
    if not cfg.exists():
        return {}
    import yaml

    try:
        return yaml.safe_load(cfg.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError:
        return {}


def _last_point(run_dir: Path) -> tuple[float | None, float | None]:
    """(step, elapsed seconds) of a run's last train record."""
    train = [r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("kind", "train") == "train"]
    return (train[-1].get("step"), train[-1].get("elapsed_s")) if train else (None, None)


def curves_png(named_dirs: list[tuple[str, Path]], baseline: dict | None = None, final: dict | None = None,
               n_table: int | None = None, legend_out: dict | None = None) -> dict[str, bytes]:
    """One PNG per metric: value against step (left) and against wall time (right), all runs, each
    method in its fixed colour (METHOD_COLORS; seeds of a method share it).

    baseline: the SFT row's table values (accuracy, reward, kl_token), drawn as a dashed line on
    every plot, labelled with the data it was measured on. final: {run label: its table values};
    runs with a final KL (every method, whether or not it logs one while training) get a marker at
    their last step. n_table: held-out prompts behind the table's values."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [lab for lab, _ in named_dirs]
    n_curve = sorted({c.get("eval_prompts") for _, d in named_dirs if (c := _run_config(d)).get("eval_data")
                      and isinstance(c.get("eval_prompts"), int)})
    n_curve_s = "/".join(str(n) for n in n_curve) if n_curve else "N"
    n_table_s = str(n_table) if n_table else "the"
    out = {}
    for name, title, ylabel, keys, kind, table_key in CURVES:
        data = [(label, d, *_series(d, keys, kind)) for label, d in named_dirs]
        data = [x for x in data if x[2]]
        ends = []
        for label, d in named_dirs:
            # the SFT model is the baseline line itself, the base model is not trained from it
            v = (final or {}).get(label, {}).get(table_key) if name == "kl" and method_of(label) not in (
                "sft", "base") else None
            if _is_finite(v):
                ends.append((label, *_last_point(d), v))
        if not data and not ends:
            continue
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.6))
        for label, _, xs, ts, ys in data:
            c = method_color(label, labels)
            a1.plot(xs, ys, label=label, color=c, marker="o" if len(xs) < 15 else None, ms=3)
            pts = [(t, y) for t, y in zip(ts, ys) if _is_finite(t)]
            if pts:
                a2.plot([p[0] for p in pts], [p[1] for p in pts], label=label, color=c,
                        marker="o" if len(pts) < 15 else None, ms=3)
        drawn = {lab for lab, *_ in data}
        for label, step, t, v in ends:
            c = method_color(label, labels)
            tag = None if label in drawn else label  # a method with no KL curve still gets its legend entry
            if step is not None:
                a1.plot([step], [v], marker="X", ms=8, color=c, linestyle="none", label=tag, markeredgecolor="white")
            if _is_finite(t):
                a2.plot([t], [v], marker="X", ms=8, color=c, linestyle="none", label=tag, markeredgecolor="white")
        base = (baseline or {}).get(table_key)
        if name == "kl":
            base = 0.0 if baseline is not None else None
        if _is_finite(base):
            what = "the reference itself" if name == "kl" else f"greedy, {n_table_s} held-out prompts"
            for a in (a1, a2):
                a.axhline(base, color=METHOD_COLORS["sft"], linestyle="--", linewidth=1,
                          label=f"SFT baseline: {base:.3g} ({what})" if a is a2 else None)
        a1.set_xlabel("training step")
        a2.set_xlabel("wall time (s)")
        for a in (a1, a2):
            a.set_ylabel(ylabel, fontsize=8)
            a.grid(alpha=0.3)
            a.tick_params(labelsize=8)
        a2.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
        fig.suptitle(title.format(n_curve=n_curve_s, n_table=n_table_s), fontsize=9.5)
        if legend_out is not None:  # what each figure shows: {figure: {legend label: colour}, title}
            from matplotlib.colors import to_hex

            legend_out[name] = {"title": fig._suptitle.get_text(), "lines": {
                ln.get_label(): to_hex(ln.get_color()) for a in (a1, a2) for ln in a.get_lines()
                if not ln.get_label().startswith("_")}}
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
        plt.close(fig)
        out[name] = buf.getvalue()
    return out


_SORT_JS = """
document.querySelectorAll('table.sortable th').forEach(function (th, col) {
  th.addEventListener('click', function () {
    var table = th.closest('table'), body = table.tBodies[0];
    var asc = th.getAttribute('data-dir') !== 'asc';
    table.querySelectorAll('th').forEach(function (h) { h.removeAttribute('data-dir'); });
    th.setAttribute('data-dir', asc ? 'asc' : 'desc');
    var rows = Array.prototype.slice.call(body.rows);
    function key(r) {
      var t = r.cells[col].getAttribute('data-v');
      var n = parseFloat(t);
      return isNaN(n) ? t : n;
    }
    rows.sort(function (a, b) {
      var x = key(a), y = key(b);
      if (x === y) return 0;
      if (typeof x !== typeof y) return typeof x === 'number' ? -1 : 1;
      return (x < y ? -1 : 1) * (asc ? 1 : -1);
    });
    rows.forEach(function (r) { body.appendChild(r); });
  });
});
"""

_CSS = """
body { font-family: -apple-system, 'Segoe UI', Roboto, sans-serif; margin: 2rem auto; max-width: 1200px;
       padding: 0 1rem; color: #1d1d1f; }
h1 { font-size: 1.5rem; } h2 { font-size: 1.15rem; margin-top: 2rem; }
table { border-collapse: collapse; width: 100%; font-size: 0.85rem; }
th, td { border-bottom: 1px solid #ddd; padding: 0.35rem 0.5rem; text-align: right; }
th { background: #f5f5f7; cursor: pointer; position: sticky; top: 0; }
th[data-dir=asc]::after { content: ' \\25B2'; } th[data-dir=desc]::after { content: ' \\25BC'; }
td.t, th.t { text-align: left; }
tr.bad td { color: #b00020; }
img { max-width: 100%; height: auto; border: 1px solid #eee; margin: 0.5rem 0; }
.scroll { overflow-x: auto; -webkit-overflow-scrolling: touch; }
.samples td { text-align: left; font-family: ui-monospace, monospace; font-size: 0.8rem; vertical-align: top; }
.samples td.prompt { white-space: pre-wrap; font-family: inherit; min-width: 14rem; }
.samples td.right b { color: #1a7f37; } .samples td.wrong b { color: #b00020; }
.sw { display: inline-block; width: 0.7em; height: 0.7em; margin-right: 0.35em; border-radius: 2px; }
.note { color: #666; font-size: 0.85rem; }
td.t:first-child { white-space: nowrap; }
@media (max-width: 600px) { body { margin: 1rem auto; padding: 0 0.5rem; } table { font-size: 0.75rem; }
  h1 { font-size: 1.2rem; } h2 { font-size: 1rem; }
  .fig img { max-width: none; width: 760px; } }
"""


def _html_table(rows: list[dict], columns, cls: str = "sortable") -> str:
    cols = [c for c in columns if any(r.get(c[0]) not in (None, "") for r in rows)]
    head = "".join(f'<th class="{"t" if k in ("method", "needs", "status", "model") else ""}">{html.escape(h)}</th>'
                   for k, h, _ in cols)
    body = []
    names = [str(r.get("method") or r.get("model") or "") for r in rows]
    for r in rows:
        bad = r.get("status") in ("diverged", "failed") or r.get("diverged")
        cells = []
        for k, _, f in cols:
            v = r.get(k)
            sortv = v if _is_finite(v) else ("" if v is None else str(v))
            text = html.escape(_cell(r, k, f))
            if k in ("method", "model") and isinstance(v, str):
                text = _swatch(v, names) + text
            cells.append(f'<td class="{"t" if k in ("method", "needs", "status", "model") else ""}" '
                         f'data-v="{html.escape(str(sortv))}">{text}</td>')
        body.append(f'<tr class="{"bad" if bad else ""}">' + "".join(cells) + "</tr>")
    return (f'<div class="scroll"><table class="{cls}"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table></div>')


def _swatch(name: str, others: list[str]) -> str:
    """A small square in the method's plot colour."""
    return f'<span class="sw" style="background:{method_color(name, others)}"></span>'


def _sample_item(s) -> dict:
    """A stored sample: a dict (prompt, ref_answer, completion, correct) or, from older results, a string."""
    return s if isinstance(s, dict) else {"completion": s}


def _verdict(ok) -> str:
    return "" if ok is None else (" ✓" if ok else " ✗")


def _samples_markdown(samples: list[tuple[str, list]]) -> list[str]:
    n = max(len(s) for _, s in samples)
    first = [_sample_item(x) for x in samples[0][1]]
    md = ["| # | prompt | correct answer | " + " | ".join(m for m, _ in samples) + " |",
          "|---|---|---|" + "---|" * len(samples)]

    def esc(t) -> str:
        return str(t or "").replace("|", "\\|").replace("\n", " ")

    for i in range(n):
        p = first[i] if i < len(first) else {}
        cells = []
        for _, items in samples:
            it = _sample_item(items[i]) if i < len(items) else {}
            ans = esc(it.get("completion"))
            cells.append(("`" + ans + "`" if ans else "*(empty answer)*" if it else "") + _verdict(it.get("correct")))
        md.append(f"| {i + 1} | {esc(p.get('prompt'))} | `{esc(p.get('ref_answer'))}` | " + " | ".join(cells) + " |")
    return md


def _samples_html(samples: list[tuple[str, list]]) -> str:
    n = max(len(s) for _, s in samples)
    names = [m for m, _ in samples]
    first = [_sample_item(x) for x in samples[0][1]]
    head = "<th class='t'>#</th><th class='t'>prompt</th><th class='t'>correct answer</th>" + "".join(
        f"<th class='t'>{_swatch(m, names)}{html.escape(m)}</th>" for m in names)
    body = []
    for i in range(n):
        p = first[i] if i < len(first) else {}
        cells = [f"<td>{i + 1}</td>", f"<td class='prompt'>{html.escape(str(p.get('prompt') or ''))}</td>",
                 f"<td class='ref'>{html.escape(str(p.get('ref_answer') or ''))}</td>"]
        for _, items in samples:
            it = _sample_item(items[i]) if i < len(items) else {}
            ok = it.get("correct")
            cls = "" if ok is None else ("right" if ok else "wrong")
            mark = "" if ok is None else (" <b>✓ right</b>" if ok else " <b>✗ wrong</b>")
            text = html.escape(str(it.get("completion") or "")) or ("<i>(empty answer)</i>" if it else "")
            cells.append(f"<td class='{cls}'>{text}{mark}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return (f"<div class='scroll'><table class='samples'><thead><tr>{head}</tr></thead>"
            f"<tbody>{''.join(body)}</tbody></table></div>")


RM_COLUMNS = [("model", "reward model", "{}"), ("accuracy", "held-out pair accuracy", "{:.3f}"),
              ("margin", "mean margin", "{:.3f}"), ("ece_before", "ECE before calibration", "{:.3f}"),
              ("ece_after", "ECE after calibration", "{:.3f}"),
              # held-out accuracy per kind of rejected answer (toy pairs)
              ("acc_format", "vs wrong format", "{:.3f}"), ("acc_dropped_item", "vs dropped item", "{:.3f}"),
              ("acc_digit_slip", "vs digit slip", "{:.3f}"), ("acc_off_by", "vs off by a little", "{:.3f}"),
              ("wall_s", "wall time (s)", "{:.0f}")]


def build_report(run_dirs: list[Path | str], out_dir: Path | str, title: str = "alignkit report",
                 demo_results: dict | None = None, note: str = "") -> dict:
    """Write report.md and report.html into out_dir; return the rows and the Markdown table."""
    rows: list[dict] = []
    rm_rows: list[dict] = []
    curve_dirs: list[tuple[str, Path]] = []
    final: dict[str, dict] = {}  # run label -> its table values (demo folders)
    baseline: dict | None = None
    n_table: int | None = None
    for d in map(Path, run_dirs):
        if not d.is_dir():
            raise UserError(f"{d}: not a run folder; pass folders written by alignkit (output_dir of a run or demo)")
        res = demo_results if (demo_results is not None and len(run_dirs) == 1) else None
        if res is None and (d / "results.json").exists():
            res = json.loads((d / "results.json").read_text(encoding="utf-8"))
        if res is not None:
            r, rm, runs = _demo_rows(res)
            rows += r
            rm_rows += rm
            for key, rec in runs.items():
                if rec.get("dir") and (Path(rec["dir"]) / "metrics.jsonl").exists() and not key.startswith("rm_"):
                    curve_dirs.append((key, Path(rec["dir"])))
                    if isinstance(rec.get("eval"), dict):
                        final[key] = rec["eval"]
            sft = runs.get("sft") or {}
            if isinstance(sft.get("eval"), dict):
                baseline = sft["eval"]
                ev = Path(sft.get("dir", "")) / "eval_greedy" / "eval.json"
                if ev.is_file():
                    n_table = json.loads(ev.read_text(encoding="utf-8")).get("n_prompts")
        elif (d / "metrics.jsonl").exists() or (d / "config.yaml").exists():
            rows.append(_single_run_row(d))
            curve_dirs.append((d.name, d))
        else:
            raise UserError(f"{d}: no metrics.jsonl or results.json; pass folders written by alignkit runs")
    if not rows:
        raise UserError("nothing to report: the folders hold no runs")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(rows)
    legend: dict = {}
    pngs = curves_png(curve_dirs, baseline=baseline, final=final, n_table=n_table, legend_out=legend)
    for name, data in pngs.items():
        (out / f"curve_{name}.png").write_bytes(data)
    md = [f"# {title}", ""]
    if note:
        md += [note, ""]
    md += [table, ""]
    if rm_rows:
        md += ["## Reward models", "", markdown_table(rm_rows, RM_COLUMNS), ""]
    for name in pngs:
        md += [f"### {FIGURE_TITLES.get(name, name)}", "", f"![{name}](curve_{name}.png)", ""]
    samples = [(r["method"], r.get("samples") or []) for r in rows if r.get("samples")]
    sample_title = ("Sample answers: the same held-out prompts, greedy; ✓ / ✗: the answer's total equals the "
                    "correct answer's")
    if samples:
        md += [f"## {sample_title}", ""] + _samples_markdown(samples) + [""]
    _atomic_write(out / "report.md", "\n".join(md))

    # on a phone a figure keeps a readable size and scrolls sideways in its own box
    imgs = "".join(f'<h2>{html.escape(FIGURE_TITLES.get(n, n))}</h2><div class="scroll fig"><img alt="{html.escape(n)} '
                   f'curves" src="data:image/png;base64,{base64.b64encode(b).decode()}"></div>' for n, b in pngs.items())
    sample_html = f"<h2>{html.escape(sample_title)}</h2>{_samples_html(samples)}" if samples else ""
    rm_html = f"<h2>Reward models</h2>{_html_table(rm_rows, RM_COLUMNS)}" if rm_rows else ""
    page = (f"<!doctype html><html lang='en'><head><meta charset='utf-8'>"
            f"<meta name='viewport' content='width=device-width, initial-scale=1'><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"
            f"<p class='note'>{html.escape(note)} Click a column header to sort.</p>"
            f"{_html_table(rows, COLUMNS)}{rm_html}{imgs}{sample_html}<script>{_SORT_JS}</script></body></html>")
    _atomic_write(out / "report.html", page)
    return {"rows": rows, "rm_rows": rm_rows, "table_text": table, "figures": list(pngs), "legend": legend}


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
