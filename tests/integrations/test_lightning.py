"""Lightning: DistAvgCallback inside the real ``Trainer.fit`` loop.

The distributed test launches this file with ``torchrun --standalone`` (two gloo processes on
CPU; Lightning picks up torchrun's environment) and runs, in that one launch, DDP
(``strategy="ddp"``, gradient accumulation) and ``ModelParallelStrategy`` (FSDP2 applied in
``configure_model``, an asynchronous annealing EMA averaged every 2 steps). Per strategy:
  A. an uninterrupted ``fit`` whose module records its full weights after every real step:
     the average must equal a reference computed by hand from them, validation must have
     run on that reference (weights and loss) and handed the live weights back bitwise,
     checkpoint folders follow ``ModelCheckpoint`` (removed with the checkpoint), and the
     exports load into fresh modules;
  B. a ``fit`` resumed from a checkpoint saved after the first epoch: the same trajectory
     and, bit for bit, the same final average as A.
Run as a script, it is that job. The other tests run in this process, on one CPU device.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

L = pytest.importorskip("lightning", reason="needs distavg[lightning]")
from torch.distributed.tensor import DTensor  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from distavg.integrations.lightning import DistAvgCallback, average_folder  # noqa: E402

FAST = dict(
    accelerator="cpu",
    logger=False,
    enable_progress_bar=False,
    enable_model_summary=False,
    num_sanity_val_steps=0,
)


def _full(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's whole state dict on every rank (a collective under FSDP2)."""
    return {
        k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone()
        for k, v in module.state_dict().items()
    }


class Net(L.LightningModule):
    """A tiny regression MLP that records what the test compares."""

    def __init__(self, sharded: bool = False, lr: float = 0.1) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
        self.trajectory: dict[int, dict] = {}  # step -> full weights after that real step
        self.seen: list[tuple[int, dict]] = []  # (step, full weights) as validation sees them
        self.val: list[tuple[int, torch.Tensor, torch.Tensor, float]] = []  # (step, x, y, loss)
        self.after_val: list[tuple[int, dict]] = []  # (step, live weights after validation)

    def configure_model(self) -> None:
        if self.hparams.sharded and self.device_mesh is not None:  # not when loaded to use
            from torch.distributed.fsdp import fully_shard

            fully_shard(self.net, mesh=self.device_mesh["data_parallel"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, idx):
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def on_train_start(self) -> None:
        self.last = self.trainer.global_step  # after a resume: the checkpoint's

    def on_train_batch_end(self, outputs, batch, idx) -> None:
        if self.trainer.global_step > self.last:  # the optimizer stepped
            self.last = self.trainer.global_step
            self.trajectory[self.last] = _full(self)

    def on_validation_epoch_start(self) -> None:
        self.seen.append((self.trainer.global_step, _full(self)))

    def validation_step(self, batch, idx):
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        self.log("val_loss", loss, sync_dist=True)
        self.val.append((self.trainer.global_step, x, y, loss.item()))

    def on_train_epoch_end(self) -> None:
        self.after_val.append((self.trainer.global_step, _full(self)))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


def _data() -> tuple[DataLoader, DataLoader]:
    g = torch.Generator().manual_seed(0)
    train = TensorDataset(torch.randn(24, 6, generator=g), torch.randn(24, 3, generator=g))
    val = TensorDataset(torch.randn(8, 6, generator=g), torch.randn(8, 3, generator=g))
    return DataLoader(train, batch_size=2), DataLoader(val, batch_size=4)


# -- the job (torchrun) ---------------------------------------------------------------

CASES = {
    # strategy, callback options, Trainer options, weight of the new value at call s
    "ddp": (
        dict(rule="ema", momentum=0.25),
        dict(accumulate_grad_batches=2),
        lambda s: 0.25,
    ),
    "fsdp2": (
        dict(rule="annealing", momentum=0.2, gamma=2, interval=2, async_update=True),
        dict(),
        lambda s: max(0.2, 2 / (2 + s)),
    ),
}


def _reference(trajectory: dict[int, dict], weight, interval: int) -> dict[int, dict]:
    """The average after each step: call 0 copies, every interval-th call lerps by hand."""
    avg = {k: v.clone() for k, v in trajectory[1].items()}
    out = {1: {k: v.clone() for k, v in avg.items()}}
    for step in range(2, len(trajectory) + 1):
        s = step - 1  # the call count
        if s % interval == 0:
            avg = {k: torch.lerp(avg[k], trajectory[step][k], weight(s)) for k in avg}
        out[step] = {k: v.clone() for k, v in avg.items()}
    return out


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _loss(state: dict, x: torch.Tensor, y: torch.Tensor) -> float:
    model = Net()
    model.load_state_dict(state)
    with torch.no_grad():
        return nn.functional.mse_loss(model(x), y).item()


def _trainer(root: Path, kind: str, callbacks: list):
    from lightning.pytorch.strategies import ModelParallelStrategy

    strategy = (
        "ddp"
        if kind == "ddp"
        else ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    )
    return L.Trainer(
        devices=2, strategy=strategy, max_epochs=2, callbacks=callbacks, **CASES[kind][1],
        default_root_dir=root, **FAST,
    )  # fmt: skip


class SaveAt(L.Callback):
    """``trainer.save_checkpoint(path)`` at the end of training epoch ``epoch``."""

    def __init__(self, path: Path, epoch: int) -> None:
        self.path, self.epoch, self.step = path, epoch, None

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.current_epoch == self.epoch:
            trainer.save_checkpoint(self.path)  # every rank, as Lightning asks
            self.step = trainer.global_step


def _run(root: Path, kind: str) -> dict:
    from lightning.pytorch.callbacks import ModelCheckpoint

    from distavg.export import read_checkpoint

    options, _, weight = CASES[kind]
    interval = options.get("interval", 1)
    rank = int(os.environ["RANK"])
    train, val = _data()

    # A: uninterrupted, exported at the end
    L.seed_everything(0, verbose=False)
    model = Net(sharded=kind == "fsdp2")
    callback = DistAvgCallback(**options, export_file=root / f"{kind}-ema.ckpt")
    mid = SaveAt(root / f"{kind}-mid.ckpt", 0)
    ckpt = ModelCheckpoint(dirpath=root / f"{kind}-ckpt", save_top_k=1)
    trainer = _trainer(root, kind, [callback, mid, ckpt])
    trainer.fit(model, train, val)
    final = callback.average.full_state_dict()  # every rank calls; rank 0 gets it
    callback.export(root / f"{kind}-ema.pt")
    refs = _reference(model.trajectory, weight, interval)
    steps = trainer.global_step
    trainer.strategy.barrier()  # rank 0's files are written
    exported_ckpt = Net.load_from_checkpoint(root / f"{kind}-ema.ckpt").state_dict()
    exported_pt = Net()
    exported_pt.load_state_dict(torch.load(root / f"{kind}-ema.pt"))
    folders = sorted(p.name for p in (root / f"{kind}-ckpt").iterdir())
    mid_folder = average_folder(root / f"{kind}-mid.ckpt")
    result = {
        "steps": [callback.average.steps, trainer.global_step, len(model.trajectory)],
        "final_is_reference": rank != 0 or _same(final, refs[steps]),
        "live_is_average_at_end": _same(_full(model), refs[steps]),
        "validations": len(model.seen),
        "validation_saw_reference": all(_same(w, refs[s]) for s, w in model.seen),
        "validation_loss_is_reference": all(
            abs(loss - _loss(refs[s], x, y)) <= 1e-6 * max(1.0, abs(loss))
            for s, x, y, loss in model.val
        ),
        "validation_loss_differs_from_live": all(
            abs(loss - _loss(model.trajectory[s], x, y)) > 1e-4 for s, x, y, loss in model.val
        ),
        "live_restored_after_validation": all(
            _same(w, model.trajectory[s]) for s, w in model.after_val
        ),
        "checkpoint_folders": folders,
        "mid_shard_files": sorted(p.name for p in mid_folder.glob("*.distcp")),
        "mid_folder_is_reference": _same(read_checkpoint(mid_folder), refs[mid.step]),
        "export_ckpt_is_reference": _same(exported_ckpt, refs[steps]),
        "export_pt_is_reference": _same(exported_pt.state_dict(), refs[steps]),
    }

    # B: resumed after the first epoch, without the swap at the end. The same seed: it is
    # also the seed of the DistributedSampler that Lightning puts in the training loader.
    L.seed_everything(0, verbose=False)
    resumed = Net(sharded=kind == "fsdp2")
    callback_b = DistAvgCallback(**options, swap_at_end=False)
    trainer_b = _trainer(root, kind, [callback_b])
    trainer_b.fit(resumed, train, val, ckpt_path=root / f"{kind}-mid.ckpt")
    final_b = callback_b.average.full_state_dict()
    result.update(
        resumed_steps=[callback_b.average.steps, trainer_b.global_step],
        resumed_trajectory_is_uninterrupted=sorted(resumed.trajectory)
        == list(range(mid.step + 1, steps + 1))
        and all(_same(w, model.trajectory[s]) for s, w in resumed.trajectory.items()),
        resumed_live_is_uninterrupted_live=_same(_full(resumed), model.trajectory[steps]),
        resumed_final_is_uninterrupted=rank != 0 or _same(final_b, final),
    )
    return result


def _job(root: Path) -> None:
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    torch.set_num_threads(1)
    results = {kind: _run(root, kind) for kind in CASES}
    rank = int(os.environ["RANK"])
    (root / f"rank{rank}.json").write_text(json.dumps(results))


def test_fit_averages_validates_checkpoints_resumes_and_exports_on_two_ranks(tmp_path):
    from dist_utils import torchrun_self  # tests/ is on the path under pytest only

    torchrun_self(__file__, tmp_path)
    for rank in range(2):
        results = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for kind, r in results.items():
            steps = 6 if kind == "ddp" else 12  # accumulate_grad_batches=2 under DDP
            mid = steps // 2
            failed = [k for k, v in r.items() if v is False]
            assert not failed, (rank, kind, failed)
            assert r["steps"] == [steps] * 3 and r["resumed_steps"] == [steps] * 2, (kind, r)
            assert r["validations"] == 2, (kind, r)
            # save_top_k=1: the first epoch's checkpoint went, and its average with it
            names = [f"epoch=1-step={steps}.ckpt", f"epoch=1-step={steps}.ckpt.distavg"]
            assert r["checkpoint_folders"] == names, (kind, r)
            # every rank wrote its own shard of the checkpoint saved after the first epoch
            assert r["mid_shard_files"] == ["__0_0.distcp", "__1_0.distcp"], (kind, r)
            assert mid  # the mid checkpoint was at the end of epoch 0
    assert average_folder(tmp_path / "ddp-mid.ckpt").is_dir()


# -- one process: argument checks, resume checks ----------------------------------------


def _fit(root: Path, callbacks: list, max_epochs: int = 1, **kwargs) -> L.Trainer:
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(
        devices=1, max_epochs=max_epochs, callbacks=callbacks, default_root_dir=root,
        enable_checkpointing=False, **FAST,
    )  # fmt: skip
    train, val = _data()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("ignore", ".*torch.distributed is disabled.*")
        trainer.fit(Net(), train, val, **kwargs)
    return trainer


def test_resume_warns_without_an_average_and_refuses_a_missing_or_foreign_one(tmp_path):
    a, b = SaveAt(tmp_path / "a.ckpt", 0), SaveAt(tmp_path / "b.ckpt", 1)
    _fit(tmp_path, [DistAvgCallback(momentum=0.3), a, b], max_epochs=2)
    assert (a.step, b.step) == (12, 24)
    plain = SaveAt(tmp_path / "plain.ckpt", 0)
    _fit(tmp_path, [plain])
    with pytest.warns(UserWarning, match=r"saved without a DistAvgCallback: the average starts"):
        _fit(tmp_path, [DistAvgCallback(momentum=0.3)], max_epochs=2, ckpt_path=plain.path)

    # b's folder replaced by a's (a kill between the two writes of a save looks like this)
    shutil.rmtree(average_folder(b.path))
    shutil.copytree(average_folder(a.path), average_folder(b.path))
    with pytest.raises(ValueError, match=r"is at step 12, but checkpoint .*b\.ckpt' was saved"):
        _fit(tmp_path, [DistAvgCallback(momentum=0.3)], max_epochs=3, ckpt_path=b.path)
    shutil.rmtree(average_folder(b.path))
    with pytest.raises(ValueError, match=r"could not be loaded from .*b\.ckpt\.distavg': found no"):
        _fit(tmp_path, [DistAvgCallback(momentum=0.3)], max_epochs=3, ckpt_path=b.path)


def test_a_checkpoint_saved_while_validation_runs_on_the_average_is_refused(tmp_path):
    class SaveInValidation(L.Callback):
        def on_validation_batch_end(self, trainer, *args) -> None:
            trainer.save_checkpoint(tmp_path / "bad.ckpt")

    with pytest.raises(RuntimeError, match=r"saved while validation runs on the average"):
        _fit(tmp_path, [DistAvgCallback(momentum=0.3), SaveInValidation()])


def test_argument_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"rule must be one of \['ema', .*got 'emma'"):
        DistAvgCallback("emma")
    with pytest.raises(ValueError, match=r"ExponentialMovingAverage takes no option 'decay' "):
        DistAvgCallback("ema", decay=0.999)
    with pytest.raises(ValueError, match=r"PowerEMA takes no option 'momentum'; it takes"):
        DistAvgCallback("power", momentum=0.1)
    with pytest.raises(ValueError, match=r"takes no optimizer=: it passes trainer.optimizers"):
        DistAvgCallback(optimizer=torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1))
    with pytest.raises(ValueError, match=r"export_file must end in .ckpt .* got 'ema.txt'"):
        DistAvgCallback(export_file="ema.txt")
    with pytest.raises(RuntimeError, match=r"there is no average yet"):
        DistAvgCallback().export("ema.pt")


def test_missing_lightning_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "lightning", None)
    monkeypatch.delitem(sys.modules, "distavg.integrations.lightning")
    with pytest.raises(ImportError, match=r"pip install 'distavg\[lightning\]'"):
        import distavg.integrations.lightning  # noqa: F401


if __name__ == "__main__":
    _job(Path(sys.argv[1]))
