"""The averaging classes users construct: the seed-compatible API on sharded storage.

One update, on every rank:
  1. find this rank's source data (topology: whole tensors or FSDP2 shards);
  2. pick the op from the call count: call 0 copies, every ``interval``-th call lerps with
     the rule's weight, other calls only copy the tensors that follow the source;
  3. hand the op to the engine (now, or overlapped with the next step).
"""

from __future__ import annotations

import atexit
import functools
import inspect
import logging
import os
import sys
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from . import _args, state, swap
from ._comm import ChunkComm, agree
from ._engines import make_engine
from ._guards import Guards
from ._hooks import AvgFn, MultiAvgFn, custom_average
from ._steps import StepWatch, remove_inert_hooks
from .engine import Kind, Update
from .shards import Shards, slots_for
from .topology import Topology, unwrap

logger = logging.getLogger(__name__)

# Averages still open at interpreter exit: a worker thread left running into interpreter
# finalisation aborts the process, so each is closed (its last update applied) first.
_OPEN: weakref.WeakSet[BaseAveragedModel] = weakref.WeakSet()


@atexit.register
def _close_open_averages() -> None:
    failed = False
    for avg in list(_OPEN):
        try:
            avg.close()
        except Exception:
            logger.exception("closing %s at interpreter exit failed", type(avg).__name__)
            failed = True
    if failed:
        # An exception in an atexit handler is printed and the process still exits 0: a
        # job runner would take a lost update for success.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)


class BaseAveragedModel:
    """A running average of a model's weights, kept sharded across ranks.

    Subclasses define the rule by overriding :meth:`weight`. The first call copies the
    source; every ``interval``-th call after it sets ``avg <- avg + w * (src - avg)``.

    Args:
        model: the model being trained (plain, DDP, FSDP2, ``torch.compile``d or
            accelerate-prepared).
        interval: average every ``interval`` calls of :meth:`update_parameters`.
        device: where the average lives: None (beside the parameters) or a device such as
            ``"cpu"`` (pinned host memory when the parameters are on an accelerator).
        update_buffers: also average floating-point buffers (BatchNorm statistics); when
            False they are copied from the source on every call. Integer buffers
            (``num_batches_tracked``) are always copied.
        placement: ``"sharded"`` (each rank keeps its ``Shard(0)`` chunk of every tensor,
            1/world of the model) or ``"owner"`` (rank ``owner_rank`` keeps it all).
        owner_rank: the rank that holds the whole average (``"owner"``) and that
            :meth:`full_state_dict` returns on.
        dtype: dtype of the average for floating-point tensors (default: the tensor's
            own). Use ``torch.float32`` for bf16/fp16 models with a small weight.
        async_update: only enqueue each update; it overlaps the next forward and backward
            and is fenced before the optimizer's next ``step()`` (see [Note: the fence] in
            engine.py). Results are bitwise those of synchronous updates.
        optimizer: the optimizer that steps ``model``, or a list of them (one per
            parameter group, Muon + AdamW); required with ``async_update``. When given, an
            update is pushed only after a real step of one of them: after a step that
            ``torch.amp.GradScaler`` skipped (also inside a fused optimizer),
            :meth:`update_parameters` does nothing and does not count (see [Note: which
            steps count] in _steps.py). With ``async_update`` every optimizer that holds a
            parameter of the model is fenced; any other code that writes the parameters
            must call :meth:`wait` first.

        avg_fn: torch's ``avg_fn(averaged, current, num_averaged) -> new`` (e.g.
            ``torch.optim.swa_utils.get_ema_avg_fn(0.999)``), run on this rank's chunk of
            each averaged tensor instead of ``weight(steps)`` (see _hooks.py).
        multi_avg_fn: torch's ``multi_avg_fn(averaged_list, current_list, num_averaged)``
            (e.g. ``get_ema_multi_avg_fn(0.999)``), likewise. Overriding :meth:`avg_func`
            (mmengine's way) does the same.

    The average starts as a copy of ``model`` (like ``torch.optim.swa_utils.AveragedModel``
    and mmengine), so it is readable before the first update; the first counted
    :meth:`update_parameters` copies the source again.
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is not None and "momentum" in inspect.signature(init).parameters:
            cls.__init__ = _args.decay_hint(init)

    def __init__(
        self,
        model: nn.Module,
        interval: int = 1,
        device: torch.device | str | None = None,
        update_buffers: bool = False,
        *,
        placement: str = "sharded",
        owner_rank: int = 0,
        dtype: torch.dtype | None = None,
        async_update: bool = False,
        optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None = None,
        avg_fn: AvgFn | None = None,
        multi_avg_fn: MultiAvgFn | None = None,
    ) -> None:
        remove_inert_hooks()
        _args.check_options(interval, update_buffers, placement, dtype, async_update)
        optimizers = _args.optimizers(optimizer, async_update)
        self.topology = topo = Topology(model)
        _args.check_owner_rank(owner_rank, topo.world)
        self.interval = interval
        self.update_buffers = update_buffers
        self.placement = placement
        self.owner_rank = owner_rank
        self.device = _args.resolve_device(device, topo.device)
        self._steps = 0
        self._owner_push = placement == "owner" and topo.kind == "fsdp2" and topo.world > 1
        self.shards = Shards(
            slots_for(topo, placement, owner_rank, dtype, update_buffers),
            self.device,
            pin=self.device.type == "cpu" and topo.device.type != "cpu",
        )
        averaged = [s for s in self.shards.slots if s.averaged]
        _args.check_lerp_dtypes([s.key for s in averaged], [s.dtype for s in averaged])
        low = (torch.bfloat16, torch.float16)  # checked on every averaging call: found once
        low_dtypes = dict.fromkeys(s.dtype for s in averaged if s.dtype in low)
        self._guards = Guards(topo.world, list(low_dtypes))
        overridden = type(self).avg_func is not BaseAveragedModel.avg_func
        self._custom = custom_average(
            self.avg_func if overridden else None, avg_fn, multi_avg_fn, self.device, topo.device
        )
        # The owner push runs on a group of its own, so that (possibly deferred) it never
        # interleaves with the training's collectives.
        self._group = dist.new_group() if self._owner_push else None
        self._comm = ChunkComm(
            [s.shape for s in topo.specs],
            [s.dtype for s in topo.specs],
            topo.world,
            topo.rank,
            topo.device,
            group=self._group,
        )
        # (captured list, its sources) pairs: see _sources
        self._sources_cache: tuple[tuple[list, list], ...] | None = None
        self.async_update = async_update
        self.engine = make_engine(
            self.shards,
            topo.device,
            async_update=async_update,
            volatile=[i for i, s in enumerate(topo.specs) if not s.is_param],
        )
        self._watch = None
        if optimizers:
            self._watch = StepWatch(
                optimizers,
                self.engine,
                params=list(unwrap(model).parameters()) if async_update else None,
                cuda=topo.device.type == "cuda",
            )
        self._closed = False
        _OPEN.add(self)
        self._seed(model)
        self._module = swap.whole_module(self, model)

    # -- construction ---------------------------------------------------------------

    # -- the rule -------------------------------------------------------------------

    def weight(self, steps: int) -> float:
        """Weight of the new value at averaging call ``steps`` (0-based, ``steps >= 1``)."""
        raise NotImplementedError(
            f"{type(self).__name__} defines no weight(steps): override it (the fast path), or "
            f"override avg_func, or pass avg_fn= or multi_avg_fn="
        )

    def avg_func(
        self, averaged_param: torch.Tensor, source_param: torch.Tensor, steps: int
    ) -> None:
        """mmengine's extension point: update ``averaged_param`` in place at call ``steps``.

        Overriding it replaces the fused ``weight(steps)`` path by a call per averaged tensor
        on this rank's chunk (see _hooks.py); the default is that path's
        ``averaged_param.lerp_(source_param, weight(steps))``.
        """
        averaged_param.lerp_(source_param, self.weight(steps))

    def hparams(self) -> dict[str, Any]:
        """The rule's parameters; saved with the average and checked on load."""
        return {"interval": self.interval}

    @property
    def sharded(self) -> bool:
        """Whether the average is split over ranks (``placement="sharded"``, world > 1)."""
        return self.placement == "sharded" and self.topology.world > 1

    @property
    def steps(self) -> int:
        """Number of :meth:`update_parameters` calls so far."""
        return self._steps

    # -- updating -------------------------------------------------------------------

    def update_parameters(self, model: nn.Module) -> None:
        """Push this rank's source data into the average (see the class docstring).

        With an optimizer, nothing happens unless it stepped since the last call (so it may
        be called on every micro-batch of gradient accumulation). With ``async_update`` the
        update is only enqueued; an error it raised surfaces here or at the next fence.
        Every rank must call it, the same number of times.
        """
        if self._closed:
            raise RuntimeError(
                f"this {type(self).__name__} was closed: it takes no more updates (its "
                f"average stays readable)"
            )
        remove_inert_hooks()
        self._guards.group()
        if self._watch is not None and not self._watch.stepped():
            self.engine.raise_pending()
            self._guards.no_step(self._watch.optimizers, self._steps)
            return
        self._guards.unstepped = 0
        # Capturing first also fences the previous update and raises its error, if any.
        flat = self.engine.capture(self.topology.local_tensors(model))
        steps, custom = self._steps, None
        kind, w = (Kind.COPY, 0.0) if steps == 0 else (Kind.FOLLOW, 0.0)
        if steps and steps % self.interval == 0 and self._custom is not None:
            kind = Kind.CUSTOM
            custom = functools.partial(self._custom.apply, steps=steps, interval=self.interval)
        elif steps and steps % self.interval == 0:
            w = float(self.weight(steps))
            if not 0.0 <= w <= 1.0:
                raise ValueError(
                    f"{type(self).__name__}.weight({steps}) must be in [0, 1], got {w}"
                )
            self._guards.precision(w)
            kind = Kind.LERP
        sources = functools.partial(self._sources, flat)
        self.engine.submit(Update(kind, w, sources, self._owner_push, custom))
        self._steps += 1

    def _sources(self, flat: list[torch.Tensor]) -> list[list[torch.Tensor]]:
        """Per slot, the 1-D source pieces that fill this rank's region.

        ``flat`` is this rank's local data of every tensor (as captured by the engine). For
        the owner push this gathers, on the thread or stream the engine runs the update;
        the gathered buffers (the whole model, on the owner) serve that update only, so
        nothing here keeps them.
        """
        topo = self.topology
        cache = self._sources_cache or ()
        if not self._owner_push:
            # Cached per captured list: one, or two that alternate (the asynchronous
            # offload's, see [Note: offload pipeline] in _offload.py). A list used twice
            # in a row ends the alternation and the other entry goes, so the tensors of a
            # model whose parameters were replaced are not kept.
            for n, (key, cached) in enumerate(cache):
                if key is flat:
                    self._sources_cache = cache[:1] if n == 0 else (cache[n], *cache[:n])
                    return cached
        gathered = None
        if self._owner_push:
            chunks = [f if s.is_dtensor else f[:0] for s, f in zip(topo.specs, flat, strict=True)]
            gathered = self._comm.gather(chunks, self.owner_rank)
        sources = []
        for i, slot in enumerate(self.shards.slots):
            la, _ = topo.local_bounds(i)
            if not slot.pieces:
                sources.append([])
            elif gathered is not None and topo.specs[i].is_dtensor:
                sources.append(gathered[i])
            else:
                sources.append([flat[i][slot.start - la : slot.end - la]])
        if not self._owner_push:
            self._sources_cache = ((flat, sources), *cache[:1])
        return sources

    def _seed(self, model: nn.Module) -> None:
        """Start as a copy of ``model``: one synchronous copy through the engine."""
        flat = self.engine.capture(self.topology.local_tensors(model))
        self.engine.submit(Update(Kind.COPY, 0.0, lambda: self._sources(flat), self._owner_push))
        self.engine.wait()

    def wait(self) -> None:
        """Block until every submitted update is applied; raise an error one raised."""
        self.engine.wait()

    def close(self) -> None:
        """Wait for pending updates, remove the optimizer hooks, stop the worker.

        Called on destruction too. The average stays readable; it takes no more updates.
        """
        self._close(finalizing=False)

    def _close(self, *, finalizing: bool) -> None:
        self._closed = True
        _OPEN.discard(self)
        watch, self._watch = getattr(self, "_watch", None), None
        if watch is not None:
            watch.remove(now=not finalizing)  # see [Note: hook removal] in _steps.py
        engine = getattr(self, "engine", None)
        try:
            if engine is not None:
                engine.close()
        finally:
            group, self._group = getattr(self, "_group", None), None
            # A finaliser may run on the worker thread: communicators are torn down only
            # by an explicit close() (or at interpreter exit).
            if group is not None and not finalizing and dist.is_initialized():
                dist.destroy_process_group(group)

    def __del__(self) -> None:
        try:
            self._close(finalizing=True)
        except Exception as e:  # no way to raise from a finaliser: say it
            logger.warning("closing %s failed: %s", type(self).__name__, e)

    # -- using the average ----------------------------------------------------------

    @property
    def module(self) -> nn.Module:
        """The whole averaged module, where this rank holds the whole average."""
        if self._module is None:
            raise RuntimeError(
                f"rank {self.topology.rank} holds no whole averaged module "
                f"(placement={self.placement!r}, world size {self.topology.world}, "
                f"{self.topology.kind}); use swapped(model) to evaluate the average or "
                f"full_state_dict() to export it"
            )
        self.wait()
        return self._module

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the averaged module (see :attr:`module`)."""
        return self.module(*args, **kwargs)

    __call__ = forward

    @contextmanager
    def swapped(self, model: nn.Module) -> Iterator[nn.Module]:
        """Put the average into the live ``model`` for the ``with`` block.

        The model keeps its (possibly sharded) layout: under FSDP2 each rank writes its
        chunk into its own shard, with no gather. On exit, also on an exception, the
        model's own values return bitwise; a failure while the average is being put in
        (a peer died, a timeout) leaves the model untouched. Extra memory: this rank's chunk
        of the model.

        With more than one rank this is a collective: every rank must enter it (not only
        inside ``if rank == 0:``); it first checks that all ranks arrive (within
        ``DISTAVG_COLLECTIVE_TIMEOUT`` seconds on gloo) and hold the same step count.
        """
        self.wait()
        self._guards.group()
        swapper = swap.Swap(self, model)
        swapper.enter()
        try:
            yield model
        finally:
            swapper.exit()

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole average with the unwrapped model's ``state_dict()`` keys.

        With more than one rank this is a collective, whatever the placement: every rank
        must call it (it checks that the ranks hold the same step count, see
        :meth:`swapped`). Returns the tensors on ``owner_rank`` and an empty dict elsewhere.
        """
        self.wait()
        self._guards.group()
        return swap.full_state_dict(self)

    def state_dict(self) -> dict[str, Any]:
        """The average in ``torch.distributed.checkpoint`` form (see state.py).

        ``dcp.save`` and ``dcp.load`` call it on every rank; so must anyone else (it checks
        that the ranks agree on the step count, a collective).
        """
        self.wait()
        topo = self.topology
        agree("state_dict() (a checkpoint save or load)", self._steps, topo.world, topo.device)
        return state.state_dict(self)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict` output (as loaded by DCP)."""
        self.wait()
        self._steps = state.load_state_dict(self, state_dict)

    def __repr__(self) -> str:
        t = self.topology
        return (
            f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.hparams().items())}, "
            f"placement={self.placement!r}, world={t.world}, topology={t.kind!r}, "
            f"steps={self._steps}, bytes={self.shards.nbytes})"
        )
