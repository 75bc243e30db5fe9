"""The fast sensitivity ranking (int8eval.diagnose.fast_ranking, `diagnose --fast`, what `tune` ranks with) against
today's default `int8eval diagnose`: what each costs, measured side by side in one process, and how the rankings
compare.

Cost: the default diagnose as `int8eval diagnose` runs it (64 images, split effects, SQNR, ONNX names) and the fast
ranking (FAST_IMAGES images), each from the uncalibrated model (calibration included: both calibrate the same way)
to its ranking; image decoding is left out of both. The runs alternate (fast, full, fast, full, ...), so a machine
shared with other work slows both alike; the script prints the ratio of their seconds, not a speed.

Quality, against the full sweep's ranking: Spearman's rank correlation, the overlap of the top-5 and top-10, and what
the tuner uses a ranking for -- the agreement with FP32 (and mean KL) of the fake-quantized model with the top
1/2/4/8 layers of each ranking kept in FP32, on held-out images: neither calibrated on nor ranked on.

Images: the seeded split `int8eval run` and `diagnose` use (--calib-size 100, --seed 0); the full sweep ranks on the
session's 64 evaluation images, the fast one on the session's FAST_IMAGES (what `diagnose --fast` evaluates), the
held-out images are a seeded subset of the rest.

    python benchmarks/bench_sensitivity.py                       # ~12 min on 2 quiet cores (2 timed repeats)
    python benchmarks/bench_sensitivity.py --also-images 16 64 --repeats 1
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from int8eval.config import Backend, Recipe, SessionSpec
from int8eval.data.decode import decode_samples
from int8eval.data.layouts import subsample
from int8eval.diagnose import (
    FAST_IMAGES,
    FakeQuantModel,
    FakeQuantSpec,
    Tally,
    as_batches,
    diagnose,
    fast_ranking,
)
from int8eval.session import open_session

ROOT = Path(__file__).resolve().parent
SHARED_SAMPLE = ROOT.parent.parent / "shared" / "data" / "imagenet-sample"
TARGET_RATIO = 5.0  # issue 14: the ranking the tuner uses at least 5x cheaper than today's diagnose
KEEP = (1, 2, 4, 8)


def _decode(session, samples) -> tuple[np.ndarray, np.ndarray]:
    images, labels, _ = decode_samples(samples, session.loaded.preprocessing, batch_size=32, workers=0)
    return np.concatenate(images), np.asarray(labels)


def _full(loaded, spec, calib, images, labels) -> tuple[list[str], float]:
    """Today's default `int8eval diagnose` from the uncalibrated model: (its ranking, seconds)."""
    start = time.perf_counter()
    fq = FakeQuantModel(loaded.module, spec)
    fq.calibrate(as_batches([calib], 32))
    result = diagnose(loaded.module, spec, [calib], images, labels=labels, example_input=loaded.example_input(1),
                      fq=fq)
    return result["ranking"], time.perf_counter() - start


def _fast(loaded, spec, calib, images) -> tuple[list[str], float]:
    start = time.perf_counter()
    ranking = fast_ranking(loaded.module, spec, [calib], images)
    return ranking, time.perf_counter() - start


def _held_out(fq: FakeQuantModel, images: np.ndarray, keep_sets: set[frozenset]) -> dict[frozenset, dict]:
    """Agreement with FP32 and mean KL on `images` of the model with each set of layers kept in FP32 (the empty set:
    every layer INT8), against one FP32 reference."""
    every = set(fq.names)
    tallies = {k: Tally() for k in keep_sets}
    for x in as_batches(images, 32):
        fq.configure()
        ref = torch.log_softmax(fq(x).double(), dim=1)
        for kept, tally in tallies.items():
            fq.configure(weights=every - kept, acts=every - kept)
            tally.add(ref, fq(x), None)
    return {k: t.result(False) | {"n": t.n} for k, t in tallies.items()}


def _overlap(a: list[str], b: list[str], k: int) -> str:
    k = min(k, len(a))
    return f"{len(set(a[:k]) & set(b[:k]))}/{k}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("INT8EVAL_DATA", SHARED_SAMPLE)))
    parser.add_argument("--calib-size", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--full-images", type=int, default=64, help="the default diagnose's --max-images")
    parser.add_argument("--fast-images", type=int, default=FAST_IMAGES)
    parser.add_argument("--also-images", type=int, nargs="*", default=[16, 24],
                        help="the fast ranking on these many images too (cost and quality)")
    parser.add_argument("--held-out", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2, help="timed (fast, full) pairs")
    args = parser.parse_args(argv)

    spec = FakeQuantSpec()  # diagnose's default: minmax, per-channel, asymmetric uint8 activations, bias corrected
    print(f"{args.model}: calib {args.calib_size} (seed {args.seed}), full sweep {args.full_images} images, fast "
          f"{args.fast_images}; torch threads {torch.get_num_threads()}; load average {os.getloadavg()[0]:.1f}")
    session_spec = SessionSpec(model=args.model, data=args.data, calib_size=args.calib_size, seed=args.seed,
                               max_images=args.full_images)
    session = open_session(session_spec, [Recipe(backend=Backend.torch)])
    loaded, calib = session.loaded, np.concatenate(session.calib.batches)
    full_images, full_labels = _decode(session, session.eval_samples)
    ranked = {s.id for s in session.eval_samples}
    sizes = sorted({args.fast_images, *args.also_images})
    fast_sets = {n: _decode(session, subsample(session.pool, n, args.seed))[0] for n in sizes}
    rest = [s for s in session.pool if s.id not in ranked]  # the fast sets are subsets of the ranked 64, or fewer
    held_out, _ = _decode(session, subsample(rest, args.held_out, args.seed + 1))

    # Timed, alternating: every fast size, then the full sweep, `repeats` times.
    seconds: dict[str, list[float]] = {}
    rankings: dict[str, list[str]] = {}
    for r in range(args.repeats):
        for n in sizes:
            ranking, s = _fast(loaded, spec, calib, fast_sets[n])
            seconds.setdefault(f"fast{n}", []).append(s)
            assert rankings.setdefault(f"fast{n}", ranking) == ranking, "the fast ranking changed"
            print(f"  repeat {r + 1}: fast, {n} images: {s:.1f} s", flush=True)
        ranking, s = _full(loaded, spec, calib, full_images, full_labels)
        seconds.setdefault("full", []).append(s)
        assert rankings.setdefault("full", ranking) == ranking, "the full ranking changed"
        print(f"  repeat {r + 1}: full {s:.1f} s (load average {os.getloadavg()[0]:.1f})", flush=True)
    ratios = {name: sum(seconds["full"]) / sum(t) for name, t in seconds.items() if name != "full"}
    ratio = ratios[f"fast{args.fast_images}"]

    fq = FakeQuantModel(loaded.module, spec)  # calibrated as diagnose and its keep_fp32_check calibrate
    fq.calibrate(as_batches([calib], 32))
    keep_sets = {frozenset()} | {frozenset(r[:k]) for r in rankings.values() for k in KEEP}
    checked = _held_out(fq, held_out, keep_sets)

    full = rankings["full"]
    rankings = {"full": full} | {k: v for k, v in rankings.items() if k != "full"}
    whole = checked[frozenset()]
    print(f"\ncost over {args.repeats} interleaved repeat(s): full diagnose {np.mean(seconds['full']):.1f} s; "
          + "; ".join(f"fast, {n} images: {np.mean(seconds[f'fast{n}']):.1f} s ({ratios[f'fast{n}']:.1f}x)"
                      for n in sizes))
    print(f"fast ranking on {args.fast_images} images (the default): {ratio:.1f}x cheaper than the full diagnose "
          f"(target >= {TARGET_RATIO:g}x): {'PASS' if ratio >= TARGET_RATIO else 'FAIL'}")
    print(f"\nquality against the full ranking ({args.full_images} images); held-out: {whole['n']} images, every layer "
          f"INT8: agreement {100 * whole['agreement']:.2f}%, KL {whole['kl']:.2e}")
    header = "| ranking | Spearman | top-5 | top-10 | " + " | ".join(f"top-{k} FP32: agree % / KL" for k in KEEP) + " |"
    print(header)
    print("|" + "---|" * (4 + len(KEEP)))
    for name, ranking in rankings.items():
        rho = spearmanr([full.index(n) for n in ranking], range(len(ranking))).statistic
        kept = [checked[frozenset(ranking[:k])] for k in KEEP]
        cells = [f"{100 * c['agreement']:.2f} / {c['kl']:.2e}" for c in kept]
        print(f"| {name} | {rho:.3f} | {_overlap(ranking, full, 5)} | {_overlap(ranking, full, 10)} | "
              + " | ".join(cells) + " |")
    for name, ranking in rankings.items():
        print(f"{name} top-8: {', '.join(ranking[:8])}")
    return 0 if ratio >= TARGET_RATIO else 1


if __name__ == "__main__":
    sys.exit(main())
