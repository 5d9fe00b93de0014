"""Discriminator warm-start (docs/design.md §4): before the game, each expert learns to prefer the teacher
reference over a negative response to the same prompt, on its own component.

Negatives are samples of the starting (SFT) policy — what the game will show the discriminator —
or, for a controlled check, the reference with one caption error and one reasoning error: the
task's own corruption (`Task.corrupt_response`, e.g. one grid cell and one count changed) or, without
a task, the word-level `corrupt_response` below. Held-out prompts report pairwise accuracy per expert.

The warmed-up discriminator is saved atomically to OUTPUT_DIR/warmup with its metrics, every process's
RNG state and a fingerprint of what shaped it (`warmup_fingerprint`: the settings, the number of
processes, and the size and modification time of the data and model files). A run of the same output
dir that has not reached its first checkpoint reuses it only when the fingerprint matches, and then
continues from its RNG state exactly as if the warm-start had just run (`reuse_warm_start`).
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from prism.align.config import AlignConfig
from prism.align.discriminator import MoEDiscriminator
from prism.align.losses import COMPONENTS, discriminator_loss
from prism.checkpoint.atomic import rng_state, set_rng_state
from prism.core.config import config_changes
from prism.core.example import Example
from prism.core.response import parse_response
from prism.core.rollouts import SamplingParams
from prism.core.task import Task
from prism.dist import ModelUpdate
from prism.rollout.engine import RolloutBackend

log = logging.getLogger("prism.align")

WARMUP_DIR = "warmup"
FINGERPRINT_FILE = "fingerprint.json"

_WORD = re.compile(r"[A-Za-z]+")
_DIGIT = re.compile(r"\d")
Corruption = Callable[[str, random.Random], str]


def swap_one(text: str, pattern: re.Pattern, choices: Sequence[str], rng: random.Random) -> str:
    """`text` with one match of `pattern` (chosen by `rng`) replaced by another of `choices`; with no
    match, a choice appended."""
    spots = list(pattern.finditer(text))
    if not spots:
        return text + " " + rng.choice(choices)
    m = rng.choice(spots)
    options = [c for c in choices if c != m.group(0)]
    return text[:m.start()] + rng.choice(options) + text[m.end():]


def _swap_word(text: str, rng: random.Random, extra: str) -> str:
    words = sorted(set(_WORD.findall(text))) or [extra]
    return swap_one(text, _WORD, words + [extra], rng)


def corrupt_caption(caption: str, rng: random.Random) -> str:
    """A perception error for any task: one word of the caption replaced by another of its words."""
    return _swap_word(caption, rng, "nothing")


def corrupt_think(think: str, rng: random.Random) -> str:
    """A reasoning error for any task: one digit changed, else one word replaced by another of its words."""
    if _DIGIT.search(think):
        return swap_one(think, _DIGIT, list("0123456789"), rng)
    return _swap_word(think, rng, "not")


def corrupt_response(response: str, rng: random.Random, caption: Corruption = corrupt_caption,
                     think: Corruption = corrupt_think) -> str:
    """The response with one caption error and one reasoning error (answer unchanged). A task passes its
    own section corruptions (`Task.corrupt_response`); these defaults know no task."""
    p = parse_response(response)
    return (f"<caption>{caption(p.caption or '', rng)}</caption>"
            f"<think>{think(p.think or '', rng)}</think><answer>{p.answer or ''}</answer>")


def pair_loss(disc: MoEDiscriminator, examples: Sequence[Example], teacher: Sequence[str],
              negative: Sequence[str], reg: float) -> tuple[torch.Tensor, dict[str, float]]:
    """discriminator_loss on (teacher, negative) pairs; each expert sees only its own section."""
    t_parsed, n_parsed = [parse_response(r) for r in teacher], [parse_response(r) for r in negative]
    teacher_scores, neg_scores, aux = {}, {}, 0.0
    for comp in COMPONENTS:
        t_out = disc(disc.encode_parsed(examples, t_parsed, comp), comp)
        n_out = disc(disc.encode_parsed(examples, n_parsed, comp), comp)
        teacher_scores[comp], neg_scores[comp] = t_out.scores, n_out.scores
        for o in (t_out, n_out):
            if o.aux_loss is not None:
                aux = aux + disc.config.aux_loss_coef * o.aux_loss
    valid = torch.ones(len(examples), dtype=torch.bool, device=teacher_scores["perception"].device)
    loss, metrics = discriminator_loss(teacher_scores, neg_scores, valid, reg)
    return loss + aux, metrics


@torch.no_grad()
def pairwise_accuracy(disc: MoEDiscriminator, examples: Sequence[Example], teacher: Sequence[str],
                      negative: Sequence[str], batch_size: int = 16) -> dict[str, float]:
    """Per expert, the fraction of pairs whose sections differ where the teacher's section scores
    higher (a negative with the reference's very caption cannot be told apart; such pairs are left
    out, and `<expert>_pairs` says how many were compared)."""
    t = disc.score(examples, teacher, batch_size)
    n = disc.score(examples, negative, batch_size)
    out = {}
    for comp in COMPONENTS:
        differ = torch.tensor([disc.segment(parse_response(a), comp) != disc.segment(parse_response(b), comp)
                               for a, b in zip(teacher, negative)])
        out[comp] = float((t[comp] > n[comp])[differ].float().mean()) if differ.any() else float("nan")
        out[f"{comp}_pairs"] = float(differ.sum())
    return out


def _negatives(cfg: AlignConfig, backend: RolloutBackend, prompts: list[Example], held_out: list[Example],
               train: list[Example], corrupt: Corruption, rng: random.Random):
    """(held-out prompts, training prompts, {id(prompt): its fixed negative}, negatives_for(batch)).

    Corrupted negatives: fixed for the held-out prompts, fresh each time a training prompt is drawn (the
    experts learn what a wrong cell or step looks like, not one string per prompt). Policy negatives: one
    sample per prompt, as the game will show D; a sample identical to its reference carries no signal
    and its prompt is left out."""
    if cfg.warmup.negatives == "corrupt":
        fixed = {id(ex): corrupt(ex.response, rng) for ex in held_out}
        return held_out, train, fixed, lambda batch: [corrupt(ex.response, rng) for ex in batch]
    r = cfg.rollout
    params = SamplingParams(max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k)
    texts = backend.rollout(prompts, params).texts
    fixed = {id(ex): t for ex, t in zip(prompts, texts)}
    differs = [ex for ex in train if fixed[id(ex)].strip() != ex.response.strip()]
    held_out = [ex for ex in held_out if fixed[id(ex)].strip() != ex.response.strip()]
    return held_out, differs, fixed, lambda batch: [fixed[id(ex)] for ex in batch]


def warm_start(cfg: AlignConfig, accelerator, backend: RolloutBackend, disc: MoEDiscriminator, update: ModelUpdate,
               prompts: list[Example], out: Path, task: Task | None = None) -> dict[str, float]:
    """Train each expert on (teacher reference, negative) pairs for `warmup.steps` steps; report held-out
    pairwise accuracy before and after; save the warmed-up discriminator to OUTPUT_DIR/warmup."""
    w = cfg.warmup
    rng = random.Random(cfg.train.seed)
    order = list(range(len(prompts)))
    rng.shuffle(order)
    n_eval = min(w.eval_pairs, len(prompts) // 4)
    corrupt = task.corrupt_response if task is not None else corrupt_response
    held_out, train_prompts, fixed, negatives_for = _negatives(
        cfg, backend, prompts, [prompts[i] for i in order[:n_eval]], [prompts[i] for i in order[n_eval:]], corrupt, rng)
    if not train_prompts:
        log.warning("warm-start skipped: every negative equals its teacher reference")
        return {}

    def accuracy(prefix: str) -> dict[str, float]:
        if not held_out:
            return {}
        acc = pairwise_accuracy(disc, held_out, [ex.response for ex in held_out], [fixed[id(ex)] for ex in held_out])
        return {f"{prefix}/{k}" if k.endswith("_pairs") else f"{prefix}/{k}_acc": v for k, v in acc.items()}

    metrics = accuracy("warmup_before")
    bar = tqdm(range(w.steps), desc="warm-start", disable=not accelerator.is_main_process, dynamic_ncols=True)
    world, rank = accelerator.num_processes, accelerator.process_index
    for step in bar:
        # warmup.pairs_per_step pairs per process, each process its own slice of the step's pairs
        first = (step * world + rank) * w.pairs_per_step
        batch = [train_prompts[(first + j) % len(train_prompts)] for j in range(w.pairs_per_step)]
        disc.train()
        loss, m = pair_loss(disc, batch, [ex.response for ex in batch], negatives_for(batch), cfg.discriminator.reg)
        update.backward(loss / world)  # summed over processes: the gradient of the mean over all pairs
        update.step(f"warm-start step {step + 1}", warmup_loss=loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}", v=f"{m['perception/acc']:.2f}", r=f"{m['reasoning/acc']:.2f}")
    metrics.update(accuracy("warmup"))
    metrics.update({"warmup/steps": float(w.steps), "warmup/pairs": float(len(train_prompts)),
                    "warmup/held_out_pairs": float(len(held_out))})
    save_warm_start(accelerator, disc, metrics, out, warmup_fingerprint(cfg, accelerator.num_processes))
    log.info("warm-start: %s", {k: round(v, 3) for k, v in metrics.items()})
    return metrics


def _stat(path: str | None) -> dict[str, list[int]]:
    """{file: [size, mtime_ns]} of a data file, or of a model directory's config and weights."""
    if not path:
        return {}
    p = Path(path)
    files = [p] if p.is_file() else sorted([*p.glob("config.json"), *p.glob("*.safetensors"), *p.glob("*/*.safetensors")])
    return {str(f): [f.stat().st_size, f.stat().st_mtime_ns] for f in files if f.is_file()}


def warmup_fingerprint(cfg: AlignConfig, world: int) -> dict:
    """What shapes the warm-start: its settings, the discriminator's, the starting policy's (which samples
    the negatives) with its sampling settings, the data, the seed and the number of processes, and the size
    and modification time of the data and model files. Where it lives (discriminator.device / offload) and
    what happens after it (the game's settings) are left out."""
    d = cfg.discriminator.model_dump(mode="json", exclude={"device", "offload", "collapse_window", "stop_on_collapse"})
    data = cfg.warmup.data or cfg.data.train
    return {
        "warmup": cfg.warmup.model_dump(mode="json"), "discriminator": d, "model": cfg.model.model_dump(mode="json"),
        "rollout": cfg.rollout.model_dump(mode="json") if cfg.warmup.negatives == "policy" else None,
        "data": {"train": data, "format": cfg.data.format, "task": cfg.data.task, "skip_bad": cfg.data.skip_bad,
                 "skip_missing_references": cfg.align.skip_missing_references},
        "seed": cfg.train.seed, "processes": world,
        "files": {**_stat(data), **_stat(cfg.model.path), **_stat(cfg.discriminator.path)},
    }


def save_warm_start(accelerator, disc: MoEDiscriminator, metrics: dict, out: Path, fingerprint: dict) -> None:
    """OUTPUT_DIR/warmup, written into a temporary directory and renamed into place: the discriminator,
    metrics.json, each process's RNG state (the game continues from it) and fingerprint.json (last)."""
    tmp, final = out / f".tmp-{WARMUP_DIR}", out / WARMUP_DIR
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        disc.save_pretrained(tmp)
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    accelerator.wait_for_everyone()
    torch.save(rng_state(), tmp / f"rng_state_{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / FINGERPRINT_FILE).write_text(json.dumps(fingerprint, indent=2) + "\n")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    accelerator.wait_for_everyone()


def reusable_warm_start(cfg: AlignConfig, out: Path, world: int, rank: int) -> Path | None:
    """OUTPUT_DIR/warmup when a previous run of this output dir finished a warm-start with the same
    fingerprint; None when there is none, or (with a warning naming every difference) when it was made
    with other settings or files: it is then done again."""
    path = out / WARMUP_DIR
    if not path.is_dir():
        return None
    try:
        saved = json.loads((path / FINGERPRINT_FILE).read_text())
    except (OSError, ValueError):
        log.warning("%s has no readable %s (made by an older prism, or unfinished): warming up again",
                    path, FINGERPRINT_FILE)
        return None
    changes = config_changes(saved, warmup_fingerprint(cfg, world))
    if changes:
        log.warning("%s was made with other settings or files; warming up again. Changed: %s", path,
                    "; ".join(changes))
        return None
    if not (path / "metrics.json").is_file() or not (path / f"rng_state_{rank}.pt").is_file():
        log.warning("%s is incomplete: warming up again", path)
        return None
    return path


def restore_warm_start_rng(path: Path, rank: int) -> None:
    """Continue from the RNG state the warm-start ended with, as the run that did it continued."""
    set_rng_state(torch.load(path / f"rng_state_{rank}.pt", weights_only=False))
