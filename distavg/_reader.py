"""Read a ``torch.distributed.checkpoint`` directory without running code it contains.

[Note: untrusted checkpoints]
DCP's ``FileSystemReader`` reads ``.metadata`` with ``pickle.load``, and its load planner
reads every non-tensor entry with ``torch.load(weights_only=False)``: a crafted checkpoint
runs its code in whoever calls ``dcp.load`` on it (torch's security policy says as much of
any pickle). Offline export reads checkpoints that may come from anywhere, so it reads them
through :class:`Reader` and :class:`Planner` instead:
  * ``.metadata`` is unpickled with an allow-list: the classes of
    ``torch.distributed.checkpoint.metadata``, the file system reader's ``_StorageInfo``,
    ``torch.Size``, torch's dtypes, layouts and memory formats, and ``pathlib`` paths (what
    a real ``.metadata`` references; ``pickletools.dis`` shows it). Anything else is refused
    before it is called: the file is not a checkpoint's metadata.
  * every storage location must be a plain file name inside the checkpoint directory;
  * non-tensor entries are read with ``torch.load(weights_only=True)``; tensors already are.
"""

from __future__ import annotations

import os
import pickle
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

_METADATA_CLASSES = (
    "BytesStorageMetadata",
    "ChunkStorageMetadata",
    "Metadata",
    "MetadataIndex",
    "StorageMeta",
    "TensorProperties",
    "TensorStorageMetadata",
    "_MEM_FORMAT_ENCODING",
)
_PATHS = ("Path", "PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath")
ALLOWED = frozenset(
    [("torch.distributed.checkpoint.metadata", n) for n in _METADATA_CLASSES]
    + [
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        # where older torch kept the tensor properties
        ("torch.distributed._shard.sharded_tensor.metadata", "TensorProperties"),
        ("torch.distributed._shard.sharded_tensor.metadata", "MEM_FORMAT_ENCODING"),
        ("torch", "Size"),
        ("torch.serialization", "_get_layout"),
        ("collections", "OrderedDict"),
    ]
    + [(module, n) for module in ("pathlib", "pathlib._local") for n in _PATHS]  # _local: 3.13
)
_TORCH_VALUES = (torch.dtype, torch.layout, torch.memory_format)


class NotACheckpoint(ValueError):
    """A file that a checkpoint's metadata would never be."""


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(vars(torch).get(name), _TORCH_VALUES):
            return vars(torch)[name]
        raise NotACheckpoint(
            f"its pickle references {module}.{name}, which checkpoint metadata never does "
            f"(refused without calling it)"
        )


def read_metadata(path: str | os.PathLike) -> Metadata:
    """The ``Metadata`` pickled in ``path`` (a ``.metadata`` file), through the allow-list.

    Raises:
        NotACheckpoint: the pickle references anything else, or holds no ``Metadata``.
        OSError, pickle.UnpicklingError, EOFError: unreadable or truncated.
    """
    with open(path, "rb") as f:
        metadata = _Unpickler(f).load()
    if not isinstance(metadata, Metadata):
        raise NotACheckpoint(f"it holds a {type(metadata).__name__}, not a checkpoint's Metadata")
    for info in (metadata.storage_data or {}).values():
        where = getattr(info, "relative_path", None)
        if (
            not isinstance(where, str)
            or os.path.basename(where) != where
            or where in ("", ".", "..")
        ):
            raise NotACheckpoint(f"it places data at {where!r}, outside the checkpoint directory")
    return metadata


class Reader(FileSystemReader):
    """A ``FileSystemReader`` whose metadata is read through the allow-list."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if kwargs.get("rank") is not None:  # per-rank metadata files: not ours to read
            raise NotACheckpoint("per-rank metadata files are not supported")
        metadata = read_metadata(os.path.join(os.fspath(self.path), ".metadata"))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class Planner(DefaultLoadPlanner):
    """Loads a flat ``{fqn: value}`` dict; non-tensor values with ``weights_only=True``."""

    def __init__(self) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)

    def load_bytes(self, read_item: Any, value: Any) -> None:
        self.state_dict[read_item.dest_index.fqn] = torch.load(value, weights_only=True)
