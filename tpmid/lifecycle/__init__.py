"""Identity lifecycle: the renewal policy, enrollment, renewal and the daemon.

* :mod:`tpmid.policy` — the pure renewal decision (no I/O, no clock).
* ``enroll`` / ``renew`` / ``daemon`` — orchestration built on the policy, the
  TPM layer, the EST client and :mod:`tpmid.store`.

Nothing is imported here eagerly, so importing the policy stays cheap.
"""

from __future__ import annotations
