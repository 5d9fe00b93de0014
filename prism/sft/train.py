"""Stage 1 — SFT: next-token loss on the assistant tokens of demonstrations (DESIGN §3).

    prism-sft --config configs/sft/demo.yaml [optim.lr=2e-4 data.train=... ...]
    accelerate launch --config_file configs/accelerate/ddp.yaml -m prism.sft.train --config ...

The loop, top to bottom: build the pieces (accelerator, processor, data, model, optimizer,
scheduler), resume if a checkpoint exists, then for each optimizer step: collate the step's
micro-batches, normalise by the step's token count over all micro-batches and processes (so
accumulation and data parallelism give the same update as one big batch), backward, clip,
step; log, evaluate and checkpoint on schedule.

Data order is a pure function of (seed, step): each epoch is a seeded permutation, each optimizer
step takes the next `grad_accum` global micro-batches of it, each process its slice. Resuming
therefore needs only the step number, and the loss sequence of a resumed run matches the
uninterrupted one exactly.
"""

from __future__ import annotations

import argparse
import copy
from contextlib import nullcontext
import logging
import math
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import get_scheduler

from prism.checkpoint import load_trainer_state, resolve_resume, save_checkpoint
from prism.config import SFTConfig, load_config, save_config
from prism.data.collate import SFTCollator, token_length
from prism.data.example import DataError, Example
from prism.data.formats import load_examples
from prism.eval.metrics import score_responses
from prism.losses.sft import IGNORE_INDEX, shifted_token_nll
from prism.models.loader import load_model
from prism.models.processor import load_processor
from prism.rollout.engine import SamplingParams, generate
from prism.tracking import Tracker

log = logging.getLogger("prism.sft")


class NonFiniteLossError(RuntimeError):
    pass


def load_train_data(cfg: SFTConfig, processor) -> list[Example]:
    examples = load_examples(cfg.data.train, cfg.data.format, require_response=True, skip_bad=cfg.data.skip_bad)
    kept = [ex for ex in examples if token_length(processor, ex) <= cfg.data.max_length]
    if len(kept) < len(examples):
        log.warning("%s: dropped %d of %d examples longer than data.max_length=%d",
                    cfg.data.train, len(examples) - len(kept), len(examples), cfg.data.max_length)
    if not kept:
        raise DataError(f"{cfg.data.train}: no examples left after filtering by data.max_length={cfg.data.max_length}")
    return kept


def micro_batch_indices(n: int, k: int, batch_size: int, world: int, rank: int, seed: int) -> list[int]:
    """Example indices of global micro-batch `k` (0-based, counted over the run) on `rank`.

    Epoch e is the permutation seeded by seed + e; a global micro-batch is `batch_size * world`
    consecutive entries of it (an incomplete tail is dropped), and each rank takes its slice.
    """
    per_epoch = n // (batch_size * world)
    epoch, j = divmod(k, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
    start = (j * world + rank) * batch_size
    return perm[start: start + batch_size].tolist()


def evaluate(cfg: SFTConfig, accelerator: Accelerator, model, processor, examples: list[Example]) -> dict:
    """Greedy generation on the held-out split, sharded over processes; answer/format/caption metrics."""
    params = SamplingParams(max_new_tokens=cfg.eval.max_new_tokens, temperature=0.0)
    with accelerator.split_between_processes(list(range(len(examples)))) as mine:
        texts = generate(accelerator.unwrap_model(model), processor, [examples[i] for i in mine], params,
                         batch_size=cfg.eval.batch_size)
    from accelerate.utils import gather_object

    order = gather_object(list(mine))
    texts = gather_object(texts)
    by_index = dict(zip(order, texts))
    metrics = score_responses(examples, [by_index[i] for i in range(len(examples))])
    return {f"eval/{k}": v for k, v in metrics.items()}


def save(cfg: SFTConfig, accelerator: Accelerator, model, processor, optimizer, scheduler, step: int,
         metrics: dict) -> Path:
    def write(tmp: Path) -> None:
        unwrapped = accelerator.unwrap_model(model)
        unwrapped.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
        if cfg.model.lora.enabled and cfg.model.lora.merge_on_save:
            merged = copy.deepcopy(unwrapped).merge_and_unload()
            merged.save_pretrained(tmp / "merged", safe_serialization=True)
            processor.save_pretrained(tmp / "merged")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        save_config(cfg, tmp / "config.yaml")

    return save_checkpoint(cfg.train.output_dir, step, write, {"metrics": metrics},
                           rank=accelerator.process_index, barrier=accelerator.wait_for_everyone,
                           keep_last=cfg.train.keep_last)


def train(cfg: SFTConfig) -> dict:
    # --- build -----------------------------------------------------------------------------
    accelerator = Accelerator(cpu=cfg.train.cpu or not torch.cuda.is_available())
    world, rank = accelerator.num_processes, accelerator.process_index
    set_seed(cfg.train.seed)
    out = Path(cfg.train.output_dir)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")

    processor = load_processor(cfg.model.path, cfg.model.trust_remote_code)
    train_data = load_train_data(cfg, processor)
    eval_data = (load_examples(cfg.data.eval, cfg.data.format, require_answer=True, skip_bad=cfg.data.skip_bad,
                               limit=cfg.data.eval_limit) if cfg.data.eval else [])
    if len(train_data) < cfg.train.batch_size * world:
        raise DataError(f"{cfg.data.train}: {len(train_data)} examples, fewer than one global micro-batch "
                        f"(train.batch_size={cfg.train.batch_size} x {world} processes)")
    collate = SFTCollator(processor, cfg.data.max_length)

    resume_from = resolve_resume(cfg.train.resume, out)
    model = load_model(cfg.model, trainable=True, device=accelerator.device, init_from=resume_from)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.optim.lr, betas=cfg.optim.betas, eps=cfg.optim.eps,
                                  weight_decay=cfg.optim.weight_decay)
    scheduler = get_scheduler(cfg.optim.scheduler, optimizer,
                              num_warmup_steps=math.ceil(cfg.optim.warmup_ratio * cfg.train.max_steps),
                              num_training_steps=cfg.train.max_steps)
    model, optimizer = accelerator.prepare(model, optimizer)

    start = 0
    if resume_from is not None:
        optimizer.load_state_dict(torch.load(resume_from / "optimizer.pt", weights_only=False))
        scheduler.load_state_dict(torch.load(resume_from / "scheduler.pt", weights_only=False))
        start = load_trainer_state(resume_from, rank)["step"]
        log.info("resumed from %s at step %d", resume_from, start)

    tracker = Tracker(out, cfg.logging, cfg.model_dump(mode="json"), enabled=accelerator.is_main_process)
    bar = tqdm(total=cfg.train.max_steps, initial=start, disable=not accelerator.is_main_process,
               desc="sft", dynamic_ncols=True)
    metrics: dict[str, float] = {}
    accum = cfg.train.grad_accum

    # --- loop ------------------------------------------------------------------------------
    model.train()
    for step in range(start + 1, cfg.train.max_steps + 1):
        t0 = time.perf_counter()
        micro = [collate([train_data[i] for i in micro_batch_indices(
            len(train_data), (step - 1) * accum + m, cfg.train.batch_size, world, rank, cfg.train.seed)])
            for m in range(accum)]
        n_tokens = accelerator.reduce(
            sum((b["labels"][:, 1:] != IGNORE_INDEX).sum() for b in micro).to(accelerator.device), "sum").item()
        nll_total = torch.zeros((), device=accelerator.device)
        for m, batch in enumerate(micro):
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            labels = batch.pop("labels")
            with accelerator.no_sync(model) if m < accum - 1 else nullcontext():
                logits = model(**batch).logits
                nll, _ = shifted_token_nll(logits, labels)
                # DDP averages gradients over processes, hence the factor `world`.
                accelerator.backward(nll * world / n_tokens)
            nll_total += nll.detach()
        loss = accelerator.reduce(nll_total, "sum").item() / n_tokens
        grad_norm = (accelerator.clip_grad_norm_(params, cfg.optim.max_grad_norm).item()
                     if cfg.optim.max_grad_norm else float("nan"))
        if not math.isfinite(loss) or (cfg.optim.max_grad_norm and not math.isfinite(grad_norm)):
            raise NonFiniteLossError(
                f"non-finite loss ({loss}) or gradient norm ({grad_norm}) at step {step}; stopping without "
                f"saving — the last good checkpoint in {out} is kept (try a lower optim.lr)")
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        metrics = {"train/loss": loss, "train/grad_norm": grad_norm, "train/lr": scheduler.get_last_lr()[0],
                   "train/tokens": n_tokens, "train/step_seconds": time.perf_counter() - t0,
                   "train/epoch": (step * accum * cfg.train.batch_size * world) / len(train_data)}
        last = step == cfg.train.max_steps
        if eval_data and (last or cfg.eval.every and step % cfg.eval.every == 0):
            metrics.update(evaluate(cfg, accelerator, model, processor, eval_data))
        if step % cfg.train.log_every == 0 or last or any(k.startswith("eval/") for k in metrics):
            tracker.log(metrics, step)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", **{k[5:]: f"{v:.3f}" for k, v in metrics.items() if k.startswith("eval/")})
        if last or cfg.train.save_every and step % cfg.train.save_every == 0:
            save(cfg, accelerator, model, processor, optimizer, scheduler, step, metrics)

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
    return train(cfg)


if __name__ == "__main__":
    main()
