"""The server config file: what it accepts, and the errors it gives for what it does not."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from tpmid.errors import ConfigError
from tpmid.server import init_server_dir
from tpmid.server.config import (
    BasicAuthPolicy,
    ClientCertAuth,
    SecretValueAuth,
    load_server_config,
    parse_server_config,
)

BASE: dict[str, Any] = {
    "default_label": "ldevid",
    "labels": {
        "ldevid": {
            "ca": "operator",
            "profile": "ldevid",
            "lifetime": "30s",
            "auth": {"client_cert": {"issuers": ["manufacturer", "operator"]}},
        }
    },
}


def with_changes(**label: Any) -> dict[str, Any]:
    data = copy.deepcopy(BASE)
    data["labels"]["ldevid"].update(label)
    return data


def test_the_config_written_by_init_parses_with_three_labels(tmp_path: Path) -> None:
    res = init_server_dir(tmp_path / "srv")
    cfg = load_server_config(res.config_path)
    assert sorted(cfg.labels) == ["edgeca", "idevid", "ldevid"]
    assert isinstance(cfg.labels["idevid"].auth, SecretValueAuth)
    assert cfg.labels["ldevid"].auth == ClientCertAuth(issuers=("manufacturer", "operator"))
    assert cfg.labels["edgeca"].auth == ClientCertAuth(issuers=("operator",))
    assert cfg.labels["idevid"].lifetime == 20 * 365 * 86400
    assert cfg.default_label == "ldevid"
    # Every behaviour and fault is off unless asked for.
    for label in cfg.labels.values():
        assert not label.faults.active
        assert (label.pending, label.reenroll_forcing, label.libest_quirks, label.pop) == (
            0, False, False, False)


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("30s", 30), ("10min", 600), ("12h", 43200), ("7day", 604800), ("20y", 20 * 365 * 86400),
     (45, 45)],
    ids=["seconds", "minutes", "hours", "days", "years", "bare-number"],
)
def test_lifetimes_go_down_to_seconds_and_up_to_years(value: object, seconds: float) -> None:
    assert parse_server_config(with_changes(lifetime=value)).labels["ldevid"].lifetime == seconds


def test_basic_auth_and_behaviours_parse() -> None:
    cfg = parse_server_config(with_changes(
        auth={"basic": {"username": "dev", "hash": "scrypt$1$1$1$AA==$AA=="}},
        pending=2, retry_after="3s", reenroll_forcing=True, libest_quirks=True, pop=True,
        faults={"status": 503, "retry_after": 2, "operations": ["simpleenroll"], "times": 1},
        csrattrs=["1.2.840.113549.1.9.7", {"type": "1.2.840.10045.2.1",
                                            "values": ["1.3.132.0.34"]}],
    ))
    label = cfg.labels["ldevid"]
    assert label.auth == BasicAuthPolicy(username="dev", hash="scrypt$1$1$1$AA==$AA==")
    assert (label.pending, label.retry_after) == (2, 3)
    assert label.faults.status == 503 and label.faults.operations == ("simpleenroll",)
    assert label.csrattrs is not None and label.csrattrs[1].value_oids == ("1.3.132.0.34",)


@pytest.mark.parametrize(
    ("data", "complaint"),
    [
        (with_changes(lifetim="30s"), "unknown key.*lifetim"),
        (with_changes(lifetime="soon"), "not a duration"),
        (with_changes(lifetime="0s"), "at least 1 second"),
        (with_changes(ca="tls"), "not one of manufacturer, operator"),
        (with_changes(profile="server"), "not one of idevid, ldevid, edgeca"),
        (with_changes(auth={}), "exactly one of"),
        (with_changes(auth={"basic": {"username": "a"}, "anonymous": True}), "exactly one of"),
        (with_changes(auth={"client_cert": {"issuers": ["nobody"]}}), "CA names"),
        (with_changes(auth={"secret_value": {"secret": "hunter2"}}), "hash: is required"),
        (with_changes(auth={"basic": {"username": "a:b", "hash": "x"}}), "must not contain ':'"),
        (with_changes(pending=-1), "whole number"),
        (with_changes(faults={"status": 42}), "HTTP status"),
        (with_changes(faults={"operations": ["enroll"]}), "expected a list from"),
        (with_changes(csrattrs=["not.an.oid"]), "not a dotted OID|not a valid OID"),
        ({**BASE, "default_label": "nope"}, "not one of the labels"),
        ({**BASE, "labels": {"cacerts": BASE["labels"]["ldevid"]}}, "not a usable label"),
        ({**BASE, "labels": {}}, "at least one label"),
        ({**BASE, "tls": {"min_version": "1.1"}}, "not one of 1.2, 1.3"),
        ({**BASE, "tls": {"min_version": "1.3", "max_version": "1.2"}}, "above max_version"),
    ],
    ids=["typo-key", "bad-duration", "zero-lifetime", "tls-ca-for-label", "unknown-profile",
         "no-auth", "two-auths", "unknown-issuer", "plaintext-secret", "colon-in-user",
         "negative-pending", "bad-status", "unknown-operation", "bad-oid", "bad-default-label",
         "operation-as-label", "no-labels", "tls-1.1", "tls-min-above-max"],
)
def test_config_mistakes_are_rejected_naming_the_key(data: dict[str, Any],
                                                     complaint: str) -> None:
    with pytest.raises(ConfigError, match=complaint):
        parse_server_config(data, "server.yaml")


def test_missing_config_file_says_how_to_create_one(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_server_config(tmp_path / "config.yaml")
    assert "tpmid est-server init" in (info.value.hint or "")


def test_invalid_yaml_is_a_config_error(tmp_path: Path) -> None:
    p = tmp_path / "config.yaml"
    p.write_text("labels: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_server_config(p)

