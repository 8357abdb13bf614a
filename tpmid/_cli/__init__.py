"""Command groups of the ``tpmid`` CLI, one module each.

Each module exposes ``register(sub)`` which adds its subparsers to the
``argparse`` sub-parser action and sets ``func`` on each. Command functions take
a :class:`tpmid.cli.Ctx` and return an exit code (or None for 0). Keep imports of
heavy libraries inside the functions.
"""

from __future__ import annotations

import argparse
import importlib

# Order here is the order in `tpmid --help`.
MODULES = ("tpm", "key", "est", "lifecycle", "status", "provision", "est_server", "pkcs11",
           "aziot")


def add_json_flag(p: argparse.ArgumentParser) -> None:
    """Accept ``--json`` after the subcommand too (same meaning as the global flag)."""
    p.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                   help="machine-readable output on stdout")


def register_all(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add every command group that exists to ``sub``."""
    for name in MODULES:
        try:
            mod = importlib.import_module(f"tpmid._cli.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"tpmid._cli.{name}":
                continue  # group not built yet
            raise
        mod.register(sub)
