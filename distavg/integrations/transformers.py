"""Hugging Face transformers: a running average of the weights inside ``Trainer``.

One callback::

    from distavg.integrations.transformers import DistAvgCallback

    trainer = Trainer(model, args, ..., callbacks=[DistAvgCallback("ema", momentum=1e-3)])
    trainer.train()

At the Trainer's events (it calls callbacks in list order, after its ``DefaultFlowCallback``):
  1. ``on_train_begin``: builds the average from the model the Trainer hands its callbacks,
     after it was wrapped (DDP) or sharded (FSDP2), with the Trainer's optimizer as
     ``optimizer=``, so that only real optimizer steps count; on a resume, restores the
     average saved in that checkpoint (see [Note: which checkpoint a resume read]).
  2. ``on_step_end`` (once per optimizer step, after gradient accumulation):
     ``update_parameters``.
  3. evaluation runs on the average (see [Note: evaluation on the average]).
  4. ``on_save``: every rank writes its shards to ``checkpoint-N/distavg``, atomically,
     beside the files the Trainer just wrote there.
  5. ``on_train_end``: optionally exports the average as a ``save_pretrained`` folder and/or
     copies it into the live model for good.

[Note: evaluation on the average]
The Trainer has no event before an evaluation: it evaluates right after ``on_step_end``
(or ``on_epoch_end``, or ``on_train_begin`` with ``eval_on_start``) returns with
``control.should_evaluate`` set, logs the metrics, calls ``on_evaluate``, and only then
writes a checkpoint. So the average goes into the live model (``swapped``) at the end of
those events and comes out, bitwise, in ``on_evaluate``: the evaluation sees the average and
every checkpoint the live weights. A callback placed after this one that clears
``should_evaluate`` would leave the average in: the next step puts the live weights back (a
warning says so), and a checkpoint written meanwhile (its model files would hold the average)
makes ``on_save`` raise.
With a dict of eval datasets the Trainer calls ``on_evaluate`` once per dataset with no
event in between, so only the first dataset is evaluated on the average (a warning says so).

[Note: which checkpoint a resume read]
Callbacks are not told the ``resume_from_checkpoint`` passed to ``train()``; they see the
``TrainerState`` the Trainer read from that checkpoint (``global_step > 0``). The checkpoint
is ``args.resume_from_checkpoint`` when set (the example scripts pass it to ``train()``),
else ``<output_dir>/checkpoint-<global_step>`` (what ``train(resume_from_checkpoint=True)``
picks). Either is taken only if its ``trainer_state.json`` is the state the Trainer resumed
(same step and log history), so an average is never restored from another checkpoint.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..averaged import BaseAveragedModel
from ..rules import rule_class
from ._save import OLD, SAVING, load_averages, save_averages, saved

try:
    from transformers import TrainerCallback
    from transformers.modeling_utils import unwrap_model
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
except ImportError as e:
    raise ImportError(
        "distavg.integrations.transformers needs the transformers package: "
        "pip install 'distavg[transformers]'"
    ) from e

FOLDER = "distavg"
KEY = "ema"  # the key the average is saved under (``distavg export --key``'s default)

__all__ = ["FOLDER", "DistAvgCallback", "export_pretrained"]


class DistAvgCallback(TrainerCallback):
    """Keep a running average of the Trainer's model, evaluate it, checkpoint it.

    Args:
        rule: ``"ema"``, ``"swa"``, ``"annealing"``, ``"warmup"``, ``"power"``,
            ``"halflife"`` (see :data:`distavg.rules.RULES`) or a :class:`~distavg.BaseAveragedModel`
            subclass.
        evaluate_average: run the Trainer's evaluations during training on the average
            instead of the live weights (see [Note: evaluation on the average]).
        swap_at_end: at the end of training, copy the average into the live model for good
            (``trainer.save_model()`` then saves the average). Holds one more copy of this
            rank's model tensors while it copies.
        export_dir: at the end of training, write the average there as a
            ``save_pretrained`` folder (see :func:`export_pretrained`).
        folder: the subfolder of each ``checkpoint-N`` that holds the average.
        strict_resume: on a resume from a checkpoint that holds no average, raise (True) or
            start a new average from the resumed weights with a warning (False).
        **rule_kwargs: passed to the rule's constructor: ``momentum`` and the rule's other
            parameters, ``interval``, ``placement``, ``owner_rank``, ``device``, ``dtype``,
            ``async_update``, ``update_buffers``. ``optimizer`` is the Trainer's.

    With ``args.load_best_model_at_end``, the best checkpoint's average is loaded at the end
    of training before the export and the swap (the best metric was the average's when
    ``evaluate_average``). Each ``train()`` call builds a new average (or restores the
    checkpoint's); after training it stays readable as :attr:`average`, e.g.
    ``with callback.average.swapped(trainer.model): trainer.evaluate()``.
    """

    def __init__(
        self,
        rule: str | type[BaseAveragedModel] = "ema",
        *,
        evaluate_average: bool = True,
        swap_at_end: bool = False,
        export_dir: str | os.PathLike | None = None,
        folder: str = FOLDER,
        strict_resume: bool = True,
        **rule_kwargs: Any,
    ) -> None:
        self.rule = rule_class(rule)
        if "optimizer" in rule_kwargs or "model" in rule_kwargs:
            raise ValueError(
                "DistAvgCallback passes the Trainer's model and optimizer to the rule; got "
                f"{sorted({'model', 'optimizer'} & set(rule_kwargs))} in its keyword arguments"
            )
        if not folder or os.sep in folder or folder in (".", ".."):
            raise ValueError(f"folder must be a plain folder name, got {folder!r}")
        self.rule_kwargs = rule_kwargs
        self.evaluate_average = evaluate_average
        self.swap_at_end = swap_at_end
        self.export_dir = export_dir
        self.folder = folder
        self.strict_resume = strict_resume
        self._average: BaseAveragedModel | None = None
        self._swap: Any = None  # the entered ``swapped()`` context while an evaluation runs
        self._warned_dict = False

    @property
    def average(self) -> BaseAveragedModel:
        """The averager (built when training begins)."""
        if self._average is None:
            raise RuntimeError("the average is built when training begins (on_train_begin)")
        return self._average

    # -- the Trainer's events -------------------------------------------------------

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self._average is not None:
            self._average.close()  # a previous train() call's
        _check_model(model)
        self._average = self.rule(model, **self.rule_kwargs, optimizer=optimizer)
        if state.global_step > 0:
            self._restore(args, state)
        if args.eval_on_start:
            self._swap_in(model)

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if self._swap is not None:
            warnings.warn(
                "the evaluation DistAvgCallback put the average in for did not run (a "
                "callback after it cleared control.should_evaluate); the live weights are "
                "back before this step",
                stacklevel=2,
            )
            self._swap_out()

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.average.update_parameters(model)
        if control.should_evaluate:
            self._swap_in(model)

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        if control.should_evaluate:
            self._swap_in(model)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if self._swap is None:
            return
        self._swap_out()
        if metrics is not None and "eval_runtime" not in metrics and not self._warned_dict:
            self._warned_dict = True
            warnings.warn(
                "eval_dataset is a dict: the Trainer gives callbacks no event between its "
                "datasets, so only the first was evaluated on the average (see [Note: "
                "evaluation on the average] in distavg/integrations/transformers.py)",
                stacklevel=2,
            )

    def on_save(self, args, state, control, **kwargs):
        if self._swap is not None:
            self._swap_out()
            raise RuntimeError(
                f"checkpoint-{state.global_step} was written with the average in the model: "
                "a callback after DistAvgCallback cleared control.should_evaluate; put "
                "DistAvgCallback after it in callbacks="
            )
        save_averages(self._path(_checkpoint_dir(args, state.global_step)), {KEY: self.average})

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self._swap_out()
        avg = self.average
        best = state.best_model_checkpoint
        if args.load_best_model_at_end and best is not None:
            if saved(self._path(best)):
                load_averages(self._path(best), {KEY: avg})
            else:
                warnings.warn(
                    f"the best checkpoint {best!r} holds no average; the export and swap at the "
                    "end use the last one",
                    stacklevel=2,
                )
        if self.export_dir is not None:
            export_pretrained(avg, model, self.export_dir)
        if self.swap_at_end:
            _copy_in(avg, model)
        avg.close()

    # -- helpers ----------------------------------------------------------------------

    def _path(self, checkpoint: str | os.PathLike) -> str:
        return os.path.join(os.fspath(checkpoint), self.folder)

    def _swap_in(self, model: nn.Module) -> None:
        if self.evaluate_average and self._swap is None:
            swap = self.average.swapped(model)
            swap.__enter__()
            self._swap = swap

    def _swap_out(self) -> None:
        swap, self._swap = self._swap, None
        if swap is not None:
            swap.__exit__(None, None, None)

    def _restore(self, args: Any, state: Any) -> None:
        checkpoint = _resumed_checkpoint(args, state)
        path = self._path(checkpoint)
        if any(os.path.exists(p) for p in (path, path + SAVING, path + OLD)):
            load_averages(path, {KEY: self.average})  # also says what an interrupted save left
        elif self.strict_resume:
            raise ValueError(
                f"resuming from {checkpoint!r}, which holds no average in {self.folder!r}: "
                "it was saved without DistAvgCallback (or the job stopped between the "
                "Trainer's files and the average); pass strict_resume=False to start a new "
                "average from the resumed weights"
            )
        else:
            warnings.warn(
                f"resuming from {checkpoint!r}, which holds no average: a new one starts "
                "from the resumed weights (strict_resume=False)",
                stacklevel=2,
            )


def export_pretrained(
    avg: BaseAveragedModel, model: nn.Module, out_dir: str | os.PathLike, **save_kwargs: Any
) -> Path | None:
    """Write ``avg`` as a ``save_pretrained`` folder that ``from_pretrained`` loads.

    Gathers the whole average (``full_state_dict()``, a collective: every rank must call
    this) and writes it with ``model``'s own ``save_pretrained(out_dir, state_dict=...)`` on
    rank 0: config, safetensors weights (tied weights once), sharded files past
    ``max_shard_size``.

    Args:
        avg: the averager of ``model``.
        model: the transformers model being trained (DDP-wrapped or not).
        out_dir: the folder to write.
        **save_kwargs: passed to ``save_pretrained`` (``max_shard_size``, ``variant``, ...).

    Returns:
        ``out_dir`` on rank 0, None on the others.

    Raises:
        ValueError: ``model`` has no ``save_pretrained``, or the average is held by another
            rank than 0 (``save_pretrained`` writes on rank 0 only).
    """
    module = unwrap_model(model)
    if not callable(getattr(module, "save_pretrained", None)):
        raise ValueError(
            f"model must be a transformers PreTrainedModel (wrapped or not), got "
            f"{type(module).__name__}"
        )
    if avg.owner_rank != 0:
        raise ValueError(
            f"export_pretrained needs an average with owner_rank=0 (save_pretrained writes "
            f"on rank 0 only), got owner_rank={avg.owner_rank}"
        )
    state = avg.full_state_dict()
    if not state:
        return None
    module.save_pretrained(out_dir, state_dict=state, **save_kwargs)
    return Path(out_dir)


def _check_model(model: nn.Module | None) -> None:
    if model is None:
        raise ValueError("the Trainer handed DistAvgCallback no model at on_train_begin")
    if any(hasattr(p, "ds_id") for p in model.parameters()):
        raise ValueError(
            "the model's parameters are partitioned by DeepSpeed ZeRO-3, a layout distavg does "
            "not read; use FSDP2 or DeepSpeed ZeRO-1/2"
        )


def _checkpoint_dir(args: Any, step: int) -> str:
    return os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{step}")


def _resumed_checkpoint(args: Any, state: Any) -> str:
    """The checkpoint ``state`` was read from (see [Note: which checkpoint a resume read])."""
    candidates = [_checkpoint_dir(args, state.global_step)]
    if isinstance(args.resume_from_checkpoint, str):
        candidates.insert(0, args.resume_from_checkpoint)
    for checkpoint in candidates:
        if _holds_state(checkpoint, state):
            return checkpoint
    raise ValueError(
        f"training resumed at step {state.global_step}, but none of {candidates} holds that "
        "trainer state; set args.resume_from_checkpoint to the checkpoint passed to train()"
    )


def _holds_state(checkpoint: str, state: Any) -> bool:
    try:
        with open(os.path.join(checkpoint, "trainer_state.json")) as f:
            saved_state: Mapping[str, Any] = json.load(f)
    except (OSError, ValueError):
        return False
    return (
        saved_state.get("global_step") == state.global_step
        and saved_state.get("log_history") == state.log_history
    )


def _copy_in(avg: BaseAveragedModel, model: nn.Module) -> None:
    """Copy the average into ``model``'s own tensors for good."""
    tensors = {id(t): t for t in model.state_dict(keep_vars=True).values()}
    live = [t for t in tensors.values() if isinstance(t, torch.Tensor)]
    with torch.no_grad():
        with avg.swapped(model):
            values = [t.detach().clone() for t in live]
        for t, v in zip(live, values, strict=True):
            t.detach().copy_(v)
