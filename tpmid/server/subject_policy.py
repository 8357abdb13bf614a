"""Which subjects a label may issue to the client asking (a label's ``subject_policy``).

RFC 7030 §4.2.2 binds a *re*-enrollment to the certificate being renewed, but
nothing in RFC 7030 binds an enrollment: without a policy, any client a label
accepts may ask for any name, another device's included. A policy judges the
subject about to be issued against the authenticated TLS client certificate,
before anything is issued; ``simpleenroll``, ``simplereenroll`` and
``serverkeygen`` are judged alike.

* :class:`AnySubject` (``any``) — no binding: whoever passes the label's auth may
  name any subject (manufacturing, where the factory names the device).
* :class:`ClientSerialSubject` (``client-serial``) — every serialNumber attribute
  (X.520, OID 2.5.4.5) of the subject must equal the serialNumber of the TLS
  client certificate, and there must be at least one. The comparison is exact:
  case, spaces and all (the ASN.1 string type is not compared). The serialNumber
  is the device's identity here; CN and subjectAltName are not constrained
  beyond what ``simplereenroll`` already requires.

Pure: no I/O. The choice of policy is made once, from the config
(:mod:`tpmid.server.config`); the app only calls :meth:`SubjectPolicy.refusal`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

from cryptography import x509
from cryptography.x509.oid import NameOID

from tpmid.render import name as render_name

SUBJECT_POLICIES: tuple[str, ...] = ("any", "client-serial")
_SHOWN_MAX = 64  # X.520 ub-serial-number; longer client-supplied values are cut in messages


class SubjectPolicy(Protocol):
    """Decides whether a subject may be issued to the client presenting ``client_cert``."""

    @property
    def kind(self) -> str:
        """The config value that selects this policy."""
        ...

    def refusal(self, subject: x509.Name, client_cert: x509.Certificate | None) -> str | None:
        """None if ``subject`` may be issued; otherwise why not, in one line."""
        ...


@dataclass(frozen=True)
class AnySubject:
    """``any``: every subject is allowed (the label's auth is the only check)."""

    kind: Literal["any"] = "any"

    def refusal(self, subject: x509.Name, client_cert: x509.Certificate | None) -> str | None:
        """Never refuses."""
        return None


@dataclass(frozen=True)
class ClientSerialSubject:
    """``client-serial``: the subject's serialNumber must be the client certificate's."""

    kind: Literal["client-serial"] = "client-serial"

    def refusal(self, subject: x509.Name, client_cert: x509.Certificate | None) -> str | None:
        """Why ``subject`` is not the client's to ask for, or None if it is."""
        why = f"(subject_policy {self.kind})"
        if client_cert is None:
            return ("no TLS client certificate was presented, so no subject can be bound to "
                    f"the requesting device {why}")
        mine = set(serial_numbers(client_cert.subject))
        if len(mine) != 1:
            has = "has no serialNumber" if not mine else "has several different serialNumbers"
            return (f"the TLS client certificate {_shown(render_name(client_cert.subject))} "
                    f"{has}, so no subject can be bound to it {why}")
        (own,) = mine
        asked = serial_numbers(subject)
        if not asked:
            return (f"the subject {_shown(render_name(subject))} has no serialNumber; it "
                    f"must carry the requesting client's ({_shown(own)}) {why}")
        for value in asked:
            if value != own:
                return (f"subject serialNumber {_shown(value)} is not the requesting client's "
                        f"({_shown(own)}) {why}")
        return None


def serial_numbers(name: x509.Name) -> list[str]:
    """The values of every serialNumber attribute of ``name``, in order (any RDN)."""
    return [a.value if isinstance(a.value, str) else a.value.hex()
            for a in name.get_attributes_for_oid(NameOID.SERIAL_NUMBER)]


def _shown(text: str) -> str:
    """A client-supplied value for a message: quoted, escaped and cut to a sane length."""
    if len(text) > _SHOWN_MAX:
        return repr(text[:_SHOWN_MAX]) + "..."
    return repr(text)
