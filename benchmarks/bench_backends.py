"""ResNet50 and EfficientNet-Lite0, FP32 / BF16 / INT8 on every installed backend, side by side in one run.

Prints the ratios (INT8 vs FP32 and vs BF16 on the same backend) and writes a dated result file,
benchmarks/results/YYYY-MM-DD-<machine>.md (plus the raw numbers as .json beside it). It also times one
OpenVINO model with OpenVINO's own `benchmark_app` to measure int8eval's overhead.

ResNet50 runs with random weights (seeded): its speed does not depend on the weights' values, and torchvision's
weights cannot be downloaded everywhere. INT8 calibration uses a few real images from --data when there are any.

    python benchmarks/bench_backends.py                       # everything, ~10 min on 2 idle cores
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
from int8eval.backends.torch_backend import TorchVariant
from int8eval.bench import _f, _ratio
from int8eval.environment import cpu_info, library_versions

ROOT = Path(__file__).resolve().parent
DEFAULT_DATA = Path("/work/shared/data/imagenet-sample")
MODELS = ("resnet50", "efficientnet_lite0")
# Targets from issue 5 (set on a 2-core AMX CPU).
TARGET_INT8_VS_FP32 = 9.0
TARGET_INT8_VS_BF16 = 1.8
TARGET_OVERHEAD = 0.05


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


class CompiledTorchFP32(TorchVariant):
    """The FP32 model compiled by inductor with frozen weights, as torch INT8 is: the like-for-like PyTorch
    baseline (the torch backend's own FP32 variant is eager, which flatters INT8's speedup)."""

    @property
    def name(self) -> str:
        return "torch-fp32-compiled"


def bench_model(model: str, args, tmp: Path) -> tuple[dict, list, tuple[int, int, int]]:
    """Build and time every variant of `model`; returns (run dict, live variants, input shape)."""
    checkpoint = random_resnet50(tmp) if model == "resnet50" else None
    t = time.perf_counter()
    loaded, variants, not_built, warnings = bench.build_bench_variants(
        model, args.backends, args.precisions, workdir=tmp / model, data=args.data, calib_size=args.calib_size,
        checkpoint=checkpoint, on_progress=lambda m: print(f"  {model}: {m}", flush=True),
    )
    torch_fp32 = next((v for v in variants if v.name == "torch-fp32"), None)
    if args.compiled_fp32 and torch_fp32 is not None:
        import torch

        # The same weights (and artifact), compiled; inductor reads `freezing` when it compiles a batch shape.
        compiled = CompiledTorchFP32(
            torch_fp32.recipe, torch.compile(torch_fp32.module, dynamic=False), torch_fp32.artifact, freezing=True
        )
        start = time.perf_counter()
        for batch in (1, args.batch):  # inductor compiles once per batch shape (dynamic=False): do it now
            compiled.predict(bench.make_input(loaded.input_shape, batch))
        compiled.prepare_s = time.perf_counter() - start
        variants.insert(variants.index(torch_fp32) + 1, compiled)
    build_s = time.perf_counter() - t
    run = bench.bench_run(
        variants, loaded.input_shape, on_progress=lambda n: print(f"  {model}: timing {n}", flush=True),
        **bench_kw(args),  # BF16 without BF16 hardware is timed at batch 1 only (bench.EMULATED_BF16)
    )
    bench.add_build_outcome(run, not_built, warnings)
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
# OpenVINO's own benchmark_app, for int8eval's measurement overhead


def benchmark_app(
    xml: Path, batch: int, shape: tuple[int, ...], threads: int, seconds: float, *, dynamic: bool = True
) -> dict | None:
    """Median latency (ms) and images/s from `benchmark_app`, configured as int8eval's variant runs
    (what the latency hint gives on the CPU: one stream, `threads` threads; f32 inference precision; sync API).
    benchmark_app only takes -nstreams/-nthreads with `-hint none`. `dynamic` keeps the IR's dynamic batch, as
    int8eval runs it (inputs set up before timing, as in our harness); otherwise the model is reshaped to a static
    batch first, which is the runtime at its best."""
    exe = shutil.which("benchmark_app") or str(Path(sys.executable).parent / "benchmark_app")
    if not Path(exe).exists():
        return None
    cmd = [
        exe, "-m", str(xml), "-d", "CPU", "-hint", "none", "-nstreams", "1", "-api", "sync", "-infer_precision", "f32",
        "-nthreads", str(threads), "-t", str(max(1, round(seconds))),
    ]
    dims = ",".join(map(str, shape))
    if dynamic:
        cmd += ["-shape", f"[?,{dims}]", "-data_shape", f"[{batch},{dims}]", "-inference_only"]
    else:
        cmd += ["-shape", f"[{batch},{dims}]"]
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


def overhead_check(variants: list, shape: tuple[int, ...], args) -> list[dict]:
    """For each OpenVINO variant, at batch 1 (median latency) and at the throughput batch (images/s): int8eval's
    timing, benchmark_app on the same dynamic-batch IR, and benchmark_app on the IR reshaped to a static batch,
    in `args.app_rounds` interleaved rounds; the overhead is the median over rounds of the per-round ratio, so a
    load that drifts on a shared machine hits both sides of each ratio alike."""
    rows = []
    for v in variants:
        if getattr(v.recipe.backend, "value", "") != "openvino" or v.artifact is None:
            continue
        threads = bench.runtime_threads(v) or os.cpu_count()
        for batch in (1, args.batch):
            kw = dict(batch_sizes=(batch,), warmup=2, min_runs=args.min_runs if batch == 1 else args.throughput_runs,
                      min_seconds=args.app_seconds, threads=args.threads)
            rounds = []
            for _ in range(args.app_rounds):
                ours = bench.benchmark(v, shape, **kw)
                dyn = benchmark_app(Path(v.artifact), batch, shape, threads, args.app_seconds, dynamic=True)
                static = benchmark_app(Path(v.artifact), batch, shape, threads, args.app_seconds, dynamic=False)
                rounds.append({"int8eval_latency_ms_p50": ours.latency_ms_p50, "int8eval_images_per_s": ours.throughput_ips,
                               "app_dynamic": dyn, "app_static": static})
            row = {"variant": v.name, "batch": batch, "threads": threads, "rounds": rounds}
            for key in ("app_dynamic", "app_static"):
                ok = [r for r in rounds if r[key] and "error" not in r[key]]
                if ok:
                    row[f"overhead_latency_{key}"] = float(np.median(
                        [r["int8eval_latency_ms_p50"] / r[key]["latency_ms_p50"] - 1 for r in ok]))
                    row[f"overhead_throughput_{key}"] = float(np.median(
                        [r[key]["images_per_s"] / r["int8eval_images_per_s"] - 1 for r in ok]))
                else:
                    row[f"error_{key}"] = next((r[key] for r in rounds if r[key]), None)
            rows.append(row)
            print(f"  overhead {v.name} b{batch}: vs dynamic IR {row.get('overhead_latency_app_dynamic', float('nan')):+.1%} "
                  f"latency, {row.get('overhead_throughput_app_dynamic', float('nan')):+.1%} throughput; vs static "
                  f"{row.get('overhead_latency_app_static', float('nan')):+.1%} / "
                  f"{row.get('overhead_throughput_app_static', float('nan')):+.1%}", flush=True)
    return rows


# --------------------------------------------------------------------------------------------------------------
# Tables


def variant_table(run: dict) -> list[str]:
    lines = [
        "| variant | threads | batch-1 p50 / p90 / p99 ms | runs | img/s @ batch | runs | × FP32 thr | × FP32 lat | × BF16 thr | size MB | size vs FP32 |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, b in run["variants"].items():
        if b.get("throughput_ips") is None:
            lines.append(f"| {name} | | {b.get('error', 'not measured')} | | | | | | | {_f(b.get('size_mb'))} | |")
            continue
        red = b.get("size_reduction_vs_fp32")
        lines.append(
            f"| {name} | {b['threads']} | {b['latency_ms_p50']:.2f} / {b['latency_ms_p90']:.2f} / {b['latency_ms_p99']:.2f} | "
            f"{b['latency_runs']} | {b['throughput_ips']:.1f} @ {b['throughput_batch']} | {b['throughput_runs']} | "
            f"{_f(b.get('speedup_throughput_vs_fp32'), '.2f')} | {_f(b.get('speedup_latency_vs_fp32'), '.2f')} | "
            f"{_f(b.get('speedup_throughput_vs_bf16'), '.2f')} | {_f(b.get('size_mb'))} | "
            f"{'—' if red is None else f'-{100 * red:.0f}%'} |"
        )
    return lines


def ratio_rows(runs: list[dict]) -> list[dict]:
    """One row per (model, backend): FP32 / BF16 / INT8 throughput and latency, and the INT8 ratios."""
    rows = []
    for run in runs:
        by_backend: dict[str, dict] = {}
        for name, b in run["variants"].items():
            backend = b.get("backend") or name.split("-")[0]
            precision = b.get("precision") or name.split("-")[1]
            if name.endswith("-compiled"):
                precision += "_compiled"
            by_backend.setdefault(backend, {})[precision] = b
        for backend, p in by_backend.items():
            fp32, bf16, int8 = p.get("fp32", {}), p.get("bf16", {}), p.get("int8", {})
            rows.append({
                "model": run["model"], "backend": backend,
                "fp32_ips": fp32.get("throughput_ips"), "bf16_ips": bf16.get("throughput_ips"), "int8_ips": int8.get("throughput_ips"),
                "fp32_ms": fp32.get("latency_ms_p50"), "bf16_ms": bf16.get("latency_ms_p50"), "int8_ms": int8.get("latency_ms_p50"),
                "int8_vs_fp32": int8.get("speedup_throughput_vs_fp32"), "int8_vs_bf16": int8.get("speedup_throughput_vs_bf16"),
                "int8_lat_vs_bf16": int8.get("speedup_latency_vs_bf16"), "bf16_batch": bf16.get("throughput_batch"),
                "int8_vs_fp32c": _ratio(int8.get("throughput_ips"), p.get("fp32_compiled", {}).get("throughput_ips")),
                "int8_lat_vs_fp32c": _ratio(p.get("fp32_compiled", {}).get("latency_ms_p50"), int8.get("latency_ms_p50")),
                "int8_lat_vs_fp32": int8.get("speedup_latency_vs_fp32"),
                "fp32_mb": fp32.get("size_mb"), "int8_mb": int8.get("size_mb"),
                "bf16_note": None if bf16.get("throughput_ips") is not None else (bf16.get("error") or "not run"),
            })
    return rows


def ratio_table(rows: list[dict], batch: int) -> list[str]:
    lines = [
        "| model | backend | FP32 ms / img/s | BF16 ms / img/s | INT8 ms / img/s | INT8÷FP32 thr (lat) | INT8÷BF16 thr (lat) | "
        "INT8÷compiled FP32 thr (lat) | size FP32 → INT8 MB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['backend']} | {_f(r['fp32_ms'], '.1f')} / {_f(r['fp32_ips'])} | "
            f"{_f(r['bf16_ms'], '.1f')} / {_f(r['bf16_ips'])}{' (b1)' if r['bf16_batch'] == 1 else ''} | "
            f"{_f(r['int8_ms'], '.1f')} / {_f(r['int8_ips'])} | "
            f"{_f(r['int8_vs_fp32'], '.2f')} ({_f(r['int8_lat_vs_fp32'], '.2f')}) | "
            f"{_f(r['int8_vs_bf16'], '.2f')} ({_f(r['int8_lat_vs_bf16'], '.2f')}) | "
            f"{_f(r['int8_vs_fp32c'], '.2f')} ({_f(r['int8_lat_vs_fp32c'], '.2f')}) | "
            f"{_f(r['fp32_mb'])} → {_f(r['int8_mb'])} |"
        )
    return lines + [
        "",
        f"ms = batch-1 median latency; img/s = throughput at batch {batch} ((b1): batch 1 only, for emulated BF16); "
        "ratios > 1 mean INT8 is faster; — = the backend has no such variant here (see the per-model tables). "
        "PyTorch FP32 is eager (the torch backend's FP32 variant); its INT8 is compiled by inductor, so the fair "
        "PyTorch ratio is INT8÷compiled FP32 (FP32 compiled by inductor with frozen weights, timed here too).",
    ]


def targets(rows: list[dict], overhead: list[dict]) -> list[str]:
    r50 = [r for r in rows if r["model"] == "resnet50" and r["int8_ips"] is not None]
    lines = []
    if r50:
        best = max(r50, key=lambda r: r["int8_ips"])
        ok32 = best["int8_vs_fp32"] is not None and best["int8_vs_fp32"] >= TARGET_INT8_VS_FP32
        lines.append(
            f"- ResNet50, best INT8 backend ({best['backend']}): {_f(best['int8_vs_fp32'], '.2f')}× its FP32 throughput "
            f"(target ≥ {TARGET_INT8_VS_FP32:g}×): {'met' if ok32 else 'NOT met'}"
        )
        if best["int8_vs_bf16"] is None and best["int8_lat_vs_bf16"] is not None:
            lines.append(
                f"- vs BF16 (target ≥ {TARGET_INT8_VS_BF16:g}×): {best['int8_lat_vs_bf16']:.2f}× in batch-1 latency only; "
                "BF16 is emulated on this CPU (no BF16 hardware), so this is no fair baseline"
            )
        elif best["int8_vs_bf16"] is None:
            lines.append(f"- vs BF16 (target ≥ {TARGET_INT8_VS_BF16:g}×): not measurable, {best['backend']} has no BF16 here ({best['bf16_note']})")
        else:
            ok16 = best["int8_vs_bf16"] >= TARGET_INT8_VS_BF16
            lines.append(f"- vs BF16: {best['int8_vs_bf16']:.2f}× (target ≥ {TARGET_INT8_VS_BF16:g}×): {'met' if ok16 else 'NOT met'}")
    for o in overhead:
        if "overhead_latency_app_dynamic" in o:
            lat, thr = o["overhead_latency_app_dynamic"], o["overhead_throughput_app_dynamic"]
            worst = max(abs(lat), abs(thr))
            lines.append(
                f"- int8eval vs benchmark_app on the same IR, {o['variant']} batch {o['batch']}: latency {lat:+.1%}, "
                f"throughput {thr:+.1%} (target within {TARGET_OVERHEAD:.0%}): {'met' if worst <= TARGET_OVERHEAD else 'NOT met'}"
            )
    return lines


def overhead_table(rows: list[dict]) -> list[str]:
    lines = [
        "| variant | batch | threads | int8eval p50 ms / img/s (per round) | benchmark_app, same dynamic IR | "
        "benchmark_app, static reshape | overhead vs dynamic: latency / throughput | vs static |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def app(r, key):
        a = r[key]
        return "failed" if not a or "error" in a else f"{a['latency_ms_p50']:.2f} / {a['images_per_s']:.1f}"

    def pct(o, key):
        lat, thr = o.get(f"overhead_latency_{key}"), o.get(f"overhead_throughput_{key}")
        return "—" if lat is None else f"{lat:+.1%} / {thr:+.1%}"

    for o in rows:
        rs = o["rounds"]
        lines.append(
            f"| {o['variant']} | {o['batch']} | {o['threads']} | "
            + "; ".join(f"{r['int8eval_latency_ms_p50']:.2f} / {r['int8eval_images_per_s']:.1f}" for r in rs) + " | "
            + "; ".join(app(r, "app_dynamic") for r in rs) + " | " + "; ".join(app(r, "app_static") for r in rs) + " | "
            + f"{pct(o, 'app_dynamic')} | {pct(o, 'app_static')} |"
        )
    first = next((r["app_dynamic"] for o in rows for r in o["rounds"] if r["app_dynamic"] and "command" in r["app_dynamic"]), None)
    lines += [
        "",
        "Overhead = median over rounds of (int8eval p50 ÷ benchmark_app median − 1) for latency and (benchmark_app "
        "img/s ÷ int8eval img/s − 1) for throughput; positive means int8eval measured slower.",
    ]
    if first:
        lines += ["", f"benchmark_app command (same IR): `{first['command']}`"]
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


def write_result(path: Path, runs: list[dict], overhead: list[dict], args, started: float, loads: dict) -> None:
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
        f"{args.threads or 'each runtime default'}; inputs: seeded noise prepared before timing; INT8 calibrated on "
        f"{args.calib_size} images.",
        "",
    ]
    if warnings:
        lines += ["## Warnings", ""] + [f"- {w}" for w in warnings] + [""]
    if args.note:
        lines += ["## Notes (from whoever ran it)", ""] + [f"- {n}" for n in args.note] + [""]
    lines += ["## INT8 vs FP32 and BF16, per backend", ""] + ratio_table(rows, args.batch) + [""]
    lines += ["## Targets (issue 5)", ""] + targets(rows, overhead) + [""]
    for run in runs:
        lines += [f"## {run['model']} ({run['weights']}), every variant", ""] + variant_table(run) + [""]
        if run.get("prepare_s"):
            lines.append("Build time (convert + calibrate + quantize + compile), s: " + ", ".join(f"{k} {v:.1f}" for k, v in run["prepare_s"].items()))
            lines.append("")
    if overhead:
        lines += ["## int8eval's measurement vs OpenVINO benchmark_app", ""] + overhead_table(overhead) + [""]
    path.write_text("\n".join(lines) + "\n")
    raw = {"runs": runs, "overhead": overhead, "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
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
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA if DEFAULT_DATA.is_dir() else None)
    ap.add_argument("--calib-size", type=int, default=32)
    ap.add_argument("--batch", type=int, default=32, help="Throughput batch size.")
    ap.add_argument("--threads", type=int, default=None, help="PyTorch threads (default: its own, = cores).")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--min-runs", type=int, default=20)
    ap.add_argument("--throughput-runs", type=int, default=3)
    ap.add_argument("--min-seconds", type=float, default=1.0)
    ap.add_argument("--max-seconds", type=float, default=20.0, help="Cap per batch size for very slow variants.")
    ap.add_argument("--no-compiled-fp32", dest="compiled_fp32", action="store_false",
                    help="Skip the inductor-compiled PyTorch FP32 row (the fair baseline for compiled torch INT8).")
    ap.add_argument("--app-model", default="efficientnet_lite0", help="Model for the benchmark_app comparison ('' skips).")
    ap.add_argument("--app-seconds", type=float, default=3.0)
    ap.add_argument("--app-rounds", type=int, default=2)
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
    runs, overhead = [], []
    with tempfile.TemporaryDirectory(prefix="int8eval-bench-") as tmp:
        for model in args.models:
            print(f"{model}:", flush=True)
            run, variants, shape = bench_model(model, args, Path(tmp))
            runs.append(run)
            if model == args.app_model:
                overhead = overhead_check(variants, tuple(shape), args)
            del variants
    loads["end"] = os.getloadavg()[0]

    rows = ratio_rows(runs)
    print()
    print("\n".join(ratio_table(rows, args.batch)))
    print()
    print("\n".join(targets(rows, overhead)))
    for w in sorted({w for r in runs for w in r["warnings"]}):
        print(f"WARNING: {w}")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / (args.name or f"{date.today().isoformat()}-{machine_slug()}.md")
    write_result(path, runs, overhead, args, started, loads)
    print(f"\nwrote {path} and {path.with_suffix('.json').name} ({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
