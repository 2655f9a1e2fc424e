"""An optional fused kernel for the update path: upcast-lerp, compiled on demand.

[Note: fused upcast-lerp]
A bf16 (or fp16) source averaged into an fp32 average needs, in eager PyTorch, two passes
per element: a cast into an fp32 staging block, then ``lerp_`` (mixed-dtype ``lerp_`` is
not supported, and mixed-dtype arithmetic on CPU materialises the cast anyway). Staged in
cache-sized blocks that costs about 1.2x the time of an fp32 -> fp32 update, although it
reads fewer bytes. A ``torch.compile``d kernel reads the low-precision source once and does
the cast and the lerp in registers: about 0.6x the fp32 time.

Compiling costs seconds to tens of seconds once per process (inductor's on-disk cache
shortens later runs), so the fused path is opt-in: set ``DISTAVG_FUSED_UPCAST=1`` in the
environment or call :func:`set_fused_upcast`. It is used for large tensors only (see
``shards.SMALL_NUMEL``), so one dynamic-shape graph serves every size. The weight is passed
as a 0-dim tensor, not a float, so a changing weight (warm-up, power EMA) does not
recompile.

Numerics: the kernel computes ``lerp(avg, float(src), w)`` with inductor's decomposition
of ``lerp`` (``coeff * (end - start) + base``, the branch on ``|w| < 0.5`` as eager's). On
CPU it is compiled with ``-ffp-contract=fast`` so that the compiler emits the one fused
multiply-add eager's ``lerp_`` kernel uses: the result is then bitwise that of
``avg.lerp_(src.float(), w)`` (the tests check it). Elsewhere, or with another compiler, it
may differ in the last bit: the first call checks the kernel against eager ``lerp_`` on a
copy, and if compilation fails or the bits differ, the path warns once and falls back to
the eager two-pass update for the rest of the process.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch

ENV = "DISTAVG_FUSED_UPCAST"

_enabled = os.environ.get(ENV, "0").strip().lower() not in ("", "0", "false", "no", "off")
_compiled: Callable[..., None] | None = None
_failure: str | None = None
_ready = False


def set_fused_upcast(enabled: bool) -> None:
    """Turn the compiled fused upcast-lerp on or off for this process."""
    global _enabled
    _enabled = bool(enabled)


@contextmanager
def fused_upcast(enabled: bool) -> Iterator[None]:
    """:func:`set_fused_upcast` for the duration of a ``with`` block."""
    before = _enabled
    set_fused_upcast(enabled)
    try:
        yield
    finally:
        set_fused_upcast(before)


def compiled_ready() -> bool:
    """Whether the fused kernel has compiled and run in this process."""
    return _ready


def status() -> str:
    """One line: off, on, or why it fell back."""
    if _failure is not None:
        return f"fell back to eager: {_failure}"
    return "on" if _enabled else f"off (set {ENV}=1 to enable)"


def _upcast_lerp(avg: torch.Tensor, src: torch.Tensor, weight: torch.Tensor) -> None:
    avg.copy_(torch.lerp(avg, src.to(avg.dtype), weight))


def _kernel() -> Callable[..., None]:
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(
            _upcast_lerp,
            dynamic=True,
            fullgraph=True,
            # a * b + c as one fma, as eager's lerp kernel computes it (see the Note)
            options={"cpp.enable_floating_point_contract_flag": "fast"},
        )
    return _compiled


def upcast_lerp_(avgs: Sequence[torch.Tensor], srcs: Sequence[torch.Tensor], weight: float) -> bool:
    """``avg <- lerp(avg, float(src), weight)`` for each pair with the fused kernel.

    Returns:
        False (and changes nothing) when the fused path is off or unavailable; the caller
        then runs the eager update.
    """
    global _failure, _ready
    if not (_enabled and _failure is None and avgs):
        return False
    w = torch.tensor(weight, dtype=avgs[0].dtype)
    try:
        kernel = _kernel()
        if not _ready:
            # Compile and check on a copy, so a failure leaves the average untouched: the
            # result must be bitwise eager's on both branches of lerp (|w| < 0.5 and not),
            # which a torch or compiler that does not fuse the multiply-add misses by an ulp.
            for check in (w, 1 - w):
                probe, want = avgs[0].clone(), avgs[0].clone()
                kernel(probe, srcs[0], check)
                want.lerp_(srcs[0].to(want.dtype), check)
                if not torch.equal(probe, want):
                    raise RuntimeError("not bitwise equal to eager lerp_ on this build")
            _ready = True
        for a, s in zip(avgs, srcs, strict=True):
            kernel(a, s, w)
    except Exception as e:  # any compiler failure: the eager path is always correct
        if _ready:
            raise  # a compiled call failed half-way: do not hide a partial update
        _failure = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        warnings.warn(
            f"distavg: the fused upcast-lerp is not used ({_failure}); using the "
            f"eager update (about 2x slower for low-precision sources)",
            stacklevel=3,
        )
        return False
    return True
