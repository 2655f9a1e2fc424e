"""When an update runs: now (synchronous) or later (asynchronous), and the fence."""

from __future__ import annotations

from collections.abc import Callable


class SyncEngine:
    """Runs each update at once; ``wait`` has nothing to wait for."""

    def submit(self, fn: Callable[[], None]) -> None:
        fn()

    def wait(self) -> None:
        pass

    def close(self) -> None:
        pass
