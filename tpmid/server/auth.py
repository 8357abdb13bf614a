"""Credential checks of the reference server: hashed secrets, HTTP Basic, client certificates.

Secrets are stored only as salted scrypt hashes (RFC 7914) and compared in
constant time. Nothing here logs or echoes a credential; failure reasons name
what was wrong ("missing", "does not match"), never a value.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import threading
from dataclasses import dataclass

from cryptography import x509

from tpmid.render import name as render_name
from tpmid.server.ca import CertificateAuthority
from tpmid.server.config import (
    AnonymousAuth,
    AuthPolicy,
    BasicAuthPolicy,
    ClientCertAuth,
    SecretValueAuth,
)

# scrypt cost: about 20-50 ms per check on a laptop core; enough to make an
# offline guess of a 192-bit random secret pointless, cheap enough for tests.
_N, _R, _P = 2**14, 8, 1


def hash_secret(secret: str, *, salt: bytes | None = None) -> str:
    """``scrypt$N$r$p$<salt>$<hash>`` for ``secret`` (what the config file stores)."""
    salt = salt if salt is not None else secrets.token_bytes(16)
    digest = hashlib.scrypt(secret.encode("utf-8"), salt=salt, n=_N, r=_R, p=_P, dklen=32)
    b64 = base64.b64encode
    return f"scrypt${_N}${_R}${_P}${b64(salt).decode()}${b64(digest).decode()}"


class _VerifiedSecrets:
    """Secrets that passed scrypt once, remembered as keyed MACs for this process.

    scrypt (tens of milliseconds) is what makes an offline guess expensive; paying
    it again for every request of the same device fleet only makes the server slow
    (it dominated a request's server time). After one successful check, the pair
    (stored hash, context, secret) is remembered as HMAC-SHA256 under a random key
    that exists only in this process: no secret is kept, and a wrong secret (or a
    right one with another context, e.g. another user name) still pays scrypt.
    """

    LIMIT = 4096

    def __init__(self) -> None:
        self._key = secrets.token_bytes(32)
        self._tags: dict[tuple[str, str], bytes] = {}
        self._lock = threading.Lock()

    def _tag(self, stored: str, context: str, secret: str) -> bytes:
        msg = b"\0".join(v.encode("utf-8") for v in (stored, context, secret))
        return hmac.new(self._key, msg, hashlib.sha256).digest()

    def known(self, stored: str, context: str, secret: str) -> bool:
        with self._lock:
            tag = self._tags.get((stored, context))
        return tag is not None and hmac.compare_digest(tag, self._tag(stored, context, secret))

    def remember(self, stored: str, context: str, secret: str) -> None:
        tag = self._tag(stored, context, secret)
        with self._lock:
            if len(self._tags) >= self.LIMIT:
                self._tags.clear()
            self._tags[(stored, context)] = tag


_verified = _VerifiedSecrets()


def verify_secret(secret: str, stored: str, *, context: str = "") -> bool:
    """True if ``secret`` matches the ``stored`` hash; constant-time comparison.

    A secret that matched before (with the same ``context``) is recognised without
    scrypt (:class:`_VerifiedSecrets`).
    """
    if _verified.known(stored, context, secret):
        return True
    try:
        scheme, n, r, p, salt_b64, digest_b64 = stored.split("$")
        if scheme != "scrypt":
            return False
        salt = base64.b64decode(salt_b64, validate=True)
        want = base64.b64decode(digest_b64, validate=True)
        got = hashlib.scrypt(secret.encode("utf-8"), salt=salt, n=int(n), r=int(r), p=int(p),
                             dklen=len(want), maxmem=128 * 1024 * 1024)
    except (ValueError, binascii.Error):
        return False
    if not hmac.compare_digest(got, want):
        return False
    _verified.remember(stored, context, secret)
    return True


def generate_secret() -> str:
    """A new random secret (192 bits, URL-safe base64, no padding)."""
    return secrets.token_urlsafe(24)


@dataclass(frozen=True)
class AuthOutcome:
    """The verdict on one request's credentials.

    ``status`` is 0 when the request may proceed, else 401 or 403 with
    ``reason`` (for the response body and the log) and, for 401, the
    ``WWW-Authenticate`` challenge where HTTP authentication applies.
    """

    status: int = 0
    reason: str = ""
    challenge: str | None = None
    principal: str = "-"

    @property
    def ok(self) -> bool:
        """True if the credentials are accepted."""
        return self.status == 0


def issuer_of(cert: x509.Certificate, cas: dict[str, CertificateAuthority]) -> str | None:
    """The name of the CA among ``cas`` that directly issued ``cert`` (and it is valid now)."""
    for name, ca in cas.items():
        if ca.issued(cert):
            return name
    return None


def _basic_credentials(header: str | None) -> tuple[str, str] | None:
    """``(user, password)`` from an ``Authorization: Basic ...`` header (RFC 7617 §2)."""
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "basic" or not token.strip():
        return None
    try:
        decoded = base64.b64decode(token.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    user, sep, password = decoded.partition(":")
    return (user, password) if sep else None


def check(
    policy: AuthPolicy,
    *,
    label: str,
    headers: dict[str, str],
    client_cert: x509.Certificate | None,
    cas: dict[str, CertificateAuthority],
) -> AuthOutcome:
    """Apply a label's auth policy to one request.

    ``headers`` has lower-case names. Client certificates were already
    chain-checked by the TLS layer against the manufacturer and operator CAs;
    here we decide whether the *issuing CA* is one this label accepts.
    """
    if isinstance(policy, AnonymousAuth):
        return AuthOutcome(principal="anonymous")
    if isinstance(policy, SecretValueAuth):
        challenge = f'{policy.header} realm="{label}"'
        value = headers.get(policy.header.lower())
        if value is None:
            return AuthOutcome(401, f"missing {policy.header} header", challenge)
        if not verify_secret(value.strip(), policy.hash):
            return AuthOutcome(401, f"{policy.header} does not match", challenge)
        return AuthOutcome(principal=policy.header)
    if isinstance(policy, BasicAuthPolicy):
        challenge = f'Basic realm="{policy.realm}", charset="UTF-8"'
        creds = _basic_credentials(headers.get("authorization"))
        if creds is None:
            return AuthOutcome(401, "missing HTTP Basic credentials", challenge)
        user, password = creds
        # Always run the hash so a wrong user costs the same as a wrong password.
        password_ok = verify_secret(password, policy.hash, context=user)
        user_ok = hmac.compare_digest(user.encode("utf-8"), policy.username.encode("utf-8"))
        if not (user_ok and password_ok):
            return AuthOutcome(401, "wrong HTTP Basic username or password", challenge)
        return AuthOutcome(principal=f"basic:{user}")
    assert isinstance(policy, ClientCertAuth)
    if client_cert is None:
        return AuthOutcome(401, "this label requires a TLS client certificate from the "
                           f"{' or '.join(policy.issuers)} CA; none was presented")
    issuer = issuer_of(client_cert, {n: cas[n] for n in policy.issuers if n in cas})
    if issuer is None:
        return AuthOutcome(403, "the TLS client certificate is not issued by the "
                           f"{' or '.join(policy.issuers)} CA accepted at this label")
    return AuthOutcome(principal=f"cert:{render_name(client_cert.subject)}")
