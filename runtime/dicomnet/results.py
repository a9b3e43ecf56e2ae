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
    """The datasets for `rnd` (a runtime.dicomnet.study.StudyRound that `score_study` filled)."""
    import pydicom
    from runtime import dicom_out
    sources, index = [], {}
    for p in rnd.instances:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(p, stop_before_pixels=True)
        except Exception:  # noqa: BLE001 - its frames are error records already; it gets no reference
            continue
        index[Path(p).name] = len(sources)
        sources.append(ds)
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
