"""What an interrupted command finished, kept beside its run folder so that a rerun with the same arguments goes on
from there: the fingerprint of everything that decides a result (shared by `run --resume` and `tune`'s cache), and
the evaluation checkpoint of `run --resume`.

OUT/.run-resume/<fingerprint>/ holds key.json (the arguments but --out and --resume, the checkpoint and labels files,
the images, the int8eval and backend library versions, the CPU's INT8 capabilities) and partial.npz: the per-image
predictions of the images evaluated so far, rewritten atomically every `every` images. The folder lives outside the
run's staging folder (which a kill leaves and the next run deletes) and is removed once the run is committed.

The variants are built again by the resumed run. Their artifacts' bytes are not compared (an OpenVINO IR or a PT2E
archive differs from build to build in what does not change a number); instead `evaluate` runs the rebuilt variants on
the first batch again and goes on only if they give the saved predictions exactly.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from int8eval.environment import cpu_capabilities, library_versions
from int8eval.errors import ConfigError, RunFolderError
from int8eval.report.folder import write_atomic

RUN_RESUME = ".run-resume"
KEY = "key.json"
PARTIAL = "partial.npz"


def stamp(path: Path | None) -> list | None:
    """(resolved path, size, mtime) of a file: a changed file changes the fingerprint without reading it whole."""
    if path is None:
        return None
    try:
        st = Path(path).stat()
    except OSError:
        return [str(path), None, None]
    return [str(Path(path).resolve()), st.st_size, st.st_mtime_ns]


def images_digest(items: Iterable[tuple[str, Path]]) -> str:
    """sha256 over (id, size, mtime) of every image of a set, in order."""
    h = hashlib.sha256()
    for image_id, path in items:
        try:
            st = Path(path).stat()
            h.update(f"{image_id}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{image_id}\0missing\n".encode())
    return h.hexdigest()


def environment_key() -> dict[str, Any]:
    """What a result depends on besides the arguments and the files: library versions (int8eval's among them), CPU."""
    return {"libraries": library_versions(), "cpu": cpu_capabilities().model_dump(mode="json")}


def fingerprint(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]


def differences(old: dict[str, Any], new: dict[str, Any]) -> str:
    """What changed, briefly: the arguments by name with both values; when they are the same, what else changed (the
    images an argument picks change with it, so they are not said beside it)."""
    old_args, new_args = old.get("arguments", {}), new["arguments"]
    said = [f"{name} {json.dumps(old_args.get(name))} -> {json.dumps(new_args.get(name))}"
            for name in sorted(set(old_args) | set(new_args)) if old_args.get(name) != new_args.get(name)]
    said = said or [name for name in new if name != "arguments" and old.get(name) != new[name]]
    text = "; ".join(said) or "unreadable key"
    return text if len(text) <= 200 else text[:197] + "..."


class EvalCheckpoint:
    """`evaluate`'s partial state of one run in OUT/.run-resume/<fingerprint>/ (`open_checkpoint`). `every`: images
    between saves, a multiple of the batch size so that a resumed pass sees the same batches as an uninterrupted
    one (batch composition can change a backend's numbers)."""

    def __init__(self, folder: Path, every: int, say) -> None:
        self.folder, self.every, self.say = folder, every, say

    def load(self) -> dict | None:
        """The saved state ({"done", "meta": {...}, "arrays": {...}}), or None when there is none or it is unreadable."""
        try:
            with np.load(self.folder / PARTIAL) as z:
                meta = json.loads(str(z["meta"]))
                arrays = {k: z[k] for k in z.files if k != "meta"}
        except (OSError, ValueError, KeyError, EOFError) as e:
            if (self.folder / PARTIAL).exists():
                self.say(f"cannot read {self.folder / PARTIAL} ({type(e).__name__}): evaluating from the first image")
            return None
        return {"done": int(meta["done"]), "meta": meta, "arrays": arrays}

    def save(self, meta: dict, arrays: dict[str, np.ndarray]) -> None:
        buffer = io.BytesIO()
        np.savez(buffer, meta=np.asarray(json.dumps(meta)), **arrays)
        try:
            write_atomic(self.folder / PARTIAL, buffer.getvalue())
        except RunFolderError as e:  # a checkpoint that cannot be written costs a rerun its head start, never this run
            self.say(f"cannot write the resume checkpoint ({e}); a rerun will start from the first image")


def open_checkpoint(out: Path, key: dict[str, Any], *, resume: bool, every: int, say) -> EvalCheckpoint:
    """The checkpoint of `key` under OUT. With `resume`, a checkpoint of other arguments or data is refused (the
    ConfigError names what changed); without it, any earlier checkpoint is dropped and the run starts afresh."""
    root = Path(out) / RUN_RESUME
    folder = root / fingerprint(key)
    others = [p for p in root.iterdir() if p != folder] if root.is_dir() else []
    if resume and others and not (folder / PARTIAL).exists():
        raise ConfigError(
            f"--resume: the interrupted run in {out} had other arguments or data "
            f"({differences(_read_key(others[0]), key)}); rerun it as it was, or drop --resume to start afresh"
        )
    if resume and not (folder / PARTIAL).exists():
        say(f"--resume: nothing to resume in {out}; evaluating from the first image")
    for other in others:
        shutil.rmtree(other, ignore_errors=True) if other.is_dir() else other.unlink(missing_ok=True)
    if not resume and (folder / PARTIAL).exists():
        (folder / PARTIAL).unlink()
    folder.mkdir(parents=True, exist_ok=True)
    for tmp in folder.glob(".*.tmp-*"):  # writes a kill cut short
        tmp.unlink(missing_ok=True)
    if not (folder / KEY).is_file():
        write_atomic(folder / KEY, json.dumps(key, indent=1, sort_keys=True))
    return EvalCheckpoint(folder, every, say)


def _read_key(folder: Path) -> dict:
    try:
        return json.loads((folder / KEY).read_text())
    except (OSError, ValueError):
        return {}


def remove(out: Path) -> None:
    """Drop OUT's resume checkpoints: the committed run's predictions.npz is the record now."""
    shutil.rmtree(Path(out) / RUN_RESUME, ignore_errors=True)
