"""Every update path of the flat buffers (direct, staged, upcast: eager and fused) against
a plain per-tensor ``avg.lerp_(src.to(avg.dtype), w)`` loop, bitwise."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import distavg
from distavg import _kernels, shards
from distavg.shards import Route


def _mixed_model(dtype: torch.dtype) -> nn.Module:
    """Large tensors (direct / upcast, one above UPCAST_NUMEL) and many small ones (staged
    over several blocks)."""
    torch.manual_seed(0)
    layers = [nn.Linear(1100, 1000), nn.Linear(1000, 64)]  # 1.1M and 64K weights
    layers += [nn.Linear(64, 64) for _ in range(40)]  # 80 small tensors, > 2 CPU blocks
    return nn.Sequential(*layers).to(dtype)


def _perturb(model: nn.Module, step: int) -> None:
    g = torch.Generator().manual_seed(step)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g).to(p.dtype), alpha=0.1)


def _reference(model: nn.Module, avg_dtype: torch.dtype, weights: list[float]) -> dict:
    ref = {}
    for step, w in enumerate(weights):
        _perturb(model, step)
        for k, v in model.state_dict().items():
            if step == 0:
                ref[k] = v.to(avg_dtype, copy=True)
            else:
                ref[k].lerp_(v.to(avg_dtype), w)
    return ref


class _Schedule(distavg.BaseAveragedModel):
    """Weights on both sides of 0.5 (eager lerp switches formula there)."""

    WEIGHTS = (0.0, 0.3, 0.0002, 0.7, 1.0, 0.05)

    def weight(self, steps: int) -> float:
        return self.WEIGHTS[steps]


def _run(model: nn.Module, **kwargs) -> dict:
    avg = _Schedule(model, **kwargs)
    for step in range(len(_Schedule.WEIGHTS)):
        _perturb(model, step)
        avg.update_parameters(model)
    return avg, avg.full_state_dict()


def _assert_bitwise(got: dict, ref: dict) -> None:
    assert got.keys() == ref.keys()
    for k in ref:
        assert got[k].dtype == ref[k].dtype, k
        assert torch.equal(got[k], ref[k]), f"{k}: max diff {(got[k] - ref[k]).abs().max()}"


def test_direct_and_staged_paths_match_per_tensor_lerp_bitwise():
    ref = _reference(_mixed_model(torch.float32), torch.float32, list(_Schedule.WEIGHTS))
    avg, got = _run(_mixed_model(torch.float32))
    g = avg.shards.groups[torch.float32]
    assert (
        len(g.routes[Route.DIRECT]) == 2 and len(g.routes[Route.UPCAST]) == 0 and len(g.blocks) >= 2
    )
    # CPU staging blocks stay below ATen's grain size (see [Note: CPU staging])
    assert max(n for _, n, _ in g.blocks) <= shards.CPU_STAGE_NUMEL
    _assert_bitwise(got, ref)


def test_eager_upcast_path_matches_per_tensor_lerp_bitwise():
    ref = _reference(_mixed_model(torch.bfloat16), torch.float32, list(_Schedule.WEIGHTS))
    with _kernels.fused_upcast(False):
        avg, got = _run(_mixed_model(torch.bfloat16), dtype=torch.float32)
    g = avg.shards.groups[torch.float32]
    assert len(g.routes[Route.UPCAST]) == 2 and len(g.routes[Route.DIRECT]) == 0
    assert max(avg.shards.slots[i].numel for i in g.routes[Route.UPCAST]) > shards.UPCAST_NUMEL
    _assert_bitwise(got, ref)


def _require_cpp_compiler() -> None:
    """Skip unless inductor finds the C++ compiler that ``torch.compile`` needs on CPU."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
    except Exception as e:
        pytest.skip(f"torch.compile on CPU needs a C++ compiler, none found here: {e}")


def test_fused_upcast_path_matches_per_tensor_lerp_bitwise(monkeypatch):
    _require_cpp_compiler()
    # A fresh attempt (probe included), whatever an earlier test left behind.
    monkeypatch.setattr(_kernels, "_failure", None)
    monkeypatch.setattr(_kernels, "_ready", False)
    with _kernels.fused_upcast(True), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = torch.rand(1000)
        if not _kernels.upcast_lerp_([a], [torch.rand(1000).bfloat16()], 0.3):
            pytest.skip(f"this torch build's fused kernel is not eager's: {_kernels.status()}")
    monkeypatch.setattr(_kernels, "_failure", None)
    monkeypatch.setattr(_kernels, "_ready", False)
    compiled_calls = []
    kernel = _kernels._kernel

    def counted() -> object:
        compiled = kernel()

        def run(avg: torch.Tensor, src: torch.Tensor, w: torch.Tensor) -> None:
            compiled(avg, src, w)
            compiled_calls.append(avg.numel())

        return run

    def eager(*args) -> None:
        raise AssertionError(f"the eager upcast path ran: {_kernels.status()}")

    monkeypatch.setattr(_kernels, "_kernel", counted)
    monkeypatch.setattr(shards, "_staged_upcast_lerp", eager)
    ref = _reference(_mixed_model(torch.bfloat16), torch.float32, list(_Schedule.WEIGHTS))
    with _kernels.fused_upcast(True):
        avg, got = _run(_mixed_model(torch.bfloat16), dtype=torch.float32)
    assert _kernels.compiled_ready(), _kernels.status()
    upcast = avg.shards.groups[torch.float32].routes[Route.UPCAST]
    sizes = sorted(avg.shards.slots[i].numel for i in upcast)
    lerps = len(_Schedule.WEIGHTS) - 1  # every call but the first averages
    # two probes on copies (both branches of lerp), then every upcast tensor on every
    # averaging call
    assert len(upcast) == 2 and len(compiled_calls) == 2 + lerps * len(upcast)
    assert sorted(compiled_calls[2:]) == sorted(sizes * lerps)
    # Bitwise: one fma, as eager's lerp (see [Note: fused upcast-lerp]).
    _assert_bitwise(got, ref)


def test_a_fused_kernel_an_ulp_off_falls_back_to_eager_with_a_warning(monkeypatch):
    # A torch or compiler that does not fuse the multiply-add differs from eager lerp_ in
    # the last bit: the probe sees it and the eager path runs instead.
    monkeypatch.setattr(_kernels, "_failure", None)
    monkeypatch.setattr(_kernels, "_ready", False)

    def off_by_an_ulp() -> object:
        def run(avg: torch.Tensor, src: torch.Tensor, w: torch.Tensor) -> None:
            avg.copy_(torch.nextafter(torch.lerp(avg, src.to(avg.dtype), w), avg + 1))

        return run

    monkeypatch.setattr(_kernels, "_kernel", off_by_an_ulp)
    ref = _reference(_mixed_model(torch.bfloat16), torch.float32, list(_Schedule.WEIGHTS))
    with (
        _kernels.fused_upcast(True),
        pytest.warns(UserWarning, match="not bitwise equal to eager lerp_ on this build"),
    ):
        _, got = _run(_mixed_model(torch.bfloat16), dtype=torch.float32)
    assert not _kernels.compiled_ready()
    assert "fell back to eager" in _kernels.status()
    _assert_bitwise(got, ref)


def test_fused_upcast_async_equals_sync_bitwise():
    model = _mixed_model(torch.bfloat16)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with _kernels.fused_upcast(True):
        sync = _Schedule(model, dtype=torch.float32, optimizer=opt)
        asyn = _Schedule(model, dtype=torch.float32, optimizer=opt, async_update=True)
        for _ in range(len(_Schedule.WEIGHTS)):
            opt.zero_grad()
            model(torch.randn(4, 1100, dtype=torch.bfloat16)).float().pow(2).mean().backward()
            opt.step()
            sync.update_parameters(model)
            asyn.update_parameters(model)
        _assert_bitwise(asyn.full_state_dict(), sync.full_state_dict())


def test_fused_upcast_compile_failure_warns_and_falls_back(monkeypatch):
    def broken():
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(_kernels, "_kernel", broken)
    monkeypatch.setattr(_kernels, "_ready", False)
    monkeypatch.setattr(_kernels, "_failure", None)
    ref = _reference(_mixed_model(torch.bfloat16), torch.float32, list(_Schedule.WEIGHTS))
    with (
        _kernels.fused_upcast(True),
        pytest.warns(UserWarning, match=r"fused upcast-lerp is not used \(RuntimeError"),
    ):
        _, got = _run(_mixed_model(torch.bfloat16), dtype=torch.float32)
    assert _kernels.status() == "fell back to eager: RuntimeError: no compiler here"
    _assert_bitwise(got, ref)


def test_fused_upcast_switch_reads_the_environment(monkeypatch):
    import importlib

    monkeypatch.setenv("DISTAVG_FUSED_UPCAST", "1")
    fresh = importlib.reload(_kernels)
    try:
        assert fresh.status() == "on"
        monkeypatch.setenv("DISTAVG_FUSED_UPCAST", "0")
        assert importlib.reload(_kernels).status().startswith("off")
    finally:
        monkeypatch.delenv("DISTAVG_FUSED_UPCAST")
        importlib.reload(_kernels)
