"""How much of the update an asynchronous average hides behind the training step.

A training step (zero_grad, forward, backward, AdamW step) of the same MLP is timed with
no average, with a synchronous EMA and with an asynchronous EMA (``async_update=True``, the
CPU worker thread), side by side: the three are timed in round-robin order, a block of
steps each per round, and the table shows medians over the rounds. A block is timed in the
steady state: each timed step overlaps (async) or contains (sync) exactly one update.

Two settings: one process with ``torch.set_num_threads(1)`` (the worker has a core of its
own on a 2-core machine), and 2 DDP ranks over gloo with one thread each (on 2 cores, no
core is free for the workers). A worker thread overlaps only when a core is free for it.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .. import ExponentialMovingAverage
from ._common import MOMENTUM, Options, format_table, verdict
from ._spawn import run_on_ranks

MODES = ("none", "sync", "async")


@dataclass(frozen=True)
class Config:
    width: int = 2048
    batch: int = 64
    rounds: int = 15
    steps: int = 4


QUICK = Config(width=512, batch=32, rounds=3, steps=3)


def table(opts: Options) -> str:
    cfg = QUICK if opts.quick else Config()
    params = sum(p.numel() for p in _model(cfg.width).parameters())
    load_before = os.getloadavg()[0]
    measured = [
        ("1 process", _one_process(cfg)),
        ("2 ranks (DDP, gloo)", run_on_ranks(_ddp_measure, 2, cfg)),
    ]
    rows, hidden_one = [], float("nan")
    for name, t in measured:
        none, sync, asyn = (statistics.median(t[m]) * 1e3 for m in MODES)
        # Differences paired within a round cancel the drift of other work on the machine.
        update = statistics.median(s - n for s, n in zip(t["sync"], t["none"], strict=True))
        saved = statistics.median(s - a for s, a in zip(t["sync"], t["async"], strict=True))
        update, saved = update * 1e3, saved * 1e3
        hidden = saved / update if update > 0 else float("nan")
        if name == "1 process":
            hidden_one = hidden
        rows.append(
            [
                name,
                f"{none:.2f}",
                f"{sync:.2f}",
                f"{asyn:.2f}",
                f"{update:.2f}",
                f"{hidden:.0%}",
                f"{asyn / none:.3f}",
            ]
        )
    return "\n".join(
        [
            f"### Overlap: train step with no average, a synchronous and an asynchronous EMA "
            f"({params / 1e6:.1f}M fp32 parameters, {os.cpu_count()} CPUs, "
            f"torch.set_num_threads(1) in every process)",
            "",
            format_table(
                [
                    "setting",
                    "none ms",
                    "sync ms",
                    "async ms",
                    "update ms (sync - none, paired)",
                    "hidden by async",
                    "async / none",
                ],
                rows,
            ),
            "",
            f"Target (one process, a core free for the worker thread): async hides >= 90% of "
            f"the synchronous update time: {verdict(hidden_one >= 0.9)} ({hidden_one:.0%}). "
            f"With 2 ranks on {os.cpu_count()} cores no core is free for the workers: "
            f"whatever the update costs, it costs there too. A step is zero_grad, forward, "
            f"backward and AdamW on an MLP (batch {cfg.batch}), then update_parameters. Step "
            f"times are medians; update = median over rounds of (sync - none), hidden = median "
            f"of (sync - async) / update, differences taken within a round. Medians of "
            f"{cfg.rounds} rounds, the three timed in turn each round, {cfg.steps} steps per "
            f"block in the steady state (each timed step contains (sync) or overlaps (async) "
            f"exactly one update). Load average of the machine (other work included): "
            f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after: other work there "
            f"takes the core the worker needs.",
        ]
    )


def _model(width: int) -> nn.Module:
    torch.manual_seed(0)
    half = width // 2
    return nn.Sequential(
        nn.Linear(half, width),
        nn.GELU(),
        nn.Linear(width, width),
        nn.GELU(),
        nn.Linear(width, half),
    )


def _one_process(cfg: Config) -> dict[str, list[float]]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _measure(cfg)
    finally:
        torch.set_num_threads(threads)


def _ddp_measure(cfg: Config) -> dict[str, list[float]]:
    return _measure(cfg, wrap=nn.parallel.DistributedDataParallel)


def _measure(
    cfg: Config, wrap: Callable[[nn.Module], nn.Module] = lambda m: m
) -> dict[str, list[float]]:
    """Seconds per step for each mode, per round (timed round-robin)."""
    setups = {}
    for mode in MODES:
        model = wrap(_model(cfg.width))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
        avg = None
        if mode != "none":
            avg = ExponentialMovingAverage(
                model, momentum=MOMENTUM, optimizer=opt, async_update=mode == "async"
            )
        setups[mode] = (model, opt, avg)
    x = torch.randn(cfg.batch, cfg.width // 2)

    def step(model: nn.Module, opt: torch.optim.Optimizer, avg) -> None:
        opt.zero_grad(set_to_none=True)
        model(x).pow(2).mean().backward()
        opt.step()
        if avg is not None:
            avg.update_parameters(model)

    def block(mode: str, steps: int) -> float:
        # Steady state: the timer starts with one update in flight and stops with one in
        # flight, so each timed step overlaps exactly one update (sync: contains one).
        model, opt, avg = setups[mode]
        step(model, opt, avg)
        t0 = time.perf_counter()
        for _ in range(steps):
            step(model, opt, avg)
        elapsed = time.perf_counter() - t0
        if avg is not None:
            avg.wait()  # untimed: the next block starts with no other update running
        return elapsed / steps

    for mode in MODES:  # warm-up: allocations, first update (a copy)
        block(mode, 2)
    times: dict[str, list[float]] = {m: [] for m in MODES}
    for _ in range(cfg.rounds):
        for mode in MODES:
            times[mode].append(block(mode, cfg.steps))
    for _, _, avg in setups.values():
        if avg is not None:
            avg.close()
    return times
