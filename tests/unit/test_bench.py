"""The benchmark's smoke run prints every table (no timing is asserted)."""

from __future__ import annotations

import pytest

from distavg import bench


def test_quick_run_prints_the_tables(capsys):
    assert bench.main(["--quick", "--sections", "update,small,bf16"]) == 0
    out = capsys.readouterr().out
    assert "torch threads" in out
    for title in (
        "Update of a GPT-2-small-like fp32 model",
        "Many small tensors",
        "bf16 parameters, fp32 average",
    ):
        assert title in out
    for row in (
        "bandwidth floor: one lerp_ of the same numel",
        "distavg ExponentialMovingAverage",
        "torch AveragedModel + get_ema_multi_avg_fn (foreach)",
        "per-tensor lerp_ loop",
        "bf16 -> fp32 distavg, eager (default)",
    ):
        assert row in out
    for verdict in ("Target floor / distavg", "Target distavg >= 2x", "Target bf16"):
        assert verdict in out  # each table states its target and whether it is met
    assert "Fused path not measured" in out  # --quick does not compile
    assert out.count("### ") == 3


@pytest.mark.parametrize(
    ("section", "module"), [("overlap", "_bench_overlap"), ("checkpoint", "_bench_checkpoint")]
)
def test_quick_external_sections_print_a_table_or_say_unavailable(capsys, section, module):
    import importlib.util

    assert bench.main(["--quick", "--sections", section]) == 0
    body = capsys.readouterr().out.split("\n", 1)[1].strip()
    if importlib.util.find_spec(f"distavg.{module}") is None:
        assert "Section unavailable" in body
    else:
        assert len(body.splitlines()) >= 3 and "Section unavailable" not in body


def test_missing_external_section_says_unavailable():
    args = bench._parse(["--quick"])
    out = bench._external("_no_such_bench", "some_table", {})(args)
    assert "Section unavailable: distavg._no_such_bench.some_table" in out


def test_quick_ranks_section_spawns_one_and_two_ranks(capsys):
    assert bench.main(["--quick", "--sections", "ranks", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| 1 ") or line.startswith("| 2 ")]
    assert len(rows) == 6  # W in (1, 2) x (sharded, owner, replicated)
    two_sharded = next(r for r in rows if r.startswith("| 2 ") and "sharded" in r)
    r0, r1 = (float(x) for x in two_sharded.split("|")[4].split("/"))
    two_replicated = next(r for r in rows if r.startswith("| 2 ") and "replicated" in r)
    full = float(two_replicated.split("|")[4].split("/")[0])
    assert 0 < r0 < full and 0 < r1 < full  # each rank keeps a part, not a full copy


def test_unknown_section_is_an_error(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--sections", "update,nope"])
    assert "--sections got ['nope']" in capsys.readouterr().err
