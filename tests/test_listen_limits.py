"""`sonoscore listen` against hostile and careless senders (issue 27, points 2, 5-9), with real processes: the command
line in a subprocess, real TCP sockets and pynetdicom associations from 127.0.0.1, real C-STOREs. The PACS is a
port where nothing listens: results wait in the outbox, where the tests read them.
"""
from __future__ import annotations

import hashlib
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("pynetdicom")
pytest.importorskip("highdicom")
pytest.importorskip("yaml")

import pydicom  # noqa: E402
from pydicom.data import get_testdata_file  # noqa: E402
from pynetdicom import AE  # noqa: E402

from runtime.dicomnet import uid_key  # noqa: E402
from tests.conftest import ROOT  # noqa: E402
from tests.orthanc_server import free_port  # noqa: E402
from tests.test_listen import Listen, listens, open_bundle, read, write_config  # noqa: E402,F401

US_IMAGE = "1.2.840.10008.5.1.4.1.1.6.1"


def nowhere() -> list[dict]:
    return [{"name": "pacs", "type": "cstore", "host": "127.0.0.1", "port": free_port(), "called_ae": "PACS",
             "timeout_s": 2}]


def associate(port: int, calling: str = "SCU", called: str = "SONOSCORE", datasets=()):
    ae = AE(ae_title=calling)
    ae.add_requested_context("1.2.840.10008.1.1")
    for ds in datasets:
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    ae.acse_timeout = ae.network_timeout = ae.connection_timeout = 5
    return ae.associate("127.0.0.1", port, ae_title=called)


def fresh(ds):
    ds.StudyInstanceUID, ds.SOPInstanceUID = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def rejection_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if "rejected" in line]


def test_the_door_cannot_be_blocked_and_says_why_it_refuses(tmp_path, open_bundle, listens):
    """Points 5, 6, 7, 9: an instance over max_instance_mb is refused with 0xA700, never held in memory, nothing of it
    kept; 12 bare TCP connections and 10 idle associations do not keep the scanner out; a wrong called AE title is
    refused; 50 rejected associations make a handful of log lines, each with its true reason."""
    port = free_port()
    cfg = write_config(tmp_path / "w" / "listen.yaml", port=port, destinations=nowhere(), quiet=60.0,
                       calling_aes=("SCU", "OTHER"),
                       listen_extra={"max_instance_mb": 2, "request_timeout_s": 2, "max_associations": 10,
                                     "max_per_peer": 4, "reserved_per_calling_ae": 1})
    lp = Listen(cfg, open_bundle, port).start()
    listens.append(lp)
    spool = tmp_path / "w" / "spool"

    # 7: a 48 MB instance (US1_UNCR's frame 52 times) against a 2 MB limit
    big = fresh(read("US1_UNCR.dcm"))
    big.NumberOfFrames = 52
    big.PixelData = big.PixelData * 52
    size = len(big.PixelData)
    time.sleep(1.0)
    before = rss_kb(lp.proc.pid)
    assoc = associate(port, datasets=[big])
    assert assoc.is_established
    status = assoc.send_c_store(big)
    assoc.release()
    assert int(status.Status) == 0xA700 and "larger than 2 MB" in status.get("ErrorComment", "")
    grown = (rss_kb(lp.proc.pid) - before) * 1024
    assert grown < size / 4, f"the listener grew by {grown} bytes for a {size}-byte instance"
    assert [p for p in spool.rglob("*") if p.is_file() and p.name != "state.json"] == []
    assert "larger than listen.max_instance_mb" in lp.text()
    small = fresh(read("US1_UNCR.dcm"))                            # the next one on a new association is taken
    assoc = associate(port, datasets=[small])
    assert int(assoc.send_c_store(small).Status) == 0
    assoc.release()

    # 5: 12 bare TCP connections (no association request) and 10 idle associations from 127.0.0.1 ...
    bare = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(12)]
    idle = [associate(port, calling="OTHER") for _ in range(10)]
    assert sum(a.is_established for a in idle) == 5                # 4 shared (the per-peer limit) + OTHER's own
    # ... and the scanner still gets in at once, its C-STORE taken
    t0 = time.monotonic()
    us = fresh(read("US1_UNCR.dcm"))
    assoc = associate(port, calling="SCU", datasets=[us])
    assert assoc.is_established, "the scanner's association was refused"
    assert int(assoc.send_c_store(us).Status) == 0
    assoc.release()
    assert time.monotonic() - t0 < 3.0
    # the bare connections are closed by the listener after request_timeout_s
    for s in bare:
        s.settimeout(6)
        assert s.recv(1) == b""
        s.close()

    # 9: a wrong called AE title is refused (permanent, called AE title not recognised)
    wrong = associate(port, called="WRONGAE")
    assert wrong.is_rejected
    rsp = wrong.acceptor.primitive
    assert (rsp.result, rsp.result_source, rsp.diagnostic) == (0x01, 0x01, 0x07)

    # 6: 50 rejections (an unknown calling AE, the per-peer limit while the idle ones hold their slots)
    for i in range(25):
        assert associate(port, calling="STRANGER").is_rejected
        assert associate(port, calling="OTHER").is_rejected
    for a in idle:
        if a.is_established:
            a.release()
    assert lp.proc.poll() is None
    lines = rejection_lines(lp.text())
    assert len(lines) <= 5, lines
    assert not [line for line in lines if "calling AE title not accepted" in line]
    (stranger,) = [line for line in lines if "'STRANGER'" in line]
    assert "calling AE title 'STRANGER' is not in listen.calling_aes" in stranger
    (peer,) = [line for line in lines if "per-peer limit" in line]
    assert "calling AE 'OTHER'" in peer and "listen.max_per_peer" in peer
    (called,) = [line for line in lines if "WRONGAE" in line]
    assert "called AE title 'WRONGAE' is not this SCP's ('SONOSCORE')" in called


def test_odd_headers_are_scored_ct_is_skipped_and_a_study_that_cannot_be_scored_ends_in_failed(tmp_path, open_bundle,
                                                                                             listens):
    """Points 2 and 8: a Study Date that does not parse, a Patient Birth Date '1945' and a bad DS value do not stop
    scoring (the results are made, those values left empty); a CT data set sent as US Image Storage is not graded
    (the reason in its results, no DICOM results); a study whose scoring fails every time ends in the spool's
    failed/ after study_attempts, with one log line, a failed-<round>.json beside its results, and `--status`."""
    port = free_port()
    work = tmp_path / "w"
    cfg = write_config(work / "listen.yaml", port=port, destinations=nowhere(), quiet=1.0,
                       listen_extra={"study_attempts": 2, "study_retry_s": 0.5}, secondary_capture=False)
    lp = Listen(cfg, open_bundle, port).start()
    listens.append(lp)

    odd = fresh(read("US1_UNCR.dcm"))
    odd.StudyDate, odd.PatientBirthDate = "2020-13-45", "1945"
    odd.SliceThickness = "1.0"
    raw = tmp_path / "odd.dcm"
    odd.save_as(raw, enforce_file_format=True)
    data = raw.read_bytes()
    assert data.count(b"1.0 ") == 1
    raw.write_bytes(data.replace(b"1.0 ", b"x.y "))                # a DS value that is no number
    odd = pydicom.dcmread(raw)

    ct = pydicom.dcmread(get_testdata_file("CT_small.dcm"))         # 16-bit MONOCHROME2, Modality CT
    ct.SOPClassUID = ct.file_meta.MediaStorageSOPClassUID = US_IMAGE
    ct = fresh(ct)

    doomed = fresh(read("US1_UNCR.dcm"))
    study = uid_key(str(doomed.StudyInstanceUID))
    rnd = hashlib.sha256(f"{study}|{uid_key(str(doomed.SOPInstanceUID), 32)}".encode()).hexdigest()[:16]
    (work / "results" / study).mkdir(parents=True)
    (work / "results" / study / rnd).write_text("in the way")      # its results folder cannot be made

    for ds in (odd, ct, doomed):
        assoc = associate(port, datasets=[ds])
        assert int(assoc.send_c_store(ds).Status) == 0
        assoc.release()

    lp.wait_for("failed: scoring failed 2 time(s)", timeout=120)
    lp.wait_for(" done: ", count=2, timeout=120)
    log = lp.text()

    # 2: the odd study is scored; its results wait in the outbox (2 Segmentations? one frame: one SEG, the SR)
    odd_key = uid_key(str(odd.StudyInstanceUID))
    assert f"study {odd_key}: header value(s) that do not parse were left empty" in log
    assert "PatientBirthDate" in log and "StudyDate" in log and "SliceThickness" in log and "1945" not in log
    (batch,) = (work / "outbox" / "batches").glob(f"{odd_key}-*")
    kinds = json.loads((batch / "batch.json").read_text())["kinds"]
    assert sorted(kinds) == ["SEG", "SR"]
    sr = next(pydicom.dcmread(p) for p in batch.glob("*.dcm") if pydicom.dcmread(p).Modality == "SR")
    assert sr.PatientBirthDate == "" and sr.StudyDate == ""

    # 8: the CT is not graded: the reason is in its record, and it has no DICOM results (no SR, no grade)
    ct_key = uid_key(str(ct.StudyInstanceUID))
    (records,) = (work / "results" / ct_key).glob("*/results.jsonl")
    (rec,) = [json.loads(line) for line in records.read_text().splitlines()]
    assert rec["grade"] is None and "is not ultrasound (Modality CT)" in rec["error"]
    assert not list((work / "outbox" / "batches").glob(f"{ct_key}-*"))
    assert f"study {ct_key}: no instance of round" in log

    # 2: the doomed study: two attempts, then failed/ with the reason; one line saying so
    (line,) = [ln for ln in log.splitlines() if f"study {study} failed:" in ln]
    assert "FileExistsError" in line and "--status" in line
    failed = work / "spool" / "failed" / study / rnd
    assert (failed / f"{uid_key(str(doomed.SOPInstanceUID), 32)}.dcm").is_file()
    record = json.loads((failed / "failed.json").read_text())
    assert record["attempts"] == 2 and "FileExistsError" in record["reason"]
    assert json.loads((work / "results" / study / f"failed-{rnd}.json").read_text())["round"] == rnd
    assert not list((work / "spool" / "studies" / study).glob("*.dcm"))
    time.sleep(1.5)
    assert lp.text().count(f"study {study} quiet") == 2           # not tried again

    r = subprocess.run([sys.executable, "-m", "runtime.cli", "listen", "--config", str(cfg), "--status"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert f"running (pid {lp.proc.pid})" in out
    assert "studies: 0 waiting, 0 scoring, 2 done, 1 failed" in out, out
    assert f"failed   {study}  round {rnd}: scoring failed 2 time(s) (FileExistsError" in out
    assert "pacs (C-STORE): 1 batch(es), 2 result(s) not yet delivered" in out
    secrets = [str(u) for ds in (odd, ct, doomed) for u in (ds.StudyInstanceUID, ds.SOPInstanceUID)]
    secrets += ["1945", "2020-13-45", "CompressedSamples"]
    assert not [s for s in secrets if s in out or s in lp.text()]
    assert not [p for p in (work / "results").rglob("failed-*.json") for s in secrets if s in p.read_text()]


def test_the_service_keeps_each_runs_results(tmp_path):
    """Point 12: the unit's ExecStartPre (as systemd runs it: `$$` is `$`, `%%` is `%`) keeps the last run's RESULTS
    under a dated name before the next run replaces it, and prunes dated ones older than RESULTS_KEEP_DAYS."""
    import os
    import re
    unit = (ROOT / "device" / "sonoscore.service").read_text()
    (pre,) = re.findall(r"^ExecStartPre=-/bin/sh -c '(.*)'$", unit, flags=re.M)
    command = pre.replace("$$", "$").replace("%%", "%")
    results = tmp_path / "results.jsonl"
    old = tmp_path / "results.20200101T000000Z.jsonl"
    old.write_text("{}\n")
    os.utime(old, (time.time() - 40 * 86400,) * 2)
    partial = tmp_path / "results.partial-20260101T000000Z-0a0b0c0d.jsonl"
    partial.write_text("{}\n")
    env = {**os.environ, "RESULTS": str(results), "RESULTS_KEEP_DAYS": "30"}
    for run in ("first", "second"):
        results.write_text(f'{{"run": "{run}"}}\n')
        os.utime(results, (time.time() - (60 if run == "first" else 0),) * 2)
        assert subprocess.run(["/bin/sh", "-c", command], env=env, timeout=30).returncode == 0
        assert not results.exists()
    kept = sorted(p.read_text() for p in tmp_path.glob("results.2*.jsonl"))
    assert kept == ['{"run": "first"}\n', '{"run": "second"}\n']        # both runs kept; the 40-day-old one pruned
    assert partial.exists()
    env["RESULTS"] = ""
    assert subprocess.run(["/bin/sh", "-c", command], env=env, timeout=30).returncode == 0   # no results file
