"""Run a test body on several real gloo ranks (spawned processes, FileStore rendezvous)."""

from __future__ import annotations

import os
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(
    rank: int, world: int, store_path: str, fn: Callable, args: tuple, err_dir: str
) -> None:
    torch.set_num_threads(1)
    store = dist.FileStore(store_path, world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
        if dist.is_initialized():
            dist.barrier()
    except BaseException:
        Path(err_dir, f"rank{rank}.err").write_text(traceback.format_exc())
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn: Callable, world: int, tmp_path: Path, *args) -> None:
    """Run ``fn(rank, world, *args)`` on ``world`` gloo ranks; re-raise any rank's failure.

    ``fn`` must be a module-level function (it is pickled into the workers).
    """
    tmp_path = Path(tmp_path)
    err_dir = tmp_path / f"errors-{os.getpid()}-{world}"
    err_dir.mkdir(parents=True, exist_ok=True)
    store = tmp_path / f"store-{len(list(tmp_path.iterdir()))}"
    try:
        mp.spawn(_worker, args=(world, str(store), fn, args, str(err_dir)), nprocs=world, join=True)
    except Exception as e:
        errors = "\n".join(p.read_text() for p in sorted(err_dir.glob("*.err")))
        raise AssertionError(f"a rank failed:\n{errors or e}") from None
