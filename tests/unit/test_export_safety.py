"""Export reads a checkpoint without running code from it: a crafted ``.metadata`` or a
crafted entry is refused before anything it names is called, with a clear error."""

from __future__ import annotations

import os
import pickle
import shlex

import pytest
import torch
import torch.distributed.checkpoint as dcp
from reference import small_model

import distavg
from distavg import _reader
from distavg.__main__ import main
from distavg.export import export_checkpoint, read_checkpoint

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


class _Payload:
    """Pickles as a call of ``func(*args)``: what a crafted checkpoint would run."""

    def __init__(self, func, *args) -> None:
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _saved(root) -> distavg.ExponentialMovingAverage:
    model = small_model()
    avg = distavg.ExponentialMovingAverage(model, momentum=0.3)
    avg.update_parameters(model)
    dcp.save({"ema": avg}, checkpoint_id=root)
    return avg


class _Recorder(pickle.Unpickler):
    """Unpickles a trusted file, recording every global it references."""

    def __init__(self, file) -> None:
        super().__init__(file)
        self.found: set[tuple[str, str]] = set()

    def find_class(self, module: str, name: str):
        self.found.add((module, name))
        return super().find_class(module, name)


def test_a_real_metadata_references_only_allowed_globals(tmp_path):
    _saved(tmp_path)
    dcp.save({"model": small_model().state_dict(), "x": {"s": "t"}}, checkpoint_id=tmp_path / "m")
    for path in (tmp_path / ".metadata", tmp_path / "m" / ".metadata"):
        with open(path, "rb") as f:
            recorder = _Recorder(f)
            recorder.load()
        for module, name in recorder.found:
            assert (module, name) in _reader.ALLOWED or (
                module == "torch" and isinstance(getattr(torch, name), torch.dtype | torch.layout)
            ), (module, name)


def _marker_payloads(marker):
    quoted = shlex.quote(str(marker))
    return [
        _Payload(os.system, f"touch {quoted}"),
        _Payload(eval, f"open({str(marker)!r}, 'w').close()"),
        _Payload(torch.save, {}, str(marker)),
    ]


@pytest.mark.parametrize("which", [0, 1, 2], ids=["os.system", "builtins.eval", "torch.save"])
def test_crafted_metadata_is_refused_without_running_it(tmp_path, capsys, which):
    _saved(tmp_path / "ckpt")
    marker = tmp_path / "ran"
    payload = _marker_payloads(marker)[which]
    (tmp_path / "ckpt" / ".metadata").write_bytes(pickle.dumps(payload))
    name = {0: r"posix.system", 1: r"builtins.eval", 2: r"torch.serialization.save"}[which]
    message = (
        rf"ckpt_dir '.*ckpt' is not a torch.distributed.checkpoint directory: '.*\.metadata' is "
        rf"not checkpoint metadata: its pickle references {name}, which checkpoint metadata "
        rf"never does \(refused without calling it\)"
    )
    with pytest.raises(ValueError, match=message):
        read_checkpoint(tmp_path / "ckpt")
    with pytest.raises(ValueError, match=message):
        export_checkpoint(tmp_path / "ckpt", tmp_path / "avg.pt")
    assert main(["export", str(tmp_path / "ckpt"), str(tmp_path / "avg.pt")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not a torch.distributed.checkpoint directory" in err
    assert not marker.exists()
    assert not (tmp_path / "avg.pt").exists()
    # what plain dcp.load does with the same file: it runs it
    if which == 0:
        with pytest.raises(AttributeError):
            dcp.FileSystemReader(tmp_path / "ckpt").read_metadata()
        assert marker.exists()


def test_crafted_entry_is_refused_without_running_it(tmp_path):
    avg = _saved(tmp_path / "real")
    marker = tmp_path / "ran"
    sd = avg.state_dict()
    sd["keys"] = _Payload(os.system, f"touch {shlex.quote(str(marker))}")
    dcp.save({"ema": sd}, checkpoint_id=tmp_path / "ckpt")
    assert not marker.exists()
    with pytest.raises(ValueError, match=r"could not read the average under key='ema' from .*"):
        read_checkpoint(tmp_path / "ckpt")
    assert not marker.exists()


def test_metadata_placing_data_outside_the_checkpoint_is_refused(tmp_path):
    _saved(tmp_path / "ckpt")
    path = tmp_path / "ckpt" / ".metadata"
    metadata = _reader.read_metadata(path)
    for info in metadata.storage_data.values():
        info.relative_path = "../../elsewhere.distcp"
    path.write_bytes(pickle.dumps(metadata))
    with pytest.raises(
        ValueError, match=r"it places data at '../../elsewhere.distcp', outside the checkpoint"
    ):
        read_checkpoint(tmp_path / "ckpt")


def test_metadata_that_is_not_metadata_is_refused(tmp_path):
    _saved(tmp_path / "ckpt")
    (tmp_path / "ckpt" / ".metadata").write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(ValueError, match=r"it holds a dict, not a checkpoint's Metadata"):
        read_checkpoint(tmp_path / "ckpt")
