"""distavg: a running average of a model's weights, sharded across ranks."""

from __future__ import annotations

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
    "sigma_rel_to_gamma",
]
