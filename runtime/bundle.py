"""The model bundle: a directory with manifest.json and the files it names, each verified by sha256 before use.

A bundle is code in effect (an ONNX graph, a booster that gets compiled), so a file that does not match its hash
is refused, never loaded. The hashes say the files are the ones the manifest names, not that the manifest makes
sense: `Bundle.load` also checks the manifest against `MANIFEST_SCHEMA` (types and ranges, with jsonschema), that
`booster.num_class` is the number of classes, and that every file it names is a plain name inside the bundle; and
`check_runner` checks each loaded network's tensor names, shapes and widths against the manifest when a pipeline
starts. manifest.json itself is covered by manifest.sha256 (written by `write_manifest`, checked by `verify`), so
a hand edit is refused too; signatures over the whole folder are runtime/signing.py's. Every refusal is a
BundleError, one sentence naming the file or field and what to do.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

SCHEMA = 1
PRECISIONS = ("fp32", "fp16", "int8")
DEMO_DISCLAIMER = "synthetic demo model - not for clinical use"
CLASS_NAMES = ["IFTA <25%", "IFTA 25-49%", "IFTA 50-74%", "IFTA >=75%"]
# manifest.json's own sha256, in sha256sum's format ("<hex>  manifest.json"), written by write_manifest: an edit to
# manifest.json (a gate threshold, a class name) is detected at load, signed or not (docs/design.md "Signing").
MANIFEST_CHECKSUM = "manifest.sha256"


class BundleError(ValueError):
    """A bundle that cannot be used; the message names the file and what to do."""


# A file the manifest names: a plain name in the bundle's folder (no folder part, not '.' or '..'); `_check_paths`
# also resolves it (symbolic links included) and refuses one that lands outside the bundle.
_FILE = {"type": "string", "minLength": 1, "maxLength": 255, "pattern": r"^(?!\.\.?$)[^/\\\x00]+$",
         "why": "must be a plain file name inside the bundle (no '/', '..' or absolute path)"}
# A network input's normalization (runtime.normalize): unit, minmax, or meanstd with 1 or C means and stds > 0.
_NORMALIZATION = {"type": "object", "required": ["kind"],
                  "properties": {"kind": {"enum": ["unit", "minmax", "meanstd"]},
                                 "mean": {"type": "array", "minItems": 1, "maxItems": 3, "items": {"type": "number"}},
                                 "std": {"type": "array", "minItems": 1, "maxItems": 3,
                                         "items": {"type": "number", "exclusiveMinimum": 0}}},
                  "if": {"properties": {"kind": {"const": "meanstd"}}}, "then": {"required": ["mean", "std"]}}
_TENSOR = {"type": "object", "required": ["name"],
           "properties": {"name": {"type": "string", "minLength": 1, "maxLength": 256},
                          "shape": {"type": "array", "minItems": 1, "maxItems": 8,
                                    "items": {"type": ["integer", "string", "null"]}},
                          "dtype": {"type": "string"},
                          # What the network receives (runtime.normalize; MONAI Bundle network_data_format style).
                          "num_channels": {"type": "integer", "minimum": 1, "maximum": 3},
                          "value_range": {"type": "array", "minItems": 2, "maxItems": 2,
                                          "items": {"type": "number"}},
                          "normalization": _NORMALIZATION}}


def _network(channels: list[int]) -> dict:
    return {"type": "object", "required": ["files", "input", "output"],
            "properties": {"files": {"type": "object", "required": ["fp32"], "additionalProperties": _FILE,
                                     "properties": {p: _FILE for p in PRECISIONS}},
                           "input": _TENSOR, "output": _TENSOR, "channels": {"enum": channels},
                           "width": {"type": "number", "exclusiveMinimum": 0}}}


# What a manifest must hold (JSON Schema 2020-12). Ranges: a size or a filter count outside them would make every
# frame take minutes (or never finish), so they are refused at load rather than discovered on the first frame.
MANIFEST_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["schema", "networks", "booster", "preprocess", "gate", "classes", "files"],
    "properties": {
        "schema": {"const": SCHEMA},
        "name": {"type": ["string", "null"]},
        "disclaimer": {"type": ["string", "null"]},
        "classes": {"type": "array", "minItems": 2, "maxItems": 64, "items": {"type": "string", "minLength": 1}},
        "preprocess": {"type": "object", "properties": {
            "size": {"type": "integer", "minimum": 32, "maximum": 1024},
            "crimmins_iterations": {"type": "integer", "minimum": 0, "maximum": 8},
            "crop": {"const": "auto"}, "gray": {"const": "bt601"}, "input_scale": {"const": "uint8/255"}}},
        "gate": {"type": "object", "properties": {
            "mask_threshold": {"type": "number", "minimum": 0, "maximum": 1},
            "min_mask_fraction": {"type": "number", "minimum": 0, "maximum": 1}}},
        "networks": {"type": "object", "required": ["unet", "vgg"], "additionalProperties": _network([1, 3]),
                     "properties": {"unet": _network([1]), "vgg": _network([1, 3])}},
        "booster": {"type": "object", "required": ["file"], "properties": {
            "file": _FILE,
            "num_class": {"type": "integer", "minimum": 2, "maximum": 64},
            "num_features": {"type": "integer", "minimum": 1, "maximum": 1 << 20}}},
        "files": {"type": "object", "additionalProperties": {"type": "string", "pattern": "^[0-9a-f]{64}$",
                                                             "why": "must be a sha256 (64 hex digits)"}},
        "provenance": {"type": ["object", "null"]},
        "calibration": {"type": ["object", "null"]},
        # The INT8 set's reference frames with their simulated outputs (runtime/fidelity.py), written by calibrate.
        "int8_reference": {"type": "object", "required": ["file"], "properties": {"file": _FILE}},
        # The scope gate's reference (runtime/scope.py, `Reference.manifest_section`): its file (scope.npz, hashed
        # like the networks) and what its limits were set on; `Reference.load` checks the two agree.
        "scope": {"type": "object", "required": ["file", "method"], "properties": {
            "file": _FILE, "method": {"type": "string", "minLength": 1},
            "k": {"type": "integer", "minimum": 1}, "features": {"type": "integer", "minimum": 1},
            "thresholds": {"type": "object", "additionalProperties": {"type": "number", "exclusiveMinimum": 0}},
            "limits": {"type": "object", "additionalProperties": {"type": "number", "exclusiveMinimum": 0}},
            "keep_share": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
            "kept_share": {"type": "number", "minimum": 0, "maximum": 1},
            "kept_by_test": {"type": "object"}, "frames": {"type": "object"},
            "reasons": {"type": "array", "items": {"type": "string"}}}},
        # The model card (MONAI Bundle metadata fields); `Bundle.card` gives a default one when it is absent.
        "card": {"type": "object", "required": ["name", "version"], "properties": {
            "name": {"type": "string", "minLength": 1, "maxLength": 200},
            "version": {"type": "string", "minLength": 1, "maxLength": 100},
            "authors": {"type": "array", "items": {"type": "string"}},
            "references": {"type": "array", "items": {"type": "string"}},
            "changelog": {"type": "object", "additionalProperties": {"type": "string"}},
            **{k: {"type": ["string", "null"]} for k in ("description", "license", "intended_use", "data_source")}}},
    },
}


def validate_manifest(manifest: Any, path: Path) -> None:
    """Refuse a manifest that does not fit MANIFEST_SCHEMA or whose class count disagrees with its booster's:
    one BundleError naming the field of `path` (manifest.json) at fault."""
    import jsonschema
    error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(MANIFEST_SCHEMA).iter_errors(manifest))
    if error is not None:
        field = ".".join(str(k) for k in error.absolute_path) or "(top level)"
        if error.validator == "required":
            missing = next((k for k in error.validator_value if k not in error.instance), None)
            if missing is not None:
                field = f"{field}.{missing}" if error.absolute_path else missing
            why = "is missing"
        elif isinstance(error.schema, dict) and "why" in error.schema and error.validator == "pattern":
            why = f"{_short(repr(error.instance))} {error.schema['why']}"
        else:
            why = _short(error.message)
        raise BundleError(f"{path}: field '{field}' {why}; correct it or re-export the bundle")
    n_classes = len(manifest["classes"])
    num_class = manifest["booster"].get("num_class", n_classes)
    if num_class != n_classes:
        raise BundleError(f"{path}: field 'booster.num_class' is {num_class} but 'classes' names {n_classes}; "
                          f"give one name per class or re-export the bundle")
    from runtime.normalize import check as check_normalization
    from runtime.errors import UserError
    for net_name, net in manifest["networks"].items():   # meanstd counts against the channels (1 or C, equal)
        field = f"networks.{net_name}.input.normalization"
        try:
            channels = int(net.get("channels", net["input"].get("num_channels", 1)))
            check_normalization(net["input"].get("normalization"), channels, f"field '{field}': ")
        except UserError as e:
            raise BundleError(f"{path}: {e}; correct it or re-export the bundle") from None


def non_finite_field(doc: Any, field: str = "") -> str | None:
    """The dotted field of the first number in a parsed JSON document that is not finite (NaN, Infinity: Python's
    json reads them, and 1e999 too, and a schema's ranges compare false with NaN), or None."""
    if isinstance(doc, float) and not math.isfinite(doc):
        return field or "(top level)"
    items = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else ()
    for key, value in items:
        found = non_finite_field(value, f"{field}.{key}" if field else str(key))
        if found is not None:
            return found
    return None


def _short(text: str, n: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[:n - 3] + "..."


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def referenced_files(manifest: dict[str, Any]) -> list[str]:
    """Every file the manifest names (networks per precision, booster, the INT8 reference frames, the scope
    reference)."""
    names = []
    for net in manifest.get("networks", {}).values():
        names.extend(net.get("files", {}).values())
    if "booster" in manifest:
        names.append(manifest["booster"]["file"])
    if isinstance(manifest.get("int8_reference"), dict) and manifest["int8_reference"].get("file"):
        names.append(manifest["int8_reference"]["file"])
    if isinstance(manifest.get("scope"), dict) and manifest["scope"].get("file"):
        names.append(manifest["scope"]["file"])
    return sorted(set(names))


def write_manifest(directory: Path, manifest: dict[str, Any]) -> Path:
    """Fill in schema and the sha256 of every referenced file, then write manifest.json atomically, and its own
    sha256 to manifest.sha256 (MANIFEST_CHECKSUM) after it. A crash between the two leaves a pair that does not
    match: the bundle is refused at load, never used with a manifest nobody wrote."""
    directory = Path(directory)
    manifest = dict(manifest)
    manifest["schema"] = SCHEMA
    manifest["files"] = {name: sha256_file(directory / name) for name in referenced_files(manifest)}
    bad = non_finite_field(manifest)
    if bad is not None:
        raise BundleError(f"{directory / 'manifest.json'}: field '{bad}' is not a finite number; nothing written")
    data = (json.dumps(manifest, indent=2, sort_keys=False, allow_nan=False) + "\n").encode()
    for name, content in (("manifest.json", data),
                          (MANIFEST_CHECKSUM, f"{hashlib.sha256(data).hexdigest()}  manifest.json\n".encode())):
        tmp = directory / f"{name}.tmp"
        tmp.write_bytes(content)
        tmp.replace(directory / name)
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
    # sha256 of the manifest.json bytes `load` parsed (the `manifest_sha256` property)
    _manifest_sha256: str | None = field(default=None, repr=False, compare=False)
    # the scope reference, once loaded (the `scope` property); False: the bundle has none
    _scope: Any = field(default=None, repr=False, compare=False)

    @classmethod
    def load(cls, root: Path | str, *, verify: bool = True) -> "Bundle":
        root = Path(root)
        path = root / "manifest.json"
        if not path.is_file():
            raise BundleError(f"{root} is not a model bundle (no manifest.json); build one with `sonoscore train` "
                              f"or `sonoscore export`, or run `sonoscore demo` to make the demo bundle")
        try:
            raw = path.read_bytes()
            manifest = json.loads(raw)
        except (OSError, ValueError) as e:
            raise BundleError(f"{path} is not readable JSON ({e}); restore the bundle from its source") from None
        if not isinstance(manifest, dict):
            raise BundleError(f"{path} holds a JSON {type(manifest).__name__}, not an object; restore the bundle "
                              f"from its source")
        bad = non_finite_field(manifest)
        if bad is not None:
            raise BundleError(f"{path}: field '{bad}' is not a finite number (NaN or Infinity); correct it or "
                              f"re-export the bundle")
        if manifest.get("schema") != SCHEMA:
            raise BundleError(f"{path} has schema {manifest.get('schema')!r}; this sonoscore reads schema {SCHEMA}: "
                              f"re-export the bundle with this version")
        for key in ("networks", "booster", "preprocess", "gate", "classes", "files"):
            if key not in manifest:
                raise BundleError(f"{path} lacks the '{key}' section; re-export the bundle")
        validate_manifest(manifest, path)
        bundle = cls(root, manifest, hashlib.sha256(raw).hexdigest())
        bundle._check_paths()
        if verify:
            bundle.verify()
        return bundle

    def _check_paths(self) -> None:
        """Every file the manifest names resolves (links followed) to a file inside the bundle's folder."""
        root = self.root.resolve()
        for name in referenced_files(self.manifest):
            target = (self.root / name).resolve()
            if not target.is_relative_to(root):
                raise BundleError(f"{self.root / 'manifest.json'} names '{name}', which leads outside the bundle "
                                  f"(to {target}); a bundle's files must lie in its folder: re-export the bundle")

    def verify(self) -> None:
        """Check manifest.json against manifest.sha256, then every referenced file against its recorded sha256."""
        self._verify_manifest_checksum()
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

    def _verify_manifest_checksum(self) -> None:
        """manifest.json's bytes as loaded must have the sha256 that manifest.sha256 (written with it by
        write_manifest) records: a hand edit is refused, with the way to record it when it was on purpose."""
        path = self.root / MANIFEST_CHECKSUM
        record = f"`sha256sum manifest.json > {MANIFEST_CHECKSUM}` in the bundle's folder"
        try:
            text = path.read_text(errors="replace")
        except FileNotFoundError:
            raise BundleError(f"{path} is missing, so an edit to manifest.json could not be detected; re-export "
                              f"the bundle, or, if its manifest.json is as it should be, record its hash with "
                              f"{record}") from None
        except OSError as e:
            raise BundleError(f"{path} cannot be read ({e.strerror or e}); restore the bundle from its source") \
                from None
        recorded = (text.split() or [""])[0].lstrip("\\").lower()
        if len(recorded) != 64 or any(c not in "0123456789abcdef" for c in recorded):
            raise BundleError(f"{path} holds no sha256 of manifest.json; restore the bundle from its source, or "
                              f"record the hash with {record}")
        if recorded != self.manifest_sha256:
            raise BundleError(f"{self.root / 'manifest.json'} does not match the sha256 in {MANIFEST_CHECKSUM} (edited "
                              f"or corrupted since the bundle was written); restore the bundle from its source or "
                              f"re-export it, or, if the edit was on purpose, record it with {record}")

    @property
    def manifest_sha256(self) -> str:
        """sha256 (hex) of manifest.json's bytes as loaded: the bundle's identity (the DICOM SR's algorithm
        version, the signature's subject). A Bundle made without `load` hashes the file now."""
        if self._manifest_sha256 is None:
            self._manifest_sha256 = sha256_file(self.root / "manifest.json")
        return self._manifest_sha256

    @property
    def card(self) -> dict[str, Any]:
        """The model card (manifest `card`: name, version, description, changelog, authors, license, intended_use,
        data_source, references); a bundle without one gets {name: the manifest's name or the folder's, version:
        "unversioned"}."""
        card = self.manifest.get("card")
        if isinstance(card, dict):          # MANIFEST_SCHEMA requires its name and version
            return dict(card)
        return {"name": self.manifest.get("name") or self.root.resolve().name, "version": "unversioned"}

    @property
    def label(self) -> str:
        """"<card name> <card version>": how sinks name the model (overlay, viewer, report)."""
        return card_label(self.card)

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
    def num_features(self) -> int | None:
        """The booster's feature count as the manifest records it (None when it does not)."""
        n = self.manifest["booster"].get("num_features")
        return None if n is None else int(n)

    @property
    def num_classes(self) -> int:
        return int(self.manifest["booster"].get("num_class", len(self.manifest["classes"])))

    def graph(self, *, mask_threshold: float | None = None, min_mask_fraction: float | None = None,
              scope_open: bool = False):
        """The per-frame graph this bundle's manifest pins (runtime.graph.Graph), with its scope reference (`scope`:
        the scope gate; None without one); the gate's threshold and minimum fraction may be overridden and the
        scope gate opened, its check still run and kept (the bench opens both gates)."""
        from runtime.graph import Graph
        return Graph.from_manifest(self.manifest, mask_threshold=mask_threshold, min_mask_fraction=min_mask_fraction,
                                   scope=self.scope, scope_open=scope_open)

    @property
    def scope(self):
        """The scope gate's reference (runtime.scope.Reference) the manifest's `scope` section names, loaded once and
        checked against the section; None for a bundle without one (`scope_warning` says so at every start). A
        file that is not a reference, or disagrees with the section, is a BundleError."""
        if self._scope is None:
            section = self.manifest.get("scope")
            if not isinstance(section, dict):
                self._scope = False
            else:
                from runtime.scope import Reference, ScopeError
                try:
                    self._scope = Reference.load(self.root / section["file"], section)
                except ScopeError as e:
                    raise BundleError(str(e)) from None
        return self._scope or None

    @property
    def scope_warning(self) -> str | None:
        """The one warning line for a bundle without a scope reference (None when it has one): every frame the mask
        gate accepts is graded, whatever it shows. `run`, `eval`, `bench`, `batch` and `listen` say it at every
        start."""
        if isinstance(self.manifest.get("scope"), dict):
            return None
        return (f"Warning: bundle {self.root} has no scope reference (no `scope` section), so any frame the mask "
                f"gate accepts is graded, even one that is not a kidney ultrasound; re-train it with `sonoscore "
                f"train`, or add one with `sonoscore export --reference-frames FOLDER`")

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


def card_label(card: dict[str, Any] | None) -> str | None:
    """A card's "<name> <version>" (the version left out when the card has none); None for no card."""
    if not card or not card.get("name"):
        return None
    return f"{card['name']} {card['version']}" if card.get("version") else str(card["name"])


def check_runner(name: str, runner, graph, file: Path | str | None = None, num_features: int | None = None) -> None:
    """Refuse a loaded network (`runner.inputs` / `runner.outputs`, TensorMeta by name) that does not fit the graph
    the manifest pins: `name` is "unet" or "vgg". Checked: its one input and its output have the manifest's names,
    the input is float [N, C, size, size] (C 1 for the UNet, the manifest's channels for the VGG), the UNet's output
    [N, 1, size, size], the VGG's [N, F] with F the booster's `num_features` (fixed dimensions only; a free one
    passes). A network that fails here would fail every frame; it is refused once, at start, with one sentence."""
    size = graph.size
    if name == "unet":
        in_name, out_name, channels, out_shape = graph.unet_input, graph.unet_output, 1, (1, size, size)
    elif name == "vgg":
        in_name, out_name, channels, out_shape = graph.vgg_input, graph.vgg_output, graph.vgg_channels, (num_features,)
    else:
        raise ValueError(f"unknown network {name!r}")
    what = f"the {name} network{f' {file}' if file else ''}"
    fix = "the file does not match its manifest: restore the bundle from its source or re-export it"
    inputs, outputs = dict(runner.inputs), dict(runner.outputs)

    def names(metas) -> str:
        return ", ".join(f"'{n}' {m}" for n, m in metas.items()) or "none"

    if list(inputs) != [in_name]:
        raise BundleError(f"{what} takes inputs {names(inputs)} but the manifest feeds it one input '{in_name}'; "
                          f"{fix}")
    if out_name not in outputs:
        raise BundleError(f"{what} has outputs {names(outputs)} but the manifest reads '{out_name}'; {fix}")
    for role, tensor, meta, want in (("input", in_name, inputs[in_name], (channels, size, size)),
                                     ("output", out_name, outputs[out_name], out_shape)):
        shape = tuple(meta.shape)
        fits = len(shape) == 1 + len(want) and all(
            not isinstance(d, int) or w is None or d == w for d, w in zip(shape[1:], want))
        if not fits or np.dtype(meta.dtype).kind != "f":
            dims = ", ".join("N" if w is None and i == 0 else ("F" if w is None else str(w))
                             for i, w in enumerate((None, *want)))
            raise BundleError(f"{what}'s {role} '{tensor}' is {meta} but the manifest's graph needs float[{dims}]; "
                              f"{fix}")
