"""ImageNet data: label space, layouts, seeded calibration/eval splits, decoding."""

from int8eval.data.layouts import Sample, SampleSet, discover
from int8eval.data.synsets import synsets, wnid_to_index, wnid_to_name

__all__ = ["Sample", "SampleSet", "discover", "synsets", "wnid_to_index", "wnid_to_name"]
