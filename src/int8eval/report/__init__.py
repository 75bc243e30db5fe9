"""Report schema and writers: report.json is the truth; report.md (and report.html) are rendered from it."""

from __future__ import annotations

from pathlib import Path

from int8eval.report.markdown import render_markdown
from int8eval.report.schema import SCHEMA_VERSION, Report

__all__ = ["SCHEMA_VERSION", "Report", "render", "render_markdown"]


def render(run_dir: Path) -> list[Path]:
    """(Re-)render report.md from RUN_DIR/report.json without re-running anything."""
    report = Report.read(Path(run_dir) / "report.json")
    md = Path(run_dir) / "report.md"
    md.write_text(render_markdown(report))
    return [md]
