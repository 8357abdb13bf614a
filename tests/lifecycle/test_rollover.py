"""A device across a CA rollover (RFC 7030 §4.1.3 Root CA Key Update), with no operator action.

Real swtpm, the reference EST server as a real process (``tpmid est-server run``),
the rollover made by ``tpmid est-server rollover`` (which reloads the running
server), and tpmid as real processes (the daemon, ``tpmid renew``). The order of
events:

1. the device is provisioned and enrolled under the operator CA ("old root");
2. the operator runs ``tpmid est-server rollover ldevid`` (a new root, linked by
   NewWithOld; the old root's client certificates accepted during the overlap);
3. the device's next renewal authenticates with its current certificate, gets one
   from the new CA, accepts the new root only because NewWithOld validates from its
   stored anchor, and stores the new root as its anchor;
4. after ``--finish`` the server refuses the old CA's certificates: a device that
   slept through the overlap renews through its IDevID instead, with a warning;
5. a CA replaced outright (``--replace``, no NewWithOld) or a NewWithOld that does
   not validate is refused by the device, which keeps its certificate and anchor,
   until its operator configures the new root as ``est.issuer_anchors``.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.lifecycle.test_daemon_process import Field, tpmid, wait_for
from tpmid.store import Store
from tpmid.testing.estserver import tpmid_command
from tpmid.testing.swtpm import Swtpm


def est_server(*args: str) -> str:
    """``tpmid est-server ARGS`` as the operator runs it; its standard output."""
    proc = subprocess.run(tpmid_command("est-server", *args), capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def rollover(field: Field, *args: str) -> str:
    out = est_server("rollover", "ldevid", "--dir", str(field.server.dir), *args)
    assert "applied to the running server" in out, out
    return out


def _root(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _anchor(field: Field, name: str) -> x509.Certificate:
    current = Store(field.store).current(name)
    assert current is not None
    return current.chain[-1]


@pytest.fixture
def enrolled(swtpm: Swtpm, tmp_path: Path) -> Iterator[Field]:
    f = Field(swtpm, tmp_path, ("1day", "2day"), server_process=True)
    try:
        f.provision()
        tpmid(f.config, "enroll", "ldevid", env=f.env)
        yield f
    finally:
        f.server.stop()


def _tamper_signature(path: Path) -> None:
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    der = bytearray(cert.public_bytes(serialization.Encoding.DER))
    der[-1] ^= 0x01  # the last byte of the signature value
    bad = x509.load_der_x509_certificate(bytes(der))
    path.write_bytes(bad.public_bytes(serialization.Encoding.PEM))


@pytest.mark.slow
def test_the_daemon_renews_across_a_rollover_and_stores_the_new_anchor(
    swtpm: Swtpm, tmp_path: Path,
) -> None:
    f = Field(swtpm, tmp_path, ("12s", "24s"),
              renew={"threshold": "50%", "retry": "10%", "jitter": "0%"}, server_process=True)
    log = tmp_path / "daemon.log"
    try:
        f.provision()
        proc = f.start_daemon(log)
        try:
            wait_for(log, "edge-ca: next renewal", timeout=60)
            old = _root(f.server.operator_ca)
            assert _anchor(f, "ldevid") == old and _anchor(f, "edge-ca") == old
            config = f.config.read_bytes()
            # The operator rolls the CA over; the device and its daemon are not touched.
            rollover(f)
            new = _root(f.server.operator_ca)
            assert new != old
            deadline = time.monotonic() + 60
            while (_anchor(f, "ldevid") != new or _anchor(f, "edge-ca") != new) \
                    and time.monotonic() < deadline:
                time.sleep(0.5)
            text = log.read_text()
            assert _anchor(f, "ldevid") == new, text[-3000:]
            assert _anchor(f, "edge-ca") == new, text[-3000:]
            assert proc.poll() is None  # the same daemon process, never restarted
            assert f.config.read_bytes() == config  # and nobody changed its configuration
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=15) == 0
        store = Store(f.store)
        ldevid = store.current("ldevid")
        assert ldevid is not None and ldevid.cert.issuer == new.subject
        assert "vouched for by the current anchor" in text
        assert "its trust anchor is now 'CN=tpmid Operator CA (LDevID\\, Edge CA) G2" in text
        assert "renewal failed" not in text, text[-3000:]
        # The renewal during the overlap was a re-enrollment with the old certificate.
        ops = [r["operation"] for r in f.server.issued() if r["label"] == "ldevid"]
        assert "simplereenroll" in ops
        check = tpmid(f.config, "check", env=f.env, check=False)
        assert check.returncode == 0, check.stdout + check.stderr
    finally:
        f.server.stop()


@pytest.mark.slow
def test_renewal_follows_a_second_rollover_after_the_first(enrolled: Field) -> None:
    f = enrolled
    g1 = _anchor(f, "ldevid")
    rollover(f)
    tpmid(f.config, "renew", "ldevid", "--force", env=f.env)
    g2 = _root(f.server.operator_ca)
    assert _anchor(f, "ldevid") == g2 != g1
    rollover(f)  # during the first one's overlap
    proc = tpmid(f.config, "renew", "ldevid", "--force", env=f.env)
    g3 = _root(f.server.operator_ca)
    assert _anchor(f, "ldevid") == g3 not in (g1, g2)
    assert "G3" in g3.subject.rfc4514_string()
    assert "its trust anchor is now 'CN=tpmid Operator CA (LDevID\\, Edge CA) G3," in proc.stderr
    assert "(was 'CN=tpmid Operator CA (LDevID\\, Edge CA) G2," in proc.stderr
    last = [r for r in f.server.issued() if r["label"] == "ldevid"][-1]
    assert last["operation"] == "simplereenroll"  # with the G2 certificate


@pytest.mark.slow
def test_after_the_overlap_renewal_falls_back_to_the_idevid_and_says_why(
    enrolled: Field,
) -> None:
    f = enrolled
    rollover(f)
    rollover(f, "--finish")
    proc = tpmid(f.config, "renew", "ldevid", "--force", env=f.env)
    assert "the EST server no longer accepts ldevid's certificate (TLS alert: unknown CA); " \
           "renewing through the bootstrap identity (idevid) instead" in proc.stderr
    new = _root(f.server.operator_ca)
    assert _anchor(f, "ldevid") == new
    last = [r for r in f.server.issued() if r["label"] == "ldevid"][-1]
    assert last["operation"] == "simpleenroll"
    assert last["authenticated_as"].endswith("CN=IDevID")


@pytest.mark.slow
def test_a_root_nothing_vouches_for_is_refused_until_the_operator_configures_it(
    enrolled: Field,
) -> None:
    f = enrolled
    before = Store(f.store).current("ldevid")
    assert before is not None
    old = _anchor(f, "ldevid")
    rollover(f, "--replace")  # no NewWithOld: an unrelated root
    proc = tpmid(f.config, "renew", "ldevid", "--force", env=f.env, check=False)
    assert proc.returncode == 6, proc.stderr
    assert "that /cacerts now offers, but this identity's trust anchor" in proc.stderr
    assert "/cacerts holds no NewWithOld certificate for it signed by the anchor" in proc.stderr
    assert "est.issuer_anchors" in proc.stderr
    after = Store(f.store).current("ldevid")
    assert after is not None and after.version == before.version  # kept its identity
    assert _anchor(f, "ldevid") == old  # and its anchor
    # The operator checks the new root and configures it: the renewal goes through.
    data = yaml.safe_load(f.config.read_text())
    data["identities"]["ldevid"]["est"]["issuer_anchors"] = [str(f.server.operator_ca)]
    f.config.write_text(yaml.safe_dump(data))
    tpmid(f.config, "renew", "ldevid", "--force", env=f.env)
    assert _anchor(f, "ldevid") == _root(f.server.operator_ca)


@pytest.mark.slow
def test_a_new_with_old_with_a_bad_signature_is_refused_and_the_anchor_kept(
    enrolled: Field,
) -> None:
    f = enrolled
    before = Store(f.store).current("ldevid")
    assert before is not None
    old = _anchor(f, "ldevid")
    rollover(f)
    # The server's NewWithOld damaged on disk (a fault a correct server does not make).
    _tamper_signature(f.server.dir / "rollover" / "operator" / "newwithold.pem")
    f.server.reload()
    proc = tpmid(f.config, "renew", "ldevid", "--force", env=f.env, check=False)
    assert proc.returncode == 6, proc.stderr
    assert "does not validate from the anchor: its signature does not verify with the " \
           "anchor's key" in proc.stderr
    after = Store(f.store).current("ldevid")
    assert after is not None and after.version == before.version
    assert _anchor(f, "ldevid") == old


@pytest.mark.slow
def test_a_label_that_stops_accepting_the_ldevids_ca_makes_renewal_fall_back_with_the_403(
    enrolled: Field,
) -> None:
    # The server's TLS layer still accepts the LDevID; the label's own rule no longer
    # does (403 "the TLS client certificate is not issued by ..."), as when an operator
    # stops accepting a CA.
    f = enrolled
    f.server.edit_config(
        lambda d: d["labels"]["ldevid"]["auth"]["client_cert"].update(issuers=["manufacturer"]))
    proc = tpmid(f.config, "renew", "ldevid", "--force", env=f.env)
    assert "the EST server no longer accepts ldevid's certificate (403: the TLS client " \
           "certificate is not issued by the manufacturer CA accepted at this label)" \
           in proc.stderr
    last = [r for r in f.server.issued() if r["label"] == "ldevid"][-1]
    assert last["operation"] == "simpleenroll"
    assert last["authenticated_as"].endswith("CN=IDevID")
