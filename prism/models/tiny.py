"""Tiny random Qwen3-VL (dense or MoE) built offline, for tests and the demo.

`prism-tiny --out DIR [--moe]` writes a directory that the stock Auto classes reload:

    AutoModelForImageTextToText.from_pretrained(DIR)      # Qwen3VLForConditionalGeneration
    prism.models.load_processor(DIR)                       # AutoProcessor where torchvision exists

Nothing is downloaded: the tokenizer is a byte-level BPE trained here with `tokenizers` on a small
corpus of the synthetic task's vocabulary plus generic English, with Qwen's special tokens in
Qwen's order, and the weights are random.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen3VLConfig, Qwen3VLForConditionalGeneration
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from prism.models.processor import build_processor

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

# A Qwen-style ChatML template. The assistant turn sits inside {% generation %} so that
# `apply_chat_template(..., return_assistant_tokens_mask=True)` marks exactly the tokens a model
# must learn to produce, closing <|im_end|> included. Images are content parts of type "image".
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}"
    "{%- set parts = [{'type': 'text', 'text': message['content']}] -%}"
    "{%- else -%}{%- set parts = message['content'] -%}{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{% generation %}{%- for part in parts -%}{{- part['text'] -}}{%- endfor -%}"
    "{{- '<|im_end|>' -}}{% endgeneration %}"
    "{%- else -%}"
    "{%- for part in parts -%}"
    "{%- if part['type'] == 'image' or 'image' in part -%}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] == 'video' or 'video' in part -%}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- else -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}{{- '<|im_end|>' -}}"
    "{%- endif -%}"
    "{{- '\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

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
                head_dim: int = 32):
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
    if moe:
        text.update(num_experts=experts, num_experts_per_tok=2, moe_intermediate_size=hidden,
                    decoder_sparse_step=1, router_aux_loss_coef=0.001)
    vision = dict(
        depth=2, hidden_size=64, intermediate_size=128, num_heads=2,
        patch_size=8, spatial_merge_size=2, temporal_patch_size=2,  # must match the image processor
        out_hidden_size=hidden,  # the merger projects vision features to the LM width
        # Learned position embeddings on an 8x8 grid, interpolated to the image; must be a square.
        num_position_embeddings=64,
        # DeepStack: features of vision block 0 are added to the first LM layer's hidden states.
        deepstack_visual_indexes=[0],
    )
    common = dict(
        text_config=text, vision_config=vision, tie_word_embeddings=True,
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    if moe:
        from transformers import Qwen3VLMoeConfig
        return Qwen3VLMoeConfig(**common)
    return Qwen3VLConfig(**common)


def build_tiny(out: str | Path, moe: bool = False, seed: int = 0, hidden: int = 128, layers: int = 4,
               experts: int = 4, head_dim: int = 32) -> Path:
    """Build and save a tiny random Qwen3-VL(-MoE) with its tokenizer and processor."""
    from transformers import Qwen3VLProcessor

    out = Path(out)
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(seed=seed)
    config = tiny_config(tokenizer, moe=moe, hidden=hidden, layers=layers, experts=experts, head_dim=head_dim)
    if moe:
        from transformers import Qwen3VLMoeForConditionalGeneration as cls
    else:
        cls = Qwen3VLForConditionalGeneration
    model = cls(config)
    model.generation_config.eos_token_id = config.text_config.eos_token_id
    model.generation_config.pad_token_id = config.text_config.pad_token_id
    video = {"video_processor_type": "Qwen3VLVideoProcessor", "patch_size": 8, "merge_size": 2,
             "temporal_patch_size": 2, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
    processor = build_processor(Qwen3VLProcessor, build_image_processor(), tokenizer, video, CHAT_TEMPLATE)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="prism-tiny", description="Build a tiny random Qwen3-VL offline.")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--moe", action="store_true", help="Qwen3-VL-MoE with a few experts")
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--hidden", type=int, default=128, help="language-model width")
    p.add_argument("--layers", type=int, default=4, help="language-model layers")
    p.add_argument("--head-dim", type=int, default=32, help="attention head width (multiple of 8)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.head_dim % 8 or a.head_dim <= 0:
        p.error("--head-dim must be a positive multiple of 8 (the rotary sections split head_dim / 2 as 2:1:1)")
    if a.hidden <= 0 or a.hidden % (2 * a.head_dim):
        p.error("--hidden must be a positive multiple of 2 x --head-dim (at least 2 heads for GQA)")
    out = build_tiny(a.out, moe=a.moe, seed=a.seed, hidden=a.hidden, layers=a.layers, experts=a.experts,
                     head_dim=a.head_dim)
    n = sum(p.numel() for p in Qwen3VLForConditionalGeneration.from_pretrained(out).parameters()) if not a.moe else None
    print(f"tiny {'Qwen3-VL-MoE' if a.moe else 'Qwen3-VL'} written to {out}" + (f" ({n / 1e6:.2f}M parameters)" if n else ""))
