"""The benchmark's smoke runs print every table with real figures (no speed is asserted)."""

from __future__ import annotations

import math
import re

import pytest
import torch.distributed as dist

from distavg import bench
from distavg.bench._spawn import run_on_ranks


def _tables(out: str) -> dict[str, list[dict[str, str]]]:
    """Each printed table by its title: one {column: cell} per row."""
    tables = {}
    for section in out.split("\n### ")[1:]:
        title, *lines = section.splitlines()
        cells = [[c.strip() for c in s.strip("|").split("|")] for s in lines if s[:1] == "|"]
        header, _rule, *rows = cells
        tables[title] = [dict(zip(header, r, strict=True)) for r in rows]
    return tables


def _table(tables: dict[str, list[dict[str, str]]], prefix: str) -> list[dict[str, str]]:
    (rows,) = (rows for title, rows in tables.items() if title.startswith(prefix))
    return rows


def _figure(cell: str) -> float:
    """A cell's number; it must be finite and not negative."""
    value = float(cell)
    assert math.isfinite(value) and value >= 0, cell
    return value


def _row(rows: list[dict[str, str]], first: str) -> dict[str, str]:
    (row,) = (r for r in rows if next(iter(r.values())) == first)
    return row


def test_quick_update_small_and_bf16_tables_hold_positive_times_and_consistent_ratios(capsys):
    assert bench.main(["--quick", "--sections", "update,small,bf16"]) == 0
    out = capsys.readouterr().out
    assert "torch threads" in out
    tables = _tables(out)
    assert len(tables) == 3

    update = _table(tables, "Update of a GPT-2-small-like fp32 model")
    assert [r["method"] for r in update] == [
        "bandwidth floor: one lerp_ of the same numel",
        "distavg ExponentialMovingAverage",
        "torch AveragedModel + get_ema_multi_avg_fn (foreach)",
        "per-tensor lerp_ loop",
    ]
    for r in update:
        assert _figure(r["median ms"]) >= _figure(r["min ms"])
        assert _figure(r["floor / time"]) > 0 and _figure(r["time / distavg"]) > 0
    ours = _row(update, "distavg ExponentialMovingAverage")
    assert _figure(ours["median ms"]) > 0 and ours["time / distavg"] == "1.00"
    stated = re.search(r"Target floor / distavg >= 0\.90: ([\d.]+), (MET|NOT MET)\.", out)
    assert stated and stated[1] == ours["floor / time"]

    small = _table(tables, "Many small tensors")
    loop = _row(small, "per-tensor lerp_ loop")
    assert _figure(loop["median ms"]) > 0 and loop["speed-up vs loop"] == "1.00"
    for r in small:
        assert _figure(r["speed-up vs loop"]) > 0
    foreach = _row(small, "torch AveragedModel + get_ema_multi_avg_fn (foreach)")
    assert foreach["median ms, the two alone"] == foreach["median ms, caches flushed"] == "-"
    for name in ("distavg ExponentialMovingAverage", "per-tensor lerp_ loop"):
        assert _figure(_row(small, name)["median ms, caches flushed"]) > 0
    assert re.search(r"Target distavg >= 2x faster .*: [\d.]+x, (MET|NOT MET)\.", out)

    bf16 = _table(tables, "bf16 parameters, fp32 average")
    assert _row(bf16, "fp32 params -> fp32 average (distavg)")["time / fp32 update"] == "1.00"
    eager = _row(bf16, "bf16 -> fp32 distavg, eager (default)")
    assert re.search(rf"ratio < 1\): eager {eager['time / fp32 update']}x, (MET|NOT MET)\.", out)
    assert len(bf16) == 4  # --quick does not compile the fused path
    assert "Fused path not measured" in out


def test_quick_ranks_section_spawns_one_and_two_ranks(capsys):
    assert bench.main(["--quick", "--sections", "ranks", "--repeats", "1"]) == 0
    rows = _table(_tables(capsys.readouterr().out), "Per-rank averaged bytes and update time")
    assert [(r["W"], r["placement"]) for r in rows] == [
        (w, p) for w in ("1", "2") for p in ("sharded", "owner", "replicated")
    ]
    for r in rows:
        assert _figure(r["slowest rank ms"]) > 0
    two = {r["placement"]: r for r in rows if r["W"] == "2"}
    r0, r1 = (_figure(x) for x in two["sharded"]["MiB per rank (r0 / r1)"].split("/"))
    full = _figure(two["replicated"]["MiB per rank (r0 / r1)"].split("/")[0])
    assert 0 < r0 < full and 0 < r1 < full  # each rank keeps a part, not a full copy


def test_quick_overlap_section_times_every_mode_in_both_settings(capsys):
    assert bench.main(["--quick", "--sections", "overlap"]) == 0
    rows = _table(_tables(capsys.readouterr().out), "Overlap: train step")
    assert [r["setting"] for r in rows] == ["1 process", "2 ranks (DDP, gloo)"]
    for r in rows:
        for column in ("none ms", "sync ms", "async ms", "async / none"):
            assert _figure(r[column]) > 0
        assert re.fullmatch(r"-?\d+%|nan%", r["hidden by async"])


def test_quick_checkpoint_section_writes_less_per_rank_when_sharded(capsys):
    assert bench.main(["--quick", "--sections", "checkpoint"]) == 0
    rows = _table(_tables(capsys.readouterr().out), "Checkpoint of the average")
    assert len(rows) == 6  # W in (1, 2) x three methods
    for r in rows:
        assert _figure(r["largest rank / model"]) > 0
        assert _figure(r["save ms (median, slowest rank)"]) > 0
    at_two = {r["method"]: r for r in rows if r["W"] == "2"}
    sharded = _figure(at_two["sharded, dcp.save"]["largest rank / model"])
    assert sharded < _figure(at_two["owner, dcp.save"]["largest rank / model"])


def _fail_on_rank_one() -> None:
    if dist.get_rank() == 1:
        raise ValueError("boom on rank 1")
    dist.barrier()


def test_a_failing_rank_raises_with_its_traceback():
    with pytest.raises(RuntimeError) as e:
        run_on_ranks(_fail_on_rank_one, 2)
    message = str(e.value)
    assert "_fail_on_rank_one failed on 2 gloo rank(s)" in message
    assert "-- rank1:" in message and "ValueError: boom on rank 1" in message


def test_unknown_section_is_an_error(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--sections", "update,nope"])
    assert "--sections got ['nope']" in capsys.readouterr().err
