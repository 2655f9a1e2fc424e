"""The update of a GPT-2-small-like fp32 model against the memory-bandwidth floor.

The floor is one ``lerp_`` over a tensor of the model's size: 12 bytes a parameter (read
the average and the source, write the average) at the bandwidth that ``lerp_`` reaches here.
"""

from __future__ import annotations

import torch

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
from ._methods import distavg_step, per_tensor_step, torch_foreach_step
from ._models import GPT2_SMALL, GPT_QUICK, GPTLike, numel, perturbed

FLOOR = "bandwidth floor: one lerp_ of the same numel"
DISTAVG = "distavg ExponentialMovingAverage"


def table(opts: Options) -> str:
    model = perturbed(GPTLike(GPT_QUICK if opts.quick else GPT2_SMALL))
    n = numel(model)
    big, big_src = torch.randn(n), torch.randn(n)
    fns = {
        FLOOR: lambda: big.lerp_(big_src, MOMENTUM),
        DISTAVG: distavg_step(model),
        "torch AveragedModel + get_ema_multi_avg_fn (foreach)": torch_foreach_step(model),
        "per-tensor lerp_ loop": per_tensor_step(model),
    }
    med, low = summary(round_robin(fns, opts.repeats))
    floor, ours = med[FLOOR], med[DISTAVG]
    rows = [
        [name, ms(t), ms(low[name]), f"{floor / t:.2f}", f"{t / ours:.2f}"]
        for name, t in med.items()
    ]
    bandwidth = 12 * n / floor / 1e9
    ratio = floor / ours
    return "\n".join(
        [
            f"### Update of a GPT-2-small-like fp32 model ({n / 1e6:.1f}M parameters, "
            f"{len(list(model.parameters()))} tensors)",
            "",
            format_table(["method", "median ms", "min ms", "floor / time", "time / distavg"], rows),
            "",
            f"lerp_ bandwidth {bandwidth:.1f} GB/s at 12 bytes/param (medians). "
            f"Target floor / distavg >= 0.90: {ratio:.2f}, {verdict(ratio >= 0.9)}. "
            f"{load_at_end()}",
        ]
    )
