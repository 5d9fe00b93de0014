"""Stage 2 — ALIGN: black-box on-policy distillation against the MoE discriminator (docs/design.md §4).

    prism-align --config configs/align/demo.yaml [align.alpha=0.5 discriminator.text_only=true ...]
    prism-align warmup --config ...          # only the discriminator warm-start
    prism-align upcycle --model DIR --experts 4 --top-k 2 --out DIR

Players: the policy G (from the SFT checkpoint, `model.path`) and the discriminator D
(`discriminator.path`), each with its own optimizer. Before the game D is warm-started on
(teacher reference, SFT sample) pairs (`warmup.steps`). One step, top to bottom:

1. the next `train.prompts_per_step` alignment prompts per process, G = `rollout.group_size` rollouts
   each from the shared engine (temperature 1.0 by default);
2. D scores each rollout's caption (perception expert) and think (reasoning expert);
3. `alignment_advantages`: invalid rollouts get the group's valid minimum − 1, group
   normalisation, α-mix of the experts, minus the format penalty;
4. the policy update with the shared clipped loss (`prism.loop.policy_update`) — **no KL term and no
   reference model**: anchoring to the SFT policy would lock the drift in;
5. `discriminator.steps_per_policy_step` updates of D on the same rollouts against the teacher
   references (`discriminator_loss`, format-valid rollouts only).

Monitored, never rewarded: per-expert discriminator accuracy, teacher / policy scores and their
gap, format rate, answer accuracy and, with a task that checks captions (`data.task`), the rollouts'
caption match.
Checkpoints hold both players (the discriminator in `checkpoint-N/discriminator/`) with both
optimizers and RNG states, so a resumed run continues exactly.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from prism.align.config import AlignConfig
from prism.align.discriminator import MoEDiscriminator
from prism.align.game import (
    DISC_DIR,
    Placement,
    build_discriminator,
    discriminator_player,
    discriminator_update,
    rollout_monitors,
)
from prism.align.losses import alignment_advantages
from prism.align.monitor import CollapseWatch
from prism.align.warmup import restore_warm_start_rng, reusable_warm_start, warm_start
from prism.checkpoint import list_checkpoints, restore_optimizer, save_policy_checkpoint
from prism.core.config import load_config
from prism.core.errors import ConfigError, DataError
from prism.core.example import Example
from prism.core.response import is_format_valid
from prism.core.rollouts import SamplingParams
from prism.core.task import load_task
from prism.data.formats import load_examples
from prism.data.loader import prompt_batches
from prism.dist import ModelUpdate, optimizer_from_config, prepare, reduce_mean
from prism.eval.policy import evaluate
from prism.loop.policy_update import policy_update
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
from prism.models.loader import load_model
from prism.rollout.engine import RolloutBackend, make_backend
from prism.tracking import metric_rows

log = logging.getLogger("prism.align")


def load_alignment_data(cfg: AlignConfig, path: str | None = None) -> list[Example]:
    """Alignment prompts, each with its teacher reference (the final assistant turn), format-valid."""
    path = path or cfg.data.train
    examples = load_examples(path, cfg.data.format, skip_bad=cfg.data.skip_bad)
    missing = [ex.source for ex in examples if not (ex.response or "").strip()]
    if missing and not cfg.align.skip_missing_references:
        raise DataError(f"{path}: {len(missing)} of {len(examples)} alignment prompts have no teacher reference "
                        f"(first: {missing[0]}); add them or set align.skip_missing_references=true")
    if missing:
        log.warning("%s: skipped %d prompts without a teacher reference", path, len(missing))
        examples = [ex for ex in examples if (ex.response or "").strip()]
    for ex in examples:
        if not is_format_valid(ex.response):
            raise DataError(f"{ex.source}: teacher reference is not format-valid "
                            "(<caption>…</caption><think>…</think><answer>…</answer>, each once and non-empty)")
    if not examples:
        raise DataError(f"{path}: no alignment prompts with a teacher reference")
    return examples


def check_config(cfg: AlignConfig) -> None:
    if cfg.algo.kl_coef > 0:
        raise ConfigError("algo.kl_coef: ALIGN has no KL term and no reference model (docs/design.md §4); leave it at 0")
    if cfg.rollout.group_size < 2:
        raise ConfigError(f"rollout.group_size: {cfg.rollout.group_size}: group-normalised advantages of a group "
                          "of one are always zero; use >= 2")


@dataclass
class Players:
    """The two players and what each needs to move: the policy's update path, its LR schedule and the
    rollout backend sampling from it; the discriminator, its update path and where it lives."""

    policy: ModelUpdate
    scheduler: object
    backend: RolloutBackend
    disc: MoEDiscriminator
    disc_update: ModelUpdate
    placement: Placement


def game_step(cfg: AlignConfig, p: Players, batch: list[Example], step: int, task) -> dict[str, float]:
    """One step of the game (module docstring, 1–5) on this process's prompts; returns its metrics."""
    G = cfg.rollout.group_size
    r = cfg.rollout
    t0 = time.perf_counter()
    p.backend.sync_weights(p.policy.accelerator.unwrap_model(p.policy.model))
    rollouts = p.backend.rollout(batch, SamplingParams(max_new_tokens=r.max_new_tokens, temperature=r.temperature,
                                                       top_p=r.top_p, top_k=r.top_k, n=G))
    expanded = [ex for ex in batch for _ in range(G)]
    valid = torch.tensor([is_format_valid(t) for t in rollouts.texts])
    t1 = time.perf_counter()
    with p.placement.active(p.disc, p.disc_update.optimizer):
        scores = p.disc.score(expanded, rollouts.texts, batch_size=cfg.discriminator.prompts_per_micro_batch * G)
    advantages = alignment_advantages(scores["perception"], scores["reasoning"], valid, G,
                                      cfg.align.alpha, cfg.align.format_penalty)
    t2 = time.perf_counter()
    actor = policy_update(p.policy, rollouts, advantages, cfg.algo, temperature=r.temperature,
                          logprob_chunk_size=r.logprob_chunk_size, logprob_token_budget=r.logprob_token_budget,
                          step=step)
    p.scheduler.step()
    t3 = time.perf_counter()
    d_metrics: dict[str, float] = {}
    with p.placement.active(p.disc, p.disc_update.optimizer):
        for _ in range(cfg.discriminator.steps_per_policy_step):
            d_metrics = discriminator_update(p.disc, p.disc_update, cfg, batch, rollouts.texts, valid, step)
    t4 = time.perf_counter()

    metrics = {f"rollout/{k}": v for k, v in rollout_monitors(batch, rollouts.texts, G, task).items()}
    metrics.update({f"score/{k}": float(v.mean()) for k, v in scores.items()})
    clip = p.disc.config.score_clip
    metrics["score/pinned"] = float(torch.stack([v.abs() >= clip * (1 - 1e-6) for v in scores.values()]).float().mean())
    metrics.update({"rollout/advantage_abs": float(advantages.abs().mean()),
                    "rollout/length": float(rollouts.response_lengths.float().mean())})
    metrics.update({f"rollout/{k}" if k.startswith("logprob_diff") else f"actor/{k}": v for k, v in actor.items()})
    metrics.update({f"disc/{k}": v for k, v in d_metrics.items()})
    metrics.update({"time/generation": t1 - t0, "time/scoring": t2 - t1, "time/update": t3 - t2,
                    "time/discriminator": t4 - t3, "time/step": t4 - t0})
    return reduce_mean(p.policy.accelerator, metrics, ("rollout/", "score/", "disc/"))


def warm_start_once(cfg: AlignConfig, accelerator, game: Players, prompts: list[Example], out: Path, task,
                    reuse: bool) -> dict[str, float]:
    """The discriminator's warm-start (`prism.align.warmup`), or with `reuse` the one a previous run of this
    output directory finished with the same settings and files (OUTPUT_DIR/warmup; its RNG state restored,
    so the game goes on as after a fresh warm-start); then a fresh optimizer for the game. Returns its metrics."""
    saved = reusable_warm_start(cfg, out, accelerator.num_processes, accelerator.process_index) if reuse else None
    if saved is not None:
        log.info("reusing the warm-start in %s (same settings and files)", saved)
        game.disc = build_discriminator(cfg, saved).to(game.placement.home)
        metrics = json.loads((saved / "metrics.json").read_text())
        restore_warm_start_rng(saved, accelerator.process_index)
    else:
        warm_prompts = load_alignment_data(cfg, cfg.warmup.data) if cfg.warmup.data else prompts
        with game.placement.active(game.disc, game.disc_update.optimizer):
            metrics = warm_start(cfg, accelerator, game.backend, game.disc, game.disc_update, warm_prompts, out, task)
    game.disc_update = discriminator_player(cfg, accelerator, game.disc)
    return metrics


@names_last_checkpoint
def train(cfg: AlignConfig, warmup_only: bool = False) -> dict:
    check_config(cfg)
    # --- build -----------------------------------------------------------------------------
    accelerator, out = setup_run(cfg)
    rank, world = accelerator.process_index, accelerator.num_processes
    task = load_task(cfg.data.task)
    processor = stage_processor(cfg)
    prompts = load_alignment_data(cfg)
    eval_data = load_eval_data(cfg)
    check_enough(cfg, len(prompts), cfg.train.prompts_per_step, "train.prompts_per_step", world)

    if warmup_only:  # the warm-start alone (re)writes OUTPUT_DIR/warmup; a game's checkpoints would not use it
        ckpts = list_checkpoints(out)
        if ckpts and not cfg.train.overwrite:
            raise ConfigError(f"train.output_dir: {out} holds a game's checkpoints (up to {ckpts[-1].name}), which "
                              "a new warm-start would not change; choose another train.output_dir or set "
                              "train.overwrite=true to replace that run")
        resume_from = claim_output_dir(cfg, accelerator, out, resume="none" if ckpts else "auto")
    else:
        resume_from = claim_output_dir(cfg, accelerator, out)
    policy = load_model(cfg.model, trainable=True, device=accelerator.device, init_from=resume_from)
    placement = Placement(cfg, accelerator)
    disc = build_discriminator(cfg, resume_from / DISC_DIR if resume_from else cfg.discriminator.path or cfg.model.path)
    disc = disc.to(placement.home)
    opt_p, sched_p = optimizer_from_config(cfg, [p for p in policy.parameters() if p.requires_grad])
    policy, opt_p, params = prepare(accelerator, policy, opt_p, cfg.algo.micro_batch_size)
    game = Players(ModelUpdate(accelerator, policy, opt_p, params, cfg.optim.max_grad_norm,
                               max_change=cfg.optim.max_param_change), sched_p,
                   make_backend(cfg.rollout.backend, accelerator.unwrap_model(policy), processor, cfg.rollout.chunk_size,
                                compile=cfg.rollout.compile, vllm=cfg.rollout.vllm,
                                model_path=cfg.model.path),
                   disc, discriminator_player(cfg, accelerator, disc), placement)

    start, metrics = 0, {}
    if resume_from is not None:
        start = restore_optimizer(resume_from, opt_p, sched_p, rank, model=policy, lr=cfg.optim.lr)["step"]
        game.disc_update.optimizer.load_state_dict(torch.load(resume_from / "disc_optimizer.pt", weights_only=False))
        for group in game.disc_update.optimizer.param_groups:  # a changed discriminator.lr takes effect
            group["lr"] = cfg.discriminator.lr
    tracker, bar = open_logs(cfg, accelerator, out, start, "align")
    if start == 0 and cfg.warmup.steps > 0:
        metrics = warm_start_once(cfg, accelerator, game, prompts, out, task, reuse=not warmup_only)
        tracker.log(metrics, 0)
    if warmup_only:
        close_run(accelerator, tracker, bar)
        return metrics

    # --- loop ------------------------------------------------------------------------------
    d = cfg.discriminator
    watch = CollapseWatch(d.collapse_window, d.stop_on_collapse, d.lr,
                          history=[r for r in metric_rows(out) if 0 < r["step"] <= start][-d.collapse_window:])
    # step s plays prompt batch s - 1; with data.num_workers, loader processes decode its images ahead
    batches = prompt_batches(prompts, cfg.train.prompts_per_step, world, rank, cfg.train.seed, start,
                             cfg.train.max_steps - 1, cfg.data.num_workers, cfg.data.prefetch)
    for step in range(start + 1, cfg.train.max_steps + 1):
        batch = next(batches)
        metrics = game_step(cfg, game, batch, step, task)
        watch.update(step, metrics)

        def save() -> None:
            def extra(tmp: Path) -> None:
                game.disc.save_pretrained(tmp / DISC_DIR)
                torch.save(game.disc_update.optimizer.state_dict(), tmp / "disc_optimizer.pt")

            save_policy_checkpoint(cfg, accelerator, step, policy, processor, opt_p, sched_p, {"metrics": metrics},
                                   extra=extra)

        end_step(cfg, step, metrics, tracker,
                 evaluate=(lambda: evaluate(accelerator, policy, processor, eval_data, cfg.eval, task)) if eval_data else None,
                 save=save)
        bar.update(1)
        bar.set_postfix(cap=f"{metrics.get('rollout/caption_match', 0):.2f}", acc=f"{metrics['rollout/accuracy']:.2f}",
                        dv=f"{metrics.get('disc/perception/acc', float('nan')):.2f}",
                        dr=f"{metrics.get('disc/reasoning/acc', float('nan')):.2f}")

    close_run(accelerator, tracker, bar)
    return metrics


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["upcycle"]:
        from prism.align.upcycle import main as upcycle_main

        return upcycle_main(argv[1:])
    warmup_only = argv[:1] == ["warmup"]
    argv = argv[1:] if warmup_only else argv
    p = argparse.ArgumentParser(prog="prism-align" + (" warmup" if warmup_only else ""),
                                description="Stage 2: on-policy distillation against an MoE discriminator "
                                "(docs/design.md §4). Subcommands: warmup (warm-start only), upcycle.")
    p.add_argument("--config", help="YAML config (see configs/align/)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. align.alpha=0.5 discriminator.text_only=true")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    cfg = load_config(AlignConfig, a.config, a.overrides)
    metrics = train(cfg, warmup_only=warmup_only)
    if warmup_only:
        print("warm-start held-out pairwise accuracy: " + ", ".join(
            f"{k.split('/')[1]} {v:.3f}" for k, v in metrics.items() if k.startswith("warmup/") and k.endswith("_acc")))
    elif "eval/accuracy" in metrics:
        print(f"held-out ({cfg.data.eval}): greedy accuracy {metrics['eval/accuracy']:.3f} | sampled accuracy "
              f"{metrics['eval_sampled/accuracy']:.3f} | caption match {metrics.get('eval/caption_match', float('nan')):.3f}")
    return metrics


if __name__ == "__main__":
    main()
