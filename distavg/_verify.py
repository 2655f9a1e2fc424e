"""Checking a loaded average against the checksums saved with it, before it is used.

See [Note: checksum] in ``_checksum.py``. The partial checksums of what each rank loaded add
up, over one all-reduce, to each tensor's saved checksum whatever world size saved it; a
mismatch names the tensor, the rows and the rank whose shard file changed.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from ._checksum import LANES, MODULUS, checksums
from .shards import Slot, rows_shape

if TYPE_CHECKING:
    from .averaged import BaseAveragedModel
    from .state import Record


def row_span(shape: torch.Size, start: int, end: int) -> str:
    """Elements ``[start, end)`` of a flattened tensor of ``shape``, as rows of its dim 0."""
    rows = rows_shape(shape)
    per_row = max(1, shape.numel() // rows[0]) if rows[0] else 1
    return f"rows {start // per_row}:{end // per_row}"


def checked_dtype(record: Record | None, slot: Slot) -> torch.dtype | None:
    """The dtype to checksum ``slot``'s loaded data in; None: it cannot be checked.

    DCP casts what it reads into the average's dtype: a checkpoint saved in bf16 and loaded
    into an fp32 average casts back exactly, one saved in fp32 and loaded into bf16 does not.
    """
    if record is None or record.dtype is None:
        return None
    if torch.promote_types(record.dtype, slot.dtype) != slot.dtype:
        return None
    return record.dtype


def verify(
    avg: BaseAveragedModel,
    records: dict[str, Record],
    sources: dict[int, torch.Tensor],
    *,
    failed: bool,
) -> None:
    """Raise unless every checked tensor's checksum, summed over the ranks, is the saved one.

    With more than one rank, one all-reduce (also of ``failed``, so that a rank that refused
    the checkpoint makes every rank raise instead of leaving them waiting).
    """
    slots, topo = avg.shards.slots, avg.topology
    dtypes = [checked_dtype(records.get(s.key), s) for s in slots]
    local = torch.zeros(len(slots) * LANES + 1, dtype=torch.int64)
    local[-1] = int(failed)
    if not failed:
        order = [i for i in sources if dtypes[i] is not None]
        pieces = [(sources[i].to(dtypes[i]), slots[i].start) for i in order]
        for i, part in zip(order, checksums(pieces), strict=True):
            local[i * LANES : i * LANES + len(part)] = torch.tensor(part)
    if topo.world > 1:
        local = local.to(topo.device)
        dist.all_reduce(local)
    totals = local.tolist()
    if failed:
        return
    if totals[-1]:
        raise ValueError(
            "another rank refused this checkpoint (its error says why); the average is "
            "unchanged on every rank"
        )
    for i, slot in enumerate(slots):
        record = records.get(slot.key)
        if dtypes[i] is None or record is None or record.checksum is None:
            continue
        mine = [t % MODULUS for t in totals[i * LANES : i * LANES + len(record.checksum)]]
        if tuple(mine) != record.checksum:
            raise ValueError(_mismatch(avg, slot, record, sources.get(i), dtypes[i]))
    _warn_unchecked(records, slots, dtypes)


def _mismatch(
    avg: BaseAveragedModel,
    slot: Slot,
    record: Record,
    source: torch.Tensor | None,
    dtype: torch.dtype,
) -> str:
    """The message for a tensor whose checksum failed: which saved chunks changed.

    A collective with more than one rank (every rank finds the same failing tensor).
    """
    parts = []
    for c in record.chunks:  # this rank's share of each saved chunk
        a, b = max(c.start, slot.start), min(c.end, slot.end)
        if source is not None and b > a:
            piece = source.reshape(-1)[a - slot.start : b - slot.start].to(dtype)
            parts.append((piece, a))
        else:
            parts.append((torch.empty(0, dtype=dtype), c.start))
    sums = [p + [0] * (LANES - len(p)) for p in checksums(parts)]
    local = torch.tensor(sums, dtype=torch.int64).reshape(-1, LANES)
    if avg.topology.world > 1:
        local = local.to(avg.topology.device)
        dist.all_reduce(local)
    got = [
        tuple(v % MODULUS for v in row[: len(c.checksum)])
        for row, c in zip(local.tolist(), record.chunks, strict=True)
    ]
    bad = [c for c, g in zip(record.chunks, got, strict=True) if g != c.checksum]
    where = "; ".join(
        f"{row_span(slot.shape, c.start, c.end)}, saved by rank {c.rank} "
        f"(shard file __{c.rank}_*.distcp)"
        for c in bad
    )
    return (
        f"checkpoint tensor {slot.key!r} does not match the checksum saved with it: "
        f"{where or 'its data'} changed after the save (a corrupt shard file, or one of "
        f"another save). The average is unchanged"
    )


def _warn_unchecked(
    records: dict[str, Record], slots: list[Slot], dtypes: list[torch.dtype | None]
) -> None:
    if not any(r.checksum is not None for r in records.values()):
        warnings.warn(
            "checkpoint has no checksums (saved by an earlier distavg): its average is "
            "loaded unchecked",
            stacklevel=4,
        )
        return
    cast = [s for s, d in zip(slots, dtypes, strict=True) if d is None and s.key in records]
    if cast:
        warnings.warn(
            f"checkpoint tensors {[s.key for s in cast[:5]]} were saved in "
            f"{records[cast[0].key].dtype} and load into a {cast[0].dtype} average, which "
            f"cannot hold them exactly: their checksums are not checked",
            stacklevel=4,
        )
