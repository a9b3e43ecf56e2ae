"""`sonoscore run --source FILE.dcm --send pacs.yaml`: the DICOM results of a run, for a DICOM file or folder given
by hand, through the same outbox and destinations as `sonoscore listen`.

`SendRun.prepare(config_path, source)` checks, before anything starts, the configuration (one sentence per error)
and that the source is DICOM. During the run, `tag` notes each record's file and frame (in its `meta`, which the
results file never writes) and `sink` keeps the records. `finish(bundle)` groups the records by study (a folder
may hold several), gives each study its own summary, makes its DICOM results (runtime/dicom_out/), puts them in
the outbox as one batch and delivers: a first attempt, and two more after the configured back-off. What is still
not delivered then waits in the outbox (`sonoscore listen --config FILE --deliver`, which needs no listen section,
`sonoscore listen`, or the next `run --send` with the same outbox delivers it) and `finish` returns one sentence
saying so (`run` exits 5). `deliver_command` is `listen --deliver`: one delivery of the outbox, then exit.
"""
from __future__ import annotations

import logging
import secrets
import sys
import time
import warnings
from pathlib import Path

from runtime.dicomnet import uid_key
from runtime.dicomnet.config import NetConfig, load_config
from runtime.errors import UserError

log = logging.getLogger("sonoscore.dicomnet")

SEND_ATTEMPTS = 3
FILE_KEY, FRAME_KEY = "send_file", "send_frame_in_file"


def setup_logging(prefix: str, quiet: bool = False) -> None:
    """Log lines of the DICOM network side on stderr as '<prefix>: message' (once per process)."""
    if any(getattr(h, "_sonoscore", False) for h in log.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{prefix}: %(message)s"))
    handler._sonoscore = True  # type: ignore[attr-defined]
    log.addHandler(handler)
    log.setLevel(logging.WARNING if quiet else logging.INFO)
    log.propagate = False


class SendRun:
    def __init__(self, cfg: NetConfig, source: Path):
        from runtime.dicomnet.study import Collector
        self.cfg = cfg
        self.source = source
        self.sink = Collector()

    @classmethod
    def prepare(cls, config_path: str | Path, source: str) -> "SendRun":
        cfg = load_config(config_path, listen=False)
        path = Path(source)
        from runtime.sources.dicom import dicom_files_in, is_dicom
        if not (path.is_file() and is_dicom(path)) and not (path.is_dir() and dicom_files_in(path)):
            raise UserError(f"--send makes DICOM results, which need DICOM sources: {source} is not a DICOM file "
                            f"or a folder of DICOM files; give one, or leave --send out")
        return cls(cfg, path)

    def tag(self, process):
        """Wrap a pipeline's `process` so each record knows its file and frame (kept in `meta`)."""
        def tagged(frame, t0=None):
            rec = process(frame, t0)
            rec.meta = {**(rec.meta or {}), FILE_KEY: frame.source_file, FRAME_KEY: frame.frame_in_file}
            return rec
        return tagged

    def _file(self, name: str | None) -> Path | None:
        if name is None:
            return None
        return self.source if self.source.is_file() else self.source / name

    def finish(self, bundle, *, stopped: bool = False) -> list[str]:
        """Make, queue and deliver the results; the sentences of what could not be done (empty: all delivered)."""
        import pydicom
        from runtime.dicomnet.outbox import Outbox
        from runtime.dicomnet.results import make_results
        from runtime.dicomnet.study import StudyRound
        from runtime.sinks.summary import StudySummary
        if stopped:
            return ["--send: the run was stopped, so no DICOM results were made from it (nothing was sent)"]
        by_file: dict[Path, list] = {}
        for rec in self.sink.records:
            f = self._file(rec.meta.get(FILE_KEY))
            if f is None:
                continue
            rec.source_file, rec.frame_in_file = f.name, rec.meta.get(FRAME_KEY)
            by_file.setdefault(f, []).append(rec)
        studies: dict[str, list[Path]] = {}
        for f in by_file:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    uid = str(pydicom.dcmread(f, stop_before_pixels=True).get("StudyInstanceUID", "") or "")
            except Exception:  # noqa: BLE001 - its frames carry their errors already
                continue
            if uid:
                studies.setdefault(uid, []).append(f)
        outbox = Outbox(self.cfg.outbox)
        try:
            outbox.open()
        except OSError as e:
            return [f"--send: the outbox {self.cfg.outbox} cannot be made ({e.strerror or e}); no DICOM results "
                    f"were sent"]
        problems: list[str] = []
        made = 0
        for uid, files in studies.items():
            study = uid_key(uid)
            records = [r for f in files for r in by_file[f]]
            # names in one study must be unique for the round's file -> record mapping
            if len({f.name for f in files}) != len(files):
                problems.append(f"--send: study {study} has two files of the same name in different folders; its "
                                f"DICOM results were not made")
                continue
            summary = StudySummary(disclaimer=bundle.disclaimer)
            for r in records:
                summary.write(r)
            rnd = StudyRound(study, files, round_id=secrets.token_hex(8), records=records,
                             summary=summary.summary())
            try:
                items = make_results(rnd, bundle, self.cfg)
            except UserError as e:
                problems.append(f"--send: the DICOM results of study {study} could not be made ({e})")
                continue
            outbox.put(rnd.batch_id, study, items, [d.name for d in self.cfg.destinations])
            made += len(items)
            log.info("study %s: %d DICOM result(s) in the outbox as batch %s", study, len(items), rnd.batch_id)
        if not studies:
            problems.append("--send: no frame came from a DICOM file with a Study Instance UID, so no DICOM "
                            "results were made")
        waiting = deliver(outbox, self.cfg)
        if waiting:
            problems.append(f"--send: {waiting} DICOM result(s) could not be delivered yet and wait in the outbox "
                            f"{self.cfg.outbox}; `{deliver_advice(self.cfg)}` sends them once the destinations "
                            f"answer (so does the next run with --send)")
        return problems


def deliver(outbox, cfg: NetConfig, attempts: int = SEND_ATTEMPTS) -> int:
    """Deliver what waits in the outbox: a first attempt and `attempts` - 1 more after the back-off; the number of
    results still waiting."""
    from runtime.dicomnet.outbox import Deliverer
    deliverer = Deliverer(outbox, cfg.destinations, cfg.retry)
    for attempt in range(attempts):
        if deliverer.deliver_once():
            break
        if attempt + 1 < attempts:
            time.sleep(min(deliverer.next_due() or 0.0, cfg.retry.max_s))
    return outbox.count()


def deliver_advice(cfg: NetConfig) -> str:
    """The command that delivers an outbox's waiting results with this configuration (with or without a listen
    section)."""
    return f"sonoscore listen --config {cfg.path} --deliver"


def deliver_command(config_path: str | Path, quiet: bool = False) -> int:
    """`sonoscore listen --config FILE --deliver`: deliver what waits in the configuration's outbox (the same
    attempts and back-off as `run --send`) and exit, without listening: 0 when the outbox is empty, 5 when results
    still wait (one sentence says how many). The file needs no listen section (a `run --send` file will do)."""
    from runtime.dicomnet.check import has_listen_section
    from runtime.dicomnet.outbox import Outbox
    cfg = load_config(config_path, listen=has_listen_section(config_path))
    setup_logging("sonoscore listen", quiet=quiet)
    outbox = Outbox(cfg.outbox)
    try:
        outbox.open()
    except OSError as e:
        raise UserError(f"the outbox {cfg.outbox} cannot be made ({e.strerror or e}); check outbox.dir in "
                        f"{cfg.path}") from None
    before = outbox.count()
    waiting = deliver(outbox, cfg)
    if waiting:
        print(f"sonoscore: {waiting} of {before} DICOM result(s) in the outbox {cfg.outbox} could not be delivered "
              f"yet; run `{deliver_advice(cfg)}` again once the destinations answer (or `sonoscore listen` "
              f"delivers them)", file=sys.stderr)
        return 5
    log.info("the outbox %s is empty: %d result(s) delivered", cfg.outbox, before)
    return 0
