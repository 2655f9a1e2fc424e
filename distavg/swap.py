"""The average in the live model and in one place: ``swapped()`` and the whole-model gather.

Both move this rank's part of the average to where a whole tensor is needed: into the live
(possibly sharded) model for the length of a ``with`` block (:class:`Swap`), or onto the
owner rank as one ordinary state dict (:func:`full_state_dict`), or as a whole module
where one rank holds it all (:func:`whole_module`). With more than one rank the first two
are collectives: every rank must call them.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ._comm import ChunkComm, agree, broadcast_tensors
from .shards import chunk_bounds
from .topology import Topology, unwrap

if TYPE_CHECKING:
    from .averaged import BaseAveragedModel


def full_state_dict(avg: BaseAveragedModel) -> dict[str, torch.Tensor]:
    """The whole average on ``owner_rank`` (see ``BaseAveragedModel.full_state_dict``).

    Chunked tensors of a sharded average are gathered (one collective per dtype) on the
    parameters' device, the one the process group communicates on, then moved to the
    average's device; the others the owner holds whole.
    """
    topo, shards = avg.topology, avg.shards
    agree("full_state_dict()", avg.steps, topo.world, topo.device)
    gathered: dict[int, torch.Tensor] = {}
    if avg.sharded:
        chunked = [i for i, s in enumerate(shards.slots) if s.chunked]
        comm = ChunkComm(
            [shards.slots[i].shape for i in chunked],
            [shards.slots[i].dtype for i in chunked],
            topo.world,
            topo.rank,
            topo.device,
        )
        pieces = comm.gather([shards.views[i] for i in chunked], avg.owner_rank)
        for i, p in zip(chunked, pieces or [], strict=False):
            gathered[i] = torch.cat(p).view(shards.slots[i].shape).to(avg.device)
    if topo.rank != avg.owner_rank:
        return {}
    out = {}
    for i, spec in enumerate(topo.specs):
        t = gathered[i] if i in gathered else shards.view(i).clone()
        for key in (spec.key, *spec.aliases):
            out[key] = t
    return out


def whole_module(avg: BaseAveragedModel, model: nn.Module) -> nn.Module | None:
    """A whole averaged module whose tensors are views of the average, where this rank
    holds the whole average (one process, the owner under DDP); else None."""
    holds_all = all(s.start == 0 and s.end == s.shape.numel() for s in avg.shards.slots)
    if avg.topology.kind == "fsdp2" or not holds_all:
        return None
    source = unwrap(model)
    state = source.state_dict(keep_vars=True)
    memo: dict[int, Any] = {}
    for i, spec in enumerate(avg.topology.specs):
        t = state[spec.key]
        view = avg.shards.view(i)
        memo[id(t)] = nn.Parameter(view, requires_grad=False) if spec.is_param else view
    module = copy.deepcopy(source, memo)
    return module.requires_grad_(False)


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

    All collectives of :meth:`enter` run before it writes anything into the live model, into
    temporaries on the parameters' device: a collective that fails (a peer died, a timeout)
    leaves the model as it was. :meth:`exit` restores locally first; if its all-gather then
    fails it says that the model on this rank is not restored.
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
        specs, views, owner = topo.specs, avg.shards.views, topo.rank == avg.owner_rank
        agree("swapped()", avg.steps, topo.world, topo.device)
        # 1. collectives, into temporaries: (live destination, value) pairs
        whole = [i for i in self.chunked if not specs[i].is_dtensor and topo.world > 1]
        writes = [(self.chunks[i], views[i]) for i in self.chunked if i not in whole]
        writes += zip(
            [self.flat[i] for i in whole],
            self._gather_whole(whole, [views[i] for i in whole]),
            strict=True,
        )
        if self.broadcast and topo.world > 1:
            temps = [
                views[i].to(topo.device, specs[i].dtype)
                if owner
                else torch.empty(specs[i].shape.numel(), dtype=specs[i].dtype, device=topo.device)
                for i in self.broadcast
            ]
            broadcast_tensors(temps, avg.owner_rank)
            writes += zip([self.flat[i] for i in self.broadcast], temps, strict=True)
        if self.scatter:
            comm = _live_comm([specs[i] for i in self.scatter], topo)
            mine = comm.scatter([views[i] for i in self.scatter] if owner else None, avg.owner_rank)
            writes += zip([self.chunks[i] for i in self.scatter], mine, strict=True)
        # 2. local writes only
        self.backup = [self._backup_of(i).clone() for i in range(len(self.flat))]
        _copy([d for d, _ in writes], [s for _, s in writes])

    def exit(self) -> None:
        _copy([self._backup_of(i) for i in range(len(self.flat))], self.backup)
        if self.avg.topology.world == 1:
            return
        try:
            pieces = self._gather_whole(self.regathered, [self.chunks[i] for i in self.regathered])
        except Exception as e:
            raise RuntimeError(
                f"swapped(): restoring the model's own weights failed in a collective; on rank "
                f"{self.avg.topology.rank} its replicated parameters still hold parts of the "
                f"average. Reload the model (e.g. from a checkpoint) before training on: "
                f"{type(e).__name__}: {e}"
            ) from e
        _copy([self.flat[i] for i in self.regathered], pieces)

    def _gather_whole(self, indices: list[int], chunks: list[torch.Tensor]) -> list[torch.Tensor]:
        """The whole tensors ``indices`` (live dtypes, 1-D) from every rank's ``chunks``."""
        topo = self.avg.topology
        if topo.world == 1 or not indices:
            return []
        pieces = _live_comm([topo.specs[i] for i in indices], topo).all_gather(chunks)
        return [
            torch.cat(p) if p else self.flat[i][:0] for i, p in zip(indices, pieces, strict=True)
        ]


def _live_comm(specs: list, topo: Topology) -> ChunkComm:
    """Moves chunks of the live tensors ``specs`` on the parameters' device."""
    return ChunkComm(
        [s.shape for s in specs], [s.dtype for s in specs], topo.world, topo.rank, topo.device
    )


def _copy(dsts: list[torch.Tensor], srcs: list[torch.Tensor]) -> None:
    pairs = [(d, s) for d, s in zip(dsts, srcs, strict=True) if d.numel()]
    for d, s in pairs:
        d.copy_(s)
