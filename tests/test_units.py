"""Unit tests of the pure parts: argv building, errors, the env file reader, Ed25519 verify."""

import types

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from dotenv import dotenv_values
from hypothesis import given, settings
from hypothesis import strategies as st

from lap_pkcs11.backends import pkcs11_tool
from lap_pkcs11.per_signature import ed25519, envfile, errors
from lap_pkcs11.agent.cli import Secret


def config(**overrides):
    values = dict(module="/m.so", slot=None, slot_index=None, token_label=None,
                  mechanism="EDDSA")
    values.update(overrides)
    return types.SimpleNamespace(**values)


def test_sign_argv_never_carries_the_pin_and_reads_the_memfd():
    argv = pkcs11_tool.sign_argv("/usr/bin/pkcs11-tool", config(token_label="t"), "0a",
                                 "PKCS11_PIN", "/dev/fd/3")
    assert argv == ["/usr/bin/pkcs11-tool", "--module", "/m.so", "--token-label", "t", "--login",
                    "--pin", "env:PKCS11_PIN", "--sign", "--mechanism", "EDDSA", "--id", "0a",
                    "--input-file", "/dev/fd/3"]


@pytest.mark.parametrize("overrides, selector", [
    ({"slot": 5}, ["--slot", "5"]),
    ({"slot_index": 0}, ["--slot-index", "0"]),
    ({}, []),
])
def test_argv_token_selectors(overrides, selector):
    argv = pkcs11_tool.list_objects_argv("pkcs11-tool", config(**overrides), "privkey", "PIN_VAR")
    assert argv == ["pkcs11-tool", "--module", "/m.so", *selector, "--login", "--pin",
                    "env:PIN_VAR", "--list-objects", "--type", "privkey"]


@pytest.mark.parametrize("stderr, name", [
    ("error: PKCS11 function C_Login failed: rv = CKR_PIN_INCORRECT (0xa0)", "PIN_INCORRECT"),
    ("error: PKCS11 function C_Login failed: rv = CKR_PIN_EXPIRED (0xa3)", "PIN_LOCKED"),
    ("error: Private/secret key not found", "KEY_NOT_FOUND"),
    ("error: Private key not found", "KEY_NOT_FOUND"),
    ('No slot with token named "x" found', "TOKEN_NOT_FOUND"),
    ("error: Failed to load pkcs11 module", "MODULE_LOAD_FAILED"),
    ("C_SignInit failed: rv = CKR_MECHANISM_INVALID (0x70)", "MECHANISM_UNSUPPORTED"),
    ("C_Sign failed: rv = CKR_DEVICE_ERROR (0x30)", "SIGNING_FAILED"),
])
def test_classify_matches_stable_parts(stderr, name):
    assert pkcs11_tool.classify(pkcs11_tool.Result(1, b"", stderr)).name == name


def test_every_error_has_a_distinct_name_and_sysexits_code():
    classes = [cls for cls in errors._all_errors() if cls is not errors.SignerError]
    assert len({cls.name for cls in classes}) == len(classes)
    assert {cls.exit_code for cls in classes} <= {64, 65, 69, 70, 73, 75, 77}
    for cls in classes:
        assert errors.by_name(cls.name) is cls
    line = errors.PinMissing("no PIN:\n set it").line()
    assert line == "lap-pkcs11: PIN_MISSING: no PIN: set it"


def test_secret_hides_itself():
    secret = Secret("123456")
    assert "123456" not in repr(secret) and "123456" not in str(secret)
    assert secret.reveal() == "123456"


def test_parse_objects():
    listing = ("Using slot 0\nPrivate Key Object; EC_EDWARDS\n  label:      a b\n  ID:         01\n"
               "  Usage:      sign\n  Access:     sensitive, never extractable\n"
               "Private Key Object; EC_EDWARDS\n  ID:         02\n"
               "Public Key Object; EC_EDWARDS  EC_POINT 255 bits\n"
               "  EC_POINT:   0420" + "ab" * 32 + "\n"
               "  EC_PARAMS:  06032b6570 (OID 1.3.101.112)\n  ID:         02\n")
    objects = pkcs11_tool.parse_objects(listing)
    assert [(o.kind, o.label, o.id) for o in objects] == [
        ("private key", "a b", "01"), ("private key", None, "02"), ("public key", None, "02")]
    assert objects[0].access == {"sensitive", "never extractable"}
    assert objects[2].public_key() == b"\xab" * 32
    raw = pkcs11_tool.TokenObject("public key")
    raw.ec_point, raw.ec_params = "cd" * 32, "130c656477617264733235353139"
    assert raw.public_key() == b"\xcd" * 32
    raw.ec_params = "06032b6571"  # Ed448
    with pytest.raises(errors.MechanismUnsupported):
        raw.public_key()
    raw.ec_params = None
    # 34 bytes that are not an OCTET STRING of 32; an OCTET STRING of 31 or 33 bytes.
    for point in ("0520" + "ab" * 32, "0421" + "ab" * 32, "0420" + "ab" * 31, "0420" + "ab" * 33):
        raw.ec_point = point
        with pytest.raises(errors.SigningFailed, match="not an Ed25519 point"):
            raw.public_key()


ENV_FILE_CORPUS = [
    "A=1\n",
    "export A=1\n",
    "# comment\n\nA = 1 \n",
    "A=value # comment\n",
    "A=value#not-a-comment\n",
    "A='single # kept'\n",
    'A="double \\" quote"\n',
    'A="tab\\tnewline\\n"\n',
    "A='it\\'s'\n",
    "A=\nB=2\n",
    "A=x=y\n",
    'A="$HOME"\n',
    "A='${HOME}'\n",
    "A=/usr/lib/softhsm/libsofthsm2.so\nB=tok-1\n",
    "A=1\r\nB=2\r\n",
    "A=  spaced value  \n",
]


@pytest.mark.parametrize("text", ENV_FILE_CORPUS)
def test_env_file_reader_agrees_with_python_dotenv(tmp_path, text):
    path = tmp_path / "x.env"
    path.write_bytes(text.encode())
    expected = {k: v for k, v in dotenv_values(path, interpolate=False).items()}
    assert envfile.parse(text) == expected


@pytest.mark.parametrize("text", ["A\n", "A 1\n", "1A=1\n", "A='open\n", 'A="x" y\n',
                                  "A=${B}\n", 'A="${B}"\n', "A-B=1\n"])
def test_env_file_reader_refuses_what_it_cannot_read_for_sure(text):
    with pytest.raises(ValueError):
        envfile.parse(text)


@settings(max_examples=300, deadline=None)
@given(message=st.binary(max_size=300), flip=st.integers(0, 64 * 8 - 1), seed=st.binary(
    min_size=32, max_size=32))
def test_pure_ed25519_verify_agrees_with_cryptography(message, flip, seed):
    key = Ed25519PrivateKey.from_private_bytes(seed)
    public = key.public_key().public_bytes(serialization.Encoding.Raw,
                                           serialization.PublicFormat.Raw)
    signature = key.sign(message)
    assert ed25519.is_valid(public, message, signature)
    tampered = bytearray(signature)
    tampered[flip // 8] ^= 1 << (flip % 8)
    assert not ed25519.is_valid(public, message, bytes(tampered))
    assert not ed25519.is_valid(public, message + b"x", signature)
    other = Ed25519PrivateKey.from_private_bytes(bytes(reversed(seed))).public_key()
    if other.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw) != public:
        assert not ed25519.is_valid(other.public_bytes(serialization.Encoding.Raw,
                                                       serialization.PublicFormat.Raw),
                                    message, signature)


def test_pure_ed25519_rejects_malformed_input():
    public = bytes.fromhex("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")
    signature = bytes.fromhex(
        "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39"
        "701cf9b46bd25bf5f0595bbe24655141438e7a100b")
    assert ed25519.is_valid(public, b"", signature)
    assert not ed25519.is_valid(public[:31], b"", signature)
    assert not ed25519.is_valid(public, b"", signature[:63])
    big_s = signature[:32] + (2**253 + int.from_bytes(signature[32:], "little")).to_bytes(
        32, "little")
    assert not ed25519.is_valid(public, b"", big_s)
    assert not ed25519.is_valid(b"\xff" * 32, b"", signature)


def test_ed25519_constants_are_rfc8032_table_1():
    p = 2**255 - 19
    assert ed25519._D == -121665 * pow(121666, p - 2, p) % p
    assert ed25519._SQRT_M1 == pow(2, (p - 1) // 4, p)
    assert ed25519._GY == 4 * pow(5, p - 2, p) % p
    assert ed25519._GX == ed25519._recover_x(ed25519._GY, 0)
