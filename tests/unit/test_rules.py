"""Every rule against a plain per-tensor reference loop, and EMA/SWA against torch.optim.swa_utils."""

from __future__ import annotations

import math

import pytest
import torch
from reference import ReferenceAverage, perturb, small_model, train_forward
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import distavg

RULES = {
    "swa": (distavg.StochasticWeightAverage, {}),
    "ema": (distavg.ExponentialMovingAverage, {"momentum": 0.1}),
    "anneal": (distavg.MomentumAnnealingEMA, {"momentum": 0.05, "gamma": 4}),
    "warmup": (distavg.WarmupEMA, {"decay": 0.95, "inv_gamma": 2.0, "power": 0.75}),
    "power": (distavg.PowerEMA, {"sigma_rel": 0.15}),
    "halflife": (distavg.HalfLifeEMA, {"half_life": 3.0, "rampup": 0.5}),
}


def _reference_weight(name: str, kw: dict, interval: int):
    """The schedules written out independently of the library."""
    if name == "swa":
        return lambda s: 1 / (s // interval + 1)
    if name == "ema":
        return lambda s: kw["momentum"]
    if name == "anneal":
        return lambda s: max(kw["momentum"], kw["gamma"] / (kw["gamma"] + s))
    if name == "warmup":
        return lambda s: (
            1 - min(max(1 - (1 + s / kw["inv_gamma"]) ** -kw["power"], 0.0), kw["decay"])
        )
    if name == "power":
        g = distavg.sigma_rel_to_gamma(kw["sigma_rel"])
        return lambda s: 1 - (1 - interval / (s + 1)) ** (g + 1)
    if name == "halflife":
        return lambda s: 1 - 0.5 ** (interval / min(kw["half_life"], kw["rampup"] * s))
    raise AssertionError(name)


@pytest.mark.parametrize("update_buffers", [False, True])
@pytest.mark.parametrize("interval", [1, 3])
@pytest.mark.parametrize("rule", sorted(RULES))
def test_rule_matches_per_tensor_reference(rule, interval, update_buffers):
    cls, kw = RULES[rule]
    model = small_model()
    avg = cls(model, interval=interval, update_buffers=update_buffers, **kw)
    ref = ReferenceAverage(model, _reference_weight(rule, kw, interval), interval, update_buffers)
    for step in range(10):
        perturb(model, step)
        train_forward(model, step)
        avg.update_parameters(model)
        ref.update(model)
    got = avg.full_state_dict()
    assert got.keys() == ref.avg.keys()
    for k, v in ref.avg.items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=0, msg=k)
    assert avg.steps == 10
    # the averaged module is the same numbers, usable for inference
    assert torch.equal(avg.module[0].weight, ref.avg["0.weight"])
    assert avg.module[1].num_batches_tracked.item() == 10


def test_module_forward_runs_the_average():
    model = small_model()
    avg = distavg.ExponentialMovingAverage(model, momentum=0.5)
    for step in range(3):
        perturb(model, step)
        avg.update_parameters(model)
    x = torch.randn(4, 6)
    avg.module.eval()
    expected = torch.func.functional_call(small_model().eval(), avg.full_state_dict(), (x,))
    torch.testing.assert_close(avg(x), expected)
    assert not any(p.requires_grad for p in avg.module.parameters())


def test_ema_matches_torch_averaged_model():
    model = small_model()
    ours = distavg.ExponentialMovingAverage(model, momentum=0.2)
    theirs = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.8))
    for step in range(12):
        perturb(model, step)
        ours.update_parameters(model)
        theirs.update_parameters(model)
    got = ours.full_state_dict()
    for k, p in theirs.module.named_parameters():
        torch.testing.assert_close(got[k], p, rtol=1e-6, atol=1e-7)


def test_swa_matches_torch_averaged_model():
    model = small_model()
    ours = distavg.StochasticWeightAverage(model)
    theirs = AveragedModel(model)
    samples = []
    for step in range(9):
        perturb(model, step)
        ours.update_parameters(model)
        theirs.update_parameters(model)
        samples.append(model[0].weight.detach().clone())
    got = ours.full_state_dict()
    for k, p in theirs.module.named_parameters():
        torch.testing.assert_close(got[k], p, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got["0.weight"], torch.stack(samples).mean(0), rtol=1e-5, atol=1e-6)


def test_custom_rule_overrides_one_method():
    class Constant(distavg.BaseAveragedModel):
        def weight(self, steps: int) -> float:
            return 0.25

    model = small_model()
    avg = Constant(model)
    ref = ReferenceAverage(model, lambda s: 0.25)
    for step in range(4):
        perturb(model, step)
        avg.update_parameters(model)
        ref.update(model)
    torch.testing.assert_close(avg.full_state_dict()["3.bias"], ref.avg["3.bias"], rtol=0, atol=0)


def test_power_ema_profile_is_power_function():
    """With gamma, the average weights sample t by ~ t**gamma whatever the interval."""
    gamma = 2.0
    for interval in (1, 4):
        model = torch.nn.Linear(1, 1, bias=False)
        avg = distavg.PowerEMA(model, gamma=gamma, interval=interval)
        n = 400
        for t in range(n):  # the parameter equals the step number: the average is E[t]
            with torch.no_grad():
                model.weight.fill_(t + 1)
            avg.update_parameters(model)
        mean = avg.full_state_dict()["weight"].item()
        # continuous power profile: E[t] = (gamma+1)/(gamma+2) * T
        assert math.isclose(mean, (gamma + 1) / (gamma + 2) * n, rel_tol=0.02), (interval, mean)


def test_sigma_rel_round_trip():
    for gamma in (0.5, 6.94, 16.97):
        sigma = math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))
        assert math.isclose(distavg.sigma_rel_to_gamma(sigma), gamma, rel_tol=1e-9)


def test_half_life_halves_old_weight():
    model = torch.nn.Linear(1, 1, bias=False)
    avg = distavg.HalfLifeEMA(model, half_life=10, interval=2)
    with torch.no_grad():
        model.weight.fill_(1.0)
    avg.update_parameters(model)
    with torch.no_grad():
        model.weight.fill_(0.0)
    for _ in range(20):  # 20 calls, half-life 10 calls: 1 -> 0.25
        avg.update_parameters(model)
    assert math.isclose(avg.full_state_dict()["weight"].item(), 0.25, rel_tol=1e-5)


def test_tied_weights_export_both_keys():
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(5, 4)
            self.head = torch.nn.Linear(4, 5, bias=False)
            self.head.weight = self.emb.weight

    model = Tied()
    avg = distavg.ExponentialMovingAverage(model, momentum=0.5)
    avg.update_parameters(model)
    sd = avg.full_state_dict()
    assert sd.keys() == model.state_dict().keys()
    assert torch.equal(sd["emb.weight"], sd["head.weight"])
    assert avg.shards.nbytes < 2 * 5 * 4 * 4  # stored once


def test_wrappers_are_unwrapped():
    model = small_model()
    compiled = torch.compile(model)
    avg = distavg.ExponentialMovingAverage(compiled, momentum=0.5)
    avg.update_parameters(compiled)
    assert avg.full_state_dict().keys() == model.state_dict().keys()


def test_fp32_average_of_bf16_params():
    model = small_model().to(torch.bfloat16)
    avg = distavg.ExponentialMovingAverage(model, momentum=0.001, dtype=torch.float32)
    ref = ReferenceAverage(model, lambda s: 0.001)
    ref.avg = {k: v.float() if v.is_floating_point() else v for k, v in ref.avg.items()}
    for step in range(5):
        perturb(model, step)
        avg.update_parameters(model)
        ref.update(model)
    got = avg.full_state_dict()
    assert got["0.weight"].dtype == torch.float32
    torch.testing.assert_close(got["0.weight"], ref.avg["0.weight"], rtol=0, atol=0)
    assert got["1.num_batches_tracked"].dtype == torch.int64


def test_low_precision_average_warns_once():
    model = small_model().to(torch.bfloat16)
    avg = distavg.ExponentialMovingAverage(model, momentum=0.0002)
    avg.update_parameters(model)
    with pytest.warns(
        UserWarning, match=r"torch.bfloat16 with weight 0.0002, below its resolution"
    ):
        avg.update_parameters(model)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        avg.update_parameters(model)  # once only
