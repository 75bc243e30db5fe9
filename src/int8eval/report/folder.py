"""A run folder: every file written whole or not at all, tied to its report.json, replaced only by a complete run.

A run writes everything into OUT/.partial-<run_id>/ and writes its report.json there last, so a staging folder that
holds a report.json is a complete run. `commit` then moves it into OUT entry by entry, report.json last.
report.json records the sha256 of predictions.npz and of every artifact, so a folder caught between two runs is
refused (`verify`) instead of being read as one run; and a commit that was cut short (the process killed) is
finished by the next `int8eval run` or `int8eval report` on the folder (`recover`). OUT is locked (flock) while a run
or a report writes to it, so two of them never interleave.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import IO

from int8eval.errors import ConfigError, RunFolderError

STAGING_PREFIX = ".partial-"
REPORT = "report.json"
PREDICTIONS = "predictions.npz"
ARTIFACTS = "artifacts"
DEPLOY = "deploy"  # int8eval tune: the chosen model of each backend with its manifest
FOLDERS = (ARTIFACTS, DEPLOY)  # folders a run writes, each replacing the previous run's as a whole
RENDERED = ("report.md", "report.html")


def new_run_id() -> str:
    return f"{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms cannot open a folder; the rename is still atomic there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes | str | Callable[[IO[bytes]], None]) -> None:
    """Write `data` (bytes, text, or a function writing to a binary file) to `path`: into a temporary file beside it,
    fsync'd, then renamed over `path`. A failure (disk full) leaves whatever `path` held before untouched."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise RunFolderError(f"cannot write {path}: {e.strerror or e}; what {path.name} held before is untouched") from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
        os.fsync(f.fileno())  # the run's files reach the disk before the report.json that vouches for them
    return h.hexdigest()


def checksums(run_dir: Path) -> dict[str, str]:
    """sha256 of predictions.npz and of every file under artifacts/ and deploy/, by path relative to `run_dir`
    (POSIX)."""
    run_dir = Path(run_dir)
    files = [run_dir / PREDICTIONS] if (run_dir / PREDICTIONS).is_file() else []
    for folder in FOLDERS:
        files += sorted(p for p in (run_dir / folder).rglob("*") if p.is_file() and not p.is_symlink())
    return {p.relative_to(run_dir).as_posix(): sha256(p) for p in files}


def check_out(out: Path) -> Path:
    """Create OUT if needed; a one-line ConfigError when it is a file or cannot be written to (before any work)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a folder: give a folder for the run (it is created if missing)")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".int8eval-write-test-{uuid.uuid4().hex[:8]}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"--out {out} cannot be written to ({e.strerror or e}): give a folder you can write to") from e
    return out


@contextmanager
def locked(run_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on RUN_DIR (released when the process ends, however it ends)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    if not Path(run_dir).is_dir():
        raise RunFolderError(f"{run_dir} is not a run folder: it does not exist or is not a folder")
    fd = os.open(run_dir, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunFolderError(
                f"another int8eval command is writing into {run_dir} now; try again when it has finished"
            ) from None
        except OSError:  # a file system without locks (some network ones): go on unlocked
            pass
        yield
    finally:
        os.close(fd)


def stagings(run_dir: Path) -> list[Path]:
    return sorted(p for p in Path(run_dir).glob(STAGING_PREFIX + "*") if p.is_dir() and not p.is_symlink())


def commit(staging: Path, out: Path) -> None:
    """Move the complete run in `staging` into `out`, report.json last. Idempotent: a commit cut short anywhere is
    finished by calling it again."""
    # Every file a command wrote beside report.json (predictions.npz, report.md/.html, bench.json, sensitivity.json,
    # seed_table.md ...), then artifacts/ and deploy/, then report.json.
    for path in sorted(staging.iterdir()):
        if path.is_file() and not path.is_symlink() and path.name != REPORT and not path.name.startswith("."):
            os.replace(path, out / path.name)
    for folder in FOLDERS:
        new, old = staging / folder, out / folder
        if not new.exists():
            continue
        if old.exists() or old.is_symlink():
            trash = staging / f".old-{folder}"  # the previous run's, moved aside here, deleted with the staging folder
            if trash.exists():
                shutil.rmtree(trash)
            os.replace(old, trash)  # a folder cannot be renamed over a non-empty one
        os.replace(new, old)
    _fsync_dir(out)
    os.replace(staging / REPORT, out / REPORT)
    _fsync_dir(out)
    shutil.rmtree(staging, ignore_errors=True)


def recover(run_dir: Path) -> None:
    """Finish the newest commit cut short in RUN_DIR and delete unfinished staging folders and temporary files of
    writes that were cut short. Hold `locked` first."""
    for tmp in Path(run_dir).glob(".*.tmp-????????"):
        if tmp.is_file() and not tmp.is_symlink():
            tmp.unlink(missing_ok=True)
    pending = stagings(run_dir)
    complete = [p for p in pending if (p / REPORT).is_file()]
    newest = max(complete, key=lambda p: (p / REPORT).stat().st_mtime, default=None)
    for p in pending:
        if p == newest:
            try:
                commit(p, Path(run_dir))
            except OSError as e:
                raise RunFolderError(f"cannot finish moving the run in {p} into {run_dir}: {e}") from e
        else:
            shutil.rmtree(p, ignore_errors=True)


class Staging:
    """Where a new run is written before it replaces OUT's previous one (see `new_run`)."""

    def __init__(self, out: Path, run_id: str) -> None:
        self.out, self.run_id = Path(out), run_id
        self.path = self.out / f"{STAGING_PREFIX}{run_id}"

    def final(self, path: str | Path) -> str:
        """Where `path`, written under the staging folder, will be once the run is committed."""
        text, prefix = str(path), str(self.path)
        return str(self.out) + text[len(prefix):] if text == prefix or text.startswith(prefix + os.sep) else text

    def moved(self, value):
        """`value` (JSON-like) with every path under the staging folder replaced by its place after the commit."""
        if isinstance(value, str):
            return self.final(value)
        if isinstance(value, dict):
            return {k: self.moved(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self.moved(v) for v in value]
        return value


@contextmanager
def new_run(out: Path) -> Iterator[Staging]:
    """Check and lock OUT, finish or clear what an interrupted run left there, and yield a Staging to write the new
    run into. When the block ends without an exception, the staging folder must hold its report.json: it then
    replaces OUT's run. On an exception it is deleted and OUT is left as it was."""
    out = check_out(out)
    with locked(out):
        recover(out)
        staging = Staging(out, new_run_id())
        try:
            staging.path.mkdir()
        except OSError as e:
            raise ConfigError(f"--out {out} cannot be written to ({e.strerror or e}): give a folder you can write to") from e
        try:
            yield staging
        except BaseException:
            shutil.rmtree(staging.path, ignore_errors=True)
            raise
        if not (staging.path / REPORT).is_file():
            shutil.rmtree(staging.path, ignore_errors=True)
            raise RunFolderError(f"the run in {staging.path} has no report.json; {out} was left as it was")
        try:
            commit(staging.path, out)
        except OSError as e:  # the staging folder is complete: `int8eval report OUT` finishes the commit
            raise RunFolderError(
                f"cannot move the finished run into {out} ({e}); `int8eval report {out}` finishes the move"
            ) from e


def verify(run_dir: Path, report) -> None:
    """Refuse a run folder whose predictions.npz or artifacts are not the files its report.json was written with."""
    run_dir = Path(run_dir)
    run = f"run {report.run_id}" if report.run_id else "its run"
    again = f"re-run `int8eval run ... --out {run_dir}`"
    for rel, digest in (report.files or {}).items():
        path = run_dir / rel
        if not path.is_file():
            raise RunFolderError(f"{path} is missing, but {run_dir / REPORT} ({run}) lists it: the folder does not "
                                 f"hold one complete run; {again}")
        if sha256(path) != digest:
            raise RunFolderError(f"{path} is not the file {run_dir / REPORT} ({run}) was written with (its sha256 "
                                 f"differs): it comes from another run or was changed; {again}")


def check_predictions(report, preds, path: Path) -> None:
    """Refuse predictions that cannot be the ones `report` was measured on (also for reports without checksums)."""
    n = report.data.num_images
    measured = [v.name for v in report.variants if v.top1 is not None and v.status != "error"]
    missing = [name for name in measured if name not in preds.top5]
    if len(preds.labels) != n or missing:
        found = f"{len(preds.labels)} images" + (f", no predictions of {', '.join(missing)}" if missing else "")
        raise RunFolderError(f"{path} does not belong to its report.json, which says {n} images were evaluated "
                             f"({found}): the folder mixes two runs; re-run to write it again")
