"""Checkpoint of the average: bytes written per rank and save time, sharded against gathered.

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
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn

from .. import ExponentialMovingAverage
from .._checksum import ms_per_gib
from ._common import Options, format_table, mib
from ._spawn import run_on_ranks

SHARDED = "sharded, dcp.save"
OWNER = "owner, dcp.save"
GATHERED = "gathered, torch.save on rank 0"
METHODS = (SHARDED, OWNER, GATHERED)


@dataclass(frozen=True)
class Config:
    """What the table saves, and how often.

    Attributes:
        rounds: timed rounds (each saves once with every method).
        width: width of the square-ish ``Linear`` layers of the model.
        layers: number of layers (the default model has 12.6M parameters, 48 MiB fp32).
    """

    rounds: int = 5
    width: int = 1024
    layers: int = 12


QUICK = Config(rounds=1, width=64, layers=2)


@dataclass(frozen=True)
class Saved:
    """One method's figures at one world size: a row of the table.

    A new column is a field here, measured in ``_save_body`` and read in ``_saved``, with
    its header in ``COLUMNS`` and its cell in ``_row``.
    """

    world: int
    method: str
    written: list[int]  # bytes each rank wrote
    seconds: float  # median save time of the slowest rank
    held: list[int]  # extra bytes each rank holds while saving


COLUMNS = (
    "W",
    "method",
    "MiB written per rank (r0 / r1)",
    "largest rank / model",
    "save ms (median, slowest rank)",
    "extra MiB held per rank",
)


def _row(s: Saved, model_bytes: int) -> list[str]:
    """The cells of ``COLUMNS`` for one method at one world size."""
    return [
        str(s.world),
        s.method,
        " / ".join(mib(b) for b in s.written),
        f"{max(s.written) / model_bytes:.3f}",
        f"{s.seconds * 1e3:.1f}",
        " / ".join(mib(b) for b in s.held),
    ]


def table(opts: Options) -> str:
    cfg = QUICK if opts.quick else Config()
    saved, model_bytes = [], 0
    for world in (1, 2):
        with tempfile.TemporaryDirectory() as root:
            res = run_on_ranks(_save_body, world, root, cfg)
        model_bytes = res["model"]
        saved += [_saved(world, method, res) for method in METHODS]
    snapshot = "the rank's own part of the average (1/W when sharded)"
    checked = (32 if opts.quick else 256) << 20
    checksum_ms = ms_per_gib(checked)
    sharded_one = next(s for s in saved if s.world == 1 and s.method == SHARDED)
    save_ms = sharded_one.seconds * 1e3 / (model_bytes / (1 << 30))
    return "\n".join(
        [
            f"### Checkpoint of the average: bytes written per rank and save time "
            f"({mib(model_bytes)} MiB fp32 model, gloo ranks on this machine)",
            "",
            format_table(COLUMNS, [_row(s, model_bytes) for s in saved]),
            "",
            f"Target: sharded, every rank writes 1/W of the model (0.5 at W=2). Medians of "
            f"{cfg.rounds} rounds, the three methods saved in turn each round; files go to the "
            f"page cache of this machine's disk. rank 0's bytes include DCP's .metadata. "
            f"Extra MiB held: dcp.save and dcp.load hold one transient copy of {snapshot} "
            f"(the snapshot that lets a load be checked before it touches the average); "
            f"the gathered save holds the whole model on rank 0 (plus the gather buffers).",
            "",
            f"Checksums (taken by every save, checked by every load and export): "
            f"{checksum_ms:.1f} ms per GiB of fp32 (median of 7 over {mib(checked)} MiB, "
            f"measured in this run), {checksum_ms / save_ms:.1%} of the sharded save's "
            f"{save_ms:.0f} ms per GiB at W=1 above (which already includes them).",
        ]
    )


def _saved(world: int, method: str, res: dict) -> Saved:
    """One method's row from what the ranks reported."""
    ranks = res["ranks"]
    # extra memory while saving: DCP's snapshot of this rank's part of the average, or the
    # whole gathered model on rank 0
    if method == GATHERED:
        held = [res["model"]] + [0] * (world - 1)
    else:
        held = [r["held"]["owner" if method == OWNER else "sharded"] for r in ranks]
    return Saved(
        world=world,
        method=method,
        written=res["written"][method],
        seconds=max(r["median_s"][method] for r in ranks),
        held=held,
    )


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


def _save_body(root: str, cfg: Config) -> dict:
    """On every rank: save the average each way, ``cfg.rounds`` times; what rank 0 reports."""
    rank, world = dist.get_rank(), dist.get_world_size()
    model = _model(cfg.width, cfg.layers)
    averages = {p: ExponentialMovingAverage(model, placement=p) for p in ("sharded", "owner")}
    for avg in averages.values():
        avg.update_parameters(model)

    def gathered(path: Path) -> None:
        state = averages["sharded"].full_state_dict()
        if state:
            torch.save(state, path / "average.pt")

    saves: dict[str, Callable[[Path], object]] = {
        SHARDED: lambda p: dcp.save({"ema": averages["sharded"]}, checkpoint_id=p),
        OWNER: lambda p: dcp.save({"ema": averages["owner"]}, checkpoint_id=p),
        GATHERED: gathered,
    }
    times: dict[str, list[float]] = {m: [] for m in METHODS}
    written: dict[str, list[int]] = {}
    for r in range(cfg.rounds + 1):  # round 0 warms up and is not timed
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
    per_rank: list = [None] * world
    dist.all_gather_object(per_rank, result)
    model_bytes = sum(t.nbytes for t in model.state_dict().values())
    return {"ranks": per_rank, "written": written, "model": model_bytes}
