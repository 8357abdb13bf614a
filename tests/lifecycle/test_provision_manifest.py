"""The provisioning manifest: record model, validation and concurrent appends."""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
from pathlib import Path
from typing import Any

import pytest

from tpmid.errors import StoreError
from tpmid.manifest import EkCertificate, ProvisionRecord, append_record, read_manifest


def _record(**changes: Any) -> ProvisionRecord:
    base = ProvisionRecord(
        time="2030-01-02T03:04:05+00:00", station="line-1", tpmid_version="0.1.0",
        identity="idevid", outcome="provisioned", device_serial="SN-1",
        ek_fingerprint="ab" * 32,
        ek_certificates=(EkCertificate("L-1", "rsa-2048", "0x01c00002", "cd" * 32),),
        idevid_kind="persistent", idevid_handle="0x81020000", idevid_template="H-2",
        idevid_cert_sha256="ef" * 32, idevid_cert_serial="1f", duration_s=0.5,
    )
    return dataclasses.replace(base, **changes)


def test_record_survives_a_round_trip_through_one_json_line() -> None:
    rec = _record()
    line = rec.to_json()
    assert "\n" not in line
    assert ProvisionRecord.from_json(line) == rec
    assert json.loads(line)["result"] == "PASS"


def test_failed_record_reads_fail_with_its_exit_code() -> None:
    rec = _record(outcome="fail", exit_code=5, error_code="EstAuthError", error="401",
                  failed_step="enrolling over EST")
    assert json.loads(rec.to_json())["result"] == "FAIL"
    assert ProvisionRecord.from_json(rec.to_json()).exit_code == 5


def _mutate(change: dict[str, Any]) -> str:
    d = json.loads(_record().to_json())
    d.update(change)
    return json.dumps(d)


@pytest.mark.parametrize(("line", "problem"), [
    ("[1, 2]", "JSON object"),
    ("{not json", "not JSON"),
    (_mutate({"outcome": "maybe"}), "outcome"),
    (_mutate({"extra": 1}), "unknown field"),
    (_mutate({"time": "yesterday"}), "ISO 8601"),
    (_mutate({"station": ""}), "station"),
    (_mutate({"exit_code": 3}), "exit_code"),
    (_mutate({"outcome": "fail", "result": "FAIL"}), "exit_code"),
    (_mutate({"result": "FAIL"}), "contradicts"),
    (_mutate({"idevid_cert_sha256": 12}), "idevid_cert_sha256"),
    (_mutate({"ek_certificates": [{"template": "L-1"}]}), "ek_certificates"),
    (_mutate({"schema": 99}), "schema"),
], ids=["not-an-object", "not-json", "unknown-outcome", "unknown-field", "bad-time",
        "empty-station", "pass-with-exit-code", "fail-without-exit-code", "result-contradicts",
        "fingerprint-not-a-string", "incomplete-ek-certificate", "future-schema"])
def test_invalid_manifest_lines_are_rejected_naming_the_problem(line: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        ProvisionRecord.from_json(line)


def test_reading_a_manifest_names_the_first_bad_line(tmp_path: Path) -> None:
    path = tmp_path / "manifest.jsonl"
    path.write_text(_record().to_json() + "\n" + "{garbage\n")
    with pytest.raises(StoreError, match="line 2"):
        read_manifest(path)


def test_appending_to_a_missing_station_share_fails_with_a_store_error(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="directory does not exist"):
        append_record(tmp_path / "not-mounted" / "manifest.jsonl", _record())


def test_manifest_is_created_world_readable_and_appended_not_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "manifest.jsonl"
    append_record(path, _record(device_serial="A"))
    append_record(path, _record(device_serial="B"))
    assert [r.device_serial for r in read_manifest(path)] == ["A", "B"]
    assert os.stat(path).st_mode & 0o777 == 0o644


def _append_many(path: str, writer: int, count: int) -> None:
    # Records far larger than PIPE_BUF (4 KiB), where unsynchronised appends tear.
    for i in range(count):
        append_record(Path(path), _record(device_serial=f"W{writer}-{i}",
                                          station="x" * 20000))


def test_concurrent_appends_from_many_processes_never_interleave(tmp_path: Path) -> None:
    path = tmp_path / "manifest.jsonl"
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_append_many, args=(str(path), w, 40)) for w in range(8)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    records = read_manifest(path)  # raises on any torn or merged line
    assert len(records) == 8 * 40
    assert len({r.device_serial for r in records}) == 8 * 40
