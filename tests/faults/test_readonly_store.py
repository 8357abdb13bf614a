"""A store on a read-only file system: the daemon keeps the identity and does not loop.

A real read-only bind mount, in a private mount namespace of the daemon's own
(``unshare -m``): nothing is mounted on the host. Skipped where unprivileged
mount namespaces are not allowed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.faults.conftest import REPO, Field


def _can_unshare() -> bool:
    try:
        return subprocess.run(["unshare", "-m", "--propagation", "private", "true"],
                              capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not _can_unshare(), reason="unshare -m is not permitted here")]


def test_the_daemon_on_a_read_only_store_keeps_its_identity_and_does_not_loop(
        field: Field) -> None:
    # Make ldevid due now: its key is marked lost, so the daemon renews at once.
    state = field.store_dir / "state" / "ldevid.json"
    state.write_text(json.dumps({"attempt": {"key_lost": True}}))
    (field.store_dir / "locks" / "_tpm.lock").touch()  # as after the first run on a device
    store = str(field.store_dir)
    script = (f'mount --bind "{store}" "{store}" && mount -o remount,bind,ro "{store}" && '
              f'exec "$0" -m tpmid.cli --config "{field.config_path}" daemon')
    daemon = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c", script,
                               sys.executable], cwd=REPO, env={**os.environ, **field.env},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(6)
        assert daemon.poll() is None, daemon.communicate()[1]
    finally:
        daemon.send_signal(signal.SIGTERM)
        _, err = daemon.communicate(timeout=20)
    assert daemon.returncode == 0, err
    assert "Read-only file system" in err
    assert "keeping it in memory" in err
    assert err.count("renewing now") == 1, err  # one attempt, then the retry schedule
    assert "Traceback" not in err
    state.unlink()
    field.assert_identity_intact("ldevid")
