"""Lightning: a ``Callback`` that keeps a sharded running average of the weights during ``fit``.

::

    from distavg.integrations.lightning import DistAvgCallback

    trainer = L.Trainer(callbacks=[DistAvgCallback("ema", momentum=1e-3)], strategy="ddp")
    trainer.fit(model)

What it does, and when (it decides *when*; the averager in ``distavg`` does the averaging):
  1. ``on_fit_start``: builds the average once the strategy has wrapped the model (DDP) or
     ``configure_model`` has sharded it (``ModelParallelStrategy``, FSDP2), sharded by
     default, with ``trainer.optimizers`` as ``optimizer=``;
  2. ``on_train_batch_end``: ``update_parameters`` after every batch; the averager counts
     only batches after which an optimizer really stepped (gradient accumulation, steps that
     the AMP scaler skipped);
  3. validation during ``fit`` runs on the average (``swapped``); the live weights return
     bitwise when it ends;
  4. every checkpoint save also writes the average, every rank its own shards, to
     ``<checkpoint>.distavg`` beside the checkpoint (see [Note: where the average is saved]);
     ``trainer.fit(model, ckpt_path=...)`` restores it exactly;
  5. ``on_train_end``: optionally copies the average into the model for good
     (``swap_at_end``) and exports it (``export_file``).

Lightning's own ``lightning.pytorch.callbacks.WeightAveraging`` wraps torch's
``AveragedModel``: every rank keeps and updates a whole copy of the model, the average is
written into the checkpoint's ``state_dict`` (rank 0's copy), and a model sharded in
``configure_model`` is not supported. ``DistAvgCallback`` keeps 1/world of the average per
rank, also under FSDP2, and leaves the checkpoint's ``state_dict`` as the live weights (so a
resume is exact); the average is saved beside it and exported on request.

[Note: where the average is saved]
A sharded average is saved by every rank (``dcp.save``, a collective), but Lightning hands
the checkpoint's file path to no callback hook, and its ``CheckpointIO`` runs on rank 0
alone. So, during ``fit``, the strategy's ``save_checkpoint`` and ``remove_checkpoint`` are
wrapped (and unwrapped at teardown): each save first writes the average to
``<checkpoint path>.distavg`` atomically with :func:`~distavg.integrations._save.save_averages`
(rank 0's path, broadcast, so that every rank writes into one folder), then the checkpoint
itself; removing a checkpoint (``ModelCheckpoint``'s ``save_top_k``) removes its folder too.
Written first, the average of a checkpoint that exists is complete. The checkpoint's
callback state holds the average's step count, which a resume checks against the folder: a
folder left by another save (a kill between the two writes) is refused, not loaded.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import shutil
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

try:
    import lightning
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.utilities import rank_zero_warn
except ImportError as e:
    raise ImportError(
        "distavg.integrations.lightning needs the lightning package: "
        "pip install 'distavg[lightning]'"
    ) from e

from ..averaged import BaseAveragedModel
from ..export import SUFFIXES, export_average, save_file
from ..rules import rule_class
from ._save import OLD, SAVING, load_averages, save_averages

if TYPE_CHECKING:
    import lightning.pytorch as pl

SUFFIX = ".distavg"  # the average of checkpoint P is saved to P + SUFFIX
KEY = "ema"  # its key in that folder: `distavg export P.distavg out.pt` needs no --key

__all__ = ["KEY", "SUFFIX", "DistAvgCallback", "average_folder"]


def average_folder(checkpoint: str | os.PathLike) -> Path:
    """The folder that holds the average saved with ``checkpoint``."""
    return Path(os.fspath(checkpoint) + SUFFIX)


class DistAvgCallback(Callback):
    """A running average of the weights, sharded across ranks, kept during ``trainer.fit``.

    One per ``Trainer``. Works with ``strategy="ddp"`` (and the other DDP spellings), with
    ``ModelParallelStrategy`` (FSDP2 applied in ``configure_model``) and in one process.

    Args:
        rule: ``"ema"``, ``"swa"``, ``"annealing"``, ``"warmup"``, ``"power"``,
            ``"halflife"`` (see :data:`distavg.rules.RULES`), a class name, or a
            :class:`~distavg.BaseAveragedModel` subclass.
        evaluate_average: run validation during ``fit`` on the average (the live weights
            return bitwise afterwards). Metrics logged in validation, and so a
            ``ModelCheckpoint`` monitoring them, are then the average's.
        swap_at_end: at the end of ``fit``, copy the average into the model for good (as
            Lightning's ``WeightAveraging`` does), so that ``trainer.test`` or a final save
            use it.
        export_file: a file to export the average to at the end of ``fit``: ``.ckpt`` writes
            a Lightning checkpoint that ``YourModule.load_from_checkpoint`` loads,
            ``.safetensors``, ``.pt``, ``.pth`` or ``.bin`` a plain state dict (see
            :meth:`export`).
        **options: the rule's own parameters (``momentum``, ``gamma``, ``decay``,
            ``sigma_rel``, ``half_life``, ...) and the averager's keywords: ``interval``,
            ``placement``, ``owner_rank``, ``device``, ``dtype``, ``async_update``,
            ``update_buffers``. ``optimizer`` is ``trainer.optimizers``, always.

    Raises:
        ValueError: an unknown rule, an option the rule does not take, ``optimizer=`` or an
            ``export_file`` whose suffix names no format.
        ImportError: ``export_file`` is a ``.safetensors`` file and safetensors is missing.

    With Lightning's automatic optimization in full precision, forward and backward run
    inside ``optimizer.step(closure)``, after the fence of an asynchronous update: there,
    ``async_update=True`` overlaps the update with the rest of the loop only (data loading,
    hooks, logging). Under AMP (``precision="16-mixed"``) the closure runs before the step
    and the update overlaps forward and backward too.
    """

    def __init__(
        self,
        rule: str | type[BaseAveragedModel] = "ema",
        *,
        evaluate_average: bool = True,
        swap_at_end: bool = True,
        export_file: str | os.PathLike | None = None,
        **options: Any,
    ) -> None:
        self.rule = rule_class(rule)
        _check_options(self.rule, options)
        if export_file is not None:
            _check_export(export_file)
        self.options = options
        self.evaluate_average = evaluate_average
        self.swap_at_end = swap_at_end
        self.export_file = export_file
        self.average: BaseAveragedModel | None = None
        self._module: pl.LightningModule | None = None
        self._swap = ExitStack()  # holds the average in the model while validation runs
        self._swapped = False
        self._pending: tuple[str, dict[str, Any]] | None = None  # (checkpoint, state) to load
        self._resumed: str | None = None  # the checkpoint the average was restored from
        self._strategy: Any = None  # the strategy whose save and remove are wrapped

    # -- building and updating --------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._wrap(trainer)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The strategy has set up the model by now: wrapped in DDP, or sharded by
        # configure_model; the average is built on this rank's part of it.
        optimizers = list(trainer.optimizers)
        if not optimizers:
            rank_zero_warn(
                "DistAvgCallback: the trainer has no optimizer, so the average is updated "
                "after every training batch"
            )
        self._module = pl_module
        self._resumed = None
        self.average = self.rule(pl_module, **self.options, optimizer=optimizers or None)
        self._restore()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.ckpt_path is not None and self._resumed is None:
            rank_zero_warn(
                f"DistAvgCallback: resumed from {os.fspath(trainer.ckpt_path)!r}, which was "
                f"saved without a DistAvgCallback: the average starts from the resumed weights"
            )

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        if self.average is not None:
            self.average.update_parameters(pl_module)  # counts only after a real step

    # -- validation -------------------------------------------------------------------

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.evaluate_average and self.average is not None and trainer.state.fn == "fit":
            self._swap.enter_context(self.average.swapped(pl_module))
            self._swapped = True

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Checkpoint callbacks run after this one (Lightning orders them last), so a
        # ModelCheckpoint saving here saves the live weights.
        self._unswap()

    # -- the end ------------------------------------------------------------------------

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.average is None:
            return
        if self.swap_at_end:
            self._copy_into(pl_module)
        if self.export_file is not None:
            self.export(self.export_file)

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._unswap()  # the live weights return, also when validation failed
        self._unwrap()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._unswap()
        if stage == "fit":
            self._unwrap()
            if self.average is not None:
                self.average.close()  # applies the last update; the average stays readable

    def _unswap(self) -> None:
        self._swapped = False
        self._swap.close()

    def _copy_into(self, pl_module: pl.LightningModule) -> None:
        """Put the average into the model's own tensors for good (every rank its part)."""
        assert self.average is not None
        tensors = [*pl_module.parameters(), *pl_module.buffers()]
        with self.average.swapped(pl_module):
            held = [t.detach().clone() for t in tensors]
        with torch.no_grad():
            for t, value in zip(tensors, held, strict=True):
                t.copy_(value)

    def export(self, out: str | os.PathLike) -> Path | None:
        """Write the whole average to ``out`` on the averager's owner rank (rank 0).

        Every rank must call it (a collective when the average is sharded); it also works
        after ``fit``. ``.ckpt`` writes a Lightning checkpoint holding the average as its
        ``state_dict`` and the module's hyperparameters, which
        ``YourModule.load_from_checkpoint(out)`` loads; ``.safetensors``, ``.pt``, ``.pth``
        and ``.bin`` write a plain state dict for ``model.load_state_dict``.

        Returns:
            ``out`` on the rank that wrote it, None on the others.
        """
        if self.average is None:
            raise RuntimeError(
                "DistAvgCallback.export: there is no average yet; it is built when "
                "trainer.fit starts"
            )
        fmt = _check_export(out)
        if fmt != "lightning":
            return export_average(self.average, out, format=fmt)
        state = self.average.full_state_dict()
        if not state:
            return None
        checkpoint: dict[str, Any] = {
            "state_dict": state,
            "pytorch-lightning_version": lightning.__version__,
        }
        hparams = dict(self._module.hparams) if self._module is not None else {}
        if hparams:
            checkpoint["hyper_parameters"] = hparams
        return save_file(checkpoint, out, format="torch")

    # -- checkpoints ------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        if self.average is None or self._strategy is None:
            return {}  # not fitting: no average is saved with this checkpoint
        return {"steps": self.average.steps, "rule": type(self.average).__name__}

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        state = (checkpoint.get("callbacks") or {}).get(self.state_key)
        if trainer.state.fn != "fit" or not state or trainer.ckpt_path is None:
            return
        # rank 0's path, as the strategy's own load uses
        path = trainer.strategy.broadcast(os.fspath(trainer.ckpt_path))
        self._pending = (path, state)
        # DDP restores callbacks before on_fit_start (loaded there), ModelParallelStrategy
        # after it (loaded now).
        self._restore()

    def _restore(self) -> None:
        if self.average is None or self._pending is None:
            return
        path, state = self._pending
        self._pending = None
        folder = average_folder(path)
        if not folder.exists() and os.path.islink(path):  # ModelCheckpoint(save_last="link")
            folder = average_folder(os.path.realpath(path))
        try:
            load_averages(folder, {KEY: self.average})
        except ValueError as e:
            raise ValueError(
                f"checkpoint {path!r} was saved with a DistAvgCallback, but its average "
                f"could not be loaded from {str(folder)!r}: {e}"
            ) from e
        if self.average.steps != state["steps"]:
            raise ValueError(
                f"the average in {str(folder)!r} is at step {self.average.steps}, but "
                f"checkpoint {path!r} was saved with the average at step {state['steps']}: "
                f"the folder belongs to another save (interrupted, or copied from elsewhere)"
            )
        self._resumed = path

    def _save(self, trainer: pl.Trainer, filepath: str | os.PathLike) -> None:
        if self.average is None:
            return
        if self._swapped:
            raise RuntimeError(
                "a checkpoint was saved while validation runs on the average: it would hold "
                "the average as the model's weights; save it after validation ends (or "
                "pass evaluate_average=False to DistAvgCallback)"
            )
        path = trainer.strategy.broadcast(os.fspath(filepath))  # one folder for every rank
        save_averages(average_folder(path), {KEY: self.average})

    def _remove(self, trainer: pl.Trainer, filepath: str | os.PathLike) -> None:
        if trainer.is_global_zero:
            folder = os.fspath(average_folder(filepath))
            for path in (folder, folder + SAVING, folder + OLD):
                shutil.rmtree(path, ignore_errors=True)

    def _wrap(self, trainer: pl.Trainer) -> None:
        """Save and remove the average with every checkpoint (see [Note: where the ...])."""
        self._unwrap()
        strategy = trainer.strategy
        save, remove = strategy.save_checkpoint, strategy.remove_checkpoint

        def save_checkpoint(
            checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None
        ) -> None:
            self._save(trainer, filepath)
            save(checkpoint, filepath, storage_options=storage_options)

        def remove_checkpoint(filepath: Any) -> None:
            remove(filepath)
            self._remove(trainer, filepath)

        strategy.save_checkpoint = save_checkpoint
        strategy.remove_checkpoint = remove_checkpoint
        self._strategy = strategy

    def _unwrap(self) -> None:
        strategy, self._strategy = self._strategy, None
        if strategy is not None:
            for name in ("save_checkpoint", "remove_checkpoint"):
                vars(strategy).pop(name, None)


def _check_options(rule: type[BaseAveragedModel], options: dict[str, Any]) -> None:
    if "optimizer" in options:
        raise ValueError(
            "DistAvgCallback takes no optimizer=: it passes trainer.optimizers, so that only "
            "real optimizer steps count"
        )
    params = inspect.signature(rule.__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    allowed = [k for k in params if k not in ("self", "model", "optimizer")]
    for key in options:
        if key not in allowed:
            hint = " (momentum = 1 - decay)" if key == "decay" and "momentum" in allowed else ""
            raise ValueError(f"{rule.__name__} takes no option {key!r}{hint}; it takes {allowed}")


def _check_export(out: str | os.PathLike) -> str:
    """The format of ``out``: ``"lightning"`` or one of distavg.export.FORMATS."""
    suffix = Path(out).suffix
    if suffix == ".ckpt":
        return "lightning"
    if suffix not in SUFFIXES:
        raise ValueError(
            f"export_file must end in .ckpt (a Lightning checkpoint) or one of "
            f"{sorted(SUFFIXES)}, got {os.fspath(out)!r}"
        )
    if SUFFIXES[suffix] == "safetensors" and importlib.util.find_spec("safetensors") is None:
        raise ImportError(
            "exporting to .safetensors needs the safetensors package: "
            "pip install 'distavg[safetensors]' (or export to a .pt or .ckpt file)"
        )
    return SUFFIXES[suffix]
