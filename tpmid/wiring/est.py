"""The EST client factory: server trust, TLS client identity, credentials and HTTP session.

:class:`EstClients` builds one :class:`~tpmid.est.client.EstClient` per
exchange from an identity's ``est`` section: the server is authenticated
against ``est.trust_anchors`` (or ``trust.est_anchors``), the system store only
if ``trust.use_system_store``, or, with ``est.pin`` and no anchor, a pinned
``/cacerts`` bootstrap (RFC 7030 §3.6, §4.1.1); the client authenticates with
the TLS key it is given (a TPM key through the signing shim, or a software key
file) and with the configured Basic or header credentials, resolved through the
injected secret resolver.

Imports the HTTP and TLS stacks; the CLI imports this module only for commands
that talk to an EST server (see :mod:`tpmid.wiring`).
"""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes

from tpmid import cancel
from tpmid.certfiles import load_pem_certificates
from tpmid.clock import utcnow
from tpmid.config import Config, EstConfig, SecretRef
from tpmid.errors import ConfigError
from tpmid.est.client import DEFAULT_TIMEOUT, EstClient, ServerCheck, est_base_url, make_session
from tpmid.est.verify import normalize_pin
from tpmid.tls import ClientTls, TlsSigningKey, client_tls
from tpmid.tls.context import SELFTEST_RECORD

SecretResolver = Callable[[SecretRef], str]


@dataclass(frozen=True)
class ServerTrust:
    """How the EST server is authenticated (RFC 7030 §3.6)."""

    anchors: tuple[x509.Certificate, ...]
    use_system_store: bool
    pin: str | None = None
    cmc_ra: bool = False  # est.accept_cmc_ra: the client checks name-or-cmcRA itself
    source: str = "explicit trust anchors"


@dataclass(frozen=True)
class FetchResult:
    """Certificates or attributes fetched by ``tpmid est cacerts/csrattrs``."""

    url: str
    certificates: tuple[x509.Certificate, ...] = ()
    attributes: tuple[Any, ...] = ()
    server_auth: str = ""


def tls_chain(cert: x509.Certificate, chain: Sequence[x509.Certificate]) -> list[x509.Certificate]:
    """What a client sends in TLS: its certificate and the chain without the root.

    RFC 8446 §4.4.2: the root may be omitted; the server has it as its anchor.
    """
    return [cert, *(c for c in chain if c.issuer != c.subject)]


def bootstrap_root(url: str, pin: str, *, timeout: tuple[float, float] | None = None,
                   allow_http: bool = False,
                   now: Callable[[], datetime] = utcnow) -> list[x509.Certificate]:
    """Pinned ``/cacerts`` bootstrap (RFC 7030 §4.1.1); return the CA certificates.

    The connection is made without verification; the answer is accepted only if
    one certificate is a root whose SHA-256 fingerprint is ``pin`` and the
    server's TLS certificate chains to that root for this host (see
    :class:`tpmid.est.client.EstClient`). The pinned root is first in the list.
    """
    with contextlib.ExitStack() as stack:
        tls = stack.enter_context(client_tls(verify_server=False))
        session = make_session(tls)
        stack.callback(session.close)
        client = EstClient(url, session, tls=tls, server_check="pin", pin=pin,
                           allow_http=allow_http, timeout=timeout or DEFAULT_TIMEOUT, now=now)
        certs = client.cacerts()
    want = normalize_pin(pin)
    root = [c for c in certs if c.fingerprint(hashes.SHA256()).hex() == want]
    return root + [c for c in certs if c not in root]


def _fetch(op: Literal["cacerts", "csrattrs"], url: str, *,
           trusted_certs: Sequence[Path], pin: str | None, use_system_store: bool,
           allow_http: bool, timeout: tuple[float, float] | None) -> FetchResult:
    base = est_base_url(url)
    anchors = load_pem_certificates(trusted_certs, "trusted certificate file")
    how = "explicit trust anchors" if anchors else "system trust store"
    if not anchors and not use_system_store:
        if pin is None:
            raise ConfigError(
                f"no way to authenticate {base}: give --trusted-certs FILE (the CA of the "
                "server's TLS certificate) or --pin SHA256 (fingerprint of the EST root)",
                hint="RFC 7030 §3.6: tpmid never trusts an EST server it cannot authenticate",
            )
        roots = bootstrap_root(base, pin, timeout=timeout, allow_http=allow_http)
        if op == "cacerts":
            return FetchResult(base, tuple(roots), server_auth=f"pinned root {normalize_pin(pin)}")
        anchors, how = roots[:1], "pinned root"
    plain = base.startswith("http://")
    with contextlib.ExitStack() as stack:
        tls = None if plain else stack.enter_context(
            client_tls(trust_anchors=anchors, use_system_store=use_system_store))
        session = make_session(tls)
        stack.callback(session.close)
        client = EstClient(base, session, tls=tls, allow_http=allow_http,
                           timeout=timeout or DEFAULT_TIMEOUT, max_wait=0.0)
        if op == "cacerts":
            return FetchResult(base, tuple(client.cacerts()), server_auth=how)
        return FetchResult(base, attributes=tuple(client.csrattrs()), server_auth=how)


def fetch_cacerts(url: str, *, trusted_certs: Sequence[Path] = (), pin: str | None = None,
                  use_system_store: bool = False, allow_http: bool = False,
                  timeout: tuple[float, float] | None = None) -> FetchResult:
    """``tpmid est cacerts URL``: the label's CA certificates, server authenticated.

    With ``trusted_certs`` the server's TLS certificate must chain to them (and
    name the host); with only ``pin``, the pinned bootstrap of
    :func:`bootstrap_root` applies.
    """
    return _fetch("cacerts", url, trusted_certs=trusted_certs, pin=pin,
                  use_system_store=use_system_store, allow_http=allow_http, timeout=timeout)


def fetch_csrattrs(url: str, *, trusted_certs: Sequence[Path] = (), pin: str | None = None,
                   use_system_store: bool = False, allow_http: bool = False,
                   timeout: tuple[float, float] | None = None) -> FetchResult:
    """``tpmid est csrattrs URL``: the CSR attributes the label asks for (RFC 7030 §4.5)."""
    return _fetch("csrattrs", url, trusted_certs=trusted_certs, pin=pin,
                  use_system_store=use_system_store, allow_http=allow_http, timeout=timeout)


class EstClients:
    """Builds the EST clients of one config (see the module docstring).

    ``secrets`` resolves the credentials of ``est.auth``; ``now`` and ``sleep``
    go to every client (202 waits, validity checks).
    """

    def __init__(self, config: Config, secrets: SecretResolver, *,
                 now: Callable[[], datetime] = utcnow,
                 sleep: Callable[[float], None] = cancel.sleep,
                 progress: Callable[[str], None] | None = None) -> None:
        self.config = config
        self.secrets = secrets
        self.now = now
        self.sleep = sleep
        self.progress = progress

    def fetch_cacerts(self, est: EstConfig) -> FetchResult:
        """``GET /cacerts`` of ``est``'s label with the configured server trust, no client auth."""
        return fetch_cacerts(est.url, trusted_certs=est.trust_anchors or self.config.trust.est_anchors,
                             pin=est.pin, use_system_store=self.config.trust.use_system_store,
                             allow_http=est.allow_http,
                             timeout=(est.connect_timeout, est.read_timeout))

    def trust(self, est: EstConfig, where: str) -> ServerTrust:
        """How to authenticate ``est``'s server; a pinned bootstrap fetches the root now.

        ``where`` names the config section in messages (``identities.NAME.est``).
        """
        anchors = tuple(load_pem_certificates(est.trust_anchors or self.config.trust.est_anchors,
                                              "EST trust anchor file"))
        use_system = self.config.trust.use_system_store
        if anchors or use_system:
            return ServerTrust(anchors, use_system, est.pin, est.accept_cmc_ra)
        if est.pin is None:
            raise ConfigError(
                f"{self.config.source}: {where}: no trust anchor for the EST server",
                hint="set trust.est_anchors (or est.trust_anchors) to the CA of the server's "
                "TLS certificate, trust.use_system_store: true, or est.pin for a pinned "
                "/cacerts bootstrap (RFC 7030 §3.6, §4.1.1)",
            )
        roots = bootstrap_root(est.url, est.pin, timeout=(est.connect_timeout, est.read_timeout),
                               allow_http=est.allow_http, now=self.now)
        return ServerTrust(tuple(roots[:1]), False, None, source="pinned root")

    def credentials(self, est: EstConfig) -> tuple[dict[str, str], tuple[str, str] | None]:
        """The configured header and Basic credentials of ``est``, resolved (never logged)."""
        auth = est.auth
        headers = {name: self.secrets(ref) for name, ref in auth.headers}
        basic = (auth.basic.username, self.secrets(auth.basic.password)) if auth.basic else None
        return headers, basic

    @contextlib.contextmanager
    def open(self, est: EstConfig, trust: ServerTrust, *, key: TlsSigningKey | None = None,
             cert: x509.Certificate | None = None,
             chain: Sequence[x509.Certificate] = (), key_file: Path | None = None,
             credentials: tuple[Mapping[str, str], tuple[str, str] | None] | None = None,
             ) -> Iterator[EstClient]:
        """An :class:`EstClient` for ``est``'s label, authenticated as the arguments say.

        ``key`` (a TPM key) or ``key_file`` (a software key) with ``cert`` and its
        ``chain`` is the TLS client identity; none of them is a server-auth-only
        connection (Secret-Value or Basic labels). With ``est.pop`` the
        connection is capped at TLS 1.2 (tls-unique, RFC 7030 §3.5).
        """
        headers, basic = credentials if credentials is not None else self.credentials(est)
        with contextlib.ExitStack() as stack:
            tls = stack.enter_context(self._tls(est, trust, key=key, cert=cert, chain=chain,
                                                key_file=key_file))
            session = make_session(tls)
            stack.callback(session.close)
            check: ServerCheck = "hostname-or-cmc-ra" if trust.cmc_ra else "hostname"
            yield EstClient(
                est.url, session, tls=tls, server_check=check, basic=basic,
                headers=dict(headers), allow_http=est.allow_http,
                timeout=(est.connect_timeout, est.read_timeout), max_wait=est.max_wait,
                sleep=self.sleep, now=self.now, deadline=est.total_timeout,
                progress=self.progress,
            )

    def _tls(self, est: EstConfig, trust: ServerTrust, *, key: TlsSigningKey | None,
             cert: x509.Certificate | None, chain: Sequence[x509.Certificate],
             key_file: Path | None) -> ClientTls:
        cert_chain = tls_chain(cert, chain) if cert is not None else list(chain)
        max_version = ssl.TLSVersion.TLSv1_2 if est.pop else None
        # With accept_cmc_ra the chain is still verified here; the host name *or* the
        # id-kp-cmcRA EKU is then checked by EstClient before anything is sent.
        return client_tls(key=key, key_file=key_file, cert_chain=cert_chain,
                          trust_anchors=trust.anchors, use_system_store=trust.use_system_store,
                          max_version=max_version, check_hostname=not trust.cmc_ra,
                          selftest_record=self._selftest_record())

    def _selftest_record(self) -> Path | None:
        """Where a passed TLS shim self-test is remembered: the store, if it exists."""
        store = self.config.store.dir
        return store / SELFTEST_RECORD if store.is_dir() else None
