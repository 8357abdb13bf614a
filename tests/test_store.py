"""The durable store on a real filesystem, with real processes and real SIGKILLs.

Crash tests fork a child (``multiprocessing`` with the fork start method) that
sets :data:`tpmid.store.fsio.step_hook` to SIGKILL itself at one named step, then
check what a fresh :class:`Store` finds on disk. Lock tests run a second Python
interpreter that holds the lock.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import random
import re
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tpmid.errors import ConfigError, StoreError, TpmError
from tpmid.policy import AttemptState, Decision
from tpmid.store import (
    STEPS,
    JournalEntry,
    Store,
    atomic_write,
    check_private_path,
    fsio,
    host_tpm_lock,
    recover,
)
from tpmid.store.locks import lock_holder

REPO = Path(__file__).resolve().parents[1]


def recover_lines(store: Store, **kw: Any) -> list[str]:
    """Start-up recovery, one log line per action."""
    return [str(a) for a in recover(store, **kw)]
FORK = multiprocessing.get_context("fork")


# --------------------------------------------------------------------------- certificates


class Pki:
    """A tiny real CA issuing real certificates (the store only stores them)."""

    def __init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Test Issuing CA")])
        now = datetime.now(UTC)
        self.cert = (
            x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(days=1)).not_valid_after(now + timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )

    def issue(self, cn: str = "device-1", days: int = 30) -> x509.Certificate:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.now(UTC)
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(self.cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + timedelta(days=days))
            .sign(self.key, hashes.SHA256())
        )

    def csr_pem(self, cn: str = "device-1") -> str:
        key = ec.generate_private_key(ec.SECP256R1())
        csr = (x509.CertificateSigningRequestBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
               .sign(key, hashes.SHA256()))
        return csr.public_bytes(serialization.Encoding.PEM).decode()


@pytest.fixture(scope="module")
def pki() -> Pki:
    return Pki()


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def store(root: Path) -> Store:
    return Store(root)


def key_blob(tag: str) -> bytes:
    # A stand-in for TSS2 PRIVATE KEY bytes: the store treats key files as opaque.
    return (f"-----BEGIN TSS2 PRIVATE KEY-----\n{tag}\n-----END TSS2 PRIVATE KEY-----\n").encode()


def mode_of(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def enroll(store: Store, pki: Pki, name: str = "ldevid", n: int = 1,
           with_key: bool = True) -> list[str]:
    """Commit ``n`` versions the way renewals do; returns their version names."""
    out = []
    for i in range(n):
        key = store.stage_key(name, key_blob(f"{name}-{i}")) if with_key else None
        out.append(store.commit(name, pki.issue(f"{name}-{i}"), [pki.cert], key).version)
    return out


@pytest.fixture
def umask() -> Iterator[Callable[[int], None]]:
    old = os.umask(0o022)
    os.umask(old)

    def set_umask(mask: int) -> None:
        os.umask(mask)

    yield set_umask
    os.umask(old)


# --------------------------------------------------------------------------- layout & modes


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o000], ids=["umask-022", "umask-077", "umask-000"])
def test_new_store_creates_the_documented_directory_modes_whatever_the_umask(
    root: Path, pki: Pki, umask: Callable[[int], None], mask: int,
) -> None:
    umask(mask)
    s = Store(root)
    enroll(s, pki)
    s.save_state("ldevid", AttemptState())
    s.journal_begin("ldevid", JournalEntry(operation="renew", phase="staged"))
    with s.identity_lock("ldevid"):
        pass
    expected = {
        root: 0o755, root / "certs": 0o755, root / "keys": 0o700, root / "journal": 0o700,
        root / "state": 0o700, root / "locks": 0o700,
        root / "certs/ldevid": 0o755, root / "certs/ldevid/0001": 0o755,
        root / "certs/ldevid/0001/cert.pem": 0o644, root / "certs/ldevid/0001/chain.pem": 0o644,
        root / "keys/ldevid": 0o700, root / "keys/ldevid/0001.tss2.pem": 0o600,
        root / "journal/ldevid.json": 0o600, root / "state/ldevid.json": 0o600,
    }
    assert {p: mode_of(p) for p in expected} == expected


def test_atomic_write_sets_the_requested_mode_and_leaves_no_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "file"
    atomic_write(target, b"one", 0o644)
    atomic_write(target, b"two", 0o600)
    assert target.read_bytes() == b"two"
    assert mode_of(target) == 0o600
    assert os.listdir(tmp_path) == ["file"]


def test_atomic_write_reports_an_unwritable_directory_as_store_error(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match=r"cannot create .*missing"):
        atomic_write(tmp_path / "missing" / "file", b"x", 0o644)


# --------------------------------------------------------------------------- commit & versions


def test_never_enrolled_identity_has_no_current_and_no_versions(store: Store) -> None:
    assert store.current("ldevid") is None
    assert store.versions("ldevid") == []


def test_commit_makes_the_new_pair_current_and_keeps_the_previous_one_usable(
    store: Store, pki: Pki,
) -> None:
    old_key = store.stage_key("ldevid", key_blob("old"))
    old_cert = pki.issue("old")
    old = store.commit("ldevid", old_cert, [pki.cert], old_key)
    new_key = store.stage_key("ldevid", key_blob("new"))
    # Staged, not committed: current is still the old pair.
    cur = store.current("ldevid")
    assert cur is not None and cur.cert == old_cert and cur.key_file == old_key
    new_cert = pki.issue("new")
    new = store.commit("ldevid", new_cert, [pki.cert], new_key)

    cur = store.current("ldevid")
    assert cur is not None
    assert (cur.version, cur.cert, cur.chain, cur.key_file) == (new.version, new_cert,
                                                                  (pki.cert,), new_key)
    assert store.versions("ldevid") == [old.version, new.version]
    # The previous version is intact on disk, key included.
    assert x509.load_pem_x509_certificate(old.cert_path.read_bytes()) == old_cert
    assert old.key_file is not None and old.key_file.read_bytes() == key_blob("old")
    # Stable paths through `current` resolve to the new pair.
    stable = store.current_dir("ldevid")
    assert x509.load_pem_x509_certificate((stable / "cert.pem").read_bytes()) == new_cert
    assert (stable / "key.tss2.pem").read_bytes() == key_blob("new")
    assert x509.load_pem_x509_certificates((stable / "chain.pem").read_bytes()) == [pki.cert]


@pytest.mark.parametrize(("retention", "kept"), [(0, 1), (1, 2), (2, 3), (5, 5)],
                         ids=["retention-0", "retention-1", "retention-2-default", "retention-5"])
def test_commit_prunes_versions_beyond_the_retention_with_their_keys(
    root: Path, pki: Pki, retention: int, kept: int,
) -> None:
    s = Store(root, retention=retention)
    versions = enroll(s, pki, n=5)
    assert s.versions("ldevid") == versions[-kept:]
    keys = sorted(p.name for p in (root / "keys/ldevid").iterdir())
    assert keys == [f"{v}.tss2.pem" for v in versions[-kept:]]


def test_default_retention_keeps_two_previous_versions(store: Store, pki: Pki) -> None:
    versions = enroll(store, pki, n=4)
    assert store.versions("ldevid") == versions[1:]


def test_commit_without_rotation_copies_the_current_key_into_the_new_version(
    store: Store, pki: Pki,
) -> None:
    first = store.commit("ldevid", pki.issue(), [pki.cert],
                         store.stage_key("ldevid", key_blob("kept")))
    assert first.key_file is not None
    second = store.commit("ldevid", pki.issue(), [pki.cert], first.key_file)
    assert second.version != first.version
    assert second.key_file is not None and second.key_file != first.key_file
    assert second.key_file.read_bytes() == key_blob("kept")
    assert first.key_file.read_bytes() == key_blob("kept")  # the old version is untouched


def test_commit_without_key_file_is_for_keys_that_live_in_the_tpm(store: Store, pki: Pki) -> None:
    ident = store.commit("idevid-bound", pki.issue(), [], None)
    assert ident.key_file is None and ident.chain == ()
    assert not os.path.lexists(store.current_dir("idevid-bound") / "key.tss2.pem")
    assert store.current("idevid-bound") == ident


def test_commit_refuses_a_key_file_that_does_not_exist(store: Store, pki: Pki,
                                                       tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="does not exist"):
        store.commit("ldevid", pki.issue(), [], tmp_path / "nope.tss2.pem")
    assert store.current("ldevid") is None


def test_current_reports_a_missing_key_file_naming_it(store: Store, pki: Pki) -> None:
    (v,) = enroll(store, pki)
    store.key_path("ldevid", v).unlink()
    with pytest.raises(StoreError, match=f"keys/ldevid/{v}.tss2.pem"):
        store.current("ldevid")


def test_discard_version_removes_an_old_version_but_never_the_current_one(
    store: Store, pki: Pki,
) -> None:
    v1, v2 = enroll(store, pki, n=2)
    with pytest.raises(StoreError, match="current"):
        store.discard_version("ldevid", v2)
    store.discard_version("ldevid", v1)
    assert store.versions("ldevid") == [v2]
    assert not store.key_path("ldevid", v1).exists()
    store.discard_version("ldevid", v1)  # idempotent


def test_discard_version_refuses_the_version_work_in_flight_uses(store: Store, pki: Pki) -> None:
    enroll(store, pki)
    staged = store.stage_key("ldevid", key_blob("next"))
    v = Store.key_version(staged)
    store.journal_begin("ldevid", JournalEntry(operation="renew", phase="pending", version=v,
                                               csr_pem=pki.csr_pem()))
    with pytest.raises(StoreError, match="in flight"):
        store.discard_version("ldevid", v)
    assert staged.exists()


def test_discard_key_deletes_only_the_old_key_after_rotation(store: Store, pki: Pki) -> None:
    v1, v2 = enroll(store, pki, n=2)
    store.discard_key("ldevid", v1)
    assert not store.key_path("ldevid", v1).exists()
    assert v1 in store.versions("ldevid")  # the certificate stays for forensics
    with pytest.raises(StoreError, match="current"):
        store.discard_key("ldevid", v2)


@pytest.mark.parametrize("name", ["", "../etc", "a/b", ".hidden", "-x", "a b"],
                         ids=["empty", "dotdot", "slash", "hidden", "dash-first", "space"])
def test_identity_names_that_could_escape_the_store_are_refused(store: Store, name: str) -> None:
    with pytest.raises(StoreError, match="not a valid identity name"):
        store.current(name)
    with pytest.raises(StoreError, match="not a valid identity name"):
        store.stage_key(name, b"x")


def test_remove_identity_deletes_everything_of_that_identity_only(
    store: Store, pki: Pki, root: Path,
) -> None:
    enroll(store, pki, "ldevid", n=2)
    enroll(store, pki, "edgeca")
    store.save_state("ldevid", AttemptState().failed(datetime.now(UTC), "boom"))
    store.journal_begin("ldevid", JournalEntry(operation="renew", phase="staged"))
    store.remove_identity("ldevid")
    assert store.current("ldevid") is None
    assert store.journal_get("ldevid") is None
    assert store.load_state("ldevid") == AttemptState()
    assert not (root / "certs/ldevid").exists() and not (root / "keys/ldevid").exists()
    assert store.current("edgeca") is not None


# --------------------------------------------------------------------------- journal & state


def test_journal_round_trips_every_field_in_a_private_file(store: Store, pki: Pki,
                                                           root: Path) -> None:
    entry = JournalEntry(
        operation="renew", phase="pending", version="0007", key_ref="persistent:0x81000010",
        csr_pem=pki.csr_pem(), method="simplereenroll", retry_after=120.0,
        previous_version="0006", started=datetime(2027, 1, 1, tzinfo=UTC),
        updated=datetime(2027, 1, 1, 0, 2, tzinfo=UTC), extra={"label": "ldevid"},
    )
    store.journal_begin("ldevid", entry)
    assert store.journal_get("ldevid") == entry
    assert mode_of(root / "journal/ldevid.json") == 0o600
    later = dataclasses.replace(entry, phase="issued", retry_after=None)
    store.journal_update("ldevid", later)
    assert store.journal_get("ldevid") == later
    store.journal_clear("ldevid")
    assert store.journal_get("ldevid") is None
    store.journal_clear("ldevid")  # idempotent


def test_journal_begin_refuses_to_overwrite_work_in_flight(store: Store) -> None:
    first = JournalEntry(operation="renew", phase="pending", version="0002")
    store.journal_begin("ldevid", first)
    with pytest.raises(StoreError, match="already has a renewal in flight"):
        store.journal_begin("ldevid", JournalEntry(operation="enroll", phase="staged"))
    assert store.journal_get("ldevid") == first


def test_journal_update_without_work_in_flight_is_an_error(store: Store) -> None:
    with pytest.raises(StoreError, match="no renewal in flight"):
        store.journal_update("ldevid", JournalEntry(operation="renew", phase="pending"))


def test_unreadable_journal_is_reported_with_the_path(store: Store, root: Path) -> None:
    atomic_write(root / "journal/ldevid.json", b"{not json", 0o600)
    with pytest.raises(StoreError, match=r"journal .*ldevid.json is unreadable"):
        store.journal_get("ldevid")


def test_attempt_state_and_last_decision_survive_a_new_store_object(
    store: Store, root: Path,
) -> None:
    t = datetime(2027, 5, 1, 8, 30, tzinfo=UTC)
    state = AttemptState().failed(t, "EST server returned 503", retry_after=60.0)
    decision = Decision("retry-at", t + timedelta(seconds=60), "server Retry-After 60s")
    store.save_state("ldevid", state)
    store.save_decision("ldevid", decision)
    again = Store(root)
    assert again.load_state("ldevid") == state
    assert again.load_decision("ldevid") == decision
    store.save_state("ldevid", AttemptState.succeeded(t))
    assert again.load_decision("ldevid") == decision  # saving one keeps the other


def test_a_lost_key_is_remembered_through_failures_until_a_success(store: Store,
                                                                  root: Path) -> None:
    t = datetime(2027, 5, 1, 8, 30, tzinfo=UTC)
    store.save_state("ldevid", AttemptState().lost_key())
    assert Store(root).load_state("ldevid").key_lost
    store.save_state("ldevid", store.load_state("ldevid").failed(t, "EST server down"))
    assert Store(root).load_state("ldevid").key_lost
    store.save_state("ldevid", AttemptState.succeeded(t))
    assert not Store(root).load_state("ldevid").key_lost


def test_corrupt_state_file_means_a_fresh_state_not_a_dead_daemon(store: Store,
                                                                  root: Path) -> None:
    atomic_write(root / "state/ldevid.json", b"\x00garbage", 0o600)
    assert store.load_state("ldevid") == AttemptState()
    assert store.load_decision("ldevid") is None


# --------------------------------------------------------------------------- permissions


@pytest.mark.parametrize(
    ("sub", "mode"),
    [(".", 0o777), (".", 0o775), ("keys", 0o777), ("keys", 0o770), ("journal", 0o722),
     ("certs", 0o757), ("locks", 0o730)],
    ids=["root-world-writable", "root-group-writable", "keys-world-writable",
         "keys-group-writable", "journal-world-writable", "certs-world-writable",
         "locks-group-writable"],
)
def test_store_refuses_directories_others_can_write_naming_path_and_fix(
    root: Path, sub: str, mode: int,
) -> None:
    Store(root)
    target = (root / sub).resolve()
    os.chmod(target, mode)
    with pytest.raises(StoreError) as e:
        Store(root)
    assert str(target) in str(e.value)
    assert e.value.hint is not None and "chmod" in e.value.hint and str(target) in e.value.hint


def test_store_refuses_a_key_dir_of_one_identity_that_others_can_write(
    store: Store, pki: Pki, root: Path,
) -> None:
    enroll(store, pki)
    os.chmod(root / "keys/ldevid", 0o777)
    with pytest.raises(StoreError, match=str(root / "keys/ldevid")):
        store.stage_key("ldevid", key_blob("x"))


def test_store_refuses_a_world_writable_parent_directory(tmp_path: Path) -> None:
    parent = tmp_path / "shared"
    parent.mkdir()
    os.chmod(parent, 0o777)
    with pytest.raises(StoreError, match=f"inside {parent}") as e:
        Store(parent / "store")
    assert e.value.hint == f"chmod go-w {parent}"


def test_store_accepts_a_sticky_world_writable_parent_like_tmp(tmp_path: Path) -> None:
    parent = tmp_path / "sticky"
    parent.mkdir()
    os.chmod(parent, 0o1777)
    Store(parent / "store")


def test_opening_a_missing_store_without_create_says_so(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="does not exist"):
        Store(tmp_path / "absent", create=False)
    assert not (tmp_path / "absent").exists()


@pytest.mark.parametrize(
    ("mode", "refused"),
    [(0o600, False), (0o644, False), (0o640, False), (0o664, True), (0o646, True),
     (0o666, True)],
    ids=["0600", "0644", "0640", "0664-group-writable", "0646-world-writable", "0666"],
)
def test_check_private_path_refuses_a_config_others_can_write(
    tmp_path: Path, mode: int, refused: bool,
) -> None:
    cfg = tmp_path / "config.yaml"
    cfg.write_text("identities: {}\n")
    os.chmod(cfg, mode)
    if not refused:
        check_private_path(cfg, "config file", error=ConfigError)
        return
    with pytest.raises(ConfigError, match=f"config file {cfg} is writable") as e:
        check_private_path(cfg, "config file", error=ConfigError)
    assert e.value.hint == f"chmod go-w {cfg}"


def test_check_private_path_names_a_missing_path(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="does not exist"):
        check_private_path(tmp_path / "nope", "key directory")


# --------------------------------------------------------------------------- crash safety


def _killed_at(step: str, work: Callable[[], object]) -> int:
    """Run ``work`` in a forked child that SIGKILLs itself at ``step``; return its exit code."""

    def child() -> None:
        def hook(s: str, path: Path) -> None:
            if s == step:
                os.kill(os.getpid(), signal.SIGKILL)

        fsio.step_hook = hook
        work()
        os._exit(0)

    p = FORK.Process(target=child)
    p.start()
    p.join(30)
    assert p.exitcode is not None
    return p.exitcode


WRITE_STEPS = [s for s in STEPS if s.startswith("write:")]


@pytest.mark.parametrize("step", WRITE_STEPS, ids=WRITE_STEPS)
def test_atomic_write_killed_at_any_step_leaves_old_or_new_content(
    store: Store, root: Path, step: str,
) -> None:
    target = root / "state" / "ldevid.json"
    old, new = b'{"attempt": {"failures": 1}}\n', b'{"attempt": {"failures": 2}}\n' * 5000
    atomic_write(target, old, 0o600)
    code = _killed_at(step, lambda: atomic_write(target, new, 0o600))
    assert code == -signal.SIGKILL, "the child did not reach the step"
    content = target.read_bytes()
    assert content == (new if step == "write:replaced" else old)
    leftovers = [n for n in os.listdir(target.parent) if n != "ldevid.json"]
    # recover() removes the temp file an interrupted write left behind.
    actions = recover_lines(Store(root))
    assert os.listdir(target.parent) == ["ldevid.json"]
    if leftovers:
        assert any("temporary" in a for a in actions), actions
    assert target.read_bytes() == content


def _writer_loop(path: str, a: bytes, b: bytes) -> None:
    i = 0
    while True:
        atomic_write(Path(path), a if i % 2 else b, 0o644)
        i += 1


def test_atomic_write_sigkilled_at_random_moments_never_leaves_a_torn_file(tmp_path: Path) -> None:
    target = tmp_path / "cert.pem"
    a, b = b"A" * 1_000_000, b"B" * 1_500_000
    atomic_write(target, a, 0o644)
    rng = random.Random(1234)
    for _ in range(15):
        p = FORK.Process(target=_writer_loop, args=(str(target), a, b))
        p.start()
        time.sleep(rng.uniform(0.005, 0.05))
        assert p.pid is not None
        os.kill(p.pid, signal.SIGKILL)
        p.join(10)
        assert p.exitcode == -signal.SIGKILL
        assert target.read_bytes() in (a, b)
        assert mode_of(target) == 0o644


COMMIT_STEPS = [s for s in STEPS if s.startswith("commit:")]


@pytest.mark.parametrize("step", COMMIT_STEPS, ids=COMMIT_STEPS)
def test_commit_killed_at_any_step_leaves_a_complete_current_pair_and_recovery_finishes(
    root: Path, pki: Pki, step: str,
) -> None:
    s = Store(root)
    old_versions = enroll(s, pki, n=3)  # current + two previous (retention 2)
    staged = s.stage_key("ldevid", key_blob("new"))
    v = Store.key_version(staged)
    s.journal_begin("ldevid", JournalEntry(operation="renew", phase="issued", version=v,
                                           csr_pem=pki.csr_pem()))
    new_cert = pki.issue("new")
    code = _killed_at(step, lambda: Store(root).commit("ldevid", new_cert, [pki.cert], staged))
    assert code == -signal.SIGKILL, "the child did not reach the step"

    after_crash = Store(root).current("ldevid")
    assert after_crash is not None and after_crash.key_file is not None
    assert after_crash.key_file.is_file()  # always a usable pair, never a torn one
    swapped = step in ("commit:current-swapped", "commit:journal-cleared")
    assert after_crash.version == (v if swapped else old_versions[-1])

    actions = recover(Store(root))
    cur = Store(root).current("ldevid")
    assert cur is not None
    if step == "commit:temp-version":
        # The new version never appeared: the renewal is resumed (same CSR resent).
        assert cur.version == old_versions[-1]
        assert [a.action for a in actions if a.action != "removed"] == ["resume"]
        assert staged.exists()
    else:
        assert (cur.version, cur.cert) == (v, new_cert)
        assert Store(root).journal_get("ldevid") is None
    # Whatever happened, nothing is left half-done: no temp entries, retention respected.
    for d in (root / "certs/ldevid", root / "keys/ldevid", root / "journal"):
        assert not [n for n in os.listdir(d) if n.startswith(".tmp-")]
    assert len(Store(root).versions("ldevid")) <= 3


# --------------------------------------------------------------------------- locks

HOLDER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from tpmid.store import Store
    s = Store(Path(sys.argv[1]))
    cm = s.tpm_lock() if sys.argv[2] == "tpm" else s.identity_lock(sys.argv[2])
    with cm:
        print("locked", flush=True)
        sys.stdin.readline()
""")


@pytest.fixture
def holder(root: Path) -> Iterator[Callable[[str], subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []

    def start(what: str) -> subprocess.Popen[str]:
        p = subprocess.Popen([sys.executable, "-c", HOLDER, str(root), what], cwd=REPO,
                             env={**os.environ, "PYTHONPATH": str(REPO)},
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        procs.append(p)
        assert p.stdout is not None and p.stdout.readline().strip() == "locked"
        return p

    yield start
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait(10)


def test_identity_lock_held_by_another_process_is_reported_with_its_pid(
    store: Store, holder: Callable[[str], subprocess.Popen[str]],
) -> None:
    p = holder("ldevid")
    with pytest.raises(StoreError,
                       match=rf"ldevid is being renewed by another tpmid process \(pid {p.pid}\)"):
        with store.identity_lock("ldevid", wait=False):
            pass
    t0 = time.monotonic()
    with pytest.raises(StoreError, match=f"pid {p.pid}"):
        with store.identity_lock("ldevid", timeout=0.3):
            pass
    assert time.monotonic() - t0 >= 0.3
    with store.identity_lock("edgeca", wait=False):  # other identities are not blocked
        pass


def test_a_wait_for_the_tpm_lock_is_announced_once_and_bounded(
    root: Path, holder: Callable[[str], subprocess.Popen[str]],
) -> None:
    p = holder("tpm")
    notes: list[str] = []
    t0 = time.monotonic()
    with pytest.raises(StoreError, match=rf"in use by another tpmid process \(pid {p.pid}\); "
                                         r"waited for 1.5 s \(tpm.lock_timeout\)") as e:
        with host_tpm_lock(root / "locks" / "_tpm.lock", timeout=1.5, waiting=notes.append):
            pass
    assert 1.5 <= time.monotonic() - t0 < 5
    assert notes == [f"pid {p.pid}"]  # once, after a second; not a tpmid command line
    assert "tpm.lock_timeout" in (e.value.hint or "")


def test_the_lock_holder_is_named_by_its_tpmid_command(root: Path, tmp_path: Path) -> None:
    lock = root / "locks" / "_tpm.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    # A process whose command line is a tpmid invocation (it only sleeps).
    fake = tmp_path / "tpmid"
    fake.write_text("import time\ntime.sleep(30)\n")
    p = subprocess.Popen([sys.executable, str(fake), "--config", "/etc/tpmid/config.yaml",
                          "renew", "ldevid", "--force"])
    try:
        deadline = time.monotonic() + 5  # until the child has exec'd its command line
        while str(fake).encode() not in Path(f"/proc/{p.pid}/cmdline").read_bytes():
            assert time.monotonic() < deadline
            time.sleep(0.01)
        lock.write_text(f"{p.pid}\n")
        assert lock_holder(lock) == f"pid {p.pid}: tpmid renew ldevid"
    finally:
        p.kill()
        p.wait()


def test_identity_lock_waits_until_the_other_process_is_done(
    store: Store, holder: Callable[[str], subprocess.Popen[str]],
) -> None:
    p = holder("ldevid")
    assert p.stdin is not None

    def release_later() -> None:
        time.sleep(0.3)
        assert p.stdin is not None
        p.stdin.write("\n")
        p.stdin.flush()

    t = threading.Thread(target=release_later)
    t0 = time.monotonic()
    t.start()
    with store.identity_lock("ldevid", timeout=10):
        waited = time.monotonic() - t0
    t.join()
    assert waited >= 0.25
    assert p.wait(10) == 0


def test_a_killed_lock_holder_leaves_no_stale_lock(
    store: Store, holder: Callable[[str], subprocess.Popen[str]],
) -> None:
    p = holder("ldevid")
    p.send_signal(signal.SIGKILL)
    p.wait(10)
    with store.identity_lock("ldevid", wait=False):
        pass


def test_tpm_lock_excludes_a_second_process(
    store: Store, holder: Callable[[str], subprocess.Popen[str]],
) -> None:
    p = holder("tpm")
    with pytest.raises(StoreError, match=rf"the TPM is in use by another tpmid process "
                                         rf"\(pid {p.pid}\)"):
        with store.tpm_lock(wait=False):
            pass
    with store.identity_lock("ldevid", wait=False):  # identity locks are independent
        pass


def test_tpm_lock_at_a_host_wide_path_is_shared_by_stores(tmp_path: Path) -> None:
    shared = tmp_path / "run" / "tpmid" / "tpm.lock"
    a, b = Store(tmp_path / "a"), Store(tmp_path / "b")
    with a.tpm_lock(shared):
        with pytest.raises(StoreError, match="TPM is in use"):
            with b.tpm_lock(shared, wait=False):
                pass
    with b.tpm_lock(shared, wait=False):
        pass


def test_identity_lock_is_not_reentrant_within_one_process(store: Store) -> None:
    with store.identity_lock("ldevid"):
        with pytest.raises(StoreError, match="being renewed"):
            with store.identity_lock("ldevid", wait=False):
                pass


# --------------------------------------------------------------------------- recovery


def test_recover_rolls_back_a_staged_key_that_no_journal_refers_to(
    store: Store, pki: Pki,
) -> None:
    enroll(store, pki)
    staged = store.stage_key("ldevid", key_blob("orphan"))
    actions = recover_lines(store)
    assert not staged.exists()
    assert any("orphaned key" in a for a in actions), actions
    assert store.current("ldevid") is not None


def test_recover_keeps_a_pending_journal_entry_with_its_key_and_csr(
    store: Store, pki: Pki,
) -> None:
    enroll(store, pki)
    staged = store.stage_key("ldevid", key_blob("pending"))
    entry = JournalEntry(operation="renew", phase="pending", version=Store.key_version(staged),
                         csr_pem=pki.csr_pem(), retry_after=120.0)
    store.journal_begin("ldevid", entry)
    actions = recover(store)
    assert [(a.name, a.action) for a in actions] == [("ldevid", "resume")]
    assert "retry after 120 s" in str(actions[0])
    assert staged.read_bytes() == key_blob("pending")
    assert store.journal_get("ldevid") == entry


@pytest.mark.parametrize(
    ("phase", "csr", "delete_key", "why"),
    [("staged", True, False, "nothing was sent yet"),
     ("submitted", False, False, "it had no CSR"),
     ("pending", True, True, "its key file is missing")],
    ids=["staged-never-sent", "no-csr", "key-file-lost"],
)
def test_recover_rolls_back_work_that_cannot_be_resumed(
    store: Store, pki: Pki, phase: str, csr: bool, delete_key: bool, why: str,
) -> None:
    (current,) = enroll(store, pki)
    staged = store.stage_key("ldevid", key_blob("new"))
    store.journal_begin("ldevid", JournalEntry(
        operation="renew", phase=phase,  # type: ignore[arg-type]
        version=Store.key_version(staged), csr_pem=pki.csr_pem() if csr else None))
    if delete_key:
        staged.unlink()
    actions = recover(store)
    assert [a.action for a in actions] == ["rollback"]
    assert why in actions[0].detail
    assert not staged.exists()
    assert store.journal_get("ldevid") is None
    cur = store.current("ldevid")
    assert cur is not None and cur.version == current


def test_recover_releases_a_tpm_object_of_rolled_back_work_through_the_callback(
    store: Store,
) -> None:
    store.journal_begin("ldevid", JournalEntry(operation="enroll", phase="staged",
                                               key_ref="persistent:0x81000010"))
    released: list[tuple[str, str]] = []
    actions = recover_lines(store, release_key_ref=lambda n, ref: released.append((n, ref)))
    assert released == [("ldevid", "persistent:0x81000010")]
    assert store.journal_get("ldevid") is None
    assert any("released persistent:0x81000010" in a for a in actions), actions


def test_recover_keeps_the_journal_when_a_tpm_object_cannot_be_released(store: Store) -> None:
    entry = JournalEntry(operation="enroll", phase="staged", key_ref="persistent:0x81000010")
    store.journal_begin("ldevid", entry)

    def tpm_down(name: str, ref: str) -> None:
        # Fault injection: a real swtpm that is down would fail the same way.
        raise TpmError("cannot reach the TPM")

    actions = recover(store, release_key_ref=tpm_down)
    assert [a.action for a in actions] == ["error"]
    assert store.journal_get("ldevid") == entry
    # Without a callback the entry also stays, for the next start-up.
    assert [a.action for a in recover(store)] == ["error"]
    assert store.journal_get("ldevid") == entry


def test_recover_discards_an_unreadable_journal_and_its_staged_key(
    store: Store, pki: Pki, root: Path,
) -> None:
    enroll(store, pki)
    staged = store.stage_key("ldevid", key_blob("x"))
    atomic_write(root / "journal/ldevid.json", b"{torn", 0o600)
    actions = recover_lines(store)
    assert store.journal_get("ldevid") is None
    assert not staged.exists()
    assert any("unreadable journal" in a for a in actions), actions


def test_recover_removes_temp_files_but_not_files_it_does_not_know(
    store: Store, pki: Pki, root: Path,
) -> None:
    enroll(store, pki)
    junk = [root / "certs/ldevid/.tmp-0009.abcdef01", root / "keys/ldevid/.tmp-0009.tss2.pem.x",
            root / "journal/.tmp-ldevid.json.0123abcd", root / "state/.tmp-ldevid.json.89abcdef"]
    junk[0].mkdir()
    (junk[0] / "cert.pem").write_text("partial")
    for j in junk[1:]:
        j.write_text("partial")
    foreign = root / "certs/ldevid/README"
    foreign.write_text("operator notes")
    recover_lines(store)
    assert not any(os.path.lexists(j) for j in junk)
    assert foreign.read_text() == "operator notes"


def test_recover_never_touches_the_current_version(store: Store, pki: Pki, root: Path) -> None:
    versions = enroll(store, pki, n=2)
    cur = store.current("ldevid")
    assert cur is not None and cur.key_file is not None
    files = [cur.cert_path, cur.chain_path, cur.key_file]
    before = {f: (f.read_bytes(), os.stat(f).st_mtime_ns) for f in files}
    store.stage_key("ldevid", key_blob("orphan"))
    (root / "certs/ldevid/.tmp-current.deadbeef").symlink_to("0001")
    recover_lines(store)
    recover_lines(store)
    assert {f: (f.read_bytes(), os.stat(f).st_mtime_ns) for f in files} == before
    assert store.versions("ldevid") == versions
    assert os.readlink(store.current_dir("ldevid")) == versions[-1]


def test_recover_never_deletes_a_version_newer_than_the_current_one(store: Store, pki: Pki,
                                                                    root: Path) -> None:
    # Issue 10, finding 4: recovery only ever adds. A newer version directory nobody
    # accounts for (no journal) may be the one intact copy of a certificate.
    (v1,) = enroll(store, pki)
    v2 = f"{int(v1) + 1:04d}"
    (root / "certs/ldevid" / v2).mkdir()
    (root / "certs/ldevid" / v2 / "cert.pem").write_bytes(pki.issue().public_bytes(
        serialization.Encoding.PEM))
    assert recover_lines(store) == []
    assert store.versions("ldevid") == [v1, v2]
    assert store.current("ldevid").version == v1  # type: ignore[union-attr]


def test_recover_prunes_versions_beyond_the_retention(root: Path, pki: Pki) -> None:
    versions = enroll(Store(root, retention=5), pki, n=5)
    actions = recover_lines(Store(root, retention=1))
    assert Store(root).versions("ldevid") == versions[-2:]
    assert sum("beyond the retention" in a for a in actions) == 3


def test_recover_points_a_broken_current_link_at_the_newest_intact_version(
    store: Store, pki: Pki, root: Path,
) -> None:
    v1, v2 = enroll(store, pki, n=2)
    os.rename(root / "certs/ldevid" / v2, root / "certs/ldevid/moved-away")
    actions = recover(store)
    assert actions[0].action == "completed"
    assert f"version {v1}, the newest intact one, is current now" in actions[0].detail
    assert store.current("ldevid").version == v1  # type: ignore[union-attr]
    assert (root / "certs/ldevid/moved-away").is_dir()  # nothing deleted
    damage = store.load_damage("ldevid")
    assert damage is not None and damage["version"] == v2 and damage["fell_back_to"] == v1


def test_recover_skips_an_identity_another_process_is_renewing(
    store: Store, pki: Pki, holder: Callable[[str], subprocess.Popen[str]],
) -> None:
    enroll(store, pki)
    staged = store.stage_key("ldevid", key_blob("in-progress"))
    holder("ldevid")
    actions = recover(store)
    assert [(a.name, a.action) for a in actions] == [("ldevid", "skipped")]
    assert staged.exists()


def test_recover_on_a_clean_store_does_nothing(store: Store, pki: Pki) -> None:
    enroll(store, pki, "ldevid", n=2)
    enroll(store, pki, "edgeca")
    assert recover_lines(store) == []


# --------------------------------------------------------------------------- durability order

TRACED = textwrap.dedent("""
    import sys
    from pathlib import Path
    from cryptography import x509
    from tpmid.policy import AttemptState
    from tpmid.store import Store
    root, cert, ca = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    s = Store(root)
    for i in range(2):
        key = s.stage_key("ldevid", b"key %d" % i)
        s.commit("ldevid", x509.load_pem_x509_certificate(cert.read_bytes()),
                 [x509.load_pem_x509_certificate(ca.read_bytes())], key)
    s.save_state("ldevid", AttemptState())
""")


@pytest.mark.skipif(not shutil.which("strace"), reason="needs strace to observe fsync order")
def test_every_rename_into_the_store_is_preceded_by_fsync_and_followed_by_a_directory_fsync(
    root: Path, pki: Pki, tmp_path: Path,
) -> None:
    # A SIGKILL cannot show missing fsyncs (the page cache survives it), so watch
    # the real system calls of a real enrolment + renewal instead.
    cert, ca = tmp_path / "cert.pem", tmp_path / "ca.pem"
    cert.write_bytes(pki.issue().public_bytes(serialization.Encoding.PEM))
    ca.write_bytes(pki.cert.public_bytes(serialization.Encoding.PEM))
    log = tmp_path / "strace.log"
    subprocess.run(["strace", "-f", "-y", "-qq", "-e", "trace=fsync,rename,renameat,renameat2",
                    "-o", str(log), sys.executable, "-c", TRACED, str(root), str(cert), str(ca)],
                   cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, check=True)
    events: list[tuple[str, str, str]] = []
    for line in log.read_text().splitlines():
        if m := re.search(r"fsync\(\d+<([^>]*)>\)\s+= 0", line):
            events.append(("fsync", m.group(1), ""))
        elif m := re.search(r'rename(?:at2?)?\((?:[^,]+, )?"([^"]+)", (?:[^,]+, )?"([^"]+)"', line):
            events.append(("rename", m.group(1), m.group(2)))
    renames = [(i, src, dst) for i, (kind, src, dst) in enumerate(events)
               if kind == "rename" and dst.startswith(str(root))]
    installed = [r for r in renames if not Path(r[2]).name.startswith(".tmp-")]
    # key files (2), version dirs (2), current swaps (2), state file (1)
    assert len(installed) >= 7, events
    for i, _src, dst in renames:
        synced_after = {p for kind, p, _ in events[i + 1:] if kind == "fsync"}
        assert str(Path(dst).parent) in synced_after, f"no directory fsync after rename to {dst}"
    for i, src, dst in installed:
        if Path(dst).name == "current":
            continue  # a symlink has no data to sync; its directory is synced after
        synced_before = {p for kind, p, _ in events[:i] if kind == "fsync"}
        assert src in synced_before, f"{src} renamed to {dst} without fsync"
        if Path(dst).parent.name == "ldevid" and Path(dst).parent.parent.name == "certs":
            # a version directory: its files were synced before it appeared
            assert f"{src}/cert.pem" in synced_before and f"{src}/chain.pem" in synced_before


def test_commit_of_a_tpm_resident_key_killed_before_the_swap_is_rolled_forward(
    root: Path, pki: Pki,
) -> None:
    s = Store(root)
    (old,) = enroll(s, pki, with_key=False)
    s.journal_begin("ldevid", JournalEntry(operation="renew", phase="issued",
                                           key_ref="persistent:0x81000010",
                                           csr_pem=pki.csr_pem()))
    new_cert = pki.issue("new")
    code = _killed_at("commit:version-written",
                      lambda: Store(root).commit("ldevid", new_cert, [pki.cert], None))
    assert code == -signal.SIGKILL
    cur = Store(root).current("ldevid")
    assert cur is not None and cur.version == old
    actions = recover(Store(root))
    assert [a.action for a in actions] == ["completed"]
    cur = Store(root).current("ldevid")
    assert cur is not None and cur.cert == new_cert and cur.key_file is None
    assert Store(root).journal_get("ldevid") is None
