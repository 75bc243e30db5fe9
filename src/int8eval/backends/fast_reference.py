"""The PyTorch FP32 reference as fast as FP32 numerics allow: compiled by inductor for the evaluation pass, and kept
only when it gives eager PyTorch's answers on a seeded batch of the evaluation images.

Eager PyTorch is the slowest variant of a default run by far (EfficientNet-Lite0, batch 32, 2 AVX2 cores: ~19
images/s against 120-230 for the other five; 60 compiled), so it sets the pace of the pass. Inductor's kernels reorder floating-point sums, so
compiled logits differ from eager ones in the last bits: the check bounds that difference and the report states it.
Compiling costs 5-35 s on 2 cores, which `auto` only pays for an evaluation set large enough to repay it.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch

from int8eval.config import AUTO_COMPILE_IMAGES, ReferenceMode

# A compiled reference differing from eager by more than this (absolute, in logits) is not used: reordered FP32
# sums move logits by ~1e-5; anything near 1e-3 is a different computation, not rounding.
MAX_LOGIT_DIFF = 1e-3


class PaddedCompiled:
    """`module` compiled for one batch shape: a smaller batch (the last one) is padded with zeros to it, so the pass
    never compiles twice and every image goes through the same kernels. Rows are independent in eval mode."""

    def __init__(self, module: torch.nn.Module, batch_size: int) -> None:
        self.compiled = torch.compile(module, dynamic=False)
        self.batch_size = batch_size

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        n = len(x)
        if n > self.batch_size:
            return torch.cat([self(part) for part in x.split(self.batch_size)])
        if n < self.batch_size:
            x = torch.cat([x, x.new_zeros((self.batch_size - n, *x.shape[1:]))])
        return self.compiled(x)[:n]


def speed_up_reference(variant, check_images: Callable[[], np.ndarray | None], mode: ReferenceMode,
                       num_images: int) -> dict:
    """Switch the torch FP32 `variant` (a TorchVariant) to its compiled module when `mode` asks for it and the check
    passes; returns what was done for the report (also put in `variant.details["execution"]`).

    `check_images()` (one batch of seeded evaluation images, the pass's batch size; called only when compiling) are
    run eager and compiled: the compiled module is kept only when every top-1 is the same and no logit moved by more
    than MAX_LOGIT_DIFF. `num_images` (the evaluation set's size) decides `auto`."""
    from int8eval.backends.torch_backend import cxx_compiler

    record: dict = {"mode": "eager", "asked": mode.value}
    if mode is ReferenceMode.eager:
        record["why"] = "asked for (--reference eager)"
    elif mode is ReferenceMode.auto and num_images < AUTO_COMPILE_IMAGES:
        record["why"] = (f"{num_images} evaluation images: compiling pays back from {AUTO_COMPILE_IMAGES} on "
                         "(--reference compiled to compile anyway)")
    elif cxx_compiler() is None:
        record["why"] = "no C++ compiler for inductor (g++ or clang++; set CXX)"
    elif (images := check_images()) is None:
        record["why"] = "no evaluation image could be read for the check"
    else:
        record |= _compile_checked(variant, images)
    variant.details["execution"] = record
    return record


def _compile_checked(variant, check_images: np.ndarray) -> dict:
    eager_module = variant.module
    eager = variant.predict(check_images)
    start = time.perf_counter()
    try:
        variant.module = PaddedCompiled(eager_module, len(check_images))
        compiled = variant.predict(check_images)  # compiles here
    except Exception as e:  # noqa: BLE001 - inductor failing on a model is a reason to stay eager, not to stop
        variant.module = eager_module
        return {"why": f"compiling failed ({type(e).__name__}: {e}); evaluated eager"}
    check = {
        "compile_s": round(time.perf_counter() - start, 2),
        "check_images": len(check_images),
        "top1_same": int((eager.argmax(1) == compiled.argmax(1)).sum()),
        "max_abs_logit_diff": float(np.abs(eager - compiled).max()),
    }
    if check["top1_same"] < len(check_images) or not check["max_abs_logit_diff"] <= MAX_LOGIT_DIFF:
        variant.module = eager_module
        return {"check": check, "why": f"the compiled model's answers differ from eager's on the check batch "
                f"(top-1 same on {check['top1_same']}/{len(check_images)}, max |logit diff| "
                f"{check['max_abs_logit_diff']:.2e} > {MAX_LOGIT_DIFF:g}); evaluated eager"}
    return {"mode": "compiled", "check": check}
