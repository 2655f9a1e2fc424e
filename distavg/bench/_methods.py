"""The update methods the tables compare, each built once and returned as a step to time."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .. import ExponentialMovingAverage
from ._common import MOMENTUM


def distavg_step(model: nn.Module, **kwargs: object) -> Callable[[], None]:
    """distavg's EMA of ``model`` (``kwargs`` as the constructor takes them), update + wait."""
    ema = ExponentialMovingAverage(model, momentum=MOMENTUM, **kwargs)
    ema.update_parameters(model)  # the first call copies

    def step() -> None:
        ema.update_parameters(model)
        ema.wait()

    return step


def torch_foreach_step(model: nn.Module) -> Callable[[], object]:
    """torch's ``AveragedModel`` with ``get_ema_multi_avg_fn`` (its foreach path)."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    avg = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(1 - MOMENTUM))
    avg.update_parameters(model)  # the first call copies
    return lambda: avg.update_parameters(model)


def per_tensor_step(model: nn.Module, dtype: torch.dtype | None = None) -> Callable[[], object]:
    """The seed's way: one ``lerp_`` per tensor (casting first when dtypes differ)."""
    srcs = [p.detach() for p in model.parameters()]
    avgs = [s.to(dtype or s.dtype, copy=True) for s in srcs]
    if dtype is None or dtype == srcs[0].dtype:
        return lambda: [a.lerp_(s, MOMENTUM) for a, s in zip(avgs, srcs, strict=True)]
    return lambda: [a.lerp_(s.to(dtype), MOMENTUM) for a, s in zip(avgs, srcs, strict=True)]
