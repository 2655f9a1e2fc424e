"""The pinned-offload engine's host side, run without an accelerator (``device=cpu``).

torch.cpu's streams and events are no-ops and, with no pinned memory, every piece goes
through staging: the whole pipeline runs on the host (buckets, the two alternating host
sets, the worker, the release of sources used once, the memory it reports). These run on
any machine; the device side is checked by test_gpu_paths.py and launch/gpu_check.py.
"""

from __future__ import annotations

import gc
import threading
import weakref

import pytest
import torch
from reference import assert_bitwise, flats
from torch import nn

import distavg
from distavg._offload import OffloadEngine, OffloadPlan, pinned_block_bytes

CPU = torch.device("cpu")


def _model() -> nn.Module:
    torch.manual_seed(0)
    # Large and small tensors, BatchNorm buffers (an integer counter among them), a bf16
    # layer (its pieces staged in their own dtype).
    model = nn.Sequential(nn.Linear(8, 700), nn.BatchNorm1d(700), nn.Linear(700, 90))
    model[2].to(torch.bfloat16)
    return model


def _mutate(model: nn.Module, gen: torch.Generator) -> None:
    """What a training step and a forward do to the tensors, without running them."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen).to(p.dtype))
        model[1].running_mean.add_(1.0)
        model[1].num_batches_tracked.add_(1)


def _offloaded(model: nn.Module, blocking: bool, bucket_bytes: int = 4096, **kw):
    """An average whose updates run through the offload engine on the host."""
    avg = distavg.ExponentialMovingAverage(model, momentum=0.3, **kw)
    volatile = [i for i, s in enumerate(avg.topology.specs) if not s.is_param]
    avg.engine = OffloadEngine(
        avg.shards, volatile, CPU, blocking=blocking, bucket_bytes=bucket_bytes
    )
    return avg


@pytest.mark.parametrize("interval", [1, 2])
@pytest.mark.parametrize("update_buffers", [False, True])
@pytest.mark.parametrize("dtype", [None, torch.float32])
def test_double_buffered_offload_equals_sync_bitwise(interval, update_buffers, dtype):
    model, gen = _model(), torch.Generator().manual_seed(1)
    kw = dict(interval=interval, update_buffers=update_buffers, dtype=dtype)
    ref = distavg.ExponentialMovingAverage(model, momentum=0.3, **kw)
    blocking, asyn = _offloaded(model, True, **kw), _offloaded(model, False, **kw)
    assert len(asyn.engine._sets) == 2 and len(blocking.engine._sets) == 1
    for i in range(9):
        _mutate(model, gen)
        for avg in (ref, blocking, asyn):
            avg.update_parameters(model)
        if i % 4 == 3:
            assert_bitwise(flats(ref), flats(asyn))
    plan = asyn.engine._sets[0].plans[False]
    assert len(plan.buckets) > 10  # small buckets: tensors split across them
    assert any(len(regions) > 1 for b in plan.buckets for _, regions in b.copies.values())
    assert not any(srcs for b in plan.buckets for srcs, _ in b.copies.values())  # released
    assert_bitwise(flats(ref), flats(blocking))
    assert_bitwise(flats(ref), flats(asyn))
    for avg in (blocking, asyn):
        avg.close()


def test_async_offload_waits_for_the_update_before_last_only():
    model, gen = _model(), torch.Generator().manual_seed(2)
    ref = distavg.ExponentialMovingAverage(model, momentum=0.3)
    avg = _offloaded(model, False)
    for _ in range(2):
        _mutate(model, gen)
        ref.update_parameters(model)
        avg.update_parameters(model)
    avg.wait()
    release = threading.Event()
    avg.engine.worker.put(lambda: release.wait(10))  # no update applies until released

    def update() -> threading.Event:
        _mutate(model, gen)
        ref.update_parameters(model)
        done = threading.Event()
        threading.Thread(target=lambda: (avg.update_parameters(model), done.set())).start()
        return done

    # Updates t and t+1 use the two host sets: both enqueue with no update applied yet.
    assert update().wait(5)
    assert update().wait(5)
    # Update t+2 reuses update t's set: it waits for update t, and only for it.
    last = update()
    assert not last.wait(0.3)
    release.set()
    assert last.wait(10)
    assert_bitwise(flats(ref), flats(avg))
    avg.close()


@pytest.mark.parametrize("blocking", [True, False], ids=["sync", "async"])
def test_offload_keeps_no_source_used_once(blocking):
    # Like the owner push's gather: fresh buffers every update, used by that update only.
    model, gen = _model(), torch.Generator().manual_seed(3)
    ref = distavg.ExponentialMovingAverage(model, momentum=0.3)
    avg = _offloaded(model, blocking)
    sources, fresh = avg._sources, []

    def gathered(flat):
        out = [[p.clone() for p in pieces] for pieces in sources(flat)]
        fresh.extend(weakref.ref(p) for pieces in out for p in pieces)
        return out

    avg._sources = gathered
    for _ in range(5):
        _mutate(model, gen)
        ref.update_parameters(model)
        avg.update_parameters(model)
    avg.wait()
    gc.collect()
    assert fresh and all(r() is None for r in fresh)
    assert_bitwise(flats(ref), flats(avg))
    avg.close()


@pytest.mark.parametrize("blocking", [True, False], ids=["sync", "async"])
def test_offload_held_bytes_count_staging_and_snapshots_of_every_set(blocking):
    model, gen = _model(), torch.Generator().manual_seed(4)
    avg = _offloaded(model, blocking, bucket_bytes=4096)
    for _ in range(3):
        _mutate(model, gen)
        avg.update_parameters(model)
    avg.wait()
    # One staging copy of every piece in its own dtype, and a snapshot of every buffer,
    # per host set.
    staging = sum(s.numel * s.src_dtype.itemsize for s in avg.shards.slots)
    snapshots = sum(t.numel() * t.element_size() for t in model.buffers())
    held = avg.engine.held_bytes()
    sets = 1 if blocking else 2
    assert held["pinned_host"] == sets * (staging + snapshots)
    assert held["accelerator"] == 4096  # the packing bucket
    avg.close()


def test_pinned_blocks_are_counted_as_the_allocator_rounds_them():
    assert [pinned_block_bytes(n) for n in (0, 1, 3, 4, 5, 4096, 4097)] == [
        0,
        1,
        4,
        4,
        8,
        4096,
        8192,
    ]
    assert pinned_block_bytes(1_410_000_000) == 2**31  # a 1.41 GB shard takes 2 GiB


def test_offload_worker_sets_its_device_before_any_update(monkeypatch):
    calls = []
    monkeypatch.setattr(
        torch.cpu, "set_device", lambda d: calls.append((threading.current_thread().name, d))
    )
    model = _model()
    avg = _offloaded(model, False)
    avg.engine.worker.put(lambda: calls.append("first job"))
    avg.engine.worker.join()
    assert calls == [("distavg-update", CPU), "first job"]
    avg.close()


def test_offload_error_surfaces_once_on_the_training_thread(monkeypatch):
    model, gen = _model(), torch.Generator().manual_seed(5)
    avg = _offloaded(model, False)
    _mutate(model, gen)
    avg.update_parameters(model)
    avg.wait()

    def broken(self, kind, weight):
        raise OSError("disk on fire")

    monkeypatch.setattr(OffloadPlan, "apply", broken)
    # ... at wait(), once per failure
    _mutate(model, gen)
    avg.update_parameters(model)
    with pytest.raises(RuntimeError, match="asynchronous update of the average failed.*disk on"):
        avg.wait()
    avg.wait()
    # ... at the next update_parameters()
    _mutate(model, gen)
    avg.update_parameters(model)
    avg.engine.worker.join()  # the failed update ran
    with pytest.raises(RuntimeError, match="OSError: disk on fire"):
        avg.update_parameters(model)
    monkeypatch.undo()
    avg.update_parameters(model)
    avg.close()


def test_sources_cache_keeps_two_alternating_lists_and_no_replaced_one():
    model = _model()
    avg = distavg.ExponentialMovingAverage(model, momentum=0.3)
    a = avg.topology.local_tensors(model)
    b = list(a)  # a second captured list, as the offload's other host set returns
    sa, sb = avg._sources(a), avg._sources(b)
    assert avg._sources(a) is sa and avg._sources(b) is sb  # alternating: both cached
    assert avg._sources(b) is sb  # used twice in a row: the alternation ended
    assert [key is b for key, _ in avg._sources_cache] == [True]  # a and its views let go
