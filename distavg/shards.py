"""Where the average lives: flat buffers per dtype, per-tensor views, chunk ownership.

[Note: chunking]
Every averaged tensor is split along dim 0 exactly as FSDP2's ``Shard(0)`` does it
(``torch.chunk``): chunks of ``ceil(dim0 / world)`` rows, a shorter last chunk, and
possibly empty chunks at the end. A 0-dim tensor counts as one row. So a DDP rank's
chunk of a replicated parameter and an FSDP2 rank's local shard are the same rows, and
both describe themselves to DCP as the same ``Shard(0)`` DTensor.

[Note: flat layout]
This rank's averaged regions live in one flat buffer per dtype. Inside a buffer they are
laid out by how they are updated, so that each kind of update is as few ops as possible:
  1. *direct*: large averaged tensors whose source has the average's dtype, each
     64-byte aligned; updated by one ``_foreach_lerp_`` over all of them.
  2. *staged*: small averaged tensors (per-op overhead dominates) and tensors whose source
     dtype differs (bf16 params, fp32 average); contiguous, updated block by block with
     one ``cat`` into a staging block (which also casts) and one ``lerp_``.
  3. *follow*: tensors copied from the source on every call (buffers when
     ``update_buffers=False``, integer tensors always); contiguous, one ``cat`` writes them.
Large tensors whose source dtype differs are laid out like direct ones and updated one by
one: fused when the compiled kernel is on, else cast into the stage piece by piece (see
[Note: fused upcast-lerp] in ``_kernels``).

[Note: CPU staging]
On CPU a staging block holds fewer elements than ATen's grain size (32768). Then ``cat``
takes its serial kernel (a memcpy per input; larger outputs pay a TensorIterator copy per
input, 2-3x the cost), and neither ``cat`` nor ``lerp_`` opens an OpenMP parallel region:
on a machine whose cores are also busy (data loading, other ranks) each such region can
wait a scheduler slice for its second thread, which made 1M-element blocks 5-10x slower
than the per-tensor loop they replace. Staged tensors are small, so the lost parallelism
costs little; large tensors keep the multi-threaded direct path.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, NamedTuple

import torch

from . import _kernels

if TYPE_CHECKING:
    from .topology import Topology

# Below this many elements a tensor is staged: one cat + one lerp over many small tensors
# beats one kernel launch (or TensorIterator setup) per tensor.
SMALL_NUMEL = 1 << 15
# Staging block size on accelerators: large enough to amortise the launches, small enough
# to stay in cache.
STAGE_NUMEL = 1 << 20
# Staging block size on CPU, see [Note: CPU staging].
CPU_STAGE_NUMEL = (1 << 15) - 1
# Piece size when a large tensor is cast into the stage on its way to the average (bf16
# params, fp32 average): 4 MiB of fp32 is still in cache when lerp_ reads it, and few
# enough pieces that the parallel regions they open stay few (see [Note: CPU staging]).
UPCAST_NUMEL = 1 << 20
_ALIGN_BYTES = 64


def rows_shape(shape: Sequence[int]) -> tuple[int, ...]:
    """The shape chunked along dim 0: a 0-dim tensor counts as one row."""
    return tuple(shape) if len(shape) else (1,)


def chunk_rows(dim0: int, world: int, rank: int) -> tuple[int, int]:
    """Rows ``[start, end)`` of ``rank``'s ``torch.chunk(dim=0)`` piece, as FSDP2 shards."""
    size = -(-dim0 // world)
    start = min(rank * size, dim0)
    return start, min(start + size, dim0)


def chunk_bounds(shape: Sequence[int], world: int, rank: int) -> tuple[int, int]:
    """Elements ``[start, end)`` of the flattened tensor that ``rank``'s chunk covers."""
    rows = rows_shape(shape)
    row_numel = 1
    for d in rows[1:]:
        row_numel *= d
    start, end = chunk_rows(rows[0], world, rank)
    return start * row_numel, end * row_numel


class Route(Enum):
    """How a slot is updated (see [Note: flat layout])."""

    DIRECT = "direct"
    UPCAST = "upcast"
    STAGED = "staged"
    FOLLOW = "follow"


@dataclass(frozen=True)
class Slot:
    """One averaged tensor, as this rank stores it.

    Attributes:
        key: the tensor's state-dict key in the unwrapped model.
        shape: the tensor's global shape.
        start: first element of the flattened tensor this rank keeps.
        end: one past the last element this rank keeps.
        dtype: the dtype of the average.
        src_dtype: the dtype of the source tensor.
        averaged: lerped on averaging calls; otherwise copied from the source on every call.
        pieces: lengths of the source pieces that fill ``[start, end)`` in order (one piece
            unless the region is assembled from several ranks).
        chunked: the region is this rank's ``Shard(0)`` chunk (one process: the whole
            tensor); otherwise one rank keeps the whole tensor and the others nothing.
    """

    key: str
    shape: torch.Size
    start: int
    end: int
    dtype: torch.dtype
    src_dtype: torch.dtype
    averaged: bool
    pieces: tuple[int, ...]
    chunked: bool = True

    @property
    def numel(self) -> int:
        return self.end - self.start

    @property
    def route(self) -> Route:
        """How the slot is updated (see [Note: flat layout])."""
        if not self.averaged:
            return Route.FOLLOW
        if len(self.pieces) == 1 and self.numel >= SMALL_NUMEL:
            return Route.DIRECT if self.src_dtype == self.dtype else Route.UPCAST
        return Route.STAGED


def slots_for(
    topo: Topology,
    placement: str,
    owner_rank: int,
    dtype: torch.dtype | None,
    update_buffers: bool,
) -> list[Slot]:
    """This rank's slot of every tensor of ``topo`` for an average placed as asked.

    ``placement="sharded"``: every parameter (and FSDP2-sharded tensor) is chunked (see
    [Note: chunking]); the rest, and everything with ``"owner"``, is whole on ``owner_rank``.
    """
    slots = []
    for i, spec in enumerate(topo.specs):
        # Buffers are replicated but not identical across ranks (each rank's forward
        # updates its own BatchNorm statistics; DDP broadcasts rank 0's before the next
        # forward): the owner's are the ones averaged, as a whole.
        chunked = topo.world == 1 or (placement == "sharded" and (spec.is_param or spec.is_dtensor))
        if chunked:
            start, end = chunk_bounds(spec.shape, topo.world, topo.rank)
        else:
            start, end = (0, spec.shape.numel()) if topo.rank == owner_rank else (0, 0)
        la, lb = topo.local_bounds(i)
        if la <= start and end <= lb:
            pieces = (end - start,) if end > start else ()
        else:  # FSDP2 owner: the region arrives as every rank's chunk
            bounds = (chunk_bounds(spec.shape, topo.world, r) for r in range(topo.world))
            pieces = tuple(b - a for a, b in bounds if b > a)
        floating = spec.dtype.is_floating_point
        slots.append(
            Slot(
                key=spec.key,
                shape=spec.shape,
                start=start,
                end=end,
                dtype=dtype if (dtype is not None and floating) else spec.dtype,
                src_dtype=spec.dtype,
                averaged=floating and (spec.is_param or update_buffers),
                pieces=pieces,
                chunked=chunked,
            )
        )
    return slots


def shaped(flat: torch.Tensor, slot: Slot) -> torch.Tensor:
    """A 1-D tensor holding ``slot``'s region, shaped as the tensor (whole) or as its rows."""
    total = slot.shape.numel()
    if slot.start == 0 and slot.end == total:
        return flat.view(slot.shape)
    rows = rows_shape(slot.shape)
    return flat.view(-1, *rows[1:]) if total else flat.view(rows)


class _Group:
    """The slots of one average dtype: their flat buffer and update plan."""

    def __init__(self, dtype: torch.dtype, device: torch.device, pin: bool) -> None:
        self.dtype = dtype
        self.device = device
        self.pin = pin
        self.routes: dict[Route, list[int]] = {r: [] for r in Route}  # slot indices
        self.offsets: dict[int, int] = {}
        self.numel = 0

    def layout(self, slots: Sequence[Slot]) -> None:
        align = max(1, _ALIGN_BYTES // torch.empty((), dtype=self.dtype).element_size())
        r = self.routes
        for i in r[Route.DIRECT] + r[Route.UPCAST]:
            self.numel = -(-self.numel // align) * align
            self.offsets[i] = self.numel
            self.numel += slots[i].numel
        self.numel = -(-self.numel // align) * align
        for i in r[Route.STAGED] + r[Route.FOLLOW]:
            self.offsets[i] = self.numel
            self.numel += slots[i].numel
        self.flat = torch.zeros(
            self.numel, dtype=self.dtype, device=self.device, pin_memory=self.pin
        )
        staged, follow = r[Route.STAGED], r[Route.FOLLOW]
        self.staged_start = self.offsets[staged[0]] if staged else 0
        self.follow_start = self.offsets[follow[0]] if follow else self.numel
        self.blocks = self._blocks(slots)
        block_max = max((n for _, n, _ in self.blocks), default=0)
        upcast_max = max((min(slots[i].numel, UPCAST_NUMEL) for i in r[Route.UPCAST]), default=0)
        self.stage = torch.empty(max(block_max, upcast_max), dtype=self.dtype, device=self.device)

    def _blocks(
        self, slots: Sequence[Slot]
    ) -> list[tuple[int, int, list[tuple[int, int, int, int]]]]:
        """Split the staged run into blocks (see [Note: CPU staging]).

        A block is ``(flat offset, numel, [(slot, piece, start, end), ...])``: the block's
        source is the concatenation of those piece slices.
        """
        block = CPU_STAGE_NUMEL if self.device.type == "cpu" else STAGE_NUMEL
        blocks, items, begin, size = [], [], self.staged_start, 0
        for i in self.routes[Route.STAGED]:
            for p, length in enumerate(slots[i].pieces):
                pos = 0
                while pos < length:
                    take = min(length - pos, block - size)
                    items.append((i, p, pos, pos + take))
                    pos += take
                    size += take
                    if size == block:
                        blocks.append((begin, size, items))
                        items, begin, size = [], begin + size, 0
        if size:
            blocks.append((begin, size, items))
        return blocks


class Shards:
    """This rank's part of the average: one flat buffer per dtype, exposed as views.

    Args:
        slots: the averaged tensors with this rank's region of each; empty regions are
            kept as zero-size views so indices match the model's tensors.
        device: where the buffers live.
        pin: allocate the buffers in pinned host memory (for a CPU average of
            accelerator parameters: asynchronous device-to-host copies need it).
    """

    def __init__(self, slots: Sequence[Slot], device: torch.device, pin: bool = False) -> None:
        self.slots = list(slots)
        self.device = device
        self.groups: dict[torch.dtype, _Group] = {}
        for i, s in enumerate(self.slots):
            g = self.groups.setdefault(s.dtype, _Group(s.dtype, device, pin))
            if s.numel == 0:
                continue
            g.routes[s.route].append(i)
        for g in self.groups.values():
            g.layout(self.slots)
        self.views: list[torch.Tensor] = []
        for i, s in enumerate(self.slots):
            g = self.groups[s.dtype]
            off = g.offsets.get(i, 0)
            self.views.append(g.flat[off : off + s.numel])
        self._resolved: tuple[object, list[_Plan]] | None = None

    @property
    def nbytes(self) -> int:
        """Bytes of averaged state held on this rank (staging excluded)."""
        return sum(g.flat.numel() * g.flat.element_size() for g in self.groups.values())

    def view(self, i: int) -> torch.Tensor:
        """Slot ``i``'s region shaped as the tensor (whole) or as its rows (a chunk)."""
        return shaped(self.views[i], self.slots[i])

    # -- updates --------------------------------------------------------------------
    # `sources[i]` is the list of 1-D source pieces that fill slot i's region in order.

    def _plan(self, sources: Sequence[Sequence[torch.Tensor]]) -> list[_Plan]:
        """Per-group source lists, cached while the caller passes the same `sources`."""
        if self._resolved is not None and self._resolved[0] is sources:
            return self._resolved[1]
        plans = []
        for g in self.groups.values():
            direct, upcast = g.routes[Route.DIRECT], g.routes[Route.UPCAST]
            blocks = []
            for begin, n, items in g.blocks:
                srcs = []
                for i, p, a, b in items:
                    piece = sources[i][p]
                    srcs.append(piece if (a == 0 and b == piece.numel()) else piece[a:b])
                blocks.append((g.flat[begin : begin + n], g.stage[:n], srcs))
            plans.append(
                _Plan(
                    direct_views=[self.views[i] for i in direct],
                    direct_srcs=[sources[i][0] for i in direct],
                    upcast_views=[self.views[i] for i in upcast],
                    upcast_srcs=[sources[i][0] for i in upcast],
                    blocks=blocks,
                    follow_view=g.flat[g.follow_start :],
                    follow_srcs=[p for i in g.routes[Route.FOLLOW] for p in sources[i]],
                    stage=g.stage,
                )
            )
        self._resolved = (sources, plans)
        return plans

    def forget(self, sources: Sequence[Sequence[torch.Tensor]]) -> None:
        """Drop the plan resolved for ``sources`` (one-shot buffers must not be kept)."""
        if self._resolved is not None and self._resolved[0] is sources:
            self._resolved = None

    @torch.inference_mode()
    def copy_all(self, sources: Sequence[Sequence[torch.Tensor]]) -> None:
        """avg <- src for every slot (the first update)."""
        for plan in self._plan(sources):
            if plan.direct_views:
                torch._foreach_copy_(plan.direct_views, plan.direct_srcs)
            for view, src in zip(plan.upcast_views, plan.upcast_srcs, strict=True):
                view.copy_(src)  # copy_ casts into the average's dtype
            for view, _, srcs in plan.blocks:
                torch.cat(srcs, out=view)  # so does cat
            if plan.follow_srcs:
                torch.cat(plan.follow_srcs, out=plan.follow_view)

    @torch.inference_mode()
    def lerp(self, sources: Sequence[Sequence[torch.Tensor]], weight: float) -> None:
        """avg <- avg + weight * (src - avg) for averaged slots; follow slots are copied.

        Every path computes what ``avg.lerp_(src.to(avg.dtype), weight)`` does, bitwise,
        except the opt-in fused upcast-lerp (see [Note: fused upcast-lerp] in _kernels).
        """
        for plan in self._plan(sources):
            if plan.direct_views:
                torch._foreach_lerp_(plan.direct_views, plan.direct_srcs, weight)
            if plan.upcast_views and not _kernels.upcast_lerp_(
                plan.upcast_views, plan.upcast_srcs, weight
            ):
                _staged_upcast_lerp(plan.upcast_views, plan.upcast_srcs, plan.stage, weight)
            for view, staged, srcs in plan.blocks:
                torch.cat(srcs, out=staged)
                view.lerp_(staged, weight)
            if plan.follow_srcs:
                torch.cat(plan.follow_srcs, out=plan.follow_view)

    @torch.inference_mode()
    def follow(self, sources: Sequence[Sequence[torch.Tensor]]) -> None:
        """Copy only the follow slots (calls that do not average)."""
        for plan in self._plan(sources):
            if plan.follow_srcs:
                torch.cat(plan.follow_srcs, out=plan.follow_view)


class _Plan(NamedTuple):
    """One group's update, resolved against the caller's sources (see _Group)."""

    direct_views: list[torch.Tensor]  # one _foreach_lerp_
    direct_srcs: list[torch.Tensor]
    upcast_views: list[torch.Tensor]  # fused, or staged piece by piece
    upcast_srcs: list[torch.Tensor]
    # staged, per block: (flat view, its stage, sources): cat into the stage, one lerp_
    blocks: list[tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]]
    follow_view: torch.Tensor  # one cat
    follow_srcs: list[torch.Tensor]
    stage: torch.Tensor


def _staged_upcast_lerp(
    views: Sequence[torch.Tensor], srcs: Sequence[torch.Tensor], stage: torch.Tensor, w: float
) -> None:
    # Cast a cache-sized piece into the stage, then lerp it while it is still in cache.
    for view, src in zip(views, srcs, strict=True):
        for a in range(0, view.numel(), UPCAST_NUMEL):
            piece = src[a : a + UPCAST_NUMEL]
            staged = stage[: piece.numel()]
            staged.copy_(piece)
            view[a : a + piece.numel()].lerp_(staged, w)
