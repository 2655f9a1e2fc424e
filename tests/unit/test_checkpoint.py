"""One process: the DCP Stateful form, staged loads that reject bad checkpoints untouched,
exact resume for every rule, and export to a plain model."""

from __future__ import annotations

import json
import sys

import pytest
import torch
import torch.distributed.checkpoint as dcp
from reference import perturb, small_model, train_forward
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException

import distavg
from distavg.export import export_average, export_checkpoint, read_checkpoint, save_file

# dcp without a process group warns that it assumes one process: that is the point here.
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

RULES = [
    (distavg.ExponentialMovingAverage, {"momentum": 0.3, "interval": 2}),
    (distavg.StochasticWeightAverage, {"interval": 2}),
    (distavg.MomentumAnnealingEMA, {"momentum": 0.05, "gamma": 4}),
    (distavg.WarmupEMA, {"decay": 0.99, "power": 0.75}),
    (distavg.PowerEMA, {"sigma_rel": 0.1}),
    (distavg.HalfLifeEMA, {"half_life": 3.0, "rampup": 0.5}),
]


def _trained(cls=distavg.ExponentialMovingAverage, steps=4, seed=0, **kw):
    model = small_model(seed)
    avg = cls(model, **({"momentum": 0.3} if cls is distavg.ExponentialMovingAverage else {}), **kw)
    for s in range(steps):
        perturb(model, s)
        train_forward(model, s)
        avg.update_parameters(model)
    return model, avg


def _values(avg) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in avg.full_state_dict().items()}


def _assert_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_state_dict_form_holds_steps_rule_keys_and_a_snapshot():
    _, avg = _trained(steps=3)
    sd = avg.state_dict()
    assert set(sd) == {"steps", "rule", "keys", "average"}
    assert sd["steps"] == 3
    assert json.loads(sd["rule"]) == {
        "name": "ExponentialMovingAverage",
        "interval": 1,
        "momentum": 0.3,
    }
    assert list(json.loads(sd["keys"])) == list(small_model().state_dict())
    before = _values(avg)
    for t in sd["average"].values():  # the snapshot is not the live average
        t.zero_()
    _assert_equal(_values(avg), before)


def test_dcp_round_trip_restores_values_and_steps(tmp_path):
    model, avg = _trained(steps=5)
    dcp.save({"ema": avg}, checkpoint_id=tmp_path)
    fresh = distavg.ExponentialMovingAverage(small_model(seed=1), momentum=0.3)
    dcp.load({"ema": fresh}, checkpoint_id=tmp_path)
    assert fresh.steps == 5
    _assert_equal(_values(fresh), _values(avg))
    x = torch.randn(4, 6)
    assert torch.equal(fresh.module.eval()(x), avg.module.eval()(x))


@pytest.mark.parametrize(
    "other, message",
    [
        (
            lambda m: distavg.ExponentialMovingAverage(m, momentum=0.2),
            r"checkpoint holds a \{'name': 'ExponentialMovingAverage', 'interval': 1, "
            r"'momentum': 0.3\} average, but this averager is .*'momentum': 0.2",
        ),
        (
            lambda m: distavg.StochasticWeightAverage(m),
            r"checkpoint holds a .*ExponentialMovingAverage.* but this averager is "
            r"\{'name': 'StochasticWeightAverage', 'interval': 1\}",
        ),
        (
            lambda m: distavg.ExponentialMovingAverage(m, momentum=0.3, interval=2),
            r"but this averager is .*'interval': 2",
        ),
    ],
)
def test_load_of_another_rule_is_an_error_that_leaves_the_average_untouched(
    tmp_path, other, message
):
    _, avg = _trained(steps=4)
    dcp.save({"ema": avg}, checkpoint_id=tmp_path)
    target = other(small_model(seed=1))
    target.update_parameters(small_model(seed=2))
    before = _values(target)
    with pytest.raises(ValueError, match=message):
        dcp.load({"ema": target}, checkpoint_id=tmp_path)
    _assert_equal(_values(target), before)
    assert target.steps == 1


def _other_shape_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 11), nn.BatchNorm1d(11), nn.ReLU(), nn.Linear(11, 2))


def _smaller_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 10), nn.BatchNorm1d(10))


@pytest.mark.parametrize(
    "build, exc, message",
    [
        (
            _other_shape_model,
            CheckpointException,  # raised by dcp's planner, before any data is read
            r"Size mismatch between saved torch.Size\(\[10, 6\]\) and current: "
            r"torch.Size\(\[11, 6\]\) for ema.average.0.weight",
        ),
        (
            _smaller_model,
            ValueError,
            r"checkpoint average is of another model: it has tensors \['3.bias', "
            r"'3.weight'\] that this model lacks and lacks \[\]",
        ),
    ],
)
def test_load_into_another_model_is_an_error_that_leaves_the_average_untouched(
    tmp_path, build, exc, message
):
    _, avg = _trained(steps=2)
    dcp.save({"ema": avg}, checkpoint_id=tmp_path)
    target = distavg.ExponentialMovingAverage(build(), momentum=0.3)
    before = _values(target)
    with pytest.raises(exc, match=message):
        dcp.load({"ema": target}, checkpoint_id=tmp_path)
    _assert_equal(_values(target), before)
    assert target.steps == 0


def test_load_of_a_checkpoint_lacking_a_tensor_names_it(tmp_path):
    _, avg = _trained(steps=2)
    dcp.save({"ema": avg}, checkpoint_id=tmp_path)
    torch.manual_seed(0)
    bigger = nn.Sequential(*small_model(), nn.Linear(2, 3))
    with pytest.raises(
        CheckpointException, match=r"Missing key in checkpoint state_dict: ema.average.4"
    ):
        target = distavg.ExponentialMovingAverage(bigger, momentum=0.3)
        dcp.load({"ema": target}, checkpoint_id=tmp_path)


def test_corrupt_shard_file_is_an_error_that_leaves_the_average_untouched(tmp_path):
    _, avg = _trained(steps=3)
    dcp.save({"ema": avg}, checkpoint_id=tmp_path)
    (shard,) = tmp_path.glob("*.distcp")
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    target = distavg.ExponentialMovingAverage(small_model(seed=1), momentum=0.3)
    before = _values(target)
    with pytest.raises(CheckpointException):
        dcp.load({"ema": target}, checkpoint_id=tmp_path)
    _assert_equal(_values(target), before)
    with pytest.raises(ValueError, match=r"could not read the average under key='ema' from"):
        read_checkpoint(tmp_path)


def test_direct_load_state_dict_errors_name_the_problem():
    _, avg = _trained(steps=2)
    sd = avg.state_dict()
    with pytest.raises(ValueError, match=r"state_dict has no \['keys'\] entries; got keys"):
        avg.load_state_dict({k: v for k, v in sd.items() if k != "keys"})
    with pytest.raises(ValueError, match=r"state_dict 'steps' must be an integer >= 0, got -1"):
        avg.load_state_dict({**sd, "steps": -1})
    with pytest.raises(ValueError, match=r"state_dict 'rule' must be the JSON text"):
        avg.load_state_dict({**sd, "rule": {"name": "ExponentialMovingAverage"}})
    bad = dict(sd["average"], **{"0.weight": torch.zeros(3, 6)})
    with pytest.raises(ValueError, match=r"checkpoint tensor '0.weight' has shape \(3, 6\), "):
        avg.load_state_dict({**sd, "average": bad})
    missing = {k: v for k, v in sd["average"].items() if k != "0.bias"}
    with pytest.raises(ValueError, match=r"checkpoint average has no tensor '0.bias'"):
        avg.load_state_dict({**sd, "average": missing})


def test_torch_save_of_state_dict_round_trips(tmp_path):
    _, avg = _trained(steps=3)
    torch.save(avg.state_dict(), tmp_path / "avg.pt")
    fresh = distavg.ExponentialMovingAverage(small_model(seed=1), momentum=0.3)
    fresh.load_state_dict(torch.load(tmp_path / "avg.pt"))
    _assert_equal(_values(fresh), _values(avg))
    assert fresh.steps == 3


def _train(model: nn.Module, optim, avg, start: int, stop: int) -> None:
    for s in range(start, stop):
        gen = torch.Generator().manual_seed(s)
        x, y = torch.randn(8, 6, generator=gen), torch.randn(8, 2, generator=gen)
        model.train()
        optim.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        optim.step()
        avg.update_parameters(model)


@pytest.mark.parametrize("async_update", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("cls, kw", RULES, ids=[c.__name__ for c, _ in RULES])
def test_interrupted_and_resumed_equals_uninterrupted_bitwise(tmp_path, cls, kw, async_update):
    def build(seed):
        model = small_model(seed)
        optim = torch.optim.SGD(model.parameters(), lr=0.1)  # stateless: the model is all
        mode = {"async_update": True, "optimizer": optim} if async_update else {}
        return model, optim, cls(model, **kw, **mode)

    model, optim, whole = build(0)  # synchronous and uninterrupted: the reference
    if async_update:
        whole = cls(model, **kw)
    _train(model, optim, whole, 0, 7)

    model, optim, part = build(0)
    _train(model, optim, part, 0, 3)
    dcp.save({"model": model.state_dict(), "ema": part}, checkpoint_id=tmp_path)

    model, optim, resumed = build(5)
    state = {"model": model.state_dict(), "ema": resumed}
    dcp.load(state, checkpoint_id=tmp_path)
    model.load_state_dict(state["model"])
    _train(model, optim, resumed, 3, 7)
    assert resumed.steps == whole.steps == 7
    _assert_equal(_values(resumed), _values(whole))


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(9, 4)
        self.norm = nn.BatchNorm1d(4)
        self.head = nn.Linear(4, 9, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.emb(idx)))


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_export_loads_into_a_fresh_plain_model_with_the_same_outputs(tmp_path, suffix):
    model = Tied()
    avg = distavg.ExponentialMovingAverage(model, momentum=0.25)
    for s in range(4):
        perturb(model, s)
        model.train()
        model(torch.arange(9))
        avg.update_parameters(model)
    idx = torch.tensor([1, 4, 8])
    expected = avg.module.eval()(idx)

    out = export_average(avg, tmp_path / f"avg{suffix}")
    dcp.save({"ema": avg}, checkpoint_id=tmp_path / "ckpt")
    offline = export_checkpoint(tmp_path / "ckpt", tmp_path / f"offline{suffix}")
    for path in (out, offline):
        if suffix == ".pt":
            state = torch.load(path)
        else:
            from safetensors.torch import load_file

            state = load_file(path)
        fresh = Tied()
        fresh.load_state_dict(state)  # strict: every key, tied ones included
        assert torch.equal(fresh.eval()(idx), expected)


def test_read_checkpoint_errors_name_the_problem(tmp_path):
    _, avg = _trained(steps=1)
    dcp.save({"slow": avg, "fast": avg}, checkpoint_id=tmp_path / "ckpt")
    with pytest.raises(
        ValueError,
        match=r"holds no average under key='ema'; averages are "
        r"saved under \['fast', 'slow'\]",
    ):
        read_checkpoint(tmp_path / "ckpt")
    assert set(read_checkpoint(tmp_path / "ckpt", key="fast")) == set(small_model().state_dict())
    with pytest.raises(ValueError, match=r"ckpt_dir must be a checkpoint directory, got"):
        read_checkpoint(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"is not a readable torch.distributed.checkpoint"):
        read_checkpoint(tmp_path / "empty")


def test_export_format_errors(tmp_path, monkeypatch):
    state = {"w": torch.ones(2)}
    with pytest.raises(
        ValueError,
        match=r"format must be one of \('safetensors', 'torch'\) "
        r"or None, got 'onnx'",
    ):
        save_file(state, tmp_path / "x", format="onnx")
    from safetensors.torch import load_file

    save_file(state, tmp_path / "x.bin", format="safetensors")  # the explicit format wins
    assert torch.equal(load_file(tmp_path / "x.bin")["w"], state["w"])
    monkeypatch.setitem(sys.modules, "safetensors", None)
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(ImportError, match=r"pip install 'distavg\[safetensors\]'"):
        save_file(state, tmp_path / "y.safetensors")
    assert not (tmp_path / "y.safetensors").exists()


# -- checksums ------------------------------------------------------------------------


def _bit_patterns(dtype: torch.dtype, n: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    raw = torch.randint(0, 256, (n * dtype.itemsize,), dtype=torch.uint8, generator=gen)
    return raw.view(dtype)


@pytest.mark.parametrize(
    "dtype",
    [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.uint8],
)
def test_checksum_changes_with_every_single_bit_flip_and_adds_up_over_any_chunking(dtype):
    from distavg._checksum import checksums, combine

    t = _bit_patterns(dtype, 70_001)  # more than one block of every size
    (whole,) = checksums([(t, 0)])
    for cuts in ([0, 1, 70_000, 70_001], [0, 5, 33_000, 33_001, 65_536, 70_001], [0, 70_001]):
        pieces = [(t[a:b], a) for a, b in zip(cuts[:-1], cuts[1:], strict=True)]
        assert combine(checksums(pieces)) == whole
    raw = t.view(torch.uint8)
    for i in (0, 1, 32_767, 65_536, 70_000):  # every bit of a few elements
        for byte in range(dtype.itemsize):
            for bit in range(8):
                flipped = raw.clone()
                flipped[i * dtype.itemsize + byte] ^= 1 << bit
                assert checksums([(flipped.view(dtype), 0)])[0] != whole, (i, byte, bit)
    swapped = t.clone()
    swapped[[3, 4]] = t[[4, 3]]  # position-aware: the same values elsewhere differ
    if not torch.equal(swapped, t):
        assert checksums([(swapped, 0)])[0] != whole


def _flip(path, values: torch.Tensor, element: int = 0) -> None:
    """Flip the top exponent bit of ``values[element]`` where ``path`` stores ``values``."""
    data = bytearray(path.read_bytes())
    at = data.find(values.contiguous().view(torch.uint8).numpy().tobytes())
    assert at >= 0
    data[at + element * values.element_size() + values.element_size() - 1] ^= 0x40
    path.write_bytes(bytes(data))


def test_flipped_bit_in_a_shard_is_refused_at_load_naming_the_tensor_untouched(tmp_path):
    _, avg = _trained(steps=3)
    dcp.save({"ema": avg}, checkpoint_id=tmp_path)
    (shard,) = tmp_path.glob("*.distcp")
    _flip(shard, avg.full_state_dict()["3.weight"], element=5)
    target = distavg.ExponentialMovingAverage(small_model(seed=1), momentum=0.3)
    target.update_parameters(small_model(seed=2))
    before = _values(target)
    with pytest.raises(
        ValueError,
        match=r"checkpoint tensor '3.weight' does not match the checksum saved with it: "
        r"rows 0:2, saved by rank 0 \(shard file __0_\*.distcp\) changed after the save",
    ):
        dcp.load({"ema": target}, checkpoint_id=tmp_path)
    _assert_equal(_values(target), before)
    assert target.steps == 1


def test_flipped_bit_is_refused_by_read_checkpoint_and_export_naming_the_file(tmp_path):
    _, avg = _trained(steps=3)
    dcp.save({"ema": avg}, checkpoint_id=tmp_path / "ckpt")
    (shard,) = (tmp_path / "ckpt").glob("*.distcp")
    _flip(shard, avg.full_state_dict()["0.bias"], element=9)
    message = (
        rf"checkpoint tensor '0.bias' under key='ema' does not match the checksum saved with "
        rf"it: its data in '{shard}' \(rows 0:10\) changed after the save"
    )
    with pytest.raises(ValueError, match=message):
        read_checkpoint(tmp_path / "ckpt")
    with pytest.raises(ValueError, match=message):
        export_checkpoint(tmp_path / "ckpt", tmp_path / "avg.pt")
    assert not (tmp_path / "avg.pt").exists()


def test_changed_value_in_a_torch_saved_state_dict_is_refused_untouched(tmp_path):
    _, avg = _trained(steps=3)
    sd = avg.state_dict()
    sd["average"]["1.running_var"][4] += 1e-6
    target = distavg.ExponentialMovingAverage(small_model(seed=1), momentum=0.3)
    before = _values(target)
    with pytest.raises(ValueError, match=r"checkpoint tensor '1.running_var' does not match"):
        target.load_state_dict(sd)
    _assert_equal(_values(target), before)


def _without_checksums(sd: dict) -> dict:
    """``sd`` as distavg wrote it before checksums: ``keys`` holds the tied aliases only."""
    keys = {k: v["aliases"] for k, v in json.loads(sd["keys"]).items()}
    return {**sd, "keys": json.dumps(keys)}


def test_checkpoint_saved_without_checksums_loads_and_exports_with_one_warning(tmp_path):
    _, avg = _trained(steps=3)
    dcp.save({"ema": _without_checksums(avg.state_dict())}, checkpoint_id=tmp_path / "old")
    fresh = distavg.ExponentialMovingAverage(small_model(seed=1), momentum=0.3)
    with pytest.warns(UserWarning, match=r"has no checksums") as caught:
        dcp.load({"ema": fresh}, checkpoint_id=tmp_path / "old")
    assert len([w for w in caught if "checksums" in str(w.message)]) == 1
    _assert_equal(_values(fresh), _values(avg))
    assert fresh.steps == 3
    with pytest.warns(UserWarning, match=r"has no checksums") as caught:
        offline = read_checkpoint(tmp_path / "old")
    assert len([w for w in caught if "checksums" in str(w.message)]) == 1
    _assert_equal(offline, _values(avg))


def test_checksums_are_checked_across_an_exact_upcast_and_skipped_with_a_warning_otherwise(
    tmp_path,
):
    model = small_model()
    low = distavg.ExponentialMovingAverage(model, momentum=0.3, dtype=torch.bfloat16)
    low.update_parameters(model)
    dcp.save({"ema": low}, checkpoint_id=tmp_path / "bf16")
    wide = distavg.ExponentialMovingAverage(small_model(seed=1), momentum=0.3)
    dcp.load({"ema": wide}, checkpoint_id=tmp_path / "bf16")  # bf16 -> fp32: exact, checked
    for k, v in low.full_state_dict().items():
        assert torch.equal(wide.full_state_dict()[k], v.to(wide.full_state_dict()[k].dtype)), k
    (shard,) = (tmp_path / "bf16").glob("*.distcp")
    _flip(shard, low.full_state_dict()["0.weight"])
    with pytest.raises(ValueError, match=r"checkpoint tensor '0.weight' does not match"):
        dcp.load({"ema": wide}, checkpoint_id=tmp_path / "bf16")

    dcp.save({"ema": wide}, checkpoint_id=tmp_path / "fp32")
    narrow = distavg.ExponentialMovingAverage(
        small_model(seed=2), momentum=0.3, dtype=torch.bfloat16
    )
    with pytest.warns(UserWarning, match=r"saved in torch.float32 and load into a torch.bfloat16"):
        dcp.load({"ema": narrow}, checkpoint_id=tmp_path / "fp32")


def test_checksum_cost_is_measured_per_gib():
    from distavg._checksum import ms_per_gib

    assert 0 < ms_per_gib(nbytes=4 << 20, repeats=3) < 1e6
