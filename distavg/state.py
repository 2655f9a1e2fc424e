"""The average as ``torch.distributed.checkpoint`` state: the ``Stateful`` form and its checked load.

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

from .shards import Shards, Slot, shaped

if TYPE_CHECKING:
    from .averaged import BaseAveragedModel

STATE_KEYS = ("steps", "rule", "keys", "average")


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
    mesh = _mesh(avg) if avg.sharded else None
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


def load_state_dict(avg: BaseAveragedModel, sd: dict[str, Any]) -> int:
    """Check everything first, then copy: a bad checkpoint leaves the average untouched.

    Returns the checkpoint's step count, for the averager to adopt.

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
    return steps


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


def _contiguous_stride(shape: torch.Size) -> tuple[int, ...]:
    stride, acc = [], 1
    for d in reversed(shape):
        stride.append(acc)
        acc *= max(d, 1)
    return tuple(reversed(stride))
