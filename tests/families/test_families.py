"""The multimodal correctness suite, run on every Qwen-VL family (`conftest.py`: the published files of
Qwen2.5-VL-3B and Qwen3-VL-4B shrunk with `prism-tiny --like`, prism's own tiny model of each family, and
any folder in PRISM_MODEL_DIRS). Select it with `pytest -m families`.

What each test pins down is a silent bug of the kind the field keeps shipping: labels that lose part of a
turn, log-probs that depend on padding, batching or packing, a sampler whose distribution is not the
policy's, stale vision features, images cut or resized differently by different consumers, freezing or
LoRA that trains other parameters than it says.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoConfig

from prism.align.discriminator import MoEDiscriminator
from prism.core.batching import text_position_ids
from prism.core.config import LoraSettings, ModelSettings
from prism.core.errors import ConfigError, DataError
from prism.core.example import IGNORE_INDEX, Example
from prism.core.rollouts import SamplingParams
from prism.data.collate import SFTCollator, encode_prompts, render_with_spans, token_lengths
from prism.data.corpus import Corpus
from prism.data.formats import load_examples, save_sharegpt_jsonl
from prism.data.packing import pack, sequences_apart
from prism.models.loader import load_model
from prism.models.logprobs import final_hidden_states, output_head, token_log_probs
from prism.models.processor import image_pixels
from prism.models.tiny import LIKE_FILES
from prism.rollout import HFBackend, NativeBackend, make_backend

pytestmark = pytest.mark.families

RESPONSE = "<caption>row 1: red blue; row 2: blue green</caption><think>One red cell.</think><answer>1</answer>"
SECOND = "<caption>two rows</caption><think>Two rows of two.</think><answer>2</answer>"


def picture(width: int, height: int, seed: int = 0) -> Image.Image:
    """Noise, so that every patch differs (a vision tower change shows)."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def demos() -> list[Example]:
    """Demonstrations of different lengths: one image; a system prompt; two images; two rounds; text only."""
    return [
        Example(messages=[{"role": "user", "content": "<image>How many red cells?"},
                          {"role": "assistant", "content": RESPONSE}], images=[picture(64, 48)]),
        Example(messages=[{"role": "system", "content": "Answer in the PRISM format."},
                          {"role": "user", "content": "<image>Which colour appears most often in this picture?"},
                          {"role": "assistant", "content": SECOND}], images=[picture(40, 72, 1)]),
        Example(messages=[{"role": "user", "content": "<image><image>Which picture has more rows?"},
                          {"role": "assistant", "content": RESPONSE}], images=[picture(32, 32, 2), picture(48, 32, 3)]),
        Example(messages=[{"role": "user", "content": "<image>Count the cells."},
                          {"role": "assistant", "content": SECOND},
                          {"role": "user", "content": "And the rows?"},
                          {"role": "assistant", "content": RESPONSE}], images=[picture(56, 40, 4)]),
        Example(messages=[{"role": "user", "content": "Say one."}, {"role": "assistant", "content": SECOND}]),
    ]


def prompts() -> list[Example]:
    return [Example(messages=ex.prompt_messages, images=ex.images) for ex in demos()[:3]] + [
        Example(messages=[{"role": "user", "content": "Count to three."}])]


def runs(mask: torch.Tensor) -> list[list[int]]:
    """Index lists of the contiguous True runs of a 1-D mask."""
    out, current = [], []
    for i, m in enumerate(mask.tolist()):
        if m:
            current.append(i)
        elif current:
            out.append(current)
            current = []
    return out + ([current] if current else [])


# ---------------------------------------------------------------------------------------------- the tiny models

def test_tiny_like_keeps_every_id_setting_and_file(case):
    if case.source is None:
        pytest.skip("prism's own tiny model: no published files to compare with")
    src, tiny = AutoConfig.from_pretrained(case.source), AutoConfig.from_pretrained(case.path)
    for key in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id",
                "tie_word_embeddings"):
        assert getattr(tiny, key) == getattr(src, key), key
    st, tt = src.get_text_config(), tiny.get_text_config()
    for key in ("vocab_size", "rope_parameters", "bos_token_id", "eos_token_id", "rms_norm_eps", "hidden_act",
                "num_experts", "num_experts_per_tok", "decoder_sparse_step", "linear_conv_kernel_dim",
                "max_position_embeddings", "partial_rotary_factor"):
        assert getattr(tt, key, None) == getattr(st, key, None), key
    head = lambda c: getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads  # noqa: E731
    assert head(tt) == head(st)  # so the rotary sections still sum to half a head
    assert tt.num_hidden_layers <= 4 and tt.hidden_size <= 256 and tt.num_attention_heads == 2
    if getattr(st, "layer_types", None):
        assert tt.layer_types == st.layer_types[:tt.num_hidden_layers]
        assert set(tt.layer_types) == set(st.layer_types)
    sv, tv = src.vision_config, tiny.vision_config
    for key in ("patch_size", "spatial_merge_size", "temporal_patch_size", "depth", "deepstack_visual_indexes",
                "fullatt_block_indexes", "window_size", "num_position_embeddings", "hidden_act", "in_channels"):
        assert getattr(tv, key, None) == getattr(sv, key, None), key
    for name in LIKE_FILES:
        if (case.source / name).is_file():
            assert (case.path / name).read_bytes() == (case.source / name).read_bytes(), name
    from transformers import AutoTokenizer

    a, b = AutoTokenizer.from_pretrained(case.source), case.processor().tokenizer
    assert len(a) == len(b) and a.get_added_vocab() == b.get_added_vocab()
    assert a("<caption>x</caption>").input_ids == b("<caption>x</caption>").input_ids


# ---------------------------------------------------------------------------------------------- templates, labels

def test_labels_are_each_assistant_turn_and_its_end_of_turn(case):
    processor = case.processor()
    tok = processor.tokenizer
    examples = demos()
    batch = SFTCollator(processor)(examples)
    for b, ex in enumerate(examples):
        labels = batch["labels"][b]
        got = [tok.decode(labels[r]) for r in runs(labels != IGNORE_INDEX)]
        assert got == [m["content"] + "<|im_end|>" for m in ex.messages if m["role"] == "assistant"], ex.messages
        # every labelled token is the input token at its place (no shift, nothing invented)
        keep = labels != IGNORE_INDEX
        assert torch.equal(labels[keep], batch["input_ids"][b][keep])


def test_chatml_renders_as_the_checkpoints_instruct_template(case):
    if case.refused:
        pytest.skip("the folder's own template is refused (test_a_thinking_template_is_refused_...)")
    own, chatml = case.processor(), case.processor(chat_template="chatml")
    for ex in demos():
        messages = ex.messages if ex.messages[0]["role"] == "system" else [
            {"role": "system", "content": "You are a helpful assistant."}, *ex.messages]  # Qwen2.5-VL's default
        ex = Example(messages=messages, images=ex.images)
        assert render_with_spans(chatml, ex) == render_with_spans(own, ex)


THINKING_TEMPLATE = (
    # The behaviour of Qwen3's Thinking templates, written for this test: the reasoning is what lies between
    # <think> and </think>, the rest of the turn is what follows </think>, and the generation prompt opens <think>.
    "{%- for m in messages -%}"
    "{%- set content = m['content'] if m['content'] is string else m['content'] | map(attribute='text') | join -%}"
    "{%- if m['role'] == 'assistant' -%}"
    "{%- set reasoning = content.split('</think>')[0].split('<think>')[-1] if '</think>' in content else '' -%}"
    "{%- set content = content.split('</think>')[-1] -%}"
    "{{- '<|im_start|>assistant\\n<think>\\n' + reasoning + '\\n</think>\\n\\n' + content + '<|im_end|>\\n' -}}"
    "{%- else -%}{{- '<|im_start|>' + m['role'] + '\\n' + content + '<|im_end|>\\n' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n<think>\\n' -}}{%- endif -%}"
)


def test_a_thinking_template_is_refused_and_chatml_keeps_the_caption(case, tmp_path):
    template = tmp_path / "thinking.jinja"
    template.write_text(THINKING_TEMPLATE)
    processor = case.processor()
    processor.chat_template = THINKING_TEMPLATE  # what rendering under it does, unchecked: the caption is gone
    text, _ = render_with_spans(processor, demos()[4])
    assert "<think>\nOne red cell" not in text and "Two rows of two." in text and "<caption>" not in text
    with pytest.raises(ConfigError) as e:
        case.processor(chat_template=str(template))
    message = str(e.value)
    assert "\n" not in message and "model.chat_template" in message and "chatml" in message
    assert "<caption>" in message  # names what the template does to the turn
    chatml = case.processor(chat_template="chatml")
    batch = SFTCollator(chatml)(demos()[:1])
    labels = batch["labels"][0]
    assert chatml.tokenizer.decode(labels[labels != IGNORE_INDEX]) == RESPONSE + "<|im_end|>"
    if case.refused:  # the folder's own template (a Thinking checkpoint's) is refused the same way
        assert "model.chat_template" in case.refused and "chatml" in case.refused


# ---------------------------------------------------------------------------------------------- log-probs

def labelled_log_probs(model, batch) -> torch.Tensor:
    """Log-probs of the labelled tokens of a padded or packed batch, in row order, [labelled tokens]."""
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if "pixel_values" not in inputs and "attention_mask" in inputs:
        inputs["position_ids"] = text_position_ids(inputs["attention_mask"])
    with torch.no_grad():
        hidden = final_hidden_states(model, inputs)[:, :-1]
        lp = torch.log_softmax(output_head(model)(hidden).float(), -1)
    target = labels[:, 1:]
    return lp.gather(-1, target.clamp(min=0)[..., None])[..., 0][target != IGNORE_INDEX]


def left_padded(batch: dict, pad_id: int) -> dict:
    """The same rows, padded on the left."""
    out = dict(batch)
    real = batch["attention_mask"].bool()
    for k in ("input_ids", "attention_mask", "labels", "mm_token_type_ids"):
        if k in batch:
            pad = {"labels": IGNORE_INDEX, "input_ids": pad_id}.get(k, 0)
            out[k] = torch.stack([torch.cat([torch.full(((~m).sum(),), pad, dtype=r.dtype), r[m]])
                                  for r, m in zip(batch[k], real)])
    return out


def test_log_probs_do_not_depend_on_padding_batching_or_packing(case, loaded):
    model, processor = loaded
    examples = demos()
    collate = SFTCollator(processor)
    right = collate(examples)
    ref = labelled_log_probs(model, right)
    left = labelled_log_probs(model, left_padded(right, processor.tokenizer.pad_token_id))
    alone = torch.cat([labelled_log_probs(model, collate([ex])) for ex in examples])
    packed = pack(model, right)
    with sequences_apart(model, packed):
        packed_lp = labelled_log_probs(model, packed)
    for name, other in (("left padding", left), ("one at a time", alone), ("packed", packed_lp)):
        assert other.shape == ref.shape, name
        assert (other - ref).abs().max() < 2e-5, (name, (other - ref).abs().max())


def test_rollout_log_probs_do_not_depend_on_the_rows_beside_them(case, loaded):
    model, processor = loaded
    torch.manual_seed(0)
    rollouts = NativeBackend(model, processor).rollout(prompts(), SamplingParams(n=2, temperature=1.0,
                                                                                   max_new_tokens=10))
    together, _ = token_log_probs(model, rollouts)
    for i in range(len(rollouts)):
        alone, _ = token_log_probs(model, rollouts.select([i]))
        n = int(rollouts.response_mask[i].sum())
        assert (alone[0, :n] - together[i, :n]).abs().max() < 2e-5


def test_discriminator_scores_do_not_depend_on_padding_or_batching(case):
    disc = MoEDiscriminator.from_pretrained(case.path, chat_template=case.chat_template)
    examples = demos()
    responses = [ex.response for ex in examples]
    right = disc.score(examples, responses, batch_size=len(examples), padding_side="right")
    left = disc.score(examples, responses, batch_size=len(examples), padding_side="left")
    alone = disc.score(examples, responses, batch_size=1)
    for comp in ("perception", "reasoning"):
        assert (left[comp] - right[comp]).abs().max() < 1e-4, comp
        assert (alone[comp] - right[comp]).abs().max() < 1e-4, comp
    assert not torch.equal(right["perception"], right["reasoning"])  # two experts, two segments


# ---------------------------------------------------------------------------------------------- samplers

def peaked(model, processor, generation: dict):
    """A copy of `model` whose distribution is peaked (the final norm scaled until the most likely next token of
    a prompt has probability 0.3 or more: a random tiny model's is near uniform), so tokens repeat and a
    repetition penalty matters, with a generation_config that sets `generation` (as Qwen2.5-VL's ships one)."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        inputs = encode_prompts(processor, prompts()[3:])  # text only
        logits = model(**inputs, position_ids=text_position_ids(inputs["attention_mask"])).logits[0, -1].float()
        scale = next((s for s in np.geomspace(1, 30, 40) if torch.softmax(logits * s, -1).max() >= 0.3), 30.0)
        norm = model.model.language_model.norm
        if type(norm).__name__.startswith("Qwen3_5"):  # zero-centred: weight w scales by 1 + w
            norm.weight.add_(1.0).mul_(scale).sub_(1.0)
        else:
            norm.weight.mul_(scale)
    for k, v in generation.items():
        setattr(model.generation_config, k, v)
    return model


@pytest.mark.parametrize("backend", ["native", "hf"])
def test_sampled_log_probs_are_the_policys_whatever_the_generation_config(case, loaded, backend):
    """HF `generate` used to merge the checkpoint's generation_config: Qwen2.5-VL's repetition_penalty 1.05
    shifted the sampled tokens and their recorded log-probs by up to 1.07 from the policy's."""
    model, processor = loaded
    model = peaked(model, processor, dict(repetition_penalty=1.3, temperature=0.1, top_k=1, top_p=0.001, do_sample=True,
                               no_repeat_ngram_size=2))
    torch.manual_seed(0)
    sampler = NativeBackend(model, processor) if backend == "native" else HFBackend(model, processor)
    rollouts = sampler.rollout(prompts(), SamplingParams(n=4, temperature=1.0, max_new_tokens=16))
    forced, _ = token_log_probs(model, rollouts, temperature=1.0)
    mask = rollouts.response_mask
    assert (forced - rollouts.log_probs).abs()[mask].max() < 2e-4
    ids = rollouts.response_ids
    repeats = sum(len(row[m].tolist()) - len(set(row[m].tolist())) for row, m in zip(ids, mask))
    assert repeats > 0  # the penalty and the n-gram ban would have changed these samples
    assert len(set(map(tuple, ids.tolist()))) > 1  # top_k=1 of the generation_config is not applied either


def test_native_greedy_equals_generate(case, loaded):
    model, processor = loaded
    params = SamplingParams(max_new_tokens=12, temperature=0.0, n=1)
    a = HFBackend(model, processor).rollout(prompts(), params)
    b = NativeBackend(model, processor).rollout(prompts(), params)
    assert torch.equal(a.response_ids, b.response_ids) and a.texts == b.texts


def test_rows_that_finish_leave_the_native_batch_and_the_rest_stay_exact(case, loaded, monkeypatch):
    model, processor = loaded
    vocab = model.config.get_text_config().vocab_size
    stops = list(range(0, vocab, 6))  # ~1 token in 6 ends a row: rows finish at many different steps
    monkeypatch.setattr(NativeBackend, "_eos_ids", lambda self: stops)
    torch.manual_seed(1)
    rollouts = NativeBackend(model, processor).rollout(prompts(), SamplingParams(n=4, temperature=1.0,
                                                                                   max_new_tokens=24))
    lengths = rollouts.response_lengths
    assert len(set(lengths.tolist())) > 3 and int(lengths.min()) < 12  # the batch shrank more than once
    forced, _ = token_log_probs(model, rollouts)
    assert (forced - rollouts.log_probs).abs()[rollouts.response_mask].max() < 2e-5


def test_the_native_sampler_runs_every_family_itself(case, loaded, caplog):
    model, processor = loaded
    with caplog.at_level("WARNING", logger="prism.rollout"):
        backend = make_backend("native", model, processor)
    assert isinstance(backend, NativeBackend) and not caplog.records


def test_a_vision_tower_update_reaches_the_rollouts(case):
    processor = case.processor()
    model = load_model(ModelSettings(path=str(case.path), freeze_vision=False), trainable=True)
    backend = make_backend("native", model, processor)
    params = SamplingParams(max_new_tokens=6, temperature=0.0, n=1)
    examples = prompts()[:2]
    before = backend.rollout(examples, params)
    with torch.no_grad():  # a step of the trainable vision tower
        for name, p in model.named_parameters():
            if ".visual." in f".{name}" and "merger" not in name and p.requires_grad:
                p.add_(torch.randn_like(p) * 0.5)
    backend.sync_weights(model)
    after = backend.rollout(examples, params)
    forced, _ = token_log_probs(model, after)
    assert (forced - after.log_probs).abs()[after.response_mask].max() < 2e-5
    stale, _ = token_log_probs(model, before)  # the earlier samples, scored by the new vision tower
    changed = (stale - before.log_probs).abs()[before.response_mask].max()
    assert changed > 1e-3


# ---------------------------------------------------------------------------------------------- images

def merge_factor(processor) -> int:
    ip = processor.image_processor
    return ip.patch_size * ip.merge_size


def bounded_example(tmp_path, f: int) -> Example:
    """Two 10f x 5f images (50 merged patches each) through the sharegpt reader, the first in a content part with
    its own max_pixels of 8 f^2 (qwen-vl-utils' per-image bound): 1 / sqrt(50 / 8) = 0.4 -> 4f x 2f, 8 tokens."""
    picture(10 * f, 5 * f).save(tmp_path / "wide.png")
    record = {"messages": [{"role": "user", "content": [{"type": "image", "image": "wide.png", "max_pixels": 8 * f * f},
                                                        {"type": "image", "image": "wide.png"},
                                                        {"type": "text", "text": "What are they?"}]},
                           {"role": "assistant", "content": RESPONSE}]}
    (tmp_path / "bounded.jsonl").write_text(json.dumps(record) + "\n")
    (ex,) = load_examples(tmp_path / "bounded.jsonl")
    return ex


def test_image_bounds_give_one_image_the_same_tokens_everywhere(case, loaded, tmp_path):
    model, _ = loaded
    f = merge_factor(case.processor())
    # the second image into at most 32 f^2 pixels (data.image_max_pixels): 1 / sqrt(50 / 32) = 0.8 -> 8f x 4f, 32
    processor = case.processor(min_pixels=4 * f * f, max_pixels=32 * f * f)
    assert image_pixels(processor) == (4 * f * f, 32 * f * f)
    ex = bounded_example(tmp_path, f)
    pad = processor.tokenizer.convert_tokens_to_ids(processor.image_token)

    def count(ids):
        return int((ids == pad).sum())

    collated = SFTCollator(processor)([ex])
    assert count(collated["input_ids"]) == 8 + 32
    assert token_lengths(processor, [ex]) == [int(collated["attention_mask"].sum())]
    assert count(encode_prompts(processor, [ex])["input_ids"]) == 8 + 32
    for sampler in (NativeBackend(model, processor), HFBackend(model, processor)):
        rollouts = sampler.rollout([ex], SamplingParams(max_new_tokens=2))
        assert count(rollouts.prompt["input_ids"]) == 8 + 32
    disc = MoEDiscriminator.from_pretrained(case.path, chat_template=case.chat_template,
                                            image_pixels=(4 * f * f, 32 * f * f))
    assert count(disc.encode([ex], ["c"], "perception")["input_ids"]) == 8 + 32
    # the folder's own bounds (a part's bound is clamped into them: Qwen3-VL's minimum is 64 tokens an image)
    assert count(SFTCollator(case.processor())([ex])["input_ids"]) != 8 + 32


def test_an_image_is_never_cut_and_over_long_examples_are_dropped_with_a_count(case, tmp_path):
    processor = case.processor()
    f = merge_factor(processor)
    small = Example(messages=[{"role": "user", "content": "<image>What is it?"},
                              {"role": "assistant", "content": RESPONSE}], images=[picture(2 * f, 2 * f)])
    large = Example(messages=small.messages, images=[picture(24 * f, 24 * f, 1)])
    n_small, n_large = token_lengths(processor, [small, large])
    assert n_large > n_small
    path = save_sharegpt_jsonl([small, large, small], tmp_path / "data.jsonl")
    limit = n_small + (n_large - n_small) // 2  # the large one's image would end past the limit
    corpus = Corpus.build_or_load(path, processor, max_length=limit, cache_dir=tmp_path / "cache")
    assert len(corpus) == 2 and corpus.manifest["n_dropped"] == 1
    assert list(corpus.lengths) == [n_small, n_small]
    assert int(SFTCollator(processor)([corpus[0]])["attention_mask"].sum()) == n_small  # measured exactly
    with pytest.raises(DataError, match="exceeds data.max_length"):  # never truncated
        SFTCollator(processor, max_length=limit)([large])


# ---------------------------------------------------------------------------------------------- what trains

PROJECTOR = ("merger", "deepstack_merger_list")
"""The visual modules whose output is the language model's width: the projector (freeze_merger)."""


def parts(model) -> dict[str, int]:
    """Parameter counts of vision tower, projector and language model, from the module tree."""
    visual = model.model.visual
    projector = sum(p.numel() for name, m in visual.named_children() if name in PROJECTOR for p in m.parameters())
    vision = sum(p.numel() for p in visual.parameters()) - projector
    total = sum(p.numel() for p in model.parameters())
    return {"vision": vision, "projector": projector, "language": total - vision - projector}


@pytest.mark.parametrize("freeze_vision,freeze_merger", [(True, True), (False, True), (True, False), (False, False)])
def test_freezing_trains_exactly_the_parts_it_says(case, freeze_vision, freeze_merger):
    model = load_model(ModelSettings(path=str(case.path), freeze_vision=freeze_vision, freeze_merger=freeze_merger))
    n = parts(model)
    assert n["vision"] > 0 and n["projector"] > 0
    want = n["language"] + (0 if freeze_vision else n["vision"]) + (0 if freeze_merger else n["projector"])
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == want


def test_lora_adapts_every_projection_of_the_language_model_and_nothing_else(case):
    r = 4
    model = load_model(ModelSettings(path=str(case.path), lora=LoraSettings(enabled=True, r=r)))
    base = model.get_base_model()
    # every linear layer of the language model but its routers and per-head gates
    skip = ("mlp.gate", "shared_expert_gate", "in_proj_a", "in_proj_b")
    expected = 0
    for name, m in base.model.language_model.named_modules():
        if ".lora_" in name or name.endswith("base_layer"):  # peft's own parts of an adapted layer
            continue
        m = getattr(m, "base_layer", m)
        if isinstance(m, torch.nn.Linear) and not name.endswith(skip):
            expected += r * (m.in_features + m.out_features)
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    assert all("lora_" in n and "language_model" in n for n in trainable)
    assert sum(trainable.values()) == expected
    if case.family.recurrent:  # Qwen3.5's Gated-DeltaNet projections too
        assert any("linear_attn.in_proj_qkv" in n for n in trainable)


# ---------------------------------------------------------------------------------------------- packing

def test_a_packed_sft_step_gives_the_padded_loss_and_gradients(case):
    processor = case.processor()
    torch.manual_seed(0)
    model = load_model(ModelSettings(path=str(case.path), freeze_vision=False, freeze_merger=False))
    batch = SFTCollator(processor)(demos())

    def loss_and_grads(inputs, apart=False):
        model.zero_grad(set_to_none=True)
        labels = inputs.pop("labels")
        if "pixel_values" not in inputs and "attention_mask" in inputs:
            inputs["position_ids"] = text_position_ids(inputs["attention_mask"])
        with sequences_apart(model, inputs) if apart else torch.enable_grad():
            logits = model(**inputs).logits[:, :-1].float()
            target = labels[:, 1:]
            nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                    ignore_index=IGNORE_INDEX)
            nll.backward()
        return nll.item(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}

    padded_loss, padded = loss_and_grads(dict(batch))
    packed_loss, packed = loss_and_grads(pack(model, dict(batch)), apart=True)
    assert abs(packed_loss - padded_loss) < 1e-5
    assert padded.keys() == packed.keys()
    for k in padded:
        assert torch.allclose(packed[k], padded[k], atol=1e-5, rtol=1e-3), k


def test_prism_sft_padding_free_follows_the_padded_run(case, tmp_path):
    if not case.family.recurrent:
        pytest.skip("attention-only families: tests/test_sft.py runs this on the tiny Qwen3-VL")
    from prism.core.config import load_config
    from prism.sft.config import SFTConfig
    from prism.sft.train import train

    data = save_sharegpt_jsonl(demos() * 2, tmp_path / "demos.jsonl")
    losses = []
    for free in (False, True):
        cfg = load_config(SFTConfig, None, [
            f"model.path={case.path}", f"data.train={data}", "data.eval=null", "train.max_steps=2",
            "train.micro_batch_size=5", f"train.padding_free={str(free).lower()}", "optim.warmup_ratio=0",
            "logging.tensorboard=false", f"train.output_dir={tmp_path / str(free)}",
            f"model.chat_template={case.chat_template}"])
        train(cfg)
        rows = [json.loads(line) for line in (tmp_path / str(free) / "metrics.jsonl").read_text().splitlines()]
        losses.append([r["train/loss"] for r in rows if "train/loss" in r])
    assert np.allclose(losses[0], losses[1], atol=1e-5), losses


@pytest.mark.slow
def test_the_compiled_hybrid_step_decodes_greedily_as_generate(case, loaded, caplog):
    if not case.family.recurrent:
        pytest.skip("tests/test_native.py compiles the attention-only step")
    model, processor = loaded
    params = SamplingParams(max_new_tokens=8, temperature=0.0, n=1)
    a = HFBackend(model, processor).rollout(prompts(), params)
    with caplog.at_level("WARNING", logger="prism.rollout"):
        b = NativeBackend(model, processor, compile=True).rollout(prompts(), params)
    assert not caplog.records  # compiled, not fallen back to eager decoding
    assert torch.equal(a.response_ids, b.response_ids)
