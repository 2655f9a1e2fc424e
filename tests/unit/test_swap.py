"""swapped(): the live model holds the average inside, its own values bitwise after."""

from __future__ import annotations

import pytest
import torch
from reference import perturb, small_model, train_forward

import distavg


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("dtype", [None, torch.float64])
def test_swapped_holds_average_and_restores_bitwise(dtype):
    model = small_model()
    avg = distavg.ExponentialMovingAverage(model, momentum=0.3, dtype=dtype)
    for step in range(4):
        perturb(model, step)
        train_forward(model, step)
        avg.update_parameters(model)
    own = _state(model)
    expected = avg.full_state_dict()
    with avg.swapped(model) as m:
        assert m is model
        for k, v in model.state_dict().items():
            torch.testing.assert_close(v, expected[k].to(v.dtype), rtol=0, atol=0)
    for k, v in model.state_dict().items():
        assert torch.equal(v, own[k]), k


def test_swapped_restores_on_exception():
    model = small_model()
    avg = distavg.StochasticWeightAverage(model)
    for step in range(3):
        perturb(model, step)
        avg.update_parameters(model)
    own = _state(model)
    with pytest.raises(RuntimeError, match="boom"), avg.swapped(model):
        raise RuntimeError("boom")
    for k, v in model.state_dict().items():
        assert torch.equal(v, own[k]), k


def test_swapped_evaluates_the_average():
    model = small_model()
    avg = distavg.ExponentialMovingAverage(model, momentum=0.5)
    for step in range(3):
        perturb(model, step)
        avg.update_parameters(model)
    x = torch.randn(5, 6)
    avg.module.eval()
    expected = avg(x)
    model.eval()
    with torch.no_grad(), avg.swapped(model):
        got = model(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
