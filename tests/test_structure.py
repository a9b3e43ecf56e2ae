"""The package's shape (docs/design.md, "Layout and dependency rule"): no import cycle among the modules of
runtime/, export/ and calibration/, and no module over 600 lines unless docs/design.md says why.

Modules are read with `ast`, nothing is imported. Every import counts, the ones inside functions too: a lazy import
that closes a cycle only hides it."""
from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("runtime", "export", "calibration")
MAX_LINES = 600


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the project modules it imports (`from a import b` is a.b when that is a module, else a)."""
    graph = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names if a.name in modules)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".") if is_package else name.split(".")[:-1]
                    base = base[:len(base) - node.level + 1]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                for a in node.names:
                    sub = f"{mod}.{a.name}"
                    if sub in modules:
                        targets.add(sub)
                    elif mod in modules:
                        targets.add(mod)
        targets.discard(name)
        graph[name] = targets
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, found, counter = {}, {}, set(), [], [], [0]
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            for w in children:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        found.append(sorted(comp))
    return found


def test_cycle_finder_finds_a_cycle_and_only_cycles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []


def test_no_import_cycle():
    found = cycles(import_graph(_modules()))
    assert not found, "modules that import each other (directly or through others): " + "; ".join(
        " <-> ".join(c) for c in found)


def _explained_long_modules() -> set[str]:
    """The module paths docs/design.md lists, with a reason, under "Modules over 600 lines"."""
    text = (ROOT / "docs" / "design.md").read_text(encoding="utf-8")
    m = re.search(r"^#+ Modules over 600 lines\n(.*?)(?=^#+ |\Z)", text, re.S | re.M)
    if not m:
        return set()
    return {path for path, reason in re.findall(r"^[-|] *`([\w/]+\.py)`[ |:-]+(\S.*)$", m.group(1), re.M)
            if reason.strip(" |")}


def test_no_module_over_600_lines_without_a_reason():
    explained = _explained_long_modules()
    long = {str(p.relative_to(ROOT)): len(p.read_text(encoding="utf-8").splitlines())
            for p in _modules().values()}
    unexplained = {p: n for p, n in long.items() if n > MAX_LINES and p not in explained}
    assert not unexplained, (f"modules over {MAX_LINES} lines with no reason in docs/design.md ('Modules over "
                             f"600 lines'): {unexplained}")
