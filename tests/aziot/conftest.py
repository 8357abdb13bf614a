"""The field device of tests/faults (real swtpm, persistent IDevID key, reference EST server)."""

from tests.faults.conftest import field_device  # noqa: F401  (fixture)
