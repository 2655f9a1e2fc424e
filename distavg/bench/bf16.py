"""bf16 parameters with an fp32 average: the upcast's cost, eager and fused, against fp32."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import nn

from .. import _kernels
from ._common import (
    MOMENTUM,
    Options,
    format_table,
    load_at_end,
    ms,
    round_robin,
    summary,
    verdict,
)
from ._methods import distavg_step, per_tensor_step
from ._models import GPT2_SMALL, GPT_QUICK, GPTLike, numel, perturbed

FP32 = "fp32 params -> fp32 average (distavg)"
EAGER = "bf16 -> fp32 distavg, eager (default)"
FUSED = "bf16 -> fp32 distavg, fused (DISTAVG_FUSED_UPCAST=1)"


def table(opts: Options) -> str:
    shape = GPT_QUICK if opts.quick else GPT2_SMALL
    model32 = perturbed(GPTLike(shape))
    model16 = perturbed(GPTLike(shape)).to(torch.bfloat16)
    fns = {
        FP32: distavg_step(model32),
        EAGER: distavg_step(model16, dtype=torch.float32),
    }
    if opts.compile:
        fns[FUSED], note = _fused_step(model16)
    else:
        note = "Fused path not measured (--no-compile or --quick)."
    fns["bf16 -> fp32 cast then foreach lerp_"] = _cast_then_foreach(model16)
    fns["bf16 -> fp32 per-tensor cast + lerp_ loop"] = per_tensor_step(model16, torch.float32)
    med, low = summary(round_robin(fns, opts.repeats))
    base = med[FP32]
    rows = [[name, ms(t), ms(low[name]), f"{t / base:.2f}"] for name, t in med.items()]
    eager = med[EAGER] / base
    verdicts = f"eager {eager:.2f}x, {verdict(eager < 1)}"
    if FUSED in med:
        fused = med[FUSED] / base
        verdicts += f"; fused {fused:.2f}x, {verdict(fused < 1)}"
    return "\n".join(
        [
            f"### bf16 parameters, fp32 average ({numel(model16) / 1e6:.1f}M parameters)",
            "",
            format_table(["method", "median ms", "min ms", "time / fp32 update"], rows),
            "",
            note,
            f"Target bf16 -> fp32 faster than fp32 -> fp32 (ratio < 1): {verdicts}. "
            f"{load_at_end()}",
        ]
    )


def _fused_step(model16: nn.Module) -> tuple[Callable[[], None], str]:
    """The fused (compiled) upcast's step, and a note on how its compilation went."""
    with _kernels.fused_upcast(True):
        t0 = time.perf_counter()
        step = distavg_step(model16, dtype=torch.float32)
        step()
        compile_s = time.perf_counter() - t0
        state = "compiled" if _kernels.compiled_ready() else f"fell back ({_kernels.status()})"

    def fused_step() -> None:
        with _kernels.fused_upcast(True):  # as DISTAVG_FUSED_UPCAST=1 does
            step()

    return fused_step, (
        f"Fused path: {state}; first two updates incl. compilation took {compile_s:.1f} s "
        f"(once per process; inductor's on-disk cache shortens later runs)."
    )


def _cast_then_foreach(model: nn.Module) -> Callable[[], object]:
    srcs = [p.detach() for p in model.parameters()]
    avgs = [s.float() for s in srcs]
    return lambda: torch._foreach_lerp_(avgs, [s.float() for s in srcs], MOMENTUM)
