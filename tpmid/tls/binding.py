"""TLS channel bindings: what ties a request to the TLS connection it is sent on.

* TLS 1.2: ``tls-unique`` (RFC 5929 §3), which Python's ``ssl`` exposes;
* TLS 1.3: ``tls-exporter`` (RFC 9266 §2): 32 bytes of the exporter with the
  label "EXPORTER-Channel-Binding" and no context value. Python's ``ssl`` does
  not offer it, so it comes from ``SSL_export_keying_material`` of the very
  libssl the ``ssl`` module uses (:mod:`tpmid.tls._openssl`).

Both ends compute the same value only on the same TLS session: a value taken
on one connection does not match on another.
"""

from __future__ import annotations

import ssl

from tpmid.csr import ChannelBinding
from tpmid.errors import TlsShimError
from tpmid.tls import _openssl

EXPORTER_LABEL = b"EXPORTER-Channel-Binding"  # RFC 9266 §2
EXPORTER_LENGTH = 32


def channel_binding(sock: ssl.SSLSocket) -> ChannelBinding:
    """The binding of ``sock``'s session: tls-unique on TLS 1.2, tls-exporter on TLS 1.3."""
    version = sock.version()
    if version == "TLSv1.2":
        value = sock.get_channel_binding("tls-unique")
        if not value:
            raise TlsShimError("the TLS 1.2 connection has no tls-unique value")
        return ChannelBinding("tls-unique", value)
    if version == "TLSv1.3":
        return ChannelBinding("tls-exporter", _openssl.load().export_keying_material(
            sock, EXPORTER_LABEL, EXPORTER_LENGTH))
    raise TlsShimError(f"no channel binding for {version or 'an unencrypted connection'}")
