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
    vs = [_vr("torch-fp32", 20, 40, reference=True), _vr("torch-int8", 300, 9, agreement_top1=0.95)]
    vs[1].verdict = {"within_budget": True, "delta_top1": -0.004}  # the budget, not the 99% agreement rule, decides
    vs.append(_vr("openvino-int8", 400, 3, agreement_top1=0.999))
    vs[2].verdict = "fail"
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
    assert b["speedup_throughput_vs_fp32"] == pytest.approx(4.0) and b["latency_batch"] == 1 and b["throughput_batch"] == 8
    assert results["broken"].bench is None
    assert section["fastest"]["throughput"] == int8.name
    assert set(section) == {"machine", "settings", "warnings", "fastest"}

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
    assert again.variant(int8.name).bench["throughput_ips"] == pytest.approx(b["throughput_ips"])
    md = "\n".join(bench.render_markdown(again.variants, again.bench))
    assert "## Speed and size" in md and int8.name in md and "Fastest variant" in md
    json.dumps(again.bench)  # the section is plain JSON


def test_bench_command_on_tiny_torch(tmp_path):
    run = bench.bench_command(
        "tiny_test", ["torch"], ["fp32", "bf16"], out=tmp_path, calib_size=4, batch_sizes=(1, 4), warmup=1, min_runs=3,
        throughput_min_runs=2, min_seconds=0,
    )
    assert {"torch-fp32", "torch-bf16"} <= set(run.variants)
    assert run.variants["torch-bf16"]["speedup_latency_vs_fp32"] > 0
    assert run.variants["torch-fp32"]["threads"] >= 1
    assert (tmp_path / "bench.json").exists() and "torch-bf16" in (tmp_path / "bench.md").read_text()


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
