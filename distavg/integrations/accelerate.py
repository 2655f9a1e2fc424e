"""Hugging Face accelerate: ``save_state``/``load_state`` keep every rank's shard.

accelerate's own ``accelerator.register_for_checkpointing(obj)`` pickles ``obj.state_dict()``
from the main process only, which for a sharded average loses every other rank's chunk.
Instead, two lines after ``accelerator.prepare``::

    from distavg.integrations.accelerate import register_for_checkpointing
    register_for_checkpointing(accelerator, ema)

From then on ``accelerator.save_state(dir)`` also writes the average with
``torch.distributed.checkpoint`` into ``dir/distavg`` (each rank its own shards, no
gather), and ``accelerator.load_state(dir)`` restores it, also into another world size or
placement. ``python -m distavg export dir/distavg model.safetensors`` turns it into one
model file.

[Note: atomic save]
DCP writes a checkpoint's files in place, ``.metadata`` last: saving again into the same
``dir/distavg`` and being killed half-way leaves the old ``.metadata`` beside a mix of old
and new shard files. So each save goes to the sibling ``dir/distavg.saving`` (removed first
if an interrupted save left it); once every rank has written its shards, rank 0 renames
``dir/distavg`` to ``dir/distavg.old``, ``dir/distavg.saving`` to ``dir/distavg``, and removes
the old one. ``dir/distavg`` is therefore always one complete save. A kill between the two
renames, a window of two system calls, leaves no ``dir/distavg`` and both siblings: the load
says so instead of guessing which one matches the model files beside them. (A torn
directory written some other way is still refused at load: its shards fail the checksums
saved with it, see [Note: checksum] in ``_checksum.py``.)
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

if TYPE_CHECKING:
    from torch.utils.hooks import RemovableHandle

    from ..averaged import BaseAveragedModel

FOLDER = "distavg"
SAVING, OLD = ".saving", ".old"  # suffixes of the sibling directories, see [Note: atomic save]

__all__ = ["FOLDER", "average_keys", "register_for_checkpointing"]


def _require_accelerate() -> None:
    try:
        import accelerate  # noqa: F401
    except ImportError as e:
        raise ImportError(
            "distavg.integrations.accelerate needs the accelerate package: "
            "pip install 'distavg[accelerate]'"
        ) from e


def average_keys(count: int) -> list[str]:
    """The checkpoint keys of ``count`` registered averages: ``ema``, ``ema_1``, ..."""
    return ["ema" if i == 0 else f"ema_{i}" for i in range(count)]


def register_for_checkpointing(
    accelerator: Any, *averages: BaseAveragedModel, folder: str = FOLDER
) -> tuple[RemovableHandle, RemovableHandle]:
    """Save and restore ``averages`` with ``accelerator.save_state``/``load_state``.

    Registers a save-state and a load-state pre-hook that run on every process: the
    first calls ``dcp.save({"ema": averages[0], "ema_1": averages[1], ...})`` into
    ``<state dir>/<folder>``, atomically (see [Note: atomic save]), the second ``dcp.load``
    of the same. Call it on every process, once, after ``accelerator.prepare``. Do not
    also pass the averages to ``accelerator.register_for_checkpointing``.

    Args:
        accelerator: the ``accelerate.Accelerator``.
        *averages: the averagers to save (one or more).
        folder: the subfolder of the state directory that holds them.

    Returns:
        The two hook handles (save, load); ``handle.remove()`` unregisters.

    Raises:
        ValueError: no averager was given, ``folder`` is not a plain folder name, or an
            averager is also registered with accelerate's own ``register_for_checkpointing``.
    """
    _require_accelerate()
    if not averages:
        raise ValueError("register_for_checkpointing needs at least one averager, got none")
    if not folder or os.sep in folder or folder in (".", ".."):
        raise ValueError(f"folder must be a plain folder name, got {folder!r}")
    _check_not_pickled(accelerator, averages)
    keys = average_keys(len(averages))
    device = averages[0].topology.device  # where the rank-0 outcome is all-reduced

    def save_hook(models: list, weights: list, output_dir: str) -> None:
        _check_not_pickled(accelerator, averages)
        path = _path(output_dir, folder)
        _on_rank_zero(lambda: shutil.rmtree(path + SAVING, ignore_errors=True), device)
        dcp.save(dict(zip(keys, averages, strict=True)), checkpoint_id=path + SAVING)
        # dcp.save returns once every rank's shards and the .metadata are written
        _on_rank_zero(lambda: _switch(path), device)

    def load_hook(models: list, input_dir: str) -> None:
        path = _path(input_dir, folder)
        left = [p for p in (path + OLD, path + SAVING) if os.path.isdir(p)]
        if not os.path.isdir(path) and left:
            raise ValueError(
                f"accelerator.load_state({input_dir!r}) found no average in {path!r} but "
                f"{left}: a save was interrupted while switching directories. {path + OLD!r} "
                f"holds the previous save, {path + SAVING!r} the new one; rename the one "
                f"that belongs with the other files in {input_dir!r} to {folder!r}"
            )
        if not os.path.isfile(os.path.join(path, ".metadata")):
            raise ValueError(
                f"accelerator.load_state({input_dir!r}) found no average in {path!r}: the "
                f"state was saved before register_for_checkpointing(accelerator, ...) was "
                f"called, or with another folder="
            )
        dcp.load(dict(zip(keys, averages, strict=True)), checkpoint_id=path)

    return (
        accelerator.register_save_state_pre_hook(save_hook),
        accelerator.register_load_state_pre_hook(load_hook),
    )


def _path(state_dir: str, folder: str) -> str:
    return os.path.join(os.fspath(state_dir), folder)


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


def _check_not_pickled(accelerator: Any, averages: tuple) -> None:
    custom = getattr(accelerator, "_custom_objects", [])
    if any(obj is avg for obj in custom for avg in averages):
        raise ValueError(
            "an averager is registered with accelerator.register_for_checkpointing, which "
            "saves the main process's shard only; register it with "
            "distavg.integrations.accelerate.register_for_checkpointing(accelerator, ema) "
            "alone"
        )
