"""Issue 27 ("Nothing lost, nothing run that was not signed"), item 3: the compiled-booster cache cannot run code
that this user did not build.

A library planted in a cache entry, with a meta.json whose key and sha256 match it, is a real shared object whose
constructor writes a marker file the moment it is loaded (dlopen). `sonoscore run --trust` (a real subprocess) on a
signed bundle must never load it: the marker must not appear, and the run must still grade with a compiled
booster (built afresh). Before the fix the cache trusted its own meta.json, so whoever could write to the cache
could plant code that ran under --trust.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from runtime.booster import _cache_key, find_compiler
from tests.conftest import sonoscore

COMPILER = find_compiler()
pytestmark = pytest.mark.skipif(COMPILER is None, reason="no C compiler: nothing is compiled or cached")


def planted_library(path: Path, marker: Path) -> str:
    """Compile a shared library whose constructor writes `marker`; its sha256."""
    src = path.with_suffix(".c")
    src.write_text('#include <stdio.h>\n'
                   f'__attribute__((constructor)) static void planted(void) {{ FILE *f = fopen("{marker}", "w"); '
                   'if (f) { fputs("planted code ran\\n", f); fclose(f); } }\n'
                   'int predict(void) { return 0; }\n')
    subprocess.run([*COMPILER.command.split(), "-shared", "-fPIC", str(src), "-o", str(path)], check=True,
                   capture_output=True)
    src.unlink()
    return hashlib.sha256(path.read_bytes()).hexdigest()


def entry_name(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]


def plant(cache: Path, bundle: Path, marker: Path, *, mode: int) -> list[Path]:
    """A planted library (and meta.json naming it with its true sha256) in the booster's entry and in the call
    extension's entry of `cache`; every folder made with `mode`. Returns the entries."""
    from runtime import rowcall
    entries = []
    for sub, key, name in (("booster", _cache_key(bundle / "booster.ubj", COMPILER), "predictor-planted.so"),
                           ("rowcall", rowcall._key(COMPILER), "_sonoscore_rowcall-planted.so")):
        entry = cache / sub / entry_name(key)
        entry.mkdir(parents=True)
        digest = planted_library(entry / name, marker)
        (entry / "meta.json").write_text(json.dumps({"key": key, "library": name, "library_sha256": digest}))
        for folder in (cache, cache / sub, entry):
            os.chmod(folder, mode)
        entries.append(entry)
    return entries


@pytest.fixture(scope="module")
def signed(tiny_bundle, tmp_path_factory):
    d = tmp_path_factory.mktemp("signed")
    b = d / "bundle"
    shutil.copytree(tiny_bundle, b)
    for args in (("keygen", "--out", d / "k"), ("sign", b, "--key", d / "k.key")):
        r = sonoscore(*args, timeout=300)
        assert r.returncode == 0, r.stderr
    return b, d / "k.pub"


def run_trusted(signed, cache: Path, tmp_path: Path):
    bundle, pub = signed
    env = {**os.environ, "SONOSCORE_CACHE": str(cache)}
    r = sonoscore("run", "--bundle", bundle, "--trust", pub, "--source", "sim://kidney?fps=0&frames=3", "--quiet",
                  "--results", tmp_path / "r.jsonl", timeout=600, env=env)
    assert r.returncode == 0, r.stderr
    records = [json.loads(x) for x in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert len(records) == 3 and all(x["error"] is None for x in records)
    return r


def test_a_library_planted_in_a_cache_others_can_write_is_never_loaded_under_trust(signed, tmp_path):
    """The cache is writable by everyone (a shared folder): whatever its meta.json says, nothing in it is loaded;
    the booster is compiled afresh into a private folder, one line saying why."""
    marker = tmp_path / "marker"
    cache = tmp_path / "cache"
    plant(cache, signed[0], marker, mode=0o777)
    r = run_trusted(signed, cache, tmp_path)
    assert not marker.exists(), "the planted library was loaded"
    said = [x for x in r.stderr.splitlines() if "not using the cache" in x]
    assert len(said) == 2 and "writable by everyone" in said[0]          # the booster's and the extension's
    assert "Traceback" not in r.stderr


def test_a_planted_entry_in_this_users_cache_that_others_could_write_is_rebuilt(signed, tmp_path):
    """The cache root is private but the entries are group-writable (made by someone in the group): they are
    removed and rebuilt, never loaded; the rebuilt entry is then used."""
    marker = tmp_path / "marker"
    cache = tmp_path / "cache"
    entries = plant(cache, signed[0], marker, mode=0o770)
    for sub in ("booster", "rowcall"):
        os.chmod(cache / sub, 0o700)
    os.chmod(cache, 0o700)
    r = run_trusted(signed, cache, tmp_path)
    assert not marker.exists(), "the planted library was loaded"
    assert sum("rebuilding the cache entry" in x for x in r.stderr.splitlines()) == 2
    for entry in entries:
        meta = json.loads((entry / "meta.json").read_text())
        assert "planted" not in meta["library"] and oct(entry.stat().st_mode & 0o777) == "0o700"
        assert not (entry / meta["library"]).stat().st_mode & 0o022
    r = run_trusted(signed, cache, tmp_path)                               # now a cache hit, said nothing
    assert "rebuilding" not in r.stderr and "not using the cache" not in r.stderr and not marker.exists()


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root to give files away")
def test_an_entry_owned_by_another_user_is_never_loaded(signed, tmp_path):
    """Mode 0755 but another user's: that user could have written it."""
    marker = tmp_path / "marker"
    cache = tmp_path / "cache"
    entries = plant(cache, signed[0], marker, mode=0o755)
    for entry in entries:
        for p in [entry, *entry.iterdir()]:
            os.chown(p, 65534, 65534)
    r = run_trusted(signed, cache, tmp_path)
    assert not marker.exists(), "the planted library was loaded"
    assert "belongs to another user" in r.stderr
