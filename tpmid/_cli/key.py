"""``tpmid key create|show|delete NAME`` and ``tpmid csr NAME``.

NAME is an identity of the config; its ``key`` section says how its key is
kept (:class:`tpmid.tpm.identity.IdentityKey`). File keys (LDevID, Edge CA) are
TSS2 key files in the store, one per certificate version
(``<store.dir>/keys/<NAME>/<version>.tss2.pem``): they are created by ``tpmid
enroll`` / ``tpmid renew`` together with their certificate, and these commands
act on the current one.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tpmid._cli import add_json_flag
from tpmid._cli.context import Ctx
from tpmid.errors import ConfigError, StoreError

if TYPE_CHECKING:
    from tpmid.tpm.identity import IdentityKey
    from tpmid.tpm.loaded import LoadedKey


def _current_key_file(ctx: Ctx, name: str) -> Path | None:
    """The key file of ``name``'s current certificate version, if the store has one."""
    store = ctx.runtime().existing_store()
    current = store.current(name) if store is not None else None
    return current.key_file if current is not None else None


def _key_data(key: IdentityKey, loaded: LoadedKey) -> dict[str, Any]:
    from cryptography.hazmat.primitives import serialization

    der = loaded.public_key_der()
    facts = key.facts()
    data: dict[str, Any] = {
        "identity": key.name,
        "kind": facts["kind"],
        "key": facts["description"],
        "alg": loaded.alg,
        "hash": loaded.hash_name,
        "public_key_sha256": hashlib.sha256(der).hexdigest(),
        "public_key_pem": loaded.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode(),
    }
    if facts["handle"] is not None:
        data["handle"] = facts["handle"]
    if facts["template"] is not None:
        data["template"] = facts["template"]
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
    from tpmid.wiring.tpm import tpm_opener

    rt = ctx.runtime()
    key = rt.key(ctx.args.name)
    key_file = _current_key_file(ctx, key.name)
    with tpm_opener(rt)() as tpm:
        ensured = key.ensure(tpm, force=ctx.args.force, current_file=key_file)
        with key.open(tpm, key_file) as loaded:
            data = _key_data(key, loaded)
    data["status"] = ensured.status
    data["created"] = ensured.created
    if key_file is not None:
        data["path"] = str(key_file)
    ctx.emit(data, _key_text)
    return None


def cmd_show(ctx: Ctx) -> int | None:
    """``tpmid key show NAME``: the identity's public key and where its key lives."""
    from tpmid.wiring.tpm import tpm_opener

    rt = ctx.runtime()
    key = rt.key(ctx.args.name)
    key_file = _current_key_file(ctx, key.name)
    with tpm_opener(rt)() as tpm, key.open(tpm, key_file) as loaded:
        data = _key_data(key, loaded)
    if key_file is not None:
        data["path"] = str(key_file)
    ctx.emit(data, _key_text)
    return None


def _confirm(ctx: Ctx, what: str) -> None:
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
    from tpmid.wiring.tpm import tpm_opener

    rt = ctx.runtime()
    key = rt.key(ctx.args.name)
    what = key.removal()
    if what is None:
        ctx.emit({"identity": key.name, "deleted": False,
                  "status": f"{key.describe()} keys are not stored; there is nothing to delete"},
                 lambda d: d["status"])
        return None
    _confirm(ctx, what)
    with tpm_opener(rt)() as tpm:
        status = key.remove(tpm)
    ctx.emit({"identity": key.name, "deleted": True, "status": status},
             lambda d: d["status"])
    return None


def cmd_csr(ctx: Ctx) -> int | None:
    """``tpmid csr NAME [--out FILE] [--challenge-password-stdin]``: a PKCS#10 request."""
    from cryptography.hazmat.primitives import serialization

    from tpmid.csr import build_csr
    from tpmid.wiring.tpm import tpm_opener

    rt = ctx.runtime()
    ident = rt.config.identity(ctx.args.name)
    key = rt.key(ident.name)
    challenge = None
    if ctx.args.challenge_password_stdin:
        challenge = ctx.read_stdin().rstrip("\r\n")
        if not challenge:
            raise ConfigError("--challenge-password-stdin: standard input was empty")
    key_file = _current_key_file(ctx, key.name)
    with tpm_opener(rt)() as tpm:
        hw = tpm.hardware_module_name() if ident.san.hardware_module_name else None
        with key.open(tpm, key_file) as loaded:
            csr = build_csr(loaded.private_key(), ident.subject, ident.san,
                            hash_name=loaded.hash_name, hw_module=hw,
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
