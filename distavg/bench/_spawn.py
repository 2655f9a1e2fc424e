"""Run one function on several spawned gloo ranks that meet through a FileStore, not a port."""

from __future__ import annotations

import os
import pickle
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def run_on_ranks(
    fn: Callable[..., object],
    world: int,
    *args: object,
    threads: int = 1,
    workdir: str | os.PathLike[str] | None = None,
) -> object:
    """``fn(*args)`` on ``world`` spawned gloo ranks; returns rank 0's result.

    The ranks meet through a FileStore in a fresh temporary directory (inside ``workdir``
    when given), so runs never collide on a port or a store, and each runs with ``threads``
    torch threads. ``fn`` must be a module-level function (it is pickled into the ranks)
    and its result picklable; it may destroy the process group itself.

    Raises:
        RuntimeError: a rank failed; the message holds every failed rank's traceback,
            the earliest first (the others often fail only because that one left).
    """
    with tempfile.TemporaryDirectory(prefix="ranks-", dir=workdir) as rundir:
        try:
            mp.spawn(_rank, args=(world, rundir, threads, fn, args), nprocs=world, join=True)
        except Exception as e:
            raise RuntimeError(
                f"{fn.__qualname__} failed on {world} gloo rank(s):\n{_failures(rundir) or e}"
            ) from None
        return pickle.loads(Path(rundir, "result.pkl").read_bytes())


def _rank(
    rank: int, world: int, rundir: str, threads: int, fn: Callable[..., object], args: tuple
) -> None:
    torch.set_num_threads(threads)
    store = dist.FileStore(os.path.join(rundir, "store"), world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    try:
        result = fn(*args)
        if rank == 0:
            Path(rundir, "result.pkl").write_bytes(pickle.dumps(result))
        if dist.is_initialized():
            dist.barrier()  # before destroy_process_group, or gloo may abort at exit
            # let gloo's threads retire finished work, which needs the GIL, before the
            # teardown joins them (see launch/job/distributed.py)
            time.sleep(0.1)
    except BaseException:
        Path(rundir, f"rank{rank}.err").write_text(traceback.format_exc())
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _failures(rundir: str) -> str:
    errors = sorted(Path(rundir).glob("rank*.err"), key=lambda p: p.stat().st_mtime_ns)
    return "\n".join(f"-- {p.stem}:\n{p.read_text()}" for p in errors)
