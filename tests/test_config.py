"""Recipe validation: what a user can ask for, and the clear errors for what makes no sense."""

from __future__ import annotations

import pytest
from pydantic import ValidationError


def test_keep_fp32_recipe():
    from int8eval.config import Recipe

    r = Recipe(backend="onnxruntime", calib="percentile", keep_fp32=["stem.0.1", " blocks.0.depthwise.0"])
    assert r.keep_fp32 == ("stem.0.1", "blocks.0.depthwise.0")
    assert r.name == "onnxruntime-int8-percentile99.999-keep2"
    with pytest.raises(ValidationError, match="twice"):
        Recipe(backend="torch", keep_fp32=["a", "a"])
    with pytest.raises(ValidationError, match="int8"):
        Recipe(backend="torch", precision="fp32", keep_fp32=["a"])
