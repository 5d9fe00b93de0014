"""Shared fixtures: the tiny random Qwen3-VL (dense and MoE), built once per test session, offline."""

from __future__ import annotations

import os
import tempfile

# Set before transformers is imported anywhere: nothing may be downloaded, and the tokenizers
# thread pool must not fork-warn or compete with the single torch thread.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The SFT corpus cache (prism.data.corpus) of this test run: never the user's ~/.cache/prism, never reused
# from another run.
os.environ.setdefault("PRISM_CACHE", tempfile.mkdtemp(prefix="prism-test-cache-"))

import pytest  # noqa: E402
import torch  # noqa: E402

# CI and dev boxes share few cores; one intra-op thread keeps the tiny model fast and timings stable.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Qwen3-VL with tokenizer and processor (read-only: tests must not write into it)."""
    from prism.models.tiny import build_tiny

    return build_tiny(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def tiny_moe_dir(tmp_path_factory):
    """The same, as a Qwen3-VL-MoE with a few experts."""
    from prism.models.tiny import build_tiny

    return build_tiny(tmp_path_factory.mktemp("tiny-moe"), moe=True)


@pytest.fixture(scope="module")
def tiny_processor(tiny_model_dir):
    """The tiny model's processor, loaded once per test module."""
    from prism.models.processor import load_processor

    return load_processor(tiny_model_dir)
