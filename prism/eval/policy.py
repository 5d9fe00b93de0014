"""Held-out evaluation of the policy during training, sharded over processes: the same for every stage."""

from __future__ import annotations

from typing import Sequence

from accelerate import Accelerator
from accelerate.utils import gather_object

from prism.core.example import Example
from prism.core.rollouts import SamplingParams
from prism.core.task import Task
from prism.eval.metrics import score_responses
from prism.rollout.engine import sample_texts


def evaluate_policy(accelerator: Accelerator, model, processor, examples: Sequence[Example], *,
                    max_new_tokens: int, chunk_size: int, temperature: float = 0.0, task: Task | None = None,
                    prefix: str = "eval/", backend: str = "native", answer_format: str = "answer") -> dict[str, float]:
    """One response per held-out example (greedy, or sampled at `temperature`), sharded over
    processes; answer accuracy, format validity (both under `answer_format`, prism.eval.metrics) and,
    with a task, caption and per-group metrics."""
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature)
    # padded to equal shares (the last index repeated), so that every process runs as many generate
    # calls: under ZeRO-3 / FSDP2 each of their forwards is a collective
    with accelerator.split_between_processes(list(range(len(examples))), apply_padding=True) as mine:
        texts = sample_texts(accelerator.unwrap_model(model), processor, [examples[i] for i in mine], params,
                             chunk_size=chunk_size, backend=backend)
    by_index = dict(zip(gather_object(list(mine)), gather_object(texts)))
    metrics = score_responses(examples, [by_index[i] for i in range(len(examples))], task, answer_format)
    return {f"{prefix}{k}": v for k, v in metrics.items()}


def evaluate(accelerator: Accelerator, model, processor, examples: Sequence[Example], settings,
             task: Task | None = None, answer_format: str = "answer") -> dict[str, float]:
    """Every stage's held-out evaluation (`eval.*` settings): greedy (`eval/...`) and, unless
    `eval.temperature` is 0, one sample per example at that temperature (`eval_sampled/...`).
    `answer_format`: where answers are read from (RL: `reward.answer_format`; SFT, ALIGN: `answer`)."""
    kw = dict(max_new_tokens=settings.max_new_tokens, chunk_size=settings.chunk_size, task=task,
              backend=settings.backend, answer_format=answer_format)
    metrics = evaluate_policy(accelerator, model, processor, examples, **kw)
    if settings.temperature > 0:
        metrics.update(evaluate_policy(accelerator, model, processor, examples, temperature=settings.temperature,
                                       prefix="eval_sampled/", **kw))
    return metrics
