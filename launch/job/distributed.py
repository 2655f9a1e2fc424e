"""The job's process group, and how torchrun's restarts are seen."""

from __future__ import annotations

import os
import time

import torch
import torch.distributed as dist


def setup_distributed(device: str) -> torch.device:
    """One process group for the job: NCCL for GPUs (plus gloo for CPU tensors), gloo on CPU.

    Args:
        device: ``"cuda"``, ``"cpu"``, or ``"auto"``: a GPU per process where this node has
            one for each, else the CPUs.

    Started without torchrun, the job is a group of one.
    """
    gpus, local_world = torch.cuda.device_count(), int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    if device == "cuda" or (device == "auto" and gpus >= local_world):
        chosen = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(chosen)
        backend = "cpu:gloo,cuda:nccl"  # gloo for an offloaded (CPU) average's checkpoints
    else:
        chosen, backend = torch.device("cpu"), "gloo"
    device_id = chosen if chosen.type == "cuda" else None
    if "RANK" not in os.environ:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    elif restart_count() and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # torchrun hands every attempt the same rendezvous store; a restarted attempt would
        # read the previous attempt's keys and connect to ranks that are gone (pytorch
        # issue 135712). Keys of our own per attempt keep the attempts apart.
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]))
        dist.init_process_group(
            backend,
            store=dist.PrefixStore(f"attempt-{restart_count()}", store),
            rank=int(os.environ["RANK"]),
            world_size=int(os.environ["WORLD_SIZE"]),
            device_id=device_id,
        )
    else:
        dist.init_process_group(backend, device_id=device_id)
    return chosen


def restart_count() -> int:
    """How many times torchrun (``--max-restarts``) has restarted this job."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))


def close_distributed() -> None:
    dist.barrier()  # before destroy_process_group, or gloo may abort at exit
    # gloo's worker threads retire finished work (the barrier keeps the last gather alive)
    # after the barrier returns, and need the GIL to free its tensors; were the process
    # group torn down at once, the main thread would join them holding the GIL and hang.
    time.sleep(0.2)
    dist.destroy_process_group()
