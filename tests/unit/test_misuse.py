"""Misuse a real job makes ends in a correct average or a clear error, in one process:
reading before the first update, an optimizer that never steps, tensors registered late,
several optimizers, fused GradScaler steps, gradient accumulation, dropped and failing
averages, and arguments the update cannot honour."""

from __future__ import annotations

import gc
import inspect
import subprocess
import sys
import textwrap
import threading
import warnings

import pytest
import torch
from reference import small_model, train_forward
from torch import nn

import distavg
from distavg._guards import NO_STEP_CALLS


def _step(model: nn.Module, opts, x: torch.Tensor) -> None:
    for opt in opts:
        opt.zero_grad()
    model(x).square().mean().backward()
    for opt in opts:
        opt.step()


def _flat(avg) -> dict[torch.dtype, torch.Tensor]:
    avg.wait()
    return {d: g.flat.clone() for d, g in avg.shards.groups.items()}


@pytest.mark.parametrize("async_update", [False, True])
def test_average_read_before_its_first_update_is_a_copy_of_the_model(async_update):
    model = small_model()
    train_forward(model, 0)  # non-trivial BatchNorm statistics
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    avg = distavg.ExponentialMovingAverage(
        model, momentum=0.1, async_update=async_update, optimizer=opt
    )
    want = {k: v.clone() for k, v in model.state_dict().items()}
    got = avg.full_state_dict()
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k
    assert torch.equal(avg.module[1].running_var, model[1].running_var)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    with avg.swapped(model) as m:
        assert torch.equal(m[0].weight, want["0.weight"])
    assert avg.steps == 0
    avg.close()


def test_an_optimizer_that_never_steps_warns_once_naming_it():
    model = nn.Linear(4, 4)
    stale = torch.optim.SGD(model.parameters(), lr=0.1)
    avg = distavg.ExponentialMovingAverage(model, momentum=0.1, optimizer=stale)
    real = torch.optim.Adam(model.parameters(), lr=0.1)  # replaced after construction
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(NO_STEP_CALLS * 2):
            _step(model, [real], torch.randn(2, 4))
            avg.update_parameters(model)
    msgs = [str(w.message) for w in caught if "never stepped" in str(w.message)]
    assert len(msgs) == 1
    assert "optimizer given (SGD) never stepped" in msgs[0]
    assert f"called {NO_STEP_CALLS} times since the average was built" in msgs[0]
    assert avg.steps == 0


def test_a_tensor_registered_after_construction_is_an_error():
    model = small_model()
    avg = distavg.ExponentialMovingAverage(model, momentum=0.1)
    avg.update_parameters(model)
    model[3].register_parameter("scale", nn.Parameter(torch.ones(2)))
    with pytest.raises(ValueError, match=r"unexpected \['3.scale'\].*registered after the average"):
        avg.update_parameters(model)
    other = small_model()
    avg2 = distavg.ExponentialMovingAverage(other, momentum=0.1)
    other.add_module("head", nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"unexpected \['head.bias', 'head.weight'\]"):
        avg2.update_parameters(other)
    # Replacing a tensor, or a buffer that is not saved, changes nothing averaged.
    third = small_model()
    avg3 = distavg.ExponentialMovingAverage(third, momentum=0.1)
    third[0].weight = nn.Parameter(torch.zeros(10, 6))
    third[0].register_buffer("scratch", torch.ones(1), persistent=False)
    avg3.update_parameters(third)
    assert torch.equal(avg3.module[0].weight, torch.zeros(10, 6))


def test_a_second_optimizer_is_fenced_async_equals_sync_bitwise():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 64))
    first = torch.optim.SGD(model[0].parameters(), lr=0.05)
    second = torch.optim.SGD(model[2].parameters(), lr=0.05)  # not given to the average
    sync = distavg.ExponentialMovingAverage(model, momentum=0.3, optimizer=first)
    asyn = distavg.ExponentialMovingAverage(model, momentum=0.3, optimizer=first, async_update=True)
    release = threading.Event()
    lerp = asyn.shards.lerp

    def held_lerp(*args, **kwargs):  # the update stays in flight until the test says
        assert release.wait(10)
        return lerp(*args, **kwargs)

    asyn.shards.lerp = held_lerp
    for step in range(4):
        for opt in (first, second):
            opt.zero_grad()
        model(torch.randn(8, 64)).square().mean().backward()
        if step >= 2:  # a lerp is in flight: the second optimizer must wait at its fence
            stepping = threading.Thread(target=second.step)
            stepping.start()
            stepping.join(0.2)
            assert stepping.is_alive(), "the second optimizer stepped during the update"
            release.set()
            stepping.join(10)
            release.clear()
        else:
            second.step()
        first.step()
        sync.update_parameters(model)
        asyn.update_parameters(model)
    release.set()
    for d, t in _flat(sync).items():
        assert torch.equal(t, _flat(asyn)[d])
    asyn.close()


def test_several_optimizers_count_a_step_when_any_steps():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    opts = [torch.optim.SGD(model[i].parameters(), lr=0.1) for i in range(2)]
    avg = distavg.ExponentialMovingAverage(model, momentum=0.1, optimizer=opts)
    for i in range(3):
        _step(model, [opts[i % 2]], torch.randn(2, 4))
        avg.update_parameters(model)
    avg.update_parameters(model)  # no step since the last call
    assert avg.steps == 3


def test_fused_optimizer_under_grad_scaler_counts_only_real_steps():
    torch.manual_seed(0)
    model = nn.Linear(8, 8)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01, fused=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    avg = distavg.ExponentialMovingAverage(model, momentum=0.5, optimizer=opt)
    real = 0
    for step in range(6):
        opt.zero_grad()
        loss = model(torch.randn(4, 8)).square().mean()
        scaler.scale(loss).backward()
        if step % 2:  # an overflow: the fused kernel skips the step on device
            model.weight.grad[0, 0] = float("inf")
        before = model.weight.detach().clone()
        scaler.step(opt)
        scaler.update()
        real += not torch.equal(before, model.weight)
        avg.update_parameters(model)
    assert real == 3
    assert avg.steps == real


def test_gradient_accumulation_micro_batches_neither_fence_nor_capture():
    model = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    avg = distavg.ExponentialMovingAverage(model, momentum=0.5, async_update=True, optimizer=opt)
    calls = {"fence": 0, "refresh": 0}
    fence, refresh = avg.engine.fence, avg.engine.snapshots.refresh

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)

        return wrapper

    avg.engine.fence = counted("fence", fence)
    avg.engine.snapshots.refresh = counted("refresh", refresh)
    for _ in range(3):
        for _ in range(4):  # micro-batches: update_parameters called on each
            model(torch.randn(4, 8)).square().mean().backward()
            avg.update_parameters(model)
        opt.step()
        opt.zero_grad()
        avg.update_parameters(model)
    assert avg.steps == 3
    assert calls["refresh"] == 3  # once per real step, not per micro-batch
    assert calls["fence"] <= 3 * 3  # the step's pre-hook, capture and submit
    avg.close()


def test_dropping_async_averages_never_breaks_the_optimizer_step():
    model = nn.Linear(32, 32)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(200):
        avg = distavg.ExponentialMovingAverage(
            model, momentum=0.1, async_update=True, optimizer=opt
        )
        _step(model, [opt], torch.randn(4, 32))
        avg.update_parameters(model)
        del avg  # the last reference may drop on the worker thread
        _step(model, [opt], torch.randn(4, 32))
    gc.collect()
    distavg.StochasticWeightAverage(model).close()  # a safe point: inert hooks go
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks


def test_an_update_failing_at_interpreter_exit_fails_the_process(tmp_path):
    script = textwrap.dedent(
        """
        import torch, distavg
        model = torch.nn.Linear(4, 4)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        avg = distavg.ExponentialMovingAverage(model, async_update=True, optimizer=opt)
        def broken(*a, **k):
            raise OSError("disk on fire")
        avg.shards.copy_all = broken
        model(torch.randn(2, 4)).sum().backward()
        opt.step()
        avg.update_parameters(model)  # fails on the worker; the script ends
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode != 0
    assert "disk on fire" in proc.stderr


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"device": "cuda"},
            r"device must be None, 'cpu' or the parameters' device 'cpu', got 'cuda'",
        ),
        ({"device": "meta"}, r"device must be None, 'cpu' .* got 'meta'"),
        ({"device": "gpu0"}, r"device must be None, 'cpu' .* got 'gpu0'"),
        (
            {"dtype": torch.float8_e4m3fn},
            r"dtype must be None or one of .* got torch.float8_e4m3fn",
        ),
        ({"dtype": torch.int8}, r"dtype must be None or one of .* got torch.int8"),
        ({"update_buffers": 1}, r"update_buffers must be True or False, got 1"),
        ({"async_update": "yes"}, r"async_update must be True or False, got 'yes'"),
        ({"momentum": float("nan")}, r"momentum must be in \(0, 1\), got nan"),
        (
            {"decay": 0.999},
            r"ExponentialMovingAverage takes no decay= \(got decay=0.999\).*momentum=0.001",
        ),
    ],
)
def test_bad_arguments_name_argument_value_and_what_is_allowed(kwargs, match):
    with pytest.raises(ValueError, match=match):
        distavg.ExponentialMovingAverage(nn.Linear(2, 2), **kwargs)


@pytest.mark.parametrize(
    ("cls", "kwargs", "match"),
    [
        (
            distavg.HalfLifeEMA,
            {"half_life": float("inf")},
            r"half_life must be a finite number > 0, got inf",
        ),
        (
            distavg.HalfLifeEMA,
            {"rampup": float("nan")},
            r"rampup must be a finite number > 0, got nan",
        ),
        (distavg.WarmupEMA, {"inv_gamma": float("inf")}, r"inv_gamma must be a finite number > 0"),
        (distavg.PowerEMA, {"gamma": float("inf")}, r"gamma must be a finite number > 0, got inf"),
        (distavg.MomentumAnnealingEMA, {"decay": 0.9}, r"takes no decay= .*momentum=0.1"),
    ],
)
def test_infinite_nan_and_renamed_rule_parameters_are_refused(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(nn.Linear(2, 2), **kwargs)


def test_a_float8_model_needs_an_explicit_average_dtype():
    model = nn.Linear(2, 2).to(torch.float8_e4m3fn)
    with pytest.raises(
        ValueError,
        match=r"cannot average tensors of dtype torch.float8_e4m3fn.*dtype=torch.float32",
    ):
        distavg.ExponentialMovingAverage(model)
    distavg.ExponentialMovingAverage(model, dtype=torch.float32).close()


@pytest.mark.parametrize("cls", [c for c, _ in __import__("reference").all_rules()])
def test_rule_signatures_spell_out_the_distributed_keywords(cls):
    params = inspect.signature(cls).parameters
    for name in ("placement", "owner_rank", "dtype", "async_update", "optimizer"):
        assert params[name].kind is inspect.Parameter.KEYWORD_ONLY, name
    assert not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def test_device_naming_the_parameters_device_is_normalised():
    avg = distavg.ExponentialMovingAverage(nn.Linear(2, 2), device=torch.device("cpu"))
    assert avg.device == torch.device("cpu")


@pytest.mark.parametrize(
    ("cls", "kwargs"),
    [
        (distavg.ExponentialMovingAverage, {"momentum": 1.5}),
        (distavg.MomentumAnnealingEMA, {"gamma": 0}),
        (distavg.PowerEMA, {"gamma": -1.0}),
        (distavg.StochasticWeightAverage, {"interval": 0}),
    ],
)
def test_seed_argument_errors_are_catchable_as_mmengine_raises_them(cls, kwargs):
    # mmengine asserts on momentum, gamma and interval: `except AssertionError` keeps working
    with pytest.raises(AssertionError):
        cls(nn.Linear(2, 2), **kwargs)
    with pytest.raises(ValueError):
        cls(nn.Linear(2, 2), **kwargs)
