"""``python -m tpmid.testing.bench [--quick] ...``: see :mod:`tpmid.testing.bench.run`."""

from __future__ import annotations

from tpmid.testing.bench.run import main

if __name__ == "__main__":
    raise SystemExit(main())
