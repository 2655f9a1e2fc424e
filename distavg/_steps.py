"""The optimizer's steps: which ones really wrote the parameters, and the fence before each.

[Note: which steps count]
An update is pushed only after a real step of one of the optimizers the averager was given:
  * a step that ``torch.amp.GradScaler`` skips (inf/nan gradients) with an ordinary
    optimizer never calls ``optimizer.step()``, so no hook runs;
  * with a fused optimizer (``_step_supports_amp_scaling``, e.g. ``AdamW(fused=True)``)
    GradScaler always calls ``step()`` and the kernel skips on device; GradScaler sets
    ``optimizer.found_inf`` for the call, so the post-hook keeps that tensor and
    :meth:`StepWatch.stepped` reads it (one host sync, where GradScaler's own unfused path
    pays one too);
  * a replayed CUDA graph runs no Python hooks at all, so capturing ``step()`` is refused.

[Note: fencing every writer]
With a deferred engine, any optimizer that writes the model's parameters must wait for the
update in flight, not only the ones given (a second optimizer, one per parameter group,
one that replaced the first). A global step pre-hook fences every optimizer that holds a
parameter of the model. Code that writes parameters outside an optimizer must call
``wait()`` on the average first.

[Note: hook removal]
torch iterates an optimizer's hook dicts live while it steps. Removing a hook from another
thread (the worker, where the last reference to a dropped averager may go) or from a
finaliser that the garbage collector runs inside ``step()`` raises "OrderedDict mutated
during iteration" in the training loop. So only an explicit ``close()`` removes hooks at
once; the hooks of an averager that was dropped go inert (they hold the engine weakly) and
are removed at the next safe point: the next construction or ``update_parameters`` of any
averager, on the training thread, outside ``step()``.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Sequence

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from .engine import Engine

_INERT: list = []  # handles of dropped averagers' hooks (see [Note: hook removal])
_INERT_LOCK = threading.Lock()


def remove_inert_hooks() -> None:
    """Remove the hooks of dropped averagers (call only outside ``optimizer.step()``)."""
    if not _INERT:
        return
    with _INERT_LOCK:
        handles = _INERT[:]
        _INERT.clear()
    for h in handles:
        h.remove()


def unwrap_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimizer whose ``step()`` writes the parameters, inside wrappers that keep it as
    ``.optimizer`` (accelerate's ``AcceleratedOptimizer``, Lightning's ``LightningOptimizer``)."""
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


class StepWatch:
    """Installs the fence on the optimizers and learns of their real steps.

    See [Note: which steps count] and [Note: fencing every writer].

    Args:
        optimizers: the optimizers whose steps count (wrappers are looked through, see
            :func:`unwrap_optimizer`).
        engine: the engine to fence; held weakly, so the hooks never keep it alive.
        params: the model's parameters; when given, every optimizer that holds one of them
            is fenced too (for deferred engines).
        cuda: the parameters live on a CUDA device (graph capture is checked).
    """

    def __init__(
        self,
        optimizers: Sequence[torch.optim.Optimizer],
        engine: Engine,
        *,
        params: Sequence[torch.Tensor] | None = None,
        cuda: bool = False,
    ) -> None:
        self.optimizers = [unwrap_optimizer(o) for o in optimizers]
        self._engine = weakref.ref(engine)
        self._cuda = cuda
        self._real = False  # a step without a found_inf to consult
        self._found_inf: list[torch.Tensor] = []
        self._handles = []
        for opt in self.optimizers:
            self._handles.append(opt.register_step_pre_hook(self._pre))
            self._handles.append(opt.register_step_post_hook(self._post))
        if params is not None:
            self._param_ids = frozenset(id(p) for p in params)
            self._holds: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
            self._handles.append(register_optimizer_step_pre_hook(self._pre_any))

    def _fence(self) -> None:
        if self._cuda and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                "optimizer.step() is being captured in a CUDA graph: a replayed graph runs no "
                "Python hooks, so the average would silently stop counting steps and the "
                "asynchronous update would not be fenced. Leave the optimizer step out of the "
                "captured region (or out of torch.compile's cudagraph mode)"
            )
        engine = self._engine()
        if engine is not None:
            engine.fence()

    def _pre(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        self._fence()

    def _pre_any(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        if optimizer in self.optimizers or self._engine() is None:
            return  # fenced by its own pre-hook; or the average is gone
        size = sum(len(g["params"]) for g in optimizer.param_groups)
        known = self._holds.get(optimizer)
        if known is None or known[0] != size:
            ids = self._param_ids
            holds = any(id(p) in ids for g in optimizer.param_groups for p in g["params"])
            known = self._holds[optimizer] = (size, holds)
        if known[1]:
            self._fence()

    def _post(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        found_inf = getattr(optimizer, "found_inf", None)
        if isinstance(found_inf, torch.Tensor):
            self._found_inf.append(found_inf)
        else:
            self._real = True

    def stepped(self) -> bool:
        """Whether an optimizer really stepped since the last call (and forget it)."""
        real, infs = self._real, self._found_inf
        self._real, self._found_inf = False, []
        return real or any(not bool(f.item()) for f in infs)

    def remove(self, *, now: bool = True) -> None:
        """Remove the hooks; ``now=False`` defers it (see [Note: hook removal])."""
        handles, self._handles = self._handles, []
        if now:
            for h in handles:
                h.remove()
        else:
            with _INERT_LOCK:
                _INERT.extend(handles)
