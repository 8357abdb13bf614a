"""Everything that talks to the TPM.

Only this package calls ESAPI (docs/architecture.md). The layers above use
:class:`tpmid.tpm.connection.TpmConnection` and the identity keys of
:mod:`tpmid.tpm.identity`; the modules underneath work on a
:class:`~tpmid.tpm.context.TpmContext`:

* :mod:`~tpmid.tpm.rc` — TSS2 return codes as actionable :class:`~tpmid.errors.TpmError`;
* :mod:`~tpmid.tpm.context` — one ESAPI context on one TCTI, its lock, hierarchy passwords;
* :mod:`~tpmid.tpm.specs` — key algorithms and TCG template facts as plain data;
* :mod:`~tpmid.tpm.templates` — public-area templates, reading public areas back;
* :mod:`~tpmid.tpm.loaded` — :class:`~tpmid.tpm.loaded.LoadedKey`, one TPM2_Sign per signature;
* :mod:`~tpmid.tpm.signer` — ``cryptography`` private-key adapters over a loaded key;
* :mod:`~tpmid.tpm.idevid` — IDevIDs: derived, persisted, evicted;
* :mod:`~tpmid.tpm.keyfile` — TSS2 key files under the storage root key;
* :mod:`~tpmid.tpm.nv` — NV reads, the IDevID certificate's NV copy;
* :mod:`~tpmid.tpm.ek` — endorsement keys, their certificates, the device fingerprint;
* :mod:`~tpmid.tpm.info` — facts for ``tpmid tpm info``;
* :mod:`~tpmid.tpm.connection` — :class:`TpmConnection`, the API of this package;
* :mod:`~tpmid.tpm.identity` — :class:`~tpmid.tpm.identity.IdentityKey`, one class per
  kind of identity key (imports no TPM stack itself).
"""

from __future__ import annotations
