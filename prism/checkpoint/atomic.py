"""Atomic checkpoints with everything needed to resume exactly.

    OUTPUT_DIR/checkpoint-000050/
        config.json, model.safetensors, ...    save_pretrained of the model (a peft adapter under LoRA;
                                               the merged model in merged/ when asked for)
        tokenizer.json, processor_config.json  save_pretrained of the processor
        config.yaml                            the resolved stage config
        optimizer.pt, scheduler.pt             optimizer and LR-scheduler state
        rng_state_<rank>.pt                    python / numpy / torch (/ cuda) RNG state of each process
        trainer_state.json                     step, metrics and the size of every other file;
                                               written last: marks the checkpoint complete

Everything is written into `.tmp-checkpoint-000050` first and renamed into place by one
`os.replace`, so a process killed mid-save (even with SIGKILL) leaves the previous checkpoints
untouched and at worst a `.tmp-*` directory that the next save removes. A save that fails (a full
disk) removes its temporary directory and stops the run with one line; the checkpoints before it
stay intact.

A checkpoint that was complete once can still be damaged afterwards (a copy cut short, a disk
fault): `checkpoint_problem` compares every file with the sizes recorded in trainer_state.json and
reads the safetensors headers, and `find_resume` skips such a checkpoint for the newest one that loads.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from prism.core.errors import ConfigError, RunError
from prism.models.loader import safetensors_fault

log = logging.getLogger("prism")

STATE_FILE = "trainer_state.json"
FILES_KEY = "files"  # in trainer_state.json: {relative path: size in bytes} of every other file
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


def checkpoint_step(ckpt: Path) -> int:
    m = _CKPT.match(Path(ckpt).name)
    return int(m.group(1)) if m else -1


def checkpoint_problem(ckpt: str | Path) -> str | None:
    """Why a checkpoint cannot be resumed from (None: it can). Cheap: sizes and headers, no tensor reads.

    Checked: trainer_state.json parses; every file it lists has its recorded size (checkpoints saved
    before sizes were recorded skip this); every safetensors header is whole and covers its data; every
    torch .pt file is a readable zip archive."""
    ckpt = Path(ckpt)
    try:
        state = json.loads((ckpt / STATE_FILE).read_text())
    except FileNotFoundError:
        return f"no {STATE_FILE} (an unfinished save)"
    except (OSError, ValueError) as e:
        return f"{STATE_FILE} is unreadable ({str(e).splitlines()[0]})"
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        return f"{STATE_FILE} has no step"
    for rel, size in (state.get(FILES_KEY) or {}).items():
        f = ckpt / rel
        if not f.is_file():
            return f"{rel} is missing"
        if f.stat().st_size != size:
            return f"{rel} has {f.stat().st_size} bytes, {size} were saved"
    for f in sorted(ckpt.rglob("*.safetensors")):
        why = safetensors_fault(f)
        if why:
            return f"{f.relative_to(ckpt)} is truncated or corrupt ({why})"
    for f in sorted(ckpt.rglob("*.pt")):
        try:
            with zipfile.ZipFile(f):
                pass
        except (OSError, zipfile.BadZipFile):
            return f"{f.relative_to(ckpt)} is truncated or corrupt"
    return None


def find_resume(resume: str, output_dir: str | Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The checkpoint to resume from and the newer ones that cannot be used, with the reason.

    `auto`: the newest checkpoint in output_dir that loads (or None); `none`: None; else the path,
    which must be a checkpoint that loads (ConfigError naming train.resume otherwise). Pure: nothing
    on disk changes (`set_aside` moves the broken ones out of the way)."""
    if resume == "none":
        return None, []
    if resume == "auto":
        broken = []
        for ckpt in reversed(list_checkpoints(output_dir)):
            problem = checkpoint_problem(ckpt)
            if problem is None:
                return ckpt, broken
            broken.append((ckpt, problem))
        return None, broken
    path = Path(resume)
    if not path.is_dir():
        raise ConfigError(f"train.resume: {path} is not a checkpoint directory")
    problem = checkpoint_problem(path)
    if problem is not None:
        raise ConfigError(f"train.resume: {path} cannot be resumed from: {problem}")
    return path, []


def resolve_resume(resume: str, output_dir: str | Path) -> Path | None:
    """`find_resume`'s checkpoint (without moving anything)."""
    return find_resume(resume, output_dir)[0]


def set_aside(ckpt: Path, reason: str) -> Path:
    """Rename a checkpoint that cannot be resumed from to `broken-checkpoint-N` (never deleted: the
    user decides), so that neither resume nor pruning takes it for a good one."""
    target = ckpt.with_name(f"broken-{ckpt.name}")
    n = 1
    while target.exists():
        n += 1
        target = ckpt.with_name(f"broken-{ckpt.name}.{n}")
    os.replace(ckpt, target)
    log.warning("%s cannot be resumed from (%s); moved to %s, resuming from the newest checkpoint before it",
                ckpt, reason, target.name)
    return target


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
    with _write_failures(root, final, step, tmp if rank == 0 else None):
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
    barrier()  # every process's files are in place: record their sizes, mark the checkpoint complete
    if rank == 0:
        with _write_failures(root, final, step, tmp):
            files = {str(f.relative_to(tmp)): f.stat().st_size for f in sorted(tmp.rglob("*")) if f.is_file()}
            (tmp / STATE_FILE).write_text(json.dumps({"step": step, **state, FILES_KEY: files}, indent=2))
        if final.exists():  # re-saving the same step (e.g. a resumed run that ends where it began)
            shutil.rmtree(final)
        os.replace(tmp, final)
        if keep_last:  # older checkpoints only: a newer one can only be another run's, never pruned silently
            older = [c for c in list_checkpoints(root) if checkpoint_step(c) < step]
            for old in older[:len(older) - (keep_last - 1)]:
                shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


@contextmanager
def _write_failures(root: Path, final: Path, step: int, tmp: Path | None):
    """A failed write (a full disk, a file system gone read-only) removes the unfinished checkpoint and
    stops the run with one line; the checkpoints before it are left as they were."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        # torch.save reports a full disk as RuntimeError("... file write failed"); other RuntimeErrors are bugs
        if isinstance(e, RuntimeError) and "write" not in str(e):
            raise
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        before = list_checkpoints(root)
        kept = f"{before[-1]} is intact" if before else "no earlier checkpoint was saved"
        reason = getattr(e, "strerror", None) or str(e).splitlines()[0]
        raise RunError(f"step {step}: could not write checkpoint {final} ({reason}); {kept}. Free space or fix "
                       "train.output_dir, then resume with train.resume=auto") from None


def load_trainer_state(ckpt: Path, rank: int = 0) -> dict[str, Any]:
    """trainer_state.json of a checkpoint; restores this rank's RNG state as a side effect."""
    rng_file = ckpt / f"rng_state_{rank}.pt"
    if not rng_file.is_file():  # resumed on more processes than saved: reuse rank 0's state
        rng_file = ckpt / "rng_state_0.pt"
    set_rng_state(torch.load(rng_file, weights_only=False))
    return json.loads((ckpt / STATE_FILE).read_text())
