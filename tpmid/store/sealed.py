"""Sealed secrets on disk: ``<store>/sealed/NAME.json``, one file per secret.

A file holds what :mod:`tpmid.tpm.sealed` made of a secret: the secret
encrypted (AES-256-GCM) under a key that only this TPM can re-create, from its
endorsement primary seed and the PCR values the secret is bound to. It is not
plaintext and is useless on any other TPM. Files are 0600 in a 0700 directory
all the same, written through :func:`~tpmid.store.fsio.atomic_write`.

``tpmid reset`` never touches this directory; ``tpmid secret remove`` does.
See docs/sealed-secrets.md.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tpmid.config import SEALED_NAME_RE
from tpmid.errors import StoreError
from tpmid.store.fsio import atomic_write, fsync_dir, make_dir

FORMAT = "tpmid-sealed-secret/1"
SEALED_DIR = "sealed"
SUFFIX = ".json"


@dataclass(frozen=True)
class SealedBlob:
    """One sealed secret as stored: the encrypted value and how to open it again.

    ``key_name`` is the TPM Name of the sealing key (an endorsement-hierarchy
    primary whose template includes the PCR policy): if the TPM re-creates a key
    with another Name, the blob was sealed on another TPM, or the endorsement
    seed changed. ``policy`` is the PolicyPCR digest, empty when not bound to PCRs.
    """

    name: str
    sealed_at: str
    pcr_bank: str
    pcrs: tuple[int, ...]
    policy: bytes
    key_name: bytes
    ephemeral: bytes = field(repr=False)  # uncompressed P-256 point of the sealing ECDH
    nonce: bytes = field(repr=False)
    ciphertext: bytes = field(repr=False)  # AES-256-GCM output, tag included

    def bound(self) -> str:
        """``sha256:0,7`` or ``no PCRs``."""
        if not self.pcrs:
            return "no PCRs"
        return f"{self.pcr_bank}:{','.join(str(i) for i in self.pcrs)}"

    def associated_data(self) -> bytes:
        """What AES-GCM authenticates besides the ciphertext: the secret's name and binding."""
        return json.dumps([FORMAT, self.name, self.pcr_bank, list(self.pcrs),
                           self.policy.hex(), self.key_name.hex()]).encode()

    def to_json(self) -> dict[str, Any]:
        b64 = base64.b64encode
        return {"format": FORMAT, "name": self.name, "sealed_at": self.sealed_at,
                "pcr_bank": self.pcr_bank, "pcrs": list(self.pcrs),
                "policy": self.policy.hex(), "key_name": self.key_name.hex(),
                "ephemeral": b64(self.ephemeral).decode(), "nonce": b64(self.nonce).decode(),
                "ciphertext": b64(self.ciphertext).decode()}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> SealedBlob:
        if d.get("format") != FORMAT:
            raise ValueError(f"format {str(d.get('format'))[:60]!r}, expected {FORMAT}")
        pcrs = d["pcrs"]
        if not isinstance(pcrs, list) or not all(isinstance(i, int) for i in pcrs):
            raise ValueError("pcrs is not a list of numbers")
        unb64 = base64.b64decode
        return cls(name=str(d["name"]), sealed_at=str(d["sealed_at"]),
                   pcr_bank=str(d["pcr_bank"]), pcrs=tuple(pcrs),
                   policy=bytes.fromhex(d["policy"]), key_name=bytes.fromhex(d["key_name"]),
                   ephemeral=unb64(d["ephemeral"], validate=True),
                   nonce=unb64(d["nonce"], validate=True),
                   ciphertext=unb64(d["ciphertext"], validate=True))


def check_sealed_name(name: str) -> None:
    """StoreError unless ``name`` can name a sealed secret (and its file)."""
    if not SEALED_NAME_RE.fullmatch(name):
        raise StoreError(f"{name[:80]!r} is not a sealed secret name",
                         hint="use letters, digits, '_', '.' and '-' (at most 64, starting "
                         "with a letter or digit)")


class SealedSecrets:
    """The ``sealed/`` directory of a store (see the module docstring)."""

    def __init__(self, store_root: Path) -> None:
        self.dir = Path(store_root) / SEALED_DIR

    def path(self, name: str) -> Path:
        """Where secret ``name`` is kept."""
        check_sealed_name(name)
        return self.dir / f"{name}{SUFFIX}"

    def exists(self, name: str) -> bool:
        return self.path(name).is_file()

    def save(self, blob: SealedBlob) -> Path:
        """Write (or replace) ``blob`` durably, 0600 in a 0700 directory."""
        path = self.path(blob.name)
        make_dir(self.dir, 0o700)
        atomic_write(path, json.dumps(blob.to_json(), indent=1).encode() + b"\n", 0o600)
        return path

    def load(self, name: str) -> SealedBlob:
        """The blob of secret ``name``; StoreError saying how to seal it if there is none."""
        path = self.path(name)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raise StoreError(f"no sealed secret named {name!r} ({path} does not exist)",
                             hint=f"seal it first: `tpmid secret seal {name}` (the value "
                             "on standard input)") from None
        except OSError as e:
            raise StoreError(f"cannot read sealed secret {path}: {e.strerror}") from e
        try:
            blob = SealedBlob.from_json(json.loads(raw))
        except (ValueError, KeyError, TypeError) as e:
            raise StoreError(f"{path} is not a sealed secret file tpmid can read ({e})",
                             hint=f"seal it again: `tpmid secret seal {name} --force`") from e
        if blob.name != name:
            raise StoreError(f"{path} holds sealed secret {blob.name[:80]!r}, not {name!r}",
                             hint=f"seal it again: `tpmid secret seal {name} --force`")
        return blob

    def names(self) -> list[str]:
        """The names of the stored secrets, sorted."""
        try:
            entries = os.listdir(self.dir)
        except FileNotFoundError:
            return []
        except OSError as e:
            raise StoreError(f"cannot list {self.dir}: {e.strerror}") from e
        return sorted(e[:-len(SUFFIX)] for e in entries
                      if e.endswith(SUFFIX) and SEALED_NAME_RE.fullmatch(e[:-len(SUFFIX)]))

    def remove(self, name: str) -> Path:
        """Delete secret ``name``; StoreError if there is none."""
        path = self.path(name)
        try:
            path.unlink()
        except FileNotFoundError:
            raise StoreError(f"no sealed secret named {name!r}",
                             hint="`tpmid secret list` shows the sealed secrets") from None
        except OSError as e:
            raise StoreError(f"cannot remove {path}: {e.strerror}") from e
        fsync_dir(self.dir)
        return path
