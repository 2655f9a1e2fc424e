"""The average as ``torch.distributed.checkpoint`` state: the ``Stateful`` form and its checked load.

[Note: state dict form]
``state_dict()`` is::

    {"steps": int,                   # update_parameters calls so far
     "rule": str,                    # JSON {"name": class name, **hparams()}
     "keys": str,                    # JSON {key: record} in the model's order
     "average": {key: tensor}}

    record = {"aliases": [tied aliases], "dtype": "float32",
              "checksum": [lane sums],          # of the whole tensor, see [Note: checksum]
              "chunks": [[rank, start, end, [lane sums]], ...]}  # per saving rank

Each averaged tensor appears under its model key as
  * a ``Shard(0)`` DTensor over all ranks when the average is sharded across ranks, so
    DCP writes each chunk once and can load it into any world size;
  * a plain tensor where one rank holds it whole (owner placement, one process, a 0-dim
    tensor, or a buffer: ranks' buffers differ, the owner's are kept), and is absent on
    the ranks that hold nothing: DCP then writes it from the one rank that has it.
The metadata entries are strings rather than nested dicts so that DCP stores each as one
opaque value: a checkpoint made with another rule then loads its metadata and fails our
check with a clear message, instead of failing DCP's key matching on ``rule.momentum``.
The checksums ride in ``keys`` rather than in an entry of their own because DCP's default
load planner refuses a checkpoint that lacks a key the state dict has: older checkpoints,
whose ``keys`` is ``{key: [tied aliases]}``, still load (unchecked, with a warning).
A chunk is ``[start, end)`` of the flattened tensor, as the rank that saved it held it: the
error for a corrupt chunk names that rank, whose shard file (``__<rank>_*.distcp`` for DCP's
file system writer) holds it.

[Note: staged load]
``dcp.load`` first calls ``state_dict()``, then reads the checkpoint *in place* into the
tensors it returned, and only then calls ``load_state_dict`` with them. Were those
tensors views of the live average, a checkpoint of another rule (or one whose read fails
half-way) would already have overwritten it before any check could run. So
``state_dict()`` returns a snapshot: a copy of this rank's part of the average. DCP fills
the snapshot, ``load_state_dict`` checks the metadata and the checksums, and only then
copies it into the average. The cost is a transient second copy of this
rank's part of the average (``avg.shards.nbytes``: 1/world of the model when sharded)
during a save or a load; the snapshot also makes ``dcp.async_save`` safe against updates
that run while it writes. Shape and key mismatches are caught earlier still, by DCP's
planner, before any data is read. The snapshot is also what is checksummed: at a save the
checksum of what is written (one all-gather of the ranks' partial sums), at a load the
checksum of what was read, before it is copied (one all-reduce), so a flipped bit in a
shard file, or a shard file of another save, is refused with the average untouched. (A load
also checksums the average it is about to replace: ``state_dict()`` cannot tell whether it
serves a save or a load. Both passes cost ``_checksum.ms_per_gib`` per GiB of this rank's
part.)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from ._checksum import LANES, checksums, combine, lanes
from ._verify import verify
from .shards import Shards, Slot, shaped

if TYPE_CHECKING:
    from .averaged import BaseAveragedModel

STATE_KEYS = ("steps", "rule", "keys", "average")


class Chunk(NamedTuple):
    """Elements ``[start, end)`` of a flattened tensor as one saving rank held them."""

    rank: int
    start: int
    end: int
    checksum: tuple[int, ...]


@dataclass(frozen=True)
class Record:
    """What a checkpoint's ``keys`` entry says of one averaged tensor.

    Attributes:
        aliases: further keys naming the tensor (tied weights).
        dtype: the dtype it was saved in; None in checkpoints saved without checksums.
        checksum: the whole tensor's checksum (see [Note: checksum]); None without.
        chunks: the chunks the saving ranks held, each with its own checksum.
    """

    aliases: tuple[str, ...]
    dtype: torch.dtype | None = None
    checksum: tuple[int, ...] | None = None
    chunks: tuple[Chunk, ...] = ()


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


def _keys_json(avg: BaseAveragedModel, chunks: list[list[Chunk]]) -> str:
    records = {}
    for spec, slot, mine in zip(avg.topology.specs, avg.shards.slots, chunks, strict=True):
        records[spec.key] = {
            "aliases": list(spec.aliases),
            "dtype": str(slot.dtype).removeprefix("torch."),
            "checksum": combine([c.checksum for c in mine]) if mine else [0] * lanes(slot.dtype),
            "chunks": [[c.rank, c.start, c.end, list(c.checksum)] for c in mine],
        }
    return json.dumps(records)


def parse_keys(value: Any) -> dict[str, Record]:
    """The ``keys`` entry of a checkpoint, of either form (see [Note: state dict form])."""
    raw = _parse("keys", value)
    try:
        return {str(k): _record(v) for k, v in raw.items()}
    except (AttributeError, KeyError, TypeError, ValueError):
        raise ValueError(
            f"state_dict 'keys' must be the JSON text that state_dict() writes, got {value!r:.200}"
        ) from None


def _record(entry: Any) -> Record:
    if isinstance(entry, list):  # saved before checksums: the tied aliases only
        return Record(aliases=tuple(map(str, entry)))
    dtype = getattr(torch, entry["dtype"])
    if not isinstance(dtype, torch.dtype):
        raise ValueError(entry["dtype"])
    chunks = tuple(
        Chunk(int(r), int(a), int(b), tuple(map(int, c))) for r, a, b, c in entry["chunks"]
    )
    return Record(
        aliases=tuple(map(str, entry["aliases"])),
        dtype=dtype,
        checksum=tuple(map(int, entry["checksum"])),
        chunks=chunks,
    )


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
    snapshot = _snapshot(avg.shards)
    for slot, view in zip(avg.shards.slots, snapshot, strict=True):
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
        "keys": _keys_json(avg, _saved_chunks(avg, snapshot)),
        "average": tensors,
    }


def _saved_chunks(avg: BaseAveragedModel, snapshot: list[torch.Tensor]) -> list[list[Chunk]]:
    """Per slot, every rank's non-empty chunk with its checksum (one all-gather)."""
    slots, topo = avg.shards.slots, avg.topology
    parts = checksums([(v, s.start) for v, s in zip(snapshot, slots, strict=True)])
    rows = [
        [s.start, s.end, *p, *[0] * (LANES - len(p))] for s, p in zip(slots, parts, strict=True)
    ]
    every = [rows]
    if topo.world > 1:
        mine = torch.tensor(rows, dtype=torch.int64, device=topo.device)
        gathered = [torch.empty_like(mine) for _ in range(topo.world)]
        dist.all_gather(gathered, mine)
        every = [g.tolist() for g in gathered]
    chunks: list[list[Chunk]] = [[] for _ in slots]
    for rank, rank_rows in enumerate(every):
        for i, ((start, end, *sums), part) in enumerate(zip(rank_rows, parts, strict=True)):
            if end > start:
                chunks[i].append(Chunk(rank, start, end, tuple(sums[: len(part)])))
    return chunks


def load_state_dict(avg: BaseAveragedModel, sd: dict[str, Any]) -> int:
    """Check everything first, then copy: a bad checkpoint leaves the average untouched.

    Returns the checkpoint's step count, for the averager to adopt.

    ``sd`` is what ``state_dict()`` returned, filled by ``dcp.load``; or any dict of that
    form in which the tensors this rank keeps are either its ``Shard(0)`` chunk or the
    whole tensor (then this rank's chunk is taken from it). With more than one rank this is
    a collective (the checksums are summed over the ranks): a rank that refuses the
    checkpoint makes every rank raise.
    """
    # 1. this rank's checks: metadata, then the source of every region it keeps
    failure: ValueError | None = None
    steps, records, sources = 0, {}, {}
    try:
        steps, records = _check_metadata(avg, sd)
        sources = _sources(avg, sd)
    except ValueError as e:
        failure = e
    # 2. every rank's checks: the checksums of what was read (see [Note: checksum])
    verify(avg, records, sources, failed=failure is not None)
    if failure is not None:
        raise failure
    # 3. only now touch the average
    if sources:
        dsts = [avg.shards.view(i) for i in sources]
        torch._foreach_copy_(dsts, list(sources.values()))
    return steps


def _check_metadata(avg: BaseAveragedModel, sd: dict[str, Any]) -> tuple[int, dict[str, Record]]:
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
    records = parse_keys(sd["keys"])
    _check_keys(avg, records)
    steps = sd["steps"]
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"state_dict 'steps' must be an integer >= 0, got {steps!r}")
    return steps, records


def _sources(avg: BaseAveragedModel, sd: dict[str, Any]) -> dict[int, torch.Tensor]:
    """Slot index -> the tensor that fills this rank's region of it."""
    sources = {}
    for i, slot in enumerate(avg.shards.slots):
        if slot.numel == 0:
            continue
        if slot.key not in sd["average"]:
            raise ValueError(f"checkpoint average has no tensor {slot.key!r}")
        want = tuple(avg.shards.view(i).shape)
        sources[i] = _local_source(slot, sd["average"][slot.key], want)
    return sources


def _parse(name: str, value: Any) -> Any:
    try:
        return json.loads(value)
    except (TypeError, ValueError):
        raise ValueError(
            f"state_dict {name!r} must be the JSON text that state_dict() writes, got "
            f"{value!r:.200}"
        ) from None


def _check_keys(avg: BaseAveragedModel, theirs: dict[str, Record]) -> None:
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
