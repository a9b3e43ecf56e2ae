#!/usr/bin/env python3
"""Where a network's time goes on onnxruntime CPU, FP32 against INT8: per operator type, from onnxruntime's profiler.

    .venv/bin/python scripts/int8_profile.py --bundle B [--network unet] [--runs 20] [--threads N]
        [--precisions fp32,int8] [--json out.json] [--graph DIR]

For each precision the bundle's file for `--network` runs in the default session `bench` and `run` use
(runtime.backends.ort: all graph optimisations on, so Q/DQ patterns become this CPU's integer kernels, sequential
execution, `--threads` intra-op threads, default the CPU count) on one random [1, C, H, W] input in [0, 1], a few
warm-up runs and then `--runs` profiled runs. The profiler's node events are summed per operator type of the
optimised graph (QLinearConv, QLinearLeakyRelu, DequantizeLinear, ...), per run: the table has, for each type, the
nodes of that type and their milliseconds per run, and the total of the node events against the wall time per run.

`--graph DIR` also writes each optimised graph (<network>.<precision>.opt.onnx): it holds this CPU's layout
transforms, so it is for reading (which nodes became integer kernels), not for shipping.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def profile(path: Path, *, runs: int, threads: int, warmup: int = 3, graph: Path | None = None) -> dict:
    """Per-op-type milliseconds per run of one ONNX file ({"ops": {type: {"nodes", "ms"}}, "node_ms", "wall_ms"})."""
    import numpy as np
    import onnxruntime as ort

    from runtime.backends.ort import optimization_level

    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.graph_optimization_level = optimization_level(False)
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.intra_op_num_threads = threads
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if graph is not None:
            so.optimized_model_filepath = str(graph)
        # Warm-up first in a session without the profiler, so the profile holds only the timed runs.
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        inp = sess.get_inputs()[0]
        shape = [d if isinstance(d, int) else 1 for d in inp.shape]
        x = np.random.default_rng(0).random(shape, dtype=np.float32)
        so.optimized_model_filepath = ""
        so.enable_profiling = True
        so.profile_file_prefix = str(Path(tmp) / "ort")
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        for _ in range(warmup):
            sess.run(None, {inp.name: x})
        sess.end_profiling()
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
    out = {op: {"nodes": len(v["nodes"]), "ms": v["us"] / 1e3 / runs} for op, v in ops.items()}
    walls.sort()
    return {"ops": out, "node_ms": sum(v["ms"] for v in out.values()), "wall_ms": sum(walls) / len(walls),
            "wall_p50_ms": walls[len(walls) // 2]}


def table(network: str, res: dict[str, dict]) -> str:
    precs = list(res)
    ops = sorted({op for r in res.values() for op in r["ops"]},
                 key=lambda op: -max(r["ops"].get(op, {}).get("ms", 0.0) for r in res.values()))
    head = f"{network}: ms per run by operator type (nodes)"
    cols = "".join(f"{p:>20}" for p in precs)
    lines = [head, f"{'operator type':<26}{cols}"]
    for op in ops:
        cells = ""
        for p in precs:
            o = res[p]["ops"].get(op)
            cells += f"{'-':>20}" if o is None else f"{o['ms']:>13.2f} ({o['nodes']:>3})"
        lines.append(f"{op:<26}{cells}")
    lines.append(f"{'all nodes':<26}" + "".join(f"{res[p]['node_ms']:>13.2f}{'':7}" for p in precs))
    lines.append(f"{'wall, mean':<26}" + "".join(f"{res[p]['wall_ms']:>13.2f}{'':7}" for p in precs))
    lines.append(f"{'wall, p50':<26}" + "".join(f"{res[p]['wall_p50_ms']:>13.2f}{'':7}" for p in precs))
    if len(precs) > 1:
        base = res[precs[0]]["wall_p50_ms"]
        lines.append(f"{'speed-up, p50':<26}" + "".join(f"{base / res[p]['wall_p50_ms']:>12.2f}x{'':7}"
                                                          for p in precs))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--network", default="unet", choices=("unet", "vgg"))
    ap.add_argument("--precisions", default="fp32,int8")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--threads", type=int, default=0, help="intra-op threads (default: the CPU count, as bench)")
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("--graph", help="write each optimised graph into this folder")
    a = ap.parse_args(argv)

    from runtime.bundle import Bundle, BundleError

    try:
        bundle = Bundle.load(a.bundle)
        precisions = [p.strip() for p in a.precisions.split(",") if p.strip()]
        missing = [p for p in precisions if p not in bundle.precisions]
        if missing:
            raise BundleError(f"the bundle '{a.bundle}' has no {', '.join(missing)} files; pass --precisions with "
                              f"some of {', '.join(bundle.precisions)}")
    except BundleError as e:
        print(f"int8_profile: {e}", file=sys.stderr)
        return 2
    if a.runs < 1:
        print("int8_profile: --runs must be at least 1", file=sys.stderr)
        return 2
    threads = a.threads or os.cpu_count() or 1
    res = {}
    for p in precisions:
        path = bundle.network_file(a.network, p)
        graph = None
        if a.graph:
            Path(a.graph).mkdir(parents=True, exist_ok=True)
            graph = Path(a.graph) / f"{a.network}.{p}.opt.onnx"
        res[p] = profile(path, runs=a.runs, threads=threads, graph=graph)
        res[p]["file"] = path.name
    print(f"{bundle.root}: {a.network}, {threads} intra-op threads, {a.runs} runs")
    print(table(a.network, res))
    if a.json:
        Path(a.json).write_text(json.dumps({"bundle": str(bundle.root), "network": a.network, "threads": threads,
                                            "runs": a.runs, "precisions": res}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
