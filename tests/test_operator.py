"""Operator commands and scripts against real SoftHSM2 tokens: pubkey, keygen, doctor,
config, dev-softhsm.sh and smoke.sh."""

import base64
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from conftest import FAKE_TOOL, ROOT, TEST_TOOL, USER_PIN, gateway_decode, tool_program, verify
from lap_pkcs11.per_signature import envfile

LAP = str(Path(sys.executable).parent / "lap-pkcs11")
SEED = bytes(range(32))


def lap(token, *args, env=None):
    return subprocess.run([LAP, *args], env=env or token.env, cwd=token.home,
                          capture_output=True, timeout=120)


def assert_error(result, name, code):
    assert result.returncode == code, result.stderr
    assert result.stdout == b""
    assert result.stderr.decode().startswith(f"lap-pkcs11: {name}: ")
    assert USER_PIN not in result.stderr.decode()


@pytest.fixture(params=["generated", "imported"])
def any_key(request, token):
    """A key of each EC_POINT encoding: DER-wrapped (keypairgen) and raw (import)."""
    if request.param == "generated":
        return token, token.keygen("01", "lap-key")
    return token, token.import_seed(SEED, "01", "lap-key")


def test_pubkey_hex_base64_jwk(any_key):
    token, public = any_key
    assert lap(token, "pubkey", *token.args()).stdout == public.hex().encode() + b"\n"
    out = lap(token, "pubkey", *token.args(), "--format", "base64").stdout
    assert out.endswith(b"\n") and base64.b64decode(out.strip(), validate=True) == public
    jwk = json.loads(lap(token, "pubkey", *token.args(), "--format", "jwk").stdout)
    assert jwk["kty"] == "OKP" and jwk["crv"] == "Ed25519"
    assert base64.urlsafe_b64decode(jwk["x"] + "=") == public


def test_pubkey_by_label_needs_no_pin(any_key):
    token, public = any_key
    env = {k: v for k, v in token.env.items() if k != "PKCS11_PIN"}
    args = ["--module", token.module, "--token-label", token.label, "--key-label", "lap-key"]
    result = lap(token, "pubkey", *args, env=env)
    assert result.stdout == public.hex().encode() + b"\n", result.stderr


def test_pubkey_pem_verifies_with_openssl(any_key, tmp_path):
    token, public = any_key
    pem = lap(token, "pubkey", *token.args(), "--format", "pem").stdout
    key = serialization.load_pem_public_key(pem)
    assert key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw) == public
    message = os.urandom(300)
    signature = gateway_decode(subprocess.run([LAP, "sign", *token.args()], input=message,
                                              env=token.env, cwd=token.home,
                                              capture_output=True).stdout)
    (tmp_path / "key.pem").write_bytes(pem)
    (tmp_path / "message").write_bytes(message)
    (tmp_path / "signature").write_bytes(signature)
    subprocess.run(["openssl", "pkeyutl", "-verify", "-pubin", "-inkey", tmp_path / "key.pem",
                    "-rawin", "-in", tmp_path / "message", "-sigfile", tmp_path / "signature"],
                   check=True, capture_output=True)


def test_trusted_keys_registry(any_key):
    """The wrapped registry: the shape the gateway's schema accepts for trusted_keys.json
    (tests/test_gateway_e2e.py checks it with the gateway's own schema and verifier)."""
    token, public = any_key
    registry = json.loads(lap(token, "pubkey", *token.args(), "--format", "trusted-keys",
                              "--kid", "gw-2026").stdout)
    assert registry == {"version": 1,
                        "keys": {"gw-2026": {"public_key_hex": public.hex(), "status": "active"}}}


def test_keyset_signing_cmd_works_as_the_gateway_runs_it(any_key):
    token, public = any_key
    keyset = json.loads(lap(token, "pubkey", *token.args(), "--format", "keyset",
                            "--kid", "gw.1").stdout)
    assert keyset["active_kid"] == "gw.1"
    entry = keyset["keys"]["gw.1"]
    assert entry["public_key_hex"] == public.hex()
    assert entry["timeout_seconds"] == 2.0
    # The signer cannot see timeout_seconds: the command carries the matching deadline.
    assert "--timeout-ms 1500" in entry["signing_cmd"]
    assert USER_PIN not in entry["signing_cmd"]
    message = b"\x00receipt\x00" * 50
    # The gateway: shlex.split, no shell, base64 + newline on stdin, its whole environment.
    result = subprocess.run(shlex.split(entry["signing_cmd"]),
                            input=base64.b64encode(message) + b"\n", env=token.env,
                            capture_output=True, timeout=entry["timeout_seconds"] * 10)
    assert result.returncode == 0, result.stderr
    verify(bytes.fromhex(entry["public_key_hex"]), message, gateway_decode(result.stdout))


def signer_env_file(token, extra=""):
    """The signer's settings in an env file, as the README's /etc/lap-pkcs11/signer.env."""
    path = token.home / "signer.env"
    path.write_text(f"SOFTHSM2_CONF={token.conf}\nLAP_PKCS11_MODULE={token.module}\n"
                    f"LAP_PKCS11_TOKEN_LABEL={token.label}\nLAP_PKCS11_KEY_ID=01\n{extra}")
    return path


def test_keyset_deadline_follows_the_configured_timeout(keyed):
    token, public = keyed
    env_file = signer_env_file(token, "LAP_PKCS11_TIMEOUT_MS=3000\n")
    keyset = json.loads(lap(token, "pubkey", "--env-file", str(env_file), "--format", "keyset",
                            "--kid", "k").stdout)
    entry = keyset["keys"]["k"]
    assert entry["timeout_seconds"] == 3.5
    words = shlex.split(entry["signing_cmd"])
    assert words[words.index("--timeout-ms") + 1] == "3000"
    # Settings from the env file stay in it; the command names the file.
    assert "--module" not in words and words[words.index("--env-file") + 1] == str(env_file)


def gateway_env(text):
    """The lines as systemd's EnvironmentFile= would load them (sh reads them alike)."""
    values = envfile.parse(text)
    shell = subprocess.run(["bash", "-c", 'set -a; . /dev/stdin; for n in "$@"; do '
                            'printf "%s=%s\\0" "$n" "${!n}"; done', "_", *values],
                           input=text.encode(), capture_output=True, check=True).stdout
    assert dict(item.split("=", 1) for item in shell.decode().split("\0")[:-1]) == values
    return values


@pytest.mark.parametrize("kid", [None, "gw-1"])
def test_gateway_env_is_a_complete_hard_key_configuration(keyed, kid):
    token, public = keyed
    env_file = signer_env_file(token)
    args = ["pubkey", "--env-file", str(env_file), "--format", "gateway-env"]
    result = lap(token, *args, *(["--kid", kid] if kid else []))
    assert result.returncode == 0, result.stderr
    values = gateway_env(result.stdout.decode())
    assert list(values) == ["LAP_GATEWAY_SIGNING_CMD", "LAP_GATEWAY_PUBLIC_KEY_HEX",
                            "LAP_GATEWAY_SIGNING_KEY_ID", "LAP_GATEWAY_SIGNING_CMD_TIMEOUT_SECONDS"]
    assert values["LAP_GATEWAY_PUBLIC_KEY_HEX"] == public.hex()
    assert values["LAP_GATEWAY_SIGNING_KEY_ID"] == (kid or "gateway")
    assert values["LAP_GATEWAY_SIGNING_CMD_TIMEOUT_SECONDS"] == "2.0"
    words = shlex.split(values["LAP_GATEWAY_SIGNING_CMD"])
    assert words[1:4] == ["sign", "--input", "base64"] and "--timeout-ms" not in words
    assert words[words.index("--expect-public-key") + 1] == public.hex()
    assert USER_PIN not in result.stdout.decode()
    # The gateway: shlex.split, no shell, base64 + newline, its whole environment.
    env = {**{k: v for k, v in token.env.items() if k != "SOFTHSM2_CONF"}, **values}
    message = b"\x00token\x00" * 60
    signed = subprocess.run(words, input=base64.b64encode(message) + b"\n", env=env,
                            capture_output=True, timeout=2.0 * 10)
    assert signed.returncode == 0, signed.stderr
    verify(public, message, gateway_decode(signed.stdout))


def test_gateway_env_refuses_what_environment_files_read_differently(keyed):
    token, _ = keyed
    odd = token.home / "a$b"
    odd.mkdir()
    env_file = signer_env_file(token)
    (odd / "signer.env").write_text(env_file.read_text())
    result = lap(token, "pubkey", "--env-file", str(odd / "signer.env"), "--format",
                 "gateway-env")
    assert_error(result, "CONFIG_INVALID", 64)


@pytest.mark.parametrize("args, name, code", [
    (["--format", "keyset"], "CONFIG_INVALID", 64),
    (["--format", "gateway-env", "--kid", "no spaces"], "CONFIG_INVALID", 64),
    (["--format", "trusted-keys", "--kid", "bad kid!"], "CONFIG_INVALID", 64),
    (["--format", "der"], "CONFIG_INVALID", 64),
])
def test_pubkey_option_errors(keyed, args, name, code):
    token, _ = keyed
    assert_error(lap(token, "pubkey", *token.args(), *args), name, code)


def test_pubkey_missing_key(keyed):
    token, _ = keyed
    assert_error(lap(token, "pubkey", *token.args("77")), "KEY_NOT_FOUND", 69)


def listing(token):
    return token.tool("--list-objects").stdout.decode()


def test_keygen_makes_a_non_extractable_key_that_signs(token):
    args = ["--module", token.module, "--token-label", token.label]
    result = lap(token, "keygen", *args, "--key-id", "a1", "--key-label", "gateway")
    assert result.returncode == 0, result.stderr
    public = bytes.fromhex(result.stdout.decode().strip())
    assert public == token.public_key("a1")
    block = listing(token).split("Private Key Object")[1]
    access = block.split("Access:")[1].splitlines()[0]
    assert "never extractable" in access and "sensitive" in access
    assert ", extractable" not in access
    signed = subprocess.run([LAP, "sign", *args, "--key-label", "gateway"], input=b"m",
                            env=token.env, cwd=token.home, capture_output=True)
    verify(public, b"m", gateway_decode(signed.stdout))


@pytest.mark.parametrize("key_id, label", [("01", "other"), ("02", "lap-key")])
def test_keygen_refuses_a_taken_id_or_label_and_changes_nothing(keyed, key_id, label):
    token, _ = keyed
    before = listing(token)
    result = lap(token, "keygen", "--module", token.module, "--token-label", token.label,
                 "--key-id", key_id, "--key-label", label)
    assert_error(result, "KEY_EXISTS", 73)
    assert listing(token) == before


@pytest.mark.parametrize("listing", [
    "Private Key Object; EC_EDWARDS\n  label:      x\n  ID:         1 (0x02)\n",
    "Private Key Object; EC_EDWARDS\n  label:      x\n  Usage:      sign\n",
    "Private Key Object; EC_EDWARDS\n  Key label:  lap-key\n  ID:         07\n",
    "Private key 07 'lap-key'\n",
], ids=["inconsistent id", "no id", "unknown field", "unknown line"])
def test_keygen_fails_closed_on_a_listing_it_cannot_read(token, listing):
    """Nothing is generated unless the listing proves the id and label free."""
    (token.home / "listing").write_text(listing)
    record = token.home / "record"
    env = dict(token.env, FAKE_MODE="listing", FAKE_LISTING=str(token.home / "listing"),
               FAKE_RECORD=str(record))
    result = lap(token, "keygen", "--module", token.module, "--token-label", token.label,
                 "--key-id", "01", "--key-label", "lap-key", "--pkcs11-tool", str(FAKE_TOOL),
                 env=env)
    assert_error(result, "KEY_EXISTS", 73)
    assert "cannot prove" in result.stderr.decode()
    assert "arg=--list-objects" in record.read_text()
    assert "--keypairgen" not in record.read_text()


def test_keygen_needs_id_and_label(token):
    result = lap(token, "keygen", "--module", token.module, "--key-id", "01")
    assert_error(result, "CONFIG_INVALID", 64)


def doctor(token, *args, env=None):
    result = lap(token, "doctor", *args, "--json", env=env)
    return result, json.loads(result.stdout)


def statuses(report):
    return [(check["name"], check["status"]) for check in report["checks"]]


def test_doctor_passes_on_a_good_token(keyed):
    token, public = keyed
    result, report = doctor(token, *token.args(), "--expect-public-key", public.hex())
    assert result.returncode == 0, report
    assert report["ok"] is True
    assert [status for _, status in statuses(report)] == ["pass"] * 10
    assert report["signing_latency_ms"] > 0
    human = lap(token, "doctor", *token.args())
    assert human.returncode == 0 and b"PASS  test signature verifies" in human.stdout


def test_doctor_reports_the_configured_tools_version(keyed):
    """The version of the pkcs11-tool in use (from the opensc-tool beside it), not PATH's."""
    token, _ = keyed
    tool = Path(tool_program()).resolve()
    version = subprocess.run([tool.parent / "opensc-tool", "--info"], capture_output=True,
                             text=True, check=True).stdout.split("[")[0].strip()
    _, report = doctor(token, *token.args(), "--pkcs11-tool", str(tool))
    assert report["checks"][0]["detail"] == f"{tool} ({version})"
    _, report = doctor(token, *token.args(), "--pkcs11-tool", str(FAKE_TOOL),
                       env=dict(token.env, FAKE_MODE="passthrough"))
    assert report["checks"][0]["detail"].endswith("(version unknown: no opensc-tool beside it)")


@pytest.mark.parametrize("case, failing, code", [
    ("wrong pin", "PIN accepted", 77),
    ("missing key", "private key found", 69),
    ("missing token", "token present", 69),
    ("wrong expected key", "public key is the expected one", 70),
    ("no module", "module loads", 69),
    ("bad option", "configuration valid", 64),
])
def test_doctor_fails_at_the_right_step_with_a_fix(keyed, case, failing, code):
    token, _ = keyed
    env, args = dict(token.env), list(token.args())
    if case == "wrong pin":
        env["PKCS11_PIN"] = "000000"
    elif case == "missing key":
        args = token.args("99")
    elif case == "missing token":
        args = ["--module", token.module, "--token-label", "absent", "--key-id", "01"]
    elif case == "wrong expected key":
        args += ["--expect-public-key", "ab" * 32]
    elif case == "no module":
        args = ["--module", "/nonexistent.so", "--key-id", "01"]
    else:
        args += ["--timeout-ms", "never"]
    result, report = doctor(token, *args, env=env)
    assert result.returncode == code
    last = report["checks"][-1]
    assert (last["name"], last["status"]) == (failing, "fail")
    assert last["fix"]
    assert all(check["status"] == "pass" for check in report["checks"][:-1])
    assert "000000" not in result.stdout.decode() and USER_PIN not in result.stdout.decode()
    if case == "missing token":
        assert repr(token.label) in last["detail"]  # the tokens it does see


@pytest.mark.parametrize("how", ["extractable", "imported"])
def test_doctor_warns_about_a_key_that_can_or_did_leave_the_token(token, how):
    if how == "extractable":
        token.tool("--keypairgen", "--key-type", "EC:edwards25519", "--id", "01", "--label", "x",
                   "--extractable")
    else:
        token.import_seed(SEED, "01", "x")
    result, report = doctor(token, *token.args())
    assert result.returncode == 0, report
    assert ("key is sensitive and never extractable", "warn") in statuses(report)
    human = lap(token, "doctor", *token.args()).stdout.decode()
    assert "WARN  key is sensitive and never extractable" in human and "advice:" in human


def test_config_shows_sources_and_never_the_pin(keyed):
    token, _ = keyed
    env_file = token.home / "signer.env"
    env_file.write_text("LAP_PKCS11_KEY_ID=01\nLAP_PKCS11_OUTPUT=hex\n")
    env = dict(token.env, LAP_PKCS11_MODULE=token.module)
    result = lap(token, "config", "--token-label", token.label, "--env-file", str(env_file),
                 "--json", env=env)
    data = json.loads(result.stdout)
    options = data["options"]
    assert options["token_label"] == {"value": token.label, "source": "flag"}
    assert options["module"] == {"value": token.module, "source": "env:LAP_PKCS11_MODULE"}
    assert options["key_id"] == {"value": "01", "source": "file:LAP_PKCS11_KEY_ID"}
    assert options["mechanism"] == {"value": "EDDSA", "source": "default"}
    assert data["pin"] == {"state": "set", "source": "env:PKCS11_PIN"}
    human = lap(token, "config", "--token-label", token.label, "--env-file", str(env_file),
                env=env).stdout.decode()
    assert "file:LAP_PKCS11_KEY_ID" in human
    assert USER_PIN not in result.stdout.decode() + human


def test_dev_softhsm_then_sign(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LAP_", "PKCS11", "SOFTHSM"))}
    env["XDG_RUNTIME_DIR"] = str(tmp_path)
    env["VENV"] = str(Path(sys.executable).parent.parent)  # the script's lap-pkcs11 is this one
    if TEST_TOOL:
        env["LAP_PKCS11_TOOL"] = tool_program()
    script = ROOT / "scripts" / "dev-softhsm.sh"
    first = subprocess.run(["bash", script, tmp_path / "dev"], env=env, capture_output=True,
                           text=True, check=True)
    assert "lap-pkcs11 sign --env-file" in first.stdout
    signer_env = tmp_path / "dev" / "signer.env"
    pinned = [line.split("=", 1)[1] for line in signer_env.read_text().splitlines()
              if line.startswith("LAP_PKCS11_EXPECT_PUBLIC_KEY=")][0]
    assert oct(signer_env.stat().st_mode & 0o777) == "0o600"
    subprocess.run(["bash", script, tmp_path / "dev"], env=env, capture_output=True, check=True)
    assert pinned in signer_env.read_text()  # a second run keeps the token and the key
    assert (f"LAP_PKCS11_TOOL={tool_program()}" in signer_env.read_text()) == bool(TEST_TOOL)
    message = b"dev message"
    result = subprocess.run([LAP, "sign", "--env-file", signer_env], input=message, env=env,
                            cwd=tmp_path, capture_output=True)
    assert result.returncode == 0, result.stderr
    verify(bytes.fromhex(pinned), message, gateway_decode(result.stdout))


def smoke(token, command, *args, env=None):
    return subprocess.run(["bash", ROOT / "scripts" / "smoke.sh", *args, command],
                          env=env or token.env, cwd=token.home, capture_output=True, text=True,
                          timeout=60)


def test_smoke_passes_through_both_signers(keyed):
    token, public = keyed
    pem = token.home / "key.pem"
    pem.write_bytes(lap(token, "pubkey", *token.args(), "--format", "pem").stdout)
    for signer in (f"{LAP} sign", f"{ROOT / 'scripts' / 'pkcs11_signer.sh'}"):
        command = shlex.join([*shlex.split(signer), "--input", "base64", *token.args()])
        result = smoke(token, command, "--pubkey", str(pem))
        assert result.returncode == 0, result.stdout + result.stderr
        assert result.stdout.startswith("smoke.sh: PASS: ") and " ms" in result.stdout
    env = dict(token.env, LAP_GATEWAY_PUBLIC_KEY_HEX=public.hex(),
               SIGNER_CMD=f"{LAP} sign --input base64 " + shlex.join(token.args()))
    result = subprocess.run(["bash", ROOT / "scripts" / "smoke.sh"], env=env, cwd=token.home,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_smoke_fails_on_the_wrong_key_an_error_and_a_hang(token):
    token.keygen("01", "one")
    other = token.keygen("02", "two")
    other_pem = token.home / "other.pem"
    other_pem.write_bytes(lap(token, "pubkey", *token.args("02"), "--format", "pem").stdout)
    base = f"{LAP} sign --input base64 " + shlex.join(token.args("01"))
    wrong = smoke(token, base, "--pubkey", str(other_pem))
    assert wrong.returncode == 1 and "FAIL: the signature does not verify" in wrong.stdout
    env = dict(token.env, LAP_GATEWAY_PUBLIC_KEY_HEX=other.hex())
    # With the gateway's pinned key inherited, the signer itself refuses first.
    pinned = smoke(token, base, env=env)
    assert pinned.returncode == 1 and "KEY_MISMATCH" in pinned.stdout
    missing = smoke(token, f"{LAP} sign --input base64 " + shlex.join(token.args("99")), env=env)
    assert missing.returncode == 1 and "KEY_NOT_FOUND" in missing.stdout
    hang_env = dict(env, FAKE_MODE="hang", SIGNER_TIMEOUT_SECONDS="1")
    # The signer's own deadline (1 s less its margin) answers before the smoke test kills it.
    hang = smoke(token, base + f" --pkcs11-tool {FAKE_TOOL}", env=hang_env)
    assert hang.returncode == 1 and "TIMEOUT" in hang.stdout
    quoted = smoke(token, "lap-pkcs11 'unclosed", env=env)
    assert quoted.returncode == 64


def test_smoke_splits_like_shlex():
    script = ROOT / "scripts" / "smoke.sh"
    for text in ["a b  c", "a 'b c' \"d e\"", "x\\ y 'it'\"'\"'s' \"q\\\"t\" \"\\a\"", " lead",
                 "''", "a\"\"b"]:
        out = subprocess.run(["bash", "-c", 'source "$1"; split_command "$2"; '
                              'printf "%s\\0" "${WORDS[@]}"', "_", script, text],
                             capture_output=True, check=True).stdout
        words = out.split(b"\0")[:-1] if out else []
        assert [w.decode() for w in words] == shlex.split(text), text


def test_doctor_refuses_a_pin_file_that_is_a_pipe(keyed):
    """A pipe or FIFO as PIN file could hang or be read twice: only regular files."""
    token, _ = keyed
    env = {k: v for k, v in token.env.items() if k != "PKCS11_PIN"}
    result = subprocess.run([LAP, "doctor", *token.args(), "--pin-file", "/dev/stdin", "--json"],
                            input=USER_PIN.encode() + b"\n", env=env, cwd=token.home,
                            capture_output=True, timeout=120)
    assert result.returncode == 64, result.stdout
    report = json.loads(result.stdout)
    assert report["ok"] is False
    assert "not a regular file" in json.dumps(report)


def test_admin_commands_read_a_non_utf8_env_file_as_sign_does(keyed):
    """One reader for every command: bytes that are not UTF-8 pass through alike."""
    token, _ = keyed
    env_file = token.home / "latin1.env"
    env_file.write_bytes(b"LAP_PKCS11_TOKEN_LABEL=caf\xe9\n")
    result = lap(token, "config", "--module", token.module, "--key-id", "01", "--env-file",
                 str(env_file), "--json")
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert b"Traceback" not in result.stderr
    assert "caf" in json.dumps(shown)
