"""Sampler throughput: transformers' `generate` (the `hf` backend) against prism's native sampler, eager and
with a compiled decode step, on the same prompts and sampling settings, in one run.

    OMP_NUM_THREADS=1 python benchmarks/sampler.py [--prompts 4 --group 4 --max-new-tokens 64 --repeats 3]
                                                   [--no-compile] [--model DIR | --family F] [--out sampler.json]

The tiny random Qwen3-VL (built offline) and synthetic image + question prompts by default, prism's own tiny
model of another family with `--family` (qwen3_5: the native sampler's hybrid step, against the hf backend that
sampled Qwen3.5 before it), or any local Qwen-VL with `--model`. Every backend samples the same B prompts × G
samples at temperature 1, top-p 1, no top-k; each is run once as a warm-up (the compiled step compiles there)
and then `--repeats` times, the best repeat counted. Printed per backend: generated tokens/s (response tokens
up to and including EOS, padding excluded, over wall time of the whole `rollout` call: prompt encoding,
prefill, decoding, detokenisation), milliseconds per decoding position, and for the native sampler the time
of one decode step alone (the eager step next to the compiled one). The last lines give the ratios native / hf.

On a GPU, `benchmarks/gpu_throughput.py --skip-sft --backends native,hf,native+compile` measures tokens/s and the fraction of the
memory-bandwidth bound for a 1.7B model at 128 sequences.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import json
import time
from pathlib import Path

import torch


def _examples(workdir: Path, n: int):
    from prism.data.formats import load_examples
    from prism.tasks.grids.generator import SynthConfig, generate

    data = workdir / "data"
    if not (data / "rl.jsonl").is_file():
        generate(SynthConfig(out=str(data), n=64, n_rl=max(32, n), seed=0))
    return load_examples(str(data / "rl.jsonl"), require_answer=True)[:n]


def _step_time(backend, examples, params, repeats: int) -> float:
    """Mean seconds of one decode step of the native sampler (its `step` module, timed around each call)."""
    seconds: list[float] = []
    forward = backend.step.forward
    compiled = backend._compiled

    def timed(*args):
        t0 = time.perf_counter()
        out = forward(*args)
        seconds.append(time.perf_counter() - t0)
        return out

    if compiled is not None:  # the compiled module: time the calls to it instead
        def timed_compiled(*args):
            t0 = time.perf_counter()
            out = compiled(*args)
            seconds.append(time.perf_counter() - t0)
            return out

        backend._compiled = timed_compiled
    else:
        backend.step.forward = timed
    try:
        for _ in range(repeats):
            backend.rollout(examples, params)
    finally:
        backend.step.forward = forward
        backend._compiled = compiled
    return sum(seconds) / max(len(seconds), 1)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--group", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-compile", action="store_true", help="leave out the compiled decode step")
    p.add_argument("--model", help="a local Qwen-VL directory (default: the tiny model, built once)")
    p.add_argument("--family", default="qwen3_vl", help="the tiny model's family (prism.models.families)")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/sampler-bench"))
    p.add_argument("--out", type=Path, help="write the numbers as JSON")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    from transformers import AutoModelForImageTextToText

    from prism.core.rollouts import SamplingParams
    from prism.models.processor import load_processor
    from prism.models.tiny import build_tiny
    from prism.rollout.engine import HFBackend
    from prism.rollout.native import NativeBackend

    a.workdir.mkdir(parents=True, exist_ok=True)
    model_dir = Path(a.model) if a.model else a.workdir / ("model" if a.family == "qwen3_vl" else f"model-{a.family}")
    if not a.model and not (model_dir / "config.json").is_file():
        build_tiny(model_dir, family=a.family)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForImageTextToText.from_pretrained(model_dir).to(device).eval()
    processor = load_processor(model_dir)
    examples = _examples(a.workdir, a.prompts)
    params = SamplingParams(max_new_tokens=a.max_new_tokens, temperature=1.0, top_p=1.0, top_k=0, n=a.group)
    n = a.prompts * a.group
    backends = {"hf": HFBackend(model, processor, chunk_size=n), "native": NativeBackend(model, processor, n)}
    if not a.no_compile:
        backends["native-compiled"] = NativeBackend(model, processor, n, compile=True)
    print(f"{a.prompts} prompts x {a.group} samples, max {a.max_new_tokens} new tokens, T=1.0, {device}, "
          f"{torch.get_num_threads()} thread(s), model {model_dir}", flush=True)
    results: dict[str, dict] = {}
    for name, backend in backends.items():
        torch.manual_seed(0)
        t0 = time.perf_counter()
        backend.rollout(examples, params)  # warm-up (and, compiled, the compile)
        warmup = time.perf_counter() - t0
        best = None
        for r in range(a.repeats):
            torch.manual_seed(r)
            t0 = time.perf_counter()
            out = backend.rollout(examples, params)
            seconds = time.perf_counter() - t0
            tokens = int(out.response_lengths.sum())
            positions = out.response_ids.shape[1]
            if best is None or tokens / seconds > best["tokens_per_s"]:
                best = {"tokens_per_s": tokens / seconds, "seconds": seconds, "tokens": tokens,
                        "ms_per_position": 1000 * seconds / positions}
        best["warmup_s"] = warmup
        if isinstance(backend, NativeBackend):
            best["decode_step_ms"] = 1000 * _step_time(backend, examples, params, 1)
        results[name] = best
        step = f" | decode step alone {best['decode_step_ms']:.2f} ms" if "decode_step_ms" in best else ""
        print(f"{name:<16} {best['tokens_per_s']:8.0f} tokens/s | {best['ms_per_position']:6.2f} ms per position"
              f"{step} | warm-up call {warmup:.1f} s", flush=True)
    for name in results:
        if name != "hf":
            print(f"throughput ratio {name}/hf: {results[name]['tokens_per_s'] / results['hf']['tokens_per_s']:.2f}")
    if a.out:
        a.out.write_text(json.dumps({"device": device, "prompts": a.prompts, "group": a.group,
                                     "max_new_tokens": a.max_new_tokens, "results": results}, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
