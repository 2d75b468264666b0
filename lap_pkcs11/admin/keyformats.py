"""Ed25519 public key encodings the LAP gateway and its verifiers consume.

Pure functions over the 32 raw key bytes: hex (``LAP_GATEWAY_PUBLIC_KEY_HEX``),
base64, SubjectPublicKeyInfo PEM (RFC 8410), OKP JWK (RFC 8037), a verifiers'
``trusted_keys.json``, a complete gateway keyset, and the gateway's environment
lines for a single hard key (``LAP_GATEWAY_SIGNING_CMD`` and its companions).
(``uri``, the key's PKCS#11 URI, needs the token's listing: the CLI writes it.)
"""

import base64
import json
import re

from lap_pkcs11.per_signature.errors import ConfigInvalid

# DER of SubjectPublicKeyInfo { id-Ed25519 (1.3.101.112) } up to the key's 32 bytes.
SPKI_PREFIX = bytes.fromhex("302a300506032b6570032100")
KID_PATTERN = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
FORMATS = ("hex", "base64", "pem", "jwk", "trusted-keys", "keyset", "gateway-env", "uri")
# The gateway's key id when LAP_GATEWAY_SIGNING_KEY_ID is unset.
GATEWAY_DEFAULT_KID = "gateway"


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


def env_line(name, value):
    """``NAME=value`` as systemd's ``EnvironmentFile=``, POSIX sh and dotenv all read it.

    A value with other characters than a few safe ones is double-quoted, with
    backslash and double quote escaped; ``$``, backquote and line breaks, which
    those readers treat differently, are refused.
    """
    text = str(value)
    if text and all(c.isalnum() or c in "._-/:,+@%" for c in text) and text.isascii():
        return f"{name}={text}\n"
    bad = sorted({c for c in text if c in "$`\n\r\0"})
    if bad:
        raise ConfigInvalid(f"{name} would contain {' and '.join(map(repr, bad))}, which "
                            "EnvironmentFile, sh and dotenv read differently; use paths without them")
    escaped = "".join("\\" + c if c in '\\"' else c for c in text)
    return f'{name}="{escaped}"\n'


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
        # The wrapped registry: the one shape with metadata that the gateway's schema
        # check accepts for a file named trusted_keys.json (its verifier reads it too).
        registry = {"version": 1,
                    "keys": {check_kid(kid): {"public_key_hex": key.hex(), "status": "active"}}}
        return json.dumps(registry, indent=2) + "\n"
    if fmt == "keyset":
        kid = check_kid(kid)
        keyset = {"active_kid": kid, "keys": {kid: {
            "public_key_hex": key.hex(), "signing_cmd": signing_cmd,
            "timeout_seconds": timeout_seconds}}}
        return json.dumps(keyset, indent=2) + "\n"
    if fmt == "gateway-env":
        return (env_line("LAP_GATEWAY_SIGNING_CMD", signing_cmd)
                + env_line("LAP_GATEWAY_PUBLIC_KEY_HEX", key.hex())
                + env_line("LAP_GATEWAY_SIGNING_KEY_ID", check_kid(kid or GATEWAY_DEFAULT_KID))
                + env_line("LAP_GATEWAY_SIGNING_CMD_TIMEOUT_SECONDS", timeout_seconds))
    raise ConfigInvalid(f"--format must be one of {', '.join(FORMATS)}")
