"""Tiny random Qwen-VL models built offline, for tests and the demo.

`prism-tiny --out DIR [--family F | --moe]` writes prism's own tiny model of a family (default Qwen3-VL;
every family of `prism.models.families`), a directory that the stock Auto classes reload:

    AutoModelForImageTextToText.from_pretrained(DIR)      # Qwen3VLForConditionalGeneration, ...
    prism.models.load_processor(DIR)                       # AutoProcessor where torchvision exists

Nothing is downloaded: the tokenizer is a byte-level BPE trained here with `tokenizers` on a small
corpus of the synthetic task's vocabulary plus generic English, with Qwen's special tokens in
Qwen's order, and the weights are random.

`prism-tiny --like SRC --out DIR` builds instead from a real checkpoint's files (config.json, tokenizer,
processor, chat template, generation config; no weights needed): the same architecture with its sizes
shrunk and every token id, rotary section, deepstack index, layer type and MoE setting kept, with SRC's
tokenizer, template and settings unchanged (`build_like`).
"""

from __future__ import annotations

import argparse
import random
import shutil
from pathlib import Path
from typing import Any

import torch
import transformers
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from prism.core.errors import DataError
from prism.models.families import FAMILIES, Family, family_named
from prism.models.loader import read_json_object
from prism.models.processor import CHATML_TEMPLATE, build_processor, load_processor

# Qwen2.5/Qwen3 special tokens, in Qwen's id order (151643.. in the real vocabulary). They follow
# the BPE vocabulary here, so relative ids and every name the processors look up are the same.
QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]
# The response-format tags of docs/design.md §2: single tokens, not special (they survive decoding).
FORMAT_TAGS = ["<caption>", "</caption>", "<think>", "</think>", "<answer>", "</answer>"]

# Qwen2's pre-tokenizer split: words with their leading space, single digits, punctuation runs.
QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# prism's ChatML: Qwen's markup of system / user / assistant turns with images, as the Instruct templates render
# them, the assistant turn inside {% generation %} (prism.models.processor.CHATML_TEMPLATE).
CHAT_TEMPLATE = CHATML_TEMPLATE

_COLOURS = "red green blue yellow orange purple white black gray grey pink brown cyan magenta".split()
_WORDS = (
    "how many cells are there in row column grid image the a of and or is more than less equal which "
    "colour color appears most often count each total has have with left right top bottom first second "
    "third fourth answer caption think so therefore because step compare number same different sum "
    "what where picture shows contains described question solve let us look at we see it this that "
    "only not no yes one two three four five six seven eight nine ten zero after before then"
).split()
# Number words the synthetic task's traces use ("red three, green two"): frequent in the corpus so
# that each becomes one token, and a count is a single token right after its colour.
NUMBER_WORDS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
                "fifteen sixteen").split()


def _corpus(seed: int = 0, n: int = 4000) -> list[str]:
    """Sentences over the task vocabulary, digits, punctuation and the format tags."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        row = " ".join(rng.choice(_COLOURS) for _ in range(rng.randint(2, 6)))
        words = " ".join(rng.choice(_WORDS + _COLOURS) for _ in range(rng.randint(4, 14)))
        nums = " + ".join(str(rng.randint(0, 16)) for _ in range(rng.randint(1, 5)))
        tally = ", ".join(f"{rng.choice(_COLOURS)} {rng.choice(NUMBER_WORDS)}" for _ in range(4))
        lines.append(
            f"<caption>row {rng.randint(1, 6)}: {row}; row {rng.randint(1, 6)}: {row}</caption>"
            f"<think>{words.capitalize()}. Count each colour: {tally}. Total: {nums} = {rng.randint(0, 40)}.</think>"
            f"<answer>{rng.choice(_COLOURS + [str(rng.randint(0, 36))])}</answer> {words}? {words}."
        )
    return lines


def build_tokenizer(vocab_size: int = 560, seed: int = 0) -> PreTrainedTokenizerFast:
    """Byte-level BPE (any UTF-8 text encodes) + Qwen special tokens + format tags."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_corpus(seed), trainer)
    tok.add_special_tokens(QWEN_SPECIAL_TOKENS)
    tok.add_tokens(FORMAT_TAGS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",  # what a chat turn ends with, as in Qwen's instruct tokenizers
        pad_token="<|endoftext|>",
        model_max_length=4096,
        chat_template=CHAT_TEMPLATE,
    )


def build_image_processor() -> Qwen2VLImageProcessorPil:
    # patch 8 x merge 2 = 16 px: one merged vision token per 16x16 cell of the synthetic grids.
    # temporal_patch_size 2 is what Qwen-VL uses for still images (the frame is repeated).
    # min/max pixels keep a 48x48 or 64x64 grid at its size (no up/down-scaling).
    return Qwen2VLImageProcessorPil(
        patch_size=8, merge_size=2, temporal_patch_size=2,
        size={"shortest_edge": 16 * 16, "longest_edge": 512 * 512},
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
    )


def tiny_config(tokenizer, moe: bool = False, hidden: int = 128, layers: int = 4, experts: int = 4,
                head_dim: int = 32, family: str = "qwen3_vl"):
    """The config of prism's own tiny model of `family` (a `prism.models.families` model_type; `moe` turns
    qwen3_vl into qwen3_vl_moe), sized for the tiny tokenizer and image processor."""
    family = "qwen3_vl_moe" if moe and family == "qwen3_vl" else family
    fam = family_named(family, "prism-tiny --family")
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    text = dict(
        # Round the vocabulary up to a multiple of 64 (tensor-core friendly; ids beyond are unused).
        vocab_size=(len(tokenizer) + 63) // 64 * 64,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=hidden // head_dim,
        num_key_value_heads=max(1, hidden // head_dim // 2),  # GQA, as in every Qwen3 model
        head_dim=head_dim,
        max_position_embeddings=4096,
        # Multimodal rotary: the (temporal, height, width) sections must sum to head_dim / 2
        # (16 = 8 + 4 + 4 for head_dim 32), temporal taking half as in Qwen3-VL's [24, 20, 20] of 64.
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                         "mrope_section": [head_dim // 4, head_dim // 8, head_dim // 8], "mrope_interleaved": True},
        pad_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
    )
    vision = dict(
        depth=2, hidden_size=64, intermediate_size=128, num_heads=2,
        patch_size=8, spatial_merge_size=2, temporal_patch_size=2,  # must match the image processor
        out_hidden_size=hidden,  # the merger projects vision features to the LM width
        # Learned position embeddings on an 8x8 grid, interpolated to the image; must be a square.
        num_position_embeddings=64,
        # DeepStack: features of vision block 0 are added to the first LM layer's hidden states.
        deepstack_visual_indexes=[0],
    )
    if not fam.head_dim_key:  # Qwen2-VL, Qwen2.5-VL
        # head_dim is hidden / heads; M-RoPE sections in Qwen2-VL's 1 : 1.5 : 1.5 ([16, 24, 24] of 64), not
        # interleaved
        del text["head_dim"]
        text["bos_token_id"] = ids["<|endoftext|>"]  # (its default is the real vocabulary's id)
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0,
                                   "mrope_section": [head_dim // 8, 3 * head_dim // 16, 3 * head_dim // 16]}
        if fam.model_type == "qwen2_vl":  # its vision config names the widths differently, and has mlp_ratio
            vision = dict(depth=2, embed_dim=64, hidden_size=hidden, mlp_ratio=2, num_heads=2, patch_size=8,
                          spatial_merge_size=2, temporal_patch_size=2)
        else:  # window attention over 2 x 2 merged patches (32 px), full attention in the last block
            vision = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, patch_size=8,
                          spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=hidden, window_size=32,
                          fullatt_block_indexes=[1])
    if fam.recurrent:
        # Qwen3.5: rotary on a quarter of each head (partial_rotary_factor 0.25), its sections summing to
        # head_dim / 8; three Gated-DeltaNet layers for each attention layer, the last layer attention
        rotary = head_dim // 8
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25,
                                   "mrope_section": [rotary - 2 * (rotary // 3), rotary // 3, rotary // 3],
                                   "mrope_interleaved": True}
        interval = min(4, layers)
        text.update(linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=head_dim,
                    linear_value_head_dim=head_dim, linear_conv_kernel_dim=4,
                    layer_types=["full_attention" if (i + 1) % interval == 0 else "linear_attention"
                                 for i in range(layers)])
        del vision["deepstack_visual_indexes"]
    if fam.moe:
        text.update(num_experts=experts, num_experts_per_tok=2, moe_intermediate_size=hidden,
                    router_aux_loss_coef=0.001)
        if fam.recurrent:
            text.update(shared_expert_intermediate_size=hidden)
        else:  # norm_topk_prob: transformers' Qwen3-VL-MoE renormalises the top-k weights; vLLM reads the flag
            text.update(decoder_sparse_step=1, norm_topk_prob=True)
    common = dict(
        text_config=text, vision_config=vision, tie_word_embeddings=True,
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    return _config_class(fam)(**common)


def _config_class(fam: Family):
    return getattr(transformers, fam.model_class.replace("ForConditionalGeneration", "Config"))


def build_tiny(out: str | Path, moe: bool = False, seed: int = 0, hidden: int = 128, layers: int = 4,
               experts: int = 4, head_dim: int = 32, family: str = "qwen3_vl") -> Path:
    """Build and save prism's own tiny random model of `family` (default Qwen3-VL; `moe`: Qwen3-VL-MoE) with
    its tokenizer and processor."""
    out = Path(out)
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(seed=seed)
    config = tiny_config(tokenizer, moe=moe, hidden=hidden, layers=layers, experts=experts, head_dim=head_dim,
                         family=family)
    fam = family_named(config.model_type, "prism-tiny --family")
    model = getattr(transformers, fam.model_class)(config)
    model.generation_config.eos_token_id = config.text_config.eos_token_id
    model.generation_config.pad_token_id = config.text_config.pad_token_id
    video = {"video_processor_type": fam.video_processor_class, "patch_size": 8, "merge_size": 2,
             "temporal_patch_size": 2, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
    processor = build_processor(getattr(transformers, fam.processor_class), build_image_processor(), tokenizer, video,
                                CHAT_TEMPLATE)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


# ---------------------------------------------------------------------------------------------- --like

LIKE_FILES = ("tokenizer_config.json", "tokenizer.json", "vocab.json", "merges.txt", "special_tokens_map.json",
              "added_tokens.json", "chat_template.json", "chat_template.jinja", "preprocessor_config.json",
              "video_preprocessor_config.json", "processor_config.json", "generation_config.json")
"""The small files of a checkpoint that `build_like` copies byte for byte (everything but the weights and
config.json)."""


def like_sizes(config, hidden: int | None = None, layers: int | None = None) -> dict[str, Any]:
    """The tiny sizes `shrink_config` gives the checkpoint config `config` (for messages and tests).

    Heads: 2 query heads and 1 key/value head (2 where the checkpoint has no GQA); the head width is the
    checkpoint's, so its rotary sections still sum to half of it. `hidden`: the language model's width (default
    128 where head_dim is its own key, else 2 heads x head_dim, which it must be). `layers`: the shortest
    prefix of the checkpoint's layers that holds each of its layer types (at least 2)."""
    fam = family_named(config.model_type, "prism-tiny --like")
    text = config.get_text_config()
    head_dim = getattr(text, "head_dim", None) if fam.head_dim_key else None
    head_dim = head_dim or text.hidden_size // text.num_attention_heads
    kv = 1 if text.num_key_value_heads < text.num_attention_heads else 2
    if hidden is None:
        hidden = 128 if fam.head_dim_key else 2 * head_dim
    elif not fam.head_dim_key and hidden != 2 * head_dim:
        raise DataError(f"prism-tiny --like: {fam.name} has no head_dim key, so --hidden must be 2 heads x its head "
                        f"width {head_dim} = {2 * head_dim}")
    types = list(getattr(text, "layer_types", None) or [])
    if layers is None:
        layers = max([2] + [types.index(t) + 1 for t in set(types)])
    return dict(hidden=hidden, layers=layers, heads=2, kv_heads=kv, head_dim=head_dim)


def shrink_config(config, hidden: int | None = None, layers: int | None = None):
    """A checkpoint config with only its sizes made tiny (`like_sizes`): every token id, rotary setting, layer
    type (the first `layers`), deepstack index, window, expert count and top-k, vocabulary and tie kept. The
    vision tower keeps its depth (deepstack and full-attention indexes refer to its blocks) at width 32."""
    fam = family_named(config.model_type, "prism-tiny --like")
    sizes = like_sizes(config, hidden, layers)
    d = config.to_dict()
    text = d["text_config"]
    h, n = sizes["hidden"], sizes["layers"]
    text.update(hidden_size=h, intermediate_size=2 * h, num_hidden_layers=n, num_attention_heads=2,
                num_key_value_heads=sizes["kv_heads"])
    if text.get("layer_types"):
        text["layer_types"] = text["layer_types"][:n]
    if text.get("mlp_only_layers"):
        text["mlp_only_layers"] = [i for i in text["mlp_only_layers"] if i < n]
    if fam.moe:
        text["moe_intermediate_size"] = 32
        if "shared_expert_intermediate_size" in text:
            text["shared_expert_intermediate_size"] = 32
    if fam.recurrent:
        ratio = max(1, text["linear_num_value_heads"] // text["linear_num_key_heads"])
        text.update(linear_num_key_heads=2, linear_num_value_heads=2 * ratio)
    vision = d["vision_config"]
    vision.update({fam.vision_width: 32, "num_heads": 2, fam.vision_out: h})
    if fam.vision_mlp:
        vision[fam.vision_mlp] = 64
    return type(config).from_dict(d)


def build_like(src: str | Path, out: str | Path, hidden: int | None = None, layers: int | None = None,
               seed: int = 0) -> Path:
    """`prism-tiny --like SRC`: a random-weight model of SRC's architecture with tiny sizes (`shrink_config`),
    and SRC's tokenizer, chat template, processor and generation settings copied unchanged. SRC needs
    config.json, the tokenizer (tokenizer.json, or vocab.json + merges.txt) and the processor's files; no
    weights. The offline equivalent of the hub's tiny-random test models."""
    from transformers import AutoConfig, GenerationConfig

    src, out = Path(src), Path(out)
    if not (src / "config.json").is_file():
        raise FileNotFoundError(f"prism-tiny --like: {src} has no config.json")
    model_type = read_json_object(src / "config.json", "prism-tiny --like").get("model_type")
    fam = family_named(str(model_type), f"prism-tiny --like: {src / 'config.json'}")
    # every file it needs is there and loads; the copy keeps SRC's own template, which is checked (and a Thinking
    # one refused) only when the tiny model is used, not here
    processor = load_processor(src, key="prism-tiny --like", chat_template="chatml")
    config = shrink_config(AutoConfig.from_pretrained(src), hidden, layers)
    torch.manual_seed(seed)
    model = getattr(transformers, fam.model_class)(config)
    if (src / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(src)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    for name in LIKE_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, out / name)
    if not (out / "tokenizer.json").is_file():  # loads in a fraction of a second, where vocab + merges take seconds
        processor.tokenizer.backend_tokenizer.save(str(out / "tokenizer.json"))
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="prism-tiny", description="Build a tiny random Qwen-VL model offline.")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--like", metavar="DIR", help="a real checkpoint's folder (config.json, tokenizer and processor "
                   "files; no weights needed): its architecture with tiny sizes, its tokenizer, template and "
                   "settings unchanged")
    p.add_argument("--family", choices=list(FAMILIES), default="qwen3_vl",
                   help="prism's own tiny model of this family (without --like)")
    p.add_argument("--moe", action="store_true", help="Qwen3-VL-MoE with a few experts (= --family qwen3_vl_moe)")
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--hidden", type=int, default=None, help="language-model width (default 128; with --like, "
                   "see prism.models.tiny.like_sizes)")
    p.add_argument("--layers", type=int, default=None, help="language-model layers (default 4; with --like, the "
                   "shortest prefix holding each layer type)")
    p.add_argument("--head-dim", type=int, default=32, help="attention head width (multiple of 8; not with --like)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.like:
        out = build_like(a.like, a.out, hidden=a.hidden, layers=a.layers, seed=a.seed)
    else:
        hidden, layers = 128 if a.hidden is None else a.hidden, 4 if a.layers is None else a.layers
        if a.head_dim % 8 or a.head_dim <= 0:
            p.error("--head-dim must be a positive multiple of 8 (the rotary sections split head_dim / 2 as 2:1:1)")
        if hidden <= 0 or hidden % (2 * a.head_dim):
            p.error("--hidden must be a positive multiple of 2 x --head-dim (at least 2 heads for GQA)")
        out = build_tiny(a.out, moe=a.moe, seed=a.seed, hidden=hidden, layers=layers, experts=a.experts,
                         head_dim=a.head_dim, family=a.family)
    config = transformers.AutoConfig.from_pretrained(out)
    model = transformers.AutoModelForImageTextToText.from_pretrained(out)
    n = sum(p.numel() for p in model.parameters())
    print(f"tiny {family_named(config.model_type, 'prism-tiny').name} written to {out} ({n / 1e6:.2f}M parameters)")
