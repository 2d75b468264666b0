"""RFC 8032 section 7.1 known answers, signed by keys imported onto a real token."""

import base64
import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from conftest import assert_failure, gateway_decode, verify
from lap_pkcs11.per_signature import ed25519

VECTORS = json.loads((Path(__file__).parent / "vectors" / "rfc8032-ed25519.json").read_text())
BY_NAME = {v["name"]: v for v in VECTORS["vectors"]}


@pytest.mark.parametrize("name", sorted(BY_NAME))
def test_vector_file_is_self_consistent(name):
    vector = BY_NAME[name]
    key = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(vector["secret_key"]))
    public = key.public_key().public_bytes(serialization.Encoding.Raw,
                                           serialization.PublicFormat.Raw)
    assert public.hex() == vector["public_key"]
    assert key.sign(bytes.fromhex(vector["message"])).hex() == vector["signature"]


@pytest.mark.parametrize("name", ["TEST 2", "TEST 3", "TEST 1024"])
def test_signer_reproduces_rfc8032_signature(signer, token, name):
    vector = BY_NAME[name]
    public = token.import_seed(bytes.fromhex(vector["secret_key"]), "a1", "rfc8032")
    assert public.hex() == vector["public_key"]
    message = bytes.fromhex(vector["message"])
    result = signer([*token.args("a1"), "--output", "hex",
                     "--expect-public-key", vector["public_key"]], message, env=token.env,
                    cwd=token.home)
    assert result.returncode == 0, result.stderr
    assert result.stdout == vector["signature"].encode() + b"\n"


def test_rfc8032_test_1_empty_message(signer, token):
    """The token signs the empty message right, but the signer refuses it by contract."""
    vector = BY_NAME["TEST 1"]
    token.import_seed(bytes.fromhex(vector["secret_key"]), "a1", "rfc8032")
    bare = token.home / "empty"
    bare.write_bytes(b"")
    signature = token.tool("--sign", "--mechanism", "EDDSA", "--id", "a1",
                           "--input-file", str(bare)).stdout
    assert signature.hex() == vector["signature"]
    assert_failure(signer(token.args("a1"), b"", env=token.env, cwd=token.home),
                   "INPUT_INVALID", 65)


def test_imported_key_signature_verifies_with_gateway_decoding(signer, token):
    vector = BY_NAME["TEST 3"]
    public = token.import_seed(bytes.fromhex(vector["secret_key"]), "b2", "imported")
    message = b"gateway message"
    result = signer([*token.args("b2"), "--input", "base64"],
                    base64.b64encode(message) + b"\n", env=token.env,
                    cwd=token.home)
    verify(public, message, gateway_decode(result.stdout))


WYCHEPROOF = json.loads((Path(__file__).parent / "vectors" /
                         "wycheproof-ed25519_test.json").read_text())
WYCHEPROOF_CASES = [(group["publicKey"]["pk"], case) for group in WYCHEPROOF["testGroups"]
                    for case in group["tests"]]


def test_the_wycheproof_file_is_whole():
    assert len(WYCHEPROOF_CASES) == WYCHEPROOF["numberOfTests"] == 151
    results = [case["result"] for _, case in WYCHEPROOF_CASES]
    assert (results.count("valid"), results.count("invalid")) == (88, 63)


@pytest.mark.parametrize("public, case", WYCHEPROOF_CASES,
                         ids=[f"tc{case['tcId']}" for _, case in WYCHEPROOF_CASES])
def test_the_pinned_key_check_agrees_with_wycheproof(public, case):
    """Each of Wycheproof's cases (S = L, a sign bit on x = 0, small-order R, ...): the
    verifier behind --expect-public-key accepts exactly the valid ones."""
    accepted = ed25519.is_valid(bytes.fromhex(public), bytes.fromhex(case["msg"]),
                                bytes.fromhex(case["sig"]))
    assert accepted == (case["result"] == "valid"), case["comment"]
