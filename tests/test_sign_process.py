"""Process properties of sign: death of the signer, concurrency, argv, terminal, environment."""

import base64
import os
import resource
import shlex
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from lap_pkcs11.per_signature import process

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


def test_a_per_signature_command_ends_without_finalising():
    """entry.ended (how sign, client and serve end): the exit code is kept, nothing
    registered at exit runs, what Python's stderr holds goes out, and what its stdout
    buffer holds does not (stdout holds the answer alone, written with os.write)."""
    code = ("import atexit, sys\n"
            "from lap_pkcs11.entry import ended\n"
            "atexit.register(lambda: print('finalised'))\n"
            "sys.stdout.write('out')\n"
            "sys.stderr.write('err')\n"
            "ended(75)\n")
    result = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, timeout=60)
    assert (result.returncode, result.stdout, result.stderr) == (75, b"", b"err")


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
    command = " ".join([shlex.join([*signer.argv, *args]), "<", shlex.quote(str(message_file)),
                        ">", shlex.quote(str(out))])
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

def watched(seconds):
    """A pkcs11_tool.Deadline whose kill time is ``seconds`` from now, its watchdog started (the
    test stands in for the signer: it holds the pipe's write end)."""
    from lap_pkcs11.backends import pkcs11_tool

    # Its kill_at is ``seconds`` from now.
    deadline = pkcs11_tool.Deadline(time.monotonic() + seconds - pkcs11_tool.GRACE_MS / 1000)
    deadline.watch()
    return deadline


def start_tool(argv, deadline=None, tell=True):
    """A stand-in tool in its own session, holding the watchdog's pipe as fd 5 as
    pkcs11-tool does under the signer (without it, when ``deadline`` is None), and
    told to the watchdog when ``tell``; return its pid."""
    from lap_pkcs11.backends import pkcs11_tool

    actions = [(os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDWR, 0)]
    if deadline is not None:
        source = pkcs11_tool.high_copies([deadline.watch_fd])[0]
        actions.append((os.POSIX_SPAWN_DUP2, source, pkcs11_tool.WATCHDOG_FD))
    pid = os.posix_spawnp(argv[0], argv, os.environ, file_actions=actions, setsid=True)
    if deadline is not None:
        if source != deadline.watch_fd:
            os.close(source)
        if tell:
            deadline.tell(pid)
    return pid


def tell(deadline, pid, start=None):
    """Tell the watchdog of ``pid`` (with another start time when ``start`` is given)."""
    os.write(deadline.watch_fd,
             f"{deadline.nonce} {pid} {start or process.start_ticks(pid).decode()}\n".encode())


def helper_of(leader):
    """The pid of the helper process a ``bash -c 'sleep 60 & ...'`` tool started."""
    assert wait_for(lambda: children_of(leader)), "the stand-in tool started no helper"
    return children_of(leader)[0]


def reap(pid, seconds=10):
    """The exit code of our child ``pid`` once it ends (None if it runs on)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    return None


def finish(pids):
    for pid in pids:
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass


def test_a_told_tool_with_an_odd_name_dies_too():
    """A tool whose name has a newline and ") " in it (/proc/PID/stat's comm field), told,
    without the pipe: the watchdog still reads its start time and kills it."""
    deadline = watched(0.3)
    code = ("import ctypes, time; ctypes.CDLL(None).prctl(15, b'x\\n) S 1 2 3', 0, 0, 0);"
            "open(1, 'w').write('named\\n'); time.sleep(60)")
    read_end, write_end = os.pipe()
    tool_pid = os.posix_spawn(sys.executable, [sys.executable, "-c", code], os.environ,
                              file_actions=[(os.POSIX_SPAWN_DUP2, write_end, 1)], setsid=True)
    os.close(write_end)
    try:
        assert os.read(read_end, 100) == b"named\n"
        tell(deadline, tool_pid)
        assert reap(tool_pid) == -signal.SIGKILL
    finally:
        os.close(read_end)
        finish([tool_pid])
        deadline.release()


def test_an_interrupted_run_leaves_its_tool_to_the_watchdog(tmp_path):
    """KeyboardInterrupt inside pkcs11_tool.run (an operator command has no signal handlers of
    ours): the hung tool's group still dies at the kill time, not never."""
    record = tmp_path / "pid"
    script = (f"import time; from lap_pkcs11.backends import pkcs11_tool\n"
              f"pkcs11_tool.run(['/bin/bash', '-c', 'echo $$ > {record}; sleep 60 & wait'], "
              f"{{'PATH': '/usr/bin:/bin'}}, time.monotonic() + 0.3)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE)
    assert wait_for(lambda: record.exists() and record.read_text().strip())
    leader = int(record.read_text())
    assert wait_for(lambda: children_of(leader))
    helper = children_of(leader)[0]
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=10) != 0
    try:
        assert wait_for(lambda: not alive(leader) and not alive(helper), 5), \
            "the tool outlived an interrupted run"
    finally:
        for pid in (leader, helper):
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("how", ["told", "holds-the-pipe", "told-without-the-pipe"])
def test_the_watchdog_kills_the_tools_whole_group_when_its_time_is_up(how):
    """A hung tool with a helper in its group, its signer stuck: both die at the watchdog's
    time, whether the watchdog was told of it, only sees it hold the pipe (the signer
    died before telling), or was told of it while it holds no pipe (it closed it, or
    its /proc/PID/fd is root's: a tool that is not dumpable)."""
    began = time.monotonic()  # the kill time is 0.3 s from here (plus the 20 ms slack)
    deadline = watched(0.3)
    if how == "told-without-the-pipe":
        leader = start_tool(["bash", "-c", "sleep 60 & wait"])
        tell(deadline, leader)
    else:
        leader = start_tool(["bash", "-c", "sleep 60 & wait"], deadline, tell=how == "told")
    helper = helper_of(leader)
    try:
        assert reap(leader) == -signal.SIGKILL
        # Not before the kill time (less the boot-time clock's 10 ms steps), nor much after.
        assert 0.29 < time.monotonic() - began < 5
        assert wait_for(lambda: not alive(helper)), "the helper outlived the watchdog"
    finally:
        finish([leader])
        deadline.release()


def test_the_watchdog_spares_what_is_not_the_tool():
    """A process told with another start time (its pid was taken by another), one told in
    a line without the nonce, and one holding another pipe as fd 5: none is killed."""
    deadline = watched(0.05)
    strangers = [start_tool(["sleep", "60"]) for _ in range(3)]
    tell(deadline, strangers[0], start="1")
    os.write(deadline.watch_fd, f"0000000000000000 {strangers[1]} "
             f"{process.start_ticks(strangers[1]).decode()}\n".encode())
    try:
        time.sleep(0.4)
        assert all(os.waitpid(pid, os.WNOHANG) == (0, 0) for pid in strangers), \
            "the watchdog killed a process that was not the tool"
        assert deadline.watching(), "the watchdog ended while the signer lives"
    finally:
        finish(strangers)
        deadline.release()


def test_the_watchdog_kills_the_helpers_of_a_tool_that_is_gone():
    """The tool exited and was reaped, its helper still runs in its group: the helper dies."""
    deadline = watched(0.2)
    leader = start_tool(["bash", "-c", "sleep 60 & exit 0"], deadline)
    assert reap(leader) == 0
    helper = next(pid for pid in map(int, filter(str.isdigit, os.listdir("/proc")))
                  if os.path.exists(f"/proc/{pid}/stat") and
                  open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[2] == str(leader))
    try:
        assert wait_for(lambda: not alive(helper)), "the helper outlived the watchdog"
    finally:
        if alive(helper):
            os.kill(helper, signal.SIGKILL)
        deadline.release()


def test_the_watchdog_ends_at_once_when_every_writer_is_gone():
    """The signer and its tools ended: it ends without a kill, long before its time."""
    deadline = watched(20)
    watchdog = deadline.watchdog
    os.close(deadline.watch_fd)
    deadline.watch_fd = None
    began = time.monotonic()
    assert reap(watchdog) == 0 and time.monotonic() - began < 5
    deadline.watchdog = None


def test_a_told_tool_outliving_a_dead_signer_still_dies_at_the_time():
    """The signer died (the pipe closed) while a tool it told of runs without the pipe: the
    watchdog stays until the time, then kills it."""
    deadline = watched(0.3)
    tool_pid = start_tool(["sleep", "60"])
    tell(deadline, tool_pid)
    os.close(deadline.watch_fd)
    deadline.watch_fd = None
    try:
        assert reap(tool_pid) == -signal.SIGKILL
    finally:
        finish([tool_pid])
        deadline.release()


def test_a_told_tool_that_ends_after_the_signer_takes_its_helpers_along():
    """The signer is gone (the pipe closed) while a told tool still runs without the pipe;
    the tool ends half a second later: its helper dies then, not only at the kill time
    (20 s here). Before: the watchdog slept to the kill time once it saw the tool run,
    so a tool still exiting when the pipe closed left its helper for that long."""
    deadline = watched(20)
    leader = start_tool(["bash", "-c", "sleep 60 & exec sleep 0.5"])
    tell(deadline, leader)
    helper = helper_of(leader)
    os.close(deadline.watch_fd)
    deadline.watch_fd = None
    try:
        assert wait_for(lambda: not alive(helper), 5), "the helper outlived its tool"
    finally:
        if alive(helper):
            os.kill(helper, signal.SIGKILL)
        finish([leader])
        deadline.release()


def test_a_tool_started_after_the_time_is_killed_too():
    """The signer was stuck past its kill time and then started a tool: the watchdog,
    still there while the signer holds the pipe, kills it."""
    deadline = watched(0.05)
    time.sleep(0.3)
    tool_pid = start_tool(["sleep", "60"], deadline, tell=False)
    try:
        assert reap(tool_pid, 5) == -signal.SIGKILL
    finally:
        finish([tool_pid])
        deadline.release()


def test_told_lines_never_name_init_the_signer_itself_or_the_signers_group():
    """The watchdog's own rule, run alone: a line naming pid 1 (whose group would be
    every process), the signer ($PPID), the watchdog ($$) or the signer's group ($3) is
    not taken; a line naming another process is. (Pid 1 is checked only here: a watchdog
    that took it would kill every process it may.)"""
    from lap_pkcs11.backends import pkcs11_tool

    told = pkcs11_tool.WATCHDOG.split("\n}\n", 1)[0] + "\n}\n"
    assert told.startswith("told() {")
    script = (told + 'tools=()\nfor pid in 1 "$PPID" $$ "$3" 4242; do told "$3" "$pid" 7; '
              'done\nprintf "%s\\n" "${tools[@]}"')
    result = subprocess.run(["bash", "-c", script, "watchdog", "1", "n", "777"],
                            capture_output=True, text=True, timeout=30)
    assert (result.returncode, result.stdout) == (0, "4242:7\n"), result


def test_told_lines_never_name_the_signer_or_its_group():
    """Lines with the nonce that name the signer or the signer's process group (whose
    leader's start time they give): the watchdog takes neither, so its kill never
    reaches the signer's group (the signer here: a Python process whose group leader is
    a bash, in a session of their own, both still running after the kill time). Before:
    the group died."""
    script = """
import os, sys, time
from lap_pkcs11.backends import pkcs11_tool
from lap_pkcs11.per_signature import process
deadline = pkcs11_tool.Deadline(time.monotonic() + 0.05 - pkcs11_tool.GRACE_MS / 1000)
deadline.watch()
for pid in (os.getpid(), os.getpgrp()):
    os.write(deadline.watch_fd,
             f"{deadline.nonce} {pid} {process.start_ticks(pid).decode()}\\n".encode())
time.sleep(0.5)
print("alive", deadline.watching())
deadline.release()
"""
    result = subprocess.run(["bash", "-c", '"$0" -c "$1" & wait $!', sys.executable, script],
                            capture_output=True, text=True, timeout=30, start_new_session=True)
    assert (result.returncode, result.stdout) == (0, "alive True\n"), result


def test_a_partial_line_from_a_tool_does_not_hide_the_next_tool():
    """A tool wrote a line without its end into the pipe; the next tool, told after it, is
    still known by its tell (it holds no pipe here) and dies at the kill time."""
    from lap_pkcs11.backends import pkcs11_tool

    deadline = pkcs11_tool.Deadline(time.monotonic() + 0.3 - pkcs11_tool.GRACE_MS / 1000)
    deadline.watch()
    os.write(deadline.watch_fd, b"garbage without its newline")
    tool_pid = start_tool(["sleep", "60"])
    deadline.tell(tool_pid)
    try:
        assert reap(tool_pid) == -signal.SIGKILL
    finally:
        finish([tool_pid])
        deadline.release()


def test_a_helper_that_left_the_tools_session_dies_with_sign(signer, keyed):
    """FAKE tool that starts a helper with setsid (out of its process group; it keeps
    every descriptor it inherited, the token lock among them) and signs: the helper is
    gone when sign returns. Before: it lived on, holding the lock, and the next
    signature timed out."""
    token, _ = keyed
    record = token.home / "record"
    env, args = fake(token, "escape", record)
    result = signer(args, MESSAGE, env=env, cwd=token.home, timeout=30)
    assert result.returncode == 0, result.stderr
    helper = int(recorded(record, "escaped")[0])
    try:
        assert wait_for(lambda: not alive(helper), 2), "the escaped helper outlived sign"
    finally:
        if alive(helper):
            os.kill(helper, signal.SIGKILL)


RECEIVER = """
import socket, sys, time
server = socket.socket(socket.AF_UNIX)
server.bind(sys.argv[1])
server.listen(1)
print("ready", flush=True)
connection, _ = server.accept()
socket.recv_fds(connection, 1, 8)
print("received", flush=True)
time.sleep(60)
"""


def test_a_process_the_tool_handed_its_descriptors_is_not_killed(signer, keyed):
    """FAKE tool that passes its descriptors (the signer's pipes) over a unix socket to a
    process that ran before the signer, in a session of its own with a bystander: that
    process holds the pipe now, but it is no leftover of the tool; neither it nor its
    group is killed. Before: both were (a caller's own group, had it received them)."""
    token, _ = keyed
    path = token.home / "receiver.sock"
    group = subprocess.Popen(["bash", "-c", '"$0" -c "$1" "$2" & sleep 60 & wait',
                              sys.executable, RECEIVER, str(path)], stdout=subprocess.PIPE,
                             text=True, start_new_session=True)
    try:
        assert group.stdout.readline() == "ready\n"
        time.sleep(0.05)  # started well before the signer, in clock ticks
        env, args = fake(token, "pass-fds")
        env["FAKE_PASS_TO"] = str(path)
        result = signer(args, MESSAGE, env=env, cwd=token.home, timeout=30)
        assert group.stdout.readline() == "received\n"
        if signer.name == "shell":
            # Its signature comes through the tool's stdout pipe, which the receiver holds
            # open now: the mirror cannot finish it and fails closed at its deadline.
            assert_failure(result, "TIMEOUT", 75)
        else:
            assert result.returncode == 0, result.stderr
        time.sleep(0.3)
        members = [pid for pid in map(int, filter(str.isdigit, os.listdir("/proc")))
                   if alive(pid) and os.path.exists(f"/proc/{pid}/stat") and
                   open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[2] ==
                   str(group.pid)]
        assert group.poll() is None and len(members) == 3, members  # bash, receiver, sleep
    finally:
        os.killpg(group.pid, signal.SIGKILL)
        group.wait()


def test_a_helper_that_closed_the_pipe_dies_when_its_tool_ends_after_the_signer(keyed):
    """FAKE tool with a helper in its group that closed the watchdog's pipe; the signer is
    SIGKILLed, then the tool exits: the watchdog, seeing every writer gone and no told
    tool running, kills what is left of the tool's group. Before: the helper lived on."""
    token, _ = keyed
    record, go = token.home / "record", token.home / "go"
    env, args = fake(token, "orphan-helper", record)
    env["FAKE_GO"] = str(go)
    signer = subprocess.Popen([str(Path(sys.executable).parent / "lap-pkcs11"), "sign", *args,
                               "--timeout-ms", "20000"], env=env, cwd=token.home,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)
    signer.stdin.write(MESSAGE)
    signer.stdin.close()
    assert wait_for(lambda: record.exists() and recorded(record, "helper")), "no helper"
    helper = int(recorded(record, "helper")[0])
    # The signer told the watchdog of the tool microseconds after starting it; on a
    # loaded host it may not have run since. (Killed before that tell, the watchdog
    # knows the tool only by the pipe it holds: that case is not this one.)
    time.sleep(0.3)
    try:
        signer.kill()
        signer.wait(timeout=10)
        go.touch()
        assert wait_for(lambda: not alive(helper), 5), "the helper outlived its tool"
    finally:
        if alive(helper):
            os.kill(helper, signal.SIGKILL)


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


def test_the_tools_descriptors_are_the_message_the_lock_and_the_watchdogs_pipe(keyed):
    """FAKE tool (passthrough) lists its descriptors: 3 is the message, 4 the token lock
    (so that an orphaned run keeps the token locked), 5 the watchdog's pipe. Before: the
    pipe was copied over the lock's descriptor first, and 4 was the pipe too."""
    token, public = keyed
    report = token.home / "process"
    env, args = fake(token, "passthrough")
    env["FAKE_PROCESS"] = str(report)
    result = subprocess.run([str(Path(sys.executable).parent / "lap-pkcs11"), "sign", *args],
                            input=MESSAGE, env=env, cwd=token.home, capture_output=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    verify(public, MESSAGE, gateway_decode(result.stdout))
    fds = dict(line.split(" ", 1) for line in recorded(report, "fd"))
    assert fds["3"].startswith("/memfd:message"), fds
    assert fds["4"].endswith(".lock"), fds
    assert fds["5"].startswith("pipe:"), fds


@pytest.mark.skipif(os.geteuid() != 0, reason="a time namespace needs root")
def test_the_watchdogs_clock_reads_an_uptime_under_a_second_as_decimal():
    """In a time namespace whose boot was under a second ago (/proc/uptime "0.61 ..."):
    the kill time is counted from 0.61 s, not from octal 061 (0.49 s), and "0.89" is no
    error. Before: bash read the digits as octal (the kill came up to 0.14 s early) or
    stopped the watchdog."""
    from lap_pkcs11.backends import pkcs11_tool

    head = pkcs11_tool.WATCHDOG.split("\nwhile ", 1)[0]
    assert "end=$((" in head
    script = f'{head}\nprintf "%s %s\\n" "$end" "$(cat /proc/uptime)"'
    for _ in range(3):
        # Tenths 5 to 7: octal reads them 10 to 14 hundredths short (0.5x-0.7x), decimal not.
        while not 0.50 <= float(open("/proc/uptime").read().split()[0]) % 1 < 0.72:
            time.sleep(0.01)
        whole = int(float(open("/proc/uptime").read().split()[0]))
        result = subprocess.run(["unshare", "-T", "--boottime", f"-{whole}", "bash", "-c",
                                 script, "watchdog", "1000000", "n", "0"],
                                capture_output=True, text=True, timeout=30)
        if result.returncode != 0 and "unshare" in result.stderr and "end=" not in result.stderr:
            pytest.skip(f"no time namespace here: {result.stderr.strip()}")
        assert result.returncode == 0, result.stderr
        end, after = result.stdout.split()[:2]
        started = int(end) - 1000000  # microseconds of uptime when it read the clock
        assert 0 <= started < 2_000_000
        assert abs(started - float(after) * 1e6) < 50_000, (end, after)
