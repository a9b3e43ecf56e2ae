"""`--engine local`: worker processes on this machine (spawned, never forked: onnxruntime's threads do not survive
a fork), each loading the bundle once (`Scorer`) and running `threads` CPU threads per network, so that workers x
threads does not exceed the cores. The driver hands out at most two studies per worker at a time and writes what
comes back (runtime/batch/store.py).

A worker that dies (killed, out of memory) breaks the pool: the studies in flight then are handed out again to a
new pool, up to MAX_ATTEMPTS times each, after which the study is a studies row with its error. A worker whose
driver has gone (killed) ends within a second.
"""
from __future__ import annotations

import logging
import os
import threading
from collections import deque
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Callable

log = logging.getLogger("sonoscore.batch")
MAX_ATTEMPTS = 3

_scorer = None


def _init(scorer_args: dict) -> None:
    global _scorer
    parent = os.getppid()

    def watch():                          # the driver was killed: end, do not finish studies nobody will write
        while True:
            threading.Event().wait(1.0)
            if os.getppid() != parent:
                os._exit(0)
    threading.Thread(target=watch, daemon=True).start()
    from runtime import logs  # noqa: F401  (the sonoscore log handler in this process too)
    from runtime.batch.score import Scorer
    _scorer = Scorer(**scorer_args)


def _score(unit: dict) -> tuple[str, bytes, bytes]:
    from runtime.batch.tables import to_bytes
    frames, studies = _scorer.study(unit)
    return unit["key"], to_bytes(frames), to_bytes(studies)


def run(units: list[dict], scorer_args: dict, workers: int, on_result: Callable[[dict, tuple], None],
        on_failure: Callable[[dict, str], None]) -> None:
    import multiprocessing as mp
    ctx = mp.get_context("spawn")
    pending = deque(units)
    attempts: dict[str, int] = {}
    barren = 0                            # pools in a row that broke before returning anything
    while pending:
        returned = 0
        inflight: dict = {}
        pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init, initargs=(scorer_args,))
        try:
            while pending or inflight:
                while pending and len(inflight) < 2 * workers:
                    inflight[pool.submit(_score, pending[0])] = pending[0]   # submit raises on a broken pool:
                    pending.popleft()                                       # the unit stays pending then
                done, _ = wait(inflight, return_when=FIRST_COMPLETED)
                for f in done:
                    result = f.result()   # BrokenProcessPool when a worker died
                    on_result(inflight.pop(f), result)
                    returned += 1
        except BrokenProcessPool:
            lost = []
            for f, u in inflight.items():
                if f.done() and not f.cancelled() and f.exception() is None:
                    on_result(u, f.result())
                    returned += 1
                    continue
                attempts[u["key"]] = attempts.get(u["key"], 0) + 1
                if attempts[u["key"]] >= MAX_ATTEMPTS:
                    on_failure(u, f"the study could not be scored: its worker process died {MAX_ATTEMPTS} times "
                                  f"(killed, or out of memory)")
                else:
                    lost.append(u)
            pending.extendleft(reversed(lost))
            barren = barren + 1 if not returned else 0
            if barren >= MAX_ATTEMPTS:
                raise RuntimeError(f"the batch workers died {MAX_ATTEMPTS} times before scoring any study (see the "
                                   f"lines above; is there memory for {workers} workers?)")
            log.warning("batch: a worker process died; %d study(ies) in flight are handed out again", len(lost))
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
