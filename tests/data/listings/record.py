"""Record pkcs11-tool listings of one token for the parser tests.

Usage: python tests/data/listings/record.py PKCS11_TOOL OUT_DIR

Makes a throwaway SoftHSM2 token with generated Ed25519 keys (DER-wrapped
EC_POINT, PrintableString params) and imported ones (raw EC_POINT, OID params),
under ids that OpenSC versions print differently (01, 0102, 00, 8, 20 and 36
bytes: 0.27 prints short ids in decimal and wraps values over 32 bytes), and a
data object; then writes OUT_DIR/all.txt (`--login --list-objects`),
privkey.txt, pubkey.txt (no login) and expected.json: every key's id, label and
public key, taken from the seed for imported keys and from Debian's
`pkcs11-tool --read-object` for generated ones, never from a listing.
"""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

MODULE = "/usr/lib/softhsm/libsofthsm2.so"
PIN = "246813"
GENERATED = [("01", "lap-key"), ("0102", "lap key two"),
             ("a1b2c3d4e5f60718", "a longer label, with spaces"),
             ("a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4", "sha1-sized id"),
             ("00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff0a0b", "36-byte id")]
IMPORTED = [("02", "imported", bytes(range(32))), ("00", "zero id", bytes(range(32, 64)))]


def main(tool, out):
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as home:
        home = Path(home)
        (home / "tokens").mkdir()
        conf = home / "softhsm2.conf"
        conf.write_text(f"directories.tokendir = {home / 'tokens'}\nobjectstore.backend = file\n"
                        "log.level = ERROR\n")
        env = dict(os.environ, SOFTHSM2_CONF=str(conf), PKCS11_PIN=PIN)

        def run(*argv, check=True):
            return subprocess.run(argv, env=env, capture_output=True, check=check)

        run("softhsm2-util", "--init-token", "--free", "--label", "lap-rec", "--so-pin",
            "97531864", "--pin", PIN)
        base = [tool, "--module", MODULE, "--token-label", "lap-rec"]
        login = ["--login", "--pin", "env:PKCS11_PIN"]
        expected = []
        for key_id, label in GENERATED:
            run(*base, *login, "--keypairgen", "--key-type", "EC:edwards25519", "--id", key_id,
                "--label", label, "--usage-sign", "--sensitive")
            # Read back by Debian's pkcs11-tool, not the tool under test: PEM from 0.23.
            der = run("pkcs11-tool", "--module", MODULE,
                      "--token-label", "lap-rec", "--read-object", "--type", "pubkey",
                      "--id", key_id).stdout
            if der.startswith(b"-----BEGIN"):
                key = serialization.load_pem_public_key(der)
            else:
                key = serialization.load_der_public_key(der)
            raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
            expected.append({"origin": "generated", "id": key_id, "label": label,
                             "public_key_hex": raw.hex()})
        for key_id, label, seed in IMPORTED:
            private = Ed25519PrivateKey.from_private_bytes(seed)
            pem = home / "import.pem"
            pem.write_bytes(private.private_bytes(serialization.Encoding.PEM,
                                                  serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))
            run("softhsm2-util", "--import", str(pem), "--token", "lap-rec", "--id", key_id,
                "--label", label, "--pin", PIN)
            raw = private.public_key().public_bytes(serialization.Encoding.Raw,
                                                    serialization.PublicFormat.Raw)
            expected.append({"origin": "imported", "id": key_id, "label": label,
                             "public_key_hex": raw.hex()})
        run(*base, *login, "--write-object", str(conf), "--type", "data", "--label", "notes")
        (out / "all.txt").write_bytes(run(*base, *login, "--list-objects").stdout)
        (out / "privkey.txt").write_bytes(
            run(*base, *login, "--list-objects", "--type", "privkey").stdout)
        (out / "pubkey.txt").write_bytes(run(*base, "--list-objects", "--type", "pubkey").stdout)
        (out / "expected.json").write_text(json.dumps(expected, indent=2) + "\n")


if __name__ == "__main__":
    main(*sys.argv[1:])
