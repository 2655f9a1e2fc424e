"""The owner push (placement="owner" under FSDP2) keeps no gathered buffer between updates.

Each update gathers every rank's chunks onto the owner: buffers the size of the model. They
serve that update only; afterwards nothing the averager or its engine holds may reference
them (the gather's receive tensors die).
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
import torch.distributed as dist
from reference import wrap
from torch import nn

import distavg
from distavg.bench._spawn import run_on_ranks


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 512), nn.BatchNorm1d(512), nn.Linear(512, 3))


def _owner_push(async_update: bool) -> dict[str, int]:
    rank, world = dist.get_rank(), dist.get_world_size()
    model = wrap("fsdp2", _model(), world)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    avg = distavg.ExponentialMovingAverage(
        model, momentum=0.3, placement="owner", async_update=async_update, optimizer=opt
    )
    received: list[weakref.ref] = []
    gather = avg._comm.gather

    def recording(chunks, dst):
        pieces = gather(chunks, dst)
        for per_tensor in pieces or ():
            # A piece is a view: its base is the receive buffer it keeps alive.
            received.extend(weakref.ref(p if p._base is None else p._base) for p in per_tensor)
        return pieces

    avg._comm.gather = recording
    gen = torch.Generator().manual_seed(rank)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(16, 8, generator=gen)).pow(2).mean().backward()
        opt.step()
        avg.update_parameters(model)
    avg.wait()
    gc.collect()
    alive = sum(r() is not None for r in received)
    avg.shards._resolved = None  # the shards' cache of the plan resolved for the last sources
    gc.collect()
    besides = sum(r() is not None for r in received)
    avg.close()
    return {"received": len(received), "alive": alive, "besides_shards_plan": besides}


@pytest.mark.parametrize("async_update", [False, True], ids=["sync", "async"])
def test_owner_push_keeps_no_gathered_buffer_after_an_update(async_update, tmp_path):
    held = run_on_ranks(_owner_push, 2, async_update, workdir=tmp_path)  # the owner's counts
    assert held["received"] > 0
    # Neither the averager, nor its engine, nor the shards' plan cache keeps them.
    assert held["besides_shards_plan"] == 0, held
    assert held["alive"] == 0, held
