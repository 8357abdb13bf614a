"""Everything OpenSSL: the TPM-backed TLS signing shim and ``SSLContext`` construction.

Import the public API from here or from :mod:`tpmid.tls.context`::

    from tpmid.tls import client_tls
    with client_tls(key=loaded_key, cert_chain=[ldevid], trust_anchors=[est_ca]) as tls:
        ...

See docs/tls-shim.md for how the shim works and what it refuses.
"""

from __future__ import annotations

from tpmid.tls.context import ClientTls, client_tls, self_test
from tpmid.tls.keys import SoftwareSigningKey, TlsSigningKey

__all__ = ["ClientTls", "SoftwareSigningKey", "TlsSigningKey", "client_tls", "self_test"]
