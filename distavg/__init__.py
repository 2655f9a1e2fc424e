"""distavg: a running average of a model's weights, sharded across ranks."""

from __future__ import annotations

from ._kernels import set_fused_upcast
from .averaged import BaseAveragedModel
from .rules import (
    ExponentialMovingAverage,
    HalfLifeEMA,
    MomentumAnnealingEMA,
    PowerEMA,
    StochasticWeightAverage,
    WarmupEMA,
    sigma_rel_to_gamma,
)

__version__ = "0.1.0"

__all__ = [
    "BaseAveragedModel",
    "ExponentialMovingAverage",
    "HalfLifeEMA",
    "MomentumAnnealingEMA",
    "PowerEMA",
    "StochasticWeightAverage",
    "WarmupEMA",
    "__version__",
    "set_fused_upcast",
    "sigma_rel_to_gamma",
]
