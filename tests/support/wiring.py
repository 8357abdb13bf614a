"""The production wiring, for tests that call workflows directly (as the CLI does).

Each helper builds what the composition root (:mod:`tpmid.wiring`) builds for a
command: a store, the EST client factory with a secret resolver, a TPM opener.
``secrets`` is the environment the secret references are resolved in (a
mapping) or a resolver of its own.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

from tpmid.clock import utcnow
from tpmid.config import Config, SecretRef
from tpmid.lifecycle.enroll import EnrollResult, enroll_identity
from tpmid.store import Store
from tpmid.tpm.connection import TpmConnection, already_open
from tpmid.tpm.lease import TpmLease
from tpmid.wiring import Runtime
from tpmid.wiring.est import EstClients

Secrets = Mapping[str, str] | Callable[[SecretRef], str]


def resolver(config: Config, secrets: Secrets) -> Callable[[SecretRef], str]:
    """A secret resolver over ``secrets`` (an environment mapping, or a resolver)."""
    if callable(secrets):
        return secrets
    return Runtime(config, environ=dict(secrets)).secret


def clients(config: Config, secrets: Secrets = {}, *,  # noqa: B006  (read only)
            now: Callable[[], datetime] = utcnow,
            sleep: Callable[[float], None] = time.sleep) -> EstClients:
    """The EST client factory the CLI builds."""
    return EstClients(config, resolver(config, secrets), now=now, sleep=sleep)


def enroll(config: Config, name: str, *, tpm: TpmConnection, secrets: Secrets = {},  # noqa: B006
           now: Callable[[], datetime] = utcnow, sleep: Callable[[float], None] = time.sleep,
           **kw: Any) -> EnrollResult:
    """``tpmid enroll NAME`` as a library call: the config's store and EST clients."""
    return enroll_identity(config, name, store=Store(config.store.dir),
                           lease=TpmLease(already_open(tpm)),
                           clients=clients(config, secrets, now=now, sleep=sleep), now=now, **kw)
