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


def torchrun_self(script: str, tmp_path: Path, *, timeout: int = 300, **env: str) -> None:
    """Run ``script`` (a test file) on 2 ranks under ``torch.distributed.run`` with
    ``tmp_path`` as its argument, the checkout on ``PYTHONPATH`` and ``env`` set; it must
    succeed."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]  # the checkout, wherever pytest was started
    # a parent torchrun's variables would make the child join the wrong job
    base = {k: v for k, v in os.environ.items() if not k.startswith("TORCHELASTIC_")}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        script, str(tmp_path),
    ]  # fmt: skip
    proc = subprocess.run(
        cmd,
        env={**base, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root), **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
