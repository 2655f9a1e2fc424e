"""The pinned host offload: an average in host memory of parameters on an accelerator.

[Note: offload pipeline]
Parameters on an accelerator, average in pinned host memory (``device="cpu"``). Per update:
  1. at enqueue, on the current stream: the buffers (which forward mutates) are copied
     into pinned snapshots, then the ``ready`` event is recorded;
  2. the side stream waits on ``ready``, produces the sources (the owner push gathers
     there) and copies the parameters' pieces into pinned staging, bucket by bucket
     (several small pieces are first packed into one device bucket by one ``cat``, so a
     bucket is one copy per dtype), recording an event per bucket and ``copied`` after the
     last;
  3. a worker thread, bucket by bucket, waits on the bucket's event and applies that
     part of the update on the CPU, so copies and CPU math overlap each other and the
     next forward and backward.
The fence waits only on ``copied`` (device side).
Double buffering: asynchronous updates alternate between two sets of host buffers
(snapshots, staging, bucket events). Update t+1 reuses the set of update t-1, so before
enqueueing it the training thread waits for update t-1's CPU math only, never for update
t's: one update's CPU math overlaps the whole next step. The training thread blocks only
when an update's copies and CPU math take longer than a step. The worker applies the
updates in order, each from its own set, so the bits are those of the synchronous path
(which uses one set and runs this same code on the calling thread). ``wait`` joins both.
The layout of an update (buckets, staging, events) is built once per set and kind of
update; each update binds its own pieces to it and drops them as soon as they are used:
the device pieces once their copies are enqueued (they are the parameters, marked for the
side stream, or buffers the side stream allocated, such as the owner push's gather, whose
memory the allocator then reuses only after those copies), the host pieces after the CPU
math. So nothing keeps a gathered buffer between updates.
The CPU math is elementwise per region: ``avg.lerp_(src.to(avg.dtype), w)`` or ``copy_``.
Elementwise ops give the same bits however a tensor is split, which is what the shards'
own update computes.

[Note: pinned memory]
The host caching allocator rounds every pinned block up to a power of two (a 1.41 GB shard
takes a 2 GiB block) and keeps freed blocks cached. So staging is allocated per bucket and
dtype: a full bucket (``BUCKET_BYTES``, a power of two) wastes nothing and only the last,
partial bucket of a dtype rounds up. ``held_bytes`` counts each pinned block as the
allocator holds it (:func:`pinned_block_bytes`); ``launch/gpu_check.py`` checks the sum
against ``torch.cuda.host_memory_stats()``. The average itself is pinned by the shards
(one block per dtype, rounded the same way) and is not counted here.
Memory: on the accelerator one bucket (``BUCKET_BYTES``) for packing; pinned host memory:
the average and, per set, one staging copy of this rank's parameter pieces (in their own
dtype) and the buffer snapshots: about three times this rank's shard when asynchronous
(two sets), twice when synchronous.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ._accelerator import SideStreamEngine, protect
from .engine import Kind, Snapshots, Sources, Update, Worker, _raise_pending
from .shards import Shards

BUCKET_BYTES = 32 << 20


def pinned_block_bytes(nbytes: int) -> int:
    """Bytes the host caching allocator holds for a pinned tensor of ``nbytes`` bytes.

    It rounds each block up to a power of two (see [Note: pinned memory]).
    """
    return 0 if nbytes <= 0 else 1 << (nbytes - 1).bit_length()


@dataclass
class _Bucket:
    """Part of an update: its device-to-host copies and the CPU work on what they bring."""

    # (avg region, host source, averaged) per piece of work
    work: list[tuple[torch.Tensor, torch.Tensor | None, bool]] = field(default_factory=list)
    # per source dtype: this update's device pieces and their regions in the staging
    copies: dict[torch.dtype, tuple[list[torch.Tensor], list[tuple[int, int]]]] = field(
        default_factory=dict
    )
    # per source dtype: the pinned staging the copies land in
    staging: dict[torch.dtype, torch.Tensor] = field(default_factory=dict)
    # per source dtype: (slot, piece, start, end) of each piece copied, in order
    takes: dict[torch.dtype, list[tuple[int, int, int, int]]] = field(default_factory=dict)
    # (work index, slot, piece) of the host pieces read where they are (snapshots)
    reads: list[tuple[int, int, int]] = field(default_factory=list)
    nbytes: int = 0
    event: object = None


class OffloadPlan:
    """The buckets of an update (see [Note: offload pipeline]), bound to one update's sources.

    The layout (buckets, staging, events) depends only on the sources' shapes, dtypes and
    devices; :meth:`bind` points it at another update's pieces, :meth:`release_copied` and
    :meth:`release` drop them again.

    Args:
        shards: the average, in host memory.
        sources: per slot, the 1-D source pieces (on the accelerator, or host snapshots).
        follow_only: only the tensors that follow the source (``"follow"`` updates).
        bucket_bytes: most bytes copied per bucket.
        staging: returns a (pinned) host tensor of the given dtype and numel.
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
        pending = []  # (bucket, avg region, dtype, staging start, length, averaged)
        for i, slot in enumerate(shards.slots):
            if follow_only and slot.averaged:
                continue
            view, off = shards.views[i], 0
            for p, piece in enumerate(sources[i]):
                n = piece.numel()
                if not copied(piece):
                    b = buckets[-1]
                    b.reads.append((len(b.work), i, p))
                    b.work.append((view[off : off + n], piece, slot.averaged))
                    off += n
                    continue
                es, pos = piece.element_size(), 0
                while pos < n:
                    b = buckets[-1]
                    room = (bucket_bytes - b.nbytes) // es
                    if room <= 0 and b.nbytes:
                        buckets.append(_Bucket())
                        continue
                    take = min(n - pos, max(room, 1))
                    d = piece.dtype
                    _, regions = b.copies.setdefault(d, ([], []))
                    start = regions[-1][1] if regions else 0
                    regions.append((start, start + take))
                    b.takes.setdefault(d, []).append((i, p, pos, pos + take))
                    pending.append(
                        (b, view[off + pos : off + pos + take], d, start, take, slot.averaged)
                    )
                    b.nbytes += take * es
                    pos += take
                off += n
        for b in buckets:
            b.staging = {d: staging(d, regions[-1][1]) for d, (_, regions) in b.copies.items()}
        for b, avg, d, start, take, averaged in pending:
            b.work.append((avg, b.staging[d][start : start + take], averaged))
        self.buckets = [b for b in buckets if b.work]
        for b in self.buckets:
            b.event = event()
        self.bind(sources)

    def bind(self, sources: Sources) -> None:
        """Point the plan at ``sources`` (an update's pieces, laid out as the first's)."""
        for b in self.buckets:
            for d, takes in b.takes.items():
                srcs = b.copies[d][0]
                srcs.clear()
                for i, p, a, e in takes:
                    piece = sources[i][p]
                    srcs.append(piece if a == 0 and e == piece.numel() else piece[a:e])
            for w, i, p in b.reads:
                avg, _, averaged = b.work[w]
                b.work[w] = (avg, sources[i][p], averaged)

    def release_copied(self) -> None:
        """Drop the device pieces (their copies are enqueued)."""
        for b in self.buckets:
            for srcs, _ in b.copies.values():
                srcs.clear()

    def release(self) -> None:
        """Drop every piece of the bound update (its CPU math is done)."""
        self.release_copied()
        for b in self.buckets:
            for w, _, _ in b.reads:
                avg, _, averaged = b.work[w]
                b.work[w] = (avg, None, averaged)

    def copy(self, scratch: Callable[[torch.dtype, int], torch.Tensor], stream: object) -> None:
        """Issue every bucket's copies on the current (side) stream; record its event."""
        for b in self.buckets:
            for d, (srcs, _) in b.copies.items():
                region = b.staging[d]
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

    def staging_blocks(self) -> list[torch.Tensor]:
        return [t for b in self.buckets for t in b.staging.values()]


class _HostSet:
    """One set of the offload's host buffers: snapshots, and a plan (staging, events) per
    kind of update. ``idle`` is set while no update in flight uses it."""

    def __init__(self, snapshots: Snapshots) -> None:
        self.snapshots = snapshots
        self.plans: dict[bool, OffloadPlan] = {}  # by follow_only
        self.idle = threading.Event()
        self.idle.set()


def _apply_on_worker(
    plan: OffloadPlan, kind: Kind, weight: float, done: threading.Event, errors: list
) -> None:
    # Holds neither the engine nor the averager (see engine._serve).
    try:
        plan.apply(kind, weight)
    except BaseException as e:  # kept and raised on the training thread's next call
        errors.append(e)
    finally:
        plan.release()
        done.set()


class OffloadEngine(SideStreamEngine):
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
        super().__init__(shards, device)
        self.bucket_bytes = bucket_bytes
        self._pin = device.type != "cpu"
        self._copied = self._dm.Event()
        self._sets = [
            _HostSet(Snapshots(volatile, alloc=self._alloc_like, non_blocking=True))
            for _ in range(1 if blocking else 2)
        ]
        self._turn = 0  # the set the next update uses
        self._errors: list[BaseException] = []
        self._scratch: torch.Tensor | None = None
        if not blocking:
            self.worker = Worker()
            # First job: the thread's device. Its first CUDA call (an event wait) would
            # otherwise create a context on device 0, on every rank of the node.
            self.worker.put(functools.partial(self._dm.set_device, device))

    def _alloc_like(self, t: torch.Tensor) -> torch.Tensor:
        return torch.empty(t.shape, dtype=t.dtype, pin_memory=self._pin)

    def _stage(self, dtype: torch.dtype, numel: int) -> torch.Tensor:
        return torch.empty(numel, dtype=dtype, pin_memory=self._pin)

    def _pack(self, dtype: torch.dtype, numel: int) -> torch.Tensor:
        if self._scratch is None:
            # Allocated on the side stream, which alone uses it.
            self._scratch = torch.empty(self.bucket_bytes, dtype=torch.uint8, device=self.device)
        return self._scratch[: numel * dtype.itemsize].view(dtype)

    def _staged(self, t: torch.Tensor) -> bool:
        # Device pieces go through staging; host snapshots are read where they are. With no
        # accelerator every piece goes through staging, so the whole pipeline runs.
        return not self._pin or t.device.type != "cpu"

    def _event(self) -> object:
        # A blocking event lets the waiting thread sleep instead of spinning on a core
        # the CPU update needs.
        if self.device.type == "cuda":
            return self._dm.Event(blocking=True)
        return self._dm.Event()

    def _settle(self, host: _HostSet | None = None) -> None:
        """Return when no update in flight uses ``host`` (by default the next one's)."""
        (host or self._sets[self._turn]).idle.wait()
        _raise_pending(self._errors)

    def capture(self, flat: list[torch.Tensor]) -> list[torch.Tensor]:
        self._protected = protect(flat, self._side, self._protected)
        host = self._sets[self._turn]
        self._settle(host)  # update t-2 may still read these snapshots
        return host.snapshots.refresh(flat)

    def _plan(self, host: _HostSet, sources: Sources, follow_only: bool) -> OffloadPlan:
        plan = host.plans.get(follow_only)
        if plan is None:
            plan = host.plans[follow_only] = OffloadPlan(
                self.shards,
                sources,
                follow_only=follow_only,
                bucket_bytes=self.bucket_bytes,
                staging=self._stage,
                event=self._event,
                copied=self._staged,
            )
        else:
            plan.bind(sources)
        return plan

    def submit(self, update: Update) -> None:
        host = self._sets[self._turn]
        self._settle(host)  # its staging and events are reused
        self._start_side()
        with self._dm.stream(self._side):
            plan = self._plan(host, update.sources(), update.kind is Kind.FOLLOW)
            plan.copy(self._pack, self._side)
            self._copied.record(self._side)
        plan.release_copied()
        if self.worker is None:
            try:
                plan.apply(update.kind, update.weight)
            finally:
                plan.release()
            return
        host.idle.clear()
        self.worker.put(
            functools.partial(
                _apply_on_worker, plan, update.kind, update.weight, host.idle, self._errors
            )
        )
        self._turn = (self._turn + 1) % len(self._sets)

    def fence(self) -> None:
        self._current().wait_event(self._copied)

    def wait(self) -> None:
        self.fence()
        if self.worker is not None:
            self.worker.join()
        _raise_pending(self._errors)
        self._copied.synchronize()

    def held_bytes(self) -> dict[str, int]:
        """Pinned host blocks as the allocator holds them (see [Note: pinned memory])."""
        blocks = [t for h in self._sets for t in h.snapshots.dsts]
        blocks += [t for h in self._sets for p in h.plans.values() for t in p.staging_blocks()]
        sizes = [t.numel() * t.element_size() for t in blocks]
        if self._pin:
            sizes = [pinned_block_bytes(n) for n in sizes]
        return {
            "accelerator": 0 if self._scratch is None else self._scratch.numel(),
            "pinned_host": sum(sizes),
        }
