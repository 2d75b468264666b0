"""Process properties of sign: death of the signer, concurrency, argv, terminal, environment."""

import base64
import os
import resource
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

def watchdog(seconds, pipe):
    """Run the watchdog as the signer does, on the read end of ``pipe`` (the test keeps the
    write end open as the signer would); return (its exit code, seconds it ran)."""
    from lap_pkcs11 import tool

    began = time.monotonic()
    child = os.posix_spawn(tool.SHELL, [tool.SHELL, "-c", tool.WATCHDOG, "lap-pkcs11-watchdog",
                                        str(seconds)], {"PATH": "/usr/bin:/bin"},
                           file_actions=[(os.POSIX_SPAWN_DUP2, pipe[0], 3)])
    _, status = os.waitpid(child, 0)
    return os.waitstatus_to_exitcode(status), time.monotonic() - began


def start_tool(argv, pipe=None):
    """A stand-in tool in its own session, holding ``pipe``'s write end as fd 5 as
    pkcs11-tool does under the signer; return its pid."""
    from lap_pkcs11 import tool

    actions = [(os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDWR, 0)]
    if pipe is not None:
        actions.append((os.POSIX_SPAWN_DUP2, pipe[1], tool.WATCHDOG_FD))
    return os.posix_spawnp(argv[0], argv, os.environ, file_actions=actions, setsid=True)


def helper_of(leader):
    """The pid of the helper process a ``bash -c 'sleep 60 & ...'`` tool started."""
    assert wait_for(lambda: children_of(leader)), "the stand-in tool started no helper"
    return children_of(leader)[0]


@pytest.fixture
def pipe():
    ends = os.pipe()
    yield ends
    for end in ends:
        try:
            os.close(end)
        except OSError:
            pass


def test_the_watchdog_kills_the_tools_whole_group_when_its_time_is_up(pipe):
    """A hung tool with a helper in its group, its signer gone or stuck: both die at the
    watchdog's time."""
    leader = start_tool(["bash", "-c", "sleep 60 & wait"], pipe)
    helper = helper_of(leader)
    try:
        code, seconds = watchdog(0.2, pipe)
        assert code == 0 and seconds >= 0.2
        _, status = os.waitpid(leader, 0)
        assert os.waitstatus_to_exitcode(status) == -signal.SIGKILL
        assert wait_for(lambda: not alive(helper)), "the helper outlived the watchdog"
    finally:
        subprocess.run(["kill", "-KILL", "--", f"-{leader}"], capture_output=True)


def test_the_watchdog_spares_what_does_not_hold_its_pipe(pipe):
    """A process that took the tool's place (no pipe), and one holding another pipe as fd 5:
    neither is the tool, and neither is killed."""
    other_pipe = os.pipe()
    strangers = [start_tool(["sleep", "60"]), start_tool(["sleep", "60"], other_pipe)]
    try:
        code, _ = watchdog(0.05, pipe)
        assert code == 0
        time.sleep(0.1)
        assert all(os.waitpid(pid, os.WNOHANG) == (0, 0) for pid in strangers), \
            "the watchdog killed a process that was not the tool"
    finally:
        for pid in strangers:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        for end in other_pipe:
            os.close(end)


def test_the_watchdog_kills_the_helpers_of_a_tool_that_is_gone(pipe):
    """The tool exited and was reaped, its helper still runs (and holds the pipe): the
    helper dies."""
    leader = start_tool(["bash", "-c", "sleep 60 & exit 0"], pipe)
    os.waitpid(leader, 0)
    helper = next(pid for pid in map(int, filter(str.isdigit, os.listdir("/proc")))
                  if pid != os.getpid() and holds(pid, pipe))
    try:
        code, _ = watchdog(0.05, pipe)
        assert code == 0
        assert wait_for(lambda: not alive(helper)), "the helper outlived the watchdog"
    finally:
        if alive(helper):
            os.kill(helper, signal.SIGKILL)


def holds(pid, pipe):
    try:
        return os.stat(f"/proc/{pid}/fd/5").st_ino == os.fstat(pipe[0]).st_ino
    except OSError:
        return False


def test_the_watchdog_ends_at_once_when_every_writer_is_gone(pipe):
    """The signer and the tool's group ended: it ends without a kill, long before its time."""
    os.close(pipe[1])
    code, seconds = watchdog(20, pipe)
    assert code == 0 and seconds < 5, seconds


def children_of(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as listing:
            return [int(child) for child in listing.read().split()]
    except FileNotFoundError:
        return []


def watchdogs_of(signer):
    """The signer's children that are its watchdog."""
    found = []
    for child in children_of(signer):
        try:
            with open(f"/proc/{child}/cmdline", "rb") as handle:
                if b"lap-pkcs11-watchdog" in handle.read().split(b"\0"):
                    found.append(child)
        except OSError:
            continue
    return found


@pytest.mark.parametrize("mode", ["passthrough", "hang"])
def test_no_watchdog_outlives_the_python_signer(keyed, mode):
    """FAKE tool (passthrough, then a hang killed at the deadline): when sign returns,
    neither the tool nor its watchdog is left, and the watchdog started no process that
    could be orphaned (a zombie under a container's init that does not reap)."""
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
    seen = watchdogs_of(signer.pid)
    offspring = [child for pid in seen for child in children_of(pid)]
    signer.wait(timeout=30)
    assert offspring == [], "the watchdog started a process of its own"
    assert seen or mode == "passthrough", "no watchdog watched the hung tool"
    assert not any(map(alive, [*seen, tool_pid])), "the tool or its watchdog outlived sign"


def test_the_watchdog_takes_nothing_from_path(keyed):
    """An impostor bash, sh, sleep or kill first on PATH never runs: the watchdog is
    /bin/bash with its own PATH."""
    token, public = keyed
    bin_dir = token.home / "bin"
    bin_dir.mkdir()
    marker = token.home / "impostor-ran"
    for name in ("sh", "bash", "sleep", "kill"):
        (bin_dir / name).write_text(f'#!/bin/bash\ntouch {marker}\nexec /bin/{name} "$@"\n')
        (bin_dir / name).chmod(0o755)
    env = dict(token.env, PATH=f"{bin_dir}:{token.env['PATH']}")
    result = subprocess.run([str(Path(sys.executable).parent / "lap-pkcs11"), "sign",
                             *token.args()], input=MESSAGE, env=env, cwd=token.home,
                            capture_output=True, timeout=60)
    assert result.returncode == 0, result.stderr
    verify(public, MESSAGE, gateway_decode(result.stdout))
    assert not marker.exists(), "a program from PATH ran as the watchdog"


def test_too_few_descriptors_is_one_line_and_leaves_no_tool(keyed):
    """FAKE tool that hangs, RLIMIT_NOFILE from 5 to 14: whichever step runs out of
    descriptors, the answer is one contract line and no tool is left running (before: an
    internal error with the tool orphaned, holding the token lock)."""
    token, _ = keyed
    record = token.home / "record"
    env, args = fake(token, "hang", record)
    lap = str(Path(sys.executable).parent / "lap-pkcs11")
    for limit in range(5, 15):
        record.unlink(missing_ok=True)

        def few_descriptors(limit=limit):
            resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

        result = subprocess.run([lap, "sign", *args, "--timeout-ms", "300"], input=MESSAGE,
                                env=env, cwd=token.home, capture_output=True, timeout=30,
                                preexec_fn=few_descriptors)
        assert result.stdout == b"" and result.returncode in (64, 70, 75), (limit, result)
        lines = result.stderr.decode().splitlines()
        assert len(lines) == 1 and lines[0].startswith("lap-pkcs11: "), (limit, lines)
        if record.exists() and recorded(record, "pid"):
            pid = int(recorded(record, "pid")[0])
            assert wait_for(lambda: not alive(pid), 2), f"the tool outlived sign at {limit} fds"
