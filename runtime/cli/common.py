"""What every command group shares: exit codes, the trust option, signals, the kidney-label option, the backend
options, and the errors that are the user's (one sentence, exit 2)."""
from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
from pathlib import Path

EXIT_OK, EXIT_INTERNAL, EXIT_USER, EXIT_FRAME_ERRORS, EXIT_ACCURACY, EXIT_OUTPUT = 0, 1, 2, 3, 4, 5
EXIT_SIGNAL_BASE = 128          # stopped by signal N: 128 + N (SIGINT 130, SIGHUP 129, SIGTERM 143)
STOP_SIGNALS = tuple(s for s in (getattr(signal, n, None) for n in ("SIGINT", "SIGTERM", "SIGHUP")) if s)

from runtime.errors import UserError  # noqa: E402

TRUST_HELP = ("the public key (PEM) the bundle must be signed with (`sonoscore sign`); an unsigned bundle or one "
              "changed since signing is refused (exit 2). Default: $SONOSCORE_TRUST. Without either, an unsigned "
              "bundle runs with one warning line")


def user_error_types() -> tuple[type[BaseException], ...]:
    from runtime.backends import BackendUnavailable
    from runtime.booster import BoosterError
    from runtime.bundle import BundleError
    from runtime.preprocess import FrameError
    from runtime.sources import SourceError
    return (UserError, BundleError, SourceError, BoosterError, BackendUnavailable, FrameError, FileNotFoundError)


@contextlib.contextmanager
def stop_signals(stop):
    """SIGINT, SIGTERM and SIGHUP (Ctrl-C, `systemctl stop`, a closed terminal or ssh session) end `run` the same
    way. While the stream runs, the first one asks it to stop after the frame in hand (its outputs are then
    finished: the results renamed into place, the video's index written, the summary and report written); a
    second one interrupts at once (the outputs are still finished). While the outputs are being finished, more
    signals are noted and ignored. Before the stream has started there is nothing to finish: the signal
    interrupts (KeyboardInterrupt). Outside the main thread (tests calling main() from a thread), nothing is
    installed."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_signal(signum, frame):
        first = not stop.is_set()
        if stop.phase in ("finishing", "done"):
            stop.set(signum)
            return
        if stop.phase == "streaming" and first:
            stop.set(signum)
            print(f"sonoscore: {signal.Signals(signum).name} received: stopping after the frame in hand and "
                  f"finishing the outputs (send it again to stop at once)", file=sys.stderr, flush=True)
            return
        stop.set(signum)
        raise KeyboardInterrupt

    previous = {s: signal.signal(s, on_signal) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)

def check_trust(args: argparse.Namespace) -> None:
    """--trust (or SONOSCORE_TRUST) for eval and bench: the bundle's signature must verify with that key; without
    one, an unsigned bundle gets one warning line (runtime/signing.py). A bundle without a scope reference gets one
    warning line too (`Bundle.scope_warning`)."""
    from runtime.bundle import Bundle
    from runtime.signing import check_trust, is_signed, trust_option, unsigned_warning
    trust, label = trust_option(args.trust)
    check_trust(args.bundle, trust, label=label)
    if not trust and not is_signed(args.bundle) and (Path(args.bundle) / "manifest.json").is_file():
        Bundle.load(args.bundle)          # a bundle that cannot load is refused before any warning
        print(unsigned_warning(args.bundle), file=sys.stderr, flush=True)
    if (Path(args.bundle) / "manifest.json").is_file():   # no scope reference: one line at every start
        from runtime.bundle import BundleError
        try:
            warning = Bundle.load(args.bundle, verify=False).scope_warning
        except BundleError:
            warning = None                # the command refuses the bundle in its own sentence
        if warning:
            print(warning, file=sys.stderr, flush=True)

def kidney_labels(texts: list[str] | None):
    """`--label kidney=...` (repeatable) -> runtime.labelme.LabelMap; a bad one is one sentence (exit 2)."""
    from runtime.labelme import LabelMap
    try:
        return LabelMap.parse(texts)
    except ValueError as e:
        raise UserError(str(e)) from None


LABEL_HELP = ("which labelme labels are the kidney, e.g. kidney=\"kidney,left kidney,Kidney_R\" (repeatable; case, "
              "spaces, underscores and hyphens ignored); default: kidney and its usual variants (left/right kidney, "
              "kidney_l/kidney_r, lt kidney, ...; docs/models.md, 'Labelme datasets')")


def backend_opts(sp, several=False):
    """--backend, --precision (one, or several joined by commas), --threads and --trust."""
    sp.add_argument("--backend", default="ort", choices=["ort", "trt"], help="inference backend (default ort)")
    if several:
        sp.add_argument("--precision", default="fp32", help="fp32, fp16 or int8, or several joined by commas "
                        "(fp32,int8): they take turns frame by frame and the speed-up is reported")
    else:
        sp.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "int8"],
                        help="which of the bundle's network files to run (default fp32; int8 needs "
                             "`sonoscore calibrate` first)")
    sp.add_argument("--threads", type=int, default=None, help="CPU threads per network (default: all cores)")
    sp.add_argument("--trust", metavar="PUB", default=None, help=TRUST_HELP)
