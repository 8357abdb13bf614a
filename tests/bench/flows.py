"""The two device flows the benchmark compares, each step run as a user runs it.

**tpmid**: three CLI invocations against the device's TPM (through the proxy):

1. ``tpmid provision --serial SN ...`` — EK reads, the H-2 IDevID persisted at
   0x81020000, its CSR (with an RFC 4108 hardwareModuleName from the EK),
   simpleenroll with the Secret-Value, proof, store, manifest record;
2. ``tpmid enroll ldevid`` — a new TPM key file, CSR, simpleenroll over mutual
   TLS with the IDevID (its TPM key signs the handshake);
3. ``tpmid renew ldevid --force`` — a new key (rotation), simplereenroll over
   mutual TLS with the current LDevID.

**manual**: the reference walkthrough's ``curl | openssl`` pipelines
(docs/est-server.md), with the keys in the TPM through standard tools:
tpm2-tools create and persist the IDevID from the same TCG template,
``openssl req`` with the tpm2 provider signs the CSRs, ``openssl genpkey``
with the tpm2 provider makes the LDevID keys. Two things the standard tools
cannot do on Debian 12 shape it, and the report says so:

* tpm2-openssl 1.1.1 writes ``ecdsa-with-SHA256`` with NULL parameters in the
  CSR's outer signatureAlgorithm (RFC 5758 §3.2: the parameters MUST be
  absent; fixed upstream in tpm2-openssl PR #150). The server (pyca/cryptography)
  rejects that with 400, so the scripts strip the two bytes with ``openssl`` and
  coreutils ``basenc`` (the outer algorithm is not covered by the signature);
* curl 7.88 cannot do mutual TLS with a TPM key (``handle:`` keys are refused,
  a TSS2 key file fails in the handshake), so LDevID enrollment and renewal use
  HTTP Basic on the ``ldevid-basic`` label, and renewal is a ``simpleenroll``
  (RFC 7030 §4.2.2 simplereenroll needs the certificate being renewed as TLS
  client certificate). :func:`try_manual_mtls` records what curl does.

Secrets reach curl on standard input (``-K -`` fed by bash's builtin
``printf``), never in a process's argv.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from tests.bench.rig import (
    BASIC_LABEL,
    BASIC_USER,
    ENV_BASIC_PASSWORD,
    ENV_BASIC_USER,
    ENV_IDEVID_SECRET,
    Device,
    Rig,
    StepResult,
)

IDEVID_HANDLE = 0x81020000
STEPS = ("provision", "enroll", "renew")
LDEVID_CN = "my-device-id"


# --------------------------------------------------------------------------- tpmid


def tpmid_command() -> list[str]:
    """How a user starts tpmid: the ``tpmid`` console script of this environment."""
    script = Path(sys.executable).parent / "tpmid"
    if script.exists():
        return [str(script)]
    found = shutil.which("tpmid")
    return [found] if found else [sys.executable, "-m", "tpmid.cli"]


def renew_command(tpmid: list[str], env: Mapping[str, str]) -> tuple[list[str], str]:
    """The renewal command this checkout offers, and how it is shown in the report.

    ``tpmid renew NAME --force`` when the command exists, else the re-enrollment
    path of ``tpmid enroll NAME --reenroll`` (the same EST operation).
    """
    probe = subprocess.run([*tpmid, "renew", "--help"], capture_output=True, env=dict(env),
                           timeout=60, check=False)
    if probe.returncode == 0:
        return ["renew", "ldevid", "--force"], "tpmid renew ldevid --force"
    return ["enroll", "ldevid", "--reenroll"], "tpmid enroll ldevid --reenroll"


def write_tpmid_config(rig: Rig, device: Device, serial: str) -> Path:
    """The device's config file: a factory IDevID and an LDevID bootstrapped with it."""
    import yaml

    assert rig.server is not None
    srv = rig.server
    config = {
        "tpm": {"tcti": device.tcti},
        "store": {"dir": str(device.dir / "store")},
        "trust": {"est_anchors": [str(srv.tls_ca)]},
        "identities": {
            # As docs/manufacturing.md's factory config: TCG H-2 persisted at 0x81020000,
            # hardwareModuleName from the EK, the manufacturer anchor configured.
            "idevid": {
                "key": {"kind": "persistent", "template": "H-2", "handle": IDEVID_HANDLE},
                "subject": {"cn": "device-{serial}", "o": "tpmid bench"},
                "san": {"hardware_module_name": True},
                "est": {
                    "url": srv.url("idevid"),
                    "auth": {"headers": {"Secret-Value": {"env": ENV_IDEVID_SECRET}}},
                    "issuer_anchors": [str(srv.manufacturer_ca)],
                },
            },
            # As the walkthrough's LDevID: CN my-device-id, mutual TLS with the IDevID,
            # carrying the IDevID's serialNumber (the server's subject_policy binds it).
            "ldevid": {
                "key": {"kind": "file", "alg": "ecc-p256"},
                "subject": {"cn": LDEVID_CN, "serial_number": serial},
                "est": {"url": srv.url("ldevid"), "auth": {"client": "idevid"}},
            },
        },
    }
    path = device.dir / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    path.chmod(0o600)
    return path


def tpmid_env(rig: Rig, config: Path) -> dict[str, str]:
    """Environment of the tpmid commands: config path and the IDevID secret."""
    return {**rig.base_env, "TPMID_CONFIG": str(config),
            ENV_IDEVID_SECRET: rig.idevid_secret}


def run_tpmid_flow(rig: Rig, device: Device, serial: str, *, tpmid: list[str],
                   renew: tuple[list[str], str], count_processes: bool = False
                   ) -> list[StepResult]:
    """Provision, enroll and renew ``device`` with the tpmid CLI; stops at the first failure."""
    config = write_tpmid_config(rig, device, serial)
    env = tpmid_env(rig, config)
    steps: list[tuple[str, list[str], str]] = [
        ("provision",
         ["provision", "--serial", serial, "--station", "bench",
          "--manifest", str(device.dir / "manifest.jsonl")],
         f"tpmid provision --serial {serial}"),
        ("enroll", ["enroll", "ldevid"], "tpmid enroll ldevid"),
        ("renew", renew[0], renew[1]),
    ]
    results = []
    for step, args, display in steps:
        r = rig.run_step(device, flow="tpmid", step=step, argv=[*tpmid, *args], env=env,
                         cwd=device.dir, display=display, count_processes=count_processes)
        results.append(r)
        if not r.ok:
            break
    return results


# --------------------------------------------------------------------------- manual

LIB_SH = r"""# Sourced by the manual-path scripts. Standard tools only (openssl, coreutils).

# tpm2-openssl 1.1.1 encodes the CSR's outer signatureAlgorithm as
# ecdsa-with-SHA256/384 *with* NULL parameters; RFC 5758 §3.2 says they MUST be
# absent and strict parsers (the reference server's) refuse the CSR. The outer
# algorithm is not covered by the signature, so drop the NULL and fix the
# outer length. In: PEM CSR $1; out: DER CSR $2.
fix_ecdsa_null() {
    local hex body n hdr
    hex=$(openssl req -in "$1" -outform DER | basenc --base16 -w0)
    case ${hex:2:2} in
        81) body=${hex:6} ;;
        82) body=${hex:8} ;;
        *) body=${hex:4} ;;
    esac
    body=${body/300C06082A8648CE3D0403020500/300A06082A8648CE3D040302}
    body=${body/300C06082A8648CE3D0403030500/300A06082A8648CE3D040303}
    n=$(( ${#body} / 2 ))
    if (( n < 128 )); then printf -v hdr '30%02X' "$n"
    elif (( n < 256 )); then printf -v hdr '3081%02X' "$n"
    else printf -v hdr '3082%04X' "$n"; fi
    printf '%s%s' "$hdr" "$body" | basenc --base16 -d > "$2"
}
"""

PROVISION_SH = r"""# Manual IDevID provisioning (the reference walkthrough with the key in the TPM).
# Env: KIT EST CA SERIAL TPM2TOOLS_TCTI TPM2OPENSSL_TCTI TPMID_BENCH_IDEVID_SECRET
source "$KIT/lib.sh"

# The IDevID: TCG DevID v1.00 r12 template H-2 (ECC P-256, ECDSA/SHA-256, §7.3.4
# attributes, §7.3.6.6 authPolicy, §7.3.1 unique "IDEVID") in the endorsement
# hierarchy, persisted at 0x81020000. The same key `tpmid provision` makes.
tpm2_createprimary -Q -C e -g sha256 -G ecc256:ecdsa-sha256:null \
    -a 'fixedtpm|fixedparent|sensitivedataorigin|userwithauth|adminwithpolicy|sign' \
    -L "$KIT/idevid-policy-sha256.bin" -u "$KIT/idevid-unique-ecc-p256.bin" -c idevid.ctx
tpm2_evictcontrol -Q -C o -c idevid.ctx 0x81020000
# No resource manager: the tools leave their objects loaded (swtpm has 3 slots).
tpm2_flushcontext -t

# Walkthrough: retrieve the root CA certificate and convert it to PEM.
curl -sS --fail-with-body --cacert "$CA" "$EST/idevid/cacerts" | openssl base64 -d \
    | openssl pkcs7 -inform DER -outform PEM -print_certs | openssl x509 -out manufacturer-root.pem

# CSR signed in the TPM by OpenSSL's tpm2 provider.
openssl req -provider tpm2 -provider default -new -key handle:0x81020000 \
    -subj "/CN=device-$SERIAL/O=tpmid bench/serialNumber=$SERIAL" -out idevid.csr
fix_ecdsa_null idevid.csr idevid.der

# simpleenroll with the Secret-Value (read by curl from stdin, never in argv).
printf 'header = "Secret-Value: %s"\n' "$TPMID_BENCH_IDEVID_SECRET" \
    | curl -sS --fail-with-body -K - -X POST --data-binary @idevid.der \
        -H "Content-Type: application/pkcs10" --cacert "$CA" "$EST/idevid/simpleenroll" \
    | openssl base64 -d | openssl pkcs7 -inform DER -outform PEM -print_certs \
    | openssl x509 -out idevid.pem
openssl verify -CAfile manufacturer-root.pem idevid.pem
"""

ENROLL_SH = r"""# Manual LDevID enrollment. Mutual TLS with the IDevID is impossible with
# curl 7.88 + tpm2-openssl 1.1.1, so: HTTP Basic on the ldevid-basic label.
# Env: KIT EST CA TPM2OPENSSL_TCTI TPMID_BENCH_BASIC_USER TPMID_BENCH_BASIC_PASSWORD
source "$KIT/lib.sh"

# A new signing key in the TPM, saved as a TSS2 PRIVATE KEY file.
openssl genpkey -provider tpm2 -algorithm EC -pkeyopt group:P-256 -out ldevid.key
openssl req -provider tpm2 -provider default -new -key ldevid.key \
    -subj "/CN=my-device-id/serialNumber=$SERIAL" \
    -out ldevid.csr
fix_ecdsa_null ldevid.csr ldevid.der

curl -sS --fail-with-body --cacert "$CA" "$EST/ldevid-basic/cacerts" | openssl base64 -d \
    | openssl pkcs7 -inform DER -outform PEM -print_certs | openssl x509 -out operator-root.pem
printf 'user = "%s:%s"\n' "$TPMID_BENCH_BASIC_USER" "$TPMID_BENCH_BASIC_PASSWORD" \
    | curl -sS --fail-with-body -K - -X POST --data-binary @ldevid.der \
        -H "Content-Type: application/pkcs10" --cacert "$CA" "$EST/ldevid-basic/simpleenroll" \
    | openssl base64 -d | openssl pkcs7 -inform DER -outform PEM -print_certs \
    | openssl x509 -out ldevid.pem
openssl verify -CAfile operator-root.pem ldevid.pem
"""

RENEW_SH = r"""# Manual LDevID renewal with a new key. simplereenroll needs the LDevID as TLS
# client certificate (RFC 7030 §4.2.2), which curl cannot present from the TPM:
# simpleenroll with HTTP Basic instead.
# Env: KIT EST CA TPM2OPENSSL_TCTI TPMID_BENCH_BASIC_USER TPMID_BENCH_BASIC_PASSWORD
source "$KIT/lib.sh"

openssl genpkey -provider tpm2 -algorithm EC -pkeyopt group:P-256 -out ldevid-next.key
openssl req -provider tpm2 -provider default -new -key ldevid-next.key \
    -subj "/CN=my-device-id/serialNumber=$SERIAL" \
    -out ldevid-next.csr
fix_ecdsa_null ldevid-next.csr ldevid-next.der

printf 'user = "%s:%s"\n' "$TPMID_BENCH_BASIC_USER" "$TPMID_BENCH_BASIC_PASSWORD" \
    | curl -sS --fail-with-body -K - -X POST --data-binary @ldevid-next.der \
        -H "Content-Type: application/pkcs10" --cacert "$CA" "$EST/ldevid-basic/simpleenroll" \
    | openssl base64 -d | openssl pkcs7 -inform DER -outform PEM -print_certs \
    | openssl x509 -out ldevid-next.pem
openssl verify -CAfile operator-root.pem ldevid-next.pem
mv ldevid-next.key ldevid.key
mv ldevid-next.pem ldevid.pem
"""

# curl has no --provider option; OpenSSL's config file is the only way to give it one.
OPENSSL_TPM2_CNF = """openssl_conf = openssl_init
[openssl_init]
providers = provider_sect
[provider_sect]
default = default_sect
tpm2 = tpm2_sect
[default_sect]
activate = 1
[tpm2_sect]
activate = 1
"""

MANUAL_SCRIPTS = {"provision": PROVISION_SH, "enroll": ENROLL_SH, "renew": RENEW_SH}


def unique_ecc_file(unique: bytes) -> bytes:
    """``unique`` as tpm2-tools' ``createprimary -u`` reads it for an ECC key.

    The tool reads the raw bytes of a C ``TPMU_PUBLIC_ID`` (tpm2-tss 3.x): for ECC
    two ``TPM2B_ECC_PARAMETER`` structs, each a host-order (little-endian) UINT16
    size and a 128-byte buffer (MAX_ECC_KEY_BYTES). TCG DevID §7.3.1 puts
    "IDEVID" in both x and y.
    """
    param = struct.pack("<H", len(unique)) + unique.ljust(128, b"\0")
    return param + param


def write_manual_kit(directory: Path) -> Path:
    """Write the manual path's scripts and template inputs to ``directory`` (a station kit)."""
    from tpmid.tpm.specs import IDEVID_POLICY, IDEVID_UNIQUE

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "lib.sh").write_text(LIB_SH)
    for step, text in MANUAL_SCRIPTS.items():
        (directory / f"{step}.sh").write_text(text)
    (directory / "openssl-tpm2.cnf").write_text(OPENSSL_TPM2_CNF)
    (directory / "idevid-policy-sha256.bin").write_bytes(IDEVID_POLICY["sha256"])
    (directory / "idevid-unique-ecc-p256.bin").write_bytes(unique_ecc_file(IDEVID_UNIQUE))
    return directory


def manual_env(rig: Rig, device: Device, kit: Path, serial: str) -> dict[str, str]:
    """Environment of the manual scripts: TCTIs (the proxy), URLs, secrets."""
    assert rig.server is not None
    return {
        **rig.base_env,
        "KIT": str(kit), "EST": rig.server.base, "CA": str(rig.server.tls_ca),
        "SERIAL": serial,
        "TPM2TOOLS_TCTI": device.tcti, "TPM2OPENSSL_TCTI": device.tcti,
        ENV_IDEVID_SECRET: rig.idevid_secret,
        ENV_BASIC_USER: BASIC_USER, ENV_BASIC_PASSWORD: rig.basic_password,
    }


def run_manual_flow(rig: Rig, device: Device, serial: str, *, kit: Path,
                    count_processes: bool = False) -> list[StepResult]:
    """The manual flow's three steps on ``device``; stops at the first failure."""
    env = manual_env(rig, device, kit, serial)
    work = device.dir / "manual"
    work.mkdir(parents=True, exist_ok=True)
    displays = {"provision": "tpm2-tools + openssl req + curl|openssl (Secret-Value)",
                "enroll": f"openssl genpkey/req + curl|openssl (Basic, {BASIC_LABEL})",
                "renew": f"openssl genpkey/req + curl|openssl (Basic simpleenroll, {BASIC_LABEL})"}
    results = []
    for step in STEPS:
        r = rig.run_step(device, flow="manual", step=step,
                         argv=["bash", "-euo", "pipefail", str(kit / f"{step}.sh")], env=env,
                         cwd=work, display=displays[step], count_processes=count_processes)
        results.append(r)
        if not r.ok:
            break
    return results


@dataclass(frozen=True)
class MtlsAttempt:
    """One try at mutual TLS from curl with a TPM key (expected to fail on Debian 12)."""

    what: str
    command: str
    rc: int
    message: str
    succeeded: bool

    def as_dict(self) -> dict[str, object]:
        """JSON-friendly form."""
        return dict(self.__dict__)


def try_manual_mtls(rig: Rig, device: Device, kit: Path, serial: str) -> list[MtlsAttempt]:
    """Try curl's mutual TLS with the TPM keys of a manually enrolled device, and record it.

    1. the IDevID at its persistent handle (``--key handle:0x81020000``), the
       tpm2 provider loaded through ``OPENSSL_CONF``, against the mTLS ``ldevid``
       label (as the walkthrough enrolls the LDevID);
    2. the LDevID's TSS2 key file, ``simplereenroll`` on ``ldevid`` (as the
       walkthrough renews).

    ``succeeded`` means curl exited 0 and the server answered with a certificate.
    """
    env = {**manual_env(rig, device, kit, serial), "OPENSSL_CONF": str(kit / "openssl-tpm2.cnf")}
    work = device.dir / "manual"
    est = env["EST"]
    tries = [
        ("LDevID enrollment, IDevID key by handle",
         ["curl", "-sS", "--fail-with-body", "--cacert", env["CA"], "--cert", "idevid.pem",
          "--key", f"handle:{IDEVID_HANDLE:#x}", "-X", "POST", "--data-binary", "@ldevid.der",
          "-H", "Content-Type: application/pkcs10", f"{est}/ldevid/simpleenroll"],
         "curl --cert idevid.pem --key handle:0x81020000 .../ldevid/simpleenroll"),
        ("LDevID renewal, TSS2 key file",
         ["curl", "-sS", "--fail-with-body", "--cacert", env["CA"], "--cert", "ldevid.pem",
          "--key", "ldevid.key", "-X", "POST", "--data-binary", "@ldevid.der",
          "-H", "Content-Type: application/pkcs10", f"{est}/ldevid/simplereenroll"],
         "curl --cert ldevid.pem --key ldevid.key .../ldevid/simplereenroll"),
    ]
    attempts = []
    for what, argv, display in tries:
        proc = subprocess.run(argv, cwd=work, env=env, capture_output=True, timeout=60,
                              check=False)
        err = proc.stderr.decode(errors="replace").strip().splitlines()
        body = proc.stdout.decode(errors="replace")
        ok = proc.returncode == 0 and len(body.strip()) > 100 and " " not in body.strip()
        message = (err[-1] if err else body.strip()[:200]) or f"exit {proc.returncode}"
        if ok:
            message = "curl completed the mutual-TLS request and got a certificate"
        attempts.append(MtlsAttempt(what=what, command=f"OPENSSL_CONF=<tpm2> {display}",
                                    rc=proc.returncode, message=message, succeeded=ok))
    return attempts
