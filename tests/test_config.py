"""The config file: what parses, and what is refused with a message naming key and file."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from tpmid.config import Amount, load_config, parse_amount, parse_config, parse_duration
from tpmid.errors import ConfigError

GOOD: dict[str, Any] = {
    "tpm": {"tcti": "swtpm:host=127.0.0.1,port=2321", "auth": {"owner": {"env": "OWNER_PW"}}},
    "store": {"dir": "/var/lib/tpmid"},
    "trust": {"est_anchors": ["/etc/tpmid/est-root.pem"]},
    "identities": {
        "idevid": {
            "key": {"kind": "persistent", "handle": 0x81020000, "template": "H-2"},
            "subject": {"cn": "IDevID", "serial_number": "SN-1"},
            "san": {"hardware_module_name": True},
            "est": {"url": "https://est.example/.well-known/est/idevid",
                    "auth": {"headers": {"Secret-Value": {"file": "/etc/tpmid/secret"}}}},
        },
        "ldevid": {
            "key": {"kind": "file", "alg": "ecc-p256"},
            "subject": {"cn": "my-device-id"},
            "est": {"url": "https://est.example/.well-known/est/ldevid",
                    "auth": {"client": "idevid"}},
            "renew": {"threshold": "80%", "retry": "4%", "jitter": "5%",
                      "method": "simpleenroll", "grace": "10min"},
            "hooks": {"after_renew": ["systemctl", "restart", "agent"]},
        },
        "edge-ca": {
            "key": {"kind": "file"}, "subject": {"cn": "edge"}, "profile": "ca",
            "est": {"url": "https://est.example/.well-known/est/edgeca",
                    "auth": {"client": "ldevid"}},
            "renew": {"threshold": "4day", "retry": "10min"},
        },
    },
}


def test_the_documented_example_parses_into_typed_values() -> None:
    cfg = parse_config(GOOD, "config.yaml")
    ld = cfg.identity("ldevid")
    assert ld.key.kind == "file" and ld.key.alg == "ecc-p256"
    assert ld.renew.threshold == Amount(fraction=0.8) and ld.renew.retry == Amount(fraction=0.04)
    assert ld.renew.method == "simpleenroll" and ld.renew.grace == 600
    assert ld.hooks.after_renew == ("systemctl", "restart", "agent")
    assert cfg.identity("edge-ca").renew.threshold == Amount(seconds=4 * 86400)
    assert cfg.identity("idevid").est is not None
    assert cfg.tpm.auth.owner is not None and cfg.tpm.auth.owner.env == "OWNER_PW"


def _with(path: str, value: Any) -> dict[str, Any]:
    data = copy.deepcopy(GOOD)
    *parents, last = path.split(".")
    node = data
    for p in parents:
        node = node[p]
    if value is _DELETE:
        del node[last]
    else:
        node[last] = value
    return data


_DELETE = object()

BAD = {
    "unknown top-level key": (_with("stores", {}), r"unknown key\(s\): stores"),
    "unknown nested key": (_with("identities.ldevid.renew.treshold", "80%"),
                           r"unknown key\(s\) in identities.ldevid.renew: treshold"),
    "wrong type": (_with("identities.ldevid.renew.rotate_key", "yes"),
                   r"identities.ldevid.renew.rotate_key: expected true or false"),
    "unknown key kind": (_with("identities.ldevid.key.kind", "hsm"),
                         r"identities.ldevid.key.kind: 'hsm' is not one of"),
    "missing key": (_with("identities.ldevid.key", _DELETE), r"identities.ldevid.key: is required"),
    "plain-text secret": (_with("identities.idevid.est.auth.headers",
                                {"Secret-Value": "hunter2"}),
                          r"secrets are never written in the config file"),
    "handle outside the persistent range": (_with("identities.idevid.key.handle", 0x01C00002),
                                            r"is not a persistent handle"),
    "plain http": (_with("identities.ldevid.est.url", "http://est.example/x"),
                   r"is plain HTTP; set allow_http"),
    "bootstrap from an unknown identity": (_with("identities.ldevid.est.auth",
                                                 {"client": "nobody"}),
                                           r"no identity named 'nobody'"),
    "threshold over 100 %": (_with("identities.ldevid.renew.threshold", "120%"),
                             r"between 0% and 100%"),
    "nonsense duration": (_with("identities.ldevid.renew.retry", "soon"),
                          r"'soon' is not a duration"),
    "chain without a client identity": (_with("identities.idevid.renew", {"chain": True}),
                                        r"identities.idevid.renew.chain: chaining renews"),
    "sealed hierarchy password": (_with("tpm.auth.owner", {"sealed": "owner"}),
                                  r"tpm.auth.owner: a hierarchy password cannot be a sealed"),
    "sealed name with a slash": (
        _with("identities.idevid.est.auth.headers", {"Secret-Value": {"sealed": "../x"}}),
        r"Secret-Value.sealed: '../x' is not a sealed secret name"),
    "sealed and env at once": (
        _with("identities.idevid.est.auth.headers",
              {"Secret-Value": {"sealed": "x", "env": "X"}}),
        r"give exactly one of env, file, stdin or sealed"),
    "secrets with a bad PCR": (_with("secrets", {"est": {"pcrs": [24]}}),
                               r"secrets.est.pcrs: PCR numbers are 0 to 23"),
    "secrets with a bad bank": (_with("secrets", {"est": {"pcrs": [7], "pcr_bank": "md5"}}),
                                r"secrets.est.pcr_bank: 'md5' is not one of"),
    "secrets with an unknown key": (_with("secrets", {"est": {"pcr": [7]}}),
                                    r"unknown key\(s\) in secrets.est: pcr"),
}


@pytest.mark.parametrize(("data", "message"), BAD.values(), ids=BAD.keys())
def test_bad_config_is_refused_naming_the_file_and_the_key(data: dict[str, Any],
                                                           message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        parse_config(data, "/etc/tpmid/config.yaml")
    assert str(info.value).startswith("/etc/tpmid/config.yaml")


def test_a_refused_secret_never_appears_in_the_message() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(_with("identities.idevid.est.auth.headers", {"Secret-Value": "hunter2"}),
                     "c.yaml")
    assert "hunter2" not in str(info.value)


def test_sealed_secrets_are_referenced_by_name_and_bound_to_pcrs_in_the_secrets_section(
) -> None:
    data = _with("identities.idevid.est.auth", {
        "basic": {"username": "factory", "password": {"sealed": "est-password"}},
        "headers": {"Secret-Value": {"sealed": "est.secret_1"}}})
    data["secrets"] = {"est-password": {"pcrs": [7, 0, 7]}}
    cfg = parse_config(data, "c.yaml")
    basic = cfg.identities["idevid"].est.auth.basic  # type: ignore[union-attr]
    assert basic is not None and basic.password.sealed == "est-password"
    assert basic.password.describe() == "sealed secret est-password"
    assert cfg.sealing("est-password").pcrs == (0, 7)
    assert cfg.sealing("est-password").pcr_bank == "sha256"
    assert cfg.sealing("est.secret_1").pcrs == ()  # not in the section: unbound
    assert ("identities.idevid.est.auth.headers.Secret-Value",) == tuple(
        w for w, r in cfg.secret_refs() if r.sealed == "est.secret_1")


@pytest.mark.parametrize(("text", "seconds"), [
    ("90s", 90), ("10min", 600), ("12h", 43200), ("4day", 345600), ("30d", 2592000),
    ("2w", 1209600), (45, 45), ("1.5h", 5400),
], ids=lambda v: str(v))
def test_durations_use_iot_edge_style_units(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


def test_amounts_are_a_share_of_the_lifetime_or_a_duration() -> None:
    assert parse_amount("80%", "t").of(1000) == 800
    assert parse_amount("10min", "t").of(10**9) == 600


def test_missing_config_file_says_how_to_fix_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist") as info:
        load_config(tmp_path / "nope.yaml")
    assert info.value.hint and "--config" in info.value.hint


def test_invalid_yaml_is_a_config_error_naming_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "config.yaml"
    bad.write_text("identities: [unclosed\n")
    with pytest.raises(ConfigError, match=str(bad)):
        load_config(bad)
