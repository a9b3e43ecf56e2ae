"""Fitting a bundle's scope reference (runtime.scope, docs/scope.md) from in-scope frames, and writing it into the
bundle: `scope.npz` and the manifest's `scope` section, whose hash the manifest records like the networks'.

One function does it for every caller: `sonoscore train` (the training patients' frames as the reference, the
validation patients' held out), `sonoscore export --reference-frames FOLDER` and `sonoscore scope --bundle B
--frames FOLDER` (a folder of the user's own training or validation frames).

    frame --Graph.prepare_source--> image --Graph.run(until="vgg")--> prob, mask, features
          --runtime.scope.describe (with the source frame's crop shape and colour share)--> Descriptors

Which frames are in scope: in a labelme dataset (labelme JSON beside the images), the frames whose labelled kidney
passes the gate's rule (`Graph.is_kidney`) and which the bundle's gate accepts; in a plain folder (images, DICOM,
videos, at any depth; no annotations), every frame the gate accepts: the folder is the user's word that its frames
are kidney views. Frames are grouped by patient: labels.csv's patient column (in the folder or the one above it),
else the first subfolder under the folder (a folder per patient or study), else the file.

The limits are set on held-out groups, never on the reference's own frames (the networks fit their training frames
better than a new patient's). Held out: the groups the caller names (train's validation patients); else the bundle's
own validation patients (its provenance) where the frames hold at least MIN_HELD_OUT_GROUPS of them; else a
quarter of the groups, drawn with a fixed seed. The FP32 networks describe the frames (onnxruntime, CPU); the
runtime never imports torch.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from runtime import logs
from runtime import preprocess as pp
from runtime import scope as sc
from runtime.labelme import labels_table

log = logs.get("scope")

HELD_OUT_SHARE = 0.25
SPLIT_SEED = 0


@dataclass
class Described:
    """The in-scope frames of a folder or dataset, described: each frame's descriptors and its group (patient)."""
    rows: list[sc.Descriptors] = field(default_factory=list)
    groups: list[str] = field(default_factory=list)
    frames: int = 0            # frames read
    unreadable: int = 0        # frames without pixels or that preprocessing refused
    not_kidney: int = 0        # labelled frames whose kidney does not pass the gate's rule (or has no kidney)
    gate_rejected: int = 0     # in-scope candidates the bundle's gate rejected
    labelled: bool = False     # a labelme dataset (the labelled-kidney rule applied)

    def add(self, group: str, desc: sc.Descriptors) -> None:
        self.rows.append(desc)
        self.groups.append(str(group))


def describe_frame(graph, frame, unet, vgg):
    """One source frame through the graph to the VGG: (preprocessed image, the region it was cut from in the source
    frame, Graph.run's result, the frame's descriptors or None when the gate rejects it). The descriptors are the
    ones the run-time check computes: `runtime.scope.describe` with the crop's shape and the colour share of the
    source frame's crop."""
    _, image, region = graph.prepare_source(frame)
    result = graph.run(image, unet, vgg, until="vgg")
    if not result.gate.accepted:
        return image, region, result, None
    crop = (max(1, region.y1 - region.y0), max(1, region.x1 - region.x0))
    desc = sc.describe(image, result.prob, result.gate.mask, result.features, crop_shape=crop,
                       colour=sc.colour_share(frame.pixels, region))
    return image, region, result, desc


def is_labelled(folder: Path) -> bool:
    """A labelme dataset: some labelme JSON (`shapes` and `imagePath`) under the folder."""
    for path in Path(folder).rglob("*.json"):
        try:
            doc = json.loads(path.read_text(encoding="utf-8-sig"))
        except (OSError, UnicodeDecodeError, ValueError):
            continue
        if isinstance(doc, dict) and "shapes" in doc and "imagePath" in doc:
            return True
    return False



def patients_table(folder: Path) -> dict[Path, str] | None:
    """labels.csv's patients (runtime.labelme.labels_table) as resolved image path -> patient; None without one."""
    table = labels_table(folder)
    return None if table is None else {path: patient for path, (patient, _) in table.items()}


def describe_folder(graph, unet, vgg, folder: Path | str, *, labels=None, say: Callable[[str], None] | None = None,
                    max_frames: int | None = None) -> Described:
    """The in-scope frames of a folder, described and grouped (the module's docstring says which count)."""
    from runtime.errors import UserError
    folder = Path(folder)
    if not folder.exists():
        raise UserError(f"reference frames '{folder}' do not exist; give the folder of your own training or "
                        f"validation frames (images, DICOM or a labelme dataset)")
    out = Described(labelled=folder.is_dir() and is_labelled(folder))
    items = _labelled_frames(folder, graph, labels, out, say) if out.labelled else _plain_frames(folder, out, say)
    for frame, group, truth in items:
        if max_frames is not None and out.frames >= max_frames:
            break
        out.frames += 1
        if frame.pixels is None or frame.error:
            out.unreadable += 1
            continue
        try:
            image, region, result, desc = describe_frame(graph, frame, unet, vgg)
        except pp.FrameError:
            out.unreadable += 1
            continue
        if truth is not None and not graph.is_kidney(pp.crop_mask(truth, region, graph.size)):
            out.not_kidney += 1
            continue
        if desc is None:
            out.gate_rejected += 1
            continue
        out.add(group, desc)
        if say and out.frames % 100 == 0:
            say(f"  described {out.frames} frames")
    return out


def _labelled_frames(folder: Path, graph, labels, out: Described, say) -> Iterator:
    from runtime.labelme import OUTLINED, read_dataset
    from runtime.sources import Frame
    samples = read_dataset(folder, labels=labels)
    if say:
        say(f"scope: {samples.summary_line()}")
    for i, s in enumerate(samples):
        if s.kidney != OUTLINED:          # no kidney, or not annotated: not a frame the reference may hold
            out.frames += 1
            out.not_kidney += 1
            continue
        try:
            gray = s.load_gray()
            truth = s.load_mask()
        except Exception:  # noqa: BLE001 (an unreadable image or annotation: counted, not fitted)
            gray, truth = None, None
        yield Frame(i, "reference", 0.0, gray), s.patient, truth


def _plain_frames(folder: Path, out: Described, say) -> Iterator:
    from runtime.errors import UserError
    from runtime.sources import SourceError, open_source
    try:
        source = open_source(str(folder), realtime=False)
    except SourceError as e:
        raise UserError(str(e)) from None
    table = patients_table(folder) if folder.is_dir() else None
    with source:
        for frame in source:
            yield frame, _group(folder, frame, table), None


def _group(folder: Path, frame, table: dict[Path, str] | None) -> str:
    name = frame.source_file
    if name is None:
        return folder.name
    if table is not None:
        patient = table.get((folder / name).resolve())
        if patient:
            return patient
    parts = Path(name).parts
    return parts[0] if len(parts) > 1 else name


def split_groups(groups: Iterable[str], *, held_out: Iterable[str] | None = None, share: float = HELD_OUT_SHARE,
                 seed: int = SPLIT_SEED) -> tuple[set[str], str]:
    """The held-out groups and how they were chosen: `held_out` (those of them present) when given, else `share`
    of the groups drawn at random with `seed` (at least MIN_HELD_OUT_GROUPS where there are twice that many)."""
    names = sorted(set(groups))
    if held_out is not None:
        chosen = set(map(str, held_out)) & set(names)
        return chosen, f"{len(chosen)} named held-out patients"
    n = max(1, round(share * len(names)))
    if len(names) >= 2 * sc.MIN_HELD_OUT_GROUPS:
        n = max(n, sc.MIN_HELD_OUT_GROUPS)
    rng = np.random.default_rng(seed)
    chosen = {names[i] for i in rng.choice(len(names), min(n, len(names) - 1), replace=False)} if len(names) > 1 \
        else set()
    return chosen, f"{len(chosen)} of {len(names)} groups held out at random (seed {seed})"


def fit_described(described: Described, held_out: set[str], *, keep: float = sc.DEFAULT_KEEP) -> sc.Reference:
    """fit_reference on the described frames: the held-out groups' frames set the limits (with their groups), the
    others are the reference. ScopeError (one sentence) when either side is too small."""
    ref_rows = [d for d, g in zip(described.rows, described.groups) if g not in held_out]
    held = [(d, g) for d, g in zip(described.rows, described.groups) if g in held_out]
    if not ref_rows:
        raise sc.ScopeError(f"no in-scope frames outside the held-out patients to use as the reference "
                            f"({len(described.rows)} in-scope frames in all)")
    return sc.fit_reference(ref_rows, [d for d, _ in held], keep=keep, held_out_groups=[g for _, g in held])


def open_fp32(bundle):
    """The bundle's FP32 UNet and VGG as onnxruntime runners (a context manager giving (unet, vgg))."""
    from contextlib import ExitStack, contextmanager

    from runtime.backends.ort import OrtRunner
    from runtime.bundle import check_runner

    @contextmanager
    def runners():
        graph = bundle.graph()
        with ExitStack() as stack:
            un = stack.enter_context(OrtRunner(bundle.network_file("unet", "fp32")))
            check_runner("unet", un, graph, bundle.network_file("unet", "fp32"))
            vg = stack.enter_context(OrtRunner(bundle.network_file("vgg", "fp32")))
            check_runner("vgg", vg, graph, bundle.network_file("vgg", "fp32"), bundle.num_features)
            yield un, vg
    return runners()


def fit_bundle(bundle_dir: Path | str, frames: Path | str, *, keep: float = sc.DEFAULT_KEEP,
               held_out: Iterable[str] | None = None, labels=None, say: Callable[[str], None] | None = None,
               who: str = "scope") -> sc.Reference:
    """Fit the bundle's scope reference on `frames` (a labelme dataset or a plain folder of in-scope frames) and
    write it into the bundle (`install`). `held_out`: the patients to set the limits on (default: the bundle's
    validation patients where the frames hold enough of them, else a quarter of the groups at random).
    ScopeError when the frames are too few to fit on; UserError for a folder that cannot be read."""
    from runtime.bundle import Bundle
    say = say or log.info
    bundle = Bundle.load(bundle_dir)
    graph = bundle.graph()
    with open_fp32(bundle) as (unet, vgg):
        described = describe_folder(graph, unet, vgg, frames, labels=labels, say=say)
    own = None
    if held_out is None:
        own = (bundle.manifest.get("provenance") or {}).get("validation_patients") or []
        present = set(map(str, own)) & set(described.groups)
        if len(present) >= sc.MIN_HELD_OUT_GROUPS:
            held_out = present
    chosen, how = split_groups(described.groups, held_out=held_out)
    if own and held_out is not None:
        how = f"the bundle's own validation patients ({len(chosen)} of {len(own)} here)"
    say(f"{who}: {len(described.rows)} in-scope frames of {len(set(described.groups))} "
        f"{'patients' if described.labelled else 'groups'} from {described.frames} frames "
        f"({described.gate_rejected} rejected by the gate, {described.not_kidney} without a labelled kidney, "
        f"{described.unreadable} unreadable); limits on {how}")
    ref = fit_described(described, chosen, keep=keep)
    install(bundle.root, ref, source=str(frames), split=how)
    say(f"{who}: scope reference written ({sc.FILE}): {ref.frames['prototypes']} prototypes, limits "
        + ", ".join(f"{t} {ref.thresholds[t]:.3g}" for t in sc.FITTED_TESTS)
        + f"; keeps {ref.kept_share:.1%} of {ref.frames['held_out']} held-out in-scope frames (target {keep:.0%})")
    return ref


def install(bundle_dir: Path | str, ref: sc.Reference, *, source: str | None = None,
            split: str | None = None) -> Path:
    """Write `ref` into the bundle: scope.npz, then manifest.json with the `scope` section (and scope.npz's sha256
    among the files) and manifest.sha256 (runtime.bundle.write_manifest). A signature (model.sig) no longer matches
    afterwards: a signed bundle must be signed again (`sonoscore sign`)."""
    from runtime.bundle import write_manifest
    root = Path(bundle_dir)
    ref.save(root / sc.FILE)
    manifest = json.loads((root / "manifest.json").read_text())
    section = ref.manifest_section()
    if source is not None:
        section["fitted_on"] = {"frames": source, **({"held_out": split} if split else {})}
    manifest["scope"] = section
    return write_manifest(root, manifest)


def reference_summary(section: dict | None) -> str:
    """One line for a manifest's scope section (None: no reference)."""
    if not section:
        return "no scope reference"
    th = section.get("thresholds", {})
    return (f"scope reference: {section.get('frames', {}).get('prototypes', '?')} prototypes, keep "
            f"{section.get('keep_share', float('nan')):.0%} (kept {section.get('kept_share', float('nan')):.1%} of "
            f"held-out), limits " + ", ".join(f"{t} {float(v):.3g}" for t, v in th.items() if math.isfinite(v)))


def no_reference_warning(bundle: Path | str, who: str) -> str:
    """The one line `export` (and `train`, when it could not fit one) says for a bundle without a reference."""
    return (f"{who}: warning: bundle {bundle} has no reference statistics: it will grade any frame its gate accepts; "
            f"give --reference-frames FOLDER (your own training or validation kidney frames) to `export`, or add them "
            f"with `sonoscore scope --bundle {bundle} --frames FOLDER`")


def fit_or_warn(bundle_dir: Path | str, frames: Path | str, *, held_out: Iterable[str] | None = None, labels=None,
                keep: float = sc.DEFAULT_KEEP, who: str = "train", shown: Path | str | None = None,
                say: Callable[[str], None] | None = None) -> sc.Reference | None:
    """`fit_bundle`, or, where the frames are too few to fit on (ScopeError), one warning line naming why and the
    bundle left without a reference (`shown`: the bundle's name in that line, when it is being written elsewhere)."""
    say = say or log.info
    try:
        return fit_bundle(bundle_dir, frames, keep=keep, held_out=held_out, labels=labels, say=say, who=who)
    except sc.ScopeError as e:
        say(f"{who}: warning: no scope reference fitted ({e})")
        say(no_reference_warning(shown or bundle_dir, who))
        return None
