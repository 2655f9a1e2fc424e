"""Saving averages into a framework's checkpoint folder: every rank its own shards, atomically.

The integrations decide *when* to save; this is *how*, once for all of them.

[Note: atomic save]
DCP writes a checkpoint's files in place, ``.metadata`` last: saving again into the same
directory and being killed half-way leaves the old ``.metadata`` beside a mix of old and new
shard files. So each save goes to the sibling ``<path>.saving`` (removed first if an
interrupted save left it); once every rank has written its shards, rank 0 renames
``<path>`` to ``<path>.old``, ``<path>.saving`` to ``<path>``, and removes the old one.
``<path>`` is therefore always one complete save. A kill between the two renames, a window
of two system calls, leaves no ``<path>`` and both siblings: the load says so instead of
guessing which one matches the model files beside them. (A torn directory written some
other way is still refused at load: its shards fail the checksums saved with it.)
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

if TYPE_CHECKING:
    from ..averaged import BaseAveragedModel

SAVING, OLD = ".saving", ".old"  # suffixes of the sibling directories, see [Note: atomic save]

__all__ = ["average_keys", "load_averages", "save_averages", "saved"]


def average_keys(count: int) -> list[str]:
    """The checkpoint keys of ``count`` averages: ``ema``, ``ema_1``, ..."""
    return ["ema" if i == 0 else f"ema_{i}" for i in range(count)]


def saved(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds a finished save."""
    return os.path.isfile(os.path.join(os.fspath(path), ".metadata"))


def save_averages(path: str | os.PathLike, averages: Mapping[str, BaseAveragedModel]) -> None:
    """``dcp.save(averages)`` into ``path``, atomically (see [Note: atomic save]).

    Every rank must call it; each writes only its own shards.
    """
    path = os.fspath(path)
    device = next(iter(averages.values())).topology.device  # where rank 0's outcome travels
    _on_rank_zero(lambda: shutil.rmtree(path + SAVING, ignore_errors=True), device)
    dcp.save(dict(averages), checkpoint_id=path + SAVING)
    # dcp.save returns once every rank's shards and the .metadata are written
    _on_rank_zero(lambda: _switch(path), device)


def load_averages(path: str | os.PathLike, averages: Mapping[str, BaseAveragedModel]) -> None:
    """Restore ``averages`` from a :func:`save_averages` directory (any world size wrote it).

    Raises:
        ValueError: ``path`` holds no finished save (the message says what it found).
    """
    path = os.fspath(path)
    left = [p for p in (path + OLD, path + SAVING) if os.path.isdir(p)]
    if not os.path.isdir(path) and left:
        raise ValueError(
            f"found no average in {path!r} but {left}: a save was interrupted while switching "
            f"directories. {path + OLD!r} holds the previous save, {path + SAVING!r} the new "
            f"one; rename the one that belongs with the other files of that checkpoint to "
            f"{os.path.basename(path)!r}"
        )
    if not saved(path):
        raise ValueError(f"found no saved average in {path!r} (no .metadata)")
    dcp.load(dict(averages), checkpoint_id=path)


def _switch(path: str) -> None:
    """Put the finished ``path + SAVING`` in the place of ``path`` (see [Note: atomic save])."""
    shutil.rmtree(path + OLD, ignore_errors=True)
    if os.path.exists(path):
        os.replace(path, path + OLD)
    os.replace(path + SAVING, path)
    shutil.rmtree(path + OLD, ignore_errors=True)


def _on_rank_zero(fn: Callable[[], None], device: torch.device) -> None:
    """Run ``fn`` on rank 0 while the others wait; raise on every rank if it failed."""
    if not (dist.is_available() and dist.is_initialized()):
        fn()
        return
    error = None
    if dist.get_rank() == 0:
        try:
            fn()
        except Exception as e:
            error = e
    failed = torch.tensor([int(error is not None)], device=device)
    dist.all_reduce(failed)  # also the barrier: nobody goes on before rank 0 is done
    if error is not None:
        raise error
    if failed.item():
        raise RuntimeError("saving the average failed on rank 0 (its error says why)")
