"""The ``distavg`` command: --version, bench passes its arguments on, export of a checkpoint."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import nn

import distavg
from distavg.__main__ import main

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def test_version_prints_the_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"distavg {distavg.__version__}"


def test_python_dash_m_distavg_is_the_same_command() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "distavg", "--version"], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"distavg {distavg.__version__}"


def test_bench_help_is_the_benchmarks_own_help(capsys: pytest.CaptureFixture[str]) -> None:
    from distavg import bench

    with pytest.raises(SystemExit) as e:
        bench.main(["--help"])
    assert e.value.code == 0
    expected = capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["bench", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out == expected
    assert out.startswith("usage:")


def test_no_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main([])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: distavg")
    assert "required: COMMAND" in err


def test_export_with_an_unknown_flag_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["export", "ckpt", "out.pt", "--nope"])
    assert e.value.code == 2
    assert "unrecognized arguments: --nope" in capsys.readouterr().err


def test_export_writes_the_checkpointed_average_as_a_model_file(
    tmp_path, capsys: pytest.CaptureFixture[str]
) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    ema = distavg.ExponentialMovingAverage(model, momentum=0.25)
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update_parameters(model)
    dcp.save({"ema": ema}, checkpoint_id=tmp_path / "ckpt")

    out = tmp_path / "average.pt"
    assert main(["export", str(tmp_path / "ckpt"), str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out

    exported = torch.load(out)
    expected = ema.full_state_dict()
    assert exported.keys() == expected.keys()
    for k in expected:
        assert torch.equal(exported[k], expected[k]), k
    fresh = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    fresh.load_state_dict(exported)
    x = torch.randn(5, 4)
    assert torch.equal(fresh(x), ema.module(x))


def test_export_of_a_missing_checkpoint_says_what_is_wrong(
    tmp_path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["export", str(tmp_path / "nothing"), str(tmp_path / "out.pt")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("distavg export: error: ckpt_dir must be a checkpoint directory")
    assert not (tmp_path / "out.pt").exists()
