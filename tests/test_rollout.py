"""The rollout engine and the shared log-prob function on the tiny Qwen3-VL."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForImageTextToText, LogitsProcessor

from prism.core.example import Example
from prism.tasks.grids.generator import render_scene
from prism.models.logprobs import token_log_probs
from prism.rollout import HFBackend, Rollouts, SamplingParams, sample, sample_texts

SCENES = [[["red", "blue"], ["blue", "green"]], [["yellow", "red", "red"], ["blue", "blue", "green"], ["red"] * 3]]


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return AutoModelForImageTextToText.from_pretrained(tiny_model_dir).eval()


def _examples(text_only: bool = False) -> list[Example]:
    questions = ["How many red cells are there?", "Which colour appears most often in this picture?"]
    if text_only:
        return [Example(messages=[{"role": "user", "content": q}]) for q in questions]
    return [Example(messages=[{"role": "user", "content": "<image>" + q}], images=[render_scene(s)])
            for q, s in zip(questions, SCENES)]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("text_only", [False, True])
def test_sampling_log_probs_match_the_teacher_forced_forward(model, tiny_processor, temperature, text_only):
    torch.manual_seed(0)
    # chunk_size 4 splits the 6 rows into chunks with different prompt lengths, re-padded on concat
    r = sample(model, tiny_processor, _examples(text_only), SamplingParams(n=3, temperature=temperature,
                                                                          max_new_tokens=12), chunk_size=4)
    assert len(r) == 6 and r.response_ids.shape == r.log_probs.shape == r.response_mask.shape
    with torch.no_grad():
        lp, ent = token_log_probs(model, r, temperature, chunk_size=4, with_entropy=True)
    assert (lp - r.log_probs).abs().max() < 1e-4
    assert torch.all(ent[r.response_mask] > 0) and torch.all(ent[~r.response_mask] == 0)


def test_rows_of_a_prompt_are_contiguous_and_selection_keeps_them(model, tiny_processor):
    torch.manual_seed(0)
    r = sample(model, tiny_processor, _examples(), SamplingParams(n=2, temperature=1.0, max_new_tokens=6))
    assert r.group_size == 2 and r.images_per_row.tolist() == [1, 1, 1, 1]
    grid = r.prompt["image_grid_thw"]
    assert grid[0].tolist() == grid[1].tolist() and grid[2].tolist() == grid[3].tolist() != grid[0].tolist()
    part = r.select([3, 0])
    assert part.prompt["image_grid_thw"].tolist() == [grid[3].tolist(), grid[0].tolist()]
    assert part.texts == [r.texts[3], r.texts[0]]
    with torch.no_grad():
        full, _ = token_log_probs(model, r)
        sub, _ = token_log_probs(model, part)
    T = part.response_ids.shape[1]
    torch.testing.assert_close(sub, full[[3, 0], :T], atol=1e-5, rtol=0)
    both = Rollouts.concat([r.select([0, 1]), r.select([2, 3])])
    assert torch.equal(both.response_ids, r.response_ids) and both.texts == r.texts


class _ForceEOS(LogitsProcessor):
    """Row 0 emits EOS at its 3rd token; every other row never does."""

    def __init__(self, eos: int, prompt_len: int):
        self.eos, self.prompt_len = eos, prompt_len

    def __call__(self, input_ids, scores):
        scores = scores.clone()
        scores[:, self.eos] = -float("inf")
        if input_ids.shape[1] - self.prompt_len == 2:
            scores[0] = -float("inf")
            scores[0, self.eos] = 0.0
        return scores


def test_response_mask_ends_at_eos_and_finish_reasons(model, tiny_processor, monkeypatch):
    eos = tiny_processor.tokenizer.eos_token_id
    original = model.generate

    def generate_with_forced_eos(**kw):
        kw["logits_processor"].insert(0, _ForceEOS(eos, kw["input_ids"].shape[1]))
        return original(**kw)

    monkeypatch.setattr(model, "generate", generate_with_forced_eos)
    r = HFBackend(model, tiny_processor).rollout(_examples(), SamplingParams(n=2, temperature=1.0, max_new_tokens=8))
    assert r.finish_reasons == ["stop", "length", "length", "length"]
    assert r.response_mask[0].tolist() == [True] * 3 + [False] * 5  # EOS itself is a trained token
    assert r.response_ids[0, 2] == eos and torch.all(r.response_mask[1:])
    assert torch.all(r.log_probs[0, 3:] == 0)
    assert r.response_lengths.tolist() == [3, 8, 8, 8]


def test_batched_greedy_equals_one_at_a_time(model, tiny_processor):
    """Left padding must not change what a prompt generates."""
    params = SamplingParams(max_new_tokens=10, temperature=0.0)
    examples = _examples()
    batched = sample_texts(model, tiny_processor, examples, params)
    single = [sample_texts(model, tiny_processor, [ex], params)[0] for ex in examples]
    assert batched == single


def test_bad_sampling_parameters_are_rejected():
    with pytest.raises(ValueError, match="invalid sampling parameters"):
        SamplingParams(n=0)
    with pytest.raises(ValueError, match="invalid sampling parameters"):
        SamplingParams(top_p=0.0)


def test_output_head_in_slices_gives_the_same_values_and_gradients(tiny_model_dir, tiny_processor):
    """Slicing the output head over tokens (checkpointed under gradients) changes no value and no gradient."""
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    r = sample(model, tiny_processor, _examples(), SamplingParams(n=2, temperature=1.0, max_new_tokens=9))
    grads = []
    for logits_chunk in (4096, 5):  # all tokens at once / slices of 5 tokens
        model.zero_grad()
        lp, ent = token_log_probs(model, r, with_entropy=True, logits_chunk=logits_chunk)
        (lp.sum() + ent.sum()).backward()  # through the entropy too: suppressed ids must not give NaN
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        if logits_chunk == 4096:
            ref = lp.detach(), ent.detach()
    torch.testing.assert_close(lp.detach(), ref[0])
    torch.testing.assert_close(ent.detach(), ref[1])
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for name in grads[0]:
        assert torch.isfinite(grads[0][name]).all(), name
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-5, rtol=1e-4, msg=name)


def test_token_budget_batches_by_hand():
    from prism.core.batching import token_budget_batches

    # sorted by length: 2 (row 1), 3 (row 3), 5 (row 0), 9 (row 2). Budget 10: rows 1, 3 cost 2 x 3 = 6;
    # adding row 0 would cost 3 x 5 = 15, so it starts a batch (1 x 5); row 2 would make it 2 x 9: alone.
    assert token_budget_batches([5, 2, 9, 3], 10) == [[1, 3], [0], [2]]
    assert token_budget_batches([4, 4, 4, 4], 8) == [[0, 1], [2, 3]]
    assert token_budget_batches([50], 8) == [[0]]  # longer than the budget: alone
    with pytest.raises(ValueError):
        token_budget_batches([1], 0)


def test_log_probs_under_a_token_budget_equal_the_fixed_chunks(model, tiny_processor):
    torch.manual_seed(0)
    r = sample(model, tiny_processor, _examples(), SamplingParams(n=3, temperature=1.0, max_new_tokens=10))
    with torch.no_grad():
        a, ea = token_log_probs(model, r, with_entropy=True)
        b, eb = token_log_probs(model, r, with_entropy=True, token_budget=90)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    torch.testing.assert_close(ea, eb, atol=1e-5, rtol=0)


def test_vllm_backend_without_vllm_names_the_install_command(model, tiny_processor, tiny_model_dir, monkeypatch):
    """Where vLLM is not installed (this environment; tests/vllm_backend run in one that has it), asking for the
    backend is one line naming what to install; a multiprocess engine or CPU sleep mode are refused too."""
    import builtins

    from prism.core.config import VLLMSettings
    from prism.core.errors import ConfigError
    from prism.rollout.engine import make_backend

    real_import = builtins.__import__

    def no_vllm(name, *args, **kwargs):
        if name == "vllm" or name.startswith("vllm."):
            raise ImportError("No module named 'vllm'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_vllm)
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # what the backend sets, undone after the test
    with pytest.raises(ConfigError, match=r'^rollout.backend=vllm needs vLLM: pip install -e "\.\[vllm\]"'):
        make_backend("vllm", model, tiny_processor, model_path=str(tiny_model_dir))
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    with pytest.raises(ConfigError, match="runs its engine inside the training process"):
        make_backend("vllm", model, tiny_processor, model_path=str(tiny_model_dir))
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    with pytest.raises(ConfigError, match="enable_sleep_mode needs CUDA"):
        make_backend("vllm", model, tiny_processor, vllm=VLLMSettings(enable_sleep_mode=True),
                     model_path=str(tiny_model_dir))
