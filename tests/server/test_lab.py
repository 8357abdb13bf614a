"""``tpmid est-server label`` and ``init --tls-from``: a running server driven from the command line.

The integration tests run a real ``tpmid est-server run`` process and a device (a
swtpm, a provisioned IDevID) that enrolls its LDevID through each change.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from tests.server.helpers import request
from tpmid.cli import main
from tpmid.errors import ConfigError
from tpmid.server import init_server_dir
from tpmid.server.lab import LabChange, apply_change, parse_fault, update_label
from tpmid.testing.estserver import (
    SECRET_ENV,
    RunningEstServer,
    device_config,
    tpmid_command,
    write_device_config,
)
from tpmid.testing.swtpm import Swtpm

# --------------------------------------------------------------------------- pure parts

FAULTS = [
    ("status=503", ("status", 503)),
    ("delay=2s", ("delay", "2s")),
    ("drop", ("drop", True)),
    ("drop=false", ("drop", False)),
    ("retry-after=3s", ("retry_after", "3s")),
    ("operations=simpleenroll,simplereenroll", ("operations", ["simpleenroll", "simplereenroll"])),
    ("subject=CN=someone-else,O=x", ("subject", "CN=someone-else,O=x")),
    ("times=1", ("times", 1)),
]


@pytest.mark.parametrize(("text", "parsed"), FAULTS, ids=[t for t, _ in FAULTS])
def test_fault_options_read_as_config_yaml_spells_them(text: str, parsed: tuple[str, Any]) -> None:
    assert parse_fault(text) == parsed


BAD_FAULTS = [
    ("bogus=1", "unknown fault 'bogus'"),
    ("status=abc", "status takes a whole number"),
    ("status", "status needs a value, e.g. status=503"),
    ("drop=maybe", "drop is on or off"),
]


@pytest.mark.parametrize(("text", "message"), BAD_FAULTS, ids=[t for t, _ in BAD_FAULTS])
def test_bad_fault_options_are_clear_errors(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_fault(text)
    assert message in e.value.message
    assert e.value.hint


CONFIG = {"labels": {"ldevid": {"lifetime": "7day", "faults": {"delay": "1s"}},
                     "idevid": {"lifetime": "20y"}}}
CHANGES = [
    ("lifetime-and-pending", {}, LabChange(lifetime="10m", pending=2, retry_after="3s"),
     {"ldevid": {"lifetime": "10m", "pending": 2, "retry_after": "3s"}}),
    ("a-fault-adds-to-the-config-files-faults", {}, LabChange(faults={"status": 503}),
     {"ldevid": {"faults": {"delay": "1s", "status": 503}}}),
    ("clear-faults-switches-off-the-files-too", {"ldevid": {"lifetime": "1h"}},
     LabChange(clear_faults=True), {"ldevid": {"lifetime": "1h", "faults": {}}}),
    ("clear-then-add", {"ldevid": {"faults": {"drop": True}}},
     LabChange(clear_faults=True, faults={"status": 503}), {"ldevid": {"faults": {"status": 503}}}),
    ("reset-drops-the-labels-overrides-only", {"ldevid": {"lifetime": "1h"}, "idevid": {"pending": 1}},
     LabChange(reset=True), {"idevid": {"pending": 1}}),
]


@pytest.mark.parametrize(("lab", "change", "after"), [c[1:] for c in CHANGES],
                         ids=[c[0] for c in CHANGES])
def test_changes_merge_into_the_lab_overrides(lab: dict[str, Any], change: LabChange,
                                              after: dict[str, Any]) -> None:
    assert apply_change(CONFIG, lab, "ldevid", change, "lab.yaml") == after


def test_a_change_to_an_unknown_label_names_the_labels_there_are() -> None:
    with pytest.raises(ConfigError, match=r"no label 'nope' \(labels: idevid, ldevid\)"):
        apply_change(CONFIG, {}, "nope", LabChange(pending=1), "lab.yaml")


def test_a_bad_value_is_refused_before_anything_is_written(tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    d = init_server_dir(tmp_path / "srv").dir
    assert main(["est-server", "label", "ldevid", "--dir", str(d), "--lifetime", "10 parsecs"]) == 2
    err = capsys.readouterr().err
    assert "label ldevid not changed" in err and "labels.ldevid.lifetime" in err
    assert "Traceback" not in err
    assert not (d / "lab.yaml").exists()


@pytest.mark.parametrize("command", ["run", "label"])
def test_a_directory_without_a_server_is_a_clear_error_and_stays_untouched(
        command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["est-server", command, *(["ldevid"] if command == "label" else []), "--dir"]
    assert main([*args, str(tmp_path / "missing")]) == 2
    assert main([*args, str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "holds no EST server" in err
    # The hint names the directory asked for, so it can be pasted as it is.
    assert f"hint: create one with: tpmid est-server init --dir {tmp_path / 'missing'}\n" in err
    assert f"hint: create one with: tpmid est-server init --dir {tmp_path}\n" in err
    assert os.listdir(tmp_path) == []


def test_without_options_the_command_shows_the_label(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    d = init_server_dir(tmp_path / "srv").dir
    assert main(["est-server", "label", "edgeca", "--dir", str(d), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert (data["label"], data["lifetime_s"], data["changed"], data["server"]) == (
        "edgeca", 30 * 86400, False, None)


# --------------------------------------------------------------------------- a running server


@dataclass
class LabDevice:
    """A running server process and a provisioned device that enrolls against it."""

    server: RunningEstServer
    config: Path
    capsys: pytest.CaptureFixture[str]

    def label(self, *args: str) -> dict[str, Any]:
        """``tpmid est-server label ldevid --dir DIR ARGS --json`` in this process."""
        self.capsys.readouterr()
        rc = main(["est-server", "label", "ldevid", "--dir", str(self.server.dir), *args, "--json"])
        out = self.capsys.readouterr().out
        assert rc == 0, out
        return json.loads(out)

    def enroll(self) -> tuple[int, dict[str, Any], str, float]:
        """``tpmid enroll ldevid --json``: exit code, JSON, stderr, seconds taken."""
        self.capsys.readouterr()
        start = time.monotonic()
        rc = main(["enroll", "ldevid", "-c", str(self.config), "--json"])
        took = time.monotonic() - start
        out, err = self.capsys.readouterr()
        return rc, json.loads(out), err, took

    def lifetime(self, enrolled: dict[str, Any]) -> float:
        cert = x509.load_pem_x509_certificate(Path(enrolled["cert_path"]).read_bytes())
        return (cert.not_valid_after_utc - cert.not_valid_before_utc).total_seconds()


@pytest.fixture
def lab_device(swtpm: Swtpm, est_server_factory: Callable[..., RunningEstServer],
               tmp_path: Path, capsys: pytest.CaptureFixture[str],
               monkeypatch: pytest.MonkeyPatch) -> Iterator[LabDevice]:
    server = est_server_factory(process=True)
    doc = device_config(server, tcti=swtpm.tcti, store=tmp_path / "store", serial="LAB-0001")
    doc["identities"]["ldevid"]["est"]["max_wait"] = "30s"
    config = write_device_config(tmp_path / "device.yaml", doc)
    for name in ("TPMID_CONFIG", "TPMID_TCTI"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(SECRET_ENV, server.secret)
    assert main(["provision", "-c", str(config), "--json"]) == 0, capsys.readouterr()
    yield LabDevice(server, config, capsys)


def test_lifetime_applies_to_the_next_enrollment_of_a_running_server(lab_device: LabDevice) -> None:
    data = lab_device.label("--lifetime", "10m")
    assert data["server"]["pid"] == lab_device.server.process.pid  # type: ignore[union-attr]
    rc, enrolled, err, _ = lab_device.enroll()
    assert rc == 0, err
    assert lab_device.lifetime(enrolled) == 600

    lab_device.label("--reset")
    rc, enrolled, err, _ = lab_device.enroll()
    assert rc == 0, err
    assert lab_device.lifetime(enrolled) == 7 * 86400


def test_status_and_drop_faults_fail_enrollments_until_cleared(lab_device: LabDevice) -> None:
    lab_device.label("--fault", "status=503", "--fault", "operations=simpleenroll")
    rc, answer, err, _ = lab_device.enroll()
    assert rc == 4 and "503" in answer["message"], err

    assert lab_device.label("--clear-faults", "--fault", "drop")["faults"] == {"drop": True}
    rc, answer, err, _ = lab_device.enroll()
    assert rc == 4, err
    log = (lab_device.server.dir / "run.log").read_text()
    assert "status=- " in log and "connection closed without an answer" in log

    assert lab_device.label("--clear-faults")["faults"] == {}
    rc, enrolled, err, _ = lab_device.enroll()
    assert rc == 0, err
    assert [r["label"] for r in lab_device.server.issued()] == ["idevid", "ldevid"]


@pytest.mark.slow
def test_delay_and_pending_answers_slow_an_enrollment_that_still_succeeds(
        lab_device: LabDevice) -> None:
    lab_device.label("--fault", "delay=2s", "--fault", "operations=simpleenroll")
    rc, _, err, took = lab_device.enroll()
    assert rc == 0, err
    assert took >= 2

    lab_device.label("--clear-faults", "--pending", "2", "--retry-after", "3s")
    rc, _, err, took = lab_device.enroll()
    assert rc == 0, err
    assert took >= 6  # two 202 answers, each with Retry-After: 3
    log = (lab_device.server.dir / "run.log").read_text()
    assert log.count("label=ldevid status=202") == 2


def test_the_command_line_runs_the_label_command_with_json_after_it(lab_device: LabDevice) -> None:
    proc = subprocess.run(
        tpmid_command("est-server", "label", "ldevid", "--dir", str(lab_device.server.dir),
                      "--pending", "1", "--json"),
        capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["pending"] == 1 and data["server"] is not None
    assert "pending: 1" in (lab_device.server.dir / "lab.yaml").read_text()


def test_a_change_without_a_running_server_applies_when_it_starts(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    res = init_server_dir(tmp_path / "srv")
    assert main(["est-server", "label", "ldevid", "--dir", str(res.dir),
                 "--fault", "status=503"]) == 0
    assert "no server runs for this directory" in capsys.readouterr().out
    stdout = tmp_path / "run.out"
    with open(stdout, "wb") as out:
        proc = subprocess.Popen(tpmid_command("est-server", "run", "--dir", str(res.dir),
                                              "--port", "0"), stdout=out,
                                stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while "listening on" not in stdout.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)
        url = stdout.read_text().split("listening on ")[1].split()[0]
        reply = request(url + ".well-known/est/ldevid/cacerts", cafile=res.tls_ca_path)
        assert reply.status == 503
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)
    assert not (res.dir / "run.json").exists()


def test_a_killed_server_is_never_signalled_through_its_stale_run_file(
        est_server_factory: Callable[..., RunningEstServer]) -> None:
    server = est_server_factory(process=True)
    assert server.process is not None
    run = json.loads((server.dir / "run.json").read_text())
    assert run["pid"] == server.process.pid
    server.process.kill()
    server.process.wait()
    # run.json stays behind; its lock died with the process, so nothing is signalled.
    result = update_label(server.dir, "ldevid", LabChange(pending=1))
    assert result.server is None and result.label.pending == 1


def test_a_second_server_for_the_same_directory_is_refused(
        est_server_factory: Callable[..., RunningEstServer]) -> None:
    server = est_server_factory(process=True)
    proc = subprocess.run(tpmid_command("est-server", "run", "--dir", str(server.dir),
                                        "--port", "0"),
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode != 0
    assert f"another EST server runs for {server.dir}" in proc.stderr
    assert f"pid {server.process.pid}" in proc.stderr  # type: ignore[union-attr]


def test_the_fixture_lab_method_changes_an_in_process_server(
        fresh_est_server: RunningEstServer) -> None:
    label = fresh_est_server.lab("ldevid", faults={"status": 503})
    assert label.faults.status == 503
    url = fresh_est_server.url("ldevid", "cacerts")
    assert request(url, cafile=fresh_est_server.tls_ca).status == 503
    fresh_est_server.lab("ldevid", clear_faults=True)
    assert request(url, cafile=fresh_est_server.tls_ca).status == 200


# --------------------------------------------------------------------------- init --tls-from


def _fingerprint(path: Path) -> str:
    return x509.load_pem_x509_certificate(path.read_bytes()).fingerprint(hashes.SHA256()).hex()


def test_a_pinned_bootstrap_works_against_tls_from_and_not_against_a_separate_tls_ca(
        est_server_factory: Callable[..., RunningEstServer],
        capsys: pytest.CaptureFixture[str]) -> None:
    stock = est_server_factory()
    pinned = est_server_factory(init_args={"tls_from": "ldevid"})
    assert _fingerprint(pinned.tls_ca) == _fingerprint(pinned.operator_ca)
    for server, expected in ((stock, 6), (pinned, 0)):
        capsys.readouterr()
        rc = main(["est", "cacerts", server.url("ldevid"), "--pin",
                   _fingerprint(server.operator_ca), "--json"])
        assert rc == expected, capsys.readouterr()


def test_an_ldevid_enrolls_with_only_a_pin_against_a_tls_from_server(
        swtpm: Swtpm, est_server_factory: Callable[..., RunningEstServer], tmp_path: Path,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    server = est_server_factory(init_args={"tls_from": "ldevid"})
    doc = device_config(server, tcti=swtpm.tcti, store=tmp_path / "store", serial="PIN-0001")
    del doc["trust"]  # no trust anchor for the LDevID's server: only the pin
    doc["identities"]["idevid"]["est"]["trust_anchors"] = [str(server.tls_ca)]
    doc["identities"]["ldevid"]["est"]["pin"] = _fingerprint(server.operator_ca)
    config = write_device_config(tmp_path / "device.yaml", doc)
    monkeypatch.setenv(SECRET_ENV, server.secret)
    monkeypatch.delenv("TPMID_TCTI", raising=False)
    assert main(["provision", "-c", str(config)]) == 0, capsys.readouterr()
    assert main(["enroll", "ldevid", "-c", str(config), "--json"]) == 0, capsys.readouterr()
    assert [r["label"] for r in server.issued()] == ["idevid", "ldevid"]


def test_init_tls_from_an_unknown_label_is_a_clear_error(tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["est-server", "init", "--dir", str(tmp_path / "srv"), "--tls-from", "nope"])
    assert "invalid choice: 'nope'" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="not a label of a new server"):
        init_server_dir(tmp_path / "srv2", tls_from="nope")
    assert os.listdir(tmp_path) == []
