"""Report schema and writers: report.json is the truth; report.md and report.html are rendered from it."""

from __future__ import annotations

from pathlib import Path

from int8eval.report.markdown import render_markdown
from int8eval.report.schema import SCHEMA_VERSION, Report

__all__ = ["SCHEMA_VERSION", "Report", "render", "render_html", "render_markdown", "rendered_paths"]


def render_html(report: Report) -> str:
    """The standalone report.html for `report` (matplotlib is imported only here)."""
    from int8eval.report.html import render_html as _render_html

    return _render_html(report)


def rendered_paths(run_dir: Path) -> list[Path]:
    """The files `render` writes: RUN_DIR/report.md and RUN_DIR/report.html."""
    return [Path(run_dir) / "report.md", Path(run_dir) / "report.html"]


def render(run_dir: Path) -> list[Path]:
    """(Re-)render report.md and report.html from RUN_DIR/report.json without re-running anything."""
    report = Report.read(Path(run_dir) / "report.json")
    md, html = rendered_paths(run_dir)
    md.write_text(render_markdown(report))
    html.write_text(render_html(report))
    return [md, html]
