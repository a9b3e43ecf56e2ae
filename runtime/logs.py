"""Where sonoscore's own lines go: `logging`, under the logger "sonoscore" (each part its own child:
`logs.get("bench")` is "sonoscore.bench"). The lines are plain text on stderr, one per message, written to
whatever `sys.stderr` is when the line is logged (a test's captured stream, a redirected one); an embedding
application can replace the handler (`logging.getLogger("sonoscore").handlers`) to route them its own way. They do
not propagate to the root logger: libraries that configure it (logging.basicConfig, as some do during training)
would print every line twice.
Results and figures a command prints on purpose (a bench table, `info`) stay on stdout; everything that says what is
happening goes through here.
"""
from __future__ import annotations

import logging
import sys

ROOT = "sonoscore"


class StderrHandler(logging.StreamHandler):
    """A StreamHandler bound to the current `sys.stderr` at every line, not the one there when it was made."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):                        # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:         # logging.StreamHandler.__init__ sets it; the property ignores it
        pass


def _install() -> None:
    root = logging.getLogger(ROOT)
    if not any(isinstance(h, StderrHandler) for h in root.handlers):
        handler = StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        root.propagate = False     # said once: a library that configures the root logger does not repeat them


def get(part: str) -> logging.Logger:
    """The logger of one part of sonoscore ("bench", "calibrate", "train", ...)."""
    _install()
    return logging.getLogger(f"{ROOT}.{part}")
