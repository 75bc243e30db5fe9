"""The ImageNet-1k label space: the 1000 WordNet ids in sorted order. Class index = position in this list."""

from __future__ import annotations

import re
from functools import cache
from importlib import resources

WNID = re.compile(r"^n\d{8}$")


@cache
def synsets() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(wnids, names), both in canonical order."""
    text = resources.files("int8eval.data").joinpath("imagenet1k_synsets.tsv").read_text()
    rows = [line.split("\t") for line in text.splitlines() if line]
    return tuple(r[0] for r in rows), tuple(r[1] for r in rows)


@cache
def wnid_to_index() -> dict[str, int]:
    return {w: i for i, w in enumerate(synsets()[0])}


@cache
def wnid_to_name() -> dict[str, str]:
    """WordNet id -> class name ("n01443537" -> "goldfish"); shared, do not modify."""
    return dict(zip(*synsets()))
