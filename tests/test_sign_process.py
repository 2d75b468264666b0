"""Process properties of sign: death of the signer, concurrency, argv, terminal, environment."""

import base64
import os
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import USER_PIN, assert_failure, gateway_decode, verify
from test_sign_errors import alive, fake

MESSAGE = b"\x00lap receipt\x00" * 40


def wait_for(predicate, seconds=10.0):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def recorded(record, key):
    return [line.split("=", 1)[1] for line in record.read_text().splitlines()
            if line.startswith(key + "=")]


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killed_signer_takes_pkcs11_tool_with_it(signer, keyed, sig):
    """FAKE tool (a hang, with a helper in its process group): the gateway SIGKILLs a late
    signer; a supervisor may SIGTERM it. The whole group is gone by the signer's own
    deadline plus the grace (a SIGTERM: after the grace), and nothing is left behind."""
    token, _ = keyed
    record = token.home / "record"
    env, args = fake(token, "hang", record)
    tmp = token.home / "tmpdir"
    tmp.mkdir()
    env["TMPDIR"] = str(tmp)
    before = sorted(p.name for p in token.home.iterdir())
    proc = subprocess.Popen([*signer.argv, *args, "--timeout-ms", "2000"], env=env,
                            cwd=token.home, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdin.write(MESSAGE)
    proc.stdin.close()
    assert wait_for(lambda: record.exists() and recorded(record, "child")), "fake never started"
    pids = [int(recorded(record, key)[0]) for key in ("pid", "child")]
    proc.send_signal(sig)
    proc.wait(timeout=10)
    assert proc.stdout.read() == b""
    for pid in pids:
        assert wait_for(lambda: not alive(pid)), f"process {pid} outlived the signer's deadline"
    assert list(tmp.iterdir()) == []
    assert sorted(p.name for p in token.home.iterdir()) == sorted([*before, "record"])


def test_a_caller_that_kills_the_signer_does_not_kill_the_token_mid_run(signer, keyed):
    """FAKE slow token: SIGKILL of the signer (the gateway's own timeout) must not kill
    pkcs11-tool inside its run (a login rewrites SoftHSM2's token file); it finishes."""
    token, _ = keyed
    record, go = token.home / "record", token.home / "go"
    env, args = fake(token, "wait-go", record)
    env["FAKE_GO"] = str(go)
    proc = subprocess.Popen([*signer.argv, *args, "--timeout-ms", "5000"], env=env,
                            cwd=token.home, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdin.write(MESSAGE)
    proc.stdin.close()
    assert wait_for(lambda: record.exists() and recorded(record, "pid")), "fake never started"
    tool_pid = int(recorded(record, "pid")[0])
    proc.kill()
    proc.wait(timeout=10)
    assert alive(tool_pid), "the run was killed with the signer"
    go.touch()
    assert wait_for(lambda: "finished=1" in record.read_text()), "the run did not finish"
    assert wait_for(lambda: not alive(tool_pid))


def test_sixteen_concurrent_signs_on_one_token_all_succeed(signer, keyed):
    token, public = keyed
    messages = [os.urandom(200 + i) for i in range(16)]
    args = [*token.args(), "--input", "base64", "--timeout-ms", "20000"]

    def one(message):
        return signer(args, base64.b64encode(message) + b"\n", env=token.env, cwd=token.home)

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, messages))
    for message, result in zip(messages, results):
        assert result.returncode == 0, result.stderr
        verify(public, message, gateway_decode(result.stdout))


def test_concurrency_does_not_hide_a_missing_token(signer, keyed):
    token, _ = keyed
    args = ["--module", token.module, "--token-label", "absent", "--key-id", "01",
            "--timeout-ms", "20000"]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: signer(args, MESSAGE, env=token.env, cwd=token.home),
                                range(8)))
    for result in results:
        assert_failure(result, "TOKEN_NOT_FOUND", 69)


def test_pin_never_in_argv_and_no_terminal(signer, keyed, tmp_path):
    """FAKE tool in passthrough mode: it records what it got, then runs the real tool.

    The signer runs under `script`, which gives it a controlling terminal, as an
    operator's shell would; pkcs11-tool must still have none to prompt on.
    """
    token, public = keyed
    record = token.home / "record"
    env, args = fake(token, "passthrough", record)
    message_file = tmp_path / "message"
    message_file.write_bytes(MESSAGE)
    out = tmp_path / "out"
    command = " ".join([*signer.argv, *args, "<", str(message_file), ">", str(out)])
    subprocess.run(["script", "-qec", command, "/dev/null"], env=env, cwd=token.home,
                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, check=True, timeout=60)
    verify(public, MESSAGE, gateway_decode(out.read_bytes()))
    argv = recorded(record, "arg")
    assert "--login" in argv and "env:PKCS11_PIN" in argv
    assert not any(USER_PIN in arg for arg in argv)
    assert recorded(record, "tty") == ["?"]


def test_debug_variables_never_reach_the_tool(signer, keyed):
    """FAKE tool in passthrough mode records the environment it was given."""
    token, public = keyed
    record = token.home / "record"
    env, args = fake(token, "passthrough", record)
    env.update(OPENSC_DEBUG="9", PKCS11SPY="/usr/lib/x86_64-linux-gnu/pkcs11/opensc-pkcs11.so",
               PKCS11SPY_OUTPUT=str(token.home / "spy.log"))
    result = signer(args, MESSAGE, env=env, cwd=token.home)
    verify(public, MESSAGE, gateway_decode(result.stdout))
    names = {line.split("=", 1)[0] for line in recorded(record, "env")}
    assert not names & {"OPENSC_DEBUG", "PKCS11SPY", "PKCS11SPY_OUTPUT"}
    assert "SOFTHSM2_CONF" in names


def test_env_file_variables_reach_the_tool_under_the_real_environment(signer, keyed):
    token, public = keyed
    record = token.home / "record"
    env, args = fake(token, "passthrough", record)
    env_file = token.home / "signer.env"
    env_file.write_text(f"SOFTHSM2_CONF={token.home / 'wrong.conf'}\nVENDOR_SETTING=from-file\n")
    result = signer([*args, "--env-file", str(env_file)], MESSAGE, env=env, cwd=token.home)
    verify(public, MESSAGE, gateway_decode(result.stdout))
    seen = dict(line.split("=", 1) for line in recorded(record, "env"))
    assert seen["VENDOR_SETTING"] == "from-file"
    assert seen["SOFTHSM2_CONF"] == str(token.conf)
