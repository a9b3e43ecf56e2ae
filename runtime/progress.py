"""Long work shows it is alive, one way everywhere (simulating a dataset, training epochs, calibration, engine
builds): a tqdm bar on a terminal; elsewhere (logs, CI, systemd, pipes) a line at every tenth of the work, with
the seconds so far, through runtime.logs ("sonoscore.progress"), never a bar's carriage returns.

    with Progress("calibrate unet", total=300, unit="frame") as p:
        for i, x in enumerate(frames, 1):
            ...
            p.update(i)                       # or p.advance()

    for patient in Progress("sim", total=n, unit="patient").iterate(range(n)): ...
"""
from __future__ import annotations

import sys
import time
from typing import Iterable, Iterator, TypeVar

from runtime import logs

T = TypeVar("T")
log = logs.get("progress")


class Progress:
    """Progress of `total` units of work called `desc`. `enabled=False` says nothing at all; `lines=False` shows the
    bar on a terminal but writes no lines elsewhere (work that logs its own line when it ends, e.g. an epoch)."""

    def __init__(self, desc: str, total: int, *, unit: str = "item", enabled: bool = True, indent: str = "",
                 lines: bool = True):
        self.desc, self.total, self.unit, self.enabled = desc, max(1, int(total)), unit, enabled
        self.lines = lines
        self.indent, self.done, self.t0 = indent, 0, time.perf_counter()
        self._every = max(1, self.total // 10)
        self._said = 0
        self._bar = None
        if enabled and sys.stderr.isatty():
            try:
                from tqdm import tqdm
            except ImportError:      # the runtime alone has no tqdm: lines then
                tqdm = None
            if tqdm is not None:
                self._bar = tqdm(total=self.total, desc=desc, unit=unit, file=sys.stderr, leave=False,
                                 dynamic_ncols=True, mininterval=1.0)

    def update(self, done: int) -> None:
        """`done` units of the total are finished."""
        self.done = min(int(done), self.total)
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.n = self.done
            self._bar.refresh()
        elif self.lines and (self.done // self._every > self._said // self._every
                             or self.done == self.total > self._said):
            self._said = self.done
            log.info("%s%s: %d/%d %ss (%.0f s)", self.indent, self.desc, self.done, self.total, self.unit,
                     time.perf_counter() - self.t0)

    def note(self, **values) -> None:
        """Figures shown beside the bar on a terminal (e.g. the running loss); nothing elsewhere."""
        if self._bar is not None:
            self._bar.set_postfix(**values)

    def advance(self, n: int = 1) -> None:
        self.update(self.done + n)

    def iterate(self, items: Iterable[T]) -> Iterator[T]:
        """Yield `items`, advancing once after each; closes at the end."""
        try:
            for item in items:
                yield item
                self.advance()
        finally:
            self.close()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
