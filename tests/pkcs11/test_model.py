"""The pure parts of PKCS#11 support: config keys, URIs, the authorization wrapping, mechanisms."""

from __future__ import annotations

import binascii
import hashlib
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from tpmid.config import DEFAULT_PKCS11_LIBRARY, parse_config
from tpmid.errors import ConfigError, TokenError
from tpmid.pkcs11.token import (
    CKM_ECDSA,
    CKM_ECDSA_SHA256,
    CKM_ECDSA_SHA384,
    ckaid_for,
    mechanisms_for,
    new_wrapping_key,
    tooling_python,
    wrap_auth,
)
from tpmid.pkcs11.uri import parse_pkcs11_uri, pkcs11_uri
from tpmid.tpm.token import seal_auth


def _config(section: Any = None, /, **ldevid: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "store": {"dir": "/var/lib/tpmid"},
        "identities": {
            "idevid": {"key": {"kind": "persistent"}, "subject": {"cn": "IDevID"}},
            "ldevid": {"key": {"kind": "file"}, "subject": {"cn": "dev"}, **ldevid},
        },
    }
    if section is not None:
        doc["pkcs11"] = section
    return doc


PIN = {"env": "PIN"}


def test_the_pkcs11_section_and_its_defaults() -> None:
    cfg = parse_config(_config({"user_pin": PIN}))
    assert cfg.pkcs11 is not None
    assert cfg.pkcs11.store == Path("/var/lib/tpmid/pkcs11")
    assert (cfg.pkcs11.token, cfg.pkcs11.so_pin, cfg.pkcs11.library) == (
        "tpmid", None, DEFAULT_PKCS11_LIBRARY)
    assert cfg.identity("ldevid").pkcs11_label == "ldevid"
    assert cfg.identity("ldevid").pkcs11.enabled
    assert parse_config(_config()).pkcs11 is None


@pytest.mark.parametrize(("doc", "message"), [
    (_config({"token": "t"}), "pkcs11.user_pin: is required"),
    (_config({"user_pin": "1234"}), "secrets are never written in the config file"),
    (_config({"user_pin": PIN, "token": "x" * 33}), "longer than a PKCS#11 token label"),
    (_config({"user_pin": PIN, "pin": PIN}), "unknown key(s) in pkcs11: pin"),
    (_config(None, pkcs11={"label": "x"}), "there is no top-level pkcs11 section"),
    (_config({"user_pin": PIN}, pkcs11={"label": "dev.next"}), "ends in '.next'"),
    (_config({"user_pin": PIN}, pkcs11={"lable": "x"}), "unknown key(s) in identities.ldevid.pkcs11"),
    (_config({"user_pin": PIN}, pkcs11={"label": "idevid"}) | {"identities": {
        "idevid": {"key": {"kind": "file"}, "subject": {"cn": "a"}},
        "ldevid": {"key": {"kind": "file"}, "subject": {"cn": "b"}, "pkcs11": {"label": "idevid"}},
    }}, "already the label of idevid"),
], ids=["no-user-pin", "plain-pin", "long-token", "unknown-key", "identity-without-section",
        "staging-suffix", "identity-unknown-key", "shared-label"])
def test_pkcs11_config_mistakes_are_named(doc: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_config(doc, "config.yaml")
    assert message in e.value.message


@pytest.mark.parametrize(("value", "enabled", "label"), [
    (False, False, "ldevid"), (True, True, "ldevid"), ({"label": "device id"}, True, "device id"),
    ({"enabled": False}, False, "ldevid")])
def test_an_identity_turns_its_key_in_the_token_on_or_off(value: Any, enabled: bool,
                                                           label: str) -> None:
    ident = parse_config(_config({"user_pin": PIN}, pkcs11=value)).identity("ldevid")
    assert (ident.pkcs11.enabled, ident.pkcs11_label) == (enabled, label)


@pytest.mark.parametrize(("args", "uri"), [
    (("tpmid", "ldevid"), "pkcs11:token=tpmid;object=ldevid;type=private"),
    (("my token", "device id"), "pkcs11:token=my%20token;object=device%20id;type=private"),
    (("t", "a;b=c?d"), "pkcs11:token=t;object=a%3Bb%3Dc%3Fd;type=private"),
    (("tpmid", None), "pkcs11:token=tpmid"),
], ids=["plain", "spaces", "reserved", "token-only"])
def test_uris_follow_rfc_7512_and_parse_back(args: tuple[str, str | None], uri: str) -> None:
    assert pkcs11_uri(*args) == uri
    parsed = parse_pkcs11_uri(uri)
    assert parsed["token"] == args[0] and parsed.get("object") == args[1]


def test_a_uri_with_a_pin_carries_it_as_pin_value() -> None:
    uri = pkcs11_uri("tpmid", "ldevid", pin="12&34")
    assert uri == "pkcs11:token=tpmid;object=ldevid;type=private?pin-value=12%2634"
    assert parse_pkcs11_uri(uri)["pin-value"] == "12&34"
    with pytest.raises(ValueError):
        parse_pkcs11_uri("file:///x")


def test_the_object_authorization_is_wrapped_as_tpm2_pkcs11_unwraps_it() -> None:
    key = new_wrapping_key()
    assert len(key) == 64 and binascii.unhexlify(key)
    iv, tag, ciphertext = wrap_auth(key, b"secret").split(":")
    # tpm2-pkcs11's AESCipher.decrypt: AES-256-GCM, iv:tag:ciphertext in hex.
    plain = AESGCM(binascii.unhexlify(key)).decrypt(bytes.fromhex(iv),
                                                     bytes.fromhex(ciphertext + tag), None)
    assert plain == b"secret"
    assert wrap_auth(key).split(":")[2] == ""  # tpmid's keys: an empty authorization


def test_the_seal_authorization_is_tpm2_pkcs11s_hash_pass() -> None:
    # tpm2_pkcs11.utils.hash_pass(pin, salt)["hash"]: sha256(pin + salt), first 32 hex digits.
    assert seal_auth("1234", "ab") == hashlib.sha256(b"1234ab").hexdigest()[:32].encode()


def test_mechanisms_follow_the_scheme_the_template_fixes() -> None:
    assert mechanisms_for("ecc", "sha256") == [CKM_ECDSA, CKM_ECDSA_SHA256]
    assert mechanisms_for("ecc", "sha384") == [CKM_ECDSA, CKM_ECDSA_SHA384]
    assert mechanisms_for("rsa", None) is None  # no fixed scheme: the tool lists them
    assert ckaid_for(b"spki") == ckaid_for(b"spki") != ckaid_for(b"other")
    assert len(ckaid_for(b"spki")) == 16


def test_the_tooling_interpreter_is_the_one_tpm2_ptool_runs_with(tmp_path: Path) -> None:
    tool = tmp_path / "tpm2_ptool"
    tool.write_text("#!/usr/bin/python3\nprint('hi')\n")
    assert tooling_python(lambda name: str(tool) if name == "tpm2_ptool" else None) == \
        "/usr/bin/python3"
    tool.write_text("#!/usr/bin/env python3\n")
    assert tooling_python(lambda name: {"tpm2_ptool": str(tool),
                                        "python3": "/opt/py/python3"}.get(name)) == \
        "/opt/py/python3"
    with pytest.raises(TokenError) as e:
        tooling_python(lambda name: None)
    assert e.value.hint == "install the Debian package libtpm2-pkcs11-tools"
