"""Bundle signatures: `sonoscore keygen`, `sign` and `verify`, and `--trust` on run, eval and bench.

A signature is OpenSSF model-signing's (the `model-signing` package): a Sigstore bundle whose DSSE envelope holds
an in-toto statement listing every file in the bundle's folder with its sha256, signed offline with an elliptic
curve private key (P-256 from `keygen`; P-384 and P-521 keys work too) and written to `model.sig` in the bundle.
It covers every file of the folder, manifest.json and manifest.sha256 included (model.sig itself and git's files
excepted): a file changed, added or removed after signing, or a symbolic link anywhere in the folder, fails
verification. The upstream tool verifies the same file:
`model_signing verify key BUNDLE --signature BUNDLE/model.sig --public_key KEY.pub`.

With a trusted public key (`--trust PUB`, or SONOSCORE_TRUST=PUB in the environment), a bundle is used only when
its signature verifies with that key, checked before anything in it is parsed; an unsigned or mismatched bundle
is refused in one sentence (BundleError, exit 2). Without one, an unsigned bundle is used with one warning line.
Why model-signing rather than a hand-made Ed25519 scheme: docs/design.md "Signing".
"""
from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from runtime.bundle import BundleError
from runtime.errors import UserError

SIGNATURE_FILE = "model.sig"
TRUST_ENV = "SONOSCORE_TRUST"                # path of the trusted public key, as --trust
PASSWORD_ENV = "SONOSCORE_KEY_PASSWORD"      # the private key's password, when it has one (keygen, sign)
_PARTIAL = ".model.sig.partial"              # the signature on its way into the bundle (renamed into place)


def _lib():
    try:
        import model_signing
    except ImportError as e:
        raise UserError(f"bundle signatures need the model-signing package, which this install lacks ({e}); "
                        f"install sonoscore's dependencies again (pip install 'model-signing' pyopenssl)") from None
    return model_signing


def signature_path(root: str | Path) -> Path:
    return Path(root) / SIGNATURE_FILE


def is_signed(root: str | Path) -> bool:
    return signature_path(root).is_file()


def key_fingerprint(public_pem: bytes) -> str:
    """sha256 (hex) of a PEM SubjectPublicKeyInfo, as model-signing records it in a signature (its key hint)."""
    from cryptography.hazmat.primitives import serialization
    key = serialization.load_pem_public_key(public_pem)
    return hashlib.sha256(key.public_bytes(serialization.Encoding.PEM,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)).hexdigest()


def signed_fingerprint(root: str | Path) -> str | None:
    """The key fingerprint a bundle's model.sig names (what it claims; only verification proves it), or None."""
    try:
        data = json.loads(signature_path(root).read_text())
        hint = data["verificationMaterial"]["publicKey"]["hint"]
        return hint if isinstance(hint, str) and hint else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


# -- keys -------------------------------------------------------------------------------------------------------

def keygen(prefix: str | Path) -> tuple[Path, Path]:
    """A new P-256 key pair: `<prefix>.key` (the private key, PKCS#8 PEM, mode 0600, encrypted with
    $SONOSCORE_KEY_PASSWORD when it is set) and `<prefix>.pub` (the public key, PEM). Never overwrites a file."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    prefix = Path(prefix)
    key, pub = prefix.with_name(prefix.name + ".key"), prefix.with_name(prefix.name + ".pub")
    for p in (key, pub):
        if p.exists() or p.is_symlink():
            raise UserError(f"{p} already exists and keygen never overwrites a key; choose another --out or move "
                            f"that file away")
    if not prefix.parent.is_dir():
        raise UserError(f"--out {prefix}: the folder {prefix.parent} does not exist; create it first")
    private = ec.generate_private_key(ec.SECP256R1())
    password = os.environ.get(PASSWORD_ENV)
    encryption = (serialization.BestAvailableEncryption(password.encode()) if password
                  else serialization.NoEncryption())
    public_pem = private.public_key().public_bytes(serialization.Encoding.PEM,
                                                   serialization.PublicFormat.SubjectPublicKeyInfo)
    for path, data, mode in ((key, private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                         encryption), 0o600), (pub, public_pem, 0o644)):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        except OSError as e:
            raise UserError(f"{path} cannot be created ({e.strerror or e}); choose another --out") from None
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    return key, pub


# -- signing ----------------------------------------------------------------------------------------------------

def _hashing(lib):
    return lib.hashing.Config().set_ignored_paths(paths=[SIGNATURE_FILE, _PARTIAL], ignore_git_paths=True)


def sign_bundle(root: str | Path, key: str | Path) -> Path:
    """Sign every file of a bundle that loads (its hashes and manifest checksum right) with the private key `key`
    (PEM; password from $SONOSCORE_KEY_PASSWORD); writes `model.sig` in it (replacing a previous signature) and
    returns its path."""
    from runtime.bundle import Bundle
    root, key = Path(root), Path(key)
    Bundle.load(root)                              # a broken bundle is refused, not signed
    if not key.is_file():
        raise UserError(f"--key {key} does not exist; give the private key (.key) that `sonoscore keygen` wrote")
    lib = _lib()
    password = os.environ.get(PASSWORD_ENV)
    try:
        config = lib.signing.Config().use_elliptic_key_signer(private_key=key, password=password.encode()
                                                              if password else None)
    except (ValueError, TypeError, AttributeError) as e:
        if "encrypted" in str(e) or "password" in str(e).lower() or "decrypt" in str(e).lower():
            raise UserError(f"--key {key} is encrypted and could not be opened: set {PASSWORD_ENV} to its "
                            f"password") from None
        raise UserError(f"--key {key} is not an elliptic-curve (P-256, P-384 or P-521) private key in PEM "
                        f"({_short(e)}); make a key pair with `sonoscore keygen`") from None
    (root / _PARTIAL).unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="sonoscore-sign-") as tmp:
        made = Path(tmp) / SIGNATURE_FILE
        try:
            config.set_hashing_config(_hashing(lib)).sign(root, made)
        except ValueError as e:
            if "symlink" in str(e):
                raise BundleError(_hash_refusal(root, e, "signed")) from None
            raise BundleError(f"bundle {root} could not be signed ({_short(e)}); check that it holds plain, "
                              f"readable files only") from None
        except OSError as e:
            raise BundleError(f"bundle {root} could not be read for signing ({e.strerror or e}); check that its "
                              f"files are readable") from None
        partial = root / _PARTIAL
        shutil.copyfile(made, partial)
    with open(partial, "rb") as f:
        os.fsync(f.fileno())
    os.replace(partial, signature_path(root))
    return signature_path(root)


# -- verification -----------------------------------------------------------------------------------------------

def verify_bundle(root: str | Path, trust: str | Path, *, label: str = "--trust") -> str:
    """Check the bundle's model.sig with the public key `trust`: the signature must be made with that key and
    every file of the folder must be as signed. Returns the key's fingerprint; anything else is one sentence
    (BundleError for the bundle, UserError for the key)."""
    root, trust = Path(root), Path(trust)
    given = f"{label} {trust}" if label.startswith("--") else f"{label}={trust}"
    if not trust.is_file():
        raise UserError(f"{given}: no such file; give the public key (.pub) of the bundle's signer")
    sig = signature_path(root)
    if not sig.is_file():
        raise BundleError(f"bundle {root} is not signed (it has no {SIGNATURE_FILE}) and {given} accepts only "
                          f"bundles signed with that key; sign it with `sonoscore sign {root} --key KEY`, or run "
                          f"without {label}")
    lib = _lib()
    try:
        fingerprint = key_fingerprint(trust.read_bytes())
        verifier = lib.verifying.Config().use_elliptic_key_verifier(public_key=trust)
    except (ValueError, TypeError, AttributeError) as e:
        raise UserError(f"{given} is not an elliptic-curve (P-256, P-384 or P-521) public key in PEM "
                        f"({_short(e)}); give the .pub file that `sonoscore keygen` wrote") from None
    from cryptography.exceptions import InvalidSignature
    try:
        with contextlib.redirect_stdout(io.StringIO()):     # the library prints a note about old signatures
            verifier.verify(root, sig)
    except InvalidSignature:
        raise BundleError(_wrong_key(root, given)) from None
    except ValueError as e:
        if str(e).startswith("Key mismatch"):
            raise BundleError(_wrong_key(root, given)) from None
        if str(e).startswith("Signature mismatch") or "symlink" in str(e):
            raise BundleError(_hash_refusal(root, e, "verified")) from None
        raise BundleError(_unreadable(sig, e)) from None
    except (KeyError, TypeError, AttributeError, IndexError) as e:
        raise BundleError(_unreadable(sig, e)) from None
    except OSError as e:
        raise BundleError(f"bundle {root} could not be read for its signature check ({e.strerror or e}); check "
                          f"that its files are readable") from None
    except Exception as e:   # protobuf's ParseError and the like: a model.sig that is not a signature
        raise BundleError(_unreadable(sig, e)) from None
    return fingerprint


def _wrong_key(root: Path, given: str) -> str:
    return (f"bundle {root} was not signed with the key {given} names; get the bundle from that key's owner, or "
            f"trust its signer's public key instead")


def _unreadable(sig: Path, e: BaseException) -> str:
    return (f"{sig} is not a readable model-signing signature ({_short(e)}); sign the bundle again with "
            f"`sonoscore sign`")


def _hash_refusal(root: Path, e: ValueError, doing: str) -> str:
    """One sentence for model-signing's 'Signature mismatch' (naming the files) or symbolic-link refusal."""
    link = re.search(r"Cannot use '(.+?)' because it is a symlink", str(e))
    if link:
        return (f"bundle {root} holds a symbolic link ({link.group(1)}), so it cannot be {doing}: a signed bundle "
                f"holds plain files only; replace the link with the file it points to")
    try:
        changed, added, missing = _differences(root)
    except (OSError, ValueError, KeyError, TypeError):
        changed = added = missing = []
    parts = [f"{what}: {', '.join(names)}" for what, names in (("changed", changed), ("added", added),
                                                               ("missing", missing)) if names]
    what = f" ({'; '.join(parts)})" if parts else " (a file was changed, added or removed)"
    return (f"bundle {root} is not as it was signed{what}; restore the bundle from its source, or sign it again "
            f"if the change is yours")


def _differences(root: Path) -> tuple[list[str], list[str], list[str]]:
    """(changed, added, missing) files against the statement in model.sig, whose signature model-signing has
    just verified (it reports a mismatch only after that): the files it lists with their sha256, and the paths
    it ignores."""
    from runtime.bundle import sha256_file
    envelope = json.loads(signature_path(root).read_text())["dsseEnvelope"]
    statement = json.loads(base64.b64decode(envelope["payload"]))
    predicate = statement["predicate"]
    if predicate.get("serialization", {}).get("hash_type", "sha256") != "sha256":
        raise ValueError("not sha256")
    signed = {r["name"]: r["digest"] for r in predicate["resources"]}
    ignored = set(predicate.get("serialization", {}).get("ignore_paths", []))
    present = {}
    for p in sorted(root.rglob("*")):
        name = p.relative_to(root).as_posix()
        if not any(name == i or name.startswith(i + "/") for i in ignored) and p.is_file():
            present[name] = sha256_file(p)
    return ([n for n in signed if n in present and present[n] != signed[n]],
            [n for n in present if n not in signed], [n for n in signed if n not in present])


def _short(e: BaseException, n: int = 120) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= n else text[:n - 3] + "..."


# -- run, eval, bench ---------------------------------------------------------------------------------------------

def trust_option(value: str | None) -> tuple[str | None, str]:
    """The trusted key: `--trust`'s value, else $SONOSCORE_TRUST (empty: none); with the name to quote it by."""
    if value:
        return value, "--trust"
    env = os.environ.get(TRUST_ENV, "").strip()
    return (env, TRUST_ENV) if env else (None, "--trust")


def check_trust(root: str | Path, trust: str | Path | None, *, label: str = "--trust") -> str:
    """What run, eval and bench do before loading a bundle: with `trust`, the signature must verify with that key
    (else BundleError/UserError, one sentence) before anything in the bundle is parsed. Returns the signature
    status in words. Without `trust` nothing is checked here: once the bundle has loaded, the caller says
    `unsigned_warning` (one line) when it is not signed. A path that is not a bundle is left to Bundle.load."""
    root = Path(root)
    if trust and (root / "manifest.json").is_file():
        fingerprint = verify_bundle(root, trust, label=label)
        return f"signed; verified with {trust} (key {fingerprint[:16]})"
    return status(root)


def unsigned_warning(root: str | Path) -> str:
    """The one warning line for an unsigned bundle used without a trusted key."""
    return (f"Warning: bundle {root} is not signed, so nothing says who made it; sign it with `sonoscore sign` "
            f"and give --trust PUB (or {TRUST_ENV}) to require the signature")


def status(root: str | Path, trust: str | Path | None = None, *, label: str = "--trust") -> str:
    """The signature status in words, for `info`: not signed, signed and verified with `trust` (which raises
    when it does not verify), or signed but not checked here."""
    root = Path(root)
    if not is_signed(root):
        return "not signed"
    if trust:
        fingerprint = verify_bundle(root, trust, label=label)
        return f"signed; verified with {trust} (key {fingerprint[:16]})"
    claimed = signed_fingerprint(root)
    return (f"signed ({SIGNATURE_FILE}{f', key {claimed[:16]}' if claimed else ''}); not verified here: give "
            f"--trust PUB to check it")
