"""`--engine ray`: Ray Data (ray 2.60.0, the `batch` extra). The study list becomes a dataset of one-study blocks,
`map_batches` runs them through a pool of `workers` actors (each loads the bundle once: `Scorer`), and the driver
writes what comes back, as the local engine does: the same Parquet files, so the same schema.

    ray.data.from_items(units) -> map_batches(_RayScorer, batch_size=1, compute=ActorPoolStrategy(size=workers),
                                              num_cpus=..., num_gpus=...) -> iter_rows() in the driver -> Store

Resources. Each actor asks for `threads` CPUs (its networks' threads), or less when workers x threads would take
every CPU of the cluster: a pool that holds every CPU leaves none for Ray Data's own tasks and the job hangs, so one
CPU is always left to the driver's side. With device cuda each actor asks for a share of a GPU (min(1, GPUs /
workers)). `address` joins a running cluster (`ray start --head` ...; "auto" finds the local one); without it a
local Ray is started for the job (no dashboard, a small object store) and stopped after it.

What the actors need on every node: the bundle and the archive at the same paths (a shared file system), and
this package. Only the driver writes the output, so --out needs to exist on the driver only.

Faults: a dead actor is restarted and its study retried by Ray (Ray Data's actor pools restart actors and retry
their tasks by default); a killed driver ends the job, and the rerun skips what was written.
"""
from __future__ import annotations

import json
import logging
from typing import Callable

log = logging.getLogger("sonoscore.batch")
RAY_VERSION = "2.60.0"


class _RayScorer:
    def __init__(self, scorer_args: dict):
        from runtime.batch.score import Scorer
        self.scorer = Scorer(**scorer_args)

    def __call__(self, batch: dict) -> dict:
        import numpy as np
        from runtime.batch.tables import to_bytes
        keys, frames, studies = [], [], []
        for text in batch["unit"]:
            unit = json.loads(text)
            f, s = self.scorer.study(unit)
            keys.append(unit["key"])
            frames.append(to_bytes(f))
            studies.append(to_bytes(s))
        return {"key": np.array(keys, dtype=object), "frames": np.array(frames, dtype=object),
                "studies": np.array(studies, dtype=object)}


def import_ray():
    from runtime.errors import UserError
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise UserError(f"--engine ray needs Ray Data; install it with pip install 'sonoscore[batch]' "
                        f"(ray[data]=={RAY_VERSION})") from None
    return ray


def run(units: list[dict], scorer_args: dict, workers: int, on_result: Callable[[dict, tuple], None],
        on_failure: Callable[[dict, str], None], *, address: str | None = None, threads: int = 1,
        device: str = "cpu") -> None:
    ray = import_ray()
    started = False
    if not ray.is_initialized():
        if address:
            ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
        else:
            from runtime.batch.store import cores
            ray.init(num_cpus=cores(), include_dashboard=False, object_store_memory=200 * 1024 ** 2,
                     log_to_driver=False, logging_level=logging.WARNING)
        started = True
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        res = ray.cluster_resources()
        total_cpu = float(res.get("CPU", 1))
        per_cpu = float(threads)
        if workers * per_cpu > total_cpu - 1:     # leave the driver's side one CPU (see above)
            per_cpu = max(0.01, round((total_cpu - 1) / workers, 2)) if total_cpu > 1 else 0.5 / workers
        per_gpu = 0.0
        if device == "cuda":
            gpus = float(res.get("GPU", 0))
            if not gpus:
                from runtime.errors import UserError
                raise UserError("--device cuda: the Ray cluster has no GPU; use --device cpu")
            per_gpu = min(1.0, gpus / workers)
        log.info("batch: ray %s, %d actor(s), %.2f CPU%s each, %d thread(s) per network", ray.__version__, workers,
                 per_cpu, f" and {per_gpu:g} GPU" if per_gpu else "", threads)
        by_key = {u["key"]: u for u in units}
        ds = ray.data.from_items([{"unit": json.dumps(u)} for u in units], override_num_blocks=len(units))
        extra = {"num_gpus": per_gpu} if per_gpu else {}
        ds = ds.map_batches(_RayScorer, fn_constructor_kwargs={"scorer_args": scorer_args}, batch_size=1,
                            compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=per_cpu,
                            **extra)
        for row in ds.iter_rows():
            on_result(by_key[row["key"]], (row["key"], row["frames"], row["studies"]))
    finally:
        if started:
            ray.shutdown()
