"""The reference CA and EST server (``tpmid est-server``) for tests, demos and labs.

* :func:`init_server_dir` — create the CAs, TLS certificate, config and IDevID secret;
* :class:`EstServer` — serve RFC 7030 over HTTPS on loopback (``start``/``stop``/``reload``);
* :class:`EstApp` — the protocol logic, request in, response out.

The device-side library never imports this package.
"""

from __future__ import annotations

from tpmid.server.app import EstApp, Request, Response
from tpmid.server.auth import hash_secret, verify_secret
from tpmid.server.config import ServerConfig, load_server_config, parse_server_config
from tpmid.server.server import EstServer
from tpmid.server.state import InitResult, ServerState, est_url, init_server_dir

__all__ = [
    "EstApp",
    "EstServer",
    "InitResult",
    "Request",
    "Response",
    "ServerConfig",
    "ServerState",
    "est_url",
    "hash_secret",
    "init_server_dir",
    "load_server_config",
    "parse_server_config",
    "verify_secret",
]
