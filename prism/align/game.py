"""The discriminator's side of the ALIGN game (docs/design.md §4): building it, where it lives, its
update on each batch of rollouts, and the rollout monitors. The policy's side is the shared clipped
update (`prism.loop.policy_update`)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from prism.align.config import AlignConfig
from prism.align.discriminator import MoEDiscriminator
from prism.align.losses import COMPONENTS, discriminator_loss
from prism.core.errors import ConfigError
from prism.core.example import Example
from prism.core.response import parse_response
from prism.core.task import Task
from prism.dist import ModelUpdate, make_optimizer, reduce_sum, replicated_load
from prism.rewards import answer_matches

DISC_DIR = "discriminator"
"""Where a checkpoint holds the discriminator."""


def build_discriminator(cfg: AlignConfig, path: str | Path) -> MoEDiscriminator:
    """The discriminator from `path` (a VLM directory or a saved discriminator) with the config's settings,
    whole on every process (no DeepSpeed engine owns it; see `replicated_load`)."""
    with replicated_load():
        return MoEDiscriminator.from_pretrained(path, dtype=cfg.model.dtype,
                                                chat_template=cfg.discriminator.chat_template,
                                                image_pixels=(cfg.data.image_min_pixels, cfg.data.image_max_pixels),
                                                **cfg.discriminator.architecture().model_dump())


def discriminator_player(cfg: AlignConfig, accelerator, disc: MoEDiscriminator) -> ModelUpdate:
    """A fresh AdamW (constant `discriminator.lr`) over the discriminator's trainable parameters, and its
    update path: replicated on every process, gradients summed by one all-reduce (`prism.dist.update`)."""
    d = cfg.discriminator
    params = disc.trainable_parameters()
    optimizer, _ = make_optimizer(params, d.lr, weight_decay=d.weight_decay)
    return ModelUpdate(accelerator, disc, optimizer, params, d.max_grad_norm, replicated=True,
                       max_change=cfg.optim.max_param_change, name="discriminator", lr_key="discriminator.lr")


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


def _scores(disc: MoEDiscriminator, batch: list[Example], refs, parsed, G: int, aux_coef: float):
    """Scores of each prompt's teacher reference (repeated for its G rollouts) and of the rollouts, per
    expert, and the router's load-balancing loss (upcycled experts)."""
    expanded = [ex for ex in batch for _ in range(G)]
    teacher, policy, aux = {}, {}, 0.0
    for comp in COMPONENTS:
        t_out = disc(disc.encode_parsed(batch, refs, comp), comp)
        p_out = disc(disc.encode_parsed(expanded, parsed, comp), comp)
        teacher[comp], policy[comp] = t_out.scores.repeat_interleave(G), p_out.scores
        for o in (t_out, p_out):
            if o.aux_loss is not None:
                aux = aux + aux_coef * o.aux_loss
    return teacher, policy, aux


def discriminator_update(disc: MoEDiscriminator, update: ModelUpdate, cfg: AlignConfig, prompts: list[Example],
                         texts: list[str], valid: torch.Tensor, step: int = 0) -> dict[str, float]:
    """One optimizer step of D on (teacher reference, rollout) pairs; rollouts of prompt b are rows b·G..b·G+G−1.

    The teacher reference of each prompt is scored once and paired with each of its G rollouts.
    Micro-batches of `discriminator.prompts_per_micro_batch` prompts; each one's loss is weighted by its
    share of the valid rollouts of the whole (multi-process) batch.
    """
    G = cfg.rollout.group_size
    world = update.world
    n_valid = reduce_sum(update.accelerator, valid.float().sum())
    disc.train()
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}  # each metric's own weight: valid rollouts (distinct ones for acc_distinct)
    mb = cfg.discriminator.prompts_per_micro_batch
    for start in range(0, len(prompts), mb):
        batch = prompts[start: start + mb]
        rows = slice(start * G, (start + len(batch)) * G)
        parsed = [parse_response(t) for t in texts[rows]]
        refs = [parse_response(ex.response) for ex in batch]
        teacher, policy, aux = _scores(disc, batch, refs, parsed, G, cfg.discriminator.aux_loss_coef)
        v = valid[rows].to(disc.device)
        distinct = {comp: torch.tensor([disc.segment(p, comp) != disc.segment(r, comp)
                                        for p, r in zip(parsed, (r for r in refs for _ in range(G)))])
                    for comp in COMPONENTS}
        loss, m = discriminator_loss(teacher, policy, v, cfg.discriminator.reg, distinct)
        share = float(v.sum()) / max(n_valid, 1.0)
        # the router loss is a mean over this process's prompts; the update sums it over processes
        update.backward(loss * share + aux * len(batch) / (len(prompts) * world))
        if m["n_valid"]:
            for k, val in m.items():
                if k not in ("no_valid", "n_valid"):
                    key_weight = m["n_valid"] * (m[k.replace("acc_distinct", "distinct")] if "acc_distinct" in k else 1)
                    sums[k] = sums.get(k, 0.0) + val * key_weight
                    weights[k] = weights.get(k, 0.0) + key_weight
        if torch.is_tensor(aux):
            sums["aux_loss"] = sums.get("aux_loss", 0.0) + float(aux.detach()) * len(batch)
    if n_valid > 0:  # the same decision on every process (n_valid is global)
        update.step(step)
    else:
        update.zero_grad()
    metrics = {k: v / max(weights[k], 1e-9) for k, v in sums.items() if k != "aux_loss"}
    if "aux_loss" in sums:
        metrics["aux_loss"] = sums["aux_loss"] / len(prompts)
    metrics["no_valid"] = float(n_valid == 0)  # nothing to compare this step: D was left unchanged
    return metrics


def rollout_monitors(prompts: list[Example], texts: list[str], G: int, task: Task | None = None) -> dict[str, float]:
    """Format rate, answer accuracy and (with a task that checks captions) caption match of the rollouts, and
    with a task that names its caption errors (`caption_errors`, `caption_error_kinds`) the fraction of
    rollouts with each kind (`caption_error/<kind>`)."""
    parsed = [parse_response(t) for t in texts]
    expanded = [ex for ex in prompts for _ in range(G)]
    out = {"format_rate": sum(p.valid for p in parsed) / len(parsed),
           "accuracy": sum(answer_matches(p.answer, ex.answers) for p, ex in zip(parsed, expanded)) / len(parsed),
           "length_chars": sum(len(t) for t in texts) / len(texts)}
    checked = [c for c in (task.caption_correct(p.caption, ex) for p, ex in zip(parsed, expanded))
               if c is not None] if task is not None else []
    if checked:
        out["caption_match"] = sum(checked) / len(checked)
        kinds = getattr(task, "caption_error_kinds", ())
        found = [f for f in (task.caption_errors(p.caption, ex) for p, ex in zip(parsed, expanded))
                 if f is not None] if kinds else []
        if found:
            for kind in kinds:
                out[f"caption_error/{kind}"] = sum(kind in f for f in found) / len(found)
    return out
