"""``tpmid key create|show|delete NAME`` and ``tpmid csr NAME``.

NAME is an identity of the config; its ``key`` section says which kind of key
it uses. ``kind: file`` keys (LDevID, Edge CA) are TSS2 key files in the store,
one per certificate version (``<store.dir>/keys/<NAME>/<version>.tss2.pem``): they
are created by ``tpmid enroll`` / ``tpmid renew`` together with their certificate,
and these commands act on the current one.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tpmid._cli import add_json_flag
from tpmid._cli.tpm import open_tpm

if TYPE_CHECKING:
    from tpmid.cli import Ctx
    from tpmid.config import Config, IdentityConfig
    from tpmid.tpm.connection import TpmConnection
    from tpmid.tpm.keys import LoadedKey


# --------------------------------------------------------------------------- helpers


def _identity(ctx: Ctx) -> tuple[Config, IdentityConfig]:
    cfg = ctx.config()
    return cfg, cfg.identity(ctx.args.name)


def current_key_file(cfg: Config, ident: IdentityConfig) -> Path:
    """The key file of identity ``ident``'s current certificate in the store."""
    from tpmid.errors import StoreError
    from tpmid.store import Store

    current = Store(cfg.store.dir, create=False).current(ident.name) \
        if Path(cfg.store.dir).is_dir() else None
    if current is None or current.key_file is None or not current.key_file.exists():
        raise StoreError(
            f"identity {ident.name!r} is not enrolled, so it has no key file yet",
            hint=f"file keys are created together with their certificate: "
            f"`tpmid enroll {ident.name}`",
        )
    return current.key_file


def load_key(tpm: TpmConnection, cfg: Config, ident: IdentityConfig) -> LoadedKey:
    """Open identity ``ident``'s key, reading its key file from the store if it has one."""
    from tpmid.errors import TpmidError
    from tpmid.tpm.keys import load_identity_key

    key_file = None
    if ident.key.kind == "file":
        key_file = current_key_file(cfg, ident).read_bytes()
    try:
        return load_identity_key(tpm, ident.key, key_file)
    except TpmidError as e:
        if e.hint:  # name the identity in the suggested command
            e.hint = e.hint.replace("<identity>", ident.name)
        raise


def _key_data(ident: IdentityConfig, key: LoadedKey) -> dict[str, Any]:
    import hashlib

    from cryptography.hazmat.primitives import serialization

    der = key.public_key_der()
    data: dict[str, Any] = {
        "identity": ident.name,
        "kind": ident.key.kind,
        "key": ident.key.describe(),
        "alg": key.alg,
        "hash": key.hash_name,
        "public_key_sha256": hashlib.sha256(der).hexdigest(),
        "public_key_pem": key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode(),
    }
    if ident.key.kind == "persistent":
        data["handle"] = f"{ident.key.handle:#010x}"
    if ident.key.kind in ("persistent", "ek-derived"):
        data["template"] = ident.key.template
    return data


def _key_text(data: dict[str, Any]) -> str:
    lines = [f"identity:   {data['identity']}", f"key:        {data['key']}",
             f"algorithm:  {data['alg']} (signs with {data['hash'].upper()})",
             f"public key: SHA-256 {data['public_key_sha256']}"]
    if "status" in data:
        lines.insert(0, data["status"])
    if "path" in data:
        lines.append(f"key file:   {data['path']}")
    return "\n".join(lines) + "\n" + data["public_key_pem"].rstrip()


# --------------------------------------------------------------------------- commands


def cmd_create(ctx: Ctx) -> int | None:
    """``tpmid key create NAME [--force]``: make the identity's key (idempotent)."""
    from tpmid.tpm.keys import create_persistent_idevid, derive_idevid

    cfg, ident = _identity(ctx)
    kind = ident.key.kind
    with open_tpm(ctx, config_required=True) as tpm:
        if kind == "persistent":
            result = create_persistent_idevid(tpm, ident.key.template, ident.key.handle,
                                              force=ctx.args.force)
            status = (f"created {ident.key.template} IDevID at {result.handle:#010x}"
                      if result.created else
                      f"kept the existing {ident.key.template} IDevID at {result.handle:#010x}")
            created = result.created
        elif kind == "ek-derived":
            status = ("ek-derived keys are re-created from the endorsement hierarchy whenever "
                      "they are needed; nothing to store")
            created = False
        else:
            # A file key belongs to one certificate version; enrollment makes both.
            path = current_key_file(cfg, ident)
            status = f"kept the key of the current certificate ({path})"
            created = False
        with (derive_idevid(tpm, ident.key.template) if kind == "ek-derived"
              else load_key(tpm, cfg, ident)) as key:
            data = _key_data(ident, key)
    data["status"] = status
    data["created"] = created
    if kind == "file":
        data["path"] = str(current_key_file(cfg, ident))
    ctx.emit(data, _key_text)
    return None


def cmd_show(ctx: Ctx) -> int | None:
    """``tpmid key show NAME``: the identity's public key and where its key lives."""
    cfg, ident = _identity(ctx)
    with open_tpm(ctx, config_required=True) as tpm, load_key(tpm, cfg, ident) as key:
        data = _key_data(ident, key)
    if ident.key.kind == "file":
        data["path"] = str(current_key_file(cfg, ident))
    ctx.emit(data, _key_text)
    return None


def _confirm(ctx: Ctx, what: str) -> None:
    from tpmid.errors import ConfigError

    if ctx.args.yes:
        return
    if sys.stdin is None or not sys.stdin.isatty():
        raise ConfigError(f"refusing to delete {what} without --yes")
    print(f"Delete {what}? Certificates for it become useless. Type 'yes': ",
          end="", file=sys.stderr, flush=True)
    if sys.stdin.readline().strip().lower() != "yes":
        raise ConfigError("not deleted")


def cmd_delete(ctx: Ctx) -> int | None:
    """``tpmid key delete NAME [--yes]``: evict the persistent key (file keys: see reset)."""
    from tpmid.tpm.keys import evict_persistent

    cfg, ident = _identity(ctx)
    kind = ident.key.kind
    if kind == "ek-derived":
        ctx.emit({"identity": ident.name, "deleted": False,
                  "status": "ek-derived keys are not stored; there is nothing to delete"},
                 lambda d: d["status"])
        return None
    if kind == "persistent":
        _confirm(ctx, f"the persistent key {ident.key.handle:#010x} of {ident.name}")
        with open_tpm(ctx, config_required=True) as tpm:
            evict_persistent(tpm, ident.key.handle)
        status = f"deleted the persistent key at {ident.key.handle:#010x}"
    else:
        from tpmid.errors import ConfigError

        raise ConfigError(
            f"{ident.name} uses a key file that belongs to its certificate; deleting the key "
            "alone would leave a certificate without a key",
            hint=f"`tpmid reset {ident.name}` removes the identity with its keys",
        )
    ctx.emit({"identity": ident.name, "deleted": True, "status": status},
             lambda d: d["status"])
    return None


def cmd_csr(ctx: Ctx) -> int | None:
    """``tpmid csr NAME [--out FILE] [--challenge-password-stdin]``: a PKCS#10 request."""
    from cryptography.hazmat.primitives import serialization

    from tpmid.csr import build_csr, hardware_module_name
    from tpmid.errors import ConfigError, StoreError

    cfg, ident = _identity(ctx)
    challenge = None
    if ctx.args.challenge_password_stdin:
        challenge = ctx.read_stdin().rstrip("\r\n")
        if not challenge:
            raise ConfigError("--challenge-password-stdin: standard input was empty")
    with open_tpm(ctx, config_required=True) as tpm:
        hw = None
        if ident.san.hardware_module_name:
            from tpmid.tpm.connection import PT_MANUFACTURER
            from tpmid.tpm.ek import primary_ek, read_eks

            ek = primary_ek(read_eks(tpm))
            hw = hardware_module_name(
                ek.cert_der, ek.public_key_der,
                tpm_manufacturer=tpm.properties(PT_MANUFACTURER, 1).get(PT_MANUFACTURER))
        with load_key(tpm, cfg, ident) as key:
            csr = build_csr(key.private_key(), ident.subject, ident.san,
                            hash_name=key.hash_name, hw_module=hw,
                            challenge_password=challenge)
    pem = csr.public_bytes(serialization.Encoding.PEM)
    if ctx.args.out:
        out = Path(ctx.args.out)
        try:
            out.write_bytes(pem)
        except OSError as e:
            raise StoreError(f"cannot write {out}: {e.strerror}") from e
        ctx.emit({"identity": ident.name, "out": str(out), "csr_pem": pem.decode()},
                 f"wrote the CSR for {ident.name} to {out}")
    else:
        ctx.emit({"identity": ident.name, "csr_pem": pem.decode()}, pem.decode().rstrip())
    return None


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``key create|show|delete`` and ``csr``."""
    p = sub.add_parser("key", help="create, show or delete an identity's TPM key",
                       description="Manage the TPM key of an identity from the config.")
    ksub = p.add_subparsers(dest="key_command", metavar="COMMAND", required=True)

    c = ksub.add_parser("create", help="create the identity's key (idempotent)",
                        description="Create the identity's key: persist the IDevID (kind "
                        "persistent). An existing matching key is kept; a different one is an "
                        "error unless --force. ek-derived keys need no creation; file keys "
                        "(LDevID, Edge CA) are created by `tpmid enroll` with their "
                        "certificate.")
    c.add_argument("name", metavar="NAME", help="identity name (identities.NAME)")
    c.add_argument("--force", action="store_true",
                   help="replace an existing key (its certificates become useless)")
    add_json_flag(c)
    c.set_defaults(func=cmd_create)

    s = ksub.add_parser("show", help="show the identity's public key",
                        description="Open the identity's key and show its public key.")
    s.add_argument("name", metavar="NAME", help="identity name")
    add_json_flag(s)
    s.set_defaults(func=cmd_show)

    d = ksub.add_parser("delete", help="delete the identity's key",
                        description="Evict the persistent key (file keys go with their "
                        "identity: tpmid reset NAME).")
    d.add_argument("name", metavar="NAME", help="identity name")
    d.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    add_json_flag(d)
    d.set_defaults(func=cmd_delete)

    r = sub.add_parser("csr", help="write a PKCS#10 CSR signed by the identity's TPM key",
                       description="Build a certification request from the identity's subject "
                       "and san sections, signed inside the TPM.")
    r.add_argument("name", metavar="NAME", help="identity name")
    r.add_argument("--out", metavar="FILE", help="write the PEM here instead of stdout")
    r.add_argument("--challenge-password-stdin", action="store_true",
                   help="read a challengePassword attribute value from standard input")
    add_json_flag(r)
    r.set_defaults(func=cmd_csr)
