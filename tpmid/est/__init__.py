"""Enrollment over Secure Transport (RFC 7030, as updated by RFC 8951).

* :mod:`tpmid.est.messages` — the wire formats (pure, no I/O), shared by the EST
  client and the reference server in :mod:`tpmid.server`.
"""

from __future__ import annotations
