"""``python -m tests.bench.kill_loop``: SIGKILL renewals at random moments, many times.

A device in the field loses power or gets killed at any moment. This loop starts a
real ``tpmid renew`` (of the LDevID, the Edge CA, or both with ``--chain``)
against a real swtpm and the reference EST server, kills it with SIGKILL after a
random delay (often in the middle of the TPM work, the exchange or the commit),
and after every kill checks what the next start must find (:func:`assert_intact`):
exactly one current, complete version per identity whose certificate matches its
TPM key, no journal left, no orphaned key or temporary files, and no transient
objects left in the TPM. At the end ``tpmid check --no-est`` must pass.

``scripts/kill-loop`` runs 200 iterations (a few minutes); CI runs a short loop
(``tests/faults/test_kill_loop.py``). Prints the seed: a failure is replayed with
``--seed``.
"""

from __future__ import annotations

import argparse
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from tests.lifecycle.test_daemon_process import Field, tpmid
from tpmid.store import Store
from tpmid.testing.swtpm import Swtpm, copy_state, manufacture
from tpmid.tpm.connection import TpmConnection
from tpmid.tpm.keyfile import load_key_file

NAMES = ("ldevid", "edge-ca")
COMMANDS = (("renew", "ldevid", "--force"), ("renew", "edge-ca", "--force"),
            ("renew", "ldevid", "--force", "--chain"))


def assert_intact(f: Field, swtpm: Swtpm) -> None:
    """What the next start must find, whatever moment the previous run died."""
    for name in NAMES:
        tpmid(f.config, "renew", name, env=f.env)  # recovery, then "not due"
    store = Store(f.store)
    for name in NAMES:
        cur = store.current(name)
        assert cur is not None, f"the device lost its {name}"
        assert cur.key_file is not None and cur.key_file.exists()
        with TpmConnection(swtpm.tcti) as tpm, \
                load_key_file(tpm, cur.key_file.read_bytes()) as key:
            spki = cur.cert.public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
            assert key.public_key_der() == spki, f"{name}: certificate does not match its key"
        assert store.journal_get(name) is None, f"{name}: a journal was left"
        versions = set(store.versions(name))
        keys = {p.name.removesuffix(".tss2.pem") for p in (f.store / "keys" / name).iterdir()}
        assert keys <= versions, f"{name}: orphaned key files {sorted(keys - versions)}"
    leftovers = sorted(str(p) for p in f.store.rglob(".tmp-*"))
    assert leftovers == [], leftovers
    with TpmConnection(swtpm.tcti) as tpm:
        assert tpm.transient_handles() == [], "transient objects left in the TPM"


def run(iterations: int, seed: int, work: Path, *, quiet: bool = False) -> Counter[str]:
    """Run the loop in ``work``; return how the runs ended (killed, finished, failed)."""
    rng = random.Random(seed)
    template = manufacture(work / "tpm-template")
    swtpm = Swtpm(copy_state(template, work / "tpm")).start()
    f = Field(swtpm, work, ("1day", "2day"))
    outcomes: Counter[str] = Counter()
    try:
        f.provision()
        tpmid(f.config, "enroll", "ldevid", env=f.env)
        tpmid(f.config, "enroll", "edge-ca", env=f.env)
        for i in range(iterations):
            command = rng.choice(COMMANDS)
            delay = rng.uniform(0.05, 1.5)  # start-up ~0.3 s, one renewal ~0.3-0.6 s
            proc = subprocess.Popen([sys.executable, "-m", "tpmid.cli", "--config",
                                     str(f.config), *command], env=f.env,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(delay)
            proc.send_signal(signal.SIGKILL)
            rc = proc.wait()
            outcome = "killed" if rc == -signal.SIGKILL else "finished" if rc == 0 else "failed"
            outcomes[outcome] += 1
            try:
                assert_intact(f, swtpm)
            except AssertionError as e:
                raise AssertionError(f"iteration {i} (seed {seed}, {' '.join(command)}, "
                                     f"killed after {delay:.2f} s): {e}") from e
            if not quiet and (i + 1) % 10 == 0:
                print(f"{i + 1}/{iterations}: {dict(outcomes)}", flush=True)
        check = tpmid(f.config, "check", "--no-est", env=f.env, check=False)
        assert check.returncode == 0, check.stdout + check.stderr
    finally:
        f.server.stop()
        swtpm.stop()
    return outcomes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="scripts/kill-loop", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iterations", type=int, default=200, help="kills (default: 200)")
    p.add_argument("--seed", type=int, default=None, help="replay a run (default: random)")
    args = p.parse_args(argv)
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    print(f"kill loop: {args.iterations} iterations, seed {seed}", flush=True)
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="tpmid-kill-loop-") as d:
        outcomes = run(args.iterations, seed, Path(d))
    print(f"ok: {dict(outcomes)} in {time.monotonic() - start:.0f} s; every identity intact, "
          "tpmid check passes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
