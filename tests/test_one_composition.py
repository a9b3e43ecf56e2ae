"""The per-frame graph is composed once, in runtime/graph.py (docs/design.md, "The per-frame graph").

Every module under runtime/, export/ and calibration/ is read with `ast` (nothing is imported or run), and each
call is classified by what it does to a frame:

- a network step of the graph: `X.segment(`, `X.features(`, `X.infer_features(`, `X.score(` (any receiver but
  `self`: a torch module's own `self.features(x)` is not the graph's). Only `Graph.run` calls them, so a caller can
  neither skip a stage nor do one its own way.
- a stage of the sequence UNet -> gate -> VGG -> booster: the graph's steps above and `unet_feeds` (UNet),
  `gate` / `gate_mask` / `accepts` (gate), `vgg_feeds` (VGG); a runner's `infer(` / `infer_device(` on a receiver
  named for the UNet or the VGG (`unet`, `pipe.vgg`, `un`, `vg`); `predict(` / `predict_one(` on a receiver named
  for the booster. A function (or a module's top-level code) that calls steps of two or more stages puts the
  sequence together itself.
- the gate's verdict on a mask it did not threshold itself, `X.gate_mask(`: a given mask goes through `Graph.run`
  (`mask=`), a labelled one through the one kidney rule (`Graph.is_kidney` / `kidney_frames`).
- the source preparation (gray with its window, the scan-sector rule, crop, resize, Crimmins): `sector_frame(`,
  the module function `preprocess.preprocess(` / `pp.preprocess(`, or a graph's `.preprocess(` (receiver `graph`,
  `g`, `*.graph`, `*.graph()`). Only `Graph.prepare_source` (and `Graph.preprocess`, which it calls) does that.

One module is let off, and the test checks it still needs to be: runtime/gpu/pipeline.py, the device-resident
pipeline, runs the same steps as CUDA kernels on device memory (which `Graph.run`'s host arrays cannot carry) and
takes its threshold, acceptance and scoring from the Graph.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WALKED = ("runtime", "export", "calibration")
HOME = {"runtime/graph.py"}                          # where the composition lives
PREPARATION_HOME = {"runtime/graph.py", "runtime/preprocess.py"}   # the steps' definitions
LET_OFF = {"runtime/gpu/pipeline.py": "the device-resident pipeline: the same steps as CUDA kernels on device memory"}

NETWORK_STEPS = {"segment", "features", "infer_features", "score"}
GRAPH_STEP_STAGE = {"segment": "unet", "unet_feeds": "unet", "gate": "gate", "gate_mask": "gate", "accepts": "gate",
                    "features": "vgg", "infer_features": "vgg", "vgg_feeds": "vgg", "score": "booster"}
RUNNER_CALLS = {"infer", "infer_device"}
BOOSTER_CALLS = {"predict", "predict_one"}
GRAPH_NAMES = {"graph", "g"}


def _receiver(node: ast.Call) -> ast.expr | None:
    return node.func.value if isinstance(node.func, ast.Attribute) else None


def _last_name(expr: ast.expr | None) -> str:
    """The receiver's last identifier: `unet` for unet, `vgg` for pipe.vgg, `graph` for bundle.graph()."""
    if isinstance(expr, ast.Call):
        expr = expr.func
    if isinstance(expr, ast.Attribute):
        return expr.attr
    if isinstance(expr, ast.Name):
        return expr.id
    return ""


def _stage(node: ast.Call) -> str | None:
    """Which stage of UNet -> gate -> VGG -> booster the call performs, if any."""
    if not isinstance(node.func, ast.Attribute):
        return None
    method, recv = node.func.attr, _receiver(node)
    if isinstance(recv, ast.Name) and recv.id == "self":
        return None
    name = _last_name(recv).lower()
    if method in GRAPH_STEP_STAGE:
        if method == "gate" and name in ("k", "kernels"):    # the GPU kernels' gate launch: a stage, named alike
            return "gate"
        return GRAPH_STEP_STAGE[method]
    if method in RUNNER_CALLS:
        if "unet" in name or name == "un":
            return "unet"
        if "vgg" in name or name == "vg":
            return "vgg"
    if method in BOOSTER_CALLS and "booster" in name:
        return "booster"
    return None


def _is_preparation(node: ast.Call) -> bool:
    f = node.func
    if isinstance(f, ast.Name):
        return f.id == "sector_frame"
    if not isinstance(f, ast.Attribute):
        return False
    if f.attr == "sector_frame":
        return True
    if f.attr != "preprocess":
        return False
    recv = f.value
    if isinstance(recv, ast.Name) and recv.id in ("pp", "preprocess"):   # runtime.preprocess.preprocess
        return True
    return _last_name(recv) in GRAPH_NAMES


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node


def _scopes(tree: ast.AST):
    """(name, node) of the module and of every function in it (a function's calls include its nested ones)."""
    yield "<module>", tree
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node.name, node


def findings(source: str, rel: str) -> dict[str, list[str]]:
    """What a module does that only runtime/graph.py may: {"network steps": [...], "stages": [...],
    "preparation": [...]}, each entry "line N: call"."""
    tree = ast.parse(source, filename=rel)
    steps, prep, composed, judged = [], [], [], []
    for node in _calls(tree):
        where = f"line {node.lineno}: {ast.unparse(node.func)}("
        if isinstance(node.func, ast.Attribute) and node.func.attr == "gate_mask":
            judged.append(where)
        if isinstance(node.func, ast.Attribute) and node.func.attr in NETWORK_STEPS \
                and not (isinstance(node.func.value, ast.Name) and node.func.value.id == "self"):
            steps.append(where)
        if _is_preparation(node):
            prep.append(where)
    for name, scope in _scopes(tree):
        body = scope.body if isinstance(scope, ast.Module) else [scope]
        stages: dict[str, list[str]] = {}
        for part in body:
            if isinstance(scope, ast.Module) and isinstance(part, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                                   ast.ClassDef)):
                continue          # module-level code only; functions are scopes of their own
            for node in _calls(part):
                s = _stage(node)
                if s is not None:
                    stages.setdefault(s, []).append(f"line {node.lineno}: {ast.unparse(node.func)}(")
        if len(stages) >= 2:
            composed.append(f"{name}: " + "; ".join(f"{s} {', '.join(w)}" for s, w in sorted(stages.items())))
    out: dict[str, list[str]] = {}
    if rel not in HOME:
        if steps:
            out["network steps"] = steps
        if composed:
            out["stages"] = composed
        if judged:
            out["kidney rule"] = judged
    if rel not in PREPARATION_HOME and prep:
        out["preparation"] = prep
    return out


def modules() -> list[Path]:
    return sorted(p for d in WALKED for p in (ROOT / d).rglob("*.py") if ".venv" not in p.parts)


def test_the_walk_sees_the_modules_it_must():
    rels = {p.relative_to(ROOT).as_posix() for p in modules()}
    assert {"runtime/graph.py", "runtime/pipeline.py", "runtime/agreement.py", "runtime/bench.py",
            "runtime/fidelity.py", "export/recipe.py", "calibration/run.py", *LET_OFF} <= rels


def test_only_the_graph_composes_the_network_stages_and_prepares_the_source():
    offenders = {}
    for path in modules():
        rel = path.relative_to(ROOT).as_posix()
        if rel in LET_OFF:
            continue
        found = findings(path.read_text(), rel)
        if found:
            offenders[rel] = found
    assert not offenders, ("modules other than runtime/graph.py compose the per-frame graph or prepare the source "
                           f"themselves; call Graph.run / Graph.prepare_source instead: {offenders}")


@pytest.mark.parametrize("rel", sorted(LET_OFF))
def test_the_module_let_off_still_needs_it(rel):
    found = findings((ROOT / rel).read_text(), rel)
    assert found, f"{rel} no longer composes the stages itself: take it off LET_OFF"


# -- the rule catches what it is meant to (the compositions this test was written to remove) ---------------------

CAUGHT = {
    "a caller running the stages": """
def outputs(graph, unet, vgg, booster, images):
    for img in images:
        gate = graph.gate(graph.segment(unet, img))
        if gate.accepted:
            probs = booster.predict(graph.features(vgg, img, gate.mask))
""",
    "training features": """
def rows(graph, images, un, vg):
    for i in range(len(images)):
        prob = graph.segment(un, images[i])
""",
    "calibration inputs": """
def inputs(graph, unet32, img):
    mask = graph.gate(unet32.infer(graph.unet_feeds(img), ['mask'])['mask'][0, 0]).mask
    return graph.vgg_feeds(img, mask)
""",
    "a gate and a booster on stored outputs": """
def reference(graph, ref, booster):
    gates = [graph.gate(p) for p in ref["prob"]]
    return booster.predict(ref["features"])
""",
    "a bench skipping the source preparation": """
def warm(pipe, f):
    img, _ = pipe.graph.preprocess(pp.to_gray(f.pixels, f.channel_order))
""",
    "the kidney rule written again": """
def kidney(graph, masks, grades):
    return np.array([graph.gate_mask(m).accepted for m in masks]) & (grades > 0)
""",
    "the sector rule done again": """
def prep(frame):
    gray, region = pp.sector_frame(frame.pixels, frame.region, frame.meta)
""",
}

ALLOWED = {
    "the one call": "def go(pipe, img):\n    return pipe.graph.run(img, pipe.unet, pipe.vgg, pipe.booster)\n",
    "a torch module's own features": "class V:\n    def forward(self, x):\n        return self.features(x)\n",
    "one stage alone (UNet training's gate)": "def val(graph, probs):\n    return [graph.gate(p).mask for p in probs]\n",
    "the booster alone": "def warm(pipe, x):\n    pipe.booster.predict_one(x)\n",
    "the UNet's calibration feeds": "def feeds(graph, img):\n    return graph.unet_feeds(img)\n",
    "the one kidney rule": "def kidney(graph, masks, grades):\n    return graph.kidney_frames(masks, grades)\n",
    "the one preparation": "def prep(pipe, f):\n    return pipe.graph.prepare_source(f)\n",
}


@pytest.mark.parametrize("case", sorted(CAUGHT))
def test_the_rule_catches(case):
    assert findings(CAUGHT[case], "runtime/somewhere.py"), case


@pytest.mark.parametrize("case", sorted(ALLOWED))
def test_the_rule_allows(case):
    assert not findings(ALLOWED[case], "runtime/somewhere.py"), case


def test_the_graph_itself_may_compose():
    assert not findings(CAUGHT["a caller running the stages"], "runtime/graph.py")
