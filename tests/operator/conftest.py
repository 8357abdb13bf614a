"""The operator's view: the same field device as the fault suite (tests/faults/conftest.py)."""

from tests.faults.conftest import field, field_device  # noqa: F401  (fixtures)
