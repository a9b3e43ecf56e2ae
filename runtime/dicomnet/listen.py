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
    0xA700  the spool cannot be written (a full disk); the sender may try again
    0x0122  SOP class not supported (the command names a SOP class the SCP does not take)

A calling AE title not in `calling_aes` (when given) gets the association rejected (permanent, calling AE title not
recognised). On start, the spool is processed first: every study with pending instances is scored once it has been
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
from runtime.dicomnet.outbox import Deliverer, Outbox
from runtime.dicomnet.spool import Spool
from runtime.errors import UserError

log = logging.getLogger("sonoscore.dicomnet")

US_IMAGE = "1.2.840.10008.5.1.4.1.1.6.1"
US_MULTIFRAME = "1.2.840.10008.5.1.4.1.1.3.1"
US_IMAGE_RETIRED = "1.2.840.10008.5.1.4.1.1.6"
US_MULTIFRAME_RETIRED = "1.2.840.10008.5.1.4.1.1.3"
ACCEPTED_SOP_CLASSES = (US_IMAGE, US_MULTIFRAME, US_IMAGE_RETIRED, US_MULTIFRAME_RETIRED)
VERIFICATION = "1.2.840.10008.1.1"

RESCAN_S = 30.0        # the spool is looked at again this often (beside what the SCP reports)
TICK_S = 0.2
STUDY_RETRY_S = (30.0, 3600.0)   # a study whose round failed is tried again after 30 s, doubling up to an hour


def decodable_transfer_syntaxes() -> list[str]:
    """The transfer syntaxes whose pixel data pydicom can decode here (what runtime/sources/dicom.py reads):
    uncompressed ones always, compressed ones when their decoder plugin is installed; deflate never (the DICOM
    source refuses it). Uncompressed first, so a sender that can do both sends those."""
    from pydicom.pixels import get_decoder
    from pydicom.uid import (AllTransferSyntaxes, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian,
                             ExplicitVRLittleEndian, ImplicitVRLittleEndian)
    first = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian]
    out = list(first)
    for ts in AllTransferSyntaxes:
        if ts in first or ts == DeflatedExplicitVRLittleEndian:
            continue
        try:
            if get_decoder(ts).is_available:
                out.append(ts)
        except NotImplementedError:
            continue
    return out


def _status(code: int, comment: str | None = None):
    from pydicom.dataset import Dataset
    ds = Dataset()
    ds.Status = code
    if comment:
        ds.ErrorComment = comment[:64]
    return ds


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

    # -- the Storage SCP ---------------------------------------------------------------------------------------

    def _on_store(self, event):
        """EVT_C_STORE: the instance is on disk (fsynced, renamed into its study) before success is returned."""
        try:
            sop_class = str(event.request.AffectedSOPClassUID)
            if sop_class not in ACCEPTED_SOP_CLASSES:
                return _status(0x0122, "SOP class not supported: ultrasound images only")
            ds = event.dataset
            study_uid = str(ds.get("StudyInstanceUID", "") or "").strip()
            sop_uid = str(ds.get("SOPInstanceUID", "") or "").strip()
            if not study_uid or not sop_uid:
                return _status(0xA900, "no Study or SOP Instance UID")
            if str(ds.get("SOPClassUID", "")).strip() != sop_class:
                return _status(0xA900, "SOP Class UID differs from the C-STORE's")
            if sop_uid != str(event.request.AffectedSOPInstanceUID).strip():
                return _status(0xA900, "SOP Instance UID differs from the C-STORE's")
            data = event.encoded_dataset()
        except Exception as e:  # noqa: BLE001 - a data set pydicom cannot parse
            log.warning("an instance from AE '%s' could not be parsed (%s); refused with 0xC000",
                        _calling(event), type(e).__name__)
            return _status(0xC000, "the data set cannot be parsed")
        try:
            part = self.spool.write_part(data, sop_uid)
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

    def _on_rejected(self, event):
        log.warning("association from %s (calling AE '%s') rejected: calling AE title not accepted",
                    event.assoc.requestor.address, _calling(event))

    def start_server(self):
        from pynetdicom import AE, evt
        from runtime.dicomnet.senders import quiet_library_logs
        quiet_library_logs()
        ae = AE(ae_title=self.lc.ae_title)
        ae.maximum_associations = self.lc.max_associations
        ae.require_calling_aet = list(self.lc.calling_aes)
        syntaxes = decodable_transfer_syntaxes()
        for sop in ACCEPTED_SOP_CLASSES:
            ae.add_supported_context(sop, syntaxes)
        ae.add_supported_context(VERIFICATION)
        ssl_context = self.lc.tls.server_context() if self.lc.tls else None
        handlers = [(evt.EVT_C_STORE, self._on_store), (evt.EVT_REJECTED, self._on_rejected)]
        try:
            self.server = ae.start_server((self.lc.bind, self.lc.port), block=False, evt_handlers=handlers,
                                          ssl_context=ssl_context)
        except OSError as e:
            raise UserError(f"{self.cfg.path}: listen.port {self.lc.port} on {self.lc.bind} cannot be opened "
                            f"({e.strerror or e}); choose another port or stop what uses it") from None
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
        score_study(pipe, bundle, rnd, out_dir, stop=self.stop)
        if self.stop.is_set():   # cut short: redone on the next start, nothing marked
            log.info("study %s: round %s stopped before its end; it is redone on the next start", study,
                     rnd.round_id)
            return False
        items = make_results(rnd, bundle, self.cfg)
        self.outbox.put(rnd.batch_id, study, items, dests)
        self.spool.mark_done(study, rnd.round_id, instances, rnd.batch_id)
        self.rounds_done += 1
        s = rnd.summary
        grade = f"grade {s['final_grade']}" if s.get("final_grade") else "no grade (no frame passed the gate)"
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
        _, failures = self.retry_at.get(study, (0.0, 0))
        failures += 1
        wait = min(STUDY_RETRY_S[1], STUDY_RETRY_S[0] * 2 ** (failures - 1))
        self.retry_at[study] = (time.time() + wait, failures)
        tb = traceback.extract_tb(error.__traceback__)
        where = f" at {Path(tb[-1].filename).name}:{tb[-1].lineno}" if tb else ""
        log.error("study %s could not be completed (%s%s); its instances stay in the spool and it is tried again "
                  "in %gs", study, type(error).__name__, where, wait)

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
    return bundle


def _calling(event) -> str:
    try:
        return str(event.assoc.requestor.ae_title).strip()
    except AttributeError:
        return "?"


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
    bundle = args.bundle or cfg.bundle
    if not bundle:
        raise UserError(f"no bundle: give --bundle, or processing.bundle in {args.config}")
    setup_logging("sonoscore listen", quiet=args.quiet)
    listener = Listener(cfg, bundle=bundle, backend=args.backend or cfg.backend,
                        precision=args.precision or cfg.precision, threads=args.threads or cfg.threads, stop=stop,
                        trust=args.trust)
    return listener.run()
    if getattr(args, "device", None):
        cfg = dataclasses.replace(cfg, device=args.device)
