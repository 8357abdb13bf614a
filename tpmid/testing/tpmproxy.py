"""A counting TCP proxy in front of a simulated TPM (swtpm), for tests and benchmarks.

The proxy sits *outside* tpmid's TPM stack: tpmid talks to it through an
ordinary ``swtpm:host=127.0.0.1,port=P`` TCTI and it forwards to the real
swtpm. Because every command crosses this extra TCP hop, a test can prove
what actually reached the TPM: a silent fallback to a software key inside
tpmid would show up as zero commands.

* Port P (command channel) is forwarded to ``upstream_port``; the TPM command
  frames on it are parsed (TPM 2.0 Part 1 §18.2 / Part 2 §10.6:
  ``tag u16 | commandSize u32 | commandCode u32``, big-endian; a frame can
  arrive split over several reads or several frames in one read) and counted,
  in total and by name ("TPM2_Sign").
* Port P+1 (control channel: the ``swtpm`` TCTI expects it at port + 1) is
  forwarded to ``upstream_ctrl_port`` untouched.
* ``delay`` seconds are added before each command is forwarded, to give the
  simulator the latency of a hardware TPM in benchmarks.

Use it in-process (``with TpmProxy(...) as proxy: ... proxy.tcti``) or as
``python -m tpmid.testing.tpmproxy --upstream-port N [--delay 0.02]``, which
prints the TCTI, prints a JSON line with the counts on SIGUSR1 and at exit, and
resets them on SIGUSR2.

Loopback only: the proxy binds 127.0.0.1 and refuses non-loopback upstreams.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import signal
import socket
import struct
import sys
import threading
import time
from collections import Counter
from types import TracebackType

HEADER = struct.Struct(">HII")  # tag, commandSize, commandCode
MAX_FRAME = 1 << 20  # far above any TPM's MAX_COMMAND_SIZE; larger means we lost sync

# TPM_CC values, TPM 2.0 Part 2 §6.5.2 (Table 12), as printed by the proxy.
_CC_NAMES: dict[int, str] = {
    0x11F: "NV_UndefineSpaceSpecial", 0x120: "EvictControl", 0x121: "HierarchyControl",
    0x122: "NV_UndefineSpace", 0x124: "ChangeEPS", 0x125: "ChangePPS", 0x126: "Clear",
    0x127: "ClearControl", 0x128: "ClockSet", 0x129: "HierarchyChangeAuth",
    0x12A: "NV_DefineSpace", 0x12B: "PCR_Allocate", 0x12C: "PCR_SetAuthPolicy",
    0x12D: "PP_Commands", 0x12E: "SetPrimaryPolicy", 0x12F: "FieldUpgradeStart",
    0x130: "ClockRateAdjust", 0x131: "CreatePrimary", 0x132: "NV_GlobalWriteLock",
    0x133: "GetCommandAuditDigest", 0x134: "NV_Increment", 0x135: "NV_SetBits",
    0x136: "NV_Extend", 0x137: "NV_Write", 0x138: "NV_WriteLock",
    0x139: "DictionaryAttackLockReset", 0x13A: "DictionaryAttackParameters",
    0x13B: "NV_ChangeAuth", 0x13C: "PCR_Event", 0x13D: "PCR_Reset", 0x13E: "SequenceComplete",
    0x13F: "SetAlgorithmSet", 0x140: "SetCommandCodeAuditStatus", 0x141: "FieldUpgradeData",
    0x142: "IncrementalSelfTest", 0x143: "SelfTest", 0x144: "Startup", 0x145: "Shutdown",
    0x146: "StirRandom", 0x147: "ActivateCredential", 0x148: "Certify", 0x149: "PolicyNV",
    0x14A: "CertifyCreation", 0x14B: "Duplicate", 0x14C: "GetTime",
    0x14D: "GetSessionAuditDigest", 0x14E: "NV_Read", 0x14F: "NV_ReadLock",
    0x150: "ObjectChangeAuth", 0x151: "PolicySecret", 0x152: "Rewrap", 0x153: "Create",
    0x154: "ECDH_ZGen", 0x155: "HMAC", 0x156: "Import", 0x157: "Load", 0x158: "Quote",
    0x159: "RSA_Decrypt", 0x15B: "HMAC_Start", 0x15C: "SequenceUpdate", 0x15D: "Sign",
    0x15E: "Unseal", 0x160: "PolicySigned", 0x161: "ContextLoad", 0x162: "ContextSave",
    0x163: "ECDH_KeyGen", 0x164: "EncryptDecrypt", 0x165: "FlushContext",
    0x167: "LoadExternal", 0x168: "MakeCredential", 0x169: "NV_ReadPublic",
    0x16A: "PolicyAuthorize", 0x16B: "PolicyAuthValue", 0x16C: "PolicyCommandCode",
    0x16D: "PolicyCounterTimer", 0x16E: "PolicyCpHash", 0x16F: "PolicyLocality",
    0x170: "PolicyNameHash", 0x171: "PolicyOR", 0x172: "PolicyTicket", 0x173: "ReadPublic",
    0x174: "RSA_Encrypt", 0x176: "StartAuthSession", 0x177: "VerifySignature",
    0x178: "ECC_Parameters", 0x179: "FirmwareRead", 0x17A: "GetCapability",
    0x17B: "GetRandom", 0x17C: "GetTestResult", 0x17D: "Hash", 0x17E: "PCR_Read",
    0x17F: "PolicyPCR", 0x180: "PolicyRestart", 0x181: "ReadClock", 0x182: "PCR_Extend",
    0x183: "PCR_SetAuthValue", 0x184: "NV_Certify", 0x185: "EventSequenceComplete",
    0x186: "HashSequenceStart", 0x187: "PolicyPhysicalPresence",
    0x188: "PolicyDuplicationSelect", 0x189: "PolicyGetDigest", 0x18A: "TestParms",
    0x18B: "Commit", 0x18C: "PolicyPassword", 0x18D: "ZGen_2Phase", 0x18E: "EC_Ephemeral",
    0x18F: "PolicyNvWritten", 0x190: "PolicyTemplate", 0x191: "CreateLoaded",
    0x192: "PolicyAuthorizeNV", 0x193: "EncryptDecrypt2", 0x194: "AC_GetCapability",
    0x195: "AC_Send", 0x196: "Policy_AC_SendSelect", 0x197: "CertifyX509",
    0x198: "ACT_SetTimeout", 0x199: "ECC_Encrypt", 0x19A: "ECC_Decrypt",
    0x19B: "PolicyCapability", 0x19C: "PolicyParameters", 0x19D: "NV_DefineSpace2",
    0x19E: "NV_ReadPublic2", 0x19F: "SetCapability", 0x20000000: "Vendor_TCG_Test",
}


def command_name(code: int) -> str:
    """``TPM2_<Name>`` for a command code, ``TPM2_CC_0x...`` for unknown ones."""
    name = _CC_NAMES.get(code)
    return f"TPM2_{name}" if name else f"TPM2_CC_0x{code:08X}"


class FrameCounter:
    """Incremental parser of TPM command frames on a byte stream."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self.in_sync = True

    def feed(self, data: bytes) -> list[tuple[bytes, int | None]]:
        """Add ``data``; return the complete chunks to forward as ``(bytes, code)``.

        ``code`` is the command code of a complete frame, or ``None`` for bytes
        forwarded without parsing after the stream lost sync (a size field that
        cannot be a TPM command): the proxy never stalls traffic it cannot parse.
        """
        if not self.in_sync:
            return [(data, None)] if data else []
        self._buf += data
        out: list[tuple[bytes, int | None]] = []
        while len(self._buf) >= HEADER.size:
            _tag, size, code = HEADER.unpack_from(self._buf)
            if size < HEADER.size or size > MAX_FRAME:
                self.in_sync = False
                out.append((bytes(self._buf), None))
                self._buf.clear()
                break
            if len(self._buf) < size:
                break
            out.append((bytes(self._buf[:size]), code))
            del self._buf[:size]
        return out


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class TpmProxy:
    """Forward a swtpm's command and control channels, counting TPM commands."""

    def __init__(self, upstream_host: str, upstream_port: int, upstream_ctrl_port: int,
                 delay: float = 0.0, *, host: str = "127.0.0.1", record: bool = False) -> None:
        """Prepare a proxy to ``upstream_host:upstream_port`` (+ its control port).

        ``record`` keeps every byte of the command channel, both ways (:attr:`wire`):
        a test can then show what crossed the "bus" in clear and what did not.
        """
        if not _is_loopback(upstream_host) or not _is_loopback(host):
            raise ValueError("the TPM proxy only works on loopback addresses")
        if delay < 0:
            raise ValueError("delay must be >= 0")
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self.upstream_ctrl_port = upstream_ctrl_port
        self.delay = delay
        self.host = host
        self.port = 0
        self._lock = threading.Lock()
        self._commands: list[str] = []
        self._unparsed = 0
        self._record = record
        self._wire = bytearray()
        self._listeners: list[socket.socket] = []
        self._conns: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()

    # -- results -------------------------------------------------------------------------

    @property
    def tcti(self) -> str:
        """TCTI string pointing at the proxy (``swtpm:host=...,port=P``)."""
        if not self.port:
            raise RuntimeError("TpmProxy is not started")
        return f"swtpm:host={self.host},port={self.port}"

    @property
    def ctrl_port(self) -> int:
        """The proxy's control-channel port (P + 1)."""
        return self.port + 1

    @property
    def count(self) -> int:
        """TPM commands forwarded since start or the last :meth:`reset`."""
        with self._lock:
            return len(self._commands)

    @property
    def commands(self) -> list[str]:
        """Names of the forwarded commands, in order ("TPM2_Sign", ...)."""
        with self._lock:
            return list(self._commands)

    @property
    def unparsed_bytes(self) -> int:
        """Bytes forwarded after a connection lost frame sync (should stay 0)."""
        with self._lock:
            return self._unparsed

    @property
    def wire(self) -> bytes:
        """Every byte of the command channel, commands and responses (with ``record``)."""
        with self._lock:
            return bytes(self._wire)

    def by_name(self) -> Counter[str]:
        """Command counts by name."""
        return Counter(self.commands)

    def reset(self) -> None:
        """Zero the counters."""
        with self._lock:
            self._commands.clear()
            self._unparsed = 0

    def stats(self) -> dict[str, object]:
        """A JSON-friendly snapshot: total, by name, unparsed bytes."""
        with self._lock:
            return {"count": len(self._commands), "by_name": dict(Counter(self._commands)),
                    "unparsed_bytes": self._unparsed}

    # -- lifecycle -----------------------------------------------------------------------

    def _bind_pair(self) -> tuple[socket.socket, socket.socket]:
        for _ in range(50):
            cmd = socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET)
            cmd.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            cmd.bind((self.host, 0))
            port = cmd.getsockname()[1]
            ctrl = socket.socket(cmd.family)
            ctrl.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                if port >= 65535:
                    raise OSError("no room for port + 1")
                ctrl.bind((self.host, port + 1))
            except OSError:
                cmd.close()
                ctrl.close()
                continue
            return cmd, ctrl
        raise OSError("no pair of free loopback ports for the TPM proxy")

    def start(self) -> TpmProxy:
        """Listen on P and P+1 and start forwarding; returns ``self``."""
        cmd, ctrl = self._bind_pair()
        self.port = cmd.getsockname()[1]
        for sock, upstream, counted in ((cmd, self.upstream_port, True),
                                        (ctrl, self.upstream_ctrl_port, False)):
            sock.listen(16)
            self._listeners.append(sock)
            self._spawn(self._accept_loop, sock, upstream, counted)
        return self

    def _spawn(self, target: object, *args: object) -> None:
        t = threading.Thread(target=target, args=args, daemon=True,  # type: ignore[arg-type]
                             name=f"tpmproxy-{self.port}")
        with self._lock:
            self._threads = [x for x in self._threads if x.is_alive()]
            self._threads.append(t)
        t.start()

    def _accept_loop(self, listener: socket.socket, upstream_port: int, counted: bool) -> None:
        while not self._stopping.is_set():
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                up = socket.create_connection((self.upstream_host, upstream_port), timeout=10)
                up.settimeout(None)
            except OSError:
                client.close()  # the TCTI sees a dead TPM, as it would without the proxy
                continue
            for s in (client, up):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._conns.update((client, up))
            self._spawn(self._pump, client, up, counted, counted)
            self._spawn(self._pump, up, client, False, counted)

    def _pump(self, src: socket.socket, dst: socket.socket, counted: bool,
              command_channel: bool) -> None:
        parser = FrameCounter() if counted else None
        record = self._record and command_channel
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if record:
                    with self._lock:
                        self._wire += data
                if parser is None:
                    dst.sendall(data)
                    continue
                for chunk, code in parser.feed(data):
                    if code is None:
                        with self._lock:
                            self._unparsed += len(chunk)
                    else:
                        with self._lock:
                            self._commands.append(command_name(code))
                        if self.delay:
                            time.sleep(self.delay)
                    dst.sendall(chunk)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()
                with self._lock:
                    self._conns.discard(s)

    def stop(self) -> None:
        """Close the listeners and every forwarded connection; join the threads."""
        self._stopping.set()
        for s in self._listeners:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
        self._listeners.clear()
        with self._lock:
            conns = list(self._conns)
            threads = list(self._threads)
        for s in conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for t in threads:
            if t is not threading.current_thread():
                t.join(timeout=5)

    def __enter__(self) -> TpmProxy:
        if not self.port:
            self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    """``python -m tpmid.testing.tpmproxy --upstream-port N [--delay S]``."""
    p = argparse.ArgumentParser(prog="tpmproxy", description=__doc__.splitlines()[0])
    p.add_argument("--upstream-host", default="127.0.0.1")
    p.add_argument("--upstream-port", type=int, required=True, help="swtpm command port")
    p.add_argument("--upstream-ctrl-port", type=int,
                   help="swtpm control port (default: upstream port + 1)")
    p.add_argument("--delay", type=float, default=0.0, help="seconds added per TPM command")
    args = p.parse_args(argv)

    proxy = TpmProxy(args.upstream_host, args.upstream_port,
                     args.upstream_ctrl_port or args.upstream_port + 1, args.delay).start()
    done = threading.Event()

    def dump(*_: object) -> None:
        print(json.dumps(proxy.stats(), sort_keys=True), flush=True)

    signal.signal(signal.SIGUSR1, dump)
    signal.signal(signal.SIGUSR2, lambda *_: proxy.reset())
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    print(proxy.tcti, flush=True)
    try:
        while not done.wait(0.5):
            pass
    finally:
        proxy.stop()
        dump()
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
