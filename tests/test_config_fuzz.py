"""Every key of a complete config, fed every kind of bad value: a ConfigError, never a crash.

The config is the one input an operator (or whoever can write the file) fully
controls. Whatever a key holds — the wrong type, NaN or infinity, a negative or
astronomically large number, a megabyte of text, control characters, an
impossible port — parsing either accepts it or raises ConfigError with a message;
it never raises anything else, and it never takes long.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tpmid.config import load_config, parse_config
from tpmid.errors import ConfigError
from tpmid.server.config import load_server_config, parse_server_config

FULL: dict[str, Any] = {
    "tpm": {"tcti": "swtpm:host=127.0.0.1,port=2321", "timeout": "30s", "lock_timeout": "1min",
            "lock_file": "/run/tpmid/tpm.lock",
            "auth": {"owner": {"env": "OWNER_PW"}, "endorsement": {"file": "/etc/e"},
                     "lockout": {"stdin": True}}},
    "store": {"dir": "/var/lib/tpmid"},
    "trust": {"est_anchors": ["/etc/tpmid/est-root.pem"], "use_system_store": False},
    "identities": {
        "idevid": {
            "key": {"kind": "persistent", "handle": 0x81020000, "template": "H-2"},
            "subject": {"cn": "IDevID", "o": "Org", "ou": "Unit", "serial_number": "SN-1"},
            "san": {"dns": ["dev.example"], "ip": ["192.0.2.1"], "uri": ["urn:dev:1"],
                    "hardware_module_name": True},
            "est": {"url": "https://est.example:8443/.well-known/est/idevid",
                    "auth": {"headers": {"Secret-Value": {"file": "/etc/tpmid/secret"}},
                             "basic": {"username": "u", "password": {"env": "PW"}}},
                    "trust_anchors": ["/etc/a.pem"], "issuer_anchors": ["/etc/b.pem"],
                    "allow_http": False, "pop": False, "max_wait": "5min",
                    "timeout": {"connect": 10, "read": 60, "total": "2min"},
                    "accept_rewritten_subject": False, "accept_cmc_ra": False},
        },
        "ldevid": {
            "key": {"kind": "file", "alg": "ecc-p256"},
            "subject": {"cn": "my-device-id"},
            "profile": "device",
            "est": {"url": "https://est.example/.well-known/est/ldevid",
                    "auth": {"client": "idevid"},
                    "pin": "ab" * 32},
            "renew": {"threshold": "80%", "retry": "4%", "jitter": "2%", "rotate_key": True,
                      "method": "simplereenroll", "grace": "10min", "chain": False},
            "hooks": {"after_renew": ["systemctl", "restart", "agent"],
                      "environment": ["LANG"]},
        },
        "edge-ca": {
            "key": {"kind": "ek-derived", "template": "H-3"}, "subject": {"cn": "edge"},
            "est": {"url": "https://est.example/.well-known/est/edgeca",
                    "auth": {"client": {"cert": "/etc/c.pem", "key": "/etc/k.pem"}}},
        },
    },
}

BAD_VALUES: list[tuple[str, Any]] = [
    ("none", None), ("true", True), ("zero", 0), ("negative", -1), ("float", 2.5),
    ("nan", math.nan), ("inf", math.inf), ("minus-inf", -math.inf), ("huge-int", 10**40),
    ("huge-float", 1e300), ("empty-string", ""), ("megabyte", "x" * 1_000_000),
    ("control-chars", "a\x00b\x1b[31m"), ("list", [1, "two", None]), ("mapping", {"k": "v"}),
    ("port-99999", "https://127.0.0.1:99999/x"), ("percent", "150%"), ("duration", "9999999999d"),
    ("date", "2026-01-01"), ("unicode", "ü" * 100),
]


def _leaves(doc: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield path + (k,)
            yield from _leaves(v, path + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from _leaves(v, path + (i,))


def _with(doc: dict[str, Any], path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    out = copy.deepcopy(doc)
    node: Any = out
    for p in path[:-1]:
        node = node[p]
    node[path[-1]] = value
    return out


PATHS = list(_leaves(FULL))
# Keys where these values must be refused, not merely survived.
NUMERIC = {("tpm", "timeout"), ("tpm", "lock_timeout"),
           ("identities", "idevid", "est", "max_wait"),
           ("identities", "idevid", "est", "timeout", "connect"),
           ("identities", "idevid", "est", "timeout", "read"),
           ("identities", "idevid", "est", "timeout", "total"),
           ("identities", "ldevid", "renew", "threshold"),
           ("identities", "ldevid", "renew", "retry"), ("identities", "ldevid", "renew", "jitter"),
           ("identities", "ldevid", "renew", "grace")}


def test_the_full_config_is_valid() -> None:
    parse_config(FULL, "full")


@pytest.mark.parametrize("path", PATHS, ids=[".".join(map(str, p)) for p in PATHS])
def test_every_key_survives_every_bad_value(path: tuple[Any, ...]) -> None:
    for name, value in BAD_VALUES:
        try:
            parse_config(_with(FULL, path, value), "fuzz")
        except ConfigError as e:
            assert e.message and len(e.message) < 2000, (name, e.message[:200])
        except Exception as e:  # anything else is a crash a device would show as a traceback
            raise AssertionError(f"{'.'.join(map(str, path))} = {name}: "
                                 f"{type(e).__name__}: {e}") from e
        if path in NUMERIC and name in ("nan", "inf", "minus-inf", "negative", "huge-int",
                                        "huge-float", "duration", "megabyte"):
            with pytest.raises(ConfigError):
                parse_config(_with(FULL, path, value), "fuzz")


@pytest.mark.parametrize("content", [
    b"\x00\xff\xfe\x00binary" * 40, b"\xef\xbb\xbf" + b"a: [" * 5000, b"key: &a [*a]\n",
    b"- " * 100000, "tpm: {tcti: \u0000}".encode(), b"x" * (2 << 20),
], ids=["binary", "deep-nesting", "self-alias", "deep-list", "nul-in-yaml", "over-a-megabyte"])
def test_unreadable_config_files_are_config_errors(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "config.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError):
        load_config(path)
    with pytest.raises(ConfigError):
        load_server_config(path)


SERVER_FULL: dict[str, Any] = yaml.safe_load("""
default_label: ldevid
tls: {min_version: "1.2", max_version: "1.3"}
max_body: 65536
labels:
  ldevid:
    ca: operator
    profile: ldevid
    lifetime: 7day
    auth: {client_cert: {issuers: [manufacturer, operator]}}
    pending: 1
    retry_after: 5s
    reenroll_forcing: false
    libest_quirks: false
    pop: false
    allow_sha1_csr: false
    serverkeygen: true
    csrattrs: ["1.2.840.113549.1.9.7"]
    faults: {status: 503, retry_after: 3s, delay: 1s, trickle: 1s, oversize: 10,
             subject: "CN=x", operations: [simpleenroll], times: 1}
  idevid:
    ca: manufacturer
    profile: idevid
    lifetime: 20y
    auth: {basic: {username: u, hash: "scrypt$16384$8$1$AAAA$BBBB"}}
""")
SERVER_PATHS = list(_leaves(SERVER_FULL))


def test_the_full_server_config_is_valid() -> None:
    parse_server_config(SERVER_FULL, "full")


@pytest.mark.parametrize("path", SERVER_PATHS, ids=[".".join(map(str, p)) for p in SERVER_PATHS])
def test_every_server_key_survives_every_bad_value(path: tuple[Any, ...]) -> None:
    for name, value in BAD_VALUES:
        try:
            parse_server_config(_with(SERVER_FULL, path, value), "fuzz")
        except ConfigError:
            pass
        except Exception as e:
            raise AssertionError(f"{'.'.join(map(str, path))} = {name}: "
                                 f"{type(e).__name__}: {e}") from e
