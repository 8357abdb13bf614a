"""The fault table: one row per way the server, the TPM or the disk can fail a renewal.

Every row runs ``tpmid renew ldevid --force`` (or the command it names) in this
process against a :class:`~tests.faults.conftest.Field` with the fault switched
on, then switches it off and checks what a device must guarantee:

* the precise error (exit code and message), never a traceback;
* the previous identity is intact: the same version is current and its key
  still signs in the TPM (rows whose fault tpmid heals check the new one);
* the next attempt is scheduled: recorded in the attempt state, and not "now"
  (no tight loop).

Real components throughout: the faults are the reference server's knobs, a
stopped/killed/cleared/power-cycled swtpm, a TPM in lockout or out of object
slots. Only the disk faults are injected through the durable writer's seam
(``tpmid.store.fsio.step_hook``), because a full or read-only disk cannot be made
on the host without mounting something; a private mount namespace is not used.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from tpm2_pytss.constants import ESYS_TR

from tests.faults.conftest import Field, assert_key_signs
from tpmid.clock import utcnow
from tpmid.lifecycle.plan import plan_renewal
from tpmid.store import fsio
from tpmid.tpm.connection import TpmConnection

Undo = Callable[[], None]


def _nothing() -> None:
    return None


@dataclass(frozen=True)
class Fault:
    """One row: how to cause the fault, what tpmid must say, and what must hold after."""

    id: str
    arrange: Callable[[Field, pytest.MonkeyPatch], Undo]
    exit: int
    message: str  # a substring of stderr (exit != 0) or "" for rows tpmid heals
    args: tuple[str, ...] = ("renew", "ldevid", "--force")
    healed: bool = False  # tpmid deals with it: a new version, and it works
    # The attempt reaches the renewal (and is recorded). Not when the TPM is needed
    # before it (start-up recovery), nor on a store that cannot be written at all.
    recorded: bool = True


# --------------------------------------------------------------------------- server


def _server(**faults: Any) -> Callable[[Field, pytest.MonkeyPatch], Undo]:
    def arrange(f: Field, mp: pytest.MonkeyPatch) -> Undo:
        f.fault("ldevid", operations=["simplereenroll"], **faults)
        return lambda: f.fault("ldevid")
    return arrange


def _est(**settings: Any) -> Callable[[Field], None]:
    return lambda f: f.edit(lambda d: d["identities"]["ldevid"]["est"].update(settings))


def _closed_port(f: Field, mp: pytest.MonkeyPatch) -> Undo:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f.data["identities"]["ldevid"]["est"]["url"]
    _est(url=f"https://127.0.0.1:{port}/.well-known/est/ldevid")(f)
    return lambda: _est(url=url)(f)


def _wrong_host(f: Field, mp: pytest.MonkeyPatch) -> Undo:
    """The server reached as 127.0.0.2 (a relay): its certificate names 127.0.0.1 only."""
    url = f.data["identities"]["ldevid"]["est"]["url"]
    relay = _Relay(("127.0.0.1", f.server.port))
    _est(url=url.replace(f"127.0.0.1:{f.server.port}", f"127.0.0.2:{relay.port}"))(f)

    def undo() -> None:
        relay.close()
        _est(url=url)(f)
    return undo


class _Relay:
    """A TCP relay on 127.0.0.2 to ``target`` (the same server under another address)."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.sock = socket.create_server(("127.0.0.2", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.sock.close()


def _slow(f: Field, mp: pytest.MonkeyPatch) -> Undo:
    _server(trickle="0.5s")(f, mp)
    _est(timeout={"total": "2s"})(f)
    return lambda: (f.fault("ldevid"), _est(timeout={})(f))[0]


def _pending(header: str | None = None, seconds: float | None = 1) -> Callable[..., Undo]:
    def arrange(f: Field, mp: pytest.MonkeyPatch) -> Undo:
        faults: dict[str, Any] = {"status": 202}
        if header is not None:
            faults["retry_after_header"] = header
        else:
            faults["retry_after"] = seconds
        _server(**faults)(f, mp)
        _est(max_wait="3s")(f)
        return lambda: f.fault("ldevid")
    return arrange


SERVER = [
    Fault("server-refuses-connections", _closed_port, 4, "Connection refused"),
    Fault("reset-mid-response", _server(reset=True), 4, "failed"),
    Fault("slow-beyond-the-exchange-deadline", _slow, 4, "within the exchange deadline of 2 s"),
    Fault("server-error-503", _server(status=503), 4, "answered 503"),
    Fault("202-forever", _pending(), 4, "still processing the request (202 Accepted"),
    Fault("202-with-an-absurd-retry-after", _pending("99999999999999999999"), 4,
          "still processing the request (202 Accepted, Retry-After 86400 s)"),
    Fault("202-with-retry-after-zero", _pending("0"), 4, "Retry-After 2 s"),
    Fault("garbage-pkcs7", _server(malformed_body=True), 4, "simplereenroll"),
    Fault("wrong-media-type", _server(wrong_content_type=True), 4, "wrong media type"),
    Fault("oversized-body", _server(oversize=2_000_000), 4, "more than the 1048576 allowed"),
    Fault("certificate-for-another-key", _server(wrong_key=True), 6, "another key"),
    Fault("untrusted-issuer", _server(foreign_issuer=True), 6,
          "it was not issued by any of them (no chain to those CA certificates)"),
    Fault("expired-certificate", _server(expired=True), 6, "expired"),
    Fault("rewritten-subject", _server(subject="CN=someone-else"), 6, "subject"),
    Fault("hostname-mismatch", _wrong_host, 4, "certificate verify failed"),
]


# --------------------------------------------------------------------------- TPM


def _tpm_stopped(f: Field, mp: pytest.MonkeyPatch) -> Undo:
    f.edit(lambda d: d["tpm"].update(timeout="1s"))
    os.kill(f.sim.pid, signal.SIGSTOP)
    return lambda: os.kill(f.sim.pid, signal.SIGCONT)


def _tpm_killed(f: Field, mp: pytest.MonkeyPatch) -> Undo:
    f.sim.stop()

    def undo() -> None:
        f.sim.start()
        f.edit(lambda d: d["tpm"].update(tcti=f.sim.tcti))
    return undo


def _tpm_power_cycled(f: Field, mp: pytest.MonkeyPatch) -> Undo:
    f.sim.power_cycle()
    return _nothing


def _tpm_cleared(f: Field, mp: pytest.MonkeyPatch) -> Undo:
    with TpmConnection(f.sim.tcti) as tpm:
        tpm.esapi.clear(ESYS_TR.LOCKOUT)
    return _nothing


def _tpm_in_lockout(f: Field, mp: pytest.MonkeyPatch) -> Undo:
    with TpmConnection(f.sim.tcti) as tpm:
        tpm.esapi.dictionary_attack_parameters(new_max_tries=0, new_recovery_time=1000,
                                               lockout_recovery=1000)

    def undo() -> None:
        with TpmConnection(f.sim.tcti) as tpm:
            tpm.esapi.dictionary_attack_parameters(new_max_tries=32, new_recovery_time=10,
                                                   lockout_recovery=10)
            tpm.esapi.dictionary_attack_lock_reset()
    return undo


def _tpm_slots_full(f: Field, mp: pytest.MonkeyPatch) -> Undo:
    other = TpmConnection(f.sim.tcti)  # another program's objects: tpmid must not flush them
    keys = [other.derive_idevid(t) for t in ("H-2", "H-3", "H-2")]

    def undo() -> None:
        for k in keys:
            k.close()
        other.close()
    return undo


TPM = [
    Fault("tpm-stopped", _tpm_stopped, 3, "did not answer within 1 s (tpm.timeout)",
          recorded=False),
    Fault("tpm-killed", _tpm_killed, 3, "TPM not reachable", recorded=False),
    Fault("tpm-power-cycled", _tpm_power_cycled, 0, "", healed=True),
    Fault("tpm-cleared", _tpm_cleared, 0, "", healed=True),
    # Enrolling through the IDevID (no noDA attribute) needs an authorization.
    Fault("tpm-in-lockout", _tpm_in_lockout, 3, "lockout", args=("enroll", "ldevid"),
          recorded=False),  # tpmid enroll is a one-shot command: no attempt state
    Fault("tpm-out-of-object-memory", _tpm_slots_full, 3, "object memory"),
]


# --------------------------------------------------------------------------- disk


def _disk(err: int, where: str, at: str = "write:temp-written"
          ) -> Callable[[Field, pytest.MonkeyPatch], Undo]:
    def arrange(f: Field, mp: pytest.MonkeyPatch) -> Undo:
        def hook(step: str, path: Path) -> None:
            if step == at and where in str(path):
                raise OSError(err, os.strerror(err))
        mp.setattr(fsio, "step_hook", hook)
        return lambda: mp.setattr(fsio, "step_hook", None)
    return arrange


DISK = [
    Fault("disk-full-when-the-certificate-is-written",
          _disk(errno.ENOSPC, "/certs/", "commit:temp-version"), 7, "No space left on device"),
    Fault("disk-full-when-the-new-key-is-staged", _disk(errno.ENOSPC, "/keys/"), 7,
          "No space left on device"),
    Fault("read-only-store-at-the-first-write", _disk(errno.EROFS, "/store/"), 7,
          "Read-only file system", recorded=False),
]


# --------------------------------------------------------------------------- store damage


def _remove_current_key(f: Field, mp: pytest.MonkeyPatch) -> Undo:
    cur = f.current("ldevid")
    assert cur.key_file is not None
    cur.key_file.unlink()
    return _nothing


def _truncate_current_cert(f: Field, mp: pytest.MonkeyPatch) -> Undo:
    path = f.current("ldevid").cert_path
    path.write_bytes(path.read_bytes()[:100])
    return _nothing


def _lose_current_link(f: Field, mp: pytest.MonkeyPatch) -> Undo:
    (f.store_dir / "certs" / "ldevid" / "current").unlink()
    return _nothing


STORE = [
    Fault("missing-key-file", _remove_current_key, 0, "", args=("renew", "ldevid"), healed=True),
    Fault("truncated-certificate", _truncate_current_cert, 0, "", args=("renew", "ldevid"),
          healed=True),
    Fault("lost-current-link", _lose_current_link, 0, "", args=("renew", "ldevid"),
          healed=True),
]

ROWS = SERVER + TPM + DISK + STORE


@pytest.mark.parametrize("fault", ROWS, ids=[r.id for r in ROWS])
def test_fault(field: Field, fault: Fault, monkeypatch: pytest.MonkeyPatch) -> None:
    before = field.current("ldevid")
    undo = fault.arrange(field, monkeypatch)
    try:
        rc, out, err = field.cli(*fault.args)
    finally:
        undo()
    assert "Traceback" not in err
    assert rc == fault.exit, err
    if fault.healed:
        assert_key_signs(field, "ldevid", field.current("ldevid"))
        _, out, _ = field.cli("check", "--no-est")
        assert "✔ ok    ldevid: key" in out and "✔ ok    ldevid: certificate matches key" in out
        return
    assert fault.message in err, err
    # The previous identity is intact and works.
    field.assert_identity_intact("ldevid")
    assert field.current("ldevid").version == before.version
    # The next attempt is recorded and scheduled, not now.
    attempt = field.store.load_state("ldevid")
    if fault.recorded:
        assert attempt.last_attempt is not None and attempt.retrying
    now = utcnow()
    decision = plan_renewal(field.config, field.store, "ldevid", now)
    assert decision.action != "renew-now" and decision.when > now, decision
