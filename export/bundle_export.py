"""`sonoscore export`: a user's checkpoints or ONNX files (or random weights, for timing) and an XGBoost model ->
a bundle, everything checked before anything is written (`export_from_checkpoints`).
"""
from __future__ import annotations

import contextlib
import shutil
import time
from pathlib import Path

from runtime import logs
from runtime.bundle import Bundle
from runtime.graph import Graph
from export.bundle_files import _booster_section, export_networks, write_bundle_manifest
from export.card import read_card
from export.recipe import check_gate, class_names

log = logs.get("export")


def _check_out(out: Path) -> None:
    """--out must be a new folder, an empty one, or an existing bundle (replaced once the new one is complete)."""
    from runtime.errors import UserError
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise UserError(f"--out '{out}' is a file; give a folder for the bundle")
        if any(out.iterdir()) and not (out / "manifest.json").is_file():
            raise UserError(f"--out '{out}' is a folder that holds other files and no bundle; give a new folder (an "
                            f"existing bundle there is replaced once the new one is complete)")


def _move_into_place(tmp: Path, out: Path) -> None:
    """The complete bundle in `tmp` becomes `out`; a bundle already there is replaced only now."""
    if not out.exists():
        tmp.rename(out)
        return
    old = out.with_name(f".{out.name}.old-{tmp.name.rsplit('-', 1)[-1]}")
    out.rename(old)
    try:
        tmp.rename(out)
    except BaseException:
        old.rename(out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def export_from_checkpoints(unet_ckpt, vgg_ckpt, booster_path, out: Path, *, random_weights=False,
                            unet_width=None, vgg_width=None, unet_onnx=None, vgg_onnx=None, unet_input=None,
                            vgg_input=None, name=None, version=None, card=None, num_class=None, classes=None,
                            mask_threshold=None, min_mask_fraction=None, unet_output=None, vgg_output=None,
                            reference_frames=None, reference_keep: float = 0.98) -> Path:
    """`sonoscore export`: checkpoints or ONNX files (or random weights, for timing) + an XGBoost model -> bundle.

    Everything is checked before anything is written: the options, the booster (loads, objective, class count),
    the VGG (its Fc2 width is the booster's feature count), the UNet. The bundle is then made in a folder beside
    `out` and moved into place only when complete; on any failure that folder is removed.

    `num_class` / `classes` (`--num-class`, `--classes`): the class names (export.recipe.class_names; the booster
    must predict that many); `mask_threshold` / `min_mask_fraction`: the gate; `unet_output` / `vgg_output`: the
    output of a user's ONNX file to read. The problems of both ONNX files are reported together.
    `reference_frames` (`--reference-frames`): the user's in-scope frames, on which the bundle's scope reference is
    fitted (runtime.scope_fit, keeping `reference_keep` of the held-out ones); without it, one warning line says
    the bundle has none (not for a random-weights timing bundle)."""
    import tempfile
    from export import checkpoints as ck
    from runtime import normalize
    from runtime.errors import UserError
    t0 = time.time()
    out = Path(out)
    _check_out(out)
    unet_norm = normalize.parse(unet_input, "--unet-input") if unet_input else dict(normalize.UNIT)
    vgg_norm = normalize.parse(vgg_input, "--vgg-input") if vgg_input else dict(normalize.UNIT)
    unet_norm = normalize.check(unet_norm, 1, "--unet-input for the 1-channel UNet: ")
    names_of_classes = class_names(num_class, classes)
    gate = dict(zip(("mask_threshold", "min_mask_fraction"), check_gate(mask_threshold, min_mask_fraction)))
    for net, onnx_file, output in (("unet", unet_onnx, unet_output), ("vgg", vgg_onnx, vgg_output)):
        if output is not None and not onnx_file:
            raise UserError(f"--{net}-output names an output of --{net}-onnx; give --{net}-onnx FILE or leave it out")
    if random_weights:
        if unet_ckpt or vgg_ckpt or unet_onnx or vgg_onnx:
            raise UserError("give either checkpoints (or ONNX files) or --random-weights, not both")
        card = read_card(card, name, version, "sonoscore-random-weights-timing")
    else:
        for net, ckpt, onnx_file in (("unet", unet_ckpt, unet_onnx), ("vgg", vgg_ckpt, vgg_onnx)):
            if ckpt and onnx_file:
                raise UserError(f"give the {net} as --{net} (a checkpoint) or --{net}-onnx (an ONNX file), not both")
            if not (ckpt or onnx_file):
                raise UserError(f"export needs the {net}: --{net} CHECKPOINT or --{net}-onnx FILE (or "
                                f"--random-weights for a timing bundle)")
        card = read_card(card, name, version, out.name)
    if booster_path is None:
        raise UserError("export needs --booster, an XGBoost model (.json or .ubj)")
    if reference_frames is not None and not Path(reference_frames).exists():
        raise UserError(f"--reference-frames '{reference_frames}' does not exist; give the folder of your own "
                        f"training or validation kidney frames (images, DICOM or a labelme dataset)")
    booster, binfo = ck.check_booster(booster_path, len(names_of_classes))
    size = Graph().size
    sources: dict = {}
    onnx_nets: dict = {}
    if unet_onnx or vgg_onnx:   # every problem of both files in one pass
        problems: list[str] = []
        for net, onnx_file, option, norm, output in (("vgg", vgg_onnx, "--vgg-onnx", vgg_norm, vgg_output),
                                                     ("unet", unet_onnx, "--unet-onnx", unet_norm, unet_output)):
            if onnx_file:
                onnx_nets[net], found = ck.onnx_problems(onnx_file, net, option, size, norm, output=output)
                problems += found
        if problems:
            raise UserError(ck.join_problems(problems))

    # The VGG first: its Fc2 width is what the booster must take.
    if random_weights:
        import torch
        from export.models import UNet, VGG19BN
        torch.manual_seed(0)
        vgg = VGG19BN(width=vgg_width or 1.0, in_channels=3).eval()
        vw, vch, features, vgg_what = vgg_width or 1.0, 3, vgg.features_dim, "the random-weights VGG"
    elif vgg_onnx:
        vgg = onnx_nets["vgg"]
        vw, vch, features, vgg_what = None, vgg.channels, vgg.features, f"--vgg-onnx '{vgg_onnx}'"
        sources["vgg"] = {"onnx": Path(vgg_onnx).name}
    else:   # recognised and sized from the tensors; the network is built once everything is checked
        vgg = ck.recognise_checkpoint(vgg_ckpt, "vgg", "--vgg")
        vw, vch, features = vgg.width, vgg.channels, vgg.features
        vgg_what, sources["vgg"] = f"--vgg '{vgg_ckpt}'", vgg.source
    ck.check_features(binfo, features, booster_path, vgg_what)
    vgg_norm = normalize.check(vgg_norm, vch, f"--vgg-input for a {vch}-channel VGG: ")
    if random_weights:
        unet, uw = UNet(width=unet_width or 1.0).eval(), unet_width or 1.0
    elif unet_onnx:
        unet, uw = onnx_nets["unet"], None
        sources["unet"] = {"onnx": Path(unet_onnx).name}
    else:
        unet = ck.recognise_checkpoint(unet_ckpt, "unet", "--unet")
        uw, sources["unet"] = unet.width, unet.source
    unet, vgg = (n.build().model if isinstance(n, ck.Recognised) else n for n in (unet, vgg))
    names = {}
    if isinstance(unet, ck.OnnxNetwork):
        names.update(unet_input=unet.input_name, unet_output=unet.output_name)
    if isinstance(vgg, ck.OnnxNetwork):
        names.update(vgg_input=vgg.input_name, vgg_output=vgg.output_name)
    graph = Graph(vgg_channels=vch, unet_normalization=unet_norm, vgg_normalization=vgg_norm, **names, **gate)
    log.info(f"export: booster {Path(booster_path).name} ({binfo['objective']}, {binfo['num_class']} classes, "
         f"{binfo['num_features']} features) fits; VGG {vgg_what} gives {features} features")

    created = [p for p in (out.parent, *out.parent.parents) if not p.exists()]
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-"))
    except OSError as e:
        raise UserError(f"--out '{out}': cannot write a folder beside it ({e.strerror or type(e).__name__}); give a "
                        f"folder you can write to") from None
    try:
        nets = export_networks(unet, vgg, tmp, uw, vw, graph)
        booster.save_model(str(tmp / "booster.ubj"))
        prov = {"made_by": "sonoscore export", "random_weights": bool(random_weights),
                "unet_checkpoint": None if random_weights or unet_onnx else Path(unet_ckpt).name,
                "vgg_checkpoint": None if random_weights or vgg_onnx else Path(vgg_ckpt).name,
                "booster": Path(booster_path).name, "sources": sources, "seconds": round(time.time() - t0, 1)}
        if random_weights:
            prov["note"] = "random network weights: for timing only, its grades mean nothing"
        write_bundle_manifest(tmp, nets, prov, graph, demo=bool(random_weights), card=card,
                              booster=_booster_section(booster), classes=names_of_classes)
        if reference_frames is not None:
            from runtime.scope import ScopeError
            from runtime.scope_fit import fit_bundle
            try:
                fit_bundle(tmp, reference_frames, keep=reference_keep, who="export", say=log.info)
            except ScopeError as e:
                raise UserError(f"--reference-frames '{reference_frames}': {e}; nothing written") from None
        Bundle.load(tmp)   # verify what was written
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for p in created:   # folders made for --out's parent, innermost first, if still empty
            with contextlib.suppress(OSError):
                p.rmdir()
        raise
    log.info(f"export: bundle written to {out} in {time.time() - t0:.0f} s")
    if reference_frames is None and not random_weights:
        from runtime.scope_fit import no_reference_warning
        log.info(no_reference_warning(out, "export"))
    return out


def load_checkpoint(path: Path, kind: str):
    """A checkpoint file -> (model, width), the architecture recognised from its keys (export.checkpoints)."""
    from export.checkpoints import load_network
    net = load_network(path, kind, f"--{kind}")
    return net.model, net.width
