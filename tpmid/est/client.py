"""EST client (RFC 7030, updated by RFC 8951) over an injected HTTP session.

:class:`EstClient` speaks the five EST operations of one label
(``/.well-known/est/<label>/``): ``cacerts``, ``csrattrs``, ``simpleenroll``,
``simplereenroll`` and ``serverkeygen``. It never builds its own TLS: the caller
injects a ``requests.Session`` (usually from :func:`make_session` over a
:class:`tpmid.tls.ClientTls`, whose TLS client key may live in the TPM) and, for
the paths that need the socket itself, the TLS handle behind it.

Two transports, one response handling:

* ``requests`` (the session) for ordinary requests: RFC 6125 host/IP checking is
  done by Python's ``ssl`` (``check_hostname``) during the handshake, before any
  header (and so any secret) is sent.
* ``http.client`` on a socket this module connects and wraps itself, for the three
  cases where something must happen *between* the handshake and the request:
  proof-of-possession linking (RFC 7030 §3.5: tls-unique goes into the CSR),
  the id-kp-cmcRA alternative to the host check (RFC 7030 §3.6.1), and the pinned
  ``/cacerts`` bootstrap (RFC 7030 §4.1.1), which must see the server's
  certificate.

Secrets (HTTP Basic password, extra headers such as GlobalSign's
``Secret-Value``) are passed in as values, sent only over the connection they are
meant for (redirects are never followed), redacted in DEBUG logs and scrubbed
from any server text quoted in an error.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import ipaddress
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal, Protocol
from urllib.parse import urlsplit, urlunsplit

import requests
from cryptography import x509

from tpmid import cancel
from tpmid.certfiles import spki_der
from tpmid.clock import utcnow
from tpmid.errors import (
    ConfigError,
    EstAuthError,
    EstProtocolError,
    EstRetryLater,
    EstServerError,
    EstTransportError,
)
from tpmid.est import messages
from tpmid.est.verify import check_pinned_root, verify_server_certificate
from tpmid.policy import MAX_RETRY_AFTER_S, clamp_retry_after
from tpmid.render import format_duration, quoted_name
from tpmid.render import name as render_name
from tpmid.tls.adapter import BoundedHTTPAdapter, SSLContextAdapter
from tpmid.tls.context import ClientTls
from tpmid.tls.deadline import DeadlineExceeded
from tpmid.tls.deadline import clamp as clamp_to_deadline
from tpmid.tls.deadline import exchange as exchange_deadline

log = logging.getLogger(__name__)

WELL_KNOWN = "/.well-known/est"
OPERATIONS = ("cacerts", "csrattrs", "simpleenroll", "simplereenroll", "serverkeygen")
ENROLL_OPERATIONS = ("simpleenroll", "simplereenroll", "serverkeygen")
DEFAULT_MAX_BODY = 1 << 20  # 1 MiB: a certs-only bag of a long chain is a few KiB
DEFAULT_TIMEOUT = (10.0, 60.0)
# One exchange (connect, TLS, request, whole answer) must finish within this (est.timeout.total).
DEFAULT_EXCHANGE_DEADLINE = 120.0
SLOW_NOTICE_S = 1.0  # a server slower than this to answer gets a progress line
SLOW_COUNTDOWN_S = 5.0  # then the time waited, in the log (-v), this often
# A 202's Retry-After is honoured between this and policy.MAX_RETRY_AFTER_S: "0" or a
# date in the past must not turn into a storm of mTLS handshakes (each one a TPM
# signature), and an absurd value must not reach a timer.
RESEND_FLOOR_S = 2.0
# RFC 7030 §3.6.1: a server certificate with id-kp-cmcRA is an authorized EST server
# even when its name does not match the URI.
OID_KP_CMC_RA = x509.ObjectIdentifier("1.3.6.1.5.5.7.3.28")
_ERROR_BODY_CHARS = 300
_REDACTED = "<redacted>"

ServerCheck = Literal["hostname", "hostname-or-cmc-ra", "pin"]
CsrInput = x509.CertificateSigningRequest
# Proof-of-possession: called with the connection's tls-unique, returns the CSR
# carrying it as challengePassword (RFC 7030 §3.5).
CsrFactory = Callable[[bytes], x509.CertificateSigningRequest]
_BodyFactory = Callable[[bytes], bytes]


class TlsHandle(Protocol):
    """What the client needs from :class:`tpmid.tls.ClientTls`."""

    @property
    def ssl_context(self) -> ssl.SSLContext: ...

    def raise_pending(self, cause: BaseException | None = None) -> None:
        """Raise the error a TLS callback recorded (a TPM failure), if any."""
        ...

    def clear_pending(self) -> None:
        """Forget a recorded error before a new handshake."""
        ...


@dataclass(frozen=True)
class EnrollResponse:
    """The answer to simpleenroll/simplereenroll: the issued certificate and any extras.

    RFC 7030 §4.2.3 returns a certs-only bag; a SET has no order, so the issued
    certificate is the one for the CSR's key (or, failing that, the one that
    issues no other certificate in the bag; verification then reports the key
    mismatch). ``extra_certs`` are whatever else the server put in the bag.
    """

    certificate: x509.Certificate
    extra_certs: tuple[x509.Certificate, ...] = ()


@dataclass(frozen=True)
class ServerKeygenResponse:
    """The answer to serverkeygen (RFC 7030 §4.4.2): certificate and server-made key."""

    certificate: x509.Certificate
    private_key_der: bytes = field(repr=False)
    extra_certs: tuple[x509.Certificate, ...] = ()


@dataclass(frozen=True)
class _Response:
    status: int
    reason: str
    headers: Mapping[str, str]  # lower-case names
    body: bytes


def est_base_url(url: str) -> str:
    """Normalise an EST URL to the label's base (``https://h:p/.well-known/est[/label]``).

    Accepts the base itself, the base with a trailing ``/`` or an operation
    (``.../cacerts``), or a bare ``https://host:port`` (RFC 7030 §3.2.2 puts the
    operations under ``/.well-known/est``).
    """
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ConfigError(f"{url!r} is not an EST URL (expected https://host[:port]/...)")
    path = parts.path.rstrip("/")
    last = path.rsplit("/", 1)[-1]
    if last in OPERATIONS:
        path = path[: -len(last) - 1]
    if not path:
        path = WELL_KNOWN
    return urlunsplit((parts.scheme, parts.netloc, path, "", ""))


def _find_cause(exc: BaseException, kind: type[BaseException]) -> BaseException | None:
    """Search the exception, its causes, urllib3 ``reason``s and args for ``kind``."""
    seen: set[int] = set()
    todo: list[object] = [exc]
    while todo:
        e = todo.pop()
        if not isinstance(e, BaseException) or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, kind):
            return e
        todo.extend([e.__cause__, e.__context__, getattr(e, "reason", None), *e.args])
    return None


def _tls_reason(exc: BaseException) -> str:
    """A short, human reason for a TLS failure ("certificate verify failed: ...")."""
    verr = _find_cause(exc, ssl.SSLCertVerificationError)
    if isinstance(verr, ssl.SSLCertVerificationError):
        detail = verr.verify_message or verr.reason or "unknown reason"
        return f"certificate verify failed: {detail}"
    serr = _find_cause(exc, ssl.SSLError)
    if isinstance(serr, ssl.SSLError):
        return serr.reason or serr.strerror or str(serr)
    tmo = _find_cause(exc, TimeoutError) or _find_cause(exc, socket.timeout)
    if tmo is not None:
        return "timed out"
    oerr = _find_cause(exc, OSError)
    if isinstance(oerr, OSError) and oerr.strerror:
        return oerr.strerror
    return str(exc) or type(exc).__name__


def _scrub(text: str, secrets: Iterable[str]) -> str:
    for s in secrets:
        if s:
            text = text.replace(s, _REDACTED)
    return text


def _printable(body: bytes, secrets: Iterable[str]) -> str:
    text = body[: _ERROR_BODY_CHARS * 4].decode("utf-8", errors="replace")
    text = "".join(c if c.isprintable() else " " for c in text)
    text = " ".join(text.split())
    text = _scrub(text, secrets)
    if len(text) > _ERROR_BODY_CHARS:
        text = text[:_ERROR_BODY_CHARS] + "…"
    return text


def _pick_issued(certs: Sequence[x509.Certificate], csr_key: bytes | None) -> EnrollResponse:
    if csr_key is not None:
        for i, c in enumerate(certs):
            if spki_der(c.public_key()) == csr_key:
                return EnrollResponse(c, tuple(certs[:i]) + tuple(certs[i + 1:]))
    # No certificate for our key: return the leaf of the bag (the one that is
    # nobody's issuer) so that verification names it in its "another key" error.
    issuers = {c.issuer.public_bytes() for c in certs if c.issuer != c.subject}
    for i, c in enumerate(certs):
        if c.subject.public_bytes() not in issuers:
            return EnrollResponse(c, tuple(certs[:i]) + tuple(certs[i + 1:]))
    return EnrollResponse(certs[0], tuple(certs[1:]))


class EstClient:
    """One EST label of one server, over an injected session.

    ``base_url`` is the label's base (see :func:`est_base_url`). ``tls`` is the
    TLS handle behind ``session`` (needed for proof-of-possession, the cmcRA and
    pin server checks, and to surface a TPM failure inside a handshake).
    ``server_check`` selects how the server is authorised (RFC 7030 §3.6):

    * ``"hostname"``: the TLS context verifies the chain to the explicit anchors
      and the RFC 6125 host/IP check (``check_hostname``);
    * ``"hostname-or-cmc-ra"``: the context verifies the chain only
      (``check_hostname=False``); this client then requires the host check *or*
      id-kp-cmcRA in the server certificate before it sends anything;
    * ``"pin"``: ``/cacerts`` bootstrap without a trust anchor: the context does
      not verify; ``cacerts()`` accepts the answer only if one returned
      certificate is a root with SHA-256 fingerprint ``pin`` and the server's TLS
      certificate chains to it for this host. No other operation is allowed.

    ``basic`` is ``(username, password)`` for HTTP Basic; ``headers`` are extra
    request headers (their values are treated as secrets). ``max_wait`` bounds
    the total time spent resending after ``202 Accepted``; ``sleep`` and ``now``
    are injected for tests.
    """

    def __init__(
        self,
        base_url: str,
        session: requests.Session,
        *,
        tls: TlsHandle | None = None,
        server_check: ServerCheck = "hostname",
        pin: str | None = None,
        basic: tuple[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        allow_http: bool = False,
        timeout: tuple[float, float] = DEFAULT_TIMEOUT,
        max_body: int = DEFAULT_MAX_BODY,
        max_wait: float = 300.0,
        sleep: Callable[[float], None] = cancel.sleep,
        now: Callable[[], datetime] = utcnow,
        deadline: float | None = DEFAULT_EXCHANGE_DEADLINE,
        progress: Callable[[str], None] | None = None,
    ) -> None:
        self.base_url = est_base_url(base_url)
        parts = urlsplit(self.base_url)
        self._scheme = parts.scheme
        self._host = parts.hostname or ""
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        self._path = parts.path
        if self._scheme == "http" and not allow_http:
            raise ConfigError(
                f"{self.base_url} is plain HTTP: EST needs TLS (RFC 7030 §3.3)",
                hint="use https://, or set est.allow_http: true for a lab server",
            )
        if server_check == "pin" and not pin:
            raise ConfigError("server_check 'pin' needs the SHA-256 fingerprint of the root")
        if server_check != "hostname" and (tls is None or self._scheme != "https"):
            raise ConfigError(f"server check {server_check!r} needs https and a TLS context")
        if server_check == "hostname-or-cmc-ra" and tls is not None:
            ctx = tls.ssl_context
            if ctx.verify_mode != ssl.CERT_REQUIRED:
                raise ConfigError("the cmcRA server check needs a TLS context that verifies "
                                  "the server's chain to the explicit trust anchors")
        self.session = session
        self.tls = tls
        self.server_check: ServerCheck = server_check
        self.pin = pin
        self._headers = dict(headers or {})
        self._secrets = [v for v in self._headers.values() if v]
        if basic is not None:
            user, password = basic
            token = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
            self._headers["Authorization"] = f"Basic {token}"
            self._secrets += [password, token]
        self.timeout = timeout
        self.deadline = deadline
        # One line per change of state that makes the user wait (a 202), for the
        # command line's stderr; the log gets it too.
        self._progress_out = progress
        self.max_body = max_body
        self.max_wait = max_wait
        self._sleep = sleep
        self._now = now
        if self._scheme == "http" and self._secrets:
            log.warning("sending EST credentials to %s over plain HTTP (allow_http is set)",
                        self.base_url)

    # ------------------------------------------------------------------ operations

    def cacerts(self) -> list[x509.Certificate]:
        """GET /cacerts (RFC 7030 §4.1): the CA certificates of this label.

        In ``pin`` mode the answer is accepted only after the pinned-root and
        server-certificate checks (see the class docstring).
        """
        resp, leaf = self._call("GET", "cacerts", None, expect=messages.PKCS7_MIME, auth=False)
        certs = self._decode_certs(resp, "cacerts")
        if self.server_check == "pin":
            assert self.pin is not None
            if leaf is None:
                raise EstTransportError(f"{self._where()}: the server presented no certificate")
            root = check_pinned_root(certs, self.pin)
            verify_server_certificate(leaf, root=root, intermediates=certs, host=self._host,
                                      now=self._now())
            log.info("pinned /cacerts bootstrap: root %s matches the pin and the server's "
                     "certificate chains to it", render_name(root.subject))
        return certs

    def csrattrs(self) -> list[messages.CsrAttr]:
        """GET /csrattrs (RFC 7030 §4.5): attributes the server wants in the CSR.

        204 No Content and 404 Not Found mean "no attributes" (§4.5.2).
        """
        resp, _ = self._call("GET", "csrattrs", None, expect=messages.CSRATTRS,
                             empty_ok=(204, 404))
        if resp.status in (204, 404):
            return []
        try:
            return list(messages.decode_csrattrs(resp.body))
        except EstProtocolError as e:
            raise EstProtocolError(f"{self._where('csrattrs')}: {e.message}") from e
        except Exception as e:
            raise EstProtocolError(f"{self._where('csrattrs')}: malformed CSR attributes: "
                                   f"{e}") from e

    def simpleenroll(self, csr: CsrInput | CsrFactory) -> EnrollResponse:
        """POST /simpleenroll (RFC 7030 §4.2.1) with ``csr``; return the issued certificate.

        Pass a :data:`CsrFactory` instead of a CSR for proof-of-possession linking
        (RFC 7030 §3.5): it is called with the connection's tls-unique and the
        request goes over that same connection (TLS 1.2 only).
        """
        return self._enroll("simpleenroll", csr)

    def simplereenroll(self, csr: CsrInput | CsrFactory) -> EnrollResponse:
        """POST /simplereenroll (RFC 7030 §4.2.2): renew or rekey, authenticated by the old cert."""
        return self._enroll("simplereenroll", csr)

    def serverkeygen(self, csr: CsrInput) -> ServerKeygenResponse:
        """POST /serverkeygen (RFC 7030 §4.4): the server makes the key (software keys only).

        A key made outside the TPM is, by definition, not a TPM key: tpmid uses
        this only for software-key identities (bootstrap, comparison).
        """
        body = messages.encode_csr(csr)
        resp, _ = self._call("POST", "serverkeygen", body, expect=messages.MULTIPART_MIXED)
        try:
            key_der, certs = messages.parse_serverkeygen(resp.body,
                                                         resp.headers.get("content-type", ""))
        except EstProtocolError as e:
            raise EstProtocolError(f"{self._where('serverkeygen')}: {e.message}") from e
        except Exception as e:
            raise EstProtocolError(f"{self._where('serverkeygen')}: malformed multipart "
                                   f"answer: {e}") from e
        picked = _pick_issued(certs, None)
        return ServerKeygenResponse(picked.certificate, key_der, picked.extra_certs)

    # ------------------------------------------------------------------ internals

    def _where(self, op: str | None = None) -> str:
        return f"{self.base_url}/{op}" if op else f"{self._host}:{self._port}"

    def _enroll(self, op: str, csr: CsrInput | CsrFactory) -> EnrollResponse:
        if isinstance(csr, x509.CertificateSigningRequest):
            body: bytes | _BodyFactory = messages.encode_csr(csr)
            used: list[x509.CertificateSigningRequest] = [csr]
        else:
            factory = csr
            used = []

            def make(tls_unique: bytes) -> bytes:
                made = factory(tls_unique)
                used.append(made)
                return messages.encode_csr(made)

            body = make
        resp, _ = self._call("POST", op, body, expect=messages.PKCS7_MIME)
        certs = self._decode_certs(resp, op)
        csr_key = spki_der(used[-1].public_key()) if used else None
        return _pick_issued(certs, csr_key)

    def _decode_certs(self, resp: _Response, op: str) -> list[x509.Certificate]:
        try:
            certs = list(messages.decode_certs_only(resp.body))
        except Exception as e:
            detail = e.message if isinstance(e, EstProtocolError) else str(e)
            raise EstProtocolError(
                f"{self._where(op)}: the body is not a certs-only PKCS#7 "
                f"({len(resp.body)} bytes): {detail}"
            ) from e
        if not certs:
            raise EstProtocolError(f"{self._where(op)}: the certs-only answer holds no certificate")
        return certs

    def _request_headers(self, body: bool, auth: bool) -> dict[str, str]:
        h: dict[str, str] = {}
        if body:
            # RFC 8951 §3.2 makes Content-Transfer-Encoding optional; some
            # servers still want it (RFC 7030 §4.2.1 original text).
            h["Content-Type"] = messages.PKCS10
            h["Content-Transfer-Encoding"] = "base64"
        if auth:
            h.update(self._headers)
        return h

    def _redacted(self, headers: Mapping[str, str]) -> dict[str, str]:
        return {k: (_REDACTED if k in self._headers else v) for k, v in headers.items()}

    def _call(
        self,
        method: str,
        op: str,
        body: bytes | _BodyFactory | None,
        *,
        expect: str,
        auth: bool = True,
        empty_ok: tuple[int, ...] = (),
    ) -> tuple[_Response, x509.Certificate | None]:
        """Send one operation, resending after 202 (RFC 7030 §4.2.3) within ``max_wait``."""
        if self.server_check == "pin" and op != "cacerts":
            raise ConfigError(
                f"{op} is not allowed on a pinned bootstrap connection: only /cacerts is",
                hint="fetch /cacerts with the pin first, then trust the returned root",
            )
        # /cacerts needs no client authentication (RFC 7030 §4.1.1); never send
        # credentials to a server not yet authenticated by a pin.
        auth = auth and self.server_check != "pin"
        url = f"{self.base_url}/{op}"
        headers = self._request_headers(body is not None, auth)
        started = self._now()
        attempt = 0
        while True:
            attempt += 1
            log.debug("EST %s %s (attempt %d) headers=%s", method, url, attempt,
                      self._redacted(headers))
            # One deadline for the whole exchange: a server trickling its answer
            # cannot keep the device (or a stopping daemon) waiting.
            with exchange_deadline(self.deadline), self._waiting(op):
                if callable(body) or self.server_check != "hostname":
                    resp, leaf = self._raw(method, op, body, headers)
                else:
                    resp, leaf = self._via_session(method, url, body, headers), None
            log.debug("EST %s %s -> %d %s content-type=%r %d bytes", method, url, resp.status,
                      resp.reason, resp.headers.get("content-type"), len(resp.body))
            if resp.status == 202:
                if op not in ENROLL_OPERATIONS:
                    # RFC 7030 §4.2.3: only an enrollment may be deferred.
                    raise EstProtocolError(f"{url}: 202 Accepted is not an answer to {op}")
                wait = self._retry_after(resp, op)
                elapsed = (self._now() - started).total_seconds()
                if elapsed + wait > self.max_wait:
                    waited = (f" after {format_duration(elapsed)} of waiting" if elapsed >= 1
                              else "")
                    limit = (f"this command waits at most {format_duration(self.max_wait)}"
                             if self.max_wait > 0 else "this command does not wait for it")
                    raise EstRetryLater(
                        f"{url}: the server is still processing the request (202 Accepted, "
                        f"Retry-After {wait:g} s){waited}; {limit} (est.max_wait)",
                        retry_after=wait,
                        hint="the request is probably waiting for manual approval at the CA; "
                        "run the command again later",
                    )
                self._progress(f"{self._where(op)}: 202 Accepted, the CA is processing the "
                               f"request; resending it in {format_duration(wait)} "
                               f"(attempt {attempt + 1}, RFC 7030 §4.2.3)")
                self._wait(wait)
                continue
            self._check_status(resp, url, empty_ok)
            if resp.status == 200:
                self._check_media_type(resp, url, expect)
            return resp, leaf

    def _wait(self, seconds: float) -> None:
        """Sleep before a resend; with INFO logging (``-v``), count down once a second."""
        if seconds <= 1 or not log.isEnabledFor(logging.INFO):
            self._sleep(seconds)
            return
        left = seconds
        while left > 0:
            step = min(1.0, left)
            self._sleep(step)
            left -= step
            if left > 0:
                log.info("resending in %s", format_duration(left))

    def _retry_after(self, resp: _Response, op: str) -> float:
        value = resp.headers.get("retry-after")
        if not value:
            raise EstProtocolError(
                f"{self._where(op)}: 202 Accepted without Retry-After (RFC 7030 §4.2.3 "
                "requires it)"
            )
        wait = messages.parse_retry_after(value, self._now())
        if wait is None:
            raise EstProtocolError(f"{self._where(op)}: unusable Retry-After {value[:60]!r} "
                                   "(RFC 9110 §10.2.3: delay-seconds or an HTTP-date)")
        honoured = max(clamp_retry_after(wait), RESEND_FLOOR_S)
        if honoured != wait:
            log.warning("%s: the server asked to retry after %.40s; using %g s (tpmid waits "
                        "between %g s and %g s)", self._where(op), value, honoured,
                        RESEND_FLOOR_S, MAX_RETRY_AFTER_S)
        return honoured

    def _check_status(self, resp: _Response, url: str, empty_ok: tuple[int, ...]) -> None:
        if resp.status == 200 or resp.status in empty_ok:
            return
        text = _printable(resp.body, self._secrets)
        said = f": {text}" if text else ""
        if resp.status == 401:
            raise EstAuthError(
                f"{url}: the server rejected our credentials ({resp.status} {resp.reason}){said}",
                status=resp.status, body=text,
                hint="check the EST secret, user name/password or client certificate "
                "configured in est.auth for this identity",
            )
        if resp.status == 403:
            # RFC 9110 §15.5.4: understood and refused. Credentials, or what was asked for
            # (a subject this client may not have); the server's words say which.
            subject = "subject" in text.lower() or "serialnumber" in text.lower()
            raise EstAuthError(
                f"{url}: the server refused the request ({resp.status} {resp.reason}){said}",
                status=resp.status, body=text,
                hint=("configure the subject the CA allows for this device (for example the "
                      "IDevID's serialNumber in subject.serial_number)" if subject else
                      "check the EST secret, user name/password or client certificate "
                      "configured in est.auth for this identity"),
            )
        if 300 <= resp.status < 400:
            where = resp.headers.get("location", "nowhere")
            raise EstServerError(
                f"{url}: the server redirects ({resp.status}) to {where}; tpmid does not follow "
                "EST redirects (credentials must not go to another server)",
                status=resp.status, body=text,
                hint="configure the final URL in est.url",
            )
        hint = None
        lowered = text.lower()
        if resp.status == 400 and ("proof-of-possession" in lowered or "tls-unique" in lowered):
            hint = ("this label wants proof-of-possession linking (RFC 7030 §3.5): set "
                    "est.pop: true for this identity (TLS 1.2 is used for it)")
        elif 500 <= resp.status < 600:
            hint = ("a problem at the EST server; the current certificate stays in use and the "
                    "attempt is retried on the retry schedule")
        raise EstServerError(f"{url}: the server answered {resp.status} {resp.reason}{said}",
                             status=resp.status, body=text, hint=hint)

    def _check_media_type(self, resp: _Response, url: str, expect: str) -> None:
        ctype = resp.headers.get("content-type", "")
        if not messages.media_type_matches(ctype, expect):
            raise EstProtocolError(
                f"{url}: wrong media type {ctype or '(none)'!r}, expected {expect!r}"
            )

    def _progress(self, line: str) -> None:
        log.info("%s", line)
        if self._progress_out is not None:
            self._progress_out(line)

    @contextlib.contextmanager
    def _waiting(self, op: str) -> Iterator[None]:
        """Say so when the server takes longer than :data:`SLOW_NOTICE_S` to answer.

        One progress line (stderr at the default verbosity), then the time waited
        every :data:`SLOW_COUNTDOWN_S` in the log (``-v``), until the answer or the
        exchange deadline. A watcher thread that only waits on an event: the
        request itself is untouched.
        """
        done = threading.Event()
        started = time.monotonic()
        where = self._where(op)
        limit = (f"; gives up after {format_duration(self.deadline)} (est.timeout.total)"
                 if self.deadline else "")

        def watch() -> None:
            if done.wait(SLOW_NOTICE_S):
                return
            self._progress(f"{where}: waiting for the server's answer{limit}")
            while not done.wait(SLOW_COUNTDOWN_S):
                log.info("%s: still waiting, %s so far%s", where,
                         format_duration(time.monotonic() - started), limit)

        watcher = threading.Thread(target=watch, name="est-wait-notice", daemon=True)
        watcher.start()
        try:
            yield
        finally:
            done.set()
            watcher.join(1.0)

    # --------------------------------------------------------------- transports

    def _transport_error(self, e: BaseException, url: str) -> EstTransportError:
        # A TPM failure inside the TLS signing callback shows up as a vague
        # handshake error; the TLS handle kept the real one.
        if self.tls is not None:
            self.tls.raise_pending(e)
        if _find_cause(e, DeadlineExceeded) is not None:
            return EstTransportError(
                f"{url}: no complete answer from {self._where()} within the exchange deadline "
                f"of {self.deadline:g} s (est.timeout.total)",
                hint="the server or the network is too slow; the current certificate stays in "
                "use and the attempt is retried on the retry schedule")
        reason = _tls_reason(e)
        hint = None
        if "unknown ca" in reason.lower():
            # The server's TLS alert: it does not trust the CA of our client certificate.
            hint = ("the EST server does not trust the CA that issued our client certificate "
                    "(the CA was replaced, or est.auth.client names the wrong identity): ask the "
                    "EST operator which CA this label accepts")
        elif "certificate verify failed" in reason:
            hint = ("the EST server's TLS certificate does not chain to trust.est_anchors (or "
                    "est.trust_anchors): install the CA that issued it")
        return EstTransportError(f"{url}: connection to {self._where()} failed: {reason}",
                                 hint=hint)

    def _via_session(self, method: str, url: str, body: bytes | None,
                     headers: Mapping[str, str]) -> _Response:
        try:
            r = self.session.request(method, url, data=body, headers=dict(headers),
                                     timeout=self.timeout, stream=True, allow_redirects=False)
        except requests.RequestException as e:
            raise self._transport_error(e, url) from e
        try:
            declared = r.headers.get("content-length")
            if declared and declared.isdigit() and int(declared) > self.max_body:
                raise EstProtocolError(f"{url}: the answer is {declared} bytes, more than the "
                                       f"{self.max_body} allowed")
            chunks: list[bytes] = []
            size = 0
            try:
                for chunk in r.iter_content(chunk_size=65536):
                    size += len(chunk)
                    if size > self.max_body:
                        raise EstProtocolError(f"{url}: the answer is larger than the "
                                               f"{self.max_body} bytes allowed")
                    chunks.append(chunk)
            except requests.RequestException as e:
                raise self._transport_error(e, url) from e
            return _Response(r.status_code, r.reason or "",
                             {k.lower(): v for k, v in r.headers.items()}, b"".join(chunks))
        finally:
            r.close()

    def _raw(self, method: str, op: str, body: bytes | _BodyFactory | None,
             headers: Mapping[str, str]) -> tuple[_Response, x509.Certificate | None]:
        """One request over a socket connected and wrapped here (PoP, cmcRA, pin)."""
        url = f"{self.base_url}/{op}"
        if self._scheme != "https" or self.tls is None:
            raise ConfigError(f"{url}: proof-of-possession linking needs https and a TLS context")
        ctx = self.tls.ssl_context
        connect_t, read_t = self.timeout
        try:
            with cancel.interruptible():
                raw = socket.create_connection((self._host, self._port),
                                               timeout=clamp_to_deadline(connect_t))
        except OSError as e:
            raise self._transport_error(e, url) from e
        self.tls.clear_pending()
        try:
            try:
                sock = ctx.wrap_socket(raw, server_hostname=self._host)
            except (ssl.SSLError, OSError) as e:
                raise self._transport_error(e, url) from e
        except BaseException:
            raw.close()
            raise
        conn = http.client.HTTPSConnection(self._host, self._port, timeout=read_t, context=ctx)
        conn.sock = sock
        try:
            sock.settimeout(read_t)
            leaf = self._server_certificate(sock, url)
            payload = body(self._tls_unique(sock, url)) if callable(body) else body
            try:
                conn.request(method, f"{self._path}/{op}", body=payload, headers=dict(headers))
                r = conn.getresponse()
                data = r.read(self.max_body + 1)
            except (OSError, http.client.HTTPException) as e:
                raise self._transport_error(e, url) from e
            if len(data) > self.max_body:
                raise EstProtocolError(f"{url}: the answer is larger than the {self.max_body} "
                                       "bytes allowed")
            return _Response(r.status, r.reason or "",
                             {k.lower(): v for k, v in r.getheaders()}, data), leaf
        finally:
            conn.close()

    def _tls_unique(self, sock: ssl.SSLSocket, url: str) -> bytes:
        # RFC 7030 §3.5 uses tls-unique (RFC 5929 §3), which TLS 1.3 does not define.
        if sock.version() != "TLSv1.2":
            raise EstProtocolError(
                f"{url}: proof-of-possession linking needs TLS 1.2, but {sock.version()} was "
                "negotiated",
                hint="cap the connection at TLS 1.2 (tpmid does this when est.pop is set)",
            )
        cb = sock.get_channel_binding("tls-unique")
        if not cb:
            raise EstProtocolError(f"{url}: the TLS connection has no tls-unique value")
        return cb

    def _server_certificate(self, sock: ssl.SSLSocket, url: str) -> x509.Certificate | None:
        """Authorise the server before anything is sent (RFC 7030 §3.6.1)."""
        der = sock.getpeercert(binary_form=True)
        if self.server_check == "hostname":
            return None  # check_hostname already did the RFC 6125 check in the handshake
        if not der:
            raise EstTransportError(f"{url}: the server presented no certificate")
        leaf = x509.load_der_x509_certificate(der)
        if self.server_check == "pin":
            return leaf  # checked against the pin once /cacerts has answered
        if _names_host(leaf, self._host):
            return leaf
        try:
            eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        except x509.ExtensionNotFound:
            eku = None
        if eku is not None and OID_KP_CMC_RA in eku:
            log.info("%s: server certificate %s does not name %s but carries id-kp-cmcRA "
                     "(RFC 7030 §3.6.1)", url, render_name(leaf.subject), self._host)
            return leaf
        raise EstTransportError(
            f"{url}: certificate verify failed: the server certificate "
            f"{quoted_name(leaf.subject)} neither names {self._host!r} nor carries "
            "id-kp-cmcRA (RFC 7030 §3.6.1)",
        )


def _names_host(cert: x509.Certificate, host: str) -> bool:
    """RFC 6125 §6.4 reference-identity check: IP SANs for IPs, DNS SANs (one wildcard)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False  # RFC 6125 §6.4.4: no CN fallback when SANs are the norm
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        ip = None
    if ip is not None:
        return ip in san.get_values_for_type(x509.IPAddress)
    want = host.rstrip(".").lower()
    for name in san.get_values_for_type(x509.DNSName):
        name = name.rstrip(".").lower()
        if name == want:
            return True
        # A wildcard only as the whole left-most label, matching exactly one label.
        if name.startswith("*.") and "." in want:
            if want.split(".", 1)[1] == name[2:] and want.split(".", 1)[0]:
                return True
    return False


def make_session(tls: TlsHandle | None) -> requests.Session:
    """A ``requests.Session`` whose HTTPS connections use ``tls.ssl_context``.

    The session ignores the environment (no proxies, no ``.netrc`` credentials:
    library code never reads ``os.environ``) and carries no default auth.
    """
    s = requests.Session()
    s.trust_env = False
    s.mount("http://", BoundedHTTPAdapter())  # allow_http lab servers: the same deadline
    if tls is not None:
        # Given the ClientTls itself, the adapter re-raises a TPM failure inside
        # the handshake as the TPM's own error.
        s.mount("https://", SSLContextAdapter(tls if isinstance(tls, ClientTls)
                                              else tls.ssl_context))
    return s


__all__ = [
    "CsrFactory",
    "EnrollResponse",
    "EstClient",
    "ServerKeygenResponse",
    "TlsHandle",
    "est_base_url",
    "make_session",
]
