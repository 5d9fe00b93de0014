"""Atomic checkpoints with everything needed to resume exactly.

    OUTPUT_DIR/checkpoint-000050/
        config.json, model.safetensors, ...    save_pretrained of the model (a peft adapter under LoRA;
                                               the merged model in merged/ when asked for)
        tokenizer.json, processor_config.json  save_pretrained of the processor
        config.yaml                            the resolved stage config
        optimizer.pt, scheduler.pt             optimizer and LR-scheduler state
        rng_state_<rank>.pt                    python / numpy / torch (/ cuda) RNG state of each process
        trainer_state.json                     step, metrics; written last: marks the checkpoint complete

Everything is written into `.tmp-checkpoint-000050` first and renamed into place by one
`os.replace`, so a process killed mid-save (even with SIGKILL) leaves the previous checkpoints
untouched and at worst a `.tmp-*` directory that the next save removes.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

STATE_FILE = "trainer_state.json"
_CKPT = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / f"checkpoint-{step:06d}"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints (those with a trainer_state.json), oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _CKPT.match(p.name)) and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def resolve_resume(resume: str, output_dir: str | Path) -> Path | None:
    """`auto` -> latest complete checkpoint in output_dir (or None); `none` -> None; else a path."""
    if resume == "none":
        return None
    if resume == "auto":
        ckpts = list_checkpoints(output_dir)
        return ckpts[-1] if ckpts else None
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"train.resume: {path} is not a complete checkpoint (no {STATE_FILE})")
    return path


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    output_dir: str | Path,
    step: int,
    write: Callable[[Path], None],
    state: dict[str, Any],
    *,
    rank: int = 0,
    barrier: Callable[[], None] = lambda: None,
    keep_last: int | None = None,
    every_rank: Callable[[Path], None] | None = None,
) -> Path:
    """Write a checkpoint atomically; every process calls this.

    `write(tmp_dir)` is called on rank 0 only and writes the model, processor, optimizer, ...
    Each rank adds its RNG state, and `every_rank(tmp_dir)` if given (e.g. DeepSpeed's sharded
    optimizer states, a collective call). `state` (JSON-able) becomes trainer_state.json, written last.
    """
    root = Path(output_dir)
    final = checkpoint_dir(root, step)
    tmp = root / f".tmp-{final.name}"
    if rank == 0:
        for stale in root.glob(".tmp-checkpoint-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    torch.save(rng_state(), tmp / f"rng_state_{rank}.pt")
    if every_rank is not None:
        every_rank(tmp)
    if rank == 0:
        write(tmp)
        (tmp / STATE_FILE).write_text(json.dumps({"step": step, **state}, indent=2))
    barrier()
    if rank == 0:
        if final.exists():  # re-saving the same step (e.g. a resumed run that ends where it began)
            shutil.rmtree(final)
        os.replace(tmp, final)
        if keep_last:
            for old in list_checkpoints(root)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def load_trainer_state(ckpt: Path, rank: int = 0) -> dict[str, Any]:
    """trainer_state.json of a checkpoint; restores this rank's RNG state as a side effect."""
    rng_file = ckpt / f"rng_state_{rank}.pt"
    if not rng_file.is_file():  # resumed on more processes than saved: reuse rank 0's state
        rng_file = ckpt / "rng_state_0.pt"
    set_rng_state(torch.load(rng_file, weights_only=False))
    return json.loads((ckpt / STATE_FILE).read_text())
