"""`sonoscore` command line, one module per command group. Heavy modules are imported inside each command, so
`--help` works on a bare install.

    streaming.py  run, demo
    checks.py     eval, bench, doctor
    models.py     sim, train, export, calibrate
    hospital.py   listen
    bundles.py    keygen, sign, verify, info
    data.py       deid
    batch.py      batch, sim-archive
    common.py     exit codes, signals, the options several commands share

Exit codes (docs/design.md "Exit codes"): 0 success; 2 could not start (a bad option, bundle, source, dataset,
backend or output path: one sentence says which, and no output was touched); 3 `run`/`eval` finished but some
input frames carried an error (each still has its record); 4 `calibrate` ran but a lower precision missed an
accuracy threshold (the report says which); 5 `run` ran but an output could not be written (one sentence each
says which; the others are complete); 128 + the signal's number when `run` was stopped by SIGINT (130), SIGHUP
(129) or SIGTERM (143), after finishing its outputs; 1 internal failure. 5 wins over a signal's code, which
wins over 3.
"""
from __future__ import annotations

import argparse
import sys

from runtime.cli import batch, bundles, checks, data, hospital, models, streaming
from runtime.cli.common import (EXIT_ACCURACY, EXIT_FRAME_ERRORS, EXIT_INTERNAL, EXIT_OK, EXIT_OUTPUT,  # noqa: F401
                                EXIT_SIGNAL_BASE, EXIT_USER, user_error_types)

GROUPS = (streaming, checks, models, hospital, bundles, data, batch)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sonoscore", description=(
        "Edge ultrasound inference runtime: kidney mask, quality gate, deep features and a compiled booster "
        "grade IFTA (1-4) frame by frame. Not a medical device."))
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for group in GROUPS:
        group.add_parsers(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USER
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("sonoscore: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if isinstance(e, user_error_types()):
            print(f"sonoscore: {e}", file=sys.stderr)
            return EXIT_USER
        raise
