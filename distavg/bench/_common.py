"""What every table shares: the run's options, round-robin timing and Markdown printing."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

MOMENTUM = 2e-4  # mmengine's default EMA momentum: the weight of the new value


@dataclass(frozen=True)
class Options:
    """The command line's choices that a section reads.

    Attributes:
        quick: tiny models and few repeats: a smoke run, not a measurement.
        repeats: timed rounds per table.
        threads: torch intra-op threads of the benchmark process.
        compile: also time the ``torch.compile``'d fused bf16 path.
    """

    quick: bool
    repeats: int
    threads: int
    compile: bool


def round_robin(
    fns: dict[str, Callable[[], object]],
    repeats: int,
    before_each: Callable[[], object] | None = None,
) -> dict[str, list[float]]:
    """Seconds per call of each function: one warm-up call each, then ``repeats`` rounds.

    One call of each function per round, so that noise from other work on the machine falls
    on all of them alike. ``before_each`` runs, untimed, before every timed call (e.g. to
    flush the caches).
    """
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if before_each is not None:
                before_each()
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def summary(times: dict[str, list[float]]) -> tuple[dict[str, float], dict[str, float]]:
    """Median and minimum seconds per method."""
    return (
        {k: statistics.median(v) for k, v in times.items()},
        {k: min(v) for k, v in times.items()},
    )


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table (readable as plain text too)."""
    cells = [[str(c) for c in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in cells
    ]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f}"


def mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:.1f}"


def verdict(ok: bool) -> str:
    return "MET" if ok else "NOT MET"


def load_at_end() -> str:
    """The machine's load when a table is done: other work there skews its figures."""
    return f"load average (1 min) at the end: {os.getloadavg()[0]:.2f}."
