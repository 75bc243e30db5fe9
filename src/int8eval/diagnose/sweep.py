"""The per-layer sweep: agreement with the FP32 top-1 and the mean KL divergence of the logits (which separates layers
that flip no image on a small set) when only a layer is fake-quantized, when every layer but that one is, and when
only its weights or only its input are; the SQNR of each layer's output, local (FP32 input, the layer's own error)
and accumulated (inside the fully quantized model); the ranking; and the check of the top-k kept in FP32.
"""

from __future__ import annotations

import copy
import math
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

from int8eval.config import Recipe
from int8eval.diagnose.fakequant import FakeQuantModel, FakeQuantSpec
from int8eval.diagnose.runner import PrefixRunner
from int8eval.errors import ConfigError

RankBy = Literal["kl", "agreement", "all_but_agreement", "all_but_kl"]
RANK_LABELS = {
    "kl": "mean KL to the FP32 logits when only this layer is INT8",
    "agreement": "top-1 agreement with FP32 when only this layer is INT8",
    "all_but_agreement": "agreement regained when only this layer is kept in FP32",
    "all_but_kl": "KL removed when only this layer is kept in FP32",
}
SQNR_KINDS = ("local", "local_weight", "local_act", "accumulated")
_CHUNK = 8  # images per whole-model run with hooks: every layer's FP32 output is held at once


# --- Metrics ------------------------------------------------------------------------------------------------------


@dataclass
class Tally:
    """Agreement with the FP32 top-1, KL to the FP32 log-probabilities and top-1 of one configuration."""

    n: int = 0
    agree: int = 0
    correct: int = 0
    kl: float = 0.0

    def add(self, ref_logp: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor | None) -> None:
        logq = torch.log_softmax(logits.double(), dim=1)
        self.kl += float((ref_logp.exp() * (ref_logp - logq)).sum())
        top1 = logits.argmax(dim=1)
        self.agree += int((top1 == ref_logp.argmax(dim=1)).sum())
        if labels is not None:
            self.correct += int((top1 == labels).sum())
        self.n += len(logits)

    def result(self, with_labels: bool) -> dict:
        out = {"agreement": self.agree / self.n, "kl": self.kl / self.n}
        if with_labels:
            out["top1"] = self.correct / self.n
        return out


@dataclass
class Tallies:
    """Tallies of every configuration, keyed (mode, layer); the whole-model ones under layer ''."""

    tallies: dict[tuple[str, str], Tally] = field(default_factory=dict)

    def __getitem__(self, key: tuple[str, str]) -> Tally:
        return self.tallies.setdefault(key, Tally())


@dataclass
class _Sqnr:
    """Per layer: the energy of its FP32 output, and of each kind of error in it (SQNR_KINDS)."""

    signal: dict[str, float]
    noise: dict[str, dict[str, float]]

    @classmethod
    def zeros(cls, names: list[str]) -> _Sqnr:
        return cls(dict.fromkeys(names, 0.0), {k: dict.fromkeys(names, 0.0) for k in SQNR_KINDS})

    def db(self, name: str) -> dict[str, float | None]:
        return {k: sqnr_db(self.signal[name], self.noise[k][name]) for k in SQNR_KINDS}


def sqnr_db(signal: float, noise: float) -> float | None:
    if noise <= 0:
        return None  # exact: infinite SQNR does not fit JSON; shown as "—"
    return 10.0 * math.log10(max(signal, 1e-30) / noise)


# --- Inputs -------------------------------------------------------------------------------------------------------


def as_batches(images: torch.Tensor | np.ndarray | Iterable, batch_size: int) -> list[torch.Tensor]:
    """float32 tensors of at most `batch_size` images, from one array/tensor or from batches of them."""
    if isinstance(images, (np.ndarray, torch.Tensor)):
        t = torch.as_tensor(images, dtype=torch.float32)
        return list(t.split(batch_size))
    out = [torch.as_tensor(b, dtype=torch.float32) for b in images]
    return [c for b in out for c in b.split(batch_size)]


@dataclass
class EvalImages:
    """The evaluation batches, their labels (if known), and the FP32 log-probabilities once measured."""

    batches: list[torch.Tensor]
    labels: list[torch.Tensor] | None
    ref_logp: list[torch.Tensor] = field(default_factory=list)

    @classmethod
    def of(cls, images, labels: np.ndarray | None, batch_size: int) -> EvalImages:
        batches = as_batches(images, batch_size)
        if sum(len(b) for b in batches) == 0:
            raise ConfigError("diagnose needs evaluation images; none were given")
        label_batches = None
        if labels is not None:
            label_batches = list(torch.as_tensor(np.asarray(labels), dtype=torch.long).split(batch_size))
        return cls(batches, label_batches)

    @property
    def num_images(self) -> int:
        return sum(len(b) for b in self.batches)

    def label(self, b: int) -> torch.Tensor | None:
        return None if self.labels is None else self.labels[b]


@contextmanager
def _forward_hooks(fq: FakeQuantModel, names: Iterable[str], make_hook) -> Iterator[None]:
    """`make_hook(name)` as a forward hook on each named layer inside the block."""
    handles = [fq.layer(n).module.register_forward_hook(make_hook(n)) for n in names]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


# --- The stages of the sweep --------------------------------------------------------------------------------------


def _whole_model_runs(fq: FakeQuantModel, images: EvalImages, tallies: Tallies, sqnr: _Sqnr, progress) -> None:
    """FP32, all INT8, weights-only and activations-only runs of the whole model; the per-layer SQNRs are measured
    by hooks on the way. Fills `images.ref_logp` (the FP32 log-probabilities every other run is compared with)."""
    names = fq.names
    every = set(names)
    outputs: dict[str, torch.Tensor] = {}

    def fp32_hook(name):
        def hook(module, args, out):
            layer, inp = fq.layer(name), args[0]
            outputs[name] = out
            sqnr.signal[name] += float(out.double().pow(2).sum())
            for key, xin, w in (("local", layer.fake_quant_input(inp), layer.w_q), ("local_weight", inp, layer.w_q),
                                ("local_act", layer.fake_quant_input(inp), layer.w_fp)):
                sqnr.noise[key][name] += float((layer.forward_with(xin, w) - out).double().pow(2).sum())
        return hook

    def quant_hook(name):
        def hook(module, args, out):
            sqnr.noise["accumulated"][name] += float((out - outputs[name]).double().pow(2).sum())
        return hook

    for b, x in enumerate(images.batches):
        logps = []
        y = images.label(b)
        for chunk in range(0, len(x), _CHUNK):
            xs, ys = x[chunk : chunk + _CHUNK], None if y is None else y[chunk : chunk + _CHUNK]
            fq.configure()
            with _forward_hooks(fq, names, fp32_hook):
                logits = fq(xs)
            fq.configure(weights=every, acts=every)
            with _forward_hooks(fq, names, quant_hook):
                quant_logits = fq(xs)
            outputs.clear()
            logps.append(torch.log_softmax(logits.double(), dim=1))
            tallies[("fp32", "")].add(logps[-1], logits, ys)
            tallies[("all", "")].add(logps[-1], quant_logits, ys)
        images.ref_logp.append(torch.cat(logps))
        for mode, w, a in (("weights_only", every, ()), ("activations_only", (), every)):
            fq.configure(weights=w, acts=a)
            tallies[(mode, "")].add(images.ref_logp[b], fq(x), y)
        if progress:
            progress(f"whole-model runs: batch {b + 1}/{len(images.batches)}")


# A mode: its name, the (weights, activations) it quantizes for layer `name` of `every`, and the state whose
# prefix it shares ("fp": everything before the layer in FP32, "q": everything before it INT8).
Mode = tuple[str, Callable[[str, set[str]], tuple[set[str], set[str]]], str]


def sweep_modes(split_effects: bool) -> list[Mode]:
    modes: list[Mode] = [("only", lambda n, every: ({n}, {n}), "fp"),
                         ("all_but", lambda n, every: (every - {n}, every - {n}), "q")]
    if split_effects:
        modes += [("only_weight", lambda n, every: ({n}, set()), "fp"), ("only_act", lambda n, every: (set(), {n}), "fp")]
    return modes


def per_layer_runs(fq: FakeQuantModel, swept: list[str], modes: list[Mode], images: EvalImages, tallies: Tallies,
                   progress) -> bool:
    """Every mode for every swept layer. The two states advance layer by layer (`fp` with everything FP32, the prefix
    of "only L"; `q` with everything INT8, the prefix of "all but L"), and each run finishes from a copy of its state.
    True when the prefixes were cached (the model traced), False when every run started from the input."""
    every = set(fq.names)
    runner = PrefixRunner(fq)
    states = {state: config for state, config in (("fp", ((), ())), ("q", (every, every)))
              if any(s == state for _, _, s in modes)}  # only the states a mode finishes from are advanced
    envs = {state: [runner.begin(x) for x in images.batches] for state in states}
    pos = 0
    for i, name in enumerate(swept):
        new_pos = runner.position(name)
        for state, (w, a) in states.items():
            fq.configure(weights=w, acts=a)
            for env in envs[state]:
                runner.advance(env, pos, new_pos)
        pos = new_pos
        for mode, config, state in modes:
            w, a = config(name, every)
            fq.configure(weights=w, acts=a)
            for b, env in enumerate(envs[state]):
                tallies[(mode, name)].add(images.ref_logp[b], runner.finish(env, pos), images.label(b))
        if progress:
            progress(f"layer {i + 1}/{len(swept)}: {name}")
    return runner.graph


def layer_entry(fq: FakeQuantModel, name: str, modes: list[Mode], tallies: Tallies, sqnr: _Sqnr | None,
                with_labels: bool) -> dict:
    """A layer's results: what it is, its input range, its SQNR (unless not measured) and each mode's tally."""
    layer = fq.layer(name)
    m = layer.module
    kind = type(m).__name__
    if isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels:
        kind = "Conv2d (depthwise)"
    entry = {
        "module": name,
        "onnx_node": None,
        "type": kind,
        "params": int(m.weight.numel()),
        "act_range": [layer.lo, layer.hi],
    }
    if sqnr is not None:
        entry["sqnr_db"] = sqnr.db(name)
    for mode, _, _ in modes:
        entry[mode] = tallies[(mode, name)].result(with_labels)
    return entry


def rank(entries: list[dict], rank_by: RankBy) -> list[str]:
    """Layer names, most sensitive first by `rank_by` (ties in agreement broken by KL)."""

    def score(entry: dict) -> float:
        if rank_by == "kl":
            return entry["only"]["kl"]
        if rank_by == "agreement":
            return -entry["only"]["agreement"] + 1e-9 * entry["only"]["kl"]
        if rank_by == "all_but_agreement":
            return entry["all_but"]["agreement"] - 1e-9 * entry["all_but"]["kl"]
        return -entry["all_but"]["kl"]

    return [e["module"] for e in sorted(entries, key=score, reverse=True)]


def _add_onnx_names(entries: list[dict], model: nn.Module, example: torch.Tensor) -> None:
    try:
        mapping = onnx_node_names(model, example)
        for entry in entries:
            entry["onnx_node"] = mapping.get(entry["module"])
    except Exception as e:  # noqa: BLE001 - names are a convenience; the measurements stand without them
        warnings.warn(f"ONNX node names unavailable: {type(e).__name__}: {e}", stacklevel=3)


def onnx_node_names(module: nn.Module, example_input: torch.Tensor) -> dict[str, str]:
    """PyTorch module path -> ONNX node name(s) of its Conv/Gemm/MatMul, from a legacy-exporter export."""
    from int8eval.backends.onnx_export import export_onnx, module_nodes

    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = export_onnx(copy.deepcopy(module).eval(), example_input, Path(tmp) / "model.onnx")
        nodes = module_nodes(path, module)
    return {k: ", ".join(v) for k, v in nodes.items()}


def swept_layers(names: list[str], layers: Iterable[str] | None) -> list[str]:
    if layers is None:
        return names
    wanted = set(layers)
    missing = wanted - set(names)
    if missing:
        raise ConfigError(f"no Conv/Linear layer named {sorted(missing)[0]!r}; layers: {', '.join(names[:5])}, ...")
    return [n for n in names if n in wanted]


# --- The diagnosis ------------------------------------------------------------------------------------------------


def diagnose(
    model: nn.Module,
    spec: FakeQuantSpec | Recipe,
    calib: Iterable,
    eval_images,
    *,
    labels: np.ndarray | None = None,
    top_k: int = 5,
    rank_by: RankBy = "kl",
    split_effects: bool = True,
    layers: Iterable[str] | None = None,
    onnx_names: bool = True,
    example_input: torch.Tensor | None = None,
    batch_size: int = 32,
    progress=None,
    fq: FakeQuantModel | None = None,
) -> dict:
    """Per-layer INT8 sensitivity of `model` (a PyTorch module, FP32, eval mode; a LoadedModel's `.module`).

    Args:
        model: not modified (a folded copy is quantized).
        spec: a FakeQuantSpec, or an int8eval Recipe (minmax/percentile, per-channel or per-tensor).
        calib: calibration batches (float32 [N, 3, H, W], arrays or tensors; CalibrationData works).
        eval_images: float32 [N, 3, H, W] (one array, or batches); agreement is measured on these.
        labels: their true classes, to report top-1 too (optional: agreement with FP32 needs none).
        top_k: how many of the most sensitive layers to keep in FP32 in the final check.
        rank_by: "kl" (default; separates layers that flip no image), "agreement", "all_but_agreement", "all_but_kl".
        split_effects: also run each layer with only its weights / only its input quantized.
        layers: sweep only these layers (module paths; default all); the others are still quantized in "all but".
        onnx_names: export to ONNX (legacy exporter) and name each layer's Conv/Gemm node.
        example_input: for the ONNX export; default: the first evaluation image.
        fq: `model` as a FakeQuantModel with `spec`, already calibrated on `calib` (default: built and calibrated
            here); it is left configured for the last check.

    Returns a JSON-ready dict (see `commands.diagnose.run_diagnose`): per-layer results in execution order, the
    ranking, the top-k, and the agreement with the top-k kept in FP32 (`keep_fp32`).
    """
    start_time = time.perf_counter()
    if isinstance(spec, Recipe):
        spec = FakeQuantSpec.from_recipe(spec)
    if rank_by not in RANK_LABELS:
        raise ConfigError(f"rank_by {rank_by!r} is not one of {', '.join(RANK_LABELS)}")
    calib_batches = as_batches(list(calib), batch_size)
    images = EvalImages.of(eval_images, labels, batch_size)
    if fq is None:
        fq = FakeQuantModel(model, spec)
        fq.calibrate(calib_batches)
    names = fq.names
    swept = swept_layers(names, layers)
    tallies, sqnr, modes = Tallies(), _Sqnr.zeros(names), sweep_modes(split_effects)

    _whole_model_runs(fq, images, tallies, sqnr, progress)
    prefix_cached = per_layer_runs(fq, swept, modes, images, tallies, progress)

    with_labels = labels is not None
    entries = [layer_entry(fq, name, modes, tallies, sqnr, with_labels) for name in swept]
    ranking = rank(entries, rank_by)
    top = ranking[:top_k]

    keep = Tally()  # the top-k kept in FP32, everything else INT8
    every = set(names)
    fq.configure(weights=every - set(top), acts=every - set(top))
    for b, x in enumerate(images.batches):
        keep.add(images.ref_logp[b], fq(x), images.label(b))

    if onnx_names:
        _add_onnx_names(entries, model, example_input if example_input is not None else images.batches[0][:1])

    return {
        "spec": asdict(spec),
        "spec_description": spec.describe() + ("" if fq.bn_folded else " (model did not trace: BatchNorm NOT folded)"),
        "bn_folded": fq.bn_folded,
        "prefix_cached": prefix_cached,
        "num_calib": sum(len(b) for b in calib_batches),
        "num_images": images.num_images,
        "num_layers": len(names),
        "reference": tallies[("fp32", "")].result(with_labels),
        "all_quantized": tallies[("all", "")].result(with_labels),
        "weights_only": tallies[("weights_only", "")].result(with_labels),
        "activations_only": tallies[("activations_only", "")].result(with_labels),
        "rank_by": RANK_LABELS[rank_by],
        "ranking": ranking,
        "top_k": top,
        "keep_fp32": {"layers": top, **keep.result(with_labels)},
        "layers": entries,
        "seconds": time.perf_counter() - start_time,
    }


def keep_fp32_check(model: nn.Module, spec: FakeQuantSpec | Recipe, calib: Iterable, eval_images, keep: list[str], *,
                    labels: np.ndarray | None = None, batch_size: int = 32, fq: FakeQuantModel | None = None) -> dict:
    """Agreement with FP32 of the fully fake-quantized model and of the one with `keep` layers in FP32, on
    `eval_images` (e.g. more images than the sweep used, to confirm its top-k). `fq`: `model` as a FakeQuantModel
    with `spec`, already calibrated on `calib` (e.g. the one `diagnose` used); default: built and calibrated here."""
    if fq is None:
        if isinstance(spec, Recipe):
            spec = FakeQuantSpec.from_recipe(spec)
        fq = FakeQuantModel(model, spec)
        fq.calibrate(as_batches(list(calib), batch_size))
    every = set(fq.names)
    tallies = {"reference": Tally(), "all_quantized": Tally(), "keep_fp32": Tally()}
    label_batches = None if labels is None else list(torch.as_tensor(np.asarray(labels)).split(batch_size))
    for b, x in enumerate(as_batches(eval_images, batch_size)):
        fq.configure()
        logits = fq(x)
        ref = torch.log_softmax(logits.double(), dim=1)
        y = None if label_batches is None else label_batches[b]
        tallies["reference"].add(ref, logits, y)
        for key, skip in (("all_quantized", set()), ("keep_fp32", set(keep))):
            fq.configure(weights=every - skip, acts=every - skip)
            tallies[key].add(ref, fq(x), y)
    return {k: t.result(labels is not None) | {"n": t.n} for k, t in tallies.items()} | {"layers": list(keep)}
