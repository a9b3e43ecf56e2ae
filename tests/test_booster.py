"""The booster: compiled (TL2cgen, called through ctypes or the call extension) and interpreted (GTIL) predictions
equal XGBoost's own; the compiled library is cached, reused, rebuilt when stale or damaged; no compiler means GTIL
with a warning; no Python headers means the ctypes call, with the reason kept.

Builds run in subprocesses (real gcc, real concurrent processes); this process only loads libraries nobody
modifies afterwards. The realistic-size model (400 trees of depth 16 on 1024 features) takes about a minute to
train and compile, so its test runs only with SONOSCORE_SLOW_TESTS=1.
"""
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

xgb = pytest.importorskip("xgboost")

from runtime.booster import Booster, BoosterError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-5

LOAD = r"""
import json, sys
import numpy as np
from runtime.booster import Booster
model, cache, backend, feats = sys.argv[1:5]
b = Booster.load(model, cache_dir=cache, backend=backend)
print(json.dumps({"backend": b.backend, "built": b.built, "library": str(b.library) if b.library else None,
                  "probs": b.predict(np.load(feats)).tolist()}))
"""


LOAD_ONE = r"""
import json, sys, sysconfig
import numpy as np
model, cache, feats, headers = sys.argv[1:5]
if headers == "absent":  # a target without python3-dev: sysconfig points at a folder with no Python.h
    real = sysconfig.get_paths
    sysconfig.get_paths = lambda *a, **k: {**real(*a, **k), "include": cache + "/no-headers"}
from runtime import rowcall
from runtime.booster import Booster
b = Booster.load(model, cache_dir=cache)
x = np.load(feats)
rows = [b.predict_one(r) for r in x]
print(json.dumps({"row_call": b.row_call, "why_not": rowcall.why_not(), "probs": [p for p, _ in rows],
                  "grades": [g for _, g in rows]}))
"""


def train(path: Path, *, rows=300, features=64, rounds=25, depth=6, objective="multi:softprob", seed=0) -> Path:
    """A 4-class booster with a learnable signal; 10% of training values missing, so splits learn both default
    directions for NaN."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, features)).astype(np.float32)
    y = np.argmax(x[:, :4] + 0.5 * rng.normal(size=(rows, 4)), axis=1)
    x[rng.random(x.shape) < 0.1] = np.nan
    params = {"objective": objective, "num_class": 4, "eta": 0.3, "max_depth": depth, "subsample": 0.5,
              "lambda": 10, "tree_method": "hist", "nthread": 1, "seed": seed}
    xgb.train(params, xgb.DMatrix(x, label=y), rounds).save_model(str(path))
    return path


def probe_rows(features: int, seed=1) -> np.ndarray:
    """Random rows, rows 30% missing, and the edges: zeros, all missing, huge, tiny and infinite values."""
    rng = np.random.default_rng(seed)
    rand = rng.normal(size=(64, features)).astype(np.float32)
    holes = rng.normal(size=(64, features)).astype(np.float32)
    holes[rng.random(holes.shape) < 0.3] = np.nan
    edges = np.stack([np.full(features, v, np.float32) for v in (0.0, np.nan, 1e30, -1e30, 1e-30, np.inf, -np.inf)])
    return np.concatenate([rand, holes, edges])


def reference(model: Path, x: np.ndarray) -> np.ndarray:
    # inplace_predict: NaN is missing (as in DMatrix) and it accepts +-inf, which DMatrix refuses.
    return xgb.Booster(model_file=str(model)).inplace_predict(x)


def load_in_subprocess(model, cache, feats, backend="auto", env=None):
    proc = subprocess.run([sys.executable, "-c", LOAD, str(model), str(cache), backend, str(feats)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["probs"] = np.array(out["probs"], np.float32)
    return out, proc.stderr


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return train(tmp_path_factory.mktemp("model") / "booster.ubj")


@pytest.fixture(scope="module")
def feats(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("feats") / "x.npy"
    np.save(path, probe_rows(64))
    return path


@pytest.fixture(scope="module")
def built(model, feats, tmp_path_factory):
    """One compiled cache, built by a real `Booster.load` in a subprocess: (cache dir, its output, stderr)."""
    cache = tmp_path_factory.mktemp("cache")
    out, err = load_in_subprocess(model, cache, feats)
    return cache, out, err


def copy_cache(built, tmp_path) -> tuple[Path, Path]:
    cache = tmp_path / "cache"
    shutil.copytree(built[0], cache)
    (entry,) = (cache / "booster").iterdir()
    return cache, entry


# -- parity ------------------------------------------------------------------------------------------------------------
def test_compiled_and_gtil_match_xgboost_within_1e5_including_missing_and_edge_values(model, built, tmp_path):
    cache, _ = copy_cache(built, tmp_path)
    x = probe_rows(64)
    ref = reference(model, x)
    compiled = Booster.load(model, cache_dir=cache, progress=False)
    gtil = Booster.load(model, backend="gtil")
    assert (compiled.backend, compiled.built, gtil.backend) == ("tl2cgen", False, "gtil")
    for b in (compiled, gtil):
        p = b.predict(x)
        assert p.shape == (len(x), 4) and p.dtype == np.float32
        assert np.abs(p - ref).max() <= TOL, b.backend
        assert np.abs(p.sum(axis=1) - 1).max() <= 1e-6
    # The all-missing row really takes the default branches: its probabilities differ from the all-zero row's.
    assert np.abs(compiled.predict(x[-6]) - compiled.predict(x[-7])).max() > 1e-3


def test_predict_takes_one_frame_as_1d_and_casts_float64(model, built, tmp_path):
    cache, _ = copy_cache(built, tmp_path)
    b = Booster.load(model, cache_dir=cache, progress=False)
    x = probe_rows(64)[:3]
    one = b.predict(x[0].astype(np.float64))
    assert one.shape == (1, 4)
    assert np.array_equal(one[0], b.predict(x)[0])
    assert b.num_features == 64
    assert b.predict(np.zeros((0, 64), np.float32)).shape == (0, 4)


def test_wrong_feature_count_and_class_count_are_one_sentence_errors(model, built, tmp_path):
    cache, _ = copy_cache(built, tmp_path)
    b = Booster.load(model, cache_dir=cache, progress=False)
    with pytest.raises(BoosterError, match=r"takes 64 features per row, got an array of shape \(2, 63\)"):
        b.predict(np.zeros((2, 63), np.float32))
    with pytest.raises(BoosterError, match=r"has 4 class\(es\) but 3 are expected"):
        Booster.load(model, num_class=3, backend="gtil")
    with pytest.raises(BoosterError, match="does not exist"):
        Booster.load(tmp_path / "nope.ubj")
    with pytest.raises(BoosterError, match="backend 'fast' is unknown"):
        Booster.load(model, backend="fast")


def test_a_binary_model_is_refused_and_multi_softmax_gives_the_same_probabilities(model, tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(100, 8)).astype(np.float32)
    binary = tmp_path / "binary.ubj"
    xgb.train({"objective": "binary:logistic", "nthread": 1}, xgb.DMatrix(x, label=x[:, 0] > 0), 2).save_model(
        str(binary))
    with pytest.raises(BoosterError, match=r"has 1 class\(es\) but 4 are expected"):
        Booster.load(binary, backend="gtil")
    # Treelite keeps the softmax of a multi:softmax model, so it scores like its multi:softprob twin.
    softmax = train(tmp_path / "softmax.ubj", objective="multi:softmax")
    x = probe_rows(64)
    assert np.abs(Booster.load(softmax, backend="gtil").predict(x) - reference(model, x)).max() <= TOL


# -- the cache ---------------------------------------------------------------------------------------------------------
def test_first_load_compiles_with_progress_and_second_load_reuses_the_library(model, feats, built):
    cache, first, err = built
    assert first["backend"] == "tl2cgen" and first["built"] is True
    assert "booster: compiling booster.ubj" in err and "compiled in" in err
    assert np.abs(first["probs"] - reference(model, np.load(feats))).max() <= TOL
    (entry,) = (cache / "booster").iterdir()
    stamps = {p.name: p.stat().st_mtime_ns for p in entry.iterdir()}
    second, err2 = load_in_subprocess(model, cache, feats)
    assert second["built"] is False and second["library"] == first["library"]
    assert "compiling" not in err2
    assert {p.name: p.stat().st_mtime_ns for p in entry.iterdir()} == stamps
    assert np.array_equal(second["probs"], first["probs"])


@pytest.mark.parametrize("damage", ["truncated library", "garbage library", "missing library", "foreign metadata",
                                    "corrupt metadata"])
def test_a_damaged_or_foreign_cache_entry_is_rebuilt_not_loaded(model, feats, built, tmp_path, damage):
    cache, entry = copy_cache(built, tmp_path)
    meta = json.loads((entry / "meta.json").read_text())
    lib = entry / meta["library"]
    if damage == "truncated library":
        lib.write_bytes(lib.read_bytes()[:4096])
    elif damage == "garbage library":
        lib.write_bytes(b"\x7fELF" + os.urandom(lib.stat().st_size - 4))
    elif damage == "missing library":
        lib.unlink()
    elif damage == "foreign metadata":  # an entry made by another tl2cgen: same files, different key
        meta["key"]["tl2cgen"] = "0.0.1"
        (entry / "meta.json").write_text(json.dumps(meta))
    else:
        (entry / "meta.json").write_text('{"key": ')
    out, err = load_in_subprocess(model, cache, feats)
    assert out["built"] is True and out["backend"] == "tl2cgen"
    assert np.array_equal(out["probs"], built[1]["probs"])
    fresh = json.loads((entry / "meta.json").read_text())
    assert fresh["key"] == built_key(built)
    assert [p.name for p in entry.glob("*.so")] == [fresh["library"]]


def built_key(built) -> dict:
    (entry,) = (built[0] / "booster").iterdir()
    return json.loads((entry / "meta.json").read_text())["key"]


def test_two_processes_starting_together_build_once_and_both_load(model, feats, tmp_path):
    cache = tmp_path / "cache"
    cmd = [sys.executable, "-c", LOAD, str(model), str(cache), "auto", str(feats)]
    procs = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    results = [json.loads(o.strip().splitlines()[-1]) for o, _ in outs]
    assert sorted(r["built"] for r in results) == [False, True]  # the second waited on the lock, then hit
    assert results[0]["probs"] == results[1]["probs"]
    (entry,) = (cache / "booster").iterdir()
    assert sorted(p.name for p in entry.iterdir() if p.name != ".lock") == sorted(
        ["meta.json", Path(results[0]["library"]).name])  # no temp files left behind


# -- no compiler -------------------------------------------------------------------------------------------------------
def test_without_a_compiler_auto_falls_back_to_gtil_with_a_warning_and_same_probabilities(model, feats, built,
                                                                                          tmp_path):
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "CC"}
    env["PATH"] = str(empty)  # no cc, gcc or clang anywhere
    out, err = load_in_subprocess(model, tmp_path / "cache", feats, env=env)
    assert out["backend"] == "gtil" and out["library"] is None
    assert "no working C compiler" in err and "falling back to treelite GTIL" in err
    assert np.abs(out["probs"] - built[1]["probs"]).max() <= TOL
    assert not (tmp_path / "cache" / "booster").exists()


def test_a_compiler_that_fails_means_gtil_for_auto_and_an_error_for_tl2cgen(model, tmp_path, monkeypatch):
    fake = tmp_path / "fakecc"
    fake.write_text('#!/bin/sh\nif [ "$1" = "--version" ]; then echo "fakecc 1.0"; exit 0; fi\n'
                    'echo "fakecc: simulated failure" >&2\nexit 1\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("CC", str(fake))
    with pytest.warns(RuntimeWarning, match=r"fakecc failed .*simulated failure.*falling back to treelite GTIL"):
        b = Booster.load(model, cache_dir=tmp_path / "cache", progress=False)
    assert b.backend == "gtil"
    with pytest.raises(BoosterError, match="failed"):
        Booster.load(model, cache_dir=tmp_path / "cache", backend="tl2cgen", progress=False)
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    with pytest.raises(BoosterError, match="no working C compiler"):
        Booster.load(model, cache_dir=tmp_path / "cache", backend="tl2cgen", progress=False)


# -- the per-frame call --------------------------------------------------------------------------------------------
def grades_of(probs: np.ndarray) -> list[int]:
    return [int(np.argmax(p)) + 1 for p in probs]  # argmax takes the first of equal values, as the grade must


def test_predict_one_matches_xgboost_through_the_extension_and_through_ctypes(model, built, tmp_path):
    import sysconfig
    cache, _ = copy_cache(built, tmp_path)
    x = probe_rows(64)
    ref = reference(model, x)
    b = Booster.load(model, cache_dir=cache, progress=False)
    has_headers = (Path(sysconfig.get_paths()["include"]) / "Python.h").is_file()
    assert b.row_call == ("extension" if has_headers else "ctypes")
    compiled = b._predict_rows
    paths = {b.row_call: b._row, "ctypes": compiled.row}
    for name, row in paths.items():
        b._row = row
        for i, r in enumerate(x):  # NaN rows go the general path, the others the compiled row call
            probs, grade = b.predict_one(r)
            assert np.abs(np.array(probs) - ref[i]).max() <= TOL, (name, i)
            assert grade == grades_of(ref[i:i + 1])[0], (name, i)
    # whatever the caller hands over: a [1, F] row, float64, a strided view, a read-only array
    r = x[0].copy()
    frozen = r.copy()
    frozen.flags.writeable = False
    wide = np.stack([r, r], axis=1)[:, 0]
    for given in (r[None], r.astype(np.float64), wide, frozen, r.tolist()):
        probs, grade = b.predict_one(given)
        assert np.abs(np.array(probs) - ref[0]).max() <= TOL and grade == grades_of(ref[:1])[0]
    with pytest.raises(BoosterError, match="one frame, got 2 rows"):
        b.predict_one(x[:2])


def test_without_python_headers_the_row_call_is_ctypes_and_says_why(model, feats, built, tmp_path):
    cache, _ = copy_cache(built, tmp_path)
    proc = subprocess.run([sys.executable, "-c", LOAD_ONE, str(model), str(cache), str(feats), "absent"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["row_call"] == "ctypes"
    assert "Python.h" in out["why_not"] and "python3-dev" in out["why_not"]
    ref = reference(model, np.load(feats))
    assert np.abs(np.array(out["probs"]) - ref).max() <= TOL
    assert out["grades"] == grades_of(ref)


def test_call_extension_is_built_once_reused_by_other_processes_and_rebuilt_when_damaged(model, feats, built,
                                                                                           tmp_path):
    import sysconfig
    if not (Path(sysconfig.get_paths()["include"]) / "Python.h").is_file():
        pytest.skip("no Python headers here: the extension cannot be built (the ctypes test covers this machine)")
    cache, _ = copy_cache(built, tmp_path)
    for d in (cache / "rowcall").glob("*"):
        shutil.rmtree(d)  # built by the fixture's process: start without one
    ref = reference(model, np.load(feats))

    def load() -> dict:
        proc = subprocess.run([sys.executable, "-c", LOAD_ONE, str(model), str(cache), str(feats), "present"],
                              cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        out = json.loads(proc.stdout.strip().splitlines()[-1])
        assert out["row_call"] == "extension" and np.abs(np.array(out["probs"]) - ref).max() <= TOL
        return out

    load()
    (entry,) = (cache / "rowcall").iterdir()
    meta = json.loads((entry / "meta.json").read_text())
    lib = entry / meta["library"]
    stamp = (lib.stat().st_mtime_ns, (entry / "meta.json").stat().st_mtime_ns)
    load()
    assert (lib.stat().st_mtime_ns, (entry / "meta.json").stat().st_mtime_ns) == stamp  # reused, not rebuilt
    data = bytearray(lib.read_bytes())
    data[len(data) // 2] ^= 0xFF
    lib.write_bytes(bytes(data))
    load()  # the damaged file fails its hash: rebuilt, and the new build loads
    meta2 = json.loads((entry / "meta.json").read_text())
    assert (entry / meta2["library"]).is_file()
    assert json.loads((entry / "meta.json").read_text())["library_sha256"] != __import__("hashlib").sha256(data).hexdigest()


# -- the realistic model (opt-in) --------------------------------------------------------------------------------------
@pytest.mark.skipif(os.environ.get("SONOSCORE_SLOW_TESTS") != "1", reason="set SONOSCORE_SLOW_TESTS=1 (about 1-2 min)")
def test_realistic_booster_parity(tmp_path):
    """The paper's shape: 4 classes, 100 rounds (400 trees), max_depth 16, 1024 features, 800 rows. Its speed is
    `sonoscore bench`'s business (booster stage and booster_isolated in bench.json), not a unit test's."""
    path = train(tmp_path / "real.ubj", rows=800, features=1024, rounds=100, depth=16)
    x = probe_rows(1024)
    ref = reference(path, x)
    compiled = Booster.load(path, cache_dir=tmp_path / "cache", backend="tl2cgen")
    gtil = Booster.load(path, backend="gtil")
    for b in (compiled, gtil):
        assert np.abs(b.predict(x) - ref).max() <= TOL
    for i, r in enumerate(x):
        probs, grade = compiled.predict_one(r)
        assert np.abs(np.array(probs) - ref[i]).max() <= TOL and grade == grades_of(ref[i:i + 1])[0]
