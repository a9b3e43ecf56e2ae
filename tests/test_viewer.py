"""The live viewer: its HTTP endpoints and access rules, and the real page in headless Chromium.

Records are real: simulated probe frames (runtime.phantom) preprocessed by runtime's own chain, with their true
kidney masks in place of the UNet's (the networks are not what is under test here). The browser is driven over
the DevTools protocol on a pipe (`--remote-debugging-pipe`), which needs neither a driver nor a websocket package.
"""
from __future__ import annotations

import dataclasses
import http.client
import json
import os
import re
import select
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import cv2
import numpy as np
import pytest

from runtime.errors import UserError
from runtime.phantom import KidneyPhantom
from runtime.preprocess import crop_mask, preprocess
from runtime.record import DROPPED, FrameRecord
from runtime.sinks.display import DisplayWindow, gui_problem
from runtime.sinks.overlay import CONTOUR
from runtime.sinks.viewer import LiveViewer, render_frame

CHROMIUM = "/usr/bin/chromium"
DISCLAIMER = "synthetic demo model - not for clinical use"
needs_chromium = pytest.mark.skipif(not os.access(CHROMIUM, os.X_OK),
                                    reason=f"{CHROMIUM} is not installed (apt-get install chromium)")


# -- records ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def frames() -> list[FrameRecord]:
    """Ten consecutive frames of a probe sweep over a simulated grade-3 patient, as scored records."""
    ph = KidneyPhantom(grade=3, seed=11)
    out = []
    for i in range(10):
        f = ph.frame(i)
        image, region = preprocess(f.image, f.region)
        mask = crop_mask(f.mask, region)
        out.append(FrameRecord(i, "sim://kidney?seed=11", time.time(), accepted=bool(mask.mean() >= 0.05),
                               mask_fraction=float(mask.mean()), image=image, mask=mask, display=f.image,
                               region=region, latency_ms={"preprocess": 3.0, "total": 20.0}))
    assert all(r.accepted for r in out)
    return out


def graded(base: FrameRecord, n: int, grade: int | None = None, *, total: float = 20.0) -> FrameRecord:
    """Frame number `n` of the stream: the picture of `base`, a grade that changes every five frames."""
    g = grade if grade is not None else 1 + (n // 5) % 4
    probs = [0.1, 0.1, 0.1, 0.1]
    probs[g - 1] = 0.7
    return dataclasses.replace(base, frame=n, grade=g, probabilities=probs, t_capture=time.time(),
                               latency_ms={"preprocess": 3.0, "total": total + n % 7})


def rejected(base: FrameRecord, n: int) -> FrameRecord:
    return dataclasses.replace(base, frame=n, accepted=False, mask_fraction=0.01, grade=None, probabilities=None,
                               mask=np.zeros_like(base.mask), latency_ms={"total": 9.0})


def get(url: str, timeout: float = 5.0) -> tuple[int, bytes, dict]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read(), dict(e.headers)


def base_url(v: LiveViewer) -> str:
    return f"http://127.0.0.1:{v.port}"


# -- without a browser -----------------------------------------------------------------------------------------
def test_render_frame_draws_the_contour_on_the_scaled_frame(frames):
    pic = render_frame(frames[0])
    assert pic.shape == (480, 624, 3)                           # 400x520 enlarged to 480 rows, like the overlay
    green = (pic[:, :, 1] >= 170) & (pic[:, :, 1].astype(int) - pic[:, :, 2] >= 100)
    assert 300 < int(green.sum()) < 20000
    assert render_frame(FrameRecord(0, "x", 0.0, error="frame 0: unreadable")) is None


def test_state_json_follows_the_records_and_dropped_frames_keep_the_last_picture(frames):
    with LiveViewer(disclaimer=DISCLAIMER) as v:
        assert v.url == f"http://127.0.0.1:{v.port}/" and v.token is None
        status, body, _ = get(base_url(v) + "/state.json?after=0")  # nothing yet: waits a second, then answers
        s = json.loads(body)
        assert status == 200 and s["seq"] == 0 and s["frame"] is None and s["received"] == 0

        v.write(graded(frames[0], 7, grade=3, total=20.0))
        s = json.loads(get(base_url(v) + "/state.json")[1])
        assert s["seq"] == 1 and s["frame"] == 7 and s["grade"] == 3 and s["accepted"] is True
        assert s["probabilities"] == [0.1, 0.1, 0.7, 0.1]
        assert s["latency_ms"] == 20.0 and s["mask_fraction"] == pytest.approx(frames[0].mask_fraction, abs=1e-4)
        assert s["error"] is None and s["has_image"] and s["image_size"] == [624, 480]
        assert s["disclaimer"] == DISCLAIMER and s["source_id"] == "sim://kidney?seed=11"
        assert s["class_names"] == ["1: <25%", "2: 25-49%", "3: 50-74%", "4: >=75%"]

        status, jpeg, headers = get(base_url(v) + "/frame.jpg?n=1")
        pic = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
        assert status == 200 and headers["Content-Type"] == "image/jpeg" and headers["X-Frame-Seq"] == "1"
        assert pic.shape == (480, 624, 3) and pic.std() > 10

        v.write(rejected(frames[1], 8))
        v.write(dataclasses.replace(frames[2], frame=9, error=DROPPED))
        s = json.loads(get(base_url(v) + "/state.json?after=1")[1])
        assert (s["seq"], s["frame"], s["accepted"], s["grade"], s["probabilities"]) == (2, 8, False, None, None)
        assert (s["received"], s["dropped"]) == (3, 1)

        v.write(FrameRecord(10, "sim://kidney?seed=11", time.time(), error="frame 10: truncated PNG file",
                            latency_ms={"total": 1.0}))
        s = json.loads(get(base_url(v) + "/state.json?after=2")[1])
        assert s["frame"] == 10 and s["error"] == "frame 10: truncated PNG file" and not s["has_image"]
        assert get(base_url(v) + "/frame.jpg")[0] == 200       # the latest picture there is (frame 8)
        assert get(base_url(v) + "/nothing")[0] == 404


def test_pictures_are_drawn_only_while_a_page_asks_and_write_never_waits(frames):
    with LiveViewer() as v:
        t = time.perf_counter()
        for n in range(300):
            v.write(graded(frames[n % 10], n))
        assert time.perf_counter() - t < 0.5                    # a reference handed over, nothing drawn
        time.sleep(0.3)
        assert v.rendered == 0                                  # nobody has asked
        s = json.loads(get(base_url(v) + "/state.json")[1])
        assert s["frame"] == 299 and v.rendered == 1             # only the newest record is drawn
        assert s["received"] == 300


def test_a_token_is_required_on_every_path_when_set(frames):
    with LiveViewer(token="s3cret-token", disclaimer=DISCLAIMER) as v:
        v.write(graded(frames[0], 0))
        assert v.url.endswith(f":{v.port}/?token=s3cret-token")
        for path in ("/", "/state.json", "/frame.jpg", "/favicon.ico"):
            assert get(base_url(v) + path)[0] == 403, path
            assert get(base_url(v) + path + "?token=wrong")[0] == 403, path
        status, body, headers = get(base_url(v) + "/?token=s3cret-token")
        assert status == 200 and headers["Content-Type"].startswith("text/html") and DISCLAIMER.encode() in body
        assert get(base_url(v) + "/state.json?token=s3cret-token")[0] == 200
        assert get(base_url(v) + "/frame.jpg?n=1&token=s3cret-token")[0] == 200


def test_the_page_is_the_asset_beside_the_module_with_its_placeholders_filled():
    import runtime.sinks.viewer
    asset = Path(runtime.sinks.viewer.__file__).with_name(runtime.sinks.viewer.PAGE_ASSET).read_text("utf-8")
    assert all(p in asset for p in ("__TITLE__", "__BANNER__", "__COLOURS__", "__CONTOUR__"))
    with LiveViewer(disclaimer=None, title="a <b> title") as v:
        status, body, _ = get(base_url(v) + "/")
    page = body.decode("utf-8")
    assert status == 200 and not re.search(r"__[A-Z]+__", page)
    assert page.count("<title>a &lt;b&gt; title</title>") == 1 and '<div id="disclaimer" hidden></div>' in page
    assert re.search(r'const COLOURS = \["#[0-9a-f]{6}"(, "#[0-9a-f]{6}"){3}\];', page)


def test_binding_beyond_loopback_generates_a_token():
    with LiveViewer(host="0.0.0.0") as v:
        assert v.token and len(v.token) >= 20
        assert v.url.endswith(f":{v.port}/?token={v.token}") and "0.0.0.0" not in v.url
        assert get(base_url(v) + "/")[0] == 403
        assert get(base_url(v) + f"/?token={v.token}")[0] == 200
    with LiveViewer(host="0.0.0.0") as w:
        assert w.token != v.token                               # a fresh one each time


def test_a_short_token_is_refused_on_a_network_address_and_the_command_says_so(tiny_bundle):
    from runtime.errors import UserError
    from tests.conftest import sonoscore
    with pytest.raises(UserError, match="at least 16 characters"):
        LiveViewer(host="0.0.0.0", token="x")
    good = "Qx7-vRk2_Lm9Tz4a"
    with LiveViewer(host="0.0.0.0", token=good) as v:                     # long and random enough: used as given
        assert v.token == good
    with LiveViewer(token="x") as v:                                     # loopback: any token narrows access further
        assert v.token == "x"
    r = sonoscore("run", "--bundle", tiny_bundle, "--source", "sim://kidney?fps=0&frames=2", "--view",
                  "--view-host", "0.0.0.0", "--view-port", 0, "--view-token", "x")
    assert r.returncode == 2 and "--view-token must have at least 16 characters" in r.stderr
    assert "Traceback" not in r.stderr


def test_without_a_token_only_loopback_host_names_are_served():
    with LiveViewer() as v:
        for host, code in ((f"127.0.0.1:{v.port}", 200), (f"localhost:{v.port}", 200), ("[::1]", 200),
                           ("rebound.example.com", 403), (f"rebound.example.com:{v.port}", 403)):
            c = http.client.HTTPConnection("127.0.0.1", v.port, timeout=5)
            c.putrequest("GET", "/", skip_host=True)
            c.putheader("Host", host)
            c.endheaders()
            assert c.getresponse().status == code, host
            c.close()


def test_close_frees_the_port_and_ends_waiting_requests_at_once():
    v = LiveViewer()
    port = v.port
    answers = []
    waiter = threading.Thread(target=lambda: answers.append(get(base_url(v) + "/state.json?after=5")))
    waiter.start()
    time.sleep(0.2)
    t = time.perf_counter()
    v.close()
    waiter.join(5)
    assert time.perf_counter() - t < 2.0 and answers and json.loads(answers[0][1])["stopping"] is True
    with socket.socket() as s:                                  # the port can be bound again
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)
    v.close()                                                   # again: nothing happens
    with pytest.raises(ValueError, match="closed"):
        v.write(FrameRecord(0, "x", 0.0))


def test_a_port_in_use_is_one_clear_sentence():
    with LiveViewer() as v:
        with pytest.raises(UserError, match=f"cannot listen on 127.0.0.1:{v.port}"):
            LiveViewer(port=v.port)


def test_display_window_says_in_one_sentence_why_it_cannot_open():
    problem = gui_problem()
    if problem is None:
        pytest.skip("this machine can open an OpenCV window")
    with pytest.raises(UserError) as e:
        DisplayWindow()
    msg = str(e.value)
    assert msg.startswith("cannot show a window: ") and "\n" not in msg and msg.count(". ") == 0
    assert "headless" in msg or "DISPLAY" in msg
    assert "--view" in msg                                   # and what to do instead
    if "headless" in msg:                                    # the pinned build: say which package has a GUI
        assert "opencv-python of the same version" in msg


# -- in the browser --------------------------------------------------------------------------------------------
class Chromium:
    """Headless Chromium over the DevTools protocol on a pipe: fd 3 carries commands in, fd 4 answers out, each
    message NUL-terminated JSON. One page, attached in flat session mode."""

    def __init__(self, profile: Path, width: int = 1280, height: int = 800):
        to_child, self._out = os.pipe()
        self._in, from_child = os.pipe()

        def fds() -> None:               # in the child: the protocol's fixed descriptors
            os.dup2(to_child, 3)
            os.dup2(from_child, 4)

        self._log = open(profile.parent / "chromium.log", "wb")
        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--hide-scrollbars", f"--user-data-dir={profile}", "--remote-debugging-pipe", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log, pass_fds=(3, 4), preexec_fn=fds)
        os.close(to_child)
        os.close(from_child)
        self._buf = b""
        self._id = 0
        page = next(t for t in self.call("Target.getTargets", session=False)["targetInfos"] if t["type"] == "page")
        self.session = self.call("Target.attachToTarget", {"targetId": page["targetId"], "flatten": True},
                                 session=False)["sessionId"]
        self.call("Emulation.setDeviceMetricsOverride",
                  {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})

    def call(self, method: str, params: dict | None = None, *, session: bool = True, timeout: float = 15.0) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = self.session
        os.write(self._out, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" not in self._buf:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([self._in], [], [], left)[0]:
                    raise TimeoutError(f"chromium did not answer {method} in {timeout:g} s")
                chunk = os.read(self._in, 1 << 20)
                if not chunk:
                    raise EOFError("chromium closed its protocol pipe")
                self._buf += chunk
            raw, self._buf = self._buf.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def evaluate(self, expression: str):
        r = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True})
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expression}: {r['exceptionDetails']}")
        return r["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 10.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.05)
        raise TimeoutError(f"never true in {timeout:g} s: {expression}")

    def navigate(self, url: str) -> None:
        self.call("Page.navigate", {"url": url})
        self.wait_for("document.readyState === 'complete' && location.href !== 'about:blank'")

    def screenshot(self) -> np.ndarray:
        import base64
        png = base64.b64decode(self.call("Page.captureScreenshot", {"format": "png"})["data"])
        return cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)

    def close(self) -> None:
        try:
            self.call("Browser.close", session=False, timeout=5)
        except (OSError, TimeoutError, EOFError, RuntimeError):
            pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._in)
        os.close(self._out)
        self._log.close()


@pytest.fixture
def browser(tmp_path):
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium)")
    profile = tmp_path / "profile"
    profile.mkdir()
    b = Chromium(profile)
    yield b
    b.close()
    shutil.rmtree(profile, ignore_errors=True)


def feed(viewer: LiveViewer, frames: list[FrameRecord], stop: threading.Event, fps: float = 10.0) -> None:
    """The stream's worker: one record every 1/fps s; every 13th frame falls below the gate."""
    n = 0
    while not stop.is_set():
        base = frames[n % len(frames)]
        viewer.write(rejected(base, n) if n % 13 == 12 else graded(base, n))
        n += 1
        stop.wait(1.0 / fps)


def is_contour(px: np.ndarray) -> np.ndarray:
    """The contour's green (BGR (60, 220, 60)) after JPEG and scaling, per pixel of an HxWx3 BGR array."""
    b, g, r = (px[..., i].astype(int) for i in range(3))
    return (g >= 160) & (g - r >= 90) & (g - b >= 90)


@needs_chromium
def test_the_page_shows_the_live_frame_grade_and_numbers_in_chromium(frames, browser, tmp_path):
    assert CONTOUR == (60, 220, 60)
    stop = threading.Event()
    with LiveViewer(token="browser-token", disclaimer=DISCLAIMER) as v:
        worker = threading.Thread(target=feed, args=(v, frames, stop), daemon=True)
        worker.start()
        try:
            browser.navigate(v.url)
            first = int(browser.wait_for("/^\\d+$/.test(document.getElementById('frame-no').textContent) && "
                                         "document.getElementById('frame-no').textContent"))
            # The page follows the stream: frame numbers rise, grades change (every 5 frames at 10 fps).
            seen_frames, seen_grades, seen_states = {first}, set(), set()
            t_end = time.monotonic() + 2.5
            while time.monotonic() < t_end:
                dom = browser.evaluate("""(() => { const t = (id) => document.getElementById(id).textContent;
                    return [t('frame-no'), t('grade'), t('gate-state'), t('fps'), t('latency')]; })()""")
                seen_frames.add(int(dom[0]))
                seen_grades.add(dom[1])
                seen_states.add(dom[2])
                time.sleep(0.1)
            assert max(seen_frames) >= first + 10, seen_frames          # ~25 frames went by
            assert len(seen_frames) >= 8 and len(seen_grades & {"1", "2", "3", "4"}) >= 2, (seen_frames, seen_grades)
            assert "ACCEPTED" in seen_states
            assert dom[3].endswith(" fps") and 5 < float(dom[3].split()[0]) < 20
            latency = float(dom[4].removesuffix(" ms"))           # 20-26 ms scored, 9 ms rejected
            assert dom[4].endswith(" ms") and (latency == 9.0 or 20.0 <= latency <= 26.0), dom[4]

            img = browser.evaluate("""(() => { const i = document.getElementById('frame');
                const r = i.getBoundingClientRect();
                return {w: i.naturalWidth, h: i.naturalHeight, complete: i.complete,
                        rect: [r.left, r.top, r.right, r.bottom]}; })()""")
            assert img["complete"] and (img["w"], img["h"]) == (624, 480)
            # The disclaimer is on screen (a grade is shown) and the page's own requests carry the token.
            banner = browser.evaluate("""(() => { const d = document.getElementById('disclaimer');
                const r = d.getBoundingClientRect();
                return [d.textContent, r.height > 0 && r.top >= 0 && getComputedStyle(d).display !== 'none']; })()""")
            assert DISCLAIMER in banner[0] and banner[1]
            assert browser.evaluate("fetch('/state.json').then(r => r.status)") == 403

            # A screenshot while the page shows an accepted frame: the picture is there, with its contour.
            for _ in range(20):
                browser.wait_for("document.getElementById('gate-state').textContent === 'ACCEPTED'")
                shot = browser.screenshot()
                if browser.evaluate("document.getElementById('gate-state').textContent") == "ACCEPTED":
                    break
            cv2.imwrite(str(tmp_path / "viewer.png"), shot)
            if os.environ.get("SONOSCORE_KEEP_SCREENSHOTS"):
                shutil.copy(tmp_path / "viewer.png", os.environ["SONOSCORE_KEEP_SCREENSHOTS"])
        finally:
            stop.set()
            worker.join(5)
    assert shot.shape[:2] == (800, 1280)
    x0, y0, x1, y1 = (int(round(c)) for c in img["rect"])
    picture = shot[y0:y1, x0:x1]
    assert picture.shape[0] > 300 and picture.std() > 15               # not blank
    assert int(is_contour(picture).sum()) > 300                          # the kidney contour is drawn
    panel = shot[:, x1 + 20:]
    assert not is_contour(shot[y0:y1, :x0]).any() if x0 > 0 else True
    assert panel.std() > 5                                                # the HTML panel has content


# -- issue 27 item 13: a long token that is easy to guess --------------------------------------------------------

@pytest.mark.parametrize("token", ["aaaaaaaaaaaaaaaa", "abababababababab", "passwordpassword", "Password12345678",
                                   "abcdefghijklmnopqrstuvwxyz", "0123456789abcdef"])
def test_a_weak_token_is_refused_on_a_network_address_saying_how_to_make_one(token):
    from runtime.errors import UserError
    with pytest.raises(UserError) as e:
        LiveViewer(host="0.0.0.0", token=token)
    msg = str(e.value)
    assert "too easy to guess" in msg and "secrets.token_urlsafe(18)" in msg and "leave --view-token out" in msg
    assert msg.count(". ") == 0 and token not in msg
    with LiveViewer(token=token) as v:                                   # loopback: any token narrows access
        assert v.token == token


def test_random_tokens_of_16_characters_and_the_generated_ones_pass():
    import secrets
    from runtime.sinks.viewer import MIN_TOKEN_BITS, token_bits
    assert all(token_bits(secrets.token_urlsafe(12)) >= MIN_TOKEN_BITS for _ in range(500))   # 16 characters
    assert all(token_bits(secrets.token_urlsafe(18)) >= MIN_TOKEN_BITS + 30 for _ in range(500))
    assert token_bits("a" * 16) == 0


def test_the_command_refuses_a_weak_token_with_exit_2_before_writing(tiny_bundle, tmp_path):
    from tests.conftest import sonoscore
    r = sonoscore("run", "--bundle", tiny_bundle, "--source", "sim://kidney?fps=0&frames=2", "--view",
                  "--view-host", "0.0.0.0", "--view-port", 0, "--view-token", "aaaaaaaaaaaaaaaa",
                  "--results", tmp_path / "r.jsonl")
    assert r.returncode == 2 and "too easy to guess" in r.stderr and "Traceback" not in r.stderr
    [said] = [x for x in r.stderr.splitlines() if "--view-token" in x]
    assert "secrets.token_urlsafe(18)" in said and "aaaaaaaaaaaaaaaa" not in said
    assert not list(tmp_path.iterdir())
