"""Write the averaged model as a file that a plain ``model.load_state_dict`` accepts.

Two sources:
  * a live averager: :func:`export_average` gathers the whole average to its owner rank
    (``full_state_dict``, a collective) and writes it there;
  * a ``torch.distributed.checkpoint`` directory: :func:`export_checkpoint` reads the
    average straight from the shards on disk, offline, in one process with no process
    group, whatever world size wrote it (``python -m distavg export CKPT_DIR OUT``).

The format follows the file name: ``.safetensors`` writes safetensors (the optional
``safetensors`` package, imported only then), anything else ``torch.save``. Keys are the
unwrapped model's ``state_dict()`` keys, tied weights under each of their names; tensors
keep the average's dtype (``load_state_dict`` casts them into the model's).
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

if TYPE_CHECKING:
    from .averaged import BaseAveragedModel

FORMATS = ("safetensors", "torch")

__all__ = ["FORMATS", "export_average", "export_checkpoint", "read_checkpoint", "save_file"]


def export_average(
    avg: BaseAveragedModel, out: str | os.PathLike, *, format: str | None = None
) -> Path | None:
    """Write ``avg``'s whole average to ``out`` on its ``owner_rank``.

    A collective when the average is sharded: every rank must call it.

    Args:
        avg: the averager.
        out: the file to write (its parent directory must exist).
        format: ``"safetensors"`` or ``"torch"``; None picks from the suffix of ``out``.

    Returns:
        ``out`` on the owner rank, None on the others.
    """
    fmt = _format(out, format)
    state = avg.full_state_dict()
    if not state:
        return None
    return save_file(state, out, format=fmt)


def read_checkpoint(ckpt_dir: str | os.PathLike, key: str = "ema") -> dict[str, torch.Tensor]:
    """The whole average saved under ``key`` in a DCP checkpoint, read in this process.

    Needs no process group: the shards of every rank that saved are read and joined. The
    dict has the model's ``state_dict()`` keys in the model's order, tied weights under
    each of their names (sharing one tensor).

    Args:
        ckpt_dir: a directory written by ``dcp.save({..., key: averager})``.
        key: the key the averager was saved under.

    Raises:
        ValueError: ``ckpt_dir`` is not a finished DCP checkpoint, or holds no average
            under ``key`` (the message lists the keys that do hold one).
    """
    path = Path(ckpt_dir)
    if not path.is_dir():
        raise ValueError(f"ckpt_dir must be a checkpoint directory, got {str(path)!r}")
    reader = dcp.FileSystemReader(path)
    try:
        metadata = reader.read_metadata()
    except Exception as e:  # a missing or unreadable .metadata: say what it means
        raise ValueError(
            f"ckpt_dir {str(path)!r} is not a readable torch.distributed.checkpoint "
            f"directory (its .metadata is missing or corrupt: the save may not have "
            f"finished): {type(e).__name__}: {e}"
        ) from e
    entries = metadata.state_dict_metadata
    prefix = f"{key}.average."
    if f"{key}.keys" not in entries:
        found = sorted(k[: -len(".keys")] for k in entries if k.endswith(".keys"))
        found = [k for k in found if f"{k}.rule" in entries]
        raise ValueError(
            f"checkpoint {str(path)!r} holds no average under key={key!r}; averages are "
            f"saved under {found}"
        )
    state: dict[str, object] = {f"{key}.keys": ""}
    for fqn, md in entries.items():
        if fqn.startswith(prefix) and isinstance(md, TensorStorageMetadata):
            state[fqn] = torch.empty(md.size, dtype=md.properties.dtype)
    try:
        with warnings.catch_warnings():  # one process is the intent here: no warning
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, storage_reader=reader, no_dist=True)
    except (Exception, CheckpointException) as e:  # the latter is a BaseException
        raise ValueError(
            f"could not read the average under key={key!r} from {str(path)!r} (a shard "
            f"file is missing or corrupt): {type(e).__name__}: {e}"
        ) from e
    out: dict[str, torch.Tensor] = {}
    for name, aliases in json.loads(state[f"{key}.keys"]).items():
        if prefix + name not in state:
            raise ValueError(f"checkpoint {str(path)!r} has no tensor {name!r} under {key!r}")
        for k in (name, *aliases):
            out[k] = state[prefix + name]
    return out


def export_checkpoint(
    ckpt_dir: str | os.PathLike,
    out: str | os.PathLike,
    key: str = "ema",
    *,
    format: str | None = None,
) -> Path:
    """Write the average saved in a DCP checkpoint as one model file, offline.

    This is ``python -m distavg export CKPT_DIR OUT``. Runs in one process without a
    process group, whatever world size saved the checkpoint (see :func:`read_checkpoint`).

    Args:
        ckpt_dir: a directory written by ``dcp.save({..., key: averager})``.
        out: the file to write: ``*.safetensors`` for safetensors, else ``torch.save``.
        key: the key the averager was saved under.
        format: ``"safetensors"`` or ``"torch"``; None picks from the suffix of ``out``.

    Returns:
        ``out`` as a ``Path``.
    """
    fmt = _format(out, format)
    return save_file(read_checkpoint(ckpt_dir, key), out, format=fmt)


def save_file(
    state: dict[str, torch.Tensor], out: str | os.PathLike, *, format: str | None = None
) -> Path:
    """Write a whole state dict as safetensors or with ``torch.save``.

    safetensors refuses tensors that share memory, so tied weights are written as copies
    there (``load_state_dict`` ties them again by loading into the shared parameter).
    """
    fmt, out = _format(out, format), Path(out)
    if fmt == "torch":
        torch.save(state, out)
        return out
    try:
        from safetensors.torch import save_file as _save_safetensors
    except ImportError as e:
        raise ImportError(
            "writing .safetensors needs the safetensors package: "
            "pip install 'distavg[safetensors]' (or write a .pt file)"
        ) from e
    seen: set[int] = set()
    flat = {}
    for k, t in state.items():
        t = t.detach().to("cpu").contiguous()
        flat[k] = t.clone() if t.untyped_storage().data_ptr() in seen else t
        seen.add(t.untyped_storage().data_ptr())
    _save_safetensors(flat, str(out))
    return out


def _format(out: str | os.PathLike, format: str | None) -> str:
    if format is None:
        return "safetensors" if str(out).endswith(".safetensors") else "torch"
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS} or None, got {format!r}")
    return format
