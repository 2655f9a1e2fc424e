"""The average in the live model and in one place: ``swapped()`` and the whole-model gather.

Both move this rank's part of the average to where a whole tensor is needed: into the live
(possibly sharded) model for the length of a ``with`` block (:class:`Swap`), or onto the
owner rank as one ordinary state dict (:func:`full_state_dict`). Every rank must call
them: each is a collective when the average is spread over ranks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ._comm import ChunkComm, broadcast_tensors
from .shards import chunk_bounds

if TYPE_CHECKING:
    from torch import nn

    from .averaged import BaseAveragedModel


def full_state_dict(avg: BaseAveragedModel) -> dict[str, torch.Tensor]:
    """The whole average on ``owner_rank`` (see ``BaseAveragedModel.full_state_dict``).

    Chunked tensors of a sharded average are gathered (one collective per dtype); the
    others the owner holds whole.
    """
    topo, shards = avg.topology, avg.shards
    gathered: dict[int, torch.Tensor] = {}
    if avg.sharded:
        chunked = [i for i, s in enumerate(shards.slots) if s.chunked]
        comm = ChunkComm(
            [shards.slots[i].shape for i in chunked],
            [shards.slots[i].dtype for i in chunked],
            topo.world,
            topo.rank,
            avg.device,
        )
        pieces = comm.gather([shards.views[i] for i in chunked], avg.owner_rank)
        for i, p in zip(chunked, pieces or [], strict=False):
            gathered[i] = torch.cat(p).view(shards.slots[i].shape)
    if topo.rank != avg.owner_rank:
        return {}
    out = {}
    for i, spec in enumerate(topo.specs):
        t = gathered[i] if i in gathered else shards.view(i).clone()
        for key in (spec.key, *spec.aliases):
            out[key] = t
    return out


class Swap:
    """Puts the average into the live model and its own values back (see ``swapped``).

    Into the live tensors, by where the average of each lives:
      * a chunk on every rank: each rank writes its chunk; replicated (DDP) tensors are
        then rebuilt whole with one all-gather per dtype; FSDP2 shards need nothing more;
      * whole on the owner: the owner writes it and broadcasts it (replicated tensors), or
        scatters its chunks (FSDP2 shards).
    Back, by what the live tensors are: parameters are identical on every rank (DDP) or
    sharded (FSDP2), so each rank backs up only its chunk and replicated ones are rebuilt
    with an all-gather; buffers may differ across ranks, so each rank backs up its own.
    """

    def __init__(self, avg: BaseAveragedModel, model: nn.Module) -> None:
        self.avg = avg
        topo = avg.topology
        topo.reshard(model)  # write into the shards FSDP2 gathers from, not a stale copy
        self.flat = topo.local_tensors(model)
        self.chunks = []
        for i, spec in enumerate(topo.specs):
            a, b = chunk_bounds(spec.shape, topo.world, topo.rank)
            la, _ = topo.local_bounds(i)
            self.chunks.append(self.flat[i][a - la : b - la])
        specs, slots = topo.specs, avg.shards.slots
        n = range(len(specs))
        self.chunked = [i for i in n if slots[i].chunked]
        self.broadcast = [i for i in n if not slots[i].chunked and not specs[i].is_dtensor]
        self.scatter = [i for i in n if not slots[i].chunked and specs[i].is_dtensor]
        # Buffers may differ across ranks: each rank backs up its own, whole.
        self.per_rank = {i for i in n if not specs[i].is_param and not specs[i].is_dtensor}
        # Replicated parameters: backed up by chunk, regathered whole on exit.
        self.regathered = [i for i in n if specs[i].is_param and not specs[i].is_dtensor]

    def _backup_of(self, i: int) -> torch.Tensor:
        return self.flat[i] if i in self.per_rank else self.chunks[i]

    def enter(self) -> None:
        avg, topo = self.avg, self.avg.topology
        views, owner = avg.shards.views, topo.rank == avg.owner_rank
        self.backup = [self._backup_of(i).clone() for i in range(len(self.flat))]
        _copy([self.chunks[i] for i in self.chunked], [views[i] for i in self.chunked])
        self._all_gather([i for i in self.chunked if not topo.specs[i].is_dtensor])
        if self.broadcast and topo.world > 1:
            if owner:
                _copy([self.flat[i] for i in self.broadcast], [views[i] for i in self.broadcast])
            broadcast_tensors([self.flat[i] for i in self.broadcast], avg.owner_rank)
        if self.scatter:
            slots = [avg.shards.slots[i] for i in self.scatter]
            comm = ChunkComm(
                [s.shape for s in slots],
                [s.dtype for s in slots],
                topo.world,
                topo.rank,
                avg.device,
            )
            mine = comm.scatter([views[i] for i in self.scatter] if owner else None, avg.owner_rank)
            _copy([self.chunks[i] for i in self.scatter], mine)

    def exit(self) -> None:
        _copy([self._backup_of(i) for i in range(len(self.flat))], self.backup)
        self._all_gather(self.regathered)

    def _all_gather(self, indices: list[int]) -> None:
        """Rebuild the whole live tensors ``indices`` from every rank's chunk."""
        topo = self.avg.topology
        if topo.world == 1 or not indices:
            return
        specs = [topo.specs[i] for i in indices]
        comm = ChunkComm(
            [s.shape for s in specs], [s.dtype for s in specs], topo.world, topo.rank, topo.device
        )
        pieces = comm.all_gather([self.chunks[i] for i in indices])
        for i, p in zip(indices, pieces, strict=True):
            if p:
                torch.cat(p, out=self.flat[i])


def _copy(dsts: list[torch.Tensor], srcs: list[torch.Tensor]) -> None:
    pairs = [(d, s) for d, s in zip(dsts, srcs, strict=True) if d.numel()]
    for d, s in pairs:
        d.copy_(s)
