"""The shim's start-up proof: same OpenSSL as Python's ``_ssl``, and a working handshake."""

from __future__ import annotations

import ssl
from collections.abc import Callable, Iterator

import pytest

from tpmid.errors import TlsShimError
from tpmid.tls import SoftwareSigningKey, _openssl, client_tls, context, self_test


@pytest.fixture
def fresh_shim() -> Iterator[None]:
    """Forget the cached binding and self-test result before and after the test."""
    _openssl.reset_for_tests()
    context._reset_self_test_for_tests()
    yield
    _openssl.reset_for_tests()
    context._reset_self_test_for_tests()


def test_self_test_binds_to_the_one_openssl_python_uses(fresh_shim: None) -> None:
    self_test()
    lib = _openssl.load()
    ssl_paths, crypto_paths = _openssl.mapped_openssl(_openssl.parse_maps(_openssl.read_maps()))
    assert (ssl_paths, crypto_paths) == ([lib.ssl_path], [lib.crypto_path])
    version = lib.OpenSSL_version(0)
    assert isinstance(version, bytes) and version.decode() == ssl.OPENSSL_VERSION


def test_ssl_ctx_pointer_is_checked_against_what_the_ssl_module_reports(
    fresh_shim: None,
) -> None:
    lib = _openssl.load()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ptr = lib.ssl_ctx(ctx)
    ctx.options |= ssl.OP_NO_TICKET
    assert lib.SSL_CTX_get_options(ptr) == int(ctx.options)
    with pytest.raises(TlsShimError, match="ssl.SSLContext"):
        lib.ssl_ctx(object())  # type: ignore[arg-type]


def _add_line(path: str) -> Callable[[str], str]:
    return lambda maps: maps + f"7f0000000000-7f0000001000 r-xp 00000000 fe:00 1 {path}\n"


def _drop(word: str) -> Callable[[str], str]:
    return lambda maps: "\n".join(ln for ln in maps.splitlines() if word not in ln) + "\n"


MAPS_FAULTS = [
    pytest.param(_add_line("/opt/vendor/lib/libssl.so.1.1"), "2 different libssl",
                 id="second-libssl"),
    pytest.param(_add_line("/opt/vendor/lib/libcrypto.so.3"), "2 different libcrypto",
                 id="second-libcrypto"),
    pytest.param(_drop("libssl.so"), "does not use a shared libssl", id="static-libssl"),
]


@pytest.mark.parametrize(("fault", "message"), MAPS_FAULTS)
def test_mismatched_openssl_in_the_process_fails_the_self_test_clearly(
    fresh_shim: None, monkeypatch: pytest.MonkeyPatch, fault: Callable[[str], str],
    message: str,
) -> None:
    """Mocked: /proc/self/maps is rewritten, because a real second libssl in this
    interpreter (or a statically linked _ssl) cannot be produced inside a test."""
    real = _openssl.read_maps
    monkeypatch.setattr(_openssl, "read_maps", lambda: fault(real()))
    with pytest.raises(TlsShimError) as info:
        self_test()
    assert message in str(info.value)
    assert info.value.hint and "key_file" in info.value.hint


def test_version_mismatch_between_ssl_module_and_libcrypto_fails_the_self_test(
    fresh_shim: None, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Mocked: ``ssl.OPENSSL_VERSION`` is replaced, as if _ssl were built against
    another OpenSSL than the libcrypto found in the process."""
    monkeypatch.setattr(ssl, "OPENSSL_VERSION", "OpenSSL 1.1.1w  11 Sep 2023")
    with pytest.raises(TlsShimError, match="reports .* but Python's ssl module runs"):
        self_test()


def test_tpm_key_context_is_refused_not_degraded_when_the_self_test_failed(
    fresh_shim: None, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Mocked maps reader as above; the point is that client_tls raises instead
    of building a context without the key, and keeps raising (cached)."""
    real = _openssl.read_maps
    fault = _add_line("/opt/x/libssl.so.3")
    monkeypatch.setattr(_openssl, "read_maps", lambda: fault(real()))
    key = SoftwareSigningKey.generate("ecc-p256")
    for _ in range(2):
        with pytest.raises(TlsShimError, match="self-test"):
            client_tls(key=key, cert_chain=[], trust_anchors=[])
    assert key.calls == 0


def test_a_passed_self_test_is_remembered_for_this_runtime_only(
        fresh_shim: None, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A spy on the in-memory handshake (which runs for real when called): the only way
    # to see that a later process skipped it.
    handshakes: list[str] = []
    real = context._selftest_one

    def counting(lib: object, alg: str, version: ssl.TLSVersion) -> None:
        handshakes.append(alg)
        real(lib, alg, version)  # type: ignore[arg-type]

    monkeypatch.setattr(context, "_selftest_one", counting)
    record = tmp_path / context.SELFTEST_RECORD
    self_test(record=record)
    assert handshakes == ["ecc-p256"] and record.stat().st_mode & 0o777 == 0o600
    # A new process (the in-memory verdict forgotten) on the same runtime trusts the record.
    context._reset_self_test_for_tests()
    self_test(record=record)
    assert handshakes == ["ecc-p256"]
    # Another key family has its own verdict.
    self_test("rsa-2048", record=record)
    assert handshakes == ["ecc-p256", "rsa-2048"]
    # A record made by another runtime (another Python, OpenSSL or tpmid) proves nothing.
    record.write_text('{"passed": ["' + "0" * 64 + '"]}')
    context._reset_self_test_for_tests()
    self_test(record=record)
    assert handshakes == ["ecc-p256", "rsa-2048", "ecc-p256"]


@pytest.mark.parametrize("content", [b"", b"not json", b"[]", b'{"passed": 5}', b"\xff\xfe"])
def test_a_damaged_self_test_record_means_the_handshake_runs_again(
        fresh_shim: None, tmp_path, content: bytes) -> None:
    record = tmp_path / context.SELFTEST_RECORD
    record.write_bytes(content)
    self_test(record=record)
    context._reset_self_test_for_tests()
    assert context._recorded(record, context._runtime_id(_openssl.load(), "ecc"))


def test_an_unwritable_record_only_costs_the_next_command_its_handshake(
        fresh_shim: None, tmp_path) -> None:
    self_test(record=tmp_path / "missing-dir" / context.SELFTEST_RECORD)
    assert not (tmp_path / "missing-dir").exists()
