"""Check the accelerator paths on one CUDA GPU (under 3 minutes): ``python launch/gpu_check.py``.

Prints:
  1. async == sync, bitwise, on the side-stream path (average on the GPU) and on the
     pinned CPU offload path (``device="cpu"``), and the offload against a plain CPU
     average of the same weights;
  2. that the steady-state training loop with an async average makes no host
     synchronisation (``torch.cuda.set_sync_debug_mode("error")``);
  3. the step time of a ~350M-parameter fp32 model with no average, with a synchronous
     and with an asynchronous average, per path (side by side, round-robin, medians), and
     the memory each averager holds on the GPU (and pinned on the host, for the offload).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from torch import nn

import distavg


def _small() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(64, 1024),
        nn.BatchNorm1d(1024),
        nn.ReLU(),
        nn.Linear(1024, 512),
        nn.Linear(512, 5),
    )


def _train_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor) -> None:
    opt.zero_grad(set_to_none=True)
    model(x).pow(2).mean().backward()
    opt.step()


def check_bitwise(steps: int = 25) -> bool:
    ok = True
    for path, device in (("side stream", None), ("pinned offload", "cpu")):
        model = _small().cuda()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        kw = dict(momentum=0.05, interval=2, device=device, optimizer=opt)
        sync = distavg.ExponentialMovingAverage(model, **kw)
        asyn = distavg.ExponentialMovingAverage(model, async_update=True, **kw)
        cpu_model = _small()
        cpu = distavg.ExponentialMovingAverage(cpu_model, momentum=0.05, interval=2)
        for _ in range(steps):
            _train_step(model, opt, torch.randn(256, 64, device="cuda"))
            sync.update_parameters(model)
            asyn.update_parameters(model)
            cpu_model.load_state_dict(model.state_dict())
            cpu.update_parameters(cpu_model)
        sd_s, sd_a, sd_c = sync.full_state_dict(), asyn.full_state_dict(), cpu.full_state_dict()
        same = all(torch.equal(sd_s[k], sd_a[k]) for k in sd_s)
        line = f"  {path:<15} async == sync bitwise over {steps} steps: {same}"
        if device == "cpu":
            same_cpu = all(torch.equal(sd_a[k], sd_c[k]) for k in sd_c)
            line += f"; == CPU average of the same weights: {same_cpu}"
            same &= same_cpu
        print(line + f"  [{type(asyn.engine).__name__}]")
        ok &= same
        for a in (sync, asyn):
            a.close()
    return ok


def check_no_host_sync(steps: int = 10) -> bool:
    ok = True
    for path, device in (("no average", "none"), ("side stream", None), ("pinned offload", "cpu")):
        model = _small().cuda()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
        avg = None
        if device != "none":
            avg = distavg.ExponentialMovingAverage(
                model, device=device, async_update=True, optimizer=opt
            )
        x = torch.randn(256, 64, device="cuda")

        def step(model=model, opt=opt, avg=avg, x=x) -> None:
            _train_step(model, opt, x)
            if avg is not None:
                avg.update_parameters(model)

        for _ in range(3):  # warm-up: allocations, pinned staging, the first (copy) update
            step()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(steps):
                step()
            result = "none"
        except RuntimeError as e:
            result = f"FOUND: {e}".splitlines()[0]
            ok = False
        finally:
            torch.cuda.set_sync_debug_mode("default")
        if avg is not None:
            avg.close()
        print(f"  {path:<15} host syncs in {steps} steady-state steps: {result}")
    return ok


def _big(width: int, layers: int) -> nn.Module:
    torch.manual_seed(0)
    mods: list[nn.Module] = [nn.BatchNorm1d(width)]  # buffers: captured at enqueue
    for _ in range(layers):
        mods += [nn.Linear(width, width), nn.GELU()]
    return nn.Sequential(*mods).cuda()


def time_paths(width: int, layers: int, batch: int, rounds: int, steps: int) -> None:
    model = _big(width, layers)
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, foreach=True)
    x = torch.randn(batch, width, device="cuda")
    _train_step(model, opt, x)  # gradients and optimizer state exist before the baselines
    torch.cuda.synchronize()
    modes = {"none": None}
    memory = {}
    for name, device, async_update in (
        ("sync (GPU average)", None, False),
        ("async side stream", None, True),
        ("sync offload", "cpu", False),
        ("async offload", "cpu", True),
    ):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        avg = distavg.ExponentialMovingAverage(
            model, momentum=2e-4, device=device, async_update=async_update, optimizer=opt
        )
        _train_step(model, opt, x)
        avg.update_parameters(model)
        avg.wait()
        torch.cuda.synchronize()
        held = avg.engine.held_bytes()
        memory[name] = (
            torch.cuda.memory_allocated() - before,
            held["pinned_host"] + (avg.shards.nbytes if device == "cpu" else 0),
        )
        modes[name] = avg

    def block(avg) -> float:
        _train_step(model, opt, x)
        if avg is not None:
            avg.update_parameters(model)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            _train_step(model, opt, x)
            if avg is not None:
                avg.update_parameters(model)
        torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
        if avg is not None:
            avg.wait()
        return elapsed / steps

    times: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(rounds):
        for name, avg in modes.items():
            times[name].append(block(avg))
    print(
        f"  model: {layers} x Linear({width}, {width}) + BatchNorm, {params / 1e6:.0f}M fp32 "
        f"params, AdamW, batch {batch}, TF32 matmuls; medians of {rounds} round-robin rounds "
        f"of {steps} steps (steady state: one update per timed step)"
    )
    base = statistics.median(times["none"])
    print(f"  {'path':<22}{'step ms':>9}{'vs none':>9}{'GPU MiB held':>14}{'pinned MiB':>12}")
    for name, t in times.items():
        med = statistics.median(t)
        gpu, pinned = memory.get(name, (0, 0))
        print(
            f"  {name:<22}{med * 1e3:>9.1f}{med / base:>9.3f}"
            f"{gpu / 2**20:>14.0f}{pinned / 2**20:>12.0f}"
        )
    for avg in modes.values():
        if avg is not None:
            avg.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=21)  # 21 x 4096^2: ~352M params
    parser.add_argument("--batch", type=int, default=8192)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device; nothing to check")
        return 0
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    t0 = time.perf_counter()
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("1. async == sync, bitwise")
    ok = check_bitwise()
    print("2. no host synchronisation per step")
    ok &= check_no_host_sync()
    print("3. step time and memory held per path")
    time_paths(args.width, args.layers, args.batch, args.rounds, args.steps)
    print(f"gpu_check: {'OK' if ok else 'FAILED'} in {time.perf_counter() - t0:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
