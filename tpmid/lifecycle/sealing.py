"""``tpmid secret seal|list|remove``: secrets sealed to the TPM, kept in the store.

:func:`seal` seals a value (which the CLI read from standard input or an
environment variable, never from its arguments) with the PCR binding of the
config's ``secrets.NAME`` section and writes the blob to ``<store>/sealed/``;
:func:`list_sealed` describes the stored blobs and the config's references to
them; :func:`remove_sealed` deletes one. Config refers to a sealed secret as
``{sealed: NAME}``; it is unsealed by the secret resolver
(:meth:`tpmid.wiring.Runtime.secret`) only when a request needs it.

``tpmid reset`` leaves sealed secrets alone. See docs/sealed-secrets.md.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tpmid.clock import utcnow
from tpmid.config import Config
from tpmid.errors import StoreError
from tpmid.render import iso
from tpmid.store.sealed import SealedBlob, SealedSecrets, check_sealed_name

if TYPE_CHECKING:
    from tpmid.tpm.connection import TpmOpener


@dataclass(frozen=True)
class SealedInfo:
    """What ``tpmid secret list`` shows of one secret (never its value)."""

    name: str
    path: Path
    stored: bool
    sealed_at: str | None = None
    bound: str = "no PCRs"
    referenced_by: tuple[str, ...] = ()
    problem: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "path": str(self.path), "stored": self.stored,
                "sealed_at": self.sealed_at, "bound_to": self.bound,
                "referenced_by": list(self.referenced_by), "problem": self.problem}


def references(config: Config, name: str) -> tuple[str, ...]:
    """Where the config refers to sealed secret ``name`` (``identities.x.est.auth...``)."""
    return tuple(where for where, ref in config.secret_refs() if ref.sealed == name)


def _info(config: Config, secrets: SealedSecrets, name: str) -> SealedInfo:
    path = secrets.path(name)
    refs = references(config, name)
    if not path.exists():
        return SealedInfo(name, path, False, referenced_by=refs,
                          problem="referenced by the config but not sealed")
    try:
        blob = secrets.load(name)
    except StoreError as e:
        return SealedInfo(name, path, True, referenced_by=refs, problem=e.message)
    configured = config.sealing(name)
    problem = None
    if (configured.pcrs, configured.pcr_bank if configured.pcrs else "") != \
            (blob.pcrs, blob.pcr_bank if blob.pcrs else ""):
        wanted = (f"{configured.pcr_bank}:{','.join(map(str, configured.pcrs))}"
                  if configured.pcrs else "no PCRs")
        problem = (f"the config binds it to {wanted}: seal it again to apply that "
                   f"(`tpmid secret seal {name} --force`)")
    return SealedInfo(name, path, True, sealed_at=blob.sealed_at, bound=blob.bound(),
                      referenced_by=refs, problem=problem)


def list_sealed(config: Config, secrets: SealedSecrets) -> list[SealedInfo]:
    """Every stored secret, and every secret the config refers to but the store lacks."""
    names = set(secrets.names())
    names |= {ref.sealed for _, ref in config.secret_refs() if ref.sealed}
    return [_info(config, secrets, n) for n in sorted(names)]


def seal(config: Config, name: str, value: bytes | bytearray, *, secrets: SealedSecrets,
         open_tpm: TpmOpener, force: bool = False,
         now: Callable[[], datetime] = utcnow) -> SealedInfo:
    """Seal ``value`` as secret ``name`` (bound to the PCRs of ``secrets.NAME`` in the config).

    A secret already sealed under that name is replaced only with ``force``.
    """
    check_sealed_name(name)
    if secrets.exists(name) and not force:
        raise StoreError(f"a secret named {name!r} is already sealed",
                         hint=f"replace it with `tpmid secret seal {name} --force`, or "
                         "choose another name")
    sealing = config.sealing(name)
    with open_tpm() as tpm:
        blob: SealedBlob = tpm.seal_secret(name, value, pcr_bank=sealing.pcr_bank,
                                           pcrs=sealing.pcrs, sealed_at=iso(now()))
    secrets.save(blob)
    return _info(config, secrets, name)


def remove_sealed(config: Config, secrets: SealedSecrets, name: str) -> SealedInfo:
    """Delete sealed secret ``name``; the result names config entries that still refer to it."""
    info = _info(config, secrets, name)
    secrets.remove(name)
    return SealedInfo(name, info.path, False, referenced_by=info.referenced_by)
