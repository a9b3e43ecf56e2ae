"""Burned-in annotation: blanking every pixel outside the Sequence of Ultrasound Regions (`--burned-in blank`)."""
from __future__ import annotations

from runtime.deid.profile import Refused


def blank_outside_regions(ds, said: str) -> int:
    """Every pixel outside the union of the Sequence of Ultrasound Regions set to black; returns the region count.
    Compressed pixel data is written back uncompressed (Explicit VR Little Endian)."""
    import numpy as np
    regions = []
    for r in ds.get("SequenceOfUltrasoundRegions") or ():
        try:
            x0, y0 = int(r.RegionLocationMinX0), int(r.RegionLocationMinY0)
            x1, y1 = int(r.RegionLocationMaxX1), int(r.RegionLocationMaxY1)
        except (AttributeError, TypeError, ValueError):
            continue
        if x1 >= x0 and y1 >= y0:
            regions.append((x0, y0, x1, y1))
    if not regions:
        raise Refused(f"Burned In Annotation is {said} and there is no Sequence of Ultrasound Regions to keep, so "
                      f"the pixels cannot be blanked safely; check the images and set Burned In Annotation to NO")
    pi = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    native = ts is None or not ts.is_compressed
    bits = int(ds.get("BitsAllocated") or 0)
    if bits not in (8, 16, 32) or (native and pi == "YBR_FULL_422"):
        raise Refused(f"Burned In Annotation is {said} and the pixels ({bits}-bit {pi or 'unknown'}) are of a kind "
                      f"this tool does not blank; check the images and set Burned In Annotation to NO")
    if not native and pi == "PALETTE COLOR":
        raise Refused(f"Burned In Annotation is {said} and the image is compressed PALETTE COLOR, which this tool "
                      f"does not blank; convert it to RGB first")
    rows, cols = int(ds.Rows), int(ds.Columns)
    keep = np.zeros((rows, cols), bool)
    for x0, y0, x1, y1 in regions:
        keep[max(y0, 0):min(y1, rows - 1) + 1, max(x0, 0):min(x1, cols - 1) + 1] = True
    frames = int(ds.get("NumberOfFrames") or 1)
    if native:
        # The stored values as they are (no colour conversion), written back in the file's own transfer syntax.
        ds.pixel_array_options(raw=True)
        arr = np.array(ds.pixel_array)
        black = {"MONOCHROME1": (1 << int(ds.BitsStored)) - 1, "YBR_FULL": (0, 128, 128)}.get(pi, 0)
        view = arr if frames > 1 else arr[None]
        view[:, ~keep] = black
        if ts is not None and not ts.is_little_endian:
            arr = arr.byteswap()
        if int(ds.get("SamplesPerPixel") or 1) == 3:
            ds.PlanarConfiguration = 0                 # pydicom hands colour back interleaved
        data = arr.tobytes()
        ds.PixelData = data + b"\0" * (len(data) % 2)
    else:
        # Compressed: decoded (colour as RGB) and written back uncompressed.
        arr = np.array(ds.pixel_array)
        black = (1 << int(ds.BitsStored)) - 1 if pi == "MONOCHROME1" else 0
        view = arr if frames > 1 else arr[None]
        view[:, ~keep] = black
        ds.set_pixel_data(arr, "RGB" if int(ds.get("SamplesPerPixel") or 1) == 3 else pi, int(ds.BitsStored),
                          generate_instance_uid=False)
    return len(regions)
