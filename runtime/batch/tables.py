"""The two Parquet tables of a batch job (docs/scale.md, "Output"), one row per frame and one per study, with fixed
Arrow schemas so that every study's files, from any engine or node, make one dataset.

frames: the per-frame record contract of `run` (docs/design.md, "Results JSONL": frame, source_id, t_capture,
accepted, mask_fraction, grade, probabilities, latency_ms, error, kidney size; source_file and frame_in_file) plus
study_key, study_uid, series_uid, sop_instance_uid and frame_number (the frame's number in its instance, from 1, as
DICOM counts frames).
studies: the study summary (runtime/sinks/summary.py): final grade, confidence, mean probabilities, grade counts,
frame counts, kidney length and area (medians over the measured frames), instances and series, the study's error
(no frame could be scored) and one sentence per instance that carried errors.
Both: bundle_name, bundle_version, manifest_sha256, precision.
"""
from __future__ import annotations

import io

import pyarrow as pa

from runtime.record import STAGES

STAMP = [pa.field("bundle_name", pa.string()), pa.field("bundle_version", pa.string()),
         pa.field("manifest_sha256", pa.string()), pa.field("precision", pa.string())]

LATENCY = pa.struct([pa.field(s, pa.float64()) for s in (*STAGES, "total")])

FRAMES = pa.schema([
    pa.field("study_key", pa.string()), pa.field("study_uid", pa.string()), pa.field("series_uid", pa.string()),
    pa.field("sop_instance_uid", pa.string()), pa.field("frame_number", pa.int32()),
    pa.field("frame", pa.int32()), pa.field("source_id", pa.string()), pa.field("source_file", pa.string()),
    pa.field("frame_in_file", pa.int32()), pa.field("t_capture", pa.float64()), pa.field("accepted", pa.bool_()),
    pa.field("mask_fraction", pa.float64()), pa.field("grade", pa.int8()),
    pa.field("probabilities", pa.list_(pa.float64())), pa.field("latency_ms", LATENCY),
    pa.field("error", pa.string()), pa.field("kidney_length_mm", pa.float64()),
    pa.field("kidney_area_mm2", pa.float64()), pa.field("size_note", pa.string()), *STAMP])

STUDIES = pa.schema([
    pa.field("study_key", pa.string()), pa.field("study_uid", pa.string()), pa.field("kind", pa.string()),
    pa.field("final_grade", pa.int8()), pa.field("confidence", pa.float64()),
    pa.field("mean_probabilities", pa.list_(pa.float64())), pa.field("grade_counts", pa.list_(pa.int32())),
    pa.field("frames", pa.int32()), pa.field("accepted", pa.int32()), pa.field("rejected", pa.int32()),
    pa.field("frame_errors", pa.int32()), pa.field("instances", pa.int32()), pa.field("series", pa.int32()),
    pa.field("kidney_length_mm", pa.float64()), pa.field("kidney_area_mm2", pa.float64()),
    pa.field("kidney_size_measured", pa.int32()), pa.field("error", pa.string()),
    pa.field("file_errors", pa.list_(pa.string())), pa.field("seconds", pa.float64()), *STAMP])


def frame_row(unit: dict, f: dict, frame, rec) -> dict:
    j = rec.to_json()
    lat = j["latency_ms"]
    return {"study_key": unit["key"], "study_uid": unit["study_uid"], "series_uid": f.get("series_uid"),
            "sop_instance_uid": f.get("sop_uid"),
            "frame_number": None if frame.frame_in_file is None else frame.frame_in_file + 1,
            "frame": j["frame"], "source_id": j["source_id"], "source_file": f.get("name"),
            "frame_in_file": frame.frame_in_file, "t_capture": j["t_capture"], "accepted": j["accepted"],
            "mask_fraction": j["mask_fraction"], "grade": j["grade"], "probabilities": j["probabilities"],
            "latency_ms": {k: lat.get(k) for k in (*STAGES, "total")}, "error": j["error"],
            "kidney_length_mm": j["kidney_length_mm"], "kidney_area_mm2": j["kidney_area_mm2"],
            "size_note": j["size_note"]}


def to_tables(unit: dict, info: dict, rows: list[dict], s: dict, file_errors: list[str], error: str | None,
              seconds: float) -> tuple[pa.Table, pa.Table]:
    for r in rows:
        r.update(info)
    size_l, size_a = s.get("kidney_length_mm") or {}, s.get("kidney_area_mm2") or {}
    study = {"study_key": unit["key"], "study_uid": unit["study_uid"], "kind": unit["kind"],
             "final_grade": s["final_grade"], "confidence": s["confidence"],
             "mean_probabilities": s["mean_probabilities"], "grade_counts": list(s["grade_counts"].values()),
             "frames": s["frames"], "accepted": s["accepted"], "rejected": s["rejected"],
             "frame_errors": s["errors"], "instances": len(unit["files"]),
             "series": len({f.get("series_uid") for f in unit["files"]}),
             "kidney_length_mm": size_l.get("median"), "kidney_area_mm2": size_a.get("median"),
             "kidney_size_measured": (s.get("kidney_size") or {}).get("measured", 0), "error": error,
             "file_errors": file_errors, "seconds": round(seconds, 4), **info}
    return pa.Table.from_pylist(rows, schema=FRAMES), pa.Table.from_pylist([study], schema=STUDIES)


def failed(unit: dict, info: dict, error: str) -> tuple[pa.Table, pa.Table]:
    """The tables of a unit that could not be scored at all: no frames, one studies row with its error."""
    study = {"study_key": unit["key"], "study_uid": unit.get("study_uid"), "kind": unit.get("kind"),
             "frames": 0, "accepted": 0, "rejected": 0, "frame_errors": 0,
             "instances": len(unit.get("files") or []),
             "series": len({f.get("series_uid") for f in unit.get("files") or []}), "error": error,
             "file_errors": [], "kidney_size_measured": 0, **info}
    return FRAMES.empty_table(), pa.Table.from_pylist([study], schema=STUDIES)


def to_bytes(table: pa.Table) -> bytes:
    """A table as Parquet bytes (zstd), for an atomic write."""
    import pyarrow.parquet as pq
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def from_bytes(data: bytes) -> pa.Table:
    import pyarrow.parquet as pq
    return pq.read_table(io.BytesIO(data))
