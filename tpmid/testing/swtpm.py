"""Manufacture and run simulated TPMs (swtpm) for tests, demos and benchmarks.

A simulated TPM is *manufactured* the way a factory TPM arrives: ``swtpm_setup
--tpm2`` creates the RSA-2048 and ECC P-384 endorsement keys, persists them
(0x81010001, 0x81010016) and writes EK certificates into NV (0x01C00002,
0x01C00016) signed by a certificate authority that lives inside the TPM's own
directory (``DIR/localca``), never the host-wide ``/var/lib/swtpm-localca``.

``Swtpm`` runs ``swtpm socket`` on two consecutive free loopback ports (the
``swtpm`` TCTI expects the control channel at port + 1), waits until the
control channel answers, and can power-cycle the TPM through that channel.

This module is used by the pytest plugin (:mod:`tpmid.testing.plugin`),
``scripts/demo``, ``scripts/bench`` and the ``swtpm/`` scripts; it is not part of
the device-side library.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

# swtpm control channel commands (swtpm/include/swtpm/tpm_ioctl.h).
CMD_GET_CAPABILITY = 0x01
CMD_INIT = 0x02
CMD_SHUTDOWN = 0x03
CMD_STOP = 0x0E

LOCALCA_TOOL = "/usr/bin/swtpm_localca"


class SwtpmFailure(RuntimeError):
    """swtpm or swtpm_setup failed; the message includes the tail of its log."""


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def manufacture(directory: Path, *, ca_dir: Path | None = None) -> Path:
    """Create a factory-fresh TPM state under ``directory`` and return it.

    Layout: ``directory/tpm`` (swtpm state), ``directory/localca`` (the CA that
    signed the EK certificates, with ``issuercert.pem`` and
    ``swtpm-localca-rootca-cert.pem``). Passing ``ca_dir`` of an earlier
    manufacture reuses its CA (saves the CA key generation).
    """
    directory = directory.resolve()
    state = directory / "tpm"
    ca = directory / "localca"
    state.mkdir(parents=True, exist_ok=True)
    if ca_dir is not None and ca_dir.resolve() != ca:
        shutil.copytree(ca_dir, ca, dirs_exist_ok=True)
        (ca / ".lock.swtpm-localca").unlink(missing_ok=True)
    ca.mkdir(parents=True, exist_ok=True)
    (ca / "swtpm-localca.conf").write_text(
        f"statedir = {ca}\n"
        f"signingkey = {ca}/signkey.pem\n"
        f"issuercert = {ca}/issuercert.pem\n"
        f"certserial = {ca}/certserial\n"
    )
    (ca / "swtpm-localca.options").write_text(
        "--platform-manufacturer tpmid\n--platform-version 2.1\n--platform-model swtpm\n"
    )
    setup_conf = directory / "swtpm_setup.conf"
    setup_conf.write_text(
        f"create_certs_tool = {LOCALCA_TOOL}\n"
        f"create_certs_tool_config = {ca}/swtpm-localca.conf\n"
        f"create_certs_tool_options = {ca}/swtpm-localca.options\n"
        "active_pcr_banks = sha256\n"
    )
    log = directory / "swtpm_setup.log"
    cmd = [
        "swtpm_setup", "--tpm2", "--tpmstate", str(state),
        "--create-ek-cert", "--create-platform-cert", "--lock-nvram",
        "--config", str(setup_conf), "--logfile", str(log),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SwtpmFailure(f"swtpm_setup failed ({proc.returncode}):\n{_tail(log)}")
    return directory


def copy_state(template: Path, directory: Path) -> Path:
    """Copy a manufactured TPM (state and its CA) to ``directory``: a fresh identical TPM."""
    shutil.copytree(template, directory, dirs_exist_ok=True)
    for lock in (directory / "tpm" / ".lock", directory / "localca" / ".lock.swtpm-localca"):
        lock.unlink(missing_ok=True)
    return directory


def _free_port_pair(host: str) -> int:
    """Return a port P such that P and P+1 were both free a moment ago."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        if port >= 65535:
            continue
        with socket.socket() as s2:
            try:
                s2.bind((host, port + 1))
            except OSError:
                continue
        return port
    raise SwtpmFailure("no pair of free loopback ports found")


def _alive(pid: int) -> bool:
    """True while ``pid`` runs; a zombie (nobody reaps daemons in containers) is dead."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


@dataclass
class Swtpm:
    """A running ``swtpm socket`` process on loopback."""

    directory: Path
    host: str = "127.0.0.1"
    port: int = 0
    pid: int = 0
    _proc: subprocess.Popen[bytes] | None = None

    @property
    def state_dir(self) -> Path:
        return self.directory / "tpm"

    @property
    def ca_dir(self) -> Path:
        return self.directory / "localca"

    @property
    def ctrl_port(self) -> int:
        return self.port + 1

    @property
    def tcti(self) -> str:
        """TCTI string for tpm2-tss / tpmid (``swtpm:host=...,port=...``)."""
        return f"swtpm:host={self.host},port={self.port}"

    @property
    def tools_tcti(self) -> str:
        """TCTI string in tpm2-tools' ``-T`` / ``TPM2TOOLS_TCTI`` syntax."""
        return self.tcti

    def start(self, timeout: float = 10.0) -> Swtpm:
        """Start swtpm on a free port pair and wait until it answers."""
        last = ""
        for _ in range(5):
            self.port = _free_port_pair(self.host)
            log = self.directory / "swtpm.log"
            cmd = [
                "swtpm", "socket", "--tpm2",
                "--tpmstate", f"dir={self.state_dir}",
                "--server", f"type=tcp,port={self.port},bindaddr={self.host}",
                "--ctrl", f"type=tcp,port={self.ctrl_port},bindaddr={self.host}",
                "--flags", "not-need-init,startup-clear",
                "--log", f"file={log},level=1",
            ]
            # A child (not --daemon) so that stop() can reap it; its own session so
            # that a Ctrl-C aimed at the test runner does not kill it mid-command.
            self._proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE, start_new_session=True,
            )
            self.pid = self._proc.pid
            (self.directory / "swtpm.pid").write_text(f"{self.pid}\n")
            try:
                self._wait_ready(timeout)
                return self
            except SwtpmFailure as e:
                last = str(e)
                if self._proc.poll() is not None and self._proc.stderr is not None:
                    last = self._proc.stderr.read().decode(errors="replace").strip() or last
                self.stop()
        raise SwtpmFailure(f"swtpm did not start: {last}")

    def _ctrl(self, cmd: int, payload: bytes = b"", reply: int = 4, timeout: float = 5.0) -> bytes:
        with socket.create_connection((self.host, self.ctrl_port), timeout=timeout) as s:
            s.sendall(struct.pack(">I", cmd) + payload)
            data = b""
            while len(data) < reply:
                chunk = s.recv(reply - len(data))
                if not chunk:
                    break
                data += chunk
        return data

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                # The reply is the 64-bit capability mask; any full reply means ready.
                if len(self._ctrl(CMD_GET_CAPABILITY, reply=8, timeout=1.0)) == 8:
                    with socket.create_connection((self.host, self.port), timeout=1.0):
                        return
            except OSError:
                pass
            if self._proc is not None and self._proc.poll() is not None:
                raise SwtpmFailure(f"swtpm exited with {self._proc.returncode}")
            if time.monotonic() > deadline:
                raise SwtpmFailure(f"swtpm on port {self.port} not ready after {timeout}s")
            time.sleep(0.01)

    def power_cycle(self) -> None:
        """Reset the TPM as a power loss would; TPM2_Startup(CLEAR) must follow.

        ``tpmid.tpm.connection`` issues the Startup itself when the TPM reports
        TPM_RC_INITIALIZE, exactly as firmware would on a real machine.
        """
        rc = self._ctrl(CMD_INIT, struct.pack(">I", 0))
        if rc != b"\0\0\0\0":
            raise SwtpmFailure(f"swtpm CMD_INIT failed: {rc.hex()}")

    def stop(self, timeout: float = 5.0) -> None:
        """Stop swtpm by pid (SIGTERM, then SIGKILL) and wait for the ports to close."""
        if not self.pid:
            return
        try:
            os.kill(self.pid, signal.SIGTERM)
        except ProcessLookupError:
            self.pid = 0
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not _alive(self.pid):
                break
            time.sleep(0.005)
        else:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self._proc is not None:
            self._proc.wait()
            if self._proc.stderr is not None:
                self._proc.stderr.close()
            self._proc = None
        self.pid = 0

    def __enter__(self) -> Swtpm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# What manufacture() makes (swtpm_setup --tpm2 --create-ek-cert defaults).
MANUFACTURED_EKS = (
    ("RSA-2048", 0x81010001, 0x01C00002),
    ("ECC P-384", 0x81010016, 0x01C00016),
)


def describe_manufactured(directory: Path) -> str:
    """What a manufactured TPM holds, for people: EKs, EK certificates, the local CA."""
    directory = directory.resolve()
    ca = directory / "localca"
    lines = [f"manufactured a simulated TPM in {directory}"]
    for alg, handle, nv in MANUFACTURED_EKS:
        lines.append(f"  EK {alg:<9} persistent 0x{handle:08X}, certificate in NV 0x{nv:08X}")
    lines += [
        "  platform certificate in NV 0x01C08000",
        f"  EK CA (local): {ca / 'issuercert.pem'} "
        f"(root: {ca / 'swtpm-localca-rootca-cert.pem'})",
        f"  TPM state: {directory / 'tpm'}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``python -m tpmid.testing.swtpm manufacture DIR`` / ``run DIR`` / ``stop DIR``.

    Errors go to stderr and exit 1, so that ``tcti=$(swtpm/run DIR)`` captures a
    TCTI or nothing. ``manufacture`` reports what it made on stdout.
    """
    p = argparse.ArgumentParser(prog="swtpm-harness", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("manufacture", help="create a factory-fresh TPM state in DIR")
    m.add_argument("dir", type=Path)
    r = sub.add_parser("run", help="start swtpm on DIR and print its TCTI; stop with `stop DIR`")
    r.add_argument("dir", type=Path)
    s = sub.add_parser("stop", help="stop the swtpm started with `run DIR`")
    s.add_argument("dir", type=Path)
    args = p.parse_args(argv)
    directory: Path = args.dir
    try:
        if args.cmd == "manufacture":
            manufacture(directory)
            print(describe_manufactured(directory))
        elif args.cmd == "run":
            if not (directory / "tpm").is_dir():
                raise SwtpmFailure(f"{directory} holds no manufactured TPM (no {directory / 'tpm'}); "
                                   f"make one first with: swtpm/manufacture {directory}")
            t = Swtpm(directory.resolve()).start()
            (directory / "tcti").write_text(t.tcti + "\n")
            print(t.tcti)
        else:
            pid_file = directory / "swtpm.pid"
            try:
                pid = int(pid_file.read_text())
            except FileNotFoundError:
                raise SwtpmFailure(f"no swtpm runs for {directory} (no {pid_file}); "
                                   f"start one with: swtpm/run {directory}") from None
            except ValueError:
                raise SwtpmFailure(f"{pid_file} does not hold a process id") from None
            if not _alive(pid):
                pid_file.unlink(missing_ok=True)
                raise SwtpmFailure(f"the swtpm of {directory} (pid {pid}) is not running")
            Swtpm(directory.resolve(), pid=pid).stop()
            pid_file.unlink(missing_ok=True)
            print(f"stopped the swtpm of {directory.resolve()} (pid {pid})")
    except (SwtpmFailure, OSError) as e:
        print(f"swtpm {args.cmd}: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
