"""The provisioning manifest: one JSON object per device and run, in a JSON Lines file.

A manufacturing station appends one :class:`ProvisionRecord` per ``tpmid
provision`` run to a shared file that the factory's systems ingest. The format
is documented field by field in ``docs/manufacturing.md``; ``schema`` is bumped
whenever a field changes meaning.

:func:`append_record` writes through the durable writer
(:func:`tpmid.store.fsio.append_line`). Many devices may append to one file at the
same time (a station share), so a record is written as a single ``write(2)`` on an
``O_APPEND`` descriptor under an exclusive ``flock(2)`` and then ``fsync``ed: lines
never interleave and a record that was reported as written survives a power loss.

No secret ever goes into a record: records are built from names, fingerprints
and error messages, and tpmid's error messages never contain credential values.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from tpmid.errors import StoreError
from tpmid.store.fsio import append_line

SCHEMA = 1
Outcome = Literal["provisioned", "already-provisioned", "adopted", "fail"]
OUTCOMES: tuple[str, ...] = ("provisioned", "already-provisioned", "adopted", "fail")
MANIFEST_MODE = 0o644  # fingerprints and names only: readable by the station's collectors


@dataclass(frozen=True)
class EkCertificate:
    """One EK certificate the TPM holds: where it is and its SHA-256 fingerprint."""

    template: str  # EK Credential Profile template, "L-1", "H-3", ...
    alg: str
    nv_index: str  # "0x01c00002"
    sha256: str  # lower-case hex of the DER certificate


@dataclass(frozen=True)
class ProvisionRecord:
    """The result of provisioning one device (one manifest line).

    Fingerprints are lower-case hex SHA-256 without separators: of the DER
    SubjectPublicKeyInfo for keys, of the DER certificate for certificates.
    ``exit_code`` is the process exit code ``tpmid provision`` returns for
    this record (0 unless ``outcome`` is ``fail``).
    """

    time: str  # ISO 8601 UTC, start of the run
    station: str
    tpmid_version: str
    identity: str
    outcome: Outcome
    device_serial: str | None = None
    ek_fingerprint: str | None = None  # SHA-256 of the primary EK's public key
    ek_certificates: tuple[EkCertificate, ...] = ()
    idevid_kind: str | None = None  # "persistent" | "ek-derived"
    idevid_handle: str | None = None  # "0x81020000" for persistent keys
    idevid_template: str | None = None  # "H-1" | "H-2" | "H-3"
    idevid_key_sha256: str | None = None
    idevid_key_action: str | None = None  # created | kept | derived | removed-after-failure ...
    idevid_cert_sha256: str | None = None
    idevid_cert_serial: str | None = None  # lower-case hex
    idevid_cert_issuer: str | None = None  # RFC 4514
    idevid_cert_subject: str | None = None  # RFC 4514
    idevid_cert_not_after: str | None = None  # ISO 8601 UTC
    nv_index: str | None = None  # where the certificate is kept in the TPM, if anywhere
    failed_step: str | None = None
    error_code: str | None = None  # the tpmid error class, e.g. "EstAuthError"
    error: str | None = None  # its message (never a secret)
    hint: str | None = None
    exit_code: int = 0
    duration_s: float = 0.0
    schema: int = field(default=SCHEMA)

    @property
    def ok(self) -> bool:
        """True unless the device failed."""
        return self.outcome != "fail"

    @property
    def result(self) -> str:
        """``PASS`` or ``FAIL``: what the person at the station needs to know."""
        return "PASS" if self.ok else "FAIL"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly dict, with the derived ``result`` field."""
        d = asdict(self)
        d["ek_certificates"] = [asdict(c) for c in self.ek_certificates]
        d["result"] = self.result
        return d

    def to_json(self) -> str:
        """The record as one line of JSON (no newline inside, keys sorted)."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_dict(cls, d: object) -> ProvisionRecord:
        """Parse and type-check a record; ValueError naming the first problem."""
        if not isinstance(d, dict):
            raise ValueError("a manifest record is a JSON object")
        d = dict(d)
        result = d.pop("result", None)
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise ValueError(f"unknown field(s) {', '.join(unknown)}")
        for name in ("time", "station", "tpmid_version", "identity", "outcome"):
            if not isinstance(d.get(name), str) or not d[name]:
                raise ValueError(f"field {name!r} must be a non-empty string")
        try:
            datetime.fromisoformat(d["time"])
        except ValueError:
            raise ValueError(f"time {d['time']!r} is not an ISO 8601 timestamp") from None
        if d["outcome"] not in OUTCOMES:
            raise ValueError(f"outcome {d['outcome']!r} is not one of {', '.join(OUTCOMES)}")
        for name, f in known.items():
            if name in d and f.type == "str | None" and d[name] is not None \
                    and not isinstance(d[name], str):
                raise ValueError(f"field {name!r} must be a string or null")
        if not isinstance(d.get("exit_code", 0), int) or isinstance(d.get("exit_code"), bool):
            raise ValueError("field 'exit_code' must be an integer")
        if not isinstance(d.get("duration_s", 0.0), int | float):
            raise ValueError("field 'duration_s' must be a number")
        if d.get("schema", SCHEMA) != SCHEMA:
            raise ValueError(f"schema {d.get('schema')!r} is not {SCHEMA}")
        certs = d.get("ek_certificates", [])
        if not isinstance(certs, list):
            raise ValueError("field 'ek_certificates' must be a list")
        try:
            d["ek_certificates"] = tuple(EkCertificate(**c) for c in certs)
        except TypeError as e:
            raise ValueError(f"bad ek_certificates entry: {e}") from e
        rec = cls(**d)
        if (d["outcome"] == "fail") != (rec.exit_code != 0):
            raise ValueError("exit_code must be non-zero exactly when outcome is 'fail'")
        if result is not None and result != rec.result:
            raise ValueError(f"result {result!r} contradicts outcome {rec.outcome!r}")
        return rec

    @classmethod
    def from_json(cls, line: str) -> ProvisionRecord:
        """Parse one manifest line (see :meth:`from_dict`)."""
        try:
            data = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"not JSON: {e}") from e
        return cls.from_dict(data)


def open_manifest(path: Path) -> int:
    """Open (creating, 0644) the manifest for appending; return the descriptor.

    Called before a device is touched so that an unwritable manifest stops the
    run before there is anything to record.
    """
    try:
        return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                       MANIFEST_MODE)
    except FileNotFoundError:
        raise StoreError(f"cannot open the manifest {path}: its directory does not exist",
                         hint="mount the station share or create the directory") from None
    except OSError as e:
        raise StoreError(f"cannot open the manifest {path}: {e.strerror}",
                         hint="check the path given with --manifest and its permissions") from e


def append_record(path: Path, record: ProvisionRecord, fd: int | None = None) -> None:
    """Append ``record`` as one line to the manifest at ``path``, durably.

    :func:`tpmid.store.fsio.append_line`: one ``write(2)`` of the whole line on an
    ``O_APPEND`` descriptor under an exclusive ``flock(2)``, then ``fsync``, so
    concurrent appenders (other devices on the same share) never interleave and
    never overwrite each other. ``fd`` is a descriptor from :func:`open_manifest`
    (closed here); without it the file is opened now.
    """
    data = (record.to_json() + "\n").encode("utf-8")
    if fd is None:
        fd = open_manifest(path)
    try:
        append_line(fd, data, Path(path))
    except StoreError as e:
        raise StoreError(f"the manifest: {e.message}",
                         hint=e.hint or "check the path given with --manifest") from e
    finally:
        os.close(fd)


def read_manifest(path: Path) -> list[ProvisionRecord]:
    """Every record of the manifest at ``path``; StoreError naming the first bad line."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise StoreError(f"cannot read the manifest {path}: {e.strerror}") from e
    out: list[ProvisionRecord] = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append(ProvisionRecord.from_json(line))
        except ValueError as e:
            raise StoreError(f"{path} line {n} is not a valid provisioning record: {e}") from e
    return out
