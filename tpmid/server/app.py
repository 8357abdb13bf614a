"""The EST application: one request in, one response out, no sockets.

:class:`EstApp` implements RFC 7030 (as updated by RFC 8951) for the labels of a
:class:`~tpmid.server.config.ServerConfig`. :mod:`tpmid.server.server` feeds it
requests from TLS connections; keeping the protocol here makes every rule
readable in one place:

* routing — ``/.well-known/est[/<label>]/<operation>`` (RFC 7030 §3.2.2);
* auth — the label's policy (Secret-Value, Basic, client certificate);
* CSR checks — syntax, signature, key strength, optional PoP (§3.5);
* re-enrollment — the TLS client certificate is the identity being renewed,
  and the CSR's subject and SANs must equal it (§4.2.2);
* subject policy — the label decides which subjects the authenticated client
  may ask for at all (:mod:`tpmid.server.subject_policy`), for every operation
  that issues;
* behaviours of real services — pending (202), re-enrollment forcing, libest
  quirks — and the fault knobs used by the client's test suite.
"""

from __future__ import annotations

import base64
import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any, cast

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa
from cryptography.x509.oid import AttributeOID

from tpmid.certfiles import spki_der, spki_sha256
from tpmid.csr import ChannelBinding
from tpmid.errors import EstProtocolError
from tpmid.est import messages
from tpmid.est.csrattrs import oid_name
from tpmid.evidence import ID_AA_ATTESTATION
from tpmid.render import name as render_name
from tpmid.render import quoted_name
from tpmid.render import serial as render_serial
from tpmid.server import auth
from tpmid.server.attestation import AttestationVerdict, verify_csr_evidence
from tpmid.server.ca import (
    CertificateAuthority,
    IssueLog,
    alg_of,
    create_root_ca,
    generate_key,
)
from tpmid.server.config import (
    OPERATIONS,
    Faults,
    LabelConfig,
    ServerConfig,
    parse_csrattrs,
)
from tpmid.server.state import default_csrattrs
from tpmid.tpm.evidence import EvidenceRejected

log = logging.getLogger("tpmid.server")

WELL_KNOWN = "/.well-known/est"
TEXT = "text/plain; charset=utf-8"


@dataclass(frozen=True)
class Request:
    """One HTTP request as the app sees it. ``headers`` keys are lower-case."""

    method: str
    path: str
    headers: Mapping[str, str]
    body: bytes = b""
    peer_cert_der: bytes | None = None
    tls_version: str | None = None
    tls_unique: bytes | None = None
    # tls-unique (TLS 1.2) or tls-exporter (TLS 1.3): what attestation evidence is bound to.
    channel_binding: ChannelBinding | None = None


@dataclass
class Response:
    """One HTTP response plus what the access log line needs."""

    status: int
    body: bytes = b""
    headers: list[tuple[str, str]] = field(default_factory=list)
    label: str = "-"
    note: str = ""
    # How the transport sends it (fault knobs): one byte every ``trickle`` seconds;
    # ``reset``: half the body, then a TCP reset; ``drop``: nothing, the connection closed.
    trickle: float = 0.0
    reset: bool = False
    drop: bool = False

    @classmethod
    def text(cls, status: int, message: str, **kw: Any) -> Response:
        """A ``text/plain`` response; RFC 7030 §4.2.3 suggests a human-readable reason."""
        r = cls(status, (message + "\n").encode(), [("Content-Type", TEXT)], **kw)
        r.note = message
        return r


class _Reject(Exception):
    """Internal: stop processing with this response."""

    def __init__(self, response: Response) -> None:
        super().__init__(response.note)
        self.response = response


def _reject(status: int, message: str) -> _Reject:
    return _Reject(Response.text(status, message))


def _san_of(ext_holder: x509.Certificate | x509.CertificateSigningRequest
            ) -> x509.SubjectAlternativeName | None:
    try:
        ext = ext_holder.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return None
    return ext.value


def _san_set(san: x509.SubjectAlternativeName | None) -> frozenset[x509.GeneralName]:
    return frozenset(san) if san is not None else frozenset()


def verify_csr_signature(csr: x509.CertificateSigningRequest, allow_sha1: bool) -> None:
    """Check the CSR's self-signature (its proof of possession, RFC 2986 §3); raise ValueError.

    Done by hand rather than with ``is_signature_valid`` so that SHA-1 (the
    RFC 7030 Appendix A example) can be refused with a clear reason, or
    accepted when a label allows it.
    """
    alg = csr.signature_hash_algorithm
    if isinstance(alg, hashes.SHA1) and not allow_sha1:
        raise ValueError("the CSR is signed with SHA-1, which this label refuses "
                         "(set allow_sha1_csr: true to accept it)")
    key = csr.public_key()
    try:
        if isinstance(key, rsa.RSAPublicKey):
            assert alg is not None
            pad = csr.signature_algorithm_parameters
            key.verify(csr.signature, csr.tbs_certrequest_bytes,
                       pad if isinstance(pad, padding.PSS) else padding.PKCS1v15(), alg)
        elif isinstance(key, ec.EllipticCurvePublicKey):
            assert alg is not None
            key.verify(csr.signature, csr.tbs_certrequest_bytes, ec.ECDSA(alg))
        elif isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
            key.verify(csr.signature, csr.tbs_certrequest_bytes)
        else:
            raise ValueError(f"unsupported CSR key type {type(key).__name__}")
    except InvalidSignature:
        raise ValueError("the CSR signature does not verify with the CSR's public key "
                         "(no proof of possession)") from None
    except (UnsupportedAlgorithm, AssertionError, TypeError) as e:
        raise ValueError(f"the CSR signature algorithm is not supported ({e})") from None


def _key_description(key: Any) -> str:
    """``ecc-p384``, ``rsa-2048``... for the issue log."""
    if isinstance(key, ec.EllipticCurvePublicKey):
        return {"secp256r1": "ecc-p256", "secp384r1": "ecc-p384"}.get(key.curve.name,
                                                                      f"ecc-{key.curve.name}")
    if isinstance(key, rsa.RSAPublicKey):
        return f"rsa-{key.key_size}"
    return type(key).__name__


def _form(label: LabelConfig) -> messages.Base64Form:
    """The label's base64 layout for response bodies (``base64`` in the config)."""
    return cast(messages.Base64Form, label.base64)  # checked against BASE64_FORMS when parsed


def _check_key_strength(key: Any) -> None:
    if isinstance(key, rsa.RSAPublicKey) and key.key_size < 2048:
        raise ValueError(f"RSA-{key.key_size} is too weak; use 2048 bits or more")
    if isinstance(key, ec.EllipticCurvePublicKey) and key.curve.key_size < 256:
        raise ValueError(f"the curve {key.curve.name} is too weak; use P-256 or stronger")


class EstApp:
    """RFC 7030 request processing over a server directory's CAs and config.

    Thread-safe: the config is swapped atomically by :meth:`set_config`, and
    the pending and fault counters are guarded by a lock.
    """

    def __init__(self, config: ServerConfig, cas: dict[str, CertificateAuthority],
                 issue_log: IssueLog, *, sleep: Any = None) -> None:
        self._config = config
        self.cas = cas
        self.issue_log = issue_log
        self._lock = threading.Lock()
        self._pending: dict[tuple[str, str], int] = {}
        self._fault_hits: dict[str, int] = {}
        # Injected so a stopping server can cut a fault delay short.
        self._sleep = sleep or threading.Event().wait

    @property
    def config(self) -> ServerConfig:
        """The config in effect."""
        return self._config

    def set_config(self, config: ServerConfig,
                   cas: dict[str, CertificateAuthority] | None = None) -> None:
        """Switch to a new config (and CAs, after a rollover); counters start afresh."""
        with self._lock:
            self._config = config
            if cas is not None:
                self.cas = cas
            self._pending.clear()
            self._fault_hits.clear()

    # ------------------------------------------------------------------ entry point

    def handle(self, req: Request) -> Response:
        """Process one request; never raises for anything a client can send."""
        config = self._config
        path = req.path.split("?", 1)[0]
        if path != WELL_KNOWN and not path.startswith(WELL_KNOWN + "/"):
            return Response.text(404, f"not an EST path; EST lives under {WELL_KNOWN}/")
        segments = [s for s in path[len(WELL_KNOWN):].split("/") if s]
        if len(segments) == 1:
            label_name, operation = None, segments[0]
        elif len(segments) == 2:
            label_name, operation = segments
        else:
            return Response.text(404, f"expected {WELL_KNOWN}[/<label>]/<operation>")
        label = config.label(label_name)
        if label is None:
            if label_name is None:
                return Response.text(404, "this server has no default label; use "
                                     f"{WELL_KNOWN}/<label>/{operation}")
            return Response.text(404, f"unknown label {label_name!r} "
                                 f"(this server has: {', '.join(sorted(config.labels))})")
        if operation not in OPERATIONS:
            return self._tag(Response.text(404, f"unknown EST operation {operation!r}"), label)
        try:
            response = self._dispatch(req, label, operation)
        except _Reject as r:
            response = r.response
        except Exception:  # a server bug must not look like a protocol answer
            log.exception("internal error handling %s %s", req.method, path)
            response = Response.text(500, "internal server error (see the server log)")
        return self._tag(response, label)

    @staticmethod
    def _tag(response: Response, label: LabelConfig) -> Response:
        response.label = label.name
        return response

    # ------------------------------------------------------------------ dispatch

    def _dispatch(self, req: Request, label: LabelConfig, operation: str) -> Response:
        method = "GET" if operation in ("cacerts", "csrattrs") else "POST"
        if req.method != method:
            r = Response.text(405, f"{operation} takes {method}, not {req.method}")
            r.headers.append(("Allow", method))
            return r
        if operation == "serverkeygen" and not label.serverkeygen:
            return Response.text(404, f"serverkeygen is not offered at label {label.name!r}")
        faults = self._faults_for(label, operation)
        if faults.delay:
            self._sleep(faults.delay)
        if faults.drop:
            return Response(0, note="[fault: connection closed without an answer]", drop=True)
        if faults.status is not None:
            r = Response.text(faults.status, f"fault injected: status {faults.status}")
            if faults.retry_after_header is not None:
                r.headers.append(("Retry-After", faults.retry_after_header))
            elif faults.retry_after is not None:
                r.headers.append(("Retry-After", str(int(faults.retry_after))))
            return self._apply_transport_faults(r, faults)
        if operation == "cacerts":
            response = self._cacerts(label)
        elif operation == "csrattrs":
            response = self._csrattrs(label)
        else:
            response = self._enroll(req, label, operation, faults)
        return self._apply_transport_faults(self._apply_body_faults(response, faults), faults)

    def _faults_for(self, label: LabelConfig, operation: str) -> Faults:
        f = label.faults
        if not f.active or operation not in f.operations:
            return Faults()
        if f.times:
            with self._lock:
                hits = self._fault_hits.get(label.name, 0)
                if hits >= f.times:
                    return Faults()
                self._fault_hits[label.name] = hits + 1
        return f

    @staticmethod
    def _apply_transport_faults(response: Response, faults: Faults) -> Response:
        if faults.oversize > len(response.body):
            response.body += b" " * (faults.oversize - len(response.body))
            response.note += f" [fault: padded to {faults.oversize} bytes]"
        if faults.trickle:
            response.trickle = faults.trickle
            response.note += f" [fault: one byte every {faults.trickle:g} s]"
        if faults.reset:
            response.reset = True
            response.note += " [fault: connection reset mid-answer]"
        return response

    @staticmethod
    def _apply_body_faults(response: Response, faults: Faults) -> Response:
        if response.status != 200:
            return response
        if faults.malformed_body:
            response.body = b"this is not what RFC 7030 promised\n"
            response.note += " [fault: malformed body]"
        if faults.wrong_content_type:
            response.headers = [(k, TEXT if k == "Content-Type" else v)
                                for k, v in response.headers]
            response.note += " [fault: wrong content type]"
        return response

    # ------------------------------------------------------------------ GET operations

    def _cacerts(self, label: LabelConfig) -> Response:
        # RFC 7030 §4.1.3: certs-only, the CA certificate(s) of this label; after a
        # rollover also the Root CA Key Update certificates OldWithOld, OldWithNew and
        # NewWithOld (tpmid.server.rollover).
        ca = self.cas[label.ca]
        note = f"{label.ca} CA" + (" + key-update certificates" if ca.links else "")
        return Response(200, messages.encode_certs_only([ca.cert, *ca.links], _form(label)), [
            ("Content-Type", messages.CERTS_ONLY_CONTENT_TYPE),
            ("Content-Transfer-Encoding", "base64"),
        ], note=note)

    def _csrattrs(self, label: LabelConfig) -> Response:
        items = label.csrattrs
        if items is None:
            items = parse_csrattrs(default_csrattrs(self.cas[label.ca].alg), "csrattrs", "default")
        if label.pop:
            # RFC 7030 §3.5 / §4.5.2: ask for challengePassword when PoP linking is required.
            challenge = messages.CsrAttr(AttributeOID.CHALLENGE_PASSWORD)
            if challenge not in items:
                items = (challenge, *items)
        if label.attestation == "require":
            # draft-ietf-lamps-csr-attestation: the CSR must carry id-aa-attestation.
            evidence = messages.CsrAttr(x509.ObjectIdentifier(ID_AA_ATTESTATION))
            if evidence not in items:
                items = (*items, evidence)
        if not items:
            # RFC 7030 §4.5.2: 204 means no CSR attributes are available.
            return Response(204, note="no attributes")
        return Response(200, messages.encode_csrattrs(items, _form(label)), [
            ("Content-Type", messages.CSRATTRS),
            ("Content-Transfer-Encoding", "base64"),
        ], note=f"{len(items)} attributes")

    # ------------------------------------------------------------------ enrollment

    def _enroll(self, req: Request, label: LabelConfig, operation: str,
                faults: Faults) -> Response:
        client_cert = self._peer_cert(req)
        verdict = auth.check(label.auth, label=label.name, headers=dict(req.headers),
                             client_cert=client_cert, cas=self.cas)
        if not verdict.ok:
            r = Response.text(verdict.status, verdict.reason)
            if verdict.challenge:
                r.headers.append(("WWW-Authenticate", verdict.challenge))
            return r
        if not messages.media_type_matches(req.headers.get("content-type"), messages.PKCS10):
            return Response.text(415, f"{operation} expects Content-Type {messages.PKCS10}, "
                                 f"got {req.headers.get('content-type')!r}")
        csr = self._parse_csr(req.body, label)
        if label.pop:
            self._check_pop(req, csr)
        attestation = self._check_attestation(req, label, csr)
        ca = self.cas[label.ca]
        subject, san = csr.subject, _san_of(csr)

        if operation == "simplereenroll":
            self._check_reenroll(csr, client_cert, ca, label)
        elif (operation == "simpleenroll" and label.reenroll_forcing and client_cert is not None
              and ca.issued(client_cert)):
            # GlobalSign IoT Edge Enroll's default: a request made with a
            # certificate this CA issued is "upgraded" to a re-enrollment and
            # gets that certificate's names, whatever the CSR says.
            subject, san = client_cert.subject, _san_of(client_cert)
        # Whatever the operation: the name about to be issued must be the
        # requester's to ask for (fault knobs rewrite the subject only later).
        refusal = label.subject_policy.refusal(subject, client_cert)
        if refusal is not None:
            raise _reject(403, refusal)
        if len(subject) == 0 and not san:
            raise _reject(400, "the CSR has neither a subject nor a subjectAltName")

        pending = self._pending_response(label, csr)
        if pending is not None:
            return pending

        key_der: bytes | None = None
        public_key = csr.public_key()
        if operation == "serverkeygen":
            # RFC 7030 §4.4.1: the server ignores the CSR's key and generates one.
            new_key = generate_key(label.serverkeygen_alg or alg_of(ca.key))
            public_key = new_key.public_key()
            key_der = new_key.private_bytes(serialization.Encoding.DER,
                                            serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption())
        if faults.wrong_key:
            public_key = generate_key(alg_of(ca.key)).public_key()
        issuer, when = ca, None
        if faults.foreign_issuer:
            issuer = create_root_ca("foreign", "a CA nobody trusts", alg_of(ca.key), 86400,
                                    path_length=None)
            issuer.clock = ca.clock
        if faults.expired:
            when = ca.now() - timedelta(seconds=label.lifetime + 3600)
        if faults.subject is not None:
            subject = x509.Name.from_rfc4514_string(faults.subject)
        policies = ((label.attestation_policy_oid,) if label.attestation_policy_oid
                    and attestation is not None and attestation.result == "proven" else ())
        try:
            cert = issuer.issue(public_key=public_key,
                                subject=subject, san=san, profile=label.profile,
                                lifetime=label.lifetime, now=when, policies=policies)
        except (ValueError, TypeError) as e:
            raise _reject(400, f"cannot issue a certificate for this CSR: {e}") from None
        self._record(label, operation, cert, verdict.principal, csr, attestation)
        note = f"issued serial={render_serial(cert.serial_number)} subject={render_name(cert.subject)}"
        if faults.wrong_key:
            note += " [fault: wrong key]"
        if key_der is not None:
            body, content_type = messages.encode_serverkeygen(key_der, [cert], _form(label))
            return Response(200, body, [("Content-Type", content_type)], note=note)
        # RFC 7030 §4.2.3: certs-only with only the issued certificate.
        return Response(200, messages.encode_certs_only([cert], _form(label)), [
            ("Content-Type", messages.CERTS_ONLY_CONTENT_TYPE),
            ("Content-Transfer-Encoding", "base64"),
        ], note=note)

    @staticmethod
    def _peer_cert(req: Request) -> x509.Certificate | None:
        if not req.peer_cert_der:
            return None
        try:
            return x509.load_der_x509_certificate(req.peer_cert_der)
        except ValueError:
            return None

    def _parse_csr(self, body: bytes, label: LabelConfig) -> x509.CertificateSigningRequest:
        if not body.strip():
            raise _reject(400, "the request body is empty; expected a PKCS#10 CSR")
        if (label.libest_quirks and b"-----BEGIN" not in body
                and b"\n" not in body.strip() and not body.endswith(b"\n")):
            # libest decodes with a BIO_f_base64 that needs a newline; a single
            # base64 line without one decodes to nothing and the CSR is "invalid".
            raise _reject(400, "libest quirk: a single-line base64 body needs a trailing newline")
        try:
            csr = messages.decode_csr(body)
        except EstProtocolError as e:
            raise _reject(400, f"malformed CSR: {e.message}") from None
        try:
            verify_csr_signature(csr, label.allow_sha1_csr)
            _check_key_strength(csr.public_key())
        except (ValueError, UnsupportedAlgorithm) as e:
            raise _reject(400, f"CSR rejected: {e}") from None
        try:
            # Parsed lazily by cryptography; force it now so a broken extension
            # request is a 400 here, not an error deep in issuance.
            _ = csr.extensions, list(csr.attributes)
        except ValueError as e:
            raise _reject(400, f"CSR rejected: its extensions or attributes do not parse ({e})"
                          ) from None
        return csr

    def _check_pop(self, req: Request, csr: x509.CertificateSigningRequest) -> None:
        # RFC 7030 §3.5: the CSR's challengePassword carries base64(tls-unique)
        # of this TLS session, linking the request to the authenticated channel.
        if req.tls_version != "TLSv1.2" or req.tls_unique is None:
            raise _reject(400, "proof-of-possession linking needs tls-unique, which exists only "
                          f"in TLS 1.2 (RFC 7030 §3.5); this connection uses {req.tls_version}")
        try:
            attr = csr.attributes.get_attribute_for_oid(AttributeOID.CHALLENGE_PASSWORD)
        except x509.AttributeNotFound:
            raise _reject(400, "proof-of-possession required: the CSR has no challengePassword "
                          "with the tls-unique value (RFC 7030 §3.5)") from None
        expected = base64.b64encode(req.tls_unique)
        if attr.value.strip() != expected:
            raise _reject(400, "proof-of-possession failed: the challengePassword is not the "
                          "tls-unique value of this TLS session (RFC 7030 §3.5)")

    def _check_attestation(self, req: Request, label: LabelConfig,
                           csr: x509.CertificateSigningRequest) -> AttestationVerdict | None:
        """docs/attestation.md: check the CSR's evidence as the label asks; refuse naming why."""
        if label.attestation == "off":
            return None
        anchors = [self.cas[label.attestation_ca].cert]
        try:
            verdict = verify_csr_evidence(
                csr.public_bytes(serialization.Encoding.DER), spki_der(csr.public_key()),
                anchors=anchors, binding=req.channel_binding, now=self.cas[label.ca].now())
        except EvidenceRejected as e:
            raise _reject(403, f"attestation refused ({e.check}): {e.message}") from None
        if verdict.result == "absent" and label.attestation == "require":
            raise _reject(403, "attestation refused (missing): this label requires TPM key "
                          "attestation evidence in the CSR (attribute id-aa-attestation "
                          f"{ID_AA_ATTESTATION}, draft-ietf-lamps-csr-attestation)")
        return verdict

    def _check_reenroll(self, csr: x509.CertificateSigningRequest,
                        client_cert: x509.Certificate | None, ca: CertificateAuthority,
                        label: LabelConfig) -> None:
        # RFC 7030 §4.2.2: the certificate being renewed is the TLS client
        # certificate; subject and subjectAltName must be identical to it.
        if client_cert is None:
            r = Response.text(401, "simplereenroll needs the certificate being renewed as the "
                              "TLS client certificate; none was presented")
            raise _Reject(r)
        if not ca.issued(client_cert):
            raise _reject(403, f"the TLS client certificate was not issued by the {label.ca} CA "
                          f"of label {label.name!r}, so it cannot be renewed here")
        if csr.subject != client_cert.subject:
            raise _reject(400, "simplereenroll: the CSR subject "
                          f"{quoted_name(csr.subject)} differs from the certificate being "
                          f"renewed ({quoted_name(client_cert.subject)}); RFC 7030 §4.2.2")
        if _san_set(_san_of(csr)) != _san_set(_san_of(client_cert)):
            raise _reject(400, "simplereenroll: the CSR subjectAltName differs from the "
                          "certificate being renewed; RFC 7030 §4.2.2")

    def _pending_response(self, label: LabelConfig,
                          csr: x509.CertificateSigningRequest) -> Response | None:
        if label.pending <= 0:
            return None
        key = (label.name, spki_sha256(csr.public_key()))
        with self._lock:
            seen = self._pending.get(key, 0)
            if seen >= label.pending:
                return None
            self._pending[key] = seen + 1
        # RFC 7030 §4.2.3: 202 Accepted with Retry-After; the client resends later.
        r = Response.text(202, f"request accepted, certificate pending ({seen + 1}/"
                          f"{label.pending}); retry after {int(label.retry_after)} s")
        r.headers.append(("Retry-After", str(int(label.retry_after))))
        return r

    def _record(self, label: LabelConfig, operation: str, cert: x509.Certificate,
                principal: str, csr: x509.CertificateSigningRequest,
                attestation: AttestationVerdict | None = None) -> None:
        oid = csr.signature_algorithm_oid
        entry: dict[str, Any] = {
            "time": format_datetime(datetime.now(UTC), usegmt=True),
            "label": label.name,
            "operation": operation,
            "profile": label.profile,
            "ca": label.ca,
            "serial": f"{render_serial(cert.serial_number)}",
            "subject": render_name(cert.subject),
            "not_before": cert.not_valid_before_utc.isoformat(),
            "not_after": cert.not_valid_after_utc.isoformat(),
            "sha256": cert.fingerprint(hashes.SHA256()).hex(),
            "authenticated_as": principal,
            # What the client made its request with (CSR attributes ask for these).
            "csr_signature": oid_name(oid.dotted_string) or oid.dotted_string,
            "key": _key_description(cert.public_key()),
        }
        if attestation is not None:
            entry["attestation"] = attestation.log_entry()
        self.issue_log.append(entry)


__all__ = ["EstApp", "Request", "Response", "verify_csr_signature"]
