"""A TPM command that never hangs: the swtpm TCTI in Python, with a timeout.

tpm2-tss's socket TCTIs wait for a response without limit, so a simulator that
is stopped (or a wedged TPM proxy) hangs every command forever. For
``swtpm:`` TCTI strings tpmid speaks swtpm's command channel itself through
tpm2-pytss's :class:`~tpm2_pytss.TCTI.PyTCTI`, the way libtss2-tcti-swtpm does:
one TCP (or Unix) connection per command, the raw command out, the response
header (``tag u16 | size u32 | code u32``, TPM 2.0 Part 1 §18) and the rest by
its size back. Each command must be answered within the timeout
(``tpm.timeout``); otherwise the connection is dropped and the TCTI refuses
every further command with the same error, so a late answer can never be read
as the answer to the next command.

Other TCTIs go to tpm2-tss unchanged: ``device:`` relies on the kernel driver's
own command timeouts (TCG PC Client PTP, minutes at most), ``mssim:`` and
``tabrmd:`` have no tpmid timeout.

While a response is awaited the wait is :func:`~tpmid.cancel.interruptible`:
a stopping daemon does not wait for the TPM.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import time
from dataclasses import dataclass

from tpm2_pytss.TCTI import PyTCTI

from tpmid import cancel
from tpmid.errors import TpmError, TpmidError

HEADER = struct.Struct(">HII")  # tag, size, code
MAX_RESPONSE = 4096  # swtpm's and tpm2-tss's buffer size (TPM2_MAX_COMMAND_SIZE)
DEFAULT_PORT = 2321


@dataclass(frozen=True)
class SwtpmAddress:
    """Where swtpm's command channel listens (TCP ``host``/``port``, or a Unix ``path``)."""

    host: str = "localhost"
    port: int = DEFAULT_PORT
    path: str | None = None

    def describe(self) -> str:
        return self.path if self.path else f"{self.host}:{self.port}"


def parse_swtpm(tcti: str) -> SwtpmAddress | None:
    """The address in a ``swtpm:host=H,port=P`` (or ``path=``) string; None if not swtpm.

    Raises TpmError for a swtpm string it cannot read (tpm2-tss would refuse it too).
    """
    name, _, conf = tcti.partition(":")
    if name not in ("swtpm", "libtss2-tcti-swtpm.so", "libtss2-tcti-swtpm.so.0"):
        return None
    fields: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in conf.split(","))):
        key, sep, value = part.partition("=")
        if not sep or key not in ("host", "port", "path") or key in fields:
            raise TpmError(f"{tcti!r}: cannot read {part!r}",
                           hint="use swtpm:host=127.0.0.1,port=2321 or swtpm:path=/run/swtpm.sock")
        fields[key] = value
    port = fields.get("port", str(DEFAULT_PORT))
    if not port.isdigit() or not 0 < int(port) < 65535:
        raise TpmError(f"{tcti!r}: port {port!r} is not a TCP port (1..65534; swtpm's "
                       "control channel is port + 1)")
    return SwtpmAddress(host=fields.get("host", "localhost"), port=int(port),
                        path=fields.get("path"))


class SwtpmTcti(PyTCTI):
    """swtpm's command channel with a per-command timeout (see the module docstring)."""

    def __init__(self, address: SwtpmAddress, timeout: float, tcti: str = "swtpm") -> None:
        super().__init__(max_size=MAX_RESPONSE, magic=b"TPMIDSW\x00")
        self.address = address
        self.timeout = timeout
        self.tcti = tcti
        self._sock: socket.socket | None = None
        self._deadline = 0.0
        # Once set, every command fails with it: the connection state is unknown.
        self.failure: TpmidError | None = None
        # Why the last command could not be sent (the next one tries again).
        self.error: TpmidError | None = None

    # ---------------------------------------------------------------- PyTCTI

    def do_transmit(self, command: bytes) -> None:
        if self.failure is not None:
            raise self.failure
        self.error = None
        self._drop()
        self._deadline = time.monotonic() + self.timeout
        try:
            with cancel.interruptible():
                self._sock = self._connect()
                self._sock.settimeout(self._remaining())
                self._sock.sendall(command)
        except TimeoutError as e:
            raise self._fail(self._silent()) from e
        except OSError as e:
            self._drop()  # nothing was executed: the next command connects again
            self.error = TpmError(
                f"TPM not reachable through TCTI {self.tcti!r}: {e.strerror or e}",
                hint=f"check that the TPM or simulator is running (swtpm listening at "
                     f"{self.address.describe()})")
            raise self.error from e
        except cancel.Cancelled as e:
            raise self._fail(e) from None

    def do_receive(self, timeout: int) -> bytes:
        # tpm2-tss passes -1 (block) from its synchronous calls; our own timeout rules.
        del timeout
        if self.failure is not None:
            raise self.failure
        try:
            head = self._read(HEADER.size)
            _tag, size, _code = HEADER.unpack(head)
            if not HEADER.size <= size <= MAX_RESPONSE:
                raise self._fail(TpmError(f"the TPM at {self.address.describe()} sent a "
                                          f"response header claiming {size} bytes"))
            return head + self._read(size - HEADER.size)
        finally:
            self._drop()  # one connection per command, as libtss2-tcti-swtpm does

    def do_finalize(self) -> None:
        self._drop()

    # ---------------------------------------------------------------- helpers

    def close(self) -> None:
        """Drop the connection (ESAPI does not finalize a TCTI it did not load)."""
        self._drop()

    def _connect(self) -> socket.socket:
        if self.address.path:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(self._remaining())
                sock.connect(self.address.path)
            except BaseException:
                sock.close()
                raise
            return sock
        return socket.create_connection((self.address.host, self.address.port),
                                        timeout=self._remaining())

    def _remaining(self) -> float:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        return left

    def _read(self, n: int) -> bytes:
        sock = self._sock
        if sock is None:
            raise self._fail(TpmError("TPM response awaited without a command sent"))
        data = bytearray()
        try:
            with cancel.interruptible():
                while len(data) < n:
                    sock.settimeout(self._remaining())
                    chunk = sock.recv(n - len(data))
                    if not chunk:
                        raise self._fail(TpmError(
                            f"the TPM at {self.address.describe()} closed the connection "
                            "before answering",
                            hint="check swtpm's log; it may have stopped or restarted"))
                    data += chunk
        except TimeoutError as e:
            raise self._fail(self._silent()) from e
        except cancel.Cancelled as e:
            raise self._fail(e) from None
        except OSError as e:
            raise self._fail(TpmError(f"lost the connection to the TPM at "
                                      f"{self.address.describe()}: {e.strerror or e}")) from e
        return bytes(data)

    def _silent(self) -> TpmError:
        return TpmError(
            f"the TPM at {self.address.describe()} did not answer within {self.timeout:g} s "
            "(tpm.timeout); the connection was dropped",
            hint="check that the TPM (or swtpm) is running and not stopped; raise tpm.timeout "
            "for a slow TPM")

    def _fail(self, error: TpmidError) -> TpmidError:
        self.failure = error
        self._drop()
        return error

    def _drop(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()


def has_resource_manager(tcti: str) -> bool:
    """True for TCTIs behind a resource manager (``/dev/tpmrm*``, tabrmd).

    A resource manager flushes a client's transient objects when it goes away;
    swtpm, mssim and ``/dev/tpm0`` keep them until they are flushed or the TPM resets.
    """
    name, _, conf = tcti.partition(":")
    # A bare "device" may end up on /dev/tpm0: counted as without (a ledger is harmless
    # behind a resource manager, a missing one is not without).
    return "tabrmd" in name or (name.startswith("device") and "tpmrm" in conf)


def open_tcti(tcti: str, timeout: float | None) -> SwtpmTcti | str:
    """What ESAPI gets for ``tcti``: a :class:`SwtpmTcti` for swtpm strings, else the string."""
    if timeout is None:
        return tcti
    address = parse_swtpm(tcti)
    if address is None:
        return tcti
    return SwtpmTcti(address, timeout, tcti)
