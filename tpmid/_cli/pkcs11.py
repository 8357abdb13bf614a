"""``tpmid pkcs11 list`` and ``tpmid pkcs11 sync``: the identities' keys in the PKCS#11 token."""

from __future__ import annotations

import argparse
import logging
from typing import Any

from tpmid._cli import add_json_flag
from tpmid._cli.context import Ctx
from tpmid.errors import ConfigError

log = logging.getLogger("tpmid.pkcs11")

EXIT_OUT_OF_STEP = 1


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "pkcs11", help="the identities' TPM keys as PKCS#11 objects (tpm2-pkcs11)",
        description="With a top-level pkcs11 section, the key and certificate of every key-file "
        "identity (LDevID, Edge CA) are objects of a tpm2-pkcs11 token: the TPM key itself, "
        "linked. Renewals keep the token in step; these commands show and repair it.",
    )
    s = p.add_subparsers(dest="pkcs11_command", metavar="SUBCOMMAND", required=True)
    ls = s.add_parser("list", help="each identity's PKCS#11 URI and whether the token is in step",
                      description="Identity -> PKCS#11 URI (token and object label), the version "
                      "and CKA_ID of the key the label names, and whether the token matches the "
                      "store. Needs neither the TPM nor the PIN. Exit 1 when an identity is out "
                      "of step.")
    add_json_flag(ls)
    ls.set_defaults(func=cmd_list)
    sy = s.add_parser("sync", help="make the token what the store says (creates it if needed)",
                      description="After store recovery, make every linked identity's label "
                      "name its current key and certificate, link the key of a renewal in flight "
                      "under <label>.next and remove everything else under those labels, in one "
                      "transaction per identity. Creates the token first when it does not exist "
                      "(needs pkcs11.so_pin). Linking a key unseals the token's wrapping key with "
                      "pkcs11.user_pin in the TPM.")
    sy.add_argument("name", metavar="NAME", nargs="*",
                    help="identities to synchronise (default: all linked ones)")
    add_json_flag(sy)
    sy.set_defaults(func=cmd_sync)


def _mirror(ctx: Ctx) -> Any:
    from tpmid.wiring.pkcs11 import token_mirror

    mirror = token_mirror(ctx.runtime())
    if mirror is None:
        raise ConfigError(f"{ctx.config().source} has no pkcs11 section",
                          hint="add a top-level pkcs11 section (see docs/config.md)")
    return mirror


def cmd_list(ctx: Ctx) -> int:
    """``tpmid pkcs11 list``."""
    mirror = _mirror(ctx)
    states = mirror.states(ctx.runtime().existing_store())
    rows = [s.to_json() for s in states]

    def human(_: Any) -> str:
        if not states:
            return "no identity's key is in the token (only key-file identities can be)"
        lines = []
        for st in states:
            lines.append(f"{st.identity}: {st.uri}")
            if st.in_step:
                lines.append(f"  in step: version {st.version}, id {st.pkcs11_id}, "
                             f"{st.public_key}")
            else:
                lines += [f"  OUT OF STEP: {p}" for p in st.problems]
        if any(not s.in_step for s in states):
            lines.append("run `tpmid pkcs11 sync` to bring the token in step")
        return "\n".join(lines)

    ctx.emit(rows, human)
    return 0 if all(s.in_step for s in states) else EXIT_OUT_OF_STEP


def cmd_sync(ctx: Ctx) -> int:
    """``tpmid pkcs11 sync [NAME...]``."""
    from tpmid.store import recover
    from tpmid.tpm.lease import TpmLease
    from tpmid.wiring.tpm import tpm_opener

    mirror = _mirror(ctx)
    names = list(ctx.args.name) or None
    for n in names or ():
        if not mirror.enabled(n):
            ctx.config().identity(n)  # an unknown name says so
            raise ConfigError(f"{n}'s key is not in the PKCS#11 token (pkcs11 is off for it, or "
                              "its key is not a key file)")
    rt = ctx.runtime()
    store = rt.store()
    recover(store, names=names)  # what a killed renewal left is settled first
    with TpmLease(tpm_opener(rt)) as lease:
        done = mirror.sync(lease.tpm, store, names, lock_timeout=rt.config.tpm.lock_timeout)
    states = mirror.states(store)
    ctx.emit({"done": done, "identities": [s.to_json() for s in states]},
             lambda _: "\n".join(done) or "the token was already in step with the store")
    return 0 if all(s.in_step for s in states if names is None or s.identity in names) \
        else EXIT_OUT_OF_STEP
