"""A tpm2-pkcs11 store and the token tpmid keeps its keys in: :class:`TokenStore`.

The store is tpm2-pkcs11's SQLite database in ``pkcs11.store`` (what consumers
find through ``TPM2_PKCS11_STORE``). tpmid reads and changes it only through
tpm2-pkcs11's own tooling (the ``tpm2_pkcs11`` package behind ``tpm2_ptool``),
driven as a library by :mod:`tpmid.pkcs11.ptool_driver` in a child process that
runs the Python the tooling was packaged for. One request is one SQLite
transaction: a promotion (old key and certificate removed, the new key
relabelled, its certificate added) is all or nothing for every reader.

What goes to the child is public: key blobs (the private part is wrapped by the
TPM), salts, labels, certificates, and an object authorization already
encrypted with the token's wrapping key (:func:`wrap_auth`). PINs and the
wrapping key stay in tpmid's process; the child's argv and environment hold
neither.

**Why not ``tpm2_ptool link`` itself.** It loads and reads the key with
``tpm2-tools`` commands that get the PIN-derived authorization on their command
line and leave what they load in the TPM (no resource manager: three slots),
and it refuses a key whose template fixes its signing scheme ("Cannot map
scheme to allowed mechanism"), which tpmid's ECC keys do (ECDSA with the
curve's hash, like the TCG IDevID templates). tpmid links the same way the
tool does (the tool's object factory builds the attributes), states the
mechanisms the fixed scheme allows (``CKM_ECDSA`` and ``CKM_ECDSA_SHA256`` for
P-256), and does the TPM work itself.
"""

from __future__ import annotations

import binascii
import hashlib
import json
import logging
import os
import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from tpmid.errors import TokenError

log = logging.getLogger(__name__)

DRIVER = Path(__file__).with_name("ptool_driver.py")
DB_FILE = "tpm2_pkcs11.sqlite3"
# tpm2-pkcs11's library creates this at C_Initialize ("Could not open lock file") and removes it.
LOCK_FILE = DB_FILE + ".lock"
# A token whose primary object is re-created from this template whenever it is
# used: the ECC P-256 storage key tpmid's key files are made under.
TRANSIENT_PARENT = "tss2-engine-key"
PRIMARY_CONFIG = {"transient": True, "template-name": TRANSIENT_PARENT}
DRIVER_TIMEOUT_S = 60.0

# PKCS#11 v2.40 constants (pkcs11t.h).
CKO_CERTIFICATE, CKO_PUBLIC_KEY, CKO_PRIVATE_KEY = 1, 2, 3
CKM_ECDSA, CKM_ECDSA_SHA256, CKM_ECDSA_SHA384 = 0x1041, 0x1044, 0x1045
_CLASS_NAMES = {CKO_CERTIFICATE: "certificate", CKO_PUBLIC_KEY: "public",
                CKO_PRIVATE_KEY: "private"}

Runner = Callable[..., "subprocess.CompletedProcess[str]"]


@dataclass(frozen=True)
class TokenObject:
    """One object of the token, as tpm2-pkcs11 stores it."""

    id: int  # the store's row id (tpm2_ptool's object id)
    kind: str  # "private", "public", "certificate" or another class number
    label: str  # CKA_LABEL
    ckaid: str  # CKA_ID as tpm2-pkcs11 writes it: ASCII of a hex string
    tpm_public: bytes | None  # CKA_TPM2_PUB_BLOB of a key: the TPM2B_PUBLIC of the linked key
    cert_der: bytes | None  # CKA_VALUE of a certificate
    mechanisms: tuple[int, ...] = ()

    @property
    def pkcs11_id(self) -> str:
        """CKA_ID as hex, as ``pkcs11-tool --id`` and ``id=`` in a URI take it."""
        return self.ckaid.encode().hex()


@dataclass(frozen=True)
class TokenInfo:
    """A token of the store: its label and its user seal object (the sealed wrapping key)."""

    id: int
    label: str
    config: dict[str, Any]
    primary_config: dict[str, Any]
    user_public: bytes | None
    user_private: bytes | None
    user_salt: str | None


@dataclass(frozen=True)
class StoreView:
    """What :meth:`TokenStore.view` found."""

    exists: bool
    token: TokenInfo | None
    objects: tuple[TokenObject, ...]
    primaries: tuple[tuple[int, dict[str, Any]], ...] = ()  # (id, config) of each primary object

    def labelled(self, label: str, kind: str | None = None) -> list[TokenObject]:
        """The objects with CKA_LABEL ``label`` (of class ``kind``)."""
        return [o for o in self.objects if o.label == label and (kind is None or o.kind == kind)]


def new_salt() -> str:
    """A seal object's salt as tpm2-pkcs11 makes it: 64 hex digits."""
    return os.urandom(32).hex()


def new_wrapping_key() -> bytes:
    """A token's AES-256 wrapping key as tpm2-pkcs11 seals it: 64 hex digits, ASCII."""
    return os.urandom(32).hex().encode()


def wrap_auth(wrapping_key: bytes, auth: bytes = b"") -> str:
    """Encrypt an object's authorization as tpm2-pkcs11 stores it (CKA_TPM2_OBJAUTH_ENC).

    AES-256-GCM under the token's wrapping key with a random 96-bit IV, written
    ``iv:tag:ciphertext`` in hex (tpm2-pkcs11's ``AESCipher``). tpmid's keys
    have an empty authorization.
    """
    key = binascii.unhexlify(wrapping_key)
    iv = os.urandom(12)
    sealed = AESGCM(key).encrypt(iv, auth, None)
    ciphertext, tag = sealed[:-16], sealed[-16:]
    return ":".join((iv.hex(), tag.hex(), ciphertext.hex()))


def ckaid_for(spki_der: bytes) -> str:
    """The CKA_ID of a key tpmid links: 16 hex digits of its public key's SHA-256.

    Like ``tpm2_ptool``'s default (16 random hex digits) in form, but the same
    for the same key: a key linked again keeps its id.
    """
    return hashlib.sha256(spki_der).hexdigest()[:16]


def mechanisms_for(kind: str, fixed_hash: str | None) -> list[int] | None:
    """CKA_ALLOWED_MECHANISMS of a key whose template fixes its scheme; None: the tool decides."""
    if kind != "ecc" or fixed_hash is None:
        return None
    return [CKM_ECDSA, {"sha256": CKM_ECDSA_SHA256, "sha384": CKM_ECDSA_SHA384}[fixed_hash]]


def tooling_python(which: Callable[[str], str | None] = shutil.which) -> str:
    """The interpreter of tpm2-pkcs11's tooling: the one ``tpm2_ptool`` runs with."""
    tool = which("tpm2_ptool")
    if tool is None:
        raise TokenError("tpm2-pkcs11's tooling (tpm2_ptool) is not installed",
                         hint="install the Debian package libtpm2-pkcs11-tools")
    try:
        with open(tool, "rb") as f:
            first = f.readline(256).decode("utf-8", "replace").strip()
    except OSError as e:
        raise TokenError(f"cannot read {tool}: {e.strerror}") from e
    if not first.startswith("#!"):
        raise TokenError(f"{tool} is not the Python tool tpmid knows (no #! line)")
    words = first[2:].split()
    if words and os.path.basename(words[0]) == "env" and len(words) > 1:
        found = which(words[1])
        if found is None:
            raise TokenError(f"{tool} runs {words[1]}, which is not on PATH")
        return found
    if not words:
        raise TokenError(f"{tool} names no interpreter")
    return words[0]


class TokenStore:
    """One tpm2-pkcs11 store directory and the token labelled ``token`` in it."""

    def __init__(self, path: Path, token: str, *, python: str | None = None,
                 runner: Runner = subprocess.run) -> None:
        self.path = Path(path)
        self.token = token
        self._python = python
        self._runner = runner

    def __repr__(self) -> str:
        return f"TokenStore({str(self.path)!r}, token={self.token!r})"

    @property
    def python(self) -> str:
        if self._python is None:
            self._python = tooling_python()
        return self._python

    def exists(self) -> bool:
        """The store's database file is there (nothing is created to find out)."""
        return (self.path / DB_FILE).is_file()

    def ensure_directory(self) -> None:
        """Create the store directory, mode 0770 whatever the umask.

        The token's consumers (IoT Edge's key service, in tpmid's group) read the
        database (0640: the tooling runs with umask 007), and tpm2-pkcs11's
        library creates :data:`LOCK_FILE` beside it when it is loaded and removes
        it when it is unloaded ("Could not open lock file" otherwise): the group
        needs to write to the directory.
        """
        try:
            if not self.path.is_dir():
                self.path.mkdir(mode=0o770)
                os.chmod(self.path, 0o770)
        except FileNotFoundError:
            raise TokenError(f"cannot create the PKCS#11 store {self.path}: its parent "
                             "directory does not exist",
                             hint="create it, or set pkcs11.store in the config") from None
        except OSError as e:
            raise TokenError(f"cannot create the PKCS#11 store {self.path}: {e.strerror}") from e

    # ------------------------------------------------------------ the driver

    def _call(self, request: dict[str, Any]) -> Any:
        data = json.dumps({**request, "store": str(self.path)})
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}
        try:
            proc = self._runner([self.python, "-I", str(DRIVER)], input=data, text=True,
                                capture_output=True, timeout=DRIVER_TIMEOUT_S, env=env,
                                check=False)
        except subprocess.TimeoutExpired:
            raise TokenError(f"tpm2-pkcs11's tooling did not answer within "
                             f"{DRIVER_TIMEOUT_S:g} s ({self.path})") from None
        except OSError as e:
            raise TokenError(f"cannot run tpm2-pkcs11's tooling ({self.python}): "
                             f"{e.strerror}") from e
        try:
            answer = json.loads(proc.stdout)
        except ValueError:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            hint = None
            if "No module named 'tpm2_pkcs11'" in proc.stderr:
                hint = "install the Debian package libtpm2-pkcs11-tools"
            raise TokenError(f"tpm2-pkcs11's tooling failed on {self.path}: {tail[0]}",
                             hint=hint) from None
        if not answer.get("ok"):
            log.debug("tpm2-pkcs11 tooling: %s", answer.get("trace"))
            raise TokenError(f"tpm2-pkcs11's tooling refused a change to {self.path}: "
                             f"{answer.get('error')}")
        return answer["result"]

    # ------------------------------------------------------------ reading

    def view(self) -> StoreView:
        """The store's token ``token`` and its objects (an absent store reads as empty)."""
        if not self.exists():
            return StoreView(False, None, ())
        r = self._call({"op": "describe", "token": self.token})
        primaries = {p["id"]: _yaml(p["config"]) for p in r["primaries"]}
        info = None
        for t in r["tokens"]:
            if t["label"] == self.token:
                info = TokenInfo(
                    id=t["id"], label=t["label"], config=_yaml(t["config"]),
                    primary_config=primaries.get(t["pid"], {}),
                    user_public=bytes.fromhex(t["user_pub"]) if t["user_pub"] else None,
                    user_private=bytes.fromhex(t["user_priv"]) if t["user_priv"] else None,
                    user_salt=t["user_salt"])
        objects = tuple(
            TokenObject(id=o["id"], kind=_CLASS_NAMES.get(o["class"], str(o["class"])),
                        label=o["label"], ckaid=o["ckaid"],
                        tpm_public=bytes.fromhex(o["tpm_public"]) if o["tpm_public"] else None,
                        cert_der=bytes.fromhex(o["value"]) if o["value"] else None,
                        mechanisms=tuple(o["mechanisms"] or ()))
            for o in r["objects"])
        return StoreView(True, info, objects, tuple(primaries.items()))

    # ------------------------------------------------------------ changing

    def apply(self, steps: Sequence[dict[str, Any]]) -> list[Any]:
        """Apply ``steps`` (made by the ``*_step`` functions) in one transaction."""
        if not steps:
            return []
        return list(self._call({"op": "transaction", "steps": list(steps)}))

    def create_steps(self, *, user: tuple[bytes, bytes, str], so: tuple[bytes, bytes, str],
                     pss_good: bool, empty_user_pin: bool = False) -> list[dict[str, Any]]:
        """Steps that make the primary object (transient, :data:`TRANSIENT_PARENT`) and the token.

        ``user``/``so``: the sealed wrapping key's (public, private, salt) for each PIN.
        """
        config: dict[str, Any] = {"token-init": True, "pss-sigs-good": pss_good}
        if empty_user_pin:
            config["empty-user-pin"] = True
        return [
            {"step": "add_primary", "config": dict(PRIMARY_CONFIG)},
            {"step": "add_token", "label": self.token, "config": config,
             "user_pub": user[0].hex(), "user_priv": user[1].hex(), "user_salt": user[2],
             "so_pub": so[0].hex(), "so_priv": so[1].hex(), "so_salt": so[2]},
        ]

    def link_step(self, label: str, ckaid: str, *, public_blob: bytes, private_blob: bytes,
                  public: dict[str, Any], encauth: str, algorithms: Sequence[str],
                  mechanisms: Sequence[int] | None) -> dict[str, Any]:
        """Link a TPM key (its blobs) as a private and a public key object labelled ``label``."""
        return {"step": "link", "token": self.token, "label": label, "ckaid": ckaid,
                "tpm_public": public_blob.hex(), "tpm_private": private_blob.hex(),
                "public": public, "encauth": encauth, "algorithms": list(algorithms),
                "mechanisms": list(mechanisms) if mechanisms is not None else None}

    def cert_step(self, label: str, ckaid: str, cert_pem: str) -> dict[str, Any]:
        """Add a certificate object with the key's label and CKA_ID."""
        return {"step": "add_cert", "token": self.token, "label": label, "ckaid": ckaid,
                "cert_pem": cert_pem}

    def delete_step(self, obj: TokenObject) -> dict[str, Any]:
        """Remove one object."""
        return {"step": "delete", "token": self.token, "id": obj.id}

    def relabel_step(self, obj: TokenObject, label: str) -> dict[str, Any]:
        """Give one object another CKA_LABEL."""
        return {"step": "relabel", "token": self.token, "id": obj.id, "label": label}


def _yaml(text: str) -> dict[str, Any]:
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return {}
    return value if isinstance(value, dict) else {}
