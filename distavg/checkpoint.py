"""The average as state: DCP ``Stateful`` form, whole-model export, and the swap.

[Note: state dict form]
``state_dict()`` is::

    {"steps": int,                   # update_parameters calls so far
     "rule": str,                    # JSON {"name": class name, **hparams()}
     "keys": str,                    # JSON {key: [tied aliases]} in the model's order
     "average": {key: tensor}}

Each averaged tensor appears under its model key as
  * a ``Shard(0)`` DTensor over all ranks when the average is sharded across ranks, so
    DCP writes each chunk once and can load it into any world size;
  * a plain tensor where one rank holds it whole (owner placement, one process, a 0-dim
    tensor, or a buffer: ranks' buffers differ, the owner's are kept), and is absent on
    the ranks that hold nothing: DCP then writes it from the one rank that has it.
The metadata entries are strings rather than nested dicts so that DCP stores each as one
opaque value: a checkpoint made with another rule then loads its metadata and fails our
check with a clear message, instead of failing DCP's key matching on ``rule.momentum``.

[Note: staged load]
``dcp.load`` first calls ``state_dict()``, then reads the checkpoint *in place* into the
tensors it returned, and only then calls ``load_state_dict`` with them. Were those
tensors views of the live average, a checkpoint of another rule (or one whose read fails
half-way) would already have overwritten it before any check could run. So
``state_dict()`` returns a snapshot: a copy of this rank's part of the average. DCP fills the snapshot, ``load_state_dict`` checks the metadata,
and only then copies it into the average. The cost is a transient second copy of this
rank's part of the average (``avg.shards.nbytes``: 1/world of the model when sharded)
during a save or a load; the snapshot also makes ``dcp.async_save`` safe against updates
that run while it writes. Shape and key mismatches are caught earlier still, by DCP's
planner, before any data is read.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from ._comm import ChunkComm, broadcast_tensors
from .shards import Shards, Slot, chunk_bounds, shaped

if TYPE_CHECKING:
    from torch import nn

    from .averaged import BaseAveragedModel

STATE_KEYS = ("steps", "rule", "keys", "average")


def _sharded(avg: BaseAveragedModel) -> bool:
    return avg.placement == "sharded" and avg.topology.world > 1


def _mesh(avg: BaseAveragedModel) -> DeviceMesh:
    mesh = avg.topology.mesh
    if mesh is not None and mesh.device_type == avg.device.type:
        return mesh
    return DeviceMesh.from_group(dist.group.WORLD, avg.device.type)


def rule_state(avg: BaseAveragedModel) -> dict[str, Any]:
    """The rule's name and parameters, normalised as they round-trip through JSON."""
    return json.loads(_rule_json(avg))


def _rule_json(avg: BaseAveragedModel) -> str:
    return json.dumps({"name": type(avg).__name__, **avg.hparams()}, default=repr)


def _keys_json(avg: BaseAveragedModel) -> str:
    return json.dumps({s.key: list(s.aliases) for s in avg.topology.specs})


def _snapshot(shards: Shards) -> list[torch.Tensor]:
    """A copy of every slot's region (see [Note: staged load]).

    One allocation per slot rather than views of one copy per dtype: ``dcp.async_save``'s
    stager fails on a DTensor whose local tensor starts at a storage offset ("invalid
    python storage", torch 2.13).
    """
    pairs = zip(shards.views, shards.slots, strict=True)
    return [shaped(view.clone(), slot) for view, slot in pairs]


def state_dict(avg: BaseAveragedModel) -> dict[str, Any]:
    """See [Note: state dict form] and [Note: staged load]."""
    tensors: dict[str, torch.Tensor] = {}
    mesh = _mesh(avg) if _sharded(avg) else None
    for slot, view in zip(avg.shards.slots, _snapshot(avg.shards), strict=True):
        if mesh is not None and slot.chunked and len(slot.shape) > 0:
            tensors[slot.key] = DTensor.from_local(
                view,
                mesh,
                [Shard(0)],
                run_check=False,
                shape=slot.shape,
                stride=_contiguous_stride(slot.shape),
            )
        elif slot.numel == slot.shape.numel():
            tensors[slot.key] = view
    return {
        "steps": avg.steps,
        "rule": _rule_json(avg),
        "keys": _keys_json(avg),
        "average": tensors,
    }


def load_state_dict(avg: BaseAveragedModel, sd: dict[str, Any]) -> None:
    """Check everything first, then copy: a bad checkpoint leaves the average untouched.

    ``sd`` is what ``state_dict()`` returned, filled by ``dcp.load``; or any dict of that
    form in which the tensors this rank keeps are either its ``Shard(0)`` chunk or the
    whole tensor (then this rank's chunk is taken from it).
    """
    missing = [k for k in STATE_KEYS if k not in sd]
    if missing:
        raise ValueError(
            f"state_dict has no {missing} entries; got keys {sorted(sd)}, expected "
            f"{list(STATE_KEYS)} (the form of {type(avg).__name__}.state_dict())"
        )
    mine, theirs = rule_state(avg), _parse("rule", sd["rule"])
    if theirs != mine:
        raise ValueError(
            f"checkpoint holds a {theirs} average, but this averager is {mine}; build the "
            f"averager with the checkpoint's rule and parameters to load it"
        )
    _check_keys(avg, _parse("keys", sd["keys"]))
    steps = sd["steps"]
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"state_dict 'steps' must be an integer >= 0, got {steps!r}")
    dsts, srcs = [], []
    for i, slot in enumerate(avg.shards.slots):
        if slot.numel == 0:
            continue
        if slot.key not in sd["average"]:
            raise ValueError(f"checkpoint average has no tensor {slot.key!r}")
        dst = avg.shards.view(i)
        dsts.append(dst)
        srcs.append(_local_source(slot, sd["average"][slot.key], tuple(dst.shape)))
    if dsts:
        torch._foreach_copy_(dsts, srcs)
    avg._steps = steps


def _parse(name: str, value: Any) -> Any:
    try:
        return json.loads(value)
    except (TypeError, ValueError):
        raise ValueError(
            f"state_dict {name!r} must be the JSON text that state_dict() writes, got "
            f"{value!r:.200}"
        ) from None


def _check_keys(avg: BaseAveragedModel, theirs: dict[str, list[str]]) -> None:
    mine = {s.key for s in avg.topology.specs}
    extra, lacking = sorted(set(theirs) - mine), sorted(mine - set(theirs))
    if extra or lacking:
        raise ValueError(
            f"checkpoint average is of another model: it has tensors {extra[:5]} that this "
            f"model lacks and lacks {lacking[:5]} that this model has"
        )


def _local_source(slot: Slot, src: Any, want: tuple[int, ...]) -> torch.Tensor:
    """The part of ``src`` that fills this rank's region of ``slot``, of shape ``want``."""
    if not isinstance(src, torch.Tensor) or tuple(src.shape) != tuple(slot.shape):
        got = tuple(src.shape) if isinstance(src, torch.Tensor) else type(src).__name__
        raise ValueError(
            f"checkpoint tensor {slot.key!r} has shape {got}, the average has {tuple(slot.shape)}"
        )
    if isinstance(src, DTensor):
        local = src.to_local()
    elif slot.numel == slot.shape.numel():
        local = src
    else:  # a whole tensor, this rank keeps a chunk: take the chunk's rows
        local = src.reshape(-1)[slot.start : slot.end].view(want)
    if tuple(local.shape) != want:
        raise ValueError(
            f"checkpoint tensor {slot.key!r} holds a local chunk of shape "
            f"{tuple(local.shape)}, this rank keeps {want}"
        )
    return local


def full_state_dict(avg: BaseAveragedModel) -> dict[str, torch.Tensor]:
    """The whole average on ``owner_rank`` (see ``BaseAveragedModel.full_state_dict``).

    Chunked tensors of a sharded average are gathered (one collective per dtype); the
    others the owner holds whole.
    """
    topo, shards = avg.topology, avg.shards
    gathered: dict[int, torch.Tensor] = {}
    if _sharded(avg):
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
        self.flat = topo.locals(model)
        self.chunks = []
        for i, spec in enumerate(topo.specs):
            a, b = chunk_bounds(spec.shape, topo.world, topo.rank)
            la, _ = topo.local_bounds(i)
            self.chunks.append(self.flat[i][a - la : b - la])
        specs, slots = topo.specs, avg.shards.slots
        n = range(len(specs))
        self.chunked = [i for i in n if slots[i].chunked]
        self.broadcast = [i for i in n if not slots[i].chunked and not specs[i].sharded]
        self.scatter = [i for i in n if not slots[i].chunked and specs[i].sharded]
        self.own = {i for i in n if not specs[i].is_param and not specs[i].sharded}
        self.rebuilt = [i for i in n if specs[i].is_param and not specs[i].sharded]

    def _backup_of(self, i: int) -> torch.Tensor:
        return self.flat[i] if i in self.own else self.chunks[i]

    def enter(self) -> None:
        avg, topo = self.avg, self.avg.topology
        views, owner = avg.shards.views, topo.rank == avg.owner_rank
        self.backup = [self._backup_of(i).clone() for i in range(len(self.flat))]
        _copy([self.chunks[i] for i in self.chunked], [views[i] for i in self.chunked])
        self._all_gather([i for i in self.chunked if not topo.specs[i].sharded])
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
        self._all_gather(self.rebuilt)

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


def _contiguous_stride(shape: torch.Size) -> tuple[int, ...]:
    stride, acc = [], 1
    for d in reversed(shape):
        stride.append(acc)
        acc *= max(d, 1)
    return tuple(reversed(stride))
