"""Faults around `sonoscore run`'s outputs, with real processes and real signals (issue 12, items 2-4): a stop
signal finishes every output, SIGKILL leaves every completed record parseable, a run that fails to start touches
no output, output paths that cannot work are refused before anything starts, and a full disk is one sentence per
output and exit code 5."""
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import pytest

from tests.conftest import ROOT, sonoscore

EXIT_OUTPUT = 5
LIVE = "sim://kidney?fps=30&frames=100000"


def start(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "runtime.cli", *map(str, args)], cwd=ROOT, text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def lines_written(folder: Path, name: str = "r") -> int:
    """Complete lines in the results, wherever the run keeps them (the partial file or the path itself)."""
    n = 0
    for p in [*folder.glob(f"{name}.partial-*.jsonl"), folder / f"{name}.jsonl"]:
        with contextlib.suppress(OSError):
            n = max(n, p.read_bytes().count(b"\n"))
    return n


def wait_for_records(proc: subprocess.Popen, folder: Path, n: int = 10, timeout: float = 120) -> None:
    t_end = time.monotonic() + timeout
    while lines_written(folder) < n:
        if proc.poll() is not None:
            pytest.fail(f"the run ended early ({proc.returncode}): {proc.stderr.read()}")
        if time.monotonic() > t_end:
            proc.kill()
            pytest.fail("the run wrote no records in time")
        time.sleep(0.1)


def records(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def video_frames(path: Path) -> int:
    cap = cv2.VideoCapture(str(path))
    try:
        assert cap.isOpened(), f"{path} does not open"
        n = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
        decoded = 0
        while cap.read()[0]:
            decoded += 1
        assert decoded == n
        return n
    finally:
        cap.release()


def one_sentence_errors(stderr: str) -> list[str]:
    assert "Traceback" not in stderr, stderr
    return [x for x in stderr.splitlines() if x.startswith("sonoscore:")]


def all_outputs(folder: Path) -> list:
    return ["--results", folder / "r.jsonl", "--video", folder / "o.mp4", "--study-summary", folder / "s.json",
            "--study-report", folder / "r.html", "--save-masks", folder / "m"]


# -- stop signals --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT], ids=lambda s: s.name)
def test_a_stop_signal_finishes_every_output(tiny_bundle, tmp_path, sig):
    proc = start("run", "--bundle", tiny_bundle, "--source", LIVE, "--quiet", *all_outputs(tmp_path))
    try:
        wait_for_records(proc, tmp_path)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + sig, err
    assert "Traceback" not in err and f"stopped by {sig.name}" in err
    recs = records(tmp_path / "r.jsonl")
    assert len(recs) >= 10 and [r["frame"] for r in recs] == list(range(len(recs)))
    assert video_frames(tmp_path / "o.mp4") == len(recs)           # one picture per record, index written
    assert json.loads((tmp_path / "s.json").read_text())["frames"] == len(recs)
    assert "</html>" in (tmp_path / "r.html").read_text()
    assert not list(tmp_path.glob("*partial*")) and not list(tmp_path.glob("*.tmp"))


def test_sigkill_leaves_every_completed_record_parseable_the_video_readable_and_the_previous_results_in_place(tiny_bundle, tmp_path):
    previous = b'{"frame": 0, "previous": true}\n'
    (tmp_path / "r.jsonl").write_bytes(previous)
    proc = start("run", "--bundle", tiny_bundle, "--source", LIVE, "--quiet", "--results", tmp_path / "r.jsonl",
                 "--video", tmp_path / "o.mp4")
    try:
        t_end = time.monotonic() + 120
        while not any(p.read_bytes().count(b"\n") >= 75 for p in tmp_path.glob("r.partial-*.jsonl")):
            assert proc.poll() is None and time.monotonic() < t_end, "no partial results were written"
            time.sleep(0.1)
        proc.kill()
        proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert (tmp_path / "r.jsonl").read_bytes() == previous
    [partial] = tmp_path.glob("r.partial-*.jsonl")
    data = partial.read_bytes()
    complete = data[:data.rfind(b"\n") + 1].decode().splitlines()
    assert len(complete) >= 75
    assert [json.loads(x)["frame"] for x in complete] == list(range(len(complete)))
    # The video is a fragmented MP4 (a key frame and a fragment each second at 30 fps): the killed run's partial
    # file reads up to its last whole fragment, and the file at --video was never created.
    [video] = tmp_path.glob("o.partial-*.mp4")
    cap = cv2.VideoCapture(str(video))
    decoded = 0
    while cap.read()[0]:
        decoded += 1
    cap.release()
    assert decoded >= 30
    assert not (tmp_path / "o.mp4").exists()


def kill_mid_run(tiny_bundle, folder: Path, n: int = 40) -> subprocess.Popen:
    """A real `run` with --results and --video, SIGKILLed once it has written `n` records."""
    proc = start("run", "--bundle", tiny_bundle, "--source", LIVE, "--quiet", "--results", folder / "r.jsonl",
                 "--video", folder / "o.mp4")
    try:
        wait_for_records(proc, folder, n)
        time.sleep(1.2)                                   # a whole second of video: one fragment at least
    finally:
        proc.kill()
        proc.communicate(timeout=60)
    return proc


def test_a_killed_runs_results_survive_the_next_run_to_the_same_path(tiny_bundle, tmp_path):
    """Issue 27 item 4: a container restart gives the next run the same process id (PID 1); it must never reopen
    the killed run's partial file. Partial names are new each run, and at start the earlier partial results beside
    --results and --video are kept as `r.recovered-*.jsonl` / `o.recovered-*.mp4`, one line saying so."""
    kill_mid_run(tiny_bundle, tmp_path)
    [partial] = tmp_path.glob("r.partial-*.jsonl")
    killed = partial.read_bytes()
    killed = killed[:killed.rfind(b"\n") + 1]
    assert killed.count(b"\n") >= 40
    [vpartial] = tmp_path.glob("o.partial-*.mp4")
    r = sonoscore("run", "--bundle", tiny_bundle, "--source", "sim://kidney?fps=0&frames=5", "--quiet",
                  "--results", tmp_path / "r.jsonl", "--video", tmp_path / "o.mp4", timeout=300)
    assert r.returncode == 0, r.stderr
    [recovered] = tmp_path.glob("r.recovered-*.jsonl")
    assert recovered.read_bytes()[:len(killed)] == killed                     # every record of the killed run
    [vrecovered] = tmp_path.glob("o.recovered-*.mp4")
    assert video_frames_decoded(vrecovered) >= 30
    assert len(records(tmp_path / "r.jsonl")) == 5 and video_frames(tmp_path / "o.mp4") == 5
    assert not list(tmp_path.glob("*partial*"))
    said = one_sentence_errors(r.stderr)
    assert len(said) == 2, said
    assert any(f"results {tmp_path / 'r.jsonl'}" in x and recovered.name in x for x in said)
    assert any(f"video {tmp_path / 'o.mp4'}" in x and vrecovered.name in x for x in said)
    # a third run leaves the recovered files alone and says nothing
    r = sonoscore("run", "--bundle", tiny_bundle, "--source", "sim://kidney?fps=0&frames=2", "--quiet",
                  "--results", tmp_path / "r.jsonl", timeout=300)
    assert r.returncode == 0 and not one_sentence_errors(r.stderr)
    assert list(tmp_path.glob("r.recovered-*.jsonl")) == [recovered]


def test_a_partial_file_still_being_written_is_not_taken(tiny_bundle, tmp_path):
    """Two runs to the same --results at once: the second does not rename the first's partial file (it holds a
    lock on it), and the first still finishes into place."""
    proc = start("run", "--bundle", tiny_bundle, "--source", "sim://kidney?fps=30&frames=150", "--quiet",
                 "--results", tmp_path / "r.jsonl")
    try:
        wait_for_records(proc, tmp_path, 5)
        r = sonoscore("run", "--bundle", tiny_bundle, "--source", "sim://kidney?fps=0&frames=2", "--quiet",
                      "--results", tmp_path / "r.jsonl", timeout=300)
        assert r.returncode == 0 and not one_sentence_errors(r.stderr), r.stderr
        assert not list(tmp_path.glob("r.recovered-*"))
        _, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert len(records(tmp_path / "r.jsonl")) == 150


def video_frames_decoded(path: Path) -> int:
    cap = cv2.VideoCapture(str(path))
    n = 0
    while cap.read()[0]:
        n += 1
    cap.release()
    return n


@pytest.mark.parametrize("name", ["v.avi", "v.mkv", "v", "v.MP4.txt"])
def test_a_video_name_the_writer_cannot_write_is_refused_at_start(tiny_bundle, tmp_path, name):
    """Issue 27 item 15: `--video v.avi` was refused only after the whole run (exit 5)."""
    (tmp_path / "r.jsonl").write_bytes(b"previous\n")
    t0 = time.monotonic()
    r = sonoscore("run", "--bundle", tiny_bundle, "--source", "sim://kidney?fps=0&frames=3000",
                  "--results", tmp_path / "r.jsonl", "--video", tmp_path / name, timeout=300)
    assert r.returncode == 2 and time.monotonic() - t0 < 60
    said = one_sentence_errors(r.stderr)
    assert len(said) == 1 and f"--video {tmp_path / name}" in said[0] and ".mp4" in said[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.jsonl"]
    assert (tmp_path / "r.jsonl").read_bytes() == b"previous\n"
    os.symlink(tmp_path / "elsewhere.avi", tmp_path / "link.mp4")    # a link to a name it cannot write: the same
    r = sonoscore("run", "--bundle", tiny_bundle, "--source", "sim://kidney?fps=0&frames=2",
                  "--video", tmp_path / "link.mp4", timeout=120)
    assert r.returncode == 2 and "--video" in r.stderr and not (tmp_path / "elsewhere.avi").exists()


# -- a run that fails to start -------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [["--precision", "int8"], ["--backend", "trt"]], ids=["precision", "backend"])
def test_a_failed_restart_leaves_the_previous_outputs_byte_identical(tiny_bundle, tmp_path, bad):
    if bad[0] == "--backend":
        import importlib.util
        if importlib.util.find_spec("tensorrt") is not None:
            pytest.skip("TensorRT is installed here: --backend trt may start")
    r = sonoscore("run", "--bundle", tiny_bundle, "--source", "sim://kidney?fps=0&frames=6", *all_outputs(tmp_path))
    assert r.returncode == 0, r.stderr
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert len(before) >= 5
    r = sonoscore("run", "--bundle", tiny_bundle, "--source", "sim://kidney?fps=0&frames=6", *bad,
                  *all_outputs(tmp_path))
    assert r.returncode == 2 and len(one_sentence_errors(r.stderr)) == 1, r.stderr
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


# -- output paths that cannot work ---------------------------------------------------------------------------------
def _refused(tiny_bundle, folder: Path, *outputs, phrase: str) -> None:
    """The run exits 2 with one sentence containing `phrase`, and every file under `folder` is as it was."""
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    r = sonoscore("run", "--bundle", tiny_bundle, "--source", "sim://kidney?fps=0&frames=6", *outputs)
    assert r.returncode == 2, r.stderr
    [msg] = one_sentence_errors(r.stderr)
    assert phrase in msg, msg
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before
    assert sorted(folder.rglob("*")) == sorted([*before, *(p for p in folder.rglob("*") if p.is_dir())])


def test_the_same_path_for_results_and_video_is_refused_and_nothing_is_written(tiny_bundle, tmp_path):
    _refused(tiny_bundle, tmp_path, "--results", tmp_path / "x", "--video", tmp_path / "x", phrase="same path")
    assert list(tmp_path.iterdir()) == []


def test_a_folder_given_as_a_file_is_refused_before_the_results_are_touched(tiny_bundle, tmp_path):
    (tmp_path / "r.jsonl").write_text('{"previous": true}\n')
    (tmp_path / "taken.mp4").mkdir()
    _refused(tiny_bundle, tmp_path, "--results", tmp_path / "r.jsonl", "--video", tmp_path / "taken.mp4",
             phrase="is a folder")
    _refused(tiny_bundle, tmp_path, "--results", tmp_path / "r.jsonl", "--study-summary", tmp_path / "taken.mp4",
             phrase="is a folder")


@contextlib.contextmanager
def tmpfs(path: Path, options: str):
    """A tmpfs mounted at `path` (root only), unmounted afterwards; the test skips where mounting is refused."""
    if shutil.which("mount") is None:
        pytest.skip("no mount command here")
    path.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or r.returncode}; needs root)")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], capture_output=True)


def test_a_read_only_folder_is_refused_before_the_results_are_touched(tiny_bundle, tmp_path):
    (tmp_path / "r.jsonl").write_text('{"previous": true}\n')
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        if not os.access(ro, os.W_OK):
            _refused(tiny_bundle, tmp_path, "--results", tmp_path / "r.jsonl", "--video", ro / "o.mp4",
                     phrase="not writable")
            return
        ro.chmod(0o755)
        ro.rmdir()                  # root writes anyway: a read-only mount is read-only for root too
        with tmpfs(ro, "ro,size=64k"):
            _refused(tiny_bundle, tmp_path, "--results", tmp_path / "r.jsonl", "--video", ro / "o.mp4",
                     phrase="read-only")
            _refused(tiny_bundle, tmp_path, "--results", ro / "sub" / "r.jsonl", phrase="read-only")
    finally:
        with contextlib.suppress(OSError):
            ro.chmod(0o755)


# -- a full disk ---------------------------------------------------------------------------------------------------
def test_a_full_disk_is_one_sentence_per_output_and_exit_5(tiny_bundle, tmp_path):
    with tmpfs(tmp_path / "full", "size=160k") as full:
        r = sonoscore("run", "--bundle", tiny_bundle, "--source", "sim://kidney?fps=0&frames=400", "--quiet",
                      *all_outputs(full))
        assert r.returncode == EXIT_OUTPUT, r.stderr
        said = one_sentence_errors(r.stderr)
        assert said and all("No space left on device" in x for x in said), said
        assert any(x.startswith(f"sonoscore: results {full / 'r.jsonl'} could not be written after") for x in said)
        assert any(x.startswith(f"sonoscore: video {full / 'o.mp4'} could not be written") for x in said)
        assert len(said) == len({x.split()[1] for x in said})         # one sentence per output
        recs = records(full / "r.jsonl")                               # whole lines only, in order
        assert 0 < len(recs) < 400 and [x["frame"] for x in recs] == list(range(len(recs)))
        assert f"after {len(recs)} records" in "".join(said)
        assert not (full / "o.mp4").exists()                           # no unreadable video left behind
        assert not list(full.glob("*partial*"))
        assert "400 frames" in r.stderr                                # the run went on for the others
