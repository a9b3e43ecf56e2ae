"""`sonoscore listen` and `run --send` end to end, with real processes: the command line in a subprocess, a real
pynetdicom SCU sending pydicom's and pydicom-data's ultrasound files, and a real Orthanc (tests/orthanc_server.py)
as the PACS, receiving the results by C-STORE and by STOW-RS and giving them back through its REST API.

The bundle is the tiny trained one (conftest.py) with its gate opened (mask threshold 0, minimum fraction 0): every
frame is accepted with a whole-region mask whatever the weights, so how many Segmentations each study gets is
known; the grades themselves are whatever the tiny networks give, and each SR's is compared with its own study
summary. Tests that need Orthanc skip, saying why, where it cannot be started.
"""
from __future__ import annotations

import hashlib
import io
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("pynetdicom")
pytest.importorskip("highdicom")
pytest.importorskip("yaml")

import highdicom as hd  # noqa: E402
import pydicom  # noqa: E402
from pydicom.data import get_testdata_file  # noqa: E402
from pynetdicom import AE  # noqa: E402

from runtime.dicomnet import uid_key  # noqa: E402
from tests.conftest import ROOT, sonoscore  # noqa: E402
from tests.orthanc_server import Orthanc, OrthancUnavailable, free_port  # noqa: E402

# Three studies: two instances of one (uncompressed and JPEG 2000, 480x640 RGB), a multi-frame RLE one with
# ultrasound regions (800x600, 2 frames), and a 30-frame JPEG baseline YBR cine.
STUDY_A = ["US1_UNCR.dcm", "US1_J2KR.dcm"]
STUDY_B = ["OBXXXX1A_rle_2frame.dcm"]
CINE = "examples_ybr_color.dcm"
SECRETS = ("CompressedSamples", "OB^", "PLA 204", "13US1", "11-05-25-142825")   # names and IDs in those files
US_CLASSES = {"1.2.840.10008.5.1.4.1.1.6.1", "1.2.840.10008.5.1.4.1.1.3.1"}


def data_file(name: str) -> Path:
    path = get_testdata_file(name, download=False)
    assert path, f"{name} is not available offline: install pydicom-data (pip install pydicom-data==1.0.0)"
    return Path(path)


def read(name: str):
    return pydicom.dcmread(data_file(name))


def frames_of(ds) -> int:
    return int(ds.get("NumberOfFrames") or 1)


# -- fixtures ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def open_bundle(tiny_bundle, tmp_path_factory):
    """The tiny bundle with its gate opened: every frame accepted, its mask the whole 224x224 image."""
    from runtime.bundle import write_manifest
    root = tmp_path_factory.mktemp("listen") / "bundle"
    shutil.copytree(tiny_bundle, root)
    for f in ("signature.json", "manifest.sig"):
        (root / f).unlink(missing_ok=True)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["gate"].update(mask_threshold=0.0, min_mask_fraction=0.0)
    write_manifest(root, manifest)
    return root


@pytest.fixture
def orthanc(tmp_path):
    try:
        server = Orthanc(tmp_path / "orthanc").start()
    except OrthancUnavailable as e:
        pytest.skip(f"needs Orthanc: {e}")
    yield server
    server.stop()


def write_config(path: Path, *, port: int, destinations: list[dict], quiet: float = 2.0,
                 calling_aes=("SCU",), retry=None, listen: bool = True, spool: str = "spool",
                 listen_extra: dict | None = None, **results) -> Path:
    """A listen configuration; `listen=False`: a send-only one (no listen section), as `run --send` takes;
    `listen_extra`: more keys of the listen section."""
    import yaml
    doc = {"listen": {"ae_title": "SONOSCORE", "port": port, "bind": "127.0.0.1", "calling_aes": list(calling_aes),
                      "spool": spool, "quiet_time_s": quiet, **(listen_extra or {})},
           "results": {"dir": "results", "uid_root": "1.2.826.0.1.3680043.10.1234", **results},
           "outbox": {"dir": "outbox", "retry": retry or {"first_s": 0.5, "max_s": 2}},
           "destinations": destinations}
    if not listen:
        del doc["listen"]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(doc))
    return path


def cstore_dest(pacs: Orthanc) -> dict:
    return {"name": "orthanc", "type": "cstore", "host": "127.0.0.1", "port": pacs.dicom_port,
            "called_ae": pacs.aet, "timeout_s": 10}


def stow_dest(pacs: Orthanc) -> dict:
    return {"name": "web", "type": "stow-rs", "url": pacs.dicomweb_url, "timeout_s": 10}


class Listen:
    """`sonoscore listen` in a subprocess; its stderr in a file."""

    def __init__(self, config: Path, bundle: Path, port: int, *extra: str):
        self.config, self.bundle, self.port, self.extra = config, bundle, port, extra
        self.log = config.parent / "listen.log"
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self, timeout: float = 300.0) -> "Listen":
        self.starts += 1
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "runtime.cli", "listen", "--config", str(self.config),
                                          "--bundle", str(self.bundle), "--threads", "1", *self.extra], cwd=ROOT,
                                         stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"sonoscore listen exited ({self.proc.returncode}):\n{self.text()}"
            if echo(self.port):
                return self
            time.sleep(0.2)
        raise AssertionError(f"sonoscore listen did not answer a C-ECHO within {timeout:g} s:\n{self.text()}")

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def signal(self, sig: int) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(60)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)

    def wait_for(self, text: str, count: int = 1, timeout: float = 240.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.text().count(text) >= count:
                return
            assert self.proc.poll() is None, f"sonoscore listen exited ({self.proc.returncode}):\n{self.text()}"
            time.sleep(0.1)
        raise AssertionError(f"'{text}' not seen {count} time(s) within {timeout:g} s:\n{self.text()}")


def echo(port: int) -> bool:
    ae = AE(ae_title="SCU")
    ae.add_requested_context("1.2.840.10008.1.1")
    ae.acse_timeout = ae.network_timeout = ae.connection_timeout = 2
    assoc = ae.associate("127.0.0.1", port, ae_title="SONOSCORE")
    if not assoc.is_established:
        return False
    status = assoc.send_c_echo()
    assoc.release()
    return status is not None and status.get("Status") == 0


def send(port: int, datasets: list, calling: str = "SCU", extra_contexts=()) -> tuple[list[int], object]:
    """C-STORE each dataset in one association: (statuses, the association, released)."""
    ae = AE(ae_title=calling)
    for ds in datasets:
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    for sop in extra_contexts:
        ae.add_requested_context(sop)
    assoc = ae.associate("127.0.0.1", port, ae_title="SONOSCORE")
    assert assoc.is_established, "the association was not accepted"
    statuses = []
    for ds in datasets:
        st = assoc.send_c_store(ds)
        statuses.append(int(st.Status))
    assoc.release()
    return statuses, assoc


@pytest.fixture
def listens():
    made: list[Listen] = []
    yield made
    for lp in made:
        lp.stop()


def wait_until(check, timeout: float = 240.0, what: str = "the condition", step: float = 0.25):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"{what} did not happen within {timeout:g} s")


def study_results(pacs: Orthanc, study_uid: str) -> dict[str, list]:
    """The study's result objects in Orthanc (the sources left out), read back: {kind: [datasets]}, kind SR, SEG or
    SC (runtime.dicom_out.result_kind; a Secondary Capture's Modality is its source's, US)."""
    from runtime.dicom_out import result_kind
    out: dict[str, list] = {}
    for inst in pacs.study_instances(study_uid):
        ds = pacs.dataset(inst["ID"])
        if result_kind(ds) in ("SR", "SEG", "SC"):
            out.setdefault(result_kind(ds), []).append(ds)
    return out


def summary_of(workdir: Path, study_uid: str) -> dict:
    (path,) = (workdir / "results" / uid_key(study_uid)).glob("*/summary.json")
    return json.loads(path.read_text())


def records_of(workdir: Path, study_uid: str) -> list[dict]:
    lines = []
    for path in sorted((workdir / "results" / uid_key(study_uid)).glob("*/results.jsonl")):
        lines += [json.loads(line) for line in path.read_text().splitlines()]
    return lines


def check_study(pacs: Orthanc, workdir: Path, sources: list, *, sc: bool = True) -> dict[str, list]:
    """One SR whose grade is the study summary's, a Segmentation per result frame that references a source frame
    in its geometry, a Secondary Capture of each when asked; all read back by highdicom."""
    study_uid = str(sources[0].StudyInstanceUID)
    by_uid = {str(s.SOPInstanceUID): s for s in sources}
    frames = sum(frames_of(s) for s in sources)
    results = study_results(pacs, study_uid)
    summary = summary_of(workdir, study_uid)
    assert summary["frames"] == summary["accepted"] == frames      # the gate is open: every frame scored
    assert len(records_of(workdir, study_uid)) == frames

    (sr_ds,) = results["SR"]
    sr = hd.sr.srread(io.BytesIO(_bytes(sr_ds)))
    (group,) = sr.content.get_image_measurement_groups()
    (grade,) = group.get_qualitative_evaluations()
    assert grade.value.value == f"IFTA-{summary['final_grade']}"
    cited = {str(e[2]) for e in sr.get_evidence()}
    assert set(by_uid) <= cited

    segs = results["SEG"]
    assert len(segs) == min(frames, 8)
    for ds in segs:
        seg = hd.seg.segread(io.BytesIO(_bytes(ds)))
        ref = seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0]
        src = by_uid[str(ref.ReferencedSOPInstanceUID)]
        assert str(ref.ReferencedSOPClassUID) == str(src.SOPClassUID)
        assert (seg.Rows, seg.Columns) == (src.Rows, src.Columns)
        assert seg.get_segment_numbers() == [1]
    if sc:
        assert len(results.get("SC", [])) == len(segs)
        for ds in results["SC"]:
            assert ds.BurnedInAnnotation == "YES" and "DERIVED" in list(ds.ImageType) and ds.Modality == "US"
    return results


def _bytes(ds) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


# -- tests -------------------------------------------------------------------------------------------------------

def test_listen_scores_each_study_and_orthanc_holds_its_results_once(tmp_path, open_bundle, orthanc, listens):
    if orthanc.dicomweb_url is None:
        pytest.skip("needs Orthanc's DICOMweb plugin for STOW-RS (apt-get install orthanc-dicomweb)")
    port = free_port()
    cfg = write_config(tmp_path / "w" / "listen.yaml", port=port,
                       destinations=[cstore_dest(orthanc), stow_dest(orthanc)])
    lp = Listen(cfg, open_bundle, port).start()
    listens.append(lp)
    a = [read(n) for n in STUDY_A]
    b = [read(n) for n in STUDY_B]
    statuses, assoc = send(port, a + b)
    assert statuses == [0, 0, 0]
    lp.wait_for("delivered to every destination", count=2)

    for sources in (a, b):
        results = check_study(orthanc, tmp_path / "w", sources)
        made = [str(ds.SOPInstanceUID) for kind in results.values() for ds in kind]
        received = orthanc.received()
        for uid in made:   # each result reached Orthanc exactly once by C-STORE and once by STOW-RS
            assert received[(uid, "DicomProtocol")] == 1, received
            assert sum(n for (u, how), n in received.items() if u == uid and how != "DicomProtocol") == 1
    # nothing left behind: the spool's instances and the outbox's batches are gone once done
    assert not list((tmp_path / "w" / "spool" / "studies").glob("*/*.dcm"))
    assert not list((tmp_path / "w" / "outbox" / "batches").iterdir())
    # no patient identifier in the log, and the log names studies by their opaque keys
    log = lp.text()
    assert not [s for s in SECRETS if s in log]
    assert uid_key(str(a[0].StudyInstanceUID)) in log
    assert not [s for s in SECRETS for p in (tmp_path / "w" / "results").rglob("*.*") if s in p.read_text(
        errors="replace")]


def test_results_wait_in_the_outbox_through_a_pacs_outage_and_a_restart(tmp_path, open_bundle, orthanc, listens):
    port = free_port()
    cfg = write_config(tmp_path / "w" / "listen.yaml", port=port, destinations=[cstore_dest(orthanc)],
                       secondary_capture=False)
    orthanc.stop()                                   # the PACS is down while the results are made
    lp = Listen(cfg, open_bundle, port).start()
    listens.append(lp)
    a = [read(n) for n in STUDY_A]
    assert send(port, a)[0] == [0, 0]
    lp.wait_for("cannot be reached")
    time.sleep(2.0)                                  # several retries while it is down: said once
    assert lp.text().count("cannot be reached") == 1
    batches = list((tmp_path / "w" / "outbox" / "batches").iterdir())
    assert len(batches) == 1 and len(list(batches[0].glob("*.dcm"))) == 3      # 2 SEG and the SR wait
    assert lp.signal(signal.SIGTERM) == 128 + signal.SIGTERM
    assert "3 result(s) wait in the outbox" in lp.text()

    orthanc.start()                                  # the PACS is back, then sonoscore restarts
    lp.start()
    lp.wait_for("delivered to every destination")
    results = check_study(orthanc, tmp_path / "w", a, sc=False)
    received = orthanc.received()
    for ds in [d for kind in results.values() for d in kind]:
        assert received[(str(ds.SOPInstanceUID), "DicomProtocol")] == 1
    assert lp.text().count("reachable again") + lp.text().count("from before wait in the outbox") >= 1


def test_listen_killed_mid_study_loses_nothing(tmp_path, open_bundle, orthanc, listens):
    port = free_port()
    cfg = write_config(tmp_path / "w" / "listen.yaml", port=port, destinations=[cstore_dest(orthanc)], quiet=4.0,
                       secondary_capture=False)
    lp = Listen(cfg, open_bundle, port).start()
    listens.append(lp)
    a = [read(n) for n in STUDY_A]
    # killed between the two instances of a study: the first was acknowledged, so it is on disk
    assert send(port, a[:1])[0] == [0]
    lp.proc.send_signal(signal.SIGKILL)
    lp.proc.wait(30)
    lp.start()
    assert send(port, a[1:])[0] == [0]
    lp.wait_for("delivered to every destination")
    check_study(orthanc, tmp_path / "w", a, sc=False)        # one SR over both instances, every frame scored

    # killed while the study is being scored: redone on restart, its results in Orthanc once
    cine = read(CINE)
    assert send(port, [cine])[0] == [0]
    lp.wait_for("scoring 1 instance(s)")
    lp.proc.send_signal(signal.SIGKILL)
    lp.proc.wait(30)
    lp.start()
    lp.wait_for("delivered to every destination", count=2)
    results = check_study(orthanc, tmp_path / "w", [cine], sc=False)
    received = orthanc.received()
    for ds in [d for kind in results.values() for d in kind]:
        assert received[(str(ds.SOPInstanceUID), "DicomProtocol")] == 1

    # the first study sent again after it was scored: said once, with how to score it again; not scored twice
    scored = lp.text().count("scoring ")
    assert send(port, a)[0] == [0, 0]
    lp.wait_for("was sent again")
    time.sleep(4.0 + 1.0)                                  # its quiet time passes: no new round
    log = lp.text()
    assert log.count("was sent again") == 1 and log.count("scoring ") == scored
    (again,) = [line for line in log.splitlines() if "was sent again" in line]
    assert uid_key(str(a[0].StudyInstanceUID)) in again and "already scored" in again
    assert f"`sonoscore run --bundle BUNDLE --source <a folder with the study's files> --send {cfg}`" in again
    assert not list((tmp_path / "w" / "spool" / "studies").glob("*/*.dcm"))       # dropped, not kept


def test_unsupported_sop_class_wrong_data_and_unknown_calling_ae_are_refused(tmp_path, open_bundle, listens):
    port = free_port()
    cfg = write_config(tmp_path / "w" / "listen.yaml", port=port, calling_aes=("SCU",),
                       destinations=[{"name": "nowhere", "type": "cstore", "host": "127.0.0.1", "port": free_port(),
                                      "called_ae": "PACS"}])
    lp = Listen(cfg, open_bundle, port).start()
    listens.append(lp)
    ct = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    us = read("US1_UNCR.dcm")
    no_study = read("US1_UNCR.dcm")
    del no_study.StudyInstanceUID
    no_pixels = read("US1_UNCR.dcm")
    del no_pixels.PixelData
    no_pixels.SOPInstanceUID = pydicom.uid.generate_uid()

    ae = AE(ae_title="SCU")
    ae.add_requested_context(ct.SOPClassUID, ct.file_meta.TransferSyntaxUID)
    ae.add_requested_context(us.SOPClassUID, us.file_meta.TransferSyntaxUID)
    ae.add_requested_context(pydicom.uid.SecondaryCaptureImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title="SONOSCORE")
    assert assoc.is_established
    # CT and Secondary Capture: refused at negotiation, abstract syntax not supported (result 3)
    refused = {str(cx.abstract_syntax): cx.result for cx in assoc.rejected_contexts}
    assert refused == {str(ct.SOPClassUID): 0x03, pydicom.uid.SecondaryCaptureImageStorage: 0x03}
    assert [str(cx.abstract_syntax) for cx in assoc.accepted_contexts] == [str(us.SOPClassUID)]
    with pytest.raises(ValueError):          # so the SCU cannot even send the CT
        assoc.send_c_store(ct)
    assert int(assoc.send_c_store(no_study).Status) == 0xA900
    assert int(assoc.send_c_store(no_pixels).Status) == 0xC000
    assert int(assoc.send_c_store(us).Status) == 0x0000
    assoc.release()

    # a calling AE title not in calling_aes: the association is rejected (permanent, user, calling AE not known)
    other = AE(ae_title="STRANGER")
    other.add_requested_context(us.SOPClassUID, us.file_meta.TransferSyntaxUID)
    rejected = other.associate("127.0.0.1", port, ae_title="SONOSCORE")
    assert rejected.is_rejected
    rsp = rejected.acceptor.primitive
    assert (rsp.result, rsp.result_source, rsp.diagnostic) == (0x01, 0x01, 0x03)

    assert echo(port) and lp.proc.poll() is None      # still serving
    spooled = list((tmp_path / "w" / "spool" / "studies").glob("*/*.dcm"))
    assert [p.stem for p in spooled] == [uid_key(str(us.SOPInstanceUID), 32)]    # only the good one is kept


def test_bad_configuration_is_one_sentence_per_error_and_exit_2(tmp_path, open_bundle):
    bad = tmp_path / "bad.yaml"
    bad.write_text("listen: {ae_title: A-TITLE-FAR-TOO-LONG, port: 99999, spool: s, colour: red}\n"
                   "results: {dir: r, uid_root: '1.02.3'}\n"
                   "outbox: {dir: o, retry: {first_s: 10, max_s: 5}}\n"
                   "destinations:\n"
                   "  - {name: pacs, type: cstore, host: localhost, called_ae: PACS}\n"
                   "  - {name: pacs, type: stow-rs, url: 'ftp://example'}\n"
                   "  - {name: other, type: dicomweb}\n")
    r = sonoscore("listen", "--config", bad, "--bundle", open_bundle, timeout=120)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert "Traceback" not in r.stderr
    assert all(line.startswith(f"sonoscore: {bad}: ") and line.count(";") <= 1 for line in lines), lines
    wants = ["'listen.ae_title'", "'listen.port' is 99999", "unknown key 'listen.colour'", "'results.uid_root'",
             "'outbox.retry.max_s' (5) is below", "'destinations[0].port' is missing", "used twice",
             "'destinations[1].url' is 'ftp://example'", "'destinations[2].type' is 'dicomweb'"]
    for want in wants:
        assert sum(want in line for line in lines) == 1, (want, lines)
    assert len(lines) == len(wants)
    assert not (tmp_path / "s").exists() and not (tmp_path / "o").exists()    # nothing made

    r = sonoscore("listen", "--config", tmp_path / "missing.yaml", "--bundle", open_bundle, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "does not exist" in r.stderr
    (tmp_path / "broken.yaml").write_text("listen: [unclosed\n")
    r = sonoscore("listen", "--config", tmp_path / "broken.yaml", "--bundle", open_bundle, timeout=120)
    assert r.returncode == 2 and "not valid YAML at line" in r.stderr and "Traceback" not in r.stderr
    # run --send checks the configuration before it touches anything
    r = sonoscore("run", "--bundle", open_bundle, "--source", data_file("US1_UNCR.dcm"), "--send", bad,
                  "--results", tmp_path / "r.jsonl", timeout=120)
    assert r.returncode == 2 and "destinations[0].port" in r.stderr
    assert not (tmp_path / "r.jsonl").exists()


def test_check_config_echoes_each_destination_and_names_each_folder_then_exits(tmp_path, orthanc):
    """`listen --check-config`: no bundle, no listening; a C-ECHO to each C-STORE destination (the right PACS, one
    whose AE title is wrong, a port where nothing listens), a QIDO-RS query to the DICOMweb one; a folder that
    cannot be made named by its key. Exit 0 only when all is ready."""
    port = free_port()
    good = [cstore_dest(orthanc)] + ([stow_dest(orthanc)] if orthanc.dicomweb_url else [])
    cfg = write_config(tmp_path / "w" / "listen.yaml", port=port, destinations=good)
    r = sonoscore("listen", "--config", cfg, "--check-config", timeout=120)
    assert r.returncode == 0, r.stderr
    assert "C-ECHO answered with success" in r.stdout and "every folder and destination is ready" in r.stdout
    assert ("the DICOMweb service answered" in r.stdout) == bool(orthanc.dicomweb_url)
    assert all((tmp_path / "w" / f).is_dir() for f in ("spool", "outbox", "results"))
    assert not echo(port)                                   # it did not listen

    nowhere = free_port()
    bad = good + [dict(cstore_dest(orthanc), name="wrong-ae", called_ae="NOTORTHANC"),
                  {"name": "down", "type": "cstore", "host": "127.0.0.1", "port": nowhere, "called_ae": "PACS"}]
    cfg = write_config(tmp_path / "w" / "listen.yaml", port=port, destinations=bad)
    r = sonoscore("listen", "--config", cfg, "--check-config", timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    problems = [line for line in r.stderr.splitlines() if line.startswith("sonoscore: destination")]
    assert len(problems) == 2, r.stderr
    (wrong,) = [p for p in problems if "wrong-ae" in p]
    assert "rejected the association" in wrong and "called_ae" in wrong
    (down,) = [p for p in problems if "down (C-STORE)" in p]
    assert f"127.0.0.1:{nowhere} refused the connection (is the PACS running" in down
    assert "2 problem(s) found" in r.stderr and r.stdout.count("C-ECHO answered with success") == 1

    # a spool that cannot be made (under /proc) is named by its key, whoever runs the check
    cfg = write_config(tmp_path / "x" / "listen.yaml", port=port, destinations=good,
                       spool="/proc/sonoscore-check/spool")
    r = sonoscore("listen", "--config", cfg, "--check-config", timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    (line,) = [line for line in r.stderr.splitlines() if "'listen.spool'" in line]
    assert "/proc/sonoscore-check/spool" in line and "cannot be made" in line


def test_run_send_delivers_the_results_of_a_file_given_by_hand(tmp_path, open_bundle, orthanc):
    cfg = write_config(tmp_path / "w" / "send.yaml", port=free_port(), destinations=[cstore_dest(orthanc)],
                       listen=False)                       # a send-only file: no listen section
    src = data_file("OBXXXX1A_rle_2frame.dcm")
    r = sonoscore("run", "--bundle", open_bundle, "--source", src, "--send", cfg, "--quiet",
                  "--study-summary", tmp_path / "s.json", timeout=600)
    assert r.returncode == 0, r.stderr
    ds = pydicom.dcmread(src)
    results = study_results(orthanc, str(ds.StudyInstanceUID))
    summary = json.loads((tmp_path / "s.json").read_text())
    (sr_ds,) = results["SR"]
    (group,) = hd.sr.srread(io.BytesIO(_bytes(sr_ds))).content.get_image_measurement_groups()
    assert group.get_qualitative_evaluations()[0].value.value == f"IFTA-{summary['final_grade']}"
    assert len(results["SEG"]) == 2 and len(results["SC"]) == 2
    assert not [s for s in SECRETS if s in r.stderr]

    # the PACS down: the run ends with exit 5 and one sentence; the results wait in the outbox for listen
    orthanc.stop()
    r = sonoscore("run", "--bundle", open_bundle, "--source", src, "--send", cfg, "--quiet", timeout=600)
    assert r.returncode == 5, r.stderr
    assert "wait in the outbox" in r.stderr
    waiting = [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
               for p in (tmp_path / "w" / "outbox" / "batches").glob("*/*.dcm")]
    assert len(waiting) == 5
    # the advice names a command that works with this send-only file: while the PACS is down it says so (exit 5),
    # once it is back it delivers the five results and empties the outbox (exit 0)
    (advice,) = [line for line in r.stderr.splitlines() if "--send:" in line and "wait in the outbox" in line]
    command = advice.split("`")[1].split()
    assert command[:2] == ["sonoscore", "listen"] and str(cfg) in command, advice
    r = sonoscore(*command[1:], timeout=300)
    assert r.returncode == 5 and "5 of 5 DICOM result(s)" in r.stderr and "Traceback" not in r.stderr, r.stderr
    orthanc.start()
    r = sonoscore(*command[1:], timeout=300)
    assert r.returncode == 0, r.stderr
    assert not list((tmp_path / "w" / "outbox" / "batches").iterdir())
    got = orthanc.received()
    assert [got[(uid, "DicomProtocol")] for uid in waiting] == [1] * 5


def test_deidentify_keeps_planted_identifiers_out_of_every_output(tmp_path, open_bundle, orthanc, listens):
    port = free_port()
    work = tmp_path / "w"
    cfg = write_config(work / "listen.yaml", port=port, destinations=[cstore_dest(orthanc)])
    lp = Listen(cfg, open_bundle, port, "--deidentify").start()
    listens.append(lp)
    planted = {"PatientName": "Zyxwvut^Quirinus", "PatientID": "PID-8841-ZQ", "AccessionNumber": "ACC77123",
               "InstitutionName": "Saint Nowhere Clinic", "ReferringPhysicianName": "Dr^Qwertzuiop",
               "PatientBirthDate": "19231107"}
    ds = read("US1_UNCR.dcm")
    for key, value in planted.items():
        setattr(ds, key, value)
    ds.StudyInstanceUID, ds.SOPInstanceUID = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    assert send(port, [ds])[0] == [0]
    lp.wait_for("delivered to every destination")
    secrets = [v.encode() for v in planted.values()] + [str(ds.StudyInstanceUID).encode(),
                                                         str(ds.SOPInstanceUID).encode()]
    leaks = [(p, s) for p in work.rglob("*") if p.is_file() for s in secrets if s in p.read_bytes()]
    assert leaks == []
    # folder names and log hashes are keyed (HMAC under the installation's salt): hashing the study's or the
    # instance's UID, which the scanner and the PACS know, finds neither a folder nor a log line
    bare = [hashlib.sha256(str(uid).encode()).hexdigest()[:12] for uid in (ds.StudyInstanceUID, ds.SOPInstanceUID)]
    names = " ".join(str(p.relative_to(work)) for p in work.rglob("*"))
    assert uid_key(str(ds.StudyInstanceUID)) in names and uid_key(str(ds.StudyInstanceUID)) in lp.text()
    assert [h for h in bare if h in names or h in lp.text()] == []
    made = [orthanc.file(i["ID"]) for i in orthanc.get("/instances?expand")]
    kinds = sorted(str(pydicom.dcmread(io.BytesIO(b)).Modality) for b in made)
    assert kinds == ["SEG", "SR"]                      # no Secondary Capture when de-identified
    assert not [s for b in made for s in secrets if s in b]
    sr = hd.sr.srread(io.BytesIO(next(b for b in made if pydicom.dcmread(io.BytesIO(b)).Modality == "SR")))
    assert sr.PatientIdentityRemoved == "YES"
