"""The averager's arguments, checked: each error names the argument, the value and what is allowed."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import torch

PLACEMENTS = ("sharded", "owner")
# The dtypes ``lerp_`` (and the fused kernels) accept for the average.
LERP_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class SeedArgumentError(ValueError, AssertionError):
    """A bad ``momentum``, ``gamma`` or ``interval``: mmengine raises ``AssertionError`` for
    these, so code that catches it keeps working; it is a ``ValueError`` like every other
    argument error here."""


def positive(name: str, value: Any, error: type[ValueError] = ValueError) -> None:
    """``value`` is a finite real number > 0."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or not value > 0
    ):
        raise error(f"{name} must be a finite number > 0, got {value!r}")


def check_options(
    interval: Any, update_buffers: Any, placement: Any, dtype: Any, async_update: Any
) -> None:
    if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
        raise SeedArgumentError(f"interval must be an integer >= 1, got {interval!r}")
    if not isinstance(update_buffers, bool):
        raise ValueError(f"update_buffers must be True or False, got {update_buffers!r}")
    if not isinstance(async_update, bool):
        raise ValueError(f"async_update must be True or False, got {async_update!r}")
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
    if dtype is not None and dtype not in LERP_DTYPES:
        raise ValueError(
            f"dtype must be None or one of {_names(LERP_DTYPES)} (the dtypes the update can "
            f"lerp in), got {dtype!r}"
        )


def check_owner_rank(owner_rank: Any, world: int) -> None:
    if (
        isinstance(owner_rank, bool)
        or not isinstance(owner_rank, int)
        or not 0 <= owner_rank < world
    ):
        raise ValueError(f"owner_rank must be a rank in [0, {world}), got {owner_rank!r}")


def optimizers(optimizer: Any, async_update: bool) -> list[torch.optim.Optimizer]:
    """``optimizer`` (one, a list or tuple of them, or None) as a list."""
    opts = list(optimizer) if isinstance(optimizer, list | tuple) else [optimizer]
    if optimizer is None:
        opts = []
    for o in opts:
        if not isinstance(o, torch.optim.Optimizer):
            raise ValueError(
                f"optimizer must be a torch.optim.Optimizer, a list of them, or None, got "
                f"{type(o).__name__}"
            )
    if async_update and not opts:
        raise ValueError(
            "async_update=True needs optimizer=<the model's optimizer(s)>, got "
            f"optimizer={optimizer!r}: the update is fenced before the optimizer's next "
            "step() by a step pre-hook"
        )
    return opts


def resolve_device(device: Any, params: torch.device) -> torch.device:
    """Where the average lives: beside the parameters (None), or in host memory ("cpu").

    An accelerator named without an index (``"cuda"``) means the parameters' own device.
    """
    if device is None:
        return params
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        dev = None
    allowed = f"None, 'cpu' or the parameters' device {str(params)!r}"
    if dev is None or dev.type == "meta":
        raise ValueError(f"device must be {allowed}, got {device!r}")
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type != params.type or (dev.index is not None and dev.index != params.index):
        hint = ""
        if dev.type != "cpu" and not torch.get_device_module(dev.type).is_available():
            hint = f" ({dev.type} is not available here)"
        raise ValueError(f"device must be {allowed}, got {device!r}{hint}")
    return params


def check_lerp_dtypes(keys: Sequence[str], dtypes: Sequence[torch.dtype]) -> None:
    """Every averaged tensor's average dtype is one the update can lerp in."""
    bad = [(k, d) for k, d in zip(keys, dtypes, strict=True) if d not in LERP_DTYPES]
    if bad:
        raise ValueError(
            f"cannot average tensors of dtype {bad[0][1]} ({[k for k, _ in bad[:3]]}...): the "
            f"update lerps in {_names(LERP_DTYPES)}; pass dtype=torch.float32 to keep the "
            f"average in float32"
        )


def _names(dtypes: Sequence[torch.dtype]) -> str:
    return ", ".join(str(d) for d in dtypes)


def decay_hint(init: Any) -> Any:
    """``init`` that answers ``decay=`` (timm's and diffusers' name) with the fix."""

    @functools.wraps(init)  # help() and editors still show init's own signature
    def checked(self: Any, *args: Any, **kwargs: Any) -> None:
        if "decay" in kwargs:
            value = kwargs["decay"]
            fix = f": momentum={1 - value:.6g}" if isinstance(value, int | float) else ""
            raise ValueError(
                f"{type(self).__name__} takes no decay= (got decay={value!r}): it takes "
                f"momentum, the weight of the new value (momentum = 1 - decay{fix})"
            )
        init(self, *args, **kwargs)

    return checked
