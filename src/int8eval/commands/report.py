"""`int8eval report`: re-render a run folder's report.md/.html from its report.json, without re-running; with a
budget, re-judge its verdicts first."""

from __future__ import annotations

from pathlib import Path

from int8eval.config import Acceptance
from int8eval.report import rendered_paths, rerender
from int8eval.verdict import apply_to_run_dir


def report(run_dir: Path, acceptance: Acceptance | None = None) -> list[Path]:
    """Re-render RUN_DIR (refusing a folder whose files are not all from its report.json's run); with `acceptance`,
    re-judge every variant against it and rewrite report.json first. Returns the files written.

    Example:
        >>> report(Path("runs/lite0"), Acceptance(max_drop=1.0))
    """
    if acceptance is None:
        return rerender(run_dir)
    apply_to_run_dir(run_dir, acceptance)
    return rendered_paths(run_dir)
