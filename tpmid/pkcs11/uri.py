"""PKCS#11 URIs (RFC 7512) for tpmid's token objects.

tpmid's URI names a key by its token label and its object label (``CKA_LABEL``):
``pkcs11:token=tpmid;object=ldevid;type=private``. The label is the one thing
that stays the same across renewals (``CKA_ID`` is new with every key), and no
two objects of one class ever carry it at once: a new key waits under
``<label>.next`` until its certificate is committed. ``type=private`` picks the
private key of the key pair and certificate sharing the label; consumers that
ignore it (IoT Edge's key service looks a key pair up by label) are served too.
"""

from __future__ import annotations

from urllib.parse import quote, unquote


def _pct(value: str) -> str:
    # RFC 7512 §2.3: anything outside the unreserved set is percent-encoded.
    return quote(value, safe="-._~")


def pkcs11_uri(token: str, label: str | None = None, *, object_type: str | None = "private",
               pin: str | None = None) -> str:
    """``pkcs11:token=...;object=...;type=...`` with ``?pin-value=...`` when ``pin`` is given.

    A URI with a PIN is a secret: write it only into a 0600 file.
    """
    parts = [f"token={_pct(token)}"]
    if label is not None:
        parts.append(f"object={_pct(label)}")
        if object_type:
            parts.append(f"type={object_type}")
    uri = "pkcs11:" + ";".join(parts)
    if pin is not None:
        uri += f"?pin-value={_pct(pin)}"
    return uri


def parse_pkcs11_uri(uri: str) -> dict[str, str]:
    """The path and query attributes of a ``pkcs11:`` URI, percent-decoded (RFC 7512 §2.3).

    ValueError for anything that is not a PKCS#11 URI.
    """
    if not uri.startswith("pkcs11:"):
        raise ValueError("not a pkcs11: URI")
    path, _, query = uri[len("pkcs11:"):].partition("?")
    out: dict[str, str] = {}
    for part in [p for p in path.split(";") if p] + [q for q in query.split("&") if q]:
        key, sep, value = part.partition("=")
        if not sep or not key:
            raise ValueError(f"{part!r} is not an attribute=value pair")
        out[unquote(key)] = unquote(value)
    return out
