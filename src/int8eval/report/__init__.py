"""Report schema and writers: report.json is the truth; report.md and report.html are rendered from it."""

from __future__ import annotations

from pathlib import Path

from int8eval.errors import RunFolderError
from int8eval.report import folder
from int8eval.report.folder import write_atomic
from int8eval.report.markdown import render_markdown
from int8eval.report.schema import SCHEMA_VERSION, Report

__all__ = ["SCHEMA_VERSION", "Report", "render", "render_html", "render_markdown", "rendered_paths", "rerender",
           "write_rendered"]


def render_html(report: Report) -> str:
    """The standalone report.html for `report` (matplotlib is imported only here)."""
    from int8eval.report.html import render_html as _render_html

    return _render_html(report)


def rendered_paths(run_dir: Path) -> list[Path]:
    """The files `render` writes: RUN_DIR/report.md and RUN_DIR/report.html."""
    return [Path(run_dir) / "report.md", Path(run_dir) / "report.html"]


def write_rendered(report: Report, run_dir: Path) -> list[Path]:
    """Write RUN_DIR/report.md and report.html for `report`, each atomically. A report.json whose sections do not hold
    what int8eval writes there (edited by hand, or by someone else) gives a RunFolderError, not a traceback."""
    md, html = rendered_paths(run_dir)
    try:
        texts = [render_markdown(report), render_html(report)]
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        raise RunFolderError(
            f"{Path(run_dir) / 'report.json'} cannot be rendered ({type(e).__name__}: {e}): one of its sections does "
            "not hold what int8eval writes there; was it edited?"
        ) from e
    for path, text in zip((md, html), texts):
        write_atomic(path, text)
    return [md, html]


def render(run_dir: Path) -> list[Path]:
    """(Re-)render report.md and report.html from RUN_DIR/report.json without re-running anything."""
    return write_rendered(Report.read(Path(run_dir) / "report.json"), run_dir)


def rerender(run_dir: Path) -> list[Path]:
    """`int8eval report RUN_DIR`: finish a run's move into RUN_DIR if it was cut short, check that predictions.npz
    and the artifacts are the ones report.json was written with, and re-render report.md/.html."""
    run_dir = Path(run_dir)
    with folder.locked(run_dir):
        folder.recover(run_dir)
        report = Report.read(run_dir / "report.json")
        folder.verify(run_dir, report)
        return write_rendered(report, run_dir)
