"""Which engine runs an average's updates: the one place the path is chosen.

The table of paths is in engine.py's docstring. The accelerator engines are imported only
when chosen, so a CPU-only job never loads them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .engine import Engine, SyncEngine, WorkerEngine
from .shards import Shards


def make_engine(
    shards: Shards,
    params_device: torch.device,
    *,
    async_update: bool,
    volatile: Sequence[int],
) -> Engine:
    """The engine for an average on ``shards.device`` of parameters on ``params_device``.

    See the table in engine.py's docstring. ``volatile`` lists the tensors forward may
    mutate (buffers), which a deferred update must capture at enqueue time.
    """
    on_accelerator = params_device.type != "cpu"
    if on_accelerator and shards.device.type == "cpu":
        from ._offload import OffloadEngine

        return OffloadEngine(shards, volatile, params_device, blocking=not async_update)
    if not async_update:
        return SyncEngine(shards)
    if on_accelerator:
        from ._accelerator import StreamEngine

        return StreamEngine(shards, volatile, params_device)
    return WorkerEngine(shards, volatile)
