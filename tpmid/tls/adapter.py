"""A ``requests`` transport adapter that uses a given ``SSLContext`` (e.g. the TPM one).

``requests`` builds its own TLS settings from ``verify=``/``cert=``; this
adapter makes urllib3 use our context instead, unchanged: trust anchors,
hostname checking and the client key are all the :class:`ClientTls`'s.
``verify=`` passed to requests is ignored (the context decides), ``cert=`` is
refused (the client key is in the context).

Connections are made within the current exchange deadline and on sockets
that respect it (:mod:`tpmid.tls.deadline`); :class:`BoundedHTTPAdapter` does
the same for plain HTTP.

When a handshake fails because the TPM could not sign, urllib3 only sees an
``ssl.SSLError``; the adapter then raises the error the signing callback
captured (a ``TpmError`` with the TPM's message) from the ``requests``
exception.

    session = requests.Session()
    session.mount("https://", SSLContextAdapter(tls))
"""

from __future__ import annotations

import logging
import socket
import ssl
from collections.abc import Mapping
from typing import Any

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from tpmid import cancel
from tpmid.tls import deadline
from tpmid.tls.context import ClientTls

log = logging.getLogger(__name__)

_CERT_REQS = {ssl.CERT_NONE: "CERT_NONE", ssl.CERT_OPTIONAL: "CERT_OPTIONAL",
              ssl.CERT_REQUIRED: "CERT_REQUIRED"}


class _Connect:
    """Connects within the exchange deadline, interruptibly, to a bounded socket."""

    timeout: Any

    def _new_conn(self) -> socket.socket:
        self.timeout = deadline.clamp(self.timeout)
        with cancel.interruptible():
            sock = super()._new_conn()  # type: ignore[misc]
        return deadline.bound(sock)


class _HTTPConnection(_Connect, HTTPConnection):
    pass


class _HTTPSConnection(_Connect, HTTPSConnection):
    pass


class _HTTPPool(HTTPConnectionPool):
    ConnectionCls = _HTTPConnection


class _HTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _HTTPSConnection


def _bounded_pools(manager: Any) -> None:
    manager.pool_classes_by_scheme = {"http": _HTTPPool, "https": _HTTPSPool}


class BoundedHTTPAdapter(HTTPAdapter):
    """Plain HTTP (lab servers with ``allow_http``) under the same exchange deadline."""

    def init_poolmanager(self, connections: int, maxsize: int, block: bool = False,
                         **pool_kwargs: Any) -> None:
        super().init_poolmanager(connections, maxsize, block=block, **pool_kwargs)
        _bounded_pools(self.poolmanager)


class SSLContextAdapter(HTTPAdapter):
    """Send HTTPS through ``tls`` (a :class:`ClientTls` or a plain ``ssl.SSLContext``)."""

    def __init__(self, tls: ClientTls | ssl.SSLContext, **kwargs: Any) -> None:
        """``kwargs`` go to :class:`requests.adapters.HTTPAdapter` (pool sizes, retries)."""
        if isinstance(tls, ClientTls):
            self.client_tls: ClientTls | None = tls
            self.ssl_context = tls.ssl_context
        else:
            self.client_tls = None
            self.ssl_context = tls
        super().__init__(**kwargs)

    def init_poolmanager(self, connections: int, maxsize: int, block: bool = False,
                         **pool_kwargs: Any) -> None:
        """Every pool gets our context."""
        pool_kwargs["ssl_context"] = self.ssl_context
        super().init_poolmanager(connections, maxsize, block=block, **pool_kwargs)
        _bounded_pools(self.poolmanager)

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
        """HTTPS through a proxy uses our context too."""
        proxy_kwargs["ssl_context"] = self.ssl_context
        return super().proxy_manager_for(proxy, **proxy_kwargs)

    def build_connection_pool_key_attributes(
        self, request: requests.PreparedRequest, verify: Any, cert: Any = None
    ) -> Any:
        """Pool key from the request's host, TLS settings from our context only.

        urllib3 writes ``cert_reqs`` into the context it is given and loads
        ``ca_certs``/``cert_file`` into it; we pass exactly what the context
        already has so that it is never modified.
        """
        if cert is not None:
            raise ValueError(
                "SSLContextAdapter: the client certificate lives in the SSLContext; "
                "do not pass cert= to requests"
            )
        host_params, _ = super().build_connection_pool_key_attributes(request, True, None)
        if verify is not True:
            log.debug("SSLContextAdapter ignores verify=%r: the SSLContext decides", verify)
        pool_kwargs = {"ssl_context": self.ssl_context,
                       "cert_reqs": _CERT_REQS[self.ssl_context.verify_mode]}
        return host_params, pool_kwargs

    def cert_verify(self, conn: Any, url: str, verify: Any, cert: Any) -> None:
        """No-op: verification is configured in the SSLContext (see the class doc)."""

    def send(self, request: requests.PreparedRequest, stream: bool = False,
             timeout: Any = None, verify: Any = True, cert: Any = None,
             proxies: Mapping[str, str] | None = None) -> requests.Response:
        """Send; a failed TPM signature surfaces as the TPM's error, not a bare SSLError."""
        if self.client_tls is not None:
            self.client_tls.clear_pending()
        try:
            return super().send(request, stream=stream, timeout=timeout, verify=verify,
                                cert=cert, proxies=proxies)
        except requests.RequestException as e:
            if self.client_tls is not None:
                self.client_tls.raise_pending(e)
            raise
