"""Asynchronous updates on one process: the CPU worker path, the fence, real steps only."""

from __future__ import annotations

import gc
import threading
from collections.abc import Callable

import pytest
import torch
from reference import all_rules, assert_bitwise, flats
from torch import nn

import distavg
from distavg._offload import OffloadPlan
from distavg._steps import StepWatch
from distavg.engine import Kind, SyncEngine, WorkerEngine

RULES = all_rules()


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    # Large and small tensors (direct and staged), BatchNorm buffers (mutated by forward,
    # an integer counter among them).
    return nn.Sequential(
        nn.Linear(8, 256), nn.BatchNorm1d(256), nn.ReLU(), nn.Linear(256, 160), nn.Linear(160, 4)
    )


def _step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor) -> None:
    opt.zero_grad()
    model(x).pow(2).mean().backward()
    opt.step()


@pytest.mark.parametrize(("cls", "kw"), RULES, ids=[c.__name__ for c, _ in RULES])
@pytest.mark.parametrize("update_buffers", [False, True])
def test_async_equals_sync_bitwise_each_rule(cls, kw, update_buffers):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    common = dict(kw, interval=2, update_buffers=update_buffers, optimizer=opt)
    sync = cls(model, **common)
    asyn = cls(model, async_update=True, **common)
    assert isinstance(asyn.engine, WorkerEngine) and isinstance(sync.engine, SyncEngine)
    for i in range(24):
        _step(model, opt, torch.randn(16, 8))
        sync.update_parameters(model)
        asyn.update_parameters(model)
        if i % 7 == 6:  # also mid-run, with an update in flight
            assert_bitwise(flats(sync), flats(asyn))
    assert asyn.steps == sync.steps == 24
    assert_bitwise(flats(sync), flats(asyn))
    full_s, full_a = sync.full_state_dict(), asyn.full_state_dict()
    assert all(torch.equal(full_s[k], full_a[k]) for k in full_s)


def test_async_without_optimizer_raises():
    with pytest.raises(ValueError, match=r"async_update=True needs optimizer=.*got optimizer=None"):
        distavg.ExponentialMovingAverage(_model(), async_update=True)


def test_optimizer_of_wrong_type_raises():
    with pytest.raises(
        ValueError,
        match="optimizer must be a torch.optim.Optimizer, a list of them, or None, got str",
    ):
        distavg.StochasticWeightAverage(_model(), optimizer="sgd")


def test_gradscaler_skipped_steps_push_nothing():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu")
    avg = distavg.ExponentialMovingAverage(model, momentum=0.2, async_update=True, optimizer=opt)
    ref = distavg.ExponentialMovingAverage(model, momentum=0.2)  # told of real steps only

    def scaled_step(x: torch.Tensor, blow_up: bool) -> None:
        opt.zero_grad()
        loss = model(x).pow(2).mean()
        if blow_up:  # inf gradients: the scaler skips optimizer.step()
            loss = loss * float("inf")
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    skipped = 0
    for i in range(12):
        before = {k: v.clone() for k, v in model.named_parameters()}
        scaled_step(torch.randn(16, 8), blow_up=i % 3 == 1)
        stepped = not all(torch.equal(before[k], v) for k, v in model.named_parameters())
        avg.update_parameters(model)
        if stepped:
            ref.update_parameters(model)
        else:
            skipped += 1
            # The average is untouched and the skipped step does not count.
            ref_flats = flats(ref)
            assert_bitwise(flats(avg), ref_flats)
    assert skipped == 4
    assert avg.steps == ref.steps == 8
    assert_bitwise(flats(avg), flats(ref))


def test_update_without_a_step_does_nothing():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    avg = distavg.StochasticWeightAverage(model, optimizer=opt)
    avg.update_parameters(model)
    assert avg.steps == 0
    _step(model, opt, torch.randn(4, 8))
    avg.update_parameters(model)
    avg.update_parameters(model)
    assert avg.steps == 1


class _Gate:
    """Holds the worker inside the next update until the first fence after :meth:`arm`.

    Only that fence releases the update, and only after checking that it is still in
    flight (entered, not finished) and after the test's own ``check``: so a caller that
    reads the average without fencing reads it with the update held, on any machine and
    under any load, and the race the fence prevents always happens.
    """

    def __init__(self, avg: distavg.BaseAveragedModel, op: str = "lerp") -> None:
        avg.wait()  # hold the next update, not one already queued
        self.entered, self.release, self.finished = (threading.Event() for _ in range(3))
        self.armed = False
        self.fenced_in_flight = 0  # fences that found the held update in flight
        self.check = lambda: None
        apply, fence = getattr(avg.shards, op), avg.engine.fence

        def held(*args, **kwargs):
            self.entered.set()
            assert self.release.wait(10), "the held update was never fenced"
            apply(*args, **kwargs)
            self.finished.set()

        def gated_fence() -> None:
            if self.armed and not self.release.is_set():
                assert self.entered.wait(10), "the update never reached the worker"
                assert not self.finished.is_set()
                self.check()  # the update is held: whatever the test sees here is stale
                self.fenced_in_flight += 1
                self.release.set()
            fence()

        setattr(avg.shards, op, held)
        avg.engine.fence = gated_fence

    def arm(self, check: Callable[[], None] = lambda: None) -> None:
        """The update is enqueued: hold it until the next fence, which runs ``check`` first."""
        self.check, self.armed = check, True


def _inflight_pair(lr: float, warm_steps: int):
    """A sync and an async EMA of one model; the async one's last update is held in flight
    until the next fence, which first checks that the async average still lags."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    sync = distavg.ExponentialMovingAverage(model, momentum=0.3, optimizer=opt)
    asyn = distavg.ExponentialMovingAverage(model, momentum=0.3, async_update=True, optimizer=opt)
    for _ in range(warm_steps):
        _step(model, opt, torch.randn(16, 8))
        sync.update_parameters(model)
        asyn.update_parameters(model)
    gate = _Gate(asyn)
    before = {d: g.flat.clone() for d, g in asyn.shards.groups.items()}
    _step(model, opt, torch.randn(16, 8))
    sync.update_parameters(model)
    asyn.update_parameters(model)

    def still_lagging() -> None:
        held = {d: g.flat.clone() for d, g in asyn.shards.groups.items()}
        assert_bitwise(held, before)
        assert not all(torch.equal(held[d], sync.shards.groups[d].flat) for d in held)

    gate.arm(still_lagging)
    return model, opt, sync, asyn, gate


def test_swapped_during_inflight_update_sees_the_finished_update():
    model, _, sync, asyn, gate = _inflight_pair(lr=0.05, warm_steps=3)
    with asyn.swapped(model) as m:
        got = {k: v.clone() for k, v in m.state_dict().items()}
    assert gate.fenced_in_flight == 1
    want = sync.full_state_dict()
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_optimizer_step_waits_for_the_inflight_update():
    model, opt, sync, asyn, gate = _inflight_pair(lr=0.5, warm_steps=2)
    # Forward mutates the BatchNorm statistics and the step writes the parameters while
    # the update is held: it must still see the values of the step it was enqueued after.
    _step(model, opt, torch.randn(16, 8))
    assert gate.fenced_in_flight == 1  # the step's pre-hook fenced the held update
    assert_bitwise(flats(sync), flats(asyn))


def test_worker_exception_surfaces_on_the_next_call():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    avg = distavg.ExponentialMovingAverage(model, async_update=True, optimizer=opt)

    def broken(*args, **kwargs):
        raise OSError("disk on fire")

    _step(model, opt, torch.randn(4, 8))
    avg.update_parameters(model)
    avg.shards.lerp = broken
    # ... at the optimizer's next step (the fence in its pre-hook)
    _step(model, opt, torch.randn(4, 8))
    avg.update_parameters(model)
    with pytest.raises(
        RuntimeError, match="asynchronous update of the average failed.*disk on fire"
    ):
        _step(model, opt, torch.randn(4, 8))
    # ... at wait(), once per failure
    _step(model, opt, torch.randn(4, 8))
    avg.update_parameters(model)
    with pytest.raises(RuntimeError, match="OSError: disk on fire") as info:
        avg.wait()
    assert isinstance(info.value.__cause__, OSError)
    avg.wait()
    # ... at the next update_parameters(), even one after a skipped step (which does not
    # fence: it raises what the worker already reported)
    _step(model, opt, torch.randn(4, 8))
    avg.update_parameters(model)
    avg.engine.worker._jobs.join()  # the failed update has finished
    with pytest.raises(RuntimeError, match="disk on fire"):
        avg.update_parameters(model)
    # ... and at swapped()
    _step(model, opt, torch.randn(4, 8))
    avg.update_parameters(model)
    with pytest.raises(RuntimeError, match="disk on fire"), avg.swapped(model):
        pass
    assert avg.steps == 5


def test_close_fences_removes_hooks_and_stops_the_worker():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    avg = distavg.StochasticWeightAverage(model, async_update=True, optimizer=opt)
    thread = avg.engine.worker._thread
    gate = _Gate(avg, op="copy_all")  # the first counted update copies
    _step(model, opt, torch.randn(4, 8))
    avg.update_parameters(model)

    def worker_busy() -> None:
        assert thread.is_alive()

    gate.arm(worker_busy)
    avg.close()
    assert gate.fenced_in_flight == 1 and gate.finished.is_set()
    assert not thread.is_alive()
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks
    _step(model, opt, torch.randn(4, 8))
    with pytest.raises(RuntimeError, match="StochasticWeightAverage was closed: it takes no more"):
        avg.update_parameters(model)


def test_a_closed_synchronous_average_takes_no_more_updates_but_stays_readable():
    model = _model()
    avg = distavg.StochasticWeightAverage(model)
    avg.update_parameters(model)
    avg.close()
    with pytest.raises(RuntimeError, match="was closed"):
        avg.update_parameters(model)
    assert avg.full_state_dict().keys() == model.state_dict().keys()


def test_destruction_stops_the_worker_and_releases_the_optimizer():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    avg = distavg.StochasticWeightAverage(model, async_update=True, optimizer=opt)
    thread = avg.engine.worker._thread
    _step(model, opt, torch.randn(4, 8))
    avg.update_parameters(model)
    del avg
    gc.collect()
    thread.join(5)
    assert not thread.is_alive()
    _step(model, opt, torch.randn(4, 8))  # the hooks left behind are inert
    # ... and removed at the next safe point: any averager's construction
    distavg.StochasticWeightAverage(model).close()
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks


def test_step_watch_counts_real_steps_only():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    watch = StepWatch([opt], SyncEngine(None))
    assert not watch.stepped()
    _step(model, opt, torch.randn(4, 8))
    assert watch.stepped() and not watch.stepped()
    watch.remove()
    _step(model, opt, torch.randn(4, 8))
    assert not watch.stepped()


@pytest.mark.parametrize("dtype", [None, torch.float32])
@pytest.mark.parametrize("through_staging", [False, True])
def test_offload_buckets_and_cpu_math_equal_the_shards_update_bitwise(dtype, through_staging):
    # The offload path without an accelerator: its buckets (small ones, so tensors split
    # across them and small pieces are packed), the copies into staging (host to host
    # here) and the CPU math per region, against the shards' own update.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 700), nn.BatchNorm1d(700), nn.Linear(700, 90))
    model[2].to(torch.bfloat16)
    ref = distavg.ExponentialMovingAverage(model, momentum=0.3, dtype=dtype)
    off = distavg.ExponentialMovingAverage(model, momentum=0.3, dtype=dtype)
    flat = ref.topology.local_tensors(model)
    sources = ref._sources(flat)
    plans = {
        f: OffloadPlan(
            off.shards,
            sources,
            follow_only=f,
            bucket_bytes=4096,
            staging=lambda d, n: torch.empty(n, dtype=d),
            event=torch.cpu.Event,
            copied=lambda t: through_staging,
        )
        for f in (False, True)
    }
    scratch = torch.empty(4096, dtype=torch.uint8)
    if through_staging:
        assert len(plans[False].buckets) > 10
        assert any(len(s) > 1 for b in plans[False].buckets for s, _ in b.copies.values())
    C, L, F = Kind.COPY, Kind.LERP, Kind.FOLLOW
    for kind, w in [(C, 0.0), (L, 0.3), (F, 0.0), (L, 0.7), (L, 1.0)]:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
            model[1].running_mean.add_(1.0)
        if kind is C:
            ref.shards.copy_all(sources)
        elif kind is F:
            ref.shards.follow(sources)
        else:
            ref.shards.lerp(sources, w)
        plan = plans[kind is F]
        plan.copy(lambda d, n: scratch[: n * d.itemsize].view(d), None)
        plan.apply(kind, w)
        assert_bitwise(flats(ref), flats(off))


@pytest.fixture
def accelerator():
    """accelerate's real ``Accelerator`` on CPU, one process; its global state reset after."""
    accelerate = pytest.importorskip("accelerate")
    from accelerate.state import AcceleratorState

    yield accelerate.Accelerator(cpu=True)
    AcceleratorState._reset_state(reset_partial_state=True)


def test_accelerate_prepared_optimizer_is_looked_through(accelerator):
    from accelerate.optimizer import AcceleratedOptimizer

    model = _model()
    inner = torch.optim.SGD(model.parameters(), lr=0.05)
    opt = accelerator.prepare(inner)
    assert isinstance(opt, AcceleratedOptimizer) and opt.optimizer is inner
    sync = distavg.ExponentialMovingAverage(model, momentum=0.2, optimizer=inner)
    asyn = distavg.ExponentialMovingAverage(model, momentum=0.2, async_update=True, optimizer=opt)
    for _ in range(5):
        _step(model, opt, torch.randn(16, 8))
        sync.update_parameters(model)
        asyn.update_parameters(model)
    assert asyn.steps == 5
    assert_bitwise(flats(sync), flats(asyn))


def test_process_exits_cleanly_with_an_update_in_flight(tmp_path):
    """An open async average at interpreter exit is closed first, not torn down mid-update."""
    import subprocess
    import sys
    import textwrap

    script = tmp_path / "exit_in_flight.py"
    script.write_text(
        textwrap.dedent(
            """
            import torch, distavg
            from torch import nn
            m = nn.Sequential(*[nn.Linear(512, 512) for _ in range(8)])
            opt = torch.optim.SGD(m.parameters(), lr=0.1)
            ema = distavg.ExponentialMovingAverage(
                m, momentum=0.1, async_update=True, optimizer=opt)
            for _ in range(3):
                m(torch.randn(4, 512)).sum().backward()
                opt.step()
                ema.update_parameters(m)
            """
        )
    )
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
