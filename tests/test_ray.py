"""`int8eval run --ray`: the evaluation images sharded over a local Ray cluster of 2 workers give the predictions.npz
of a single-process run, array for array (tiny model, PyTorch and ONNX Runtime, FP32 and INT8); a worker whose process
dies is restarted and its shard retried, with the same result; without Ray, --ray names the extra to install. One
cluster (`ray.init(num_cpus=2)`) for the module, shut down after it; no mocks."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from int8eval.cli import main
from int8eval.commands.tune import _climb_task as _CLIMB_TASK
from int8eval.config import RunConfig
from int8eval.distributed import ShardWorker, shards

from conftest import WNIDS, require_package, write_image

require_package("onnx", "onnxruntime", extra="onnxruntime")

BACKENDS = ["--backend", "torch", "--backend", "onnxruntime"]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ray") / "data"
    for c, wnid in enumerate(WNIDS):
        for i in range(8):
            write_image(root / wnid / f"{wnid}_{i}.JPEG", seed=200 * c + i)
    return root


def _args(images: Path, out: Path, *more: str, backends: list[str] = BACKENDS) -> list[str]:
    # 20 evaluation images in batches of 4: 5 shards of one batch over the 2 workers; the FP32 reference compiled by
    # inductor, as from 1,000 images on (`--reference auto`), on the driver and on each worker
    return ["run", "-m", "tiny_test", "--data", str(images), "--out", str(out), "--calib-size", "4",
            "--batch-size", "4", "--reference", "compiled", *backends, *more]


ORT = ["--backend", "onnxruntime"]  # cheaper than torch's INT8 (compiled): for the runs that test the machinery


def _arrays(out: Path) -> dict[str, np.ndarray]:
    with np.load(out / "predictions.npz") as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def cluster():
    """A local Ray cluster of 2 CPUs for this module; its workers import int8eval and this module (CrashOnce) from
    the paths this process has."""
    require_package("ray", extra="ray")
    import ray

    paths = [str(Path(__file__).parent), *sys.path]
    with pytest.MonkeyPatch.context() as m:
        m.setenv("PYTHONPATH", os.pathsep.join(p for p in paths if p))
        ray.init(num_cpus=2, include_dashboard=False, logging_level="warning")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def single(images, tmp_path_factory) -> dict[str, np.ndarray]:
    out = tmp_path_factory.mktemp("single") / "run"
    result = CliRunner().invoke(main, _args(images, out))
    assert result.exit_code == 0, result.output
    return _arrays(out)


def _worker_folders() -> set[Path]:
    """The workers' temporary build folders (on this machine, the local cluster's only node)."""
    import tempfile

    return set(Path(tempfile.gettempdir()).glob("int8eval-ray-*"))


def _same(a: dict[str, np.ndarray], b: dict[str, np.ndarray], subset: bool = False) -> None:
    """The same arrays (`subset`: `a`'s are some of `b`'s, as a run of fewer backends gives)."""
    assert set(a) <= set(b) if subset else sorted(a) == sorted(b), (sorted(a), sorted(b))
    for key in a:
        assert np.array_equal(a[key], b[key]), key


def test_two_workers_give_the_single_process_predictions(cluster, images, single, tmp_path):
    out, before = tmp_path / "run", _worker_folders()
    result = CliRunner().invoke(main, _args(images, out, "--ray", "--ray-workers", "2"))
    assert result.exit_code == 0, result.output
    assert _worker_folders() <= before  # removed by the workers
    report = json.loads((out / "report.json").read_text())
    assert all(v["status"] == "ok" for v in report["variants"]), [(v["name"], v["error"]) for v in report["variants"]]
    assert report["timing"]["ray"]["workers"] == 2 and report["timing"]["ray"]["shards"] == 5
    assert report["config"]["ray"] == "auto"
    reference = next(v for v in report["variants"] if v["name"] == "torch-fp32")
    assert reference["details"]["execution"]["mode"] == "compiled"
    _same(_arrays(out), single)
    names = {k.split("::")[1] for k in single if k.startswith("top5::")}
    assert {"torch-fp32", "onnxruntime-fp32"} < names and sum("int8" in n for n in names) == 2, names


def test_an_onnx_file_on_images_without_labels_shards_alike(cluster, tmp_path):
    """A model whose reference is ONNX Runtime's FP32 (no PyTorch), judged on agreement without labels."""
    from test_onnx_model import _flat_folder, channel_means_model

    model, data = channel_means_model(tmp_path / "m.onnx"), _flat_folder(tmp_path / "photos", 24)
    args = ["run", "-m", str(model), "--preset", "caffe-bgr", "--crop", "8", "--resize", "10", "--data", str(data),
            "--calib-size", "8", "--batch-size", "4", "--min-agreement", "90", "--backend", "onnxruntime"]
    for out, more in ((tmp_path / "one", []), (tmp_path / "ray", ["--ray", "--ray-workers", "2"])):
        result = CliRunner().invoke(main, [*args, "--out", str(out), *more])
        assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "ray" / "report.json").read_text())
    assert report["data"]["labels_free"] and report["timing"]["ray"]["workers"] == 2
    assert all(v["status"] == "ok" for v in report["variants"]), [(v["name"], v["error"]) for v in report["variants"]]
    _same(_arrays(tmp_path / "ray"), _arrays(tmp_path / "one"))


class CrashOnce(ShardWorker):
    """A worker whose process dies (os._exit, no clean-up) in the first shard any worker is given, once per cluster:
    Ray restarts it, it builds again, and the shard is retried."""

    def evaluate(self, samples):
        marker = Path(self.spec.session.data).parent / "crashed"
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            return super().evaluate(samples)
        self.close()  # its temporary folder, which a killed process leaves behind
        os._exit(1)


def test_a_dead_worker_is_restarted_and_its_shard_retried(cluster, images, single, tmp_path):
    import int8eval.commands.run as run_module
    from int8eval.distributed import ray_evaluator

    def engine(c: RunConfig):  # the command's own engine, with the crashing worker
        return ray_evaluator(c, c.recipes, address=c.ray, workers=c.ray_workers, actor=CrashOnce)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(run_module, "_engine", engine)
        result = CliRunner().invoke(main, _args(images, tmp_path / "run", "--ray", "--ray-workers", "2", backends=ORT))
    assert result.exit_code == 0, result.output
    assert (images.parent / "crashed").exists()  # a worker died
    got = _arrays(tmp_path / "run")
    assert sum(k.startswith("top5::") for k in got) == 3  # torch-fp32, onnxruntime-fp32 and -int8
    _same(got, single, subset=True)


class OtherCpu(ShardWorker):
    """A worker on another kind of CPU (INT8EVAL_CPU: arm on x86, avx2 elsewhere), which chooses other INT8 recipes."""

    def __init__(self, spec, probe):
        from int8eval.environment import cpu_capabilities

        os.environ["INT8EVAL_CPU"] = "arm" if cpu_capabilities().arch.value == "x86" else "avx2"
        super().__init__(spec, probe)


def test_a_variant_built_otherwise_on_a_worker_is_an_error_not_merged(cluster, images, single, tmp_path):
    import int8eval.commands.run as run_module
    from int8eval.distributed import ray_evaluator

    def engine(c: RunConfig):
        return ray_evaluator(c, c.recipes, address=c.ray, workers=c.ray_workers, actor=OtherCpu)

    out = tmp_path / "run"
    with pytest.MonkeyPatch.context() as m:
        m.setattr(run_module, "_engine", engine)
        result = CliRunner().invoke(main, _args(images, out, "--ray", "--ray-workers", "2", backends=ORT))
    assert result.exit_code == 0, result.output
    variants = {v["name"]: v for v in json.loads((out / "report.json").read_text())["variants"]}
    ort_int8 = next(v for n, v in variants.items() if n.startswith("onnxruntime-int8"))
    assert ort_int8["status"] == "error" and "built otherwise on the Ray worker" in ort_int8["error"]
    assert "CPU differ" in ort_int8["error"]
    assert variants["torch-fp32"]["status"] == variants["onnxruntime-fp32"]["status"] == "ok"
    got = _arrays(out)
    assert f"top5::{ort_int8['name']}" not in got
    _same(got, single, subset=True)  # the FP32 variants


class NoSharedStorage(ShardWorker):
    """A worker on a node where the images are not at the driver's path."""

    def __init__(self, spec, probe):
        import dataclasses

        moved = spec.session.model_copy(update={"data": Path(spec.session.data).parent / "not-mounted"})
        super().__init__(dataclasses.replace(spec, session=moved), probe)


def test_a_worker_that_cannot_read_the_images_stops_the_run_with_one_line(cluster, images, tmp_path):
    import int8eval.commands.run as run_module
    from int8eval.distributed import ray_evaluator

    def engine(c: RunConfig):
        return ray_evaluator(c, c.recipes, address=c.ray, workers=c.ray_workers, actor=NoSharedStorage)

    before = _worker_folders()
    with pytest.MonkeyPatch.context() as m:
        m.setattr(run_module, "_engine", engine)
        result = CliRunner().invoke(main, _args(images, tmp_path / "run", "--ray", backends=ORT))
    assert result.exit_code == 1, result.output
    assert _worker_folders() <= before  # removed on failure too
    line = result.output.strip().splitlines()[-1]
    assert line.startswith("Error: on the Ray worker at ") and "not-mounted" in line, result.output
    assert not (tmp_path / "run" / "report.json").exists()


def test_merged_shards_are_one_pass():
    from int8eval.distributed import merge
    from int8eval.evaluate import EvalOutcome, Predictions

    def part(ids, a, b, errors=None):
        top5 = {"ref": np.full((len(ids), 5), a, np.int16), **({"x": np.full((len(ids), 5), b, np.int16)} if b else {})}
        kl = {"x": np.full(len(ids), 0.5, np.float32)} if b else {}
        preds = Predictions(ids, np.arange(len(ids)), top5, kl, dict(kl))
        return EvalOutcome(preds, [{"path": ids[0], "reason": "r"}], errors or {}, 1.0, {"ref": 1.0}), {}

    empty = EvalOutcome(Predictions([], np.zeros(0, np.int64), {}), [{"path": "e", "reason": "bad"}], {}, 0.0, {}), {}
    merged = merge([part(["a", "b"], 1, 2), empty, part(["c"], 3, 0, {"x": "ValueError: first"}),
                    part(["d"], 4, 0, {"x": "ValueError: later"})], 9.0)
    assert merged.predictions.image_ids == ["a", "b", "c", "d"]
    assert merged.predictions.top5["ref"][:, 0].tolist() == [1, 1, 3, 4]
    assert "x" not in merged.predictions.top5 and merged.errors == {"x": "ValueError: first"}
    assert [s["path"] for s in merged.skipped] == ["a", "e", "c", "d"] and merged.predict_s == {"ref": 3.0}


@pytest.mark.parametrize("command", ["run", "tune"])
def test_without_ray_installed_the_message_names_the_extra(images, tmp_path, monkeypatch, command):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    args = _args(images, tmp_path / "run", "--ray") if command == "run" else \
        [*TUNE, "--data", str(images), "--out", str(tmp_path / "run"), "--ray"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1
    assert "pip install 'int8eval[ray]'" in result.output
    assert not (tmp_path / "run").exists()  # refused before any work


@pytest.mark.parametrize(("more", "said"), [
    (["--ray", "--resume"], "--resume"),
    (["--ray-workers", "2"], "--ray-workers has no effect without --ray"),
])
def test_ray_flags_that_cannot_go_together_are_usage_errors(images, tmp_path, more, said):
    result = CliRunner().invoke(main, _args(images, tmp_path / "run", *more))
    assert result.exit_code == 2 and said in result.output, result.output


def test_shards_are_whole_batches_of_the_single_pass():
    parts = shards(1003, 32, 3)
    assert parts[0].start == 0 and parts[-1].stop == 1003
    assert all(p.start % 32 == 0 and len(p) % 32 == 0 for p in parts[:-1])
    assert all(a.stop == b.start for a, b in zip(parts, parts[1:]))
    assert len(shards(100_000, 32, 2)[0]) <= 1024  # at most ~1,000 images to evaluate again after a lost worker


def test_a_sweep_shards_each_run_cell_and_gives_the_single_process_cells(cluster, images, tmp_path):
    """`sweep --ray`: each run cell's images sharded over the cluster; the cells' predictions are those of the same
    sweep on one machine, and the ray options do not make the single-machine cells look changed (reused)."""
    import yaml

    spec = tmp_path / "sweep.yaml"
    spec.write_text(yaml.safe_dump({"models": ["tiny_test"], "backends": ["onnxruntime"], "data": str(images),
                                    "calib_size": 4, "batch_size": 4}))
    one, sharded = tmp_path / "one", tmp_path / "ray"
    for out, more in ((one, []), (sharded, ["--ray", "--ray-workers", "2"])):
        result = CliRunner().invoke(main, ["sweep", str(spec), "--out", str(out), *more])
        assert result.exit_code == 0, result.output
    cell = "tiny_test/onnxruntime"
    assert json.loads((sharded / cell / "report.json").read_text())["timing"]["ray"]["workers"] == 2
    _same(_arrays(sharded / cell), _arrays(one / cell))
    result = CliRunner().invoke(main, ["sweep", str(spec), "--out", str(one), "--ray", "--ray-workers", "2"])
    assert result.exit_code == 0 and json.loads((one / "sweep.json").read_text())["cells"][0]["reused"]


TUNE = ["tune", "-m", "tiny_test", "--calib-size", "4", "--tune-size", "5", "--confirm-size", "7", "--batch-size", "4",
        "--max-drop", "1", "--max-fp32-layers", "1", "--backend", "torch", "--backend", "onnxruntime"]


def test_tune_climbs_each_ladder_on_a_worker_and_reports_what_one_machine_does(cluster, images, tmp_path, monkeypatch):
    """`tune --ray`: each backend's ladder climbs on its own worker, every step of it (only FP32-layers candidates are
    accepted); the driver's report (every candidate's tuning and confirmation numbers, the choices, why each ladder
    stopped, the ranking) and its final pass's predictions are those of the same tune on one machine; the workers'
    candidates are this run's measurements, not reuses; where each climbed is said."""
    from test_tune_resume import _measured

    import int8eval.commands.tune as tune_module
    from int8eval.report import Report

    one, spread = tmp_path / "one", tmp_path / "ray"
    monkeypatch.setattr(tune_module, "_climb_task", _picky_climb)  # on the workers
    undo = _accept_fp32_layers_only(tune_module)  # here
    try:
        for out, more in ((one, []), (spread, ["--ray", "--ray-workers", "2"])):
            result = CliRunner().invoke(main, [*TUNE, "--data", str(images), "--out", str(out), *more])
            assert result.exit_code == 0, result.output
    finally:
        undo()
    a, b = Report.read(one / "report.json"), Report.read(spread / "report.json")
    (*x, x_choice, x_ranking, x_sets), (*y, y_choice, y_ranking, y_sets) = _measured(b), _measured(a)
    assert (x, x_ranking, x_sets) == (y, y_ranking, y_sets)  # the choice between backends is by measured speed
    assert {x_choice, y_choice} <= {c.chosen for c in b.tune.backends}
    steps = {(c.backend, c.step) for c in b.tune.candidates}
    assert {("torch", "calibration"), ("onnxruntime", "activation type"), ("onnxruntime", "FP32 layers")} <= steps
    assert all(x.chosen.endswith("-keep1") for x in b.tune.backends) and b.tune.ranking is not None
    assert not any(c.reused for c in b.tune.candidates)
    assert [x.node for x in a.tune.backends] == [None, None] and all(x.node for x in b.tune.backends)
    assert "Climbed on the Ray worker at" in (spread / "report.md").read_text()
    _same(_arrays(spread), _arrays(one))
    assert not (spread / ".tune-cache").exists()


def _accept_fp32_layers_only(tune_module):
    """Make tune's stop rule accept only candidates with layers kept in FP32 (the ladder's last step here), so that
    every step is climbed; returns the undo."""
    from int8eval.tune.rule import Judgement

    real_paired, real_judge, current = tune_module.paired_for, tune_module.judge, {}

    def paired_for(predictions, name, reference, **kw):
        current["name"] = name
        return real_paired(predictions, name, reference, **kw)

    def judge(paired, acceptance, min_agreement=None):
        ok = "-keep" in current["name"]
        return Judgement(real_judge(paired, acceptance, min_agreement).verdict, ok, "verdict" if ok else None)

    tune_module.paired_for, tune_module.judge = paired_for, judge

    def undo() -> None:
        tune_module.paired_for, tune_module.judge = real_paired, real_judge

    return undo


def _picky_climb(*args):
    """`_climb_task` on a worker with `_accept_fp32_layers_only`, undone after: Ray reuses the worker's process."""
    import int8eval.commands.tune as tune_module

    undo = _accept_fp32_layers_only(tune_module)
    try:
        return _CLIMB_TASK(*args)
    finally:
        undo()


def test_tune_refuses_a_worker_unlike_the_driver(cluster, images, tmp_path, monkeypatch):
    """A worker whose libraries or CPU differ from the driver's (here: INT8EVAL_CPU, which the tune cache's key
    records) would tune another model: one line naming the difference, no report."""
    from int8eval.environment import cpu_capabilities

    other = "arm" if cpu_capabilities().arch.value == "x86" else "avx2"
    monkeypatch.setattr("int8eval.commands.tune._climb_task", _on_cpu(other))
    result = CliRunner().invoke(main, [*TUNE, "--data", str(images), "--out", str(tmp_path / "t"), "--ray"])
    assert result.exit_code != 0 and "differs from the driver" in result.output, result.output
    assert not (tmp_path / "t" / "report.json").exists()


def _on_cpu(kind: str):
    import int8eval.commands.tune as tune_module

    climb = tune_module._climb_task

    def on_other_cpu(*args):
        os.environ["INT8EVAL_CPU"] = kind  # in the worker's process only, and only for this task: Ray reuses it
        try:
            return climb(*args)
        finally:
            del os.environ["INT8EVAL_CPU"]

    return on_other_cpu
