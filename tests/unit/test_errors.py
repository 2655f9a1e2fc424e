"""Every user-facing error: its message names the argument, the value and what is allowed,
and the average is left untouched."""

from __future__ import annotations

import pytest
import torch
from reference import perturb, small_model
from torch import nn

import distavg


def _snapshot(avg):
    return {k: v.clone() for k, v in avg.full_state_dict().items()}


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"momentum": 1.2}, r"momentum must be in \(0, 1\), got 1.2"),
        ({"momentum": 0.0}, r"momentum must be in \(0, 1\), got 0.0"),
        ({"interval": 0}, r"interval must be an integer >= 1, got 0"),
        ({"interval": 1.5}, r"interval must be an integer >= 1, got 1.5"),
        (
            {"placement": "everywhere"},
            r"placement must be one of \('sharded', 'owner'\), got 'everywhere'",
        ),
        ({"owner_rank": 3}, r"owner_rank must be a rank in \[0, 1\), got 3"),
        (
            {"dtype": torch.int32},
            r"dtype must be None or one of torch.float16, torch.bfloat16, torch.float32, torch.float64 \(the dtypes the update can lerp in\), got torch.int32",
        ),
    ],
)
def test_ema_constructor_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        distavg.ExponentialMovingAverage(small_model(), **kwargs)


@pytest.mark.parametrize(
    ("cls", "kwargs", "message"),
    [
        (distavg.MomentumAnnealingEMA, {"gamma": 0}, r"gamma must be a finite number > 0, got 0"),
        (distavg.MomentumAnnealingEMA, {"gamma": -5}, r"gamma must be a finite number > 0, got -5"),
        (distavg.WarmupEMA, {"decay": 1.0}, r"decay must be in \(0, 1\), got 1.0"),
        (
            distavg.WarmupEMA,
            {"min_decay": 0.99999},
            r"min_decay must be in \[0, decay=0.9999\], got 0.99999",
        ),
        (distavg.WarmupEMA, {"inv_gamma": 0}, r"inv_gamma must be a finite number > 0, got 0"),
        (distavg.WarmupEMA, {"power": -1}, r"power must be a finite number > 0, got -1"),
        (
            distavg.PowerEMA,
            {},
            r"pass exactly one of sigma_rel and gamma, got sigma_rel=None, gamma=None",
        ),
        (
            distavg.PowerEMA,
            {"sigma_rel": 0.1, "gamma": 7},
            r"pass exactly one of sigma_rel and gamma",
        ),
        (distavg.PowerEMA, {"sigma_rel": 0.3}, r"sigma_rel must be in \(0, 0.2887\), got 0.3"),
        (distavg.PowerEMA, {"gamma": 0}, r"gamma must be a finite number > 0, got 0"),
        (distavg.HalfLifeEMA, {"half_life": 0}, r"half_life must be a finite number > 0, got 0"),
        (distavg.HalfLifeEMA, {"rampup": -0.1}, r"rampup must be a finite number > 0, got -0.1"),
        (
            distavg.StochasticWeightAverage,
            {"interval": -2},
            r"interval must be an integer >= 1, got -2",
        ),
    ],
)
def test_rule_constructor_errors(cls, kwargs, message):
    with pytest.raises(ValueError, match=message):
        cls(small_model(), **kwargs)


def test_momentum_above_half_warns():
    with pytest.warns(
        UserWarning, match=r"momentum=0.9 is the weight of the new value .* momentum=0.1\?"
    ):
        distavg.ExponentialMovingAverage(small_model(), momentum=0.9)


def test_model_with_other_names_is_rejected_and_average_kept():
    model = small_model()
    avg = distavg.ExponentialMovingAverage(model, momentum=0.5)
    avg.update_parameters(model)
    before = _snapshot(avg)
    other = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 2))
    with pytest.raises(ValueError, match=r"does not match the averaged one: missing \['1.bias'"):
        avg.update_parameters(other)
    _assert_same(before, _snapshot(avg))
    assert avg.steps == 1


def test_model_with_other_shapes_is_rejected_and_average_kept():
    model = small_model()
    avg = distavg.ExponentialMovingAverage(model, momentum=0.5)
    avg.update_parameters(model)
    before = _snapshot(avg)
    other = small_model()
    other[3] = nn.Linear(10, 4)
    with pytest.raises(ValueError, match=r"changed \(shape, dtype\) \['3.weight: \(\(2, 10\)"):
        avg.update_parameters(other)
    _assert_same(before, _snapshot(avg))


def test_model_moved_to_another_device_is_rejected():
    model = small_model()
    avg = distavg.ExponentialMovingAverage(model, momentum=0.5)
    avg.update_parameters(model)
    before = _snapshot(avg)
    model.to("meta")
    with pytest.raises(
        ValueError, match=r"is on meta, but the average was built for a model on cpu"
    ):
        avg.update_parameters(model)
    _assert_same(before, _snapshot(avg))


def test_model_cast_to_another_dtype_is_rejected():
    model = small_model()
    avg = distavg.ExponentialMovingAverage(model, momentum=0.5)
    model.double()
    with pytest.raises(ValueError, match=r"changed \(shape, dtype\)"):
        avg.update_parameters(model)


def test_non_contiguous_parameter_is_rejected():
    model = nn.Linear(4, 3)
    model.weight = nn.Parameter(torch.randn(4, 3).t())
    with pytest.raises(ValueError, match=r"model tensor 'weight' is not contiguous"):
        distavg.ExponentialMovingAverage(model)


def test_custom_weight_out_of_range():
    class Bad(distavg.BaseAveragedModel):
        def weight(self, steps):
            return 1.5

    model = small_model()
    avg = Bad(model)
    avg.update_parameters(model)
    before = _snapshot(avg)
    with pytest.raises(ValueError, match=r"Bad.weight\(1\) must be in \[0, 1\], got 1.5"):
        avg.update_parameters(model)
    _assert_same(before, _snapshot(avg))


def test_model_without_tensors():
    with pytest.raises(ValueError, match="model has no parameters or buffers to average"):
        distavg.ExponentialMovingAverage(nn.ReLU())


def test_update_after_error_still_counts_right():
    model = small_model()
    avg = distavg.StochasticWeightAverage(model)
    avg.update_parameters(model)
    with pytest.raises(ValueError):
        avg.update_parameters(nn.Linear(1, 1))
    perturb(model, 0)
    avg.update_parameters(model)
    assert avg.steps == 2
