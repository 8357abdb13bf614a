"""A device across a CA rollover (RFC 7030 §4.1.3 Root CA Key Update), with no operator action.

Real swtpm, the reference EST server (in this test process, real TLS on loopback)
and tpmid as real processes (the daemon, ``tpmid renew``). The order of events:

1. the device is provisioned and enrolled under the operator CA ("old root");
2. the operator runs ``tpmid est-server rollover ldevid`` (a new root, linked by
   NewWithOld; the old root's client certificates accepted during the overlap);
3. the device's next renewal authenticates with its current certificate, gets one
   from the new CA, accepts the new root only because NewWithOld validates from its
   stored anchor, and stores the new root as its anchor;
4. after ``--finish`` the server refuses the old CA's certificates: a device that
   slept through the overlap renews through its IDevID instead, with a warning;
5. a CA replaced outright (``--replace``, no NewWithOld) is refused by the device
   until its operator configures the new root as ``est.issuer_anchors``.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from cryptography import x509

from tests.lifecycle.test_daemon_process import Field, tpmid, wait_for
from tpmid.server.rollover import finish_overlap, rollover_ca
from tpmid.store import Store
from tpmid.testing.swtpm import Swtpm


def _root(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _anchor(field: Field, name: str) -> x509.Certificate:
    current = Store(field.store).current(name)
    assert current is not None
    return current.chain[-1]


@pytest.fixture
def enrolled(swtpm: Swtpm, tmp_path: Path) -> Iterator[Field]:
    f = Field(swtpm, tmp_path, ("1day", "2day"))
    try:
        f.provision()
        tpmid(f.config, "enroll", "ldevid", env=f.env)
        yield f
    finally:
        f.server.stop()


@pytest.mark.slow
def test_the_daemon_renews_across_a_rollover_and_stores_the_new_anchor(
    swtpm: Swtpm, tmp_path: Path,
) -> None:
    f = Field(swtpm, tmp_path, ("12s", "24s"),
              renew={"threshold": "50%", "retry": "10%", "jitter": "0%"})
    log = tmp_path / "daemon.log"
    try:
        f.provision()
        proc = f.start_daemon(log)
        try:
            wait_for(log, "edge-ca: next renewal", timeout=60)
            old = _root(f.server.operator_ca)
            assert _anchor(f, "ldevid") == old and _anchor(f, "edge-ca") == old
            # The operator rolls the CA over; the device is not touched.
            rollover_ca(f.server.dir, "ldevid")
            f.server.reload()
            new = _root(f.server.operator_ca)
            deadline = time.monotonic() + 60
            while (_anchor(f, "ldevid") != new or _anchor(f, "edge-ca") != new) \
                    and time.monotonic() < deadline:
                time.sleep(0.5)
            text = log.read_text()
            assert _anchor(f, "ldevid") == new, text[-3000:]
            assert _anchor(f, "edge-ca") == new, text[-3000:]
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


def test_after_the_overlap_renewal_falls_back_to_the_idevid_and_says_why(
    enrolled: Field,
) -> None:
    f = enrolled
    rollover_ca(f.server.dir, "ldevid")
    finish_overlap(f.server.dir, "ldevid")
    f.server.reload()
    proc = tpmid(f.config, "renew", "ldevid", "--force", env=f.env)
    assert "the EST server no longer accepts ldevid's certificate (TLS alert: unknown CA); " \
           "renewing through the bootstrap identity (idevid) instead" in proc.stderr
    new = _root(f.server.operator_ca)
    assert _anchor(f, "ldevid") == new
    last = [r for r in f.server.issued() if r["label"] == "ldevid"][-1]
    assert last["operation"] == "simpleenroll"
    assert last["authenticated_as"].endswith("CN=IDevID")


def test_a_root_nothing_vouches_for_is_refused_until_the_operator_configures_it(
    enrolled: Field, tmp_path: Path,
) -> None:
    f = enrolled
    before = Store(f.store).current("ldevid")
    assert before is not None
    rollover_ca(f.server.dir, "ldevid", replace=True)  # no NewWithOld: an unrelated root
    f.server.reload()
    proc = tpmid(f.config, "renew", "ldevid", "--force", env=f.env, check=False)
    assert proc.returncode == 6, proc.stderr
    assert "that /cacerts now offers, but this identity's trust anchor" in proc.stderr
    assert "holds no NewWithOld certificate signed by the anchor" in proc.stderr
    assert "est.issuer_anchors" in proc.stderr
    after = Store(f.store).current("ldevid")
    assert after is not None and after.version == before.version  # kept its identity
    # The operator checks the new root and configures it: the renewal goes through.
    data = yaml.safe_load(f.config.read_text())
    data["identities"]["ldevid"]["est"]["issuer_anchors"] = [str(f.server.operator_ca)]
    f.config.write_text(yaml.safe_dump(data))
    tpmid(f.config, "renew", "ldevid", "--force", env=f.env)
    assert _anchor(f, "ldevid") == _root(f.server.operator_ca)
