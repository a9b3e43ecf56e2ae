"""The start-up check of a run's output paths: every `--results`, `--video`, `--study-summary`, `--study-report`
and `--save-masks` path is judged before anything starts or is written (docs/design.md, "How `run` writes its
outputs")."""
from __future__ import annotations

import os
from pathlib import Path

from runtime.errors import UserError
from runtime.sinks import is_stream_file, target_path


def _creatable(label: str, path: Path, shown: str | Path) -> None:
    """`path` (not existing, or a folder to write into) can be made: its nearest existing ancestor is a folder
    this process may write."""
    anc = path
    while not anc.exists():
        if anc.parent == anc:
            break
        anc = anc.parent
    if not anc.is_dir():
        raise UserError(f"{label} {shown} cannot be written: {anc} is a file, not a folder")
    if not os.access(anc, os.W_OK | os.X_OK):
        why = "read-only" if _read_only_fs(anc) else "not writable by this user"
        raise UserError(f"{label} {shown} cannot be written: the folder {anc} is {why}")


def _read_only_fs(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def check_outputs(files: list[tuple[str, str | Path]], folders: list[tuple[str, str | Path]] = (),
                  inputs: list[str | Path] = (), stream_ok: tuple[str, ...] = ()) -> None:
    """Refuse, before anything is written, output paths that cannot work; raises UserError (one sentence).

    `files` and `folders` are (label, path) pairs: the same path twice (after links), an input given as an output,
    a folder given as a file, a `--video` whose name the video sink cannot write (not .mp4 / .m4v), a file given
    as a folder, a path whose folder cannot be written or created, or an existing file that is read-only. Labels in `stream_ok` may name a pipe or device (written in place); others
    must be regular files. Nothing is created or changed."""
    seen: dict[str, str] = {}
    for label, p in [*files, *folders]:
        real = os.path.realpath(p)
        if real in seen:
            raise UserError(f"{seen[real]} and {label} are the same path ({p}): give each output its own")
        seen[real] = label
    for src in inputs:
        real = os.path.realpath(src)
        if real in seen:
            raise UserError(f"{seen[real]} {src} is the source being read: give the output another path")
    for label, p in files:
        target = target_path(p)
        if target.is_dir():
            raise UserError(f"{label} {p} is a folder: give a file name")
        if target.exists():
            if is_stream_file(target):
                if label not in stream_ok:
                    raise UserError(f"{label} {p} is not a regular file: give a file name")
                if not os.access(target, os.W_OK):
                    raise UserError(f"{label} {p} is not writable by this user")
                continue
            if not os.access(target, os.W_OK):
                raise UserError(f"{label} {p} is read-only")
        if label == "--video":                   # the sink's own rule: MP4 names only (runtime/sinks/video.py)
            from runtime.sinks.video import check_path
            check_path(p, label)
        _creatable(label, target.parent, p)
    for label, p in folders:
        target = target_path(p)
        if target.exists() and not target.is_dir():
            raise UserError(f"{label} {p} is a file: give a folder")
        _creatable(label, target, p)
