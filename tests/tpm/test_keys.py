"""IDevID templates, persistent and ek-derived keys, TSS2 key files — on a real swtpm."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from cryptography.x509.oid import NameOID
from tpm2_pytss.constants import ESYS_TR, TPMA_OBJECT

from tests.tpm.helpers import run_tool, transient_objects
from tpmid.config import IdentityConfig, KeyConfig, SubjectConfig
from tpmid.errors import KeyMismatchError, StoreError, TpmError
from tpmid.testing.swtpm import Swtpm
from tpmid.tpm import idevid, keyfile, loaded, specs, templates
from tpmid.tpm.connection import TpmConnection
from tpmid.tpm.identity import IdentityKey, identity_key

HANDLE = 0x81020000
TEMPLATES = ["H-1", "H-2", "H-3"]
EXPECTED = {  # template -> (alg, hash, authPolicy hex per TCG DevID §7.3.6.6 Table 19)
    "H-1": ("rsa-2048", "sha256", "ad6b3a2284fd698a0710bf5cc1b9bdf15e2532e3f601fa4b93a6a8fa8de579ea"),
    "H-2": ("ecc-p256", "sha256", "ad6b3a2284fd698a0710bf5cc1b9bdf15e2532e3f601fa4b93a6a8fa8de579ea"),
    "H-3": ("ecc-p384", "sha384", "4db1aa836d0b5615df6ee53a40ef70c61c217f4303d44695"
                                  "925972bc927006cfa5cbdf6dc18c4dbe329b2f1542c3dd33"),
}


def _spki(key: loaded.LoadedKey) -> bytes:
    return key.public_key_der()


def _issue_cert(key: loaded.LoadedKey) -> x509.Certificate:
    """A certificate for the TPM key from a software test CA."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
    return (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "device")]))
            .issuer_name(name).public_key(key.public_key())  # type: ignore[arg-type]
            .serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .sign(ca_key, hashes.SHA256()))


# --------------------------------------------------------------------------- templates


@pytest.mark.parametrize("name", TEMPLATES)
def test_idevid_template_is_a_signing_key_that_can_never_decrypt(name: str) -> None:
    area = templates.idevid_template(name).publicArea
    attrs = area.objectAttributes
    wanted = (TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT | TPMA_OBJECT.SENSITIVEDATAORIGIN
              | TPMA_OBJECT.USERWITHAUTH | TPMA_OBJECT.ADMINWITHPOLICY | TPMA_OBJECT.SIGN_ENCRYPT)
    assert attrs == wanted
    assert bytes(area.authPolicy).hex() == EXPECTED[name][2]


def test_idevid_template_is_a_fresh_object_every_call() -> None:
    a = templates.idevid_template("H-2")
    a.publicArea.parameters.eccDetail.curveID = 0x30
    assert templates.idevid_template("H-2").publicArea.parameters.eccDetail.curveID == 0x0003


def test_unknown_template_is_refused() -> None:
    with pytest.raises(TpmError, match="H-1, H-2 or H-3"):
        templates.idevid_template("H-9")


# --------------------------------------------------------------------------- persistent IDevIDs


@pytest.mark.parametrize("name", TEMPLATES)
def test_tpm2_tools_see_the_tcg_attributes_and_policy_of_a_persistent_idevid(
        swtpm: Swtpm, name: str) -> None:
    with TpmConnection(swtpm.tcti) as tpm:
        assert idevid.create_persistent_idevid(tpm, name, HANDLE).created
    out = run_tool(swtpm, "tpm2_readpublic", "-c", hex(HANDLE)).stdout
    value = out.split("attributes:")[1].split("value:")[1].splitlines()[0].strip()
    assert value == "fixedtpm|fixedparent|sensitivedataorigin|userwithauth|adminwithpolicy|sign"
    assert "decrypt" not in out.split("type:")[0]
    assert f"authorization policy: {EXPECTED[name][2]}" in out


@pytest.mark.parametrize("name", TEMPLATES)
def test_persistent_idevid_creation_is_idempotent(swtpm: Swtpm, name: str) -> None:
    with TpmConnection(swtpm.tcti) as tpm:
        first = idevid.create_persistent_idevid(tpm, name, HANDLE)
        second = idevid.create_persistent_idevid(tpm, name, HANDLE)
        assert (first.created, second.created) == (True, False)
        assert bytes(first.public.marshal()) == bytes(second.public.marshal())
        with idevid.open_persistent(tpm, HANDLE, expect_template=name) as key, \
                idevid.derive_idevid(tpm, name) as derived:
            assert (key.alg, key.hash_name) == EXPECTED[name][:2]
            assert _spki(key) == _spki(derived)
            assert not key.transient
    assert transient_objects(swtpm) == []


def test_persistent_idevid_refuses_another_template_at_its_handle(tpm: TpmConnection) -> None:
    idevid.create_persistent_idevid(tpm, "H-2", HANDLE)
    with pytest.raises(KeyMismatchError) as err:
        idevid.create_persistent_idevid(tpm, "H-3", HANDLE)
    assert "0x81020000" in err.value.message and "H-2" in err.value.message
    assert "H-3" in err.value.message
    assert err.value.hint and "--force" in err.value.hint
    with pytest.raises(KeyMismatchError, match="not an IDevID from template H-3"):
        idevid.open_persistent(tpm, HANDLE, expect_template="H-3")
    assert tpm.transient_handles() == []


def test_persistent_idevid_refuses_an_unrelated_key_at_its_handle(tpm: TpmConnection) -> None:
    from tpm2_pytss.types import TPM2B_SENSITIVE_CREATE

    handle, _, _, _, _ = tpm.esapi.create_primary(
        TPM2B_SENSITIVE_CREATE(), templates.storage_parent_template(), ESYS_TR.OWNER)
    tpm.esapi.evict_control(ESYS_TR.OWNER, handle, HANDLE)
    tpm.esapi.flush_context(handle)
    with pytest.raises(KeyMismatchError, match="restricted non-signing/decryption key"):
        idevid.create_persistent_idevid(tpm, "H-2", HANDLE)
    with pytest.raises(KeyMismatchError):
        idevid.open_persistent(tpm, HANDLE)  # not a signing key at all
    assert tpm.transient_handles() == []


def test_force_replaces_a_mismatching_persistent_key(tpm: TpmConnection) -> None:
    idevid.create_persistent_idevid(tpm, "H-2", HANDLE)
    result = idevid.create_persistent_idevid(tpm, "H-3", HANDLE, force=True)
    assert result.created
    with idevid.open_persistent(tpm, HANDLE, expect_template="H-3") as key:
        assert key.alg == "ecc-p384"
    assert tpm.transient_handles() == []


def test_persistent_handle_outside_the_owner_range_is_refused(tpm: TpmConnection) -> None:
    with pytest.raises(TpmError, match="not a persistent handle the owner may use"):
        idevid.create_persistent_idevid(tpm, "H-2", 0x81800000)


def test_evict_removes_the_key_and_a_second_evict_says_there_is_none(tpm: TpmConnection) -> None:
    idevid.create_persistent_idevid(tpm, "H-2", HANDLE)
    idevid.evict_persistent(tpm, HANDLE)
    assert HANDLE not in tpm.persistent_handles()
    with pytest.raises(TpmError, match="no key at 0x81020000"):
        idevid.evict_persistent(tpm, HANDLE)


def test_after_tpm_clear_the_persistent_idevid_is_gone_and_can_be_recreated(
        tpm: TpmConnection) -> None:
    idevid.create_persistent_idevid(tpm, "H-2", HANDLE)
    with idevid.open_persistent(tpm, HANDLE) as key:
        before = _spki(key)
    tpm.esapi.clear(ESYS_TR.LOCKOUT)
    with pytest.raises(TpmError) as err:
        idevid.open_persistent(tpm, HANDLE, expect_template="H-2")
    assert "no key at 0x81020000" in err.value.message
    assert err.value.hint and "tpmid key create" in err.value.hint
    assert idevid.create_persistent_idevid(tpm, "H-2", HANDLE).created
    with idevid.open_persistent(tpm, HANDLE) as key:
        # TPM2_Clear changes the owner seed, not the endorsement seed the IDevID comes from.
        assert _spki(key) == before


# --------------------------------------------------------------------------- ek-derived IDevIDs


def test_ek_derived_key_is_identical_across_calls_power_cycles_and_tpm_clear(
        swtpm: Swtpm) -> None:
    with TpmConnection(swtpm.tcti) as tpm:
        with idevid.derive_idevid(tpm, "H-2") as key:
            first = _spki(key)
            assert key.transient
        with idevid.derive_idevid(tpm, "H-2") as key:
            assert _spki(key) == first
    swtpm.power_cycle()
    with TpmConnection(swtpm.tcti) as tpm:
        with idevid.derive_idevid(tpm, "H-2") as key:
            assert _spki(key) == first
        tpm.esapi.clear(ESYS_TR.LOCKOUT)
        with idevid.derive_idevid(tpm, "H-2") as key:
            assert _spki(key) == first
    assert transient_objects(swtpm) == []


def test_ek_derived_keys_of_different_templates_differ(tpm: TpmConnection) -> None:
    derived = {}
    for name in TEMPLATES:
        with idevid.derive_idevid(tpm, name) as key:
            derived[name] = _spki(key)
    assert len(set(derived.values())) == 3


def test_change_eps_yields_a_new_key_that_no_longer_matches_its_certificate(
        tpm: TpmConnection) -> None:
    with idevid.derive_idevid(tpm, "H-2") as key:
        cert = _issue_cert(key)
        assert loaded.key_matches_certificate(key, cert)
    tpm.esapi.change_eps(ESYS_TR.PLATFORM)
    with idevid.derive_idevid(tpm, "H-2") as key:
        assert not loaded.key_matches_certificate(key, cert)


# --------------------------------------------------------------------------- signing


@pytest.mark.parametrize("name", TEMPLATES)
def test_sign_digest_makes_a_signature_the_public_key_verifies(tpm: TpmConnection,
                                                               name: str) -> None:
    with idevid.derive_idevid(tpm, name) as key:
        h = hashes.SHA256() if key.hash_name == "sha256" else hashes.SHA384()
        digester = hashes.Hash(h)
        digester.update(b"message")
        digest = digester.finalize()
        sig = key.sign_digest(digest)
        public = key.public_key()
        if isinstance(public, ec.EllipticCurvePublicKey):
            public.verify(sig, digest, ec.ECDSA(Prehashed(h)))
        else:
            assert isinstance(public, rsa.RSAPublicKey)
            public.verify(sig, digest, padding.PKCS1v15(), Prehashed(h))


def test_sign_digest_refuses_a_digest_of_the_wrong_size(tpm: TpmConnection) -> None:
    with idevid.derive_idevid(tpm, "H-3") as key, pytest.raises(TpmError, match="SHA384"):
        key.sign_digest(b"\0" * 32)


@pytest.mark.parametrize(
    ("name", "algorithm"),
    [("H-2", ec.ECDSA(hashes.SHA384())), ("H-3", ec.ECDSA(hashes.SHA256()))],
    ids=["p256-with-sha384", "p384-with-sha256"],
)
def test_private_key_refuses_a_hash_the_key_cannot_use(tpm: TpmConnection, name: str,
                                                       algorithm: ec.ECDSA) -> None:
    with idevid.derive_idevid(tpm, name) as key:
        with pytest.raises(TpmError) as err:
            key.private_key().sign(b"data", algorithm)
        assert f"signs only with {key.hash_name.upper()}" in err.value.message


def test_rsa_private_key_refuses_pss_and_export(tpm: TpmConnection) -> None:
    with idevid.derive_idevid(tpm, "H-1") as key:
        pk = key.private_key()
        with pytest.raises(TpmError, match="PKCS#1 v1.5"):
            pk.sign(b"data", padding.PSS(padding.MGF1(hashes.SHA256()), 32), hashes.SHA256())
        with pytest.raises(TpmError, match="never leaves the TPM"):
            pk.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
        sig = pk.sign(b"data", padding.PKCS1v15(), hashes.SHA256())
        pk.public_key().verify(sig, b"data", padding.PKCS1v15(), hashes.SHA256())


# --------------------------------------------------------------------------- key files


@pytest.mark.parametrize("alg", ["ecc-p256", "ecc-p384", "rsa-2048"])
def test_key_file_signs_through_the_openssl_tpm2_provider(swtpm: Swtpm, tmp_path: Path,
                                                          alg: str) -> None:
    with TpmConnection(swtpm.tcti) as tpm:
        pem = keyfile.create_key_file(tpm, alg)
        with keyfile.load_key_file(tpm, pem) as key:
            public = key.public_key()
            hash_name = key.hash_name
            assert key.alg == alg
    assert pem.startswith(b"-----BEGIN TSS2 PRIVATE KEY-----")
    (tmp_path / "key.pem").write_bytes(pem)
    (tmp_path / "msg").write_bytes(b"signed by the TPM through OpenSSL")
    run_tool(swtpm, "openssl", "pkeyutl", "-sign", "-provider", "tpm2", "-provider", "default",
             "-inkey", str(tmp_path / "key.pem"), "-rawin", "-digest", hash_name,
             "-in", str(tmp_path / "msg"), "-out", str(tmp_path / "sig"))
    sig = (tmp_path / "sig").read_bytes()
    h = hashes.SHA256() if hash_name == "sha256" else hashes.SHA384()
    if isinstance(public, ec.EllipticCurvePublicKey):
        public.verify(sig, (tmp_path / "msg").read_bytes(), ec.ECDSA(h))
    else:
        assert isinstance(public, rsa.RSAPublicKey)
        public.verify(sig, (tmp_path / "msg").read_bytes(), padding.PKCS1v15(), h)
    # The same signature also verifies with OpenSSL and the public key tpmid reports.
    (tmp_path / "pub.pem").write_bytes(public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    out = run_tool(swtpm, "openssl", "pkeyutl", "-verify", "-pubin", "-inkey",
                   str(tmp_path / "pub.pem"), "-rawin", "-digest", hash_name,
                   "-in", str(tmp_path / "msg"), "-sigfile", str(tmp_path / "sig"))
    assert "Signature Verified Successfully" in out.stdout
    assert transient_objects(swtpm) == []


def test_key_file_templates_never_allow_decrypt(tpm: TpmConnection) -> None:
    from tpm2_pytss.tsskey import TSSPrivKey

    pem = keyfile.create_key_file(tpm, "ecc-p256")
    attrs = TSSPrivKey.from_pem(pem).public.publicArea.objectAttributes
    assert attrs & TPMA_OBJECT.SIGN_ENCRYPT and not attrs & TPMA_OBJECT.DECRYPT
    assert tpm.transient_handles() == []


def test_key_file_from_before_a_tpm_clear_says_re_enroll(tpm: TpmConnection) -> None:
    pem = keyfile.create_key_file(tpm, "ecc-p256")
    tpm.esapi.clear(ESYS_TR.LOCKOUT)
    with pytest.raises(TpmError) as err:
        keyfile.load_key_file(tpm, pem)
    assert "before a TPM clear" in err.value.message
    assert err.value.hint and "re-enrolled" in err.value.hint
    assert tpm.transient_handles() == []


def test_key_file_loads_under_a_persistent_srk_of_the_standard_template(
        tpm: TpmConnection) -> None:
    from tpm2_pytss.types import TPM2B_SENSITIVE_CREATE

    pem = keyfile.create_key_file(tpm, "ecc-p256")
    handle, _, _, _, _ = tpm.esapi.create_primary(
        TPM2B_SENSITIVE_CREATE(), templates.storage_parent_template(), ESYS_TR.OWNER)
    tpm.esapi.evict_control(ESYS_TR.OWNER, handle, specs.SRK_HANDLE)
    tpm.esapi.flush_context(handle)
    with keyfile.load_key_file(tpm, pem) as key:
        assert len(key.sign_digest(b"\x02" * 32)) > 64
    assert tpm.transient_handles() == []


def test_garbage_key_file_is_a_store_error(tpm: TpmConnection) -> None:
    with pytest.raises(StoreError, match="TSS2 PRIVATE KEY"):
        keyfile.load_key_file(tpm, b"-----BEGIN TSS2 PRIVATE KEY-----\nAAAA\n"
                                b"-----END TSS2 PRIVATE KEY-----\n")


# --------------------------------------------------------------------------- identity dispatch


@pytest.mark.parametrize(
    "key_config",
    [KeyConfig(kind="persistent", template="H-2", handle=HANDLE),
     KeyConfig(kind="ek-derived", template="H-3"),
     KeyConfig(kind="file", alg="ecc-p384")],
    ids=["persistent", "ek-derived", "file"],
)
def test_identity_key_opens_each_kind_of_key(tpm: TpmConnection, key_config: KeyConfig,
                                             tmp_path: Path) -> None:
    key_file = None
    if key_config.kind == "persistent":
        idevid.create_persistent_idevid(tpm, key_config.template, key_config.handle)
    if key_config.kind == "file":
        key_file = tmp_path / "key.tss2.pem"
        key_file.write_bytes(keyfile.create_key_file(tpm, key_config.alg))
    with _identity(key_config).open(tpm, key_file) as key:
        expected_alg = (key_config.alg if key_config.kind == "file"
                        else specs.IDEVID_TEMPLATE_ALGS[key_config.template])
        assert key.alg == expected_alg
        assert key.sign_digest(b"\x03" * (32 if key.hash_name == "sha256" else 48))
    assert tpm.transient_handles() == []


def test_key_alg_is_what_new_keys_use_and_a_version_may_hold_another(tpm: TpmConnection,
                                                                     tmp_path: Path) -> None:
    # key.alg chooses new keys; the EST server's CSR attributes may have asked for another
    # algorithm for one version, whose key file still opens (its certificate says what it is).
    key_file = tmp_path / "key.tss2.pem"
    key_file.write_bytes(keyfile.create_key_file(tpm, "ecc-p256"))
    key = _identity(KeyConfig(kind="file", alg="ecc-p384"))
    with key.open(tpm, key_file) as loaded:
        assert loaded.alg == "ecc-p256"
    new = key.for_new_certificate(tpm, rotate=True)
    with new.loaded:
        assert new.loaded.alg == "ecc-p384"
    chosen = key.for_new_certificate(tpm, rotate=True, alg="rsa-2048")
    with chosen.loaded:
        assert chosen.loaded.alg == "rsa-2048"
    with pytest.raises(StoreError, match="no key file"):
        key.open(tpm, None)
    assert tpm.transient_handles() == []


def _identity(key_config: KeyConfig) -> IdentityKey:
    return identity_key(IdentityConfig(name="dut", key=key_config,
                                       subject=SubjectConfig(cn="dut")))


@pytest.mark.parametrize("name", TEMPLATES)
def test_sign_digest_and_a_csr_cost_exactly_one_tpm2_sign(swtpm: Swtpm, name: str) -> None:
    """Counted by the TCP proxy between tpmid and the swtpm: what really reached the TPM.

    libtpms answers the first signature with a new key with TPM_RC_RETRY and ESAPI
    resubmits it (TPM 2.0 Part 2 §6.6.3, TPM_RC_RETRY): one signature, two frames. A
    warm-up signature absorbs that, so the counts below are per signature.
    """
    from tpmid.config import SanConfig, SubjectConfig
    from tpmid.csr import build_csr
    from tpmid.testing.tpmproxy import TpmProxy

    with TpmProxy(swtpm.host, swtpm.port, swtpm.ctrl_port) as proxy, \
            TpmConnection(proxy.tcti) as tpm, idevid.derive_idevid(tpm, name) as key:
        size = 32 if key.hash_name == "sha256" else 48
        key.sign_digest(b"\x04" * size)
        proxy.reset()
        key.sign_digest(b"\x05" * size)
        assert proxy.commands == ["TPM2_Sign"]
        proxy.reset()
        csr = build_csr(key.private_key(), SubjectConfig(cn="one-sign"), SanConfig(),
                        hash_name=key.hash_name)
        assert proxy.by_name()["TPM2_Sign"] == 1 and csr.is_signature_valid


@pytest.mark.parametrize("create_loaded_supported", [True, False], ids=["CreateLoaded", "fallback"])
def test_new_key_file_is_created_loaded_and_reloadable(
        swtpm: Swtpm, monkeypatch: pytest.MonkeyPatch, create_loaded_supported: bool) -> None:
    """A new key comes back loaded and its file loads again later. The fallback case
    fakes TPM_RC_COMMAND_CODE for TPM2_CreateLoaded, which swtpm implements (older
    firmware TPMs do not): the only way to reach that path here."""
    from tpm2_pytss import TSS2_Exception

    refused: list[int] = []
    with TpmConnection(swtpm.tcti) as tpm:
        if not create_loaded_supported:
            def no_create_loaded(*args: object, **kwargs: object) -> None:
                refused.append(1)
                raise TSS2_Exception(0x143)

            monkeypatch.setattr(tpm.esapi, "create_loaded", no_create_loaded)
        pem, key = keyfile.create_loaded_key_file(tpm, "ecc-p256")
        with key:
            first = _spki(key)
            digest = hashes.Hash(hashes.SHA256())
            digest.update(b"tpmid")
            sig = key.sign_digest(digest.finalize())
        key.public_key().verify(sig, b"tpmid", ec.ECDSA(hashes.SHA256()))
        with keyfile.load_key_file(tpm, pem) as again:
            assert _spki(again) == first
    assert refused == ([] if create_loaded_supported else [1])
    assert transient_objects(swtpm) == []
