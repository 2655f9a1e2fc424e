"""The accelerator side stream: updates beside the parameters, overlapped with the next step.

The only module that deals with streams and events. They come from
``torch.get_device_module(device)`` (``torch.cuda`` for a CUDA device), so nothing here
names a backend; importing it is harmless on a CPU-only build. ``torch.cpu``'s streams and
events are no-ops, so with ``device=cpu`` the offload runs its host side alone (every piece
through staging): that is how it is tested without an accelerator. The offload to pinned
host memory builds on the side stream here and lives in ``_offload.py``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .engine import Engine, Snapshots, Update
from .shards import Shards


def _side_stream(dm: object, device: torch.device) -> object:
    # torch.cpu's no-op streams take no device.
    return dm.Stream() if device.type == "cpu" else dm.Stream(device=device)


def protect(
    flat: list[torch.Tensor], stream: object, done: list[torch.Tensor] | None
) -> list[torch.Tensor]:
    """Mark ``flat`` as used by ``stream`` (once per list); returns the list marked."""
    # The side stream reads the parameters, which were allocated on another stream: if the
    # model frees one while an update still reads it, the allocator must wait.
    if done is not flat:
        for t in flat:
            if t.numel() and t.device.type != "cpu":
                t.record_stream(stream)
    return flat


class SideStreamEngine(Engine):
    """What both accelerator engines share: a side stream on the parameters' device that
    starts each update after the work enqueued so far on the current stream (the step)."""

    def __init__(self, shards: Shards, device: torch.device) -> None:
        super().__init__(shards)
        self.device = device
        self._dm = torch.get_device_module(device)
        self._side = _side_stream(self._dm, device)
        self._ready = self._dm.Event()
        self._protected: list[torch.Tensor] | None = None

    def _current(self) -> object:
        return self._dm.current_stream(self.device)

    def _start_side(self) -> None:
        """The side stream waits for everything enqueued so far on the current stream."""
        self._ready.record(self._current())
        self._side.wait_event(self._ready)


class StreamEngine(SideStreamEngine):
    """Applies each update on a side stream of the parameters' device.

    Per update an event is recorded on the current stream after the step (and after the
    buffer snapshots); the side stream waits on it, runs the update and records ``done``.
    The fence makes the current stream wait on ``done``: device side, no host sync.
    Memory used on both streams is the engine's own for its lifetime (average, staging,
    snapshots), marked with ``record_stream`` (the parameters), or allocated on the side
    stream and dropped after the update (the owner push's gathered buffers).

    Args:
        shards: the average (beside the parameters).
        volatile: indices of the tensors forward may mutate (captured at enqueue).
        device: the parameters' device.
    """

    def __init__(self, shards: Shards, volatile: Sequence[int], device: torch.device) -> None:
        super().__init__(shards, device)
        self._done = self._dm.Event()
        self.snapshots = Snapshots(volatile)

    def capture(self, flat: list[torch.Tensor]) -> list[torch.Tensor]:
        self._protected = protect(flat, self._side, self._protected)
        return super().capture(flat)

    def submit(self, update: Update) -> None:
        self.fence()
        self._start_side()
        with self._dm.stream(self._side):
            update.apply(self.shards, update.sources())
            self._done.record(self._side)

    def fence(self) -> None:
        self._current().wait_event(self._done)

    def wait(self) -> None:
        self.fence()
        self._done.synchronize()

    def held_bytes(self) -> dict[str, int]:
        return {"accelerator": self.snapshots.nbytes, "pinned_host": 0}
