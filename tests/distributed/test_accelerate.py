"""accelerate on CPU: ``save_state``/``load_state`` keep every rank's shard of the average.

The test launches this file with ``torchrun --standalone`` (a free port, two gloo
processes, ``Accelerator(cpu=True)``); run as a script it is the training job.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import distavg

accelerate = pytest.importorskip("accelerate", reason="needs distavg[accelerate]")
from distavg.integrations.accelerate import register_for_checkpointing  # noqa: E402


def _job(root: Path) -> None:
    from accelerate import Accelerator
    from torch import nn

    accelerator = Accelerator(cpu=True)
    rank, world = accelerator.process_index, accelerator.num_processes
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 9), nn.ReLU(), nn.Linear(9, 3))
    optim = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optim = accelerator.prepare(model, optim)

    def train(avg, steps):
        for s in range(steps):
            gen = torch.Generator().manual_seed(s)
            x, y = torch.randn(4, 6, generator=gen), torch.randn(4, 3, generator=gen)
            optim.zero_grad()
            accelerator.backward(nn.functional.mse_loss(model(x), y))
            optim.step()
            avg.update_parameters(model)

    ema = distavg.ExponentialMovingAverage(model, momentum=0.2, interval=2)
    handles = register_for_checkpointing(accelerator, ema)
    train(ema, 5)
    saved = [v.clone() for v in ema.shards.views]
    accelerator.save_state(str(root / "state"))
    train(ema, 3)  # move on, then come back
    accelerator.load_state(str(root / "state"))
    restored = all(torch.equal(a, b) for a, b in zip(saved, ema.shards.views, strict=True))

    accelerator.register_for_checkpointing(ema)  # the wrong way: main process's shard only
    try:
        accelerator.save_state(str(root / "state-wrong"))
        wrong = None
    except ValueError as e:
        wrong = str(e)
    accelerator._custom_objects.clear()

    for handle in handles:  # a state saved without the average does not load into it
        handle.remove()
    accelerator.save_state(str(root / "state-plain"))
    register_for_checkpointing(accelerator, ema)
    try:
        accelerator.load_state(str(root / "state-plain"))
        missing = None
    except ValueError as e:
        missing = str(e)
    result = {
        "world": world,
        "steps": ema.steps,
        "restored": restored,
        "shard_numel": sum(v.numel() for v in saved),
        "model_numel": sum(p.numel() for p in model.parameters()),
        "wrong": wrong,
        "missing": missing,
    }
    (root / f"rank{rank}.json").write_text(json.dumps(result))
    accelerator.wait_for_everyone()


def test_save_state_and_load_state_keep_every_ranks_shard(tmp_path):
    root = Path(__file__).resolve().parents[2]  # distavg, wherever pytest was started
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        __file__, str(tmp_path),
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r in results:
        assert r["world"] == 2 and r["steps"] == 5 and r["restored"]
        assert r["wrong"] and "saves the main process's shard only" in r["wrong"]
        assert r["missing"] and "found no average in" in r["missing"]
    # each rank held a part of the average, together all of it, and each wrote its own file
    assert all(0 < r["shard_numel"] < r["model_numel"] for r in results)
    assert sum(r["shard_numel"] for r in results) == results[0]["model_numel"]
    shards = sorted(p.name for p in (tmp_path / "state" / "distavg").glob("*.distcp"))
    assert shards == ["__0_0.distcp", "__1_0.distcp"]
    # and the saved state exports offline to the whole model
    from distavg.export import read_checkpoint

    assert set(read_checkpoint(tmp_path / "state" / "distavg")) == {
        "0.weight", "0.bias", "2.weight", "2.bias",
    }  # fmt: skip


class _Accelerator:
    """Records hook registrations: enough for the argument checks, which run first."""

    _custom_objects: list = []

    def register_save_state_pre_hook(self, hook):
        return hook

    def register_load_state_pre_hook(self, hook):
        return hook


def test_register_for_checkpointing_argument_errors(monkeypatch):
    avg = distavg.StochasticWeightAverage(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"needs at least one averager, got none"):
        register_for_checkpointing(_Accelerator())
    with pytest.raises(ValueError, match=r"folder must be a plain folder name, got 'a/b'"):
        register_for_checkpointing(_Accelerator(), avg, folder="a/b")
    registered = _Accelerator()
    registered._custom_objects = [avg]
    with pytest.raises(ValueError, match=r"registered with accelerator.register_for_checkpointing"):
        register_for_checkpointing(registered, avg)
    monkeypatch.setitem(sys.modules, "accelerate", None)
    with pytest.raises(ImportError, match=r"pip install 'distavg\[accelerate\]'"):
        register_for_checkpointing(_Accelerator(), avg)


if __name__ == "__main__":
    _job(Path(sys.argv[1]))
