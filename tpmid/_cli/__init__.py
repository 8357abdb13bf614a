"""Command groups of the ``tpmid`` CLI, one module each.

Each module exposes ``register(sub)`` which adds its subparsers to the
``argparse`` sub-parser action and sets ``func`` on each. Command functions take
a :class:`tpmid.cli.Ctx` and return an exit code (or None for 0). Keep imports of
heavy libraries inside the functions.

The global options (``--config/-c``, ``--tcti``, ``--json``, ``-v``) are added to
every subcommand's parser here, after the groups registered theirs
(:func:`accept_global_options_everywhere`), so that a group module never has to
think about them and ``tpmid provision -c FILE`` means ``tpmid -c FILE provision``.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Iterator

# Order here is the order in `tpmid --help`.
MODULES = ("tpm", "key", "est", "lifecycle", "status", "provision", "secret", "est_server",
           "pkcs11", "aziot")

# Every top-level command: the module that registers it and its one-line help.
# `tpmid --help` lists them from here without importing a command module; running
# a command imports only its module (tests/test_cli_options.py checks this table
# against what the modules register).
COMMANDS: dict[str, tuple[str, str]] = {
    "tpm": ("tpm", "inspect the TPM"),
    "key": ("key", "create, show or delete an identity's TPM key"),
    "csr": ("key", "write a PKCS#10 CSR signed by the identity's TPM key"),
    "est": ("est", "query an EST server (RFC 7030) directly"),
    "enroll": ("est", "enroll one identity from the config over EST"),
    "renew": ("lifecycle", "renew the identities that are due (or NAME; --force: now)"),
    "daemon": ("lifecycle", "keep every file-key identity renewed (foreground; for systemd)"),
    "status": ("status", "per-identity certificate, renewal and key status (no TPM needed)"),
    "check": ("status", "check TPM, keys, certificates, EST servers, clock and permissions"),
    "reset": ("status", "remove issued identities from the store, to enroll from scratch"),
    "provision": ("provision", "provision this device's IDevID on the manufacturing line"),
    "secret": ("secret", "seal EST passwords and other secrets to the TPM ({sealed: NAME})"),
    "est-server": ("est_server", "reference CA and EST server for tests and demos"),
    "pkcs11": ("pkcs11", "the identities' TPM keys as PKCS#11 objects (tpm2-pkcs11)"),
    "aziot": ("aziot", "Azure IoT Edge: import its EST config, export its config for tpmid's keys"),
}

# Global options that take a value (skipped when looking for the command's name).
_VALUED = frozenset({"--config", "-c", "--tcti"})


def command_in(argv: list[str]) -> str | None:
    """The top-level command named in ``argv`` (after any global options), if any."""
    args = iter(argv)
    for arg in args:
        if arg in _VALUED:
            next(args, None)
        elif not arg.startswith("-"):
            return arg
    return None

# Where ``-v`` given after a command is counted (one name per depth), so that
# ``-v est-server -v run -v`` adds up to -vvv: argparse parses a subcommand into a
# namespace of its own and copies it over the parent's, so a shared count would be
# overwritten, not added to.
VERBOSE_AFTER = "_verbose_after_command_"


def add_json_flag(p: argparse.ArgumentParser) -> None:
    """Accept ``--json`` after the subcommand too (same meaning as the global flag).

    Kept for the command groups that call it; :func:`accept_global_options_everywhere`
    adds ``--json`` to every parser that does not have it yet.
    """
    p.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                   help="machine-readable output on stdout")


def add_global_options(p: argparse.ArgumentParser, *, after_command: bool, depth: int = 1) -> None:
    """The options every command accepts: before the command, and (``after_command``) after it.

    After the command they default to ``argparse.SUPPRESS``: an option not given
    there leaves the value given before the command alone.
    """
    def default(value: object) -> object:
        return argparse.SUPPRESS if after_command else value

    group = p.add_argument_group("global options (before or after the command)") \
        if after_command else p
    have = set(p._option_string_actions)
    if not {"--config", "-c"} & have:
        group.add_argument("--config", "-c", metavar="PATH", default=default(None),
                           help="config file (default: $TPMID_CONFIG or /etc/tpmid/config.yaml)")
    if "--tcti" not in have:
        group.add_argument("--tcti", metavar="TCTI", default=default(None),
                           help="TPM connection, e.g. device:/dev/tpmrm0 or "
                           "swtpm:host=127.0.0.1,port=2321 (overrides tpm.tcti and $TPMID_TCTI)")
    if "--json" not in have:
        group.add_argument("--json", action="store_true", default=default(False),
                           help="machine-readable output on stdout")
    if not {"-v", "--verbose"} & have:
        group.add_argument("-v", "--verbose", action="count", default=default(0),
                           dest=f"{VERBOSE_AFTER}{depth}" if after_command else "verbose",
                           help="more logging on stderr (-v info, -vv debug)")


def subparsers_of(p: argparse.ArgumentParser) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """``(name, parser)`` of each direct subcommand of ``p`` (aliases once)."""
    seen: set[int] = set()
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sp in action.choices.items():
                if id(sp) not in seen:
                    seen.add(id(sp))
                    yield name, sp


def accept_global_options_everywhere(p: argparse.ArgumentParser, depth: int = 1) -> None:
    """Add the global options to every subcommand parser below ``p``, at any depth."""
    for _, sp in subparsers_of(p):
        add_global_options(sp, after_command=True, depth=depth)
        accept_global_options_everywhere(sp, depth + 1)


def merge_global_options(args: argparse.Namespace) -> argparse.Namespace:
    """Fold options given after the command into the global ones (``-v`` counts add up)."""
    after = [k for k in vars(args) if k.startswith(VERBOSE_AFTER)]
    args.verbose = getattr(args, "verbose", 0) + sum(getattr(args, k) for k in after)
    for k in after:
        delattr(args, k)
    return args


def register_for(sub: argparse._SubParsersAction[argparse.ArgumentParser],
                 command: str | None) -> None:
    """The full parser of ``command``'s module; the other commands by name and help only.

    ``tpmid --help`` (``command`` None) imports no command module at all; running a
    command builds only its group's parsers (STYLE: do only the work the command needs).
    """
    module = COMMANDS[command][0] if command in COMMANDS else None
    if module is not None:
        importlib.import_module(f"tpmid._cli.{module}").register(sub)
    for name, (_, help_text) in COMMANDS.items():
        if name not in sub.choices:
            sub.add_parser(name, help=help_text, add_help=False)


def register_all(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add every command group that exists to ``sub`` (the whole parser: docs, tests)."""
    for name in MODULES:
        try:
            mod = importlib.import_module(f"tpmid._cli.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"tpmid._cli.{name}":
                continue  # group not built yet
            raise
        mod.register(sub)
