"""Collectives that move ``Shard(0)`` chunks of many tensors with one call per dtype.

Chunks are uneven (see [Note: chunking] in shards.py), but collectives want equal sizes
on every rank. So each tensor gets a padded *block* of ``ceil(rows / world)`` rows in a flat
buffer per dtype; a rank writes its chunk at the start of the block and the rest is padding.
Rank ``r``'s chunk of tensor ``i`` is then ``recv[r][off_i : off_i + len_r]``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from datetime import timedelta

import torch
import torch.distributed as dist

from .shards import chunk_bounds, rows_shape


class ChunkComm:
    """Gathers, all-gathers, scatters and broadcasts the chunks of a list of tensors.

    Args:
        shapes: global shapes of the tensors.
        dtypes: dtype of each tensor as sent.
        world: number of ranks.
        rank: this rank.
        device: the device the communication buffers live on.
        group: process group (None: the default one).
    """

    def __init__(
        self,
        shapes: Sequence[torch.Size],
        dtypes: Sequence[torch.dtype],
        world: int,
        rank: int,
        device: torch.device,
        group: dist.ProcessGroup | None = None,
    ) -> None:
        self.world, self.rank, self.device, self.group = world, rank, device, group
        self.shapes = [torch.Size(s) for s in shapes]
        self.dtypes = list(dtypes)
        self.bounds = [[chunk_bounds(s, world, r) for r in range(world)] for s in self.shapes]
        self.sizes: dict[torch.dtype, int] = {}
        self.offsets: list[int] = []
        for shape, dtype in zip(self.shapes, self.dtypes, strict=True):
            rows = rows_shape(shape)
            block = -(-rows[0] // world) * (shape.numel() // rows[0] if rows[0] else 0)
            self.offsets.append(self.sizes.get(dtype, 0))
            self.sizes[dtype] = self.sizes.get(dtype, 0) + block

    def _pack(self, chunks: Sequence[torch.Tensor]) -> dict[torch.dtype, torch.Tensor]:
        flats = {d: torch.zeros(n, dtype=d, device=self.device) for d, n in self.sizes.items()}
        for i, c in enumerate(chunks):
            if c.numel():
                flats[self.dtypes[i]][self.offsets[i] : self.offsets[i] + c.numel()].copy_(
                    c.reshape(-1)
                )
        return flats

    def _pieces(self, recv: dict[torch.dtype, list[torch.Tensor]], i: int) -> list[torch.Tensor]:
        """Tensor ``i``'s non-empty chunks, rank by rank, as 1-D views into ``recv``."""
        off, out = self.offsets[i], []
        for r, (a, b) in enumerate(self.bounds[i]):
            if b > a:
                out.append(recv[self.dtypes[i]][r][off : off + b - a])
        return out

    def gather(self, chunks: Sequence[torch.Tensor], dst: int) -> list[list[torch.Tensor]] | None:
        """Every rank's chunks to ``dst``: there, each tensor's chunks as 1-D pieces."""
        flats = self._pack(chunks)
        recv = {}
        for d, flat in flats.items():
            lst = [torch.empty_like(flat) for _ in range(self.world)] if self.rank == dst else None
            dist.gather(flat, lst, dst=dst, group=self.group)
            recv[d] = lst
        if self.rank != dst:
            return None
        return [self._pieces(recv, i) for i in range(len(self.shapes))]

    def all_gather(self, chunks: Sequence[torch.Tensor]) -> list[list[torch.Tensor]]:
        """Every rank's chunks to every rank, as 1-D pieces per tensor."""
        recv = {}
        for d, flat in self._pack(chunks).items():
            lst = [torch.empty_like(flat) for _ in range(self.world)]
            dist.all_gather(lst, flat, group=self.group)
            recv[d] = lst
        return [self._pieces(recv, i) for i in range(len(self.shapes))]

    def scatter(self, fulls: Sequence[torch.Tensor] | None, src: int) -> list[torch.Tensor]:
        """Whole tensors on ``src`` to each rank's chunks (1-D)."""
        out = {}
        for d, n in self.sizes.items():
            mine = torch.empty(n, dtype=d, device=self.device)
            lst = None
            if self.rank == src:
                lst = [torch.zeros(n, dtype=d, device=self.device) for _ in range(self.world)]
                for i, full in enumerate(fulls):
                    if self.dtypes[i] != d:
                        continue
                    flat = full.reshape(-1)
                    for r, (a, b) in enumerate(self.bounds[i]):
                        lst[r][self.offsets[i] : self.offsets[i] + b - a].copy_(flat[a:b])
            dist.scatter(mine, lst, src=src, group=self.group)
            out[d] = mine
        res = []
        for i in range(len(self.shapes)):
            a, b = self.bounds[i][self.rank]
            res.append(out[self.dtypes[i]][self.offsets[i] : self.offsets[i] + b - a])
        return res


def broadcast_tensors(tensors: Sequence[torch.Tensor], src: int, group=None) -> None:
    """Broadcast 1-D tensors in place from ``src``, one collective per dtype."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for ts in by_dtype.values():
        flat = torch.cat(ts)
        dist.broadcast(flat, src=src, group=group)
        torch._foreach_copy_(ts, list(torch.split(flat, [t.numel() for t in ts])))


def collective_timeout() -> float:
    """Seconds a rank waits for the others at the start of the average's collectives."""
    return float(os.environ.get("DISTAVG_COLLECTIVE_TIMEOUT", "600"))


def agree(what: str, steps: int, world: int, device: torch.device, group=None) -> None:
    """Check that every rank called ``what`` and holds an average of ``steps`` updates.

    Runs at the start of each collective of the average (gather, swap, save, load), never
    per step. On gloo a monitored barrier fails within :func:`collective_timeout` naming
    the ranks that did not arrive (elsewhere the process group's own timeout applies);
    then one small all-gather compares the step counts, which differ when
    ``update_parameters`` ran on some ranks only: their chunks would mix different
    averages.
    """
    if world == 1:
        return
    if dist.get_backend(group) == "gloo":
        try:
            dist.monitored_barrier(
                group=group, timeout=timedelta(seconds=collective_timeout()), wait_all_ranks=True
            )
        except RuntimeError as e:
            raise RuntimeError(
                f"{what} is a collective: every rank must call it (not only inside "
                f"`if rank == 0:`), and some ranks did not within "
                f"DISTAVG_COLLECTIVE_TIMEOUT={collective_timeout():g}s: {e}"
            ) from e
    mine = torch.tensor([steps], dtype=torch.int64, device=device)
    every = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(every, mine, group=group)
    counts = [int(t) for t in every]
    if len(set(counts)) > 1:
        raise RuntimeError(
            f"{what}: the ranks' averages have different step counts "
            f"({', '.join(f'rank {r}: {c}' for r, c in enumerate(counts))}): "
            f"update_parameters must be called on every rank, the same number of times. "
            f"The chunks would mix different averages, so none was used"
        )
