"""`sonoscore run --display` for real: an OpenCV window on a virtual X screen (Xvfb, with the openbox window
manager, as on the device's desktop), proven by screenshots of the whole screen (`xwd -root`), pixel for pixel.

What must be on the machine (each test skips, saying which is missing, where it is not):
- Debian's xvfb, openbox, x11-apps (xwd), xdotool (to press keys in the window) and wmctrl (to close it as a
  user does); `.ci/run` installs them.
- An OpenCV with a GUI. The project pins opencv-python-headless (no GUI: `--display` then refuses in one sentence,
  tests/test_viewer.py), so the window runs in a subprocess that puts a GUI build of the same OpenCV version first
  on its path: the venv's own cv2 when it has a GUI, else `$SONOSCORE_GUI_OPENCV`, else `build/opencv-gui`, where
  `.ci/run` puts one (`pip install --no-deps --target build/opencv-gui opencv-python==<the pinned version>`).
Everything else is the real code: runtime.sinks.display.DisplayWindow, runtime.sinks.overlay.render_overlay, the
real CLI.
"""
from __future__ import annotations

import os
import select
import shutil
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from runtime.sinks.display import _x_server_problem
from runtime.sinks.overlay import BANNER_BG, CONTOUR, GRADE_COLOURS, PANEL_BG

ROOT = Path(__file__).resolve().parents[1]
SCREEN = (1200, 1600)  # rows, columns of the virtual screen: the overlay of a 480-row frame fits at 1:1


# -- the X server and its screenshots ----------------------------------------------------------------------------

def read_xwd(data: bytes) -> np.ndarray:
    """An XWD file (X Window Dump, as `xwd` writes it) of a TrueColor screen -> BGR uint8 HxWx3.

    The header is 25 big-endian CARD32 fields, then the window name, then `ncolors` 12-byte colour entries, then
    the rows (`bytes_per_line` apart) of `bits_per_pixel` pixels in `byte_order`, decoded with the colour masks.
    """
    (header_size, _version, pixmap_format, _depth, width, height, _xoff, byte_order, _unit, _bit_order, _pad,
     bits_per_pixel, bytes_per_line, visual_class, red_mask, green_mask, blue_mask, *_rest) = struct.unpack(
        ">25I", data[:100])
    ncolors = _rest[2]
    assert pixmap_format == 2 and visual_class in (4, 5), "not a ZPixmap of a TrueColor/DirectColor screen"
    assert bits_per_pixel in (24, 32), f"{bits_per_pixel} bits per pixel"
    nbytes = bits_per_pixel // 8
    offset = header_size + 12 * ncolors
    rows = np.frombuffer(data, np.uint8, count=bytes_per_line * height, offset=offset).reshape(height, bytes_per_line)
    px = rows[:, :width * nbytes].reshape(height, width, nbytes).astype(np.uint32)
    weights = (256 ** np.arange(nbytes)) if byte_order == 0 else (256 ** np.arange(nbytes)[::-1])
    value = (px * weights.astype(np.uint32)).sum(axis=2, dtype=np.uint32)

    def channel(mask: int) -> np.ndarray:
        shift = (mask & -mask).bit_length() - 1
        return ((value & mask) >> shift).astype(np.uint8)
    return np.dstack([channel(blue_mask), channel(green_mask), channel(red_mask)])


class XServer:
    def __init__(self, proc: subprocess.Popen, number: int):
        self.proc, self.number = proc, number
        self.display = f":{number}"

    def screenshot(self) -> np.ndarray:
        """The whole screen, BGR. xwd looks at each window by itself, so a window that goes away during the dump
        makes it fail (BadMatch, BadWindow): then it is taken again."""
        for attempt in range(10):
            r = subprocess.run(["xwd", "-root", "-screen", "-silent", "-display", self.display], capture_output=True,
                               timeout=30)
            if r.returncode == 0 or not (b"BadMatch" in r.stderr or b"BadWindow" in r.stderr):
                break
            time.sleep(0.1)
        assert r.returncode == 0, r.stderr.decode(errors="replace")
        return read_xwd(r.stdout)


@pytest.fixture
def xserver(tmp_path):
    for tool, package in (("Xvfb", "xvfb"), ("xwd", "x11-apps")):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (apt-get install {package}); .ci/run installs it")
    read_fd, write_fd = os.pipe()
    # Its log goes to a file (a pipe that nobody reads would block the server once full).
    log = open(tmp_path / "xvfb.log", "wb")
    # -displayfd: Xvfb picks a free display number itself and writes it to the pipe once it accepts clients.
    proc = subprocess.Popen(["Xvfb", "-displayfd", str(write_fd), "-screen", "0", f"{SCREEN[1]}x{SCREEN[0]}x24", "-br",
                             "-nolisten", "tcp", "-noreset"], pass_fds=(write_fd,),
                            stdout=subprocess.DEVNULL, stderr=log)
    os.close(write_fd)
    log.close()
    try:
        ready, _, _ = select.select([read_fd], [], [], 30)
        number = os.read(read_fd, 64).decode().strip() if ready else ""
        if not number.isdigit():
            proc.kill()
            proc.wait(timeout=10)
            pytest.fail(f"Xvfb did not start: {(tmp_path / 'xvfb.log').read_text(errors='replace')[-500:]}")
        yield XServer(proc, int(number))
    finally:
        os.close(read_fd)
        _stop(proc)


def _stop(proc: subprocess.Popen) -> None:
    """Terminate a helper process (X server, window manager), killing it when it does not go within 10 s."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def desktop(xserver, tmp_path):
    """The X server with a window manager (openbox), as on the device's desktop. Without one, Qt (the GUI of the
    opencv-python wheel) now and then misses its window's MapNotify when the machine is busy, and then never
    paints the window: seen here in 9 of 30 tries under load, 0 of 30 with openbox."""
    if shutil.which("xdotool") is None:
        pytest.skip("xdotool is not installed (apt-get install xdotool); .ci/run installs it")
    if shutil.which("openbox") is None:
        pytest.skip("openbox is not installed (apt-get install openbox): a window manager is needed for a reliable "
                    "window under Xvfb; .ci/run installs it")
    ready = tmp_path / "openbox.ready"
    env = {**os.environ, "DISPLAY": xserver.display}
    wm = subprocess.Popen(["openbox", "--startup", f"touch {ready}"], env=env, stdout=subprocess.DEVNULL,
                          stderr=open(tmp_path / "openbox.log", "wb"))
    try:
        deadline = time.monotonic() + 30
        while not ready.exists() and wm.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        if not ready.exists():
            pytest.fail(f"openbox did not start: {(tmp_path / 'openbox.log').read_text(errors='replace')[-500:]}")
        yield xserver
    finally:
        _stop(wm)

def _cv2_of(extra_path: str | None) -> tuple[str, str] | None:
    """(version, GUI backend) of the cv2 a subprocess imports with `extra_path` first on its path."""
    code = ("import re, cv2; m = re.search(r'^\\s*GUI:\\s*(\\S+)', cv2.getBuildInformation(), re.M); "
            "print(cv2.__version__, m.group(1) if m else '')")
    env = dict(os.environ)
    if extra_path:
        env["PYTHONPATH"] = os.pathsep.join([extra_path, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    if r.returncode != 0 or len(r.stdout.split()) != 2:
        return None
    version, gui = r.stdout.split()
    return version, gui.upper()


@pytest.fixture(scope="module")
def gui_path() -> str:
    """The path to put first for a GUI OpenCV ("" when the venv's own has one), or skip saying how to get one."""
    candidates = ["", os.environ.get("SONOSCORE_GUI_OPENCV", ""), str(ROOT / "build" / "opencv-gui")]
    for path in dict.fromkeys(candidates):
        if path and not Path(path, "cv2").is_dir():
            continue
        found = _cv2_of(path or None)
        if found and found[0] == cv2.__version__ and found[1] not in ("", "NONE"):
            return path
    pytest.skip(f"no OpenCV {cv2.__version__} with a GUI here: the project pins opencv-python-headless; install a GUI "
                f"build beside it with `pip install --no-deps --target build/opencv-gui "
                f"opencv-python=={cv2.__version__}.*` (.ci/run does)")


def _env(xserver: XServer, gui_path: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("WAYLAND_DISPLAY", "QT_QPA_PLATFORM")}
    env["DISPLAY"] = xserver.display
    if gui_path:
        env["PYTHONPATH"] = os.pathsep.join([gui_path, str(ROOT)])
    return env


def _find(screen: np.ndarray, picture: np.ndarray) -> tuple[int, int, float]:
    """(x, y, fraction of equal pixels) of the best place of `picture` on `screen`."""
    score = cv2.matchTemplate(screen, picture, cv2.TM_SQDIFF)
    _, _, (x, y), _ = cv2.minMaxLoc(score)
    h, w = picture.shape[:2]
    same = (screen[y:y + h, x:x + w] == picture).all(axis=2).mean()
    return x, y, float(same)


def _window_geometry(env: dict[str, str], name: str) -> tuple[int, int]:
    """(width, height) of the one window called `name` (xdotool)."""
    r = subprocess.run(["xdotool", "search", "--name", f"^{name}$", "getwindowgeometry", "--shell"], env=env,
                       capture_output=True, text=True, timeout=30)
    values = dict(line.split("=", 1) for line in r.stdout.splitlines() if "=" in line)
    assert r.returncode == 0 and "WIDTH" in values, r.stdout + r.stderr
    return int(values["WIDTH"]), int(values["HEIGHT"])


def _colour(img: np.ndarray, bgr) -> np.ndarray:
    return (img == np.array(bgr, np.uint8)).all(axis=2)


# -- the window, pixel for pixel ---------------------------------------------------------------------------------

DRIVER = r"""
import select, sys, time
import cv2, numpy as np
from runtime.bundle import DEMO_DISCLAIMER
from runtime.record import FrameRecord
from runtime.sinks.display import DisplayWindow
from runtime.sinks.overlay import DEFAULT_CLASS_NAMES, render_overlay

rng = np.random.default_rng(3)
display = cv2.GaussianBlur(rng.integers(0, 256, (480, 640), dtype=np.uint8), (0, 0), 2)  # speckle-like frame
mask = np.zeros((224, 224), np.uint8)
cv2.ellipse(mask, (120, 110), (70, 45), 15, 0, 360, 1, -1)
rec = FrameRecord(17, "test-source", time.time(), accepted=True, mask_fraction=float(mask.mean()), grade=3,
                  probabilities=[0.05, 0.15, 0.7, 0.1], latency_ms={"preprocess": 3.0, "total": 21.5},
                  mask=mask, display=display)
win = DisplayWindow(name="sonoscore-test", disclaimer=DEMO_DISCLAIMER, max_fps=0)
win.write(rec)
cv2.imwrite(sys.argv[1], render_overlay(rec, fps=None, disclaimer=DEMO_DISCLAIMER,
                                        class_names=DEFAULT_CLASS_NAMES))
print("shown", win.shown, flush=True)

def serve_until_told():  # keep the window serviced (as the next frames would) until the test has its screenshot
    while not select.select([sys.stdin], [], [], 0.02)[0]:
        cv2.waitKey(10)
    return sys.stdin.readline().strip()

serve_until_told()
win.close()
print("closed", flush=True)
serve_until_told()  # still running: the window must be gone because of close(), not because the process ended
"""


def test_display_window_shows_the_overlay_pixel_for_pixel_and_close_takes_it_off_the_screen(desktop, gui_path,
                                                                                           tmp_path):
    expected_png = tmp_path / "expected.png"
    env = _env(desktop, gui_path)
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, str(expected_png)], cwd=ROOT, env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline().strip()
        assert line == "shown 1", f"{line!r}; stderr: {proc.stderr.read() if proc.poll() is not None else ''}"
        expected = cv2.imread(str(expected_png))
        h, w = expected.shape[:2]
        # What the picture must hold, so that finding it on the screen proves those things are shown.
        contour = _colour(expected, CONTOUR)
        grade = _colour(expected, GRADE_COLOURS[2])      # the big "3" and its probability bar
        banner = _colour(expected, BANNER_BG)
        panel = _colour(expected, PANEL_BG)
        assert contour.sum() > 300 and grade.sum() > 300 and banner.sum() > 0.02 * h * w and panel.sum() > 0.1 * h * w
        assert contour[:, :640].any() and not contour[:, 640:].any()   # the contour is on the frame (640 wide)

        deadline = time.monotonic() + 30
        while True:  # the window manager places and maps the window; painting may take a moment
            screen = desktop.screenshot()
            x, y, same = _find(screen, expected)
            if same > 0.999 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert same > 0.999, f"the overlay is not on the screen 1:1 (best place {x},{y}: {same:.1%} equal)"
        shown = screen[y:y + h, x:x + w]
        assert _colour(shown, CONTOUR)[contour].all(), "the kidney contour is not on the screen"
        assert _colour(shown, GRADE_COLOURS[2])[grade].all(), "the grade is not on the screen"
        assert _colour(shown, BANNER_BG)[banner].all(), "the disclaimer banner is not on the screen"
        others = np.ones(screen.shape[:2], bool)
        others[y:y + h, x:x + w] = False
        assert not _colour(screen, CONTOUR)[others].any()
        # Nothing but the picture in the window: it is exactly the picture's size (no toolbar, no status bar).
        assert _window_geometry(env, "sonoscore-test") == (w, h)

        proc.stdin.write("close\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "closed"
        deadline = time.monotonic() + 10
        while True:
            after = desktop.screenshot()
            if not _colour(after, CONTOUR).any() or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert proc.poll() is None
        assert not _colour(after, CONTOUR).any() and not _colour(after, BANNER_BG).any(), "the window is still shown"
        assert (after[y:y + h, x:x + w] == expected).all(axis=2).mean() < 0.2
    finally:
        if proc.poll() is None:
            proc.stdin.write("exit\n")
            proc.stdin.flush()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, proc.stderr.read()


# -- through the real command line -------------------------------------------------------------------------------

def _overlay_box(screen: np.ndarray) -> tuple[int, int, int, int] | None:
    """(x0, y0, x1, y1) of the overlay picture on the screen, when one is shown: its disclaimer banner is the
    bottom strip, the picture's full width, and the text panel above it reaches the top of the picture."""
    banner = _colour(screen, BANNER_BG)
    rows = np.flatnonzero(banner.sum(axis=1) > 300)
    if not rows.size:
        return None
    y1 = int(rows[-1]) + 1
    cols = np.flatnonzero(banner[rows[-1]])
    x0, x1 = int(cols[0]), int(cols[-1]) + 1
    panel = _colour(screen[:y1, x1 - 4:x1 - 3], PANEL_BG)[:, 0]   # the panel's right margin, above the banner
    top = np.flatnonzero(panel)
    return (x0, int(top[0]), x1, y1) if top.size else None


@pytest.mark.parametrize("close_by", ["q key", "window manager"])
def test_run_display_shows_the_live_overlay_and_closing_the_window_does_not_end_the_run(desktop, gui_path, request,
                                                                                        tmp_path, close_by):
    """The live overlay changes on the screen; pressing q in the window, or closing it as a user does (the window
    manager's close, WM_DELETE_WINDOW, here through wmctrl), takes the window away while the run goes on to
    write every frame's record."""
    if close_by == "window manager" and shutil.which("wmctrl") is None:
        pytest.skip("wmctrl is not installed (apt-get install wmctrl); .ci/run installs it")
    tiny_bundle = request.getfixturevalue("tiny_bundle")  # trained only once nothing above has skipped
    env = _env(desktop, gui_path)
    frames = 250            # 25 s at 10 fps: the window is seen, then closed, well before the run ends
    results = tmp_path / "results.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "runtime.cli", "run", "--bundle", str(tiny_bundle), "--source",
                             f"sim://kidney?grade=3&fps=10&frames={frames}&seed=2", "--display", "--quiet",
                             "--results", str(results)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # Screenshots until the overlay has been seen at one place with two different contents (a screenshot
        # taken while the window repaints may be torn: such a one is simply not counted).
        seen: dict[tuple[int, int, int, int], list[np.ndarray]] = {}
        pictures: list[np.ndarray] = []
        deadline = time.monotonic() + 120
        while len(pictures) < 2 and time.monotonic() < deadline and proc.poll() is None:
            screen = desktop.screenshot()
            box = _overlay_box(screen)
            if box:
                x0, y0, x1, y1 = box
                pictures = seen.setdefault(box, [])
                picture = screen[y0:y1, x0:x1]
                if not pictures or not np.array_equal(pictures[-1], picture):
                    pictures.append(picture)
            time.sleep(0.3)
        assert proc.poll() is None, f"the run ended before its window was seen twice: {proc.communicate()[1][-2000:]}"
        assert len(pictures) == 2, "the window did not show a changing overlay"
        for picture in pictures:  # the overlay's layout: the frame on the left, the dark text panel on the right
            assert _colour(picture, PANEL_BG)[:, picture.shape[1] * 2 // 3:].mean() > 0.3

        if close_by == "q key":
            found = subprocess.run(["xdotool", "search", "--onlyvisible", "--name", "^sonoscore$"], env=env,
                                   capture_output=True, text=True, timeout=30)
            window = found.stdout.split()
            assert found.returncode == 0 and len(window) == 1, found.stdout + found.stderr
            subprocess.run(["xdotool", "windowfocus", "--sync", window[0], "key", "q"], env=env, check=True,
                           timeout=30)
        else:
            subprocess.run(["wmctrl", "-c", "sonoscore"], env=env, check=True, timeout=30)
        deadline = time.monotonic() + 20
        while _overlay_box(desktop.screenshot()) is not None and time.monotonic() < deadline:
            time.sleep(0.2)
        running = proc.poll() is None
        assert _overlay_box(desktop.screenshot()) is None, f"{close_by}: the window is still there"
        assert running, "the window went away only because the run ended"
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err[-3000:]
    assert f"{frames} frames:" in err
    assert len(results.read_text().splitlines()) == frames      # every frame still has its record
    assert "QFontDatabase" not in err                           # no Qt noise on the user's terminal


def test_display_refuses_in_one_sentence_when_no_x_server_answers(gui_path, request):
    """Qt aborts the whole process (SIGABRT) when it cannot reach the display; the run must refuse first."""
    tiny_bundle = request.getfixturevalue("tiny_bundle")
    number = next(n for n in range(250, 1000) if not os.path.exists(f"/tmp/.X11-unix/X{n}"))
    env = {k: v for k, v in os.environ.items() if k != "WAYLAND_DISPLAY"}
    env["DISPLAY"] = f":{number}"
    if gui_path:
        env["PYTHONPATH"] = os.pathsep.join([gui_path, str(ROOT)])
    r = subprocess.run([sys.executable, "-m", "runtime.cli", "run", "--bundle", str(tiny_bundle), "--source",
                        "sim://kidney?frames=3", "--display"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    lines = [ln for ln in r.stderr.splitlines() if "cannot show a window" in ln]
    assert len(lines) == 1 and f"DISPLAY=:{number}" in lines[0] and "--view" in lines[0], r.stderr[-2000:]
    assert "Traceback" not in r.stderr


def test_the_x_server_probe_tells_a_live_display_from_a_dead_one(xserver):
    assert _x_server_problem(xserver.display) is None
    assert _x_server_problem(f"unix{xserver.display}.0") is None
    dead = next(n for n in range(250, 1000) if not os.path.exists(f"/tmp/.X11-unix/X{n}"))
    problem = _x_server_problem(f":{dead}")
    assert problem and f"DISPLAY=:{dead}" in problem and "\n" not in problem and problem.count(". ") == 0
    # a TCP display where nothing listens (a port on this machine that was free a moment ago)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    if port >= 6000:
        assert _x_server_problem(f"127.0.0.1:{port - 6000}") is not None
    assert _x_server_problem("not a display") is None     # left to OpenCV
