"""Asynchronous updates on real gloo ranks (DDP and FSDP2, sharded and owner placement)
give bitwise the synchronous average, for every rule; the owner push has its own group."""

from __future__ import annotations

import torch
import torch.distributed as dist
from dist_utils import run_distributed
from reference import all_rules, wrap
from torch import nn

from distavg.engine import SyncEngine, WorkerEngine

RULES = all_rules()
STEPS = 22
SKIPPED = 9  # no optimizer step at this iteration: its update_parameters must not count


def _model() -> nn.Module:
    torch.manual_seed(0)
    # A tensor large enough for the direct path even as a chunk, BatchNorm buffers, and a
    # 3-row layer whose chunks are uneven.
    return nn.Sequential(
        nn.Linear(8, 512), nn.BatchNorm1d(512), nn.ReLU(), nn.Linear(512, 160), nn.Linear(160, 3)
    )


def _body(rank: int, world: int) -> None:
    for kind in ("ddp", "fsdp2"):
        for placement in ("sharded", "owner"):
            model = wrap(kind, _model(), world)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
            pairs = []
            for r, (cls, kw) in enumerate(RULES):
                common = dict(kw, interval=2, update_buffers=r % 2 == 0, placement=placement)
                sync = cls(model, optimizer=opt, **common)
                asyn = cls(model, optimizer=opt, async_update=True, **common)
                assert isinstance(sync.engine, SyncEngine) and isinstance(asyn.engine, WorkerEngine)
                pairs.append((cls.__name__, sync, asyn))
            if kind == "fsdp2" and placement == "owner":
                # The owner push runs on a group of each averager's own.
                groups = [avg._group for _, s, a in pairs for avg in (s, a)]
                assert None not in groups and len({id(g) for g in groups}) == len(groups)
            gen = torch.Generator().manual_seed(100 + rank)
            for step in range(STEPS):
                opt.zero_grad()
                model(torch.randn(16, 8, generator=gen)).pow(2).mean().backward()
                if step != SKIPPED:
                    opt.step()
                for _, sync, asyn in pairs:
                    sync.update_parameters(model)
                    asyn.update_parameters(model)
            for name, sync, asyn in pairs:
                case = f"{kind}/{placement}/{name} rank {rank}"
                asyn.wait()
                assert sync.steps == asyn.steps == STEPS - 1, case
                for d, g in sync.shards.groups.items():
                    assert torch.equal(g.flat, asyn.shards.groups[d].flat), f"{case} {d}"
                full_s, full_a = sync.full_state_dict(), asyn.full_state_dict()
                assert full_s.keys() == full_a.keys(), case
                for k in full_s:
                    assert torch.equal(full_s[k], full_a[k]), f"{case} {k}"
                if rank == 0:
                    assert full_s, case
            for _, sync, asyn in pairs:
                sync.close()
                asyn.close()
            dist.barrier()


def test_async_equals_sync_bitwise_ddp_and_fsdp2(tmp_path):
    run_distributed(_body, 2, tmp_path)
