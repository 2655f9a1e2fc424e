"""The average as state: DCP ``Stateful`` form, whole-model export, and the swap.

[Note: state dict form]
``state_dict()`` is ``{"steps": int, "rule": {"name": ..., **hparams}, "average": {...}}``.
Each averaged tensor appears under its model key as
  * a ``Shard(0)`` DTensor over all ranks when the average is sharded across ranks, so
    DCP writes each chunk once and can load it into any world size;
  * a plain tensor where one rank holds it whole (owner placement, one process, or a
    0-dim tensor), and is absent on the ranks that hold nothing: DCP then writes it from
    the one rank that has it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from ._comm import ChunkComm, broadcast_tensors
from .shards import chunk_bounds

if TYPE_CHECKING:
    from torch import nn

    from .averaged import BaseAveragedModel


def _sharded(avg: BaseAveragedModel) -> bool:
    return avg.placement == "sharded" and avg.topology.world > 1


def _mesh(avg: BaseAveragedModel) -> DeviceMesh:
    mesh = avg.topology.mesh
    if mesh is not None and mesh.device_type == avg.device.type:
        return mesh
    return DeviceMesh.from_group(dist.group.WORLD, avg.device.type)


def rule_state(avg: BaseAveragedModel) -> dict[str, Any]:
    return {"name": type(avg).__name__, **avg.hparams()}


def state_dict(avg: BaseAveragedModel) -> dict[str, Any]:
    """See [Note: state dict form]."""
    tensors: dict[str, torch.Tensor] = {}
    mesh = _mesh(avg) if _sharded(avg) else None
    for i, slot in enumerate(avg.shards.slots):
        view = avg.shards.view(i)
        if mesh is not None and len(slot.shape) > 0:
            tensors[slot.key] = DTensor.from_local(
                view, mesh, [Shard(0)], run_check=False,
                shape=slot.shape, stride=_contiguous_stride(slot.shape),
            )
        elif slot.numel == slot.shape.numel():
            tensors[slot.key] = view
    return {"steps": avg.steps, "rule": rule_state(avg), "average": tensors}


def load_state_dict(avg: BaseAveragedModel, sd: dict[str, Any]) -> None:
    """Check everything first, then copy: a bad checkpoint leaves the average untouched."""
    for key in ("steps", "rule", "average"):
        if key not in sd:
            raise ValueError(f"state_dict has no {key!r} entry; got keys {sorted(sd)}")
    mine, theirs = rule_state(avg), sd["rule"]
    if theirs != mine:
        raise ValueError(f"checkpoint holds a {theirs} average, but this averager is {mine}")
    expected = state_dict(avg)["average"]
    copies = []
    for key, dst in expected.items():
        if key not in sd["average"]:
            raise ValueError(f"checkpoint average has no tensor {key!r}")
        src = sd["average"][key]
        if tuple(src.shape) != tuple(dst.shape):
            raise ValueError(
                f"checkpoint tensor {key!r} has shape {tuple(src.shape)}, "
                f"the average has {tuple(dst.shape)}"
            )
        src_local = src.to_local() if isinstance(src, DTensor) else src
        dst_local = dst.to_local() if isinstance(dst, DTensor) else dst
        if tuple(src_local.shape) != tuple(dst_local.shape):
            raise ValueError(
                f"checkpoint tensor {key!r} holds a local chunk of shape "
                f"{tuple(src_local.shape)}, this rank keeps {tuple(dst_local.shape)}"
            )
        if src_local.data_ptr() != dst_local.data_ptr() or src_local.numel() == 0:
            copies.append((dst_local, src_local))
    for dst, src in copies:
        dst.copy_(src)
    avg._steps = int(sd["steps"])


def full_state_dict(avg: BaseAveragedModel) -> dict[str, torch.Tensor]:
    """The whole average on ``owner_rank`` (see ``BaseAveragedModel.full_state_dict``)."""
    topo, shards = avg.topology, avg.shards
    if _sharded(avg):
        comm = ChunkComm(
            [s.shape for s in shards.slots], [s.dtype for s in shards.slots],
            topo.world, topo.rank, avg.device,
        )
        pieces = comm.gather(shards.views, avg.owner_rank)
        if pieces is None:
            return {}
        fulls = [torch.cat(p).view(s.shape) for p, s in zip(pieces, shards.slots, strict=True)]
    elif topo.rank == avg.owner_rank or topo.world == 1:
        fulls = [shards.view(i).clone() for i in range(len(shards.slots))]
    else:
        return {}
    out = {}
    for spec, t in zip(topo.specs, fulls, strict=True):
        for key in (spec.key, *spec.aliases):
            out[key] = t
    return out


class Swap:
    """Exchanges the live model's values with the average and back (see ``swapped``).

    Each rank backs up only its ``Shard(0)`` chunk of every live tensor. Replicated
    (DDP) tensors are rebuilt whole from every rank's chunk with one all-gather per dtype,
    both on entry (the average) and on exit (the backup); FSDP2 shards need no collective.
    """

    def __init__(self, avg: BaseAveragedModel, model: nn.Module) -> None:
        self.avg = avg
        topo = avg.topology
        self.flat = topo.locals(model)
        self.chunks = []
        for i, spec in enumerate(topo.specs):
            a, b = chunk_bounds(spec.shape, topo.world, topo.rank)
            la, _ = topo.local_bounds(i)
            self.chunks.append(self.flat[i][a - la : b - la])
        self.replicated = [i for i, s in enumerate(topo.specs) if not s.sharded]
        self.sharded = [i for i, s in enumerate(topo.specs) if s.sharded]

    def enter(self) -> None:
        avg, topo = self.avg, self.avg.topology
        self.backup = [c.clone() for c in self.chunks]
        if avg.placement == "sharded" or topo.world == 1:
            _copy(self.chunks, avg.shards.views)
            self._rebuild_replicated()
            return
        owner = topo.rank == avg.owner_rank
        if self.replicated:
            if owner:
                _copy([self.flat[i] for i in self.replicated],
                      [avg.shards.views[i] for i in self.replicated])
            broadcast_tensors([self.flat[i] for i in self.replicated], avg.owner_rank)
        if self.sharded:
            slots = [avg.shards.slots[i] for i in self.sharded]
            comm = ChunkComm([s.shape for s in slots], [s.dtype for s in slots],
                             topo.world, topo.rank, avg.device)
            fulls = [avg.shards.views[i] for i in self.sharded] if owner else None
            mine = comm.scatter(fulls, avg.owner_rank)
            _copy([self.chunks[i] for i in self.sharded], mine)

    def exit(self) -> None:
        _copy(self.chunks, self.backup)
        self._rebuild_replicated()

    def _rebuild_replicated(self) -> None:
        topo = self.avg.topology
        if topo.world == 1 or not self.replicated:
            return
        specs = [topo.specs[i] for i in self.replicated]
        comm = ChunkComm([s.shape for s in specs], [s.dtype for s in specs],
                         topo.world, topo.rank, topo.device)
        pieces = comm.all_gather([self.chunks[i] for i in self.replicated])
        for i, p in zip(self.replicated, pieces, strict=True):
            if p:
                torch.cat(p, out=self.flat[i])


def _copy(dsts: list[torch.Tensor], srcs: list[torch.Tensor]) -> None:
    pairs = [(d, s) for d, s in zip(dsts, srcs, strict=True) if d.numel()]
    for d, s in pairs:
        d.copy_(s)


def _contiguous_stride(shape: torch.Size) -> tuple[int, ...]:
    stride, acc = [], 1
    for d in reversed(shape):
        stride.append(acc)
        acc *= max(d, 1)
    return tuple(reversed(stride))
