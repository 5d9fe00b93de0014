"""Rollout throughput of the backends on the same prompts and settings: generated tokens per second of
`hf` (transformers' generate, the baseline), `native` and `vllm`, with each one's ratio to hf, measured
in the same run.

    python benchmarks/rollout_backends.py [--model DIR] [--prompts 16 --n 8 --tokens 64] [--backends hf,native,vllm]

Needs vLLM for `vllm` (the test environment: `make setup-vllm`, then
`PYTHONPATH=tests/vllm_backend .venv-vllm/bin/python benchmarks/rollout_backends.py` on a CPU). Without
`--model`, the tiny Qwen3-VL is built in a temporary folder (random weights: an EOS is rare, and the
figure counts the tokens each backend actually generated). Each backend is
warmed up once at the measured batch (vLLM's engine start, ~40 s on a CPU, is reported apart), then
timed over `--repeat` calls. On a GPU also give `--bandwidth-tbs` to print the fraction of the
memory-bandwidth bound of decoding (weights read once per step: tokens/s ≤ batch × bandwidth / bytes).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's prism


def prompts(n: int):
    import numpy as np
    from PIL import Image

    from prism.core.example import Example

    rng = np.random.default_rng(0)
    return [Example(messages=[{"role": "user", "content": f"<image>Describe the grid, then count the red cells ({i})."}],
                    images=[Image.fromarray(rng.integers(0, 255, (96, 96, 3), dtype=np.uint8))]) for i in range(n)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="a Qwen-VL folder (default: the tiny model, built here)")
    p.add_argument("--backends", default="hf,native,vllm")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--kv-cache-gb", type=float, default=0.5, help="vLLM's KV cache (its CPU backend needs a size)")
    p.add_argument("--bandwidth-tbs", type=float, default=None)
    p.add_argument("--out", type=Path)
    a = p.parse_args()
    torch.set_num_threads(a.threads)

    from prism.core.config import ModelSettings, VLLMSettings
    from prism.core.rollouts import SamplingParams
    from prism.models.loader import load_model
    from prism.models.processor import load_processor
    from prism.rollout.engine import make_backend

    model_dir = a.model
    if model_dir is None:
        from prism.models.tiny import build_tiny

        model_dir = str(build_tiny(Path(tempfile.mkdtemp(prefix="prism-bench-")) / "tiny"))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_model(ModelSettings(path=model_dir), trainable=False, device=device)
    processor = load_processor(model_dir)
    examples = prompts(a.prompts)
    params = SamplingParams(n=a.n, temperature=1.0, max_new_tokens=a.tokens)
    weight_bytes = sum(t.numel() * t.element_size() for t in model.parameters())
    rows = []
    for name in [b.strip() for b in a.backends.split(",") if b.strip()]:
        t0 = time.perf_counter()
        backend = make_backend(name, model, processor, chunk_size=a.prompts * a.n,
                               vllm=VLLMSettings(kv_cache_memory_bytes=int(a.kv_cache_gb * 2 ** 30)),
                               model_path=model_dir)
        backend.rollout(examples, params)  # warm-up (and vLLM's first weight sync)
        start_s = time.perf_counter() - t0
        torch.manual_seed(0)
        t0 = time.perf_counter()
        tokens = 0
        for _ in range(a.repeat):
            tokens += int(backend.rollout(examples, params).response_mask.sum())
        seconds = time.perf_counter() - t0
        row = {"backend": name, "tokens_per_s": tokens / seconds, "tokens": tokens, "seconds": seconds,
               "start_and_warmup_s": start_s}
        if a.bandwidth_tbs:
            bound = a.prompts * a.n * a.bandwidth_tbs * 1e12 / weight_bytes
            row["fraction_of_bandwidth_bound"] = row["tokens_per_s"] / bound
        rows.append(row)
        print(f"{name:>6}: {row['tokens_per_s']:8.0f} tokens/s ({tokens} tokens in {seconds:.1f} s; start + warm-up "
              f"{start_s:.1f} s)" + (f", {100 * row['fraction_of_bandwidth_bound']:.1f}% of the bandwidth bound"
                                     if a.bandwidth_tbs else ""), flush=True)
    base = next((r["tokens_per_s"] for r in rows if r["backend"] == "hf"), None)
    if base:
        for r in rows:
            r["ratio_to_hf"] = r["tokens_per_s"] / base
        print("ratio to hf: " + ", ".join(f"{r['backend']} {r['ratio_to_hf']:.2f}x" for r in rows))
    settings = {"device": device, "prompts": a.prompts, "n": a.n, "tokens": a.tokens, "threads": a.threads,
                "model": model_dir}
    if a.out:
        a.out.write_text(json.dumps({"settings": settings, "backends": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
