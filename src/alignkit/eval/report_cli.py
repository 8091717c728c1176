"""`alignkit report RUN_DIR [RUN_DIR ...]`: one report over several runs."""

from __future__ import annotations

from pydantic import Field

from alignkit.config import Section


class ReportConfig(Section):
    """Build the comparison table, curves and samples for run folders (training runs or demo folders)."""

    runs: list[str] = Field(default_factory=list, description="Run folders (positional): output_dir of alignkit runs")
    output: str | None = Field(None, description="Folder for report.md / report.html (default: the first run folder, "
                                                 "or runs/report for several)")
    title: str = Field("alignkit report", description="Report title")


def run_report(cfg: ReportConfig) -> dict:
    from alignkit.errors import UserError
    from alignkit.eval.report import build_report

    if not cfg.runs:
        raise UserError("report: pass one or more run folders, e.g. alignkit report runs/grpo runs/rloo")
    out = cfg.output or (cfg.runs[0] if len(cfg.runs) == 1 else "runs/report")
    res = build_report(cfg.runs, out, title=cfg.title)
    print(res["table_text"])
    print(f"wrote {out}/report.md and {out}/report.html")
    return res
