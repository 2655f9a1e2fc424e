"""Run a test body on several real gloo ranks, through the package's one rank spawner."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch.distributed as dist

from distavg.bench._spawn import run_on_ranks


def run_distributed(fn: Callable, world: int, tmp_path: Path, *args) -> None:
    """Run ``fn(rank, world, *args)`` on ``world`` gloo ranks; re-raise any rank's failure.

    ``fn`` must be a module-level function (it is pickled into the workers); the ranks
    rendezvous in a fresh directory under ``tmp_path``.
    """
    Path(tmp_path).mkdir(parents=True, exist_ok=True)
    run_on_ranks(_with_rank, world, fn, *args, workdir=tmp_path)


def _with_rank(fn: Callable, *args) -> None:
    fn(dist.get_rank(), dist.get_world_size(), *args)
