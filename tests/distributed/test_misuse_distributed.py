"""Misuse a real multi-rank job makes ends in a correct average or a clear error, never a
silently wrong one: each case on real gloo ranks."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from dist_utils import run_distributed
from reference import perturb, small_model, train_forward, wrap
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import distavg
from distavg import swap


def _live(model) -> dict[str, torch.Tensor]:
    module = getattr(model, "module", model)
    return {
        k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
        for k, v in module.state_dict().items()
    }


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _built_before_fully_shard(rank: int, world: int) -> None:
    model = small_model()
    avg = distavg.ExponentialMovingAverage(model, momentum=0.5)
    sharded = wrap("fsdp2", model, world)
    perturb(sharded, 0)
    with pytest.raises(ValueError, match=r"build the average after fully_shard\(model\)"):
        avg.update_parameters(sharded)


def _updated_on_one_rank_only(rank: int, world: int, ckpt: str) -> None:
    model = wrap("ddp", small_model(), world)
    avg = distavg.ExponentialMovingAverage(model, momentum=0.5)
    for step in range(3):
        perturb(model, step)
        if rank == 0 or step < 1:  # the "EMA work on rank 0" habit
            avg.update_parameters(model)
    counts = r"different step counts \(rank 0: 3, rank 1: 1\)"
    with pytest.raises(RuntimeError, match=r"full_state_dict\(\): .*" + counts):
        avg.full_state_dict()
    before = _live(model)
    with pytest.raises(RuntimeError, match=r"swapped\(\): .*" + counts), avg.swapped(model):
        pass
    assert _equal(_live(model), before)
    with pytest.raises(RuntimeError, match=r"state_dict\(\) \(a checkpoint save.*" + counts):
        dcp.save({"ema": avg}, checkpoint_id=ckpt)
    avg.close()


def _swap_setup_fails_and_leaves_the_model(rank: int, world: int) -> None:
    for kind, placement, target in [
        ("ddp", "sharded", "ChunkComm.all_gather"),
        ("ddp", "owner", "broadcast_tensors"),
        ("fsdp2", "owner", "ChunkComm.scatter"),
    ]:
        model = wrap(kind, small_model(), world)
        avg = distavg.ExponentialMovingAverage(model, momentum=0.5, placement=placement)
        for step in range(2):
            perturb(model, step)
            train_forward(model, step)
            avg.update_parameters(model)
        perturb(model, 5)
        before = _live(model)

        def peer_died(*args, **kwargs):
            raise RuntimeError("Connection closed by peer")

        if "." in target:
            cls, name = target.split(".")
            saved = getattr(getattr(swap, cls), name)
            setattr(getattr(swap, cls), name, peer_died)
        else:
            saved = getattr(swap, target)
            setattr(swap, target, peer_died)
        try:
            with (
                pytest.raises(RuntimeError, match="Connection closed by peer"),
                avg.swapped(model),
            ):
                pytest.fail("entered the block although the swap failed")
        finally:
            if "." in target:
                setattr(getattr(swap, cls), name, saved)
            else:
                setattr(swap, target, saved)
        assert _equal(_live(model), before), (kind, placement)
        with avg.swapped(model):  # and the swap still works afterwards
            pass
        assert _equal(_live(model), before), (kind, placement)
        avg.close()


def _owner_group_destroyed_on_close(rank: int, world: int) -> None:
    model = wrap("fsdp2", small_model(), world)
    avg = distavg.ExponentialMovingAverage(model, momentum=0.5, placement="owner")
    group = avg._group
    assert group is not None and group in dist.distributed_c10d._world.pg_map
    avg.close()
    assert group not in dist.distributed_c10d._world.pg_map


def _avg_fns_on_chunks(rank: int, world: int) -> None:
    # torch's multi_avg_fn and mmengine's avg_func run on each rank's chunk: bitwise equal to
    # torch's AveragedModel in one process.
    fn = get_ema_multi_avg_fn(0.8)
    for kind in ("ddp", "fsdp2"):
        for placement in ("sharded", "owner"):
            plain = small_model()
            ref = AveragedModel(plain, multi_avg_fn=fn)
            model = wrap(kind, small_model(), world)
            avg = distavg.BaseAveragedModel(model, multi_avg_fn=fn, placement=placement)
            for step in range(4):
                perturb(plain, step)
                perturb(model, step)
                ref.update_parameters(plain)
                avg.update_parameters(model)
            got = avg.full_state_dict()
            if rank == 0:
                for name, p in ref.module.named_parameters():
                    assert torch.equal(got[name], p), (kind, placement, name)
            avg.close()


def _misuse_body(rank: int, world: int, tmp: str) -> None:
    _avg_fns_on_chunks(rank, world)
    _built_before_fully_shard(rank, world)
    _updated_on_one_rank_only(rank, world, os.path.join(tmp, "ckpt"))
    _swap_setup_fails_and_leaves_the_model(rank, world)
    _owner_group_destroyed_on_close(rank, world)


def test_misuse_on_two_ranks_raises_or_stays_exact(tmp_path):
    run_distributed(_misuse_body, 2, tmp_path / "spawn", str(tmp_path))


def _one_rank_calls_a_collective(rank: int, world: int, tmp: str) -> None:
    # Built before init_process_group: a whole copy on each rank, and a warning saying so.
    store_dir = Path(tmp)
    dist.destroy_process_group()
    model = small_model()
    early = distavg.ExponentialMovingAverage(model, momentum=0.5)
    store = dist.FileStore(str(store_dir / "store-2"), world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    with pytest.warns(UserWarning, match="built before init_process_group: it is a whole copy"):
        early.update_parameters(wrap("ddp", model, world))
    # A collective called inside `if rank == 0:` fails within the timeout, naming rank 1.
    os.environ["DISTAVG_COLLECTIVE_TIMEOUT"] = "3"
    avg = distavg.ExponentialMovingAverage(wrap("ddp", small_model(), world), momentum=0.5)
    if rank == 0:
        with pytest.raises(
            RuntimeError, match=r"full_state_dict\(\) is a collective: every rank must call it"
        ) as info:
            avg.full_state_dict()
        assert "1" in str(info.value.__cause__)  # gloo names the rank that did not arrive
    # A fresh group for what follows: the timed-out barrier may leave the old one unusable.
    dist.destroy_process_group()
    store = dist.FileStore(str(store_dir / "store-3"), world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        avg.close()
        early.close()


def test_collective_on_one_rank_fails_in_bounded_time_and_early_average_warns(tmp_path):
    run_distributed(_one_rank_calls_a_collective, 2, tmp_path / "spawn", str(tmp_path))
