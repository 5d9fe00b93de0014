"""Sparse upcycling (Komatsuzaki et al. 2023): a dense Qwen3-VL becomes a Qwen3-VL-MoE.

    prism-align upcycle --model runs/tiny-model --experts 4 --top-k 2 --noise 0.01 --out runs/tiny-moe-disc

Every language-model MLP is copied into E experts (plus `noise` × its std of Gaussian noise, so the
experts can drift apart under training) behind a new top-k router; everything else is copied
unchanged. Qwen3-VL-MoE renormalises the top-k routing weights to sum to one, so with zero noise
every token's MLP output is exactly the dense one: the upcycled model starts where the dense
model is, whatever the router does.
"""

from __future__ import annotations

import argparse
import re
import shutil
from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText, Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration

from prism.models.loader import check_model_dir

_MLP = re.compile(r"^(.*language_model\.layers\.\d+\.mlp)\.(gate_proj|up_proj|down_proj)\.weight$")


def moe_config(dense_config, experts: int, top_k: int, aux_loss_coef: float = 0.001) -> Qwen3VLMoeConfig:
    text = dense_config.text_config.to_dict()
    for k in ("model_type", "architectures", "transformers_version", "dtype"):
        text.pop(k, None)
    text.update(num_experts=experts, num_experts_per_tok=top_k, moe_intermediate_size=text["intermediate_size"],
                decoder_sparse_step=1, mlp_only_layers=[], router_aux_loss_coef=aux_loss_coef)
    vision = dense_config.vision_config.to_dict()
    for k in ("model_type", "architectures", "transformers_version", "dtype"):
        vision.pop(k, None)
    ids = {k: getattr(dense_config, k) for k in ("image_token_id", "video_token_id", "vision_start_token_id",
                                                 "vision_end_token_id")}
    return Qwen3VLMoeConfig(text_config=text, vision_config=vision,
                            tie_word_embeddings=dense_config.tie_word_embeddings, **ids)


@torch.no_grad()
def upcycle(dense: torch.nn.Module, experts: int = 4, top_k: int = 2, noise: float = 0.01,
            seed: int = 0) -> Qwen3VLMoeForConditionalGeneration:
    """A Qwen3-VL-MoE whose experts are (noisy) copies of `dense`'s language-model MLPs."""
    if dense.config.model_type != "qwen3_vl":
        raise ValueError(f"upcycling needs a dense Qwen3-VL (model_type qwen3_vl), got {dense.config.model_type}")
    if not 1 <= top_k <= experts:
        raise ValueError(f"--top-k must be between 1 and --experts={experts}, got {top_k}")
    gen = torch.Generator().manual_seed(seed)
    config = moe_config(dense.config, experts, top_k)
    moe = Qwen3VLMoeForConditionalGeneration(config).to(dense.dtype)
    target = moe.state_dict()
    mlps: dict[str, dict[str, torch.Tensor]] = {}
    for name, w in dense.state_dict().items():
        if m := _MLP.match(name):
            mlps.setdefault(m.group(1), {})[m.group(2)] = w
        elif name in target:
            target[name].copy_(w)
        else:
            raise ValueError(f"no place for dense weight {name} in the MoE model")

    def copies(w: torch.Tensor) -> torch.Tensor:
        out = w.unsqueeze(0).repeat(experts, *([1] * w.dim()))
        if noise > 0:
            out += noise * w.float().std() * torch.randn(out.shape, generator=gen).to(w.dtype)
        return out

    for prefix, w in mlps.items():
        target[f"{prefix}.experts.gate_up_proj"].copy_(copies(torch.cat([w["gate_proj"], w["up_proj"]], 0)))
        target[f"{prefix}.experts.down_proj"].copy_(copies(w["down_proj"]))
        router = target[f"{prefix}.gate.weight"]
        router.copy_(torch.randn(router.shape, generator=gen) * config.text_config.initializer_range)
    moe.load_state_dict(target)
    moe.generation_config = dense.generation_config
    return moe


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(prog="prism-align upcycle", description="Sparse-upcycle a dense Qwen3-VL into a "
                                "Qwen3-VL-MoE (the `upcycled` discriminator backbone).")
    p.add_argument("--model", required=True, help="dense Qwen3-VL directory")
    p.add_argument("--out", required=True)
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--noise", type=float, default=0.01, help="expert noise, in units of each weight's std")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    src = check_model_dir(a.model, key="--model")
    dense = AutoModelForImageTextToText.from_pretrained(src, use_safetensors=True)
    try:
        moe = upcycle(dense, a.experts, a.top_k, a.noise, a.seed)
    except ValueError as e:
        p.error(str(e))
    out = Path(a.out)
    moe.save_pretrained(out, safe_serialization=True)
    for f in src.iterdir():  # the processor: tokenizer, image processor, chat template
        if f.is_file() and f.name not in ("config.json", "generation_config.json") and not f.name.endswith(
                (".safetensors", ".safetensors.index.json")):
            shutil.copy2(f, out / f.name)
    print(f"upcycled {src} into a {a.experts}-expert top-{a.top_k} Qwen3-VL-MoE at {out}")
    return out
