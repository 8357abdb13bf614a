"""The PKCS#11 token of a config (:class:`~tpmid.lifecycle.pkcs11.TokenMirror`), or None.

Imported by the commands that keep or report the token (renew, daemon, enroll,
check, ``tpmid pkcs11``), like :mod:`tpmid.wiring.tpm`: it loads the TPM stack.
"""

from __future__ import annotations

from tpmid.lifecycle.pkcs11 import TokenMirror
from tpmid.pkcs11.token import TokenStore
from tpmid.wiring import Runtime


def token_mirror(rt: Runtime) -> TokenMirror | None:
    """The token mirror of ``rt``'s config; None without a top-level ``pkcs11`` section."""
    settings = rt.config.pkcs11
    if settings is None:
        return None
    return TokenMirror(rt.config, TokenStore(settings.store, settings.token), rt.secret)
