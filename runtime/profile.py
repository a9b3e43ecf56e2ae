"""`sonoscore bench --profile`: where each network's time goes on onnxruntime's CPU provider, per operator type,
for each precision asked, from onnxruntime's own profiler.

Each network file of the bundle (the UNet's and the VGG's, for each precision) runs in a session set up as `run`
and `bench` set theirs up (runtime.backends.ort: every graph optimisation on, so an INT8 file's Q/DQ patterns
become this CPU's integer kernels; sequential execution; the intra-op threads given, default the CPU count; no
spinning) on one seeded random input of the network's shape in [0, 1]: a few warm-up runs in a session without
the profiler, then the timed runs in a profiled one. The profiler's node events are summed per operator type of
the optimised graph (Conv, QLinearConv, DequantizeLinear, ...): for each type, its nodes and its milliseconds per
run; then all node events against the wall time per run (mean and p50), and each precision's speed-up on the
first one's p50.

The networks run one at a time on a fixed input: this is where time goes inside each network, not the frame's
latency (`bench` measures that, with the whole graph on real frames).
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

NETWORKS = ("unet", "vgg")


def profile_file(path: str | Path, *, runs: int, threads: int, warmup: int = 3) -> dict:
    """One ONNX file: {"ops": {type: {"nodes", "ms"}}, "node_ms", "wall_ms", "wall_p50_ms"}, per run."""
    import onnxruntime as ort

    from runtime.backends.ort import optimization_level

    def options() -> "ort.SessionOptions":
        so = ort.SessionOptions()
        so.graph_optimization_level = optimization_level(False)
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.intra_op_num_threads = threads
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.log_severity_level = 3
        return so

    with tempfile.TemporaryDirectory(prefix="sonoscore-profile-") as tmp:
        sess = ort.InferenceSession(str(path), options(), providers=["CPUExecutionProvider"])
        inp = sess.get_inputs()[0]
        shape = [d if isinstance(d, int) else 1 for d in inp.shape]
        x = np.random.default_rng(0).random(shape, dtype=np.float32)
        for _ in range(warmup):
            sess.run(None, {inp.name: x})
        so = options()
        so.enable_profiling = True
        so.profile_file_prefix = str(Path(tmp) / "ort")
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        walls = []
        for _ in range(runs):
            t0 = time.perf_counter()
            sess.run(None, {inp.name: x})
            walls.append((time.perf_counter() - t0) * 1e3)
        events = json.loads(Path(sess.end_profiling()).read_text())
    ops: dict[str, dict] = defaultdict(lambda: {"nodes": set(), "us": 0.0})
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        op = e.get("args", {}).get("op_name", "?")
        ops[op]["nodes"].add(e["name"][:-len("_kernel_time")])
        ops[op]["us"] += float(e.get("dur", 0))
    out = {op: {"nodes": len(v["nodes"]), "ms": round(v["us"] / 1e3 / runs, 4)} for op, v in ops.items()}
    walls.sort()
    return {"ops": out, "node_ms": round(sum(v["ms"] for v in out.values()), 4),
            "wall_ms": round(sum(walls) / len(walls), 4), "wall_p50_ms": round(walls[len(walls) // 2], 4)}


def profile_bundle(bundle_path, *, precisions: list[str], runs: int = 20, warmup: int = 3,
                   threads: int | None = None, networks=NETWORKS, json_path=None, quiet: bool = False) -> dict:
    """Every network of the bundle at every precision asked (in the order given; the first is the speed-up's
    base); prints the tables unless `quiet` and writes the figures to `json_path`."""
    from runtime.bundle import Bundle, BundleError

    bundle = Bundle.load(bundle_path)
    missing = [p for p in precisions if p not in bundle.precisions]
    if missing:
        raise BundleError(f"the bundle '{bundle_path}' has no {', '.join(missing)} files; pass --precision with "
                          f"some of {', '.join(bundle.precisions)}")
    if runs < 1:
        raise BundleError("bench --profile needs --frames of at least 1 (the profiled runs of each network)")
    threads = threads or os.cpu_count() or 1
    out: dict = {"bundle": str(bundle.root), "threads": threads, "runs": runs, "warmup": warmup, "networks": {}}
    for net in networks:
        res = {}
        for p in precisions:
            path = bundle.network_file(net, p)
            res[p] = {"file": path.name, **profile_file(path, runs=runs, threads=threads, warmup=warmup)}
        out["networks"][net] = res
        if not quiet:
            print(table(net, res), flush=True)
    if not quiet:
        print(f"{bundle.root}: {threads} intra-op threads, {warmup} warm-up and {runs} profiled runs per file")
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(out, indent=1) + "\n")
    return out


def table(network: str, res: dict[str, dict]) -> str:
    """One network's per-operator-type table: ms per run (nodes), one column per precision."""
    precs = list(res)
    ops = sorted({op for r in res.values() for op in r["ops"]},
                 key=lambda op: -max(r["ops"].get(op, {}).get("ms", 0.0) for r in res.values()))
    lines = [f"{network}: ms per run by operator type (nodes)",
             f"{'operator type':<26}" + "".join(f"{head:>34}" for head in (f"{p} ({res[p]['file']})" for p in precs))]
    for op in ops:
        cells = ""
        for p in precs:
            o = res[p]["ops"].get(op)
            cells += f"{'-':>34}" if o is None else f"{o['ms']:>27.2f} ({o['nodes']:>4})"
        lines.append(f"{op:<26}{cells}")
    for label, key in (("all nodes", "node_ms"), ("wall, mean", "wall_ms"), ("wall, p50", "wall_p50_ms")):
        lines.append(f"{label:<26}" + "".join(f"{res[p][key]:>27.2f}{'':7}" for p in precs))
    if len(precs) > 1:
        base = res[precs[0]]["wall_p50_ms"]
        lines.append(f"{'speed-up on ' + precs[0] + ', p50':<26}"
                     + "".join(f"{base / res[p]['wall_p50_ms']:>26.2f}x{'':7}" for p in precs))
    return "\n".join(lines)
