"""`sonoscore info BUNDLE`: what a bundle is, from its manifest: the model card, the networks (architecture,
precisions, the input each one declares), the booster, the gate, the disclaimer and the signature status."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from runtime.bundle import MANIFEST_CHECKSUM, Bundle

CARD_FIELDS = ("description", "authors", "license", "intended_use", "data_source", "references", "changelog")


def bundle_info(root: str | Path, trust: str | Path | None = None, *, label: str = "--trust") -> dict[str, Any]:
    """The bundle's description as a dict. With `trust` the signature is verified first (refused in one sentence
    when it does not verify); the bundle is loaded with every check `run` makes."""
    from runtime import signing
    root = Path(root)
    signature = signing.status(root, trust, label=label) if (root / "manifest.json").is_file() else None
    bundle = Bundle.load(root)
    m = bundle.manifest
    networks = {}
    for name, net in m["networks"].items():
        inp = net.get("input", {})
        networks[name] = {
            "architecture": net.get("architecture"),
            "width": net.get("width"),
            "precisions": sorted(net["files"], key=lambda p: ("fp32", "fp16", "int8").index(p)
                                 if p in ("fp32", "fp16", "int8") else 9),
            "files": dict(net["files"]),
            "input": {k: inp[k] for k in ("name", "shape", "dtype", "num_channels", "value_range", "normalization")
                      if k in inp},
            "output": {k: v for k, v in net.get("output", {}).items() if k in ("name", "shape", "dtype")},
        }
    booster = {k: m["booster"][k] for k in ("file", "format", "num_class", "num_features", "objective")
               if k in m["booster"]}
    return {"bundle": str(root), "name": m.get("name"), "card": bundle.card, "disclaimer": bundle.disclaimer,
            "classes": list(m["classes"]), "networks": networks, "precisions": bundle.precisions,
            "booster": booster, "gate": dict(m["gate"]), "signature": signature,
            "manifest_sha256": bundle.manifest_sha256, "manifest_checksum": MANIFEST_CHECKSUM}


def _normalization(inp: dict[str, Any]) -> str:
    try:
        from runtime.normalize import describe, of_input
        return describe(of_input(inp))
    except ImportError:
        n = inp.get("normalization")
        return n.get("kind", "unit") if isinstance(n, dict) else "unit"


def format_info(info: dict[str, Any]) -> str:
    """The text `sonoscore info` prints: one field a line."""
    card = info["card"]
    rows: list[tuple[str, str]] = [("bundle", info["bundle"]), ("name", str(card["name"])),
                                   ("version", str(card["version"]))]
    for key in CARD_FIELDS:
        value = card.get(key)
        if value in (None, "", [], {}):
            continue
        label = key.replace("_", " ")
        if key == "changelog" and isinstance(value, dict):
            rows += [(label if i == 0 else "", f"{v}: {t}") for i, (v, t) in enumerate(value.items())]
        elif isinstance(value, list):
            rows += [(label if i == 0 else "", str(v)) for i, v in enumerate(value)] if key == "references" \
                else [(label, ", ".join(map(str, value)))]
        else:
            rows.append((label, str(value)))
    rows.append(("disclaimer", info["disclaimer"] or "none"))
    rows.append(("classes", ", ".join(info["classes"])))
    rows.append(("precisions", ", ".join(info["precisions"]) or "none complete"))
    for name, net in info["networks"].items():
        inp = net["input"]
        arch = net["architecture"] or "architecture not recorded"
        if net.get("width") is not None:
            arch += f", width {net['width']:g}"
        shape = "x".join(str(d) for d in inp.get("shape", [])) or "?"
        rows.append((f"network {name}", f"{arch}; files {', '.join(f'{p} {f}' for p, f in net['files'].items())}"))
        rows.append(("", f"input '{inp.get('name')}' {shape} {inp.get('dtype', 'float32')}, normalization "
                         f"{_normalization(inp)}" + (f", value range {inp['value_range']}" if "value_range" in inp
                                                     else "")))
    b = info["booster"]
    rows.append(("booster", f"{b.get('file')} ({b.get('format', 'xgboost')}), {b.get('num_class', '?')} classes, "
                            f"{b.get('num_features', '?')} features" + (f", {b['objective']}" if b.get("objective")
                                                                       else "")))
    g = info["gate"]
    rows.append(("gate", f"mask threshold {g.get('mask_threshold')}, minimum mask fraction "
                         f"{g.get('min_mask_fraction')}"))
    rows.append(("signature", info["signature"] or "not signed"))
    rows.append(("manifest", f"sha256 {info['manifest_sha256']} (matches {info['manifest_checksum']})"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
