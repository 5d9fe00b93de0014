"""Layer 2 — data: the format loaders (sharegpt, verl Parquet, prism JSONL -> `Example`), chat
templating and collation with assistant-only labels, padding-free packing, and the seeded data
order every stage draws from."""

from prism.core.errors import DataError
from prism.core.example import Example, load_image
from prism.data.formats import load_examples, save_sharegpt_jsonl

__all__ = ["DataError", "Example", "load_examples", "load_image", "save_sharegpt_jsonl"]
