"""ImageNet data: label space, layouts, seeded calibration/eval splits, decoding."""

from int8eval.data.layouts import Sample, SampleSet, discover
from int8eval.data.synsets import class_name, synsets, wnid_to_index

__all__ = ["Sample", "SampleSet", "class_name", "discover", "synsets", "wnid_to_index"]
