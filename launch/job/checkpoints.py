"""Checkpoints: sharded saves that a kill never leaves torn, and one choice for every rank.

[Note: committing a checkpoint]
A checkpoint is a directory ``step-NNNNNN`` (the step, six digits or more) that holds the
marker ``.committed``; resuming considers nothing else. A save
  1. writes into the sibling ``step-NNNNNN.saving``, every rank its own part (rank 0 first
     clears what a save cut short left there);
  2. waits for every rank to finish writing (a barrier);
  3. on rank 0: uncommits and removes an existing ``step-NNNNNN`` (a restarted attempt
     saves its steps again), renames the sibling into place and writes the marker last,
     then keeps the newest two checkpoints and drops what saves cut short left.
A kill at any point leaves the checkpoints committed before it, or those and the new one:
never a chosen directory that holds parts of two saves, or of half of one.
Checkpoints are ordered by their step number, not their name: ``step-1000000`` follows
``step-999000``.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.checkpoint.stateful import Stateful

import distavg

MARKER = ".committed"
KEEP = 2
_CHECKPOINT = re.compile(r"step-(\d+)")
_LEFTOVER = re.compile(r"step-\d+(\.saving)?")


class Progress(Stateful):
    """What a resumed run needs, besides the average, to continue exactly: the model, the
    optimizer, the step and the evaluations so far.

    The data order is a function of (seed, step), so the step count restores it.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer = model, optimizer
        self.step = 0
        self.history: list[dict[str, float]] = []

    def state_dict(self) -> dict[str, Any]:
        # get_state_dict gives DDP and FSDP2 the same keys; FSDP2 tensors stay sharded.
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        return {
            "model": model_sd,
            "optim": optim_sd,
            "step": self.step,
            "history": json.dumps(self.history),
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        set_state_dict(
            self.model, self.optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"]
        )
        self.step = int(sd["step"])
        self.history = json.loads(sd["history"])


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def committed(root: Path) -> list[Path]:
    """The checkpoints under ``root``, oldest first (see [Note: committing a checkpoint])."""
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _CHECKPOINT.fullmatch(path.name)
        if match and (path / MARKER).is_file():
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def latest_checkpoint(root: Path) -> Path | None:
    """The newest checkpoint this rank sees; resuming uses :func:`choose_checkpoint`."""
    found = committed(root)
    return found[-1] if found else None


def rotate(root: Path, keep: int = KEEP) -> None:
    """Removes all but the newest ``keep`` checkpoints, and what saves cut short left."""
    kept = set(committed(root)[-keep:])
    for path in root.iterdir():
        if _LEFTOVER.fullmatch(path.name) and path.is_dir() and path not in kept:
            shutil.rmtree(path)


def save(root: Path, step: int, write: Callable[[Path], None], *, keep: int = KEEP) -> Path:
    """Commits the checkpoint of ``step`` that ``write(path)`` writes on every rank.

    See [Note: committing a checkpoint]. A collective: every rank calls it.
    """
    final = root / checkpoint_name(step)
    staging = final.with_name(final.name + ".saving")
    rank0 = dist.get_rank() == 0
    if rank0 and staging.exists():
        shutil.rmtree(staging)
    dist.barrier()
    write(staging)
    dist.barrier()  # every rank's part is written
    if rank0:
        if final.exists():
            (final / MARKER).unlink(missing_ok=True)  # from here on it is never chosen
            shutil.rmtree(final)
        staging.rename(final)
        (final / MARKER).write_text(f"{step}\n")
        rotate(root, keep)
    dist.barrier()
    return final


def choose_checkpoint(root: Path) -> Path | None:
    """The checkpoint to resume from: rank 0's newest, used by every rank.

    Ranks can see different directories (node-local disks, or a save that one rank saw
    committed and another did not); each choosing its own would load different steps and
    hang the load's collectives. A collective: every rank calls it.

    Raises:
        RuntimeError: a rank does not see rank 0's choice.
    """
    found = latest_checkpoint(root) if dist.get_rank() == 0 else None
    choice = [found.name if found is not None else None]
    dist.broadcast_object_list(choice, src=0)
    if choice[0] is None:
        return None
    path = root / choice[0]
    seen: list[bool] = [False] * dist.get_world_size()
    dist.all_gather_object(seen, (path / MARKER).is_file())
    missing = [rank for rank, ok in enumerate(seen) if not ok]
    if missing:
        raise RuntimeError(
            f"rank 0 resumes from {path}, which rank(s) {missing} do not see: "
            f"--checkpoint-dir must be one directory that every rank reads"
        )
    return path


def save_checkpoint(root: Path, progress: Progress, ema: distavg.BaseAveragedModel) -> Path:
    """Every rank writes its own shards of the model, optimizer and average (no gather)."""

    def write(path: Path) -> None:
        dcp.save({"train": progress, "ema": ema}, checkpoint_id=path)

    return save(root, progress.step, write)


def load_checkpoint(path: Path, progress: Progress, ema: distavg.BaseAveragedModel) -> None:
    dcp.load({"train": progress, "ema": ema}, checkpoint_id=path)
