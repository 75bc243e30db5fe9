"""ResNet50 and EfficientNet-Lite0, FP32 / BF16 / INT8 on every installed backend, side by side in one run.

Every variant is timed as a deployment runs it (int8eval.bench: a static input shape per batch size, PyTorch FP32
compiled by inductor as its INT8 is, with its eager speed as an extra row). The script prints the INT8 ratios
(vs FP32 and vs BF16 on the same backend) against issue 11's targets with PASS/FAIL, compares int8eval's timing of
each OpenVINO variant with OpenVINO's own `benchmark_app` on the same static model, and writes a dated result
file, benchmarks/results/YYYY-MM-DD-<machine>.md (plus the raw numbers as .json beside it).

ResNet50 runs with random weights (seeded): its speed does not depend on the weights' values, and torchvision's
weights cannot be downloaded everywhere. INT8 calibration uses a few real images (--data, else $INT8EVAL_DATA,
else the sample shared beside the repository, else int8eval's cached sample, else seeded noise).

    python benchmarks/bench_backends.py                                  # everything, ~10 min on 2 idle cores
    python benchmarks/bench_backends.py --models efficientnet_lite0 --backends openvino --quick
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np

from int8eval import bench
from int8eval.backends import BACKENDS
from int8eval.bench import fmt, ratio
from int8eval.environment import cpu_info, library_versions

ROOT = Path(__file__).resolve().parent
# The shared ImageNet sample of a checkout that sits beside a `shared/` folder (as on the project's machines).
SHARED_SAMPLE = ROOT.parent.parent / "shared" / "data" / "imagenet-sample"
MODELS = ("resnet50", "efficientnet_lite0")
# Targets from issue 11 (set on a 2-core Xeon with AVX512-VNNI and AMX).
TARGET_INT8_VS_FP32 = 9.0  # best ResNet50 INT8 vs its backend's FP32 throughput
TARGET_INT8_VS_BF16 = 1.8  # ... and vs its BF16
TARGET_ORT_INT8_VS_FP32 = 1.8  # ONNX Runtime INT8 vs FP32 on EfficientNet-Lite0
TARGET_APP = 0.05  # int8eval's timing within 5% of benchmark_app on the same static model
# benchmark_app's -infer_precision for each OpenVINO inference precision int8eval compiles with.
APP_PRECISION = {"f32": "f32", "bf16": "bf16", "f16": "f16"}


def default_data() -> Path | None:
    """Calibration images when --data is not given: $INT8EVAL_DATA, else the shared sample beside the repository;
    None lets int8eval fall back to its cached sample, then to seeded noise."""
    env = os.environ.get("INT8EVAL_DATA")
    if env:
        return Path(env)
    return SHARED_SAMPLE if SHARED_SAMPLE.is_dir() else None


def machine_slug() -> str:
    cpu = cpu_info()
    name = re.sub(r"\(r\)|\(tm\)|cpu|@.*|processor", "", cpu["model"].lower())
    name = re.sub(r"[^a-z0-9]+", "-", name).strip("-")
    return f"{name}-{cpu['logical_cores']}c"


def random_resnet50(tmp: Path, seed: int = 0) -> Path:
    """A seeded random-weight ResNet50 checkpoint, so the loader's own path (and preprocessing) is used."""
    import torch
    import torchvision

    torch.manual_seed(seed)
    path = tmp / "resnet50-random.pt"
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), path)
    return path


def bench_model(model: str, args, tmp: Path) -> tuple[dict, list, tuple[int, int, int]]:
    """Build and time every variant of `model`; returns (run dict, live variants, input shape)."""
    checkpoint = random_resnet50(tmp) if model == "resnet50" else None
    from int8eval.commands.bench import bench_recipes, bench_session
    from int8eval.session import build_variants

    t = time.perf_counter()
    recipes, skipped = bench_recipes(args.backends, args.precisions)
    session, warnings = bench_session(model, recipes, data=args.data, calib_size=args.calib_size, checkpoint=checkpoint)
    built = build_variants(session, recipes, tmp / model, say=lambda m: print(f"  {model}: {m}", flush=True))
    loaded, variants = session.loaded, built.variants
    build_s = time.perf_counter() - t
    run = bench.bench_run(
        variants, loaded.input_shape, on_progress=lambda n: print(f"  {model}: timing {n}", flush=True),
        compile_torch=args.compiled_fp32, rounds=args.rounds,
        **bench_kw(args),  # BF16 without BF16 hardware is timed at batch 1 only (bench.EMULATED_BF16)
    )
    for name, why in [*((r.name, why) for r, why in skipped), *built.failures.items()]:
        run.variants[name] = {"error": why}
    run.warnings += warnings
    out = run.to_dict()
    out["model"] = model
    out["weights"] = "random (seed 0)" if checkpoint else loaded.source
    out["build_s"] = build_s
    out["prepare_s"] = {v.name: v.prepare_s for v in variants}
    return out, variants, loaded.input_shape


def bench_kw(args) -> dict:
    return dict(
        batch_sizes=(1, args.batch), warmup=args.warmup, throughput_warmup=1, min_runs=args.min_runs,
        throughput_min_runs=args.throughput_runs, min_seconds=args.min_seconds, max_seconds=args.max_seconds,
        threads=args.threads,
    )


# --------------------------------------------------------------------------------------------------------------
# OpenVINO's own benchmark_app on the same static model


def app_command(xml: Path, shape: tuple[int, ...], batch: int, *, precision: str, hint: str, seconds: float) -> list[str] | None:
    """benchmark_app on `xml` reshaped to a static [batch, *shape], with the inference precision and performance
    hint int8eval compiled the variant with (sync API: one request, input set before timing, as int8eval times)."""
    exe = shutil.which("benchmark_app") or str(Path(sys.executable).parent / "benchmark_app")
    if not Path(exe).exists():
        return None
    return [
        exe, "-m", str(xml), "-d", "CPU", "-hint", hint.lower(), "-api", "sync", "-infer_precision", precision,
        "-shape", f"[{batch},{','.join(map(str, shape))}]", "-t", str(max(1, round(seconds))),
    ]


def benchmark_app(cmd: list[str], batch: int, seconds: float) -> dict:
    """Median latency (ms) and images/s from one benchmark_app run."""
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 180)
    text = proc.stdout + proc.stderr
    median = re.search(r"Median:\s+([\d.]+)\s+(ms|us)", text)
    count = re.search(r"Count:\s+(\d+)\s+iterations", text)
    duration = re.search(r"Duration:\s+([\d.]+)\s+ms", text)
    if proc.returncode or not (median and count and duration):
        return {"error": text[-800:], "command": " ".join(cmd)}
    median_ms = float(median.group(1)) / (1000.0 if median.group(2) == "us" else 1.0)
    return {
        "latency_ms_p50": median_ms,
        "images_per_s": batch * int(count.group(1)) / (float(duration.group(1)) / 1e3),
        "iterations": int(count.group(1)),
        "command": " ".join(cmd),
    }


def app_check(variants: list, shape: tuple[int, ...], args) -> list[dict]:
    """For each OpenVINO variant (every precision), at batch 1 and at the throughput batch: int8eval's timing of its
    static form and benchmark_app on the same IR reshaped to the same static shape, in `args.app_rounds`
    interleaved rounds. Ratio = int8eval ÷ benchmark_app (images/s; batch-1 latency inverted, so above 1 means
    int8eval measured faster), the median over rounds, so a load that drifts hits both sides of each ratio alike."""
    rows = []
    for v in variants:
        if bench.deploy.backend_of(v) != "openvino" or v.artifact is None:
            continue
        precision = APP_PRECISION[v.compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()]
        hint = str(v.compiled.get_property("PERFORMANCE_HINT")) or "latency"
        for batch in (1, args.batch):
            cmd = app_command(Path(v.artifact), shape, batch, precision=precision, hint=hint, seconds=args.app_seconds)
            if cmd is None:
                return rows
            kw = dict(batch_sizes=(batch,), warmup=2, min_runs=args.min_runs if batch == 1 else args.throughput_runs,
                      min_seconds=args.app_seconds, threads=args.threads)
            rounds = []
            for _ in range(args.app_rounds):
                ours = bench.benchmark(v, shape, **kw)
                app = benchmark_app(cmd, batch, args.app_seconds)
                rounds.append({"int8eval_latency_ms_p50": ours.latency_ms_p50, "int8eval_images_per_s": ours.throughput_ips,
                               "int8eval_timed": ours.execution, "app": app})
            row = {"variant": v.name, "batch": batch, "precision": precision, "rounds": rounds, "command": " ".join(cmd)}
            ok = [r for r in rounds if "error" not in r["app"]]
            if ok:
                row["ratio_throughput"] = float(np.median([r["int8eval_images_per_s"] / r["app"]["images_per_s"] for r in ok]))
                row["ratio_latency"] = float(np.median([r["app"]["latency_ms_p50"] / r["int8eval_latency_ms_p50"] for r in ok]))
            else:
                row["error"] = rounds[0]["app"].get("error")
            rows.append(row)
            print(f"  benchmark_app {v.name} b{batch} ({precision}): int8eval ÷ benchmark_app = "
                  f"{fmt(row.get('ratio_throughput'), '.3f')} images/s, {fmt(row.get('ratio_latency'), '.3f')} latency", flush=True)
    return rows


# --------------------------------------------------------------------------------------------------------------
# Tables and targets


def variant_table(run: dict) -> list[str]:
    lines = [
        "| variant | threads | batch-1 p50 / p90 / p99 ms | runs | img/s @ batch | runs | × FP32 thr | × FP32 lat | × BF16 thr | size MB | size vs FP32 |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, b in run["variants"].items():
        if b.get("throughput_ips") is None:
            lines.append(f"| {name} | | {b.get('error', 'not measured')} | | | | | | | {fmt(b.get('size_mb'))} | |")
            continue
        red = b.get("size_reduction_vs_fp32")
        lines.append(
            f"| {name} | {b['threads']} | {b['latency_ms_p50']:.2f} / {b['latency_ms_p90']:.2f} / {b['latency_ms_p99']:.2f} | "
            f"{b['latency_runs']} | {b['throughput_ips']:.1f} @ {b['throughput_batch']} | {b['throughput_runs']} | "
            f"{fmt(b.get('speedup_throughput_vs_fp32'), '.2f')} | {fmt(b.get('speedup_latency_vs_fp32'), '.2f')} | "
            f"{fmt(b.get('speedup_throughput_vs_bf16'), '.2f')} | {fmt(b.get('size_mb'))} | "
            f"{'—' if red is None else f'-{100 * red:.0f}%'} |"
        )
    return lines


def ratio_rows(runs: list[dict]) -> list[dict]:
    """One row per (model, backend): FP32 / BF16 / INT8 throughput and latency, and the INT8 ratios. PyTorch's FP32
    is its compiled row (timed as its INT8 is); its eager row is kept as `fp32_eager`."""
    rows = []
    for run in runs:
        by_backend: dict[str, dict] = {}
        for name, b in run["variants"].items():
            backend = b.get("backend") or name.split("-")[0]
            precision = b.get("precision") or name.split("-")[1]
            if name.endswith(bench.deploy.EAGER_SUFFIX):
                precision += "_eager"
            by_backend.setdefault(backend, {}).setdefault(precision, b)
        for backend, p in by_backend.items():
            fp32, bf16, int8, eager = p.get("fp32", {}), p.get("bf16", {}), p.get("int8", {}), p.get("fp32_eager", {})
            rows.append({
                "model": run["model"], "backend": backend,
                "fp32_ips": fp32.get("throughput_ips"), "bf16_ips": bf16.get("throughput_ips"), "int8_ips": int8.get("throughput_ips"),
                "fp32_ms": fp32.get("latency_ms_p50"), "bf16_ms": bf16.get("latency_ms_p50"), "int8_ms": int8.get("latency_ms_p50"),
                "int8_vs_fp32": int8.get("speedup_throughput_vs_fp32"), "int8_vs_bf16": int8.get("speedup_throughput_vs_bf16"),
                "int8_lat_vs_fp32": int8.get("speedup_latency_vs_fp32"), "int8_lat_vs_bf16": int8.get("speedup_latency_vs_bf16"),
                "bf16_batch": bf16.get("throughput_batch"),
                "int8_vs_eager": ratio(int8.get("throughput_ips"), eager.get("throughput_ips")),
                "fp32_mb": fp32.get("size_mb"), "int8_mb": int8.get("size_mb"),
                "bf16_note": None if bf16.get("throughput_ips") is not None else (bf16.get("error") or "not run"),
            })
    return rows


def ratio_table(rows: list[dict], batch: int) -> list[str]:
    lines = [
        "| model | backend | FP32 ms / img/s | BF16 ms / img/s | INT8 ms / img/s | INT8÷FP32 thr (lat) | INT8÷BF16 thr (lat) | "
        "INT8÷eager FP32 thr | size FP32 → INT8 MB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['backend']} | {fmt(r['fp32_ms'])} / {fmt(r['fp32_ips'])} | "
            f"{fmt(r['bf16_ms'])} / {fmt(r['bf16_ips'])}{' (b1)' if r['bf16_batch'] == 1 else ''} | "
            f"{fmt(r['int8_ms'])} / {fmt(r['int8_ips'])} | "
            f"{fmt(r['int8_vs_fp32'], '.2f')} ({fmt(r['int8_lat_vs_fp32'], '.2f')}) | "
            f"{fmt(r['int8_vs_bf16'], '.2f')} ({fmt(r['int8_lat_vs_bf16'], '.2f')}) | "
            f"{fmt(r['int8_vs_eager'], '.2f')} | {fmt(r['fp32_mb'])} → {fmt(r['int8_mb'])} |"
        )
    return lines + [
        "",
        f"ms = batch-1 median latency; img/s = throughput at batch {batch} ((b1): batch 1 only, for emulated BF16); "
        "ratios > 1 mean INT8 is faster; — = the backend has no such variant here (see the per-model tables). "
        "Every variant ran with a static input shape per batch size; PyTorch FP32 is compiled by inductor as its INT8 "
        "is (INT8÷eager FP32 is against the eager model the accuracy pass runs).",
    ]


def capability_note(cpu: dict) -> str | None:
    """What a CPU without VNNI/AMX means for the targets (None on a CPU that has them)."""
    if cpu.get("int8_acceleration"):
        return None
    return (
        f"This CPU ({cpu.get('model')}) has no VNNI/AMX (AVX512-VNNI, AVX-VNNI or AMX-INT8): the INT8 speed targets "
        "(ResNet50 INT8 >= 9x its FP32 and >= 1.8x its BF16, ONNX Runtime INT8 >= 1.8x its FP32 on Lite0) need "
        "VNNI/AMX and are not expected to be met here; the ratios below are what this CPU measured."
    )


def _verdict(value: float | None, target: float) -> str:
    return "not measured" if value is None else "PASS" if value >= target else "FAIL"


def target_lines(rows: list[dict], app: list[dict], cpu: dict) -> list[str]:
    """Issue 11's targets, each as measured ratio vs target with PASS/FAIL (and why a CPU cannot meet them)."""
    lines = []
    note = capability_note(cpu)
    if note:
        lines.append(f"- NOTE: {note}")
    r50 = [r for r in rows if r["model"] == "resnet50" and r["int8_ips"] is not None]
    if r50:
        best = max(r50, key=lambda r: r["int8_ips"])
        lines.append(
            f"- ResNet50 best INT8 ({best['backend']}) ÷ its FP32 throughput: {fmt(best['int8_vs_fp32'], '.2f')}× "
            f"(target ≥ {TARGET_INT8_VS_FP32:g}×): {_verdict(best['int8_vs_fp32'], TARGET_INT8_VS_FP32)}"
        )
        if best["int8_vs_bf16"] is not None:
            lines.append(
                f"- ResNet50 best INT8 ({best['backend']}) ÷ its BF16 throughput: {best['int8_vs_bf16']:.2f}× "
                f"(target ≥ {TARGET_INT8_VS_BF16:g}×): {_verdict(best['int8_vs_bf16'], TARGET_INT8_VS_BF16)}"
            )
        else:
            why = "no BF16 hardware: BF16 is emulated" if not cpu.get("bf16_acceleration") else (best["bf16_note"] or "not run")
            lat = best["int8_lat_vs_bf16"]
            lines.append(
                f"- ResNet50 best INT8 ({best['backend']}) ÷ its BF16 throughput (target ≥ {TARGET_INT8_VS_BF16:g}×): "
                f"not measured ({why})" + (f"; batch-1 latency ratio {lat:.2f}× against emulated BF16" if lat else "")
            )
    lite = next((r for r in rows if r["model"] == "efficientnet_lite0" and r["backend"] == "onnxruntime"), None)
    if lite:
        lines.append(
            f"- EfficientNet-Lite0 ONNX Runtime INT8 ÷ FP32 throughput: {fmt(lite['int8_vs_fp32'], '.2f')}× "
            f"(target ≥ {TARGET_ORT_INT8_VS_FP32:g}×): {_verdict(lite['int8_vs_fp32'], TARGET_ORT_INT8_VS_FP32)}"
        )
    for a in app:
        if "ratio_throughput" not in a:
            lines.append(f"- int8eval ÷ benchmark_app, {a['variant']} batch {a['batch']}: benchmark_app failed")
            continue
        worst = max(abs(a["ratio_throughput"] - 1), abs(a["ratio_latency"] - 1))
        lines.append(
            f"- int8eval ÷ benchmark_app on the same static model, {a['variant']} ({a['precision']}) batch {a['batch']}: "
            f"{a['ratio_throughput']:.3f} images/s, {a['ratio_latency']:.3f} latency (target within "
            f"{TARGET_APP:.0%}): {'PASS' if worst <= TARGET_APP else 'FAIL'}"
        )
    return lines


def app_table(rows: list[dict]) -> list[str]:
    lines = [
        "| variant | precision | batch | int8eval p50 ms / img/s (per round) | benchmark_app p50 ms / img/s (per round) | "
        "int8eval ÷ app: img/s, latency |",
        "|---|---|---|---|---|---|",
    ]

    def app(r):
        a = r["app"]
        return "failed" if "error" in a else f"{a['latency_ms_p50']:.2f} / {a['images_per_s']:.1f}"

    for o in rows:
        rs = o["rounds"]
        lines.append(
            f"| {o['variant']} | {o['precision']} | {o['batch']} | "
            + "; ".join(f"{r['int8eval_latency_ms_p50']:.2f} / {r['int8eval_images_per_s']:.1f}" for r in rs) + " | "
            + "; ".join(app(r) for r in rs) + f" | {fmt(o.get('ratio_throughput'), '.3f')}, {fmt(o.get('ratio_latency'), '.3f')} |"
        )
    lines += [
        "",
        "Ratio = median over rounds of int8eval images/s ÷ benchmark_app images/s, and of benchmark_app median latency "
        "÷ int8eval median latency: 1.000 means the same, below 1 means int8eval measured slower.",
    ]
    if rows:
        lines += ["", f"benchmark_app command: `{rows[0]['command']}`"]
    return lines


def _argv_without_notes() -> list[str]:
    argv, skip = [], False
    for a in sys.argv[1:]:
        if skip:
            skip = False
        elif a == "--note":
            skip = True
        elif not a.startswith("--note="):
            argv.append(a)
    return argv


def write_result(path: Path, runs: list[dict], app_rows: list[dict], args, started: float, loads: dict) -> None:
    machine = runs[0]["machine"] if runs else bench.machine_info()
    cpu = machine["cpu"]
    isa = ", ".join(k for k, on in cpu["isa"].items() if on) or "none of note"
    rows = ratio_rows(runs)
    warnings = sorted({w if "shared" not in w else f"{r['model']}: {w}" for r in runs for w in r["warnings"]})
    lines = [
        f"# Backend benchmark, {date.today().isoformat()}, {machine_slug()}",
        "",
        f"Command: `python benchmarks/{Path(__file__).name} {' '.join(_argv_without_notes())}` "
        f"({time.perf_counter() - started:.0f} s in all).",
        "",
        "## Machine",
        "",
        f"- CPU: {cpu['model']}, {cpu['logical_cores']} logical cores; ISA: {isa}; "
        f"INT8 acceleration (VNNI/AMX): {'yes' if cpu['int8_acceleration'] else 'NO'}; BF16 hardware: {'yes' if cpu['bf16_acceleration'] else 'NO'}",
        f"- GPU: {machine.get('gpu') or 'none'} (this script measured the CPU only)",
        f"- 1-minute load average: {loads['start']:.1f} at start, {loads['end']:.1f} at the end (the machine is shared: "
        "other processes ran while timing unless these are below the core count)",
        f"- Libraries: {', '.join(f'{k} {v}' for k, v in library_versions().items())}",
        f"- Settings: batch 1 latency over ≥{args.min_runs} runs after {args.warmup} warm-up calls; throughput at batch "
        f"{args.batch} over ≥{args.throughput_runs} runs after 1 warm-up call; ≥{args.min_seconds:g} s of timed work per "
        f"batch size{f', capped at {args.max_seconds:g} s' if args.max_seconds else ''}; threads: "
        f"{args.threads or 'each runtime default'}; {args.rounds} interleaved round(s), calls pooled; every batch size "
        f"on a static input shape; inputs: seeded noise prepared before timing; INT8 calibrated on {args.calib_size} images.",
        "",
    ]
    if warnings:
        lines += ["## Warnings", ""] + [f"- {w}" for w in warnings] + [""]
    if args.note:
        lines += ["## Notes (from whoever ran it)", ""] + [f"- {n}" for n in args.note] + [""]
    lines += ["## INT8 vs FP32 and BF16, per backend", ""] + ratio_table(rows, args.batch) + [""]
    lines += ["## Targets (issue 11)", ""] + target_lines(rows, app_rows, cpu) + [""]
    for run in runs:
        lines += [f"## {run['model']} ({run['weights']}), every variant", ""] + variant_table(run) + [""]
        if run.get("prepare_s"):
            lines.append("Build time (convert + calibrate + quantize + compile), s: " + ", ".join(f"{k} {v:.1f}" for k, v in run["prepare_s"].items()))
            lines.append("")
    if app_rows:
        lines += ["## int8eval's timing vs OpenVINO benchmark_app on the same static model", ""] + app_table(app_rows) + [""]
    path.write_text("\n".join(lines) + "\n")
    raw = {"runs": runs, "app_rows": app_rows, "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    # Drop the per-call times from the committed JSON: the percentiles carry what matters.
    for run in raw["runs"]:
        for b in run["variants"].values():
            for t in (b.get("batches") or {}).values():
                t.pop("times_ms", None)
    path.with_suffix(".json").write_text(json.dumps(raw, indent=1, default=str) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--backends", default=",".join(b.value for b, i in BACKENDS.items() if i.installed and i.default))
    ap.add_argument("--precisions", default="fp32,bf16,int8")
    ap.add_argument("--data", type=Path, default=default_data(),
                    help="Calibration images (default: $INT8EVAL_DATA, else ../shared/data/imagenet-sample beside the "
                    "repository, else int8eval's cached sample, else noise).")
    ap.add_argument("--calib-size", type=int, default=32)
    ap.add_argument("--batch", type=int, default=32, help="Throughput batch size.")
    ap.add_argument("--threads", type=int, default=None, help="PyTorch threads (default: its own, = cores).")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--min-runs", type=int, default=20)
    ap.add_argument("--throughput-runs", type=int, default=3)
    ap.add_argument("--min-seconds", type=float, default=1.0)
    ap.add_argument("--max-seconds", type=float, default=20.0, help="Cap per batch size for very slow variants.")
    ap.add_argument("--no-compiled-fp32", dest="compiled_fp32", action="store_false",
                    help="Time PyTorch FP32/BF16 eager only (by default compiled by inductor, as torch INT8 is).")
    ap.add_argument("--app-model", default="efficientnet_lite0", help="Model for the benchmark_app comparison ('' skips).")
    ap.add_argument("--app-seconds", type=float, default=3.0)
    ap.add_argument("--app-rounds", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2,
                    help="Time every variant this many times in turn (interleaved) and pool: fair ratios under drifting load.")
    ap.add_argument("--quick", action="store_true", help="Few runs: a smoke test, not a measurement.")
    ap.add_argument("--out", type=Path, default=ROOT / "results")
    ap.add_argument("--name", default=None, help="Result file name (default: DATE-MACHINE.md).")
    ap.add_argument("--note", action="append", default=[], help="A line for the result file's Notes (repeatable).")
    args = ap.parse_args()
    args.models = [m for m in args.models.split(",") if m]
    args.backends = [b for b in args.backends.split(",") if b]
    args.precisions = [p for p in args.precisions.split(",") if p]
    if args.quick:
        args.warmup, args.min_runs, args.throughput_runs, args.min_seconds, args.app_seconds = 1, 5, 1, 0.0, 2.0

    started = time.perf_counter()
    loads = {"start": os.getloadavg()[0]}
    runs, app_rows = [], []
    with tempfile.TemporaryDirectory(prefix="int8eval-bench-") as tmp:
        for model in args.models:
            print(f"{model}:", flush=True)
            run, variants, shape = bench_model(model, args, Path(tmp))
            runs.append(run)
            if model == args.app_model:
                app_rows = app_check(variants, tuple(shape), args)
            del variants
    loads["end"] = os.getloadavg()[0]

    rows = ratio_rows(runs)
    print()
    print("\n".join(ratio_table(rows, args.batch)))
    print()
    print("\n".join(target_lines(rows, app_rows, cpu_info())))
    for w in sorted({w for r in runs for w in r["warnings"]}):
        print(f"WARNING: {w}")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / (args.name or f"{date.today().isoformat()}-{machine_slug()}.md")
    write_result(path, runs, app_rows, args, started, loads)
    print(f"\nwrote {path} and {path.with_suffix('.json').name} ({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
