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

A save is atomic: ``dir/distavg`` is always one complete save, also when the job is killed
half-way through writing it (see [Note: atomic save] in ``integrations/_save.py``).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from ._save import OLD, SAVING, average_keys, load_averages, save_averages

if TYPE_CHECKING:
    from torch.utils.hooks import RemovableHandle

    from ..averaged import BaseAveragedModel

FOLDER = "distavg"

__all__ = ["FOLDER", "average_keys", "register_for_checkpointing"]


def _require_accelerate() -> None:
    try:
        import accelerate  # noqa: F401
    except ImportError as e:
        raise ImportError(
            "distavg.integrations.accelerate needs the accelerate package: "
            "pip install 'distavg[accelerate]'"
        ) from e


def register_for_checkpointing(
    accelerator: Any, *averages: BaseAveragedModel, folder: str = FOLDER
) -> tuple[RemovableHandle, RemovableHandle]:
    """Save and restore ``averages`` with ``accelerator.save_state``/``load_state``.

    Registers a save-state and a load-state pre-hook that run on every process: the
    first calls ``dcp.save({"ema": averages[0], "ema_1": averages[1], ...})`` into
    ``<state dir>/<folder>``, atomically (``integrations/_save.py``), the second ``dcp.load``
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

    def save_hook(models: list, weights: list, output_dir: str) -> None:
        _check_not_pickled(accelerator, averages)
        save_averages(_path(output_dir, folder), dict(zip(keys, averages, strict=True)))

    def load_hook(models: list, input_dir: str) -> None:
        path = _path(input_dir, folder)
        if not any(os.path.exists(p) for p in (path, path + SAVING, path + OLD)):
            raise ValueError(
                f"accelerator.load_state({input_dir!r}) found no average in {path!r}: the "
                f"state was saved before register_for_checkpointing(accelerator, ...) was "
                f"called, or with another folder="
            )
        load_averages(path, dict(zip(keys, averages, strict=True)))

    return (
        accelerator.register_save_state_pre_hook(save_hook),
        accelerator.register_load_state_pre_hook(load_hook),
    )


def _path(state_dir: str, folder: str) -> str:
    return os.path.join(os.fspath(state_dir), folder)


def _check_not_pickled(accelerator: Any, averages: tuple) -> None:
    custom = getattr(accelerator, "_custom_objects", [])
    if any(obj is avg for obj in custom for avg in averages):
        raise ValueError(
            "an averager is registered with accelerator.register_for_checkpointing, which "
            "saves the main process's shard only; register it with "
            "distavg.integrations.accelerate.register_for_checkpointing(accelerator, ema) "
            "alone"
        )
