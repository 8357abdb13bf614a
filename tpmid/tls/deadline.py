"""One deadline per exchange: connect, TLS handshake, request and response together.

A socket timeout bounds one ``recv``; a server that sends one byte per second
never trips it. :func:`exchange` sets a deadline for everything the current
thread does on tpmid's TLS sockets inside the block, and :class:`BoundedSSLSocket`
(installed as the ``sslsocket_class`` of every context tpmid builds, see
:func:`install`) clamps the timeout of each handshake step, read and write to
what is left of it. When it runs out, the operation raises
:class:`DeadlineExceeded` (a ``TimeoutError``), which the EST client reports as
"no complete answer within the exchange deadline".

Each blocking step is also :func:`~tpmid.cancel.interruptible`, so a stopping
daemon does not wait for the network. And after each handshake the context's
``after_handshake`` callback runs: the TPM lease gives the TPM back there
(:mod:`tpmid.tpm.lease`), so nothing holds the TPM while the server answers.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from tpmid import cancel

T = TypeVar("T")


class DeadlineExceeded(TimeoutError):
    """The exchange did not finish before its deadline."""


class Deadline:
    """A point in time ``seconds`` from now (monotonic clock)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.end = time.monotonic() + seconds

    def remaining(self) -> float:
        return self.end - time.monotonic()

    @property
    def expired(self) -> bool:
        return self.remaining() <= 0

    def exceeded(self) -> DeadlineExceeded:
        return DeadlineExceeded(f"no complete answer within {self.seconds:g} s")


_local = threading.local()


def current() -> Deadline | None:
    """The deadline of the exchange this thread is in, if any."""
    return getattr(_local, "deadline", None)


@contextlib.contextmanager
def exchange(seconds: float | None) -> Iterator[Deadline | None]:
    """Bound what this thread does on tpmid's TLS sockets inside the block (None: no bound)."""
    previous = current()
    deadline = Deadline(seconds) if seconds is not None else None
    _local.deadline = deadline
    try:
        yield deadline
    finally:
        _local.deadline = previous


def clamp(timeout: float | None) -> float | None:
    """``timeout`` limited to what is left of the current deadline (for a TCP connect)."""
    deadline = current()
    if deadline is None:
        return timeout
    left = deadline.remaining()
    if left <= 0:
        raise deadline.exceeded()
    return left if timeout is None else min(timeout, left)


def _bounded(sock: socket.socket, set_timeout: Callable[[float | None], None],
             base: float | None, call: Callable[..., T], *args: Any) -> T:
    """``call(*args)`` with the socket timeout clamped to the deadline, interruptible."""
    deadline = current()
    with cancel.interruptible():
        if deadline is None:
            return call(*args)
        left = deadline.remaining()
        if left <= 0:
            raise deadline.exceeded()
        set_timeout(left if base is None else min(base, left))
        try:
            return call(*args)
        except TimeoutError:
            if deadline.expired:
                raise deadline.exceeded() from None
            raise
        finally:
            set_timeout(base)


class BoundedSocket(socket.socket):
    """A plain TCP socket whose reads and writes respect the current deadline."""

    _base_timeout: float | None = None

    def settimeout(self, value: float | None) -> None:
        self._base_timeout = value
        super().settimeout(value)

    def _set(self, value: float | None) -> None:
        socket.socket.settimeout(self, value)

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        return _bounded(self, self._set, self._base_timeout, super().recv, bufsize, flags)

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        return _bounded(self, self._set, self._base_timeout, super().recv_into, buffer,
                        nbytes, flags)

    def send(self, data: Any, flags: int = 0) -> int:
        return _bounded(self, self._set, self._base_timeout, super().send, data, flags)

    def sendall(self, data: Any, flags: int = 0) -> None:
        _bounded(self, self._set, self._base_timeout, super().sendall, data, flags)


def bound(sock: socket.socket) -> BoundedSocket:
    """The connected ``sock`` as a :class:`BoundedSocket` (same descriptor)."""
    timeout = sock.gettimeout()
    bounded = BoundedSocket(sock.family, sock.type, sock.proto, fileno=sock.detach())
    bounded.settimeout(timeout)
    return bounded


class BoundedSSLSocket(ssl.SSLSocket):
    """An ``SSLSocket`` whose blocking steps respect the current :func:`exchange` deadline."""

    after_handshake: Callable[[], None] | None = None
    _base_timeout: float | None = None

    def settimeout(self, value: float | None) -> None:
        self._base_timeout = value
        super().settimeout(value)

    def _set(self, value: float | None) -> None:
        ssl.SSLSocket.settimeout(self, value)

    def _bounded(self, call: Callable[..., T], *args: Any) -> T:
        return _bounded(self, self._set, self._base_timeout, call, *args)

    def do_handshake(self, block: bool = False) -> None:
        try:
            self._bounded(super().do_handshake, block)
        finally:
            hook = type(self).after_handshake
            if hook is not None:
                hook()

    def read(self, len: int = 1024, buffer: Any = None) -> Any:  # noqa: A002 (ssl's names)
        if buffer is None:
            return self._bounded(super().read, len)
        return self._bounded(super().read, len, buffer)

    def write(self, data: Any) -> int:
        return self._bounded(super().write, data)

    def send(self, data: Any, flags: int = 0) -> int:
        return self._bounded(super().send, data, flags)


def install(ctx: ssl.SSLContext, *, after_handshake: Callable[[], None] | None = None) -> None:
    """Make ``ctx`` wrap sockets as :class:`BoundedSSLSocket` (with ``after_handshake``)."""
    if after_handshake is None:
        ctx.sslsocket_class = BoundedSSLSocket
        return
    ctx.sslsocket_class = type("BoundedSSLSocket", (BoundedSSLSocket,),
                               {"after_handshake": staticmethod(after_handshake)})
