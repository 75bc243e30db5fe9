"""A killed or interrupted `int8eval tune` rerun with the same arguments reuses the candidates it finished
(OUT/.tune-cache), ends with the report an uninterrupted run writes, and starts afresh when an argument changed."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

import int8eval.commands.tune as tune_module
from int8eval.config import Backend, CalibMethod, Recipe
from int8eval.evaluate import Predictions
from int8eval.report import Report
from int8eval.report.sections import Status, TuneCandidate
from int8eval.tune.cache import CACHE, TuneCache, remove

from conftest import WNIDS, require_package, write_image
from test_tune import FAST, _config, _Spy

require_package("onnx", "onnxruntime", extra="onnxruntime")

@pytest.fixture
def eighteen_images(tmp_path):  # as test_tune's
    root = tmp_path / "data"
    for c, wnid in enumerate(WNIDS):
        for i in range(6):
            write_image(root / wnid / f"{wnid}_{i}.JPEG", seed=10 * c + i)
    return root


CHEAP = {"calibration", "activation type", "bias correction off", "FP32 layers"}
TIMED = {"latency_ms", "throughput_ips", "speedup_vs_fp32", "build_s", "time_s", "reused"}


class _Interrupt:
    """Raises KeyboardInterrupt (Ctrl-C) at the first evaluation `when(variant names, number of images)` picks,
    while armed; records every recipe built."""

    def __init__(self, monkeypatch, when) -> None:
        self.armed, self.built = True, []
        evaluate, build = tune_module.evaluate, tune_module.build_variants

        def interrupted(samples, preprocessing, variants, **kw):
            if self.armed and when([v.name for v in variants], len(samples)):
                raise KeyboardInterrupt
            return evaluate(samples, preprocessing, variants, **kw)

        def recorded(session, recipes, *args, **kw):
            recipes = list(recipes)
            self.built += [r.name for r in recipes]
            return build(session, recipes, *args, **kw)

        monkeypatch.setattr(tune_module, "evaluate", interrupted)
        monkeypatch.setattr(tune_module, "build_variants", recorded)


def _said() -> tuple[Console, io.StringIO]:
    text = io.StringIO()
    return Console(file=text, width=400), text


def _measured(report: Report):
    """The tune section without what timing decides (speeds, seconds, the Pareto front, the reason's numbers)."""
    t = report.tune
    return ([{k: v for k, v in c.model_dump(mode="json").items() if k not in TIMED} for c in t.candidates],
            [(b.backend, b.fp32, b.chosen, b.stopped) for b in t.backends], t.choice,
            t.ranking.layers if t.ranking else None, t.sets)


def _cached(out: Path) -> list[Path]:
    return sorted((out / CACHE).glob("*/candidate-*.json"))


def test_an_interrupted_tune_reruns_reusing_what_it_finished_and_ends_as_an_uninterrupted_one(
        tmp_path, eighteen_images, monkeypatch):
    spy = _Spy(monkeypatch, 5, lambda name, on: name.endswith("-keep2"))  # the ladder is climbed to FP32 layers
    ladder = tune_module.ladder  # its cheap steps only: resuming is what is tested here, test_tune tests the ladder
    monkeypatch.setattr(tune_module, "ladder", lambda *a, **kw: [s for s in ladder(*a, **kw) if s.name in CHEAP])
    stop = _Interrupt(monkeypatch, lambda names, n: any("-keep" in name for name in names))  # Ctrl-C at FP32 layers
    config = _config(tmp_path, eighteen_images, (Backend.onnxruntime,), max_fp32_layers=2, out=tmp_path / "cut")
    with pytest.raises(KeyboardInterrupt):
        tune_module.tune(config, console=_said()[0])
    assert not (config.out / "report.json").exists() and len(_cached(config.out)) >= 4

    stop.armed, stop.built, spy.calls = False, [], []
    console, said = _said()
    resumed = tune_module.tune(config, console=console)
    t = resumed.tune
    reused = [c.name for c in t.candidates if c.reused]
    before = [c.step for c in t.candidates].index("FP32 layers")  # the step the interruption cut short
    assert reused == [c.name for c in t.candidates[:before]] and len(reused) >= 4
    assert t.choice.endswith("-keep2") and not any(c.reused for c in t.candidates[before:])
    assert not set(stop.built) & set(reused)  # neither built,
    assert all(not set(names) & set(reused) for _, names in spy.calls)  # nor evaluated again
    assert "reused" in said.getvalue() and "reused the sensitivity ranking" in said.getvalue()
    assert not (config.out / CACHE).exists()  # the committed report is the record now
    again = Report.read(config.out / "report.json")
    assert [c.reused for c in again.tune.candidates] == [c.reused for c in t.candidates]

    whole = tune_module.tune(config.model_copy(update={"out": tmp_path / "whole"}), console=_said()[0])
    assert not any(c.reused for c in whole.tune.candidates) and not (tmp_path / "whole" / CACHE).exists()
    assert _measured(resumed) == _measured(whole)
    a, b = Predictions.load(config.out / "predictions.npz"), Predictions.load(tmp_path / "whole" / "predictions.npz")
    assert a.image_ids == b.image_ids and np.array_equal(a.labels, b.labels)
    for table in ("top5", "kl_to_ref", "cos_to_ref"):
        x, y = getattr(a, table), getattr(b, table)
        assert x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x), table


def test_a_changed_argument_reuses_nothing_and_says_so(tmp_path, eighteen_images, monkeypatch):
    _Spy(monkeypatch, 5, lambda name, on: True)  # the default is accepted and confirmed: a short climb
    stop = _Interrupt(monkeypatch, lambda names, n: n == 7)  # Ctrl-C at the confirmation
    config = _config(tmp_path, eighteen_images, (Backend.onnxruntime,))
    with pytest.raises(KeyboardInterrupt):
        tune_module.tune(config, console=_said()[0])
    assert len(_cached(config.out)) == 1

    stop.armed, stop.built = False, []
    console, said = _said()
    report = tune_module.tune(config.model_copy(update={"calib_size": 5}), console=console)
    assert f"tune cache in {config.out / CACHE} is from other arguments (calib_size 4 -> 5); starting afresh" in \
        said.getvalue()
    assert not any(c.reused for c in report.tune.candidates) and report.tune.candidates[0].name in stop.built
    assert report.tune.sets.calibration == 5 and not (config.out / CACHE).exists()


def test_the_cache_keeps_records_of_its_own_arguments_and_recipes_only(tmp_path):
    lines: list[str] = []
    key = {"arguments": {"calib_size": 4, "seed": 0}, "tuning images": "abc"}
    cache = TuneCache.open(tmp_path, key, lines.append)
    recipe = Recipe(backend=Backend.onnxruntime, calib=CalibMethod.minmax)
    c = TuneCandidate(backend="onnxruntime", step="calibration", name=recipe.name,
                      recipe=recipe.model_dump(mode="json"), status=Status.ok, size_mb=1.5)
    cache.save_candidate(c)
    cache.save_fp32("onnxruntime", {"name": "onnxruntime-fp32", "throughput_ips": 10.0, "size_mb": 3.0})

    again = TuneCache.open(tmp_path, key, lines.append)
    found = again.candidate(recipe)
    assert found.reused and found.size_mb == 1.5 and found.model_dump(exclude={"reused"}) == c.model_dump()
    assert again.fp32("onnxruntime")["size_mb"] == 3.0 and again.fp32("openvino") is None
    same_name = recipe.model_copy(update={"percentile": 99.0})  # another recipe under the same variant name
    assert same_name.name == recipe.name and again.candidate(same_name) is None
    assert lines == [f"tune cache in {tmp_path / CACHE}: 1 candidates finished by a run that was cut short are reused"]

    other = TuneCache.open(tmp_path, {**key, "tuning images": "def"}, lines.append)
    assert other.candidate(recipe) is None and "from other arguments (tuning images); starting afresh" in lines[-1]
    assert len(list((tmp_path / CACHE).iterdir())) == 1
    remove(tmp_path)
    assert not (tmp_path / CACHE).exists()


# The killed process: timing as short as the other tests', and a pause right after the first candidate is recorded,
# where the SIGKILL lands (a run is never killed between two of its own writes by chance alone in a test).
KILLED = """
import sys, time
import int8eval.commands.tune as tune
from int8eval.tune.cache import TuneCache
tune.TIMING = {timing!r}
save = TuneCache.save_candidate
def save_then_wait(self, c):
    save(self, c)
    time.sleep(120)
TuneCache.save_candidate = save_then_wait
from int8eval.cli import main
main(sys.argv[1:], prog_name="int8eval")
"""


def test_a_sigkilled_tune_reruns_reusing_its_finished_candidate_into_a_valid_run_folder(
        tmp_path, eighteen_images, monkeypatch):
    from click.testing import CliRunner

    from int8eval.cli import main

    out = tmp_path / "killed"
    args = ["tune", "-m", "tiny_test", "--data", str(eighteen_images), "--out", str(out), "--max-drop", "1",
            "--backend", "onnxruntime", "--calib-size", "4", "--tune-size", "5", "--confirm-size", "7",
            "--batch-size", "4", "--max-fp32-layers", "0"]
    log = tmp_path / "killed.log"
    with open(log, "wb") as stderr:
        proc = subprocess.Popen([sys.executable, "-c", KILLED.format(timing=FAST), *args], cwd=tmp_path,
                                stdout=subprocess.DEVNULL, stderr=stderr)
        try:
            deadline = time.monotonic() + 120
            while not _cached(out) and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            assert _cached(out), f"no candidate recorded (exit {proc.poll()}): {log.read_text()[-2000:]}"
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL and not (out / "report.json").exists()
    recorded = [json.loads(p.read_text())["name"] for p in _cached(out)]
    assert len(recorded) == 1 and list(out.glob(".partial-*"))  # the default's record; the staging the kill left

    monkeypatch.setattr(tune_module, "TIMING", FAST)
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    report = Report.read(out / "report.json")
    first = report.tune.candidates[0]
    assert first.name == recorded[0] and first.reused and first.tuning.n == 5
    assert not any(c.reused for c in report.tune.candidates[1:])
    assert not (out / CACHE).exists() and not list(out.glob(".partial-*"))
    checked = CliRunner().invoke(main, ["report", str(out)])  # verifies every file against report.json's sha256
    assert checked.exit_code == 0, checked.output
