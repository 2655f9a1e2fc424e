"""The accelerator paths: CUDA side stream and pinned CPU offload (skipped without CUDA).

The timing and the ~350M-parameter figures live in ``launch/gpu_check.py``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import distavg
from distavg._accelerator import BUCKET_BYTES, OffloadEngine, StreamEngine

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


def test_offload_holds_one_bucket_on_the_gpu_and_two_shards_pinned():
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    _step(model, opt)  # gradients and optimizer state exist before the baseline
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    avg = distavg.ExponentialMovingAverage(model, device="cpu", async_update=True, optimizer=opt)
    for _ in range(3):
        _step(model, opt)
        avg.update_parameters(model)
    avg.wait()
    torch.cuda.synchronize()
    held = avg.engine.held_bytes()
    assert held["accelerator"] <= BUCKET_BYTES
    # The averager keeps at most one bucket on the GPU (and a few snapshot buffers).
    assert torch.cuda.memory_allocated() - before <= BUCKET_BYTES + (1 << 20)
    assert held["pinned_host"] + avg.shards.nbytes <= 2 * avg.shards.nbytes
    assert all(g.flat.is_pinned() for g in avg.shards.groups.values())


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
