"""tpmid: hardware-backed TPM 2.0 device identities (IDevID, LDevID, Edge CA) over EST."""

__version__ = "0.1.0"
