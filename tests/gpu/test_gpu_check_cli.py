"""launch/gpu_check.py where there is no GPU: it imports, names its checks, and refuses to
pass without CUDA (exit 1, one clear line), so a CPU-only run can never read as a success."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "launch" / "gpu_check.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the script runs its checks")
def test_gpu_check_fails_without_cuda():
    done = _run()
    assert done.returncode == 1, done.stdout + done.stderr
    assert "gpu_check: CUDA is not available" in done.stderr
    assert "nothing was checked" in done.stderr


def test_gpu_check_lists_its_checks_and_rejects_unknown_ones(capsys, monkeypatch):
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    gpu_check = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_check", gpu_check)
    spec.loader.exec_module(gpu_check)  # importable without CUDA
    assert {"race", "buckets", "owner", "hosttime", "pinned", "csan", "graph"} <= set(
        gpu_check.CHECKS
    )
    with pytest.raises(SystemExit) as exit_:
        gpu_check.main(["--help"])
    assert exit_.value.code == 0
    assert "checks, in run order: bitwise, race" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        gpu_check.main(["--only", "nosuch"])
    assert exit_.value.code == 2
    assert "invalid choice: 'nosuch'" in capsys.readouterr().err
