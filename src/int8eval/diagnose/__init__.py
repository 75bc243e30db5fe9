"""Which layers cost the accuracy: per-layer INT8 sensitivity of a PyTorch model, with backend-independent fake
quantization written in torch ops.

- `fakequant`: the quantizers (`quantize_weight`, `activation_qparams`) and `FakeQuantModel`, a BatchNorm-folded copy
  of the model whose Conv/Linear layers each switch between FP32 and fake INT8 (weights and input separately).
- `runner`: `PrefixRunner`, which computes a prefix of the network that two runs share once (torch.fx), so a sweep
  costs about half of running every configuration from the input.
- `sweep`: `diagnose`, the per-layer sweep (agreement with the FP32 top-1, KL of the logits, SQNR) and its ranking;
  `keep_fp32_check`, the top-k kept in FP32 checked on other images.
- `fast`: `fast_ranking` (what the tuner ranks with) and `fast_diagnose` (`int8eval diagnose --fast`): the sweep's
  default ranking from its "only this layer INT8" runs alone, on fewer images (benchmarks/bench_sensitivity.py).

`int8eval diagnose` (int8eval.commands.diagnose) runs them on a session's calibration and evaluation images.
"""

from int8eval.diagnose.fakequant import (
    HIST_BINS,
    FakeQuantLayer,
    FakeQuantModel,
    FakeQuantSpec,
    activation_qparams,
    quantize_weight,
)
from int8eval.diagnose.fast import FAST_IMAGES, fast_diagnose, fast_fake_quant, fast_ranking
from int8eval.diagnose.runner import PrefixRunner
from int8eval.diagnose.sweep import (
    RANK_LABELS,
    RankBy,
    Tally,
    as_batches,
    diagnose,
    keep_fp32_check,
    onnx_node_names,
    rank,
)

__all__ = [
    "FAST_IMAGES", "HIST_BINS", "RANK_LABELS", "FakeQuantLayer", "FakeQuantModel", "FakeQuantSpec", "PrefixRunner",
    "RankBy", "Tally", "activation_qparams", "as_batches", "diagnose", "fast_diagnose", "fast_fake_quant", "fast_ranking",
    "keep_fp32_check", "onnx_node_names", "quantize_weight", "rank",
]
