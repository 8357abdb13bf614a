"""``python -m tests.bench [--quick] ...``: see :mod:`tests.bench.run`."""

from __future__ import annotations

from tests.bench.run import main

if __name__ == "__main__":
    raise SystemExit(main())
