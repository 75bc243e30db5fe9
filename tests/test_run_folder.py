"""A run folder is one run: written whole (temporary names renamed into place), tied to its report.json (run id and
sha256 of predictions.npz and artifacts), replaced only by a complete run; a folder that is not one run is refused
with a message, never judged; the CLI's exit codes are 2 for usage errors and 1 for failures."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from int8eval.cli import main
from int8eval.evaluate import Predictions
from int8eval.report import folder


def _cli(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def _run(image_folder: Path, out: Path, *extra: str):
    return _cli("run", "-m", "tiny_test", "--data", image_folder, "--out", out, "--fp32-only", "--batch-size", "5",
                "--workers", "0", *extra)


def _no_traceback(result) -> None:
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception


@pytest.fixture
def two_runs(image_folder, tmp_path):
    """Two complete runs of different images: A (all 12) and B (a subset of 7)."""
    a, b = tmp_path / "A", tmp_path / "B"
    assert _run(image_folder, a).exit_code == 0
    assert _run(image_folder, b, "--max-images", "7").exit_code == 0
    return a, b


def test_a_run_records_its_files_and_a_rerun_replaces_them_all(image_folder, tmp_path):
    out = tmp_path / "run"
    assert _run(image_folder, out).exit_code == 0
    first = json.loads((out / "report.json").read_text())
    assert first["run_id"] and set(first["files"]) >= {"predictions.npz", "artifacts/torch-fp32.pt"}
    assert first["files"]["predictions.npz"] == folder.sha256(out / "predictions.npz")
    assert first["variants"][0]["artifact"] == str(out / "artifacts" / "torch-fp32.pt")  # not the staging folder
    (out / "artifacts" / "stale.onnx").write_bytes(b"from an older run")
    (out / "sensitivity.json").write_text("{}")  # not the run's: kept

    result = _run(image_folder, out, "--max-images", "7")
    assert result.exit_code == 0, result.output
    second = json.loads((out / "report.json").read_text())
    assert second["run_id"] != first["run_id"] and second["data"]["num_images"] == 7
    assert len(Predictions.load(out / "predictions.npz").labels) == 7
    assert not (out / "artifacts" / "stale.onnx").exists()  # artifacts/ is replaced whole
    assert (out / "sensitivity.json").exists()
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["artifacts", "predictions.npz", "report.html", "report.json", "report.md", "sensitivity.json"])
    assert _cli("report", out).exit_code == 0


@pytest.mark.parametrize("swap", ["predictions.npz", "artifacts/torch-fp32.pt"])
def test_report_refuses_files_of_another_run(two_runs, swap):
    a, b = two_runs
    before = (a / "report.json").read_bytes()
    if swap == "predictions.npz":
        shutil.copy(b / swap, a / swap)
    else:  # the same tiny model saves the same bytes in both runs: another model file under the old report
        (a / swap).write_bytes(b"another model")
    for args in (["report", a], ["report", a, "--max-drop", "1"]):
        result = _cli(*args)
        assert result.exit_code == 1, result.output
        assert f"{a / swap} is not the file" in result.output and "another run" in result.output
        _no_traceback(result)
    assert (a / "report.json").read_bytes() == before  # never judged, never rewritten


def test_report_refuses_a_mix_even_without_checksums(two_runs):
    """A report.json written before checksums existed: the predictions must still have its number of images."""
    a, b = two_runs
    data = json.loads((a / "report.json").read_text())
    data.pop("files"), data.pop("run_id")
    (a / "report.json").write_text(json.dumps(data))
    assert _cli("report", a, "--max-drop", "1").exit_code == 0  # an old complete run is still judged
    shutil.copy(b / "predictions.npz", a / "predictions.npz")
    result = _cli("report", a, "--max-drop", "1")
    assert result.exit_code == 1 and "12 images were evaluated (7 images)" in result.output, result.output


@pytest.mark.parametrize("case, expected", [
    ("no report.json", "holds no complete run"),
    ("truncated report.json", "is not valid JSON"),
    ("report.json not UTF-8", "cannot read"),
    ("truncated predictions.npz", "predictions.npz is not the file"),
    ("predictions.npz missing", "predictions.npz is missing"),
    ("not a folder", "is a file"),
])
def test_report_on_a_broken_folder_says_what_is_wrong(image_folder, tmp_path, case, expected):
    out = tmp_path / "run"
    assert _run(image_folder, out).exit_code == 0
    target = out
    if case == "no report.json":
        (out / "report.json").unlink()
    elif case == "truncated report.json":
        (out / "report.json").write_bytes((out / "report.json").read_bytes()[:500])
    elif case == "report.json not UTF-8":
        (out / "report.json").write_bytes(b"\xff\xfe{" + b"\x00" * 10)
    elif case == "truncated predictions.npz":
        (out / "predictions.npz").write_bytes((out / "predictions.npz").read_bytes()[:100])
    elif case == "predictions.npz missing":
        (out / "predictions.npz").unlink()
    else:
        target = out / "report.md"
    result = _cli("report", target, "--max-drop", "1")
    assert result.exit_code in (1, 2) and expected in result.output, result.output
    _no_traceback(result)


def test_truncated_predictions_of_an_old_report_are_refused(image_folder, tmp_path):
    out = tmp_path / "run"
    assert _run(image_folder, out).exit_code == 0
    data = json.loads((out / "report.json").read_text())
    data.pop("files")
    (out / "report.json").write_text(json.dumps(data))
    (out / "predictions.npz").write_bytes((out / "predictions.npz").read_bytes()[:100])
    result = _cli("report", out, "--max-drop", "1")
    assert result.exit_code == 1 and "cannot be read" in result.output and "truncated" in result.output, result.output


def _disk_full_on(name: str, monkeypatch) -> None:
    """Writes of files named `name` (through their temporary name) fail as on a full disk."""
    real_open = open

    class Full:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            self.f.write(bytes(data)[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __getattr__(self, attr):
            return getattr(self.f, attr)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def fake_open(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        return Full(f) if Path(path).name.startswith(f".{name}.tmp") and "w" in mode else f

    monkeypatch.setattr(folder, "open", fake_open, raising=False)


@pytest.mark.parametrize("name", ["report.json", "predictions.npz", "report.html"])
def test_a_full_disk_leaves_the_previous_run_intact(image_folder, tmp_path, monkeypatch, name):
    out = tmp_path / "run"
    assert _run(image_folder, out).exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    _disk_full_on(name, monkeypatch)
    result = _run(image_folder, out, "--max-images", "7")
    assert result.exit_code == 1 and "No space left on device" in result.output, result.output
    _no_traceback(result)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    # No staging folder, no temporary file left behind; only the evaluation checkpoint a --resume rerun goes on from,
    # complete (its own writes are atomic).
    assert [p.name for p in out.glob(".*")] == [".run-resume"]
    assert not [p for p in (out / ".run-resume").rglob("*") if ".tmp" in p.name]
    if name == "report.json":  # re-judging with another budget rewrites report.json: the same guarantee
        result = _cli("report", out, "--max-drop", "1")
        assert result.exit_code == 1 and "No space left on device" in result.output
        assert (out / "report.json").read_bytes() == before["report.json"]
    monkeypatch.undo()
    assert _cli("report", out).exit_code == 0


def test_out_that_is_a_file_or_not_writable_is_refused_before_any_work(image_folder, tmp_path, monkeypatch):
    import int8eval.session

    def no_work(*args, **kwargs):
        raise AssertionError("the model was loaded before --out was checked")

    monkeypatch.setattr(int8eval.session, "load_model", no_work)
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    for out, message in [(a_file, "is a file, not a folder"), (a_file / "sub", "cannot be written to"),
                         (Path("/proc/int8eval-test"), "cannot be written to")]:
        result = _run(image_folder, out)
        assert result.exit_code == 2 and message in result.output, result.output
        _no_traceback(result)
        assert len([line for line in result.output.splitlines() if line.strip()]) <= 3  # usage, hint, the error


def test_an_interrupted_move_is_finished_by_report(two_runs, monkeypatch):
    """The new run was complete in its staging folder when the move into OUT stopped halfway: `int8eval report`
    finishes it, and gives the new run, whole."""
    a, b = two_runs
    staging = a / ".partial-20990101T000000Z-deadbeef"
    staging.mkdir()
    for p in b.iterdir():
        (shutil.copytree if p.is_dir() else shutil.copy)(p, staging / p.name)
    real_replace, calls = os.replace, []

    def replace_then_die(src, dst):
        calls.append(dst)
        if len(calls) == 3:
            raise KeyboardInterrupt  # stands in for a kill: nothing after this runs
        real_replace(src, dst)

    monkeypatch.setattr(folder.os, "replace", replace_then_die)
    with pytest.raises(KeyboardInterrupt):
        folder.commit(staging, a)
    monkeypatch.undo()
    assert json.loads((a / "report.json").read_text())["data"]["num_images"] == 12  # still A's report ...
    assert _cli("report", a, "--max-drop", "1").exit_code == 0  # ... until report finishes the move
    assert (a / "report.json").read_bytes() != (b / "report.json").read_bytes()  # re-judged ...
    assert json.loads((a / "report.json").read_text())["run_id"] == json.loads((b / "report.json").read_text())["run_id"]
    assert (a / "predictions.npz").read_bytes() == (b / "predictions.npz").read_bytes()
    assert not staging.exists()


def test_a_folder_being_written_is_not_written_by_another_command(image_folder, tmp_path):
    out = tmp_path / "run"
    assert _run(image_folder, out).exit_code == 0
    before = (out / "report.json").read_bytes()
    (out / ".report.json.tmp-0123abcd").write_bytes(b"{")  # what a write cut short leaves
    with folder.locked(out):  # as a run in progress holds it
        for result in (_run(image_folder, out, "--max-images", "7"), _cli("report", out, "--max-drop", "1")):
            assert result.exit_code == 1 and "another int8eval command is writing" in result.output, result.output
    assert (out / "report.json").read_bytes() == before
    assert _cli("report", out).exit_code == 0
    assert not (out / ".report.json.tmp-0123abcd").exists()


def test_exit_codes_usage_2_failure_1(image_folder, tmp_path):
    out = tmp_path / "run"
    usage = [
        ["run", "-m", "tiny_test", "--no-such-flag"],  # click's own
        ["run", "-m", "tiny_test", "--data", image_folder, "--out", out, "--batch-size", "0", "--fp32-only"],  # invalid
        ["report", tmp_path, "--drop", "relative"],  # ConfigError: --drop without --max-drop
        ["report", tmp_path / "missing"],  # click: the folder does not exist
    ]
    for args in usage:
        result = _cli(*args)
        assert result.exit_code == 2, (args, result.output)
        _no_traceback(result)
    failures = [
        ["report", tmp_path],  # no report.json: a failure, not a usage error
        ["run", "-m", "tiny_test", "--data", tmp_path / "empty", "--out", out, "--fp32-only"],  # no images
    ]
    (tmp_path / "empty").mkdir()
    for args in failures:
        result = _cli(*args)
        assert result.exit_code == 1, (args, result.output)
        _no_traceback(result)


# --- the kill test: a re-run SIGKILLed anywhere leaves the old run, the new one, or a refusal; never a mix ----------

_DRIVER = textwrap.dedent('''
    """Re-run into OUT (a complete run, restored from PRISTINE before each try) in forked children killed with
    SIGKILL: by the parent at a seeded random time, or by the child itself before its k-th rename (the staging
    writes and the commit are all renames). After each try OUT is copied to RESULTS/<i> for the test to judge.
    The heavy imports (and matplotlib's first figure) are done once, before any fork."""
    import json, os, random, shutil, signal, sys, time
    import torch  # noqa: F401 - imported, never run, before forking
    import int8eval.commands.run, int8eval.report.html  # noqa: F401
    from int8eval.cli import main
    from int8eval.report import folder, plots
    plots.plt.close(plots.plt.figure())

    out, pristine, results, data, seed, every = sys.argv[1:7]
    args = ["run", "-m", "tiny_test", "--data", data, "--out", out, "--fp32-only", "--batch-size", "5",
            "--workers", "0", "--max-images", "7"]

    def child(kill_before_rename):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1), os.dup2(devnull, 2)
        real, count = os.replace, [0]
        def replace(src, dst):
            count[0] += 1
            if count[0] == kill_before_rename:
                os.kill(os.getpid(), signal.SIGKILL)
            real(src, dst)
        folder.os.replace = replace
        try:
            main(args)
        except SystemExit as e:
            with open(os.path.join(results, "renames"), "w") as f:
                f.write(str(count[0]))
            os._exit(e.code or 0)
        os._exit(0)

    def attempt(i, at=None, kill_before_rename=0):
        shutil.rmtree(out)
        shutil.copytree(pristine, out, symlinks=True)
        start = time.perf_counter()
        pid = os.fork()
        if pid == 0:
            child(kill_before_rename)
        reaped = None  # the child's status when it ended before the kill time (it is reaped then: no second wait)
        while at is not None and time.perf_counter() - start < at:
            if (ended := os.waitpid(pid, os.WNOHANG))[0]:
                reaped = ended[1]
                break
            time.sleep(0.002)
        else:
            if at is not None:
                os.kill(pid, signal.SIGKILL)
        status = reaped if reaped is not None else os.waitpid(pid, 0)[1]
        shutil.copytree(out, os.path.join(results, str(i)), symlinks=True)
        return time.perf_counter() - start, status

    took, status = attempt(0)  # uninterrupted: how long a run takes and how many renames it does
    assert status == 0, status
    with open(os.path.join(results, "renames")) as f:
        renames = int(f.read())
    rng = random.Random(int(seed))
    ks = range(1, renames + 1) if every == "all" else sorted(rng.sample(range(1, renames + 1), 3))
    times = sorted(rng.uniform(0.0, took) for _ in range(5 if every == "all" else 2))
    i = 1
    for k in ks:
        attempt(i, kill_before_rename=k)
        i += 1
    for at in times:
        attempt(i, at=at)
        i += 1
    print(json.dumps({"tries": i, "run_s": took, "renames": renames, "kill_before_rename": list(ks), "kill_at_s": times}))
''')


@pytest.mark.parametrize("every", [
    "sample",  # 3 of the renames and 2 times, seeded: ~40 s on 2 busy cores
    pytest.param("all", marks=pytest.mark.slow),  # before every rename, and 5 times
])
def test_a_rerun_killed_anywhere_leaves_one_whole_run(image_folder, tmp_path, every):
    out, pristine, results = tmp_path / "out", tmp_path / "pristine", tmp_path / "results"
    assert _run(image_folder, out).exit_code == 0
    shutil.copytree(out, pristine)
    results.mkdir()
    old_report, old_preds = (out / "report.json").read_bytes(), (out / "predictions.npz").read_bytes()
    done = subprocess.run([sys.executable, "-c", _DRIVER, str(out), str(pristine), str(results), str(image_folder), "12",
                           every], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["renames"] >= 8  # 4 files written in the staging folder, then the commit's moves
    outcomes = []
    for i in range(summary["tries"]):
        d = results / str(i)
        result = _cli("report", d)
        _no_traceback(result)
        if result.exit_code != 0:  # refused: must say so clearly
            assert result.exit_code == 1 and str(d) in result.output, result.output
            outcomes.append("refused")
            continue
        assert not list(d.glob(folder.STAGING_PREFIX + "*"))
        report = json.loads((d / "report.json").read_text())
        preds = Predictions.load(d / "predictions.npz")
        if (d / "report.json").read_bytes() == old_report:
            assert (d / "predictions.npz").read_bytes() == old_preds
            outcomes.append("old")
        else:
            assert report["data"]["num_images"] == 7 == len(preds.labels)
            assert report["files"] == folder.checksums(d)
            assert np.isclose(preds.correct1("torch-fp32").mean(), report["variants"][0]["top1"])
            outcomes.append("new")
    assert outcomes[0] == "new", outcomes
    by_rename = outcomes[1:len(summary["kill_before_rename"]) + 1]
    # Killed before report.json reached the staging folder: the old run. After: the new one, whose move `report`
    # finishes. Never a refusal, never a mix.
    assert by_rename == sorted(by_rename, key=["old", "new"].index), outcomes
    if every == "all":
        assert by_rename[0] == "old" and by_rename[-1] == "new", outcomes
