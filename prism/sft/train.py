"""Stage 1 — SFT: next-token loss on the assistant tokens of demonstrations (DESIGN §3).

    prism-sft --config configs/sft/demo.yaml [optim.lr=2e-4 data.train=... ...]
    accelerate launch --config_file configs/accelerate/ddp.yaml -m prism.sft.train --config ...

The loop, top to bottom: build the pieces (accelerator, processor, data, model, optimizer,
scheduler), resume if a checkpoint exists, then for each optimizer step: collate the step's
micro-batches (with `train.padding_free`, each packed into one row without padding), normalise
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
import logging
import time

import torch
from tqdm.auto import tqdm

from prism.checkpoint import resolve_resume
from prism.config import SFTConfig, load_config
from prism.data.collate import SFTCollator, token_length
from prism.data.example import DataError, Example
from prism.data.formats import load_examples
from prism.data.packing import pack
from prism.loop import (NonFiniteLossError, accumulating, backward, check_finite, clip_grad_norm,  # noqa: F401
                        evaluate_policy, make_optimizer, micro_batch_indices, prepare, restore_optimizer,
                        save_policy_checkpoint, setup_run)
from prism.losses.sft import IGNORE_INDEX, head_token_nll, shifted_token_nll
from prism.models.loader import load_model
from prism.models.processor import load_processor
from prism.rollout.batching import token_budget_batches
from prism.rollout.logprobs import final_hidden_states, output_head
from prism.tracking import Tracker

log = logging.getLogger("prism.sft")


def load_train_data(cfg: SFTConfig, processor) -> tuple[list[Example], list[int]]:
    """Demonstrations no longer than data.max_length tokens, and their lengths."""
    examples = load_examples(cfg.data.train, cfg.data.format, require_response=True, skip_bad=cfg.data.skip_bad)
    lengths = [token_length(processor, ex) for ex in examples]
    kept = [(ex, n) for ex, n in zip(examples, lengths) if n <= cfg.data.max_length]
    if len(kept) < len(examples):
        log.warning("%s: dropped %d of %d examples longer than data.max_length=%d",
                    cfg.data.train, len(examples) - len(kept), len(examples), cfg.data.max_length)
    if not kept:
        raise DataError(f"{cfg.data.train}: no examples left after filtering by data.max_length={cfg.data.max_length}")
    return [ex for ex, _ in kept], [n for _, n in kept]


def split_by_budget(rows: list[int], lengths: list[int], budget: int | None) -> list[list[int]]:
    """A micro-batch's example indices, split into forwards of at most `budget` padded tokens (or kept whole)."""
    if not budget:
        return [rows]
    return [[rows[j] for j in part] for part in token_budget_batches([lengths[i] for i in rows], budget)]


def train(cfg: SFTConfig) -> dict:
    # --- build -----------------------------------------------------------------------------
    accelerator, out = setup_run(cfg)
    world, rank = accelerator.num_processes, accelerator.process_index

    processor = load_processor(cfg.model.path, cfg.model.trust_remote_code)
    train_data, lengths = load_train_data(cfg, processor)
    eval_data = (load_examples(cfg.data.eval, cfg.data.format, require_answer=True, skip_bad=cfg.data.skip_bad,
                               limit=cfg.data.eval_limit) if cfg.data.eval else [])
    if len(train_data) < cfg.train.batch_size * world:
        raise DataError(f"{cfg.data.train}: {len(train_data)} examples, fewer than one global micro-batch "
                        f"(train.batch_size={cfg.train.batch_size} x {world} processes)")
    collate = SFTCollator(processor, cfg.data.max_length)

    resume_from = resolve_resume(cfg.train.resume, out)
    model = load_model(cfg.model, trainable=True, device=accelerator.device, init_from=resume_from)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, scheduler = make_optimizer(cfg, params)
    model, optimizer, params = prepare(accelerator, model, optimizer, cfg.train.batch_size)

    start = 0
    if resume_from is not None:
        start = restore_optimizer(resume_from, optimizer, scheduler, rank, model=model)["step"]

    tracker = Tracker(out, cfg.logging, cfg.model_dump(mode="json"), enabled=accelerator.is_main_process)
    bar = tqdm(total=cfg.train.max_steps, initial=start, disable=not accelerator.is_main_process,
               desc="sft", dynamic_ncols=True)
    metrics: dict[str, float] = {}
    accum = cfg.train.grad_accum

    # --- loop ------------------------------------------------------------------------------
    model.train()
    for step in range(start + 1, cfg.train.max_steps + 1):
        t0 = time.perf_counter()
        micro = [collate([train_data[i] for i in rows]) for m in range(accum) for rows in split_by_budget(
            micro_batch_indices(len(train_data), (step - 1) * accum + m, cfg.train.batch_size, world, rank,
                                cfg.train.seed), lengths, cfg.train.micro_token_budget)]
        n_tokens = accelerator.reduce(
            sum((b["labels"][:, 1:] != IGNORE_INDEX).sum() for b in micro).to(accelerator.device), "sum").item()
        nll_total = torch.zeros((), device=accelerator.device)
        for m, batch in enumerate(micro):
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            if cfg.train.padding_free:
                batch = pack(accelerator.unwrap_model(model), batch)
            labels = batch.pop("labels")
            with accumulating(accelerator, model, last=m == len(micro) - 1):
                if cfg.train.logits_chunk:
                    nll, _ = head_token_nll(final_hidden_states(model, batch), output_head(model), labels,
                                            cfg.train.logits_chunk)
                else:
                    nll, _ = shifted_token_nll(model(**batch).logits, labels)
                # DDP averages gradients over processes, hence the factor `world`.
                backward(accelerator, nll * world / n_tokens)
            nll_total += nll.detach()
        loss = accelerator.reduce(nll_total, "sum").item() / n_tokens
        grad_norm = clip_grad_norm(accelerator, params, cfg.optim.max_grad_norm)
        check_finite(step, out, loss=loss, **({"grad_norm": grad_norm} if cfg.optim.max_grad_norm else {}))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        metrics = {"train/loss": loss, "train/grad_norm": grad_norm, "train/lr": scheduler.get_last_lr()[0],
                   "train/tokens": n_tokens, "train/step_seconds": time.perf_counter() - t0,
                   "train/epoch": (step * accum * cfg.train.batch_size * world) / len(train_data)}
        last = step == cfg.train.max_steps
        if eval_data and (last or cfg.eval.every and step % cfg.eval.every == 0):
            metrics.update(evaluate_policy(accelerator, model, processor, eval_data,
                                           max_new_tokens=cfg.eval.max_new_tokens, batch_size=cfg.eval.batch_size))
        if step % cfg.train.log_every == 0 or last or any(k.startswith("eval/") for k in metrics):
            tracker.log(metrics, step)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", **{k[5:]: f"{v:.3f}" for k, v in metrics.items() if k.startswith("eval/")})
        if last or cfg.train.save_every and step % cfg.train.save_every == 0:
            save_policy_checkpoint(cfg, accelerator, step, model, processor, optimizer, scheduler, {"metrics": metrics})

    bar.close()
    tracker.close()
    accelerator.end_training()
    return metrics


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="prism-sft", description="Stage 1: supervised fine-tuning (DESIGN §3).")
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
