"""The error tree of tpmid.

One root, subtrees by who failed (STYLE.md §6). Every error carries a message a
person can act on and, where useful, data a program can act on. The CLI maps the
classes to exit codes (see ``docs/cli.md``).

No message ever contains a secret: callers format messages from names and
status codes, never from credential values.
"""

from __future__ import annotations


class TpmidError(Exception):
    """Root of every error tpmid raises on purpose.

    ``hint`` is an optional next step for the operator ("run tpmid key create").
    """

    exit_code: int = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


class ConfigError(TpmidError):
    """The configuration (file, flag or environment) is invalid or incomplete."""

    exit_code = 2


class TpmError(TpmidError):
    """The TPM refused a command or could not be reached.

    ``rc`` keeps the TSS2/TPM return code when there is one.
    """

    exit_code = 3

    def __init__(self, message: str, *, rc: int | None = None, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.rc = rc


class KeyMismatchError(TpmError):
    """A key in the TPM is not the one that was expected (template or certificate)."""


class KeyUnavailableError(TpmError):
    """An identity's key is gone from the TPM for good.

    A persistent key that is no longer at its handle, or a key file that no
    longer loads (both happen after TPM2_Clear, or with another TPM): retrying
    cannot help; the key must be re-created (an IDevID re-derives from its
    template) or the identity enrolled again with a new key.

    ``identity`` names the identity whose key it is, when the raiser knows.
    """

    def __init__(self, message: str, *, rc: int | None = None, hint: str | None = None,
                 identity: str | None = None) -> None:
        super().__init__(message, rc=rc, hint=hint)
        self.identity = identity


class SealedSecretError(TpmError):
    """A sealed secret cannot be opened by this TPM: its PCRs changed, or it was sealed
    on another TPM (or before the endorsement seed changed). Sealing it again fixes it."""


class TlsShimError(TpmidError):
    """The TPM-backed TLS signing shim cannot work in this process."""

    exit_code = 3


class EstError(TpmidError):
    """Base for everything that went wrong talking to an EST server."""

    exit_code = 4


class EstTransportError(EstError):
    """The server could not be reached or the TLS connection failed.

    ``refused_client_certificate`` names the TLS alert when the server refused the
    client certificate tpmid presented (unknown CA, revoked, expired...): the identity
    may then still get through with its bootstrap identity.
    """

    def __init__(self, message: str, *, hint: str | None = None,
                 refused_client_certificate: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.refused_client_certificate = refused_client_certificate


class EstServerError(EstError):
    """The server answered with an error status (4xx/5xx)."""

    def __init__(self, message: str, *, status: int, body: str = "", hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.status = status
        self.body = body


class EstAuthError(EstServerError):
    """The server rejected our credentials (401/403)."""

    exit_code = 5


class EstRetryLater(EstError):
    """The server accepted the request but has no answer yet (RFC 7030 §4.2.3: 202).

    ``retry_after`` is the delay in seconds the server asked for.
    """

    def __init__(self, message: str, *, retry_after: float, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.retry_after = retry_after


class EstProtocolError(EstError):
    """The server's answer does not follow RFC 7030 (wrong media type, garbage body)."""


class VerificationError(TpmidError):
    """An issued certificate failed verification (key, chain, subject, validity)."""

    exit_code = 6


class IdentityMismatchError(VerificationError):
    """The TPM's key and the certificate recorded for it do not belong together.

    Reported, never repaired silently: replacing either side destroys evidence
    and may orphan certificates issued for the other.
    """


class StoreError(TpmidError):
    """The on-disk store is unusable (permissions, corruption, lock held)."""

    exit_code = 7


class TokenError(StoreError):
    """The tpm2-pkcs11 token store is unusable or out of step (the PKCS#11 view of the keys)."""
