"""`deid`: DICOM de-identification for research (runtime/deid/, docs/deid.md)."""
from __future__ import annotations

import argparse
import os
import sys

from runtime.cli.common import EXIT_FRAME_ERRORS, EXIT_OK, UserError


def cmd_deid(args: argparse.Namespace) -> int:
    from pathlib import Path

    from runtime.deid import MANIFEST_NAME, Deidentifier, Options, SafePrivate, summary_lines
    key = args.key or os.environ.get("SONOSCORE_DEID_KEY", "")
    if not key:
        raise UserError("deid needs a key: give --key KEY or set SONOSCORE_DEID_KEY (keep it secret; the same key "
                        "gives the same UIDs, pseudonyms and date shifts in every run)")
    src, out = Path(args.input), Path(args.output)
    if not src.exists():
        raise UserError(f"input '{src}' does not exist; give a DICOM file, a folder or a DICOMDIR")
    if out.exists() and not out.is_dir():
        raise UserError(f"output '{out}' is a file; give a folder (it is made if missing)")
    if out.resolve() == (src.resolve() if src.is_dir() else src.resolve().parent):
        raise UserError(f"output folder '{out}' is the input's own folder; give another folder")
    options = Options(keep_dates_shifted=args.keep_dates_shifted, keep_device=args.keep_device,
                      keep_descriptors=args.keep_descriptors,
                      safe_private=tuple(SafePrivate.parse(t) for t in args.safe_private or ()),
                      burned_in=args.burned_in)
    d = Deidentifier(key, options)

    def progress(fr, total: int) -> None:
        if fr.status != "written":
            print(f"sonoscore deid: input {fr.input} of {total} (in path order) {fr.reason}", file=sys.stderr)

    report = d.folder(src, out, on_file=progress)
    manifest = report.write_manifest(out / MANIFEST_NAME)
    print(list(summary_lines(report))[-1] + f"; manifest {manifest}")
    return EXIT_OK if report.written == len(report.files) else EXIT_FRAME_ERRORS


def add_parsers(sub) -> None:
    dp = sub.add_parser("deid", help="de-identify DICOM for research: PS3.15 basic profile, keyed UIDs and "
                        "pseudonyms, a manifest of what was done (docs/deid.md)",
                        description="De-identify DICOM files (PS3.15 Basic Application Level Confidentiality "
                        "Profile) into OUT, one file per instance named by its new SOP Instance UID, with "
                        "OUT/deid-manifest.json saying what was done to each. Exit 0: every input written; 3: "
                        "some were refused or skipped (one sentence each on stderr and in the manifest); "
                        "2: could not start.")
    dp.add_argument("input", metavar="IN", help="a folder (read at any depth), a DICOM file, or a DICOMDIR")
    dp.add_argument("output", metavar="OUT", help="the output folder (made if missing)")
    dp.add_argument("--key", help="the secret the UIDs, pseudonyms and date shifts are derived from (default: "
                    "$SONOSCORE_DEID_KEY); the same key gives the same values in every run")
    dp.add_argument("--keep-dates-shifted", action="store_true", help="Retain Longitudinal Temporal Information "
                    "with Modified Dates: shift every date back by a whole number of days derived from the key and "
                    "the patient (times of day kept) instead of removing dates (DCM 113107)")
    dp.add_argument("--keep-device", action="store_true", help="Retain Device Identity: keep station name, "
                    "device serial number and the like (DCM 113109)")
    dp.add_argument("--keep-descriptors", action="store_true", help="Clean Descriptors: keep study and series "
                    "descriptions, protocol name, comments, with every identifier the header holds cut out "
                    "(DCM 113105)")
    dp.add_argument("--safe-private", action="append", metavar="TAG", help="a private attribute to keep (repeat for "
                    "several): GGGG,EEEE or GGGG,CREATOR,EE (Retain Safe Private, DCM 113111); every other private attribute is removed")
    dp.add_argument("--burned-in", choices=("refuse", "blank"), default="refuse", help="an image whose Burned In "
                    "Annotation is YES or absent: refuse it (default), or blank everything outside its ultrasound "
                    "regions (refused when it has none)")
    dp.set_defaults(func=cmd_deid)
