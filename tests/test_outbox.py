"""The DICOM network's parts on their own, with real sockets: the outbox and its deliverer against an in-process
pynetdicom Storage SCP (a PACS that refuses an instance, one that hangs up, one that comes back), the STOW-RS sender
against a small real HTTP server, the spool, and the YAML configuration's checks."""
from __future__ import annotations

import base64
import collections
import json
import logging
import os
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

pytest.importorskip("pynetdicom")
pytest.importorskip("yaml")

import pydicom  # noqa: E402
from pydicom.data import get_testdata_file  # noqa: E402
from pynetdicom import AE, StoragePresentationContexts, evt  # noqa: E402

from runtime.dicomnet import uid_key  # noqa: E402
from runtime.dicomnet.config import ConfigError, Destination, Retry, load_config  # noqa: E402
from runtime.dicomnet.outbox import Deliverer, Outbox  # noqa: E402
from runtime.dicomnet.senders import StowSender, Unreachable  # noqa: E402
from runtime.dicomnet.spool import Spool  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def results(n: int) -> list:
    """`n` small DICOM objects with their own SOP Instance UIDs (pydicom's CT_small stands in for a result)."""
    out = []
    for _ in range(n):
        ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        out.append(ds)
    return out


class Pacs:
    """A Storage SCP in this process: counts what it receives; `refuse` maps SOP Instance UIDs to a failure
    status."""

    def __init__(self, port: int):
        self.port = port
        self.received: collections.Counter = collections.Counter()
        self.refuse: dict[str, int] = {}
        self.server = None

    def _store(self, event):
        uid = str(event.request.AffectedSOPInstanceUID)
        if uid in self.refuse:
            return self.refuse[uid]
        self.received[uid] += 1
        return 0x0000

    def start(self) -> "Pacs":
        ae = AE(ae_title="PACS")
        ae.supported_contexts = StoragePresentationContexts
        self.server = ae.start_server(("127.0.0.1", self.port), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, self._store)])
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None


def cstore(port: int, name: str = "pacs") -> Destination:
    return Destination(name=name, type="cstore", host="127.0.0.1", port=port, called_ae="PACS", timeout_s=5)


@pytest.fixture
def logs(caplog):
    caplog.set_level(logging.INFO, logger="sonoscore.dicomnet")
    return caplog


def lines(caplog, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


# -- outbox and delivery -----------------------------------------------------------------------------------------

def test_each_result_reaches_the_pacs_once_across_a_refusal_and_a_restart(tmp_path, logs):
    pacs = Pacs(free_port()).start()
    try:
        box = Outbox(tmp_path / "outbox").open()
        items = results(3)
        names = box.put("b1", "study-x", items, ["pacs"])
        assert len(names) == 3 and box.has("b1") and box.count() == 3
        assert box.put("b1", "study-x", results(2), ["pacs"]) == []          # put twice: nothing more
        pacs.refuse[str(items[1].SOPInstanceUID)] = 0xA700                   # out of resources, for now
        retry = Retry(first_s=0.05, max_s=0.1)
        first = Deliverer(box, [cstore(pacs.port)], retry)
        assert first.deliver_once() is False
        assert sorted(pacs.received) == sorted(str(items[i].SOPInstanceUID) for i in (0, 2))
        (refusal,) = lines(logs, "refused result 2 of 3")
        assert "0xA700" in refusal and "out of resources" in refusal
        first.deliver_once()                                     # refused again at once? no: it waits its back-off
        time.sleep(0.15)
        first.deliver_once()                                     # refused again: not said twice
        assert len(lines(logs, "refused result")) == 1

        # a restart: a new deliverer on the same outbox sends only what was never acknowledged
        pacs.refuse.clear()
        again = Deliverer(box, [cstore(pacs.port)], retry)
        assert again.deliver_once() is True
        assert set(pacs.received.values()) == {1} and len(pacs.received) == 3
        assert box.pending() == [] and box.has("b1")             # gone from the outbox, still known as delivered
        assert len(lines(logs, "delivered result")) == 3
        assert len(lines(logs, "delivered to every destination")) == 1
    finally:
        pacs.stop()


def test_a_pacs_that_cannot_be_reached_is_retried_with_back_off_and_said_once(tmp_path, logs):
    port = free_port()
    hangups = []
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(16)
    listener.settimeout(0.1)
    stop_hangup = threading.Event()

    def hang_up():                     # accepts and closes at once: a proxy with no PACS behind it
        while not stop_hangup.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            hangups.append(time.monotonic())
            conn.close()

    t = threading.Thread(target=hang_up, daemon=True)
    t.start()
    box = Outbox(tmp_path / "outbox").open()
    items = results(2)
    box.put("b1", "study-y", items, ["pacs"])
    deliverer = Deliverer(box, [cstore(port)], Retry(first_s=0.2, max_s=0.4, factor=2))
    stop = threading.Event()
    runner = threading.Thread(target=deliverer.run, args=(stop,), kwargs={"idle_s": 0.5}, daemon=True)
    runner.start()
    time.sleep(2.0)
    stop_hangup.set()
    t.join(2)
    listener.close()
    # attempts at about 0, 0.2, 0.6, 1.0, 1.4, 1.8 s: waits of 0.2 s, then 0.4 s (the most)
    assert 4 <= len(hangups) <= 8, hangups
    gaps = [b - a for a, b in zip(hangups, hangups[1:])]
    assert gaps[0] == pytest.approx(0.2, abs=0.15) and all(g == pytest.approx(0.4, abs=0.15) for g in gaps[1:])
    assert len(lines(logs, "cannot be reached")) == 1
    assert "2 result(s) wait in the outbox" in lines(logs, "cannot be reached")[0]

    pacs = Pacs(port).start()                   # the PACS is back on that port
    try:
        deadline = time.monotonic() + 10
        while box.pending() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert box.pending() == []
        assert sorted(pacs.received) == sorted(str(d.SOPInstanceUID) for d in items)
        assert len(lines(logs, "reachable again")) == 1
    finally:
        stop.set()
        deliverer.wake()
        runner.join(5)
        pacs.stop()


def test_a_batch_stays_until_every_destination_has_it(tmp_path, logs):
    """Two real destinations, as device/listen.example.yaml configures: an in-process pynetdicom Storage SCP and an
    Orthanc that is down at first (nothing listens on its port: the connection is refused). The batch stays while
    Orthanc lacks it, even though the SCP has every file; a restarted deliverer sends the SCP nothing again; once
    Orthanc is up it gets each file once and only then does the batch leave the outbox."""
    from tests.orthanc_server import Orthanc, OrthancUnavailable
    try:
        orthanc = Orthanc(tmp_path / "orthanc")
    except OrthancUnavailable as e:
        pytest.skip(f"needs Orthanc: {e}")
    pacs = Pacs(free_port()).start()
    dests = [cstore(pacs.port, "scp"),
             Destination(name="orthanc", type="cstore", host="127.0.0.1", port=orthanc.dicom_port,
                         called_ae=orthanc.aet, timeout_s=5)]
    try:
        box = Outbox(tmp_path / "outbox").open()
        items = results(3)
        uids = sorted(str(d.SOPInstanceUID) for d in items)
        box.put("b1", "study-z", items, [d.name for d in dests])
        retry = Retry(first_s=0.05, max_s=0.1)
        assert Deliverer(box, dests, retry).deliver_once() is False
        assert sorted(pacs.received) == uids                                # the SCP has all three ...
        (batch,) = box.pending()                                            # ... and the batch still waits
        assert batch.unsent("scp") == [] and len(batch.unsent("orthanc")) == 3 and not (box.done / "b1").exists()
        (down,) = lines(logs, "orthanc (C-STORE) cannot be reached")
        assert f"127.0.0.1:{orthanc.dicom_port} refused the connection (is the PACS running" in down
        assert "presentation context" not in down

        time.sleep(0.15)
        assert Deliverer(box, dests, retry).deliver_once() is False         # a restart, Orthanc still down
        assert len(box.pending()) == 1 and set(pacs.received.values()) == {1}

        orthanc.start()
        time.sleep(0.15)
        assert Deliverer(box, dests, retry).deliver_once() is True
        assert box.pending() == [] and (box.done / "b1").exists()
        got = orthanc.received()
        assert sorted(uid for uid, how in got) == uids and set(got.values()) == {1}
        assert set(pacs.received.values()) == {1}                           # the SCP got nothing twice
    finally:
        pacs.stop()
        orthanc.stop()


def test_a_put_cut_short_leaves_no_batch(tmp_path):
    box = Outbox(tmp_path / "outbox").open()

    def items():
        yield results(1)[0]
        raise RuntimeError("the process died here")

    with pytest.raises(RuntimeError):
        box.put("b1", "s", items(), ["pacs"])
    assert not box.has("b1") and box.pending() == [] and list(box.tmp.iterdir()) == []
    # the debris a SIGKILL would leave in tmp/ is cleared on open, but not a put another process is making
    (box.tmp / "b2.999999999.ab12").mkdir()
    (box.tmp / f"b3.{os.getpid()}.cd34").mkdir()
    Outbox(tmp_path / "outbox").open()
    assert [p.name for p in box.tmp.iterdir()] == [f"b3.{os.getpid()}.cd34"]


def test_retry_delays_double_up_to_the_most():
    r = Retry(first_s=5, max_s=300, factor=2)
    assert [r.delay(n) for n in range(1, 9)] == [5, 10, 20, 40, 80, 160, 300, 300]
    assert r.delay(0) == 0 and Retry(1, 4, 1).delay(10) == 1


# -- STOW-RS -----------------------------------------------------------------------------------------------------

class Stow(BaseHTTPRequestHandler):
    """POST <root>/studies: answers with the status the test sets, and keeps what it was sent."""
    status = 200
    seen: list = []

    def do_POST(self):  # noqa: N802
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0)) if self.headers.get(
            "Content-Length") else self._chunked()
        Stow.seen.append((self.path, dict(self.headers), body))
        payload = {}
        if Stow.status == 409:
            payload = {"00081198": {"vr": "SQ", "Value": [{"00081197": {"vr": "US", "Value": [0xA900]}}]}}
        data = json.dumps(payload).encode()
        self.send_response(Stow.status)
        self.send_header("Content-Type", "application/dicom+json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _chunked(self) -> bytes:
        out = b""
        while True:
            size = int(self.rfile.readline().strip(), 16)
            if size == 0:
                self.rfile.readline()
                return out
            out += self.rfile.read(size)
            self.rfile.readline()

    def log_message(self, *args):
        pass


@pytest.fixture
def stow_server():
    Stow.seen, Stow.status = [], 200
    server = ThreadingHTTPServer(("127.0.0.1", 0), Stow)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield server
    server.shutdown()


def test_stow_rs_posts_each_instance_with_basic_auth_and_reads_the_answers(tmp_path, stow_server):
    box = Outbox(tmp_path / "outbox").open()
    items = results(2)
    box.put("b1", "s", items, ["web"])
    files = box.pending()[0].unsent("web")
    dest = Destination(name="web", type="stow-rs", url=f"http://127.0.0.1:{stow_server.server_port}/dicom-web",
                       username="sono", password="s3cret", timeout_s=5)
    outcomes = []
    StowSender(dest).send(files, lambda p, o: outcomes.append((p.name, o.ok)))
    assert outcomes == [(f.name, True) for f in files]
    assert [path for path, _, _ in Stow.seen] == ["/dicom-web/studies"] * 2
    auth = Stow.seen[0][1]["Authorization"]
    assert base64.b64decode(auth.split()[1]) == b"sono:s3cret"
    assert str(items[0].SOPInstanceUID).encode() in Stow.seen[0][2]          # the instance itself, multipart

    Stow.status = 409                                      # the server refuses: FailedSOPSequence, reason 0xA900
    outcomes.clear()
    StowSender(dest).send(files[:1], lambda p, o: outcomes.append(o))
    assert not outcomes[0].ok and "409" in outcomes[0].detail
    Stow.status = 503                                      # down for maintenance: the destination is unreachable
    with pytest.raises(Unreachable, match="503"):
        StowSender(dest).send(files[:1], lambda p, o: None)
    stow_server.shutdown()
    stow_server.server_close()
    with pytest.raises(Unreachable, match="connection refused"):
        StowSender(dest).send(files[:1], lambda p, o: None)


# -- the spool ---------------------------------------------------------------------------------------------------

def test_spool_keeps_instances_until_their_round_is_done_and_knows_them_after(tmp_path):
    spool = Spool(tmp_path / "spool").open()
    (spool.tmp / "cut.1234.part").write_bytes(b"half")               # a receive a crash cut short
    spool = Spool(tmp_path / "spool").open()
    assert list(spool.tmp.iterdir()) == []
    paths = []
    for sop in ("1.2.3.1", "1.2.3.2"):
        part = spool.write_part(b"DICM-data-" + sop.encode(), sop)
        study, key = spool.commit(part, "1.2.3", sop)
        paths.append(spool.studies_dir / study / f"{key}.dcm")
    assert study == uid_key("1.2.3") and "1.2.3" not in str(paths[0])        # named by hashes only
    # keyed: HMAC-SHA256 under the installation's salt, so hashing a known UID does not find its study
    import hashlib
    import hmac
    from runtime.sources import installation_salt
    assert study == hmac.new(installation_salt(), b"1.2.3", hashlib.sha256).hexdigest()[:16]
    assert study not in hashlib.sha256(b"1.2.3").hexdigest()
    assert spool.pending(study) == sorted(paths)
    assert spool.last_activity(study) == pytest.approx(time.time(), abs=5)
    spool.mark_done(study, "r1", paths, "batch-1")
    assert spool.pending(study) == [] and not any(p.exists() for p in paths)
    # the same instance sent again is known (covered), not a new round
    part = spool.write_part(b"again", "1.2.3.1")
    spool.commit(part, "1.2.3", "1.2.3.1")
    assert spool.pending(study) == []
    assert [p.name for p in spool.drop_covered(study)] == [paths[0].name] and not paths[0].exists()
    # a new instance of the same study is pending
    part = spool.write_part(b"new", "1.2.3.3")
    spool.commit(part, "1.2.3", "1.2.3.3")
    assert [p.stem for p in spool.pending(study)] == [uid_key("1.2.3.3", 32)]


# -- the configuration -------------------------------------------------------------------------------------------

def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


GOOD = """
listen: {ae_title: SONO, port: 11112, spool: spool, quiet_time_s: 5}
results: {dir: results}
outbox: {dir: out}
destinations:
  - {name: pacs, type: cstore, host: pacs.example, port: 104, called_ae: PACS}
  - {name: web, type: stow-rs, url: "https://pacs.example/dicom-web/", token: abc}
"""


def test_configuration_paths_are_taken_from_its_folder_and_defaults_filled(tmp_path):
    cfg = load_config(write(tmp_path, GOOD), listen=True)
    assert cfg.listen.spool == tmp_path / "spool" and cfg.outbox == tmp_path / "out"
    assert cfg.results_dir == tmp_path / "results"
    assert cfg.listen.bind == "0.0.0.0" and cfg.listen.calling_aes == () and cfg.listen.quiet_time_s == 5
    pacs, web = cfg.destinations
    assert (pacs.calling_ae, pacs.called_ae) == ("SONO", "PACS")      # calling AE: the listener's by default
    assert web.url == "https://pacs.example/dicom-web" and web.token == "abc" and "abc" not in repr(web)
    assert cfg.retry == Retry() and cfg.secondary_capture and not cfg.deidentify
    assert not (tmp_path / "spool").exists()                           # checking makes nothing
    # listen: the outbox and the results default to folders beside the spool; run --send needs its outbox
    bare = GOOD.replace("results: {dir: results}\n", "").replace("outbox: {dir: out}\n", "")
    cfg = load_config(write(tmp_path, bare.replace("spool: spool", "spool: var/spool")), listen=True)
    assert (cfg.outbox, cfg.results_dir) == (tmp_path / "var" / "outbox", tmp_path / "var" / "results")
    with pytest.raises(ConfigError, match="section 'outbox' is missing"):
        load_config(write(tmp_path, bare.replace("listen: {ae_title: SONO, port: 11112, spool: spool, "
                                                 "quiet_time_s: 5}", "")))
    # an outbox section with only its back-off: the folder is still the default one beside the spool
    retry_only = bare.replace("spool: spool", "spool: var/spool") + "outbox: {retry: {first_s: 1, max_s: 8}}\n"
    cfg = load_config(write(tmp_path, retry_only), listen=True)
    assert cfg.outbox == tmp_path / "var" / "outbox" and cfg.retry == Retry(1, 8, 2)
    with pytest.raises(ConfigError, match="'outbox.dir' is missing; add outbox.dir"):
        load_config(write(tmp_path, retry_only.replace("listen: {ae_title: SONO, port: 11112, spool: var/spool, "
                                                       "quiet_time_s: 5}", "")))


def test_configuration_errors_name_the_key_one_sentence_each(tmp_path):
    text = GOOD.replace("token: abc", "token: abc, username: u, password: p, tls: {ca_certificates: ca.pem}")
    text = text.replace("listen: {", "listen: {tls: {certificate: c.pem}, ")
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, text), listen=True)
    errs = e.value.errors
    assert any("'destinations[1]' gives both a token and a username/password" in x for x in errs)
    assert any("'destinations[1].tls.ca_certificates' names" in x and "not a file" in x for x in errs)
    assert any("'listen.tls.certificate' names" in x for x in errs)
    assert any("'listen.tls' gives a certificate without its private key" in x for x in errs)
    assert all(x.startswith(str(tmp_path / "c.yaml")) for x in errs)
    with pytest.raises(ConfigError, match="section 'listen' is missing"):
        load_config(write(tmp_path, GOOD.replace("listen: {ae_title: SONO, port: 11112, spool: spool, "
                                                 "quiet_time_s: 5}", "")), listen=True)
    # run --send needs no listen section
    assert load_config(write(tmp_path, GOOD.split("results:")[0].replace("listen", "#") + "results:"
                             + GOOD.split("results:")[1])).listen is None
    with pytest.raises(ConfigError, match="overlap"):
        load_config(write(tmp_path, GOOD.replace("dir: out", "dir: spool/out")), listen=True)


# -- DICOM TLS ---------------------------------------------------------------------------------------------------

def make_certificates(folder: Path) -> dict[str, Path]:
    """A CA and, signed by it, a server certificate for localhost / 127.0.0.1 and a client certificate (openssl)."""
    import shutil
    import subprocess
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make test certificates")

    def run(*args):
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True, timeout=60)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
        "-subj", "/CN=sonoscore-test-ca")
    for name, ext in (("server", "subjectAltName=DNS:localhost,IP:127.0.0.1"),
                      ("client", "extendedKeyUsage=clientAuth")):
        (folder / f"{name}.ext").write_text(ext + "\n")
        run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj",
            f"/CN={name}")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial", "-out",
            f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext")
    return {n: folder / n for n in ("ca.crt", "server.crt", "server.key", "client.crt", "client.key")}


def test_listen_scp_and_cstore_sender_speak_tls_with_client_certificates(tmp_path, logs):
    from runtime.dicomnet.listen import Listener
    make_certificates(tmp_path)
    port = free_port()
    cfg_path = write(tmp_path, f"""
listen:
  ae_title: SONOSCORE
  port: {port}
  bind: 127.0.0.1
  spool: spool
  tls: {{certificate: server.crt, private_key: server.key, ca_certificates: ca.crt}}
results: {{dir: results}}
outbox: {{dir: out}}
destinations:
  - {{name: scp, type: cstore, host: localhost, port: {port}, called_ae: SONOSCORE, timeout_s: 5,
      tls: {{ca_certificates: ca.crt, certificate: client.crt, private_key: client.key}}}}
  - {{name: nocert, type: cstore, host: localhost, port: {port}, called_ae: SONOSCORE, timeout_s: 5,
      tls: {{ca_certificates: ca.crt}}}}
""")
    cfg = load_config(cfg_path, listen=True)
    listener = Listener(cfg, bundle=tmp_path / "unused")
    listener.spool.open()
    server = listener.start_server()
    try:
        us = pydicom.dcmread(get_testdata_file("US1_UNCR.dcm", download=False))
        box = Outbox(tmp_path / "out").open()
        box.put("b1", "s", [us], ["scp"])
        box.put("b2", "s", [us], ["nocert"])
        scp, nocert = cfg.destinations
        assert Deliverer(box, [scp], Retry(0.1, 0.1)).deliver_once() is False      # b2 still waits for nocert
        (got,) = (tmp_path / "spool" / "studies").glob("*/*.dcm")
        assert got.stem == uid_key(str(us.SOPInstanceUID), 32)
        # without a client certificate the SCP refuses the TLS handshake: unreachable, said once
        d = Deliverer(box, [nocert], Retry(0.1, 0.1))
        d.deliver_once()
        assert [b.id for b in box.pending()] == ["b2"]
        assert len(lines(logs, "nocert (C-STORE) cannot be reached")) == 1
        # and a plain (non-TLS) association gets nowhere
        ae = AE(ae_title="PLAIN")
        ae.add_requested_context(us.SOPClassUID, us.file_meta.TransferSyntaxUID)
        ae.acse_timeout = ae.network_timeout = 3
        assert not ae.associate("127.0.0.1", port, ae_title="SONOSCORE").is_established
    finally:
        server.shutdown()
