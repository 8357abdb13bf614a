"""``tpmid tpm info`` and ``tpmid tpm ek``: what the TPM says about itself."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from tpmid._cli import add_json_flag
from tpmid._cli.context import Ctx
from tpmid.render import name as render_name

if TYPE_CHECKING:
    from tpmid.tpm.ek import EkInfo


# --------------------------------------------------------------------------- tpm info


def _info_text(info: dict[str, Any]) -> str:
    spec = info["spec"]
    lock = info["lockout"]
    lines = [
        f"TCTI:               {info['tcti']}",
        f"manufacturer:       {info['manufacturer']} ({info['manufacturer_hex']})",
        f"vendor string:      {info['vendor_string']}",
        f"firmware version:   {info['firmware_version']}",
        f"specification:      TPM {spec['family']} level {spec['level']} revision "
        f"{spec['revision']} ({spec['year']}, day {spec['day_of_year']})",
        f"ECC curves:         {', '.join(info['ecc_curves']) or '-'}",
        f"algorithms:         {', '.join(info['algorithms'])}",
        f"persistent handles: {', '.join(info['persistent_handles']) or '-'}",
        f"transient objects:  {len(info['transient_handles'])} loaded, "
        f"{info['transient_slots']} slots guaranteed",
        "passwords set:      " + (", ".join(k for k, v in info["auth_set"].items() if v)
                                  or "none"),
        f"lockout:            {'IN LOCKOUT, ' if lock['in_lockout'] else ''}"
        f"{lock['counter']}/{lock['max_tries']} failures, one forgiven every "
        f"{lock['interval_s']} s, lockout password retry after {lock['recovery_s']} s",
    ]
    return "\n".join(lines)


def cmd_info(ctx: Ctx) -> int | None:
    """``tpmid tpm info``: manufacturer, versions, algorithms, handles, lockout state."""
    from tpmid.wiring.tpm import tpm_opener

    with tpm_opener(ctx.runtime(required=False))() as tpm:
        info = tpm.info()
    ctx.emit(info, _info_text)
    return None


# --------------------------------------------------------------------------- tpm ek


def ek_json(ek: EkInfo) -> dict[str, Any]:
    """An EK as JSON-ready data (public key and certificate as PEM)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    pub = serialization.load_der_public_key(ek.public_key_der)
    data: dict[str, Any] = {
        "alg": ek.alg,
        "template": ek.template,
        "source": ek.source,
        "fingerprint": ek.fingerprint,
        "public_key_pem": pub.public_bytes(serialization.Encoding.PEM,
                                           serialization.PublicFormat.SubjectPublicKeyInfo).decode(),
        "cert_index": f"{ek.cert_index:#010x}" if ek.cert_index is not None else None,
        "cert_fingerprint": ek.cert_fingerprint,
        "cert_matches_key": ek.cert_matches_key,
        "cert_pem": None,
    }
    if ek.cert_der is not None:
        try:
            cert = x509.load_der_x509_certificate(ek.cert_der)
            data["cert_pem"] = cert.public_bytes(serialization.Encoding.PEM).decode()
            data["cert_subject"] = render_name(cert.subject)
            data["cert_issuer"] = render_name(cert.issuer)
            data["cert_serial"] = format(cert.serial_number, "x")
            data["cert_not_after"] = cert.not_valid_after_utc.isoformat()
        except ValueError as e:
            data["cert_error"] = f"unparseable certificate: {e}"
    return data


def _ek_text(data: dict[str, Any]) -> str:
    lines = [f"device fingerprint: {data['device_fingerprint']} "
             f"(SHA-256 of the {data['device_fingerprint_ek']} EK public key)"]
    for ek in data["eks"]:
        lines.append("")
        lines.append(f"EK {ek['alg']} ({ek['source']})")
        lines.append(f"  public key SHA-256:  {ek['fingerprint']}")
        if ek["cert_index"] is None:
            lines.append("  certificate:         none in NV")
        else:
            lines.append(f"  certificate:         NV {ek['cert_index']}, SHA-256 "
                         f"{ek['cert_fingerprint']}")
            if "cert_issuer" in ek:
                lines.append(f"  issuer:              {ek['cert_issuer']}")
                lines.append(f"  serial:              {ek['cert_serial']}")
                lines.append(f"  valid until:         {ek['cert_not_after']}")
            if ek["cert_matches_key"] is False:
                lines.append("  WARNING: the certificate does not certify this key")
    return "\n".join(lines)


def cmd_ek(ctx: Ctx) -> int | None:
    """``tpmid tpm ek``: endorsement keys, their certificates and the device fingerprint."""
    from tpmid.wiring.tpm import tpm_opener

    with tpm_opener(ctx.runtime(required=False))() as tpm:
        eks = tpm.eks()
        main = tpm.primary_ek()
    data = {
        "device_fingerprint": main.fingerprint,
        "device_fingerprint_ek": f"{main.alg} {main.template}",
        "eks": [ek_json(ek) for ek in eks],
    }
    ctx.emit(data, _ek_text)
    return None


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``tpm info`` and ``tpm ek``."""
    p = sub.add_parser("tpm", help="inspect the TPM",
                       description="Inspect the TPM: vendor, capabilities, endorsement keys.")
    tsub = p.add_subparsers(dest="tpm_command", metavar="COMMAND", required=True)
    info = tsub.add_parser("info", help="manufacturer, firmware, algorithms, handles, lockout",
                           description="Show what the TPM reports about itself.")
    add_json_flag(info)
    info.set_defaults(func=cmd_info)
    ek = tsub.add_parser("ek", help="endorsement keys, EK certificates, device fingerprint",
                         description="List the endorsement keys (persistent or re-created from "
                         "the TCG templates), their certificates from NV and the device "
                         "fingerprint (SHA-256 of the RSA-2048 EK, else the first ECC EK).")
    add_json_flag(ek)
    ek.set_defaults(func=cmd_ek)
