"""Averaging functions written for mmengine (avg_func) or torch (avg_fn, multi_avg_fn) run
unchanged on distavg's average: bitwise equal to the peer's own update, sync and async."""

from __future__ import annotations

import pytest
import torch
from reference import perturb, small_model, train_forward
from torch.optim.swa_utils import (
    AveragedModel,
    get_ema_avg_fn,
    get_ema_multi_avg_fn,
    get_swa_avg_fn,
)

import distavg


class HalfwayEMA(distavg.BaseAveragedModel):
    """mmengine's extension point: override avg_func (not elementwise-safe ones are the
    user's business; this one is elementwise)."""

    def avg_func(self, averaged_param, source_param, steps):
        averaged_param.mul_(0.75).add_(source_param, alpha=0.25)


@pytest.mark.parametrize("async_update", [False, True])
@pytest.mark.parametrize(
    "fn",
    [
        {"multi_avg_fn": get_ema_multi_avg_fn(0.9)},
        {"avg_fn": get_ema_avg_fn(0.9)},
        {"avg_fn": get_swa_avg_fn()},
    ],
    ids=["multi_avg_fn_ema", "avg_fn_ema", "avg_fn_swa"],
)
def test_torch_avg_fns_equal_averaged_model_bitwise(fn, async_update):
    model = small_model()
    ref = AveragedModel(model, **fn)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    avg = distavg.BaseAveragedModel(model, async_update=async_update, optimizer=opt, **fn)
    for _ in range(6):
        opt.zero_grad()
        model(torch.randn(8, 6)).square().mean().backward()
        opt.step()
        ref.update_parameters(model)
        avg.update_parameters(model)
    got = avg.full_state_dict()
    for name, p in ref.module.named_parameters():
        assert torch.equal(got[name], p), name
    avg.close()


def test_mmengine_avg_func_override_runs_on_the_average():
    model = small_model()
    want = {k: v.clone() for k, v in model.state_dict().items()}
    avg = HalfwayEMA(model)
    params = {k for k, _ in model.named_parameters()}
    for step in range(6):
        perturb(model, step)
        train_forward(model, step)
        avg.update_parameters(model)
        for k, v in model.state_dict().items():
            if step == 0 or k not in params:
                want[k] = v.clone()
            else:
                want[k] = want[k] * 0.75 + v * 0.25
    got = avg.full_state_dict()
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_one_function_only_and_a_rule_needs_one():
    model = small_model()
    with pytest.raises(
        ValueError, match=r"pass one averaging function, got \['avg_fn', 'multi_avg_fn'\]"
    ):
        distavg.BaseAveragedModel(
            model, avg_fn=get_ema_avg_fn(0.9), multi_avg_fn=get_ema_multi_avg_fn(0.9)
        )
    with pytest.raises(ValueError, match="avg_fn must be callable, got float"):
        distavg.BaseAveragedModel(model, avg_fn=0.9)
    bare = distavg.BaseAveragedModel(model)
    bare.update_parameters(model)
    with pytest.raises(
        NotImplementedError, match="override it .* or pass avg_fn= or multi_avg_fn="
    ):
        bare.update_parameters(model)
