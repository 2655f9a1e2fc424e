"""``python -m distavg.bench``: the benchmark's command line (``--help`` for its options)."""

from __future__ import annotations

from . import main

raise SystemExit(main())
