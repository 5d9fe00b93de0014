"""GPU efficiency of prism's two hot paths on a Qwen3-VL-shaped model with random weights: the SFT step
(model FLOPs utilisation) and rollout generation (tokens per second). Not run in CI: it needs a GPU (the `tiny` size only checks
that the script works).

    python benchmarks/gpu_throughput.py [--size 1.7b] [--attn sdpa|flash_attention_2] [--batch 8 --seq 2048]
    python benchmarks/gpu_throughput.py --size tiny --device cpu     # a smoke run of the script itself

SFT. `--steps` timed steps (after `--warmup`) of prism's SFT step on `--batch` sequences of `--seq`
tokens (an image of `--image-px` pixels square plus text, labels on the text): forward, the summed
token NLL, backward, gradient clipping, fused AdamW — bf16 weights, the vision tower frozen as in
prism's defaults. `--loss chunked` (prism-sft's default, `train.logits_chunk`) takes the final hidden
states and sends only the labelled positions through the output head, a slice at a time
(prism.losses.sft.head_token_nll); `--loss full` is the model's own [B, T, V] logits. `--compile`
compiles each decoder layer as `model.compile=true` does; `--skip-rollout` measures the SFT step only.
MFU = model FLOPs / (step time × peak). Model FLOPs: 6·N per token (N = language-model parameters
without the embedding table: the layers that train), causal attention 6·layers·heads·head_dim·seq per
token (forward 2·, backward 4·, halved for the causal mask), the output head 6·hidden·vocab per
labelled token (the positions whose prediction the loss needs), and the frozen vision tower's forward,
2·N_vision per image patch; recomputation (checkpointing) is not counted. The peak is the dense bf16
figure of the GPU (`--peak-tflops`, or looked up: H100 SXM / H200 989, A100 312).

Rollouts. prism's rollout engine on `--gen-prompts` prompts × `--gen-n` samples, `--gen-tokens` new
tokens each (EOS suppressed so every sequence runs to the end), for each of `--backends` on the same
model and prompts: `native` (prism's sampler), `native+compile` (its compiled decode step, CUDA graphs)
and `hf` (transformers' generate, the baseline of the printed ratios). Generated tokens per second,
the ratio to hf, and the fraction of the memory-bandwidth bound of decoding (every step reads the
weights once: tokens/s ≤ batch × bandwidth / weight bytes), and of the tighter bound that also counts
the KV cache each step must read at least once (mean live length: prompt + half the response), which
dominates at large batches. `--skip-sft` measures rollouts only.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0}
BANDWIDTH_TBS = {"H100": 3.35, "H200": 4.8, "A100": 2.0, "L40S": 0.86}
# hidden, layers, heads, kv heads, head dim, intermediate
SIZES = {"tiny": (128, 4, 4, 2, 32, 256), "0.6b": (1024, 28, 16, 8, 128, 3072), "1.7b": (2048, 28, 16, 8, 128, 6144),
         "4b": (2560, 36, 32, 8, 128, 9728)}


def build(size: str, device: str, attn: str):
    """A random Qwen3-VL of the given shape, and a processor for it (prism's tiny tokenizer + a patch-16
    image processor): the vocabulary rows beyond the tokenizer are simply never sampled from prompts."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from prism.models.processor import build_processor
    from prism.models.tiny import CHAT_TEMPLATE, QWEN_SPECIAL_TOKENS, build_tokenizer

    tokenizer = build_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    h, layers, heads, kv, hd, inter = SIZES[size]
    text = dict(vocab_size=151936 if size != "tiny" else 640, hidden_size=h, intermediate_size=inter,
                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv, head_dim=hd,
                max_position_embeddings=32768, pad_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                # the (temporal, height, width) rotary sections sum to head_dim / 2, as Qwen3-VL's [24, 20, 20] of 64
                rope_parameters={"rope_type": "default", "rope_theta": 5e6,
                                 "mrope_section": [hd * 3 // 16, hd * 5 // 32, hd * 5 // 32], "mrope_interleaved": True})
    big = size != "tiny"
    vision = dict(depth=24 if big else 2, hidden_size=1024 if big else 64, intermediate_size=4096 if big else 128,
                  num_heads=16 if big else 2, patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
                  out_hidden_size=h, num_position_embeddings=2304, deepstack_visual_indexes=[5, 11, 17] if big else [0])
    cfg = Qwen3VLConfig(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                        vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False)
    cfg._attn_implementation = attn
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.device(device):
        model = Qwen3VLForConditionalGeneration(cfg).to(dtype)
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    image_processor = Qwen2VLImageProcessorPil(patch_size=16, merge_size=2, temporal_patch_size=2,
                                              size={"shortest_edge": 32 * 32, "longest_edge": 1024 * 1024})
    processor = build_processor(Qwen3VLProcessor, image_processor, tokenizer, None, CHAT_TEMPLATE)
    return model, cfg, processor


def synthetic_batch(cfg, batch: int, seq: int, image_px: int, device: str) -> dict:
    """`batch` rows of [vision_start, image tokens, vision_end, text]: labels on the text."""
    patch, merge = cfg.vision_config.patch_size, cfg.vision_config.spatial_merge_size
    grid = image_px // patch
    n_img = (grid // merge) ** 2
    ids = torch.randint(0, 500, (batch, seq), device=device)  # ordinary tokens of the tokenizer
    ids[:, 0] = cfg.vision_start_token_id
    ids[:, 1:1 + n_img] = cfg.image_token_id
    ids[:, 1 + n_img] = cfg.vision_end_token_id
    mm = torch.zeros_like(ids, dtype=torch.int32)
    mm[:, 1:1 + n_img] = 1
    labels = ids.clone()
    labels[:, :2 + n_img] = -100
    c = cfg.vision_config
    pixels = torch.randn(batch * grid * grid, 3 * c.temporal_patch_size * patch * patch, device=device)
    thw = torch.tensor([[1, grid, grid]] * batch, device=device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "mm_token_type_ids": mm, "labels": labels,
            "pixel_values": pixels, "image_grid_thw": thw, "_image_tokens": n_img}


def params_of(model) -> tuple[float, float]:
    """(language-model parameters without the embedding table and output head, vision parameters)."""
    lm = sum(p.numel() for n, p in model.named_parameters() if "language_model" in n and "embed" not in n)
    vision = sum(p.numel() for n, p in model.named_parameters() if ".visual." in f".{n}")
    return float(lm), float(vision)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def sft_mfu(model, cfg, a) -> dict:
    from prism.losses.sft import head_token_nll, shifted_token_nll
    from prism.models.loader import compile_layers, freeze
    from prism.models.logprobs import final_hidden_states, output_head

    freeze(model, vision=True, projector=True)
    if a.compile:
        compile_layers(model)  # as model.compile=true
    if a.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=a.device == "cuda")
    batch = synthetic_batch(cfg, a.batch, a.seq, a.image_px, a.device)
    n_img = batch.pop("_image_tokens")
    labels = batch.pop("labels")
    times = []
    for i in range(a.warmup + a.steps):
        sync(a.device)
        t0 = time.perf_counter()
        with torch.autocast(a.device, dtype=torch.bfloat16, enabled=a.device == "cuda"):
            if a.loss == "chunked":
                nll, n = head_token_nll(final_hidden_states(model, batch), output_head(model), labels, a.logits_chunk)
            else:
                nll, n = shifted_token_nll(model(**batch).logits, labels)
        (nll / n).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(a.device)
        if i >= a.warmup:
            times.append(time.perf_counter() - t0)
    lm, vision = params_of(model)
    t = cfg.text_config
    tokens, labelled = a.batch * a.seq, int((labels[:, 1:] != -100).sum())
    patches = a.batch * n_img * cfg.vision_config.spatial_merge_size ** 2
    flops = (tokens * (6 * lm + 6 * t.num_hidden_layers * t.num_attention_heads * t.head_dim * a.seq)
             + labelled * 6 * t.hidden_size * t.vocab_size + patches * 2 * vision)
    step = sorted(times)[len(times) // 2]
    return {"step_s": step, "tokens_per_s": tokens / step, "model_tflops": flops / step / 1e12,
            "lm_params_b": lm / 1e9, "peak_mem_gb": torch.cuda.max_memory_allocated() / 2 ** 30 if a.device == "cuda" else float("nan")}


def rollout_throughput(model, processor, a, backend_name: str) -> dict:
    """prism's rollout engine on synthetic image + question prompts (random weights: EOS almost never sampled)."""
    import numpy as np
    from PIL import Image

    from prism.core.example import Example
    from prism.rollout.engine import SamplingParams, make_backend

    rng = np.random.default_rng(0)
    examples = [Example(messages=[{"role": "user", "content": "<image>Describe the picture, then count the red cells."}],
                        images=[Image.fromarray(rng.integers(0, 255, (a.image_px, a.image_px, 3), dtype=np.uint8))])
                for _ in range(a.gen_prompts)]
    model.eval()
    name, _, extra = backend_name.partition("+")
    backend = make_backend(name, model, processor, a.gen_prompts * a.gen_n, compile=extra == "compile")
    # warm-up at the measured batch size (the compiled step compiles / records its graphs here)
    backend.rollout(examples, SamplingParams(n=a.gen_n, temperature=1.0, max_new_tokens=8))
    sync(a.device)
    t0 = time.perf_counter()
    r = backend.rollout(examples, SamplingParams(n=a.gen_n, temperature=1.0, max_new_tokens=a.gen_tokens))
    sync(a.device)
    seconds = time.perf_counter() - t0
    tokens = int(r.response_lengths.sum())
    text = model.config.text_config
    kv_per_token = 2 * text.num_hidden_layers * text.num_key_value_heads * text.head_dim * 2  # K and V, bf16
    live = float(r.prompt["attention_mask"].sum(1).float().mean()) + a.gen_tokens / 2
    kv_gb = len(r) * live * kv_per_token / 2 ** 30  # KV bytes one decode step reads, on average
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    if extra == "compile" and not getattr(backend, "compile", False):
        print(f"rollouts [{backend_name}]: compiling failed, the figure below is the eager step's")
    del backend, r
    if a.device == "cuda":
        torch.cuda.empty_cache()
    return {"tokens_per_s": tokens / seconds, "seconds": seconds, "tokens": tokens, "weight_gb": weight_bytes / 2 ** 30,
            "kv_gb": kv_gb}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="1.7b")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--attn", default="sdpa", choices=["sdpa", "flash_attention_2", "eager"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--image-px", type=int, default=448)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--checkpointing", action="store_true")
    p.add_argument("--loss", choices=["chunked", "full"], default="chunked")
    p.add_argument("--logits-chunk", type=int, default=2048)
    p.add_argument("--skip-rollout", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile each decoder layer for the SFT step")
    p.add_argument("--skip-sft", action="store_true")
    p.add_argument("--backends", default="native",
                   help="comma-separated rollout backends: native, native+compile, hf (the fastest is the JSON's headline)")
    p.add_argument("--gen-prompts", type=int, default=16)
    p.add_argument("--gen-n", type=int, default=8)
    p.add_argument("--gen-tokens", type=int, default=512)
    p.add_argument("--peak-tflops", type=float, default=None)
    p.add_argument("--bandwidth-tbs", type=float, default=None)
    p.add_argument("--out", type=Path, help="also write the figures as JSON (for `prism-pipeline report --gpu`)")
    a = p.parse_args()
    name = torch.cuda.get_device_name() if a.device == "cuda" else "cpu"
    peak = a.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in name), float("nan"))
    bw = a.bandwidth_tbs or next((v for k, v in BANDWIDTH_TBS.items() if k in name), float("nan"))
    torch.manual_seed(0)
    model, cfg, processor = build(a.size, a.device, a.attn)
    lm, vision = params_of(model)
    print(f"device {name}; Qwen3-VL-shaped {a.size}: {lm / 1e9:.2f}B language-model + {vision / 1e9:.2f}B vision "
          f"parameters, attention {a.attn}, batch {a.batch} x {a.seq} tokens ({a.image_px}px image each)")
    figures = {"device": name, "size": a.size, "attn": a.attn, "batch": a.batch, "seq": a.seq, "loss": a.loss,
               "checkpointing": a.checkpointing, "compile": a.compile, "peak_tflops": peak}
    if not a.skip_sft:
        try:
            sft = sft_mfu(model, cfg, a)
        except torch.OutOfMemoryError:
            print(f"SFT step: out of GPU memory at batch {a.batch} x {a.seq} (loss {a.loss}, checkpointing "
                  f"{a.checkpointing})")
            figures["sft_oom"] = True
        else:
            mfu = sft["model_tflops"] / peak if not math.isnan(peak) else float("nan")
            print(f"SFT step ({a.loss} loss, checkpointing {a.checkpointing}, compile {a.compile}): "
                  f"{sft['step_s'] * 1000:.0f} ms, "
                  f"{sft['tokens_per_s']:.0f} tokens/s, {sft['model_tflops']:.1f} model TFLOP/s, "
                  f"peak memory {sft['peak_mem_gb']:.1f} GB")
            print(f"SFT MFU: {100 * mfu:.1f}% of {peak:.0f} TFLOP/s bf16 peak")
            figures.update(sft_step_s=sft["step_s"], sft_tokens_per_s=sft["tokens_per_s"], sft_mfu=mfu,
                           sft_peak_mem_gb=sft["peak_mem_gb"])
    if not a.skip_rollout:
        rows = []
        for backend_name in [b.strip() for b in a.backends.split(",") if b.strip()]:
            gen = rollout_throughput(model, processor, a, backend_name)
            bound = (a.gen_prompts * a.gen_n * bw * 1e12 / (gen["weight_gb"] * 2 ** 30) if not math.isnan(bw)
                     else float("nan"))
            kv_bound = bound * gen["weight_gb"] / (gen["weight_gb"] + gen["kv_gb"])
            rows.append({"backend": backend_name, "tokens_per_s": gen["tokens_per_s"], "seconds": gen["seconds"],
                         "fraction_of_bandwidth_bound": gen["tokens_per_s"] / bound,
                         "fraction_of_weights_kv_bound": gen["tokens_per_s"] / kv_bound})
            print(f"rollouts [{backend_name}]: {gen['tokens']} tokens in {gen['seconds']:.1f} s = "
                  f"{gen['tokens_per_s']:.0f} tokens/s ({a.gen_prompts * a.gen_n} sequences); bandwidth bound "
                  f"{bound:.0f} tokens/s -> {100 * gen['tokens_per_s'] / bound:.1f}% of it; with the KV reads "
                  f"({gen['kv_gb']:.1f} GB a step) {kv_bound:.0f} tokens/s -> "
                  f"{100 * gen['tokens_per_s'] / kv_bound:.1f}%", flush=True)
        base = next((r["tokens_per_s"] for r in rows if r["backend"] == "hf"), None)
        if base:
            for r in rows:
                r["ratio_to_hf"] = r["tokens_per_s"] / base
            print("rollouts, ratio to hf: " + ", ".join(f"{r['backend']} {r['ratio_to_hf']:.2f}x" for r in rows))
        head = max(rows, key=lambda r: r["tokens_per_s"])
        figures.update(rollout_backend=head["backend"], rollout_sequences=a.gen_prompts * a.gen_n,
                       rollout_tokens_per_s=head["tokens_per_s"],
                       rollout_fraction_of_bandwidth_bound=head["fraction_of_bandwidth_bound"], rollouts=rows)
    if a.out:
        a.out.write_text(json.dumps(figures, indent=2) + "\n")

if __name__ == "__main__":
    main()
