"""`int8eval run --resume`: a run killed (SIGKILL) while it evaluates goes on from its last checkpoint and ends with
the predictions.npz of an uninterrupted run, bit for bit; other arguments are refused by name; without --resume a
run starts afresh."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import int8eval.commands.run as run_module
from int8eval.cli import main
from int8eval.resume import PARTIAL, RUN_RESUME

from conftest import WNIDS, require_package, write_image

require_package("onnx", "onnxruntime", extra="onnxruntime")

EVERY = 8  # images between checkpoints in these tests (two batches of 4)

# The killed process: checkpoints every EVERY images, and each save followed by a pause of `pause` seconds, so that
# the kill lands after a known number of saves (or, with pause 0, wherever the clock says).
KILLED = """
import sys, time
import int8eval.commands.run as run
from int8eval.resume import EvalCheckpoint
run.CHECKPOINT_IMAGES = {every}
save = EvalCheckpoint.save
def save_then_wait(self, meta, arrays):
    save(self, meta, arrays)
    time.sleep({pause})
EvalCheckpoint.save = save_then_wait
from int8eval.cli import main
main(sys.argv[1:], prog_name="int8eval")
"""


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("resume") / "data"
    for c, wnid in enumerate(WNIDS):
        for i in range(12):
            write_image(root / wnid / f"{wnid}_{i}.JPEG", seed=100 * c + i)
    return root


def _args(images: Path, out: Path, *more: str) -> list[str]:
    return ["run", "-m", "tiny_test", "--data", str(images), "--out", str(out), "--calib-size", "4",
            "--batch-size", "4", *more]


@pytest.fixture(scope="module")
def uninterrupted(images, tmp_path_factory) -> dict[str, np.ndarray]:
    out = tmp_path_factory.mktemp("whole") / "run"
    with pytest.MonkeyPatch.context() as m:
        m.setattr(run_module, "CHECKPOINT_IMAGES", EVERY)
        result = CliRunner().invoke(main, _args(images, out))
    assert result.exit_code == 0, result.output
    assert not (out / RUN_RESUME).exists()  # removed once the run is committed
    return _arrays(out)


def _arrays(out: Path) -> dict[str, np.ndarray]:
    with np.load(out / "predictions.npz") as z:
        return {k: z[k] for k in z.files}


def _kill(images: Path, out: Path, pause: float, when, committed_ok: bool = False) -> None:
    """Start `int8eval run` in a subprocess and SIGKILL it once `when(out)` holds (`committed_ok`: also after it
    wrote its run folder, before it exited)."""
    log = out.parent / f"{out.name}.log"
    with open(log, "wb") as stderr:
        proc = subprocess.Popen([sys.executable, "-c", KILLED.format(every=EVERY, pause=pause), *_args(images, out)],
                                stdout=subprocess.DEVNULL, stderr=stderr)
        try:
            deadline = time.monotonic() + 180
            while not when(out) and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
            assert proc.poll() is None, f"ended before the kill (exit {proc.returncode}): {log.read_text()[-2000:]}"
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL and (committed_ok or not (out / "report.json").exists())


def _saved(out: Path) -> int:
    """Images the checkpoint under OUT covers (0: none yet)."""
    found = list((out / RUN_RESUME).glob(f"*/{PARTIAL}"))
    if not found:
        return 0
    import json

    with np.load(found[0]) as z:
        return json.loads(str(z["meta"]))["done"]


def _resume(images: Path, out: Path, *more: str):
    with pytest.MonkeyPatch.context() as m:
        m.setattr(run_module, "CHECKPOINT_IMAGES", EVERY)
        return CliRunner().invoke(main, _args(images, out, "--resume", *more))


@pytest.mark.parametrize("saves", [1, 2])
def test_a_run_killed_after_a_checkpoint_resumes_into_the_same_predictions(images, uninterrupted, tmp_path, saves):
    out = tmp_path / "run"
    _kill(images, out, pause=120, when=lambda o: _saved(o) >= saves * EVERY)
    assert _saved(out) == saves * EVERY
    result = _resume(images, out)
    assert result.exit_code == 0, result.output
    resumed = _arrays(out)
    assert resumed.keys() == uninterrupted.keys()
    for key, a in uninterrupted.items():
        np.testing.assert_array_equal(resumed[key], a, err_msg=key)
    assert "evaluating from the first image" not in result.output  # it did resume
    assert not (out / RUN_RESUME).exists()


def test_a_run_killed_at_a_random_moment_resumes_into_the_same_predictions(images, uninterrupted, tmp_path):
    """No pause: the kill lands wherever a random delay after the first checkpoint puts it (mid-batch, mid-save,
    after the pass), and the rerun still ends with the same predictions."""
    out = tmp_path / "run"
    delay = random.Random().uniform(0.0, 1.5)
    started: list[float] = []

    def when(o: Path) -> bool:
        if not started and _saved(o):
            started.append(time.monotonic())
        return bool(started) and time.monotonic() - started[0] >= delay

    try:
        _kill(images, out, pause=0, when=when, committed_ok=True)
    except AssertionError as e:
        if "ended before the kill" not in str(e):
            raise
        pytest.skip(f"the run finished within {delay:.2f} s of its first checkpoint: nothing left to kill")
    result = _resume(images, out)
    assert result.exit_code == 0, result.output
    resumed = _arrays(out)
    for key, a in uninterrupted.items():
        np.testing.assert_array_equal(resumed[key], a, err_msg=f"{key} (killed {delay:.2f} s after a checkpoint)")


def test_resume_refuses_other_arguments_naming_them(images, tmp_path):
    out = tmp_path / "run"
    _kill(images, out, pause=120, when=lambda o: _saved(o) >= EVERY)
    result = _resume(images, out, "--seed", "1")
    assert result.exit_code != 0
    assert "--resume" in result.output and "seed 0 -> 1" in result.output and "drop --resume" in result.output
    assert _saved(out) == EVERY  # nothing lost: the checkpoint is still there for the right arguments


def test_without_resume_a_run_starts_afresh_and_resume_with_nothing_says_so(images, tmp_path, uninterrupted):
    out = tmp_path / "run"
    _kill(images, out, pause=120, when=lambda o: _saved(o) >= EVERY)
    spy = []
    evaluate = run_module.measure

    def counted(session, plan, built, **kw):
        spy.append(kw["checkpoint"].load())
        return evaluate(session, plan, built, **kw)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(run_module, "CHECKPOINT_IMAGES", EVERY)
        m.setattr(run_module, "measure", counted)
        result = CliRunner().invoke(main, _args(images, out))
    assert result.exit_code == 0, result.output
    assert spy == [None]  # the earlier checkpoint was dropped, not used
    result = _resume(images, tmp_path / "fresh")
    assert result.exit_code == 0 and "nothing to resume" in result.output
    for key, a in uninterrupted.items():
        np.testing.assert_array_equal(_arrays(tmp_path / "fresh")[key], a, err_msg=key)
