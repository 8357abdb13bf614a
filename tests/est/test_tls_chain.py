"""The EST server's TLS chain under RFC 5280 (``trust.profile``), against real TLS servers.

Python's ``ssl`` verifies the server's chain with OpenSSL. OpenSSL already accepts a
trust anchor whose basicConstraints is not critical, but not one without
basicConstraints or one whose keyUsage lacks keyCertSign; tpmid hands it each
configured anchor as an RFC 5280 trust anchor (name and key, ``trust_anchor``), and
names the certificate and the rule when OpenSSL refuses the chain below it. The
servers are real TLS servers on loopback (``CannedServer``) with chains made here.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from tests.est.test_client_support import CannedServer, pem
from tests.est.test_verify import LAB_BC, _ku, make_cert
from tpmid.errors import ConfigError, EstTransportError
from tpmid.est import messages
from tpmid.wiring.est import fetch_cacerts

SERVER_EXTS = [(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                             x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                False),
               (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False),
               (x509.BasicConstraints(ca=False, path_length=None), True)]
STRICT_CA = [(x509.BasicConstraints(ca=True, path_length=None), True), _ku(True)]


class Chain:
    """A root, an intermediate and a TLS server certificate with chosen extensions."""

    def __init__(self, root_exts: list, inter_exts: list | None, root: str = "tls root") -> None:
        self.root_key, self.inter_key, self.key = (ec.generate_private_key(ec.SECP256R1())
                                                   for _ in range(3))
        self.root = make_cert(root, root, self.root_key, self.root_key.public_key(), root_exts)
        self.inter = None
        signer, issuer = self.root_key, root
        if inter_exts is not None:
            self.inter = make_cert("tls intermediate", root, self.root_key,
                                   self.inter_key.public_key(), inter_exts)
            signer, issuer = self.inter_key, "tls intermediate"
        self.leaf = make_cert("localhost", issuer, signer, self.key.public_key(), SERVER_EXTS)

    @property
    def served(self) -> tuple[list[x509.Certificate], ec.EllipticCurvePrivateKey]:
        return [self.leaf, *([self.inter] if self.inter else [])], self.key


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[[Chain], tuple[str, Path]]]:
    """Start a TLS server with ``chain``; return its label URL and the root's PEM file."""
    servers: list[CannedServer] = []

    def start(chain: Chain) -> tuple[str, Path]:
        body = messages.encode_certs_only([chain.root])
        srv = CannedServer(lambda seen: (200, [("Content-Type", messages.CERTS_ONLY_CONTENT_TYPE)],
                                         body), tls=chain.served, host="127.0.0.1")
        servers.append(srv.start())
        anchor = tmp_path / f"anchor-{len(servers)}.pem"
        anchor.write_bytes(pem(chain.root))
        return srv.url(), anchor

    yield start
    for s in servers:
        s.stop()


ANCHORS = {
    "basicConstraints not critical, no keyUsage": [LAB_BC],
    "no basicConstraints at all (OpenSSL alone refuses it)": [],
    "keyUsage without keyCertSign (OpenSSL alone refuses it)": [LAB_BC, _ku(False)],
}


@pytest.mark.parametrize("root_exts", ANCHORS.values(), ids=ANCHORS.keys())
@pytest.mark.parametrize("with_intermediate", [False, True], ids=["direct", "intermediate"])
def test_a_lab_shaped_anchor_authenticates_the_server(
    serve: Callable[[Chain], tuple[str, Path]], root_exts: list, with_intermediate: bool,
) -> None:
    chain = Chain(root_exts, [LAB_BC] if with_intermediate else None)
    url, anchor = serve(chain)
    result = fetch_cacerts(url, trusted_certs=[anchor])
    assert list(result.certificates) == [chain.root]


BROKEN = {
    "intermediate with cA=FALSE": (
        [(x509.BasicConstraints(ca=False, path_length=None), True)],
        "is not a CA certificate: its basicConstraints says cA=FALSE"),
    "intermediate whose keyUsage lacks keyCertSign": (
        [LAB_BC, _ku(False)], "may not sign certificates: its keyUsage lacks keyCertSign"),
}


@pytest.mark.parametrize(("inter_exts", "rule"), BROKEN.values(), ids=BROKEN.keys())
def test_a_broken_intermediate_in_the_servers_chain_is_refused_naming_it(
    serve: Callable[[Chain], tuple[str, Path]], inter_exts: list, rule: str,
) -> None:
    chain = Chain(STRICT_CA, inter_exts)
    url, anchor = serve(chain)
    with pytest.raises(EstTransportError) as info:
        fetch_cacerts(url, trusted_certs=[anchor])
    message = info.value.message
    assert "certificate verify failed: invalid CA certificate: the server's TLS certificate " \
           "chain is refused at 'CN=tls intermediate' (SHA-256 " in message
    assert "(depth 1 of the chain it sent)" in message
    assert rule in message
    assert "its operator must fix the certificate named here" in (info.value.hint or "")


def test_an_untrusted_server_names_where_its_chain_leads(
    serve: Callable[[Chain], tuple[str, Path]], tmp_path: Path,
) -> None:
    url, _ = serve(Chain(STRICT_CA, None))
    other = tmp_path / "other.pem"
    other.write_bytes(pem(Chain(STRICT_CA, None, root="another root").root))
    with pytest.raises(EstTransportError) as info:
        fetch_cacerts(url, trusted_certs=[other])
    assert "refused at 'CN=localhost'" in info.value.message
    assert "its issuer is neither in the chain the server sent nor among the trust anchors" \
        in info.value.message
    assert "trust the CA that issued the server's TLS certificate" in (info.value.hint or "")


def test_webpki_profile_hands_openssl_the_anchor_as_it_is(
    serve: Callable[[Chain], tuple[str, Path]],
) -> None:
    chain = Chain([], None)  # a root without basicConstraints: OpenSSL refuses it as such
    url, anchor = serve(chain)
    with pytest.raises(EstTransportError, match="certificate verify failed"):
        fetch_cacerts(url, trusted_certs=[anchor], trust_profile="webpki")


def test_an_anchor_that_says_ca_false_is_a_config_error_naming_the_file(
    serve: Callable[[Chain], tuple[str, Path]], tmp_path: Path,
) -> None:
    chain = Chain(STRICT_CA, None)
    url, _ = serve(chain)
    wrong = tmp_path / "server-cert.pem"
    wrong.write_bytes(pem(chain.leaf))
    with pytest.raises(ConfigError) as info:
        fetch_cacerts(url, trusted_certs=[wrong])
    assert f"in {wrong} is not a CA certificate" in info.value.message
