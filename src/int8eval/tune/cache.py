"""What a `tune` run has finished, kept beside its run folder so that a rerun with the same arguments after a kill
(or Ctrl-C, or a crash) reuses it instead of building, evaluating and timing every candidate again.

OUT/.tune-cache/<fingerprint>/ holds key.json (what decided the results: the arguments but --out and --time-budget,
the checkpoint file, the images, the int8eval and backend library versions, the CPU's INT8 capabilities), one JSON
record per finished candidate (its TuneCandidate, rewritten when it is confirmed), each backend's FP32 timing and the
sensitivity ranking. Every record is written atomically as soon as it is known. The cache lives outside the run's
staging folder, which a kill leaves and the next run deletes; it is removed once a tune run is committed (its report
is then the record). A rerun whose fingerprint differs says so and starts afresh.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from int8eval.config import Recipe, TuneConfig
from int8eval.errors import RunFolderError
from int8eval.report.folder import write_atomic
from int8eval.report.sections import TuneCandidate
from int8eval.resume import differences, environment_key, fingerprint, images_digest, stamp

CACHE = ".tune-cache"
KEY = "key.json"


def key(config: TuneConfig, *, calibration: Iterable[tuple[str, Path]], tuning: Iterable[tuple[str, Path]],
        confirmation: Iterable[tuple[str, Path]], training: Iterable[tuple[str, Path]]) -> dict[str, Any]:
    """Everything that decides a candidate's result (image sets as (id, path) pairs). --out, --time-budget and --ray
    are left out: the first is where the cache is, the second only decides when the climb stops, the third where."""
    return {
        "arguments": config.model_dump(mode="json", exclude={"out", "time_budget_s", "ray", "ray_workers"}),
        "checkpoint file": stamp(config.checkpoint),
        "labels file": stamp(config.labels),
        "calibration images": images_digest(calibration),
        "tuning images": images_digest(tuning),
        "confirmation images": images_digest(confirmation),
        "training images": images_digest(training),
        **environment_key(),  # library versions (int8eval's among them) and the CPU
    }


def _file(kind: str, name: str) -> str:
    # Variant names may hold any character a layer name holds: the file is named by a digest, the record says more.
    return f"{kind}-{hashlib.sha256(name.encode()).hexdigest()[:16]}.json"


def candidate_file(backend: str, name: str) -> str:
    """The file name of candidate `name`'s record (on `backend`), as `TuneCache.records` lists it."""
    return _file("candidate", f"{backend}/{name}")


class TuneCache:
    """The finished work of this tune's arguments in OUT/.tune-cache/<fingerprint>/. Open with `TuneCache.open`."""

    def __init__(self, folder: Path | None, say: Callable[[str], None], key: dict[str, Any] | None = None) -> None:
        self.folder, self.say, self.key = folder, say, key

    @classmethod
    def open(cls, out: Path, k: dict[str, Any], say: Callable[[str], None]) -> TuneCache:
        """The cache of key `k` under OUT; caches of other arguments are said and removed (one tune per OUT)."""
        root = Path(out) / CACHE
        folder = root / fingerprint(k)
        others = [p for p in root.iterdir() if p != folder] if root.is_dir() else []
        for other in others:
            try:
                old = json.loads((other / KEY).read_text())
            except (OSError, ValueError):
                old = {}
            say(f"tune cache in {root} is from other arguments ({differences(old, k)}); starting afresh")
            if other.is_dir():
                shutil.rmtree(other, ignore_errors=True)
            else:
                other.unlink(missing_ok=True)
        cache = cls(folder, say, k)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            for tmp in folder.glob(".*.tmp-*"):  # writes a kill cut short
                tmp.unlink(missing_ok=True)
            if not (folder / KEY).is_file():
                write_atomic(folder / KEY, json.dumps(k, indent=1, sort_keys=True))
        except (OSError, RunFolderError) as e:
            cache._off(e)
            return cache
        found = len(list(folder.glob("candidate-*.json")))
        if found:
            say(f"tune cache in {root}: {found} candidates finished by a run that was cut short are reused")
        return cache

    def _off(self, error: Exception) -> None:
        # A cache that cannot be written costs a rerun its head start, never this run.
        self.say(f"cannot write the tune cache in {self.folder} ({error}): a rerun after a kill will start afresh")
        self.folder = None

    def _read(self, name: str) -> dict | None:
        if self.folder is None:
            return None
        try:
            return json.loads((self.folder / name).read_text())
        except (OSError, ValueError):
            return None

    def _write(self, name: str, record: dict) -> None:
        if self.folder is None:
            return
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            write_atomic(self.folder / name, json.dumps(record, indent=1))
        except (OSError, RunFolderError) as e:
            self._off(e)

    def candidate(self, recipe: Recipe) -> TuneCandidate | None:
        """The finished candidate of `recipe`, marked reused; None when there is none (or it was of another recipe)."""
        record = self._read(candidate_file(recipe.backend.value, recipe.name))
        if record is None or record.get("recipe") != recipe.model_dump(mode="json"):
            return None
        try:
            c = TuneCandidate.model_validate(record)
        except ValidationError:  # written by another version: measured again
            return None
        c.reused = True
        return c

    def save_candidate(self, c: TuneCandidate) -> None:
        record = json.loads(c.model_dump_json())
        record.pop("reused", None)
        self._write(candidate_file(c.backend, c.name), record)

    def fp32(self, backend: str) -> dict | None:
        """A backend's FP32 {"name", "throughput_ips", "size_mb"}, as its climb first measured it."""
        return self._read(_file("fp32", backend))

    def save_fp32(self, backend: str, record: dict) -> None:
        self._write(_file("fp32", backend), record)

    def records(self) -> dict[str, str]:
        """Every finished record, by file name: what a Ray worker's climb hands back to the driver's cache."""
        if self.folder is None or not self.folder.is_dir():
            return {}
        return {p.name: p.read_text() for p in sorted(self.folder.glob("*.json")) if p.name != KEY}

    def absorb(self, records: dict[str, str]) -> None:
        """Write `records` (another cache's `records()`, of the same key) as if this run had finished them."""
        for name, text in records.items():
            if Path(name).name != name or not name.endswith(".json") or name == KEY:
                raise ValueError(f"not a tune cache record: {name!r}")
            self._write(name, json.loads(text))

    def ranking(self) -> dict | None:
        """The sensitivity ranking {"layers", "images", "seconds"} the FP32-layers steps used."""
        return self._read("ranking.json")

    def save_ranking(self, record: dict) -> None:
        self._write("ranking.json", record)


def remove(out: Path) -> None:
    """Drop OUT's tune cache: the committed run's report is the record now."""
    shutil.rmtree(Path(out) / CACHE, ignore_errors=True)
