"""Averaging rules: each is only a weight schedule ``w(steps)``.

Every rule updates ``avg <- avg + w * (src - avg)`` on averaging calls (``steps`` is the
0-based call count; call 0 copies the source; later calls average when
``steps % interval == 0``). A custom rule subclasses :class:`BaseAveragedModel` and
overrides ``weight(steps)`` (and ``hparams()`` if it has parameters worth checking on
load).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ._args import SeedArgumentError, positive
from .averaged import BaseAveragedModel


class StochasticWeightAverage(BaseAveragedModel):
    """Stochastic weight averaging (Izmailov et al., 2018): the plain mean of the samples.

    ``w = 1 / (steps // interval + 1)``: after ``n`` averaging calls the average is the
    mean of the first sample and the ``n`` averaged ones.
    """

    def weight(self, steps: int) -> float:
        return 1.0 / (steps // self.interval + 1)


class ExponentialMovingAverage(BaseAveragedModel):
    """Exponential moving average with a constant weight of the new value.

    ``w = momentum``; ``momentum`` is ``1 - decay`` (0.0002 is a decay of 0.9998).

    Args:
        model: the model being trained.
        momentum: weight of the new value, in (0, 1). Values above 0.5 are almost always
            a decay passed by mistake, and warn.
        interval, device, update_buffers, placement, owner_rank, dtype, async_update,
            optimizer: see :class:`BaseAveragedModel`.
    """

    def __init__(
        self,
        model: nn.Module,
        momentum: float = 0.0002,
        interval: int = 1,
        device: torch.device | str | None = None,
        update_buffers: bool = False,
        *,
        placement: str = "sharded",
        owner_rank: int = 0,
        dtype: torch.dtype | None = None,
        async_update: bool = False,
        optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None = None,
    ) -> None:
        _check_momentum(momentum)
        self.momentum = momentum
        super().__init__(
            model,
            interval,
            device,
            update_buffers,
            placement=placement,
            owner_rank=owner_rank,
            dtype=dtype,
            async_update=async_update,
            optimizer=optimizer,
        )

    def weight(self, steps: int) -> float:
        return self.momentum

    def hparams(self) -> dict[str, Any]:
        return {**super().hparams(), "momentum": self.momentum}


def _check_momentum(momentum: float) -> None:
    if (
        isinstance(momentum, bool)
        or not isinstance(momentum, int | float)
        or not (0.0 < momentum < 1.0)
    ):
        raise SeedArgumentError(f"momentum must be in (0, 1), got {momentum!r}")
    if momentum > 0.5:
        warnings.warn(
            f"momentum={momentum} is the weight of the new value (1 - decay); values above "
            f"0.5 usually mean a decay was passed: did you mean momentum={1 - momentum:.4g}?",
            stacklevel=3,
        )


class MomentumAnnealingEMA(ExponentialMovingAverage):
    """EMA whose weight anneals from 1 down to ``momentum``.

    ``w = max(momentum, gamma / (gamma + steps))``: early averages follow the model
    closely; after about ``gamma / momentum`` calls the weight settles at ``momentum``.
    """

    def __init__(
        self,
        model: nn.Module,
        momentum: float = 0.0002,
        gamma: int = 100,
        interval: int = 1,
        device: torch.device | str | None = None,
        update_buffers: bool = False,
        *,
        placement: str = "sharded",
        owner_rank: int = 0,
        dtype: torch.dtype | None = None,
        async_update: bool = False,
        optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None = None,
    ) -> None:
        positive("gamma", gamma, SeedArgumentError)
        self.gamma = gamma
        super().__init__(
            model,
            momentum,
            interval,
            device,
            update_buffers,
            placement=placement,
            owner_rank=owner_rank,
            dtype=dtype,
            async_update=async_update,
            optimizer=optimizer,
        )

    def weight(self, steps: int) -> float:
        return max(self.momentum, self.gamma / (self.gamma + steps))

    def hparams(self) -> dict[str, Any]:
        return {**super().hparams(), "gamma": self.gamma}


class WarmupEMA(BaseAveragedModel):
    """EMA with the warm-up of timm's ``ModelEmaV3`` and diffusers' ``EMAModel``.

    ``decay_t = clamp(1 - (1 + steps / inv_gamma) ** -power, min_decay, decay)``,
    ``w = 1 - decay_t``. With ``inv_gamma=1``, ``power=2/3`` reaches a decay of 0.999 at
    ~31.6k steps and 0.9999 at ~1M, so it suits long runs; ``power=3/4`` reaches them at
    10k and 215k, so it suits shorter ones (timm's advice).

    Args:
        decay: the largest decay (the weight never drops below ``1 - decay``).
        inv_gamma: warm-up time scale in calls.
        power: warm-up exponent.
        min_decay: the smallest decay.
    """

    def __init__(
        self,
        model: nn.Module,
        decay: float = 0.9999,
        inv_gamma: float = 1.0,
        power: float = 2 / 3,
        min_decay: float = 0.0,
        interval: int = 1,
        device: torch.device | str | None = None,
        update_buffers: bool = False,
        *,
        placement: str = "sharded",
        owner_rank: int = 0,
        dtype: torch.dtype | None = None,
        async_update: bool = False,
        optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None = None,
    ) -> None:
        if not (isinstance(decay, int | float) and 0.0 < decay < 1.0):
            raise ValueError(f"decay must be in (0, 1), got {decay!r}")
        if not (isinstance(min_decay, int | float) and 0.0 <= min_decay <= decay):
            raise ValueError(f"min_decay must be in [0, decay={decay}], got {min_decay!r}")
        positive("inv_gamma", inv_gamma)
        positive("power", power)
        self.decay, self.inv_gamma, self.power, self.min_decay = decay, inv_gamma, power, min_decay
        super().__init__(
            model,
            interval,
            device,
            update_buffers,
            placement=placement,
            owner_rank=owner_rank,
            dtype=dtype,
            async_update=async_update,
            optimizer=optimizer,
        )

    def weight(self, steps: int) -> float:
        decay = 1.0 - (1.0 + steps / self.inv_gamma) ** -self.power
        return 1.0 - min(max(decay, self.min_decay), self.decay)

    def hparams(self) -> dict[str, Any]:
        return {
            **super().hparams(),
            "decay": self.decay,
            "inv_gamma": self.inv_gamma,
            "power": self.power,
            "min_decay": self.min_decay,
        }


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The power-function exponent with relative width ``sigma_rel`` (EDM2, eq. 3).

    Solves ``sigma_rel = sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))``, which
    decreases from 0.2887 at ``gamma = 0``; so ``sigma_rel`` must be in (0, 0.2887).
    """
    limit = math.sqrt(1 / 12)
    if not (isinstance(sigma_rel, int | float) and 0.0 < sigma_rel < limit):
        raise ValueError(f"sigma_rel must be in (0, {limit:.4f}), got {sigma_rel!r}")

    def width(g: float) -> float:
        return math.sqrt((g + 1) / ((g + 2) ** 2 * (g + 3)))

    lo, hi = 0.0, 1.0
    while width(hi) > sigma_rel:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if width(mid) > sigma_rel else (lo, mid)
    return (lo + hi) / 2


class PowerEMA(BaseAveragedModel):
    """Power-function EMA (Karras et al., 2024, "Analyzing and Improving the Training
    Dynamics of Diffusion Models", EDM2).

    With ``t = steps + 1`` training steps seen, the average weights step ``tau`` by
    ``tau ** gamma``; per step ``beta = (1 - 1/t) ** (gamma + 1)``. Averaging only every
    ``interval`` steps keeps that profile: ``beta = (t_prev / t) ** (gamma + 1)`` with
    ``t_prev = t - interval``, and ``w = 1 - beta``.

    Args:
        sigma_rel: relative width of the profile (EDM2's 0.05–0.10 are typical); or
        gamma: the exponent directly (exactly one of the two).
    """

    def __init__(
        self,
        model: nn.Module,
        sigma_rel: float | None = None,
        gamma: float | None = None,
        interval: int = 1,
        device: torch.device | str | None = None,
        update_buffers: bool = False,
        *,
        placement: str = "sharded",
        owner_rank: int = 0,
        dtype: torch.dtype | None = None,
        async_update: bool = False,
        optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None = None,
    ) -> None:
        if (sigma_rel is None) == (gamma is None):
            raise ValueError(
                f"pass exactly one of sigma_rel and gamma, got sigma_rel={sigma_rel!r}, "
                f"gamma={gamma!r}"
            )
        if gamma is None:
            gamma = sigma_rel_to_gamma(sigma_rel)
        else:
            positive("gamma", gamma, SeedArgumentError)
        self.sigma_rel, self.gamma = sigma_rel, float(gamma)
        super().__init__(
            model,
            interval,
            device,
            update_buffers,
            placement=placement,
            owner_rank=owner_rank,
            dtype=dtype,
            async_update=async_update,
            optimizer=optimizer,
        )

    def weight(self, steps: int) -> float:
        t = steps + 1
        return 1.0 - ((t - self.interval) / t) ** (self.gamma + 1)

    def hparams(self) -> dict[str, Any]:
        return {**super().hparams(), "gamma": self.gamma}


class HalfLifeEMA(BaseAveragedModel):
    """EMA given by its half-life in training steps (Karras et al., 2022, EDM).

    ``w = 1 - 0.5 ** (interval / h)`` with ``h = half_life``, or during the ramp-up
    ``h = min(half_life, rampup * steps)``: the old average's weight halves every ``h``
    steps whatever the interval.

    Args:
        half_life: the half-life in calls of ``update_parameters`` (> 0).
        rampup: optional ramp-up ratio (EDM uses 0.05): the half-life never exceeds this
            fraction of the steps so far, so early averages do not remember the random
            initialisation.
    """

    def __init__(
        self,
        model: nn.Module,
        half_life: float = 1000.0,
        rampup: float | None = None,
        interval: int = 1,
        device: torch.device | str | None = None,
        update_buffers: bool = False,
        *,
        placement: str = "sharded",
        owner_rank: int = 0,
        dtype: torch.dtype | None = None,
        async_update: bool = False,
        optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None = None,
    ) -> None:
        positive("half_life", half_life)
        if rampup is not None:
            positive("rampup", rampup)
        self.half_life, self.rampup = half_life, rampup
        super().__init__(
            model,
            interval,
            device,
            update_buffers,
            placement=placement,
            owner_rank=owner_rank,
            dtype=dtype,
            async_update=async_update,
            optimizer=optimizer,
        )

    def weight(self, steps: int) -> float:
        h = self.half_life if self.rampup is None else min(self.half_life, self.rampup * steps)
        return 1.0 - 0.5 ** (self.interval / h)

    def hparams(self) -> dict[str, Any]:
        return {**super().hparams(), "half_life": self.half_life, "rampup": self.rampup}


# Each rule by its short name (the job's --rule, the integrations' rule=); its class name
# is accepted too (mmengine's configs name the class).
RULES: dict[str, type[BaseAveragedModel]] = {
    "ema": ExponentialMovingAverage,
    "annealing": MomentumAnnealingEMA,
    "swa": StochasticWeightAverage,
    "warmup": WarmupEMA,
    "power": PowerEMA,
    "halflife": HalfLifeEMA,
}


def rule_class(rule: str | type[BaseAveragedModel], name: str = "rule") -> type[BaseAveragedModel]:
    """The rule ``rule`` names: a short name of :data:`RULES`, a class name, or a class.

    Args:
        rule: what the user passed.
        name: the argument's name, for the error.
    """
    if isinstance(rule, type) and issubclass(rule, BaseAveragedModel):
        return rule
    by_class = {cls.__name__: cls for cls in RULES.values()}
    if isinstance(rule, str) and (rule in RULES or rule in by_class):
        return RULES.get(rule) or by_class[rule]
    raise ValueError(
        f"{name} must be one of {list(RULES)}, a class name {list(by_class)}, or a "
        f"distavg.BaseAveragedModel subclass, got {rule!r}"
    )
