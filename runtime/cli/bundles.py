"""`keygen`, `sign`, `verify` and `info`: signing bundles and saying what a bundle is."""
from __future__ import annotations

import argparse

from runtime.cli.common import EXIT_OK, UserError


def cmd_keygen(args: argparse.Namespace) -> int:
    from runtime.signing import key_fingerprint, keygen
    key, pub = keygen(args.out)
    print(f"private key: {key} (keep it secret; sign with: sonoscore sign BUNDLE --key {key})")
    print(f"public key:  {pub} (give it to the devices: --trust {pub}); fingerprint "
          f"{key_fingerprint(pub.read_bytes())}")
    return EXIT_OK


def cmd_sign(args: argparse.Namespace) -> int:
    from runtime.signing import sign_bundle
    sig = sign_bundle(args.bundle, args.key)
    print(f"signed {args.bundle}: {sig}")
    return EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    from runtime.bundle import Bundle
    from runtime.signing import trust_option, verify_bundle
    trust, label = trust_option(args.trust)
    if not trust:
        raise UserError("verify needs the signer's public key: give --trust PUB (or set SONOSCORE_TRUST)")
    fingerprint = verify_bundle(args.bundle, trust, label=label)
    Bundle.load(args.bundle)          # and everything run checks: manifest checksum, schema, file hashes
    print(f"{args.bundle}: signature verified with {trust} (key {fingerprint[:16]}); every file is as signed")
    return EXIT_OK


def cmd_info(args: argparse.Namespace) -> int:
    import json
    from runtime.bundle_info import bundle_info, format_info
    from runtime.signing import trust_option
    trust, label = trust_option(args.trust)
    info = bundle_info(args.bundle, trust, label=label)
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return EXIT_OK


def add_parsers(sub) -> None:
    kg = sub.add_parser("keygen", help="make a key pair for signing bundles (P-256: PREFIX.key and PREFIX.pub)")
    kg.add_argument("--out", required=True, metavar="PREFIX", help="writes PREFIX.key (private, mode 0600; "
                    "encrypted when SONOSCORE_KEY_PASSWORD is set) and PREFIX.pub; never overwrites")
    kg.set_defaults(func=cmd_keygen)

    sg = sub.add_parser("sign", help="sign every file of a bundle with a private key (writes BUNDLE/model.sig, "
                        "OpenSSF model-signing format)")
    sg.add_argument("bundle", metavar="BUNDLE")
    sg.add_argument("--key", required=True, help="the private key (PEM, from `sonoscore keygen`; its password in "
                    "SONOSCORE_KEY_PASSWORD when it has one)")
    sg.set_defaults(func=cmd_sign)

    vf = sub.add_parser("verify", help="check a bundle's signature with the signer's public key, and its files")
    vf.add_argument("bundle", metavar="BUNDLE")
    vf.add_argument("--trust", metavar="PUB", default=None, help="the signer's public key (default: "
                    "$SONOSCORE_TRUST)")
    vf.set_defaults(func=cmd_verify)

    inf = sub.add_parser("info", help="what a bundle is: model card, networks, inputs, booster, signature, "
                         "disclaimer")
    inf.add_argument("bundle", metavar="BUNDLE")
    inf.add_argument("--trust", metavar="PUB", default=None, help="also verify the signature with this public key "
                     "(default: $SONOSCORE_TRUST)")
    inf.add_argument("--json", action="store_true", help="print it as JSON")
    inf.set_defaults(func=cmd_info)
