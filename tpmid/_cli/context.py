"""What every command function gets: :class:`Ctx` (arguments, config, runtime, output).

Every command group imports this module to build its parser, including for
``tpmid --help``; so it imports the library (config, store, composition root)
only when a command asks for it, the CLI boundary's one exception to imports at
the top (docs/architecture.md).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Mapping

from tpmid.errors import ConfigError

# `typing` costs `tpmid --help` milliseconds; annotations are strings here anyway.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from pathlib import Path
    from typing import Any

    from tpmid.config import Config
    from tpmid.wiring import Runtime

ENV_CONFIG = "TPMID_CONFIG"
ENV_TCTI = "TPMID_TCTI"


class Ctx:
    """What a command function gets: parsed arguments, config, environment, output.

    A plain class (not a dataclass): ``tpmid --help`` pays for no import it does not use.
    """

    def __init__(self, args: argparse.Namespace, environ: Mapping[str, str] | None = None,
                 ) -> None:
        self.args = args
        self.environ: Mapping[str, str] = dict(os.environ) if environ is None else environ
        self._config: Config | None = None
        self._runtime: Runtime | None = None

    @property
    def json(self) -> bool:
        """True with ``--json``."""
        return bool(getattr(self.args, "json", False))

    @property
    def config_path(self) -> Path:
        """``--config``, else ``$TPMID_CONFIG``, else /etc/tpmid/config.yaml."""
        from pathlib import Path

        from tpmid.config import DEFAULT_CONFIG_PATH

        p = self.args.config or self.environ.get(ENV_CONFIG)
        return Path(p) if p else DEFAULT_CONFIG_PATH

    def runtime(self, *, required: bool = True) -> Runtime:
        """The composition root for this command (:class:`tpmid.wiring.Runtime`)."""
        from tpmid.wiring import Runtime

        if self._runtime is None:
            self._runtime = Runtime(self.config(required=required), environ=self.environ,
                                    read_stdin=self.read_stdin)
        return self._runtime

    def config(self, *, required: bool = True, refuse_insecure: bool = True) -> Config:
        """The parsed config file; ``--tcti`` / ``TPMID_TCTI`` override ``tpm.tcti``.

        With ``required=False`` a missing *default* config file yields the
        built-in defaults (so ``tpmid tpm info --tcti ...`` works without one).
        A config file that group or others can write is refused, except with
        ``refuse_insecure=False`` (``tpmid check`` reports it instead).
        """
        import dataclasses

        from tpmid.config import Config, load_config
        from tpmid.store import check_private_path

        if self._config is None:
            explicit = self.args.config or self.environ.get(ENV_CONFIG)
            if not required and not explicit and not self.config_path.exists():
                cfg = Config()
            else:
                cfg = load_config(self.config_path)
                # Whoever can rewrite the config controls the device's identity.
                if refuse_insecure:
                    check_private_path(self.config_path, "config file", error=ConfigError)
            tcti = self.args.tcti or self.environ.get(ENV_TCTI)
            if tcti:
                cfg = dataclasses.replace(cfg, tpm=dataclasses.replace(cfg.tpm, tcti=tcti))
            self._config = cfg
        return self._config

    def forget_config(self) -> None:
        """Drop the parsed config so that the next :meth:`config` reads the file again."""
        self._config = None
        self._runtime = None

    def read_stdin(self) -> str:
        """One line from standard input (for secrets given with ``{stdin: true}``)."""
        if sys.stdin is None or sys.stdin.closed:
            raise ConfigError("a secret was expected on standard input, but there is none")
        return sys.stdin.readline()

    def emit(self, data: Any, human: Callable[[Any], str] | str | None = None) -> None:
        """Print ``data`` as JSON with ``--json``, else its human rendering."""
        import json

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
