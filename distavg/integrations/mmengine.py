"""mmengine: ``DistAvgHook``, a drop-in for ``EMAHook`` whose average stays sharded.

Importing this module registers ``DistAvgHook`` in mmengine's ``HOOKS`` registry. In a
config, next to (or instead of) an ``EMAHook``::

    custom_imports = dict(imports=["distavg.integrations.mmengine"], allow_failed_imports=False)
    custom_hooks = [dict(type="DistAvgHook", ema_type="ExponentialMovingAverage", momentum=2e-4)]

It takes ``EMAHook``'s keys (``ema_type``, ``strict_load``, ``begin_iter``, ``begin_epoch``
and the rule's own: ``momentum``, ``gamma``, ``interval``, ``update_buffers``) and
distavg's (``placement``, ``device``, ``dtype``, ``async_update``, ``owner_rank``), and
handles the same events: the average is built from the wrapped model in ``before_run``,
updated after every real optimizer step in ``after_train_iter``, put into the model for
validation and test, saved with every checkpoint and restored by ``resume``/``load_from``.
What differs: the checkpoint's ``state_dict`` keeps the live weights (``EMAHook`` swaps the
average in there), and the average lives beside it, every rank's shards in a folder (see
[Note: where the average is saved]).

[Note: where the average is saved]
``Runner.save_checkpoint`` runs on rank 0 only (``@master_only``), and with it the
``before_save_checkpoint`` hooks: no collective can run there, and rank 0 alone holds only its
own shard of a sharded average. So the hook wraps ``runner.save_checkpoint`` on every rank (in
``before_run``): every call, from ``CheckpointHook`` (periodic, last, best) or from user code,
first saves the average with ``save_averages`` into ``<out_dir>/<filename>.distavg``, every
rank its own shards, then runs mmengine's save, in which ``before_save_checkpoint`` records
that folder in ``checkpoint["meta"]["distavg"]``. After the save, rank 0 removes the folders
whose checkpoint file is gone (``CheckpointHook``'s ``max_keep_ckpts``, a replaced best
checkpoint). ``after_load_checkpoint`` runs on every rank, so it restores the average from
the recorded folder with ``load_averages``.
"""

from __future__ import annotations

import functools
import inspect
import os
import shutil
from contextlib import ExitStack
from typing import Any

import torch
import torch.distributed as dist

from .. import rules
from ..averaged import BaseAveragedModel
from ..export import export_average
from ._save import load_averages, save_averages

try:
    from mmengine.fileio import LocalBackend, get_file_backend
    from mmengine.hooks import Hook
    from mmengine.optim import OptimWrapper
    from mmengine.registry import HOOKS
except ImportError as e:
    raise ImportError(
        "distavg.integrations.mmengine needs the mmengine package: pip install 'distavg[mmengine]'"
    ) from e

SUFFIX = ".distavg"  # the average of checkpoint <name> is in the folder <name>.distavg
KEY = "ema"  # the average's key in that folder (``distavg export`` reads it by default)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

__all__ = ["KEY", "SUFFIX", "DistAvgHook"]


@HOOKS.register_module()
class DistAvgHook(Hook):
    """``EMAHook``'s config keys and events, with a sharded distavg average.

    Args:
        ema_type: the rule: a distavg class name (mmengine's ``"ExponentialMovingAverage"``,
            ``"MomentumAnnealingEMA"``, ``"StochasticWeightAverage"``, or ``"WarmupEMA"``,
            ``"PowerEMA"``, ``"HalfLifeEMA"``), a short name (``"ema"``, ``"annealing"``,
            ``"swa"``, ``"warmup"``, ``"power"``, ``"halflife"``) or a
            :class:`~distavg.BaseAveragedModel` subclass.
        strict_load: when resuming from a checkpoint that holds no average, raise instead of
            warning and starting the average afresh. A recorded average that fails to load
            always raises (distavg never loads part of an average).
        begin_iter: the iteration (``runner.iter + 1``) from which updates count.
        begin_epoch: the epoch (``runner.epoch + 1``) from which updates count; not with
            ``begin_iter``.
        evaluate_on_average: run validation and test on the average (default), the live
            weights restored bitwise after each.
        swap_at_end: copy the average into the live weights for good after training.
        export_file: after training, write the whole average as a plain state dict to this
            file (relative to ``runner.work_dir``; ``.pth`` or ``.safetensors``), which
            ``load_from=`` and ``model.load_state_dict`` accept.
        **kwargs: the rule's keywords (``momentum``, ``gamma``, ``interval``,
            ``update_buffers``, ...) and distavg's (``placement``, ``device``, ``dtype``
            as a ``torch.dtype`` or ``"float32"``/``"bfloat16"``/``"float16"``,
            ``async_update``, ``owner_rank``). ``optimizer`` is the runner's.

    The average (``hook.average``) is built in ``before_run`` from ``runner.model`` (after
    mmengine wrapped it) with ``optimizer=`` the optimizer(s) of ``runner.optim_wrapper``,
    so with ``accumulative_counts`` or AMP only real steps count.
    """

    priority = "NORMAL"

    def __init__(
        self,
        ema_type: str | type[BaseAveragedModel] = "ExponentialMovingAverage",
        strict_load: bool = False,
        begin_iter: int = 0,
        begin_epoch: int = 0,
        *,
        evaluate_on_average: bool = True,
        swap_at_end: bool = False,
        export_file: str | None = None,
        **kwargs: Any,
    ) -> None:
        self.rule = rules.rule_class(ema_type, "ema_type")
        self.kwargs = _rule_kwargs(self.rule, kwargs)
        if begin_iter != 0 and begin_epoch != 0:
            raise ValueError(
                f"begin_iter and begin_epoch cannot both be set, got begin_iter={begin_iter} "
                f"and begin_epoch={begin_epoch}"
            )
        for name, value in (("begin_iter", begin_iter), ("begin_epoch", begin_epoch)):
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        self.strict_load = strict_load
        self.begin_iter = begin_iter
        self.begin_epoch = begin_epoch
        self.enabled_by_epoch = begin_epoch > 0
        self.evaluate_on_average = evaluate_on_average
        self.swap_at_end = swap_at_end
        self.export_file = export_file
        self.average: BaseAveragedModel | None = None
        self._optimizers: list[torch.optim.Optimizer] = []
        self._swap = ExitStack()
        self._saving: str | None = None  # the folder the checkpoint being saved goes with
        self._loaded: dict | None = None  # a checkpoint loaded before the average was built

    # -- building ---------------------------------------------------------------------

    def before_run(self, runner: Any) -> None:
        """Build the average from the wrapped model; wrap ``runner.save_checkpoint``."""
        optimizers = _optimizers(runner.optim_wrapper)
        if self.average is None or optimizers != self._optimizers:
            # runner.val()/test() build no optimizer; a later train() does: rebuild with it,
            # keeping what the first average holds.
            old, self.average = self.average, self._build(runner, optimizers)
            if old is not None:
                if old.steps:
                    self.average.load_state_dict(old.state_dict())
                old.close()
        if self._loaded is not None:
            self._restore(runner, self._loaded)
            self._loaded = None
        self._wrap_save_checkpoint(runner)

    def _build(self, runner: Any, optimizers: list[torch.optim.Optimizer]) -> BaseAveragedModel:
        self._optimizers = optimizers
        return self.rule(runner.model, **self.kwargs, optimizer=optimizers or None)

    def before_train(self, runner: Any) -> None:
        """Check that the average begins before training ends (as ``EMAHook`` does)."""
        if self.enabled_by_epoch and self.begin_epoch > runner.max_epochs:
            raise ValueError(
                f"begin_epoch must be <= runner.max_epochs ({runner.max_epochs}), "
                f"got {self.begin_epoch}"
            )
        if not self.enabled_by_epoch and self.begin_iter > runner.max_iters:
            raise ValueError(
                f"begin_iter must be <= runner.max_iters ({runner.max_iters}), "
                f"got {self.begin_iter}"
            )

    # -- updating ---------------------------------------------------------------------

    def after_train_iter(
        self, runner: Any, batch_idx: int, data_batch: Any = None, outputs: Any = None
    ) -> None:
        """Push the weights of this iteration's optimizer step, if it made one."""
        if self._started(runner):
            self.average.update_parameters(runner.model)

    def _started(self, runner: Any) -> bool:
        if self.enabled_by_epoch:
            return runner.epoch + 1 >= self.begin_epoch
        return runner.iter + 1 >= self.begin_iter

    # -- evaluating -------------------------------------------------------------------

    def before_val_epoch(self, runner: Any) -> None:
        self._swap_in(runner)

    def after_val_epoch(self, runner: Any, metrics: dict | None = None) -> None:
        self._swap.close()

    def before_test_epoch(self, runner: Any) -> None:
        self._swap_in(runner)

    def after_test_epoch(self, runner: Any, metrics: dict | None = None) -> None:
        self._swap.close()

    def _swap_in(self, runner: Any) -> None:
        self._swap.close()  # an evaluation that raised left its swap open
        # Before its first update the average is a copy of the model as before_run found
        # it (before weight init and loading): EMAHook's would equal the live weights, so
        # those are evaluated.
        if self.evaluate_on_average and self.average is not None and self.average.steps:
            self._swap.enter_context(self.average.swapped(runner.model))

    def after_train(self, runner: Any) -> None:
        """Apply the last update; copy the average into the model and export, if asked."""
        self.average.wait()
        if self.swap_at_end:
            model = runner.model
            with self.average.swapped(model):
                held = {k: v.detach().clone() for k, v in model.state_dict().items()}
            model.load_state_dict(held)
        if self.export_file is not None:
            export_average(self.average, os.path.join(runner.work_dir, self.export_file))

    # -- checkpoints ------------------------------------------------------------------

    def _wrap_save_checkpoint(self, runner: Any) -> None:
        """See [Note: where the average is saved]."""
        owner = getattr(runner.save_checkpoint, "_distavg_hook", None)
        if owner is self:
            return
        if owner is not None:
            raise ValueError(
                "a runner takes one DistAvgHook; found a second in its hooks (each would "
                "save its average into the same checkpoint folder)"
            )
        mmengine_save = runner.save_checkpoint

        @functools.wraps(mmengine_save)
        def save_checkpoint(out_dir: str, filename: str, *args: Any, **kwargs: Any) -> None:
            folder = self._save(out_dir, filename)
            self._saving = folder
            try:
                mmengine_save(out_dir, filename, *args, **kwargs)  # rank 0 only
            finally:
                self._saving = None
            if not dist.is_initialized() or dist.get_rank() == 0:
                _sweep(os.path.dirname(folder))

        save_checkpoint._distavg_hook = self
        runner.save_checkpoint = save_checkpoint

    def _save(self, out_dir: str, filename: str) -> str:
        out_dir = os.fspath(out_dir)
        if not isinstance(get_file_backend(out_dir), LocalBackend):
            raise ValueError(
                f"DistAvgHook saves every rank's shard of the average beside the checkpoint "
                f"with torch.distributed.checkpoint, which needs a local or mounted directory; "
                f"got out_dir={out_dir!r}"
            )
        folder = os.path.abspath(os.path.join(out_dir, filename + SUFFIX))
        save_averages(folder, {KEY: self.average})
        return folder

    def before_save_checkpoint(self, runner: Any, checkpoint: dict) -> None:
        """Record the folder the average was saved to (rank 0, inside mmengine's save)."""
        if self._saving is None:
            runner.logger.warning(
                "DistAvgHook: a checkpoint was saved without runner.save_checkpoint, so the "
                "average is not in it"
            )
            return
        checkpoint.setdefault("meta", {})["distavg"] = {
            "path": self._saving,
            "type": type(self.average).__name__,
            "steps": self.average.steps,
        }

    def after_load_checkpoint(self, runner: Any, checkpoint: dict) -> None:
        """Restore the average the checkpoint recorded (``resume`` and ``load_from``)."""
        if self.average is None:  # runner.load_checkpoint() called before train()/val()
            self._loaded = {"meta": checkpoint.get("meta", {})}
            return
        self._restore(runner, checkpoint)

    def _restore(self, runner: Any, checkpoint: dict) -> None:
        record = checkpoint.get("meta", {}).get("distavg")
        if record is None:
            if runner._resume:
                if self.strict_load:
                    raise ValueError(
                        "DistAvgHook(strict_load=True): the checkpoint being resumed holds no "
                        "average (it was saved without DistAvgHook)"
                    )
                runner.logger.warning(
                    "DistAvgHook: the checkpoint holds no average; it starts afresh as a "
                    "copy of the loaded weights at the first update"
                )
            if self.average.steps:  # a fresh average: its first update copies the model
                self.average.close()
                self.average = self._build(runner, self._optimizers)
            return
        load_averages(
            _locate(record["path"], getattr(runner, "_load_from", None)), {KEY: self.average}
        )


def _rule_kwargs(rule: type[BaseAveragedModel], kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` checked against ``rule``'s signature, ``dtype`` names made dtypes."""
    kwargs = dict(kwargs)
    for name in ("model", "optimizer"):
        if name in kwargs:
            raise ValueError(
                f"DistAvgHook passes {name}= itself (the runner's); got {name}={kwargs[name]!r}"
            )
    dtype = kwargs.get("dtype")
    if isinstance(dtype, str):
        if dtype.removeprefix("torch.") not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        kwargs["dtype"] = DTYPES[dtype.removeprefix("torch.")]
    params = inspect.signature(rule).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        unknown = sorted(set(kwargs) - set(params))
        if unknown:
            raise ValueError(
                f"{rule.__name__} takes no {', '.join(unknown)}; its keywords are "
                f"{sorted(set(params) - {'model', 'optimizer'})}"
            )
    return kwargs


def _optimizers(optim_wrapper: Any) -> list[torch.optim.Optimizer]:
    """The optimizers of a built ``OptimWrapper`` or ``OptimWrapperDict``; none before."""
    if not isinstance(optim_wrapper, OptimWrapper):
        return []  # runner.val()/test(): the wrapper is still a config
    wrappers = optim_wrapper.values() if hasattr(optim_wrapper, "values") else [optim_wrapper]
    return [w.optimizer for w in wrappers]


def _locate(path: str, load_from: str | None) -> str:
    """The recorded folder, or the folder of that name beside ``load_from`` (a moved work_dir)."""
    if os.path.isdir(path) or not load_from:
        return path
    beside = os.path.join(os.path.dirname(os.fspath(load_from)), os.path.basename(path))
    return beside if os.path.isdir(beside) else path


def _sweep(out_dir: str) -> None:
    """Remove the ``<name>.distavg`` folders of ``out_dir`` whose checkpoint ``<name>`` is gone."""
    for name in os.listdir(out_dir):
        path = os.path.join(out_dir, name)
        if (
            name.endswith(SUFFIX)
            and os.path.isdir(path)
            and not os.path.exists(path[: -len(SUFFIX)])
        ):
            shutil.rmtree(path, ignore_errors=True)
