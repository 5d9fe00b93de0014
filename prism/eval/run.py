"""`prism-eval`: accuracy, perception vs reasoning errors and drift of a model on a data file.

    prism-eval --model runs/rl/checkpoint-000100 --data data/demo/test.jsonl [--samples 4 --temperature 1.0]
               [--reference data/demo/curated.jsonl] [--embed-model runs/tiny-model] [--out results.json]

Greedy decoding gives `greedy/*` metrics (prism.eval.metrics; `--answer-format answer|boxed|either`
reads answers as `reward.answer_format` does in RL, `answer` by default); `--samples k` responses per prompt
at `--temperature` give `sampled/*` (accuracy there is pass@1 averaged over the k samples). Drift
(prism.eval.drift) compares the sampled responses with the reference responses: the assistant
turns of `--reference`, by default those of `--data` itself. An example without an answer key is
scored against the answer of its own reference (assistant) turn; data with neither skips the answer
metrics (with a note) and still reports drift.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Sequence

import torch

from prism.core.config import ModelSettings
from prism.core.errors import ConfigError
from prism.core.example import Example
from prism.core.response import answer_format_valid, check_answer_format
from prism.core.task import Task, load_task
from prism.data.formats import load_examples
from prism.eval.drift import drift_metrics
from prism.eval.metrics import ground_truths, score_responses
from prism.models.loader import load_model
from prism.models.processor import load_processor
from prism.rollout import SamplingParams, sample

log = logging.getLogger("prism.eval")


def evaluate_model(model, processor, examples: Sequence[Example], *, samples: int = 1, temperature: float = 1.0,
                   max_new_tokens: int = 256, chunk_size: int = 64, reference: Sequence[str] | None = None,
                   embed_model=None, task: Task | None = None, backend="native",
                   answer_format: str = "answer") -> dict:
    """All metrics of one model on `examples`; see the module docstring for the keys."""
    check_answer_format(answer_format, "--answer-format")
    has_truth = any(ground_truths(ex, answer_format) for ex in examples)
    out: dict = {"n": len(examples)}
    greedy = sample(model, processor, examples, SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0),
                    chunk_size=chunk_size, backend=backend).texts
    sampled = greedy
    if samples > 0 and temperature > 0:
        sampled = sample(model, processor, examples, SamplingParams(max_new_tokens=max_new_tokens,
                                                                    temperature=temperature, n=samples),
                         chunk_size=chunk_size, backend=backend).texts
    if has_truth:
        out["greedy"] = score_responses(examples, greedy, task, answer_format)
        expanded = [ex for ex in examples for _ in range(len(sampled) // len(examples))]
        out["sampled"] = score_responses(expanded, sampled, task, answer_format)
    else:
        out["note"] = "no ground-truth answers in the data: answer metrics skipped"
        out["sampled"] = {"format_rate": sum(answer_format_valid(t, answer_format) for t in sampled) / len(sampled)}
    if reference:
        out["drift"] = drift_metrics(processor.tokenizer, sampled, reference, embed_model)
    out["examples"] = [{"question": ex.question, "answer": (ground_truths(ex, answer_format) or [None])[0], "greedy": g}
                       for ex, g in list(zip(examples, greedy))[:8]]
    return out


def print_table(result: dict, title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for group in ("greedy", "sampled", "drift"):
        for k, v in result.get(group, {}).items():
            if k != "n":
                table.add_row(f"{group}/{k}", f"{v:.3f}")
    Console().print(table)
    if "note" in result:
        print(f"note: {result['note']}")


def check_flags(a: argparse.Namespace) -> None:
    """ConfigError naming the first flag whose value cannot work."""
    checks = [("--samples", a.samples, a.samples >= 0, "a non-negative integer"),
              ("--temperature", a.temperature, a.temperature >= 0, "a non-negative number"),
              ("--max-new-tokens", a.max_new_tokens, a.max_new_tokens > 0, "a positive integer"),
              ("--chunk-size", a.chunk_size, a.chunk_size > 0, "a positive integer"),
              ("--limit", a.limit, a.limit is None or a.limit > 0, "a positive integer"),
              ("--vllm-gpu-memory-utilization", a.vllm_gpu_memory_utilization,
               0 < a.vllm_gpu_memory_utilization <= 1, "a fraction in (0, 1]"),
              ("--vllm-kv-cache-gb", a.vllm_kv_cache_gb, a.vllm_kv_cache_gb is None or a.vllm_kv_cache_gb > 0,
               "a positive number"),
              ("--vllm-max-model-len", a.vllm_max_model_len, a.vllm_max_model_len is None or a.vllm_max_model_len > 0,
               "a positive integer"),
              ("--image-min-pixels", a.image_min_pixels, a.image_min_pixels is None or a.image_min_pixels > 0,
               "a positive integer"),
              ("--image-max-pixels", a.image_max_pixels, a.image_max_pixels is None or a.image_max_pixels > 0,
               "a positive integer")]
    for flag, value, ok, what in checks:
        if not ok:
            raise ConfigError(f"{flag}: must be {what}, got {value}")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="prism-eval", description="Accuracy, perception/reasoning errors and drift.")
    p.add_argument("--model", required=True, help="model directory (with its processor)")
    p.add_argument("--data", required=True, help="evaluation data (sharegpt / verl / prism)")
    p.add_argument("--samples", type=int, default=1, help="sampled responses per prompt (0: greedy only)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N examples")
    p.add_argument("--chunk-size", "--batch-size", dest="chunk_size", type=int, default=64,
                   help="sequences per generate call")
    p.add_argument("--reference", help="reference responses for drift (default: the assistant turns of --data)")
    p.add_argument("--embed-model", help="fixed model whose hidden states embed responses for the MMD "
                   "(default: --model)")
    p.add_argument("--out", help="JSON output (default: MODEL/eval-<data stem>.json)")
    p.add_argument("--task", help="task whose checks to add (caption accuracy, per-group accuracy): grids, or "
                   "module.path:attribute")
    p.add_argument("--backend", choices=["native", "hf", "vllm"], default="native",
                   help="rollout backend: native (prism's sampler), hf (transformers generate) or vllm")
    p.add_argument("--vllm-gpu-memory-utilization", type=float, default=0.3,
                   help="--backend vllm: fraction of the GPU's memory the engine may take")
    p.add_argument("--vllm-kv-cache-gb", type=float, default=None,
                   help="--backend vllm: the KV cache's size in GB instead (a CPU engine needs one)")
    p.add_argument("--vllm-max-model-len", type=int, default=None,
                   help="--backend vllm: longest prompt + response in tokens (default: the model's context)")
    p.add_argument("--answer-format", choices=["answer", "boxed", "either"], default="answer",
                   help="where answers are read from: the <answer> tag, the last \\boxed{}, or either "
                   "(as reward.answer_format)")
    p.add_argument("--chat-template", default="auto", help="auto (the checkpoint's), chatml or a Jinja file "
                   "(as model.chat_template; a Thinking checkpoint needs chatml)")
    p.add_argument("--image-min-pixels", type=int, default=None, help="as data.image_min_pixels")
    p.add_argument("--image-max-pixels", type=int, default=None, help="as data.image_max_pixels")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    check_flags(a)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    torch.manual_seed(a.seed)
    task = load_task(a.task, key="--task")
    model_dir = Path(a.model)
    processor = load_processor(model_dir, key="--model", chat_template=a.chat_template, template_key="--chat-template",
                               min_pixels=a.image_min_pixels, max_pixels=a.image_max_pixels)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_model(ModelSettings(path=str(model_dir)), trainable=False, device=device, key="--model").to(device)
    examples = load_examples(a.data, limit=a.limit)
    ref_examples = load_examples(a.reference, limit=a.limit) if a.reference else examples
    reference = [ex.response for ex in ref_examples if ex.response]
    embed = model
    if a.embed_model:
        embed = load_model(ModelSettings(path=a.embed_model), trainable=False, device=device,
                           key="--embed-model").to(device)
    backend = a.backend
    if backend == "vllm":  # one engine for the greedy and the sampled pass
        from prism.core.config import VLLMSettings
        from prism.rollout.engine import make_backend

        kv = None if a.vllm_kv_cache_gb is None else int(a.vllm_kv_cache_gb * 2 ** 30)
        backend = make_backend("vllm", model, processor, a.chunk_size, model_path=str(model_dir),
                               vllm=VLLMSettings(gpu_memory_utilization=a.vllm_gpu_memory_utilization,
                                                 kv_cache_memory_bytes=kv, max_model_len=a.vllm_max_model_len))
    result = evaluate_model(model, processor, examples, samples=a.samples, temperature=a.temperature,
                            max_new_tokens=a.max_new_tokens, chunk_size=a.chunk_size, reference=reference,
                            embed_model=embed, task=task, backend=backend, answer_format=a.answer_format)
    if not reference:
        result["note_drift"] = "no reference responses: drift skipped"
    result.update({"model": str(model_dir), "data": a.data, "samples": a.samples, "temperature": a.temperature,
                   "answer_format": a.answer_format})
    out = Path(a.out) if a.out else model_dir / f"eval-{Path(a.data).stem}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print_table(result, f"{model_dir} on {a.data}")
    print(f"wrote {out}")
    return result
