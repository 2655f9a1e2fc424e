"""Checkpoints that were damaged after the save are refused, and saves through the library
are atomic. On real gloo ranks: a save at W=2 with a flipped bit in one rank's shard file, or
with one rank's shard file from another save (a torn directory), is refused at W=3 and in
one process, naming the tensor and the file, with the average untouched; accelerate's
save_state keeps the previous complete save when a save is killed half-way."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from dist_utils import run_distributed
from reference import perturb, small_model, train_forward
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException

import distavg
from distavg.__main__ import main
from distavg.export import export_checkpoint, read_checkpoint

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

accelerate = pytest.importorskip("accelerate", reason="needs distavg[accelerate]")
from distavg.integrations.accelerate import register_for_checkpointing  # noqa: E402


def _ema(model: nn.Module, placement: str = "sharded") -> distavg.BaseAveragedModel:
    return distavg.ExponentialMovingAverage(model, momentum=0.3, placement=placement)


def _model(seed: int) -> nn.Module:
    model = small_model(seed)
    return nn.parallel.DistributedDataParallel(model) if dist.is_initialized() else model


def _step(model: nn.Module, avg: distavg.BaseAveragedModel, s: int) -> None:
    perturb(model, s)
    train_forward(model, s)
    avg.update_parameters(model)


def _local(avg: distavg.BaseAveragedModel) -> list[torch.Tensor]:
    return [v.clone() for v in avg.shards.views]


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


class _Accelerator:
    """accelerate's hook registry and save_state/load_state, enough to run the hooks."""

    def __init__(self) -> None:
        self._custom_objects: list = []
        self.save_hooks: list = []
        self.load_hooks: list = []

    def register_save_state_pre_hook(self, hook):
        self.save_hooks.append(hook)

    def register_load_state_pre_hook(self, hook):
        self.load_hooks.append(hook)

    def save_state(self, output_dir: str) -> None:
        for hook in self.save_hooks:
            hook([], [], output_dir)

    def load_state(self, input_dir: str) -> None:
        for hook in self.load_hooks:
            hook([], input_dir)


def _accelerate_saves(rank: int, world: int, state: str) -> None:
    state = Path(state)
    model = _model(seed=3)
    ema = _ema(model)
    accelerator = _Accelerator()
    register_for_checkpointing(accelerator, ema)
    folder, saving, old = state / "distavg", state / "distavg.saving", state / "distavg.old"

    # 1. a save, then another into the same directory: each replaces the folder whole
    _step(model, ema, 0)
    accelerator.save_state(str(state))
    assert sorted(p.name for p in folder.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    _step(model, ema, 1)
    second = _local(ema)
    accelerator.save_state(str(state))
    assert not saving.exists() and not old.exists()
    _step(model, ema, 2)
    accelerator.load_state(str(state))
    assert _same(_local(ema), second)

    # 2. killed mid-save: every shard written, the .metadata never
    _step(model, ema, 3)
    killed = mock.patch.object(dcp.FileSystemWriter, "finish", side_effect=RuntimeError("killed"))
    with killed, pytest.raises(CheckpointException, match="killed"):
        accelerator.save_state(str(state))
    dist.barrier()
    assert (saving / f"__{rank}_0.distcp").is_file() and not (saving / ".metadata").exists()
    accelerator.load_state(str(state))  # the previous complete save, exactly
    assert _same(_local(ema), second)
    assert ema.steps == 2

    # 3. the next save cleans up what the killed one left
    _step(model, ema, 4)
    fourth = _local(ema)
    accelerator.save_state(str(state))
    assert not saving.exists() and not old.exists()
    accelerator.load_state(str(state))
    assert _same(_local(ema), fourth)

    # 4. killed between the two renames: no folder, both siblings; the load says so
    if rank == 0:
        os.replace(folder, old)
        shutil.copytree(old, saving)
    dist.barrier()
    with pytest.raises(ValueError, match=r"found no average in .*distavg' but .*interrupted"):
        accelerator.load_state(str(state))
    assert _same(_local(ema), fourth)


def _save_at_two(rank: int, world: int, root: str) -> None:
    root = Path(root)
    model = _model(seed=0)
    avg = _ema(model)
    for s in range(3):
        _step(model, avg, s)
    dcp.save({"ema": avg}, checkpoint_id=root / "good")
    full = avg.full_state_dict()
    if rank == 0:
        torch.save({"steps": avg.steps, "full": full}, root / "good.ref.pt")
    _step(model, avg, 3)
    dcp.save({"ema": avg}, checkpoint_id=root / "later")


def _flip(path: Path, values: torch.Tensor) -> None:
    """Flip the top exponent bit of the first of ``values`` where ``path`` stores them."""
    data = bytearray(path.read_bytes())
    at = data.find(values.contiguous().numpy().tobytes())
    assert at >= 0
    data[at + values.element_size() - 1] ^= 0x40
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def saved_at_two(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("integrity")
    run_distributed(_save_at_two, 2, root / "spawn", str(root))
    ref = torch.load(root / "good.ref.pt")
    shutil.copytree(root / "good", root / "flipped")
    _flip(root / "flipped" / "__1_0.distcp", ref["full"]["0.weight"][5:])  # rank 1's chunk
    shutil.copytree(root / "good", root / "torn")  # rank 1's file from the later save
    shutil.copy(root / "later" / "__1_0.distcp", root / "torn" / "__1_0.distcp")
    return root


def test_accelerate_saves_are_atomic_when_killed_mid_save_or_between_renames(tmp_path):
    run_distributed(_accelerate_saves, 2, tmp_path / "spawn", str(tmp_path / "state"))
    assert (tmp_path / "state" / "distavg.old" / ".metadata").is_file()


def _load_at_three(rank: int, world: int, root: str) -> None:
    root = Path(root)
    ref = torch.load(root / "good.ref.pt") if rank == 0 else None
    message = (
        r"checkpoint tensor '0.weight' does not match the checksum saved with it: rows 5:10, "
        r"saved by rank 1 \(shard file __1_\*.distcp\) changed after the save"
    )
    for placement in ("sharded", "owner"):
        avg = _ema(_model(seed=7), placement)
        dcp.load({"ema": avg}, checkpoint_id=root / "good")
        full = avg.full_state_dict()
        if rank == 0:
            assert full.keys() == ref["full"].keys()
            assert all(torch.equal(full[k], v) for k, v in ref["full"].items())
        for damaged in ("flipped", "torn"):
            before = _local(avg)
            with pytest.raises(ValueError, match=message):
                dcp.load({"ema": avg}, checkpoint_id=root / damaged)
            assert _same(_local(avg), before), (placement, damaged)
            assert avg.steps == 3


def test_damaged_shards_saved_at_two_are_refused_at_three_untouched(saved_at_two, tmp_path):
    run_distributed(_load_at_three, 3, tmp_path, str(saved_at_two))


@pytest.mark.parametrize("damaged", ["flipped", "torn"])
def test_damaged_shards_saved_at_two_are_refused_in_one_process_naming_the_file(
    saved_at_two, tmp_path, capsys, damaged
):
    ckpt = saved_at_two / damaged
    avg = _ema(small_model(seed=7))
    before = _local(avg)
    with pytest.raises(ValueError, match=r"'0.weight' .* rows 5:10, saved by rank 1"):
        dcp.load({"ema": avg}, checkpoint_id=ckpt)
    assert _same(_local(avg), before)
    message = (
        f"checkpoint tensor '0.weight' under key='ema' does not match the checksum saved "
        f"with it: its data in '{ckpt / '__1_0.distcp'}' (rows 5:10) changed after the save"
    )
    with pytest.raises(ValueError) as e:
        read_checkpoint(ckpt)
    assert message in str(e.value)
    with pytest.raises(ValueError):
        export_checkpoint(ckpt, tmp_path / "avg.safetensors")
    assert main(["export", str(ckpt), str(tmp_path / "avg.pt")]) == 1
    assert message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
    ref = torch.load(saved_at_two / "good.ref.pt")
    good = read_checkpoint(saved_at_two / "good")
    assert all(torch.equal(good[k], v) for k, v in ref["full"].items())
