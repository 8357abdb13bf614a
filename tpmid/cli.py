"""The ``tpmid`` command line: a thin shell over the library.

``main(argv)`` builds the parser from the command groups in :mod:`tpmid._cli`,
runs one library call per subcommand, and is the one place that catches
:class:`~tpmid.errors.TpmidError`, prints its diagnostics and maps it to an exit
code (documented in ``docs/cli.md``). Heavy modules (tpm2-pytss, cryptography,
requests) are imported inside the command functions so that ``tpmid --help``
starts fast.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tpmid import __version__
from tpmid.errors import ConfigError, TpmidError

if TYPE_CHECKING:
    from tpmid.config import Config

EXIT_OK = 0
EXIT_FAILED_CHECK = 1  # e.g. `tpmid check` found a problem
EXIT_INTERRUPTED = 130

ENV_CONFIG = "TPMID_CONFIG"
ENV_TCTI = "TPMID_TCTI"

log = logging.getLogger("tpmid")


@dataclass
class Ctx:
    """What a command function gets: parsed arguments, config, environment, output."""

    args: argparse.Namespace
    environ: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))
    _config: Config | None = None

    @property
    def json(self) -> bool:
        return bool(getattr(self.args, "json", False))

    @property
    def config_path(self) -> Path:
        from tpmid.config import DEFAULT_CONFIG_PATH

        p = self.args.config or self.environ.get(ENV_CONFIG)
        return Path(p) if p else DEFAULT_CONFIG_PATH

    def config(self, *, required: bool = True, refuse_insecure: bool = True) -> Config:
        """The parsed config file; ``--tcti`` / ``TPMID_TCTI`` override ``tpm.tcti``.

        With ``required=False`` a missing *default* config file yields the
        built-in defaults (so ``tpmid tpm info --tcti ...`` works without one).
        A config file that group or others can write is refused, except with
        ``refuse_insecure=False`` (``tpmid check`` reports it instead).
        """
        if self._config is None:
            import dataclasses

            from tpmid.config import Config, TpmConfig, load_config

            explicit = self.args.config or self.environ.get(ENV_CONFIG)
            if not required and not explicit and not self.config_path.exists():
                cfg = Config()
            else:
                cfg = load_config(self.config_path)
                from tpmid.store import check_private_path

                # Whoever can rewrite the config controls the device's identity.
                if refuse_insecure:
                    check_private_path(self.config_path, "config file", error=ConfigError)
            tcti = self.args.tcti or self.environ.get(ENV_TCTI)
            if tcti:
                cfg = dataclasses.replace(cfg, tpm=dataclasses.replace(cfg.tpm, tcti=tcti))
            assert isinstance(cfg.tpm, TpmConfig)
            self._config = cfg
        return self._config

    def forget_config(self) -> None:
        """Drop the parsed config so that the next :meth:`config` reads the file again."""
        self._config = None

    def read_stdin(self) -> str:
        """One line from standard input (for secrets given with ``{stdin: true}``)."""
        if sys.stdin is None or sys.stdin.closed:
            raise ConfigError("a secret was expected on standard input, but there is none")
        return sys.stdin.readline()

    def emit(self, data: Any, human: Callable[[Any], str] | str | None = None) -> None:
        """Print ``data`` as JSON with ``--json``, else its human rendering."""
        if self.json:
            print(json.dumps(data, indent=2, sort_keys=True, default=str))
        elif human is None:
            print(json.dumps(data, indent=2, default=str))
        elif isinstance(human, str):
            print(human)
        else:
            print(human(data))

    def progress(self, message: str) -> None:
        """A short progress line on stderr (silent with --json)."""
        if not self.json:
            print(message, file=sys.stderr, flush=True)


Command = Callable[[Ctx], int | None]


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser; every subparser sets ``func``."""
    from tpmid._cli import register_all

    p = argparse.ArgumentParser(
        prog="tpmid",
        description="TPM 2.0 device identities (IDevID, LDevID, Edge CA) enrolled over EST, "
        "with every private key inside the TPM.",
        epilog="Exit codes: 0 ok, 1 check failed, 2 config, 3 TPM, 4 EST server, "
        "5 EST auth, 6 verification, 7 store. See docs/cli.md.",
    )
    p.add_argument("--version", action="version", version=f"tpmid {__version__}")
    p.add_argument("--config", "-c", metavar="PATH",
                   help=f"config file (default: ${ENV_CONFIG} or /etc/tpmid/config.yaml)")
    p.add_argument("--tcti", metavar="TCTI",
                   help="TPM connection, e.g. device:/dev/tpmrm0 or swtpm:host=127.0.0.1,port=2321 "
                   f"(overrides tpm.tcti and ${ENV_TCTI})")
    p.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    p.add_argument("-v", "--verbose", action="count", default=0,
                   help="more logging on stderr (-v info, -vv debug)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    register_all(sub)
    return p


def _setup_logging(verbosity: int) -> None:
    level = logging.WARNING if verbosity <= 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # tpm2-tss logs every failed command at WARNING/ERROR on its own; tpmid explains them.
    logging.getLogger("esys").setLevel(logging.CRITICAL)


def _print_error(e: TpmidError, as_json: bool) -> None:
    if as_json:
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
    parser = build_parser()
    args = parser.parse_args(argv)
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


if __name__ == "__main__":
    sys.exit(main())
