"""PKCS#11 URIs (RFC 7512): the RFC's own examples, a shared table of cases read by both
implementations, round trips (also through p11-kit, an independent implementation), the
URIs OpenSC prints, and --uri, pubkey --format uri, keys, doctor and config against real
SoftHSM2 tokens and the pkcs11-tool under test."""

import base64
import ctypes
import ctypes.util
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import (IMPLEMENTATIONS, ROOT, SHELL_SIGNER, USER_PIN, Token, assert_failure,
                      gateway_decode, run_checked, tool_program, verify)
from lap_pkcs11.backends import pkcs11_tool
from lap_pkcs11.per_signature import config, errors, sign_command, uri
from lap_pkcs11.admin import settings as admin_settings

CASES = json.loads((ROOT / "tests" / "uri_cases.json").read_text())
LISTINGS = ROOT / "tests" / "data" / "listings"
LAP = str(Path(sys.executable).parent / "lap-pkcs11")
SEED = bytes(range(32, 64))

# RFC 7512 section 3, as the RFC prints them (broken over lines for reading; a URI has
# no whitespace), with the attributes each holds once percent-decoded.
RFC_EXAMPLES = [
    ("pkcs11:", {}),
    ("pkcs11:object=my-pubkey;type=public", {"object": b"my-pubkey", "type": b"public"}),
    ("pkcs11:object=my-key;type=private?pin-source=file:/etc/token",
     {"object": b"my-key", "type": b"private", "pin-source": b"file:/etc/token"}),
    ("""pkcs11:token=The%20Software%20PKCS%2311%20Softtoken;
          manufacturer=Snake%20Oil,%20Inc.;
          model=1.0;
          object=my-certificate;
          type=cert;
          id=%69%95%3E%5C%F4%BD%EC%91;
          serial=
          ?pin-source=file:/etc/token_pin""",
     {"token": b"The Software PKCS#11 Softtoken", "manufacturer": b"Snake Oil, Inc.",
      "model": b"1.0", "object": b"my-certificate", "type": b"cert",
      "id": bytes.fromhex("69953e5cf4bdec91"), "serial": b"",
      "pin-source": b"file:/etc/token_pin"}),
    ("""pkcs11:object=my-sign-key;
          type=private
          ?module-name=mypkcs11""",
     {"object": b"my-sign-key", "type": b"private", "module-name": b"mypkcs11"}),
    ("""pkcs11:object=my-sign-key;
          type=private
          ?module-path=/mnt/libmypkcs11.so.1""",
     {"object": b"my-sign-key", "type": b"private", "module-path": b"/mnt/libmypkcs11.so.1"}),
    ("""pkcs11:token=Software%20PKCS%2311%20softtoken;
          manufacturer=Snake%20Oil,%20Inc.
          ?pin-value=the-pin""",
     {"token": b"Software PKCS#11 softtoken", "manufacturer": b"Snake Oil, Inc.",
      "pin-value": b"the-pin"}),
    ("pkcs11:slot-description=Sun%20Metaslot", {"slot-description": b"Sun Metaslot"}),
    ("""pkcs11:library-manufacturer=Snake%20Oil,%20Inc.;
          library-description=Soft%20Token%20Library;
          library-version=1.23""",
     {"library-manufacturer": b"Snake Oil, Inc.", "library-description": b"Soft Token Library",
      "library-version": b"1.23"}),
    ("""pkcs11:token=My%20token%25%20created%20by%20Joe;
          library-version=3;
          id=%01%02%03%Ba%dd%Ca%fe%04%05%06""",
     {"token": b"My token% created by Joe", "library-version": b"3",
      "id": bytes.fromhex("010203baddcafe040506")}),
    ("""pkcs11:token=A%20name%20with%20a%20substring%20%25%3B;
          object=my-certificate;
          type=cert""",
     {"token": b"A name with a substring %;", "object": b"my-certificate", "type": b"cert"}),
    ("""pkcs11:token=Name%20with%20a%20small%20A%20with%20acute:%20%C3%A1;
          object=my-certificate;
          type=cert""",
     {"token": "Name with a small A with acute: \u00e1".encode(), "object": b"my-certificate",
      "type": b"cert"}),
    ("""pkcs11:token=my-token;
          object=my-certificate;
          type=cert;
          vendor-aaa=value-a
          ?pin-source=file:/etc/token_pin
          &vendor-bbb=value-b""",
     {"token": b"my-token", "object": b"my-certificate", "type": b"cert",
      "vendor-aaa": b"value-a", "pin-source": b"file:/etc/token_pin",
      "vendor-bbb": b"value-b"}),
]


def joined(text):
    return "".join(text.split())


@pytest.mark.parametrize("example, attributes", RFC_EXAMPLES,
                         ids=[f"rfc7512-{n}" for n in range(1, len(RFC_EXAMPLES) + 1)])
def test_every_rfc_7512_example_parses(example, attributes):
    parsed = uri.parse(joined(example))
    assert {a.name: a.value for a in parsed} == attributes
    assert [a.component for a in parsed] == [
        "query" if a.name in uri.QUERY_ATTRIBUTES or a.name == "vendor-bbb" else "path"
        for a in parsed]


def test_the_table_holds_the_rfc_examples_first():
    assert [case["uri"] for case in CASES["parse"][:len(RFC_EXAMPLES)]] == [
        joined(example) for example, _ in RFC_EXAMPLES]


def python_parse(text):
    """What lap-pkcs11 makes of a URI given as --uri: the options, or its one error line."""
    try:
        return uri.options(text), None
    except ValueError as err:
        return None, errors.ConfigInvalid(f"--uri {err}").line()


# The shell mirror's parse_uri and resolve, run by sourcing the script (main does not run).
SHELL_PARSE = r'''
source "$1"
parse_uri "$2"
for attr in "${URI_ORDER[@]}"; do printf '%s=%s\0' "$attr" "${URI_VAL[$attr]}"; done
'''
SHELL_RESOLVE = r'''
source "$1"
shift
parse_args "$@"
resolve
for attr in "${!VAL[@]}"; do printf '%s=%s=%s\0' "$attr" "${SRC[$attr]}" "${VAL[$attr]}"; done
'''


def shell_parse(text):
    result = subprocess.run(["bash", "-c", SHELL_PARSE, "_", str(SHELL_SIGNER), text],
                            capture_output=True, env={"PATH": os.environ["PATH"]})
    if result.returncode:
        assert result.returncode == 64 and result.stdout == b"", result
        return None, result.stderr.decode().rstrip("\n")
    pairs = [item.decode().split("=", 1) for item in result.stdout.split(b"\0")[:-1]]
    return dict(pairs), None


@pytest.mark.parametrize("case", CASES["parse"], ids=lambda case: case["uri"][:60])
def test_both_implementations_read_each_uri_alike(case):
    python, shell = python_parse(case["uri"]), shell_parse(case["uri"])
    assert python == shell
    options, line = python
    if "error" in case:
        assert options is None and case["error"] in line, line
        assert line.startswith("lap-pkcs11: CONFIG_INVALID: --uri ")
        if "pin-value=" in case["uri"]:  # the PIN itself is never repeated
            raw = case["uri"].split("pin-value=")[1].split("&")[0]
            assert raw not in line and uri.parse(case["uri"])[-1].value.decode() not in line
    else:
        assert line is None and options == case["options"]


def python_resolve(args, env):
    try:
        flags = sign_command.parse_args(args)[0]
        resolved = config.resolve(flags, env)
    except errors.SignerError as err:
        return None, err.line()
    return {attr: [str(value), resolved.sources[attr]]
            for attr, value in resolved.values().items() if value is not None}, None


def shell_resolve(args, env):
    result = subprocess.run(["bash", "-c", SHELL_RESOLVE, "_", str(SHELL_SIGNER), *args],
                            capture_output=True, env={"PATH": os.environ["PATH"], **env})
    if result.returncode:
        assert result.returncode == 64 and result.stdout == b"", result
        return None, result.stderr.decode().rstrip("\n")
    values = {}
    for item in result.stdout.split(b"\0")[:-1]:
        attr, source, value = item.decode().split("=", 2)
        if attr != "env_file":
            values[attr] = [value, source]
    return values, None


@pytest.mark.parametrize("case", CASES["resolve"], ids=lambda case: " ".join(case["args"])[:70])
def test_both_resolvers_fill_and_refuse_alike(case):
    python = python_resolve(case["args"], case["env"])
    assert python == shell_resolve(case["args"], case["env"])
    values, line = python
    if "error" in case:
        assert values is None and case["error"] in line, line
        assert line.startswith("lap-pkcs11: CONFIG_INVALID: ")
    else:
        assert line is None
        for attr, expected in case["values"].items():
            assert values[attr] == expected, attr
    # The administrative commands' resolver agrees too.
    try:
        admin = admin_settings.load(sign_command.parse_args(case["args"])[0], case["env"])
        assert line is None and {attr: [str(value), admin.sources[attr]] for attr, value
                                 in admin.values().items() if value is not None} == values
    except errors.SignerError as err:
        assert err.line() == line


# Round trips: what lap-pkcs11 writes, it reads back to the same options.
TEXT = st.text(st.characters(blacklist_categories=("Cc", "Cs")), min_size=1, max_size=40)


@settings(max_examples=300, deadline=None)
@given(token=TEXT, key_id=st.binary(min_size=1, max_size=40), label=TEXT,
       module=st.text(st.characters(blacklist_categories=("Cc", "Cs")), min_size=1),
       pin=st.one_of(st.none(),
                     st.tuples(st.just("pin_env"),
                               st.from_regex(r"\A[A-Za-z_][A-Za-z0-9_]{0,20}\Z")),
                     st.tuples(st.just("pin_file"), st.builds(lambda t: "/" + t, TEXT))))
def test_written_uris_read_back(token, key_id, label, module, pin):
    values = {"token_label": token, "key_id": key_id.hex(), "key_label": label}
    query = [("module-path", module)]
    expected = {**values, "module": module}
    if pin:
        attr, value = pin
        query.append(("pin-source", "env:" + value if attr == "pin_env"
                      else uri.file_source(value)))
        expected[attr] = value
    text = uri.build(values, query)
    assert all(c.isascii() and c.isprintable() and c not in " \"#$`\\" for c in text)
    assert uri.options(text) == expected


@settings(max_examples=100, deadline=None)
@given(st.sampled_from([case["uri"] for case in CASES["parse"] if "options" in case]))
def test_read_uris_write_back_to_the_same_options(text):
    filled = uri.options(text)
    pin = ([("pin-source", "env:" + filled["pin_env"])] if "pin_env" in filled else
           [("pin-source", "file:" + filled["pin_file"])] if "pin_file" in filled else [])
    module = [("module-path", filled["module"])] if "module" in filled else []
    again = uri.options(uri.build(filled, module + pin))
    assert again == filled


class P11Kit:
    """p11-kit's own URI parser and writer (libp11-kit, part of Debian's base system):
    an independent reading of what lap-pkcs11 writes."""

    FOR_ANY, CKA_LABEL, CKA_ID = 0xFFFF, 0x3, 0x102

    class Attribute(ctypes.Structure):
        _fields_ = [("type", ctypes.c_ulong), ("value", ctypes.c_void_p),
                    ("length", ctypes.c_ulong)]

    def __init__(self):
        path = ctypes.util.find_library("p11-kit")
        assert path, "libp11-kit is missing: apt-get install libp11-kit0"
        self.lib = lib = ctypes.CDLL(path)
        lib.p11_kit_uri_new.restype = ctypes.c_void_p
        lib.p11_kit_uri_parse.argtypes = [ctypes.c_char_p, ctypes.c_int, ctypes.c_void_p]
        lib.p11_kit_uri_get_token_info.restype = ctypes.c_void_p
        lib.p11_kit_uri_get_token_info.argtypes = [ctypes.c_void_p]
        lib.p11_kit_uri_get_attribute.restype = ctypes.POINTER(self.Attribute)
        lib.p11_kit_uri_get_attribute.argtypes = [ctypes.c_void_p, ctypes.c_ulong]
        lib.p11_kit_uri_get_module_path.restype = ctypes.c_char_p
        lib.p11_kit_uri_get_module_path.argtypes = [ctypes.c_void_p]
        lib.p11_kit_uri_get_pin_source.restype = ctypes.c_char_p
        lib.p11_kit_uri_get_pin_source.argtypes = [ctypes.c_void_p]
        lib.p11_kit_uri_format.argtypes = [ctypes.c_void_p, ctypes.c_int,
                                           ctypes.POINTER(ctypes.c_char_p)]
        lib.p11_kit_uri_free.argtypes = [ctypes.c_void_p]

    def read(self, text):
        """(token label, CKA_ID, CKA_LABEL, module path, pin source, p11-kit's own text)."""
        lib = self.lib
        handle = lib.p11_kit_uri_new()
        try:
            assert lib.p11_kit_uri_parse(text.encode(), self.FOR_ANY, handle) == 0, text
            label = ctypes.string_at(lib.p11_kit_uri_get_token_info(handle), 32)
            found = []
            for kind in (self.CKA_ID, self.CKA_LABEL):
                attribute = lib.p11_kit_uri_get_attribute(handle, kind)
                found.append(ctypes.string_at(attribute.contents.value, attribute.contents.length)
                             if attribute else None)
            written = ctypes.c_char_p()
            assert lib.p11_kit_uri_format(handle, self.FOR_ANY, ctypes.byref(written)) == 0
            return (label.rstrip(b" ").decode(), *found, lib.p11_kit_uri_get_module_path(handle),
                    lib.p11_kit_uri_get_pin_source(handle), written.value.decode())
        finally:
            lib.p11_kit_uri_free(handle)


P11KIT = P11Kit()
# A token label is 32 bytes in CK_TOKEN_INFO: p11-kit refuses longer ones.
LABEL_TEXT = TEXT.filter(lambda t: len(t.encode()) <= 32 and t == t.strip(" "))


@settings(max_examples=300, deadline=None)
@given(token=LABEL_TEXT, key_id=st.binary(min_size=1, max_size=40), label=TEXT,
       module=st.from_regex(r"\A/[A-Za-z0-9_./-]{1,40}\Z"))
def test_p11_kit_reads_what_lap_pkcs11_writes_and_back(token, key_id, label, module):
    text = uri.build({"token_label": token, "key_id": key_id.hex(), "key_label": label},
                     [("module-path", module), ("pin-source", "file:/run/pin")])
    read = P11KIT.read(text)
    assert read[:5] == (token, key_id, label.encode(), module.encode(), b"file:/run/pin")
    # And p11-kit's own writing of it reads back to the same options here.
    assert uri.options(read[5]) == uri.options(text)


@pytest.mark.parametrize("version", ["0.26.1", "0.27.1"])
def test_the_uris_opensc_prints_name_the_keys_it_lists(version):
    """OpenSC 0.26+ prints a uri: line for each object, and lap-pkcs11 reads every one by
    the RFC. 0.26 writes an id of several bytes with one % in front (id=%0102 for 01 02),
    which RFC 7512 reads as the bytes 01 30 32: such a URI names no key there (sign says
    KEY_NOT_FOUND); 0.27 writes %01%02."""
    listing = (LISTINGS / version / "all.txt").read_text()
    keys = [obj for obj in pkcs11_tool.parse_objects(listing) if obj.is_key]
    assert keys and all(obj.uri for obj in keys)
    misread = 0
    for obj in keys:
        filled = uri.options(obj.uri.replace(";type=public", ""))
        expected = obj.id
        if version == "0.26.1":
            expected = obj.id[:2] + obj.id[2:].encode().hex()
            misread += expected != obj.id
        assert (filled["key_id"], filled["key_label"], filled["token_label"]) == (
            expected, obj.label, "lap-rec")
        assert filled["token_serial"] and filled["token_model"] == "SoftHSM v2"
    assert misread == (8 if version == "0.26.1" else 0)


def test_uri_is_read_only_when_one_is_given():
    """sign without a URI pays nothing for it: the module is not even imported."""
    code = ("import sys; from lap_pkcs11.per_signature import config; "
            "config.resolve({'module': '/m', 'key_id': '01'}, {}); "
            "print('lap_pkcs11.per_signature.uri' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout == "False\n"


# Against real tokens.

def run(token, *args, env=None, data=None):
    return subprocess.run([LAP, *args], env=env or token.env, cwd=token.home, input=data,
                          capture_output=True, timeout=120)


@pytest.fixture
def two_tokens(tmp_path):
    """Two tokens with one label in one store, the key (id 01, "lap key") only on the one
    pkcs11-tool lists second, so that the label alone selects the wrong token."""
    token = Token(tmp_path)
    Token(tmp_path)  # the same home: the same SOFTHSM2_CONF and token directory
    listing = pkcs11_tool.read_token_listing(run_checked(
        [tool_program(), "--module", token.module, "--show-info", "--list-token-slots"],
        token.env).stdout.decode())
    assert [entry["label"] for entry in listing.tokens] == [token.label] * 2
    target = listing.tokens[1]
    run_checked([tool_program(), "--module", token.module, "--slot", str(target["slot"]),
                 "--login", "--pin", "env:PKCS11_PIN", "--keypairgen", "--key-type",
                 "EC:edwards25519", "--id", "01", "--label", "lap key"], token.env)
    listing = run_checked([tool_program(), "--module", token.module, "--slot",
                           str(target["slot"]), "--list-objects", "--type", "pubkey"],
                          token.env).stdout.decode()
    (key,) = [obj for obj in pkcs11_tool.parse_objects(listing) if obj.id == "01"]
    return token, target, key.public_key()


def test_sign_by_uri_in_both_implementations(signer, token):
    public = token.keygen("01", "lap key")
    message = b"\x00receipt\x00" * 40
    for text in (f"pkcs11:token={token.label};id=%01;type=private?module-path={token.module}",
                 f"pkcs11:token={token.label};object=lap%20key?module-path={token.module}",
                 f"pkcs11:token={token.label};id=%01;object=lap%20key;type=private"
                 f"?module-path={token.module}&pin-source=env:PKCS11_PIN"):
        result = signer(["--uri", text], message, env=token.env, cwd=token.home)
        assert result.returncode == 0, result.stderr
        verify(public, message, gateway_decode(result.stdout))
    env = dict(token.env, LAP_PKCS11_URI=f"pkcs11:token={token.label};id=%01",
               LAP_PKCS11_MODULE=token.module)
    result = signer([], message, env=env, cwd=token.home)
    verify(public, message, gateway_decode(result.stdout))


def test_sign_by_uri_with_a_pin_file(signer, token):
    public = token.keygen("01", "lap key")
    pin = token.home / "pin"
    pin.write_text(USER_PIN + "\n")
    pin.chmod(0o600)
    env = {k: v for k, v in token.env.items() if k != "PKCS11_PIN"}
    text = (f"pkcs11:token={token.label};id=%01?module-path={token.module}"
            f"&pin-source=file://{pin}")
    result = signer(["--uri", text], b"m", env=env, cwd=token.home)
    assert result.returncode == 0, result.stderr
    verify(public, b"m", gateway_decode(result.stdout))


def test_a_uri_whose_object_is_not_the_keys_label_signs_nothing(signer, token):
    token.keygen("01", "lap key")
    result = signer(["--uri", f"pkcs11:id=%01;object=other?module-path={token.module}"], b"m",
                    env=token.env, cwd=token.home)
    assert_failure(result, "KEY_NOT_FOUND", 69)
    assert "labelled 'lap key', not 'other'" in result.stderr.decode()


def test_serial_picks_the_token_that_the_label_alone_does_not(signer, two_tokens):
    token, target, public = two_tokens
    base = f"pkcs11:token={token.label};id=%01;type=private?module-path={token.module}"
    # By label alone pkcs11-tool takes the first token, which has no such key.
    assert_failure(signer(["--uri", base], b"m", env=token.env, cwd=token.home),
                   "KEY_NOT_FOUND", 69)
    with_serial = base.replace(";id=", f";serial={target['serial']};id=")
    result = signer(["--uri", with_serial], b"m", env=token.env, cwd=token.home)
    assert result.returncode == 0, result.stderr
    verify(public, b"m", gateway_decode(result.stdout))
    # Model, manufacturer and the module's own information narrow alike; a mismatch refuses.
    full = with_serial.replace("pkcs11:", "pkcs11:model=SoftHSM%20v2;manufacturer=SoftHSM%20"
                               "project;library-manufacturer=SoftHSM;library-version=2.6;")
    result = signer(["--uri", full], b"m", env=token.env, cwd=token.home)
    assert result.returncode == 0, result.stderr
    for wrong, words in ((base.replace(";id=", ";serial=0000;id="), "no token has"),
                         (with_serial.replace(";id=", ";library-version=9.9;id="),
                          "not the URI's library-version=9.9"),
                         (base.replace(";id=", ";model=SoftHSM%20v2;id="), "2 tokens have")):
        result = signer(["--uri", wrong], b"m", env=token.env, cwd=token.home)
        assert_failure(result, "TOKEN_NOT_FOUND", 69)
        assert words in result.stderr.decode()


def test_both_implementations_refuse_a_uri_alike_on_a_token(token):
    token.keygen("01", "lap key")
    lines = set()
    for make in IMPLEMENTATIONS.values():
        result = make()(["--uri", f"pkcs11:id=%01;serial=x?module-path={token.module}",
                         "--token-label", token.label], b"m", env=token.env, cwd=token.home)
        assert_failure(result, "TOKEN_NOT_FOUND", 69)
        lines.add(result.stderr)
    assert len(lines) == 1


@pytest.mark.parametrize("origin", ["generated", "imported"])
def test_keys_lists_every_ed25519_key_with_a_uri_that_signs(token, origin):
    if origin == "generated":
        public = token.keygen("a1b2", "gateway key")
    else:
        public = token.import_seed(SEED, "a1b2", "gateway key")
    other = token.keygen("02", "second")
    result = run(token, "keys", "--module", token.module, "--token-label", token.label, "--json")
    assert result.returncode == 0, result.stderr
    listed = json.loads(result.stdout)
    assert listed["token"]["label"] == token.label and listed["token"]["serial"]
    assert uri.options(listed["token"]["uri"])["token_serial"] == listed["token"]["serial"]
    by_id = {key["id"]: key for key in listed["keys"]}
    assert set(by_id) == {"a1b2", "02"}
    key = by_id["a1b2"]
    assert key["label"] == "gateway key" and key["public_key_hex"] == public.hex()
    assert by_id["02"]["public_key_hex"] == other.hex()
    assert key["uri"] == f"pkcs11:token={token.label};id=%A1%B2;object=gateway%20key;type=private"
    assert key["sensitive"] is True and key["extractable"] is False
    assert key["never_extractable"] is (origin == "generated")
    # The URI is the key's name everywhere: pubkey prints it, and both signers sign by it.
    pubkey = run(token, "pubkey", "--module", token.module, "--token-label", token.label,
                 "--key-id", "a1b2", "--format", "uri")
    assert pubkey.stdout.decode() == key["uri"] + "\n"
    for make in IMPLEMENTATIONS.values():
        signed = make()(["--uri", key["uri"], "--module", token.module], b"m", env=token.env,
                        cwd=token.home)
        verify(public, b"m", gateway_decode(signed.stdout))
    text = run(token, "keys", "--module", token.module).stdout.decode()
    assert f"token {token.label!r}" in text and "2 Ed25519 keys" in text
    assert key["uri"] in text and public.hex() in text
    (block,) = [part for part in text.split("\n\n") if part.startswith("id a1b2 ")]
    assert ("generated on the token" in block) is (origin == "generated")
    assert USER_PIN not in text


def test_keys_uris_agree_with_the_ones_opensc_prints(token):
    """Where pkcs11-tool prints uri: lines (OpenSC 0.26+), they name the same key."""
    token.keygen("01", "lap key")
    token.import_seed(SEED, "0203", "imported, with a comma")
    listed = json.loads(run(token, "keys", "--module", token.module, "--json").stdout)
    printed = {obj.id: obj.uri for obj in pkcs11_tool.parse_objects(
        token.tool("--list-objects", "--type", "privkey").stdout.decode())}
    for key in listed["keys"]:
        ours = uri.options(key["uri"])
        assert P11KIT.read(key["uri"])[1] == bytes.fromhex(key["id"])
        if printed[key["id"]] is None:
            continue  # OpenSC before 0.26
        theirs = uri.options(printed[key["id"]])
        if theirs["key_id"] != ours["key_id"]:
            # OpenSC 0.26 writes id=%0203 for 02 03 (test_the_uris_opensc_prints_...).
            assert f"id=%{key['id']};" in printed[key["id"]] and len(key["id"]) > 2
            theirs["key_id"] = ours["key_id"]
        assert {k: theirs[k] for k in ours} == ours


def test_keys_needs_the_pin_and_says_so(token):
    token.keygen()
    env = {k: v for k, v in token.env.items() if k != "PKCS11_PIN"}
    result = run(token, "keys", "--module", token.module, env=env)
    assert result.returncode == 77 and result.stdout == b""
    assert result.stderr.decode().startswith("lap-pkcs11: PIN_MISSING: ")


def test_doctor_and_config_show_the_uri(token):
    token.keygen("01", "lap key")
    args = ["--uri", f"pkcs11:token={token.label};object=lap%20key?module-path={token.module}"]
    report = json.loads(run(token, "doctor", *args, "--json").stdout)
    assert report["ok"], report
    assert report["key_uri"] == f"pkcs11:token={token.label};id=%01;object=lap%20key;type=private"
    human = run(token, "doctor", *args).stdout.decode()
    assert f"key URI: {report['key_uri']}" in human
    shown = json.loads(run(token, "config", *args, "--json").stdout)
    assert shown["options"]["key_label"] == {"value": "lap key", "source": "uri:flag"}
    assert shown["options"]["uri"]["source"] == "flag"
    assert shown["uri"] == (f"pkcs11:token={token.label};object=lap%20key;type=private"
                            f"?module-path={token.module}")
    assert uri.options(shown["uri"]) == uri.options(args[1])
    text = run(token, "config", *args).stdout.decode()
    assert [line.split() for line in text.splitlines() if line.startswith("as uri ")] == [
        ["as", "uri", shown["uri"]]]


def test_keygen_takes_its_id_and_label_from_a_uri(token):
    text = f"pkcs11:token={token.label};id=%0A;object=from%20uri?module-path={token.module}"
    result = run(token, "keygen", "--uri", text)
    assert result.returncode == 0, result.stderr
    assert bytes.fromhex(result.stdout.decode().strip()) == token.public_key("0a")


def test_pubkey_gateway_env_keeps_the_uri(token):
    """A configuration given as a URI reaches the gateway's command as that URI."""
    public = token.keygen("01", "lap key")
    text = f"pkcs11:token={token.label};id=%01?module-path={token.module}"
    out = run(token, "pubkey", "--uri", text, "--format", "keyset", "--kid", "k").stdout
    entry = json.loads(out)["keys"]["k"]

    words = shlex.split(entry["signing_cmd"])
    assert words[words.index("--uri") + 1] == text and "--module" not in words
    signed = subprocess.run(words, input=base64.b64encode(b"m") + b"\n", env=token.env,
                            capture_output=True, timeout=20)
    verify(public, b"m", gateway_decode(signed.stdout))


def test_the_agent_honours_the_uris_serial_and_object(two_tokens, tmp_path):
    """The agent selects by sign's own rule (choose_token) through PyKCS11."""
    from test_agent import Agent, client

    token, target, public = two_tokens
    text = (f"pkcs11:token={token.label};serial={target['serial']};id=%01;object=lap%20key"
            f"?module-path={token.module}")
    unset = {"LAP_PKCS11_MODULE": None, "LAP_PKCS11_TOKEN_LABEL": None,
             "LAP_PKCS11_KEY_ID": None}
    agent = Agent(token, tmp_path, args=["--uri", text], env=unset)
    try:
        message = b"\x00token\x00" * 80
        result = client(agent.path, base64.b64encode(message) + b"\n")
        assert result.returncode == 0, result.stderr
        verify(public, message, gateway_decode(result.stdout))
    finally:
        agent.stop()
    wrong = Agent(token, tmp_path, args=["--uri", text.replace("lap%20key", "other")],
                  env=unset, wait=False, name="wrong")
    try:
        assert wrong.proc.wait(timeout=30) == 69
        assert "KEY_NOT_FOUND" in wrong.text()
    finally:
        wrong.close()
