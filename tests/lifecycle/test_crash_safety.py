"""A renewal killed at any moment never costs the device its identity.

`tpmid renew ldevid --force` runs as a real process against a real swtpm and the
reference EST server and is SIGKILLed (1) at each durable step of the store,
through the store's test hook (``tpmid.store.fsio.step_hook``), and (2) at random
moments. Afterwards the next start (`tpmid renew ldevid`, which runs the store's
journal recovery first) leaves exactly one current identity whose certificate
matches its TPM key, no orphaned key files or temp files, no journal, and no
transient objects in the TPM.
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from tests.est.test_client_support import transient_handles
from tests.lifecycle.test_daemon_process import Field, tpmid
from tpmid.store import Store
from tpmid.testing.swtpm import Swtpm
from tpmid.tpm.connection import TpmConnection
from tpmid.tpm.keyfile import load_key_file

HOOKED = """
import os, signal, sys
from tpmid.store import fsio as store
count = {{"n": 0}}
def hook(step, path):
    count["n"] += 1
    with open({counter!r}, "a") as f:
        f.write(step + "\\n")
    if count["n"] == {kill_at}:
        os.kill(os.getpid(), signal.SIGKILL)
store.step_hook = hook
from tpmid.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture
def enrolled(swtpm: Swtpm, tmp_path: Path) -> Iterator[Field]:
    f = Field(swtpm, tmp_path, ("1day", "2day"))
    try:
        f.provision()
        tpmid(f.config, "enroll", "ldevid", env=f.env)
        yield f
    finally:
        f.server.stop()


def renew_hooked(f: Field, counter: Path, kill_at: int) -> int:
    code = HOOKED.format(counter=str(counter), kill_at=kill_at)
    proc = subprocess.run(
        [sys.executable, "-c", code, "--config", str(f.config), "renew", "ldevid", "--force"],
        env=f.env, capture_output=True, text=True, timeout=60, check=False)
    return proc.returncode


def assert_one_valid_identity(f: Field, swtpm: Swtpm) -> None:
    """What the next start must find, whatever moment the previous run died."""
    tpmid(f.config, "renew", "ldevid", env=f.env)  # recovery + "not due"
    store = Store(f.store)
    cur = store.current("ldevid")
    assert cur is not None, "the device lost its LDevID"
    assert cur.key_file is not None and cur.key_file.exists()
    with TpmConnection(swtpm.tcti) as tpm, load_key_file(tpm, cur.key_file.read_bytes()) as key:
        cert_spki = cur.cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        assert key.public_key_der() == cert_spki, "current certificate does not match its key"
    assert store.journal_get("ldevid") is None
    versions = set(store.versions("ldevid"))
    keys = {p.name.removesuffix(".tss2.pem") for p in (f.store / "keys" / "ldevid").iterdir()}
    assert keys <= versions, f"orphaned key files: {sorted(keys - versions)}"
    leftovers = [p for p in f.store.rglob(".tmp-*")]
    assert leftovers == [], leftovers
    assert transient_handles(swtpm.tcti) == []


def test_renewal_killed_at_every_durable_step_keeps_a_valid_identity(
        enrolled: Field, swtpm: Swtpm, tmp_path: Path) -> None:
    # A run that is not killed tells how many durable steps a renewal has.
    counter = tmp_path / "steps-full"
    assert renew_hooked(enrolled, counter, kill_at=0) == 0
    steps = counter.read_text().split()
    assert len(steps) >= 8, steps  # key staged, journal, commit steps
    killed = 0
    for k in range(1, len(steps) + 1):
        rc = renew_hooked(enrolled, tmp_path / f"steps-{k}", kill_at=k)
        killed += rc == -signal.SIGKILL
        assert_one_valid_identity(enrolled, swtpm)
    assert killed == len(steps), "some runs were not killed where the hook said"


def test_renewal_killed_at_random_moments_keeps_a_valid_identity(
        enrolled: Field, swtpm: Swtpm) -> None:
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    for _ in range(6):
        proc = subprocess.Popen(
            [sys.executable, "-m", "tpmid.cli", "--config", str(enrolled.config), "renew",
             "ldevid", "--force"], env=enrolled.env, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.2, 1.2))  # Python start-up is ~0.3 s, a renewal ~0.3 s
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        try:
            assert_one_valid_identity(enrolled, swtpm)
        except AssertionError as e:
            raise AssertionError(f"random seed {seed}: {e}") from e
