"""The composition root: tpmid's objects built from one config and one process environment.

The CLI, the daemon and the provisioning station build what a workflow needs
here and hand it over; workflows (:mod:`tpmid.lifecycle`) receive objects (a
:class:`~tpmid.store.Store`, a TPM opener, an EST client factory, a secret
resolver), never paths or environments to build them from.

* :class:`Runtime` (this module, cheap to import): the config, the environment,
  secrets, the store, identity keys, the hooks' base environment;
* :mod:`tpmid.wiring.tpm`: the TPM opener (host lock, hierarchy passwords);
* :mod:`tpmid.wiring.est`: the EST client factory (trust, TLS client identity,
  credentials, HTTP session).

The two submodules load the TPM stack and the HTTP stack. They are the one
place where tpmid imports lazily: the CLI imports each inside the command that
needs it, so ``tpmid status`` and ``tpmid --help`` never pay for them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from tpmid.config import Config, IdentityConfig, SecretRef
from tpmid.errors import ConfigError
from tpmid.secrets import resolve_secret
from tpmid.store import TPM_LOCK_NAME, Store
from tpmid.store.sealed import SealedSecrets
from tpmid.tpm.identity import IdentityKey, identity_key

if TYPE_CHECKING:
    from tpmid.tpm.connection import TpmOpener

SecretResolver = Callable[[SecretRef], str]

# What hooks inherit from tpmid's environment besides what hooks.environment lists:
# enough to find programs and format text, nothing that could hold a secret.
HOOK_BASE_VARIABLES = ("PATH", "LANG", "LC_ALL", "TZ")
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"



@dataclass
class Runtime:
    """tpmid's objects for one config and one process environment.

    ``environ`` is the process environment (injected: library code never reads
    ``os.environ``); ``read_stdin`` reads one line for ``{stdin: true}`` secrets;
    ``open_tpm`` opens the TPM for ``{sealed: NAME}`` secrets (set by
    :func:`tpmid.wiring.tpm.tpm_opener`, the first time a command builds one).
    """

    config: Config
    environ: Mapping[str, str] = field(default_factory=dict)
    read_stdin: Callable[[], str] | None = None
    open_tpm: TpmOpener | None = field(default=None, repr=False)
    _store: Store | None = field(default=None, repr=False)
    _stdin_line: str | None = field(default=None, repr=False)

    def secret(self, ref: SecretRef) -> str:
        """Resolve a secret reference (the :data:`SecretResolver` every workflow gets).

        Standard input is read once per process: every ``{stdin: true}`` reference
        gets that line (a pre-flight check and the request itself both resolve it).
        A sealed secret is unsealed each time it is asked for, never kept here.
        """
        return resolve_secret(ref, self.environ, self._stdin_once if self.read_stdin else None,
                              self._unseal)

    def sealed_secrets(self) -> SealedSecrets:
        """The sealed secrets of ``store.dir`` (``<store>/sealed``); creates nothing."""
        return SealedSecrets(Path(self.config.store.dir))

    def _unseal(self, name: str) -> bytearray:
        blob = self.sealed_secrets().load(name)
        if self.open_tpm is None:
            raise ConfigError(f"sealed secret {name} needs the TPM, which this command does "
                              "not use")
        with self.open_tpm() as tpm:
            return tpm.unseal_secret(blob)

    def _stdin_once(self) -> str:
        if self._stdin_line is None:
            assert self.read_stdin is not None
            self._stdin_line = self.read_stdin()
        return self._stdin_line

    def store(self) -> Store:
        """The store of ``store.dir``, created if it does not exist yet."""
        if self._store is None:
            self._store = Store(self.config.store.dir)
        return self._store

    def existing_store(self) -> Store | None:
        """The store for reading, or None if its directory does not exist yet (creates nothing)."""
        if self._store is not None:
            return self._store
        root = Path(self.config.store.dir)
        if not root.is_dir():
            return None
        return Store(root, create=False)

    def key(self, name: str) -> IdentityKey:
        """The :class:`IdentityKey` of identity ``name``."""
        return identity_key(self.config.identity(name))

    def tpm_lock_path(self) -> Path | None:
        """``tpm.lock_file``, else the store's TPM lock once the store exists.

        Every tpmid process of one store (CLI and daemon) then takes turns at a TPM
        that has no resource manager; without a store there is nobody to collide with.
        """
        if self.config.tpm.lock_file is not None:
            return Path(self.config.tpm.lock_file)
        locks = Path(self.config.store.dir) / "locks"
        return locks / TPM_LOCK_NAME if locks.is_dir() else None

    def hierarchy_passwords(self) -> dict[str, bytes]:
        """The configured hierarchy passwords (owner, endorsement, lockout), resolved."""
        values: dict[str, bytes] = {}
        for name in ("owner", "endorsement", "lockout"):
            ref = getattr(self.config.tpm.auth, name)
            if ref is not None:
                values[name] = self.secret(ref).encode("utf-8")
        return values

    def hook_environment(self, ident: IdentityConfig, extra: Mapping[str, str]
                         ) -> dict[str, str]:
        """The environment a hook of ``ident`` runs with.

        Never tpmid's whole environment: it may hold EST secrets (``{env: ...}``)
        and hierarchy passwords. A hook gets :data:`HOOK_BASE_VARIABLES`, the
        names the identity lists in ``hooks.environment``, and ``extra``
        (``TPMID_IDENTITY``, ``TPMID_CERT``, ...).
        """
        names = (*HOOK_BASE_VARIABLES, *ident.hooks.environment)
        env = {k: self.environ[k] for k in names if k in self.environ}
        env.setdefault("PATH", DEFAULT_PATH)
        env.update(extra)
        return env
