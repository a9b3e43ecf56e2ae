"""`study_results`: a study's DICOM results, built in order (Segmentations, the SR, Secondary Captures);
`write_results`: each written whole or not at all."""
from __future__ import annotations

import io
import logging
import os
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from runtime.dicom_out.common import (MAX_SEG_FRAMES, _bundle, _frames, _header, _need_highdicom, _series_base,
                                      _Uids, result_kind, seg_frames)
from runtime.dicom_out.deid import _deidentify, _study_when
from runtime.dicom_out.sc import _secondary_capture
from runtime.dicom_out.seg import _segmentation
from runtime.dicom_out.sr import _report
from runtime.errors import UserError
from runtime.files import atomic_write

# -- building ----------------------------------------------------------------------------------------------------

def study_results(sources: Sequence[Any], records: Sequence[Any], summary: Mapping[str, Any],
                  bundle_info: Mapping[str, Any], *, uid_root: str | None = None, deidentify: bool = False,
                  overlay_pictures: Mapping[int, np.ndarray] | None = None,
                  pseudonym_key: str | bytes | None = None, max_seg_frames: int = MAX_SEG_FRAMES) -> list:
    """The study's results as DICOM datasets: Segmentations, the SR, Secondary Captures (see the module docstring)."""
    _need_highdicom()
    if not sources:
        raise UserError("no source instances were given for the study's DICOM results; give the study's DICOM files")
    studies = {str(s.get("StudyInstanceUID", "")) for s in sources}
    if len(studies) != 1 or "" in studies:
        raise UserError("the source instances given for one study's DICOM results belong to "
                        f"{'no study' if '' in studies else f'{len(studies)} studies'}; "
                        "give the instances of one study")
    uids = _Uids(uid_root)
    frames = _frames(records, sources)
    name, version, sha, class_names = _bundle(bundle_info)
    hd_log = logging.getLogger("highdicom")
    if hd_log.level < logging.ERROR:  # highdicom logs patient names and UIDs at INFO and WARNING
        hd_log.setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # highdicom and pydicom warnings may quote patient data
        headers = [_header(s) for s in sources]
        when = None
        if deidentify:
            headers = _deidentify(headers, pseudonym_key)
            when = _study_when(headers[0])
        series_base = _series_base(sources)
        segs = []
        seg_series = uids.new()
        chosen = seg_frames(frames, int(max_seg_frames))
        for n, f in enumerate(chosen, start=1):
            segs.append((f, _segmentation(headers[f.source], f, n, seg_series, series_base + 1, uids,
                                          name, version, sha, when)))
        sr = _report(headers, frames, segs, summary, uids, series_base + 2, name, version, sha, class_names, when)
        out = [s for _, s in segs] + [sr]
        if overlay_pictures and not deidentify:
            sc_series = uids.new()
            for n, (index, picture) in enumerate(sorted(overlay_pictures.items()), start=1):
                if not 0 <= int(index) < len(frames):
                    raise UserError(f"overlay picture {index} names no result record (there are {len(frames)}); "
                                    f"key each picture by its record's index")
                f = frames[int(index)]
                out.append(_secondary_capture(headers[f.source], f, picture, n, sc_series, series_base + 3, uids,
                                              name, version))
    return out


# -- writing -----------------------------------------------------------------------------------------------------

def write_results(datasets: Sequence[Any], out_dir: str | os.PathLike) -> list[Path]:
    """Write each dataset as a DICOM file `<kind>.<SOPInstanceUID>.dcm` (kind: SR, SEG or SC, `result_kind`) in
    `out_dir` (created when missing): written to a temporary name beside it, flushed to disk, then renamed into
    place, so a file is there whole or not at all. Returns the paths, in the order given."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"the DICOM results folder '{out}' cannot be made ({e.strerror or type(e).__name__}); "
                        f"give a folder you can write to") from None
    paths = []
    for ds in datasets:
        name = f"{result_kind(ds)}.{ds.SOPInstanceUID}.dcm"
        path = out / name
        buf = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds.save_as(buf, enforce_file_format=True)
        try:
            atomic_write(path, buf.getvalue())
        except OSError as e:
            raise UserError(f"the DICOM result '{path}' could not be written ({e.strerror or type(e).__name__}); "
                            f"free space or give another folder") from None
        paths.append(path)
    return paths

