"""The network, its DDP or FSDP2 wrapping, and its average."""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
from torch import nn

import distavg

from .config import DTYPES, RULES, rule_kwargs


def mlp(hidden: int, seed: int) -> nn.Sequential:
    """Two hidden layers; ``seed`` gives every rank the same initial weights."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(64, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, 10),
    )


def build_model(args: argparse.Namespace, device: torch.device) -> nn.Module:
    model = mlp(args.hidden, args.seed).to(device)
    if args.parallel == "ddp":
        return nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def build_optimizer(args: argparse.Namespace, model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)


def build_average(
    args: argparse.Namespace, model: nn.Module, optimizer: torch.optim.Optimizer
) -> distavg.BaseAveragedModel:
    """The averager: one line in a user's own job (``ExponentialMovingAverage(model, ...)``)."""
    return RULES[args.rule](
        model,
        **rule_kwargs(args),
        interval=args.interval,
        device="cpu" if args.offload else None,
        placement=args.placement,
        dtype=DTYPES[args.dtype] if args.dtype else None,
        async_update=args.async_update,
        optimizer=optimizer,  # the fence for --async; and no update after a skipped step
    )
