"""A steady-state step rebuilds nothing: every per-step cache of the update chain hits (see
[Note: per-step caches] in topology.py), synchronous and asynchronous, with BatchNorm
buffers, on averaging and on following calls."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

import distavg
from distavg import topology
from distavg.topology import Topology

STEADY_CALLS = 10


@pytest.fixture(autouse=True)
def _one_thread():
    # What is counted does not depend on threads; on a loaded 2-core machine, intra-op
    # parallel regions of a tiny model wait for a free core and make the test slow.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _model() -> nn.Module:
    torch.manual_seed(0)
    # Large (direct) and small (staged) tensors, BatchNorm buffers (forward mutates them;
    # an integer counter among them).
    return nn.Sequential(
        nn.Linear(8, 256), nn.BatchNorm1d(256), nn.ReLU(), nn.Linear(256, 160), nn.Linear(160, 4)
    )


class _Results:
    """Wraps ``obj.name`` on the instance and keeps every result it returns."""

    def __init__(self, obj: object, name: str) -> None:
        self.results: list[object] = []
        method = getattr(obj, name)

        def recorded(*args, **kwargs):
            result = method(*args, **kwargs)
            self.results.append(result)
            return result

        setattr(obj, name, recorded)

    def objects(self) -> int:
        """How many distinct objects were returned (all are kept alive: ids are unique)."""
        return len({id(r) for r in self.results})


def _counted(calls: list[str], name: str, fn: Callable) -> Callable:
    def counted(*args, **kwargs):
        calls.append(name)
        return fn(*args, **kwargs)

    return counted


def _steady_rebuilds(monkeypatch, *, async_update: bool, interval: int) -> dict[str, int]:
    """Train a few steps, then count what STEADY_CALLS more steps rebuild."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    avg = distavg.ExponentialMovingAverage(
        model, momentum=0.1, interval=interval, async_update=async_update, optimizer=opt
    )

    def train(steps: int) -> None:
        for _ in range(steps):
            opt.zero_grad()
            model(torch.randn(16, 8)).pow(2).mean().backward()  # BatchNorm stats change
            opt.step()
            avg.update_parameters(model)

    train(interval + 1)  # every kind of update ran once: copy, follow, lerp
    avg.wait()
    calls: list[str] = []
    monkeypatch.setattr(topology, "_specs", _counted(calls, "_specs", topology._specs))
    monkeypatch.setattr(topology, "unwrap", _counted(calls, "unwrap", topology.unwrap))
    monkeypatch.setattr(Topology, "_mismatch", _counted(calls, "_mismatch", Topology._mismatch))
    stages = {
        "local_tensors": _Results(avg.topology, "local_tensors"),
        "capture": _Results(avg.engine, "capture"),
        "_sources": _Results(avg, "_sources"),
        "_plan": _Results(avg.shards, "_plan"),
    }
    snapshots = avg.engine.snapshots
    assert (snapshots is not None) == async_update
    if snapshots is not None:
        snapshots.alloc = _counted(calls, "snapshot alloc", snapshots.alloc)
    train(STEADY_CALLS)
    avg.wait()
    assert avg.steps == interval + 1 + STEADY_CALLS
    for name, stage in stages.items():
        assert len(stage.results) >= STEADY_CALLS, name  # the stage ran on every step
    rebuilds = {name: stage.objects() - 1 for name, stage in stages.items()}
    rebuilds.update({name: calls.count(name) for name in set(calls)})
    avg.close()
    return rebuilds


@pytest.mark.parametrize("interval", [1, 3])
@pytest.mark.parametrize("async_update", [False, True], ids=["sync", "async"])
def test_steady_state_steps_reuse_every_cached_stage(monkeypatch, async_update, interval):
    rebuilds = _steady_rebuilds(monkeypatch, async_update=async_update, interval=interval)
    assert all(n == 0 for n in rebuilds.values()), rebuilds


@pytest.mark.parametrize("async_update", [False, True], ids=["sync", "async"])
def test_a_fresh_list_from_local_tensors_is_counted_as_rebuilds(monkeypatch, async_update):
    # The negative control: a stage that returns an equal but new list each step turns
    # every later cache off, and the counters above see it.
    cached = Topology.local_tensors
    monkeypatch.setattr(Topology, "local_tensors", lambda self, m: list(cached(self, m)))
    rebuilds = _steady_rebuilds(monkeypatch, async_update=async_update, interval=2)
    for stage in ("local_tensors", "capture", "_sources", "_plan"):
        assert rebuilds[stage] >= STEADY_CALLS - 1, rebuilds
    if async_update:
        assert rebuilds["snapshot alloc"] >= STEADY_CALLS, rebuilds
