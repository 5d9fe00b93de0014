"""Stage 1 — SFT: next-token loss on the assistant tokens of demonstrations (docs/design.md §3).

    prism-sft --config configs/sft/demo.yaml [optim.lr=2e-4 data.train=... ...]
    accelerate launch --config_file configs/accelerate/ddp.yaml -m prism.sft.train --config ...

The loop, top to bottom: build the pieces (accelerator, processor, data, model, optimizer,
scheduler), resume if a checkpoint exists, then for each optimizer step: collate the step's
micro-batches (ahead of the step in `data.num_workers` loader processes, prism.data.loader; with
`train.padding_free`, each packed into one row without padding), normalise
by the step's token count over all micro-batches and processes (so accumulation and data
parallelism give the same update as one big batch), backward, clip, step; log, evaluate and
checkpoint on schedule.

Data order is a pure function of (seed, step): each epoch is a seeded permutation, each optimizer
step takes the next `grad_accum` global micro-batches of it, each process its slice. Resuming
therefore needs only the step number, and the loss sequence of a resumed run matches the
uninterrupted one exactly.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import time

import torch

from prism.checkpoint import restore_optimizer, save_policy_checkpoint
from prism.core.batching import token_budget_batches
from prism.core.config import load_config
from prism.core.example import IGNORE_INDEX, Example
from prism.core.task import load_task
from prism.data.collate import SFTCollator
from prism.data.corpus import Corpus
from prism.data.loader import step_loader
from prism.data.order import batch_indices
from prism.data.packing import pack, sequences_apart
from prism.dist import ModelUpdate, optimizer_from_config, prepare, reduce_sum
from prism.eval.policy import evaluate
from prism.loop.run import (
    check_enough,
    claim_output_dir,
    close_run,
    end_step,
    load_eval_data,
    names_last_checkpoint,
    open_logs,
    setup_run,
    stage_processor,
)
from prism.losses.sft import head_token_nll, shifted_token_nll
from prism.models.loader import load_model
from prism.models.logprobs import final_hidden_states, output_head
from prism.sft.config import SFTConfig

log = logging.getLogger("prism.sft")


def load_train_data(cfg: SFTConfig, processor, accelerator=None) -> tuple[Corpus, list[int]]:
    """Demonstrations no longer than data.max_length tokens (a `Corpus`: `len()`, `data[i]` -> Example),
    and their lengths. Parsed, validated and measured once into an on-disk cache (prism.data.corpus):
    the main process builds it first, the others then load it (`accelerator.main_process_first()`)."""
    with accelerator.main_process_first() if accelerator is not None else contextlib.nullcontext():
        corpus = Corpus.build_or_load(cfg.data.train, processor, format=cfg.data.format,
                                      max_length=cfg.data.max_length, skip_bad=cfg.data.skip_bad,
                                      num_proc=cfg.data.num_workers or None)
    return corpus, corpus.lengths.tolist()


def split_by_budget(rows: list[int], lengths: list[int], budget: int | None) -> list[list[int]]:
    """A micro-batch's example indices, split into forwards of at most `budget` padded tokens (or kept whole)."""
    if not budget:
        return [rows]
    return [[rows[j] for j in part] for part in token_budget_batches([lengths[i] for i in rows], budget)]


def step_batches(cfg: SFTConfig, collate, data: list[Example], lengths: list[int], step: int, world: int,
                 rank: int) -> list[dict[str, torch.Tensor]]:
    """The collated forwards of optimizer step `step` on this process: its `grad_accum` micro-batches of the
    seeded order (`prism.data.order`), each split by `train.micro_token_budget`."""
    t = cfg.train
    return [collate([data[i] for i in rows]) for m in range(t.grad_accum) for rows in split_by_budget(
        batch_indices(len(data), (step - 1) * t.grad_accum + m, t.micro_batch_size, world, rank, t.seed),
        lengths, t.micro_token_budget)]


def token_nll(cfg: SFTConfig, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed next-token NLL of one forward's labelled tokens (docs/design.md §3)."""
    labels = batch.pop("labels")
    if cfg.train.logits_chunk:
        nll, _ = head_token_nll(final_hidden_states(model, batch), output_head(model), labels, cfg.train.logits_chunk)
    else:
        nll, _ = shifted_token_nll(model(**batch).logits, labels)
    return nll


@names_last_checkpoint
def train(cfg: SFTConfig) -> dict:
    # --- build -----------------------------------------------------------------------------
    accelerator, out = setup_run(cfg)
    world, rank = accelerator.num_processes, accelerator.process_index
    task = load_task(cfg.data.task)
    processor = stage_processor(cfg)
    train_data, lengths = load_train_data(cfg, processor, accelerator)
    eval_data = load_eval_data(cfg)
    check_enough(cfg, len(train_data), cfg.train.micro_batch_size, "train.micro_batch_size", world, "examples")
    collate = SFTCollator(processor, cfg.data.max_length)

    resume_from = claim_output_dir(cfg, accelerator, out)
    model = load_model(cfg.model, trainable=True, device=accelerator.device, init_from=resume_from)
    optimizer, scheduler = optimizer_from_config(cfg, [p for p in model.parameters() if p.requires_grad])
    model, optimizer, params = prepare(accelerator, model, optimizer, cfg.train.micro_batch_size)
    update = ModelUpdate(accelerator, model, optimizer, params, cfg.optim.max_grad_norm,
                         max_change=cfg.optim.max_param_change, name="model")

    start = 0
    if resume_from is not None:
        start = restore_optimizer(resume_from, optimizer, scheduler, rank, model=model,
                                  lr=cfg.optim.lr)["step"]
    tracker, bar = open_logs(cfg, accelerator, out, start, "sft")
    metrics: dict[str, float] = {}

    # --- loop ------------------------------------------------------------------------------
    model.train()
    # each step's collated micro-batches, built ahead by data.num_workers loader processes (or here)
    batches = step_loader(functools.partial(step_batches, cfg, collate, train_data, lengths, world=world, rank=rank),
                          start + 1, cfg.train.max_steps, cfg.data.num_workers, cfg.data.prefetch)
    for step in range(start + 1, cfg.train.max_steps + 1):
        t0 = time.perf_counter()
        micro = next(batches)
        t_data = time.perf_counter() - t0
        # the step's labelled tokens over all micro-batches and processes normalise every micro-batch's loss
        n_tokens = int(reduce_sum(accelerator, sum((b["labels"][:, 1:] != IGNORE_INDEX).sum() for b in micro)))
        nll_total = torch.zeros((), device=accelerator.device)
        for m, batch in enumerate(micro):
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            apart = contextlib.nullcontext()
            if cfg.train.padding_free:
                batch = pack(accelerator.unwrap_model(model), batch)
                apart = sequences_apart(accelerator.unwrap_model(model), batch)  # Qwen3.5's recurrent layers
            with update.micro_batch(last=m == len(micro) - 1), apart:
                nll = token_nll(cfg, model, batch)
                update.backward(nll / n_tokens)
            nll_total += nll.detach()
        loss = reduce_sum(accelerator, nll_total) / n_tokens
        grad_norm = update.step(step, loss=loss)
        scheduler.step()

        metrics = {"train/loss": loss, "train/grad_norm": grad_norm, "train/lr": scheduler.get_last_lr()[0],
                   "train/tokens": n_tokens, "train/step_seconds": time.perf_counter() - t0,
                   "train/data_seconds": t_data,
                   "train/epoch": (step * cfg.train.grad_accum * cfg.train.micro_batch_size * world) / len(train_data)}
        end_step(cfg, step, metrics, tracker,
                 evaluate=(lambda: evaluate(accelerator, model, processor, eval_data, cfg.eval, task)) if eval_data else None,
                 save=lambda: save_policy_checkpoint(cfg, accelerator, step, model, processor, optimizer, scheduler,
                                                     {"metrics": metrics}))
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", **{k[5:]: f"{v:.3f}" for k, v in metrics.items() if k.startswith("eval/")})

    close_run(accelerator, tracker, bar)
    return metrics


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="prism-sft", description="Stage 1: supervised fine-tuning (docs/design.md §3).")
    p.add_argument("--config", help="YAML config (see configs/sft/)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=2e-4 train.max_steps=10")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    cfg = load_config(SFTConfig, a.config, a.overrides)
    metrics = train(cfg)
    if metrics and "eval/accuracy" in metrics:
        print(f"held-out ({cfg.data.eval}, n={int(metrics['eval/n'])}): "
              f"answer accuracy {metrics['eval/accuracy']:.3f} | format validity {metrics['eval/format_rate']:.3f}"
              + (f" | caption exact match {metrics['eval/caption_match']:.3f}" if "eval/caption_match" in metrics else "")
              + f" | final train loss {metrics['train/loss']:.4f}")
    elif not metrics:
        print(f"nothing to do: {cfg.train.output_dir} already holds a checkpoint at train.max_steps={cfg.train.max_steps}")
    return metrics


if __name__ == "__main__":
    main()
