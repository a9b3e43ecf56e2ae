"""`batch`: an archive of studies through a bundle into a Parquet dataset (runtime/batch/, docs/scale.md);
`sim-archive`: a synthetic DICOM archive from the simulated probe to try it on."""
from __future__ import annotations

import argparse
import os

from runtime.cli.common import EXIT_FRAME_ERRORS, EXIT_OK, TRUST_HELP, UserError


def cmd_batch(args: argparse.Namespace) -> int:
    from runtime.batch import Options, run_batch
    from runtime.cli.common import check_trust
    check_trust(args)
    key = os.environ.get("SONOSCORE_DEID_KEY") or None if args.deidentify else None
    opts = Options(bundle=args.bundle, source=args.source, out=args.out, engine=args.engine, workers=args.workers,
                   threads=args.threads, address=args.address, deidentify=args.deidentify, deid_key=key,
                   record_paths=args.record_paths, precision=args.precision, device=args.device,
                   progress=not args.quiet)
    r = run_batch(opts)
    rate = f"{r.studies_per_s:.3f} studies/s, {r.frames / r.seconds if r.seconds else 0:.1f} frames/s"
    print(f"sonoscore batch: {r.written} studies written ({r.failed} with an error), {r.skipped} already there, "
          f"{r.total} in the source; {r.frames} frames in {r.seconds:.1f} s ({rate}); {args.out}")
    return EXIT_FRAME_ERRORS if r.failed else EXIT_OK


def cmd_sim_archive(args: argparse.Namespace) -> int:
    from runtime.batch.archive import write_archive
    if args.studies < 1 or args.files < 1 or args.frames < 1:
        raise UserError("--studies, --files and --frames must be at least 1")
    write_archive(args.out, studies=args.studies, files_per_study=args.files, frames_per_file=args.frames,
                  seed=args.seed)
    print(f"sonoscore sim-archive: {args.studies} studies x {args.files} files x {args.frames} frames in {args.out}")
    return EXIT_OK


def add_parsers(sub) -> None:
    bp = sub.add_parser("batch", help="score an archive of studies into a Parquet dataset (frames/, studies/), "
                        "on this machine or a Ray cluster; resumable (docs/scale.md)",
                        description="Score every study of SRC (a folder tree of DICOM or images, or a CSV with a "
                        "'path' column) with the bundle, the same graph as `run`, into OUT/frames/ and OUT/studies/ "
                        "(Parquet, one file per study named by a keyed hash of its Study UID). A rerun with the same "
                        "OUT skips the studies already written. Exit 0: every study scored; 3: some studies carry "
                        "an error (their studies row says which); 2: could not start.")
    bp.add_argument("--bundle", required=True, help="the bundle folder")
    bp.add_argument("--source", required=True, metavar="SRC", help="a folder of DICOM studies or of images (one "
                    "study per folder), or a CSV listing files")
    bp.add_argument("--out", required=True, metavar="DIR", help="the output folder (made if missing; resumed if "
                    "it holds an earlier run with the same bundle and options)")
    bp.add_argument("--engine", default="local", choices=["local", "ray"], help="local: worker processes on this "
                    "machine (default); ray: a Ray Data actor pool (pip install 'sonoscore[batch]')")
    bp.add_argument("--workers", type=int, default=1, help="worker processes or Ray actors, each loading the bundle "
                    "once (default 1)")
    bp.add_argument("--threads", type=int, default=None, help="CPU threads per network per worker (default: cores "
                    "/ workers)")
    bp.add_argument("--address", default=None, metavar="RAY_ADDR", help="with --engine ray: join this running "
                    "cluster (host:port or auto) instead of starting a local Ray")
    bp.add_argument("--deidentify", action="store_true", help="keyed replacements for every UID (with "
                    "SONOSCORE_DEID_KEY set: runtime.deid's, the UIDs `sonoscore deid` writes; else keyed by the "
                    "installation's salt); the same key gives the same values in every run")
    bp.add_argument("--record-paths", action="store_true", help="add each frame's file (relative to SRC) as "
                    "source_file; not with --deidentify (a path may name a patient)")
    bp.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "int8"], help="the bundle's network "
                    "files to run (default fp32)")
    bp.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cpu (default) or cuda (with Ray: "
                    "a share of a GPU per actor)")
    bp.add_argument("--trust", metavar="PUB", default=None, help=TRUST_HELP)
    bp.add_argument("--quiet", action="store_true", help="no progress")
    bp.set_defaults(func=cmd_batch)

    ap = sub.add_parser("sim-archive", help="write a synthetic DICOM archive (simulated probe) for `batch`",
                        description="Write STUDIES DICOM studies of the simulated probe into OUT: "
                        "study-NNNNN/series-1/img-MMM.dcm, US Multi-frame with ultrasound regions; synthetic "
                        "patient attributes only.")
    ap.add_argument("out", metavar="OUT", help="the archive's folder (made when missing)")
    ap.add_argument("--studies", type=int, default=10, help="how many studies (default 10)")
    ap.add_argument("--files", type=int, default=2, help="files per study (default 2)")
    ap.add_argument("--frames", type=int, default=4, help="frames per file (default 4)")
    ap.add_argument("--seed", type=int, default=0, help="the phantom patients' seed (default 0): the same seed "
                    "writes the same archive")
    ap.set_defaults(func=cmd_sim_archive)

