"""Drives tpm2-pkcs11's own tooling (the ``tpm2_pkcs11`` package behind ``tpm2_ptool``) as a library.

Run by :class:`tpmid.pkcs11.token.TokenStore` with the Python the tooling was
packaged for (``tpm2_ptool``'s interpreter, ``/usr/bin/python3`` on Debian), never
imported by tpmid: one JSON request on standard input, one JSON answer on
standard output. The store's SQLite schema, the PKCS#11 attributes of keys and
certificates and their encoding are tpm2-pkcs11's own code (``Db``,
``PKCS11ObjectFactory``, ``PKCS11X509``, ``pemcert_to_attrs``); this script
only chooses which of its functions to call, in one SQLite transaction per
request.

Nothing secret passes through here: tpmid does the TPM work itself (sealing and
unsealing the token's wrapping key with the PIN-derived authorization, in its
own process) and hands over public blobs, salts and the already encrypted
(empty) object authorization. That is also why no TPM is opened here and no
``tpm2-tools`` command runs: ``tpm2_ptool`` itself runs them with the PIN-derived
authorization on their command line and without flushing what they load.

Requests (``op``):

* ``describe``: the store's primary objects and tokens, and the objects of one token;
* ``transaction``: a list of ``steps`` applied in one SQLite transaction (all or
  nothing): ``add_primary``, ``add_token``, ``link``, ``add_cert``, ``delete``,
  ``relabel``.
"""

from __future__ import annotations

import binascii
import json
import os
import sys
import tempfile
import traceback
from typing import Any

# tpm2-pkcs11's tooling (and its PyYAML); present in the interpreter this script is run with.
import yaml
from tpm2_pkcs11 import objects as p11objects
from tpm2_pkcs11 import pkcs11t
from tpm2_pkcs11 import utils as p11utils
from tpm2_pkcs11.db import Db

DB_FILE = "tpm2_pkcs11.sqlite3"


class _Capabilities:
    """Stands in for tpm2_ptool's ``Tpm2`` where the object factory asks the TPM's algorithms.

    tpmid read them from the TPM (TPM2_GetCapability) and passed them in; the
    factory only parses ``getcap('algorithms')`` as YAML and looks names up.
    """

    def __init__(self, algorithms: list[str]) -> None:
        self._algorithms = algorithms

    def getcap(self, what: str) -> str:
        if what != "algorithms":
            raise RuntimeError(f"capability {what!r} is not available here")
        return "".join(f"{a}: {{}}\n" for a in self._algorithms)


def _hexlabel(label: str) -> str:
    return binascii.hexlify(label.encode()).decode()


def _unhex(value: Any) -> str:
    try:
        return binascii.unhexlify(value).decode()
    except (TypeError, ValueError, binascii.Error):
        return ""


def _token(db: Any, label: str) -> Any:
    c = db._conn.cursor()
    c.execute("SELECT * from tokens WHERE label=?", (label,))
    return c.fetchone()


def _load_attrs(row: Any) -> dict[int, Any]:
    attrs = yaml.safe_load(row["attrs"])
    return attrs if isinstance(attrs, dict) else {}


def _describe_object(row: Any) -> dict[str, Any]:
    a = _load_attrs(row)
    return {
        "id": row["id"],
        "class": a.get(pkcs11t.CKA_CLASS),
        "key_type": a.get(pkcs11t.CKA_KEY_TYPE),
        "label": _unhex(a.get(pkcs11t.CKA_LABEL, "")),
        "ckaid": _unhex(a.get(pkcs11t.CKA_ID, "")),
        "tpm_public": a.get(pkcs11t.CKA_TPM2_PUB_BLOB),
        "value": a.get(pkcs11t.CKA_VALUE) if a.get(pkcs11t.CKA_CLASS) == pkcs11t.CKO_CERTIFICATE
        else None,
        "mechanisms": a.get(pkcs11t.CKA_ALLOWED_MECHANISMS),
    }


def describe(store: str, token: str | None) -> dict[str, Any]:
    """What the store holds; an absent store is reported, never created."""
    if not os.path.exists(os.path.join(store, DB_FILE)):
        return {"exists": False, "primaries": [], "tokens": [], "objects": []}
    with Db(store) as db:
        prims = [{"id": p["id"], "config": p["config"], "hierarchy": p["hierarchy"]}
                 for p in db.getprimaries()]
        c = db._conn.cursor()
        c.execute("SELECT * from tokens")
        tokens = []
        for t in c.fetchall():
            seal = db.getsealobject(t["id"])
            tokens.append({
                "id": t["id"], "label": t["label"], "pid": t["pid"], "config": t["config"],
                "user_pub": bytes(seal["userpub"]).hex() if seal and seal["userpub"] else None,
                "user_priv": bytes(seal["userpriv"]).hex() if seal and seal["userpriv"] else None,
                "user_salt": seal["userauthsalt"] if seal else None,
            })
        objs: list[dict[str, Any]] = []
        if token is not None:
            row = _token(db, token)
            if row is not None:
                objs = [_describe_object(o) for o in db.getobjects(row["id"])]
    return {"exists": True, "primaries": prims, "tokens": tokens, "objects": objs}


def _write(tmp: str, name: str, data: bytes) -> str:
    path = os.path.join(tmp, name)
    with open(path, "wb") as f:
        f.write(data)
    return path


def _step(db: Any, step: dict[str, Any], tmp: str, created: dict[str, Any]) -> Any:
    kind = step["step"]
    if kind == "add_primary":
        return db.addprimary(step["config"], "")
    if kind == "add_token":
        pid = step.get("pid") or created.get("pid")
        tokid = db.addtoken(pid, step["config"], label=step["label"])
        user = {"salt": step["user_salt"]}
        so = {"salt": step["so_salt"]}
        db.addsealobjects(
            tokid, user,
            _write(tmp, "user.priv", bytes.fromhex(step["user_priv"])),
            _write(tmp, "user.pub", bytes.fromhex(step["user_pub"])),
            so,
            _write(tmp, "so.priv", bytes.fromhex(step["so_priv"])),
            _write(tmp, "so.pub", bytes.fromhex(step["so_pub"])))
        return tokid
    token = _token(db, step["token"])
    if token is None:
        raise LookupError(f"the store has no token labelled {step['token']!r}")
    if kind == "link":
        # What tpm2_ptool link does (NewKeyCommandBase.new_key_save), with the public
        # area read by tpmid instead of by `tpm2_readpublic`.
        tid = step["ckaid"]
        init_priv = {pkcs11t.CKA_ID: binascii.hexlify(tid.encode()).decode(),
                     pkcs11t.CKA_LABEL: _hexlabel(step["label"]),
                     pkcs11t.CKA_ALWAYS_AUTHENTICATE: False}
        init_pub = {pkcs11t.CKA_ID: binascii.hexlify(tid.encode()).decode(),
                    pkcs11t.CKA_LABEL: _hexlabel(step["label"])}
        objs = p11objects.PKCS11ObjectFactory(
            step["public"], _Capabilities(step["algorithms"]), step["encauth"], init_pub,
            init_priv, tpm_pub=_write(tmp, "key.pub", bytes.fromhex(step["tpm_public"])),
            tpm_priv=_write(tmp, "key.priv", bytes.fromhex(step["tpm_private"])))
        if step.get("mechanisms") is not None:
            # The key's template fixes its signing scheme; tpm2-pkcs11 1.9 cannot say
            # that itself (see tpmid.pkcs11.token), so the allowed mechanisms are these.
            for obj in objs.values():
                if obj is not None:
                    obj[pkcs11t.CKA_ALLOWED_MECHANISMS] = list(step["mechanisms"])
        ids = [db.addtertiary(token["id"], objs["private"])]
        if objs.get("public") is not None:
            ids.append(db.addtertiary(token["id"], objs["public"]))
        return ids
    if kind == "add_cert":
        attrs = p11utils.pemcert_to_attrs(_write(tmp, "cert.pem", step["cert_pem"].encode()))
        cert = p11objects.PKCS11X509(attrs)
        cert.update({pkcs11t.CKA_ID: binascii.hexlify(step["ckaid"].encode()).decode(),
                     pkcs11t.CKA_LABEL: _hexlabel(step["label"])})
        return db.addtertiary(token["id"], cert)
    if kind == "delete":
        obj = db.getobject(step["id"])
        if obj is None or obj["tokid"] != token["id"]:
            raise LookupError(f"token {step['token']!r} has no object {step['id']}")
        db.rmobject(step["id"])
        return None
    if kind == "relabel":
        obj = db.getobject(step["id"])
        if obj is None or obj["tokid"] != token["id"]:
            raise LookupError(f"token {step['token']!r} has no object {step['id']}")
        attrs = _load_attrs(obj)
        attrs[pkcs11t.CKA_LABEL] = _hexlabel(step["label"])
        db.updatetertiary(step["id"], attrs)
        return None
    raise ValueError(f"unknown step {kind!r}")


def transaction(store: str, steps: list[dict[str, Any]]) -> list[Any]:
    """Apply ``steps`` in one SQLite transaction: every step, or none of them."""
    results: list[Any] = []
    created: dict[str, Any] = {}
    if not os.path.exists(os.path.join(store, DB_FILE)) and \
            (not steps or steps[0]["step"] != "add_primary"):
        raise LookupError(f"{store} holds no tpm2-pkcs11 store ({DB_FILE})")
    with tempfile.TemporaryDirectory() as tmp, Db(store) as db:
        try:
            for step in steps:
                result = _step(db, step, tmp, created)
                if step["step"] == "add_primary":
                    created["pid"] = result
                results.append(result)
        except BaseException:
            db._conn.rollback()  # Db commits when its block ends, even after an error
            raise
    return results


def main() -> int:
    """One request from stdin, one answer on stdout; exit 0 even for an answered error."""
    # The store is shared with the PKCS#11 module's users (a group): group-writable files.
    os.umask(0o007)
    try:
        request = json.load(sys.stdin)
        if request["op"] == "describe":
            result: Any = describe(request["store"], request.get("token"))
        elif request["op"] == "transaction":
            result = transaction(request["store"], request["steps"])
        else:
            raise ValueError(f"unknown op {request['op']!r}")
        json.dump({"ok": True, "result": result}, sys.stdout)
    except SystemExit as e:  # the tooling exits with a message on some errors
        json.dump({"ok": False, "error": str(e.code)}, sys.stdout)
    except Exception as e:  # every failure is answered, with the tooling's own words
        json.dump({"ok": False, "error": f"{type(e).__name__}: {e}",
                   "trace": traceback.format_exc(limit=5)}, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
