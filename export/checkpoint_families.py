"""The checkpoint layouts (families) `sonoscore export` recognises, and recognising one from a state dict's key names
(export/checkpoints.py reads the file and builds the network; this module only names what the keys are).

Each family is built from export.models at a tiny width and its key names listed (`families()`): the jakeoung UNet
with and without BatchNorm, the VGG-19-BN with sonoscore's keys and with torchvision's (classifier.0/3/6 for
fc1/fc2/head). `recognise` finds the family whose names a state dict has exactly (after dropping a leading component
every key shares, such as Lightning's `model.`), of the kind wanted; else one UserError sentence naming the closest
family and its first missing and unexpected keys.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from runtime.errors import UserError

SHOWN_KEYS = 3           # missing / unexpected keys named in a refusal
TORCHVISION_TO_PROJECT = {"classifier.0": "fc1", "classifier.3": "fc2", "classifier.6": "head"}


@dataclass
class Family:
    """A network sonoscore exports, as a checkpoint names its tensors."""
    key: str                                   # e.g. "unet-bn"
    kind: str                                  # "unet" or "vgg"
    label: str                                 # for people: "the jakeoung/Unet_pytorch UNet with BatchNorm"
    names: list[str]                           # the checkpoint's key names, required, in the model's order
    optional: set[str] = field(default_factory=set)
    rename: Callable[[str], str] = lambda k: k     # checkpoint key -> the project module's key  # noqa: E731


def _keys(build) -> list[str]:
    return list(build().state_dict())   # tiny widths: built on the CPU in milliseconds


def _to_torchvision(key: str) -> str:
    for tv, own in TORCHVISION_TO_PROJECT.items():
        if key.startswith(own + "."):
            return tv + key[len(own):]
    return key


def _from_torchvision(key: str) -> str:
    for tv, own in TORCHVISION_TO_PROJECT.items():
        if key.startswith(tv + "."):
            return own + key[len(tv):]
    return key


_FAMILIES: list[Family] | None = None


def families() -> list[Family]:
    """Every checkpoint layout export recognises (key names only: sizes are read from the tensors)."""
    global _FAMILIES
    if _FAMILIES is None:
        from export.models import UNet, VGG19BN
        bn = _keys(lambda: UNet(1 / 32, batch_norm=True))
        plain = _keys(lambda: UNet(1 / 32, batch_norm=False))
        vgg = _keys(lambda: VGG19BN(1 / 64, num_classes=4))
        head = {k for k in vgg if k.startswith("head.")}
        tracked = {k for k in bn if k.endswith(".num_batches_tracked")}
        vgg_tracked = {k for k in vgg if k.endswith(".num_batches_tracked")}
        _FAMILIES = [
            Family("unet-bn", "unet", "the jakeoung/Unet_pytorch UNet with BatchNorm (--useBN)",
                   [k for k in bn if k not in tracked], tracked),
            Family("unet-relu", "unet", "the jakeoung/Unet_pytorch UNet without BatchNorm, its default variant", plain),
            Family("vgg-torchvision", "vgg", "VGG-19-BN with torchvision keys (features.N, classifier.0/3/6)",
                   [_to_torchvision(k) for k in vgg if k not in head | vgg_tracked],
                   {_to_torchvision(k) for k in head | vgg_tracked}, _from_torchvision),
            Family("vgg-project", "vgg", "VGG-19-BN with sonoscore's keys (features.N, fc1, fc2, head)",
                   [k for k in vgg if k not in head | vgg_tracked], head | vgg_tracked),
        ]
    return _FAMILIES


@dataclass
class Fit:
    family: Family
    keys: dict[str, str]          # checkpoint key (as read, `module` dropped) -> the name the family gives it
    prefix: str                   # a leading component dropped from every key ("" when none)
    missing: list[str]
    unexpected: list[str]

    @property
    def exact(self) -> bool:
        return not self.missing and not self.unexpected

    @property
    def score(self) -> float:
        shared = len(self.family.names) - len(self.missing)
        return shared / (len(self.family.names) + len(self.unexpected))


def _fit(family: Family, keys: list[str], prefix: str) -> Fit:
    stripped = {k: k[len(prefix):] for k in keys}
    given = set(stripped.values())
    known = set(family.names) | family.optional
    missing = [k for k in family.names if k not in given]
    unexpected = [s for s in stripped.values() if s not in known]
    return Fit(family, stripped, prefix, missing, unexpected)


def _prefixes(keys: list[str]) -> list[str]:
    """"" and, while every key shares its first component (Lightning's `model.`, a wrapper's `net.`), those."""
    out, parts = [""], [k.split(".") for k in keys]
    depth = 0
    while all(len(p) > depth + 1 for p in parts) and len({p[depth] for p in parts}) == 1:
        depth += 1
        out.append(".".join(parts[0][:depth]) + ".")
    return out


def _names(keys: list[str]) -> str:
    shown = ", ".join(keys[:SHOWN_KEYS])
    return shown + (f" and {len(keys) - SHOWN_KEYS} more" if len(keys) > SHOWN_KEYS else "")


def recognise(sd: dict, kind: str, option: str, path: Path | str) -> Fit:
    """The family whose key names the state dict has exactly, of the `kind` wanted; else one sentence."""
    keys = list(sd)
    fits = [_fit(f, keys, p) for p in _prefixes(keys) for f in families()]
    exact = [f for f in fits if f.exact]
    mine = [f for f in exact if f.family.kind == kind]
    if mine:
        return mine[0]
    if exact:
        other = exact[0].family
        return_option = "--unet" if other.kind == "unet" else "--vgg"
        raise UserError(f"checkpoint '{path}' given as {option} does not fit the {kind} architecture: it is "
                        f"{other.label}; give it as {return_option}")
    best = max(fits, key=lambda f: (f.score, f.family.kind == kind))
    shared = len(best.family.names) - len(best.missing)
    parts = []
    if best.missing:
        parts.append(f"missing {_names(best.missing)}")
    if best.unexpected:
        parts.append(f"unexpected {_names([best.prefix + k for k in best.unexpected])}")
    raise UserError(f"checkpoint '{path}' given as {option} does not fit the {kind} architecture nor any network "
                    f"sonoscore exports; closest is {best.family.label}, with {shared} of {len(best.family.names)} of "
                    f"its keys: {'; '.join(parts)} (README, 'Checkpoints export accepts', lists the key names)")
