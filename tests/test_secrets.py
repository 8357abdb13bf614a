"""Resolving secret references (tpmid.secrets, tpmid.wiring.Runtime): the sealed kind."""

from __future__ import annotations

from pathlib import Path

import pytest

from tpmid.config import Config, SecretRef, StoreConfig
from tpmid.errors import ConfigError, StoreError
from tpmid.secrets import resolve_secret
from tpmid.wiring import Runtime


def test_a_sealed_reference_is_unsealed_and_the_unsealed_bytes_are_wiped() -> None:
    handed_out: list[bytearray] = []

    def unseal(name: str) -> bytearray:  # the seam Runtime fills with the TPM
        handed_out.append(bytearray(f"pw-of-{name}".encode()))
        return handed_out[-1]

    assert resolve_secret(SecretRef(sealed="est"), {}, None, unseal) == "pw-of-est"
    assert handed_out[0] == bytes(len("pw-of-est"))  # zeroed once decoded


def test_a_sealed_reference_without_a_tpm_says_so() -> None:
    with pytest.raises(ConfigError, match="sealed secret est needs the TPM"):
        resolve_secret(SecretRef(sealed="est"), {})


def test_a_sealed_value_that_is_not_text_is_refused_with_a_hint() -> None:
    with pytest.raises(ConfigError, match="is not UTF-8 text") as e:
        resolve_secret(SecretRef(sealed="est"), {}, None, lambda _: bytearray(b"\xff\xfe"))
    assert e.value.hint and "tpmid secret seal est --force" in e.value.hint


def test_runtime_names_the_missing_sealed_secret_before_touching_the_tpm(tmp_path: Path) -> None:
    rt = Runtime(Config(store=StoreConfig(dir=tmp_path / "store")))
    with pytest.raises(StoreError, match="no sealed secret named 'est'") as e:
        rt.secret(SecretRef(sealed="est"))
    assert e.value.hint and "tpmid secret seal est" in e.value.hint
