"""mmengine on CPU: ``DistAvgHook`` inside a real ``Runner``, two gloo processes.

The test launches this file with ``torchrun --standalone``; run as a script it is the
training job: run A trains 12 iterations (gradient accumulation 2, so 6 real steps; the
average begins at iteration 4) with a checkpoint and a validation at 6 and 12; run B resumes
from A's checkpoint at 6, checkpoints every 3 iterations keeping one, swaps the average in at
the end and tests. The configs are written as files and read with ``Config.fromfile``, so
``custom_imports`` registers the hook as in a user's config.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("mmengine", reason="needs distavg[mmengine]")
from distavg.integrations.mmengine import DistAvgHook  # noqa: E402

MOMENTUM, BEGIN_ITER = 0.3, 4
# mmengine 0.10 resumes with torch.load's default, weights_only=True since torch 2.6, which
# refuses the message hub it saved itself
TORCH_LOAD = {"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}


def _register() -> None:
    """The tiny model, data, metric and a recording hook, in mmengine's registries."""
    from mmengine.evaluator import BaseMetric
    from mmengine.hooks import Hook
    from mmengine.model import BaseModel
    from mmengine.registry import DATASETS, HOOKS, METRICS, MODELS
    from torch import nn
    from torch.nn import functional as F

    @MODELS.register_module()
    class TinyModel(BaseModel):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))

        def forward(self, inputs, targets, mode="tensor"):
            out = self.net(inputs)
            if mode == "loss":
                return {"loss": F.mse_loss(out, targets)}
            if mode == "predict":
                return list(zip(out, targets, strict=True))
            return out

    @DATASETS.register_module()
    class Synthetic(torch.utils.data.Dataset):
        def __init__(self, n: int, seed: int) -> None:
            gen = torch.Generator().manual_seed(seed)
            self.x = torch.randn(n, 4, generator=gen)
            self.y = self.x @ torch.randn(4, 2, generator=gen) + 0.5

        def __len__(self) -> int:
            return len(self.x)

        def __getitem__(self, i: int) -> dict:
            return {"inputs": self.x[i], "targets": self.y[i]}

    @METRICS.register_module()
    class MSE(BaseMetric):
        def process(self, data_batch, data_samples) -> None:
            self.results += [float(((o - t) ** 2).mean()) for o, t in data_samples]

        def compute_metrics(self, results) -> dict:
            return {"mse": sum(results) / len(results)}

    @HOOKS.register_module()
    class Recorder(Hook):
        """Runs after DistAvgHook (BELOW_NORMAL): sees the model as validation sees it."""

        priority = "BELOW_NORMAL"

        def __init__(self) -> None:
            self.steps, self.in_val, self.restored, self.live, self.metrics = [], [], [], [], []
            self.stepped = False

        def before_train(self, runner) -> None:
            runner.optim_wrapper.optimizer.register_step_post_hook(self._stepped)

        def _stepped(self, *args) -> None:
            self.stepped = True

        def _state(self, runner) -> dict:
            return {k: v.clone() for k, v in runner.model.module.state_dict().items()}

        def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
            if self.stepped:  # the weights after each real optimizer step
                self.steps.append((runner.iter, self._state(runner)))
            self.stepped = False
            self.live = self._state(runner)

        def before_val_epoch(self, runner) -> None:
            self.in_val.append(self._state(runner))

        def after_val_epoch(self, runner, metrics=None) -> None:
            self.restored.append((self.live, self._state(runner)))
            self.metrics.append(dict(metrics))

        def after_test_epoch(self, runner, metrics=None) -> None:
            self.metrics.append({"test": dict(metrics)})


CONFIG = """
custom_imports = dict(imports=["distavg.integrations.mmengine"], allow_failed_imports=False)
model = dict(type="TinyModel")
launcher = "pytorch"
env_cfg = dict(dist_cfg=dict(backend="gloo"))
# mmengine's default DDP wrapper passes device_ids, which a CPU module refuses
model_wrapper_cfg = dict(type="MMDistributedDataParallel", device_ids=None, broadcast_buffers=False)
train_dataloader = dict(
    dataset=dict(type="Synthetic", n=96, seed=0), batch_size=4,
    sampler=dict(type="DefaultSampler", shuffle=False), collate_fn=dict(type="default_collate"))
val_dataloader = dict(
    dataset=dict(type="Synthetic", n=16, seed=1), batch_size=4,
    sampler=dict(type="DefaultSampler", shuffle=False), collate_fn=dict(type="default_collate"))
test_dataloader = val_dataloader
val_evaluator = test_evaluator = dict(type="MSE")
train_cfg = dict(by_epoch=False, max_iters=12, val_interval=6)
val_cfg = test_cfg = dict()
optim_wrapper = dict(optimizer=dict(type="SGD", lr=0.05, momentum=0.9), accumulative_counts=2)
default_hooks = dict(checkpoint=dict(type="CheckpointHook", by_epoch=False, {checkpoint}))
log_level = "WARNING"
custom_hooks = [
    dict(type="DistAvgHook", ema_type="ExponentialMovingAverage", momentum={momentum},
         begin_iter={begin_iter}, export_file="average.pth", {extra}),
    dict(type="Recorder"),
]
work_dir = {work_dir!r}
{more}
"""


def _runner(root: Path, name: str, checkpoint: str, extra: str = "", more: str = ""):
    from mmengine.config import Config
    from mmengine.runner import Runner

    path = root / f"{name}.py"
    text = CONFIG.format(
        checkpoint=checkpoint,
        momentum=MOMENTUM,
        begin_iter=BEGIN_ITER,
        extra=extra,
        work_dir=str(root / name),
        more=more,
    )
    if int(os.environ["RANK"]) == 0:
        path.write_text(text)
    torch.distributed.barrier()
    runner = Runner.from_cfg(Config.fromfile(str(path)))
    hooks = {type(h).__name__: h for h in runner.hooks}
    return runner, hooks["DistAvgHook"], hooks["Recorder"]


def _metric(model: torch.nn.Module) -> float:
    """The val metric of ``model`` on the whole val set, sample by sample."""
    from mmengine.registry import DATASETS

    data = DATASETS.build(dict(type="Synthetic", n=16, seed=1))
    model.eval()
    with torch.no_grad():
        out = model.net(data.x)
    return sum(float(((o - t) ** 2).mean()) for o, t in zip(out, data.y, strict=True)) / 16


def _job(root: Path) -> None:
    import torch.distributed as dist
    from mmengine.registry import MODELS
    from mmengine.runner import load_checkpoint

    # mmengine's pytorch launcher calls torch.cuda.set_device, which a CPU build refuses;
    # the runner keeps a process group that already exists.
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    _register()
    result = {}

    # A: 12 iterations, checkpoints and validation at 6 and 12
    runner, hook, rec = _runner(root, "a", "interval=6")
    runner.train()
    result["a"] = {
        "steps": rec.steps,
        "in_val": rec.in_val,
        "restored": rec.restored,
        "metrics": rec.metrics,
        "avg_steps": hook.average.steps,
        "files": sorted(os.listdir(root / "a")),
        "shards": sorted(os.listdir(root / "a" / "iter_6.pth.distavg")),
        "meta": torch.load(root / "a" / "iter_6.pth", weights_only=False)["meta"]["distavg"],
    }
    if rank == 0:  # the export, as mmengine users load it, into a fresh model
        fresh = MODELS.build(dict(type="TinyModel"))
        load_checkpoint(fresh, str(root / "a" / "average.pth"), strict=True)
        result["a"]["export_metric"] = _metric(fresh)
        result["a"]["raw_metric"] = _metric(runner.model.module)
    dist.barrier()

    # B: resumes A's checkpoint at 6; saves at 9 and 12 keeping one; swaps in at the end
    more = f"load_from = {str(root / 'a' / 'iter_6.pth')!r}\nresume = True"
    runner, hook, rec = _runner(root, "b", "interval=3, max_keep_ckpts=1", "swap_at_end=True", more)
    runner.train()
    live = {k: v.clone() for k, v in runner.model.module.state_dict().items()}
    runner.test()  # before_run again: the same average; evaluated on it
    result["b"] = {
        "avg_steps": hook.average.steps,
        "metrics": rec.metrics,
        "live": live,
        "full": hook.average.full_state_dict(),
        "files": sorted(os.listdir(root / "b")),
    }
    torch.save(result, root / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def _reference(steps: list) -> dict:
    """EMA of the weights after each real step from BEGIN_ITER on; buffers follow the model."""
    avg = None
    for it, state in steps:
        if it + 1 < BEGIN_ITER:
            continue
        if avg is None:
            avg = {k: v.clone() for k, v in state.items()}
            continue
        for k, v in state.items():
            if "running" in k or "num_batches" in k:
                avg[k].copy_(v)
            else:
                avg[k].lerp_(v, MOMENTUM)
    return avg


def test_mmengine_runner_average_matches_reference_evaluates_on_it_and_resumes_exactly(tmp_path):
    from dist_utils import torchrun_self  # tests/ is on the path under pytest only

    torchrun_self(__file__, tmp_path, **TORCH_LOAD)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    a, b = ranks[0]["a"], ranks[0]["b"]

    # 1. updates after every real step (accumulation 2: iterations 1, 3, ..., 11) from
    # begin_iter on, and the average equals the reference EMA of those weights
    assert [it for it, _ in a["steps"]] == [1, 3, 5, 7, 9, 11]
    assert a["avg_steps"] == 5  # the steps at 3, 5, 7, 9, 11
    ref = _reference(a["steps"])
    exported = torch.load(tmp_path / "a" / "average.pth", weights_only=True)
    assert exported.keys() == ref.keys()
    assert all(torch.equal(exported[k], ref[k]) for k in ref)

    # 2. validation ran on the average (the model held it; its metric is the average's),
    # and the live weights came back bitwise on every rank
    for r in ranks:
        assert all(torch.equal(r["a"]["in_val"][-1][k], ref[k]) for k in ref)
        for live, after in r["a"]["restored"]:
            assert all(torch.equal(live[k], after[k]) for k in live)
    logged = a["metrics"][-1]["mse"]
    assert logged == pytest.approx(a["export_metric"], rel=1e-5)
    assert abs(logged - a["raw_metric"]) > 1e-3 * logged

    # 3. checkpoints: every rank wrote its shard beside the checkpoint file, the folder is
    # recorded in the checkpoint, and a resumed run continues the average exactly
    assert {"iter_6.pth", "iter_6.pth.distavg", "iter_12.pth", "iter_12.pth.distavg"} <= set(
        a["files"]
    )
    assert a["shards"] == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert a["meta"] == {
        "path": str(tmp_path / "a" / "iter_6.pth.distavg"),
        "type": "ExponentialMovingAverage",
        "steps": 2,
    }
    assert b["avg_steps"] == 5
    resumed = torch.load(tmp_path / "b" / "average.pth", weights_only=True)
    assert all(torch.equal(resumed[k], exported[k]) for k in exported)
    # max_keep_ckpts=1 removed iter_9.pth, and its average with it
    assert "iter_12.pth.distavg" in b["files"] and "iter_9.pth" not in b["files"]
    assert "iter_9.pth.distavg" not in b["files"]

    # 4. swap_at_end: the live weights are the average, on every rank; test ran on it
    for r in ranks:
        assert all(torch.equal(r["b"]["live"][k], resumed[k]) for k in resumed)
    assert b["metrics"][-1]["test"]["mse"] == pytest.approx(logged, rel=1e-5)
    assert all(torch.equal(b["full"][k], resumed[k]) for k in resumed)


def test_hook_registered_and_config_errors_named():
    from mmengine.registry import HOOKS

    hook = HOOKS.build(dict(type="DistAvgHook", ema_type="annealing", momentum=0.01, gamma=50))
    assert isinstance(hook, DistAvgHook) and hook.priority == "NORMAL"
    assert hook.rule.__name__ == "MomentumAnnealingEMA"
    assert DistAvgHook(dtype="float32").kwargs["dtype"] is torch.float32
    with pytest.raises(ValueError, match=r"ema_type must be one of .* got 'ExpMomentumEMA'"):
        DistAvgHook(ema_type="ExpMomentumEMA")
    with pytest.raises(ValueError, match=r"StochasticWeightAverage takes no momentum"):
        DistAvgHook(ema_type="swa", momentum=0.1)
    with pytest.raises(ValueError, match=r"passes optimizer= itself"):
        DistAvgHook(optimizer=None)
    with pytest.raises(ValueError, match=r"dtype must be one of .* got 'float64x'"):
        DistAvgHook(dtype="float64x")
    with pytest.raises(ValueError, match=r"cannot both be set, got begin_iter=1 and begin_epoch=2"):
        DistAvgHook(begin_iter=1, begin_epoch=2)
    with pytest.raises(ValueError, match=r"begin_iter must be an int >= 0, got -1"):
        DistAvgHook(begin_iter=-1)
    by_epoch = DistAvgHook(begin_epoch=2)
    assert not by_epoch._started(SimpleNamespace(epoch=0, iter=50))
    assert by_epoch._started(SimpleNamespace(epoch=1, iter=0))
    with pytest.raises(ValueError, match=r"begin_epoch must be <= runner.max_epochs \(1\), got 2"):
        by_epoch.before_train(SimpleNamespace(max_epochs=1))
    with pytest.raises(ValueError, match=r"begin_iter must be <= runner.max_iters \(3\), got 4"):
        DistAvgHook(begin_iter=4).before_train(SimpleNamespace(max_iters=3))


def test_missing_mmengine_names_the_extra(monkeypatch):
    for name in [m for m in sys.modules if m == "mmengine" or m.startswith("mmengine.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.delitem(sys.modules, "distavg.integrations.mmengine")
    with pytest.raises(ImportError, match=r"pip install 'distavg\[mmengine\]'"):
        importlib.import_module("distavg.integrations.mmengine")


if __name__ == "__main__":
    _job(Path(sys.argv[1]))
