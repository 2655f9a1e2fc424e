"""The update of a model of thousands of small tensors, where per-op overhead dominates."""

from __future__ import annotations

import torch

from ._common import Options, format_table, load_at_end, ms, round_robin, summary, verdict
from ._methods import distavg_step, per_tensor_step, torch_foreach_step
from ._models import ManySmall, numel, perturbed

DISTAVG = "distavg ExponentialMovingAverage"
LOOP = "per-tensor lerp_ loop"


def table(opts: Options) -> str:
    model = perturbed(ManySmall(60 if opts.quick else 400))
    tensors = len(list(model.parameters()))
    fns = {
        DISTAVG: distavg_step(model),
        "torch AveragedModel + get_ema_multi_avg_fn (foreach)": torch_foreach_step(model),
        LOOP: per_tensor_step(model),
    }
    med, low = summary(round_robin(fns, opts.repeats))
    # The same two again with the caches flushed before each call, as after a training step.
    flush = torch.empty((1 << 20) if opts.quick else (128 << 20))
    pair = {k: fns[k] for k in (DISTAVG, LOOP)}
    pair_med, _ = summary(round_robin(pair, opts.repeats))
    cold_med, _ = summary(round_robin(pair, opts.repeats, before_each=lambda: flush.fill_(1.0)))
    rows = [
        [
            name,
            ms(t),
            ms(low[name]),
            f"{med[LOOP] / t:.2f}",
            ms(pair_med[name]) if name in pair else "-",
            ms(cold_med[name]) if name in pair else "-",
        ]
        for name, t in med.items()
    ]
    speedup = med[LOOP] / med[DISTAVG]
    pair_speedup = pair_med[LOOP] / pair_med[DISTAVG]
    cold_speedup = cold_med[LOOP] / cold_med[DISTAVG]
    return "\n".join(
        [
            f"### Many small tensors ({tensors} tensors, {numel(model) / 1e6:.2f}M parameters)",
            "",
            format_table(
                [
                    "method",
                    "median ms",
                    "min ms",
                    "speed-up vs loop",
                    "median ms, the two alone",
                    "median ms, caches flushed",
                ],
                rows,
            ),
            "",
            f"Target distavg >= 2x faster than the per-tensor loop: {speedup:.2f}x, "
            f"{verdict(speedup >= 2)}. Timed alone, without the foreach baseline between "
            f"them in the rounds: {pair_speedup:.2f}x; with the caches flushed before each "
            f"call, as after a training step: {cold_speedup:.2f}x. {load_at_end()}",
        ]
    )
