"""`sonoscore doctor --dicom`: every ultrasound DICOM that pydicom knows of, end to end through `run`: one record
per frame, no error.

What pydicom knows of (pydicom 3):
- the files it ships (`pydicom/data`: test_files, charset_files, palettes);
- the files of its external data sources, found through the `pydicom.data.external_sources` entry point (the
  `pydicom-data` package, installed with sonoscore's `dev` extra);
- the files it can download (`pydicom/data/urls.json`, each with its sha256 in `hashes.json`). Those that no
  installed package holds are "download-only": nothing is downloaded. Their headers were read once, from the
  pydicom-data repository at the commits that urls.json names, and are recorded in DOWNLOAD_ONLY below under the
  sha256 pydicom expects; a file whose expected sha256 differs from the recorded one (a new version) or that is not
  recorded is unclassified, and said so.

A file is ultrasound when its Modality is US or its SOP Class is an ultrasound one (US_SOP_CLASSES), read from the
header only. Each ultrasound file here runs through `sonoscore run` (runtime.app.run_bundle, what the command
calls: policy all, --results to a temporary file) and its row says: photometric interpretation, bits, transfer
syntax, frames (NumberOfFrames), records written, records with an error, and of those the frames withheld because
they may carry burned-in text (no scan sector, or text over much of it; docs/design.md, "Safety"). A file is ok
when it gave one record per frame and no error other than those refusals.
"""
from __future__ import annotations

import contextlib
import io
import json
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

from runtime import preprocess as pp
from runtime.errors import UserError

# The refusals of a frame that may carry burned-in text (runtime/preprocess.py): no scan sector, or text over too
# much of it. A frame withheld for either is the runtime protecting the patient, not a decoding failure.
WITHHELD = tuple(s for s in (pp.NO_SECTOR, getattr(pp, "TEXT_IN_SECTOR", None)) if s)

US_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.6.1": "Ultrasound Image Storage",
    "1.2.840.10008.5.1.4.1.1.3.1": "Ultrasound Multi-frame Image Storage",
    "1.2.840.10008.5.1.4.1.1.6.2": "Enhanced US Volume Storage",
    "1.2.840.10008.5.1.4.1.1.6": "Ultrasound Image Storage (Retired)",
    "1.2.840.10008.5.1.4.1.1.3": "Ultrasound Multi-frame Image Storage (Retired)",
}

# pydicom 3.0.2's download-only files (in urls.json, in no installed package; pydicom-data 1.0.0 on PyPI predates
# them): name -> (the sha256 pydicom expects, Modality, SOP Class, what it is). Each header was read from the file
# at the pydicom-data commit that urls.json names, after checking that file against this sha256. None is
# ultrasound.
DOWNLOAD_ONLY = {
    "HTJ2KLossless_08_RGB.dcm": ("38f8e8adf46b928a12f1905df1405bc8a32c10286733c47562c75be84ceae00e", None,
                                 "Secondary Capture Image Storage", "a 640x480 RGB photograph (a sailing boat), HTJ2K"),
    "HTJ2K_08_RGB.dcm": ("9a7ae1960f18315c4d58876c2a8333a704e89ca3697edd5b69f600773220eb90", None,
                         "Secondary Capture Image Storage", "the same photograph, lossy HTJ2K"),
    "JLSL_08_07_0_1F.dcm": ("308fb028c8fbdd1e9a93e731978ea4da6b15cb55b40451cf6f21e7c9ba35dd8a", None,
                            "Secondary Capture Image Storage", "128x128 7-bit JPEG-LS test image"),
    "JLSL_16_15_1_1F.dcm": ("61f38f250a7dc82c44529c0face2eeab3ffd02ca8b9dfc756dd818eb252104b6", None,
                            "Secondary Capture Image Storage", "128x128 15-bit signed JPEG-LS test image"),
    "JLSL_RGB_ILV0.dcm": ("f8836a650728f4f1b014a52905e321490f3eefcc0f71ac27fd2c1bd7fc5bbcc4", None,
                          "Secondary Capture Image Storage", "256x256 RGB JPEG-LS test image, no preamble"),
    "JLSL_RGB_ILV1.dcm": ("281610d528d8e22bd52e79d17261ef0c238ef8cfc50696a2d9875a933108864e", None,
                          "Secondary Capture Image Storage", "256x256 RGB JPEG-LS test image, no preamble"),
    "JLSL_RGB_ILV2.dcm": ("f8d670e9988cbca207d3367d916aff3cb508c076495211a0d132692266e9546d", None,
                          "Secondary Capture Image Storage", "256x256 RGB JPEG-LS test image, no preamble"),
    "JLSN_RGB_ILV0.dcm": ("a377750d24bd3413d21faa343662dfff997db9acf65c0b095c5d8a95beb866fa", None,
                          "Secondary Capture Image Storage", "256x256 RGB near-lossless JPEG-LS, no preamble"),
    "liver_nonbyte_aligned.dcm": ("530c6af2a2a0caa6033d99ad407fe1f6e3942c64a8fcfc5649d4d06c26473862", "SEG",
                                  "Segmentation Storage", "a 1-bit liver segmentation (3 frames of 510x510)"),
    "parametric_map_double_float.dcm": ("a41e0b78b05e543a2448e22435858f9ca8d5f94807d7b391b93b4bca80e23a22", "OT",
                                        "Parametric Map Storage", "a 64-bit float parametric map"),
    "parametric_map_float.dcm": ("957f34397c26d82f7a90cad7a653ce0f7238f4be6aa9dfa9a33bae5dc2ce7e23", "OT",
                                 "Parametric Map Storage", "a 32-bit float parametric map"),
}


@dataclass
class KnownFile:
    name: str                       # file name (what get_testdata_file takes)
    origin: str                     # "pydicom", "pydicom-data" or "download-only"
    path: str | None                # where it is here; None for a download-only file
    ultrasound: bool | None         # None: not known (a download-only file not in DOWNLOAD_ONLY, or a new version)
    modality: str | None = None
    sop_class: str | None = None
    frames: int | None = None
    photometric: str | None = None
    bits_allocated: int | None = None
    transfer_syntax: str | None = None
    transfer_syntax_uid: str | None = None
    note: str = ""


def is_ultrasound(modality: str | None, sop_class_uid: str | None) -> bool:
    return (modality or "").strip().upper() == "US" or (sop_class_uid or "") in US_SOP_CLASSES


def _describe(name: str, origin: str, path: Path) -> KnownFile:
    import pydicom
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # some test files are odd on purpose (an IS of '1A')
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        except Exception:
            ds = None
        if ds is None or not any(k in ds for k in ("SOPClassUID", "Modality", "PixelData", "Rows")):
            return KnownFile(name, origin, str(path), False, note="not a DICOM dataset")
        sop = str(ds.get("SOPClassUID", "")) or None
        modality = str(ds.get("Modality", "")).strip() or None
        file_meta = getattr(ds, "file_meta", None)
        ts = file_meta.get("TransferSyntaxUID") if file_meta is not None else None
        try:
            frames = int(ds.get("NumberOfFrames", 1) or 1)
        except (TypeError, ValueError):
            frames = None
        bits = ds.get("BitsAllocated")
        return KnownFile(name, origin, str(path), is_ultrasound(modality, sop), modality,
                         getattr(ds.get("SOPClassUID"), "name", None) or sop, frames,
                         str(ds.get("PhotometricInterpretation", "")) or None,
                         int(bits) if bits is not None else None,
                         getattr(ts, "name", None) or (str(ts) if ts else None), str(ts) if ts else None)


def known_files() -> list[KnownFile]:
    """Every file pydicom knows of, with its class (see the module's docstring), sorted by origin and name."""
    try:
        import pydicom.data as data
        from pydicom.data.data_manager import DATA_ROOT, external_data_sources, get_url_map
    except ImportError:
        raise UserError("doctor --dicom needs pydicom (pip install '.[dicom]'; its test files come with it, "
                        "pydicom-data's with '.[dev]')") from None
    out: list[KnownFile] = []
    for p in sorted(Path(DATA_ROOT).rglob("*")):
        if p.is_file() and p.suffix not in (".py", ".pyc", ".json") and "__pycache__" not in p.parts:
            out.append(_describe(p.name, "pydicom", p))
    offline = {k.name for k in out}
    sources = external_data_sources()
    for source_name, store in sorted(sources.items()):
        for p in sorted(Path(x) for x in store.get_paths("**/*", 0)):
            if p.is_file():
                out.append(_describe(p.name, source_name, p))
                offline.add(p.name)
    hashes = json.loads((Path(data.__file__).parent / "hashes.json").read_text())
    for name in sorted(get_url_map()):
        if name in offline:
            continue
        recorded = DOWNLOAD_ONLY.get(name)
        if recorded is None or hashes.get(name) != recorded[0]:
            why = ("not recorded in DOWNLOAD_ONLY" if recorded is None
                   else "pydicom now expects another version of it (sha256 differs from the one recorded)")
            if "pydicom-data" not in sources:
                why += "; pydicom-data, which holds most of these, is not installed"
            out.append(KnownFile(name, "download-only", None, None, note=f"unclassified: {why}"))
            continue
        _, modality, sop, what = recorded
        sop_uid = next((uid for uid, n in US_SOP_CLASSES.items() if n == sop), None)
        out.append(KnownFile(name, "download-only", None, is_ultrasound(modality, sop_uid), modality, sop,
                             note=f"{what}; in no installed package (pydicom-data 1.0.0 predates it)"))
    return out


def ultrasound_files(files: list[KnownFile] | None = None) -> list[KnownFile]:
    return [f for f in (known_files() if files is None else files) if f.ultrasound and f.path]


@dataclass
class Row:
    file: str
    photometric: str | None
    bits_allocated: int | None
    transfer_syntax: str | None
    frames: int
    records: int
    errors: int
    withheld: int          # frames refused because they may carry burned-in text (WITHHELD)
    seconds: float
    first_error: str | None = None

    @property
    def ok(self) -> bool:
        """One record per frame, and no error other than the burned-in-text refusals."""
        return self.records == self.frames and self.errors == self.withheld


def run_file(bundle, f: KnownFile, workdir: Path, **run_options) -> Row:
    """One file through `sonoscore run` (policy all: every frame processed, none dropped) -> its row. What `run`
    says on the terminal is kept out of the check's output; a file whose run fails has its last line as its
    first error."""
    from runtime.app import RunConfig, run_bundle
    results = workdir / f"{f.name}.jsonl"
    results.unlink(missing_ok=True)
    said = io.StringIO()
    t0 = time.perf_counter()
    failed = None
    with contextlib.redirect_stderr(said), contextlib.redirect_stdout(said):
        try:
            run_bundle(RunConfig(bundle, f.path, policy="all", results=results, quiet=True, **run_options))
        except Exception as e:             # a run that fails is this file's finding, not the end of the check
            failed = f"run failed: {type(e).__name__}: {e}"
    seconds = time.perf_counter() - t0
    records = [json.loads(line) for line in results.read_text().splitlines()] if results.exists() else []
    errors = [r for r in records if r.get("error")]
    withheld = sum(any(w in r["error"] for w in WITHHELD) for r in errors)
    first = failed or (errors[0]["error"] if errors else None)
    return Row(f.name, f.photometric, f.bits_allocated, f.transfer_syntax, int(f.frames or 1), len(records),
               len(errors) + (failed is not None), withheld, round(seconds, 2), first)


def check_dicom(bundle, *, json_path=None, progress: bool = True, **run_options) -> dict:
    """Every ultrasound file pydicom knows of through `run`; prints the table and returns (and writes to
    `json_path`) {"rows", "ok", "files", "unclassified", "unavailable_ultrasound"}."""
    import sys
    from runtime.bundle import Bundle
    Bundle.load(bundle)                       # a bundle that cannot load is said once, before any file
    files = known_files()
    us = ultrasound_files(files)
    by_origin: dict[str, list[KnownFile]] = {}
    for f in files:
        by_origin.setdefault(f.origin, []).append(f)
    print("DICOM: " + "; ".join(f"{origin}: {len(fs)} files, {sum(bool(f.ultrasound) for f in fs)} ultrasound"
                                for origin, fs in by_origin.items()), flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="sonoscore-doctor-dicom-") as tmp:
        for i, f in enumerate(us, 1):
            if progress:
                print(f"[{i}/{len(us)}] {f.name}", file=sys.stderr, flush=True)
            rows.append(run_file(bundle, f, Path(tmp), **run_options))
    print(table(rows))
    for r in rows:
        if not r.ok:
            print(f"{r.file}: {r.records} records for {r.frames} frames, {r.errors} errors"
                  + (f"; first error: {r.first_error}" if r.first_error else ""))
    missing = [f for f in files if f.ultrasound and not f.path]
    unknown = [f for f in files if f.ultrasound is None]
    for f in missing:
        print(f"ultrasound but not here: {f.name} ({f.note})")
    for f in unknown:
        print(f"not classified: {f.name} ({f.note})")
    out = {"bundle": str(bundle), "ok": bool(rows) and all(r.ok for r in rows),
           "rows": [{**asdict(r), "ok": r.ok} for r in rows],
           "files": {origin: len(fs) for origin, fs in by_origin.items()},
           "unavailable_ultrasound": [f.name for f in missing], "unclassified": [f.name for f in unknown]}
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(out, indent=1) + "\n")
    return out


def _short(syntax: str | None) -> str:
    """A transfer syntax's name, without the parts that make some of them a line long."""
    if not syntax:
        return "-"
    short = syntax.replace(", Non-Hierarchical, First-Order Prediction", "").replace(" Image Compression", "")
    return short.replace(" [Selection Value 1]", " SV1")


def table(rows: list[Row]) -> str:
    head = ("file", "photometric", "bits", "transfer syntax", "frames", "records", "errors", "withheld", "ok")
    body = [(r.file, r.photometric or "-", str(r.bits_allocated or "-"), _short(r.transfer_syntax), str(r.frames),
             str(r.records), str(r.errors), str(r.withheld), "yes" if r.ok else "NO") for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]

    def fmt(cells) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
    lines = [fmt(head), fmt(tuple("-" * w for w in widths))] + [fmt(b) for b in body]
    lines.append(f"{len(rows)} files, {sum(r.frames for r in rows)} frames, {sum(r.records for r in rows)} records, "
                 f"{sum(r.errors for r in rows)} errors ({sum(r.withheld for r in rows)} frames withheld for possible "
                 f"burned-in text); {sum(not r.ok for r in rows)} files not ok")
    return "\n".join(lines)
