"""Collectives that move ``Shard(0)`` chunks of many tensors with one call per dtype.

Chunks are uneven (see [Note: chunking] in shards.py), but collectives want equal sizes
on every rank. So each tensor gets a padded *block* of ``ceil(rows / world)`` rows in a flat
buffer per dtype; a rank writes its chunk at the start of the block and the rest is padding.
Rank ``r``'s chunk of tensor ``i`` is then ``recv[r][off_i : off_i + len_r]``.
"""

from __future__ import annotations

from collections.abc import Sequence

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
