"""Peak memory per phase of an RL / ALIGN step on the tiny model, and the projection for a 4B policy + 2B
discriminator on 8 x 80 GB GPUs (the paper's setting).

    OMP_NUM_THREADS=1 python benchmarks/memory_report.py [--batch 8 --group 8 --max-new-tokens 128]

Measured. One step's phases run one after the other on the tiny Qwen3-VL: generation (the rollout
engine), old log-probs (no gradients, chunked), the policy update (forward + backward + AdamW), the
discriminator scoring and its update. On a GPU each phase reports torch.cuda.max_memory_allocated
above the memory held before it; on the CPU, the peak resident set size above the phase's starting
RSS, sampled every millisecond (an upper bound: it includes allocator caching).

Projected. Analytic bytes for the model sizes below under bf16 weights, fp32 AdamW states (+ fp32
master weights), ZeRO-2 over `--gpus` processes (optimizer states and gradients sharded), gradient
checkpointing (one hidden state per layer kept, one layer's activations live), prism's token-sliced
output head (`--logits-chunk` tokens of fp32 logits at a time) and a bf16 KV cache for generation.
The architecture numbers are the public Qwen3-VL-4B / 2B configurations; the figure is a planning
estimate, not a measurement.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import json
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import psutil
import torch

GB = 1024 ** 3

# name: (parameters, layers, hidden, kv_heads, head_dim, vocab)
SIZES = {
    "Qwen3-VL-4B policy": (4.4e9, 36, 2560, 8, 128, 151936),
    "Qwen3-VL-2B discriminator": (2.1e9, 28, 2048, 8, 128, 151936),
}


@contextmanager
def peak(name: str, results: dict):
    """Peak memory above the starting point while the block runs (see module doc)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        yield
        torch.cuda.synchronize()
        results[name] = (torch.cuda.max_memory_allocated() - start) / GB
        return
    proc = psutil.Process()
    start = proc.memory_info().rss
    top = [start]
    done = threading.Event()

    def sample():
        while not done.is_set():
            top[0] = max(top[0], proc.memory_info().rss)
            time.sleep(0.001)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        yield
    finally:
        done.set()
        t.join()
        results[name] = (top[0] - start) / GB


def measure(a) -> dict[str, float]:
    from prism.align.config import AlignConfig
    from prism.align.discriminator import MoEDiscriminator
    from prism.align.game import discriminator_player, discriminator_update
    from prism.core.config import ModelSettings, load_config
    from prism.data.formats import load_examples
    from prism.dist import ModelUpdate, make_accelerator, prepare
    from prism.loop.policy_update import policy_update
    from prism.models.loader import load_model
    from prism.models.logprobs import token_log_probs
    from prism.models.processor import load_processor
    from prism.models.tiny import build_tiny
    from prism.rollout import HFBackend, SamplingParams
    from prism.tasks.grids.generator import SynthConfig, generate

    work = Path(tempfile.mkdtemp(prefix="prism-mem-"))
    model_dir = build_tiny(work / "model")
    generate(SynthConfig(out=str(work / "data"), n=64, n_align=a.batch, seed=0))
    cfg = load_config(AlignConfig, None, [f"rollout.group_size={a.group}", "algo.micro_batch_size=16",
                                          "algo.ppo_epochs=1", "algo.mini_batches=2"])
    acc = make_accelerator()
    processor = load_processor(model_dir)
    prompts = load_examples(work / "data" / "align.jsonl", limit=a.batch)
    model = load_model(ModelSettings(path=str(model_dir), gradient_checkpointing=a.checkpointing), trainable=True)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    model, opt, params = prepare(acc, model, opt, 16)
    update = ModelUpdate(acc, model, opt, params, max_grad_norm=1.0)
    disc = MoEDiscriminator.from_pretrained(model_dir)
    d_update = discriminator_player(cfg, acc, disc)
    res: dict[str, float] = {}
    torch.manual_seed(0)
    with peak("generation", res):
        rollouts = HFBackend(acc.unwrap_model(model), processor).rollout(
            prompts, SamplingParams(n=a.group, temperature=1.0, max_new_tokens=a.max_new_tokens))
    with peak("old log-probs (no grad)", res), torch.no_grad():
        token_log_probs(model, rollouts, 1.0, chunk_size=16)
    expanded = [ex for ex in prompts for _ in range(a.group)]
    with peak("discriminator scoring", res):
        disc.score(expanded, rollouts.texts)
    adv = torch.randn(len(rollouts))
    with peak("policy update", res):
        policy_update(update, rollouts, adv, cfg.algo, temperature=1.0, logprob_chunk_size=16)
    with peak("discriminator update", res):
        discriminator_update(disc, d_update, cfg, prompts, rollouts.texts, torch.ones(len(rollouts), dtype=torch.bool))
    res["_tokens"] = float(rollouts.response_lengths.sum())
    return res


def project(a) -> list[tuple[str, float]]:
    """Per-GPU GB of the policy (full fine-tuning) and the discriminator (`adapters`: frozen bf16 backbone,
    LoRA r=16 on the 7 projections of every layer + scalar heads, no output head) (see module doc)."""
    rows = []
    seq = a.prompt_tokens + a.response_tokens
    for name, (P, L, H, kv, hd, V) in SIZES.items():
        policy = "policy" in name
        weights = 2 * P  # bf16
        trained = P if policy else 2 * 16 * 7 * L * (H + 4 * H) / 2  # LoRA: r x (in + out) per projection, x 2 experts
        grads = 2 * trained / a.gpus  # ZeRO-2: gradient shards
        optim = (4 + 4 + 4) * trained / a.gpus  # fp32 master + Adam m, v, sharded
        ckpt_acts = L * a.micro_seqs * seq * H * 2  # one bf16 hidden state per layer kept
        layer_acts = 16 * a.micro_seqs * seq * H * 2  # one layer's live activations (~16 x hidden, rough)
        logits = a.logits_chunk * V * 4 * 3 if policy else 0  # fp32 logits, softmax and grad of one head slice
        train = weights + grads + optim + ckpt_acts + layer_acts + logits
        rows += [(f"{name}: weights (bf16)", weights / GB), (f"{name}: gradients (ZeRO-2 shard)", grads / GB),
                 (f"{name}: AdamW + master (ZeRO-2 shard)", optim / GB),
                 (f"{name}: activations, checkpointed ({a.micro_seqs} x {seq} tokens)", (ckpt_acts + layer_acts) / GB)]
        if policy:
            kv_cache = 2 * L * kv * hd * 2 * seq * a.gen_seqs  # generation batch on one GPU
            rows += [(f"{name}: output-head slice ({a.logits_chunk} tokens)", logits / GB),
                     (f"{name}: training peak", train / GB),
                     (f"{name}: generation KV cache ({a.gen_seqs} x {seq} tokens)", kv_cache / GB),
                     (f"{name}: generation peak (weights + KV cache)", (weights + kv_cache) / GB)]
        else:
            rows.append((f"{name}: training peak", train / GB))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--checkpointing", action="store_true", help="gradient checkpointing in the measured policy")
    p.add_argument("--gpus", type=int, default=8)
    p.add_argument("--micro-seqs", type=int, default=2, help="sequences per training micro-batch (projection)")
    p.add_argument("--gen-seqs", type=int, default=32, help="sequences generated at once per GPU (projection)")
    p.add_argument("--prompt-tokens", type=int, default=1024, help="prompt + image tokens (projection)")
    p.add_argument("--response-tokens", type=int, default=8192)
    p.add_argument("--logits-chunk", type=int, default=2048)
    p.add_argument("--out", type=Path, help="also write the figures as JSON (for `prism-pipeline report --memory`)")
    a = p.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    res = measure(a)
    where = "GPU memory allocated" if torch.cuda.is_available() else "CPU resident set size"
    tokens = int(res.pop("_tokens"))
    print(f"measured on the tiny model ({a.batch} prompts x {a.group} rollouts, {tokens} "
          f"response tokens), peak {where} above the phase's start:")
    for k, v in res.items():
        print(f"  {k:32s} {1024 * v:8.1f} MB")
    print(f"\nprojected per GPU, {a.gpus} GPUs, ZeRO-2, bf16, gradient checkpointing "
          f"({a.prompt_tokens} + {a.response_tokens} tokens per sequence):")
    projected = project(a)
    for k, v in projected:
        print(f"  {k:70s} {v:7.1f} GB")
    if a.out:
        a.out.write_text(json.dumps({
            "measured_mb": {k: 1024 * v for k, v in res.items()}, "where": where,
            "measured_setting": f"tiny model, {a.batch} prompts x {a.group} rollouts, {tokens} response tokens",
            "projected_gb": dict(projected),
            "projected_setting": f"{a.gpus} GPUs, ZeRO-2, bf16, gradient checkpointing, {a.prompt_tokens} + "
                                 f"{a.response_tokens} tokens per sequence"}, indent=2) + "\n")


if __name__ == "__main__":
    main()
