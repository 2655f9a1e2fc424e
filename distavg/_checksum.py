"""A checksum of a tensor's bits that adds up over any chunking of the tensor.

[Note: checksum]
Element ``i`` (its index in the flattened global tensor) with raw bits read as a signed
integer ``v_i`` (``int8``/``int16``/``int32`` by the element's width; an element of 8 bytes
or more is split into 32-bit words, one *lane* each) contributes to lane ``l``::

    h_l = sum_i v_il * w_i  mod 2**48,        w_i = 2 * ((40503 * i) mod 2**14) + 1

* Any single changed element is detected: some lane ``l`` of it changed, so ``h_l`` moves by
  ``(v'_il - v_il) * w_i`` with ``0 < |v'_il - v_il| < 2**32`` and ``1 <= w_i < 2**15``:
  a change of magnitude in ``(0, 2**47)``, which is never a multiple of ``2**48``.
* Two swapped unequal elements whose indices differ modulo ``2**14`` are detected too: the
  change is ``(v_i - v_j) * (w_j - w_i)``, nonzero and of magnitude below ``2**47``.
* It is additive: a rank sums over the elements it holds, and the partial sums of any
  chunking (the ranks that saved, the ranks that load, one process) add up, modulo
  ``2**48``, to the same value. Partials below ``2**48`` can be summed by an ``int64``
  ``all_reduce`` over up to ``2**15`` ranks.
* It reads bits, not values: ``-0.0``, NaN payloads and bf16 are covered exactly.

Every product fits in 46 bits and a block of ``2**16`` of them in 62, so ``int64``
arithmetic never overflows; block sums are reduced in Python. The cost is one multiply and
one sum per element (``ms_per_gib``). On CPU the blocks stay below ATen's grain size, so
no op opens a parallel region (see [Note: CPU staging] in shards.py).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

import torch

from .shards import CPU_STAGE_NUMEL

MODULUS = 1 << 48
LANES = 4  # the most lanes a checksum has (complex128)
_PERIOD = 1 << 14
_MULTIPLIER = 40503  # odd: i -> 40503 * i is a permutation modulo 2**14
_BLOCK = 1 << 16  # at most 2**16: see the bounds above
_WORD = {1: torch.int8, 2: torch.int16, 4: torch.int32}
_tables: dict[torch.device, torch.Tensor] = {}


def lanes(dtype: torch.dtype) -> int:
    """How many lanes the checksum of a tensor of ``dtype`` has."""
    return max(1, dtype.itemsize // 4)


def _table(device: torch.device) -> torch.Tensor:
    """``w_i`` for ``i`` in ``[0, _BLOCK + _PERIOD)``: a block's weights are a slice of it."""
    table = _tables.get(device)
    if table is None:
        i = torch.arange(_BLOCK + _PERIOD, dtype=torch.int64)
        table = _tables[device] = ((i * _MULTIPLIER) % _PERIOD * 2 + 1).to(device)
    return table


def _words(flat: torch.Tensor) -> torch.Tensor:
    """The bits of ``flat`` (1-D) as signed integers, one column per lane."""
    flat = flat.detach().contiguous()
    size = flat.element_size()
    if size in _WORD:
        return flat.view(_WORD[size]).view(-1, 1)
    return flat.view(torch.int32).view(flat.numel(), size // 4)


def checksums(pieces: Sequence[tuple[torch.Tensor, int]]) -> list[list[int]]:
    """The partial checksum of each ``(flat, start)`` (see [Note: checksum]).

    Args:
        pieces: 1-D tensors, each holding the elements ``[start, start + numel)`` of some
            flattened tensor.

    Returns:
        For each piece, its lane sums, each in ``[0, MODULUS)``.
    """
    sums: list[torch.Tensor] = []
    owners: list[tuple[int, int]] = []
    out: list[list[int]] = []
    for k, (flat, start) in enumerate(pieces):
        words = _words(flat.reshape(-1))
        out.append([0] * words.shape[1])
        if not words.numel():
            continue
        table, n = _table(words.device), words.shape[0]
        block = CPU_STAGE_NUMEL if words.device.type == "cpu" else _BLOCK
        for lane in range(words.shape[1]):
            column = words[:, lane]
            for a in range(0, n, block):
                b, o = min(block, n - a), (start + a) % _PERIOD
                sums.append(torch.mul(column[a : a + b], table[o : o + b]).sum())
                owners.append((k, lane))
    values = torch.stack(sums).tolist() if sums else []  # one device sync for everything
    for (k, lane), v in zip(owners, values, strict=True):
        out[k][lane] = (out[k][lane] + v) % MODULUS
    return out


def combine(parts: Sequence[Sequence[int]]) -> list[int]:
    """The checksum of the union of disjoint pieces, from their partial checksums."""
    return [sum(lane) % MODULUS for lane in zip(*parts, strict=True)]


def ms_per_gib(nbytes: int = 256 << 20, repeats: int = 7, device: str = "cpu") -> float:
    """Median milliseconds to checksum one GiB of fp32, timed on ``nbytes`` of it."""
    flat = torch.randn(nbytes // 4, device=device)
    checksums([(flat, 0)])  # warm-up: builds the weight table
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        checksums([(flat, 0)])
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3 * (1 << 30) / nbytes
