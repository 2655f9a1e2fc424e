"""When an update runs: now or on a CPU worker thread; the fence; the optimizer's steps.

[Note: the fence]
An update reads the parameters that optimizer step t left and must be done reading them
before step t+1 writes them. Forward and backward only read parameters, so the update may
overlap them. Every engine offers:
  * ``fence()``: afterwards the optimizer may write the parameters. It runs in the
    optimizer's step pre-hook. CUDA: the current stream waits on an event of the side
    stream (device side: the host does not block). CPU: the worker thread is joined.
  * ``wait()``: the host blocks until every update is applied; the averager calls it before
    anything reads the average (``swapped``, ``state_dict``, ``full_state_dict``,
    ``module``) and on ``close``.
Buffers are different: forward mutates them (BatchNorm running statistics, DDP's buffer
broadcast). An engine that defers the update copies them at enqueue time (``capture``) into
memory of its own, and the update reads that copy.
At most one update is in flight (two on the asynchronous offload, which alternates two sets
of snapshots and staging, see [Note: offload pipeline] in _offload.py): ``capture`` and
``submit`` first settle the update that last used the memory they reuse, so snapshot and
staging memory is reused without a race. After a real optimizer step this costs nothing
(the pre-hook already fenced).
An exception raised by a deferred update is kept and raised by the next ``capture``,
``submit``, ``fence`` or ``wait``: never silently dropped.

The paths (chosen in one place, ``_engines.make_engine``; the accelerator engines live in
``_accelerator.py`` and ``_offload.py``, which build on this module and are never imported
by it):

=============  =================  ======  ====================================
parameters     average            async   engine
=============  =================  ======  ====================================
accelerator    host (``"cpu"``)   either  ``OffloadEngine`` (pinned staging)
any            beside them        no      :class:`SyncEngine`
cpu            cpu                yes     :class:`WorkerEngine`
accelerator    same accelerator   yes     ``StreamEngine`` (side stream)
=============  =================  ======  ====================================

The owner push (``placement="owner"`` under FSDP2) is part of an update's ``sources``: it
gathers on the averager's own process group, on whichever thread or stream the engine runs
the update, so it overlaps the next step too.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum

import torch

from .shards import Shards

Sources = list[list[torch.Tensor]]


class Kind(Enum):
    """What an update does to the average."""

    COPY = "copy"  # avg <- src for every tensor (the first update)
    LERP = "lerp"  # avg <- avg + w * (src - avg) for averaged tensors, the others copied
    FOLLOW = "follow"  # only the tensors that follow the source are copied
    CUSTOM = "custom"  # a user's averaging function (see _hooks.py), the others copied


@dataclass(frozen=True)
class Update:
    """One update of the average, handed to an engine.

    Attributes:
        kind: what the update does (see :class:`Kind`).
        weight: the lerp weight (unused by the other kinds).
        sources: returns, per slot, the 1-D source pieces that fill this rank's region. It
            runs where the engine runs the update (it may communicate: the owner push).
        one_shot: the sources are fresh buffers used once (the owner push's gathered
            chunks): nothing may keep them after the update (see [Note: per-step caches]).
        custom: what a ``CUSTOM`` update does to the shards with its sources.
    """

    kind: Kind
    weight: float
    sources: Callable[[], Sources]
    one_shot: bool = False
    custom: Callable[[Shards, Sources], None] | None = None

    def apply(self, shards: Shards, sources: Sources) -> None:
        if self.kind is Kind.LERP:
            shards.lerp(sources, self.weight)
        elif self.kind is Kind.COPY:
            shards.copy_all(sources)
        elif self.kind is Kind.CUSTOM:
            self.custom(shards, sources)
        else:
            shards.follow(sources)
        if self.one_shot:
            shards.forget(sources)


class Engine:
    """Runs the updates of one average (see [Note: the fence]).

    A deferring engine sets ``snapshots`` (the buffers forward mutates, copied at enqueue)
    and, where a thread does the work, ``worker``; :meth:`capture` and :meth:`close` then
    need nothing more from it than :meth:`_settle`.
    """

    snapshots: Snapshots | None = None
    worker: Worker | None = None

    def __init__(self, shards: Shards) -> None:
        self.shards = shards

    def raise_pending(self) -> None:
        """Raise an error a deferred update already reported, without waiting."""
        if self.worker is not None:
            self.worker.raise_pending()

    def _settle(self) -> None:
        """Return when the previous update no longer reads the snapshots."""
        self.fence()

    def capture(self, flat: list[torch.Tensor]) -> list[torch.Tensor]:
        """This rank's local tensors as a deferred update may read them (see the Note)."""
        if self.snapshots is None:
            return flat
        self._settle()
        return self.snapshots.refresh(flat)

    def submit(self, update: Update) -> None:
        raise NotImplementedError

    def fence(self) -> None:
        """Return when the optimizer may write the parameters (see the Note)."""

    def wait(self) -> None:
        """Block until every submitted update is applied."""
        self.fence()

    def close(self) -> None:
        """Wait, then release threads and streams. The engine is unusable afterwards."""
        try:
            self.wait()
        finally:
            if self.worker is not None:
                self.worker.close()

    def held_bytes(self) -> dict[str, int]:
        """Memory the engine holds beyond the average: ``{"accelerator": .., "pinned_host": ..}``."""
        return {"accelerator": 0, "pinned_host": 0}


class SyncEngine(Engine):
    """Runs each update at once, on the calling thread and the current stream."""

    def submit(self, update: Update) -> None:
        update.apply(self.shards, update.sources())


class Snapshots:
    """Copies of the tensors forward mutates, owned by the engine, refreshed per enqueue.

    Args:
        volatile: indices (into the topology's tensors) of the tensors forward may mutate.
        alloc: allocates the copy of one tensor (beside it, or in pinned host memory).
        non_blocking: copy asynchronously (device to pinned host).
    """

    def __init__(
        self,
        volatile: Sequence[int],
        alloc: Callable[[torch.Tensor], torch.Tensor] = torch.empty_like,
        non_blocking: bool = False,
    ) -> None:
        self.volatile = list(volatile)
        self.alloc = alloc
        self.non_blocking = non_blocking
        self._key: list[torch.Tensor] | None = None
        self.out: list[torch.Tensor] = []
        self.dsts: list[torch.Tensor] = []
        self.srcs: list[torch.Tensor] = []

    def refresh(self, flat: list[torch.Tensor]) -> list[torch.Tensor]:
        """Copy the volatile tensors of ``flat`` into the engine's memory; ``flat`` with
        those tensors replaced by their copies."""
        # The returned list is the same object while `flat` is: the averager caches its
        # per-slot source views on that identity.
        if self._key is not flat:
            self.srcs = [flat[i] for i in self.volatile if flat[i].numel()]
            self.dsts = [self.alloc(t) for t in self.srcs]
            copies = {id(s): d for s, d in zip(self.srcs, self.dsts, strict=True)}
            self.out = [copies.get(id(t), t) for t in flat]
            self._key = flat
        if self.non_blocking:  # device to pinned host: one asynchronous copy each
            for d, s in zip(self.dsts, self.srcs, strict=True):
                d.copy_(s, non_blocking=True)
        elif self.dsts:  # one call: many BatchNorm layers mean many small buffers
            torch._foreach_copy_(self.dsts, self.srcs)
        return self.out

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.dsts)


def _raise_pending(errors: list[BaseException]) -> None:
    if errors:
        err = errors[0]
        errors.clear()
        raise RuntimeError(
            "an asynchronous update of the average failed (the average may be partly "
            f"updated): {type(err).__name__}: {err}"
        ) from err


def _serve(jobs: queue.Queue, errors: list[BaseException]) -> None:
    # The thread holds only the queue and the error list, never the averager, so an
    # averager that goes out of scope is collected (and its close() stops this thread).
    while True:
        job = jobs.get()
        try:
            if job is None:
                return
            job()
        except BaseException as e:  # kept and raised on the caller's next call
            errors.append(e)
        finally:
            jobs.task_done()
            # Dropping the job last may drop the last reference to an averager, whose
            # close() then runs on this thread (see Worker.close).
            del job


class Worker:
    """One persistent thread that runs jobs in order; errors surface on ``join``."""

    def __init__(self) -> None:
        self._jobs: queue.Queue = queue.Queue()
        self._errors: list[BaseException] = []
        self._thread = threading.Thread(
            target=_serve, args=(self._jobs, self._errors), name="distavg-update", daemon=True
        )
        self._thread.start()

    def put(self, job: Callable[[], None]) -> None:
        self._jobs.put(job)

    def join(self) -> None:
        """Block until every job ran; raise the first error a job raised since the last join."""
        self._jobs.join()
        self.raise_pending()

    def raise_pending(self) -> None:
        _raise_pending(self._errors)

    def close(self) -> None:
        if self._thread.is_alive():
            self._jobs.put(None)
            if threading.current_thread() is not self._thread:
                self._thread.join()


class WorkerEngine(Engine):
    """Applies each update on a CPU worker thread; the fence joins it.

    The update's kernels release the GIL, so it overlaps the next forward and backward
    when a core is free for it (see the benchmark's overlap table).
    """

    def __init__(self, shards: Shards, volatile: Sequence[int]) -> None:
        super().__init__(shards)
        self.snapshots = Snapshots(volatile)
        self.worker = Worker()

    def submit(self, update: Update) -> None:
        self.fence()
        shards = self.shards
        self.worker.put(lambda: update.apply(shards, update.sources()))

    def fence(self) -> None:
        self.worker.join()
