"""A scored study round -> its DICOM results (runtime/dicom_out/): the Segmentations, the SR and, when the
configuration asks (`results.secondary_capture`, not with `deidentify`), a Secondary Capture of the overlay for each
frame that has a Segmentation."""
from __future__ import annotations

import warnings
from pathlib import Path


def bundle_info(bundle) -> dict:
    card = bundle.card
    return {"name": str(card.get("name") or "sonoscore"), "version": str(card.get("version") or "unversioned"),
            "manifest_sha256": bundle.manifest_sha256, "classes": list(bundle.manifest.get("classes") or [])}


def make_results(rnd, bundle, cfg) -> list:
    """The datasets for `rnd` (a runtime.dicomnet.study.StudyRound that `score_study` filled). An instance that is
    not ultrasound (runtime.sources.dicom's check: Modality, or the SOP class without one) was not graded and gets
    no reference; none left: no results at all. Header values that do not parse are left empty in the results
    (`lenient_header`; their names in `rnd.lenient`)."""
    import pydicom
    from runtime import dicom_out
    from runtime.dicomnet.study import not_ultrasound
    sources, index, lenient = [], {}, set()
    for p in rnd.instances:
        if not_ultrasound(p):
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(p, stop_before_pixels=True)
        except Exception:  # noqa: BLE001 - its frames are error records already; it gets no reference
            continue
        lenient.update(lenient_header(ds))
        index[Path(p).name] = len(sources)
        sources.append(ds)
    rnd.lenient = sorted(lenient)
    if not sources:
        return []
    records, kept = [], []
    for rec in rnd.records:
        src = index.get(rec.source_file or "")
        if src is None or rec.frame_in_file is None:
            continue
        records.append(dicom_out.frame_input(rec, src))
        kept.append(rec)
    pictures = None
    if cfg.secondary_capture and not cfg.deidentify:
        pictures = overlay_pictures(kept, records, bundle)
    return dicom_out.study_results(sources, records, rnd.summary, bundle_info(bundle), uid_root=cfg.uid_root,
                                   deidentify=cfg.deidentify, overlay_pictures=pictures)


def overlay_pictures(recs, inputs, bundle) -> dict:
    """The overlay picture (runtime.sinks.overlay.render_overlay) of each record that gets a Segmentation."""
    import numpy as np
    from runtime import dicom_out
    from runtime.sinks.overlay import render_overlay
    usable = [i for i, (r, item) in enumerate(zip(recs, inputs))
              if item["accepted"] and item["mask"] is not None and np.asarray(item["mask"]).any()
              and item["frame_region"] is not None and r.display is not None]
    if not usable:
        return {}
    limit = dicom_out.MAX_SEG_FRAMES
    if len(usable) > limit:
        usable = [usable[k] for k in sorted({int(round(k)) for k in np.linspace(0, len(usable) - 1, limit)})]
    classes = bundle.manifest.get("classes") or None
    kwargs = {"class_names": classes} if classes else {}
    return {i: render_overlay(recs[i], disclaimer=bundle.disclaimer, model=bundle.label, **kwargs) for i in usable}


# Value representations whose text must parse, and how (pydicom's own types, strict): a value that does not is left
# empty in the header the results are made from (highdicom copies the patient and study modules and refuses, say, a
# Patient Birth Date '1945' or a Study Date '2020-13-45').
_PATIENT_SEX = {"M", "F", "O"}


def _parsers():
    from pydicom import config
    from pydicom.valuerep import DA, DT, IS, TM, DSfloat

    def strict(kind):
        def parse(text):
            if kind in (DSfloat, IS):
                return kind(text, validation_mode=config.RAISE)
            return kind(text)
        return parse
    return {"DA": strict(DA), "DT": strict(DT), "TM": strict(TM), "DS": strict(DSfloat), "IS": strict(IS)}


def lenient_header(ds, _depth: int = 0) -> list[str]:
    """Empty, in place, every value of `ds` (and of its sequences' items) that is a date, time, date-time or number
    whose text does not parse, and a Patient's Sex other than M, F or O; the keywords emptied (never a value).
    What scoring needs (image size, pixel format, ultrasound regions) is binary and never touched."""
    import warnings as _w
    parsers = _parsers()
    emptied: list[str] = []
    with _w.catch_warnings():
        _w.simplefilter("ignore")
        for elem in list(ds):
            try:
                if elem.VR == "SQ":
                    if _depth < 4:
                        for item in elem.value or []:
                            emptied += lenient_header(item, _depth + 1)
                    continue
                parse = parsers.get(elem.VR)
                bad = False
                if parse is not None and elem.value not in (None, "", b""):
                    raw = elem.value
                    values = list(raw) if isinstance(raw, (list, tuple)) or type(raw).__name__ == "MultiValue" \
                        else [raw]
                    for v in values:
                        text = v.original_string if hasattr(v, "original_string") and v.original_string else v
                        text = text.decode("ascii", "replace") if isinstance(text, bytes) else str(text)
                        if text.strip():
                            parse(text.strip())
                elif elem.keyword == "PatientSex" and str(elem.value or "").strip() not in _PATIENT_SEX | {""}:
                    bad = True
            except Exception:  # noqa: BLE001 - any value pydicom will not take
                bad = True
            if bad:
                elem.value = None
                emptied.append(elem.keyword or f"({elem.tag.group:04X},{elem.tag.element:04X})")
    return emptied
