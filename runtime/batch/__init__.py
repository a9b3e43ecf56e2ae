"""`sonoscore batch`: an archive of studies through a bundle, into a Parquet dataset (docs/scale.md).

    result = run_batch(Options(bundle="b/", source="archive/", out="out/", engine="local", workers=2))

    archive.py     the units of work (a study: DICOM instances by Study UID; images: by folder); a synthetic archive
    score.py       the worker side: `Scorer` (open_pipeline once, FramePipeline.process per frame) -> two tables
    tables.py      the frames and studies schemas
    store.py       the output folder: one file per study and table, atomic, resumable, exactly once
    local.py       --engine local: worker processes on this machine
    ray_engine.py  --engine ray: Ray Data, an actor pool, on this machine or a cluster (--address)

The driver lists the source (reading every header), drops the studies already written, hands the rest to the
engine and writes each study's files as they come back, showing progress (studies done / total, studies per
second, ETA) through runtime.progress. Nothing it writes or logs names a patient: files are named by keyed hashes of
the Study UIDs, rows hold UIDs (keyed replacements with `deidentify`) and never a name, an ID or a birth date, and
error sentences name instances by their place in the study.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from runtime.errors import UserError

log = logging.getLogger("sonoscore.batch")
ENGINES = ("local", "ray")


@dataclass
class Options:
    bundle: str
    source: str
    out: str
    engine: str = "local"
    workers: int = 1
    threads: int | None = None      # per network per worker; default: cores // workers (at least 1)
    address: str | None = None
    deidentify: bool = False
    deid_key: str | None = None
    record_paths: bool = False
    precision: str = "fp32"
    device: str = "cpu"
    backend: str = "ort"
    progress: bool = True
    min_mask_fraction: float | None = None   # the gate's threshold, when not the bundle's (tests)


@dataclass
class Result:
    total: int = 0                  # studies in the source
    skipped: int = 0                # already written by an earlier run
    written: int = 0                # written by this run
    failed: int = 0                 # of those, studies rows with an error
    seconds: float = 0.0
    frames: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def studies_per_s(self) -> float:
        return self.written / self.seconds if self.seconds > 0 else 0.0


def run_batch(opts: Options) -> Result:
    from runtime import logs  # noqa: F401  (installs the sonoscore log handler)
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        raise UserError("batch writes Parquet through pyarrow; install it with pip install 'sonoscore[batch]'") \
            from None
    from runtime.batch import archive, tables
    from runtime.batch.store import Store, cores
    from runtime.bundle import Bundle
    if opts.engine not in ENGINES:
        raise UserError(f"engine '{opts.engine}' is unknown; use local or ray")
    if opts.workers < 1:
        raise UserError("--workers must be at least 1")
    if opts.record_paths and opts.deidentify:
        raise UserError("--record-paths writes file paths, which may name a patient; leave it out with --deidentify")
    bundle = Bundle.load(opts.bundle)
    bundle_path = str(Path(opts.bundle).resolve())
    if opts.precision not in ("fp32", "fp16", "int8"):
        raise UserError(f"precision '{opts.precision}' is unknown; use fp32, fp16 or int8")
    bundle.network_file("unet", opts.precision)     # a precision the bundle lacks is refused before any work
    card = bundle.card
    settings = {"bundle_name": str(card.get("name") or "sonoscore"),
                "bundle_version": str(card.get("version") or "unversioned"),
                "manifest_sha256": bundle.manifest_sha256, "precision": opts.precision,
                "deidentify": bool(opts.deidentify), "record_paths": bool(opts.record_paths), "schema": 1}
    threads = opts.threads or max(1, cores() // opts.workers)
    ids = archive.Ids(deidentify=opts.deidentify, key=opts.deid_key, record_paths=opts.record_paths)
    result = Result()
    with Store(opts.out, settings).open() as store:
        units = archive.list_units(opts.source, ids)
        done = store.done()
        todo = [u for u in units if u["key"] not in done]
        result.total, result.skipped = len(units), len(units) - len(todo)
        log.info("batch: %d studies in the source, %d already written, %d to do (engine %s, %d worker(s) x %d "
                 "thread(s))", len(units), result.skipped, len(todo), opts.engine, opts.workers, threads)
        scorer_args = {"bundle": bundle_path, "precision": opts.precision, "threads": threads,
                       "device": opts.device, "backend": opts.backend, "min_mask_fraction": opts.min_mask_fraction}
        info = {k: settings[k] for k in ("bundle_name", "bundle_version", "manifest_sha256", "precision")}
        meter = Meter(len(todo), enabled=opts.progress)
        t0 = time.perf_counter()

        def on_result(unit: dict, res: tuple) -> None:
            key, frames, studies = res
            store.write(key, frames, studies)
            row = tables.from_bytes(studies).to_pylist()[0]
            result.written += 1
            result.frames += int(row["frames"] or 0)
            if row["error"]:
                result.failed += 1
            meter.advance()

        def on_failure(unit: dict, error: str) -> None:
            f, s = tables.failed(unit, info, error)
            on_result(unit, (unit["key"], tables.to_bytes(f), tables.to_bytes(s)))

        try:
            if todo and opts.engine == "local":
                from runtime.batch import local
                local.run(todo, scorer_args, opts.workers, on_result, on_failure)
            elif todo:
                from runtime.batch import ray_engine
                ray_engine.run(todo, scorer_args, opts.workers, on_result, on_failure, address=opts.address,
                               threads=threads, device=opts.device)
        finally:
            meter.close()
            result.seconds = time.perf_counter() - t0
    return result


class Meter:
    """Studies done / total, studies per second and the ETA: runtime.progress's bar on a terminal (the rate and
    ETA beside it), elsewhere a line at every tenth of the studies (and at most every 30 s)."""

    def __init__(self, total: int, enabled: bool = True):
        import sys

        from runtime.progress import Progress
        self.total, self.done, self.t0, self.said = total, 0, time.perf_counter(), time.perf_counter()
        self.enabled = enabled and total > 0
        # the bar on a terminal; elsewhere this meter's own lines (they carry the rate and the ETA)
        self.p = Progress("batch", total=max(1, total), unit="study", enabled=self.enabled and sys.stderr.isatty(),
                          lines=False)
        self.every = max(1, total // 10)

    def advance(self) -> None:
        self.done += 1
        if not self.enabled:
            return
        self.p.update(self.done)
        elapsed = time.perf_counter() - self.t0
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        self.p.note(rate=f"{rate:.2f}/s", eta=_duration(eta))
        now = time.perf_counter()
        if self.p._bar is None and (self.done % self.every == 0 or self.done == self.total or now - self.said > 30):
            self.said = now
            log.info("batch: %d/%d studies, %.2f studies/s, ETA %s", self.done, self.total, rate, _duration(eta))

    def close(self) -> None:
        self.p.close()


def _duration(s: float) -> str:
    if s == float("inf"):
        return "?"
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"
