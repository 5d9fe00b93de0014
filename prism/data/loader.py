"""Batches built ahead of the training step in loader worker processes.

    batches = step_loader(lambda step: collate_step(step), first=start + 1, last=max_steps, workers=2)
    for step in range(start + 1, max_steps + 1):
        batch = next(batches)

A stage's batch is a pure function of its step (`prism.data.order`), so the loader needs no state of
its own: a resumed run starts it at the resumed step and gets exactly the batches the uninterrupted
run would have had, with or without workers. Workers (a `torch.utils.data.DataLoader` over step
numbers) decode images, apply the chat template and run the processor while the trainer computes;
each keeps `prefetch` steps ready and uses one torch thread.

RL and ALIGN draw their prompts the same way (`prompt_batch`: the draw number decides the batch);
with workers, those decode the prompts' images ahead, so the trainer's sampler gets RGB images
ready to process.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from typing import TypeVar

import torch
from torch.utils.data import DataLoader, Dataset

from prism.core.example import Example, load_image
from prism.data.order import batch_indices

T = TypeVar("T")


class _Steps(Dataset):
    def __init__(self, make: Callable[[int], T], first: int, last: int):
        self.make, self.first, self.last = make, first, last

    def __len__(self) -> int:
        return max(0, self.last - self.first + 1)

    def __getitem__(self, i: int):
        return self.make(self.first + i)


def _one_thread(_worker: int) -> None:
    torch.set_num_threads(1)  # workers share the cores with the trainer


def step_loader(make: Callable[[int], T], first: int, last: int, workers: int = 0, prefetch: int = 2) -> Iterator[T]:
    """`make(step)` for step = first .. last, in order: in this process (`workers` 0) or built ahead by
    `workers` loader processes, `prefetch` steps each."""
    if workers == 0:
        return (make(step) for step in range(first, last + 1))
    # its own generator: starting the workers draws their base seed, which must not move the global RNG
    # (the trainer's sampling draws from it, so a run with workers would sample differently)
    loader = DataLoader(_Steps(make, first, last), batch_size=None, shuffle=False, num_workers=workers,
                        prefetch_factor=prefetch, worker_init_fn=_one_thread, generator=torch.Generator())
    return iter(loader)


def prompt_batches(prompts: Sequence[Example], per_step: int, world: int, rank: int, seed: int, first: int,
                   last: int, workers: int = 0, prefetch: int = 2) -> Iterator[list[Example]]:
    """This process's prompt batches number `first` .. `last` (`prompt_batch`), in order: built here, or
    ahead by `workers` loader processes, which also decode the images."""
    make = functools.partial(prompt_batch, prompts, per_step, world, rank, seed, workers > 0)
    return step_loader(make, first, last, workers, prefetch)


def prompt_batch(prompts: Sequence[Example], per_step: int, world: int, rank: int, seed: int, decode: bool,
                 draw: int) -> list[Example]:
    """This process's prompts of global batch number `draw` (`batch_indices`), with their images
    decoded (`decode_images`) when `decode`."""
    batch = [prompts[i] for i in batch_indices(len(prompts), draw, per_step, world, rank, seed)]
    return decode_images(batch) if decode else batch


def decode_images(examples: Sequence[Example]) -> list[Example]:
    """The examples with every image as an RGB PIL image (`load_image`, as the samplers decode them)."""
    return [replace(ex, images=[load_image(ref, ex.source) for ref in ex.images]) if ex.images else ex
            for ex in examples]
