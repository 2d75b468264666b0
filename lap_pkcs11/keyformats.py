"""Ed25519 public key encodings the LAP gateway and its verifiers consume.

Pure functions over the 32 raw key bytes: hex (``LAP_GATEWAY_PUBLIC_KEY_HEX``),
base64, SubjectPublicKeyInfo PEM (RFC 8410), OKP JWK (RFC 8037), a verifier
registry entry and a complete gateway keyset.
"""

import base64
import json
import re

from lap_pkcs11.errors import ConfigInvalid

# DER of SubjectPublicKeyInfo { id-Ed25519 (1.3.101.112) } up to the key's 32 bytes.
SPKI_PREFIX = bytes.fromhex("302a300506032b6570032100")
KID_PATTERN = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
FORMATS = ("hex", "base64", "pem", "jwk", "trusted-keys", "keyset")


def pem(key):
    body = base64.b64encode(SPKI_PREFIX + key).decode()
    return f"-----BEGIN PUBLIC KEY-----\n{body}\n-----END PUBLIC KEY-----\n"


def jwk(key):
    x = base64.urlsafe_b64encode(key).rstrip(b"=").decode()
    return {"kty": "OKP", "crv": "Ed25519", "x": x}


def check_kid(kid):
    if kid is None or not KID_PATTERN.match(kid):
        raise ConfigInvalid("--kid must match ^[A-Za-z0-9._-]{1,64}$ (the gateway's key id rule)")
    return kid


def render(key, fmt, kid=None, signing_cmd=None, timeout_seconds=2.0):
    """``key`` in format ``fmt``, as the text to print (ending in a newline)."""
    if fmt == "hex":
        return key.hex() + "\n"
    if fmt == "base64":
        return base64.b64encode(key).decode() + "\n"
    if fmt == "pem":
        return pem(key)
    if fmt == "jwk":
        return json.dumps(jwk(key)) + "\n"
    if fmt == "trusted-keys":
        entry = {check_kid(kid): {"public_key_hex": key.hex(), "status": "active"}}
        return json.dumps(entry, indent=2) + "\n"
    if fmt == "keyset":
        kid = check_kid(kid)
        keyset = {"active_kid": kid, "keys": {kid: {
            "public_key_hex": key.hex(), "signing_cmd": signing_cmd,
            "timeout_seconds": timeout_seconds}}}
        return json.dumps(keyset, indent=2) + "\n"
    raise ConfigInvalid(f"--format must be one of {', '.join(FORMATS)}")
