"""Per-rank averaged bytes and update time at 1 and 2 gloo ranks: sharded, owner, replicated.

A replicated average, a full fp32 copy on every rank updated with one ``_foreach_lerp_``,
is what other libraries keep.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

from .. import ExponentialMovingAverage
from ._common import MOMENTUM, Options, format_table, load_at_end, mib, ms
from ._models import GPT2_SMALL, GPT_QUICK, GPTLike, perturbed
from ._spawn import run_on_ranks

PLACEMENTS = ("sharded", "owner", "replicated")


def table(opts: Options) -> str:
    rows = []
    for world in (1, 2):
        threads = max(1, opts.threads // world)
        per_rank = run_on_ranks(_rank_body, world, opts.quick, opts.repeats, threads=threads)
        for placement in PLACEMENTS:
            nbytes = [r[placement][0] for r in per_rank]
            secs = [r[placement][1] for r in per_rank]
            rows.append(
                [
                    world,
                    threads,
                    placement,
                    " / ".join(mib(b) for b in nbytes),
                    " / ".join(ms(s) for s in secs),
                    ms(max(secs)),
                ]
            )
    size = "quick model" if opts.quick else "GPT-2-small-like fp32 model"
    return "\n".join(
        [
            f"### Per-rank averaged bytes and update time ({size}, gloo ranks on this machine)",
            "",
            format_table(
                [
                    "W",
                    "threads/rank",
                    "placement",
                    "MiB per rank (r0 / r1)",
                    "update ms per rank",
                    "slowest rank ms",
                ],
                rows,
            ),
            "",
            "replicated: a full fp32 copy on every rank updated with one _foreach_lerp_ "
            f"(what other libraries keep). The ranks share this machine's cores. {load_at_end()}",
        ]
    )


def _rank_body(quick: bool, repeats: int) -> list[dict[str, tuple[int, float]]]:
    """On every rank: averaged bytes and update seconds per placement; all ranks' figures."""
    torch.manual_seed(0)
    model = perturbed(GPTLike(GPT_QUICK if quick else GPT2_SMALL))
    results = {}
    for placement in ("sharded", "owner"):
        ema = ExponentialMovingAverage(model, momentum=MOMENTUM, placement=placement)
        ema.update_parameters(model)
        results[placement] = (
            ema.shards.nbytes,
            _barrier_timed(lambda ema=ema: (ema.update_parameters(model), ema.wait()), repeats),
        )
        del ema
        gc.collect()
    srcs = [p.detach() for p in model.parameters()]
    full = [s.clone() for s in srcs]
    results["replicated"] = (
        sum(t.numel() * t.element_size() for t in full),
        _barrier_timed(lambda: torch._foreach_lerp_(full, srcs, MOMENTUM), repeats),
    )
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, results)
    return gathered


def _barrier_timed(fn: Callable[[], object], repeats: int) -> float:
    """Median seconds of this rank's own work (ranks start each call together)."""
    fn()
    times = []
    for _ in range(repeats):
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)
