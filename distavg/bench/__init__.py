"""The benchmark's command line: ``python -m distavg.bench [--sections ...] [--quick]``.

Every table is measured side by side in one run: the methods of a table are timed in
round-robin order (one call of each per round, several rounds), so that noise from other
work on the machine falls on all of them alike; a table shows medians over the rounds.

Sections:
  update      a GPT-2-small-like fp32 model (124M parameters, tied embedding): distavg's
              EMA against the memory-bandwidth floor (12 bytes/param at the ``lerp_``
              bandwidth measured here on one tensor of the same size), torch's
              ``AveragedModel`` with ``get_ema_multi_avg_fn`` (foreach) and a per-tensor
              ``lerp_`` loop.
  small       a model of >= 2,000 small tensors, where per-op overhead dominates.
  bf16        bf16 parameters with an fp32 average (``dtype=torch.float32``).
  ranks       per-rank averaged bytes and update time for 1 and 2 gloo ranks: sharded,
              owner, and a replicated full copy on every rank.
  overlap     a training step with no average, a synchronous and an asynchronous EMA: how
              much of the update the worker thread hides, in one process and on 2 ranks.
  checkpoint  bytes written per rank and save time for 1 and 2 gloo ranks: sharded and
              owner DCP saves, and the whole average gathered and saved on rank 0.
"""

from __future__ import annotations

import argparse
import gc
import os
from collections.abc import Callable

import torch

from . import bf16, checkpoint, overlap, ranks, small, update
from ._common import Options

__all__ = ["main"]

SECTIONS: dict[str, Callable[[Options], str]] = {
    "update": update.table,
    "small": small.table,
    "bf16": bf16.table,
    "ranks": ranks.table,
    "overlap": overlap.table,
    "checkpoint": checkpoint.table,
}


def main(argv: list[str] | None = None) -> int:
    """Run the chosen sections and print their tables; returns the exit status."""
    chosen, opts = _parse(argv)
    torch.set_num_threads(opts.threads)
    torch.manual_seed(0)
    print(
        f"distavg benchmark: torch {torch.__version__}, {torch.get_num_threads()} torch "
        f"threads, {os.cpu_count()} CPUs, {opts.repeats} rounds per table (medians), "
        f"load average (1 min) {os.getloadavg()[0]:.2f}"
        f"{', --quick (smoke run)' if opts.quick else ''}",
        flush=True,
    )
    for name in chosen:
        print(f"\n{SECTIONS[name](opts)}", flush=True)
        gc.collect()
    return 0


def _parse(argv: list[str] | None) -> tuple[list[str], Options]:
    """The sections to run, in the order given, and the options they read."""
    names = ",".join(SECTIONS)
    p = argparse.ArgumentParser(
        prog="python -m distavg.bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--sections",
        default=names,
        help=f"comma-separated sections to run, from {names} (default: all)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="tiny models and few repeats: a smoke run, not a measurement",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed rounds per table (default 21, 3 with --quick)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=torch.get_num_threads(),
        help="torch intra-op threads (default: torch's own choice)",
    )
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also time the torch.compile'd fused bf16 path (default: on, off with --quick)",
    )
    args = p.parse_args(argv)
    chosen = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in SECTIONS]
    if unknown:
        p.error(f"--sections got {unknown}; choose from {names}")
    repeats = args.repeats if args.repeats is not None else 3 if args.quick else 21
    if repeats < 1:
        p.error(f"--repeats must be >= 1, got {repeats}")
    compile_ = args.compile if args.compile is not None else not args.quick
    return chosen, Options(
        quick=args.quick, repeats=repeats, threads=args.threads, compile=compile_
    )
