"""Every error name of the sign contract: exit code, one stderr line, empty stdout, no PIN.

Real token and real pkcs11-tool wherever a real token can produce the failure;
the FAKE pkcs11-tool (tests/fakes/fake-pkcs11-tool) only for a hang, a crash,
garbage output and a locked PIN, which SoftHSM2 cannot produce on demand.
"""

import os
import subprocess
import time

import pytest

from conftest import FAKE_TOOL, USER_PIN, assert_failure

MESSAGE = b"\x00\x01lap capability token\x00"


def alive(pid):
    """Whether ``pid`` still runs (a zombie waiting for its reaper does not)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def fake(token, mode, record=None):
    env = dict(token.env, FAKE_MODE=mode)
    if record is not None:
        env["FAKE_RECORD"] = str(record)
    return env, [*token.args(), "--pkcs11-tool", str(FAKE_TOOL)]


@pytest.mark.parametrize("args", [
    [],                                                       # no module
    ["--key-id", "01"],                                       # still no module
    ["--module", "M"],                                        # no key
    ["--module", "M", "--uri", "pkcs11:id=%01;type=public"],  # not a private key
    ["--module", "M", "--key-id", "02", "--uri", "pkcs11:id=%01"],  # URI and flag differ
    ["--module", "M", "--key-id", "01", "--slot", "1", "--token-label", "t"],
    ["--module", "M", "--key-id", "0g"],
    ["--module", "M", "--key-id", "012"],
    ["--module", "M", "--key-id", "01", "--slot-index", "-1"],
    ["--module", "M", "--key-id", "01", "--input", "hex"],
    ["--module", "M", "--key-id", "01", "--output", "pem"],
    ["--module", "M", "--key-id", "01", "--timeout-ms", "0"],
    ["--module", "M", "--key-id", "01", "--timeout-ms", "soon"],
    ["--module", "M", "--key-id", "01", "--pin-env", "1BAD"],
    ["--module", "M", "--key-id", "01", "--expect-public-key", "abcd"],
    ["--module", "M", "--key-id", "01", "--no-such-flag"],
    ["--module", "M", "--key-id", "01", "stray"],
    ["--module", "M", "--key-id", "01", "--key-id", "02"],
    ["--module"],
], ids=lambda a: " ".join(a) or "nothing")
def test_bad_options_are_config_invalid(signer, keyed, args):
    token, _ = keyed
    args = [token.module if a == "M" else a for a in args]
    assert_failure(signer(args, MESSAGE, env=token.env, cwd=token.home), "CONFIG_INVALID", 64)


def test_bad_environment_value_is_config_invalid(signer, keyed):
    token, _ = keyed
    env = dict(token.env, LAP_PKCS11_TIMEOUT_MS="-5")
    result = signer(token.args(), MESSAGE, env=env, cwd=token.home)
    assert_failure(result, "CONFIG_INVALID", 64)
    assert b"LAP_PKCS11_TIMEOUT_MS" in result.stderr


@pytest.mark.parametrize("content", ["LAP_PKCS11_KEY_ID 01\n", "LAP_PKCS11_KEY_ID='01\n",
                                     "KEY=${HOME}/x\n", "1KEY=1\n"])
def test_malformed_env_file_is_config_invalid(signer, keyed, content):
    token, _ = keyed
    env_file = token.home / "bad.env"
    env_file.write_text(content)
    result = signer([*token.args(), "--env-file", str(env_file)], MESSAGE, env=token.env,
                    cwd=token.home)
    assert_failure(result, "CONFIG_INVALID", 64)


def test_missing_env_file_is_config_invalid(signer, keyed):
    token, _ = keyed
    result = signer([*token.args(), "--env-file", str(token.home / "absent.env")], MESSAGE,
                    env=token.env, cwd=token.home)
    assert_failure(result, "CONFIG_INVALID", 64)


def test_unreadable_pin_file_is_config_invalid(signer, keyed):
    token, _ = keyed
    env = {k: v for k, v in token.env.items() if k != "PKCS11_PIN"}
    result = signer([*token.args(), "--pin-file", str(token.home / "absent")], MESSAGE, env=env,
                    cwd=token.home)
    assert_failure(result, "CONFIG_INVALID", 64)


def test_pin_given_twice_is_config_invalid(signer, keyed):
    token, _ = keyed
    pin_file = token.home / "pin"
    pin_file.write_text(USER_PIN)
    result = signer([*token.args(), "--pin-file", str(pin_file)], MESSAGE, env=token.env,
                    cwd=token.home)
    assert_failure(result, "CONFIG_INVALID", 64)


def test_caller_deadline_too_short_is_config_invalid(signer, keyed):
    token, _ = keyed
    env = dict(token.env, SIGNER_TIMEOUT_SECONDS="0.2")
    assert_failure(signer(token.args(), MESSAGE, env=env, cwd=token.home), "CONFIG_INVALID", 64)


def test_missing_pkcs11_tool_is_tool_not_found(signer, keyed):
    token, _ = keyed
    for tool in ("/nonexistent/pkcs11-tool", "no-such-pkcs11-tool"):
        result = signer([*token.args(), "--pkcs11-tool", tool], MESSAGE, env=token.env,
                        cwd=token.home)
        assert_failure(result, "TOOL_NOT_FOUND", 69)


@pytest.mark.parametrize("content", [b"#!/nonexistent/interpreter\n", b"not a program\n"],
                         ids=["missing-interpreter", "not-a-program"])
def test_a_pkcs11_tool_that_cannot_be_started_is_tool_not_found(signer, keyed, content):
    """An executable file that execve refuses (ENOENT for its interpreter, ENOEXEC): before
    the watchdog, Python's spawn error was an internal error."""
    token, _ = keyed
    tool = token.home / "broken-pkcs11-tool"
    tool.write_bytes(content)
    tool.chmod(0o755)
    result = signer([*token.args(), "--pkcs11-tool", str(tool)], MESSAGE, env=token.env,
                    cwd=token.home)
    assert_failure(result, "TOOL_NOT_FOUND", 69)


@pytest.mark.parametrize("module", ["/nonexistent/libpkcs11.so", "/bin/true"])
def test_unloadable_module_is_module_load_failed(signer, keyed, module):
    token, _ = keyed
    args = ["--module", module, "--token-label", token.label, "--key-id", "01"]
    assert_failure(signer(args, MESSAGE, env=token.env, cwd=token.home),
                   "MODULE_LOAD_FAILED", 69)


def test_broken_module_configuration_is_module_load_failed(signer, keyed):
    token, _ = keyed
    env = dict(token.env, SOFTHSM2_CONF=str(token.home / "absent.conf"))
    assert_failure(signer(token.args(), MESSAGE, env=env, cwd=token.home),
                   "MODULE_LOAD_FAILED", 69)


@pytest.mark.parametrize("selector", [["--token-label", "no-such-token"], ["--slot", "4242"],
                                      ["--slot-index", "7"]])
def test_missing_token_is_token_not_found(signer, keyed, selector):
    token, _ = keyed
    args = ["--module", token.module, *selector, "--key-id", "01"]
    assert_failure(signer(args, MESSAGE, env=token.env, cwd=token.home), "TOKEN_NOT_FOUND", 69)


def test_missing_key_is_key_not_found(signer, keyed):
    token, _ = keyed
    assert_failure(signer(token.args("99"), MESSAGE, env=token.env, cwd=token.home),
                   "KEY_NOT_FOUND", 69)


@pytest.mark.parametrize("mechanism", ["ECDSA", "ECDSA-SHA256", "RSA-PKCS", "NO-SUCH-MECH"])
def test_mechanism_the_key_cannot_do_is_unsupported(signer, keyed, mechanism):
    token, _ = keyed
    result = signer([*token.args(), "--mechanism", mechanism], MESSAGE, env=token.env,
                    cwd=token.home)
    assert_failure(result, "MECHANISM_UNSUPPORTED", 69)


def test_missing_pin_is_pin_missing(signer, keyed):
    token, _ = keyed
    env = {k: v for k, v in token.env.items() if k != "PKCS11_PIN"}
    assert_failure(signer(token.args(), MESSAGE, env=env, cwd=token.home), "PIN_MISSING", 77)
    env["PKCS11_PIN"] = ""
    assert_failure(signer(token.args(), MESSAGE, env=env, cwd=token.home), "PIN_MISSING", 77)
    pin_file = token.home / "pin"
    pin_file.write_text("\n")
    pin_file.chmod(0o600)
    del env["PKCS11_PIN"]
    assert_failure(signer([*token.args(), "--pin-file", str(pin_file)], MESSAGE, env=env,
                          cwd=token.home), "PIN_MISSING", 77)


def test_wrong_pin_is_pin_incorrect(signer, keyed):
    token, _ = keyed
    env = dict(token.env, PKCS11_PIN="000000")
    assert_failure(signer(token.args(), MESSAGE, env=env, cwd=token.home), "PIN_INCORRECT", 77,
                   pin="000000")


def test_locked_pin_is_pin_locked(signer, keyed):
    """FAKE tool: SoftHSM2 never locks a PIN."""
    token, _ = keyed
    env, args = fake(token, "pin-locked")
    assert_failure(signer(args, MESSAGE, env=env, cwd=token.home), "PIN_LOCKED", 77)


@pytest.mark.parametrize("mode", ["garbage", "short", "crash", "unknown-failure"])
def test_bad_tool_result_is_signing_failed(signer, keyed, mode):
    """FAKE tool: garbage, a short signature, a crash, an unknown CKR_ error."""
    token, _ = keyed
    env, args = fake(token, mode)
    assert_failure(signer(args, MESSAGE, env=env, cwd=token.home), "SIGNING_FAILED", 70)


def test_hung_tool_is_timeout_and_its_whole_tree_dies(signer, keyed):
    """FAKE tool: a hang, with a grandchild in its process group."""
    token, _ = keyed
    record = token.home / "record"
    env, args = fake(token, "hang", record)
    result = signer([*args, "--timeout-ms", "700"], MESSAGE, env=env, cwd=token.home)
    assert_failure(result, "TIMEOUT", 75)
    pids = [int(line.split("=")[1]) for line in record.read_text().splitlines()
            if line.startswith(("pid=", "child="))]
    assert len(pids) == 2
    for pid in pids:
        assert not alive(pid), f"process {pid} outlived the signer"


def test_timeout_falls_before_the_gateway_kills_us(signer, keyed):
    """The gateway kills at SIGNER_TIMEOUT_SECONDS; the signer must answer TIMEOUT first."""
    token, _ = keyed
    env, args = fake(token, "hang")
    env["SIGNER_TIMEOUT_SECONDS"] = "1.2"
    # A gateway-style call: subprocess.run(timeout=...) raises if we are still running.
    result = signer([*args, "--timeout-ms", "60000"], MESSAGE, env=env, cwd=token.home,
                    timeout=1.2)
    assert_failure(result, "TIMEOUT", 75)


@pytest.mark.parametrize("marker", [("SIGNER_MODE", "external"), ("SIGNER_MODE", " External "),
                                    ("SIGNER_MODE", "CMD"), ("SIGNER_MODE", "command\n"),
                                    ("LAP_GATEWAY_SIGNING_CMD", "lap-pkcs11 sign"),
                                    ("LAP_GATEWAY_KEYSET_JSON", "{}")])
def test_gateway_without_input_base64_is_config_invalid(signer, keyed, marker):
    """Signing the gateway's base64 text as raw bytes would pass every check but the audit."""
    token, public = keyed
    env = dict(token.env, **{marker[0]: marker[1]})
    stdin = b"aGVsbG8=\n"
    assert_failure(signer(token.args(), stdin, env=env, cwd=token.home), "CONFIG_INVALID", 64)
    explicit = signer([*token.args(), "--input", "raw"], stdin, env=env, cwd=token.home)
    assert explicit.returncode == 0, explicit.stderr


@pytest.mark.parametrize("mode", ["file", "software", "inproc", "externally", ""])
def test_modes_that_do_not_run_an_external_signer_need_no_input_flag(signer, keyed, mode):
    """The gateway runs SIGNER_CMD only for external, cmd and command (any case, trimmed)."""
    token, public = keyed
    env = dict(token.env, SIGNER_MODE=mode)
    result = signer(token.args(), MESSAGE, env=env, cwd=token.home)
    assert result.returncode == 0, result.stderr


def test_gateway_signing_cmd_timeout_caps_the_deadline(signer, keyed):
    """LAP_GATEWAY_SIGNING_CMD_TIMEOUT_SECONDS is the gateway's deadline in that configuration."""
    token, _ = keyed
    env, args = fake(token, "hang")
    env["LAP_GATEWAY_SIGNING_CMD_TIMEOUT_SECONDS"] = "1.2"
    result = signer([*args, "--timeout-ms", "60000", "--input", "raw"], MESSAGE, env=env,
                    cwd=token.home, timeout=1.2)
    assert_failure(result, "TIMEOUT", 75)
    env["LAP_GATEWAY_SIGNING_CMD_TIMEOUT_SECONDS"] = "0.2"
    result = signer([*args, "--input", "raw"], MESSAGE, env=env, cwd=token.home)
    assert_failure(result, "CONFIG_INVALID", 64)
    assert b"LAP_GATEWAY_SIGNING_CMD_TIMEOUT_SECONDS" in result.stderr


@pytest.mark.parametrize("how", ["--key-id", "--key-label"])
def test_uninitialised_slot_is_token_not_found(signer, keyed, how):
    """SoftHSM2 always offers one slot without a token; signing there is not SIGNING_FAILED."""
    token, _ = keyed
    key = ["--key-id", "01"] if how == "--key-id" else ["--key-label", "lap-key"]
    args = ["--module", token.module, "--slot-index", "1", *key]
    assert_failure(signer(args, MESSAGE, env=token.env, cwd=token.home), "TOKEN_NOT_FOUND", 69)


@pytest.mark.parametrize("key_type, key_id", [("rsa:1024", "05"), ("EC:prime256v1", "06")])
def test_a_key_that_is_not_ed25519_is_mechanism_unsupported(signer, token, key_type, key_id):
    """0.26+ check the key before EdDSA signing; 0.23 fails in the token. Same name for both."""
    token.tool("--keypairgen", "--key-type", key_type, "--id", key_id, "--label", key_type)
    assert_failure(signer(token.args(key_id), MESSAGE, env=token.env, cwd=token.home),
                   "MECHANISM_UNSUPPORTED", 69)


def test_help_goes_to_stdout_and_names_every_flag(signer):
    result = signer(["--help"])
    assert result.returncode == 0
    for flag in ("--module", "--key-id", "--input", "--expect-public-key", "--pin-file"):
        assert flag.encode() in result.stdout


def test_busy_token_lock_is_timeout(signer, keyed):
    """Another holder keeps the token's lock past the deadline."""
    token, _ = keyed
    lock_dir = token.home / "locks"
    lock_dir.mkdir()
    args = [*token.args(), "--lock-dir", str(lock_dir), "--timeout-ms", "400"]
    assert signer(args, MESSAGE, env=token.env, cwd=token.home).returncode == 0
    (lock,) = lock_dir.iterdir()
    holder = subprocess.Popen(["flock", str(lock), "sleep", "30"])
    try:
        time.sleep(0.2)
        assert_failure(signer(args, MESSAGE, env=token.env, cwd=token.home), "TIMEOUT", 75)
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize("how", ["symlink", "foreign owner"])
def test_unsafe_lock_file_is_config_invalid(signer, keyed, how):
    token, _ = keyed
    lock_dir = token.home / "locks"
    lock_dir.mkdir()
    args = [*token.args(), "--lock-dir", str(lock_dir)]
    assert signer(args, MESSAGE, env=token.env, cwd=token.home).returncode == 0
    (lock,) = lock_dir.iterdir()
    if how == "symlink":
        lock.unlink()
        lock.symlink_to(token.home / "elsewhere")
    else:
        if os.geteuid() != 0:
            pytest.skip("giving a file to another user needs root (test_hardening plants "
                        "foreign files for an ordinary user in a user namespace)")
        os.chown(lock, 65534, 65534)
    assert_failure(signer(args, MESSAGE, env=token.env, cwd=token.home), "CONFIG_INVALID", 64)
    assert not (token.home / "elsewhere").exists()


def test_missing_lock_directory_is_config_invalid(signer, keyed):
    token, _ = keyed
    args = [*token.args(), "--lock-dir", str(token.home / "no-such-dir")]
    assert_failure(signer(args, MESSAGE, env=token.env, cwd=token.home), "CONFIG_INVALID", 64)


@pytest.mark.parametrize("encoding", ["raw", "base64"])
def test_unreadable_stdin_is_input_invalid(signer, keyed, encoding):
    token, _ = keyed
    fd = os.open(token.home / "sink", os.O_WRONLY | os.O_CREAT)  # read() fails: EBADF
    try:
        result = signer([*token.args(), "--input", encoding], None, env=token.env,
                        cwd=token.home, stdin=fd)
    finally:
        os.close(fd)
    assert_failure(result, "INPUT_INVALID", 65)
