"""Plain per-tensor references the library is tested against, and small test models."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def small_model(seed: int = 0) -> nn.Module:
    """Linear + BatchNorm (float and int64 buffers) + Linear."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(6, 10), nn.BatchNorm1d(10), nn.ReLU(), nn.Linear(10, 2)
    )  # 2 rows: empty chunks at W=3


class ReferenceAverage:
    """The seed's numerics as a plain loop over ``state_dict()`` tensors.

    Call 0 copies everything; every ``interval``-th call lerps averaged tensors (float
    params, and float buffers with ``update_buffers``) with ``weight(steps)``; tensors that
    are not averaged (buffers without ``update_buffers``, integer tensors) are copied on
    every call.
    """

    def __init__(
        self,
        model: nn.Module,
        weight: Callable[[int], float],
        interval: int = 1,
        update_buffers: bool = False,
    ) -> None:
        self.avg = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.params = {k for k, _ in model.named_parameters()}
        self.weight, self.interval, self.update_buffers = weight, interval, update_buffers
        self.steps = 0

    def update(self, model: nn.Module) -> None:
        for k, v in model.state_dict().items():
            averaged = v.is_floating_point() and (k in self.params or self.update_buffers)
            if self.steps == 0 or not averaged:
                self.avg[k].copy_(v)
            elif self.steps % self.interval == 0:
                self.avg[k].lerp_(v.to(self.avg[k].dtype), self.weight(self.steps))
        self.steps += 1


def perturb(model: nn.Module, step: int, full_shapes: dict[str, torch.Size] | None = None) -> None:
    """A deterministic stand-in for an optimizer step: add seeded noise to every parameter.

    Works on plain, DDP and FSDP2 models alike: the noise is drawn for the whole tensor and
    each rank adds its own chunk of it.
    """
    from torch.distributed.tensor import DTensor

    from distavg.shards import chunk_bounds

    gen = torch.Generator().manual_seed(1000 + step)
    module = getattr(model, "module", model)
    with torch.no_grad():
        for _, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * 0.1
            if isinstance(p, DTensor):
                mesh = p.device_mesh
                a, b = chunk_bounds(p.shape, mesh.size(), mesh.get_local_rank())
                local = p.to_local()
                local.view(-1).add_(noise.view(-1)[a:b].to(local.dtype))
            else:
                p.add_(noise.to(p.dtype))


def train_forward(model: nn.Module, step: int) -> None:
    """A forward pass in train mode (updates BatchNorm statistics), same input on every rank."""
    gen = torch.Generator().manual_seed(2000 + step)
    x = torch.randn(8, 6, generator=gen)
    model.train()
    with torch.no_grad():
        model(x)
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():  # as after a backward: FSDP2 parameters sharded again
        if isinstance(m, FSDPModule):
            m.reshard()


def wrap(kind: str, model: nn.Module, world: int) -> nn.Module:
    """``model`` under DDP (``kind="ddp"``) or FSDP2 (each Linear and the root sharded)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if kind == "ddp":
        return nn.parallel.DistributedDataParallel(model)
    mesh = init_device_mesh("cpu", (world,))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def all_rules() -> list[tuple[type, dict]]:
    """One instance of every rule with parameters that make each update visible."""
    import distavg

    return [
        (distavg.StochasticWeightAverage, {}),
        (distavg.ExponentialMovingAverage, {"momentum": 0.1}),
        (distavg.MomentumAnnealingEMA, {"momentum": 0.01, "gamma": 10}),
        (distavg.WarmupEMA, {"decay": 0.99}),
        (distavg.PowerEMA, {"sigma_rel": 0.1}),
        (distavg.HalfLifeEMA, {"half_life": 5.0}),
    ]


def flats(avg) -> dict[torch.dtype, torch.Tensor]:
    """A copy of the average's flat buffer per dtype, once every pending update is applied."""
    avg.wait()
    return {d: g.flat.clone() for d, g in avg.shards.groups.items()}


def assert_bitwise(a: dict, b: dict) -> None:
    """Two :func:`flats` results hold the same bits."""
    assert a.keys() == b.keys()
    for d in a:
        assert torch.equal(a[d], b[d]), f"{d} differs"
