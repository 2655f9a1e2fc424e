"""The accelerator paths: a side stream beside the parameters, and the pinned host offload.

The only module that deals with streams and events. They come from
``torch.get_device_module(device)`` (``torch.cuda`` for a CUDA device), so nothing here
names a backend; importing it is harmless on a CPU-only build.

[Note: offload pipeline]
Parameters on an accelerator, average in pinned host memory (``device="cpu"``). Per update:
  1. at enqueue, on the current stream: the buffers (which forward mutates) are copied
     into pinned snapshots, then the ``ready`` event is recorded;
  2. the side stream waits on ``ready`` and copies the parameters' pieces into pinned
     staging, bucket by bucket (several small pieces are first packed into one device
     bucket by one ``cat``, so a bucket is one copy), recording an event per bucket and
     ``copied`` after the last;
  3. a worker thread, bucket by bucket, waits on the bucket's event and applies that
     part of the update on the CPU, so copies and CPU math overlap each other and the
     next forward and backward.
The fence waits only on ``copied`` (device side). The worker is joined before staging is
reused (the next enqueue) and before the average is read (``wait``).
Memory: on the accelerator one bucket (``BUCKET_BYTES``); pinned host memory: the average,
one staging copy of this rank's parameter pieces (in their own dtype) and the buffer
snapshots, so at most about twice this rank's shard.
The CPU math is elementwise per region: ``avg.lerp_(src.to(avg.dtype), w)`` or ``copy_``.
Elementwise ops give the same bits however a tensor is split, which is what the shards'
own update computes; the synchronous offload runs this same code on the calling thread.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .engine import Engine, Kind, Snapshots, Sources, Update, Worker
from .shards import Shards

BUCKET_BYTES = 32 << 20


def _protect(
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


class StreamEngine(Engine):
    """Applies each update on a side stream of the parameters' device.

    Per update an event is recorded on the current stream after the step (and after the
    buffer snapshots); the side stream waits on it, runs the update and records ``done``.
    The fence makes the current stream wait on ``done``: device side, no host sync.
    Memory used on both streams is the engine's own for its lifetime (average, staging,
    snapshots) or marked with ``record_stream`` (the parameters).

    Args:
        shards: the average (beside the parameters).
        volatile: indices of the tensors forward may mutate (captured at enqueue).
        device: the parameters' device.
    """

    def __init__(self, shards: Shards, volatile: Sequence[int], device: torch.device) -> None:
        super().__init__(shards)
        self.device = device
        self._dm = torch.get_device_module(device)
        self._side = self._dm.Stream(device=device)
        self._ready = self._dm.Event()
        self._done = self._dm.Event()
        self.snapshots = Snapshots(volatile)
        self._protected: list[torch.Tensor] | None = None

    def _current(self) -> object:
        return self._dm.current_stream(self.device)

    def capture(self, flat: list[torch.Tensor]) -> list[torch.Tensor]:
        self._protected = _protect(flat, self._side, self._protected)
        return super().capture(flat)

    def submit(self, update: Update) -> None:
        self.fence()
        self._ready.record(self._current())
        self._side.wait_event(self._ready)
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


@dataclass
class _Bucket:
    """Part of an update: its device-to-host copies and the CPU work on what they bring."""

    # (avg region, host source, averaged) per piece of work
    work: list[tuple[torch.Tensor, torch.Tensor, bool]] = field(default_factory=list)
    # per source dtype: the device pieces and the contiguous staging region they fill
    copies: dict[torch.dtype, tuple[list[torch.Tensor], list[tuple[int, int]]]] = field(
        default_factory=dict
    )
    nbytes: int = 0
    event: object = None


class OffloadPlan:
    """The buckets of one update (see [Note: offload pipeline]) for one list of sources.

    Args:
        shards: the average, in host memory.
        sources: per slot, the 1-D source pieces (on the accelerator, or host snapshots).
        follow_only: only the tensors that follow the source (``"follow"`` updates).
        bucket_bytes: most bytes copied per bucket.
        staging: returns a pinned host tensor of at least the given numel and dtype.
        event: creates an event.
        copied: whether a source piece must be copied to the host (it is on the
            accelerator); other pieces (host snapshots) are read where they are.
    """

    def __init__(
        self,
        shards: Shards,
        sources: Sources,
        *,
        follow_only: bool,
        bucket_bytes: int,
        staging: Callable[[torch.dtype, int], torch.Tensor],
        event: Callable[[], object],
        copied: Callable[[torch.Tensor], bool] = lambda t: t.device.type != "cpu",
    ) -> None:
        buckets = [_Bucket()]
        used: dict[torch.dtype, int] = {}
        pending = []  # (bucket, avg region, dtype, staging start, length, averaged)
        for i, slot in enumerate(shards.slots):
            if follow_only and slot.averaged:
                continue
            view, off = shards.views[i], 0
            for piece in sources[i]:
                n = piece.numel()
                if not copied(piece):
                    buckets[-1].work.append((view[off : off + n], piece, slot.averaged))
                    off += n
                    continue
                es, pos = piece.element_size(), 0
                while pos < n:
                    room = (bucket_bytes - buckets[-1].nbytes) // es
                    if room <= 0:
                        buckets.append(_Bucket())
                        continue
                    take = min(n - pos, room)
                    b, d = buckets[-1], piece.dtype
                    start = used.get(d, 0)
                    used[d] = start + take
                    srcs, regions = b.copies.setdefault(d, ([], []))
                    srcs.append(piece[pos : pos + take])
                    regions.append((start, start + take))
                    pending.append(
                        (b, view[off + pos : off + pos + take], d, start, take, slot.averaged)
                    )
                    b.nbytes += take * es
                    pos += take
                off += n
        host = {d: staging(d, n) for d, n in used.items()}
        for b, avg, d, start, take, averaged in pending:
            b.work.append((avg, host[d][start : start + take], averaged))
        self.buckets = [b for b in buckets if b.work]
        self.regions = {}
        for b in self.buckets:
            b.event = event()
            for d, (_, regions) in b.copies.items():
                self.regions[(id(b), d)] = host[d][regions[0][0] : regions[-1][1]]

    def copy(self, scratch: Callable[[torch.dtype, int], torch.Tensor], stream: object) -> None:
        """Issue every bucket's copies on the current (side) stream; record its event."""
        for b in self.buckets:
            for d, (srcs, _) in b.copies.items():
                region = self.regions[(id(b), d)]
                if len(srcs) == 1:
                    region.copy_(srcs[0], non_blocking=True)
                else:
                    # One packing kernel and one copy instead of one copy per small piece;
                    # the next bucket's pack follows this copy on the same stream.
                    packed = scratch(d, region.numel())
                    torch.cat(srcs, out=packed)
                    region.copy_(packed, non_blocking=True)
            b.event.record(stream)

    def apply(self, kind: Kind, weight: float) -> None:
        """The CPU side, bucket by bucket as each lands (see [Note: offload pipeline])."""
        for b in self.buckets:
            b.event.synchronize()
            for avg, src, averaged in b.work:
                if not averaged or kind is Kind.COPY:
                    avg.copy_(src)
                elif kind is Kind.LERP:
                    avg.lerp_(src if src.dtype == avg.dtype else src.to(avg.dtype), weight)


class OffloadEngine(Engine):
    """Average in pinned host memory of parameters on an accelerator.

    See [Note: offload pipeline]. With ``blocking=True`` (synchronous updates) the same
    copies and CPU math run on the calling thread, so both modes give the same bits.

    Args:
        shards: the average, in (pinned) host memory.
        volatile: indices of the tensors forward may mutate (captured at enqueue).
        device: the parameters' device.
        blocking: apply each update before ``submit`` returns.
        bucket_bytes: most bytes per device-to-host bucket.
    """

    def __init__(
        self,
        shards: Shards,
        volatile: Sequence[int],
        device: torch.device,
        *,
        blocking: bool,
        bucket_bytes: int = BUCKET_BYTES,
    ) -> None:
        super().__init__(shards)
        self.device = device
        self.bucket_bytes = bucket_bytes
        self._dm = torch.get_device_module(device)
        self._side = self._dm.Stream(device=device)
        self._ready = self._dm.Event()
        self._copied = self._dm.Event()
        self.snapshots = Snapshots(
            volatile,
            alloc=lambda t: torch.empty(t.shape, dtype=t.dtype, pin_memory=True),
            non_blocking=True,
        )
        self.worker = None if blocking else Worker()
        self._plans: dict[bool, tuple[object, OffloadPlan]] = {}
        self._staging: dict[torch.dtype, torch.Tensor] = {}
        self._scratch: torch.Tensor | None = None
        self._protected: list[torch.Tensor] | None = None

    def _current(self) -> object:
        return self._dm.current_stream(self.device)

    def _settle(self) -> None:
        # The worker may still read the snapshots (and the staging).
        if self.worker is not None:
            self.worker.join()

    def capture(self, flat: list[torch.Tensor]) -> list[torch.Tensor]:
        self._protected = _protect(flat, self._side, self._protected)
        return super().capture(flat)

    def _stage(self, dtype: torch.dtype, numel: int) -> torch.Tensor:
        t = self._staging.get(dtype)
        if t is None or t.numel() < numel:
            t = self._staging[dtype] = torch.empty(numel, dtype=dtype, pin_memory=True)
        return t

    def _pack(self, dtype: torch.dtype, numel: int) -> torch.Tensor:
        if self._scratch is None:
            # Allocated on the side stream, which alone uses it.
            self._scratch = torch.empty(self.bucket_bytes, dtype=torch.uint8, device=self.device)
        return self._scratch[: numel * dtype.itemsize].view(dtype)

    def _event(self) -> object:
        # A blocking event lets the waiting thread sleep instead of spinning on a core
        # the CPU update needs.
        if self.device.type == "cuda":
            return self._dm.Event(blocking=True)
        return self._dm.Event()

    def _plan(self, sources: Sources, follow_only: bool) -> OffloadPlan:
        cached = self._plans.get(follow_only)
        if cached is None or cached[0] is not sources:
            plan = OffloadPlan(
                self.shards,
                sources,
                follow_only=follow_only,
                bucket_bytes=self.bucket_bytes,
                staging=self._stage,
                event=self._event,
            )
            cached = self._plans[follow_only] = (sources, plan)
        return cached[1]

    def submit(self, update: Update) -> None:
        self._settle()  # staging is reused
        self._ready.record(self._current())
        self._side.wait_event(self._ready)
        with self._dm.stream(self._side):
            plan = self._plan(update.sources(), update.kind is Kind.FOLLOW)
            plan.copy(self._pack, self._side)
            self._copied.record(self._side)
        if self.worker is None:
            plan.apply(update.kind, update.weight)
        else:
            self.worker.put(lambda: plan.apply(update.kind, update.weight))

    def fence(self) -> None:
        self._current().wait_event(self._copied)

    def wait(self) -> None:
        self.fence()
        self._settle()
        self._copied.synchronize()

    def held_bytes(self) -> dict[str, int]:
        staging = sum(t.numel() * t.element_size() for t in self._staging.values())
        return {
            "accelerator": 0 if self._scratch is None else self._scratch.numel(),
            "pinned_host": staging + self.snapshots.nbytes,
        }
