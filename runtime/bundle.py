"""The model bundle: a directory with manifest.json and the files it names, each verified by sha256 before use.

A bundle is code in effect (an ONNX graph, a booster that gets compiled), so a file that does not match its hash
is refused, never loaded.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA = 1
PRECISIONS = ("fp32", "fp16", "int8")
DEMO_DISCLAIMER = "synthetic demo model - not for clinical use"
CLASS_NAMES = ["IFTA <25%", "IFTA 25-49%", "IFTA 50-74%", "IFTA >=75%"]


class BundleError(ValueError):
    """A bundle that cannot be used; the message names the file and what to do."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def referenced_files(manifest: dict[str, Any]) -> list[str]:
    """Every file the manifest names (networks per precision, booster)."""
    names = []
    for net in manifest.get("networks", {}).values():
        names.extend(net.get("files", {}).values())
    if "booster" in manifest:
        names.append(manifest["booster"]["file"])
    return sorted(set(names))


def write_manifest(directory: Path, manifest: dict[str, Any]) -> Path:
    """Fill in schema and the sha256 of every referenced file, then write manifest.json atomically."""
    directory = Path(directory)
    manifest = dict(manifest)
    manifest["schema"] = SCHEMA
    manifest["files"] = {name: sha256_file(directory / name) for name in referenced_files(manifest)}
    tmp = directory / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    tmp.replace(directory / "manifest.json")
    return directory / "manifest.json"


@dataclass
class NetworkSpec:
    name: str
    files: dict[str, str]
    input_name: str
    output_name: str
    channels: int
    info: dict[str, Any]


@dataclass
class Bundle:
    root: Path
    manifest: dict[str, Any]

    @classmethod
    def load(cls, root: Path | str, *, verify: bool = True) -> "Bundle":
        root = Path(root)
        path = root / "manifest.json"
        if not path.is_file():
            raise BundleError(f"{root} is not a model bundle (no manifest.json); build one with `sonoscore train` "
                              f"or `sonoscore export`, or run `sonoscore demo` to make the demo bundle")
        try:
            manifest = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise BundleError(f"{path} is not readable JSON ({e}); restore the bundle from its source") from None
        if manifest.get("schema") != SCHEMA:
            raise BundleError(f"{path} has schema {manifest.get('schema')!r}; this sonoscore reads schema {SCHEMA}: "
                              f"re-export the bundle with this version")
        for key in ("networks", "booster", "preprocess", "gate", "classes", "files"):
            if key not in manifest:
                raise BundleError(f"{path} lacks the '{key}' section; re-export the bundle")
        bundle = cls(root, manifest)
        if verify:
            bundle.verify()
        return bundle

    def verify(self) -> None:
        """Check every referenced file against its recorded sha256."""
        recorded = self.manifest["files"]
        for name in referenced_files(self.manifest):
            f = self.root / name
            if name not in recorded:
                raise BundleError(f"{f} has no recorded sha256 in the manifest; re-export the bundle")
            if not f.is_file():
                raise BundleError(f"{f} is missing from the bundle; restore it or re-export the bundle")
            if sha256_file(f) != recorded[name]:
                raise BundleError(f"{f} does not match the sha256 in manifest.json (modified or corrupted); "
                                  f"restore the bundle from its source and do not edit its files")

    def network(self, name: str) -> NetworkSpec:
        net = self.manifest["networks"][name]
        return NetworkSpec(name, net["files"], net["input"]["name"], net["output"]["name"],
                           int(net.get("channels", 1)), net)

    def network_file(self, name: str, precision: str) -> Path:
        files = self.manifest["networks"][name]["files"]
        if precision not in files:
            have = ", ".join(sorted(files))
            hint = " (INT8 files come from `sonoscore calibrate`)" if precision == "int8" else ""
            raise BundleError(f"bundle {self.root} has no {precision} {name} network (it has: {have}){hint}; "
                              f"choose --precision from those")
        return self.root / files[precision]

    @property
    def booster_file(self) -> Path:
        return self.root / self.manifest["booster"]["file"]

    @property
    def num_classes(self) -> int:
        return int(self.manifest["booster"].get("num_class", len(self.manifest["classes"])))

    def graph(self, *, mask_threshold: float | None = None, min_mask_fraction: float | None = None):
        """The per-frame graph this bundle's manifest pins (runtime.graph.Graph); the gate's threshold and minimum
        fraction may be overridden (the bench opens the gate)."""
        from runtime.graph import Graph
        return Graph.from_manifest(self.manifest, mask_threshold=mask_threshold, min_mask_fraction=min_mask_fraction)

    @property
    def disclaimer(self) -> str | None:
        return self.manifest.get("disclaimer")

    @property
    def precisions(self) -> list[str]:
        nets = self.manifest["networks"].values()
        return [p for p in PRECISIONS if all(p in n["files"] for n in nets)]

    @property
    def int8_networks(self) -> list[str]:
        """The networks that run quantized in the INT8 set; one that `calibrate --networks` left out runs its FP32
        file there (mixed precision). Empty when the bundle has no INT8 set."""
        return [name for name, n in self.manifest["networks"].items()
                if "int8" in n["files"] and n["files"]["int8"] != n["files"]["fp32"]]
