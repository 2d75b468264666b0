"""Edges that a mutation run of the per-signature modules showed no test would catch.

Each test names the bug it stands for: a changed loop bound, a lost flag, an
off-by-one at a limit. Both implementations where the behaviour is the contract.
"""

import base64
import os
import subprocess
import time
import types

import pytest

from conftest import FAKE_TOOL, USER_PIN, assert_failure, gateway_decode, verify
from lap_pkcs11.backends import pkcs11_tool
from lap_pkcs11.per_signature import client_command, config, errors, signer as signing
from test_sign_errors import alive, fake
from test_sign_process import recorded, wait_for

MESSAGE = bytes(range(256)) * 4  # 1024 bytes: the largest message


@pytest.mark.parametrize("encoding", ["raw", "base64"])
def test_stdin_in_many_small_writes_is_signed_whole(signer, keyed, encoding):
    """The message arrives in 100-byte writes with pauses (a pipe read returns what is
    there): every byte is signed. A read loop that stopped one chunk early would sign a
    prefix, or refuse the message."""
    token, public = keyed
    data = MESSAGE if encoding == "raw" else base64.b64encode(MESSAGE) + b"\n"
    process = subprocess.Popen([*signer.argv, *token.args(), "--input", encoding],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, env=token.env, cwd=token.home)
    for start in range(0, len(data), 100):
        process.stdin.write(data[start:start + 100])
        process.stdin.flush()
        time.sleep(0.005)
    process.stdin.close()
    out, err = process.stdout.read(), process.stderr.read()
    assert process.wait(timeout=60) == 0, err
    verify(public, MESSAGE, gateway_decode(out))


def test_one_byte_over_the_limit_after_a_pause_is_refused_not_cut(signer, keyed):
    """1024 bytes, then after a pause the 1025th: MESSAGE_TOO_LARGE. A read loop that
    stopped once it had 1024 bytes (``<`` for ``<=``) would sign the first 1024."""
    token, _ = keyed
    process = subprocess.Popen([*signer.argv, *token.args(), "--input", "raw"],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, env=token.env, cwd=token.home)
    process.stdin.write(MESSAGE)
    process.stdin.flush()
    time.sleep(0.3)
    try:
        process.stdin.write(b"!")
        process.stdin.close()
    except BrokenPipeError:  # it stopped reading at 1024 bytes: the failure checked below
        pass
    out, err = process.stdout.read(), process.stderr.read()
    result = subprocess.CompletedProcess(process.args, process.wait(timeout=60), out, err)
    assert_failure(result, "MESSAGE_TOO_LARGE", 65)


def test_waiting_for_the_token_lock_does_not_spin(signer, keyed, tmp_path):
    """A signer queued behind another's running pkcs11-tool (a FAKE slow token) sleeps
    between its looks at the lock: its CPU over a 1.2 s wait stays far below the wait
    (a poll of 0 ms instead of 2 would burn the whole second, 64 signers a core each)."""
    token, _ = keyed
    record, go = tmp_path / "record", tmp_path / "go"
    env, args = fake(token, "wait-go", record)
    env["FAKE_GO"] = str(go)
    holder = subprocess.Popen([*signer.argv, *args, "--timeout-ms", "20000"], env=env,
                              cwd=token.home, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)
    holder.stdin.write(b"first")
    holder.stdin.close()
    try:
        assert wait_for(lambda: record.exists() and record.read_text()), "the tool never ran"
        with open(tmp_path / "out", "wb") as out, open(tmp_path / "err", "wb") as err:
            waiter = subprocess.Popen([*signer.argv, *args, "--timeout-ms", "1200"], env=env,
                                      cwd=token.home, stdin=subprocess.PIPE, stdout=out,
                                      stderr=err)
            waiter.stdin.write(b"second")
            waiter.stdin.close()
            _, status, usage = os.wait4(waiter.pid, 0)
            waiter.returncode = os.waitstatus_to_exitcode(status)
        result = subprocess.CompletedProcess(waiter.args, waiter.returncode,
                                             (tmp_path / "out").read_bytes(),
                                             (tmp_path / "err").read_bytes())
        assert_failure(result, "TIMEOUT", 75)
        assert b"busy" in result.stderr  # it waited for the lock, not for the tool
        assert usage.ru_utime + usage.ru_stime < 0.5, usage
    finally:
        go.touch()
        holder.stdout.read()
        holder.stderr.read()
        holder.wait(timeout=60)


def test_an_executable_module_file_is_a_module(signer, keyed, tmp_path):
    """Shared libraries are mode 0755 on some distributions (RHEL's /usr/lib64): the
    regular-file check of --module must look at the file type alone, not at the
    permission bits beside it."""
    token, public = keyed
    module = tmp_path / "libsofthsm2-0755.so"
    module.write_bytes(open(token.module, "rb").read())
    module.chmod(0o755)
    args = [*token.args()]
    args[args.index("--module") + 1] = str(module)
    result = signer(args, MESSAGE, env=token.env, cwd=token.home)
    assert result.returncode == 0, result.stderr
    verify(public, MESSAGE, gateway_decode(result.stdout))


def test_a_pin_file_with_a_crlf_line_end_is_the_pin(signer, keyed):
    token, public = keyed
    pin_file = token.home / "pin"
    pin_file.write_bytes(USER_PIN.encode() + b"\r\n")
    pin_file.chmod(0o600)
    env = {k: v for k, v in token.env.items() if k != "PKCS11_PIN"}
    result = signer([*token.args(), "--pin-file", str(pin_file)], b"m", env=env,
                    cwd=token.home)
    assert result.returncode == 0, result.stderr
    verify(public, b"m", gateway_decode(result.stdout))


def test_a_pin_file_and_another_pin_variable_are_refused(signer, keyed):
    """--pin-file with --pin-env naming another variable: two PIN sources, refused."""
    token, _ = keyed
    pin_file = token.home / "pin"
    pin_file.write_text(USER_PIN + "\n")
    pin_file.chmod(0o600)
    result = signer([*token.args(), "--pin-file", str(pin_file), "--pin-env", "OTHER_PIN"],
                    b"m", env=token.env, cwd=token.home)
    assert_failure(result, "CONFIG_INVALID", 64)


def test_a_pkcs11_tool_that_is_not_executable_is_tool_not_found(signer, keyed):
    token, _ = keyed
    tool = token.home / "pkcs11-tool"
    tool.write_bytes(FAKE_TOOL.read_bytes())
    tool.chmod(0o644)
    result = signer([*token.args(), "--pkcs11-tool", str(tool)], b"m", env=token.env,
                    cwd=token.home)
    assert_failure(result, "TOOL_NOT_FOUND", 69)


@pytest.mark.parametrize("seconds, deadline_ms", [("0.299", None), ("0.3", 50)])
def test_the_callers_deadline_less_the_margin_must_leave_50_ms(seconds, deadline_ms):
    """SIGNER_TIMEOUT_SECONDS 0.3 leaves 300 - 250 = 50 ms: the least; 0.299 is too little."""
    resolved = config.resolve({"module": "/m.so", "key_id": "01"},
                              {"SIGNER_TIMEOUT_SECONDS": seconds})
    if deadline_ms is None:
        with pytest.raises(errors.ConfigInvalid):
            resolved.deadline_ms()
    else:
        assert resolved.deadline_ms() == deadline_ms


@pytest.mark.parametrize("args, environ, deadline_ms", [
    (["--timeout-ms", "49"], {}, None), (["--timeout-ms", "50"], {}, 50),
    ([], {"SIGNER_TIMEOUT_SECONDS": "0.299"}, None), ([], {"SIGNER_TIMEOUT_SECONDS": "0.3"}, 50),
])
def test_the_clients_deadline_is_50_ms_at_least(args, environ, deadline_ms):
    if deadline_ms is None:
        with pytest.raises(errors.ConfigInvalid):
            client_command.parse_args(args, environ)
    else:
        assert client_command.parse_args(args, environ).deadline_ms == deadline_ms


def test_a_tool_is_not_started_after_the_deadline():
    """A deadline already past when the tool would start: TIMEOUT, and nothing runs (not
    an internal error)."""
    with pytest.raises(errors.Timeout):
        pkcs11_tool.run(["/bin/sh", "-c", "exit 0"], {"PATH": "/usr/bin:/bin"},
                        time.monotonic() - 0.001)


@pytest.mark.parametrize("status, stderr, name, words", [
    (127, "", "TOOL_NOT_FOUND", "could not be started"),
    (126, "", "TOOL_NOT_FOUND", "could not be started"),
    (-9, "", "SIGNING_FAILED", "died of signal 9"),
    (-11, "", "SIGNING_FAILED", "died of signal 11"),
    (3, "error: something new\nAborting.\n", "SIGNING_FAILED", "exited 3: error: something new"),
])
def test_an_unclassified_failure_says_what_the_tool_did(status, stderr, name, words):
    error = pkcs11_tool.classify(pkcs11_tool.Result(status, b"", stderr))
    assert error.name == name and words in error.message, error.message


def test_the_lock_directory_is_the_first_of_several_runtime_directories(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir(mode=0o700)
    second.mkdir(mode=0o700)
    resolved = types.SimpleNamespace(lock_dir=None)
    folder = signing.state_dir(resolved, {"RUNTIME_DIRECTORY": f"{first}:{second}"})
    assert os.path.dirname(folder) == str(first)


def test_a_lock_name_from_a_configuration_path_is_cut_at_160(tmp_path):
    module = os.stat("/bin/sh")
    conf = str(tmp_path / ("x" * 300))  # names no file: its spelling is used
    name = signing.lock_name(module, {"SOFTHSM2_CONF": conf})
    prefix = f"{module.st_dev}-{module.st_ino}-"
    assert name.startswith(prefix)
    assert len(name) - len(prefix) == 160
    assert name[len(prefix):] == conf.replace("/", "_")[:160]


def test_a_labelled_key_without_an_id_is_key_not_found(monkeypatch):
    """The one key with the label shows no CKA_ID: pkcs11-tool could not select it."""
    listing = "Private Key Object; EC_EDWARDS\n  label:      lap\n  Usage:      sign\n"
    monkeypatch.setattr(pkcs11_tool, "run",
                        lambda *args, **kwargs: pkcs11_tool.Result(0, listing.encode(), ""))
    resolved = types.SimpleNamespace(key_id=None, key_label="lap", module="/m.so", slot=None,
                                     slot_index=None, token_label=None)
    with pytest.raises(errors.KeyNotFound, match="shows no ID"):
        signing.resolve_key_id(resolved, "pkcs11-tool", {}, "PIN", time.monotonic() + 5)


def test_keygen_makes_a_sensitive_signing_key():
    argv = pkcs11_tool.keygen_argv("pkcs11-tool", types.SimpleNamespace(
        module="/m.so", slot=None, slot_index=None, token_label="t"), "PIN", "01", "k")
    assert "--sensitive" in argv and "--usage-sign" in argv
    assert argv[argv.index("--key-type") + 1] == "EC:edwards25519"


def test_a_tool_that_exits_leaving_a_helper_in_its_group_leaves_nothing(signer, keyed):
    """FAKE tool that exits (without a signature) leaving a helper in its process group:
    the helper is killed with the group once the tool is reaped."""
    token, _ = keyed
    record, go = token.home / "record", token.home / "go"
    env, args = fake(token, "orphan-helper", record)
    go.touch()
    env["FAKE_GO"] = str(go)
    result = signer(args, b"m", env=env, cwd=token.home)
    assert_failure(result, "SIGNING_FAILED", 70)  # it printed no signature
    helper = int(recorded(record, "helper")[0])
    assert wait_for(lambda: not alive(helper), 2), "the helper outlived its tool"


def test_no_scan_for_leftovers_after_a_tool_that_left_none(monkeypatch):
    """A tool that leaves nothing holding the watchdog's pipe: ending the watch does not
    scan every process for holders (a copy of the pipe kept by mistake made every
    signature pay that scan, about 2 ms)."""
    def scan(*args):
        raise AssertionError("scanned /proc for holders of the pipe")

    monkeypatch.setattr(pkcs11_tool, "_kill_holders", scan)
    deadline = pkcs11_tool.Deadline(time.monotonic() + 5)
    try:
        result = pkcs11_tool.run(["/bin/sh", "-c", "exit 0"], {"PATH": "/usr/bin:/bin"},
                                 deadline, stdin_data=b"m", last=True)
        assert result.status == 0
        assert deadline.probe is None and deadline.watch_fd is None  # the watch has ended
    finally:
        deadline.release()
