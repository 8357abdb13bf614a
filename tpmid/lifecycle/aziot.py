"""``tpmid aziot export``: IoT Edge's config fragment for the identities tpmid keeps.

:func:`prepare_export` checks that everything the fragment will name exists —
the LDevID's (and Edge CA's) ``fullchain.pem`` behind the store's stable
``current`` link, and their keys in the PKCS#11 token, in step with the store —
and renders the fragment with :func:`tpmid.aziot.export_aziot`. The fragment
holds the token's user PIN (IoT Edge's key service reads it from ``pin-value``):
the caller writes it 0600 and never logs it; :meth:`Export.to_json` leaves it out.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tpmid.aziot import ExportIdentity, export_aziot
from tpmid.config import Config, IdentityConfig, SecretRef
from tpmid.errors import ConfigError, StoreError, TokenError
from tpmid.lifecycle.pkcs11 import TokenMirror
from tpmid.pkcs11.uri import pkcs11_uri
from tpmid.store import Store
from tpmid.store.versions import FULLCHAIN

SecretResolver = Callable[[SecretRef], str]


@dataclass(frozen=True)
class Export:
    """The rendered fragment and what it names (for the report)."""

    text: str = field(repr=False)  # holds the PIN
    registration_id: str
    ldevid: str
    edge_ca: str | None
    certificates: dict[str, Path]  # identity -> fullchain.pem through the current link
    uris: dict[str, str]  # identity -> PKCS#11 URI, without the PIN
    library: Path
    store: Path  # the tpm2-pkcs11 store IoT Edge's key service must read
    tcti: str  # the TCTI IoT Edge's key service must be given

    def to_json(self) -> dict[str, Any]:
        """JSON-ready form without the PIN."""
        return {"registration_id": self.registration_id, "ldevid": self.ldevid,
                "edge_ca": self.edge_ca,
                "certificates": {k: str(v) for k, v in self.certificates.items()},
                "uris": self.uris, "pkcs11_lib_path": str(self.library),
                "environment": self.environment()}

    def environment(self) -> dict[str, str]:
        """What IoT Edge's key service (aziot-keyd) needs in its environment."""
        return {"TPM2_PKCS11_STORE": str(self.store), "TPM2_PKCS11_TCTI": self.tcti}


def _choose(config: Config, mirror: TokenMirror, wanted: str | None, profile: str,
            what: str, *, required: bool) -> IdentityConfig | None:
    """The identity ``wanted`` (checked), else the one linked identity of ``profile``."""
    if wanted is not None:
        ident = config.identity(wanted)
        if not mirror.enabled(wanted):
            raise ConfigError(
                f"{config.source}: identities.{wanted}: its key is not in the PKCS#11 token "
                "(pkcs11 is off for it, or its key is not a key file), so IoT Edge cannot "
                "use it", hint=f"choose a key-file identity as the {what}")
        return ident
    found = [config.identity(n) for n in mirror.names()
             if config.identity(n).profile == profile]
    if len(found) == 1:
        return found[0]
    if not found and not required:
        return None
    names = ", ".join(i.name for i in found) or "none"
    raise ConfigError(
        f"{config.source}: cannot tell which identity is the {what}: linked identities with "
        f"profile {profile}: {names}",
        hint="name it with --ldevid" if profile == "device" else "name it with --edge-ca")


def prepare_export(config: Config, store: Store | None, mirror: TokenMirror,
                   secret: SecretResolver, *, ldevid: str | None = None,
                   edge_ca: str | None = None, registration_id: str | None = None) -> Export:
    """Check what the fragment names and render it (see the module docstring)."""
    settings = config.pkcs11
    assert settings is not None  # a TokenMirror exists only with a pkcs11 section
    dev = _choose(config, mirror, ldevid, "device", "LDevID", required=True)
    assert dev is not None
    ca = _choose(config, mirror, edge_ca, "ca", "Edge CA", required=False)
    chosen = [dev] + ([ca] if ca is not None else [])
    if store is None:
        raise StoreError(f"the store {config.store.dir} does not exist: nothing is enrolled yet",
                         hint=f"enroll first: `tpmid enroll {dev.name}`")
    certificates: dict[str, Path] = {}
    for ident in chosen:
        if store.current(ident.name) is None:
            raise StoreError(f"{ident.name} has no certificate yet",
                             hint=f"enroll it first: `tpmid enroll {ident.name}`")
        path = store.current_dir(ident.name) / FULLCHAIN
        if not path.is_file():
            raise StoreError(f"{path} does not exist",
                             hint="`tpmid check` repairs the store's current version")
        certificates[ident.name] = path
    states = {s.identity: s for s in mirror.states(store)}
    for ident in chosen:
        st = states[ident.name]
        if not st.in_step:
            raise TokenError(f"the PKCS#11 token is not in step for {ident.name}: "
                             + "; ".join(st.problems),
                             hint="`tpmid pkcs11 sync` brings it in step")
    pin = secret(settings.user_pin)
    reg = registration_id or dev.subject.cn
    text = export_aziot(
        source=config.source, registration_id=reg,
        ldevid=ExportIdentity(certificates[dev.name], mirror.uri(dev.name, pin=pin)),
        edge_ca=ExportIdentity(certificates[ca.name], mirror.uri(ca.name, pin=pin))
        if ca is not None else None,
        library=settings.library, base_slot=pkcs11_uri(settings.token, pin=pin))
    return Export(text=text, registration_id=reg, ldevid=dev.name,
                  edge_ca=ca.name if ca is not None else None, certificates=certificates,
                  uris={i.name: mirror.uri(i.name) for i in chosen}, library=settings.library,
                  store=settings.store, tcti=config.tpm.tcti)
