"""Time per step spent training and spent averaging."""

from __future__ import annotations

import time
from typing import Any

import torch

from distavg._steps import unwrap_optimizer

Mark = Any  # a point in time: perf_counter() seconds on CPU, a recorded event on a GPU


class Clock:
    """Time per step spent training and spent averaging.

    Averaging time is the time the loop waits for averaging: the ``update_parameters``
    call plus, with ``--async``, the wait at the fence in the next ``optimizer.step()``
    (the part of the update the next forward/backward did not hide). The fence is a step
    pre-hook the averager installs; two more pre-hooks, one registered before it and one
    after, time exactly that wait. The hidden part still needs a core (or the GPU): where
    it is busy training, it shows up as slower forward/backward, so compare the step times.

    On CPU the clock is the host's. On a GPU the host only queues the work, so the clock
    is events on the current stream: they measure when the device ran the step and how
    long it waited at the fence. The events are read a while later, without a sync per step.

    Args:
        optimizer: the optimizer the averager fences (wrappers are looked through).
        device: the device the job trains on.
    """

    _PENDING = 64  # events read back this many spans later: long done by then

    def __init__(self, optimizer: torch.optim.Optimizer, device: torch.device) -> None:
        self.steps = 0
        self._seconds = {"train": 0.0, "average": 0.0}
        self._pending: list[tuple[str, Mark, Mark]] = []
        self._events = torch.get_device_module(device) if device.type == "cuda" else None
        self._fence_start: Mark = None
        unwrap_optimizer(optimizer).register_step_pre_hook(self._before_fence)

    def after_averager_built(self, optimizer: torch.optim.Optimizer) -> None:
        unwrap_optimizer(optimizer).register_step_pre_hook(self._after_fence)

    def now(self) -> Mark:
        if self._events is None:
            return time.perf_counter()
        event = self._events.Event(enable_timing=True)
        event.record()
        return event

    def add(self, what: str, start: Mark, end: Mark) -> None:
        """Counts the span from ``start`` to ``end`` (two :meth:`now`) as ``what``."""
        if self._events is None:
            self._seconds[what] += end - start
            return
        self._pending.append((what, start, end))
        if len(self._pending) > 2 * self._PENDING:
            self._read(self._PENDING)

    def per_step_ms(self) -> tuple[float, float]:
        """Milliseconds per step (training, of which averaging)."""
        self._read(len(self._pending))
        n = max(self.steps, 1)
        return 1e3 * self._seconds["train"] / n, 1e3 * self._seconds["average"] / n

    def _read(self, count: int) -> None:
        done, self._pending = self._pending[:count], self._pending[count:]
        for what, start, end in done:
            end.synchronize()
            self._seconds[what] += start.elapsed_time(end) / 1e3

    def _before_fence(self, *_: Any) -> None:
        self._fence_start = self.now()

    def _after_fence(self, *_: Any) -> None:
        self.add("average", self._fence_start, self.now())
