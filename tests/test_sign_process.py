"""Process properties of sign: death of the signer, concurrency, argv, terminal, environment."""

import base64
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

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


# ---- the Python signer's watchdog -------------------------------------------------------

def watchdog(shell, seconds, pid, start):
    from lap_pkcs11 import tool

    return subprocess.run([shell, "-c", tool.WATCHDOG, "lap-pkcs11-watchdog", str(seconds),
                           str(pid), start], capture_output=True, timeout=30)


SHELLS = [shell for shell in ("/bin/sh", "/bin/bash", "/bin/dash") if os.path.exists(shell)]


@pytest.mark.parametrize("shell", SHELLS)
def test_the_watchdog_kills_the_tools_whole_group_when_its_time_is_up(shell):
    """A hung tool with a helper in its group, its signer gone: both die at the watchdog's time."""
    from lap_pkcs11 import tool

    leader = subprocess.Popen(["bash", "-c", "sleep 60 & echo $!; wait"], start_new_session=True,
                              stdout=subprocess.PIPE)
    helper = int(leader.stdout.readline())
    try:
        result = watchdog(shell, 0.1, leader.pid, tool._start_time(leader.pid))
        assert result.returncode == 0, result.stderr
        assert leader.wait(timeout=10) == -signal.SIGKILL
        assert wait_for(lambda: not alive(helper)), "the helper outlived the watchdog"
    finally:
        subprocess.run(["kill", "-KILL", "--", f"-{leader.pid}"], capture_output=True)
        leader.wait()


@pytest.mark.parametrize("shell", SHELLS)
def test_the_watchdog_spares_a_process_that_took_the_tools_pid(shell):
    """The tool ended and its pid was given to another process (another start time): the
    watchdog must not kill that one."""
    other = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        result = watchdog(shell, 0.05, other.pid, "1")
        assert result.returncode == 0, result.stderr
        time.sleep(0.1)
        assert other.poll() is None, "the watchdog killed a process that was not the tool"
    finally:
        other.kill()
        other.wait()


@pytest.mark.parametrize("shell", SHELLS)
def test_the_watchdog_kills_the_helpers_of_a_tool_that_is_gone(shell):
    """The tool exited and was reaped, its helper still runs in its group (no process has
    the tool's pid, so the group is still the tool's): the helper dies."""
    leader = subprocess.Popen(["bash", "-c", "sleep 60 & echo $!"], start_new_session=True,
                              stdout=subprocess.PIPE)
    helper = int(leader.stdout.readline())
    leader.wait()
    try:
        result = watchdog(shell, 0.05, leader.pid, "1")
        assert result.returncode == 0, result.stderr
        assert wait_for(lambda: not alive(helper)), "the helper outlived the watchdog"
    finally:
        if alive(helper):
            os.kill(helper, signal.SIGKILL)


def watchdogs_of(pid):
    """Processes whose command line is a watchdog of the tool ``pid``."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as handle:
                    argv = handle.read().split(b"\0")
            except OSError:
                continue
            if b"lap-pkcs11-watchdog" in argv and str(pid).encode() in argv:
                found.append(int(entry))
    return found


@pytest.mark.parametrize("mode", ["passthrough", "hang"])
def test_no_watchdog_outlives_the_python_signer(keyed, mode):
    """FAKE tool (passthrough, then a hang killed at the deadline): when sign returns,
    neither the tool nor its watchdog (nor the watchdog's sleep) is left."""
    token, _ = keyed
    record = token.home / "record"
    env, args = fake(token, mode, record)
    signer = subprocess.Popen([str(Path(sys.executable).parent / "lap-pkcs11"), "sign", *args,
                               "--timeout-ms", "1500"], env=env, cwd=token.home,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    signer.stdin.write(MESSAGE)
    signer.stdin.close()
    assert wait_for(lambda: record.exists() and recorded(record, "pid")), "fake never started"
    tool_pid = int(recorded(record, "pid")[0])
    assert wait_for(lambda: watchdogs_of(tool_pid) or signer.poll() is not None)
    seen = watchdogs_of(tool_pid)
    signer.wait(timeout=30)
    assert seen or mode == "passthrough", "no watchdog watched the hung tool"
    assert watchdogs_of(tool_pid) == [] and not alive(tool_pid)


def test_the_watchdog_takes_nothing_from_path(keyed):
    """An impostor sh or sleep first on PATH never runs: the watchdog is /bin/sh with its
    own PATH."""
    token, public = keyed
    bin_dir = token.home / "bin"
    bin_dir.mkdir()
    marker = token.home / "impostor-ran"
    for name in ("sh", "sleep", "kill"):
        (bin_dir / name).write_text(f'#!/bin/bash\ntouch {marker}\nexec /bin/{name} "$@"\n')
        (bin_dir / name).chmod(0o755)
    env = dict(token.env, PATH=f"{bin_dir}:{token.env['PATH']}")
    result = subprocess.run([str(Path(sys.executable).parent / "lap-pkcs11"), "sign",
                             *token.args()], input=MESSAGE, env=env, cwd=token.home,
                            capture_output=True, timeout=60)
    assert result.returncode == 0, result.stderr
    verify(public, MESSAGE, gateway_decode(result.stdout))
    assert not marker.exists(), "a program from PATH ran as the watchdog"
