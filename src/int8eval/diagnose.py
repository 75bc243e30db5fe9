"""Which layers cost the accuracy: per-layer INT8 sensitivity of a PyTorch model, with backend-independent fake
quantization written in torch ops.

Quantization model (what the common CPU/GPU INT8 backends do, simplified): BatchNorm is folded into the preceding
convolution first; every Conv/Linear gets symmetric int8 weights ([-127, 127], per output channel or per tensor)
and a per-tensor quantized input activation (asymmetric uint8 as ONNX Runtime's and PT2E's CPU defaults, or
symmetric int8 as TensorRT wants), with ranges from calibration images (global min/max, or a percentile of a
histogram). Keeping a layer "in FP32" removes both its weight and its input quantizer, like removing its Q/DQ pair.
Biases and the adds of residual connections stay in float: the numbers are the quantization error of the
convolutions and matmuls, which is where backends lose accuracy. They approximate, not reproduce, a backend.

Per layer it measures agreement with the FP32 top-1 (and the mean KL divergence of the logits, which separates
layers that flip no image on a small set) when only that layer is quantized, when every layer but that one is,
and when only its weights or only its input are; plus the SQNR of its output: local (FP32 input, the layer's own
error) and accumulated (inside the fully quantized model). A prefix of the network that two runs share is
computed once (torch.fx), so a sweep costs about half of running every configuration from the input.
"""

from __future__ import annotations

import copy
import json
import math
import operator
import tempfile
import time
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from int8eval.backends.bias_correction import output_shifts
from int8eval.config import CalibMethod, Recipe
from int8eval.errors import ConfigError
from int8eval.models import QUANT_TYPES, fold_batchnorm

HIST_BINS = 4096
RankBy = Literal["kl", "agreement", "all_but_agreement", "all_but_kl"]
RANK_LABELS = {
    "kl": "mean KL to the FP32 logits when only this layer is INT8",
    "agreement": "top-1 agreement with FP32 when only this layer is INT8",
    "all_but_agreement": "agreement regained when only this layer is kept in FP32",
    "all_but_kl": "KL removed when only this layer is kept in FP32",
}


@dataclass(frozen=True)
class FakeQuantSpec:
    """The fake-quantization recipe: weight granularity, activation ranges and activation type."""

    per_channel: bool = True
    calib: Literal["minmax", "percentile"] = "minmax"
    percentile: float = 99.999
    symmetric_activations: bool = False
    bias_correction: bool = True  # as the backends' INT8 recipes (`backends.bias_correction`)

    @classmethod
    def from_recipe(cls, recipe: Recipe, *, symmetric_activations: bool | None = None) -> FakeQuantSpec:
        """The fake-quant counterpart of an int8eval Recipe (its backend only decides the activation type)."""
        if recipe.calib not in (CalibMethod.minmax, CalibMethod.percentile):
            raise ConfigError(
                f"diagnose fakes INT8 with minmax or percentile ranges, not {recipe.calib.value}; "
                "use --calib minmax or --calib percentile"
            )
        if symmetric_activations is None:
            symmetric_activations = recipe.backend.value == "tensorrt"
        return cls(recipe.per_channel, recipe.calib.value, recipe.percentile, symmetric_activations, recipe.bias_correction)

    def describe(self) -> str:
        act = "symmetric int8" if self.symmetric_activations else "asymmetric uint8"
        rng = "min/max" if self.calib == "minmax" else f"{self.percentile:g}th-percentile"
        w = "per-channel" if self.per_channel else "per-tensor"
        bc = ", biases corrected for the weights' mean error" if self.bias_correction else ""
        return f"{w} symmetric int8 weights, per-tensor {act} activations with {rng} ranges, BatchNorm folded{bc}"


def quantize_weight(w: torch.Tensor, per_channel: bool) -> torch.Tensor:
    """Symmetric int8 fake quantization of a weight: scale = max|w| / 127 per output channel (dim 0) or tensor."""
    amax = w.abs().amax(dim=tuple(range(1, w.dim())), keepdim=True) if per_channel else w.abs().max()
    scale = torch.clamp(amax / 127.0, min=1e-12)  # an all-zero channel stays zero
    return torch.clamp(torch.round(w / scale), -127, 127) * scale


def activation_qparams(lo: float, hi: float, symmetric: bool) -> tuple[float, int, int, int]:
    """(scale, zero_point, qmin, qmax) of a per-tensor activation quantizer for the range [lo, hi]."""
    if symmetric:
        amax = max(abs(lo), abs(hi), 1e-12)
        return amax / 127.0, 0, -128, 127
    lo, hi = min(lo, 0.0), max(hi, 0.0)  # zero must be exact (padding, ReLU)
    scale = max((hi - lo) / 255.0, 1e-12)
    return scale, int(min(max(round(-lo / scale), 0), 255)), 0, 255


@dataclass
class _Layer:
    name: str
    module: nn.Module
    w_fp: torch.Tensor
    w_q: torch.Tensor
    b_fp: torch.Tensor
    b_q: torch.Tensor  # the bias to use with w_q (bias-corrected once calibrated, if the spec says so)
    lo: float = math.inf
    hi: float = -math.inf
    hist: torch.Tensor | None = None
    hist_range: tuple[float, float] = (0.0, 0.0)
    qparams: tuple[float, int, int, int] | None = None

    def fake_quant_input(self, x: torch.Tensor) -> torch.Tensor:
        scale, zp, qmin, qmax = self.qparams
        return torch.fake_quantize_per_tensor_affine(x, scale, zp, qmin, qmax)

    def forward_with(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """The layer with weights `w` (w_q or w_fp) and the bias that goes with them."""
        m, b = self.module, self.b_q if w is self.w_q else self.b_fp
        if isinstance(m, nn.Linear):
            return F.linear(x, w, b)
        return m._conv_forward(x, w, b)


def _fold_batchnorm(module: nn.Module) -> tuple[nn.Module, bool]:
    """`models.fold_batchnorm` without in-place ops (cached prefix values are shared by several runs)."""
    folded, ok = fold_batchnorm(module)
    if ok:
        _no_inplace(folded)
    return folded, ok


_INPLACE = {operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul,
            operator.itruediv: operator.truediv}


def _no_inplace(gm: torch.fx.GraphModule) -> None:
    # Cached prefix values are reused by several runs, so nothing may write into them.
    for m in gm.modules():
        if getattr(m, "inplace", False) is True:
            m.inplace = False
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in _INPLACE:
            node.target = _INPLACE[node.target]
        elif node.op == "call_method" and node.target.endswith("_") and not node.target.endswith("__"):
            if hasattr(torch.Tensor, node.target[:-1]):
                node.target = node.target[:-1]
    gm.recompile()


class FakeQuantModel:
    """A folded copy of a PyTorch model whose Conv/Linear layers can each be switched between FP32 and fake INT8
    (weights and input activation separately).

    Example:
        >>> fq = FakeQuantModel(loaded.module, FakeQuantSpec())
        >>> fq.calibrate(calib_batches)
        >>> fq.configure(weights=fq.names, acts=fq.names)   # everything INT8
        >>> logits = fq(images)
    """

    def __init__(self, module: nn.Module, spec: FakeQuantSpec) -> None:
        self.spec = spec
        self.model, self.bn_folded = _fold_batchnorm(module)
        self._layers: dict[str, _Layer] = {}
        with torch.no_grad():
            for name, m in self.model.named_modules():
                if isinstance(m, QUANT_TYPES):
                    w = m.weight.detach().clone()
                    if m.bias is None:  # bias correction needs one
                        m.bias = nn.Parameter(torch.zeros(len(w)), requires_grad=False)
                    b = m.bias.detach().clone()
                    self._layers[name] = _Layer(name, m, w, quantize_weight(w, spec.per_channel), b, b)
        if not self._layers:
            raise ConfigError("the model has no Conv or Linear layer to quantize")
        self._acts: set[str] = set()
        self._observe: str | None = None  # "minmax" | "hist" during calibration
        self._order: list[str] = []
        self._hooks = [m.register_forward_pre_hook(self._pre_hook(name)) for name, m in self._named()]

    def _named(self) -> Iterator[tuple[str, nn.Module]]:
        return ((n, layer.module) for n, layer in self._layers.items())

    @property
    def names(self) -> list[str]:
        """Layer names (PyTorch module paths) in execution order once calibrated, else in module order."""
        return list(self._order) if self._order else list(self._layers)

    def layer(self, name: str) -> _Layer:
        return self._layers[name]

    def _pre_hook(self, name: str):
        def hook(module, args):
            x = args[0]
            if name not in self._layers:  # not called during calibration: left in FP32
                return None
            if self._observe is not None:
                self._record(name, x)
            elif name in self._acts:
                return (self._layers[name].fake_quant_input(x), *args[1:])
            return None

        return hook

    def _record(self, name: str, x: torch.Tensor) -> None:
        layer = self._layers[name]
        if name not in self._order:
            self._order.append(name)
        x = x.detach().float()
        if self._observe == "minmax":
            layer.lo, layer.hi = min(layer.lo, float(x.min())), max(layer.hi, float(x.max()))
        else:
            lo, hi = layer.hist_range
            h = torch.histc(x, bins=HIST_BINS, min=lo, max=hi)
            layer.hist = h if layer.hist is None else layer.hist + h

    def configure(self, *, weights: Iterable[str] = (), acts: Iterable[str] = ()) -> None:
        """Quantize exactly these layers' weights and these layers' input activations; the rest run in FP32."""
        weights, acts = set(weights), set(acts)
        unknown = (weights | acts) - set(self._layers)
        if unknown:
            raise ConfigError(f"no Conv/Linear layer named {sorted(unknown)[0]!r}; layers: {', '.join(self.names[:5])}, ...")
        with torch.no_grad():
            for name, layer in self._layers.items():
                layer.module.weight.data = layer.w_q if name in weights else layer.w_fp
                layer.module.bias.data = layer.b_q if name in weights else layer.b_fp
        self._acts = acts

    def calibrate(self, batches: Iterable[torch.Tensor]) -> None:
        """Collect each layer's input range over the calibration batches (two passes for percentile ranges)."""
        batches = list(batches)
        if not batches:
            raise ConfigError("diagnose needs calibration images; none were given")
        self.configure()
        self._order = []
        try:
            self._observe = "minmax"
            self._run(batches)
            if self.spec.calib == "percentile":
                for layer in self._layers.values():
                    layer.hist_range = (min(layer.lo, 0.0), max(layer.hi, 0.0) or 1e-12)
                self._observe = "hist"
                self._run(batches)
                for layer in self._layers.values():
                    layer.lo, layer.hi = self._percentile_range(layer)
        finally:
            self._observe = None
        for name, layer in self._layers.items():
            if name in self._order:
                layer.qparams = activation_qparams(layer.lo, layer.hi, self.spec.symmetric_activations)
        # Layers never called (dead modules) are not part of the model's computation.
        self._layers = {n: self._layers[n] for n in self._order}
        if self.spec.bias_correction:
            errors = {n: layer.w_q - layer.w_fp for n, layer in self._layers.items()}
            for n, shift in output_shifts(self.model, errors, batches).items():
                self._layers[n].b_q = self._layers[n].b_fp - torch.as_tensor(shift, dtype=self._layers[n].b_fp.dtype)

    def _percentile_range(self, layer: _Layer) -> tuple[float, float]:
        # The backends' own percentile (|x| clipped at that percentile), so the diagnosis ranks what they run.
        from int8eval.backends.ranges import histogram_range

        edges = np.linspace(*layer.hist_range, HIST_BINS + 1)
        lo, hi = histogram_range("percentile", layer.hist.double().numpy(), edges, percentile=self.spec.percentile)
        return max(lo, layer.lo), min(hi, layer.hi)  # bin edges can lie beyond the values seen

    def _run(self, batches: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for x in batches:
                self.model(x)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.model(x)


# --- Running a suffix of the network from cached values ----------------------------------------------------------


class _Runner:
    """Runs a torch.fx GraphModule node range by node range, keeping only the values still needed (the
    'frontier'), so runs that share a prefix compute it once. Without a graph it runs the whole model."""

    def __init__(self, fq: FakeQuantModel) -> None:
        self.fq = fq
        gm = fq.model
        self.graph = isinstance(gm, torch.fx.GraphModule)
        self.start: dict[str, int] = {}
        if not self.graph:
            return
        self.nodes = list(gm.graph.nodes)
        self.index = {n: i for i, n in enumerate(self.nodes)}
        self.last_use = {n: max((self.index[u] for u in n.users), default=i) for i, n in enumerate(self.nodes)}
        self.interp = torch.fx.Interpreter(gm, garbage_collect_values=False)
        for i, node in enumerate(self.nodes):
            if node.op == "call_module" and node.target in fq._layers and node.target not in self.start:
                self.start[node.target] = i

    def position(self, layer: str) -> int:
        return self.start.get(layer, 0) if self.graph else 0

    def begin(self, x: torch.Tensor) -> dict:
        if not self.graph:
            return {"x": x}
        placeholder = self.nodes[0]
        if placeholder.op != "placeholder" or sum(n.op == "placeholder" for n in self.nodes) != 1:
            raise ConfigError("diagnose supports models with a single input")
        return {placeholder: x}

    def advance(self, env: dict, start: int, stop: int) -> None:
        """Run nodes [start, stop) in `env` (in place) and drop values no node from `stop` on needs."""
        if not self.graph:
            return
        with torch.no_grad():
            self.interp.env = env
            for node in self.nodes[max(start, 1) : stop]:
                env[node] = self.interp.run_node(node)
            for n in [n for n in env if self.last_use[n] < stop]:
                del env[n]

    def finish(self, env: dict, start: int) -> torch.Tensor:
        """The output when the nodes from `start` on are run from a copy of `env` (which is left untouched)."""
        if not self.graph:
            return self.fq(env["x"])
        local = dict(env)
        with torch.no_grad():
            self.interp.env = local
            for node in self.nodes[max(start, 1) :]:
                if node.op == "output":
                    return self.interp.run_node(node)
                local[node] = self.interp.run_node(node)
                for dead in [n for n in node.all_input_nodes if self.last_use[n] <= self.index[node]]:
                    local.pop(dead, None)
        raise RuntimeError("graph has no output node")  # pragma: no cover


# --- Metrics ------------------------------------------------------------------------------------------------------


@dataclass
class _Tally:
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


def _sqnr_db(signal: float, noise: float) -> float | None:
    if noise <= 0:
        return None  # exact: infinite SQNR does not fit JSON; shown as "—"
    return 10.0 * math.log10(max(signal, 1e-30) / noise)


# --- ONNX node names ----------------------------------------------------------------------------------------------


def onnx_node_names(module: nn.Module, example_input: torch.Tensor) -> dict[str, str]:
    """PyTorch module path -> ONNX node name(s) of its Conv/Gemm/MatMul, from a legacy-exporter export."""
    from int8eval.backends.onnx_export import export_onnx, module_nodes

    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = export_onnx(copy.deepcopy(module).eval(), example_input, Path(tmp) / "model.onnx")
        nodes = module_nodes(path, module)
    return {k: ", ".join(v) for k, v in nodes.items()}


# --- The diagnosis ------------------------------------------------------------------------------------------------


@dataclass
class _Sweep:
    """Tallies of every configuration, keyed (mode, layer); the whole-model ones under layer ''."""

    tallies: dict[tuple[str, str], _Tally] = field(default_factory=dict)

    def __getitem__(self, key: tuple[str, str]) -> _Tally:
        return self.tallies.setdefault(key, _Tally())


@contextmanager
def _forward_hooks(fq: FakeQuantModel, names: Iterable[str], make_hook) -> Iterator[None]:
    """`make_hook(name)` as a forward hook on each named layer inside the block."""
    handles = [fq.layer(n).module.register_forward_hook(make_hook(n)) for n in names]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _batches(images: torch.Tensor | np.ndarray | Iterable, batch_size: int) -> list[torch.Tensor]:
    if isinstance(images, (np.ndarray, torch.Tensor)):
        t = torch.as_tensor(images, dtype=torch.float32)
        return list(t.split(batch_size))
    out = [torch.as_tensor(b, dtype=torch.float32) for b in images]
    return [c for b in out for c in b.split(batch_size)]


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

    Returns a JSON-ready dict (see `run_diagnose`): per-layer results in execution order, the ranking, the top-k,
    and the agreement with the top-k kept in FP32 (`keep_fp32`).
    """
    start_time = time.perf_counter()
    if isinstance(spec, Recipe):
        spec = FakeQuantSpec.from_recipe(spec)
    if rank_by not in RANK_LABELS:
        raise ConfigError(f"rank_by {rank_by!r} is not one of {', '.join(RANK_LABELS)}")
    calib_batches = _batches(list(calib), batch_size)
    batches = _batches(eval_images, batch_size)
    n_images = sum(len(b) for b in batches)
    if n_images == 0:
        raise ConfigError("diagnose needs evaluation images; none were given")
    label_batches = None
    if labels is not None:
        label_batches = list(torch.as_tensor(np.asarray(labels), dtype=torch.long).split(batch_size))
    if fq is None:
        fq = FakeQuantModel(model, spec)
        fq.calibrate(calib_batches)
    names = fq.names
    swept = names
    if layers is not None:
        wanted = set(layers)
        missing = wanted - set(names)
        if missing:
            raise ConfigError(f"no Conv/Linear layer named {sorted(missing)[0]!r}; layers: {', '.join(names[:5])}, ...")
        swept = [n for n in names if n in wanted]
    runner = _Runner(fq)
    sweep = _Sweep()
    signal = dict.fromkeys(names, 0.0)
    noise = {k: dict.fromkeys(names, 0.0) for k in ("local", "local_weight", "local_act", "accumulated")}
    every = set(names)
    lab = (lambda b: label_batches[b]) if label_batches is not None else (lambda b: None)

    # 1. Whole-model runs, with the per-layer SQNRs measured by hooks on the way.
    ref_logp: list[torch.Tensor] = []
    for b, x in enumerate(batches):
        outputs: dict[str, torch.Tensor] = {}

        def fp32_hook(name):
            def hook(module, args, out):
                layer, inp = fq.layer(name), args[0]
                outputs[name] = out
                signal[name] += float(out.double().pow(2).sum())
                for key, xin, w in (("local", layer.fake_quant_input(inp), layer.w_q), ("local_weight", inp, layer.w_q),
                                    ("local_act", layer.fake_quant_input(inp), layer.w_fp)):
                    noise[key][name] += float((layer.forward_with(xin, w) - out).double().pow(2).sum())
            return hook

        def quant_hook(name):
            def hook(module, args, out):
                noise["accumulated"][name] += float((out - outputs[name]).double().pow(2).sum())
            return hook

        logps = []
        y = lab(b)
        for chunk in range(0, len(x), 8):  # every layer's FP32 output is held at once: keep chunks small
            xs, ys = x[chunk : chunk + 8], None if y is None else y[chunk : chunk + 8]
            fq.configure()
            with _forward_hooks(fq, names, fp32_hook):
                logits = fq(xs)
            fq.configure(weights=every, acts=every)
            with _forward_hooks(fq, names, quant_hook):
                quant_logits = fq(xs)
            outputs.clear()
            logps.append(torch.log_softmax(logits.double(), dim=1))
            sweep[("fp32", "")].add(logps[-1], logits, ys)
            sweep[("all", "")].add(logps[-1], quant_logits, ys)
        ref_logp.append(torch.cat(logps))
        for mode, w, a in (("weights_only", every, ()), ("activations_only", (), every)):
            fq.configure(weights=w, acts=a)
            sweep[(mode, "")].add(ref_logp[b], fq(x), lab(b))
        if progress:
            progress(f"whole-model runs: batch {b + 1}/{len(batches)}")

    # 2. Per-layer sweep. States advance layer by layer: `fp` with everything FP32 (the prefix of "only L"),
    #    `q` with everything INT8 (the prefix of "all but L").
    modes = [("only", lambda n: ({n}, {n}), "fp"), ("all_but", lambda n: (every - {n}, every - {n}), "q")]
    if split_effects:
        modes += [("only_weight", lambda n: ({n}, set()), "fp"), ("only_act", lambda n: (set(), {n}), "fp")]
    envs = {"fp": [runner.begin(x) for x in batches], "q": [runner.begin(x) for x in batches]}
    pos = 0
    for i, name in enumerate(swept):
        new_pos = runner.position(name)
        for state, (w, a) in (("fp", ((), ())), ("q", (every, every))):
            fq.configure(weights=w, acts=a)
            for env in envs[state]:
                runner.advance(env, pos, new_pos)
        pos = new_pos
        for mode, config, state in modes:
            w, a = config(name)
            fq.configure(weights=w, acts=a)
            for b, env in enumerate(envs[state]):
                sweep[(mode, name)].add(ref_logp[b], runner.finish(env, pos), lab(b))
        if progress:
            progress(f"layer {i + 1}/{len(swept)}: {name}")
    del envs

    with_labels = labels is not None
    results = []
    for name in swept:
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
            "sqnr_db": {k: _sqnr_db(signal[name], noise[k][name]) for k in noise},
        }
        for mode, _, _ in modes:
            entry[mode] = sweep[(mode, name)].result(with_labels)
        results.append(entry)

    whole = sweep[("all", "")].result(with_labels)

    def score(entry: dict) -> float:
        if rank_by == "kl":
            return entry["only"]["kl"]
        if rank_by == "agreement":
            return -entry["only"]["agreement"] + 1e-9 * entry["only"]["kl"]
        if rank_by == "all_but_agreement":
            return entry["all_but"]["agreement"] - 1e-9 * entry["all_but"]["kl"]
        return -entry["all_but"]["kl"]

    ranking = [e["module"] for e in sorted(results, key=score, reverse=True)]
    top = ranking[:top_k]

    # 3. The top-k kept in FP32, everything else INT8.
    keep = _Tally()
    fq.configure(weights=every - set(top), acts=every - set(top))
    for b, x in enumerate(batches):
        keep.add(ref_logp[b], fq(x), lab(b))

    if onnx_names:
        try:
            example = example_input if example_input is not None else batches[0][:1]
            mapping = onnx_node_names(model, example)
            for entry in results:
                entry["onnx_node"] = mapping.get(entry["module"])
        except Exception as e:  # noqa: BLE001 - names are a convenience; the measurements stand without them
            warnings.warn(f"ONNX node names unavailable: {type(e).__name__}: {e}", stacklevel=2)

    result = {
        "spec": asdict(spec),
        "spec_description": spec.describe() + ("" if fq.bn_folded else " (model did not trace: BatchNorm NOT folded)"),
        "bn_folded": fq.bn_folded,
        "prefix_cached": runner.graph,
        "num_calib": sum(len(b) for b in calib_batches),
        "num_images": n_images,
        "num_layers": len(names),
        "reference": sweep[("fp32", "")].result(with_labels),
        "all_quantized": whole,
        "weights_only": sweep[("weights_only", "")].result(with_labels),
        "activations_only": sweep[("activations_only", "")].result(with_labels),
        "rank_by": RANK_LABELS[rank_by],
        "ranking": ranking,
        "top_k": top,
        "keep_fp32": {"layers": top, **keep.result(with_labels)},
        "layers": results,
        "seconds": time.perf_counter() - start_time,
    }
    return result


def keep_fp32_check(model: nn.Module, spec: FakeQuantSpec | Recipe, calib: Iterable, eval_images, keep: list[str], *,
                    labels: np.ndarray | None = None, batch_size: int = 32, fq: FakeQuantModel | None = None) -> dict:
    """Agreement with FP32 of the fully fake-quantized model and of the one with `keep` layers in FP32, on
    `eval_images` (e.g. more images than the sweep used, to confirm its top-k). `fq`: `model` as a FakeQuantModel
    with `spec`, already calibrated on `calib` (e.g. the one `diagnose` used); default: built and calibrated here."""
    if fq is None:
        if isinstance(spec, Recipe):
            spec = FakeQuantSpec.from_recipe(spec)
        fq = FakeQuantModel(model, spec)
        fq.calibrate(_batches(list(calib), batch_size))
    every = set(fq.names)
    tallies = {"reference": _Tally(), "all_quantized": _Tally(), "keep_fp32": _Tally()}
    label_batches = None if labels is None else list(torch.as_tensor(np.asarray(labels)).split(batch_size))
    for b, x in enumerate(_batches(eval_images, batch_size)):
        fq.configure()
        logits = fq(x)
        ref = torch.log_softmax(logits.double(), dim=1)
        y = None if label_batches is None else label_batches[b]
        tallies["reference"].add(ref, logits, y)
        for key, skip in (("all_quantized", set()), ("keep_fp32", set(keep))):
            fq.configure(weights=every - skip, acts=every - skip)
            tallies[key].add(ref, fq(x), y)
    return {k: t.result(labels is not None) | {"n": t.n} for k, t in tallies.items()} | {"layers": list(keep)}


# --- The CLI entry point ------------------------------------------------------------------------------------------


def run_diagnose(
    model_name: str,
    data_root: Path,
    out_dir: Path,
    *,
    recipe: Recipe | None = None,
    spec: FakeQuantSpec | None = None,
    calib_size: int = 100,
    max_images: int | None = 64,
    confirm_images: int | None = None,
    top_k: int = 5,
    rank_by: RankBy = "kl",
    split_effects: bool = True,
    layers: list[str] | None = None,
    seed: int = 0,
    batch_size: int = 32,
    workers: int = 0,
    labels: Path | None = None,
    checkpoint: Path | None = None,
    weights: str | None = None,
    threads: int | None = None,
    console=None,
) -> dict:
    """`int8eval diagnose`: per-layer sensitivity of MODEL on DATA, written to OUT/sensitivity.json.

    Calibration images are the same seeded split `int8eval run` uses (same `calib_size` and `seed`), so the two
    agree. The sweep runs on `max_images` evaluation images (agreement with FP32 needs few); with
    `confirm_images`, the top-k kept in FP32 is checked again on that many (disjoint from the sweep's where the data
    allows). If OUT/report.json exists for the same model, its `sensitivity` section is filled and report.md/.html
    re-rendered.

    Example:
        >>> run_diagnose("efficientnet_lite0", Path("imagenet-sample"), Path("runs/lite0"), max_images=64, top_k=5)
    """
    from int8eval.bench import torch_threads
    from int8eval.data.decode import decode_samples
    from int8eval.data.layouts import discover, split, subsample
    from int8eval.models import load_model

    with torch_threads(threads or None):  # restored on the way out
        say = (lambda msg: console.log(msg)) if console is not None else (lambda msg: None)
        if spec is None:
            spec = FakeQuantSpec.from_recipe(recipe) if recipe is not None else FakeQuantSpec()
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        loaded = load_model(model_name, checkpoint=checkpoint, weights=weights)
        found = discover(data_root, labels)
        calib_samples, rest = split(found.samples, calib_size, seed)
        sweep_samples = subsample(rest, max_images, seed)

        def decode(samples) -> tuple[np.ndarray, np.ndarray, list[str]]:
            images, ys, ids = decode_samples(samples, loaded.preprocessing, batch_size=batch_size, workers=workers)
            if not images:
                raise ConfigError("none of the images could be read")
            return np.concatenate(images), ys, ids

        calib_images, _, calib_ids = decode(calib_samples)
        eval_images, eval_labels, eval_ids = decode(sweep_samples)
        say(f"diagnose {model_name}: {len(calib_ids)} calibration, {len(eval_ids)} evaluation images; {spec.describe()}")
        fq = FakeQuantModel(loaded.module, spec)  # calibrated once, for the sweep and the confirmation
        fq.calibrate(_batches([calib_images], batch_size))
        result = diagnose(
            loaded.module, spec, [calib_images], eval_images, labels=eval_labels, top_k=top_k, rank_by=rank_by,
            split_effects=split_effects, layers=layers, example_input=loaded.example_input(1), batch_size=batch_size,
            progress=say, fq=fq,
        )
        if confirm_images:
            used = {s.id for s in sweep_samples}
            pool = [s for s in rest if s.id not in used] or rest
            confirm_set = subsample(pool, confirm_images, seed + 1)
            images, ys, _ = decode(confirm_set)
            say(f"confirming the top {top_k} on {len(ys)} more images")
            result["confirm"] = keep_fp32_check(loaded.module, spec, [calib_images], images, result["top_k"], labels=ys,
                                                batch_size=batch_size, fq=fq)
        result |= {"model": loaded.name, "data": str(Path(data_root).resolve()), "seed": seed,
                   "calib_image_ids": calib_ids, "image_ids": eval_ids}
        (out_dir / "sensitivity.json").write_text(json.dumps(result, indent=2) + "\n")
        _attach_to_report(out_dir, result)
        return result


def _attach_to_report(out_dir: Path, result: dict) -> None:
    from int8eval.report import Report, render

    path = out_dir / "report.json"
    if not path.is_file():
        return
    report = Report.read(path)
    if report.model.name != result["model"]:
        return
    report.sensitivity = {k: v for k, v in result.items() if k not in ("calib_image_ids", "image_ids")}
    report.write(path)
    render(out_dir)
