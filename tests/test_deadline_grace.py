"""A deadline never kills pkcs11-tool inside a run that would finish (it could empty
SoftHSM2's token file mid-write), in both implementations.

The FAKE tool's ``wait-go`` mode is a slow token whose run ends when the test says
so: that makes the order of events (deadline, answer, end of the run) exact instead
of a race against the clock.
"""

import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import IMPLEMENTATIONS, assert_failure
from lap_pkcs11.backends import pkcs11_tool
from lap_pkcs11.per_signature import errors
from lap_pkcs11.per_signature import signer as signing
from test_sign_errors import fake

MESSAGE = b"\x00lap receipt\x00" * 20


def test_the_deadline_is_answered_at_once_and_the_running_tool_may_finish(signer, keyed):
    token, _ = keyed
    record, go = token.home / "record", token.home / "go"
    env, args = fake(token, "wait-go", record)
    env["FAKE_GO"] = str(go)
    proc = subprocess.Popen([*signer.argv, *args, "--timeout-ms", "600"], env=env,
                            cwd=token.home, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdin.write(MESSAGE)
    proc.stdin.close()
    first = proc.stderr.readline()  # written at the deadline, while the tool still runs
    assert first.startswith(b"lap-pkcs11: TIMEOUT: "), first
    assert proc.poll() is None, "the signer exited at the deadline instead of waiting"
    assert "finished=1" not in record.read_text()
    go.touch()  # the slow token completes its run inside the grace
    assert proc.wait(timeout=10) == 75
    assert proc.stdout.read() == b""
    assert proc.stderr.read() == b"", "the TIMEOUT line was written twice"
    assert "finished=1" in record.read_text(), "pkcs11-tool was killed inside its run"


def test_a_tool_that_does_not_finish_in_the_grace_is_killed(signer, keyed):
    """FAKE tool: the slow token never completes; its whole group is killed after the grace."""
    token, _ = keyed
    record = token.home / "record"
    env, args = fake(token, "hang", record)
    result = signer([*args, "--timeout-ms", "300"], MESSAGE, env=env, cwd=token.home, timeout=10)
    assert_failure(result, "TIMEOUT", 75)


def test_no_tool_is_started_when_its_run_no_longer_fits(monkeypatch):
    """A pkcs11-tool run needs 50 ms here: with less left it is not started at all."""
    started = []
    monkeypatch.setattr(pkcs11_tool.os, "posix_spawn", lambda *a, **k: started.append(a))
    deadline = pkcs11_tool.Deadline(time.monotonic() + (pkcs11_tool.MIN_TOOL_MS - 10) / 1000)
    with pytest.raises(errors.Timeout):
        pkcs11_tool.run(["pkcs11-tool", "--sign"], {}, deadline)
    assert started == []


def test_the_lock_wait_stops_where_a_tool_run_would_no_longer_fit(tmp_path):
    """Waiting for the token lock ends MIN_TOOL_MS before the deadline, with TIMEOUT."""
    path = tmp_path / "x.lock"
    holder = signing.acquire_lock(str(path), pkcs11_tool.Deadline(time.monotonic() + 5))
    try:
        end = time.monotonic() + 0.3
        with pytest.raises(errors.Timeout):
            signing.acquire_lock(str(path), pkcs11_tool.Deadline(end))
        assert time.monotonic() < end, "the lock wait went on into the last 50 ms"
    finally:
        os.close(holder)


def test_the_kill_comes_before_the_callers_own_end():
    deadline = pkcs11_tool.Deadline(100.0, caller_end=100.1)
    assert deadline.kill_at == pytest.approx(100.1 - pkcs11_tool.KILL_RESERVE_MS / 1000)
    assert pkcs11_tool.Deadline(100.0).kill_at == pytest.approx(100.0 + pkcs11_tool.GRACE_MS / 1000)


@pytest.mark.parametrize("sig", ["INT", "TERM"])
def test_a_signal_during_the_run_lets_the_tool_finish_and_answers_one_line(signer, keyed, sig):
    token, _ = keyed
    record, go = token.home / "record", token.home / "go"
    env, args = fake(token, "wait-go", record)
    env["FAKE_GO"] = str(go)
    proc = subprocess.Popen([*signer.argv, *args, "--timeout-ms", "20000"], env=env,
                            cwd=token.home, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdin.write(MESSAGE)
    proc.stdin.close()
    for _ in range(1000):  # until the slow token runs
        if record.exists() and record.read_text():
            break
        time.sleep(0.01)
    proc.send_signal(getattr(signal, "SIG" + sig))
    first = proc.stderr.readline()
    assert first.startswith(b"lap-pkcs11: SIGNING_FAILED: interrupted by SIG" + sig.encode()), first
    go.touch()
    assert proc.wait(timeout=10) == 70
    assert proc.stdout.read() == b""
    assert proc.stderr.read() == b""
    assert "finished=1" in record.read_text(), "pkcs11-tool was killed inside its run"


def test_the_python_signer_is_not_dumpable_and_has_no_core_limit():
    """No core file may hold the PIN: RLIMIT_CORE 0 (inherited by pkcs11-tool), not dumpable."""
    for public in (False, True):  # ctypes' core, and the public module it falls back to
        code = ("from lap_pkcs11.per_signature import process;"
                f"process.no_core_dumps(public={public});"
                "prctl, _ = process._libc_functions(public=True); print(prctl(3, 0, 0, 0, 0));"
                "import resource; print(resource.getrlimit(resource.RLIMIT_CORE))")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True,
                             text=True, check=True).stdout.split("\n")
        assert out[0] == "0", out
        assert out[1] == "(0, 0)", out


def test_the_running_signer_is_not_dumpable_and_its_tool_has_no_core_limit(keyed):
    """Seen from the (FAKE) tool: RLIMIT_CORE 0 in both; the signer's /proc files are
    root's (not dumpable), which tells only when the signer runs as another user."""
    token, _ = keyed
    info = token.home / "process"
    env, args = fake(token, "garbage")
    env["FAKE_PROCESS"] = str(info)
    python = IMPLEMENTATIONS["python"]()
    python(args, MESSAGE, env=env, cwd=token.home)
    seen = dict(line.split("=", 1) for line in info.read_text().splitlines() if "=" in line)
    assert seen["core"] == "0"
    assert seen["signer_core"] == "0/0"
    assert seen["signer_proc_uid"] == "0"
