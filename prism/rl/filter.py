"""`prism-rl filter`: the difficulty-matched RL subset (docs/design.md §5).

    prism-rl filter --model runs/align/checkpoint-000100 --data data/demo/rl.jsonl --k 8 --band 0,1 \\
                    --max-n 2000 --out data/demo/rl_matched.jsonl

Samples k answers per problem with the given policy (temperature 1 by default), scores them with
the `accuracy` reward, and keeps the problems whose pass rate lies strictly inside the band
(lo < rate < hi): those the policy sometimes solves, where group-relative advantages are non-zero.
Writes sharegpt JSONL with each problem's `pass_rate`, which `prism-rl` reads directly.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

from prism.core.config import ModelSettings
from prism.data.formats import load_examples, save_sharegpt_jsonl
from prism.models.loader import load_model
from prism.models.processor import load_processor
from prism.rewards import accuracy_reward
from prism.rollout import SamplingParams, sample

log = logging.getLogger("prism.rl.filter")


def _band(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--band: expected LO,HI such as 0,1, got {text!r}") from None
    if not 0 <= lo < hi <= 1:
        raise argparse.ArgumentTypeError(f"--band: need 0 <= LO < HI <= 1, got {text!r}")
    return lo, hi


def pass_rates(model, processor, examples, k: int, params: SamplingParams, chunk: int,
               backend: str = "native") -> list[float]:
    """Fraction of k samples whose <answer> is correct (any of the example's answers), per example."""
    rates = []
    for i in range(0, len(examples), max(1, chunk // k)):
        batch = examples[i: i + max(1, chunk // k)]
        texts = sample(model, processor, batch, params, chunk_size=chunk, backend=backend).texts
        correct = torch.tensor(accuracy_reward(texts, [ex for ex in batch for _ in range(k)])).view(len(batch), k)
        rates.extend(correct.mean(1).tolist())
    return rates


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="prism-rl filter", description="Keep problems whose pass rate is inside a band.")
    p.add_argument("--model", required=True, help="policy directory (the aligned or SFT checkpoint)")
    p.add_argument("--data", required=True, help="problems with ground-truth answers")
    p.add_argument("--out", required=True, help="output sharegpt JSONL")
    p.add_argument("--k", type=int, default=8, help="samples per problem")
    p.add_argument("--band", type=_band, default=(0.0, 1.0), help="LO,HI: keep LO < pass rate < HI")
    p.add_argument("--max-n", type=int, default=2000, help="keep at most this many problems")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--chunk-size", type=int, default=64, help="sequences per generate call")
    p.add_argument("--backend", choices=["native", "hf"], default="native", help="rollout backend")
    p.add_argument("--chat-template", default="auto", help="as model.chat_template (auto, chatml or a file)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.k < 1 or a.max_n < 1:
        p.error("--k and --max-n must be >= 1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    torch.manual_seed(a.seed)
    examples = load_examples(a.data, require_answer=True)
    processor = load_processor(a.model, key="--model", chat_template=a.chat_template, template_key="--chat-template")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_model(ModelSettings(path=a.model), trainable=False, device=device, key="--model").to(device)
    params = SamplingParams(n=a.k, temperature=a.temperature, max_new_tokens=a.max_new_tokens)
    rates = pass_rates(model, processor, examples, a.k, params, a.chunk_size, a.backend)
    lo, hi = a.band
    kept = []
    for ex, rate in zip(examples, rates):
        if lo < rate < hi and len(kept) < a.max_n:
            ex.meta = {**ex.meta, "pass_rate": rate}
            kept.append(ex)
    summary = {"problems": len(examples), "kept": len(kept), "band": [lo, hi], "k": a.k,
               "mean_pass_rate": sum(rates) / len(rates), "solved_all": sum(r == 1 for r in rates),
               "solved_none": sum(r == 0 for r in rates)}
    if kept:
        save_sharegpt_jsonl(kept, a.out)
        Path(a.out).with_suffix(".summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"prism-rl filter: kept {len(kept)} of {len(examples)} problems with {lo} < pass rate < {hi} "
          f"(k={a.k}; mean pass rate {summary['mean_pass_rate']:.3f}, {summary['solved_all']} always solved, "
          f"{summary['solved_none']} never)" + ("" if kept else f"; nothing written to {a.out}"))
    return summary
