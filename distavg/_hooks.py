"""Averaging functions written for mmengine or torch, run on the tensors this rank holds.

mmengine's ``avg_func(averaged_param, source_param, steps)`` (a method a subclass overrides;
it updates in place), torch's ``avg_fn(averaged, current, num_averaged)`` (returns the new
value) and ``multi_avg_fn(averaged_list, current_list, num_averaged)`` (in place, over lists)
each see every averaged tensor as this rank holds it: its chunk of rows when the average is
sharded, the whole tensor otherwise, in the average's dtype. ``num_averaged`` is torch's
count: the averages taken so far, the first copy included (``steps // interval``).

Every rule both libraries ship is elementwise, and an elementwise function gives the same
bits chunked or whole, sync or async. A function that is not elementwise (a norm, a
statistic over the tensor) sees only the chunk when the average is sharded: that is the
user's to decide (``placement="owner"`` gives it whole tensors under DDP).
Tensors that follow the source (buffers without ``update_buffers``) are copied as usual.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .shards import Shards, shaped

AvgFunc = Callable[[torch.Tensor, torch.Tensor, int], None]
AvgFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
MultiAvgFn = Callable[[list[torch.Tensor], list[torch.Tensor], torch.Tensor], None]


class CustomAverage:
    """Applies exactly one of ``avg_func``, ``avg_fn`` and ``multi_avg_fn`` to the shards."""

    def __init__(
        self,
        avg_func: AvgFunc | None = None,
        avg_fn: AvgFn | None = None,
        multi_avg_fn: MultiAvgFn | None = None,
    ) -> None:
        given = [n for n, f in (("avg_fn", avg_fn), ("multi_avg_fn", multi_avg_fn)) if f]
        if len(given) > 1 or (given and avg_func is not None):
            raise ValueError(
                f"pass one averaging function, got {given + ['avg_func'] * (avg_func is not None)}"
            )
        for name, fn in (("avg_fn", avg_fn), ("multi_avg_fn", multi_avg_fn)):
            if fn is not None and not callable(fn):
                raise ValueError(f"{name} must be callable, got {type(fn).__name__}")
        self.avg_func, self.avg_fn, self.multi_avg_fn = avg_func, avg_fn, multi_avg_fn

    @torch.no_grad()
    def apply(
        self, shards: Shards, sources: Sequence[Sequence[torch.Tensor]], steps: int, interval: int
    ) -> None:
        """One averaging call ``steps`` (see the module docstring)."""
        views, srcs = [], []
        for i, slot in enumerate(shards.slots):
            if not slot.averaged or not slot.numel:
                continue
            pieces = sources[i]
            src = pieces[0] if len(pieces) == 1 else torch.cat(list(pieces))
            views.append(shards.view(i))
            srcs.append(shaped(src, slot).to(slot.dtype))
        n = torch.tensor(steps // interval, device=shards.device)
        if not views:  # this rank holds nothing averaged (an owner average elsewhere)
            pass
        elif self.multi_avg_fn is not None:
            self.multi_avg_fn(views, srcs, n)
        elif self.avg_fn is not None:
            for view, src in zip(views, srcs, strict=True):
                view.copy_(self.avg_fn(view, src, n))
        else:
            for view, src in zip(views, srcs, strict=True):
                self.avg_func(view, src, steps)
        shards.follow(sources)


def custom_average(
    avg_func: AvgFunc | None,
    avg_fn: AvgFn | None,
    multi_avg_fn: MultiAvgFn | None,
    device: torch.device,
    params_device: torch.device,
) -> CustomAverage | None:
    """The custom update of an average on ``device`` of parameters on ``params_device``,
    or None when no function was given (the ``weight(steps)`` path)."""
    if avg_func is None and avg_fn is None and multi_avg_fn is None:
        return None
    if device.type == "cpu" and params_device.type != "cpu":
        raise ValueError(
            "avg_func, avg_fn and multi_avg_fn run on the average where it lives; with "
            f"device={str(device)!r} for parameters on {params_device} the pinned offload "
            "computes the update itself: use the weight(steps) path"
        )
    return CustomAverage(avg_func, avg_fn, multi_avg_fn)
