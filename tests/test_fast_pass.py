"""The faster evaluation pass (issue 15): the FP32 reference compiled only when it gives eager's answers on a seeded
check batch, and said so in the report; images decoded ahead in a thread, in order, through the active decode
cache; where the time went recorded in report.json."""

from __future__ import annotations

import contextvars
import json
import threading
import time

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from int8eval.backends import fast_reference
from int8eval.backends.fast_reference import PaddedCompiled, speed_up_reference
from int8eval.backends.torch_backend import TorchVariant, cxx_compiler
from int8eval.cli import main
from int8eval.config import AUTO_COMPILE_IMAGES, Backend, Precision, Recipe, ReferenceMode
from int8eval.data.decode import prefetched

needs_compiler = pytest.mark.skipif(cxx_compiler() is None, reason="inductor needs a C++ compiler")


def _variant(tiny) -> TorchVariant:
    return TorchVariant(Recipe(backend=Backend.torch, precision=Precision.fp32), tiny.module.eval(), None)


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, 32, 32)).astype(np.float32)


def _fail_if_called():
    raise AssertionError("the check batch is decoded only when compiling")


@pytest.mark.parametrize("mode, n, why", [
    (ReferenceMode.eager, 10**6, "asked for"),
    (ReferenceMode.auto, AUTO_COMPILE_IMAGES - 1, f"compiling pays back from {AUTO_COMPILE_IMAGES} on"),
])
def test_the_reference_stays_eager_when_asked_or_when_compiling_would_not_pay(tiny, mode, n, why):
    variant = _variant(tiny)
    module = variant.module
    record = speed_up_reference(variant, _fail_if_called, mode, n)
    assert variant.module is module and record["mode"] == "eager" and why in record["why"]
    assert variant.details["execution"] == record


@needs_compiler
@pytest.mark.parametrize("mode, n", [(ReferenceMode.compiled, 10), (ReferenceMode.auto, AUTO_COMPILE_IMAGES)])
def test_a_compiled_reference_is_kept_when_it_gives_eagers_answers(tiny, mode, n):
    variant = _variant(tiny)
    check, other = _images(8), _images(5, seed=1)
    eager = variant.predict(other)
    record = speed_up_reference(variant, lambda: check, mode, n)
    assert record["mode"] == "compiled", record
    assert isinstance(variant.module, PaddedCompiled)
    assert record["check"]["check_images"] == 8 and record["check"]["top1_same"] == 8
    assert record["check"]["max_abs_logit_diff"] <= fast_reference.MAX_LOGIT_DIFF
    # a smaller batch than the check's (the pass's last) is padded, not compiled again, and gives eager's answers
    np.testing.assert_allclose(variant.predict(other), eager, atol=fast_reference.MAX_LOGIT_DIFF)


@pytest.mark.parametrize("shift", [1e-2, "top1"])
def test_a_compiled_reference_that_answers_otherwise_is_not_used(tiny, monkeypatch, shift):
    """A compiled module whose logits move by more than the bound, or whose top-1 changes, is dropped: the pass runs
    eager and the record says why, with the check's numbers."""

    class Wrong:
        def __init__(self, module, batch_size):
            self.module = module

        def __call__(self, x):
            out = self.module(x)
            return out + shift if shift != "top1" else out.flip(1)

    monkeypatch.setattr(fast_reference, "PaddedCompiled", Wrong)
    monkeypatch.setattr("int8eval.backends.torch_backend.cxx_compiler", lambda: "g++")
    variant = _variant(tiny)
    module = variant.module
    record = speed_up_reference(variant, lambda: _images(8), ReferenceMode.compiled, 10)
    assert variant.module is module and record["mode"] == "eager"
    assert "differ from eager's" in record["why"] and record["check"]["check_images"] == 8
    if shift == "top1":
        assert record["check"]["top1_same"] < 8
    else:
        assert record["check"]["max_abs_logit_diff"] == pytest.approx(1e-2, rel=1e-3)


def test_a_reference_that_fails_to_compile_runs_eager_and_says_why(tiny, monkeypatch):
    class Broken:
        def __init__(self, module, batch_size):
            pass

        def __call__(self, x):
            raise RuntimeError("inductor cannot lower op foo")

    monkeypatch.setattr(fast_reference, "PaddedCompiled", Broken)
    monkeypatch.setattr("int8eval.backends.torch_backend.cxx_compiler", lambda: "g++")
    variant = _variant(tiny)
    record = speed_up_reference(variant, lambda: _images(4), ReferenceMode.compiled, 10)
    assert record["mode"] == "eager" and "inductor cannot lower op foo" in record["why"]
    assert not isinstance(variant.module, Broken)


def test_padded_compiled_pads_small_batches_and_splits_large_ones(monkeypatch):
    seen = []
    monkeypatch.setattr(torch, "compile", lambda module, dynamic: lambda x: seen.append(len(x)) or x * 2)
    padded = PaddedCompiled(torch.nn.Identity(), batch_size=4)
    x = torch.arange(10, dtype=torch.float32).reshape(10, 1)
    assert torch.equal(padded(x), x * 2)
    assert torch.equal(padded(x[:3]), x[:3] * 2)
    assert seen == [4, 4, 4, 4]  # 10 = 4 + 4 + 2 padded to 4, then 3 padded to 4: one shape only


@needs_compiler
def test_run_reports_the_compiled_reference_and_where_the_time_went(image_folder, tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["run", "-m", "tiny_test", "--data", str(image_folder), "--out", str(out),
                                       "--fp32-only", "--batch-size", "5", "--reference", "compiled"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    ref = next(v for v in report["variants"] if v["reference"])
    assert ref["details"]["execution"]["mode"] == "compiled"
    assert ref["details"]["execution"]["check"]["check_images"] == 5  # one batch of seeded evaluation images
    timing = report["timing"]
    for key in ("total_s", "open_s", "build_s", "eval_s", "eval_wait_s", "stats_s", "images_per_s"):
        assert timing[key] is not None and timing[key] >= 0, key
    assert timing["open_s"] + timing["build_s"] + timing["eval_s"] <= timing["total_s"]
    md = (out / "report.md").read_text()
    assert "FP32 reference in the pass: compiled by inductor" in md and "of which waiting for images" in md


def test_a_bad_reference_mode_is_a_usage_error(image_folder, tmp_path):
    result = CliRunner().invoke(main, ["run", "-m", "tiny_test", "--data", str(image_folder), "--out",
                                       str(tmp_path / "r"), "--reference", "fast"])
    assert result.exit_code == 2 and "'fast' is not one of 'auto', 'compiled', 'eager'" in result.output


# --- decoding ahead -------------------------------------------------------------------------------------------


def test_prefetched_keeps_the_order_and_reads_ahead():
    produced = []

    def source():
        for i in range(6):
            produced.append(i)
            yield i

    got = []
    for item in prefetched(source(), depth=2):
        if item == 0:
            time.sleep(0.2)  # the thread decodes ahead meanwhile, up to `depth` batches beyond the one taken
            assert len(produced) >= 3
        got.append(item)
    assert got == list(range(6))


def test_prefetched_raises_the_sources_error_in_the_caller():
    def source():
        yield 1
        raise OSError("disk gone")

    it = prefetched(source())
    assert next(it) == 1
    with pytest.raises(OSError, match="disk gone"):
        next(it)


def test_prefetched_stops_its_thread_when_the_caller_stops():
    def endless():
        i = 0
        while True:
            yield i
            i += 1

    before = set(threading.enumerate())
    it = prefetched(endless(), depth=1)
    assert next(it) == 0
    assert set(threading.enumerate()) - before  # the decoding thread
    it.close()  # what a `for` loop left by an exception does
    assert not set(threading.enumerate()) - before


def test_prefetched_decodes_in_the_callers_context():
    """The decode cache is a context variable (data.cache.using): the thread must see the caller's."""
    var = contextvars.ContextVar("var", default="default")
    var.set("the caller's")

    def source():
        yield var.get()

    assert list(prefetched(source())) == ["the caller's"]
