"""Resolve :class:`~tpmid.config.SecretRef` values.

The environment and standard input are injected by the caller (the CLI), so
library code never reads ``os.environ`` itself (STYLE.md §5). A secret file must
be a regular file readable by its owner only (0600 or stricter). Messages name
where a secret was expected, never what it contains.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Mapping

from tpmid.config import SecretRef
from tpmid.errors import ConfigError


def check_private_file(path: os.PathLike[str] | str, what: str) -> None:
    """Refuse a file that group or others can read or write."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} does not exist") from None
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"{what} {path} is not a regular file")
    if st.st_mode & 0o077:
        raise ConfigError(
            f"{what} {path} is accessible by group or others "
            f"(mode {stat.S_IMODE(st.st_mode):04o})",
            hint=f"chmod 600 {path}",
        )


def resolve_secret(
    ref: SecretRef,
    environ: Mapping[str, str],
    read_stdin: Callable[[], str] | None = None,
    unseal: Callable[[str], bytearray] | None = None,
) -> str:
    """Return the secret ``ref`` points at; raise ConfigError naming the source if absent.

    ``unseal(name)`` opens a sealed secret (``{sealed: NAME}``) with the TPM and
    returns its value in a bytearray, which is wiped here once decoded.
    """
    if ref.sealed:
        if unseal is None:
            raise ConfigError(f"sealed secret {ref.sealed} needs the TPM, which this command "
                              "does not use")
        sealed = unseal(ref.sealed)
        try:
            return sealed.decode("utf-8")
        except UnicodeDecodeError:
            raise ConfigError(f"sealed secret {ref.sealed} is not UTF-8 text",
                              hint=f"seal it again: `tpmid secret seal {ref.sealed} "
                              "--force`") from None
        finally:
            sealed[:] = bytes(len(sealed))
    if ref.env:
        value = environ.get(ref.env)
        if not value:
            raise ConfigError(f"secret expected in environment variable {ref.env}, which is not set")
        return value
    if ref.file:
        check_private_file(ref.file, "secret file")
        try:
            value = ref.file.read_text(encoding="utf-8").strip()
        except OSError as e:
            raise ConfigError(f"cannot read secret file {ref.file}: {e.strerror}") from e
        if not value:
            raise ConfigError(f"secret file {ref.file} is empty")
        return value
    if read_stdin is None:
        raise ConfigError("secret expected on standard input, but standard input is not available")
    value = read_stdin().strip()
    if not value:
        raise ConfigError("secret expected on standard input, got an empty line")
    return value
