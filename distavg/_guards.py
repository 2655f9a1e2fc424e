"""What an update checks about the job it is part of, each warning said once.

These catch the average that would be silently not what the user thinks: a process group
that is gone or came after the average, an optimizer that never steps, a low-precision
average whose updates round away. Each check is a few attribute reads per step.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
import torch.distributed as dist

# update_parameters calls without an optimizer step before the average warns that nothing
# is being averaged (gradient accumulation calls it once per micro-batch: leave room).
NO_STEP_CALLS = 100

_CALLER = 4  # warnings point at the user's call: user -> update_parameters -> guard -> warn


class Guards:
    """The checks of one average.

    Args:
        world: the world size the average was built for.
        low_dtypes: the average's dtypes with a coarse resolution (bf16, fp16), if any.
    """

    def __init__(self, world: int, low_dtypes: Sequence[torch.dtype]) -> None:
        self.world = world
        self.low_dtypes = list(low_dtypes)
        self.unstepped = 0  # update_parameters calls since the last real optimizer step
        self._warned: set[str] = set()

    def _once(self, what: str, message: str) -> None:
        if what not in self._warned:
            self._warned.add(what)
            warnings.warn(message, stacklevel=_CALLER)

    def group(self) -> None:
        """The process group the average was built with is still there, and was there."""
        initialized = dist.is_available() and dist.is_initialized()
        if self.world > 1 and not initialized:
            raise RuntimeError(
                f"the process group this average was built with (world size {self.world}) is "
                f"gone; it cannot be updated or gathered (its values are unchanged). Call "
                f"this before destroy_process_group()"
            )
        if self.world == 1 and initialized and "world" not in self._warned:
            world = dist.get_world_size()
            if world > 1:
                self._once(
                    "world",
                    f"this average was built before init_process_group: it is a whole copy on "
                    f"each of the {world} ranks, not sharded. Build it after "
                    f"init_process_group and after wrapping the model (DDP, fully_shard)",
                )
            self._warned.add("world")

    def no_step(self, optimizers: Sequence[torch.optim.Optimizer], steps: int) -> None:
        """A call found no optimizer step since the last one."""
        self.unstepped += 1
        if self.unstepped >= NO_STEP_CALLS:
            names = ", ".join(type(o).__name__ for o in optimizers)
            since = "was built" if steps == 0 else "last counted an update"
            self._once(
                "no_step",
                f"update_parameters was called {NO_STEP_CALLS} times since the average {since}, "
                f"and the optimizer given ({names}) never stepped in between: nothing was "
                f"averaged. Check that optimizer= is the optimizer that steps this model (not "
                f"one built after the average, or another model's); steps that GradScaler "
                f"skips do not count either",
            )

    def precision(self, w: float) -> None:
        """The weight ``w`` is not below the resolution of a low-precision average."""
        for dtype in self.low_dtypes:
            eps = torch.finfo(dtype).eps
            if w < eps:
                self._once(
                    "precision",
                    f"averaging in {dtype} with weight {w:.3g}, below its resolution "
                    f"(eps {eps:.3g}): most updates round away. Pass dtype=torch.float32 "
                    f"to keep an fp32 average",
                )
                return
