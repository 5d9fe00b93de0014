"""Stage 2 — ALIGN: black-box on-policy distillation against the MoE discriminator (DESIGN §4).

    prism-align --config configs/align/demo.yaml [align.alpha=0.5 discriminator.text_only=true ...]
    prism-align warmup --config ...          # only the discriminator warm-start
    prism-align upcycle --model DIR --experts 4 --top-k 2 --out DIR

Players: the policy G (from the SFT checkpoint, `model.path`) and the discriminator D
(`discriminator.path`), each with its own optimizer. Before the game D is warm-started on
(teacher reference, SFT sample) pairs (`warmup.steps`). One step, top to bottom:

1. the next `train.batch_size` alignment prompts per process, G = `rollout.group_size` rollouts
   each from the shared engine (temperature 1.0 by default);
2. D scores each rollout's caption (perception expert) and think (reasoning expert);
3. `alignment_advantages`: invalid rollouts get the group's valid minimum − 1, group
   normalisation, α-mix of the experts, minus the format penalty;
4. the policy update with the shared clipped loss (`prism.rl.update`) — **no KL term and no
   reference model**: anchoring to the SFT policy would lock the drift in;
5. `discriminator.steps_per_policy_step` updates of D on the same rollouts against the teacher
   references (`discriminator_loss`, format-valid rollouts only).

Monitored, never rewarded: per-expert discriminator accuracy, teacher / policy scores and their
gap, format rate, and on the synthetic task the rollouts' caption exact match and answer accuracy.
Checkpoints hold both players (the discriminator in `checkpoint-N/discriminator/`) with both
optimizers and RNG states, so a resumed run continues exactly.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import random
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from prism.align.discriminator import COMPONENTS, SECTION_OF, MoEDiscriminator
from prism.align.losses import alignment_advantages, discriminator_loss
from prism.align.warmup import corrupt_response, pair_loss, pairwise_accuracy
from prism.checkpoint import resolve_resume
from prism.config import AlignConfig, ConfigError, load_config
from prism.data.example import DataError, Example
from prism.data.formats import load_examples
from prism.data.synthetic import caption_matches_scene
from prism.loop import (check_finite, replicated_load, evaluate_policy, make_optimizer, micro_batch_indices, prepare,
                        restore_optimizer, save_policy_checkpoint, setup_run)
from prism.models.loader import load_model
from prism.models.processor import load_processor
from prism.response import is_format_valid, parse_response
from prism.rewards import answer_correct
from prism.rl.update import policy_update
from prism.rollout.engine import HFBackend, SamplingParams
from prism.tracking import Tracker

log = logging.getLogger("prism.align")
DISC_DIR = "discriminator"


# ------------------------------------------------------------------------------------ data


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
        raise ConfigError("algo.kl_coef: ALIGN has no KL term and no reference model (DESIGN §4); leave it at 0")
    if cfg.rollout.group_size < 2:
        raise ConfigError(f"rollout.group_size: {cfg.rollout.group_size}: group-normalised advantages of a group "
                          "of one are always zero; use >= 2")


def build_discriminator(cfg: AlignConfig, path: str | Path) -> MoEDiscriminator:
    """The discriminator from `path` (a VLM directory or a saved discriminator) with the config's settings,
    whole on every process (no DeepSpeed engine owns it; see `replicated_load`)."""
    d = cfg.discriminator
    with replicated_load():
        return MoEDiscriminator.from_pretrained(
            path, experts=d.experts, dense=d.dense, text_only=d.text_only, score_clip=d.score_clip,
            lora_r=d.lora_r, lora_alpha=d.lora_alpha, aux_loss_coef=d.aux_loss_coef, dtype=cfg.model.dtype,
            gradient_checkpointing=d.gradient_checkpointing)


class Placement:
    """Where the discriminator and its optimizer state live: `home` between its phases (the CPU with
    `discriminator.offload`), `device` during them (`with placement.active(disc, optimizer):`)."""

    def __init__(self, cfg: AlignConfig, accelerator):
        d = cfg.discriminator
        self.device = torch.device(d.device) if d.device else accelerator.device
        if d.device and self.device.type != "cpu" and accelerator.num_processes > 1:
            raise ConfigError(f"discriminator.device: {d.device!r} names one device for all "
                              f"{accelerator.num_processes} processes; leave it unset (each process's own) or use cpu")
        self.home = torch.device("cpu") if d.offload else self.device

    @staticmethod
    def move(disc: MoEDiscriminator, optimizer, device: torch.device) -> None:
        disc.to(device)
        for state in optimizer.state.values():
            for k, v in state.items():
                if torch.is_tensor(v) and k != "step":  # Adam's step counter stays on the CPU
                    state[k] = v.to(device)

    @contextlib.contextmanager
    def active(self, disc: MoEDiscriminator, optimizer):
        if self.home != self.device:
            self.move(disc, optimizer, self.device)
        try:
            yield
        finally:
            if self.home != self.device:
                self.move(disc, optimizer, self.home)


def _sync_grads(params: list[torch.nn.Parameter], accelerator) -> None:
    """Sum discriminator gradients over processes (each process's loss is its share of the global mean).
    D is not DDP-wrapped: each forward uses one expert's adapter, which DDP would flag as unused."""
    if accelerator.num_processes == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads]).to(accelerator.device)  # the backend's device (nccl: GPU)
    torch.distributed.all_reduce(flat)
    flat = flat.to(params[0].device)
    offset = 0
    for p, g in zip(params, grads):
        p.grad = flat[offset: offset + g.numel()].view_as(p).clone()
        offset += g.numel()


# ------------------------------------------------------------------------------------ the discriminator's turn


def discriminator_update(disc: MoEDiscriminator, optimizer, accelerator, cfg: AlignConfig, prompts: list[Example],
                         texts: list[str], valid: torch.Tensor) -> dict[str, float]:
    """One optimizer step of D on (teacher reference, rollout) pairs; rollouts of prompt b are rows b·G..b·G+G−1.

    The teacher reference of each prompt is scored once and paired with each of its G rollouts.
    Micro-batches of `discriminator.micro_batch_size` prompts; each one's loss is weighted by its
    share of the valid rollouts of the whole (multi-process) batch.
    """
    G = cfg.rollout.group_size
    device = disc.device
    n_valid = float(accelerator.reduce(valid.float().sum().to(accelerator.device), "sum")) if accelerator.num_processes > 1 \
        else float(valid.sum())
    params = disc.trainable_parameters()
    disc.train()
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}  # each metric's own weight: valid rollouts (distinct ones for acc_distinct)
    mb = cfg.discriminator.micro_batch_size
    for start in range(0, len(prompts), mb):
        batch = prompts[start: start + mb]
        rows = slice(start * G, (start + len(batch)) * G)
        parsed = [parse_response(t) for t in texts[rows]]
        refs = [parse_response(ex.response) for ex in batch]
        expanded = [ex for ex in batch for _ in range(G)]
        teacher, policy, aux = {}, {}, 0.0
        for comp in COMPONENTS:
            sec = SECTION_OF[comp]
            t_out = disc(disc.encode(batch, [getattr(r, sec) for r in refs], comp), comp)
            p_out = disc(disc.encode(expanded, [getattr(p, sec) or "" for p in parsed], comp), comp)
            teacher[comp], policy[comp] = t_out.scores.repeat_interleave(G), p_out.scores
            for o in (t_out, p_out):
                if o.aux_loss is not None:
                    aux = aux + cfg.discriminator.aux_loss_coef * o.aux_loss
        v = valid[rows].to(device)
        distinct = {comp: torch.tensor([getattr(p, SECTION_OF[comp]) != getattr(r, SECTION_OF[comp])
                                        for p, r in zip(parsed, (r for r in refs for _ in range(G)))])
                    for comp in COMPONENTS}
        loss, m = discriminator_loss(teacher, policy, v, cfg.discriminator.reg, distinct)
        share = float(v.sum()) / max(n_valid, 1.0)
        # the router loss is a mean over this process's prompts; _sync_grads sums over processes
        (loss * share + aux * len(batch) / (len(prompts) * accelerator.num_processes)).backward()
        if m["n_valid"]:
            for k, val in m.items():
                if k not in ("no_valid", "n_valid"):
                    key_weight = m["n_valid"] * (m[k.replace("acc_distinct", "distinct")] if "acc_distinct" in k else 1)
                    sums[k] = sums.get(k, 0.0) + val * key_weight
                    weights[k] = weights.get(k, 0.0) + key_weight
        if torch.is_tensor(aux):
            sums["aux_loss"] = sums.get("aux_loss", 0.0) + float(aux) * len(batch)
    if n_valid > 0:  # the same decision on every process (n_valid is global)
        _sync_grads(params, accelerator)
        if cfg.discriminator.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, cfg.discriminator.max_grad_norm)
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    metrics = {k: v / max(weights[k], 1e-9) for k, v in sums.items() if k != "aux_loss"}
    if "aux_loss" in sums:
        metrics["aux_loss"] = sums["aux_loss"] / len(prompts)
    metrics["no_valid"] = float(n_valid == 0)  # nothing to compare this step: D was left unchanged
    return metrics


def rollout_monitors(prompts: list[Example], texts: list[str], G: int) -> dict[str, float]:
    """Format rate, answer accuracy and (synthetic task) caption exact match of the rollouts."""
    parsed = [parse_response(t) for t in texts]
    expanded = [ex for ex in prompts for _ in range(G)]
    out = {"format_rate": sum(p.valid for p in parsed) / len(parsed),
           "accuracy": sum(answer_correct(p.answer, ex.answer) for p, ex in zip(parsed, expanded)) / len(parsed),
           "length_chars": sum(len(t) for t in texts) / len(texts)}
    with_scene = [(p, ex) for p, ex in zip(parsed, expanded) if "scene" in ex.meta]
    if with_scene:
        out["caption_match"] = sum(p.caption is not None and caption_matches_scene(p.caption, ex.meta["scene"])
                                   for p, ex in with_scene) / len(with_scene)
    return out


# ------------------------------------------------------------------------------------ warm-start


def warmup(cfg: AlignConfig, accelerator, policy, processor, disc: MoEDiscriminator, optimizer,
           prompts: list[Example], out: Path) -> dict[str, float]:
    """Train each expert on (teacher reference, negative) pairs; report held-out pairwise accuracy."""
    w = cfg.warmup
    rng = random.Random(cfg.train.seed)
    order = list(range(len(prompts)))
    rng.shuffle(order)
    n_eval = min(w.eval_pairs, len(prompts) // 4)
    held_out, train_idx = [prompts[i] for i in order[:n_eval]], [prompts[i] for i in order[n_eval:]]
    if w.negatives == "corrupt":
        # held-out negatives are fixed; training draws a fresh corruption of each reference every time
        # it is seen, so the experts learn what a wrong cell or step looks like, not one string per prompt
        negative = {id(ex): corrupt_response(ex.response, rng) for ex in held_out}
    else:  # one sample of the starting policy per prompt, as the game will show D
        params = SamplingParams(max_new_tokens=cfg.rollout.max_new_tokens, temperature=cfg.rollout.temperature,
                                top_p=cfg.rollout.top_p, top_k=cfg.rollout.top_k)
        texts = HFBackend(accelerator.unwrap_model(policy), processor, cfg.rollout.chunk_size).generate(prompts, params).texts
        negative = {id(ex): t for ex, t in zip(prompts, texts)}
        # a negative identical to its reference carries no signal
        train_idx = [ex for ex in train_idx if negative[id(ex)].strip() != ex.response.strip()]
        held_out = [ex for ex in held_out if negative[id(ex)].strip() != ex.response.strip()]
    if not train_idx:
        log.warning("warm-start skipped: every negative equals its teacher reference")
        return {}

    def negatives_for(batch: list[Example]) -> list[str]:
        if w.negatives == "corrupt":
            return [corrupt_response(ex.response, rng) for ex in batch]
        return [negative[id(ex)] for ex in batch]

    def accuracy(prefix: str) -> dict[str, float]:
        if not held_out:
            return {}
        acc = pairwise_accuracy(disc, held_out, [ex.response for ex in held_out], [negative[id(ex)] for ex in held_out])
        return {f"{prefix}/{k}" if k.endswith("_pairs") else f"{prefix}/{k}_acc": v for k, v in acc.items()}

    metrics = accuracy("warmup_before")
    bar = tqdm(range(w.steps), desc="warm-start", disable=not accelerator.is_main_process, dynamic_ncols=True)
    world, rank = accelerator.num_processes, accelerator.process_index
    for step in bar:
        # warmup.batch_size pairs per process, each process its own slice of the step's pairs
        first = (step * world + rank) * w.batch_size
        batch = [train_idx[(first + j) % len(train_idx)] for j in range(w.batch_size)]
        disc.train()
        loss, m = pair_loss(disc, batch, [ex.response for ex in batch], negatives_for(batch), cfg.discriminator.reg)
        (loss / world).backward()  # _sync_grads sums: the gradient of the mean over all processes' pairs
        _sync_grads(disc.trainable_parameters(), accelerator)
        if cfg.discriminator.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(disc.trainable_parameters(), cfg.discriminator.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        check_finite(step, out, warmup_loss=loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}", v=f"{m['perception/acc']:.2f}", r=f"{m['reasoning/acc']:.2f}")
    metrics.update(accuracy("warmup"))
    metrics.update({"warmup/steps": float(w.steps), "warmup/pairs": float(len(train_idx)),
                    "warmup/held_out_pairs": float(len(held_out))})
    if accelerator.is_main_process:
        disc.save_pretrained(out / "warmup")
        (out / "warmup" / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    accelerator.wait_for_everyone()
    log.info("warm-start: %s", {k: round(v, 3) for k, v in metrics.items()})
    return metrics


# ------------------------------------------------------------------------------------ the game


def train(cfg: AlignConfig, warmup_only: bool = False) -> dict:
    check_config(cfg)
    # --- build -----------------------------------------------------------------------------
    accelerator, out = setup_run(cfg)
    rank, world = accelerator.process_index, accelerator.num_processes
    processor = load_processor(cfg.model.path, cfg.model.trust_remote_code)
    prompts = load_alignment_data(cfg)
    eval_data = (load_examples(cfg.data.eval, cfg.data.format, require_answer=True, skip_bad=cfg.data.skip_bad,
                               limit=cfg.data.eval_limit) if cfg.data.eval else [])
    if len(prompts) < cfg.train.batch_size * world:
        raise DataError(f"{cfg.data.train}: {len(prompts)} prompts, fewer than one batch "
                        f"(train.batch_size={cfg.train.batch_size} x {world} processes)")

    resume_from = None if warmup_only else resolve_resume(cfg.train.resume, out)
    policy = load_model(cfg.model, trainable=True, device=accelerator.device, init_from=resume_from)
    disc_path = resume_from / DISC_DIR if resume_from else cfg.discriminator.path
    placement = Placement(cfg, accelerator)
    disc = build_discriminator(cfg, disc_path).to(placement.home)
    params = [p for p in policy.parameters() if p.requires_grad]
    opt_p, sched_p = make_optimizer(cfg, params)
    opt_d = torch.optim.AdamW(disc.trainable_parameters(), lr=cfg.discriminator.lr)
    policy, opt_p, params = prepare(accelerator, policy, opt_p, cfg.algo.micro_batch_size)
    backend = HFBackend(accelerator.unwrap_model(policy), processor, cfg.rollout.chunk_size)

    start, metrics = 0, {}
    if resume_from is not None:
        start = restore_optimizer(resume_from, opt_p, sched_p, rank, model=policy)["step"]
        opt_d.load_state_dict(torch.load(resume_from / "disc_optimizer.pt", weights_only=False))
    tracker = Tracker(out, cfg.logging, cfg.model_dump(mode="json"), enabled=accelerator.is_main_process)
    if start == 0 and cfg.warmup.steps > 0:
        if (out / "warmup" / "metrics.json").is_file() and not warmup_only:  # reuse a finished warm-start
            disc = build_discriminator(cfg, out / "warmup").to(placement.home)
            opt_d = torch.optim.AdamW(disc.trainable_parameters(), lr=cfg.discriminator.lr)
            metrics = json.loads((out / "warmup" / "metrics.json").read_text())
        else:
            warm_prompts = load_alignment_data(cfg, cfg.warmup.data) if cfg.warmup.data else prompts
            with placement.active(disc, opt_d):
                metrics = warmup(cfg, accelerator, policy, processor, disc, opt_d, warm_prompts, out)
            opt_d = torch.optim.AdamW(disc.trainable_parameters(), lr=cfg.discriminator.lr)  # fresh for the game
        tracker.log(metrics, 0)
    if warmup_only:
        tracker.close()
        return metrics

    G = cfg.rollout.group_size
    sampling = SamplingParams(max_new_tokens=cfg.rollout.max_new_tokens, temperature=cfg.rollout.temperature,
                              top_p=cfg.rollout.top_p, top_k=cfg.rollout.top_k, n=G)
    bar = tqdm(total=cfg.train.max_steps, initial=start, disable=not accelerator.is_main_process, desc="align",
               dynamic_ncols=True)

    # --- loop ------------------------------------------------------------------------------
    for step in range(start + 1, cfg.train.max_steps + 1):
        t0 = time.perf_counter()
        idx = micro_batch_indices(len(prompts), step - 1, cfg.train.batch_size, world, rank, cfg.train.seed)
        batch = [prompts[i] for i in idx]
        backend.sync_weights(accelerator.unwrap_model(policy))
        rollouts = backend.generate(batch, sampling)
        expanded = [ex for ex in batch for _ in range(G)]
        valid = torch.tensor([is_format_valid(t) for t in rollouts.texts])
        t1 = time.perf_counter()

        with placement.active(disc, opt_d):
            scores = disc.score(expanded, rollouts.texts, batch_size=cfg.discriminator.micro_batch_size * G)
        advantages = alignment_advantages(scores["perception"], scores["reasoning"], valid, G,
                                          cfg.align.alpha, cfg.align.format_penalty)
        t2 = time.perf_counter()
        update = policy_update(policy, opt_p, accelerator, rollouts, advantages, cfg.algo,
                               temperature=cfg.rollout.temperature, logprob_chunk_size=cfg.rollout.logprob_chunk_size,
                               logprob_token_budget=cfg.rollout.logprob_token_budget,
                               params=params, max_grad_norm=cfg.optim.max_grad_norm, step=step, out_dir=out)
        sched_p.step()
        t3 = time.perf_counter()
        d_metrics: dict[str, float] = {}
        with placement.active(disc, opt_d):
            for _ in range(cfg.discriminator.steps_per_policy_step):
                d_metrics = discriminator_update(disc, opt_d, accelerator, cfg, batch, rollouts.texts, valid)
        t4 = time.perf_counter()

        metrics = {f"rollout/{k}": v for k, v in rollout_monitors(batch, rollouts.texts, G).items()}
        metrics.update({f"score/{k}": float(v.mean()) for k, v in scores.items()})
        metrics.update({"rollout/advantage_abs": float(advantages.abs().mean()),
                        "rollout/length": float(rollouts.response_lengths.float().mean())})
        metrics.update({f"actor/{k}": v for k, v in update.items()})
        metrics.update({f"disc/{k}": v for k, v in d_metrics.items()})
        metrics.update({"time/generation": t1 - t0, "time/scoring": t2 - t1, "time/update": t3 - t2,
                        "time/discriminator": t4 - t3, "time/step": t4 - t0})
        if world > 1:
            keys = sorted(k for k in metrics if k.startswith(("rollout/", "score/", "disc/")))
            vals = accelerator.reduce(torch.tensor([metrics[k] for k in keys], device=accelerator.device), "mean")
            metrics.update(zip(keys, vals.tolist()))

        last = step == cfg.train.max_steps
        if eval_data and (last or cfg.eval.every and step % cfg.eval.every == 0):
            kw = dict(max_new_tokens=cfg.eval.max_new_tokens, batch_size=cfg.eval.batch_size)
            metrics.update(evaluate_policy(accelerator, policy, processor, eval_data, **kw))
            metrics.update(evaluate_policy(accelerator, policy, processor, eval_data, prefix="eval_sampled/",
                                           temperature=cfg.rollout.temperature or 1.0, **kw))
        if step % cfg.train.log_every == 0 or last or any(k.startswith("eval") for k in metrics):
            tracker.log(metrics, step)
        bar.update(1)
        bar.set_postfix(cap=f"{metrics.get('rollout/caption_match', 0):.2f}", acc=f"{metrics['rollout/accuracy']:.2f}",
                        dv=f"{metrics.get('disc/perception/acc', float('nan')):.2f}",
                        dr=f"{metrics.get('disc/reasoning/acc', float('nan')):.2f}")
        if last or cfg.train.save_every and step % cfg.train.save_every == 0:
            def extra(tmp: Path) -> None:
                disc.save_pretrained(tmp / DISC_DIR)
                torch.save(opt_d.state_dict(), tmp / "disc_optimizer.pt")

            save_policy_checkpoint(cfg, accelerator, step, policy, processor, opt_p, sched_p, {"metrics": metrics},
                                   extra=extra)

    bar.close()
    tracker.close()
    accelerator.end_training()
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
                                "(DESIGN §4). Subcommands: warmup (warm-start only), upcycle.")
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
