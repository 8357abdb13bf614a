"""PKCS#11 access to tpmid's TPM keys through tpm2-pkcs11: the token store, its objects, URIs.

* :mod:`tpmid.pkcs11.token` — :class:`~tpmid.pkcs11.token.TokenStore`, the
  tpm2-pkcs11 store (an SQLite database) read and changed through tpm2-pkcs11's
  own tooling, driven as a library (:mod:`tpmid.pkcs11.ptool_driver`, run with
  the Python that tooling was packaged for); the wrapping of object
  authorizations; the mechanisms a linked key allows;
* :mod:`tpmid.pkcs11.uri` — RFC 7512 PKCS#11 URIs.

The TPM work (sealing and unsealing a token's wrapping key) is
:mod:`tpmid.tpm.token`'s; keeping the token in step with the store is
:mod:`tpmid.lifecycle.pkcs11`'s. ``ptool_driver`` is never imported here.
"""
