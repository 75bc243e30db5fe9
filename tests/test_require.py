"""INT8EVAL_REQUIRE (set by .ci/run): a missing optional extra or a missing shared ImageNet sample fails the run
instead of skipping; TensorRT and a GPU stay optional. Run as a separate pytest with this conftest as a plugin."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent

CASES = '''
import pytest
from conftest import require_package, skip_unless_required

def test_missing_module():
    pytest.importorskip("int8eval_no_such_module")

def test_missing_extra():
    require_package("int8eval_no_such_module", extra="openvino")

def test_missing_data():
    skip_unless_required("shared ImageNet sample not found at /nowhere", "data")

def test_missing_backend():
    pytest.skip("backend openvino needs nncf: pip install 'int8eval[openvino]'")

def test_tensorrt_stays_optional():
    pytest.importorskip("tensorrt_int8eval_absent")
    pytest.skip("TensorRT needs a CUDA GPU")

def test_other_skips_stay_skips():
    pytest.skip("chromium is not installed")
'''


def _run(tmp_path: Path, require: str | None) -> str:
    (tmp_path / "test_cases.py").write_text(CASES.replace("tensorrt_int8eval_absent", "tensorrt"))
    env = {k: v for k, v in os.environ.items() if k != "INT8EVAL_REQUIRE"}
    if require is not None:
        env["INT8EVAL_REQUIRE"] = require
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")])
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "conftest", "-v", "-p", "no:cacheprovider", "--rootdir",
         str(tmp_path), str(tmp_path / "test_cases.py")],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120,
    )
    return result.stdout + result.stderr


def _outcomes(output: str) -> dict[str, str]:
    """{test name: PASSED/FAILED/SKIPPED} from `pytest -v` lines like "test_cases.py::test_x SKIPPED (...)"."""
    out = {}
    for line in output.splitlines():
        words = line.split()
        if len(words) > 1 and words[0].startswith("test_cases.py::"):
            out[words[0].split("::")[1]] = words[1]
    return out


@pytest.mark.parametrize("require", [None, "extras,data"])
def test_required_skips_fail(tmp_path, require):
    output = _run(tmp_path, require)
    outcomes = _outcomes(output)
    required = {"test_missing_module", "test_missing_extra", "test_missing_data", "test_missing_backend"}
    optional = {"test_tensorrt_stays_optional", "test_other_skips_stay_skips"}
    expected = {n: ("FAILED" if require else "SKIPPED") for n in required} | {n: "SKIPPED" for n in optional}
    assert outcomes == expected, output


def test_only_what_is_named_is_required(tmp_path):
    outcomes = _outcomes(_run(tmp_path, "data"))
    assert outcomes["test_missing_data"] == "FAILED" and outcomes["test_missing_extra"] == "SKIPPED"
