"""The accelerator paths: CUDA side stream and pinned CPU offload (skipped without CUDA).

The stretched races, their negative controls, the timing and the ~350M-parameter figures
live in ``launch/gpu_check.py``; the offload's host side also runs without a GPU
(test_offload_on_host.py).
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch import nn

import distavg
from distavg._accelerator import StreamEngine
from distavg._offload import BUCKET_BYTES, OffloadEngine, pinned_block_bytes

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(),
        reason="needs a CUDA device: the side-stream and pinned-offload paths",
    ),
]

RULES = [
    (distavg.StochasticWeightAverage, {}),
    (distavg.ExponentialMovingAverage, {"momentum": 0.1}),
    (distavg.PowerEMA, {"sigma_rel": 0.1}),
]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(64, 1024),
        nn.BatchNorm1d(1024),
        nn.ReLU(),
        nn.Linear(1024, 512),
        nn.Linear(512, 5),
    ).cuda()


def _step(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    opt.zero_grad()
    model(torch.randn(256, 64, device="cuda")).pow(2).mean().backward()
    opt.step()


def _same(a: distavg.BaseAveragedModel, b: distavg.BaseAveragedModel) -> bool:
    a.wait()
    b.wait()
    return all(torch.equal(g.flat, b.shards.groups[d].flat) for d, g in a.shards.groups.items())


@pytest.mark.parametrize("device", [None, "cpu"], ids=["side_stream", "offload"])
@pytest.mark.parametrize(("cls", "kw"), RULES, ids=[c.__name__ for c, _ in RULES])
def test_async_equals_sync_bitwise_on_gpu(device, cls, kw):
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    common = dict(kw, interval=2, device=device, optimizer=opt)
    sync = cls(model, **common)
    asyn = cls(model, async_update=True, **common)
    engine = StreamEngine if device is None else OffloadEngine
    assert isinstance(asyn.engine, engine)
    # A CPU average of a CPU copy: the offload's CPU math must match it bitwise too.
    cpu_model = _model().cpu()
    cpu = cls(cpu_model, **dict(kw, interval=2)) if device == "cpu" else None
    for _ in range(24):
        _step(model, opt)
        sync.update_parameters(model)
        asyn.update_parameters(model)
        if cpu is not None:
            cpu_model.load_state_dict(model.state_dict())
            cpu.update_parameters(cpu_model)
    assert _same(sync, asyn)
    if cpu is not None:
        assert _same(cpu, asyn)


@pytest.mark.parametrize("device", [None, "cpu"], ids=["side_stream", "offload"])
def test_steady_state_has_no_host_sync(device):
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
    avg = distavg.ExponentialMovingAverage(model, device=device, async_update=True, optimizer=opt)
    for _ in range(3):  # warm-up: allocations, pinned staging, the first (copy) update
        _step(model, opt)
        avg.update_parameters(model)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(5):
            _step(model, opt)
            avg.update_parameters(model)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    avg.wait()


def _pinned_active() -> int:
    torch.cuda.synchronize()
    gc.collect()
    torch.empty(1, pin_memory=True)  # an allocation retires freed blocks
    return torch.cuda.host_memory_stats()["active_bytes.current"]


@pytest.mark.parametrize("async_update", [False, True], ids=["sync", "async"])
def test_offload_holds_one_bucket_on_the_gpu_and_reports_pinned_blocks_exactly(async_update):
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    _step(model, opt)  # gradients and optimizer state exist before the baseline
    torch.cuda.synchronize()
    before, pinned_before = torch.cuda.memory_allocated(), _pinned_active()
    avg = distavg.ExponentialMovingAverage(
        model, device="cpu", async_update=async_update, optimizer=opt
    )
    for _ in range(3):
        _step(model, opt)
        avg.update_parameters(model)
    avg.wait()
    held = avg.engine.held_bytes()
    assert held["accelerator"] <= BUCKET_BYTES
    # The averager keeps at most one bucket on the GPU (the snapshots are pinned).
    assert torch.cuda.memory_allocated() - before <= BUCKET_BYTES + (1 << 20)
    # What the host allocator holds for it: the average and held_bytes, block by block.
    average = sum(pinned_block_bytes(g.flat.nbytes) for g in avg.shards.groups.values())
    assert _pinned_active() - pinned_before == average + held["pinned_host"]
    # Per host set (two when asynchronous) one staging copy of the parameters (full
    # buckets are powers of two: no rounding but the last) and the buffer snapshots.
    params = sum(p.nbytes for p in model.parameters())
    sets = 2 if async_update else 1
    assert sets * params <= held["pinned_host"] <= sets * (params + 2 * BUCKET_BYTES)
    assert all(g.flat.is_pinned() for g in avg.shards.groups.values())
    avg.close()


def test_offload_keeps_no_gathered_buffer_between_updates():
    # Like the owner push: the sources are fresh device buffers every update (allocated on
    # the side stream, where the engine asks for them), used by that update only.
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sync = distavg.ExponentialMovingAverage(model, device="cpu", optimizer=opt)
    asyn = distavg.ExponentialMovingAverage(model, device="cpu", async_update=True, optimizer=opt)
    sources, fresh = asyn._sources, []

    def gathered(flat):
        torch.cuda._sleep(1_000_000)  # a slow collective, on the side stream
        out = [[p.clone() if p.is_cuda else p for p in pieces] for pieces in sources(flat)]
        fresh.extend(weakref.ref(p) for pieces in out for p in pieces if p.is_cuda)
        return out

    asyn._sources = gathered
    for _ in range(6):
        _step(model, opt)
        sync.update_parameters(model)
        asyn.update_parameters(model)
    assert _same(sync, asyn)
    gc.collect()
    assert fresh and all(r() is None for r in fresh)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs a second CUDA device")
def test_offload_worker_thread_uses_the_parameters_device():
    torch.manual_seed(0)
    model = nn.Linear(64, 64).to("cuda:1")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    avg = distavg.ExponentialMovingAverage(model, device="cpu", async_update=True, optimizer=opt)
    seen = []
    avg.engine.worker.put(lambda: seen.append(torch.cuda.current_device()))
    avg.wait()
    assert seen == [1]  # not device 0: no context there from this thread
    avg.close()


def test_async_equals_sync_bitwise_with_bf16_params_and_fp32_average():
    model = _model().to(torch.bfloat16)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    sync = distavg.ExponentialMovingAverage(model, dtype=torch.float32, optimizer=opt)
    asyn = distavg.ExponentialMovingAverage(
        model, dtype=torch.float32, async_update=True, optimizer=opt
    )
    for _ in range(21):
        opt.zero_grad()
        model(torch.randn(256, 64, device="cuda", dtype=torch.bfloat16)).float().pow(
            2
        ).mean().backward()
        opt.step()
        sync.update_parameters(model)
        asyn.update_parameters(model)
    assert _same(sync, asyn)
