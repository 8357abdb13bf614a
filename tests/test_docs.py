"""The documentation's examples run: a doc that drifts from the code fails CI.

README.md, docs/quickstart.md, docs/manufacturing.md and docs/field-operation.md
mark the blocks that are run:

* ``<!-- doc-test-setup: fresh|provisioned|enrolled -->`` once per document: the
  device the examples start from (a factory-fresh swtpm; plus a provisioned
  IDevID; plus enrolled LDevID and Edge CA), always with a reference EST server;
* ``<!-- doc-test: config -->`` before a YAML block: that block *is* the config
  the following examples use (``/etc/tpmid/config.yaml``);
* ``<!-- doc-test -->`` (or ``<!-- doc-test: exit N -->``) before an ``sh`` block:
  run with bash, each line must succeed (the block's last status must be N).

Paths are rewritten into a temporary root (``/etc``, ``/var/lib/tpmid``,
``/mnt``, ``/usr/local``), ``https://est.*.example`` into the reference server,
``device:/dev/tpmrm0`` into the swtpm, ``sudo -u tpmid`` is dropped and
``export NAME=...`` lines stand for secrets the test provides. The examples see
the CA files the config names (the server's TLS CA for ``*est-tls-ca.pem``, the
manufacturer CA for ``manufacturer-ca.pem``) and a stand-in for a hook script.
Blocks that install packages, add users, write to /etc or call systemctl are
never marked; the runner refuses them if they are.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tpmid.testing.estserver import RunningEstServer, start_est_server
from tpmid.testing.swtpm import Swtpm

REPO = Path(__file__).resolve().parents[1]
DOCS = ("README.md", "docs/quickstart.md", "docs/manufacturing.md", "docs/field-operation.md")
BLOCK = re.compile(r"<!-- doc-test(?::\s*(?P<args>[^>]*?))?\s*-->\s*\n```(?P<lang>\w*)\n"
                   r"(?P<body>.*?)\n```", re.S)
SETUP = re.compile(r"<!-- doc-test-setup:\s*(\w+)\s*-->")
FORBIDDEN = re.compile(r"\b(apt-get|apt|useradd|systemctl|dpkg|install -[dm])\b|>\s*/etc/")
SECRET_ENV = "IDEVID_SECRET"


@dataclass
class Example:
    kind: str  # "config" or "sh"
    body: str
    exit: int = 0


def examples(doc: str) -> tuple[str | None, list[Example]]:
    text = (REPO / doc).read_text()
    setup = SETUP.search(text)
    out = []
    for m in BLOCK.finditer(text):
        args = (m.group("args") or "").split()
        if args[:1] == ["config"]:
            out.append(Example("config", m.group("body")))
        else:
            code = int(args[1]) if args[:1] == ["exit"] else 0
            out.append(Example("sh", m.group("body"), code))
    return (setup.group(1) if setup else None), out


class Device:
    """A temporary root with a swtpm and a reference EST server, for one document."""

    def __init__(self, root: Path, swtpm: Swtpm, server: RunningEstServer) -> None:
        self.root, self.swtpm, self.server = root, swtpm, server
        self.base = server.url().split("/.well-known")[0]
        etc = root / "etc" / "tpmid"
        etc.mkdir(parents=True)
        for name in ("est-tls-ca.pem", "factory-est-tls-ca.pem"):
            shutil.copy(server.tls_ca, etc / name)
        shutil.copy(server.manufacturer_ca, etc / "manufacturer-ca.pem")
        (root / "station").mkdir()
        hook = root / "usr" / "local" / "bin" / "edge-agent-reload"
        hook.parent.mkdir(parents=True)
        hook.write_text(f"#!/bin/sh\necho \"$TPMID_IDENTITY $TPMID_VERSION\" >> {root}/hook.log\n")
        hook.chmod(0o755)
        self.env = {**os.environ, SECRET_ENV: server.secret, "TPMID_CONFIG": str(self.config),
                    "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
        for var in ("TPMID_TCTI", "TPMID_STATION", "TPMID_MANIFEST"):
            self.env.pop(var, None)

    @property
    def config(self) -> Path:
        return self.root / "etc" / "tpmid" / "config.yaml"

    def rewrite(self, text: str) -> str:
        text = re.sub(r"https://est\.[a-z.]+\.example(:\d+)?", self.base, text)
        text = text.replace("device:/dev/tpmrm0", self.swtpm.tcti)
        text = re.sub(r"(?<![\w.])(/etc/|/var/lib/tpmid|/mnt/station|/usr/local/)",
                      lambda m: f"{self.root}{m.group(1).replace('/mnt/station', '/station')}",
                      text)
        return text.replace("sudo -u tpmid ", "")

    def write_config(self, data: dict[str, object] | str) -> None:
        text = data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False)
        self.config.write_text(self.rewrite(text))
        self.config.chmod(0o600)

    def tpmid(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "tpmid.cli", *args], env=self.env,
                              cwd=self.root, capture_output=True, text=True, timeout=120)

    def provision(self) -> None:
        self.write_config({
            "tpm": {"tcti": "device:/dev/tpmrm0"}, "store": {"dir": "/var/lib/tpmid"},
            "trust": {"est_anchors": ["/etc/tpmid/est-tls-ca.pem"]},
            "identities": {"idevid": {
                "key": {"kind": "persistent", "template": "H-2", "handle": 0x81020000},
                "subject": {"cn": "IDevID", "serial_number": "SN0001"},
                "est": {"url": "https://est.factory.example/.well-known/est/idevid",
                        "auth": {"headers": {"Secret-Value": {"env": SECRET_ENV}}},
                        "issuer_anchors": ["/etc/tpmid/manufacturer-ca.pem"]}}},
        })
        proc = self.tpmid("provision", "--station", "doc-test")
        assert proc.returncode == 0, proc.stderr

    def enroll(self) -> None:
        idevid = {"key": {"kind": "persistent", "template": "H-2", "handle": 0x81020000},
                  "subject": {"cn": "IDevID", "serial_number": "SN0001"}}
        field = {"key": {"kind": "file"}, "subject": {"cn": "device-0001",
                                                      "serial_number": "SN0001"}}
        self.write_config({
            "tpm": {"tcti": "device:/dev/tpmrm0"}, "store": {"dir": "/var/lib/tpmid"},
            "trust": {"est_anchors": ["/etc/tpmid/est-tls-ca.pem"]},
            "identities": {
                "idevid": idevid,
                "ldevid": {**field, "est": {
                    "url": "https://est.acme.example/.well-known/est/ldevid",
                    "auth": {"client": "idevid"}}},
                "edge-ca": {**field, "profile": "ca", "subject": {
                    "cn": "device-0001 Edge CA", "serial_number": "SN0001"}, "est": {
                    "url": "https://est.acme.example/.well-known/est/edgeca",
                    "auth": {"client": "ldevid"}}}},
        })
        for name in ("ldevid", "edge-ca"):
            proc = self.tpmid("enroll", name)
            assert proc.returncode == 0, proc.stderr


@pytest.fixture
def device(swtpm: Swtpm, tmp_path: Path) -> Iterator[Device]:
    server = start_est_server(tmp_path / "est")
    try:
        yield Device(tmp_path / "root", swtpm, server)
    finally:
        server.stop()


def test_the_four_documents_have_tested_examples() -> None:
    counted = {doc: len(examples(doc)[1]) for doc in DOCS}
    assert all(counted[d] for d in DOCS[1:]), counted  # README: only scripts/demo and test


@pytest.mark.slow
@pytest.mark.parametrize("doc", [d for d in DOCS if examples(d)[1]])
def test_the_examples_of_a_document_run(doc: str, device: Device) -> None:
    setup, blocks = examples(doc)
    if setup in ("provisioned", "enrolled"):
        device.provision()
    if setup == "enrolled":
        device.enroll()
    for n, ex in enumerate(blocks, 1):
        assert not FORBIDDEN.search(ex.body), f"{doc} example {n} must not be run: {ex.body}"
        if ex.kind == "config":
            device.write_config(ex.body)
            continue
        script = "\n".join(line for line in device.rewrite(ex.body).splitlines()
                           if not re.match(r"\s*export \w+=\.\.\.", line))
        strict = "set -e -o pipefail\n" if ex.exit == 0 else "set -o pipefail\n"
        proc = subprocess.run(["bash", "-c", strict + script], env=device.env,
                              cwd=device.root, capture_output=True, text=True, timeout=300)
        shown = f"{doc} example {n}:\n{ex.body}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
        assert proc.returncode == ex.exit, shown
        assert "Traceback" not in proc.stdout + proc.stderr, shown
        for line in (proc.stdout + proc.stderr).splitlines():
            if "hint:" in line:
                assert not re.search(r"<[a-z_ -]+>|\bNAME\b|\bINDEX\b", line), shown
