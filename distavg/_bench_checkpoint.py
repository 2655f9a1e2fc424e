"""Benchmark section: checkpoint bytes written per rank and save time, sharded vs gathered.

For W = 1 and 2 spawned gloo ranks, one average of the same fp32 model is saved three
ways, side by side (round-robin: one save of each per round, medians over the rounds):
  * ``dcp.save({"ema": ema})`` with the sharded placement: each rank writes its chunks;
  * ``dcp.save`` with the owner placement: the owner writes everything;
  * ``full_state_dict()`` gathered to rank 0 and written there with ``torch.save`` (what
    a library without sharded checkpoints does).
Target: with the sharded placement every rank writes 1/W of the averaged model.
"""

from __future__ import annotations

import shutil
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from .bench import format_table, run_on_ranks

METHODS = ("sharded, dcp.save", "owner, dcp.save", "gathered, torch.save on rank 0")


def _model(width: int, layers: int) -> nn.Module:
    torch.manual_seed(0)
    # uneven widths so that chunks at W=2 are uneven too
    return nn.Sequential(*(nn.Linear(width, width + 3 * (i % 2)) for i in range(layers)))


def _written(directory: Path, world: int) -> list[int]:
    """Bytes each rank wrote into ``directory`` (DCP's .metadata counts for rank 0)."""
    per_rank = [sum(p.stat().st_size for p in directory.glob(f"__{r}_*")) for r in range(world)]
    per_rank[0] += sum(p.stat().st_size for p in directory.glob("*.metadata"))
    per_rank[0] += sum(p.stat().st_size for p in directory.glob("*.pt"))
    return per_rank


def _save_body(root: str, rounds: int, width: int, layers: int) -> dict:
    """Per rank: save the average each way, ``rounds`` times; what rank 0 reports."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    from .rules import ExponentialMovingAverage

    rank, world = dist.get_rank(), dist.get_world_size()
    model = _model(width, layers)
    averages = {p: ExponentialMovingAverage(model, placement=p) for p in ("sharded", "owner")}
    for avg in averages.values():
        avg.update_parameters(model)

    def gathered(path: Path) -> None:
        state = averages["sharded"].full_state_dict()
        if state:
            torch.save(state, path / "average.pt")

    saves: dict[str, Callable[[Path], object]] = {
        METHODS[0]: lambda p: dcp.save({"ema": averages["sharded"]}, checkpoint_id=p),
        METHODS[1]: lambda p: dcp.save({"ema": averages["owner"]}, checkpoint_id=p),
        METHODS[2]: gathered,
    }
    times: dict[str, list[float]] = {m: [] for m in METHODS}
    written: dict[str, list[int]] = {}
    for r in range(rounds + 1):  # round 0 warms up and is not timed
        for method, save in saves.items():
            path = Path(root, f"{METHODS.index(method)}-{r}")
            path.mkdir(parents=True, exist_ok=True)
            dist.barrier()
            t0 = time.perf_counter()
            save(path)
            dt = time.perf_counter() - t0
            dist.barrier()
            if r:
                times[method].append(dt)
            if rank == 0:
                written[method] = _written(path, world)
                shutil.rmtree(path)
    result = {
        "median_s": {m: statistics.median(t) for m, t in times.items()},
        "held": {p: a.shards.nbytes for p, a in averages.items()},
    }
    gathered_results: list = [None] * world
    dist.all_gather_object(gathered_results, result)
    model_bytes = sum(t.nbytes for t in model.state_dict().values())
    return {"ranks": gathered_results, "written": written, "model": model_bytes}


def checkpoint_table(rounds: int = 5, width: int = 1024, layers: int = 12) -> str:
    """The checkpoint section: a Markdown table and notes.

    Args:
        rounds: timed rounds (each saves once with every method).
        width: width of the square-ish ``Linear`` layers of the model.
        layers: number of layers (the default model has 12.6M parameters, 48 MiB fp32).
    """
    rows, model_bytes = [], 0
    for world in (1, 2):
        res = run_on_ranks(_save_body, world, rounds, width, layers)
        model_bytes = res["model"]
        for method in METHODS:
            per_rank = res["written"][method]
            secs = max(r["median_s"][method] for r in res["ranks"])
            # extra memory while saving: DCP's snapshot of this rank's part of the average,
            # or the whole gathered model on rank 0
            if method == METHODS[2]:
                held = [model_bytes] + [0] * (world - 1)
            else:
                held = [
                    r["held"]["owner" if method == METHODS[1] else "sharded"] for r in res["ranks"]
                ]
            rows.append(
                [
                    world,
                    method,
                    " / ".join(f"{b / 2**20:.1f}" for b in per_rank),
                    f"{max(per_rank) / model_bytes:.3f}",
                    f"{secs * 1e3:.1f}",
                    " / ".join(f"{b / 2**20:.1f}" for b in held),
                ]
            )
    snapshot = "the rank's own part of the average (1/W when sharded)"
    return "\n".join(
        [
            f"### Checkpoint of the average: bytes written per rank and save time "
            f"({model_bytes / 2**20:.1f} MiB fp32 model, gloo ranks on this machine)",
            "",
            format_table(
                [
                    "W",
                    "method",
                    "MiB written per rank (r0 / r1)",
                    "largest rank / model",
                    "save ms (median, slowest rank)",
                    "extra MiB held per rank",
                ],
                rows,
            ),
            "",
            f"Target: sharded, every rank writes 1/W of the model (0.5 at W=2). Medians of "
            f"{rounds} rounds, the three methods saved in turn each round; files go to the "
            f"page cache of this machine's disk. rank 0's bytes include DCP's .metadata. "
            f"Extra MiB held: dcp.save and dcp.load hold one transient copy of {snapshot} "
            f"(the snapshot that lets a load be checked before it touches the average); "
            f"the gathered save holds the whole model on rank 0 (plus the gather buffers).",
        ]
    )


if __name__ == "__main__":
    print(checkpoint_table())
