"""The native sampler (`rollout.backend: native`) against transformers' `generate` and the teacher-forced
forward: greedy outputs equal, sampling log-probs equal to float noise, seeded, top-k / top-p / suppressed
ids by hand, early EOS with rows gathered, LoRA, text-only prompts, MoE, the compiled step, the fallback."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from transformers import AutoModelForImageTextToText

from prism.core.config import LoraSettings, ModelSettings
from prism.core.example import Example
from prism.models.loader import load_model
from prism.models.logprobs import token_log_probs
from prism.rollout import HFBackend, SamplingParams, make_backend
from prism.rollout.native import NativeBackend, sample_next
from prism.tasks.grids.generator import render_scene

QUESTIONS = ["How many red cells are there?", "Which colour appears most often in this picture?",
             "Count the blue cells, row by row, and say which row has the most of them.", "Is there green?"]
SCENES = [[["red", "blue"], ["blue", "green"]], [["yellow", "red", "red"], ["blue", "blue", "green"], ["red"] * 3],
          [["blue"] * 4] * 4, [["green", "red"], ["red", "red"]]]


def _examples(text_only: bool = False) -> list[Example]:
    """Prompts of different lengths (left padding differs by row) and different image sizes."""
    if text_only:
        return [Example(messages=[{"role": "user", "content": q}]) for q in QUESTIONS]
    return [Example(messages=[{"role": "user", "content": "<image>" + q}], images=[render_scene(s)])
            for q, s in zip(QUESTIONS, SCENES)]


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return AutoModelForImageTextToText.from_pretrained(tiny_model_dir).eval()


def _greedy_equal(model, processor, examples, max_new_tokens=16, **native):
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, n=1)
    a = HFBackend(model, processor).rollout(examples, params)
    b = NativeBackend(model, processor, **native).rollout(examples, params)
    assert b.texts == a.texts
    assert torch.equal(b.response_ids, a.response_ids) and torch.equal(b.response_mask, a.response_mask)
    assert b.finish_reasons == a.finish_reasons
    return a, b


@pytest.mark.parametrize("text_only", [False, True])
def test_greedy_equals_generate(model, tiny_processor, text_only):
    _greedy_equal(model, tiny_processor, _examples(text_only))


def test_greedy_equals_generate_on_the_moe_model(tiny_moe_dir, tiny_processor):
    moe = AutoModelForImageTextToText.from_pretrained(tiny_moe_dir).eval()
    _greedy_equal(moe, tiny_processor, _examples())


@pytest.mark.parametrize("temperature,top_p,top_k", [(1.0, 1.0, 0), (0.7, 0.9, 50)])
@pytest.mark.parametrize("text_only", [False, True])
def test_sampling_log_probs_equal_the_teacher_forced_forward(model, tiny_processor, temperature, top_p, top_k,
                                                             text_only):
    torch.manual_seed(0)
    params = SamplingParams(n=3, temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=20)
    # chunk_size 6: two prompts (x 3 samples) per chunk, re-padded when the chunks are concatenated
    r = NativeBackend(model, tiny_processor, chunk_size=6).rollout(_examples(text_only), params)
    assert len(r) == 12 and r.group_size == 3 and r.response_ids.shape == r.log_probs.shape
    with torch.no_grad():
        lp, _ = token_log_probs(model, r, temperature, chunk_size=4)
    diff = (lp - r.log_probs)[r.response_mask].abs().max()
    assert diff < 1e-5, float(diff)  # float noise (about 1e-6 measured)
    assert torch.all(r.log_probs[~r.response_mask] == 0)
    # the rows of one prompt share its prompt, images included
    assert torch.equal(r.prompt["input_ids"][0], r.prompt["input_ids"][2])
    assert r.images_per_row.tolist() == ([0] if text_only else [1]) * 12


def test_a_fixed_seed_gives_the_same_samples(model, tiny_processor):
    backend = NativeBackend(model, tiny_processor)
    params = SamplingParams(n=4, temperature=1.0, max_new_tokens=12)
    torch.manual_seed(3)
    a = backend.rollout(_examples(), params)
    torch.manual_seed(3)
    b = backend.rollout(_examples(), params)
    torch.manual_seed(4)
    c = backend.rollout(_examples(), params)
    assert torch.equal(a.response_ids, b.response_ids) and torch.equal(a.log_probs, b.log_probs)
    assert not torch.equal(a.response_ids, c.response_ids)
    assert len({tuple(x) for x in a.response_ids[:4].tolist()}) > 1  # the 4 samples of a prompt differ


def _an_eos_some_rows_emit(response_ids: torch.Tensor) -> int:
    """A token that some rows (not all) emit, at different steps: as EOS it ends rows at different lengths."""
    for token in response_ids.unique().tolist():
        hit = response_ids == token
        if hit.any(-1).any() and not hit[:, 0].all():
            return token
    pytest.skip("every greedy row is one repeated token")


def test_an_eos_ends_rows_as_generate_does(model, tiny_processor, monkeypatch):
    free = HFBackend(model, tiny_processor).rollout(_examples(), SamplingParams(max_new_tokens=16, temperature=0.0))
    eos = _an_eos_some_rows_emit(free.response_ids)
    for cls in (HFBackend, NativeBackend):
        monkeypatch.setattr(cls, "_eos_ids", lambda self: [eos])
    _, b = _greedy_equal(model, tiny_processor, _examples())
    assert "stop" in b.finish_reasons and len(set(b.response_lengths.tolist())) > 1
    for row, length in enumerate(b.response_lengths.tolist()):  # EOS is the last valid token of a stopped row
        if b.finish_reasons[row] == "stop":
            assert b.response_ids[row, length - 1] == eos


def _many_eos(monkeypatch, model, tiny_processor) -> list[int]:
    """Every tenth token id counts as EOS, so sampled rows stop after a few steps, each at its own step."""
    vision = set(NativeBackend(model, tiny_processor)._vision_ids())
    ids = [i for i in range(0, model.config.text_config.vocab_size, 10) if i not in vision]
    monkeypatch.setattr(NativeBackend, "_eos_ids", lambda self: ids)
    return ids


def _batch_sizes(monkeypatch) -> list[int]:
    seen: list[int] = []
    original = NativeBackend._chunk

    def spy(self, *args, **kwargs):
        step = self.step
        forward = step.forward
        step.forward = lambda tokens, *a: (seen.append(len(tokens)), forward(tokens, *a))[1]
        try:
            return original(self, *args, **kwargs)
        finally:
            step.forward = forward

    monkeypatch.setattr(NativeBackend, "_chunk", spy)
    return seen


@pytest.mark.parametrize("compile", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_finished_rows_are_dropped_from_the_batch_and_the_rest_samples_on(model, tiny_processor, monkeypatch,
                                                                         compile):
    """Rows that sampled an EOS leave the batch once at most half are running (compiled: the batch is padded
    to a power of two); the log-probs of the rows that go on still equal the teacher-forced forward."""
    _many_eos(monkeypatch, model, tiny_processor)
    seen = _batch_sizes(monkeypatch)
    torch.manual_seed(1)
    params = SamplingParams(n=4, temperature=1.0, max_new_tokens=24)
    r = NativeBackend(model, tiny_processor, compile=compile).rollout(_examples(), params)
    lengths = r.response_lengths.tolist()
    assert min(lengths) < 6 and max(lengths) > 12, lengths
    assert seen[0] == 16 and min(seen) < 8 and seen == sorted(seen, reverse=True)
    if compile:
        assert all(n & (n - 1) == 0 for n in seen)  # power-of-two buckets
    with torch.no_grad():
        lp, _ = token_log_probs(model, r, 1.0, chunk_size=8)
    assert (lp - r.log_probs)[r.response_mask].abs().max() < 1e-5


def test_lora_adapters_take_part(tiny_model_dir, tiny_processor):
    s = ModelSettings(path=str(tiny_model_dir), lora=LoraSettings(enabled=True, r=4, alpha=8))
    model = load_model(s, trainable=True).eval()
    with torch.no_grad():  # non-zero adapters, so that they change the outputs
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    _greedy_equal(model, tiny_processor, _examples())
    torch.manual_seed(0)
    r = NativeBackend(model, tiny_processor).rollout(_examples(), SamplingParams(n=2, temperature=1.0,
                                                                                  max_new_tokens=12))
    with torch.no_grad():
        lp, _ = token_log_probs(model, r, 1.0, chunk_size=4)
    assert (lp - r.log_probs)[r.response_mask].abs().max() < 1e-5


def test_vision_placeholders_are_never_sampled(model, tiny_processor):
    vision = NativeBackend(model, tiny_processor)._vision_ids()
    assert vision
    logits = torch.zeros(64, 40)
    logits[:, vision[0] % 40] = 50.0  # the placeholder is by far the most likely token
    suppress = torch.tensor([vision[0] % 40])
    tokens, lp = sample_next(logits, SamplingParams(temperature=1.0), suppress)
    assert not torch.any(tokens == suppress[0])
    assert torch.allclose(lp, torch.full((64,), -math.log(39)))  # uniform over the 39 others


def test_top_k_and_top_p_by_hand():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).expand(20000, 4)
    torch.manual_seed(0)
    tokens, lp = sample_next(logits, SamplingParams(temperature=1.0, top_k=2), None)
    freq = torch.bincount(tokens, minlength=4) / len(tokens)
    assert freq[2] == freq[3] == 0 and abs(freq[0] - 0.5 / 0.8) < 0.015  # renormalised over the top 2
    # the log-prob recorded is that of the untruncated softmax(logits / T)
    assert torch.allclose(lp[tokens == 0], torch.tensor(math.log(0.5)))
    tokens, _ = sample_next(logits, SamplingParams(temperature=1.0, top_p=0.85), None)
    freq = torch.bincount(tokens, minlength=4) / len(tokens)
    # nucleus: 0.5 + 0.3 < 0.85, so the third id joins; the fourth never
    assert freq[3] == 0 and abs(freq[2] - 0.15 / 0.95) < 0.015
    tokens, _ = sample_next(logits, SamplingParams(temperature=1.0, top_p=0.2), None)
    assert torch.all(tokens == 0)  # at least the most probable id
    tokens, lp = sample_next(logits, SamplingParams(temperature=0.0), None)
    assert torch.all(tokens == 0) and torch.allclose(lp, torch.tensor(math.log(0.5)))
    hot = logits / 2.0
    tokens, lp = sample_next(logits, SamplingParams(temperature=2.0), None)
    expected = torch.softmax(hot[0], -1)
    freq = torch.bincount(tokens, minlength=4) / len(tokens)
    assert torch.allclose(freq, expected, atol=0.015)
    assert torch.allclose(lp, torch.log_softmax(hot, -1).gather(-1, tokens[:, None]).squeeze(-1))


@pytest.mark.slow
def test_the_compiled_step_decodes_greedily_as_generate(model, tiny_processor):
    """torch.compile of the decode step (CPU here: no CUDA graphs) on the whole static cache, masked."""
    _greedy_equal(model, tiny_processor, _examples()[:3], max_new_tokens=10, compile=True)


def test_a_model_the_native_sampler_cannot_run_is_sampled_by_hf(model, tiny_processor, caplog):
    class Opaque(torch.nn.Module):  # no model.language_model.layers
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Linear(2, 2)

    with caplog.at_level(logging.WARNING, logger="prism.rollout"):
        backend = make_backend("native", Opaque(), tiny_processor)
    assert isinstance(backend, HFBackend)
    assert "rollout.backend=native: Opaque has no model.language_model.layers" in caplog.text
    assert isinstance(make_backend("native", model, tiny_processor), NativeBackend)
    text_config = model.model.language_model.config
    text_config.use_sliding_window = True
    try:
        with caplog.at_level(logging.WARNING, logger="prism.rollout"):
            assert isinstance(make_backend("native", model, tiny_processor), HFBackend)
        assert "sliding-window attention" in caplog.text
    finally:
        text_config.use_sliding_window = False
