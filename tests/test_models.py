"""The tiny Qwen3-VL: offline build and reload, its tokenizer and processor, and `load_model` freezing."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import transformers
from PIL import Image
from transformers import AutoModelForImageTextToText

from prism.core.config import LoraSettings, ModelSettings
from prism.models.loader import check_model_dir, load_model, resolve_dtype
from prism.models.processor import load_processor
from prism.models.tiny import FORMAT_TAGS

# Qwen's special tokens, in Qwen's id order (151643..151656 in the real vocabulary).
QWEN_SPECIALS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]
IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
PROMPT = f"<|im_start|>user\n{IMAGE}How many red cells?<|im_end|>\n<|im_start|>assistant\n"


def grid(colour, size=48) -> Image.Image:
    return Image.new("RGB", (size, size), colour)


@pytest.fixture(scope="module")
def dense(tiny_model_dir):
    return AutoModelForImageTextToText.from_pretrained(tiny_model_dir).eval()


# ---------------------------------------------------------------------------------- reload


def test_dense_reloads_with_the_stock_auto_class(dense):
    assert type(dense).__name__ == "Qwen3VLForConditionalGeneration"
    assert dense.dtype is torch.float32


def test_moe_reloads_with_the_stock_auto_class(tiny_moe_dir):
    model = AutoModelForImageTextToText.from_pretrained(tiny_moe_dir)
    assert type(model).__name__ == "Qwen3VLMoeForConditionalGeneration"
    assert model.config.text_config.num_experts == 4


@pytest.mark.parametrize("which", ["tiny_model_dir", "tiny_moe_dir"])
def test_saved_config_is_consistent_with_the_tokenizer(which, request):
    model_dir = request.getfixturevalue(which)
    config = json.loads((model_dir / "config.json").read_text())
    text = config["text_config"]
    rope = text.get("rope_parameters") or text.get("rope_scaling")
    # Multimodal rotary sections (temporal, height, width) cover half of each head's dimensions.
    assert sum(rope["mrope_section"]) == text["head_dim"] // 2
    tok = load_processor(model_dir).tokenizer
    assert config["image_token_id"] == tok.convert_tokens_to_ids("<|image_pad|>")
    assert config["vision_start_token_id"] == tok.convert_tokens_to_ids("<|vision_start|>")
    assert text["eos_token_id"] == tok.convert_tokens_to_ids("<|im_end|>")
    assert text["vocab_size"] >= len(tok)


# ---------------------------------------------------------------------------------- processor


def test_processor_loads_without_torchvision(tiny_processor):
    if transformers.utils.is_torchvision_available():
        pytest.skip("torchvision is installed here; the fallback path is not exercised")
    assert type(tiny_processor).__name__ == "Qwen3VLProcessor"
    assert type(tiny_processor.image_processor).__name__ == "Qwen2VLImageProcessorPil"


def test_image_expands_to_one_token_per_merged_patch(tiny_processor):
    batch = tiny_processor(text=[f"look {IMAGE} here"], images=[grid("red")], return_tensors="pt")
    # 48 px / 8 px patches = 6 x 6 patches; merged 2 x 2 they give 3 x 3 = 9 image tokens.
    assert batch["image_grid_thw"].tolist() == [[1, 6, 6]]
    pad = tiny_processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert int((batch["input_ids"] == pad).sum()) == 9
    # One row per 8 x 8 patch, 3 channels x temporal patch 2 x 8 x 8 values each.
    assert tuple(batch["pixel_values"].shape) == (36, 3 * 2 * 8 * 8)


def test_video_raises_a_clear_error(tiny_processor):
    if transformers.utils.is_torchvision_available():
        pytest.skip("torchvision is installed here; videos are supported")
    with pytest.raises(RuntimeError, match="torchvision"):
        tiny_processor(text=["<|vision_start|><|video_pad|><|vision_end|>"], videos=[torch.zeros(2, 3, 48, 48)])


def test_processor_save_and_load_round_trip(tiny_processor, tmp_path):
    tiny_processor.save_pretrained(tmp_path)
    again = load_processor(tmp_path)
    text = PROMPT + "<caption>row 1: red blue</caption><think>Total: 1.</think><answer>1</answer><|im_end|>"
    assert again.tokenizer(text)["input_ids"] == tiny_processor.tokenizer(text)["input_ids"]
    assert again.chat_template == tiny_processor.chat_template
    assert again.image_processor.patch_size == 8 and again.image_processor.merge_size == 2
    same = [again(text=[IMAGE], images=[grid("blue")])["input_ids"],
            tiny_processor(text=[IMAGE], images=[grid("blue")])["input_ids"]]
    assert same[0] == same[1]


def test_load_processor_missing_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent"):
        load_processor(tmp_path / "absent")


# ---------------------------------------------------------------------------------- tokenizer


def test_qwen_special_tokens_in_qwen_order_with_consecutive_ids(tiny_processor):
    tok = tiny_processor.tokenizer
    ids = [tok.convert_tokens_to_ids(t) for t in QWEN_SPECIALS]
    assert ids == list(range(ids[0], ids[0] + len(QWEN_SPECIALS)))
    assert all(tok.tokenize(t) == [t] for t in QWEN_SPECIALS)
    assert (tok.eos_token, tok.pad_token) == ("<|im_end|>", "<|endoftext|>")


def test_format_tags_are_single_tokens_that_survive_decoding(tiny_processor):
    tok = tiny_processor.tokenizer
    for tag in FORMAT_TAGS:
        assert len(tok(tag, add_special_tokens=False)["input_ids"]) == 1, tag
    text = "<caption>red</caption><think>so</think><answer>1</answer>"
    ids = tok(text + "<|im_end|>", add_special_tokens=False)["input_ids"]
    assert tok.decode(ids, skip_special_tokens=True) == text  # <|im_end|> goes, the tags stay


def test_any_text_round_trips_through_byte_level_bpe(tiny_processor):
    tok = tiny_processor.tokenizer
    text = "Grüße, 三 cells!\n\tzebra 12345"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text


# ---------------------------------------------------------------------------------- forward


@pytest.mark.parametrize("which", ["tiny_model_dir", "tiny_moe_dir"])
def test_forward_with_an_image_and_greedy_generate(which, request):
    model_dir = request.getfixturevalue(which)
    model = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
    processor = load_processor(model_dir)
    red = processor(text=[PROMPT], images=[grid("red")], return_tensors="pt")
    blue = processor(text=[PROMPT], images=[grid("blue")], return_tensors="pt")
    with torch.no_grad():
        logits_red = model(**red).logits
        logits_blue = model(**blue).logits
    n = red["input_ids"].shape[1]
    assert logits_red.shape == (1, n, model.config.text_config.vocab_size)
    assert torch.isfinite(logits_red).all()
    assert not torch.allclose(logits_red, logits_blue)  # the pixels reach the language model

    out = model.generate(**red, max_new_tokens=4, do_sample=False)
    assert out.shape[0] == 1 and n < out.shape[1] <= n + 4
    assert torch.equal(out[:, :n], red["input_ids"])
    assert out[0, n].item() == logits_red[0, -1].argmax().item()  # greedy: the first token is the argmax


# ---------------------------------------------------------------------------------- load_model


def trainable(model) -> dict[str, bool]:
    return {name: p.requires_grad for name, p in model.named_parameters()}


def is_merger(name: str) -> bool:
    return "visual.merger." in name or "visual.deepstack_merger_list." in name


def test_defaults_freeze_the_whole_visual_part(tiny_model_dir):
    flags = trainable(load_model(ModelSettings(path=str(tiny_model_dir))))
    visual = {n: g for n, g in flags.items() if "visual." in n}
    language = {n: g for n, g in flags.items() if "visual." not in n}
    assert visual and language
    assert not any(visual.values())
    assert all(language.values())


def test_train_vision_tower_with_frozen_merger(tiny_model_dir):
    s = ModelSettings(path=str(tiny_model_dir), freeze_vision=False, freeze_merger=True)
    flags = trainable(load_model(s))
    mergers = [n for n in flags if is_merger(n)]
    tower = [n for n in flags if "visual." in n and not is_merger(n)]
    assert mergers and tower and "model.visual.patch_embed.proj.weight" in tower
    assert not any(flags[n] for n in mergers)
    assert all(flags[n] for n in tower)
    assert all(g for n, g in flags.items() if "visual." not in n)


def test_lora_trains_only_the_language_model_adapters(tiny_model_dir):
    model = load_model(ModelSettings(path=str(tiny_model_dir), lora=LoraSettings(enabled=True)))
    names = [n for n, g in trainable(model).items() if g]
    assert all("lora_" in n and "language_model" in n for n in names)
    # 4 layers x 7 projections (q, k, v, o, gate, up, down) x (lora_A, lora_B)
    assert len(names) == 4 * 7 * 2


def test_lora_with_a_trainable_merger(tiny_model_dir):
    s = ModelSettings(path=str(tiny_model_dir), freeze_merger=False, lora=LoraSettings(enabled=True))
    flags = trainable(load_model(s))
    names = {n for n, g in flags.items() if g}
    mergers = {n for n in flags if is_merger(n)}
    assert len(mergers) == 12  # merger + one deepstack merger, each norm + 2 linears, weight + bias
    assert names == mergers | {n for n in flags if "lora_" in n}
    assert not any(g for n, g in flags.items() if "visual." in n and not is_merger(n))


def test_reference_model_is_frozen_and_in_eval_mode(tiny_model_dir):
    model = load_model(ModelSettings(path=str(tiny_model_dir)), trainable=False)
    assert not model.training
    assert not any(trainable(model).values())


def test_missing_model_dir_names_the_key(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.path") as info:
        load_model(ModelSettings(path=str(tmp_path / "absent")))
    assert "absent" in str(info.value)


def test_model_dir_without_safetensors_names_the_key(tiny_model_dir, tmp_path):
    shutil.copy(tiny_model_dir / "config.json", tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match="model.path") as info:
        load_model(ModelSettings(path=str(tmp_path)))
    assert "safetensors" in str(info.value)
    with pytest.raises(FileNotFoundError, match="ref.path"):
        check_model_dir(tmp_path, key="ref.path")


def test_resolve_dtype():
    assert resolve_dtype("auto", "cpu") is torch.float32
    assert resolve_dtype("auto", "cuda") is torch.bfloat16
    assert resolve_dtype("bfloat16", "cpu") is torch.bfloat16
