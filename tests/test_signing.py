"""Bundle integrity and signatures, through the real command line: manifest.sha256 catches an edit to manifest.json
of any bundle; `keygen`, `sign` and `verify` (OpenSSF model-signing, a P-256 key); `--trust` (and SONOSCORE_TRUST,
the Jetson service's setting) on run, eval and bench refuses an unsigned bundle, a wrong key, and a bundle with any
file changed by one byte, added or linked, in one sentence with exit 2; without a key, an unsigned bundle runs with
exactly one warning line."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from runtime.bundle import MANIFEST_CHECKSUM, Bundle, BundleError, write_manifest
from tests.conftest import ROOT, sonoscore

SIM = "sim://kidney?frames=2&fps=0&seed=3"


def signing_warnings(stderr: str) -> list[str]:
    """The warning lines of a run but the scope one (the tests' tiny bundles have too few patients for a scope
    reference, and say so: tests/test_scope_gate.py pins that line)."""
    return [ln for ln in stderr.splitlines() if "warning" in ln.lower() and "no scope reference" not in ln]


def refusal(r: subprocess.CompletedProcess, *phrases: str) -> str:
    """Exit 2 with one sentence on stderr (one line, no traceback) holding every phrase."""
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    for p in phrases:
        assert p in lines[0], (p, lines[0])
    return lines[0]


def flip_byte(path: Path, at: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    i = min(len(data) - 1, int(len(data) * at))
    data[i] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    r = sonoscore("keygen", "--out", d / "signer")
    assert r.returncode == 0, r.stderr
    r = sonoscore("keygen", "--out", d / "stranger")
    assert r.returncode == 0, r.stderr
    return {"key": d / "signer.key", "pub": d / "signer.pub", "other": d / "stranger.pub"}


@pytest.fixture(scope="module")
def signed(tiny_bundle, keys, tmp_path_factory):
    b = tmp_path_factory.mktemp("signed") / "bundle"
    shutil.copytree(tiny_bundle, b)
    r = sonoscore("sign", b, "--key", keys["key"])
    assert r.returncode == 0 and (b / "model.sig").is_file(), r.stderr
    return b


@pytest.fixture
def copy(tmp_path):
    def make(src: Path) -> Path:
        dst = tmp_path / f"b{len(list(tmp_path.iterdir()))}"
        shutil.copytree(src, dst, symlinks=True)
        return dst
    return make


# -- keys and signing -------------------------------------------------------------------------------------------

def test_keygen_writes_a_private_key_only_its_owner_reads_and_never_overwrites(keys):
    assert keys["key"].stat().st_mode & 0o777 == 0o600
    assert b"PRIVATE KEY" in keys["key"].read_bytes() and b"BEGIN PUBLIC KEY" in keys["pub"].read_bytes()
    before = keys["key"].read_bytes()
    r = sonoscore("keygen", "--out", keys["key"].with_suffix(""))
    refusal(r, "already exists", "never overwrites")
    assert keys["key"].read_bytes() == before


def test_sign_then_verify_with_the_signers_key(signed, keys):
    r = sonoscore("verify", signed, "--trust", keys["pub"])
    assert r.returncode == 0 and "signature verified" in r.stdout, r.stderr
    # The signature is model-signing's own format: the upstream tool verifies it as it is.
    up = subprocess.run([Path(sys.executable).with_name("model_signing"), "verify", "key", signed, "--signature",
                         signed / "model.sig", "--public_key", keys["pub"]], capture_output=True, text=True,
                        timeout=120)
    assert up.returncode == 0, up.stdout + up.stderr


def test_a_signed_bundle_runs_under_trust_and_without_it_with_no_warning(signed, keys):
    r = sonoscore("run", "--bundle", signed, "--source", SIM, "--trust", keys["pub"], "--quiet")
    assert r.returncode == 0, r.stderr[-2000:]
    r = sonoscore("run", "--bundle", signed, "--source", SIM, "--quiet")
    assert r.returncode == 0 and not signing_warnings(r.stderr) and "not signed" not in r.stderr, r.stderr


def _bundle_files(b: Path) -> list[str]:
    return sorted(str(p.relative_to(b)) for p in b.rglob("*") if p.is_file() and p.name != "model.sig")


def test_every_file_changed_by_one_byte_is_refused_under_trust(signed, keys, copy):
    """manifest.json, manifest.sha256, every network and the booster: one byte changed is exit 2, naming it."""
    names = _bundle_files(signed)
    assert {"manifest.json", MANIFEST_CHECKSUM, "booster.ubj", "unet.onnx", "vgg.onnx"} <= set(names)
    for name in names:
        b = copy(signed)
        flip_byte(b / name)
        r = sonoscore("run", "--bundle", b, "--source", SIM, "--trust", keys["pub"])
        refusal(r, str(b), "is not as it was signed", f"changed: {name}")


def test_a_manifest_edit_and_an_added_file_it_names_are_refused_under_trust(signed, keys, copy):
    """Someone adds a file and rewrites the manifest (and its checksum) to use it: the unsigned checks all pass,
    the signature does not."""
    b = copy(signed)
    shutil.copy(b / "unet.onnx", b / "unet.int8.onnx")
    m = json.loads((b / "manifest.json").read_text())
    m["networks"]["unet"]["files"]["int8"] = "unet.int8.onnx"
    m["networks"]["vgg"]["files"]["int8"] = "vgg.onnx"
    write_manifest(b, m)
    Bundle.load(b)                                       # consistent as an unsigned bundle
    r = sonoscore("run", "--bundle", b, "--source", SIM, "--trust", keys["pub"])
    refusal(r, "added: unet.int8.onnx", "changed: manifest.json")
    r = sonoscore("verify", b, "--trust", keys["pub"])
    refusal(r, "added: unet.int8.onnx")


def test_eval_and_bench_take_trust_too(signed, keys, copy, tmp_path):
    b = copy(signed)
    flip_byte(b / "booster.ubj")
    refusal(sonoscore("eval", "--bundle", b, "--data", tmp_path, "--trust", keys["pub"]), "changed: booster.ubj")
    refusal(sonoscore("bench", "--bundle", b, "--frames", 1, "--trust", keys["pub"]), "changed: booster.ubj")


def test_a_wrong_public_key_is_refused(signed, keys):
    refusal(sonoscore("run", "--bundle", signed, "--source", SIM, "--trust", keys["other"]),
            "was not signed with the key", str(keys["other"]))
    refusal(sonoscore("verify", signed, "--trust", keys["key"]), "is not an elliptic-curve", "public key")
    refusal(sonoscore("verify", signed, "--trust", keys["pub"].with_name("nope.pub")), "no such file")


def test_a_signature_made_by_another_key_under_the_trusted_keys_name_is_refused(signed, keys, copy, tmp_path):
    """A forger re-signs a changed bundle with their own key and puts the trusted key's fingerprint in model.sig:
    the signature does not verify with the trusted key."""
    b = copy(signed)
    sonoscore("keygen", "--out", tmp_path / "forger")
    flip_byte(b / "vgg.onnx")
    m = json.loads((b / "manifest.json").read_text())
    write_manifest(b, m)                                 # hashes and checksum made consistent again
    assert sonoscore("sign", b, "--key", tmp_path / "forger.key").returncode == 0
    sig = json.loads((b / "model.sig").read_text())
    sig["verificationMaterial"]["publicKey"]["hint"] = json.loads((signed / "model.sig").read_text())[
        "verificationMaterial"]["publicKey"]["hint"]
    (b / "model.sig").write_text(json.dumps(sig))
    refusal(sonoscore("verify", b, "--trust", keys["pub"]), "was not signed with the key")


def test_a_symbolic_link_in_a_signed_bundle_is_refused(signed, keys, copy, tmp_path):
    b = copy(signed)
    outside = tmp_path / "elsewhere.txt"
    outside.write_text("x")
    os.symlink(outside, b / "notes.txt")
    refusal(sonoscore("run", "--bundle", b, "--source", SIM, "--trust", keys["pub"]), "symbolic link", "notes.txt")


def test_a_torn_signature_is_one_sentence(signed, keys, copy):
    b = copy(signed)
    (b / "model.sig").write_text((b / "model.sig").read_text()[:100])
    refusal(sonoscore("verify", b, "--trust", keys["pub"]), "model.sig", "sign the bundle again")


def test_resigning_after_a_change_makes_it_verify_again(signed, keys, copy):
    b = copy(signed)
    m = json.loads((b / "manifest.json").read_text())
    m["gate"]["min_mask_fraction"] = 0.0
    write_manifest(b, m)
    refusal(sonoscore("verify", b, "--trust", keys["pub"]), "changed: manifest.json")
    assert sonoscore("sign", b, "--key", keys["key"]).returncode == 0
    assert sonoscore("verify", b, "--trust", keys["pub"]).returncode == 0


def test_sign_refuses_a_broken_bundle_and_a_key_it_cannot_use(tiny_bundle, keys, copy, tmp_path):
    b = copy(tiny_bundle)
    flip_byte(b / "unet.onnx")
    refusal(sonoscore("sign", b, "--key", keys["key"]), "unet.onnx", "sha256")
    assert not (b / "model.sig").exists()
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519
    ed = tmp_path / "ed25519.key"
    ed.write_bytes(ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    good = copy(tiny_bundle)
    refusal(sonoscore("sign", good, "--key", ed), "not an elliptic-curve", "sonoscore keygen")
    refusal(sonoscore("sign", good, "--key", keys["pub"]), "not an elliptic-curve")
    assert not (good / "model.sig").exists()


def test_an_encrypted_key_needs_its_password(tiny_bundle, copy, tmp_path):
    env = dict(os.environ, SONOSCORE_KEY_PASSWORD="correct horse")
    assert sonoscore("keygen", "--out", tmp_path / "locked", env=env).returncode == 0
    assert b"ENCRYPTED" in (tmp_path / "locked.key").read_bytes()
    b = copy(tiny_bundle)
    no_password = {k: v for k, v in os.environ.items() if k != "SONOSCORE_KEY_PASSWORD"}
    refusal(sonoscore("sign", b, "--key", tmp_path / "locked.key", env=no_password), "SONOSCORE_KEY_PASSWORD")
    assert sonoscore("sign", b, "--key", tmp_path / "locked.key", env=env).returncode == 0
    assert sonoscore("verify", b, "--trust", tmp_path / "locked.pub").returncode == 0


# -- unsigned bundles -------------------------------------------------------------------------------------------

def test_an_unsigned_bundle_under_trust_is_refused(tiny_bundle, keys):
    refusal(sonoscore("run", "--bundle", tiny_bundle, "--source", SIM, "--trust", keys["pub"]),
            "is not signed", "sonoscore sign")


def test_an_unsigned_bundle_without_trust_runs_with_exactly_one_warning_line(tiny_bundle):
    env = {k: v for k, v in os.environ.items() if k != "SONOSCORE_TRUST"}
    r = sonoscore("run", "--bundle", tiny_bundle, "--source", SIM, "--quiet", env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    warnings = signing_warnings(r.stderr)
    assert len(warnings) == 1 and "is not signed" in warnings[0], r.stderr
    assert sum("not signed" in ln for ln in r.stderr.splitlines()) == 1


def test_bench_warns_once_for_an_unsigned_bundle_and_not_for_a_signed_one(tiny_bundle, signed):
    env = {k: v for k, v in os.environ.items() if k != "SONOSCORE_TRUST"}
    for bundle, expected in ((tiny_bundle, 1), (signed, 0)):
        r = sonoscore("bench", "--bundle", bundle, "--frames", 1, "--warmup", 0, env=env)
        assert r.returncode == 0, r.stderr[-2000:]
        assert sum("Warning:" in ln and "is not signed" in ln for ln in r.stderr.splitlines()) == expected, r.stderr


def test_the_service_setting_sonoscore_trust_is_the_environment_equivalent(tiny_bundle, signed, keys):
    """device/sonoscore.env (the unit's EnvironmentFile) declares SONOSCORE_TRUST; set there, `run` obeys it."""
    env_file = (ROOT / "device" / "sonoscore.env").read_text()
    settings = dict(ln.split("=", 1) for ln in env_file.splitlines() if ln and not ln.startswith("#"))
    assert "SONOSCORE_TRUST" in settings
    assert "EnvironmentFile=/etc/sonoscore/sonoscore.env" in (ROOT / "device" / "sonoscore.service").read_text()
    env = dict(os.environ, SONOSCORE_TRUST=str(keys["pub"]))
    refusal(sonoscore("run", "--bundle", tiny_bundle, "--source", SIM, env=env),
            "is not signed", f"SONOSCORE_TRUST={keys['pub']}")
    r = sonoscore("run", "--bundle", signed, "--source", SIM, "--quiet", env=env)
    assert r.returncode == 0 and not signing_warnings(r.stderr), r.stderr[-2000:]
    env["SONOSCORE_TRUST"] = str(keys["other"])
    refusal(sonoscore("bench", "--bundle", signed, "--frames", 1, env=env), "was not signed with the key")


def test_an_edit_to_the_manifest_of_an_unsigned_bundle_is_detected(tiny_bundle, copy):
    """The gate threshold changed by hand: refused in one sentence; recorded on purpose, it loads."""
    b = copy(tiny_bundle)
    m = json.loads((b / "manifest.json").read_text())
    m["gate"]["mask_threshold"] = 0.4
    (b / "manifest.json").write_text(json.dumps(m, indent=2) + "\n")
    refusal(sonoscore("run", "--bundle", b, "--source", SIM), "manifest.json", MANIFEST_CHECKSUM,
            "edited or corrupted")
    # A class name, as well
    c = copy(tiny_bundle)
    text = (c / "manifest.json").read_text()
    (c / "manifest.json").write_text(text.replace('"IFTA <25%"', '"IFTA <20%"', 1))
    with pytest.raises(BundleError, match="edited or corrupted"):
        Bundle.load(c)
    # On purpose: sha256sum's line recorded in manifest.sha256, as the sentence says
    digest = hashlib.sha256((b / "manifest.json").read_bytes()).hexdigest()
    (b / MANIFEST_CHECKSUM).write_text(f"{digest}  manifest.json\n")
    assert Bundle.load(b).graph().mask_threshold == 0.4


def test_a_bundle_without_its_manifest_checksum_is_refused(tiny_bundle, copy):
    b = copy(tiny_bundle)
    (b / MANIFEST_CHECKSUM).unlink()
    refusal(sonoscore("run", "--bundle", b, "--source", SIM), f"{MANIFEST_CHECKSUM} is missing")
    (b / MANIFEST_CHECKSUM).write_text("not a hash\n")
    refusal(sonoscore("run", "--bundle", b, "--source", SIM), "holds no sha256")


def test_write_manifest_records_the_checksum_of_the_bytes_it_wrote(tiny_bundle):
    line = (tiny_bundle / MANIFEST_CHECKSUM).read_text()
    raw = (tiny_bundle / "manifest.json").read_bytes()
    assert line == f"{hashlib.sha256(raw).hexdigest()}  manifest.json\n"     # sha256sum's format
    assert Bundle.load(tiny_bundle).manifest_sha256 == hashlib.sha256(raw).hexdigest()
    if shutil.which("sha256sum"):                                           # and sha256sum -c agrees
        assert subprocess.run(["sha256sum", "-c", MANIFEST_CHECKSUM], cwd=tiny_bundle,
                              capture_output=True).returncode == 0


def test_a_named_file_linked_out_of_an_unsigned_bundle_is_refused_by_run(tiny_bundle, copy, tmp_path):
    b = copy(tiny_bundle)
    outside = tmp_path / "booster-elsewhere.ubj"
    shutil.move(b / "booster.ubj", outside)
    os.symlink(outside, b / "booster.ubj")
    refusal(sonoscore("run", "--bundle", b, "--source", SIM), "booster.ubj", "leads outside the bundle")
