"""Everything that talks to the TPM.

Only this package opens an ESAPI context (docs/architecture.md). The modules:

* :mod:`tpmid.tpm.connection` — :class:`TpmConnection` (one ESAPI from a TCTI
  string, a lock, hierarchy passwords) and :func:`tpm_call`, which turns TSS2
  return codes into :class:`~tpmid.errors.TpmError` with actionable messages.
* :mod:`tpmid.tpm.keys` — TCG IDevID templates, persistent and ek-derived
  IDevIDs, TSS2 key files and :class:`LoadedKey`.
* :mod:`tpmid.tpm.signer` — ``cryptography`` private-key objects whose
  ``sign()`` is one TPM2_Sign.
* :mod:`tpmid.tpm.ek` — endorsement keys, their certificates in NV and the
  device fingerprint.
* :mod:`tpmid.tpm.info` — facts about the TPM (``tpmid tpm info``).
"""

from __future__ import annotations
