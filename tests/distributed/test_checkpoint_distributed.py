"""DCP checkpoints on real gloo ranks: each rank writes its shards once; a save at W=2
loads exactly at W=1 (no process group), 2 and 3, into either placement; async_save
snapshots; interrupted-and-resumed training equals uninterrupted bitwise (DDP, FSDP2;
synchronous and asynchronous updates)."""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from dist_utils import run_distributed
from reference import perturb, small_model, train_forward, wrap
from torch import nn
from torch.distributed.checkpoint.staging import AsyncStager, BlockingAsyncStager
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

import distavg
from distavg.export import export_checkpoint, read_checkpoint

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

STEPS = 5


def _ema(model: nn.Module, placement: str) -> distavg.BaseAveragedModel:
    return distavg.WarmupEMA(model, decay=0.9, power=0.75, interval=2, placement=placement)


def _trained(placement: str) -> tuple[nn.Module, distavg.BaseAveragedModel]:
    model = nn.parallel.DistributedDataParallel(small_model())
    avg = _ema(model, placement)
    for s in range(STEPS):
        perturb(model, s)
        train_forward(model, s)
        avg.update_parameters(model)
    return model, avg


def _fresh(placement: str) -> distavg.BaseAveragedModel:
    model = small_model(seed=7)
    if dist.is_initialized():
        model = nn.parallel.DistributedDataParallel(model)
    return _ema(model, placement)


def _check_full(avg: distavg.BaseAveragedModel, ref: dict, where: str) -> None:
    """Every rank takes part in the gather; the owner compares with the reference."""
    full = avg.full_state_dict()
    assert avg.steps == ref["steps"], where
    if full:
        assert full.keys() == ref["full"].keys(), where
        for k, v in full.items():
            assert torch.equal(v, ref["full"][k]), f"{where}: {k}"


def _local(avg: distavg.BaseAveragedModel) -> list[torch.Tensor]:
    return [v.clone() for v in avg.shards.views]


def _result(avg: distavg.BaseAveragedModel) -> dict[str, Any]:
    """Every rank's step count, and the whole average (on the owner, rank 0: {} elsewhere)."""
    steps = [None] * dist.get_world_size()
    dist.all_gather_object(steps, avg.steps)
    return {"steps": steps, "full": avg.full_state_dict()}


class _HeldStager(AsyncStager):
    """DCP's own staging (``FileSystemWriter``'s copy, which the upload then writes), run in
    the background and only once the test releases it: an update made before the release
    always races with the save, on any machine. ``log`` records when the copy was made."""

    def __init__(self, log: list[str]) -> None:
        self.log = log
        self.release = threading.Event()
        self._copy = BlockingAsyncStager()
        self._pool = ThreadPoolExecutor(1)

    def stage(self, state_dict: dict[str, Any]) -> Future:
        def staged() -> dict[str, Any]:
            assert self.release.wait(60), "the test never released the staging"
            self.log.append("staged")
            return self._copy.stage(state_dict)

        return self._pool.submit(staged)

    def close(self) -> None:
        self._pool.shutdown()
        self._copy.close()


def _shard_bytes(directory: Path, rank: int) -> int:
    return sum(p.stat().st_size for p in directory.glob(f"__{rank}_*.distcp"))


def _save_at_two(rank: int, world: int, root: str) -> None:
    root = Path(root)
    # 1. save both placements; each rank writes only what it keeps
    refs = {}
    for placement in ("sharded", "owner"):
        _, avg = _trained(placement)
        dcp.save({"ema": avg}, checkpoint_id=root / placement)
        full = avg.full_state_dict()
        refs[placement] = {"steps": avg.steps, "full": full}
        if rank == 0:
            torch.save(refs[placement], root / f"{placement}.ref.pt")
    dist.barrier()
    # each rank writes about 1/W of a model whose bytes dwarf DCP's per-tensor framing;
    # with the owner placement rank 1 writes no tensor data
    big = nn.parallel.DistributedDataParallel(nn.Linear(256, 255))
    model_bytes = sum(p.nbytes for p in big.parameters())
    written = {}
    for placement in ("sharded", "owner"):
        dcp.save({"ema": _ema(big, placement)}, checkpoint_id=root / f"big-{placement}")
        dist.barrier()
        written[placement] = [_shard_bytes(root / f"big-{placement}", r) for r in range(world)]
    assert all(0.45 < b / model_bytes < 0.55 for b in written["sharded"]), written
    assert written["owner"][0] / model_bytes > 0.98, written
    assert written["owner"][1] / model_bytes < 0.02, written

    # 2. load into the other placement, both ways (the test compares with the references)
    results = {}
    for saved, into in (("sharded", "owner"), ("owner", "sharded")):
        avg = _fresh(into)
        dcp.load({"ema": avg}, checkpoint_id=root / saved)
        results[f"{saved} -> {into}"] = _result(avg)

    # a whole-tensor state dict (owner rank's, e.g. from torch.load) loads into the sharded
    # placement without DCP: each rank takes its chunk
    _, owner = _trained("owner")
    owned = owner.state_dict()  # every rank calls it (it checks the ranks agree)
    whole = [owned if rank == 0 else None]
    dist.broadcast_object_list(whole, src=0)
    avg = _fresh("sharded")
    avg.load_state_dict(whole[0])
    results["whole state dict -> sharded"] = _result(avg)

    # 3. another rule is an error on every rank, and the average stays as it was
    model = nn.parallel.DistributedDataParallel(small_model(seed=3))
    other = distavg.WarmupEMA(model, decay=0.8, power=0.75, interval=2)
    other.update_parameters(model)
    before = _local(other)
    with pytest.raises(ValueError, match=r"checkpoint holds a .*'decay': 0.9.* but this "):
        dcp.load({"ema": other}, checkpoint_id=root / "sharded")
    assert all(torch.equal(a, b) for a, b in zip(_local(other), before, strict=True))
    assert other.steps == 1

    # 4. async_save while an update runs: the staging is held until the update is done
    model, avg = _trained("sharded")
    log: list[str] = []
    stager = _HeldStager(log)
    pending = dcp.async_save({"ema": avg}, checkpoint_id=root / "async", async_stager=stager)
    for s in range(STEPS, STEPS + 2):  # a following call, then an averaging one (interval 2)
        perturb(model, s)
        avg.update_parameters(model)
    log.append("updated")
    stager.release.set()
    pending.upload_completion.result()
    stager.close()
    results["async_save order"] = log
    results["after async_save"] = _result(avg)  # the live average, with the update
    restored = _fresh("sharded")
    dcp.load({"ema": restored}, checkpoint_id=root / "async")
    results["async_save"] = _result(restored)
    if rank == 0:
        torch.save(results, root / "results.pt")


def _load_at_three(rank: int, world: int, root: str) -> None:
    root = Path(root)
    for saved in ("sharded", "owner"):
        ref = torch.load(root / f"{saved}.ref.pt") if rank == 0 else {"steps": STEPS, "full": {}}
        for into in ("sharded", "owner"):
            avg = _fresh(into)
            dcp.load({"ema": avg}, checkpoint_id=root / saved)
            _check_full(avg, ref, f"{saved} at W=2 -> {into} at W=3")


@pytest.fixture(scope="module")
def saved_at_two(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ckpt")
    run_distributed(_save_at_two, 2, root / "spawn", str(root))
    return root


def _assert_exact(got: dict[str, Any], ref: dict[str, Any], where: str) -> None:
    assert got["steps"] == [ref["steps"]] * 2, where  # on both ranks
    assert got["full"].keys() == ref["full"].keys(), where
    for k, v in ref["full"].items():
        assert torch.equal(got["full"][k], v), f"{where}: {k}"


def test_save_at_two_ranks_loads_into_both_placements_and_async_save_snapshots(saved_at_two):
    refs = {p: torch.load(saved_at_two / f"{p}.ref.pt") for p in ("sharded", "owner")}
    got = torch.load(saved_at_two / "results.pt")
    # a save of either placement loads into the other one exactly
    _assert_exact(got["sharded -> owner"], refs["sharded"], "sharded -> owner")
    _assert_exact(got["owner -> sharded"], refs["owner"], "owner -> sharded")
    _assert_exact(got["whole state dict -> sharded"], refs["owner"], "whole -> sharded")
    # the update ran before async_save's staging copied the average, and changed it ...
    assert got["async_save order"] == ["updated", "staged"]
    after = got["after async_save"]
    assert after["steps"] == [STEPS + 2] * 2
    assert any(not torch.equal(after["full"][k], v) for k, v in refs["sharded"]["full"].items())
    # ... yet the checkpoint holds the average as it was when async_save was called
    _assert_exact(got["async_save"], refs["sharded"], "async_save")


def test_save_at_two_ranks_loads_exactly_at_three(saved_at_two, tmp_path):
    run_distributed(_load_at_three, 3, tmp_path, str(saved_at_two))


@pytest.mark.parametrize("saved", ["sharded", "owner"])
def test_save_at_two_ranks_loads_exactly_in_one_process_and_exports(saved_at_two, saved, tmp_path):
    ref = torch.load(saved_at_two / f"{saved}.ref.pt")
    avg = _fresh("sharded")
    dcp.load({"ema": avg}, checkpoint_id=saved_at_two / saved)
    _check_full(avg, ref, f"{saved} at W=2 -> one process")
    out = export_checkpoint(saved_at_two / saved, tmp_path / "avg.safetensors")
    offline = read_checkpoint(saved_at_two / saved)
    for k, v in ref["full"].items():
        assert torch.equal(offline[k], v), k
    from safetensors.torch import load_file

    fresh = small_model(seed=9)
    fresh.load_state_dict(load_file(out))
    x = torch.randn(5, 6)
    assert torch.equal(fresh.eval()(x), avg.module.eval()(x))


# -- exact resume -------------------------------------------------------------------

RULES = [
    (distavg.ExponentialMovingAverage, {"momentum": 0.3, "interval": 2}),
    (distavg.StochasticWeightAverage, {"interval": 2, "placement": "owner"}),
    (distavg.MomentumAnnealingEMA, {"momentum": 0.05, "gamma": 4}),
    (distavg.WarmupEMA, {"decay": 0.99, "power": 0.75, "update_buffers": True}),
    (distavg.PowerEMA, {"sigma_rel": 0.1, "placement": "owner"}),
    (distavg.HalfLifeEMA, {"half_life": 3.0, "rampup": 0.5}),
]


def _train(model, optim, avgs, start: int, stop: int) -> None:
    model.train()
    for s in range(start, stop):
        # the same batch on every rank: DDP ranks' BatchNorm statistics then agree, so the
        # one copy of them that DCP saves is every rank's
        gen = torch.Generator().manual_seed(100 * s)
        x, y = torch.randn(8, 6, generator=gen), torch.randn(8, 2, generator=gen)
        optim.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        optim.step()
        for avg in avgs:
            avg.update_parameters(model)


def _run(kind: str, world: int, seed: int, async_update: bool = False):
    model = wrap(kind, small_model(seed), world)
    optim = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    mode = {"async_update": True, "optimizer": optim} if async_update else {}
    avgs = [cls(model, **kw, **mode) for cls, kw in RULES]
    return model, optim, avgs


def _resume(rank: int, world: int, root: str, k: int, total: int) -> None:
    for kind in ("ddp", "fsdp2"):
        model, optim, whole = _run(kind, world, seed=0)  # synchronous, uninterrupted
        _train(model, optim, whole, 0, total)
        for async_update in (False, True):
            where = f"{root}/{kind}-{async_update}"
            model, optim, part = _run(kind, world, seed=0, async_update=async_update)
            _train(model, optim, part, 0, k)
            msd, osd = get_state_dict(model, optim)
            state = {"model": msd, "optim": osd, **{f"ema{i}": a for i, a in enumerate(part)}}
            dcp.save(state, checkpoint_id=where)

            # other weights, another optimizer state, a fresh average
            model, optim, resumed = _run(kind, world, seed=11, async_update=async_update)
            _train(model, optim, [], 0, 1)
            msd, osd = get_state_dict(model, optim)
            state = {"model": msd, "optim": osd, **{f"ema{i}": a for i, a in enumerate(resumed)}}
            dcp.load(state, checkpoint_id=where)
            set_state_dict(
                model, optim, model_state_dict=state["model"], optim_state_dict=state["optim"]
            )
            _train(model, optim, resumed, k, total)

            for (cls, _), a, b in zip(RULES, whole, resumed, strict=True):
                b.wait()
                assert a.steps == b.steps == total
                for i, (x, y) in enumerate(zip(a.shards.views, b.shards.views, strict=True)):
                    key = a.shards.slots[i].key
                    assert torch.equal(x, y), f"{kind} async={async_update} {cls.__name__}: {key}"
            for avg in part + resumed:
                avg.close()


def test_interrupted_and_resumed_equals_uninterrupted_bitwise_ddp_and_fsdp2_sync_and_async(
    tmp_path,
):
    run_distributed(_resume, 2, tmp_path, str(tmp_path), 3, 7)
