"""The commands, each a short composition of the session stages (int8eval.session) that returns a Report and writes
it, with what it measured, into a run folder (`write_run`): run, bench, diagnose, reproduce; `report` re-renders one."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from int8eval.report import Report, write_rendered
from int8eval.report import folder as run_folder


def write_run(out: Path, body: Callable[[Path], Report]) -> Report:
    """Run `body(staging)` into a staging folder under `out`, then seal its report (run id, sha256 of every file,
    report.md/.html, report.json last) and move it into `out` in place of the previous run. A body that fails or is
    killed leaves the previous run as it was (int8eval.report.folder)."""
    with run_folder.new_run(Path(out)) as staging:  # OUT checked (a folder we can write to) before any work
        report = body(staging.path)
        report = Report.model_validate(staging.moved(report.model_dump(mode="json")))
        report.run_id = staging.run_id
        report.files = run_folder.checksums(staging.path)
        write_rendered(report, staging.path)
        report.write(staging.path / "report.json")
    return report
