"""pkcs11-tool output across OpenSC versions: listings and error messages.

The listings in tests/data/listings/VERSION/ were recorded by
tests/data/listings/record.py from Debian's 0.23 and from 0.26.1 and 0.27.1
built from OpenSC's release tags. Both parsers
(lap_pkcs11.backends.pkcs11_tool.parse_objects and the shell mirror's
resolve_key_id) must read every one of them; the last tests run against the
pkcs11-tool under test (LAP_TEST_PKCS11_TOOL).
"""

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from conftest import SHELL_SIGNER, TEST_TOOL, tool_program
from lap_pkcs11.admin import token_inspection
from lap_pkcs11.backends import pkcs11_tool
from lap_pkcs11.per_signature import errors, signer

LISTINGS = Path(__file__).resolve().parent / "data" / "listings"
VERSIONS = sorted(path.name for path in LISTINGS.iterdir() if path.is_dir())


def expected(version):
    return json.loads((LISTINGS / version / "expected.json").read_text())


def listing(version, name):
    return (LISTINGS / version / f"{name}.txt").read_text()


def test_every_version_was_recorded():
    assert VERSIONS == ["0.23", "0.26.1", "0.27.1"]


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("name", ["all", "privkey", "pubkey"])
def test_python_parser_reads_every_key(version, name):
    objects = pkcs11_tool.parse_objects(listing(version, name))
    keys = expected(version)
    kinds = {"all": ("private key", "public key"), "privkey": ("private key",),
             "pubkey": ("public key",)}[name]
    assert sorted(obj.kind for obj in objects if obj.is_key) == sorted(
        kind for kind in kinds for _ in keys)
    for key in keys:
        for kind in kinds:
            found = [obj for obj in objects if obj.kind == kind and obj.id == key["id"]]
            assert len(found) == 1, (kind, key["id"])
            assert found[0].label == key["label"]
            if kind == "public key":
                assert found[0].public_key().hex() == key["public_key_hex"]
                # The curve is read too: pkcs11-tool writes "edwards25519", an import the OID.
                assert found[0].ec_params == pkcs11_tool.ED25519_PARAMS[
                    key["origin"] != "generated"], (version, key["id"])
            else:
                assert "sensitive" in found[0].access
    if name == "all":
        assert [obj.kind for obj in objects if not obj.is_key] == ["data"]


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("name", ["privkey", "pubkey"])
def test_keygen_can_prove_ids_free_on_every_version(version, name):
    objects, strays = pkcs11_tool.read_listing(listing(version, name))
    assert token_inspection.listing_doubt(objects, strays) is None


def test_keygen_doubts_what_it_cannot_read():
    key = "Private Key Object; EC_EDWARDS\n  label:      k\n  ID:         01\n"
    objects, strays = pkcs11_tool.read_listing("Using slot 0 (0x1)\n" + key)
    assert token_inspection.listing_doubt(objects, strays) is None
    for text in ("Private key 01\n" + key, key + "  Key ID:     02\n",
                 key.replace("01", "1 (0x02)"), key.replace("  ID:         01\n", "")):
        assert token_inspection.listing_doubt(*pkcs11_tool.read_listing(text)), text


@pytest.mark.parametrize("version", VERSIONS)
def test_access_flags_tell_generated_from_imported(version):
    origins = {key["id"]: key["origin"] for key in expected(version)}
    for obj in pkcs11_tool.parse_objects(listing(version, "privkey")):
        never = "never extractable" in obj.access
        assert never == (origins[obj.id] == "generated"), obj.id


def shell_key_id(listing_path, label):
    """The shell mirror's resolve_key_id over a recorded listing, its tool run replaced."""
    script = ('source "$1"; exec {SIG_FD}<"$2"; run_tool() { STATUS=0; }; PIN_ENV=PIN; '
              'SELECTOR=(); VAL[key_label]=$3; resolve_key_id; printf "%s\\n" "$KEY_ID"')
    return subprocess.run(["bash", "-c", script, "_", SHELL_SIGNER, listing_path, label],
                          capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("version", VERSIONS)
def test_shell_parser_reads_every_key(version):
    for key in expected(version):
        for name in ("all", "privkey"):
            result = shell_key_id(LISTINGS / version / f"{name}.txt", key["label"])
            assert (result.returncode, result.stdout) == (0, key["id"] + "\n"), result.stderr


@pytest.mark.parametrize("text, label, name", [
    ("Private Key Object; EC_EDWARDS\n  label:      k\n  ID:         1 (0x02)\n", "k",
     "KEY_NOT_FOUND"),
    ("Private Key Object; EC_EDWARDS\n  label:      k\n", "k", "KEY_NOT_FOUND"),
    ("Private Key Object; EC_EDWARDS\n  label:      k\n  ID:         01\n"
     "Private Key Object; EC_EDWARDS\n  label:      k\n  ID:         1 (0x02)\n", "k",
     "KEY_NOT_FOUND"),
    ("Public Key Object; EC_EDWARDS\n  label:      k\n  ID:         01\n", "k", "KEY_NOT_FOUND"),
])
def test_both_parsers_refuse_what_they_cannot_read(tmp_path, monkeypatch, text, label, name):
    path = tmp_path / "listing.txt"
    path.write_text(text)
    result = shell_key_id(path, label)
    assert result.returncode == 69 and result.stderr.startswith(f"lap-pkcs11: {name}: ")
    monkeypatch.setattr(pkcs11_tool, "run",
                        lambda *args, **kwargs: pkcs11_tool.Result(0, text.encode(), ""))
    config = types.SimpleNamespace(key_id=None, key_label=label, module="/m.so", slot=None,
                                   slot_index=None, token_label=None)
    with pytest.raises(errors.SignerError) as failure:
        signer.resolve_key_id(config, "pkcs11-tool", {}, "PIN", 0)
    assert failure.value.name == name


@pytest.mark.parametrize("text, hex_id", [
    ("01", "01"), ("0102", "0102"), ("A1B2", "a1b2"), ("1 (0x01)", "01"),
    ("258 (0x01:02)", "0102"), ("00", "00"), ("a1:b2:c3:d4:e5", "a1b2c3d4e5"),
    ("00:11:22 33:44", "0011223344"), ("4294967295 (0xff:ff:ff:ff)", "ffffffff"),
    ("2 (0x01)", None), ("1 (0x01", None), ("x (0x01)", None), ("zz", None), ("012", None),
    ("", None),
])
def test_id_forms(text, hex_id):
    assert pkcs11_tool.id_hex(text) == hex_id


def test_wrapped_values_join_the_field_before_them():
    text = ("Public Key Object; EC_EDWARDS  EC_POINT 255 bits\n"
            "  EC Point:   0420" + "ab" * 30 + "\n              abab\n"
            "  EC Params:  13:0c:65:64:77:61:72:64:73:32:35:35:31:39 (\"edwards25519\")\n"
            "  label:      k\n  ID:         " + ":".join(["0a"] * 32) + "\n"
            "              0b:0c\n  Usage:      verify\n")
    (obj,) = pkcs11_tool.parse_objects(text)
    assert obj.public_key() == b"\xab" * 32
    assert obj.id == "0a" * 32 + "0b0c" and obj.label == "k"


@pytest.mark.parametrize("stderr, name", [
    ("error: Private/secret key not found\nAborting.", "KEY_NOT_FOUND"),
    ("sc_dlopen_deep failed: /x.so: cannot open shared object file\n"
     "error: Failed to load pkcs11 module", "MODULE_LOAD_FAILED"),
    ("sc_dlopen_deep failed: /x.so: invalid ELF header", "MODULE_LOAD_FAILED"),
    ("error: Key has no EC_PARAMS attribute\nAborting.", "MECHANISM_UNSUPPORTED"),
    ("error: Unknown or unsupported EC curve used in key\nAborting.", "MECHANISM_UNSUPPORTED"),
    ("Using slot with index 1 (0x1)\nerror: Token not initialized\nAborting.", "TOKEN_NOT_FOUND"),
    ("error: PKCS11 function C_OpenSession failed: rv = CKR_TOKEN_NOT_RECOGNIZED (0xe1)",
     "TOKEN_NOT_FOUND"),
])
def test_newer_messages_are_classified(stderr, name):
    assert pkcs11_tool.classify(pkcs11_tool.Result(1, b"", stderr)).name == name


STDERR = Path(__file__).resolve().parent / "data" / "stderr"
# Every failure of tests/data/stderr/record.py, recorded from OpenSC 0.23, 0.26.1 and 0.27.1
# on SoftHSM2 2.6.1: (version, case, exit status, stderr).
RECORDED = [(version.name, case, info["status"],
             (version / f"{case}.stderr").read_bytes().decode("utf-8", "replace"))
            for version in sorted(STDERR.iterdir()) if version.is_dir()
            for case, info in json.loads((version / "cases.json").read_text()).items()
            if info["status"] != 0]
# The error each recorded failure must give, by what the case did (its name's prefix).
# The generic ones (SIGNING_FAILED, with the tool's last line) match no phrase: a PSS
# mechanism on an Ed25519 key fails in C_SignFinal with CKR_GENERAL_ERROR, a HMAC
# mechanism finds no secret key, and an empty or unset PIN, a missing user PIN and a
# missing input file never reach pkcs11-tool from lap-pkcs11 (it checks them first).
BY_PREFIX = [("module_", "MODULE_LOAD_FAILED"), ("conf_", "MODULE_LOAD_FAILED"),
             ("pin_len_", "PIN_INCORRECT"), ("pin_incorrect", "PIN_INCORRECT"),
             ("list_objects_pin_incorrect", "PIN_INCORRECT"), ("pin_empty", "SIGNING_FAILED"),
             ("pin_env_unset", "SIGNING_FAILED"), ("user_pin_not_initialized", "SIGNING_FAILED"),
             ("input_missing", "SIGNING_FAILED"), ("mech_pss_", "SIGNING_FAILED"),
             ("mech_sha256_hmac_", "SIGNING_FAILED"), ("uninit_slot", "TOKEN_NOT_FOUND"),
             ("empty_tokendir_", "TOKEN_NOT_FOUND"), ("list_objects_uninit", "TOKEN_NOT_FOUND"),
             ("token_label_missing", "TOKEN_NOT_FOUND"), ("slot_", "TOKEN_NOT_FOUND"),
             ("list_objects_token_label", "TOKEN_NOT_FOUND"),
             ("list_objects_slot_", "TOKEN_NOT_FOUND"),
             ("key_absent", "KEY_NOT_FOUND"), ("key_", "MECHANISM_UNSUPPORTED"),
             ("mech_", "MECHANISM_UNSUPPORTED"), ("input_10", "MECHANISM_UNSUPPORTED")]
# Phrases SoftHSM2 2.6.1 with these pkcs11-tool versions never prints (so no recording
# has them first), and why; tests/test_units.py and test_newer_messages_are_classified
# cover them with the text real tokens and other versions print.
UNPROVOKED = {
    "sc_dlopen failed": "always printed after 'Failed to load pkcs11 module', same error",
    "sc_dlopen_deep failed": "0.27's spelling of the line above, also after it",
    "CKR_PIN_LEN_RANGE": "SoftHSM2's C_Login does not check a PIN's length",
    "CKR_PIN_LOCKED": "SoftHSM2 has no retry counter (22 wrong PINs: still CKR_PIN_INCORRECT)",
    "CKR_PIN_EXPIRED": "SoftHSM2 has no PIN expiry",
    "CKR_TOKEN_NOT_PRESENT": "every SoftHSM2 slot has a token present",
    "No slot with id": "older OpenSC's phrase; not in 0.23, 0.26.1 or 0.27.1",
    "No slots": "SoftHSM2 always has a free slot, even with no token directory entries",
    "No slot": "as above",
    "CKR_KEY_TYPE_INCONSISTENT": "SoftHSM2 accepts C_SignInit with a key that does not fit; "
                                 "pkcs11-tool's multi-part retry then reports "
                                 "CKR_OPERATION_NOT_INITIALIZED",
    "mechanism not supported": "printed only when no --mechanism is given; lap-pkcs11 always "
                               "gives one",
}


def expected_name(case):
    return next(name for prefix, name in BY_PREFIX if case.startswith(prefix))


@pytest.mark.parametrize("version, case, status, stderr", RECORDED,
                         ids=[f"{version}-{case}" for version, case, _, _ in RECORDED])
def test_recorded_failures_get_their_error(version, case, status, stderr):
    """Real pkcs11-tool stderr of each failure: the error name its cause calls for."""
    assert pkcs11_tool.classify(pkcs11_tool.Result(status, b"", stderr)).name == \
        expected_name(case)


def test_every_phrase_is_recorded_or_said_why_not():
    """Each classification phrase is the one a recorded failure matches first, or it is
    listed with the reason SoftHSM2 cannot print it."""
    first = set()
    for _, _, _, stderr in RECORDED:
        found = [needle for needle, _, _ in pkcs11_tool._CLASSES if needle in stderr]
        first.update(found[:1])
    needles = [needle for needle, _, _ in pkcs11_tool._CLASSES]
    assert sorted(first | set(UNPROVOKED)) == sorted(needles)
    assert not first & set(UNPROVOKED), "recorded now: drop it from UNPROVOKED"
    assert {version for version, _, _, _ in RECORDED} == {"0.23", "0.26.1", "0.27.1"}


def tool_version():
    """The OpenSC version of the pkcs11-tool under test, from the opensc-tool beside it."""
    opensc_tool = Path(tool_program()).resolve().parent / "opensc-tool"
    out = subprocess.run([opensc_tool, "--info"], capture_output=True, text=True).stdout
    return out.split()[1]


def test_the_tool_under_test_is_the_one_selected():
    version = tool_version()
    if TEST_TOOL:
        assert f"opensc-{version}" in TEST_TOOL
    else:
        assert version.startswith("0.23"), version


def test_the_eddsa_limit_of_this_pkcs11_tool_is_1024_bytes(keyed):
    """Why MESSAGE_TOO_LARGE stays: every version through 0.27.1 signs 1024 bytes, not 1025."""
    token, _ = keyed
    for size, signs in ((1024, True), (1025, False)):
        path = token.home / f"m{size}"
        path.write_bytes(os.urandom(size))
        result = subprocess.run([tool_program(), "--module", token.module, "--token-label",
                                 token.label, "--login", "--pin", "env:PKCS11_PIN", "--sign",
                                 "--mechanism", "EDDSA", "--id", "01", "--input-file", path],
                                env=token.env, capture_output=True, timeout=60)
        assert (result.returncode == 0 and len(result.stdout) == 64) == signs, (size, result)


def field_names(text):
    return sorted({line.split(":", 1)[0].strip() for line in text.splitlines()
                   if line.startswith("  ") and not line.startswith("   ")})


def key_names(text):
    return sorted((obj.kind, obj.id, obj.label) for obj in pkcs11_tool.parse_objects(text))


@pytest.mark.parametrize("version", ["0.26.1", "0.27.1"])
def test_a_release_build_prints_what_was_recorded(version, tmp_path):
    """The recording matches what that build prints today (CI builds both)."""
    binary = Path(f"/opt/opensc-{version}/bin/pkcs11-tool")
    if not binary.exists():
        pytest.skip(f"pkcs11-tool {version} is not built here (.ci/opensc.sh build makes it)")
    out = tmp_path / "listings"
    subprocess.run([sys.executable, LISTINGS / "record.py", binary, out], check=True,
                   capture_output=True, timeout=120)
    for name in ("all", "privkey", "pubkey"):
        fresh = (out / f"{name}.txt").read_text()
        assert field_names(fresh) == field_names(listing(version, name))
        assert key_names(fresh) == key_names(listing(version, name))
    for key in json.loads((out / "expected.json").read_text()):
        (public,) = [obj for obj in pkcs11_tool.parse_objects((out / "all.txt").read_text())
                     if obj.kind == "public key" and obj.id == key["id"]]
        assert public.public_key().hex() == key["public_key_hex"]
