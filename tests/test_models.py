"""The tiny Qwen3-VL: offline build and reload, its tokenizer and processor, and `load_model` freezing."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
import transformers
from PIL import Image
from transformers import AutoModelForImageTextToText

from prism.core.config import LoraSettings, ModelSettings
from prism.core.errors import DataError
from prism.models.loader import (
    check_model_dir,
    check_weights,
    load_model,
    resolve_dtype,
)
from prism.models.processor import image_pixels, load_processor
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


# ---------------------------------------------------------------------------------- faults: one line each


def _copy(tiny_model_dir, tmp_path):
    return Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))


def _one_line(info, *names) -> str:
    msg = str(info.value)
    assert "\n" not in msg, msg
    for name in names:
        assert str(name) in msg, (name, msg)
    return msg


def _header(file):
    raw = file.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return raw, n, json.loads(raw[8: 8 + n])


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", "\xff\xfe"])
def test_corrupt_config_json_is_one_line_naming_the_key_and_file(tiny_model_dir, tmp_path, content):
    d = _copy(tiny_model_dir, tmp_path)
    (d / "config.json").write_bytes(content.encode("latin-1"))
    with pytest.raises(DataError) as info:
        load_model(ModelSettings(path=str(d)), trainable=False)
    _one_line(info, "model.path", d / "config.json")
    with pytest.raises(DataError) as info:
        check_model_dir(d, key="--model")
    _one_line(info, "--model", d / "config.json")
    with pytest.raises(DataError) as info:  # the stages load the processor first: the same line
        load_processor(d)
    _one_line(info, "model.path", d / "config.json")


VOCAB = "tokenizer.json or vocab.json + merges.txt"


@pytest.mark.parametrize("removed, says", [
    (("tokenizer.json", "tokenizer_config.json"), f"missing {VOCAB}; tokenizer_config.json"),
    (("tokenizer.json",), f"missing {VOCAB}"),
    (("tokenizer_config.json",), "missing tokenizer_config.json"),
    (("processor_config.json",), "missing preprocessor_config.json (or an image_processor entry in processor_config"),
])
def test_missing_processor_files_are_one_line_naming_the_key_and_what(tiny_model_dir, tmp_path, removed, says):
    d = _copy(tiny_model_dir, tmp_path)
    for name in removed:
        (d / name).unlink()
    for key in ("model.path", "--model"):
        with pytest.raises(DataError) as info:
            load_processor(d, key=key)
        _one_line(info, f"{key}: {d} has no usable processor", says)


def test_corrupt_processor_json_names_the_file(tiny_model_dir, tmp_path):
    d = _copy(tiny_model_dir, tmp_path)
    (d / "tokenizer_config.json").write_text('{"eos_token": ')
    with pytest.raises(DataError) as info:
        load_processor(d, key="--model")
    _one_line(info, "--model", d / "tokenizer_config.json", "not valid JSON")


def test_load_processor_missing_dir_names_the_key(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        load_processor(tmp_path / "absent", key="--model")
    _one_line(info, "--model", tmp_path / "absent")


def _truncate(f):
    with open(f, "r+b") as fh:
        fh.truncate(f.stat().st_size // 2)


def _garbage_header(f):
    raw = f.read_bytes()
    f.write_bytes(raw[:8] + b"#" * 32 + raw[40:])


def _huge_header_length(f):
    raw = f.read_bytes()
    f.write_bytes(struct.pack("<Q", 2 ** 62) + raw[8:])


def _cut_in_header(f):
    raw = f.read_bytes()
    f.write_bytes(raw[:20])


def _offsets_not_numbers(f):
    raw, n, header = _header(f)
    name = next(k for k in header if k != "__metadata__")
    header[name]["data_offsets"] = ["a", "b"]
    body = json.dumps(header, separators=(",", ":")).encode()
    f.write_bytes(struct.pack("<Q", len(body)) + body + raw[8 + n:])


@pytest.mark.parametrize("corrupt", [_truncate, _garbage_header, _huge_header_length, _cut_in_header,
                                     _offsets_not_numbers])
def test_truncated_or_corrupt_weights_are_one_line_naming_the_key_and_file(tiny_model_dir, tmp_path, corrupt):
    d = _copy(tiny_model_dir, tmp_path)
    weights = d / "model.safetensors"
    corrupt(weights)
    for path in (d, weights):
        with pytest.raises(DataError) as info:
            check_weights(path, key="ckpt")
        assert str(info.value).startswith(f"ckpt: {weights} is truncated or corrupt (")
        _one_line(info)
    with pytest.raises(DataError) as info:
        load_model(ModelSettings(path=str(d)), trainable=False)
    _one_line(info, "model.path", weights, "is truncated or corrupt")


def test_check_weights_passes_whole_files_and_reads_headers_only(tiny_model_dir, monkeypatch):
    import safetensors.torch

    def no_tensor_reads(*args, **kwargs):
        raise AssertionError("check_weights read tensors")

    monkeypatch.setattr(safetensors.torch, "load_file", no_tensor_reads)
    monkeypatch.setattr(safetensors, "safe_open", no_tensor_reads)
    check_weights(tiny_model_dir)
    check_weights(tiny_model_dir / "model.safetensors", key="--model")


def test_a_shard_missing_from_the_index_is_named(tiny_model_dir, tmp_path):
    d = _copy(tiny_model_dir, tmp_path)
    index = d / "model.safetensors.index.json"
    shards = {"a.weight": "model.safetensors", "b.weight": "model-00002.safetensors"}
    index.write_text(json.dumps({"weight_map": shards}))
    with pytest.raises(DataError) as info:
        check_model_dir(d)
    _one_line(info, "model.path", index, "model-00002.safetensors")


def test_a_load_failure_the_headers_cannot_show_is_one_line(tiny_model_dir, tmp_path):
    # header and size are whole, but one tensor's shape does not fit its bytes: safetensors refuses it on load
    d = _copy(tiny_model_dir, tmp_path)
    weights = d / "model.safetensors"
    raw, n, header = _header(weights)
    name = next(k for k in header if k != "__metadata__")
    header[name]["shape"] = [header[name]["shape"][0] + 1, *header[name]["shape"][1:]]
    body = json.dumps(header, separators=(",", ":")).encode()
    weights.write_bytes(struct.pack("<Q", len(body)) + body + raw[8 + n:])
    check_weights(d)  # not its business
    with pytest.raises(DataError) as info:
        load_model(ModelSettings(path=str(d)), trainable=False, key="--model")
    _one_line(info, f"--model: cannot load the model in {d}")


def test_discriminator_faults_name_discriminator_path(tiny_model_dir, tmp_path):
    from prism.align.discriminator import MoEDiscriminator

    d = _copy(tiny_model_dir, tmp_path)
    (d / "config.json").write_text("{")
    with pytest.raises(DataError) as info:
        MoEDiscriminator.from_pretrained(d)
    _one_line(info, "discriminator.path", d / "config.json")
    shutil.copy(tiny_model_dir / "config.json", d / "config.json")
    _truncate(d / "model.safetensors")
    with pytest.raises(DataError) as info:
        MoEDiscriminator.from_pretrained(d)
    _one_line(info, "discriminator.path", d / "model.safetensors", "is truncated or corrupt")
    shutil.copy(tiny_model_dir / "model.safetensors", d / "model.safetensors")
    (d / "tokenizer.json").unlink()
    with pytest.raises(DataError) as info:
        MoEDiscriminator.from_pretrained(d)
    _one_line(info, f"discriminator.path: {d}", "has no usable processor", "tokenizer.json")


def test_saved_discriminator_with_corrupt_files_names_discriminator_path(tiny_model_dir, tmp_path):
    from prism.align.discriminator import CONFIG_FILE, HEADS_FILE, MoEDiscriminator

    saved = MoEDiscriminator.from_pretrained(tiny_model_dir).save_pretrained(tmp_path / "disc")
    config = (saved / CONFIG_FILE).read_text()
    (saved / CONFIG_FILE).write_text(config[:10])
    with pytest.raises(DataError) as info:
        MoEDiscriminator.from_pretrained(saved)
    _one_line(info, "discriminator.path", saved / CONFIG_FILE)
    (saved / CONFIG_FILE).write_text(config)
    _truncate(saved / HEADS_FILE)
    with pytest.raises(DataError) as info:
        MoEDiscriminator.from_pretrained(saved)
    _one_line(info, "discriminator.path", saved / HEADS_FILE, "is truncated or corrupt")


def test_resolve_dtype():
    assert resolve_dtype("auto", "cpu") is torch.float32
    assert resolve_dtype("auto", "cuda") is torch.bfloat16
    assert resolve_dtype("bfloat16", "cpu") is torch.bfloat16


def test_chat_template_and_image_bound_faults_are_one_line(tiny_model_dir, tmp_path):
    from prism.core.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        load_processor(tiny_model_dir, chat_template="nope.jinja")
    assert str(e.value) == "model.chat_template: 'nope.jinja' is neither auto, chatml nor a template file"
    broken = tmp_path / "broken.jinja"
    broken.write_text("{{ raise_exception('System role not supported') }}")
    with pytest.raises(ConfigError, match=r"^discriminator.chat_template: the chat template of .* cannot render a "
                                          r"conversation .*System role not supported\)$"):
        load_processor(tiny_model_dir, chat_template=str(broken), template_key="discriminator.chat_template")
    with pytest.raises(ConfigError, match="data.image_min_pixels: 5000 is above the largest image size allowed, 4000"):
        load_processor(tiny_model_dir, min_pixels=5000, max_pixels=4000)
    processor = load_processor(tiny_model_dir, max_pixels=64 * 64)  # one bound: the other stays the checkpoint's
    assert image_pixels(processor) == (16 * 16, 64 * 64)
