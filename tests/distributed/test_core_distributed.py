"""Sharded and owner averages under DDP and FSDP2 on real gloo ranks equal the
single-process reference; each rank keeps 1/W of the model; swapped restores bitwise."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from dist_utils import run_distributed
from reference import ReferenceAverage, perturb, small_model, train_forward, wrap
from torch import nn

import distavg


def _full_live_state(kind: str, wrapped: nn.Module) -> dict[str, torch.Tensor]:
    module = wrapped.module if kind == "ddp" else wrapped
    out = {}
    for k, v in module.state_dict().items():
        out[k] = (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
    return out


CASES = [
    # (rule class, kwargs, interval, update_buffers, reference weight)
    (distavg.ExponentialMovingAverage, {"momentum": 0.2}, 1, False, lambda s: 0.2),
    (distavg.StochasticWeightAverage, {}, 3, True, lambda s: 1 / (s // 3 + 1)),
    (
        distavg.MomentumAnnealingEMA,
        {"momentum": 0.1, "gamma": 3},
        1,
        True,
        lambda s: max(0.1, 3 / (3 + s)),
    ),
]


def _core_body(rank: int, world: int) -> None:
    model_bytes = sum(v.numel() * v.element_size() for v in small_model().state_dict().values())
    for kind in ("ddp", "fsdp2"):
        for placement in ("sharded", "owner"):
            for cls, kw, interval, update_buffers, weight in CASES:
                model = wrap(kind, small_model(), world)
                avg = cls(
                    model,
                    interval=interval,
                    update_buffers=update_buffers,
                    placement=placement,
                    **kw,
                )
                reference_model = small_model()
                ref = ReferenceAverage(reference_model, weight, interval, update_buffers)
                for step in range(7):
                    for m in (model, reference_model):
                        perturb(m, step)
                        train_forward(m, step)
                    avg.update_parameters(model)
                    ref.update(reference_model)
                case = f"{kind}/{placement}/{cls.__name__}"
                full = avg.full_state_dict()
                if rank == 0:
                    assert full.keys() == ref.avg.keys(), case
                    for k, v in ref.avg.items():
                        torch.testing.assert_close(
                            full[k], v, rtol=1e-6, atol=1e-6, msg=f"{case} {k}"
                        )
                else:
                    assert full == {}, case
                # memory: a chunk per rank (sharded), all or nothing (owner)
                held = avg.shards.nbytes
                if placement == "sharded":
                    padding = 64 * 2 * len(avg.shards.slots) + 8
                    assert held <= model_bytes / world + padding, (case, held, model_bytes)
                else:
                    assert (held > 0) == (rank == 0), (case, held)
                # swapped: the live model holds the average, then its own values bitwise
                own = _full_live_state(kind, model)
                with avg.swapped(model):
                    inside = _full_live_state(kind, model)
                    if rank == 0:
                        for k, v in ref.avg.items():
                            torch.testing.assert_close(
                                inside[k], v, rtol=1e-6, atol=1e-6, msg=f"swap {case} {k}"
                            )
                after = _full_live_state(kind, model)
                for k in own:
                    assert torch.equal(own[k], after[k]), f"restore {case} {k}"
                # the exception path restores too
                try:
                    with avg.swapped(model):
                        raise KeyError("boom")
                except KeyError:
                    pass
                after = _full_live_state(kind, model)
                for k in own:
                    assert torch.equal(own[k], after[k]), f"restore on exception {case} {k}"
                # forward / module only where the whole average lives
                if placement == "sharded" or kind == "fsdp2" or rank != 0:
                    try:
                        _ = avg.module
                        raise AssertionError("module should be unavailable")
                    except RuntimeError as e:
                        assert "holds no whole averaged module" in str(e)
                else:
                    assert torch.equal(avg.module[0].weight, full["0.weight"])


def _rank_local_buffers(rank: int, world: int) -> None:
    """Each rank's forward updates its own BatchNorm statistics: the average keeps the
    owner's, and swapped gives every rank its own back."""
    for kind in ("ddp", "fsdp2"):
        for placement in ("sharded", "owner"):
            model = wrap(kind, small_model(), world)
            avg = distavg.ExponentialMovingAverage(model, momentum=0.3, placement=placement)
            for step in range(3):
                perturb(model, step)
                train_forward(model, step + 100 * rank)  # another batch on every rank
                avg.update_parameters(model)
            own = _full_live_state(kind, model)
            full = avg.full_state_dict()
            if rank == 0:
                for k in ("1.running_mean", "1.running_var", "1.num_batches_tracked"):
                    assert torch.equal(full[k], own[k]), (kind, placement, k)
            with avg.swapped(model):
                inside = _full_live_state(kind, model)
            gathered = [None] * world
            dist.all_gather_object(gathered, inside["1.running_mean"])
            assert all(torch.equal(g, gathered[0]) for g in gathered), "one average everywhere"
            after = _full_live_state(kind, model)
            for k in own:
                assert torch.equal(own[k], after[k]), f"restore {kind}/{placement} {k}"


def _errors_body(rank: int, world: int) -> None:
    from torch.distributed.fsdp import FullyShardedDataParallel

    model = small_model()
    try:
        distavg.ExponentialMovingAverage(model, owner_rank=world, placement="owner")
        raise AssertionError("expected an owner_rank error")
    except ValueError as e:
        assert f"owner_rank must be a rank in [0, {world}), got {world}" in str(e)
    fsdp1 = FullyShardedDataParallel(small_model(), device_id=torch.device("cpu"))
    try:
        distavg.ExponentialMovingAverage(fsdp1)
        raise AssertionError("expected an FSDP1 error")
    except ValueError as e:
        assert "FullyShardedDataParallel (FSDP1)" in str(e) and "fully_shard" in str(e)
    ddp = nn.parallel.DistributedDataParallel(small_model())
    avg = distavg.ExponentialMovingAverage(ddp, momentum=0.5)
    avg.update_parameters(ddp)
    before = {i: v.clone() for i, v in enumerate(avg.shards.views)}
    dist.barrier()
    dist.destroy_process_group()
    for call in (lambda: avg.update_parameters(ddp), avg.full_state_dict):
        try:
            call()
            raise AssertionError("expected a process-group error")
        except RuntimeError as e:
            assert "process group this average was built with (world size" in str(e)
            assert "is gone" in str(e)
    for i, v in before.items():
        assert torch.equal(v, avg.shards.views[i])


def _core_and_buffers(rank: int, world: int) -> None:
    _core_body(rank, world)
    _rank_local_buffers(rank, world)


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_and_owner_match_single_process(world, tmp_path):
    run_distributed(_core_and_buffers, world, tmp_path)


def test_distributed_errors(tmp_path):
    run_distributed(_errors_body, 2, tmp_path)
