"""``tpmid secret seal|list|remove``: secrets sealed to the TPM (docs/sealed-secrets.md).

The value to seal comes from standard input (a prompt without echo on a
terminal) or ``--from-env VARIABLE``, never from the command line, where ``ps``
and shell history would show it. One library call each
(:mod:`tpmid.lifecycle.sealing`).
"""

from __future__ import annotations

import argparse
import getpass
import sys
from typing import TYPE_CHECKING

from tpmid._cli import add_json_flag
from tpmid._cli.context import Ctx
from tpmid.errors import ConfigError

if TYPE_CHECKING:
    from tpmid.lifecycle.sealing import SealedInfo

# More than any EST password or header secret; what tpm/sealed.py accepts.
MAX_SECRET_BYTES = 4096


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``secret seal|list|remove``."""
    p = sub.add_parser(
        "secret", help="seal EST passwords and other secrets to the TPM ({sealed: NAME})",
        description="Secrets sealed to this TPM, for config entries written {sealed: NAME}. "
        "They survive TPM2_Clear and `tpmid reset`; see docs/sealed-secrets.md.")
    s = p.add_subparsers(dest="secret_command", metavar="SUBCOMMAND", required=True)

    seal = s.add_parser(
        "seal", help="seal a secret read from standard input or an environment variable",
        description="Seal a secret to this TPM and keep the sealed blob in the store "
        "(<store.dir>/sealed/NAME.json). The value is read from standard input (on a "
        "terminal: a prompt without echo, asked twice), or from the environment variable "
        "--from-env names; never from the command line. A trailing newline is not part of "
        "the value. With secrets.NAME.pcrs in the config, the secret opens only while those "
        "PCRs keep their current values.")
    seal.add_argument("name", metavar="NAME", help="the name config refers to ({sealed: NAME})")
    # Catches a value given on the command line, to refuse it without echoing it.
    seal.add_argument("extra", nargs="*", help=argparse.SUPPRESS)
    seal.add_argument("--from-env", metavar="VARIABLE",
                      help="read the value from this environment variable instead of stdin")
    seal.add_argument("--force", action="store_true",
                      help="replace a secret already sealed under NAME")
    add_json_flag(seal)
    seal.set_defaults(func=cmd_seal)

    ls = s.add_parser(
        "list", help="list sealed secrets and the config entries that use them",
        description="List the secrets sealed in the store (name, when sealed, the PCRs "
        "they are bound to, the config entries that refer to them) and the {sealed: NAME} "
        "entries of the config that have no sealed secret. Never shows a value. Exits 1 "
        "when a secret has a problem.")
    add_json_flag(ls)
    ls.set_defaults(func=cmd_list)

    rm = s.add_parser(
        "remove", help="delete a sealed secret from the store",
        description="Delete the sealed secret NAME from the store. Config entries that "
        "still refer to it are named: the requests that need it fail until it is sealed "
        "again.")
    rm.add_argument("name", metavar="NAME")
    add_json_flag(rm)
    rm.set_defaults(func=cmd_remove)


def _strip_newline(value: bytearray) -> None:
    for end in (b"\r\n", b"\n"):
        if value.endswith(end):
            del value[-len(end):]
            return


def _read_value(ctx: Ctx, name: str) -> bytearray:
    """The value to seal, as bytes, from --from-env or standard input."""
    if ctx.args.extra:
        raise ConfigError(
            "tpmid never takes a secret's value from the command line (ps and shell "
            "history would show it)",
            hint="pipe it to standard input, or give --from-env with the name of an "
            "environment variable holding it")
    if ctx.args.from_env:
        text = ctx.environ.get(ctx.args.from_env)
        if not text:
            raise ConfigError(f"environment variable {ctx.args.from_env} is not set or empty")
        return bytearray(text.encode("utf-8"))
    if sys.stdin is None or sys.stdin.closed:
        raise ConfigError("the value to seal is read from standard input, but there is none",
                          hint="pipe it in, or give --from-env with the name of an "
                          "environment variable holding it")
    if sys.stdin.isatty():
        first = getpass.getpass(f"value of sealed secret {name}: ")
        if getpass.getpass("again: ") != first:
            raise ConfigError("the two values typed differ; nothing was sealed")
        value = bytearray(first.encode("utf-8"))
    else:
        value = bytearray(sys.stdin.buffer.read(MAX_SECRET_BYTES + 3))
        _strip_newline(value)
    if not value:
        raise ConfigError("the value to seal is empty; nothing was sealed")
    if len(value) > MAX_SECRET_BYTES:
        value[:] = bytes(len(value))
        raise ConfigError(f"a sealed secret holds at most {MAX_SECRET_BYTES} bytes")
    return value


def _line(info: SealedInfo) -> str:
    if info.stored:
        text = f"{info.name}: sealed {info.sealed_at}, bound to {info.bound}"
    else:
        text = f"{info.name}: not sealed"
    text += ("; used by " + ", ".join(info.referenced_by) if info.referenced_by
             else "; not used by the config")
    if info.problem:
        text += f"\n    PROBLEM: {info.problem}"
    return text


def cmd_seal(ctx: Ctx) -> int | None:
    """``tpmid secret seal NAME [--from-env VARIABLE] [--force]``."""
    from tpmid.lifecycle.sealing import seal
    from tpmid.wiring.tpm import tpm_opener

    rt = ctx.runtime(required=False)
    value = _read_value(ctx, ctx.args.name)
    try:
        rt.store()  # the store directory, with its modes, before its sealed/ subdirectory
        info = seal(rt.config, ctx.args.name, value, secrets=rt.sealed_secrets(),
                    open_tpm=tpm_opener(rt), force=ctx.args.force)
    finally:
        value[:] = bytes(len(value))
    ctx.emit(info.to_json(), lambda _: f"sealed {info.name} (bound to {info.bound}) in "
             f"{info.path}" + ("" if info.referenced_by else
                               f"\nno config entry uses it yet: write {{sealed: {info.name}}}"))
    return 0


def cmd_list(ctx: Ctx) -> int | None:
    """``tpmid secret list``."""
    from tpmid.lifecycle.sealing import list_sealed

    rt = ctx.runtime(required=False)
    infos = list_sealed(rt.config, rt.sealed_secrets())
    ctx.emit([i.to_json() for i in infos],
             lambda _: "\n".join(_line(i) for i in infos) or "no sealed secrets")
    return 1 if any(i.problem for i in infos) else 0


def cmd_remove(ctx: Ctx) -> int | None:
    """``tpmid secret remove NAME``."""
    from tpmid.lifecycle.sealing import remove_sealed

    rt = ctx.runtime(required=False)
    info = remove_sealed(rt.config, rt.sealed_secrets(), ctx.args.name)
    still = (f"\nstill used by {', '.join(info.referenced_by)}: requests that need it fail "
             "until it is sealed again" if info.referenced_by else "")
    ctx.emit(info.to_json(), lambda _: f"removed sealed secret {info.name} ({info.path})" + still)
    return 0
