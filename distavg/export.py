"""Write the averaged model as a file that a plain ``model.load_state_dict`` accepts.

Two sources:
  * a live averager: :func:`export_average` gathers the whole average to its owner rank
    (``full_state_dict``, a collective) and writes it there;
  * a ``torch.distributed.checkpoint`` directory: :func:`export_checkpoint` reads the
    average straight from the shards on disk, offline, in one process with no process
    group, whatever world size wrote it (``python -m distavg export CKPT_DIR OUT``).

The format follows the file name: ``.safetensors`` writes safetensors (the optional
``safetensors`` package, imported only then), ``.pt``, ``.pth`` and ``.bin`` ``torch.save``;
any other name needs the format given explicitly. Keys are the unwrapped model's
``state_dict()`` keys, tied weights under each of their names; tensors keep the average's
dtype (``load_state_dict`` casts them into the model's).

A checkpoint is read without running code it contains (see [Note: untrusted checkpoints]
in ``_reader.py``) and checked against the checksums saved with it (see [Note: checksum]
in ``_checksum.py``). The file is written to a temporary file beside ``out`` and renamed
over it only when complete: a failed export leaves no partial file, and the previous file
at ``out`` stays as it was.
"""

from __future__ import annotations

import os
import uuid
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorStorageMetadata,
)

from . import _reader
from ._checksum import checksums
from ._verify import row_span
from .shards import rows_shape
from .state import Record, parse_keys

if TYPE_CHECKING:
    from .averaged import BaseAveragedModel

FORMATS = ("safetensors", "torch")
SUFFIXES = {".safetensors": "safetensors", ".pt": "torch", ".pth": "torch", ".bin": "torch"}

__all__ = [
    "FORMATS",
    "SUFFIXES",
    "export_average",
    "export_checkpoint",
    "read_checkpoint",
    "save_file",
]


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
    fmt = _format(out, format)  # on every rank, before the collective
    state = avg.full_state_dict()
    if not state:
        return None
    return save_file(state, out, format=fmt)


def read_checkpoint(ckpt_dir: str | os.PathLike, key: str = "ema") -> dict[str, torch.Tensor]:
    """The whole average saved under ``key`` in a DCP checkpoint, read in this process.

    Needs no process group: the shards of every rank that saved are read and joined. The
    dict has the model's ``state_dict()`` keys in the model's order, tied weights under
    each of their names (sharing one tensor). Runs no code from the checkpoint, and checks
    every tensor against the checksum saved with it (checkpoints saved without checksums
    are read with a warning).

    Args:
        ckpt_dir: a directory written by ``dcp.save({..., key: averager})``.
        key: the key the averager was saved under.

    Raises:
        ValueError: ``ckpt_dir`` is not a finished DCP checkpoint, holds no average under
            ``key`` (the message lists the keys that do hold one), or a tensor does not
            match its checksum (the message names the tensor and the shard file).
    """
    path = Path(ckpt_dir)
    if not path.is_dir():
        raise ValueError(f"ckpt_dir must be a checkpoint directory, got {str(path)!r}")
    metadata = _metadata(path)
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
            dcp.load(
                state, storage_reader=_reader.Reader(path), planner=_reader.Planner(), no_dist=True
            )
        records = parse_keys(state[f"{key}.keys"])
    except (Exception, CheckpointException) as e:  # the latter is a BaseException
        raise ValueError(
            f"could not read the average under key={key!r} from {str(path)!r} (a shard "
            f"file is missing or corrupt): {_reason(e)}"
        ) from e
    missing = [name for name in records if prefix + name not in state]
    if missing:
        raise ValueError(f"checkpoint {str(path)!r} has no tensor {missing[0]!r} under {key!r}")
    tensors = {name: state[prefix + name] for name in records}
    _check(path, metadata, key, tensors, records)
    out: dict[str, torch.Tensor] = {}
    for name, record in records.items():
        for k in (name, *record.aliases):
            out[k] = tensors[name]
    return out


def _metadata(path: Path) -> Metadata:
    where = path / ".metadata"
    try:
        return _reader.read_metadata(where)
    except _reader.NotACheckpoint as e:
        raise ValueError(
            f"ckpt_dir {str(path)!r} is not a torch.distributed.checkpoint directory: "
            f"{str(where)!r} is not checkpoint metadata: {e}"
        ) from None
    except Exception as e:  # a missing or unreadable .metadata: say what it means
        raise ValueError(
            f"ckpt_dir {str(path)!r} is not a readable torch.distributed.checkpoint "
            f"directory (its .metadata is missing or corrupt: the save may not have "
            f"finished): {type(e).__name__}: {e}"
        ) from e


def _reason(e: BaseException) -> str:
    """One line: the underlying errors of a ``CheckpointException``, not their tracebacks."""
    if isinstance(e, CheckpointException):
        return "; ".join(_reason(exc) for exc, _ in e.failures.values())
    return " ".join(f"{type(e).__name__}: {e}".split("\n"))


def _check(
    path: Path,
    metadata: Metadata,
    key: str,
    tensors: dict[str, torch.Tensor],
    records: dict[str, Record],
) -> None:
    """Raise unless every tensor matches its saved checksum; name the changed shard files."""
    checked = [name for name, r in records.items() if r.checksum is not None]
    if not checked and records:
        warnings.warn(
            f"checkpoint {str(path)!r} has no checksums (saved by an earlier distavg): its "
            f"average under key={key!r} is read unchecked",
            stacklevel=3,
        )
    sums = checksums([(tensors[name].reshape(-1), 0) for name in checked])
    for name, got in zip(checked, sums, strict=True):
        if tuple(got) != records[name].checksum:
            where = _changed_files(
                path, metadata, f"{key}.average.{name}", tensors[name], records[name]
            )
            raise ValueError(
                f"checkpoint tensor {name!r} under key={key!r} does not match the checksum "
                f"saved with it: {where or 'its data'} changed after the save (a corrupt "
                f"shard file, or one of another save)"
            )


def _changed_files(
    path: Path, metadata: Metadata, fqn: str, tensor: torch.Tensor, record: Record
) -> str:
    """The shard files whose chunk of ``tensor`` does not match its saved checksum."""
    flat, saved = tensor.reshape(-1), {(c.start, c.end): c.checksum for c in record.chunks}
    md = metadata.state_dict_metadata[fqn]
    bad = []
    for chunk in md.chunks if isinstance(md, TensorStorageMetadata) else ():
        span = _span(tensor.shape, chunk)
        if span is None or span not in saved:
            continue
        (got,) = checksums([(flat[span[0] : span[1]], span[0])])
        if tuple(got) != saved[span]:
            info = metadata.storage_data.get(MetadataIndex(fqn, chunk.offsets))
            file = path / info.relative_path if info is not None else path
            bad.append(f"{str(file)!r} ({row_span(tensor.shape, *span)})")
    return f"its data in {', '.join(bad)}" if bad else ""


def _span(shape: torch.Size, chunk: ChunkStorageMetadata) -> tuple[int, int] | None:
    """The elements ``[start, end)`` of the flattened tensor a row chunk holds."""
    if len(shape) == 0:
        return 0, 1
    if any(chunk.offsets[1:]) or tuple(chunk.sizes[1:]) != tuple(shape[1:]):
        return None
    per_row = shape.numel() // rows_shape(shape)[0] if shape[0] else 0
    return chunk.offsets[0] * per_row, (chunk.offsets[0] + chunk.sizes[0]) * per_row


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
        out: the file to write: ``*.safetensors`` for safetensors, ``*.pt``, ``*.pth`` or
            ``*.bin`` for ``torch.save``.
        key: the key the averager was saved under.
        format: ``"safetensors"`` or ``"torch"``; None picks from the suffix of ``out``.

    Returns:
        ``out`` as a ``Path``.
    """
    fmt, _ = _target(out, format)  # a bad OUT fails before the checkpoint is read
    return save_file(read_checkpoint(ckpt_dir, key), out, format=fmt)


def save_file(
    state: dict[str, torch.Tensor], out: str | os.PathLike, *, format: str | None = None
) -> Path:
    """Write a whole state dict as safetensors or with ``torch.save``, atomically.

    The data goes to a temporary file in ``out``'s directory, which replaces ``out`` only
    once written and flushed to disk; on any failure it is removed and ``out`` is untouched.
    safetensors refuses tensors that share memory, so tied weights are written as copies
    there (``load_state_dict`` ties them again by loading into the shared parameter).

    Raises:
        ValueError: ``out`` is empty, a directory, in a missing directory, or has a suffix
            that names no format (and ``format`` is None).
        OSError: the write failed (disk full, permissions); ``out`` is as it was.
    """
    fmt, path = _target(out, format)
    if fmt == "safetensors":
        try:
            from safetensors.torch import save_file as _save_safetensors  # noqa: F401
        except ImportError as e:
            raise ImportError(
                "writing .safetensors needs the safetensors package: "
                "pip install 'distavg[safetensors]' (or write a .pt file)"
            ) from e
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        _write(state, tmp, fmt)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise OSError(e.errno, f"writing {str(path)!r} failed: {e.strerror or e}") from e
        raise
    _sync_dir(path.parent)
    return path


def _write(state: dict[str, torch.Tensor], tmp: Path, fmt: str) -> None:
    if fmt == "torch":
        with open(tmp, "xb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        return
    import safetensors.torch

    seen: set[int] = set()
    flat = {}
    for k, t in state.items():
        t = t.detach().to("cpu").contiguous()
        flat[k] = t.clone() if t.untyped_storage().data_ptr() in seen else t
        seen.add(t.untyped_storage().data_ptr())
    open(tmp, "xb").close()  # claim the name, as the torch branch does
    safetensors.torch.save_file(flat, str(tmp))
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())


def _sync_dir(directory: Path) -> None:
    """Make the rename durable (POSIX); where directories cannot be opened, skip it."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _target(out: str | os.PathLike, format: str | None) -> tuple[str, Path]:
    """The format and path to write, or a ValueError saying what is wrong with ``out``."""
    text = os.fspath(out)
    if not text:
        raise ValueError("out must name the file to write, got ''")
    path = Path(text)
    if path.is_dir() or text.endswith(("/", os.sep)):
        raise ValueError(
            f"out must name a file, got the directory {text!r} (e.g. "
            f"{str(path / 'average.safetensors')!r})"
        )
    if not path.parent.is_dir():
        raise ValueError(
            f"out {text!r} is in a directory that does not exist: {str(path.parent)!r}"
        )
    return _format(text, format), path


def _format(out: str | os.PathLike, format: str | None) -> str:
    if format is not None:
        if format not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS} or None, got {format!r}")
        return format
    suffix = Path(os.fspath(out)).suffix
    if suffix in SUFFIXES:
        return SUFFIXES[suffix]
    hint = f" (suffixes are lower case: {suffix.lower()})" if suffix.lower() in SUFFIXES else ""
    raise ValueError(
        f"out must end in {', '.join(SUFFIXES)}, or the format must be given "
        f"(format=, --format), got {os.fspath(out)!r}{hint}"
    )
