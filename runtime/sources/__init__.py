"""Frame sources. A source is an iterable of `Frame`s plus what the streamer needs to know about it.

Source strings (docs/design.md, "Streaming"): a path (image, folder, video, DICOM file or folder of DICOM files),
`sim://kidney?grade=3&fps=30&frames=300&seed=1`, `igtl://host:18944/Device` (OpenIGTLink IMAGE stream),
`v4l2:///dev/video0` and `gst://<pipeline>` (capture).
A frame that cannot be read is still yielded, with `error` set, so the results keep one record per input.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path

from runtime.sources.base import (MAX_PIXELS, SALT_FILE, SQUARE_PIXEL_TOLERANCE, Frame, Source,  # noqa: F401
                                  SourceError, cache_dir, installation_salt, is_dicom, now, opaque_id, spacing_meta)


def open_source(spec: str, *, realtime: bool | None = None) -> Source:
    """Open a source string; raises SourceError with one sentence when it cannot be opened.

    `realtime`: recorded sources that have a frame rate (the simulated probe, a DICOM cine) replay at that rate by
    default, like the scanner did; False reads them as fast as possible (calibration, evaluation).
    """
    if spec.startswith("sim://"):
        from runtime.sources.sim import SimSource
        return SimSource.from_uri(spec, realtime=realtime)
    if spec.startswith("igtl://"):
        from runtime.sources.igtl import IgtlSource
        return IgtlSource.from_uri(spec, realtime=realtime)
    if spec.startswith(("v4l2://", "gst://")):
        from runtime.sources.capture import CaptureSource
        return CaptureSource.from_uri(spec, realtime=realtime)
    if "://" in spec:
        scheme = spec.split("://", 1)[0]
        raise SourceError(f"source '{spec}': the {scheme}:// source is not available in this version; "
                          f"use a file, a folder, a video, sim://kidney, igtl://, v4l2:// or gst://")
    path = Path(spec)
    if not path.exists():
        raise SourceError(f"source '{spec}' does not exist; give an image, a folder of images, a video file "
                          f"or sim://kidney")
    try:
        mode = os.stat(path).st_mode     # stat only: a pipe or socket is never opened for reading
    except OSError as e:
        raise SourceError(f"source '{spec}' cannot be examined ({(e.strerror or type(e).__name__).lower()}); "
                          f"check its permissions") from None
    if stat.S_ISCHR(mode):               # /dev/videoN given as a path: the capture card it is
        from runtime.sources.capture import CaptureSource
        return CaptureSource.from_uri(f"v4l2://{path.absolute()}", realtime=realtime)
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        kind = ("a named pipe (FIFO)" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
                else "a block device (a disk)" if stat.S_ISBLK(mode) else "not a regular file")
        raise SourceError(f"source '{spec}' is {kind}, which this runtime does not read; give an image, a folder "
                          f"of images, a video or DICOM file, or a live feed as v4l2://, gst:// or igtl://")
    from runtime.sources import dicom, files
    if path.is_dir():
        # every file at any depth, as a folder source reads them: a study export's DICOM files sit in subfolders
        names = files.folder_files(path)[0]
        if names and not any(p.suffix.lower() in files.IMAGE_SUFFIXES for p in names) and dicom.dicom_files_in(path):
            return dicom.DicomFolderSource(path)   # a folder of DICOM files (a study export)
        return files.FolderSource(path)            # images, and any DICOM files among them
    if path.suffix.lower() in (".dcm", ".dicom") or dicom.is_dicom(path):
        return dicom.DicomSource(path, realtime=realtime)
    if path.suffix.lower() in files.VIDEO_SUFFIXES:
        return files.VideoSource(path)
    return files.FolderSource(path)  # a single image is a folder of one
