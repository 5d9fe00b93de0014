"""Discriminator warm-start (DESIGN §4): before the game, each expert learns to prefer the teacher
reference over a negative response to the same prompt, on its own component.

Negatives are samples of the starting (SFT) policy — what the game will show the discriminator —
or, for a controlled check, the reference with one caption cell and one reasoning step changed
(`corrupt_response`). Held-out prompts report pairwise accuracy per expert.
"""

from __future__ import annotations

import random
import re
from typing import Sequence

import torch

from prism.align.discriminator import COMPONENTS, SECTION_OF, MoEDiscriminator
from prism.align.losses import discriminator_loss
from prism.data.example import Example
from prism.data.synthetic import COLORS, NUMBER_WORDS
from prism.response import parse_response

_WORD = re.compile(r"[A-Za-z]+")
_DIGIT = re.compile(r"\d")
_NUMBER_WORD = re.compile(r"\b(" + "|".join(NUMBER_WORDS) + r")\b")


def _swap_one(text: str, pattern: re.Pattern, choices: Sequence[str], rng: random.Random) -> str:
    spots = list(pattern.finditer(text))
    if not spots:
        return text + " " + rng.choice(choices)
    m = rng.choice(spots)
    options = [c for c in choices if c != m.group(0)]
    return text[:m.start()] + rng.choice(options) + text[m.end():]


def corrupt_caption(caption: str, rng: random.Random) -> str:
    """One perception error: a colour word (else any word) replaced by another."""
    colours = re.compile(r"\b(" + "|".join(COLORS) + r")\b")
    if colours.search(caption):
        return _swap_one(caption, colours, list(COLORS), rng)
    words = sorted(set(_WORD.findall(caption))) or ["nothing"]
    return _swap_one(caption, _WORD, words + ["nothing"], rng)


def corrupt_think(think: str, rng: random.Random) -> str:
    """One reasoning error: a number word changed (else a digit, else any word replaced)."""
    if _NUMBER_WORD.search(think):
        return _swap_one(think, _NUMBER_WORD, NUMBER_WORDS[:13], rng)
    if _DIGIT.search(think):
        return _swap_one(think, _DIGIT, list("0123456789"), rng)
    words = sorted(set(_WORD.findall(think))) or ["so"]
    return _swap_one(think, _WORD, words + ["not"], rng)


def corrupt_response(response: str, rng: random.Random) -> str:
    """The response with one caption error and one reasoning error (answer unchanged)."""
    p = parse_response(response)
    return (f"<caption>{corrupt_caption(p.caption or '', rng)}</caption>"
            f"<think>{corrupt_think(p.think or '', rng)}</think><answer>{p.answer or ''}</answer>")


def pair_loss(disc: MoEDiscriminator, examples: Sequence[Example], teacher: Sequence[str],
              negative: Sequence[str], reg: float) -> tuple[torch.Tensor, dict[str, float]]:
    """discriminator_loss on (teacher, negative) pairs; each expert sees only its own section."""
    t_parsed, n_parsed = [parse_response(r) for r in teacher], [parse_response(r) for r in negative]
    teacher_scores, neg_scores, aux = {}, {}, 0.0
    for comp in COMPONENTS:
        sec = SECTION_OF[comp]
        t_out = disc(disc.encode(examples, [getattr(p, sec) or "" for p in t_parsed], comp), comp)
        n_out = disc(disc.encode(examples, [getattr(p, sec) or "" for p in n_parsed], comp), comp)
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
        sec = SECTION_OF[comp]
        differ = torch.tensor([getattr(parse_response(a), sec) != getattr(parse_response(b), sec)
                               for a, b in zip(teacher, negative)])
        out[comp] = float((t[comp] > n[comp])[differ].float().mean()) if differ.any() else float("nan")
        out[f"{comp}_pairs"] = float(differ.sum())
    return out
