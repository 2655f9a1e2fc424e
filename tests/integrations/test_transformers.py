"""transformers ``Trainer`` with ``DistAvgCallback`` on 2 CPU processes (DDP over gloo).

The distributed test launches this file with ``torchrun --standalone``; run as a script it is
the job: three ``Trainer.train()`` runs of a tiny BERT on synthetic data, 6 optimizer steps of
2 accumulated micro-batches each, evaluation and checkpoints every 3 steps:
  A. uninterrupted, ``load_best_model_at_end`` and an export at the end;
  B. the same run (asynchronous updates) stopped after the checkpoint of step 3;
  C. B resumed with ``train(resume_from_checkpoint=True)``, the average swapped in at the end.
Rank 0 records the live weights after every step and during every evaluation; the test
checks them against an EMA computed here by hand.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import torch

import distavg

pytest.importorskip("transformers", reason="needs distavg[transformers]")
from transformers import TrainerCallback  # noqa: E402

from distavg.integrations.transformers import DistAvgCallback  # noqa: E402

MOMENTUM = 0.25
SEQ, VOCAB, TRAIN, EVAL = 8, 32, 32, 16


def _config():
    from transformers import BertConfig

    return BertConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=SEQ, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, num_labels=2,
    )  # fmt: skip


def _model():
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(_config())


def _data(n: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, SEQ), generator=gen)
    return {"input_ids": ids, "labels": (ids[:, 0] < VOCAB // 2).long()}


class _Rows(torch.utils.data.Dataset):
    def __init__(self, columns: dict[str, torch.Tensor]) -> None:
        self.columns = columns

    def __len__(self) -> int:
        return len(next(iter(self.columns.values())))

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.columns.items()}


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class _Recorder(TrainerCallback):
    """Placed before DistAvgCallback: sees the live weights at on_step_end."""

    def __init__(self, stop_at: int | None = None) -> None:
        self.steps: dict[int, dict] = {}
        self.evaluated: dict[int, dict] = {}  # the model's weights during each evaluation
        self.eval_loss: dict[int, float] = {}
        self.stop_at = stop_at

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.steps[state.global_step] = _state(model)
        if state.global_step == self.stop_at:
            control.should_training_stop = True

    def on_prediction_step(self, args, state, control, model=None, **kwargs):
        self.evaluated.setdefault(state.global_step, _state(model))

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self.eval_loss[state.global_step] = metrics["eval_loss"]


def _trainer(out: Path, callbacks: list, **overrides):
    from transformers import Trainer, TrainingArguments

    options = dict(
        output_dir=str(out), use_cpu=True, ddp_backend="gloo", report_to=[],
        disable_tqdm=True, per_device_train_batch_size=4, per_device_eval_batch_size=8,
        gradient_accumulation_steps=2, max_steps=6, learning_rate=0.05, seed=0,
        eval_strategy="steps", eval_steps=3, save_strategy="steps", save_steps=3,
        logging_strategy="no", ddp_find_unused_parameters=False,
        # else 5.x scales a loss that ignores num_items_in_batch by the world size
        average_tokens_across_devices=False,
    )  # fmt: skip
    args = TrainingArguments(**{**options, **overrides})
    return Trainer(
        model=_model(), args=args, train_dataset=_Rows(_data(TRAIN, 1)),
        eval_dataset=_Rows(_data(EVAL, 2)), callbacks=callbacks,
    )  # fmt: skip


def _job(root: Path) -> None:
    import torch.distributed as dist

    from distavg.integrations.transformers import export_pretrained

    # A: uninterrupted; the best checkpoint by the average's eval loss (greater is better here,
    # so that the best is not the last) is loaded at the end, and its average exported.
    rec_a = _Recorder()
    cb_a = DistAvgCallback("ema", momentum=MOMENTUM, export_dir=root / "export")
    trainer = _trainer(
        root / "A", [rec_a, cb_a], load_best_model_at_end=True,
        metric_for_best_model="loss", greater_is_better=True,
    )  # fmt: skip
    trainer.train()
    best = trainer.state.best_model_checkpoint
    sharded = [v.numel() for v in cb_a.average.shards.views]

    # B, then C: the same run, interrupted after step 3 and resumed from the latest checkpoint
    _trainer(
        root / "BC",
        [_Recorder(stop_at=3), DistAvgCallback("ema", momentum=MOMENTUM, async_update=True)],
    ).train()
    rec_c = _Recorder()
    cb_c = DistAvgCallback("ema", momentum=MOMENTUM, async_update=True, swap_at_end=True)
    trainer_c = _trainer(root / "BC", [rec_c, cb_c], eval_on_start=True)
    trainer_c.train(resume_from_checkpoint=True)

    owner = distavg.ExponentialMovingAverage(trainer_c.model, placement="owner", owner_rank=1)
    try:
        export_pretrained(owner, trainer_c.model, root / "never")
        owner_error = None
    except ValueError as e:
        owner_error = str(e)
    if dist.get_rank() == 0:
        torch.save(
            {
                "steps": rec_a.steps, "evaluated": rec_a.evaluated, "eval_loss": rec_a.eval_loss,
                "best": best, "sharded": sharded, "c_steps": cb_c.average.steps,
                "c_final": _state(trainer_c.model), "c_evaluated": rec_c.evaluated,
                "owner_error": owner_error,
            },
            root / "result.pt",
        )  # fmt: skip
    dist.barrier()


def _reference(steps: dict[int, dict]) -> dict[int, dict]:
    """The EMA of the recorded weights, by hand: step 1 copies, later steps lerp."""
    ref, avg = {}, None
    for s in sorted(steps):
        w = steps[s]
        avg = (
            {k: v.clone() for k, v in w.items()}
            if avg is None
            else {k: torch.lerp(avg[k], v, MOMENTUM) if v.is_floating_point() else v.clone()
                  for k, v in w.items()}
        )  # fmt: skip
        ref[s] = avg
    return ref


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _eval_loss(state: dict) -> float:
    model = _model()
    model.load_state_dict(state)
    with torch.no_grad():
        return model(**_data(EVAL, 2)).loss.item()


def test_trainer_average_evaluation_checkpoint_resume_and_export(tmp_path):
    from dist_utils import torchrun_self  # tests/ is on the path under pytest only
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    from distavg.export import read_checkpoint

    torchrun_self(__file__, tmp_path, timeout=600, HF_HUB_OFFLINE="1")
    r = torch.load(tmp_path / "result.pt", weights_only=False)
    ref = _reference(r["steps"])
    a = tmp_path / "A"

    # the average equals the EMA of the run's own weights after each real optimizer step
    assert sorted(r["steps"]) == [1, 2, 3, 4, 5, 6]
    for step in (3, 6):
        assert _equal(read_checkpoint(a / f"checkpoint-{step}" / "distavg"), ref[step])
    # sharded over the 2 ranks: each rank wrote its own shards
    assert 0 < r["sharded"][0] < sum(v.numel() for v in ref[6].values())
    shards = sorted(p.name for p in (a / "checkpoint-3" / "distavg").glob("*.distcp"))
    assert shards == ["__0_0.distcp", "__1_0.distcp"]

    # evaluation ran on the average, and the live weights came back before the checkpoint
    for step in (3, 6):
        assert _equal(r["evaluated"][step], ref[step])
        assert not _equal(r["evaluated"][step], r["steps"][step])
        average, live = _eval_loss(ref[step]), _eval_loss(r["steps"][step])
        assert r["eval_loss"][step] == pytest.approx(average, rel=1e-5)
        assert r["eval_loss"][step] != pytest.approx(live, rel=1e-3)
        weights = load_file(a / f"checkpoint-{step}" / "model.safetensors")
        assert _equal(weights, {k: r["steps"][step][k] for k in weights})

    # a save -> resume continues the average exactly (and asynchronous updates change nothing)
    bc = tmp_path / "BC"
    assert _equal(read_checkpoint(bc / "checkpoint-3" / "distavg"), ref[3])
    assert _equal(read_checkpoint(bc / "checkpoint-6" / "distavg"), ref[6])
    assert _equal(r["c_evaluated"][3], ref[3])  # eval_on_start: on the restored average
    assert r["c_steps"] == 6
    assert _equal(r["c_final"], ref[6])  # swap_at_end: the live model holds the average

    # the export is the best checkpoint's average and loads into a fresh model
    assert r["best"].endswith("checkpoint-3"), r["eval_loss"]
    exported = AutoModelForSequenceClassification.from_pretrained(tmp_path / "export")
    assert _equal(_state(exported), ref[3])
    assert "owner_rank=0" in r["owner_error"] and "got owner_rank=1" in r["owner_error"]


class _Args:
    def __init__(self, output_dir: Path, resume_from_checkpoint: str | None = None) -> None:
        self.output_dir = str(output_dir)
        self.resume_from_checkpoint = resume_from_checkpoint


class _State:
    def __init__(self, global_step: int) -> None:
        self.global_step = global_step
        self.log_history = [{"loss": 1.0, "step": global_step}]


def _checkpoint(path: Path, global_step: int, log_history: list) -> Path:
    import json

    path.mkdir(parents=True)
    saved = {"global_step": global_step, "log_history": log_history}
    (path / "trainer_state.json").write_text(json.dumps(saved))
    return path


def test_resume_finds_the_checkpoint_the_trainer_read_or_says_how_to_name_it(tmp_path):
    cb = DistAvgCallback()
    state = _State(4)
    with pytest.raises(ValueError, match=r"none of .* holds that trainer state; set args.resume"):
        cb._restore(_Args(tmp_path), state)
    # another run's checkpoint of the same step is not taken for the one resumed
    _checkpoint(tmp_path / "checkpoint-4", 4, [])
    elsewhere = _checkpoint(tmp_path / "moved", 4, state.log_history)
    with pytest.raises(ValueError, match=r"none of .*checkpoint-4"):
        cb._restore(_Args(tmp_path), state)
    with pytest.raises(ValueError, match=r"resuming from .*moved.*holds no average in 'distavg'"):
        cb._restore(_Args(tmp_path, str(elsewhere)), state)
    lenient = DistAvgCallback(strict_resume=False)
    with pytest.warns(UserWarning, match=r"a new one starts from the resumed weights"):
        lenient._restore(_Args(tmp_path, str(elsewhere)), state)


def test_callback_argument_errors():
    with pytest.raises(ValueError, match=r"rule must be one of \['ema', .*got 'ema2'"):
        DistAvgCallback("ema2")
    with pytest.raises(ValueError, match=r"rule must be one of .* got <class 'torch.nn"):
        DistAvgCallback(torch.nn.Linear)
    with pytest.raises(ValueError, match=r"Trainer's model and optimizer.*\['optimizer'\]"):
        DistAvgCallback(optimizer=None)
    with pytest.raises(ValueError, match=r"folder must be a plain folder name, got 'a/b'"):
        DistAvgCallback(folder="a/b")
    with pytest.raises(RuntimeError, match=r"built when training begins"):
        DistAvgCallback().average  # noqa: B018
    from distavg.integrations.transformers import export_pretrained

    avg = distavg.ExponentialMovingAverage(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"must be a transformers PreTrainedModel.*got Linear"):
        export_pretrained(avg, torch.nn.Linear(2, 2), "unused")


class _Swap:
    """Stands in for an entered ``swapped()`` context."""

    exited = False

    def __exit__(self, *exc) -> None:
        self.exited = True


class _Control:
    should_evaluate = False


def test_an_average_left_in_is_taken_out_and_said(tmp_path):
    cb, args, state = DistAvgCallback(), _Args(tmp_path), _State(4)
    cb._swap = swap = _Swap()  # a callback after this one cleared should_evaluate
    with pytest.warns(UserWarning, match=r"did not run .* the live weights are back"):
        cb.on_step_begin(args, state, _Control())
    assert swap.exited and cb._swap is None
    cb._swap = swap = _Swap()
    with pytest.raises(RuntimeError, match=r"checkpoint-4 was written with the average in the"):
        cb.on_save(args, state, _Control())
    assert swap.exited
    cb._swap = swap = _Swap()  # eval_dataset={"a": ..., "b": ...}
    with pytest.warns(UserWarning, match=r"eval_dataset is a dict: .* only the first"):
        cb.on_evaluate(args, state, _Control(), metrics={"eval_a_loss": 1.0})
    assert swap.exited


def test_deepspeed_zero3_parameters_are_refused(tmp_path):
    model = torch.nn.Linear(2, 2)
    model.weight.ds_id = 0  # what ZeRO-3 sets on the parameters it partitions
    with pytest.raises(ValueError, match=r"partitioned by DeepSpeed ZeRO-3"):
        DistAvgCallback().on_train_begin(_Args(tmp_path), _State(0), _Control(), model=model)


def test_missing_transformers_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    monkeypatch.delitem(sys.modules, "distavg.integrations.transformers")
    with pytest.raises(ImportError, match=r"pip install 'distavg\[transformers\]'"):
        import distavg.integrations.transformers  # noqa: F401


if __name__ == "__main__":
    warnings.filterwarnings("ignore", category=FutureWarning)
    _job(Path(sys.argv[1]))
