"""`sonoscore listen`: a DICOM Storage SCP that scores the studies it receives and sends the results to a PACS.

    scanner --C-STORE--> Storage SCP --> spool (fsync, rename; then the C-STORE success)
                                          |
                         worker: a study quiet for `quiet_time_s` --> its pending instances as one round:
                                 records, summary.json, report.html (results.dir/<study>/<round>/) and the DICOM
                                 results (runtime/dicom_out/) --> outbox --> C-STORE / STOW-RS destinations

What the SCP accepts (presentation contexts): Ultrasound Image Storage and Ultrasound Multi-frame Image Storage
(and their retired forms, which the DICOM source reads the same way), in every transfer syntax the DICOM source
can decode here (those whose pydicom decoder is available; not deflate), and Verification (C-ECHO). Any other
SOP class is refused at association time (presentation context result 3: abstract syntax not supported), so a
sender never transfers it; Secondary Capture is not taken (a screen capture, without the ultrasound region and
calibration the pipeline needs, and what sonoscore itself sends out). A C-STORE is answered:

    0x0000  written to the spool and fsynced
    0xA900  the data set does not match its SOP class (no Study or SOP Instance UID, another SOP class or instance
            than the command says)
    0xC000  not an image the DICOM source can read (no pixel data, an unsupported photometric interpretation,
            truncated); the sender keeps it
    0xA700  the spool cannot be written (a full disk), or the instance is larger than `max_instance_mb` (received
            into a file in the spool's tmp/, never into memory; past the limit nothing more is written, and nothing
            of it is kept); the sender may try again
    0x0122  SOP class not supported (the command names a SOP class the SCP does not take)

Who may associate (runtime/dicomnet/door.py): the called AE title must be ours, the calling one in `calling_aes`
(when given); then a shared slot within `max_per_peer` for the address, else a slot reserved for the calling AE
title; bare connections take no slot and are closed after `request_timeout_s`; an association silent for
`idle_timeout_s` is aborted. Each rejection is logged with its true reason, once per reason and address, then as a
count at most once a minute.

An instance that is not ultrasound (runtime.sources.dicom's check: Modality, or the SOP class without one) is
stored but not graded: its record in the round's results says why, and it has no part in the grade or the DICOM
results. Header values that do not parse (a date, a time, a number) are left empty in the DICOM results; they never
stop scoring. A round that fails `study_attempts` times (after study_retry_s, doubling, at most an hour) moves to
<spool>/failed/ with one log line and results/<study>/failed-<round>.json saying why; `listen --status` lists it.

On start, the spool is processed first: every study with pending instances is scored once it has been
quiet for `quiet_time_s` (from its newest instance's time on disk, or from the start when later: the sender of a
study cut off by the crash may send the rest), so a crash or a restart loses nothing; a round whose results already
reached the outbox (a crash between the two) is only marked done. SIGINT, SIGTERM and SIGHUP stop the SCP, end a
round in progress without marking it (it is redone on the next start) and exit 128 + the signal's number.
"""
from __future__ import annotations

import dataclasses
import logging
import threading
import time
import traceback
from pathlib import Path

from runtime.dicomnet import uid_key
from runtime.dicomnet.config import NetConfig
from runtime.dicomnet.door import PENDING_CONNECTIONS, Door, RejectLog, SizeGuard
from runtime.dicomnet.outbox import Deliverer, Outbox
from runtime.dicomnet.scp import (ACCEPTED_SOP_CLASSES, VERIFICATION, _bounded_handshake, _calling, _header_of, _peer,
                                  _printable, _received_path, _receive_into, _status, decodable_transfer_syntaxes)
from runtime.dicomnet.spool import Spool
from runtime.errors import UserError

log = logging.getLogger("sonoscore.dicomnet")

RESCAN_S = 30.0        # the spool is looked at again this often (beside what the SCP reports)
TICK_S = 0.2
STUDY_RETRY_MAX_S = 3600.0   # a study whose round failed is tried again after study_retry_s, doubling up to this


class Listener:
    """The SCP, the worker and the deliverer of one `sonoscore listen`."""

    def __init__(self, cfg: NetConfig, *, bundle: str | Path, backend: str = "ort", precision: str = "fp32",
                 threads: int | None = None, stop=None, trust: str | Path | None = None):
        from runtime.stream import StopRequest
        if cfg.listen is None:
            raise UserError(f"{cfg.path} has no 'listen' section; `sonoscore listen` needs it")
        self.cfg = cfg
        self.lc = cfg.listen
        self.bundle_path = Path(bundle)
        self.backend, self.precision, self.threads = backend, precision, threads
        self.trust = trust
        self.stop = stop if stop is not None else StopRequest()
        self.spool = Spool(self.lc.spool, keep_instances=self.lc.keep_instances)
        self.outbox = Outbox(cfg.outbox)
        self.activity: dict[str, float] = {}          # study key -> time.time() of its newest pending instance
        self.retry_at: dict[str, tuple[float, int]] = {}   # study key -> (time it may be tried again, failures)
        self._again: dict[str, float] = {}            # study key -> time.time() of its last instance sent again
        self._lock = threading.Lock()
        self.server = None
        self.deliverer: Deliverer | None = None
        self.rounds_done = 0
        self.started = time.time()
        self.door = Door(self.lc.ae_title, self.lc.calling_aes, self.lc.max_associations, self.lc.max_per_peer,
                         self.lc.reserved_per_calling_ae)
        self.rejects = RejectLog()
        self.size_guard = SizeGuard(self.lc.max_instance_bytes)

    # -- the Storage SCP ---------------------------------------------------------------------------------------

    def _on_store(self, event):
        """EVT_C_STORE: the instance is on disk (fsynced, renamed into its study) before success is returned. The
        data set arrives in a file (pynetdicom's chunked receive, in the spool's tmp/), never whole in memory; one
        over listen.max_instance_mb is refused with 0xA700 and nothing of it is kept."""
        received = _received_path(event)
        size = self.size_guard.over(event.assoc)
        if size is None and received is not None:
            try:
                size = received.stat().st_size
                size = size if size > self.lc.max_instance_bytes else None
            except OSError:
                size = None
        if size is not None:
            self.size_guard.forget(event.assoc)
            if received is not None:
                received.unlink(missing_ok=True)
            log.warning("an instance from AE '%s' at %s is larger than listen.max_instance_mb (%g MB; more than %d "
                        "bytes arrived); refused with 0xA700 and nothing of it kept", _calling(event),
                        _peer(event.assoc), self.lc.max_instance_mb, size)
            return _status(0xA700, f"instance larger than {self.lc.max_instance_mb:g} MB")
        try:
            sop_class = str(event.request.AffectedSOPClassUID)
            if sop_class not in ACCEPTED_SOP_CLASSES:
                return _status(0x0122, "SOP class not supported: ultrasound images only")
            ds = _header_of(received) if received is not None else event.dataset
            study_uid = str(ds.get("StudyInstanceUID", "") or "").strip()
            sop_uid = str(ds.get("SOPInstanceUID", "") or "").strip()
            if not study_uid or not sop_uid:
                return _status(0xA900, "no Study or SOP Instance UID")
            if str(ds.get("SOPClassUID", "")).strip() != sop_class:
                return _status(0xA900, "SOP Class UID differs from the C-STORE's")
            if sop_uid != str(event.request.AffectedSOPInstanceUID).strip():
                return _status(0xA900, "SOP Instance UID differs from the C-STORE's")
            data = event.encoded_dataset() if received is None else None
        except Exception as e:  # noqa: BLE001 - a data set pydicom cannot parse
            log.warning("an instance from AE '%s' could not be parsed (%s); refused with 0xC000",
                        _calling(event), type(e).__name__)
            return _status(0xC000, "the data set cannot be parsed")
        try:
            part = (self.spool.adopt_part(received, sop_uid) if received is not None
                    else self.spool.write_part(data, sop_uid))
        except OSError as e:
            log.error("the spool %s cannot be written (%s); instance refused with 0xA700 (the sender keeps it)",
                      self.spool.root, e.strerror or e)
            return _status(0xA700, "the spool cannot be written")
        try:
            from runtime.sources import SourceError
            from runtime.sources.dicom import DicomSource
            try:
                DicomSource(part, realtime=False, warn_modality=False)
            except SourceError:
                part.unlink(missing_ok=True)
                log.warning("instance %s of study %s from AE '%s' is not an image this runtime reads; refused with "
                            "0xC000", uid_key(sop_uid, 12), uid_key(study_uid), _calling(event))
                return _status(0xC000, "not an ultrasound image this runtime reads")
            study, sop = self.spool.commit(part, study_uid, sop_uid)
        except OSError as e:
            part.unlink(missing_ok=True)
            log.error("the spool %s cannot be written (%s); instance refused with 0xA700 (the sender keeps it)",
                      self.spool.root, e.strerror or e)
            return _status(0xA700, "the spool cannot be written")
        done = self.spool.covering_round(study, sop)
        if done is not None:           # sent again after its round: not scored twice
            self._sent_again(study, done)
            return 0x0000
        with self._lock:
            self.activity[study] = time.time()
        log.info("received instance %s of study %s from AE '%s'", sop[:12], study, _calling(event))
        return 0x0000

    def _sent_again(self, study: str, done: dict) -> None:
        """An instance that a finished round already scored arrived again: it is dropped (unless instances are
        kept) and not scored again; said once per study while its instances keep coming (within the quiet time),
        with how to score the study again."""
        if not self.lc.keep_instances:
            self.spool.drop_covered(study)
        now = time.time()
        with self._lock:
            last = self._again.get(study)
            self._again[study] = now
        if last is not None and now - last <= self.lc.quiet_time_s:
            return
        files = (f"{self.spool.studies_dir / study}" if self.lc.keep_instances
                 else "<a folder with the study's files>")
        log.info("study %s was sent again: its instances were already scored (round %s, results in batch %s), so "
                 "they are not scored again; to score the study again, run `sonoscore run --bundle BUNDLE --source "
                 "%s --send %s` (docs/hospital.md, \"Scoring a study again\")", study, done.get("round", "?"),
                 done.get("batch") or "?", files, self.cfg.path)

    def _on_requested(self, event):
        """EVT_REQUESTED (the A-ASSOCIATE-RQ has arrived): runtime.dicomnet.door's rules; a rejection is sent here,
        with its true reason in the (rate-limited) log."""
        assoc = event.assoc
        rq = assoc.requestor.primitive
        calling, called = str(rq.calling_ae_title).strip(), str(rq.called_ae_title).strip()
        peer = _peer(assoc)
        verdict = self.door.admit(id(assoc), peer, calling, called)
        if verdict.admitted:
            return
        assoc.acse.send_reject(*verdict.rj)
        assoc.kill()          # as pynetdicom after its own rejections: the A-ASSOCIATE-RJ is sent, then closed
        self.rejects.rejected(verdict.key, peer, f"association from {peer} (calling AE '{_printable(calling)}') "
                                                 f"rejected: {verdict.reason}")

    def _on_rejected(self, event):
        """pynetdicom's own rejection (after ours): too many connections at once, counting those that have not yet
        asked for an association."""
        peer = _peer(event.assoc)
        self.rejects.rejected("too many connections", peer,
                              f"association from {peer} (calling AE '{_calling(event)}') rejected: too many "
                              f"connections at once ({self.lc.max_associations} associations and "
                              f"{PENDING_CONNECTIONS} connections not yet associated)")

    def _on_closed(self, event):
        self.door.leave(id(event.assoc))
        self.size_guard.forget(event.assoc)

    def start_server(self):
        from pynetdicom import AE, _config, evt
        from runtime.dicomnet.senders import quiet_library_logs
        quiet_library_logs()
        _receive_into(self.spool.tmp)
        ae = AE(ae_title=self.lc.ae_title)
        # the door (EVT_REQUESTED) keeps max_associations; pynetdicom's own limit counts every open connection,
        # also those that have not asked for an association yet: room for them, each for request_timeout_s
        ae.maximum_associations = self.lc.max_associations + PENDING_CONNECTIONS
        ae.require_calling_aet = list(self.lc.calling_aes)
        ae.require_called_aet = True
        ae.acse_timeout = self.lc.request_timeout_s       # the association request (and release) must come by then
        ae.dimse_timeout = self.lc.dimse_timeout_s
        ae.network_timeout = self.lc.idle_timeout_s       # an association silent this long is aborted
        syntaxes = decodable_transfer_syntaxes()
        for sop in ACCEPTED_SOP_CLASSES:
            ae.add_supported_context(sop, syntaxes)
        ae.add_supported_context(VERIFICATION)
        ssl_context = self.lc.tls.server_context() if self.lc.tls else None
        handlers = [(evt.EVT_C_STORE, self._on_store), (evt.EVT_REJECTED, self._on_rejected),
                    (evt.EVT_REQUESTED, self._on_requested), (evt.EVT_CONN_CLOSE, self._on_closed),
                    (evt.EVT_RELEASED, self._on_closed), (evt.EVT_ABORTED, self._on_closed),
                    (evt.EVT_DATA_RECV, self.size_guard.on_data)]
        _config.STORE_RECV_CHUNKED_DATASET = True         # a received data set goes to a file, not to memory
        try:
            self.server = ae.start_server((self.lc.bind, self.lc.port), block=False, evt_handlers=handlers,
                                          ssl_context=ssl_context)
        except OSError as e:
            raise UserError(f"{self.cfg.path}: listen.port {self.lc.port} on {self.lc.bind} cannot be opened "
                            f"({e.strerror or e}); choose another port or stop what uses it") from None
        if ssl_context is not None:
            _bounded_handshake(self.server, ssl_context, self.lc.request_timeout_s)
        return self.server

    # -- the worker --------------------------------------------------------------------------------------------

    def scan_spool(self) -> None:
        """Pending studies on disk (after a restart, or missed): their quiet time counts from their newest
        instance's time on disk, or from this start when that is later (a sender cut off by a crash may still be
        sending the rest of the study)."""
        for study in self.spool.study_keys():
            if not self.lc.keep_instances:
                self.spool.drop_covered(study)
            last = self.spool.last_activity(study)
            if last is not None:
                last = max(last, self.started)
            with self._lock:
                if last is None:
                    self.activity.pop(study, None)
                elif study not in self.activity or self.activity[study] < last:
                    self.activity[study] = last
            if last is not None and study not in self.retry_at:
                before = self.spool.failures(study)     # failed attempts before a restart still count
                if before and isinstance(before.get("failures"), int):
                    self.retry_at[study] = (float(before.get("next") or 0.0), before["failures"])

    def due_studies(self) -> list[str]:
        now = time.time()
        with self._lock:
            quiet = [(t, s) for s, t in self.activity.items() if now - t >= self.lc.quiet_time_s]
        return [s for t, s in sorted(quiet) if self.retry_at.get(s, (0.0, 0))[0] <= now]

    def process_study(self, pipe, bundle, study: str) -> bool:
        """Score the study's pending instances as one round and put its results in the outbox; True when done."""
        from runtime.dicomnet.results import make_results
        from runtime.dicomnet.study import StudyRound, score_study, scoring_order
        with self._lock:
            started = self.activity.get(study)
        instances = scoring_order(self.spool.pending(study))
        if not instances:
            with self._lock:
                self.activity.pop(study, None)
            return False
        rnd = StudyRound(study, instances)
        dests = [d.name for d in self.cfg.destinations]
        if self.outbox.has(rnd.batch_id):   # made before a crash, not marked: only the mark is missing
            self.spool.mark_done(study, rnd.round_id, instances, rnd.batch_id)
            log.info("study %s: round %s was already in the outbox (made before a restart); marked done", study,
                     rnd.round_id)
            self._settle(study, started)
            return True
        log.info("study %s quiet for %gs: scoring %d instance(s) (round %s)", study, self.lc.quiet_time_s,
                 len(instances), rnd.round_id)
        out_dir = self.cfg.results_dir / study / rnd.round_id
        self.spool.write_state(study)
        try:
            score_study(pipe, bundle, rnd, out_dir, stop=self.stop)
            if self.stop.is_set():   # cut short: redone on the next start, nothing marked
                log.info("study %s: round %s stopped before its end; it is redone on the next start", study,
                         rnd.round_id)
                return False
            items = make_results(rnd, bundle, self.cfg)
        finally:
            self.spool.write_state(None)
        if rnd.lenient:
            log.info("study %s: header value(s) that do not parse were left empty in its DICOM results: %s", study,
                     ", ".join(rnd.lenient))
        if items:
            self.outbox.put(rnd.batch_id, study, items, dests)
        else:
            log.warning("study %s: no instance of round %s is ultrasound, so it has no DICOM results (the reasons "
                        "are in %s)", study, rnd.round_id, out_dir / "results.jsonl")
        self.spool.mark_done(study, rnd.round_id, instances, rnd.batch_id if items else None)
        self.spool.clear_failures(study)
        self.rounds_done += 1
        s = rnd.summary
        grade = (f"grade {s['final_grade']}" if s.get("final_grade") else "no grade (no frame passed the gate)"
                 if s.get("accepted", 0) + s.get("rejected", 0) else "no grade (no frame could be graded)")
        log.info("study %s done: %d frame(s), %d accepted, %d rejected, %d error(s); %s; %d DICOM result(s) in the "
                 "outbox as batch %s; records, summary and report in %s", study, s.get("frames", 0),
                 s.get("accepted", 0), s.get("rejected", 0), s.get("errors", 0), grade, len(items), rnd.batch_id,
                 out_dir)
        self._settle(study, started)
        if self.deliverer is not None:
            self.deliverer.wake()
        return True

    def _settle(self, study: str, started: float | None) -> None:
        """The round is done: the study leaves the worker's list unless an instance arrived meanwhile."""
        self.retry_at.pop(study, None)
        with self._lock:
            if self.activity.get(study) == started:
                self.activity.pop(study, None)
        if self.spool.pending(study):
            with self._lock:
                self.activity.setdefault(study, time.time())

    def _study_failed(self, study: str, error: BaseException) -> None:
        """A round failed: tried again after study_retry_s, doubling (at most an hour), study_attempts times in
        all (counted on disk, over restarts); then its instances go to <spool>/failed/ with the reason, in the log
        (one line), in results/<study>/<round>/failed.json and in `listen --status`. The reason names the error's
        type and place, never its message (which may quote a header value)."""
        from runtime.dicomnet.study import StudyRound, scoring_order
        instances = scoring_order(self.spool.pending(study))
        rnd_id = StudyRound(study, instances).round_id if instances else "none"
        before = self.spool.failures(study) or {}
        failures = (int(before.get("failures", 0)) if before.get("round") == rnd_id else 0) + 1
        tb = traceback.extract_tb(error.__traceback__)
        where = f" at {Path(tb[-1].filename).name}:{tb[-1].lineno}" if tb else ""
        error_text = f"{type(error).__name__}{where}"
        if failures >= self.lc.study_attempts and instances:
            reason = (f"scoring failed {failures} time(s) ({error_text}); the instances are kept in the spool's "
                      f"failed/ folder")
            record = {"study": study, "round": rnd_id, "instances": len(instances), "attempts": failures,
                      "error": error_text, "reason": reason, "failed_at": time.time()}
            where_to = self.spool.move_failed(study, rnd_id, instances, record)
            self._write_failed_result(study, rnd_id, record)
            self.retry_at.pop(study, None)
            with self._lock:
                self.activity.pop(study, None)
            log.error("study %s failed: %s; it is not tried again (instances in %s; `sonoscore listen --config %s "
                      "--status` lists it)", study, reason, where_to, self.cfg.path)
            return
        wait = min(STUDY_RETRY_MAX_S, self.lc.study_retry_s * 2 ** (failures - 1))
        self.retry_at[study] = (time.time() + wait, failures)
        try:
            self.spool.note_failure(study, {"round": rnd_id, "failures": failures, "next": time.time() + wait,
                                            "error": error_text})
        except OSError:
            pass
        log.error("study %s could not be completed (%s); its instances stay in the spool and it is tried again "
                  "in %gs (attempt %d of %d)", study, error_text, wait, failures + 1, self.lc.study_attempts)

    def _write_failed_result(self, study: str, rnd_id: str, record: dict) -> None:
        from runtime.dicomnet.spool import write_durably
        import json
        if self.cfg.results_dir is None:
            return
        folder = self.cfg.results_dir / study
        try:
            folder.mkdir(parents=True, exist_ok=True)
            write_durably(folder / f"failed-{rnd_id}.json", json.dumps(record, indent=1).encode())
        except OSError as e:
            log.error("study %s: its failed-%s.json cannot be written in %s (%s)", study, rnd_id, folder,
                      e.strerror or e)

    # -- the whole command -------------------------------------------------------------------------------------

    def run(self) -> int:
        from runtime.pipelines import open_pipeline
        try:
            self.spool.open()
            self.outbox.open()
            if self.cfg.results_dir is not None:
                self.cfg.results_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"{self.cfg.path}: the spool, outbox or results folder cannot be made "
                            f"({e.strerror or e}); check listen.spool, outbox.dir and results.dir") from None
        bundle = _load_bundle(self.bundle_path, self.trust)
        self.deliverer = Deliverer(self.outbox, self.cfg.destinations, self.cfg.retry)
        stop_delivery = threading.Event()
        deliver = threading.Thread(target=self.deliverer.run, args=(stop_delivery,), name="outbox", daemon=True)
        with open_pipeline(bundle, device=self.cfg.device, backend=self.backend, precision=self.precision,
                           threads=self.threads, keep_mask=True, keep_display=True) as pipe:   # SEG, SC
            try:
                self.start_server()
                self.spool.write_state(None)   # `listen --status` sees this listener running
                self.started = time.time()   # a study in the spool from before gets its quiet time from now on
                self.stop.phase = "streaming"
                deliver.start()
                self._serve(pipe, bundle)
            finally:
                self.stop.phase = "finishing"
                if self.server is not None:
                    self.server.shutdown()
                stop_delivery.set()
                self.deliverer.wake()
                if deliver.is_alive():
                    deliver.join(timeout=30)
        waiting = self.outbox.count()
        log.info("stopped by %s; %d result(s) wait in the outbox for the next start", _signal_name(self.stop.signum),
                 waiting)
        return 128 + (self.stop.signum or 0) if self.stop.signum else 0

    def _serve(self, pipe, bundle) -> None:
        """Until stopped: score each study once quiet; look at the spool again now and then."""
        if bundle.disclaimer:
            log.info("NOTE: %s", bundle.disclaimer)
        log.info("listening as AE '%s' on %s:%d%s (calling AEs: %s); spool %s, outbox %s, results %s; "
                 "destinations: %s; a study is complete after %gs without a new instance", self.lc.ae_title,
                 self.lc.bind, self.lc.port, " with TLS" if self.lc.tls else "",
                 ", ".join(self.lc.calling_aes) or "any", self.lc.spool, self.cfg.outbox, self.cfg.results_dir,
                 ", ".join(d.label for d in self.cfg.destinations), self.lc.quiet_time_s)
        waiting = self.outbox.count()
        if waiting:
            log.info("%d result(s) from before wait in the outbox; delivering", waiting)
        self.scan_spool()
        with self._lock:
            pending = len(self.activity)
        if pending:
            log.info("%d %s with instances in the spool from before: each is scored once quiet for %gs",
                     pending, "study" if pending == 1 else "studies", self.lc.quiet_time_s)
        last_scan = time.monotonic()
        while not self.stop.is_set():
            for study in self.due_studies():
                if self.stop.is_set():
                    break
                try:
                    self.process_study(pipe, bundle, study)
                except Exception as e:  # noqa: BLE001 - one study must not stop the service
                    self._study_failed(study, e)
            self.rejects.flush()
            if time.monotonic() - last_scan >= RESCAN_S:
                self.scan_spool()
                last_scan = time.monotonic()
            time.sleep(TICK_S)


def _load_bundle(path: Path, trust):
    """As `run`: with --trust (or SONOSCORE_TRUST) the bundle's signature must verify before it is parsed; an
    unsigned bundle used without a key is said once."""
    from runtime.bundle import Bundle
    from runtime.signing import check_trust, is_signed, trust_option, unsigned_warning
    key, label = trust_option(str(trust) if trust else None)
    check_trust(path, key, label=label)
    bundle = Bundle.load(path)
    if not key and not is_signed(bundle.root):
        log.warning("%s", unsigned_warning(bundle.root).removeprefix("sonoscore: "))
    if bundle.scope_warning:              # no scope gate: one line at every start (runtime/bundle.py)
        log.warning("%s", bundle.scope_warning)
    return bundle


def _signal_name(signum) -> str:
    import signal
    try:
        return signal.Signals(signum).name
    except (TypeError, ValueError):
        return "a stop request"


def listen_command(args, stop) -> int:
    """`sonoscore listen --config FILE [--bundle B] [--backend ..] [--precision ..] [--threads N] [--trust PUB]
    [--deidentify] [--quiet]`:
    the configuration is checked first (every problem one sentence, exit 2), then the bundle, then the port."""
    from runtime.dicomnet.config import load_config
    from runtime.dicomnet.send import setup_logging
    cfg = load_config(args.config, listen=True)
    if getattr(args, "deidentify", False):
        cfg = dataclasses.replace(cfg, deidentify=True)
    if getattr(args, "device", None):
        cfg = dataclasses.replace(cfg, device=args.device)
    bundle = args.bundle or cfg.bundle
    if not bundle:
        raise UserError(f"no bundle: give --bundle, or processing.bundle in {args.config}")
    setup_logging("sonoscore listen", quiet=args.quiet)
    listener = Listener(cfg, bundle=bundle, backend=args.backend or cfg.backend,
                        precision=args.precision or cfg.precision, threads=args.threads or cfg.threads, stop=stop,
                        trust=args.trust)
    return listener.run()
