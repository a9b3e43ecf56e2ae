"""`listen`: the DICOM Storage SCP that scores the studies a scanner sends and sends the results to a PACS."""
from __future__ import annotations

import argparse
import signal

from runtime.cli.common import EXIT_SIGNAL_BASE, stop_signals


def cmd_listen(args: argparse.Namespace) -> int:
    if args.check_config:                 # the first-contact check: folders and destinations, then exit
        from runtime.dicomnet.check import check_config
        return check_config(args.config)
    if args.status:                       # the spool's studies and the outbox, then exit
        from runtime.dicomnet.listen_status import status_command
        return status_command(args.config)
    if args.deliver:                      # what waits in the outbox, then exit
        from runtime.dicomnet.send import deliver_command
        return deliver_command(args.config, quiet=args.quiet)
    from runtime.dicomnet.listen import listen_command
    from runtime.stream import StopRequest
    stop = StopRequest()
    with stop_signals(stop):
        try:
            return listen_command(args, stop)
        except KeyboardInterrupt:
            return EXIT_SIGNAL_BASE + (stop.signum or signal.SIGINT)


def add_parsers(sub) -> None:
    ls = sub.add_parser("listen", help="DICOM Storage SCP: score the ultrasound studies received, send the results "
                        "(SR, SEG, SC) to a PACS")
    ls.add_argument("--config", required=True, metavar="YAML", help="the listen/send configuration "
                    "(docs/hospital.md, 'DICOM network'; device/listen.example.yaml)")
    ls.add_argument("--bundle", help="the model bundle (default: the configuration's processing.bundle)")
    ls.add_argument("--device", choices=["cpu", "cuda"], default=None, help="cuda: the frames stay on the GPU "
                    "(docs/jetson.md); default: processing.device, else cpu")
    ls.add_argument("--backend", choices=["ort", "trt"], default=None, help="default: processing.backend, else ort")
    ls.add_argument("--precision", choices=["fp32", "fp16", "int8"], default=None,
                    help="default: processing.precision, else fp32")
    ls.add_argument("--threads", type=int, default=None, help="CPU threads per network (default: all cores)")
    ls.add_argument("--trust", metavar="PUB", default=None, help="the public key the bundle's signature must "
                    "verify with (default: $SONOSCORE_TRUST)")
    ls.add_argument("--deidentify", action="store_true", help="de-identified DICOM results (PS3.15 basic profile "
                    "pseudonyms, no Secondary Capture), for research; the same as results.deidentify: true")
    ls.add_argument("--quiet", action="store_true", help="log warnings and errors only")
    once = ls.add_mutually_exclusive_group()
    once.add_argument("--check-config", action="store_true", help="check the configuration, make its folders and "
                      "C-ECHO each PACS (a DICOMweb one: a QIDO-RS query), then exit without listening: 0 when all "
                      "is ready, 2 when not (docs/hospital.md, 'First connection')")
    once.add_argument("--deliver", action="store_true", help="deliver what waits in the outbox, then exit without "
                      "listening (0: all delivered, 5: some still wait); the file needs no listen section")
    once.add_argument("--status", action="store_true", help="list the spool's studies (waiting, scoring, done, "
                      "failed with the reason) and the results waiting in the outbox per destination, then exit 0 "
                      "(docs/hospital.md, 'Status and failed studies')")
    ls.set_defaults(func=cmd_listen)
