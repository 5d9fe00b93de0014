"""Data: one Example type, format loaders, collation, the synthetic task."""

from prism.data.example import DataError, Example, load_image
from prism.data.formats import load_examples, save_sharegpt_jsonl

__all__ = ["DataError", "Example", "load_examples", "load_image", "save_sharegpt_jsonl"]
