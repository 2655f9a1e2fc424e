"""How this rank's source tensors are found: one process, DDP or FSDP2, resolved once.

The topology is the one object that knows how the training job is parallelised. The rest
of the library asks it for the world, this rank, the model's tensors and this rank's
local data of each (the whole tensor when replicated, the ``Shard(0)`` chunk under FSDP2).

[Note: per-step caches]
A steady-state step (the same model, its tensors written in place by the optimizer and by
forward) rebuilds nothing. Each stage of an update caches what it derives from its input
on the identity (``is``) of the list the stage before it returned, and, while that input
is the same object, returns the same list object itself:
  1. ``Topology.local_tensors`` (here): keyed on every tensor object and its storage;
     returns its cached list of flat local views. The start of the chain.
  2. ``Engine.capture`` -> ``Snapshots.refresh`` (engine.py): the snapshot memory is
     allocated, and the list with snapshots in place of the buffers built, once per list;
     ``protect`` marks the tensors for the side stream once per list (_accelerator.py).
  3. ``BaseAveragedModel._sources`` (averaged.py): the per-slot source slices (not for
     the FSDP2 owner push, which gathers anew on every update).
  4. ``Shards._plan`` (shards.py) and the accelerator engines' ``_plan``
     (_offload.py): the per-group update plan (views, staging blocks, buckets).
A stage that returns a fresh list, even an equal one (``list(...)``, a comprehension, a
filtered copy), silently turns every later cache off: the results stay correct, and every
step pays again for slices, plans, snapshot allocations and ``record_stream`` calls.
Invalidate a cache by a changed key, never by copying its result.
``tests/unit/test_steady_state.py`` counts the rebuilds of steady-state steps.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Shard

from .shards import chunk_bounds


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of the model's state dict (tied aliases folded into one).

    Attributes:
        key: the first state-dict key naming the tensor.
        aliases: further keys naming the same tensor (tied weights).
        shape: the global shape.
        dtype: the tensor's dtype.
        is_param: a parameter (else a persistent buffer).
        is_dtensor: an FSDP2 ``Shard(0)`` DTensor: this rank holds only its chunk.
        owner: dotted path of the submodule that registers it.
        attr: its name there.
    """

    key: str
    aliases: tuple[str, ...]
    shape: torch.Size
    dtype: torch.dtype
    is_param: bool
    is_dtensor: bool
    owner: str
    attr: str


def unwrap(model: nn.Module) -> nn.Module:
    """The user's own module inside DDP, ``torch.compile`` and accelerate wrappers."""
    _reject_fsdp1(model)
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod  # torch.compile's OptimizedModule
        else:
            return model


def _reject_fsdp1(model: nn.Module) -> None:
    from torch.distributed.fsdp import FullyShardedDataParallel

    if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
        raise ValueError(
            "model is wrapped in FullyShardedDataParallel (FSDP1), which distavg does not "
            "support; shard it with FSDP2 (torch.distributed.fsdp.fully_shard) instead"
        )


def world_and_rank() -> tuple[int, int]:
    """(world size, rank) of the default process group; (1, 0) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def _local(t: torch.Tensor) -> torch.Tensor:
    # `_local_tensor` rather than `to_local()`: the latter goes through autograd and costs
    # tens of microseconds per tensor on a path that runs every step.
    return t._local_tensor if isinstance(t, DTensor) else t


def _cache_key(current: list[torch.Tensor | None], plain: bool) -> tuple | None:
    """What the cache of ``local_tensors`` is keyed on: each tensor object and its storage."""
    if plain:  # the common case, read at C speed: no DTensor to look through
        try:
            return tuple(map(id, current)), tuple([t.data_ptr() for t in current])
        except (AttributeError, RuntimeError):  # a tensor is missing, or became a DTensor
            return None
    return tuple((id(t), _local(t).data_ptr()) if t is not None else None for t in current)


class Topology:
    """The model's tensors and where this rank finds its data of each.

    Args:
        model: the (possibly wrapped) model being trained.
    """

    def __init__(self, model: nn.Module) -> None:
        self.world, self.rank = world_and_rank()
        module = unwrap(model)
        self.specs, tensors = _specs(module)
        if not self.specs:
            raise ValueError("model has no parameters or buffers to average")
        self.mesh = None
        for spec, t in zip(self.specs, tensors, strict=True):
            if spec.is_dtensor:
                self._check_fsdp2(spec, t)
                self.mesh = t.device_mesh
        self.kind = "fsdp2" if self.mesh is not None else "ddp" if self.world > 1 else "single"
        self.device = _local(tensors[0]).device
        self._cache: tuple[tuple, list[torch.Tensor]] | None = None
        self._holders_of: nn.Module | None = None  # the module `_holders` was found in
        self._unwrapped: tuple[nn.Module, nn.Module] | None = None
        self._holders: list[dict] = []
        self._attrs = [s.attr for s in self.specs]
        self.changed = False  # set when a tensor or submodule is registered on the model
        _watch_registrations(module, self)
        self.local_tensors(model)  # validates devices and primes the cache

    def _check_fsdp2(self, spec: TensorSpec, t: DTensor) -> None:
        mesh = t.device_mesh
        if mesh.ndim != 1 or mesh.size() != self.world or tuple(t.placements) != (Shard(0),):
            raise ValueError(
                f"parameter {spec.key!r} is a DTensor with placements {tuple(t.placements)} "
                f"on a mesh of shape {tuple(mesh.shape)}; distavg supports FSDP2's Shard(0) "
                f"on a 1-D mesh spanning all {self.world} ranks"
            )

    def local_bounds(self, i: int) -> tuple[int, int]:
        """Elements of the flattened tensor ``i`` that this rank's local data covers."""
        spec = self.specs[i]
        if spec.is_dtensor:
            return chunk_bounds(spec.shape, self.world, self.rank)
        return 0, spec.shape.numel()

    def local_tensors(self, model: nn.Module) -> list[torch.Tensor]:
        """This rank's local data of every tensor, flattened, as plain 1-D tensors.

        The result is cached while the model's tensors are the same objects with the same
        storage; anything else (another model, ``.to()``, ``.half()``) is checked again
        against the model the average was built for.
        """
        # unwrap walks every submodule (the FSDP1 check): once per wrapper, not every step.
        if self._unwrapped is None or self._unwrapped[0] is not model:
            self._unwrapped = (model, unwrap(model))
        module = self._unwrapped[1]
        if self._holders_of is not module:
            mods = dict(module.named_modules(remove_duplicate=False))
            owners = [mods.get(s.owner) for s in self.specs]
            # The dict holding each tensor (a module mutates it, never replaces it): found
            # once, read every step at C speed.
            self._holders = [
                {} if m is None else m._parameters if s.is_param else m._buffers
                for s, m in zip(self.specs, owners, strict=True)
            ]
            self._holders_of = module
        if self.changed:  # something was registered: is it a new tensor to average?
            self.changed = False
            if [s.key for s in _specs(module)[0]] != [s.key for s in self.specs]:
                self._mismatch(module)
        current = list(map(dict.get, self._holders, self._attrs))
        key = _cache_key(current, self.mesh is None)
        if key is not None and self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        if any(t is None for t in current):
            self._mismatch(module)
        flat = []
        for spec, t in zip(self.specs, current, strict=True):
            if isinstance(t, DTensor) and not spec.is_dtensor:
                raise ValueError(
                    f"model tensor {spec.key!r} is now a DTensor ({tuple(t.placements)}), but "
                    f"the average was built when it was a plain tensor: build the average "
                    f"after fully_shard(model) (and after init_process_group), so that each "
                    f"rank keeps its own shard"
                )
            local = _local(t).detach()
            if tuple(t.shape) != tuple(spec.shape) or t.dtype != spec.dtype:
                self._mismatch(module)
            if local.device != self.device:
                raise ValueError(
                    f"model tensor {spec.key!r} is on {local.device}, but the average was "
                    f"built for a model on {self.device}; move the model back or build a "
                    f"new averager"
                )
            if not local.is_contiguous():
                # A strided view would go stale; copy-free views need contiguous storage.
                raise ValueError(
                    f"model tensor {spec.key!r} is not contiguous (stride {local.stride()}); "
                    f"distavg needs contiguous parameters and buffers"
                )
            if spec.is_dtensor and not isinstance(t, DTensor):
                # FSDP2 leaves some groups unsharded after a forward without backward (the
                # root by default): the registered tensor is then the whole current value.
                a, b = chunk_bounds(spec.shape, self.world, self.rank)
                flat.append(local.view(-1)[a:b])
            else:
                flat.append(local.view(-1))
        self._cache = (key, flat)
        return flat

    def reshard(self, model: nn.Module) -> None:
        """Bring FSDP2 parameters back to their sharded form (a no-op elsewhere)."""
        if self.kind != "fsdp2":
            return
        from torch.distributed.fsdp import FSDPModule

        for m in unwrap(model).modules():
            if isinstance(m, FSDPModule):
                m.reshard()

    def _mismatch(self, module: nn.Module) -> None:
        specs, _ = _specs(module)
        have = {s.key: (tuple(s.shape), s.dtype) for s in self.specs}
        got = {s.key: (tuple(s.shape), s.dtype) for s in specs}
        missing = sorted(set(have) - set(got))
        unexpected = sorted(set(got) - set(have))
        changed = [f"{k}: {have[k]} -> {got[k]}" for k in have if k in got and have[k] != got[k]]
        raise ValueError(
            "update_parameters got a model that does not match the averaged one: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}, "
            f"changed (shape, dtype) {changed[:5]}. A tensor registered after the average "
            f"was built is not averaged: build the average once the model is complete"
        )


def _specs(module: nn.Module) -> tuple[list[TensorSpec], list[torch.Tensor]]:
    """Tensors of ``module.state_dict()`` in its order, tied aliases folded."""
    param_ids = {id(p) for p in module.parameters()}
    where = {}
    for path, m in module.named_modules(remove_duplicate=False):
        for attr, t in list(m._parameters.items()) + list(m._buffers.items()):
            if t is not None:
                where.setdefault(id(t), (path, attr))
    specs, tensors, seen = [], [], {}
    for key, t in module.state_dict(keep_vars=True).items():
        if not isinstance(t, torch.Tensor):
            continue  # `_extra_state` objects are not averaged
        if id(t) in seen:
            i = seen[id(t)]
            specs[i] = _with_alias(specs[i], key)
            continue
        seen[id(t)] = len(specs)
        owner, attr = where[id(t)]
        specs.append(
            TensorSpec(
                key=key,
                aliases=(),
                shape=t.shape,
                dtype=t.dtype,
                is_param=id(t) in param_ids,
                is_dtensor=isinstance(t, DTensor),
                owner=owner,
                attr=attr,
            )
        )
        tensors.append(t)
    return specs, tensors


def _with_alias(spec: TensorSpec, key: str) -> TensorSpec:
    return TensorSpec(**{**spec.__dict__, "aliases": (*spec.aliases, key)})


# Submodules of averaged models -> their topologies; a registration on one of them marks the
# topologies changed, and the next step checks the model's tensors once (no per-step walk).
_WATCHED: weakref.WeakKeyDictionary[nn.Module, weakref.WeakSet[Topology]] = (
    weakref.WeakKeyDictionary()
)
_hooks_installed = False


def _on_register(module: nn.Module, name: str, value: object) -> None:
    for topo in _WATCHED.get(module, ()):
        topo.changed = True


def _watch_registrations(module: nn.Module, topo: Topology) -> None:
    global _hooks_installed
    if not _hooks_installed:
        from torch.nn.modules import module as m

        m.register_module_parameter_registration_hook(_on_register)
        m.register_module_buffer_registration_hook(_on_register)
        m.register_module_module_registration_hook(_on_register)
        _hooks_installed = True
    for sub in module.modules():
        _WATCHED.setdefault(sub, weakref.WeakSet()).add(topo)
