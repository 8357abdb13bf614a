"""CA rollover on the reference server: RFC 7030 §4.1.3 Root CA Key Update.

``tpmid est-server rollover LABEL`` replaces the CA of a label (and of every label
that uses the same CA) with a new one and keeps the two linked for an overlap:

* a new root (NewWithNew) with a fresh key of the same algorithm and a new name
  (the CA's title with a generation, ``... G2``), which issues from now on;
* the three Root CA Key Update certificates of RFC 7030 §4.1.3 (RFC 4210 §4.4):
  OldWithOld (the old root itself), OldWithNew (the old name and key, signed by the
  new key) and NewWithOld (the new name and key, signed by the old key), served by
  ``/cacerts`` next to the new root: a client that trusts the old root validates
  NewWithOld with it and so comes to trust the new root's name and key;
* during the overlap the server keeps accepting TLS client certificates the old CA
  issued (so devices renew with the certificate they have), and a TLS server
  certificate that the rolled CA issued is re-issued by the new CA and served with
  NewWithOld behind it, so it keeps chaining to the old root clients trust.

``rollover LABEL --finish`` ends the overlap: client certificates of the old CA are
refused (their TLS handshake fails with "unknown CA"); the key-update certificates
are still served, so a device that missed the overlap can validate the new root
after it enrolled again through its bootstrap identity. ``rollover LABEL --replace``
replaces the CA outright, without key-update certificates and without overlap (what
losing the old key forces): devices must be given the new root by their operator.

Layout, per CA name (``operator``, ``manufacturer``, ``tls``)::

    DIR/<name>-ca.pem                  the current root (NewWithNew)
    DIR/private/<name>-ca.key          its key (the old key is not kept)
    DIR/rollover/<name>/state.json     generation, overlap
    DIR/rollover/<name>/oldwithold.pem, oldwithnew.pem, newwithold.pem

Every write goes through :func:`tpmid.store.fsio.atomic_write`. The running server
picks the change up on reload (SIGHUP; the command sends it through
:func:`tpmid.server.lab.change_and_reload`). The files are written one after the
other, not as one transaction: a crash in the middle of a rollover can leave a key
that does not match its certificate, which the server refuses to load.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificateIssuerPrivateKeyTypes,
    CertificatePublicKeyTypes,
)
from cryptography.x509.oid import NameOID

from tpmid.errors import ConfigError
from tpmid.server.ca import (
    CertificateAuthority,
    cert_pem,
    create_root_ca,
    fingerprint,
    key_pem,
    load_ca,
    loopback_san,
    random_serial,
    signature_hash,
)
from tpmid.server.config import load_server_config
from tpmid.store.fsio import atomic_write, make_dir

CA_NAMES = ("manufacturer", "operator", "tls")
LINKS = ("oldwithold", "oldwithnew", "newwithold")


@dataclass(frozen=True)
class RolloverState:
    """What ``DIR/rollover/<name>/`` says about one CA."""

    generation: int = 1
    overlap: bool = False  # client certificates of the old CA are still accepted
    old: x509.Certificate | None = None  # OldWithOld
    links: tuple[x509.Certificate, ...] = ()  # OldWithOld, OldWithNew, NewWithOld

    @property
    def accepted_old(self) -> tuple[x509.Certificate, ...]:
        """The old root, while client certificates it issued are accepted."""
        return (self.old,) if self.overlap and self.old is not None else ()


@dataclass(frozen=True)
class RolloverResult:
    """What :func:`rollover_ca` did (for the command's output)."""

    ca: str
    generation: int
    old: x509.Certificate
    new: x509.Certificate
    links: tuple[x509.Certificate, ...]
    labels: tuple[str, ...]
    tls_reissued: bool = False
    fingerprints: dict[str, str] = field(default_factory=dict)


def _dir(root: Path, ca: str) -> Path:
    return root / "rollover" / ca


def load_rollover_state(root: Path, ca: str) -> RolloverState:
    """The rollover state of CA ``ca`` in server directory ``root`` (generation 1: none)."""
    d = _dir(root, ca)
    try:
        data = json.loads((d / "state.json").read_text())
    except FileNotFoundError:
        return RolloverState()
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read the rollover state {d / 'state.json'}: {e}") from e
    links: list[x509.Certificate] = []
    old = None
    for name in LINKS:
        path = d / f"{name}.pem"
        if path.exists():
            try:
                cert = x509.load_pem_x509_certificate(path.read_bytes())
            except (OSError, ValueError) as e:
                raise ConfigError(f"cannot read the key-update certificate {path}: {e}") from e
            links.append(cert)
            if name == "oldwithold":
                old = cert
    return RolloverState(generation=int(data.get("generation", 1)),
                         overlap=bool(data.get("overlap", False)), old=old, links=tuple(links))


def _read_cert(path: Path) -> x509.Certificate | None:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError):
        return None


def _title(cert: x509.Certificate) -> str:
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    title = str(cns[0].value) if cns else "tpmid CA"
    words = title.split()
    if len(words) > 1 and words[-1].startswith("G") and words[-1][1:].isdigit():
        title = " ".join(words[:-1])
    return title


def _link(subject: x509.Name, public_key: CertificatePublicKeyTypes, issuer: x509.Certificate,
          issuer_key: CertificateIssuerPrivateKeyTypes, now: datetime,
          not_after: datetime) -> x509.Certificate:
    """A key-update certificate: ``subject``'s key certified by ``issuer`` (RFC 4210 §4.4)."""
    return (x509.CertificateBuilder()
            .subject_name(subject).issuer_name(issuer.subject).public_key(public_key)
            .serial_number(random_serial())
            .not_valid_before(now).not_valid_after(min(not_after, issuer.not_valid_after_utc))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, key_cert_sign=True, crl_sign=True,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                issuer_key.public_key()), critical=False)
            .sign(issuer_key, signature_hash(issuer_key)))


def ca_of(root: Path, name_or_label: str) -> tuple[str, tuple[str, ...]]:
    """The CA name behind a label (or a CA name itself), and the labels that use it."""
    config = load_server_config(root / "config.yaml")
    if name_or_label in config.labels:
        ca = config.labels[name_or_label].ca
    elif name_or_label in CA_NAMES:
        ca = name_or_label
    else:
        raise ConfigError(
            f"{name_or_label!r} is neither a label of this server "
            f"({', '.join(sorted(config.labels))}) nor a CA name ({', '.join(CA_NAMES)})",
            hint=f"name the label whose CA rolls over, e.g. tpmid est-server rollover ldevid "
            f"--dir {root}")
    return ca, tuple(sorted(n for n, lab in config.labels.items() if lab.ca == ca))


def _tls_label(root: Path) -> str:
    """The first label whose CA issued the server's TLS certificate (init --tls-from)."""
    leaf = _read_cert(root / "tls" / "server.pem")
    config = load_server_config(root / "config.yaml")
    for name, label in sorted(config.labels.items()):
        ca = _read_cert(root / f"{label.ca}-ca.pem")
        if leaf is not None and ca is not None and leaf.issuer == ca.subject:
            return name
    return "ldevid"


def rollover_ca(root: Path, name_or_label: str, *, replace: bool = False,
                now: datetime | None = None) -> RolloverResult:
    """Replace the CA behind ``name_or_label`` with a new one (see the module docstring)."""
    root = root.resolve()
    ca_name, labels = ca_of(root, name_or_label)
    now = (now or datetime.now(UTC)).replace(microsecond=0)
    cert_path, key_path = root / f"{ca_name}-ca.pem", root / "private" / f"{ca_name}-ca.key"
    if ca_name == "tls" and not key_path.exists():
        label = _tls_label(root)
        raise ConfigError(
            f"this server has no TLS CA of its own ({key_path} does not exist): its TLS "
            f"certificate comes from the CA of label {label} (est-server init --tls-from)",
            hint=f"roll that label over: tpmid est-server rollover {label} --dir {root} (the "
            "TLS certificate follows its CA)")
    old = load_ca(ca_name, cert_path, key_path)
    state = load_rollover_state(root, ca_name)
    generation = state.generation + 1
    lifetime = (old.cert.not_valid_after_utc - old.cert.not_valid_before_utc).total_seconds()
    bc = old.cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    new = create_root_ca(ca_name, f"{_title(old.cert)} G{generation}", old.alg, lifetime,
                         path_length=bc.path_length)
    links: tuple[x509.Certificate, ...] = ()
    if not replace:
        old_with_new = _link(old.cert.subject, old.cert.public_key(), new.cert, new.key, now,
                             old.cert.not_valid_after_utc)
        new_with_old = _link(new.cert.subject, new.cert.public_key(), old.cert, old.key, now,
                             new.cert.not_valid_after_utc)
        links = (old.cert, old_with_new, new_with_old)
    tls_reissued = _reissue_tls_certificate(root, old, new, links[2] if links else None, now)

    d = _dir(root, ca_name)
    make_dir(d.parent, 0o755)
    make_dir(d, 0o755)
    for name in LINKS:
        (d / f"{name}.pem").unlink(missing_ok=True)
    for name, cert in zip(LINKS, links, strict=False):
        atomic_write(d / f"{name}.pem", cert_pem(cert), 0o644)
    atomic_write(key_path, key_pem(new.key), 0o600)
    atomic_write(cert_path, cert_pem(new.cert), 0o644)
    tls_copy = root / "tls-ca.pem"
    if ca_name != "tls" and _read_cert(tls_copy) == old.cert:
        # init --tls-from: tls-ca.pem is a copy of this CA's root. Clients given it from
        # now on get the new root; those holding the old one chain through NewWithOld.
        atomic_write(tls_copy, cert_pem(new.cert), 0o644)
    atomic_write(d / "state.json", (json.dumps(
        {"generation": generation, "overlap": not replace, "replaced_at": now.isoformat(),
         "replace": replace}, indent=1) + "\n").encode(), 0o644)
    return RolloverResult(
        ca=ca_name, generation=generation, old=old.cert, new=new.cert, links=links,
        labels=labels, tls_reissued=tls_reissued,
        fingerprints={"old": fingerprint(old.cert), "new": fingerprint(new.cert),
                      **({"newwithold": fingerprint(links[2])} if links else {})})


def finish_overlap(root: Path, name_or_label: str) -> tuple[str, RolloverState]:
    """End the overlap: the old CA's client certificates are refused from now on."""
    root = root.resolve()
    ca_name, _ = ca_of(root, name_or_label)
    state = load_rollover_state(root, ca_name)
    if state.generation == 1:
        raise ConfigError(f"the {ca_name} CA was never rolled over, so there is no overlap to end",
                          hint=f"tpmid est-server rollover {name_or_label} --dir {root} starts one")
    d = _dir(root, ca_name)
    data = json.loads((d / "state.json").read_text())
    data["overlap"] = False
    atomic_write(d / "state.json", (json.dumps(data, indent=1) + "\n").encode(), 0o644)
    return ca_name, load_rollover_state(root, ca_name)


def _reissue_tls_certificate(root: Path, old: CertificateAuthority, new: CertificateAuthority,
                             new_with_old: x509.Certificate | None, now: datetime) -> bool:
    """A TLS server certificate of the rolled CA: re-issued by the new CA, NewWithOld behind it.

    Clients that trust the old root then build server -> NewWithOld -> old root; clients
    that trust the new root find it by name and key. Returns whether it was re-issued.
    """
    path = root / "tls" / "server.pem"
    chain = x509.load_pem_x509_certificates(path.read_bytes())
    leaf = chain[0]
    if leaf.issuer != old.cert.subject:
        return False
    try:
        leaf.verify_directly_issued_by(old.cert)
    except Exception:  # InvalidSignature, ValueError, TypeError: not this CA's
        return False
    key = serialization.load_pem_private_key((root / "private" / "server.key").read_bytes(),
                                             None)
    lifetime = (leaf.not_valid_after_utc - leaf.not_valid_before_utc).total_seconds()
    fresh = new.issue(public_key=key.public_key(), subject=leaf.subject,  # type: ignore[arg-type]
                      profile="tls-server", lifetime=lifetime, san=loopback_san(), now=now)
    served = [fresh, *([new_with_old] if new_with_old is not None else [])]
    atomic_write(path, b"".join(cert_pem(c) for c in served), 0o644)
    return True
