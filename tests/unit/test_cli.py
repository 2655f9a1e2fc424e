"""The ``distavg`` command: --version, bench passes its arguments on, export of a checkpoint
(every failure one line and exit status 1, the previous file kept)."""

from __future__ import annotations

import contextlib
import errno
import os
import re
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


def _checkpoint(root) -> tuple[nn.Module, distavg.ExponentialMovingAverage]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    ema = distavg.ExponentialMovingAverage(model, momentum=0.25)
    ema.update_parameters(model)
    dcp.save({"ema": ema}, checkpoint_id=root)
    return model, ema


def _one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("distavg export: error: "), err
    return err


@pytest.mark.parametrize(
    "out, message",
    [
        ("missing/average.pt", r"out '.*missing/average.pt' is in a directory that does not exist"),
        (".", r"out must name a file, got the directory '.*'"),
        ("", r"out must name the file to write, got ''"),
        (
            "average.SAFETENSORS",
            r"out must end in .safetensors, .pt, .pth, .bin, or the format must be given "
            r"\(format=, --format\), got '.*average.SAFETENSORS' \(suffixes are lower case: "
            r".safetensors\)",
        ),
        ("average.xyz", r"out must end in .safetensors, .pt, .pth, .bin, .* got '.*average.xyz'$"),
        ("average", r"out must end in .safetensors, .pt, .pth, .bin, .* got '.*average'$"),
    ],
    ids=["missing-dir", "directory", "empty", "upper-case-suffix", "unknown-suffix", "no-suffix"],
)
def test_export_to_a_bad_out_is_one_line_error_and_writes_nothing(
    tmp_path, capsys: pytest.CaptureFixture[str], out: str, message: str
) -> None:
    _checkpoint(tmp_path / "ckpt")
    target = "" if not out else str(tmp_path / out)
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["export", str(tmp_path / "ckpt"), target]) == 1
    err = _one_line_error(capsys)
    assert re.search(message, err.strip()), err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin", ".safetensors"])
def test_export_accepts_each_known_suffix(tmp_path, capsys, suffix: str) -> None:
    _, ema = _checkpoint(tmp_path / "ckpt")
    out = tmp_path / f"average{suffix}"
    assert main(["export", str(tmp_path / "ckpt"), str(out)]) == 0
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        exported = load_file(out)
    else:
        exported = torch.load(out)
    for k, v in ema.full_state_dict().items():
        assert torch.equal(exported[k], v), k


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_export_that_fails_mid_write_keeps_the_previous_file_and_leaves_no_temporary(
    tmp_path, capsys: pytest.CaptureFixture[str], monkeypatch, suffix: str
) -> None:
    _checkpoint(tmp_path / "ckpt")
    out = tmp_path / f"average{suffix}"
    assert main(["export", str(tmp_path / "ckpt"), str(out)]) == 0
    capsys.readouterr()
    good = out.read_bytes()

    def disk_full(state, f, *args, **kwargs):  # writes part of the file, then the disk is full
        with open(f, "wb") if isinstance(f, str) else contextlib.nullcontext(f) as stream:
            stream.write(b"\0" * 100)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    if suffix == ".pt":
        monkeypatch.setattr(torch, "save", disk_full)
    else:
        import safetensors.torch

        monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    assert main(["export", str(tmp_path / "ckpt"), str(out)]) == 1
    err = _one_line_error(capsys)
    assert f"writing '{out}' failed: No space left on device" in err
    assert out.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["ckpt", out.name])


def test_export_of_a_corrupt_checkpoint_names_the_file_and_the_tensor(
    tmp_path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, ema = _checkpoint(tmp_path / "ckpt")
    (shard,) = (tmp_path / "ckpt").glob("*.distcp")
    data = bytearray(shard.read_bytes())
    at = data.find(ema.full_state_dict()["2.weight"].numpy().tobytes())
    data[at + 3] ^= 0x40  # the top exponent bit of the first element: 0.07 becomes 2e37
    shard.write_bytes(bytes(data))
    assert main(["export", str(tmp_path / "ckpt"), str(tmp_path / "average.pt")]) == 1
    err = _one_line_error(capsys)
    assert (
        f"checkpoint tensor '2.weight' under key='ema' does not match the checksum saved "
        f"with it: its data in '{shard}' (rows 0:2) changed after the save"
    ) in err
    assert not (tmp_path / "average.pt").exists()


def test_export_failure_in_a_subprocess_is_one_line_and_exit_status_1(tmp_path) -> None:
    _checkpoint(tmp_path / "ckpt")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "distavg",
            "export",
            str(tmp_path / "ckpt"),
            str(tmp_path / "a.xyz"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 1
    assert r.stdout == ""
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith("distavg export: error: out must end in .safetensors, .pt")
    assert not (tmp_path / "a.xyz").exists()
