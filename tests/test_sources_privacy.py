"""Issue 12 item 5: no identifier through file names or source ids.

A folder image named like a patient that fails to decode is named in its error by its place ("image 2 of 3"),
never by its file name; frame metadata carries no file name; the source id is an HMAC of the path under a salt made
once per installation ($SONOSCORE_CACHE/source-id.salt, 0600), so hashing guessed paths recovers nothing.
"""
import hashlib
import os
import stat
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np

from runtime.sources import open_source

ROOT = Path(__file__).resolve().parents[1]
PHI = ("SMITH", "JANE", "MRN778899", "MRN483920")


def _png(h=20, w=30):
    ok, buf = cv2.imencode(".png", np.full((h, w), 100, np.uint8))
    return buf.tobytes()


def test_a_broken_image_is_named_by_its_place_not_its_file_name(tmp_path):
    folder = tmp_path / "MRN483920"
    folder.mkdir()
    (folder / "a.png").write_bytes(_png())
    (folder / "SMITH_JANE_MRN778899.png").write_bytes(_png()[:60])     # truncated
    (folder / "SMITH_JANE_MRN778899.txt").write_text("not an image")
    src = open_source(str(folder))
    frames = list(src)
    assert [f.error is None for f in frames] == [False, False, True]   # name order: upper case first
    errors = [f.error for f in frames if f.error]
    assert len(errors) == 2
    for f in frames:
        text = repr((f.error, f.meta, f.source_id))
        assert not any(p in text for p in PHI), text
        assert "name" not in f.meta
    assert errors[0].startswith("image 1 of 3 (in name order) in the folder is not a decodable image"), errors
    assert errors[1].startswith("image 2 of 3 (in name order) in the folder is not an image this runtime"), errors


def test_source_id_is_salted_per_installation_and_stable_on_one(tmp_path):
    folder = tmp_path / "MRN483920"
    folder.mkdir()
    (folder / "a.png").write_bytes(_png())
    code = ("import sys; from runtime.sources import open_source; print(open_source(sys.argv[1]).source_id)")

    def sid(cache):
        env = {**os.environ, "SONOSCORE_CACHE": str(cache)}
        r = subprocess.run([sys.executable, "-c", code, str(folder)], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        return r.stdout.strip()

    one, again, other = sid(tmp_path / "c1"), sid(tmp_path / "c1"), sid(tmp_path / "c2")
    assert one == again and one != other and one.startswith("files-")
    # the unsalted hash of the path (the old id, reversible by hashing guessed names) is not it
    unsalted = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:12]
    assert unsalted not in one and unsalted not in other
    salt = tmp_path / "c1" / "source-id.salt"
    assert salt.stat().st_size == 32 and stat.S_IMODE(salt.stat().st_mode) == 0o600
    assert not [p for p in (tmp_path / "c1").iterdir() if p.name != "source-id.salt"]  # no temp file left


def test_an_unwritable_cache_still_gives_a_salted_id_with_a_warning(tmp_path, monkeypatch, caplog):
    import runtime.sources.base as sources
    blocker = tmp_path / "file"
    blocker.write_text("x")
    monkeypatch.setenv("SONOSCORE_CACHE", str(blocker / "cache"))   # under a file: cannot be created
    monkeypatch.setattr(sources, "_salts", {})
    a = sources.opaque_id("/data/MRN483920", "files")
    assert a == sources.opaque_id("/data/MRN483920", "files")       # stable within the process
    assert hashlib.sha256(b"/data/MRN483920").hexdigest()[:12] not in a
    assert "will not match other runs" in caplog.text
