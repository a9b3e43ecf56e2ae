"""What every frame source shares: `Frame`, `Source`, `SourceError`, the installation's salt and opaque ids,
pixel-spacing metadata and the DICOM file test. The sources' modules import from here; runtime.sources re-exports
these names and opens a source from its string (`open_source`)."""
from __future__ import annotations

import hashlib
import hmac
import logging
import math
import os
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from runtime.preprocess import Region


class SourceError(ValueError):
    """A source that cannot be opened; the message names it and what to do."""


# Pixel spacing in `Frame.meta` (the same keys for every source that knows it; records carry `meta` to the sinks,
# and the results JSONL does not include it):
#   "pixel_spacing_rc_mm": (row mm, column mm), floats: the distance between the centres of neighbouring rows and
#                          of neighbouring columns, whenever the source knows the spacing;
#   "pixel_spacing_mm":    one float, mm per pixel, only when the pixels are square (row and column spacing within
#                          1% of each other; it is then the row spacing). A consumer that needs a single number
#                          reads this one and must not assume square pixels when it is absent.
SQUARE_PIXEL_TOLERANCE = 0.01


def spacing_meta(row_mm: float, col_mm: float) -> dict[str, Any]:
    """The meta entries for a pixel spacing (see above); empty when either value is not a positive finite number."""
    try:
        row, col = float(row_mm), float(col_mm)
    except (TypeError, ValueError):
        return {}
    if not (math.isfinite(row) and math.isfinite(col) and row > 0 and col > 0):
        return {}
    meta: dict[str, Any] = {"pixel_spacing_rc_mm": (row, col)}
    if abs(row - col) <= SQUARE_PIXEL_TOLERANCE * max(row, col):
        meta["pixel_spacing_mm"] = row
    return meta


@dataclass
class Frame:
    index: int
    source_id: str
    t_capture: float
    pixels: np.ndarray | None                 # HxW or HxWxC, uint8/uint16; None when unreadable
    channel_order: str = "RGB"
    window: tuple[float, float] | None = None  # 16-bit windowing (center, width) when the source knows it
    region: Region | None = None               # ultrasound region when the source knows it
    error: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)  # technical facts only; pixel spacing as described above
    # Where the frame came from, for `run --record-paths` only (runtime/stream.py copies them into the record when
    # asked; nothing else writes them): the file relative to the source root, and the frame's number inside it.
    # None for sources without files (sim, igtl, capture). Never a value read from inside a file (no DICOM UID).
    source_file: str | None = None
    frame_in_file: int | None = None


class Source:
    """Base class: iterate to get frames; `live` sources default to the `newest` policy."""

    live: bool = False
    fps: float = 0.0          # nominal frame rate (0: unknown / as fast as possible)
    source_id: str = "source"
    total: int | None = None  # frame count when known

    def __iter__(self) -> Iterator[Frame]:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# Decoded-pixel budget (docs/design.md, "Sources"): no image file, DICOM frame or OpenIGTLink IMAGE message larger
# than this many pixels is decoded; the size is read from the header and checked before any pixel is allocated.
# The image files a folder source reads as images (the others: DICOM when they are, else an error record).
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".pgm", ".ppm", ".webp"}

MAX_PIXELS = 64_000_000

SALT_FILE = "source-id.salt"   # under $SONOSCORE_CACHE: 32 random bytes, made once per installation
_SALT_BYTES = 32
_salts: dict[str, bytes] = {}
_salt_lock = threading.Lock()


def cache_dir() -> Path:
    """$SONOSCORE_CACHE, else ~/.cache/sonoscore (the caching rule of docs/design.md)."""
    env = os.environ.get("SONOSCORE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "sonoscore"


def installation_salt() -> bytes:
    """The installation's secret salt for source ids: `<cache>/source-id.salt`, 32 random bytes, created once
    (mode 0600, written to a temporary file and linked into place, so processes that start together agree on one)
    and reused after. Where it cannot be created or read, a random salt for this process only (ids then differ
    between runs; a warning says so). Never an unsalted hash: a path's hash alone is reversible by guessing."""
    folder = cache_dir()
    key = str(folder)
    with _salt_lock:
        if key not in _salts:
            _salts[key] = _load_or_make_salt(folder)
        return _salts[key]


def _load_or_make_salt(folder: Path) -> bytes:
    path = folder / SALT_FILE
    try:
        data = path.read_bytes()
        if len(data) == _SALT_BYTES:
            return data
    except FileNotFoundError:
        pass
    except OSError as e:
        return _process_salt(f"{path} cannot be read ({e.strerror})")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{SALT_FILE}.{os.getpid()}.{secrets.token_hex(4)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(secrets.token_bytes(_SALT_BYTES))
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, path)           # atomic: fails if another process made it first
            except FileExistsError:
                if len(path.read_bytes()) != _SALT_BYTES:   # a damaged salt is replaced (ids change once)
                    os.replace(tmp, path)
            except OSError:                  # no hard links on this file system
                os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()
        data = path.read_bytes()
        if len(data) == _SALT_BYTES:
            return data
        return _process_salt(f"{path} is damaged")
    except OSError as e:
        return _process_salt(f"{folder} is not writable ({e.strerror})")


def _process_salt(why: str) -> bytes:
    logging.getLogger(__name__).warning(
        "source ids: %s, so this run uses its own salt and its source ids will not match other runs'; set "
        "SONOSCORE_CACHE to a writable folder", why)
    return secrets.token_bytes(_SALT_BYTES)


def opaque_id(text: str, prefix: str) -> str:
    """A stable id that does not reveal the path (which may carry a patient's name): HMAC-SHA256 of the text under
    the installation's secret salt, 12 hex digits. Stable on one installation, meaningless anywhere else, and not
    reversible by hashing guessed paths (the salt is not in any output)."""
    digest = hmac.new(installation_salt(), text.encode("utf-8", "surrogateescape"), hashlib.sha256).hexdigest()
    return f"{prefix}-{digest[:12]}"


def now() -> float:
    return time.time()


def is_dicom(path: str | os.PathLike) -> bool:
    """True when `path` is a DICOM Part 10 file: a 128-byte preamble followed by "DICM".

    That is also exactly what pydicom accepts without `force=True`; files without the preamble (raw datasets,
    ACR-NEMA) are not recognised, and DicomSource refuses them with a sentence.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def folder_files(root: Path) -> tuple[list[Path], int]:
    """(the files under `root`, subfolders included, in FolderSource's order; how many annotation JSONs beside
    their images were left out). Hidden files and folders are skipped and links to folders not followed; a
    subfolder that cannot be listed is counted in one warning (naming no folder: a name may be a patient's)."""
    files: list[Path] = []
    annotations = 0
    unreadable: list[OSError] = []
    for folder, subfolders, names in os.walk(root, onerror=unreadable.append):
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
        here = [Path(folder) / n for n in sorted(names) if not n.startswith(".")]
        here = [p for p in here if p.is_file()]
        images = {p.stem for p in here if p.suffix.lower() in IMAGE_SUFFIXES}
        kept = [p for p in here if not (p.suffix.lower() == ".json" and p.stem in images)]
        annotations += len(here) - len(kept)
        files += kept
    if unreadable:
        logging.getLogger(__name__).warning("%d subfolder(s) of '%s' could not be listed (%s); their files are not "
                                            "read", len(unreadable), root,
                                            (unreadable[0].strerror or type(unreadable[0]).__name__).lower())
    files.sort(key=lambda p: p.relative_to(root).parts)
    return files, annotations
