"""Issue 31: `sonoscore batch` (runtime/batch/): an archive of DICOM studies through the `run` graph into a Parquet
dataset, on local worker processes or a Ray Data actor pool, exactly once and resumable.

Real parts only: real worker processes and a real SIGKILL, a real two-node Ray cluster (ray.cluster_utils.Cluster)
on this machine, DICOM files written by pydicom from the simulated probe. Figures are compared between engines and
runs, never with constants (the tiny bundle's grades are meaningless; its gate is opened with min_mask_fraction 0
so that every frame goes through the whole graph and is scored).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pydicom")
pa = pytest.importorskip("pyarrow")

from runtime.batch import Options, run_batch  # noqa: E402
from runtime.batch.archive import _uid, write_archive, write_us  # noqa: E402
from runtime.batch.store import read  # noqa: E402
from tests.conftest import ROOT  # noqa: E402

PHI_MARKERS = ("SYNTHETIC", "PATIENT", "SIMID", "DOE^JANE", "MRN 4711")


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    folder = tmp_path_factory.mktemp("archive")
    write_archive(folder, studies=5, files_per_study=2, frames_per_file=2, seed=1, size=(160, 208))
    return folder


def opts(tiny_bundle, source, out, **kw) -> Options:
    return Options(bundle=str(tiny_bundle), source=str(source), out=str(out), threads=1, min_mask_fraction=0.0,
                   progress=False, **kw)


def comparable(table) -> "pa.Table":
    """A table without what differs between runs by nature (timings, capture clock)."""
    drop = [c for c in ("seconds", "latency_ms", "t_capture") if c in table.column_names]
    return table.drop(drop)


def frames_sorted(out):
    return comparable(read(out, "frames")).sort_by([("study_key", "ascending"), ("frame", "ascending")])


def studies_sorted(out):
    return comparable(read(out, "studies")).sort_by("study_key")


# -- local vs Ray ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster
    node = {"num_cpus": 2, "object_store_memory": 80 * 1024 ** 2}
    cluster = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False})
    cluster.add_node(**node)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def test_local_and_ray_on_two_nodes_give_identical_tables(tiny_bundle, archive, tmp_path, ray_cluster):
    import ray
    assert len([n for n in ray.nodes() if n["Alive"]]) == 2
    local = run_batch(opts(tiny_bundle, archive, tmp_path / "local", workers=2))
    remote = run_batch(opts(tiny_bundle, archive, tmp_path / "ray", workers=2, engine="ray",
                            address=ray_cluster.address))
    assert local.written == remote.written == local.total == 5
    a, b = studies_sorted(tmp_path / "local"), studies_sorted(tmp_path / "ray")
    assert a.num_rows == 5 and a.equals(b), (a.to_pylist(), b.to_pylist())
    fa, fb = frames_sorted(tmp_path / "local"), frames_sorted(tmp_path / "ray")
    assert fa.num_rows == 5 * 2 * 2 and fa.equals(fb)
    assert all(g is not None for g in fa.column("grade").to_pylist())       # the whole graph ran on every frame
    assert a.column("precision").to_pylist() == ["fp32"] * 5
    assert read(tmp_path / "ray", "frames").schema.equals(read(tmp_path / "local", "frames").schema)


# -- exactly once ------------------------------------------------------------------------------------------------

def batch_cmd(bundle, source, out, *extra):
    return [sys.executable, "-m", "runtime.cli", "batch", "--bundle", str(bundle), "--source", str(source),
            "--out", str(out), "--threads", "1", *map(str, extra)]


def children(pid: int) -> list[int]:
    """The worker processes of a local batch driver (spawned: multiprocessing.spawn in their command line)."""
    out = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            stat = (p / "stat").read_text()
            cmd = (p / "cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == pid and b"spawn_main" in cmd:
            out.append(int(p.name))
    return out


def wait_for(check, timeout=120.0, what="the condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if check():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def written(out) -> int:
    folder = Path(out) / "studies"
    return len([p for p in folder.glob("*.parquet") if not p.name.startswith(".")]) if folder.exists() else 0


def exactly_once(out, studies: int, frames_per_study: int, partial: bool = False) -> None:
    """Each study once in studies/, with all its frames once in frames/ (`partial`: a killed job may also have left
    a frames file whose studies file it did not get to write; the rerun replaces it)."""
    s = read(out, "studies")
    keys = s.column("study_key").to_pylist()
    assert len(keys) == len(set(keys)) == studies
    f = read(out, "frames")
    counts = {}
    for k, n in zip(f.column("study_key").to_pylist(), f.column("frame").to_pylist()):
        counts.setdefault(k, []).append(n)
    assert set(counts) >= set(keys) if partial else set(counts) == set(keys)
    assert all(sorted(counts[k]) == list(range(frames_per_study)) for k in keys), counts


@pytest.fixture(scope="module")
def long_archive(tmp_path_factory):
    folder = tmp_path_factory.mktemp("long")
    write_archive(folder, studies=12, files_per_study=2, frames_per_file=3, seed=2, size=(160, 208))
    return folder


def test_sigkill_of_the_driver_then_a_rerun_writes_every_study_exactly_once(tiny_bundle, long_archive, tmp_path):
    out = tmp_path / "out"
    p = subprocess.Popen(batch_cmd(tiny_bundle, long_archive, out, "--workers", "2"), cwd=ROOT,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: written(out) >= 3 or p.poll() is not None, what="three studies written")
        workers = children(p.pid)
        p.send_signal(signal.SIGKILL)
        p.wait(30)
    finally:
        if p.poll() is None:
            p.kill()
    before = written(out)
    assert 3 <= before < 12, "the job ended before it could be killed mid-way; give it more work"
    wait_for(lambda: not any(Path(f"/proc/{w}").exists() and b"spawn_main" in Path(f"/proc/{w}/cmdline").read_bytes()
                             for w in workers), 30, "the orphaned workers to end")
    exactly_once(out, before, 6, partial=True)    # what the killed job wrote is whole
    r = subprocess.run(batch_cmd(tiny_bundle, long_archive, out, "--workers", "2"), cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"{before} already there" in r.stdout
    exactly_once(out, 12, 6)
    again = subprocess.run(batch_cmd(tiny_bundle, long_archive, out), cwd=ROOT, capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0 and "0 studies written" in again.stdout and "12 already there" in again.stdout
    exactly_once(out, 12, 6)


def test_a_killed_worker_is_replaced_and_the_job_completes_with_every_study(tiny_bundle, long_archive, tmp_path):
    out = tmp_path / "out"
    p = subprocess.Popen(batch_cmd(tiny_bundle, long_archive, out, "--workers", "2"), cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: written(out) >= 1 or p.poll() is not None, what="a study written")
        victims = children(p.pid)
        assert victims, "no worker process found"
        os.kill(victims[0], signal.SIGKILL)
        stdout, stderr = p.communicate(timeout=300)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, stderr
    assert "worker process died" in stderr and "Traceback" not in stderr
    exactly_once(out, 12, 6)


# -- bad files ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bad_archive(tmp_path_factory):
    """A 40-file study (37 good single-frame files, a truncated file, a CT image, a burned-in text-only frame without
    ultrasound regions), two good studies, a study whose only file is CT, and a file that is not DICOM at all."""
    from runtime.phantom import KidneyPhantom
    folder = tmp_path_factory.mktemp("bad")
    write_archive(folder, studies=2, files_per_study=1, frames_per_file=2, seed=3, size=(160, 208))
    ph = KidneyPhantom(seed=11, height=160, width=208)
    study, series = _uid(9, 0), _uid(9, 0, 1)
    phi = {"PatientName": "DOE^JANE", "PatientID": "MRN 4711", "PatientBirthDate": "19610412"}
    big = folder / "big"
    for k in range(37):
        region = ph.frame(k).region
        write_us(big / f"img-{k:03d}.dcm", ph.frame(k).image[None], study_uid=study, series_uid=series,
                 sop_uid=_uid(9, 0, 1, k), instance_number=k + 1, phi=phi,
                 region=(region.x0, region.y0, region.x1 - 1, region.y1 - 1))
    truncated = write_us(big / "img-037.dcm", ph.frame(37).image[None], study_uid=study, series_uid=series,
                         sop_uid=_uid(9, 0, 1, 37), instance_number=38, phi=phi)
    data = truncated.read_bytes()
    truncated.write_bytes(data[: len(data) - 20000])
    write_us(big / "img-038.dcm", np.full((1, 64, 64), 90, np.uint8), study_uid=study, series_uid=series,
             sop_uid=_uid(9, 0, 1, 38), instance_number=39, modality="CT", phi=phi)
    import cv2
    text = np.zeros((160, 208), np.uint8)
    for i in range(6):
        cv2.putText(text, "DOE^JANE 1961-04-12", (4, 22 + 26 * i), cv2.FONT_HERSHEY_SIMPLEX, 0.6, 255, 2)
    write_us(big / "img-039.dcm", text[None], study_uid=study, series_uid=series, sop_uid=_uid(9, 0, 1, 39),
             instance_number=40, burned_in="YES", phi=phi)
    write_us(folder / "ct-only" / "ct.dcm", np.full((1, 64, 64), 90, np.uint8), study_uid=_uid(9, 1),
             series_uid=_uid(9, 1, 1), sop_uid=_uid(9, 1, 1, 1), modality="CT", phi=phi)
    (folder / "junk").mkdir()
    (folder / "junk" / "notes.dcm").write_bytes(b"DOE^JANE " * 100)
    return folder


def test_bad_files_are_errors_of_their_study_and_the_job_goes_on(tiny_bundle, bad_archive, tmp_path):
    out = tmp_path / "out"
    r = subprocess.run(batch_cmd(tiny_bundle, bad_archive, out, "--workers", "2"), cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 3, r.stderr                          # some studies carry an error
    assert "Traceback" not in r.stderr + r.stdout
    studies = {row["instances"]: row for row in read(out, "studies").to_pylist() if row["kind"] == "dicom"}
    rows = read(out, "studies").to_pylist()
    assert len(rows) == 5                                     # 2 good, the 40-file study, CT-only, the junk file
    big = studies[40]
    assert big["error"] is None and big["frames"] == 40
    assert big["accepted"] + big["rejected"] == 37 and big["frame_errors"] == 3
    assert len(big["file_errors"]) == 3, big["file_errors"]
    assert any("could not be opened" in e or "could not be decoded" in e for e in big["file_errors"])
    assert any("not ultrasound" in e for e in big["file_errors"])
    assert any("scan sector" in e for e in big["file_errors"])
    failed = [row for row in rows if row["error"]]
    assert len(failed) == 2
    assert any("not ultrasound" in row["error"] for row in failed)
    assert any(row["kind"] == "unreadable" and "not a DICOM file" in row["error"] for row in failed)
    good = [row for row in rows if row["instances"] == 1 and row["error"] is None]
    assert len(good) == 2 and all(row["frames"] == 2 for row in good)
    # no identifier anywhere: the tables' values, the settings file, the terminal
    text = str(read(out, "studies").to_pylist()) + str(read(out, "frames").to_pylist())
    text += (out / "batch.json").read_text() + r.stdout + r.stderr
    text += " ".join(p.name for p in out.rglob("*"))
    for marker in (*PHI_MARKERS, "19610412", "1961-04-12", "img-0", "notes"):
        assert marker not in text, marker


def test_the_output_reads_in_pyarrow_and_duckdb(tiny_bundle, archive, tmp_path):
    out = tmp_path / "out"
    run_batch(opts(tiny_bundle, archive, out, workers=1))
    import pyarrow.dataset as ds
    assert ds.dataset(str(out / "frames"), format="parquet").count_rows() == 20
    assert ds.dataset(str(out / "studies"), format="parquet").to_table().num_rows == 5
    duckdb = pytest.importorskip("duckdb")
    n = duckdb.sql(f"select count(*) from read_parquet('{out}/frames/*.parquet')").fetchone()[0]
    assert n == 20


def test_deidentify_replaces_every_uid_with_the_same_keyed_value_in_every_run(tiny_bundle, archive, tmp_path):
    import pydicom
    from runtime.deid import Deidentifier
    key = "a test key"
    os.environ["SONOSCORE_DEID_KEY"] = key   # not read by run_batch; the key is given as deid_key below
    try:
        for n in (1, 2):
            run_batch(opts(tiny_bundle, archive, tmp_path / f"o{n}", workers=1, deidentify=True, deid_key=key))
    finally:
        del os.environ["SONOSCORE_DEID_KEY"]
    a, b = frames_sorted(tmp_path / "o1"), frames_sorted(tmp_path / "o2")
    assert a.select(["study_uid", "series_uid", "sop_instance_uid"]).equals(
        b.select(["study_uid", "series_uid", "sop_instance_uid"]))
    original = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in archive.rglob("*.dcm")}
    sops = set(a.column("sop_instance_uid").to_pylist())
    assert not sops & original and len(sops) == len(original)
    assert sops == {Deidentifier(key).uid(u) for u in original}         # the UIDs `sonoscore deid --key` writes
    assert set(a.column("source_file").to_pylist()) == {None}
    with pytest.raises(Exception, match="other settings"):
        run_batch(opts(tiny_bundle, archive, tmp_path / "o1", workers=1))   # a plain run into a de-identified folder
