"""The ``tpmid`` command line: a thin shell over the library.

``main(argv)`` builds the parser from the command groups in :mod:`tpmid._cli`,
runs one library call per subcommand, and is the one place that catches
:class:`~tpmid.errors.TpmidError`, prints its diagnostics and maps it to an exit
code (documented in ``docs/cli.md``). The TPM and HTTP stacks are imported
inside the command functions that need them (the composition root's factories,
:mod:`tpmid.wiring`), so that ``tpmid --help`` and ``tpmid status`` start fast.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from tpmid import __version__
from tpmid._cli import (
    accept_global_options_everywhere,
    add_global_options,
    command_in,
    merge_global_options,
    register_all,
    register_for,
)
from tpmid._cli.context import Ctx
from tpmid.errors import TpmidError

# `typing` costs `tpmid --help` milliseconds; annotations are strings here anyway.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

EXIT_OK = 0
EXIT_FAILED_CHECK = 1  # e.g. `tpmid check` found a problem
EXIT_INTERRUPTED = 130


Command = Callable[[Ctx], int | None]


def build_parser(command: str | None = "") -> argparse.ArgumentParser:
    """The argument parser; every subparser of a built group sets ``func``.

    ``command`` "" (the default) builds every group (documentation, tests);
    otherwise only the group of ``command`` (see :func:`tpmid._cli.register_for`).
    """
    p = argparse.ArgumentParser(
        prog="tpmid",
        description="TPM 2.0 device identities (IDevID, LDevID, Edge CA) enrolled over EST, "
        "with every private key inside the TPM.",
        epilog="Exit codes: 0 ok, 1 check failed, 2 config, 3 TPM, 4 EST server, "
        "5 EST auth, 6 verification, 7 store. See docs/cli.md.",
    )
    p.add_argument("--version", action="version", version=f"tpmid {__version__}")
    add_global_options(p, after_command=False)
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    if command == "":
        register_all(sub)
    else:
        register_for(sub, command)
    # Global options are accepted after the command too, at every level.
    accept_global_options_everywhere(p)
    return p


def parse_args(argv: list[str] | None = None,
               parser: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    """Parse ``argv`` as ``tpmid`` does, global options before or after the command merged."""
    if parser is None:
        parser = build_parser(command_in(sys.argv[1:] if argv is None else argv))
    return merge_global_options(parser.parse_args(argv))


def _setup_logging(verbosity: int) -> None:
    import logging

    level = logging.WARNING if verbosity <= 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    # Under systemd, journald stamps every line itself (and says so in JOURNAL_STREAM):
    # one timestamp per line, not two.
    stamp = "" if os.environ.get("JOURNAL_STREAM") else "%(asctime)s "
    logging.basicConfig(level=level, stream=sys.stderr,
                        format=stamp + "%(levelname)s %(name)s: %(message)s")
    # tpm2-tss logs every failed command at WARNING/ERROR on its own; tpmid explains them.
    logging.getLogger("esys").setLevel(logging.CRITICAL)


def _print_error(e: TpmidError, as_json: bool) -> None:
    if as_json:
        import json

        payload: dict[str, Any] = {"error": type(e).__name__, "message": e.message,
                                   "exit_code": e.exit_code}
        if e.hint:
            payload["hint"] = e.hint
        for attr in ("rc", "status", "retry_after"):
            if getattr(e, attr, None) is not None:
                payload[attr] = getattr(e, attr)
        print(json.dumps(payload, indent=2, sort_keys=True))
    print(f"tpmid: error: {e.message}", file=sys.stderr)
    if e.hint:
        print(f"tpmid: hint: {e.hint}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; return the exit code."""
    args = parse_args(argv)
    if args.verbose < 2:
        # The TSS C library logs every failed command itself (WARNING:esys:...);
        # tpmid turns those into one actionable error. -vv shows them again.
        os.environ.setdefault("TSS2_LOG", "all+none")
    _setup_logging(args.verbose)
    ctx = Ctx(args)
    try:
        rc = args.func(ctx)
        return EXIT_OK if rc is None else rc
    except TpmidError as e:
        _print_error(e, ctx.json)
        return e.exit_code
    except KeyboardInterrupt:
        print("tpmid: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # `tpmid ... | head`: the reader has gone; the command's work is done. Point
        # stdout at /dev/null so that Python's final flush does not fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
