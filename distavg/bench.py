"""The update benchmark: ``python -m distavg.bench [--sections ...] [--quick]``.

Every table is measured side by side in one run: the methods of a table are timed in
round-robin order (one call of each per round, several rounds), so that noise from other
work on the machine falls on all of them alike; a table shows medians over the rounds.

Sections:
  update      a GPT-2-small-like fp32 model (124M parameters, tied embedding): distavg's
              EMA against the memory-bandwidth floor (12 bytes/param at the ``lerp_``
              bandwidth measured here on one tensor of the same size), torch's
              ``AveragedModel`` with ``get_ema_multi_avg_fn`` (foreach) and a per-tensor
              ``lerp_`` loop.
  small       a model of >= 2,000 small tensors, where per-op overhead dominates.
  bf16        bf16 parameters with an fp32 average (``dtype=torch.float32``).
  ranks       per-rank averaged bytes and update time for 1 and 2 gloo ranks: sharded,
              owner, and a replicated full copy on every rank.
  overlap     from ``distavg._bench_overlap`` when present.
  checkpoint  from ``distavg._bench_checkpoint`` when present.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import inspect
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

SECTIONS = ("update", "small", "bf16", "ranks", "overlap", "checkpoint")
MOMENTUM = 2e-4  # mmengine's default EMA momentum: the weight of the new value


# -- models -------------------------------------------------------------------------


@dataclass(frozen=True)
class GPTShape:
    vocab: int
    ctx: int
    width: int
    layers: int


GPT2_SMALL = GPTShape(vocab=50257, ctx=1024, width=768, layers=12)
GPT_QUICK = GPTShape(vocab=512, ctx=64, width=64, layers=2)


class _Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(d)
        self.attn = nn.Linear(d, 3 * d)
        self.attn_proj = nn.Linear(d, d)
        self.ln_2 = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 4 * d)
        self.fc_proj = nn.Linear(4 * d, d)


class GPTLike(nn.Module):
    """GPT-2's parameter shapes (no forward is needed to time an update)."""

    def __init__(self, shape: GPTShape) -> None:
        super().__init__()
        d = shape.width
        self.wte = nn.Embedding(shape.vocab, d)
        self.wpe = nn.Embedding(shape.ctx, d)
        self.h = nn.ModuleList(_Block(d) for _ in range(shape.layers))
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, shape.vocab, bias=False)
        self.lm_head.weight = self.wte.weight  # tied, as in GPT-2


class ManySmall(nn.Module):
    """``blocks`` x (LayerNorm(64), Linear(64, 64), Linear(64, 16)): 6 tensors a block."""

    def __init__(self, blocks: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(64), nn.Linear(64, 64), nn.Linear(64, 16))
            for _ in range(blocks)
        )


def _perturbed(model: nn.Module, seed: int = 1) -> nn.Module:
    """Move the parameters off their initial values so the average and source differ."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype), alpha=1e-2)
    return model


def _numel(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# -- timing and printing ------------------------------------------------------------


def round_robin(
    fns: dict[str, Callable[[], object]],
    repeats: int,
    before_each: Callable[[], object] | None = None,
) -> dict[str, list[float]]:
    """Seconds per call of each function: one warm-up call each, then ``repeats`` rounds.

    ``before_each`` runs, untimed, before every timed call (e.g. to flush the caches).
    """
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if before_each is not None:
                before_each()
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def _summary(times: dict[str, list[float]]) -> tuple[dict[str, float], dict[str, float]]:
    """Median and minimum seconds per method."""
    return (
        {k: statistics.median(v) for k, v in times.items()},
        {k: min(v) for k, v in times.items()},
    )


def _load() -> str:
    return f"load average (1 min) at the end: {os.getloadavg()[0]:.2f}."


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f}"


def _mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:.1f}"


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table (readable as plain text too)."""
    cells = [[str(c) for c in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in cells
    ]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def _verdict(ok: bool) -> str:
    return "MET" if ok else "NOT MET"


def _free() -> None:
    gc.collect()


# -- sections -----------------------------------------------------------------------


def _per_tensor_loop(model: nn.Module, dtype: torch.dtype | None = None):
    """The seed's way: one ``lerp_`` per tensor (casting first when dtypes differ)."""
    srcs = [p.detach() for p in model.parameters()]
    avgs = [s.to(dtype or s.dtype, copy=True) for s in srcs]
    if dtype is None or dtype == srcs[0].dtype:
        return lambda: [a.lerp_(s, MOMENTUM) for a, s in zip(avgs, srcs, strict=True)]
    return lambda: [a.lerp_(s.to(dtype), MOMENTUM) for a, s in zip(avgs, srcs, strict=True)]


def _torch_foreach(model: nn.Module):
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    avg = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(1 - MOMENTUM))
    avg.update_parameters(model)  # the first call copies
    return lambda: avg.update_parameters(model)


def _distavg(model: nn.Module, **kwargs):
    from .rules import ExponentialMovingAverage

    ema = ExponentialMovingAverage(model, momentum=MOMENTUM, **kwargs)
    ema.update_parameters(model)  # the first call copies

    def step() -> None:
        ema.update_parameters(model)
        ema.wait()

    return step


def section_update(args: argparse.Namespace) -> str:
    shape = GPT_QUICK if args.quick else GPT2_SMALL
    model = _perturbed(GPTLike(shape))
    n = _numel(model)
    big, big_src = torch.randn(n), torch.randn(n)
    fns = {
        "bandwidth floor: one lerp_ of the same numel": lambda: big.lerp_(big_src, MOMENTUM),
        "distavg ExponentialMovingAverage": _distavg(model),
        "torch AveragedModel + get_ema_multi_avg_fn (foreach)": _torch_foreach(model),
        "per-tensor lerp_ loop": _per_tensor_loop(model),
    }
    med, low = _summary(round_robin(fns, args.repeats))
    floor = med["bandwidth floor: one lerp_ of the same numel"]
    ours = med["distavg ExponentialMovingAverage"]
    rows = [
        [name, _ms(t), _ms(low[name]), f"{floor / t:.2f}", f"{t / ours:.2f}"]
        for name, t in med.items()
    ]
    bw = 12 * n / floor / 1e9
    ratio = floor / ours
    out = [
        f"### Update of a GPT-2-small-like fp32 model ({n / 1e6:.1f}M parameters, "
        f"{len(list(model.parameters()))} tensors)",
        "",
        format_table(["method", "median ms", "min ms", "floor / time", "time / distavg"], rows),
        "",
        f"lerp_ bandwidth {bw:.1f} GB/s at 12 bytes/param (medians). "
        f"Target floor / distavg >= 0.90: {ratio:.2f}, {_verdict(ratio >= 0.9)}. {_load()}",
    ]
    return "\n".join(out)


def section_small(args: argparse.Namespace) -> str:
    model = _perturbed(ManySmall(60 if args.quick else 400))
    tensors = len(list(model.parameters()))
    fns = {
        "distavg ExponentialMovingAverage": _distavg(model),
        "torch AveragedModel + get_ema_multi_avg_fn (foreach)": _torch_foreach(model),
        "per-tensor lerp_ loop": _per_tensor_loop(model),
    }
    med, low = _summary(round_robin(fns, args.repeats))
    # The same two again with the caches flushed before each call, as after a training step.
    flush = torch.empty((1 << 20) if args.quick else (128 << 20))
    pair = {k: fns[k] for k in ("distavg ExponentialMovingAverage", "per-tensor lerp_ loop")}
    pair_med, _ = _summary(round_robin(pair, args.repeats))
    cold_med, _ = _summary(round_robin(pair, args.repeats, before_each=lambda: flush.fill_(1.0)))
    ours = med["distavg ExponentialMovingAverage"]
    loop = med["per-tensor lerp_ loop"]
    rows = [
        [
            name,
            _ms(t),
            _ms(low[name]),
            f"{loop / t:.2f}",
            _ms(pair_med[name]) if name in pair else "-",
            _ms(cold_med[name]) if name in pair else "-",
        ]
        for name, t in med.items()
    ]
    speedup = loop / ours
    pair_speedup = pair_med["per-tensor lerp_ loop"] / pair_med["distavg ExponentialMovingAverage"]
    cold_speedup = cold_med["per-tensor lerp_ loop"] / cold_med["distavg ExponentialMovingAverage"]
    return "\n".join(
        [
            f"### Many small tensors ({tensors} tensors, {_numel(model) / 1e6:.2f}M parameters)",
            "",
            format_table(
                [
                    "method",
                    "median ms",
                    "min ms",
                    "speed-up vs loop",
                    "median ms, the two alone",
                    "median ms, caches flushed",
                ],
                rows,
            ),
            "",
            f"Target distavg >= 2x faster than the per-tensor loop: {speedup:.2f}x, "
            f"{_verdict(speedup >= 2)}. Timed alone, without the foreach baseline between "
            f"them in the rounds: {pair_speedup:.2f}x; with the caches flushed before each "
            f"call, as after a training step: {cold_speedup:.2f}x. {_load()}",
        ]
    )


def section_bf16(args: argparse.Namespace) -> str:
    from . import _kernels

    shape = GPT_QUICK if args.quick else GPT2_SMALL
    model32 = _perturbed(GPTLike(shape))
    model16 = _perturbed(GPTLike(shape)).to(torch.bfloat16)
    n = _numel(model16)
    fns = {
        "fp32 params -> fp32 average (distavg)": _distavg(model32),
        "bf16 -> fp32 distavg, eager (default)": _distavg(model16, dtype=torch.float32),
    }
    notes = []
    if args.compile:
        with _kernels.fused_upcast(True):
            t0 = time.perf_counter()
            step = _distavg(model16, dtype=torch.float32)
            step()
            compile_s = time.perf_counter() - t0
            state = "compiled" if _kernels.compiled_ready() else f"fell back ({_kernels.status()})"

        def fused_step(step: Callable[[], None] = step) -> None:
            with _kernels.fused_upcast(True):  # as DISTAVG_FUSED_UPCAST=1 does
                step()

        fns["bf16 -> fp32 distavg, fused (DISTAVG_FUSED_UPCAST=1)"] = fused_step
        notes.append(
            f"Fused path: {state}; first two updates incl. compilation took {compile_s:.1f} s "
            f"(once per process; inductor's on-disk cache shortens later runs)."
        )
    else:
        notes.append("Fused path not measured (--no-compile or --quick).")
    fns["bf16 -> fp32 cast then foreach lerp_"] = _cast_then_foreach(model16)
    fns["bf16 -> fp32 per-tensor cast + lerp_ loop"] = _per_tensor_loop(model16, torch.float32)
    med, low = _summary(round_robin(fns, args.repeats))
    base = med["fp32 params -> fp32 average (distavg)"]
    rows = [[name, _ms(t), _ms(low[name]), f"{t / base:.2f}"] for name, t in med.items()]
    eager = med["bf16 -> fp32 distavg, eager (default)"] / base
    verdict = f"eager {eager:.2f}x, {_verdict(eager < 1)}"
    fused_key = "bf16 -> fp32 distavg, fused (DISTAVG_FUSED_UPCAST=1)"
    if fused_key in med:
        fused = med[fused_key] / base
        verdict += f"; fused {fused:.2f}x, {_verdict(fused < 1)}"
    return "\n".join(
        [
            f"### bf16 parameters, fp32 average ({n / 1e6:.1f}M parameters)",
            "",
            format_table(["method", "median ms", "min ms", "time / fp32 update"], rows),
            "",
            *notes,
            f"Target bf16 -> fp32 faster than fp32 -> fp32 (ratio < 1): {verdict}. {_load()}",
        ]
    )


def _cast_then_foreach(model: nn.Module):
    srcs = [p.detach() for p in model.parameters()]
    avgs = [s.float() for s in srcs]
    return lambda: torch._foreach_lerp_(avgs, [s.float() for s in srcs], MOMENTUM)


# -- ranks: spawned gloo workers ----------------------------------------------------


def run_on_ranks(fn: Callable[..., object], world: int, *args: object, threads: int = 1) -> object:
    """``fn(workdir, *args)`` on ``world`` spawned gloo ranks; rank 0's (JSON-able) result.

    The ranks meet through a FileStore in a fresh temporary ``workdir`` that they share
    (never a port), each with ``threads`` torch threads.
    """
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as workdir:
        mp.spawn(_on_rank, nprocs=world, join=True, args=(world, workdir, threads, fn, args))
        return json.loads(Path(workdir, "result.json").read_text())


def _on_rank(
    rank: int, world: int, workdir: str, threads: int, fn: Callable[..., object], args: tuple
) -> None:
    import torch.distributed as dist

    torch.set_num_threads(threads)
    store = dist.FileStore(os.path.join(workdir, "store"), world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    try:
        result = fn(workdir, *args)
        if rank == 0:
            Path(workdir, "result.json").write_text(json.dumps(result))
        dist.barrier()  # before destroy_process_group, or gloo may abort at exit
    finally:
        dist.destroy_process_group()


def _rank_body(workdir: str, quick: bool, repeats: int) -> list:
    """Per rank: averaged bytes and update time, sharded, owner and replicated."""
    import torch.distributed as dist

    from .rules import ExponentialMovingAverage

    torch.manual_seed(0)
    model = _perturbed(GPTLike(GPT_QUICK if quick else GPT2_SMALL))
    results = {}
    for placement in ("sharded", "owner"):
        ema = ExponentialMovingAverage(model, momentum=MOMENTUM, placement=placement)
        ema.update_parameters(model)
        results[placement] = (
            ema.shards.nbytes,
            _barrier_timed(lambda ema=ema: (ema.update_parameters(model), ema.wait()), repeats),
        )
        del ema
        _free()
    srcs = [p.detach() for p in model.parameters()]
    full = [s.clone() for s in srcs]  # what a replicated average keeps on every rank
    results["replicated"] = (
        sum(t.numel() * t.element_size() for t in full),
        _barrier_timed(lambda: torch._foreach_lerp_(full, srcs, MOMENTUM), repeats),
    )
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, results)
    return gathered


def _barrier_timed(fn: Callable[[], object], repeats: int) -> float:
    """Median seconds of this rank's own work (ranks start each call together)."""
    import torch.distributed as dist

    fn()
    times = []
    for _ in range(repeats):
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def section_ranks(args: argparse.Namespace) -> str:
    rows = []
    for world in (1, 2):
        threads = max(1, args.threads // world)
        per_rank = run_on_ranks(_rank_body, world, args.quick, args.repeats, threads=threads)
        for placement in ("sharded", "owner", "replicated"):
            nbytes = [r[placement][0] for r in per_rank]
            secs = [r[placement][1] for r in per_rank]
            rows.append(
                [
                    world,
                    threads,
                    placement,
                    " / ".join(_mib(b) for b in nbytes),
                    " / ".join(_ms(s) for s in secs),
                    _ms(max(secs)),
                ]
            )
    model_bytes = _numel(GPTLike(GPT_QUICK)) * 4 if args.quick else None
    size = "quick model" if model_bytes else "GPT-2-small-like fp32 model"
    return "\n".join(
        [
            f"### Per-rank averaged bytes and update time ({size}, gloo ranks on this machine)",
            "",
            format_table(
                [
                    "W",
                    "threads/rank",
                    "placement",
                    "MiB per rank (r0 / r1)",
                    "update ms per rank",
                    "slowest rank ms",
                ],
                rows,
            ),
            "",
            "replicated: a full fp32 copy on every rank updated with one _foreach_lerp_ "
            f"(what other libraries keep). The ranks share this machine's cores. {_load()}",
        ]
    )


def _external(
    module: str, fn: str, quick_kwargs: dict[str, object]
) -> Callable[[argparse.Namespace], str]:
    """A section that lives in its own module; ``quick_kwargs`` shrink it for ``--quick``."""

    def run(args: argparse.Namespace) -> str:
        try:
            table_fn = getattr(importlib.import_module(f"distavg.{module}"), fn)
        except (ImportError, AttributeError):
            return f"### {fn}\n\nSection unavailable: distavg.{module}.{fn} is not installed."
        accepted = inspect.signature(table_fn).parameters
        kwargs = {k: v for k, v in quick_kwargs.items() if k in accepted} if args.quick else {}
        return str(table_fn(**kwargs))

    return run


RUNNERS: dict[str, Callable[[argparse.Namespace], str]] = {
    "update": section_update,
    "small": section_small,
    "bf16": section_bf16,
    "ranks": section_ranks,
    "overlap": _external("_bench_overlap", "overlap_table", {"quick": True}),
    "checkpoint": _external(
        "_bench_checkpoint",
        "checkpoint_table",
        {"quick": True, "rounds": 1, "width": 64, "layers": 2},
    ),
}


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m distavg.bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--sections",
        default=",".join(SECTIONS),
        help=f"comma-separated sections to run, from {','.join(SECTIONS)} (default: all)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="tiny models and few repeats: a smoke run, not a measurement",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed rounds per table (default 21, 3 with --quick)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=torch.get_num_threads(),
        help="torch intra-op threads (default: torch's own choice)",
    )
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also time the torch.compile'd fused bf16 path (default: on, off with --quick)",
    )
    args = p.parse_args(argv)
    chosen = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in SECTIONS]
    if unknown:
        p.error(f"--sections got {unknown}; choose from {','.join(SECTIONS)}")
    args.sections = chosen
    if args.repeats is None:
        args.repeats = 3 if args.quick else 21
    if args.repeats < 1:
        p.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.compile is None:
        args.compile = not args.quick
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the chosen sections and print their tables; returns the exit status."""
    args = _parse(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(
        f"distavg benchmark: torch {torch.__version__}, {torch.get_num_threads()} torch "
        f"threads, {os.cpu_count()} CPUs, {args.repeats} rounds per table (medians), "
        f"load average (1 min) {os.getloadavg()[0]:.2f}"
        f"{', --quick (smoke run)' if args.quick else ''}",
        flush=True,
    )
    for name in args.sections:
        print(f"\n{RUNNERS[name](args)}", flush=True)
        _free()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
