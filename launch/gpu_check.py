"""Check the accelerator paths on one CUDA GPU (about 2-5 minutes): ``python launch/gpu_check.py``.

Every row of the table it prints is a claim that can fail. The races it looks for are
stretched with ``torch.cuda._sleep`` so a missing wait shows in one run, and each race check
comes with negative controls (the same run with the wait removed) that must differ: a check
that cannot see its race fails. Exits 1 on any failure, and when CUDA is absent.

    python launch/gpu_check.py               # every check
    python launch/gpu_check.py --quick       # a smaller model for the timing and memory rows
    python launch/gpu_check.py --only race   # one check (names: --help)

The README's section "Checking the GPU paths" says what each row proves.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import os
import statistics
import sys
import tempfile
import time
import traceback
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

import distavg
from distavg._offload import pinned_block_bytes

EMA = distavg.ExponentialMovingAverage
PASS, FAIL, INFO = "PASS", "FAIL", "info"
Row = tuple[str, str, str]  # (check, result, figure)


@dataclass
class Ctx:
    """What every check may use: sizes, and the sleep calibration."""

    quick: bool
    width: int
    layers: int
    batch: int
    rounds: int
    steps: int
    cycles_per_ms: float = 0.0

    def sleep(self, ms: float) -> None:
        """Keep the current stream busy for ``ms`` milliseconds."""
        torch.cuda._sleep(int(ms * self.cycles_per_ms))


def _verdict(ok: bool) -> str:
    return PASS if ok else FAIL


# -- models and loops --------------------------------------------------------------------


def _small(dtype: torch.dtype = torch.float32, device: str = "cuda") -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(64, 1024),
        nn.BatchNorm1d(1024),  # buffers: captured at enqueue, num_batches_tracked follows
        nn.ReLU(),
        nn.Linear(1024, 512),
        nn.Linear(512, 5),
    )
    return model.to(device=device, dtype=dtype)


def _inputs(n: int, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    gen = torch.Generator(device="cuda").manual_seed(1)
    return [torch.randn(256, 64, device="cuda", dtype=dtype, generator=gen) for _ in range(n)]


def _step(model: nn.Module, opts: list[torch.optim.Optimizer], x: torch.Tensor) -> None:
    for opt in opts:
        opt.zero_grad(set_to_none=True)
    model(x).float().pow(2).mean().backward()
    for opt in opts:
        opt.step()


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors now, cloned on the current stream (no host sync)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _replay(history: list[dict], params: torch.dtype = torch.float32, **kw) -> EMA:
    """A CPU average of a CPU model (``params`` dtype) fed the recorded states one by one:
    the offload's reference, whose bits its CPU math must give."""
    model = _small(params, device="cpu")
    ref = EMA(model, **kw)
    for sd in history:
        model.load_state_dict({k: v.cpu() for k, v in sd.items()})
        ref.update_parameters(model)
    return ref


def _same(a: distavg.BaseAveragedModel, b: distavg.BaseAveragedModel) -> bool:
    a.wait()
    b.wait()
    ga, gb = a.shards.groups, b.shards.groups
    return ga.keys() == gb.keys() and all(
        torch.equal(ga[d].flat.cpu(), gb[d].flat.cpu()) for d in ga
    )


def _close(*avgs: distavg.BaseAveragedModel | None) -> None:
    for a in avgs:
        if a is not None:
            a.close()


def _sleepy_sources(avg: distavg.BaseAveragedModel, sleep: Callable[[], None]) -> None:
    """Each update first sleeps where the engine runs it (the side stream): a slow update."""
    sources = avg._sources

    def slow(flat):
        sleep()
        return sources(flat)

    avg._sources = slow


def _no_fence(engine) -> None:
    engine.fence = lambda: None


def _no_wait_on_step(engine) -> None:
    engine._start_side = lambda: None


# -- the checks ----------------------------------------------------------------------------


def check_bitwise(ctx: Ctx) -> list[Row]:
    """async == sync on both paths; the offload == a CPU average of the same weights."""
    rows = []
    for path, device in (("side stream", None), ("offload", "cpu")):
        model = _small()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        kw = dict(momentum=0.05, interval=2, device=device, optimizer=opt)
        sync, asyn = EMA(model, **kw), EMA(model, async_update=True, **kw)
        cpu_model = _small(device="cpu")
        cpu = EMA(cpu_model, momentum=0.05, interval=2)
        for x in _inputs(25):
            _step(model, [opt], x)
            sync.update_parameters(model)
            asyn.update_parameters(model)
            cpu_model.load_state_dict(model.state_dict())
            cpu.update_parameters(cpu_model)
        same = _same(sync, asyn)
        figure = f"async == sync over 25 steps: {same}"
        if device == "cpu":
            same_cpu = _same(asyn, cpu)
            figure += f"; == CPU average: {same_cpu}"
            same &= same_cpu
        rows.append((f"bitwise: {path} [{type(asyn.engine).__name__}]", _verdict(same), figure))
        _close(sync, asyn, cpu)
    return rows


def _race(
    ctx: Ctx,
    path: str,
    *,
    side_ms: float = 0.0,
    step_ms: float = 0.0,
    sabotage: Callable | None = None,
    steps: int = 20,
) -> bool:
    """Whether an async average equals its reference after a run with stretched windows.

    ``side_ms``: each update first sleeps on the side stream (a late reader: a missing
    fence lets the next step overwrite the parameters before it reads them). ``step_ms``:
    the current stream sleeps before each ``opt.step()`` (a late writer: a side stream that
    does not wait for the step reads the previous step's values). No host sync per step.
    """
    model = _small()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
    device = "cpu" if path == "offload" else None
    asyn = EMA(model, momentum=0.1, device=device, async_update=True, optimizer=opt)
    sync = EMA(model, momentum=0.1, optimizer=opt) if path == "stream" else None
    if side_ms:
        _sleepy_sources(asyn, lambda: ctx.sleep(side_ms))
    hook = None
    if step_ms:  # registered after the averagers' hooks: runs after the fence
        hook = opt.register_step_pre_hook(lambda *_: ctx.sleep(step_ms))
    if sabotage is not None:
        sabotage(asyn.engine)
    history = []
    try:
        for x in _inputs(steps):
            _step(model, [opt], x)
            if sync is not None:
                sync.update_parameters(model)
            else:
                history.append(_state(model))
            asyn.update_parameters(model)
        if sync is not None:
            return _same(sync, asyn)
        ref = _replay(history, momentum=0.1)
        return _same(ref, asyn)
    finally:
        if hook is not None:
            hook.remove()
        _close(sync, asyn)


def check_race(ctx: Ctx) -> list[Row]:
    """Stretched races on both paths, each with its negative control."""
    rows = []
    for path in ("stream", "offload"):
        cases = (
            ("side sleeps 20 ms", dict(side_ms=20.0), "no fence", _no_fence),
            ("step sleeps 20 ms", dict(step_ms=20.0), "no wait on the step", _no_wait_on_step),
        )
        for what, sleeps, control, sabotage in cases:
            same = _race(ctx, path, **sleeps)
            rows.append((f"race {path}: {what}", _verdict(same), f"async == reference: {same}"))
            same = _race(ctx, path, sabotage=sabotage, **sleeps)
            rows.append(
                (
                    f"race {path}: {control} (control)",
                    _verdict(not same),
                    f"differs: {not same} (must, or the check cannot see this race)",
                )
            )
    return rows


class _SleepyEvent:
    """A bucket event: recording it first sleeps on the side stream (so the next bucket's
    copies land late); its host wait can be switched off (the negative control)."""

    def __init__(self, ctx: Ctx, ms: float, wait: bool) -> None:
        self.inner = torch.cuda.Event(blocking=True)
        self.ctx, self.ms, self.wait = ctx, ms, wait

    def record(self, stream) -> None:
        with torch.cuda.stream(stream):
            self.ctx.sleep(self.ms)
        self.inner.record(stream)

    def synchronize(self) -> None:
        if self.wait:
            self.inner.synchronize()


def _rebucket(engine, bucket_bytes: int, event: Callable[[], object]) -> None:
    """Small buckets and instrumented events from the next update on (plans are rebuilt)."""
    engine.wait()
    engine.bucket_bytes = bucket_bytes
    engine._event = event
    for host in engine._sets:
        host.plans.clear()


def check_offload_buckets(ctx: Ctx) -> list[Row]:
    """Many small buckets, sleeps between them: the worker must wait for each bucket."""
    rows = []
    for wait in (True, False):
        model = _small()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
        avg = EMA(model, momentum=0.1, device="cpu", async_update=True, optimizer=opt)
        _rebucket(avg.engine, 64 << 10, lambda w=wait: _SleepyEvent(ctx, 0.5, w))
        history = []
        for x in _inputs(12):
            _step(model, [opt], x)
            history.append(_state(model))
            avg.update_parameters(model)
        ref = _replay(history, momentum=0.1)
        same = _same(ref, avg)
        buckets = len(avg.engine._sets[0].plans[False].buckets)
        if wait:
            rows.append(
                (
                    "offload buckets: waits per bucket",
                    _verdict(same),
                    f"{buckets} buckets of 64 KiB, 0.5 ms apart: == CPU average: {same}",
                )
            )
        else:
            rows.append(
                (
                    "offload buckets: no bucket wait (control)",
                    _verdict(not same),
                    f"differs: {not same} (must)",
                )
            )
        _close(avg, ref)
    return rows


def check_owner_standin(ctx: Ctx) -> list[Row]:
    """The owner push's stream logic on one GPU: a gather stand-in that sleeps on the side
    stream and returns fresh device buffers; bitwise, and nothing keeps those buffers."""
    rows = []
    for path, device in (("stream", None), ("offload", "cpu")):
        model = _small()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
        asyn = EMA(model, momentum=0.1, device=device, async_update=True, optimizer=opt)
        sync = EMA(model, momentum=0.1, optimizer=opt) if device is None else None
        gathered: list[weakref.ref] = []
        sources = asyn._sources

        def standin(flat, sources=sources, gathered=gathered):
            ctx.sleep(5.0)  # a slow collective, on the stream the engine runs it on
            fresh = [[p.clone() if p.is_cuda else p for p in ps] for ps in sources(flat)]
            gathered.extend(weakref.ref(p) for ps in fresh for p in ps if p.is_cuda)
            return fresh

        asyn._sources = standin
        history = []
        for x in _inputs(10):
            _step(model, [opt], x)
            if sync is not None:
                sync.update_parameters(model)
            else:
                history.append(_state(model))
            asyn.update_parameters(model)
        if sync is not None:
            same = _same(sync, asyn)
        else:
            ref = _replay(history, momentum=0.1)
            same = _same(ref, asyn)
        gc.collect()
        alive = sum(r() is not None for r in gathered)
        figure = f"== reference: {same}; gathered buffers alive after wait: {alive}"
        if alive:
            asyn.shards._resolved = None  # the shards' cache of the last resolved plan
            gc.collect()
            figure += f" ({sum(r() is not None for r in gathered)} without the shards' plan cache)"
        rows.append((f"owner push stand-in: {path}", _verdict(same and not alive), figure))
        _close(sync, asyn)
    return rows


def check_scaler_fused(ctx: Ctx) -> list[Row]:
    """GradScaler with a fused optimizer: skipped steps do not count and average nothing."""
    model = _small()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    scaler = torch.amp.GradScaler("cuda")
    sync = EMA(model, momentum=0.1, optimizer=opt)
    asyn = EMA(model, momentum=0.1, async_update=True, optimizer=opt)
    ref = EMA(model, momentum=0.1)  # told of real steps only
    real = 0
    for i, x in enumerate(_inputs(15)):
        opt.zero_grad(set_to_none=True)
        loss = model(x).pow(2).mean()
        skipped = i % 3 == 2
        if skipped:  # inf gradients: the fused kernel skips the step on device
            loss = loss * float("inf")
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        sync.update_parameters(model)
        asyn.update_parameters(model)
        if not skipped:
            real += 1
            ref.update_parameters(model)
    counts = (sync.steps, asyn.steps, ref.steps)
    same = _same(sync, asyn) and _same(ref, asyn)
    ok = same and counts == (real, real, real)
    _close(sync, asyn, ref)
    figure = f"steps sync/async/real: {counts[0]}/{counts[1]}/{real}; == real-steps average: {same}"
    return [("GradScaler + fused AdamW, inf every 3rd step", _verdict(ok), figure)]


def check_second_optimizer(ctx: Ctx) -> list[Row]:
    """An optimizer the average was not given steps first: it is fenced too."""
    model = _small()
    params = list(model.parameters())
    other = torch.optim.AdamW(params[:2], lr=1e-3, foreach=True)  # steps first, not given
    main = torch.optim.AdamW(params[2:], lr=1e-3, foreach=True)
    sync = EMA(model, momentum=0.1, optimizer=main)
    asyn = EMA(model, momentum=0.1, async_update=True, optimizer=main)
    _sleepy_sources(asyn, lambda: ctx.sleep(10.0))  # the update reads late
    for x in _inputs(15):
        _step(model, [other, main], x)
        sync.update_parameters(model)
        asyn.update_parameters(model)
    same = _same(sync, asyn)
    _close(sync, asyn)
    figure = f"async == sync with the update 10 ms late: {same}"
    return [("second optimizer steps first (not given)", _verdict(same), figure)]


def check_bf16_offload(ctx: Ctx) -> list[Row]:
    """bf16 parameters, an fp32 average in host memory: the CPU math upcasts bitwise."""
    model = _small(torch.bfloat16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=True)
    kw = dict(momentum=0.01, device="cpu", dtype=torch.float32, optimizer=opt)
    sync, asyn = EMA(model, **kw), EMA(model, async_update=True, **kw)
    history = []
    for x in _inputs(12, torch.bfloat16):
        _step(model, [opt], x)
        history.append(_state(model))
        sync.update_parameters(model)
        asyn.update_parameters(model)
    ref = _replay(history, torch.bfloat16, momentum=0.01, dtype=torch.float32)
    same_sync, same_cpu = _same(sync, asyn), _same(ref, asyn)
    _close(sync, asyn, ref)
    figure = f"async == sync: {same_sync}; == CPU average: {same_cpu}"
    return [("bf16 params, fp32 average, offload", _verdict(same_sync and same_cpu), figure)]


def check_buffers_interval(ctx: Ctx) -> list[Row]:
    """Averaged buffers and follow-only updates (interval=3) on both paths."""
    rows = []
    for path, device in (("stream", None), ("offload", "cpu")):
        model = _small()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
        kw = dict(momentum=0.1, interval=3, update_buffers=True, device=device, optimizer=opt)
        sync, asyn = EMA(model, **kw), EMA(model, async_update=True, **kw)
        for x in _inputs(14):
            _step(model, [opt], x)
            sync.update_parameters(model)
            asyn.update_parameters(model)
        same = _same(sync, asyn)
        _close(sync, asyn)
        rows.append(
            (f"update_buffers=True, interval=3: {path}", _verdict(same), f"async == sync: {same}")
        )
    return rows


def check_no_host_sync(ctx: Ctx) -> list[Row]:
    """The steady-state loop makes no host synchronisation on the training thread."""
    rows = []
    for path, device in (("stream", None), ("offload", "cpu")):
        model = _small()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
        avg = EMA(model, device=device, async_update=True, optimizer=opt)
        xs = _inputs(13)
        for x in xs[:3]:  # warm-up: allocations, pinned staging, both host sets
            _step(model, [opt], x)
            avg.update_parameters(model)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for x in xs[3:]:
                _step(model, [opt], x)
                avg.update_parameters(model)
            found = ""
        except RuntimeError as e:
            found = str(e).splitlines()[0]
        finally:
            torch.cuda.set_sync_debug_mode("default")
        avg.close()
        rows.append(
            (
                f"no host sync per step: {path}",
                _verdict(not found),
                found or "none in 10 steps (sync debug mode 'error')",
            )
        )
    return rows


def _big(width: int, layers: int) -> nn.Module:
    torch.manual_seed(0)
    mods: list[nn.Module] = [nn.BatchNorm1d(width)]  # buffers: captured at enqueue
    for _ in range(layers):
        mods += [nn.Linear(width, width), nn.GELU()]
    return nn.Sequential(*mods).cuda()


class _Throttle:
    """Before each step the host waits for the GPU to finish the previous one, as a loop
    that reads its loss every step does: outside the timed call, and a full launch queue
    never blocks inside it. An offload that waited for the update just enqueued (one host
    set) then shows its whole copies + CPU math inside ``update_parameters``."""

    def __init__(self, depth: int = 1) -> None:
        self.events: deque = deque()
        self.depth = depth

    def before_step(self) -> None:
        if len(self.events) >= self.depth:
            self.events.popleft().synchronize()

    def after_step(self) -> None:
        e = torch.cuda.Event()
        e.record()
        self.events.append(e)


def check_host_time(ctx: Ctx) -> list[Row]:
    """Host time inside update_parameters per path, for a ~350M-parameter model."""
    model = _big(ctx.width, ctx.layers)
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, foreach=True)
    x = torch.randn(ctx.batch, ctx.width, device="cuda")
    step = lambda: _step(model, [opt], x)  # noqa: E731
    step()
    torch.cuda.synchronize()
    paths: dict[str, distavg.BaseAveragedModel | None] = {"none": None}
    for name, device, async_update in (
        ("sync", None, False),
        ("stream", None, True),
        ("offload sync", "cpu", False),
        ("offload async", "cpu", True),
    ):
        avg = EMA(model, momentum=2e-4, device=device, async_update=async_update, optimizer=opt)
        for _ in range(2):  # both host sets, both kinds of plan
            step()
            avg.update_parameters(model)
        avg.wait()
        paths[name] = avg
    # The offload's copies and CPU math alone, with the GPU idle.
    alone = []
    for _ in range(3):
        step()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        paths["offload sync"].update_parameters(model)
        alone.append(time.perf_counter() - t0)
    copy_math = statistics.median(alone)

    def block(avg) -> tuple[float, float]:
        throttle, host = _Throttle(), 0.0
        for _ in range(2):
            step()
            if avg is not None:
                avg.update_parameters(model)
        if avg is not None:
            avg.wait()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(ctx.steps):
            throttle.before_step()
            step()
            if avg is not None:
                h0 = time.perf_counter()
                avg.update_parameters(model)
                host += time.perf_counter() - h0
            throttle.after_step()
        if avg is not None:
            avg.wait()  # the last update's CPU math counts
        torch.cuda.synchronize()
        return (time.perf_counter() - t0) / ctx.steps, host / ctx.steps

    times: dict[str, list[tuple[float, float]]] = {name: [] for name in paths}
    for _ in range(ctx.rounds):
        for name, avg in paths.items():
            times[name].append(block(avg))
    _close(*paths.values())
    med = {n: tuple(statistics.median(v[i] for v in t) for i in range(2)) for n, t in times.items()}
    base = med["none"][0]
    launch_budget = 5e-3
    budgets = {
        "sync": launch_budget,
        "stream": launch_budget,
        "offload async": launch_budget + 0.1 * base + max(0.0, copy_math - base),
    }
    rows: list[Row] = [
        (
            "host time: model",
            INFO,
            f"{ctx.layers} x Linear({ctx.width}) + BatchNorm, {params / 1e6:.0f}M fp32, "
            f"batch {ctx.batch}; step {base * 1e3:.1f} ms with no average; offload copies + "
            f"CPU math alone {copy_math * 1e3:.1f} ms",
        )
    ]
    for name in ("sync", "stream", "offload sync", "offload async"):
        step_s, host_s = med[name]
        figure = f"{host_s * 1e3:.2f} ms/update"
        if name in budgets:
            figure += f" (budget {budgets[name] * 1e3:.2f})"
            verdict = _verdict(host_s <= budgets[name])
        else:
            figure += " (blocks by design: copies + CPU math)"
            verdict = INFO
        figure += f"; step {step_s * 1e3:.1f} ms ({step_s / base:.2f}x none)"
        rows.append((f"host time: {name}", verdict, figure))
    return rows


def check_pinned(ctx: Ctx) -> list[Row]:
    """Pinned memory: the allocator's own count against held_bytes + the average."""
    width, layers = (1024, 4) if ctx.quick else (2048, 12)
    model = _big(width, layers)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, foreach=True)
    x = torch.randn(64, width, device="cuda")

    def active() -> int:
        torch.cuda.synchronize()
        gc.collect()
        torch.empty(1, pin_memory=True)  # an allocation retires freed blocks
        return int(torch.cuda.host_memory_stats().get("active_bytes.current", -1))

    _step(model, [opt], x)
    before = active()
    if before < 0:
        return [("pinned memory", FAIL, "torch.cuda.host_memory_stats() has no active_bytes")]
    avg = EMA(model, momentum=1e-3, device="cpu", async_update=True, optimizer=opt)
    for _ in range(4):
        _step(model, [opt], x)
        avg.update_parameters(model)
    avg.wait()
    grown = active() - before
    held = avg.engine.held_bytes()
    average = sum(
        pinned_block_bytes(g.flat.numel() * g.flat.element_size())
        for g in avg.shards.groups.values()
    )
    exact = avg.shards.nbytes
    ok = grown == held["pinned_host"] + average
    mib = 2**20
    figure = (
        f"allocator +{grown / mib:.1f} MiB; held_bytes {held['pinned_host'] / mib:.1f} + "
        f"average {average / mib:.1f} (exact {exact / mib:.1f}) MiB; GPU held "
        f"{held['accelerator'] / mib:.0f} MiB"
    )
    avg.close()
    return [("pinned memory vs allocator stats", _verdict(ok), figure)]


def check_nccl_world1(ctx: Ctx) -> list[Row]:
    """full_state_dict(), swapped() and state_dict() under an NCCL-only group of world 1."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        store = dist.FileStore(os.path.join(tmp, "store"), 1)
        device = torch.device("cuda", torch.cuda.current_device())
        dist.init_process_group("nccl", store=store, rank=0, world_size=1, device_id=device)
        try:
            for layout in ("plain", "fsdp2"):
                for placement in ("sharded", "owner"):
                    model = _small()
                    if layout == "fsdp2":
                        mesh = init_device_mesh("cuda", (1,))
                        for layer in model:
                            if isinstance(layer, nn.Linear):
                                fully_shard(layer, mesh=mesh)
                        fully_shard(model, mesh=mesh)
                    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
                    avg = EMA(
                        model, momentum=0.3, placement=placement, async_update=True, optimizer=opt
                    )
                    for x in _inputs(4):
                        _step(model, [opt], x)
                        avg.update_parameters(model)
                    full = avg.full_state_dict()
                    avg.state_dict()
                    with avg.swapped(model):
                        inside = {
                            k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone()
                            for k, v in model.state_dict().items()
                        }
                    ok = full.keys() == inside.keys() and all(
                        torch.equal(full[k].to(inside[k].device), inside[k]) for k in full
                    )
                    results.append((f"{layout}/{placement}", ok))
                    avg.close()
        finally:
            dist.destroy_process_group()
    ok = all(r for _, r in results)
    figure = ", ".join(f"{name}: {'ok' if r else 'DIFFERS'}" for name, r in results)
    return [("NCCL world 1: full_state_dict == swapped", _verdict(ok), figure)]


def check_csan(ctx: Ctx) -> list[Row]:
    """The side-stream path under CUDA Sanitizer: no race reported; the controls are seen."""
    try:
        from torch.cuda import _sanitizer as csan
    except ImportError as e:
        return [("CSAN", INFO, f"torch.cuda._sanitizer unavailable: {e}")]

    def run(sabotage: Callable | None) -> tuple[bool, str]:
        model = _small()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
        sync = EMA(model, momentum=0.1, optimizer=opt)
        asyn = EMA(model, momentum=0.1, async_update=True, optimizer=opt)
        if sabotage is not None:
            sabotage(asyn.engine)
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err):
                for x in _inputs(6):
                    _step(model, [opt], x)
                    sync.update_parameters(model)
                    asyn.update_parameters(model)
                same = _same(sync, asyn)
            return same, ""
        except csan.CUDASanitizerErrors as e:
            return False, str(e).splitlines()[0] if str(e) else "race reported"
        finally:
            with contextlib.suppress(Exception):
                _close(sync, asyn)

    csan.enable_cuda_sanitizer()
    try:
        same, race = run(None)
        rows = [
            ("CSAN: side stream", _verdict(same and not race), race or f"no race; == sync: {same}")
        ]
        for control, sabotage in (
            ("no fence", _no_fence),
            ("no wait on the step", _no_wait_on_step),
        ):
            _, race = run(sabotage)
            rows.append(
                (
                    f"CSAN: {control} (control)",
                    _verdict(bool(race)),
                    race or "no race reported (must)",
                )
            )
    finally:
        csan.cuda_sanitizer.disable()
    return rows


def _raised_by_distavg(err: BaseException | None) -> BaseException | None:
    """The first exception in ``err``'s chain raised from distavg's own code."""
    package = str(Path(distavg.__file__).parent)
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        frames = traceback.extract_tb(err.__traceback__)
        if frames and frames[-1].filename.startswith(package):
            return err
        err = err.__cause__ or err.__context__
    return None


def check_graph_capture(ctx: Ctx) -> list[Row]:
    """Capturing opt.step() in a CUDA graph is refused with a clear error from the average."""
    model = _small()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, capturable=True)
    avg = EMA(model, momentum=0.1, async_update=True, optimizer=opt)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the default stream, as capture requires
        for x in _inputs(3):
            _step(model, [opt], x)
            avg.update_parameters(model)
    torch.cuda.current_stream().wait_stream(side)
    avg.wait()
    torch.cuda.synchronize()
    err = None
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            opt.step()
    except Exception as e:  # what the capture raised, whoever raised it
        err = e
    ours = _raised_by_distavg(err)
    ok = isinstance(ours, RuntimeError) and "captur" in str(ours).lower()
    avg.close()
    if ok:
        figure = str(ours).splitlines()[0][:90]
    elif err is None:
        figure = "no error: the step was captured"
    else:
        figure = f"not from distavg: {type(err).__name__}: {str(err).splitlines()[0][:70]}"
    return [("CUDA graph capture of opt.step()", _verdict(ok), figure)]


# In run order: process-wide state last (a process group, the sanitizer, a capture).
CHECKS: dict[str, Callable[[Ctx], list[Row]]] = {
    "bitwise": check_bitwise,
    "race": check_race,
    "buckets": check_offload_buckets,
    "owner": check_owner_standin,
    "scaler": check_scaler_fused,
    "optimizers": check_second_optimizer,
    "bf16": check_bf16_offload,
    "buffers": check_buffers_interval,
    "nosync": check_no_host_sync,
    "hosttime": check_host_time,
    "pinned": check_pinned,
    "nccl": check_nccl_world1,
    "csan": check_csan,
    "graph": check_graph_capture,
}


def _calibrate() -> float:
    """Clock cycles per millisecond of ``torch.cuda._sleep``."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(1_000_000)
    start.record()
    torch.cuda._sleep(50_000_000)
    end.record()
    end.synchronize()
    return 50_000_000 / max(start.elapsed_time(end), 1e-3)


def _table(rows: list[Row]) -> str:
    w = max(len(r[0]) for r in rows)
    lines = [f"{'check':<{w}}  result  figure", f"{'-' * w}  ------  ------"]
    lines += [f"{c:<{w}}  {r:<6}  {f}" for c, r, f in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="checks, in run order: " + ", ".join(CHECKS),
    )
    parser.add_argument("--quick", action="store_true", help="smaller timing and memory models")
    parser.add_argument("--only", choices=list(CHECKS), help="run this check alone")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(
            f"gpu_check: CUDA is not available (torch {torch.__version__}, CUDA build: "
            f"{torch.version.cuda or 'no'}): nothing was checked",
            file=sys.stderr,
        )
        return 1
    ctx = Ctx(
        quick=args.quick,
        width=1024 if args.quick else 4096,
        layers=8 if args.quick else 21,  # 21 x 4096^2: ~352M params
        batch=2048 if args.quick else 16384,
        rounds=3,
        steps=4 if args.quick else 5,
    )
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    ctx.cycles_per_ms = _calibrate()
    print(
        f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
        f"_sleep: {ctx.cycles_per_ms / 1e3:.0f}k cycles/ms",
        flush=True,
    )
    t0 = time.perf_counter()
    rows: list[Row] = []
    for name, check in CHECKS.items():
        if args.only and name != args.only:
            continue
        started = time.perf_counter()
        try:
            got = check(ctx)
        except Exception as e:
            traceback.print_exc()
            got = [(name, FAIL, f"raised {type(e).__name__}: {str(e).splitlines()[0][:90]}")]
        finally:
            torch.cuda.set_sync_debug_mode("default")
        rows += got
        bad = sum(r[1] == FAIL for r in got)
        print(
            f"  {name}: {len(got)} rows, {bad} failed, {time.perf_counter() - started:.1f} s",
            flush=True,
        )
    print(_table(rows))
    failed = [r[0] for r in rows if r[1] == FAIL]
    print(
        f"gpu_check: {'FAILED: ' + ', '.join(failed) if failed else 'OK'} "
        f"({len(rows)} rows in {time.perf_counter() - t0:.0f} s)"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
