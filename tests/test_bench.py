"""The timing harness, speedup and size accounting, ISA detection: no wall-clock assertions anywhere."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from int8eval import bench
from int8eval.backends.base import Variant
from int8eval.bench import BatchTiming, BenchEntry, BenchResult
from int8eval.config import Backend, Precision, Recipe
from int8eval.report.schema import Report, VariantResult


class FakeClock:
    def __init__(self, tick: float = 0.0) -> None:
        self.now, self.tick = 0.0, tick

    def __call__(self) -> float:
        self.now += self.tick  # each reading may advance time by a fixed tick
        return self.now


class FakeVariant(Variant):
    """Each predict call advances the fake clock by the next duration (cycling), and records its input."""

    def __init__(self, clock: FakeClock, durations, *, backend="torch", precision="fp32", per_image: float = 0.0):
        super().__init__(Recipe(backend=Backend(backend), precision=Precision(precision)))
        self.clock, self.durations, self.per_image = clock, list(durations), per_image
        self.calls: list[np.ndarray] = []

    def predict(self, images: np.ndarray) -> np.ndarray:
        d = self.durations[len(self.calls) % len(self.durations)]
        self.calls.append(images)
        self.clock.now += d + self.per_image * len(images)
        return np.zeros((len(images), 10), np.float32)


SHAPE = (3, 8, 8)


# --- time_calls: warm-up exclusion and run-count logic ----------------------------------------------------------


def test_warmup_calls_are_not_timed():
    clock = FakeClock()
    durations = iter([100.0, 100.0, 1.0, 2.0, 3.0])

    def fn():
        clock.now += next(durations)

    times = bench.time_calls(fn, warmup=2, min_runs=3, min_seconds=0, max_runs=10, clock=clock)
    assert times == [1.0, 2.0, 3.0]


def test_runs_until_min_runs_and_min_seconds():
    clock = FakeClock()

    def fn():
        clock.now += 0.125  # exact in binary, so the sum is too

    # min_runs reached after 3 calls, but 1 s of timed work needs 8.
    times = bench.time_calls(fn, warmup=0, min_runs=3, min_seconds=1.0, max_runs=1000, clock=clock)
    assert len(times) == 8
    # min_seconds reached at once, min_runs not.
    assert len(bench.time_calls(lambda: setattr(clock, "now", clock.now + 5), warmup=0, min_runs=4, min_seconds=1.0, max_runs=10, clock=clock)) == 4


def test_max_runs_caps_the_loop():
    clock = FakeClock()
    times = bench.time_calls(lambda: None, warmup=0, min_runs=2, min_seconds=100.0, max_runs=7, clock=clock)
    assert len(times) == 7  # the fake clock never advances: only max_runs ends the loop


@pytest.mark.parametrize("kw", [{"warmup": -1}, {"min_runs": 0}, {"max_runs": 1, "min_runs": 2}, {"min_seconds": -1}])
def test_bad_run_counts_raise(kw):
    args = {"warmup": 0, "min_runs": 1, "min_seconds": 0.0, "max_runs": 10, **kw}
    with pytest.raises(ValueError):
        bench.time_calls(lambda: None, **args)


# --- percentiles and throughput ---------------------------------------------------------------------------------


def test_percentiles_and_throughput_from_raw_times():
    times = [0.001 * t for t in range(1, 101)]  # 1..100 ms
    t = BatchTiming(batch=4, times_s=times)
    for q in (50, 90, 99):
        assert t.percentile_ms(q) == pytest.approx(np.percentile(np.arange(1, 101), q))
    assert t.images_per_s == pytest.approx(4 * 100 / sum(times))
    d = t.to_dict()
    assert d["runs"] == 100 and d["latency_ms_p50"] == pytest.approx(50.5) and len(d["times_ms"]) == 100


# --- benchmark(): batch handling -------------------------------------------------------------------------------


def test_benchmark_latency_at_smallest_batch_throughput_at_largest():
    clock = FakeClock()
    v = FakeVariant(clock, [0.0], per_image=0.01)  # 10 ms per image
    r = bench.benchmark(v, SHAPE, batch_sizes=(32, 1), warmup=2, min_runs=5, throughput_min_runs=3, min_seconds=0, clock=clock)
    assert sorted(r.timings) == [1, 32]
    assert r.latency.batch == 1 and r.latency.runs == 5
    assert r.throughput.batch == 32 and r.throughput.runs == 3
    assert r.latency_ms_p50 == pytest.approx(10.0)
    assert r.throughput_ips == pytest.approx(100.0)
    # warm-up + timed calls per batch size, smallest batch first, with inputs of the right shape
    assert [len(x) for x in v.calls] == [1] * 7 + [32] * 5
    assert all(x.shape[1:] == SHAPE and x.dtype == np.float32 for x in v.calls)
    assert r.timed_call == "predict" and r.name == "torch-fp32"


def test_benchmark_prepares_each_input_once():
    clock = FakeClock()
    v = FakeVariant(clock, [0.001])
    bench.benchmark(v, SHAPE, batch_sizes=(1, 4), warmup=1, min_runs=3, throughput_min_runs=2, min_seconds=0, clock=clock)
    ones = [x for x in v.calls if len(x) == 1]
    fours = [x for x in v.calls if len(x) == 4]
    # the same array object every call: no data preparation inside the timed loop
    assert all(x is ones[0] for x in ones) and all(x is fours[0] for x in fours)


def test_benchmark_percentiles_follow_the_calls():
    clock = FakeClock()
    durations = [0.5, 0.5] + [0.001 * i for i in range(1, 11)]  # two slow warm-up calls, then 1..10 ms
    v = FakeVariant(clock, durations)
    r = bench.benchmark(v, SHAPE, batch_sizes=(1,), warmup=2, min_runs=10, min_seconds=0, clock=clock)
    assert r.latency.times_s == pytest.approx([0.001 * i for i in range(1, 11)])
    assert r.latency_ms_p90 == pytest.approx(np.percentile(np.arange(1, 11), 90))
    assert r.latency is r.throughput  # one batch size: both come from it


def test_benchmark_uses_native_hook_when_offered():
    clock = FakeClock()

    class Native(FakeVariant):
        def bench_call(self, x):
            def call():
                self.clock.now += 0.002
                self.native_inputs.append(x)

            return call

    v = Native(clock, [1.0])
    v.native_inputs = []
    r = bench.benchmark(v, SHAPE, batch_sizes=(1,), warmup=0, min_runs=3, min_seconds=0, clock=clock)
    assert r.timed_call == "native" and not v.calls and len(v.native_inputs) == 3
    assert r.latency_ms_p50 == pytest.approx(2.0)


def test_make_input_repeats_given_images_and_checks_shape():
    imgs = np.arange(2 * 3 * 8 * 8, dtype=np.float32).reshape(2, *SHAPE)
    x = bench.make_input(SHAPE, 5, images=imgs)
    assert x.shape == (5, *SHAPE) and x.flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(x[2], imgs[0])
    np.testing.assert_array_equal(x[3], imgs[1])
    with pytest.raises(ValueError, match="expected"):
        bench.make_input((3, 4, 4), 2, images=imgs)
    noise = bench.make_input(SHAPE, 3, seed=1)
    np.testing.assert_array_equal(noise, bench.make_input(SHAPE, 3, seed=1))


def test_bad_batch_sizes_raise():
    with pytest.raises(ValueError):
        bench.benchmark(FakeVariant(FakeClock(), [0.0]), SHAPE, batch_sizes=(0, 32), clock=FakeClock())


# --- speedups and size ------------------------------------------------------------------------------------------


def _result(name: str, latency_s: float, throughput_ips: float) -> BenchResult:
    big = BatchTiming(32, [32 / throughput_ips] * 3)
    return BenchResult(name, SHAPE, {1: BatchTiming(1, [latency_s] * 5), 32: big}, 2, 0, "predict")


def test_speedups_are_against_the_same_backends_baselines():
    entries = [
        BenchEntry("torch-fp32", "torch", "fp32", _result("torch-fp32", 0.040, 20.0), size_mb=100.0),
        BenchEntry("torch-bf16", "torch", "bf16", _result("torch-bf16", 0.020, 50.0), size_mb=100.0),
        BenchEntry("torch-int8", "torch", "int8", _result("torch-int8", 0.010, 100.0), size_mb=25.0),
        BenchEntry("ort-fp32", "onnxruntime", "fp32", _result("ort-fp32", 0.030, 40.0), size_mb=102.0),
        BenchEntry("ort-int8", "onnxruntime", "int8", _result("ort-int8", 0.015, 120.0), size_mb=25.5),
        BenchEntry("ov-int8", "openvino", "int8", None, size_mb=26.0, error="RuntimeError: boom"),
    ]
    out = bench.compare(entries, reference="torch-fp32")
    t8 = out["torch-int8"]
    assert t8["speedup_throughput_vs_fp32"] == pytest.approx(5.0)
    assert t8["speedup_latency_vs_fp32"] == pytest.approx(4.0)
    assert t8["speedup_throughput_vs_bf16"] == pytest.approx(2.0)
    assert t8["speedup_latency_vs_bf16"] == pytest.approx(2.0)
    assert t8["size_reduction_vs_fp32"] == pytest.approx(0.75) and t8["size_ratio_vs_fp32"] == pytest.approx(0.25)
    o8 = out["ort-int8"]
    assert o8["baseline_fp32"] == "ort-fp32" and o8["speedup_throughput_vs_fp32"] == pytest.approx(3.0)
    assert "speedup_throughput_vs_bf16" not in o8  # no BF16 on that backend: no cross-backend stand-in
    assert o8["speedup_throughput_vs_reference"] == pytest.approx(6.0)
    assert o8["size_reduction_vs_fp32"] == pytest.approx(0.75)
    assert "speedup_throughput_vs_fp32" not in out["torch-fp32"]  # not compared with itself
    assert out["ov-int8"]["error"].startswith("RuntimeError") and out["ov-int8"]["size_mb"] == 26.0
    assert "size_reduction_vs_fp32" not in out["ov-int8"]  # no FP32 on that backend


class FileVariant(Variant):
    def __init__(self, recipe: Recipe, artifact: Path) -> None:
        super().__init__(recipe)
        self.artifact = artifact

    def predict(self, images):
        return np.zeros((len(images), 10), np.float32)


def test_size_accounting_counts_every_file_of_an_artifact(tmp_path):
    fp32 = tmp_path / "m.onnx"
    fp32.write_bytes(b"\0" * 4_000_000)
    xml, binf = tmp_path / "m.int8.xml", tmp_path / "m.int8.bin"  # OpenVINO IR: the .bin beside the .xml counts
    xml.write_bytes(b"\0" * 100_000)
    binf.write_bytes(b"\0" * 900_000)
    a = FileVariant(Recipe(backend=Backend.openvino, precision=Precision.fp32), fp32)
    b = FileVariant(Recipe(backend=Backend.openvino), xml)
    run = bench.bench_run([a, b], SHAPE, batch_sizes=(1,), warmup=0, min_runs=1, min_seconds=0, clock=FakeClock(tick=0.001))
    assert run.variants["openvino-fp32"]["size_mb"] == pytest.approx(4.0)
    assert run.variants[b.name]["size_mb"] == pytest.approx(1.0)
    assert run.variants[b.name]["size_reduction_vs_fp32"] == pytest.approx(0.75)


# --- ISA detection and machine warnings -------------------------------------------------------------------------

EPYC_AVX2 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC
flags\t\t: fpu sse sse2 avx f16c fma bmi2 avx2 sha_ni
"""
SAPPHIRE_RAPIDS = """processor\t: 0
model name\t: Intel(R) Xeon(R) Platinum 8481C
flags\t\t: avx avx2 avx512f avx512bw avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8
"""


def test_isa_detection_warns_without_int8_acceleration():
    m = bench.machine_info(EPYC_AVX2, gpu=None)
    assert m["cpu"]["model"] == "AMD EPYC"
    assert m["cpu"]["isa"]["avx2"] and not m["cpu"]["isa"]["avx512_vnni"] and not m["cpu"]["isa"]["amx_int8"]
    assert not m["cpu"]["int8_acceleration"]
    assert any("no INT8" in w and "AVX2" in w for w in m["warnings"])
    assert any("BF16" in w for w in m["warnings"])
    assert m["gpu"] is None


def test_isa_detection_on_an_amx_cpu_gives_no_warning():
    m = bench.machine_info(SAPPHIRE_RAPIDS, gpu="NVIDIA H100")
    assert m["cpu"]["int8_acceleration"] and m["cpu"]["bf16_acceleration"]
    assert m["cpu"]["isa"]["amx_int8"] and m["cpu"]["isa"]["avx512_vnni"]
    assert m["warnings"] == [] and m["gpu"] == "NVIDIA H100"


def test_load_warning_only_when_the_cpu_was_shared():
    assert bench.load_warning(0.5, 1.9, 2) is None
    assert "shared" in bench.load_warning(0.5, 6.0, 2)
    assert bench.load_warning(None, None, 2) is None


# --- which variant wins ------------------------------------------------------------------------------------------


def _vr(name, thr, lat, **kw) -> VariantResult:
    backend, precision = name.split("-")[:2]
    return VariantResult(
        name=name, backend=backend, precision=precision, status=kw.pop("status", "ok"),
        bench={"throughput_ips": thr, "latency_ms_p50": lat}, **kw,
    )


def test_fastest_by_agreement_when_no_verdict():
    vs = [
        _vr("torch-fp32", 20, 40, reference=True),
        _vr("torch-int8", 300, 9, agreement_top1=0.985),  # fastest but below 99%
        _vr("openvino-int8", 200, 5, agreement_top1=0.995),
        _vr("onnxruntime-int8", 900, 1, agreement_top1=0.999, status="parity_failed"),
    ]
    f = bench.fastest_variant(vs)
    assert f["throughput"] == "openvino-int8" and f["latency"] == "openvino-int8"
    assert "99" in f["criterion"]


@pytest.mark.parametrize(
    "verdict, expected",
    [
        (True, True), ("pass", True), ("within budget", True), ("FAIL", False), ("exceeds_budget", False),
        ({"meets_budget": False}, False), ({"status": "passed"}, True), ("unsure", None), (None, None),
        ({"verdict": "pass", "reason": "..."}, True), ({"verdict": "inconclusive"}, False),  # verdict.decide's shape
    ],
)
def test_meets_budget_reads_verdicts_defensively(verdict, expected):
    assert bench.meets_budget(verdict) is expected


def test_fastest_uses_verdict_over_agreement():
    from int8eval.config import Acceptance
    from int8eval.verdict import decide

    vs = [_vr("torch-fp32", 20, 40, reference=True), _vr("torch-int8", 300, 9, agreement_top1=0.95)]
    vs[1].verdict = decide(Acceptance(max_drop=1.0), 0.75, -0.004, (-0.008, 0.0))  # the budget, not the 99% rule, decides
    vs.append(_vr("openvino-int8", 400, 3, agreement_top1=0.999))
    vs[2].verdict = decide(Acceptance(max_drop=1.0), 0.75, -0.03, (-0.04, -0.02))
    assert (vs[1].verdict.verdict, vs[2].verdict.verdict) == ("pass", "fail")
    f = bench.fastest_variant(vs)
    assert f["throughput"] == "torch-int8" and f["criterion"].startswith("accuracy verdict")


def test_fastest_in_a_speed_only_run():
    f = bench.fastest_variant([{"name": "a", "bench": {"throughput_ips": 5, "latency_ms_p50": 2}}, {"name": "b", "bench": {"throughput_ips": 9, "latency_ms_p50": 3}}])
    assert f["throughput"] == "b" and f["latency"] == "a" and "speed only" in f["criterion"]


# --- the pipeline hook, the report and its rendering --------------------------------------------------------------


class _Loaded:
    input_shape = SHAPE


def test_add_bench_fills_variant_results_and_report_roundtrips(tmp_path):
    clock = FakeClock()
    fp32 = FakeVariant(clock, [0.004])
    int8 = FakeVariant(clock, [0.001], precision="int8")
    results = {
        fp32.name: VariantResult(name=fp32.name, backend="torch", precision="fp32", status="ok", reference=True),
        int8.name: VariantResult(name=int8.name, backend="torch", precision="int8", status="ok", agreement_top1=0.995),
        "broken": VariantResult(name="broken", backend="onnxruntime", precision="int8", status="error"),
    }
    section = bench.add_bench(results, [fp32, int8], _Loaded(), reference=fp32.name, batch_sizes=(1, 8), warmup=1, min_runs=4, throughput_min_runs=2, min_seconds=0, clock=clock)
    b = results[int8.name].bench
    assert b.speedup_throughput_vs_fp32 == pytest.approx(4.0) and b.latency_batch == 1 and b.throughput_batch == 8
    assert results["broken"].bench is None
    assert section.fastest.throughput == int8.name
    assert section.model_fields_set == {"machine", "settings", "warnings", "fastest", "speed_only"}

    report = Report.model_validate(
        {
            "created": "now",
            "model": {"name": "tiny", "source": "x", "num_params": 1, "preprocessing": {"resize": 8, "crop": 8}},
            "data": {"root": "/", "layout": "x", "num_found": 1, "num_images": 1, "num_skipped": 0},
            "variants": [r.model_dump() for r in results.values()],
            "environment": {},
            "bench": section,
        }
    )
    report.write(tmp_path / "report.json")
    again = Report.read(tmp_path / "report.json")
    assert again.variant(int8.name).bench.throughput_ips == pytest.approx(b.throughput_ips)
    md = "\n".join(bench.bench_markdown(again.variants, again.bench))
    assert "## Speed and size" in md and int8.name in md and "Fastest variant" in md
    assert again.bench == section and json.loads(json.dumps(again.bench.model_dump(mode="json")))  # plain JSON


def test_bench_command_on_tiny_torch(tmp_path, monkeypatch):
    _eager_compile(monkeypatch)
    from int8eval.commands.bench import bench as bench_command

    report = bench_command(
        "tiny_test", ["torch"], ["fp32", "bf16"], out=tmp_path, calib_size=4, batch_sizes=(1, 4), warmup=1, min_runs=3,
        throughput_min_runs=2, min_seconds=0,
    )
    assert [v.name for v in report.variants] == ["torch-fp32", "torch-bf16"]
    assert {"torch-fp32-eager", "torch-bf16-eager"} <= set(report.bench.speed_only)
    assert report.variant("torch-bf16").bench.speedup_latency_vs_fp32 > 0
    assert report.variant("torch-fp32").bench.threads >= 1
    assert Report.read(tmp_path / "report.json").variant("torch-bf16").bench == report.variant("torch-bf16").bench
    assert "torch-bf16" in (tmp_path / "report.md").read_text()


def test_max_seconds_caps_slow_variants_below_min_runs():
    clock = FakeClock()

    def fn():
        clock.now += 4.0

    times = bench.time_calls(fn, warmup=0, min_runs=20, min_seconds=0, max_runs=100, max_seconds=10.0, clock=clock)
    assert len(times) == 3  # 4 + 4 + 4 >= 10: no fourth call


def test_throughput_warmup_is_separate():
    clock = FakeClock()
    v = FakeVariant(clock, [0.001])
    bench.benchmark(v, SHAPE, batch_sizes=(1, 4), warmup=3, throughput_warmup=1, min_runs=2, throughput_min_runs=2, min_seconds=0, clock=clock)
    assert [len(x) for x in v.calls] == [1] * 5 + [4] * 3


@pytest.mark.parametrize("backend, package", [("onnxruntime", "onnxruntime"), ("openvino", "openvino")])
def test_thread_count_is_read_back_from_the_runtime(tmp_path, backend, package):
    pytest.importorskip(package)
    from int8eval.backends import build_variant
    from int8eval.models import load_model

    v = build_variant(load_model("tiny_test"), Recipe(backend=Backend(backend), precision=Precision.fp32), None, tmp_path)
    threads = bench.runtime_threads(v)
    assert isinstance(threads, int) and threads >= 1
    r = bench.benchmark(v, (3, 32, 32), batch_sizes=(1, 2), warmup=1, min_runs=2, throughput_min_runs=1, min_seconds=0)
    assert r.threads == threads and r.timings[2].runs == 1


def test_emulated_bf16_is_timed_at_batch_1_only():
    clock = FakeClock()
    fp32, bf16 = FakeVariant(clock, [0.01]), FakeVariant(clock, [0.1], precision="bf16")
    kw = dict(batch_sizes=(1, 8), warmup=2, min_runs=10, throughput_min_runs=2, min_seconds=0, clock=clock)
    run = bench.bench_run([fp32, bf16], SHAPE, bf16_hardware=False, **kw)
    b = run.variants["torch-bf16"]
    assert b["throughput_batch"] == 1 and b["latency_runs"] == bench.EMULATED_BF16["min_runs"]
    assert [len(x) for x in bf16.calls] == [1] * (bench.EMULATED_BF16["warmup"] + bench.EMULATED_BF16["min_runs"])
    assert "speedup_throughput_vs_fp32" not in b  # batch 1 vs batch 8: not comparable
    assert b["speedup_latency_vs_fp32"] == pytest.approx(0.1)
    assert "settings_override" in b
    full = bench.bench_run([FakeVariant(clock, [0.1], precision="bf16")], SHAPE, bf16_hardware=True, **kw)
    assert full.variants["torch-bf16"]["throughput_batch"] == 8


# --- static shapes: what a deployment runs ---------------------------------------------------------------------


def _tiny_variant(tmp_path, backend: str, precision: str = "fp32"):
    from int8eval.backends import build_variant
    from int8eval.models import load_model

    loaded = load_model("tiny_test")
    return loaded, build_variant(loaded, Recipe(backend=Backend(backend), precision=Precision(precision)), None, tmp_path)


def test_openvino_is_timed_on_a_static_shape_per_batch_size(tmp_path):
    pytest.importorskip("openvino")
    loaded, v = _tiny_variant(tmp_path, "openvino")
    assert not v.compiled.input(0).get_partial_shape().is_static  # the accuracy pass's model: dynamic batch
    for batch in (1, 3):
        call = bench.timed_call(v, bench.make_input(loaded.input_shape, batch))
        shape = call.form.input(0).get_partial_shape()
        assert shape.is_static and list(shape.to_shape()) == [batch, *loaded.input_shape]
        assert call.kind == "static" and call.threads >= 1
        assert str(call.form.get_property("INFERENCE_PRECISION_HINT")) == str(v.compiled.get_property("INFERENCE_PRECISION_HINT"))
        call.fn()
    r = bench.benchmark(v, loaded.input_shape, batch_sizes=(1, 2), warmup=1, min_runs=2, throughput_min_runs=1, min_seconds=0)
    assert r.timed_call == "static" and "static" in r.execution
    dynamic = bench.benchmark(v, loaded.input_shape, batch_sizes=(1,), warmup=0, min_runs=1, min_seconds=0, static_shapes=False)
    assert dynamic.timed_call == "predict"


def test_onnxruntime_is_timed_on_a_session_with_the_batch_fixed(tmp_path):
    pytest.importorskip("onnxruntime")
    loaded, v = _tiny_variant(tmp_path, "onnxruntime")
    assert isinstance(v.session.get_inputs()[0].shape[0], str)  # dynamic in the artifact and the variant's session
    for batch in (1, 4):
        x = bench.make_input(loaded.input_shape, batch)
        call = bench.timed_call(v, x)
        assert call.form.get_inputs()[0].shape == [batch, *loaded.input_shape] and call.kind == "static"
        np.testing.assert_allclose(call.fn()[0], v.predict(x), rtol=1e-5, atol=1e-5)  # the same model, only static
    assert isinstance(v.session.get_inputs()[0].shape[0], str)  # the variant itself is left as it was


def _eager_compile(monkeypatch):
    import torch

    # dynamo with its eager backend: the same compiled-module path as inductor, in a fraction of the time.
    monkeypatch.setattr(bench.deploy, "compile_module", lambda m: torch.compile(m, backend="eager", dynamic=False))


def test_torch_fp32_baseline_is_compiled_like_its_int8_with_eager_as_an_extra_row(tmp_path, monkeypatch):
    _eager_compile(monkeypatch)
    loaded, fp32 = _tiny_variant(tmp_path, "torch")
    clock = FakeClock()
    int8 = FakeVariant(clock, [0.001], precision="int8")
    twin = bench.compiled_twin(fp32)
    assert bench.deploy.is_compiled(twin.module) and twin.name == fp32.name and twin.freezing
    assert bench.compiled_twin(int8) is None and bench.compiled_twin(twin) is None
    run = bench.bench_run([fp32, int8], loaded.input_shape, batch_sizes=(1, 2), warmup=1, min_runs=2, throughput_min_runs=1, min_seconds=0)
    assert run.variants["torch-fp32"]["timed_call"] == "static" and "inductor" in run.variants["torch-fp32"]["execution"]
    eager = run.variants["torch-fp32-eager"]
    assert eager["execution"] == "eager" and "eager" in eager["note"]
    assert eager["baseline_fp32"] == "torch-fp32"  # eager is compared with compiled, never the other way round
    assert run.variants[int8.name]["baseline_fp32"] == "torch-fp32"
    assert run.settings["torch_compiled"] and run.settings["static_shapes"]
    assert run.fastest["throughput"] == int8.name  # the eager row is no candidate
    plain = bench.bench_run([fp32], loaded.input_shape, compile_torch=False, batch_sizes=(1,), warmup=0, min_runs=1, min_seconds=0)
    assert set(plain.variants) == {"torch-fp32"} and plain.variants["torch-fp32"]["execution"] == "eager"


# --- BF16 (FP16 on a GPU) baselines, without being asked -------------------------------------------------------


def test_float_baseline_recipes_follow_the_capability():
    clock = FakeClock()
    vs = [FakeVariant(clock, [0]), FakeVariant(clock, [0], precision="int8"), FakeVariant(clock, [0], backend="onnxruntime"),
          FakeVariant(clock, [0], backend="openvino", precision="int8")]
    names = lambda rs: sorted(r.name for r in rs)  # noqa: E731
    assert names(bench.float_baseline_recipes(vs, bf16=True, gpu=False)) == ["openvino-bf16", "torch-bf16"]
    assert bench.float_baseline_recipes(vs, bf16=False, gpu=False) == []  # ONNX Runtime has no BF16: never
    assert names(bench.float_baseline_recipes([*vs, FakeVariant(clock, [0], precision="bf16")], bf16=True, gpu=False)) == ["openvino-bf16"]
    trt = FakeVariant(clock, [0], backend="tensorrt", precision="int8")
    assert [r.precision.value for r in bench.float_baseline_recipes([trt], bf16=False, gpu=True)] == ["fp16"]


@pytest.mark.parametrize("bf16", [True, False])
def test_run_bench_adds_a_bf16_baseline_iff_the_cpu_has_bf16(tmp_path, monkeypatch, bf16):
    _eager_compile(monkeypatch)
    monkeypatch.setattr(bench.machine, "bf16_hardware", lambda: bf16)
    monkeypatch.setattr(bench.machine, "gpu_name", lambda: None)
    loaded, fp32 = _tiny_variant(tmp_path / "a", "torch")
    clock = FakeClock()
    int8 = FakeVariant(clock, [0.001], precision="int8")
    results = {
        fp32.name: VariantResult(name=fp32.name, backend="torch", precision="fp32", status="ok", reference=True),
        int8.name: VariantResult(name=int8.name, backend="torch", precision="int8", status="ok", agreement_top1=0.995),
    }
    section = bench.add_bench(results, [fp32, int8], loaded, reference=fp32.name, workdir=tmp_path / "w",
                              batch_sizes=(1, 2), warmup=1, min_runs=2, throughput_min_runs=1, min_seconds=0)
    extra = section.speed_only
    assert "torch-fp32-eager" in extra
    if bf16:
        b = extra["torch-bf16"]
        assert b.throughput_batch == 2 and "BF16 hardware" in b.note  # timed in full: the CPU runs it natively
        assert results[int8.name].bench.baseline_bf16 == "torch-bf16"
        assert results[int8.name].bench.speedup_throughput_vs_bf16 is not None
        assert section.settings.bf16_hardware
    else:
        assert "torch-bf16" not in extra and results[int8.name].bench.baseline_bf16 is None
        assert not section.settings.bf16_hardware
    md = "\n".join(bench.bench_markdown(list(results.values()), section))
    assert "torch-fp32-eager" in md and ("torch-bf16" in md) == bf16


def test_bench_run_reads_bf16_hardware_from_the_machine(monkeypatch):
    monkeypatch.setattr(bench.machine, "bf16_hardware", lambda: False)
    clock = FakeClock()
    kw = dict(batch_sizes=(1, 4), warmup=0, min_runs=2, throughput_min_runs=1, min_seconds=0, clock=clock)
    run = bench.bench_run([FakeVariant(clock, [0.1], precision="bf16")], SHAPE, **kw)
    assert run.variants["torch-bf16"]["throughput_batch"] == 1  # emulated: batch 1 only
    monkeypatch.setattr(bench.machine, "bf16_hardware", lambda: True)
    assert bench.bench_run([FakeVariant(clock, [0.1], precision="bf16")], SHAPE, **kw).variants["torch-bf16"]["throughput_batch"] == 4


# --- the summary: which variant to deploy -------------------------------------------------------------------------


def _judged(name, thr, lat, drop, ci, n=700, budget=0.01):
    """A judged variant as a row of plain values (fastest_variant reads rows and VariantResults alike)."""
    from int8eval.config import Acceptance
    from int8eval.verdict import decide

    verdict = decide(Acceptance(max_drop=100 * budget), 0.75, -drop, (-ci[1], -ci[0]), n)
    return {**_vr(name, thr, lat, agreement_top1=0.98).model_dump(), "verdict": verdict, "paired": {"n": n}}


def test_summary_names_the_fastest_passing_int8_and_the_faster_inconclusive_one():
    from int8eval.verdict import images_to_settle

    vs = [
        _vr("torch-fp32", 20, 40, reference=True),
        _vr("onnxruntime-fp32", 40, 20, agreement_top1=1.0),  # the fastest FP32: the baseline, not an answer
        _judged("onnxruntime-int8", 60, 15, 0.002, (-0.001, 0.006)),  # pass
        _judged("openvino-int8", 132, 6, 0.004, (-0.002, 0.012)),  # inconclusive, estimate within budget
        _judged("torch-int8", 50, 9, 0.03, (0.02, 0.04)),  # fail
    ]
    assert [v["verdict"].verdict for v in vs[2:]] == ["pass", "inconclusive", "fail"]
    f = bench.fastest_variant(vs)
    assert f["throughput"] == "onnxruntime-int8" and f["fp32"] == "onnxruntime-fp32"
    assert f["speedup_vs_fp32"] == pytest.approx(1.5)
    (faster,) = f["faster_inconclusive"]
    assert faster["name"] == "openvino-int8" and faster["than"] == "onnxruntime-int8"
    assert faster["times_faster"] == pytest.approx(132 / 60)
    assert faster["images_to_settle"] == images_to_settle(vs[3]["verdict"], 700) and faster["images_to_settle"] > 700
    assert faster["estimate_within_budget"]
    text = "\n".join(bench.summary_lines(f))
    assert "**onnxruntime-int8**" in text and "1.50×" in text and "2.20× faster" in text
    assert f"{faster['images_to_settle']:,} evaluated images (now 700)" in text and "not candidates" in text


def test_summary_never_answers_fp32_and_measures_inconclusive_ones_against_it():
    vs = [
        _vr("torch-fp32", 20, 40, reference=True),
        _vr("onnxruntime-fp32", 40, 20, agreement_top1=1.0),
        _judged("openvino-int8", 132, 6, 0.004, (-0.002, 0.012)),
        _judged("torch-int8", 30, 9, 0.03, (0.02, 0.04)),
    ]
    f = bench.fastest_variant(vs)
    assert f["throughput"] is None and f["fp32"] == "onnxruntime-fp32"  # FP32 is not named the variant to deploy
    (faster,) = f["faster_inconclusive"]
    assert faster["than"] == "onnxruntime-fp32" and faster["times_faster"] == pytest.approx(3.3)
    text = "\n".join(bench.summary_lines(f))
    assert "No INT8 or reduced-precision variant passes" in text and "3.30× faster than onnxruntime-fp32" in text


def test_images_to_settle_is_verdicts_own_estimate():
    from int8eval.config import Acceptance
    from int8eval.verdict import decide, images_to_settle

    inconclusive = decide(Acceptance(max_drop=1.0), 0.75, -0.004, (-0.012, 0.002), 700)
    needed = images_to_settle(inconclusive, 700)
    assert f"roughly {needed:,} images (now 700)" in inconclusive.reason
    assert images_to_settle(decide(Acceptance(max_drop=1.0), 0.75, -0.002, (-0.006, 0.001), 700), 700) is None  # pass


# --- the benchmark script ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bench_script():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_backends.py"
    spec = importlib.util.spec_from_file_location("bench_backends", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rows():
    return [
        {"model": "resnet50", "backend": "openvino", "int8_ips": 90.0, "int8_vs_fp32": 9.4, "int8_vs_bf16": 1.7,
         "int8_lat_vs_bf16": 1.6, "bf16_note": None},
        {"model": "efficientnet_lite0", "backend": "onnxruntime", "int8_ips": 300.0, "int8_vs_fp32": 2.0,
         "int8_vs_bf16": None, "int8_lat_vs_bf16": None, "bf16_note": "not run"},
    ]


def test_bench_script_says_targets_need_vnni_amx_on_an_avx2_cpu(bench_script):
    avx2 = bench.machine_info(EPYC_AVX2, gpu=None)["cpu"]
    amx = bench.machine_info(SAPPHIRE_RAPIDS, gpu=None)["cpu"]
    assert "need VNNI/AMX" in bench_script.capability_note(avx2) and bench_script.capability_note(amx) is None
    app = [{"variant": "openvino-fp32", "batch": 1, "precision": "f32", "ratio_throughput": 0.97, "ratio_latency": 1.06}]
    lines = bench_script.target_lines(_rows(), app, amx)
    text = "\n".join(lines)
    assert "9.40× (target ≥ 9×): PASS" in text and "1.70× (target ≥ 1.8×): FAIL" in text
    assert "2.00× (target ≥ 1.8×): PASS" in text and "batch 1: 0.970 images/s, 1.060 latency" in text and text.endswith("FAIL")
    assert "VNNI/AMX" not in text
    assert "need VNNI/AMX" in "\n".join(bench_script.target_lines(_rows(), [], avx2))


def test_bench_script_asks_benchmark_app_for_the_variants_precision(bench_script, monkeypatch):
    monkeypatch.setattr(bench_script.shutil, "which", lambda _: "/bin/true")
    cmd = bench_script.app_command(Path("m.xml"), (3, 8, 8), 4, precision="bf16", hint="LATENCY", seconds=2)
    assert cmd[cmd.index("-infer_precision") + 1] == "bf16" and cmd[cmd.index("-shape") + 1] == "[4,3,8,8]"
    assert bench_script.APP_PRECISION["bf16"] == "bf16" and bench_script.APP_PRECISION["f32"] == "f32"


def test_rounds_time_every_row_in_turn_and_pool_the_calls():
    clock, order = FakeClock(), []

    class Logged(FakeVariant):
        def predict(self, images):
            order.append(self.name)
            return super().predict(images)

    a, b = Logged(clock, [0.002]), Logged(clock, [0.001], precision="int8")
    run = bench.bench_run([a, b], SHAPE, rounds=3, compile_torch=False, batch_sizes=(1,), warmup=0, min_runs=2, min_seconds=0, clock=clock)
    assert order == ([a.name] * 2 + [b.name] * 2) * 3  # each round times every row in turn
    assert run.variants[b.name]["latency_runs"] == 6 and run.settings["rounds"] == 3
    assert run.variants[b.name]["speedup_latency_vs_fp32"] == pytest.approx(2.0)


def test_summary_says_when_the_pick_is_slower_than_fp32():
    vs = [_vr("torch-fp32", 20, 40, reference=True), _judged("onnxruntime-int8", 10, 15, 0.002, (-0.001, 0.006))]
    f = bench.fastest_variant(vs)
    assert f["throughput"] == "onnxruntime-int8" and f["speedup_vs_fp32"] == pytest.approx(0.5)
    assert "slower than FP32 on this machine: torch-fp32" in "\n".join(bench.summary_lines(f))


def test_bench_never_replaces_another_commands_run(image_folder, tmp_path):
    """A folder holding `int8eval run`'s report is refused by bench, untouched; bench's own folder is replaced."""
    from int8eval.commands.bench import bench as bench_command
    from int8eval.commands.run import run
    from int8eval.config import RunConfig
    from int8eval.errors import RunFolderError

    out = tmp_path / "run"
    run(RunConfig(model="tiny_test", data=image_folder, out=out, max_images=4))
    before = (out / "report.json").read_bytes()
    with pytest.raises(RunFolderError, match="holds the report of an `int8eval run`.*another --out"):
        bench_command("tiny_test", ["torch"], ["fp32"], out=out, batch_sizes=(1, 2), warmup=0, min_runs=1,
                      throughput_min_runs=1, min_seconds=0, compile_torch=False)
    assert (out / "report.json").read_bytes() == before
