"""int8eval: what INT8 costs an image classifier in accuracy, and what it buys in speed and size."""

__version__ = "0.1.0"
