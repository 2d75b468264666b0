"""Issue 8, the audit's findings, in both implementations (``signer`` is python or shell).

Each test here failed on the code before the fix (or, where one implementation was
already right, on the other). Real SoftHSM2 tokens wherever a token can show the
failure; the FAKE pkcs11-tool (tests/fakes/fake-pkcs11-tool) only to record what
pkcs11-tool was given (environment, descriptors, limits, logins) or to hang.

Everything here must also pass as an ordinary user: files of another user are made
by chown as root and through a user namespace otherwise (conftest.Foreign).
"""

import base64
import json
import os
import random
import re
import resource
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import (FAKE_TOOL, IMPLEMENTATIONS, OTHER_UID, ROOT, USER_PIN, Foreign, Token,
                      assert_failure, gateway_decode, ordinary_user, verify)
from test_sign_errors import fake
from test_sign_process import recorded, wait_for

MESSAGE = b"\x00lap hardening\x00" * 8
LAP = str(Path(sys.executable).parent / "lap-pkcs11")
WRONG = "135790"
CASES = json.loads((ROOT / "tests" / "envfile_cases.json").read_text())
SHELL_ONLY = pytest.mark.skipif("shell" not in IMPLEMENTATIONS, reason="no shell mirror")


def token_is_whole(token):
    """Every object file of the token store still has its bytes (a kill inside SoftHSM2's
    non-atomic rewrite at C_Login leaves token.object empty) and the token still signs."""
    objects = list(token.dir.rglob("*.object"))
    assert objects and all(path.stat().st_size > 0 for path in objects), \
        {path.name: path.stat().st_size for path in objects}


def assert_signs(signer, token, public, args=None):
    result = signer(args or token.args(), MESSAGE, env=token.env, cwd=token.home)
    assert result.returncode == 0, result.stderr
    verify(public, MESSAGE, gateway_decode(result.stdout))


def assert_signed_or_timeout(result, public):
    """Under a tight deadline the only answers are a good signature or one TIMEOUT line."""
    if result.returncode == 0:
        verify(public, MESSAGE, gateway_decode(result.stdout))
    else:
        assert_failure(result, "TIMEOUT", 75)


def private_dir(token):
    return token.home / "run" / f"lap-pkcs11-{os.geteuid()}"


def state_dir(token):
    """An explicit --lock-dir of our own (its files have the same names in every run)."""
    folder = token.home / "state"
    folder.mkdir(mode=0o700, exist_ok=True)
    return folder


# --- A deadline never destroys the token -------------------------------------------------

def test_hundreds_of_tiny_deadlines_leave_the_token_whole(signer, keyed):
    """Before: random 5-60 ms deadlines emptied token.object within 10 to 270 runs."""
    token, public = keyed
    draw = random.Random(8)
    for _ in range(300):
        result = signer([*token.args(), "--timeout-ms", str(draw.randint(5, 60))], MESSAGE,
                        env=token.env, cwd=token.home)
        assert_signed_or_timeout(result, public)
    token_is_whole(token)
    assert_signs(signer, token, public)


def test_deadlines_that_fall_inside_a_run_leave_the_token_whole(signer, keyed):
    """Deadlines long enough to start pkcs11-tool and short enough to fall inside its run:
    the answer is TIMEOUT at once, and the run finishes in the grace."""
    token, public = keyed
    draw = random.Random(80)
    for _ in range(100):
        result = signer([*token.args(), "--timeout-ms", str(draw.randint(40, 150))], MESSAGE,
                        env=token.env, cwd=token.home)
        assert_signed_or_timeout(result, public)
    token_is_whole(token)
    assert_signs(signer, token, public)


@pytest.mark.parametrize("deadline", [[], ["--timeout-ms", "300"]], ids=["default", "300ms"])
def test_rounds_of_64_concurrent_signers_leave_the_token_whole(signer, keyed, deadline):
    """Before: the lock queue ate the default 1500 ms and the deadline killed a login
    (at 300 ms the queue overruns the deadline every time)."""
    token, public = keyed
    args = [*token.args(), *deadline]
    with ThreadPoolExecutor(64) as pool:
        for _ in range(2):
            results = list(pool.map(
                lambda _: signer(args, MESSAGE, env=token.env, cwd=token.home), range(64)))
            for result in results:
                assert_signed_or_timeout(result, public)
            token_is_whole(token)
    assert_signs(signer, token, public)


@pytest.mark.parametrize("key", [["--key-id", "01"], ["--key-label", "lap-key"]])
def test_no_tool_starts_with_less_than_50_ms_left(signer, keyed, key):
    """FAKE passthrough: with a 45 ms deadline no pkcs11-tool run (listing or signature) fits."""
    token, _ = keyed
    record = token.home / "environ"
    env, args = fake(token, "passthrough")
    env["FAKE_ENVIRON"] = str(record)
    args = ["--module", token.module, "--token-label", token.label, *key,
            "--pkcs11-tool", str(FAKE_TOOL), "--timeout-ms", "45"]
    for _ in range(5):
        assert_failure(signer(args, MESSAGE, env=env, cwd=token.home), "TIMEOUT", 75)
        assert not record.exists(), "pkcs11-tool was started with less than 50 ms left"


# --- The PIN guard holds under concurrency ----------------------------------------------

def test_eight_concurrent_callers_with_a_wrong_pin_make_one_login(signer, keyed):
    """FAKE passthrough counts the runs with --login. Before: 8 of 8 (shell), 2 of 8 (python)."""
    token, _ = keyed
    logins = token.home / "logins"
    env, args = fake(token, "passthrough")
    env.update(FAKE_LOGINS=str(logins), PKCS11_PIN=WRONG)
    args = [*args, "--timeout-ms", "20000"]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: signer(args, MESSAGE, env=env, cwd=token.home),
                                range(8)))
    for result in results:
        assert_failure(result, "PIN_INCORRECT", 77, pin=WRONG)
    assert len(logins.read_text().splitlines()) == 1, logins.read_text()


# --- stdin is read under the deadline ----------------------------------------------------

@pytest.mark.parametrize("encoding", ["raw", "base64"])
def test_a_trickling_stdin_writer_gets_timeout(signer, keyed, encoding):
    """A byte every 50 ms, never closed. Before: the signer waited as long as the writer."""
    token, _ = keyed
    proc = subprocess.Popen([*signer.argv, *token.args(), "--input", encoding,
                             "--timeout-ms", "600"], env=token.env, cwd=token.home,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    writing = {"until": time.monotonic() + 20, "outlived": False}

    def trickle():
        try:
            while time.monotonic() < writing["until"] and proc.poll() is None:
                os.write(proc.stdin.fileno(), b"Q")
                time.sleep(0.05)
            writing["outlived"] = proc.poll() is not None
        except BrokenPipeError:
            writing["outlived"] = True

    writer = threading.Thread(target=trickle)
    writer.start()
    proc.wait(timeout=60)
    writer.join()
    proc.stdin.close()
    stdout, stderr = proc.stdout.read(), proc.stderr.read()
    assert writing["outlived"], "the signer waited for the writer instead of its deadline"
    assert_failure(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr),
                   "TIMEOUT", 75)


def blocked_on_stdin(pid):
    """Whether the process waits for input (in a pipe read or a poll on it)."""
    try:
        with open(f"/proc/{pid}/wchan") as handle:  # e.g. "poll_schedule_timeout.constprop.0"
            return handle.read().split(".")[0] in ("pipe_read", "anon_pipe_read", "do_sys_poll",
                                                   "poll_schedule_timeout", "do_select")
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("sig", ["INT", "TERM", "HUP"])
def test_a_signal_while_stdin_is_read_is_one_line(signer, keyed, sig):
    """Before: SIGINT gave a KeyboardInterrupt traceback (python); bash died of the signal."""
    token, _ = keyed
    proc = subprocess.Popen([*signer.argv, *token.args(), "--timeout-ms", "30000"],
                            env=token.env, cwd=token.home, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert wait_for(lambda: blocked_on_stdin(proc.pid)), "the signer never read stdin"
    proc.send_signal(getattr(signal, "SIG" + sig))
    stdout, stderr = proc.communicate(timeout=10)
    result = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    assert_failure(result, "SIGNING_FAILED", 70)
    assert f"interrupted by SIG{sig}".encode() in stderr


# --- stdout and stderr closed, full or broken --------------------------------------------

def test_a_closed_stdout_fails_before_anything_is_signed(signer, keyed):
    token, _ = keyed
    logins = token.home / "logins"
    env, args = fake(token, "passthrough")
    env["FAKE_LOGINS"] = str(logins)
    result = subprocess.run(["bash", "-c", 'exec >&-; exec "$@"', "bash", *signer.argv, *args],
                            input=MESSAGE, env=env, cwd=token.home, capture_output=True,
                            timeout=60)
    assert_failure(result, "SIGNING_FAILED", 70)
    assert b"stdout is closed" in result.stderr
    assert not logins.exists(), "the token was asked to sign for a closed stdout"


@pytest.mark.parametrize("output", ["base64", "raw"])
def test_a_full_stdout_is_one_line(signer, keyed, output):
    """Before (shell): exit 1 with bash's own 'printf: write error' line."""
    token, _ = keyed
    with open("/dev/full", "wb") as full:
        result = subprocess.run([*signer.argv, *token.args(), "--output", output],
                                input=MESSAGE, env=token.env, cwd=token.home, stdout=full,
                                stderr=subprocess.PIPE, timeout=60)
    assert_failure(subprocess.CompletedProcess(result.args, result.returncode, b"",
                                               result.stderr), "SIGNING_FAILED", 70)
    assert b"stdout cannot be written (" in result.stderr


def test_a_broken_stdout_pipe_is_one_line(signer, keyed):
    """Before (shell): death by SIGPIPE, no line."""
    token, _ = keyed
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = subprocess.run([*signer.argv, *token.args()], input=MESSAGE, env=token.env,
                                cwd=token.home, stdout=write_end, stderr=subprocess.PIPE,
                                timeout=60)
    finally:
        os.close(write_end)
    assert_failure(subprocess.CompletedProcess(result.args, result.returncode, b"",
                                               result.stderr), "SIGNING_FAILED", 70)
    assert b"stdout cannot be written (" in result.stderr


def test_a_broken_stderr_keeps_the_exit_code(signer, keyed):
    """Before (shell): death by SIGPIPE on the error line (exit -13, not 64)."""
    token, public = keyed
    for args, code in (([*token.args(), "--timeout-ms", "soon"], 64), (token.args(), 0)):
        read_end, write_end = os.pipe()
        os.close(read_end)
        try:
            result = subprocess.run([*signer.argv, *args], input=MESSAGE, env=token.env,
                                    cwd=token.home, stdout=subprocess.PIPE, stderr=write_end,
                                    timeout=60)
        finally:
            os.close(write_end)
        assert result.returncode == code
        if code:
            assert result.stdout == b""
        else:
            verify(public, MESSAGE, gateway_decode(result.stdout))


INTERNAL_ERROR = (b"lap-pkcs11: SIGNING_FAILED: internal error (RuntimeError); rerun with "
                  b"--debug and report it\n")


def with_planted_bug(where):
    """``lap-pkcs11 sign`` (the rest of the argv) with a bug planted in place of
    ``sign_command.<where>``: it raises RuntimeError('planted bug')."""
    code = ("import sys\n"
            "from lap_pkcs11.per_signature import sign_command\n"
            "def planted(*args):\n"
            "    raise RuntimeError('planted bug')\n"
            f"sign_command.{where} = planted\n"
            "from lap_pkcs11.entry import main\n"
            "sys.argv = ['lap-pkcs11', 'sign', *sys.argv[1:]]\n"
            "main()\n")
    return [sys.executable, "-I", "-c", code]


@pytest.mark.parametrize("stderr_closed", [False, True])
def test_a_debug_traceback_goes_to_stderr_never_to_stdout(keyed, stderr_closed):
    """An internal error (a bug planted in the signer) with --debug: the traceback and
    the one line on stderr; with stderr closed from the start, stdout still stays
    empty (the traceback once went through print(), to stdout, when sys.stderr was
    None)."""
    token, _ = keyed
    argv = [*with_planted_bug("sign"), "--debug", *token.args()]
    if stderr_closed:
        argv = ["bash", "-c", 'exec 2>&-; exec "$@"', "bash", *argv]
    result = subprocess.run(argv, input=MESSAGE, env=token.env, cwd=token.home,
                            capture_output=True, timeout=60)
    assert (result.returncode, result.stdout) == (70, b"")
    if not stderr_closed:
        assert b"RuntimeError: planted bug" in result.stderr
        assert result.stderr.endswith(INTERNAL_ERROR)


@pytest.mark.parametrize("debug", [False, True])
def test_a_bug_while_reading_the_options_shows_a_traceback_only_with_debug(keyed, debug):
    """A bug planted in the option parser itself: --debug (seen before the parser ran)
    decides the traceback; the one line comes either way."""
    token, _ = keyed
    argv = [*with_planted_bug("parse_args"), *token.args(), *(["--debug"] if debug else [])]
    result = subprocess.run(argv, input=MESSAGE, env=token.env, cwd=token.home,
                            capture_output=True, timeout=60)
    assert (result.returncode, result.stdout) == (70, b"")
    assert (b"RuntimeError: planted bug" in result.stderr) == debug, result.stderr
    assert result.stderr.endswith(INTERNAL_ERROR)


def test_serve_help_on_a_full_stdout_is_one_line():
    """Before: a traceback and exit 1 (serve --help wrote before the command's set-up)."""
    with open("/dev/full", "wb") as full:
        result = subprocess.run([LAP, "serve", "--help"], stdout=full, stderr=subprocess.PIPE,
                                timeout=60)
    assert result.returncode == 70
    assert result.stderr.startswith(b"lap-pkcs11: SIGNING_FAILED: stdout cannot be written (")
    assert result.stderr.count(b"\n") == 1


# --- What the signer inherits ------------------------------------------------------------

def test_the_shell_mirror_neither_traces_nor_takes_inherited_shell_options(keyed):
    """Before: SHELLOPTS=xtrace traced every line, the PIN file's PIN included."""
    token, public = keyed
    shell = IMPLEMENTATIONS["shell"]()
    pin_file = token.home / "pin"
    pin_file.write_text(USER_PIN + "\n")
    pin_file.chmod(0o600)
    env = {k: v for k, v in token.env.items() if k != "PKCS11_PIN"}
    env.update(SHELLOPTS="xtrace:allexport:noclobber", BASHOPTS="failglob:nocasematch",
               PS4="+ pin=$(cat " + str(pin_file) + ") ", BASH_XTRACEFD="2")
    args = [*token.args(), "--pin-file", str(pin_file)]
    result = shell(args, MESSAGE, env=env, cwd=token.home)
    assert result.returncode == 0, result.stderr
    assert result.stderr == b""
    verify(public, MESSAGE, gateway_decode(result.stdout))
    pin_file.write_text(WRONG + "\n")
    failed = shell(args, MESSAGE, env=env, cwd=token.home)
    assert_failure(failed, "PIN_INCORRECT", 77, pin=WRONG)


def test_inherited_descriptors_never_reach_the_tool(signer, keyed):
    """1100 stray descriptors. Before: python failed in select(), bash aborted
    ('bit out of range 0 - FD_SETSIZE'), and pkcs11-tool got every one of them."""
    token, public = keyed
    report = token.home / "process"
    env, args = fake(token, "passthrough")
    env["FAKE_PROCESS"] = str(report)
    stray = token.home / "stray"
    stray.write_bytes(b"")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1200:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(4096, hard), hard))
    fds = [os.open(stray, os.O_RDONLY) for _ in range(1100)]
    try:
        result = subprocess.run([*signer.argv, *args], input=MESSAGE, env=env, cwd=token.home,
                                capture_output=True, pass_fds=fds, timeout=60)
    finally:
        for fd in fds:
            os.close(fd)
    assert result.returncode == 0, result.stderr
    verify(public, MESSAGE, gateway_decode(result.stdout))
    seen = recorded(report, "fd")
    assert not [line for line in seen if str(stray) in line], "a stray descriptor reached the tool"
    assert max(int(line.split()[0]) for line in seen) < 300, seen


@pytest.mark.parametrize("soft", ["hard", "zero"])
def test_the_tool_runs_with_no_core_dumps(signer, keyed, soft):
    """A core of the signer or of pkcs11-tool would hold the PIN. Before: unlimited. The
    soft limit starts at the hard one, or at 0 (most hosts' default) below a hard one
    that is not: then the signer leaves it, and still ends with both at 0."""
    token, public = keyed
    report = token.home / "process"
    env, args = fake(token, "passthrough")
    env["FAKE_PROCESS"] = str(report)

    def allow_cores():
        limit = resource.getrlimit(resource.RLIMIT_CORE)[1]
        resource.setrlimit(resource.RLIMIT_CORE, (limit if soft == "hard" else 0, limit))

    result = subprocess.run([*signer.argv, *args], input=MESSAGE, env=env, cwd=token.home,
                            capture_output=True, preexec_fn=allow_cores, timeout=60)
    assert result.returncode == 0, result.stderr
    # The shell mirror runs the tool under timeout(1); Python starts it itself, with a watchdog.
    if signer.name == "shell":
        assert recorded(report, "parent") == ["timeout"]
    else:
        assert recorded(report, "parent") != ["timeout"]
    assert recorded(report, "core") == ["0"]
    if soft == "hard" or signer.name == "shell":
        assert recorded(report, "signer_core") == ["0/0"]
    else:  # the hard limit follows while the tool starts (finish_hardening): a race to see
        assert recorded(report, "signer_core")[0].startswith("0/")


@SHELL_ONLY
def test_the_tool_chain_takes_timeout_from_coreutils_not_from_path(keyed):
    """The shell mirror's program that may kill pkcs11-tool's group is /usr/bin/timeout,
    whatever PATH says."""
    signer = IMPLEMENTATIONS["shell"]()
    token, public = keyed
    bin_dir = token.home / "bin"
    bin_dir.mkdir()
    marker = token.home / "impostor-ran"
    impostor = bin_dir / "timeout"
    impostor.write_text(f'#!/bin/sh\ntouch {marker}\nexec /usr/bin/timeout "$@"\n')
    impostor.chmod(0o755)
    env = dict(token.env, PATH=f"{bin_dir}:{token.env['PATH']}")
    result = signer(token.args(), MESSAGE, env=env, cwd=token.home)
    assert result.returncode == 0, result.stderr
    verify(public, MESSAGE, gateway_decode(result.stdout))
    assert not marker.exists(), "a timeout from PATH ran pkcs11-tool"


def test_one_lock_per_module_file_whatever_path_names_it(signer, keyed):
    """32 concurrent signs, half through a symlink to the module. Before: two locks, two
    pkcs11-tool runs at once on one token, and TOKEN_NOT_FOUND."""
    token, public = keyed
    link = token.home / "module-link.so"
    link.symlink_to(token.module)
    direct = [*token.args(), "--timeout-ms", "30000"]
    linked = [str(link) if arg == token.module else arg for arg in direct]
    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(lambda args: signer(args, MESSAGE, env=token.env,
                                                     cwd=token.home), [direct, linked] * 16))
    for result in results:
        assert result.returncode == 0, result.stderr
        verify(public, MESSAGE, gateway_decode(result.stdout))
    module = os.stat(token.module)
    locks = [path.name for path in private_dir(token).iterdir() if path.name.endswith(".lock")]
    assert len(locks) == 1 and locks[0].startswith(f"{module.st_dev}-{module.st_ino}-"), locks


@pytest.mark.parametrize("conf", ["file", "no such file", "unset"])
def test_the_shell_and_python_lock_and_guard_names_are_one(keyed, conf):
    """Both name the lock and the guard after the module file and the SoftHSM2
    configuration file (device and inode), or the configuration's spelling when it names
    no file, so that they serialise against each other and share the guard."""
    token, _ = keyed
    env = dict(token.env, PKCS11_PIN=WRONG)
    module = os.stat(token.module)
    base = f"{module.st_dev}-{module.st_ino}"
    if conf == "file":
        info = os.stat(token.conf)
        base += f"-{info.st_dev}-{info.st_ino}"
    elif conf == "no such file":
        env["SOFTHSM2_CONF"] = str(token.home / "no such\tfile \u00e9.conf")
        base += "-" + re.sub(rb"[^A-Za-z0-9._-]", b"_", env["SOFTHSM2_CONF"].encode()).decode()
    else:
        del env["SOFTHSM2_CONF"]
    names = set()
    for make in IMPLEMENTATIONS.values():
        shutil.rmtree(private_dir(token), ignore_errors=True)
        make()(token.args(), MESSAGE, env=env, cwd=token.home)
        names.add(tuple(sorted(path.name for path in private_dir(token).iterdir())))
    assert len(names) == 1, names
    found = set(names.pop())
    assert f"{base}.lock" in found and found <= {f"{base}.lock", f"{base}.pin-rejected", "secret"}


# --- Files the operator names: env file and PIN file -------------------------------------

@pytest.mark.parametrize("case", CASES, ids=[case["name"] for case in CASES])
def test_the_env_file_grammar_is_one_for_every_reader(signer, token, case):
    """tests/envfile_cases.json: what the signer hands pkcs11-tool (FAKE, exact environment
    and argv) or the line it refuses. Before: python sign, the shell mirror and config
    (python-dotenv) read \\v, \\f, \\x1c-\\x1e, U+0085, U+2028/9 and a bare CR three ways."""
    env_file = token.home / "case.env"
    env_file.write_bytes(base64.b64decode(case["content_b64"]))
    environ = token.home / "environ"
    env = dict(token.env, FAKE_MODE="garbage", FAKE_ENVIRON=str(environ))
    expect = case["expect"] or {}
    args = ["--module", token.module, "--pkcs11-tool", str(FAKE_TOOL), "--env-file",
            str(env_file)]
    if "LAP_PKCS11_KEY_ID" not in expect:
        args += ["--key-id", "01"]
    result = signer(args, MESSAGE, env=env, cwd=token.home)
    if case["error_line"] is not None:
        assert_failure(result, "CONFIG_INVALID", 64)
        assert re.search(rb"\bline %d\b" % case["error_line"], result.stderr), result.stderr
        assert not environ.exists()
        return
    assert_failure(result, "SIGNING_FAILED", 70)  # the FAKE's garbage: it did run
    seen = dict(item.split(b"=", 1) for item in environ.read_bytes().split(b"\0") if item)
    seen = {key.decode(): value.decode("utf-8", "surrogateescape") for key, value in seen.items()}
    added = set(seen) - set(env) - {"_", "SHLVL", "PWD", "OLDPWD"}
    assert added == set(expect)
    assert {key: seen[key] for key in expect} == expect
    argv = Path(f"{environ}.argv").read_bytes().split(b"\0")
    if "LAP_PKCS11_KEY_ID" in expect:
        wanted = expect["LAP_PKCS11_KEY_ID"].lower().replace(":", "")
        assert argv[argv.index(b"--id") + 1] == wanted.encode()
    if "LAP_PKCS11_TOKEN_LABEL" in expect:
        label = expect["LAP_PKCS11_TOKEN_LABEL"].encode("utf-8", "surrogateescape")
        assert argv[argv.index(b"--token-label") + 1] == label


@pytest.mark.parametrize("extra", [0, 1])
def test_an_env_file_over_1_mib_is_refused_not_cut(signer, keyed, extra):
    """Before: python read the first MiB and obeyed it; the shell read it all. A file of
    exactly 1 MiB is read to its last byte (its last line, without a line end, asks for
    hex output: a read one byte short would leave "he")."""
    token, public = keyed
    last = b"LAP_PKCS11_OUTPUT=hex"
    body = b"CASE_A=1\n" + b"#" * 1023 + b"\n"
    data = body * ((1 << 20) // len(body))
    data += b"#" * ((1 << 20) - len(data) - len(last) - 1) + b"\n" + last
    assert len(data) == 1 << 20
    env_file = token.home / "big.env"
    env_file.write_bytes(data + b"\nCASE_B=2" * extra)
    result = signer([*token.args(), "--env-file", str(env_file)], MESSAGE, env=token.env,
                    cwd=token.home)
    if extra:
        assert_failure(result, "CONFIG_INVALID", 64)
        assert str(env_file).encode() in result.stderr
    else:
        assert result.returncode == 0, result.stderr
        assert result.stdout.endswith(b"\n") and len(result.stdout) == 129, result.stdout
        verify(public, MESSAGE, bytes.fromhex(result.stdout.decode()))


@pytest.mark.parametrize("which", ["env file", "PIN file"])
@pytest.mark.parametrize("kind", ["fifo", "directory", "device"])
def test_a_named_file_that_is_not_a_regular_file_is_refused_at_once(signer, keyed, which, kind):
    """Before: python hung on a FIFO past its deadline and read /dev/null as an empty file."""
    token, _ = keyed
    path = {"fifo": token.home / "fifo", "directory": token.home, "device": Path("/dev/null")}[kind]
    if kind == "fifo":
        os.mkfifo(path, 0o600)
    env = {k: v for k, v in token.env.items() if k != "PKCS11_PIN"} if which == "PIN file" \
        else token.env
    flag = "--env-file" if which == "env file" else "--pin-file"
    result = signer([*token.args(), flag, str(path), "--timeout-ms", "3000"], MESSAGE, env=env,
                    cwd=token.home, timeout=20)
    assert_failure(result, "CONFIG_INVALID", 64)
    assert b"not a regular file" in result.stderr


def test_another_users_env_file_is_refused(signer, keyed):
    """Before: obeyed, whoever owned it (LAP_PKCS11_TOOL from another user ran with the PIN)."""
    token, _ = keyed
    foreign = Foreign(token.home)
    env_file = foreign.plant(token.home / "theirs.env",
                             f"LAP_PKCS11_TOOL={FAKE_TOOL}\n".encode())
    result = foreign.wrap(signer)([*token.args(), "--env-file", str(env_file)], MESSAGE,
                                  env=dict(token.env, FAKE_MODE="garbage"), cwd=token.home)
    assert_failure(result, "CONFIG_INVALID", 64)
    assert str(env_file).encode() in result.stderr and str(OTHER_UID).encode() in result.stderr


@pytest.mark.parametrize("mode", [0o666, 0o620, 0o602])
def test_an_env_file_others_may_write_is_refused(signer, keyed, mode):
    token, _ = keyed
    env_file = token.home / "loose.env"
    env_file.write_text(f"LAP_PKCS11_TOOL={FAKE_TOOL}\n")
    env_file.chmod(mode)
    result = signer([*token.args(), "--env-file", str(env_file)], MESSAGE,
                    env=dict(token.env, FAKE_MODE="garbage"), cwd=token.home)
    assert_failure(result, "CONFIG_INVALID", 64)
    assert b"chmod go-w" in result.stderr


@pytest.mark.parametrize("mode,good", [(0o600, True), (0o640, True), (0o644, False),
                                       (0o604, False), (0o660, False)])
def test_a_pin_file_must_be_private(signer, keyed, mode, good):
    token, public = keyed
    pin_file = token.home / "pin"
    pin_file.write_text(USER_PIN + "\n")
    pin_file.chmod(mode)
    env = {k: v for k, v in token.env.items() if k != "PKCS11_PIN"}
    result = signer([*token.args(), "--pin-file", str(pin_file)], MESSAGE, env=env,
                    cwd=token.home)
    if good:
        assert result.returncode == 0, result.stderr
        verify(public, MESSAGE, gateway_decode(result.stdout))
    else:
        assert_failure(result, "CONFIG_INVALID", 64)
        assert str(pin_file).encode() in result.stderr


def test_an_oversized_pin_file_is_refused(signer, keyed):
    token, _ = keyed
    pin_file = token.home / "pin"
    pin_file.write_text(USER_PIN + "\n" + "#" * 4096)
    pin_file.chmod(0o600)
    env = {k: v for k, v in token.env.items() if k != "PKCS11_PIN"}
    result = signer([*token.args(), "--pin-file", str(pin_file)], MESSAGE, env=env,
                    cwd=token.home)
    assert_failure(result, "CONFIG_INVALID", 64)


# --- The private lock directory and the files in it --------------------------------------

@pytest.mark.parametrize("mode", [0o777, 0o1777, 0o770, 0o702])
def test_a_lock_directory_others_may_write_is_refused(signer, keyed, mode):
    """Before: /tmp (1777) was the default and any directory was taken."""
    token, _ = keyed
    shared = token.home / "shared"
    shared.mkdir()
    shared.chmod(mode)
    result = signer([*token.args(), "--lock-dir", str(shared)], MESSAGE, env=token.env,
                    cwd=token.home)
    assert_failure(result, "CONFIG_INVALID", 64)
    assert str(shared).encode() in result.stderr
    assert list(shared.iterdir()) == [], "files were made in a directory others can write"


@pytest.mark.parametrize("mode,good", [(0o777, False), (0o1777, True), (0o755, True)])
def test_the_lock_directorys_parents_must_be_safe(signer, keyed, mode, good):
    """A parent that others may write (not sticky) lets them swap the private directory
    between its check and its use. Before: not looked at."""
    token, public = keyed
    parent = token.home / "parent"
    parent.mkdir()
    folder = parent / "state"
    folder.mkdir(mode=0o700)
    parent.chmod(mode)
    result = signer([*token.args(), "--lock-dir", str(folder)], MESSAGE, env=token.env,
                    cwd=token.home)
    if good:
        assert result.returncode == 0, result.stderr
        verify(public, MESSAGE, gateway_decode(result.stdout))
    else:
        assert_failure(result, "CONFIG_INVALID", 64)
        assert str(parent).encode() in result.stderr


def test_the_guard_remembers_several_pins_across_implementations(keyed):
    """FAKE passthrough counts logins: two rejected PINs are both remembered, whichever
    implementation wrote the guard, and neither reaches the token again."""
    token, _ = keyed
    logins = token.home / "logins"
    env, args = fake(token, "passthrough")
    env["FAKE_LOGINS"] = str(logins)
    first, second = IMPLEMENTATIONS["python"](), IMPLEMENTATIONS["shell"]()
    for run, pin in ((first, WRONG), (second, "975310"), (first, "975310"), (second, WRONG),
                     (first, WRONG)):
        assert_failure(run(args, MESSAGE, env=dict(env, PKCS11_PIN=pin), cwd=token.home),
                       "PIN_INCORRECT", 77, pin=pin)
    assert len(logins.read_text().splitlines()) == 2, logins.read_text()
    (marker,) = private_dir(token).glob("*.pin-rejected")
    assert len(marker.read_text().split()) == 2


def test_the_default_lock_directory_is_made_private(signer, keyed):
    token, public = keyed
    assert_signs(signer, token, public)
    folder = private_dir(token)
    assert stat.S_IMODE(folder.lstat().st_mode) == 0o700
    for path in folder.iterdir():
        assert stat.S_IMODE(path.lstat().st_mode) == 0o600, path


@pytest.mark.parametrize("how", ["world-writable", "symlink", "foreign"])
def test_a_planted_default_lock_directory_is_refused(signer, keyed, how):
    """Another user pre-creates lap-pkcs11-<uid> in a shared base such as /tmp."""
    token, _ = keyed
    base = token.home / "base"
    base.mkdir()
    base.chmod(0o1777)
    planted = base / f"lap-pkcs11-{os.geteuid()}"
    argv = signer
    if how == "world-writable":
        planted.mkdir()
        planted.chmod(0o777)
    elif how == "symlink":
        planted.symlink_to(state_dir(token))
    else:
        foreign = Foreign(token.home)
        planted = foreign.plant_dir(base / f"lap-pkcs11-{Foreign.EUID}")
        argv = foreign.wrap(signer)
    result = argv(token.args(), MESSAGE, env=dict(token.env, XDG_RUNTIME_DIR=str(base)),
                  cwd=token.home)
    assert_failure(result, "CONFIG_INVALID", 64)
    assert b"lap-pkcs11-" in result.stderr


def lock_and_marker(signer, token, folder):
    """Run once with a wrong PIN so that the lock file and the marker exist; return them."""
    args = [*token.args(), "--lock-dir", str(folder)]
    signer(args, MESSAGE, env=dict(token.env, PKCS11_PIN=WRONG), cwd=token.home)
    (lock,) = folder.glob("*.lock")
    (marker,) = folder.glob("*.pin-rejected")
    return args, lock, marker


@pytest.mark.parametrize("target", ["lock", "marker"])
@pytest.mark.parametrize("how", ["fifo", "symlink", "loose mode", "directory"])
def test_a_state_file_that_is_not_our_private_file_is_refused(signer, keyed, target, how):
    """Before: a FIFO marker hung the shell, a symlinked marker was silently ignored, a
    FIFO lock was locked, modes were not looked at."""
    token, _ = keyed
    folder = state_dir(token)
    args, lock, marker = lock_and_marker(signer, token, folder)
    path = lock if target == "lock" else marker
    elsewhere = token.home / "elsewhere"
    if how == "loose mode":
        path.chmod(0o644)
    else:
        path.unlink()
        if how == "fifo":
            os.mkfifo(path, 0o600)
        elif how == "symlink":
            elsewhere.write_text("x\n")
            elsewhere.chmod(0o600)
            path.symlink_to(elsewhere)
        else:
            path.mkdir(mode=0o700)
    result = signer(args, MESSAGE, env=token.env, cwd=token.home, timeout=20)
    assert_failure(result, "CONFIG_INVALID", 64)
    assert str(path).encode() in result.stderr
    if how == "symlink":
        assert elsewhere.read_text() == "x\n"


def test_a_foreign_marker_is_refused_not_obeyed(signer, keyed):
    """Before: every signature became SIGNING_FAILED (PermissionError) in python, and the
    guard was silently off in the shell."""
    token, _ = keyed
    folder = state_dir(token)
    args, _, marker = lock_and_marker(signer, token, folder)
    marker.unlink()
    foreign = Foreign(token.home)
    foreign.plant(marker, b"0" * 64 + b"\n")
    result = foreign.wrap(signer)(args, MESSAGE, env=token.env, cwd=token.home)
    assert_failure(result, "CONFIG_INVALID", 64)
    assert str(marker).encode() in result.stderr


def test_a_foreign_secret_is_never_used_or_written_through(signer, keyed):
    """Before: with another user's secret (and a marker they could read) the rejected PIN
    could be brute-forced from its hash."""
    token, _ = keyed
    folder = state_dir(token)
    foreign = Foreign(token.home)
    secret = foreign.plant(folder / "secret", b"ab" * 32 + b"\n")
    before = secret.read_bytes()
    result = foreign.wrap(signer)([*token.args(), "--lock-dir", str(folder)], MESSAGE,
                                  env=dict(token.env, PKCS11_PIN=WRONG), cwd=token.home)
    assert_failure(result, "CONFIG_INVALID", 64, pin=WRONG)
    assert str(secret).encode() in result.stderr
    assert not list(folder.glob("*.pin-rejected")), "a marker was made from a foreign secret"
    assert secret.read_bytes() == before


# --- Any user ----------------------------------------------------------------------------

def reachable_by_others(path):
    """Whether any user can run ``path``: every directory above it searchable by others
    and the file itself readable and executable by them (a script needs both)."""
    for folder in path.parents:
        if not folder.stat().st_mode & 0o001:
            return False
    return path.stat().st_mode & 0o005 == 0o005


def test_signs_as_an_ordinary_user(signer):
    """Before (shell): bash 5.2 makes here-string files 0400, and the script wrote into them:
    '/dev/fd/N: Permission denied', INPUT_INVALID, on every call as non-root."""
    home = Path(tempfile.mkdtemp(prefix="lap-ordinary-", dir="/tmp"))
    try:
        home.chmod(0o755)
        if os.geteuid() == 0 and not all(reachable_by_others(Path(path))
                                         for path in signer.argv if path.startswith("/")):
            pytest.skip("this checkout is not readable by other users (CI clones it under a "
                        "private directory); CI's second phase runs this test as an ordinary "
                        "user from a readable copy")
        token = Token(home)
        public = token.keygen()
        prefix, uid = ordinary_user(home)
        env = dict(token.env, HOME=str(home))
        for encoding in ("raw", "base64"):
            stdin = MESSAGE if encoding == "raw" else base64.b64encode(MESSAGE) + b"\n"
            result = subprocess.run([*prefix, *signer.argv, *token.args(), "--input", encoding],
                                    input=stdin, env=env, cwd=home, capture_output=True,
                                    timeout=60)
            assert result.returncode == 0, result.stderr
            verify(public, MESSAGE, gateway_decode(result.stdout))
        assert (home / "run" / f"lap-pkcs11-{uid}").stat().st_uid == uid
    finally:
        shutil.rmtree(home, ignore_errors=True)


# --- Review 2 of the shell mirror ----------------------------------------------------------

def full_pipe():
    """A pipe of 4096 bytes, already full, that nobody reads."""
    read_end, write_end = os.pipe()
    import fcntl
    fcntl.fcntl(write_end, 1031, 4096)  # F_SETPIPE_SZ
    os.write(write_end, b"x" * 4096)
    return read_end, write_end


def test_a_full_stdout_pipe_nobody_reads_is_one_line_and_frees_the_lock(signer, keyed):
    """Before (shell): blocked in write forever, holding the token lock."""
    token, public = keyed
    read_end, write_end = full_pipe()
    try:
        proc = subprocess.Popen([*signer.argv, *token.args()], env=token.env, cwd=token.home,
                                stdin=subprocess.PIPE, stdout=write_end, stderr=subprocess.PIPE)
        try:
            _, stderr = proc.communicate(MESSAGE, timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            pytest.fail("the signer hung on a full stdout")
    finally:
        os.close(write_end)
        assert os.read(read_end, 8192) == b"x" * 4096, "a partial signature was written"
        os.close(read_end)
    assert_failure(subprocess.CompletedProcess(proc.args, proc.returncode, b"", stderr),
                   "SIGNING_FAILED", 70)
    assert b"stdout cannot be written (nobody reads it)" in stderr
    assert_signs(signer, token, public, [*token.args(), "--timeout-ms", "1000"])


def test_a_signal_after_the_signature_is_ready_changes_nothing(signer, keyed):
    """The signature is ready and stdout is slow: a SIGTERM then is ignored and the
    signature is printed. Before (shell): the signature and an error line, exit 70."""
    token, public = keyed
    done = token.home / "tool-done"
    env, args = fake(token, "passthrough-done")
    env["FAKE_DONE"] = str(done)
    read_end, write_end = full_pipe()
    try:
        proc = subprocess.Popen([*signer.argv, *args], env=env, cwd=token.home,
                                stdin=subprocess.PIPE, stdout=write_end, stderr=subprocess.PIPE)
        proc.stdin.write(MESSAGE)
        proc.stdin.close()
        assert wait_for(done.exists), "pkcs11-tool never finished"
        time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert os.read(read_end, 4096) == b"x" * 4096
        os.close(write_end)
        write_end = None
        proc.wait(timeout=10)
        stdout = b""
        while chunk := os.read(read_end, 4096):
            stdout += chunk
    finally:
        if write_end is not None:
            os.close(write_end)
        os.close(read_end)
    stderr = proc.stderr.read()
    assert (proc.returncode, stderr) == (0, b"")
    verify(public, MESSAGE, gateway_decode(stdout))


@pytest.mark.parametrize("where", ["environment", "env file"])
def test_the_signers_own_names_are_not_taken_from_outside(signer, keyed, where):
    """HELPER, DECODER, PIN_FD and the like are the shell mirror's internal variables.
    Before: HELPER=<pid> in the environment or the env file got that process killed,
    DECODER=1 turned a good message into INPUT_INVALID."""
    token, public = keyed
    victim = subprocess.Popen(["sleep", "60"])
    try:
        names = {"HELPER": str(victim.pid), "DECODER": "1", "LOCKER": str(victim.pid),
                 "STDOUT_CLOSED": "1", "PIN_FD": "0", "STAT_FD": "0", "LOCK_FD": "0",
                 "TOOL_PID": str(victim.pid)}
        env, args = dict(token.env), token.args()
        if where == "env file":
            env_file = token.home / "signer.env"
            env_file.write_text("".join(f"{k}={v}\n" for k, v in names.items()))
            env_file.chmod(0o600)
            args = [*args, "--env-file", str(env_file)]
        else:
            env.update(names)
        message = token.home / "message"
        message.write_bytes(MESSAGE)
        with open(message, "rb") as stdin:  # a regular file: no stdin alarm of our own
            result = signer(args, env=env, cwd=token.home, stdin=stdin)
        assert result.returncode == 0, result.stderr
        verify(public, MESSAGE, gateway_decode(result.stdout))
        assert victim.poll() is None, "the signer killed a process named in its environment"
    finally:
        victim.kill()
        victim.wait()


@SHELL_ONLY
@pytest.mark.parametrize("how,env", [
    ("path", {"SHELLOPTS": "noexec"}),
    ("path", {"SHELLOPTS": "verbose:onecmd"}),
    ("path", {"BASHOPTS": "extdebug", "BASH_ENV": "/dev/null/x"}),
    ("bash", {"BASHOPTS": "extdebug"}),
    ("bash", {"SHELLOPTS": "xtrace:errtrace", "PS4": "+ "}),
])
def test_no_inherited_shell_option_changes_the_outcome(keyed, how, env):
    """Before: SHELLOPTS=noexec gave exit 0 with no signature; onecmd ran one command
    (exit 0, empty stdout). Through its shebang (bash -p) the script ignores them all;
    `bash script` cannot ignore noexec, onecmd or verbose (they act on the shebang line,
    before any line of ours runs), so those are tested by path only."""
    token, public = keyed
    from conftest import SHELL_SIGNER
    argv = [str(SHELL_SIGNER)] if how == "path" else ["bash", str(SHELL_SIGNER)]
    result = subprocess.run([*argv, *token.args()], input=MESSAGE, env=dict(token.env, **env),
                            cwd=token.home, capture_output=True, timeout=60)
    assert result.returncode == 0, result.stderr
    verify(public, MESSAGE, gateway_decode(result.stdout))
    if how == "bash" and "BASHOPTS" in env:
        # extdebug makes bash look for its debugger before line 1: its own lines only.
        assert all(b"bashdb" in line or b"debugging mode" in line
                   for line in result.stderr.splitlines()), result.stderr
    elif how == "bash" or "SHELLOPTS" not in env and "BASHOPTS" not in env:
        assert result.stderr == b""
    else:
        # bash -p reports the variables it refuses to import; nothing else.
        assert all(line.endswith(b": readonly variable")
                   for line in result.stderr.splitlines()), result.stderr


@SHELL_ONLY
def test_a_signal_during_start_up_is_one_line_or_a_signature(keyed):
    """Before: a signal before the traps were installed (main's, after the whole script
    was read) killed bash with no line. A signal during bash's own start, before it has
    opened the script, cannot be guarded against by the script: not tested."""
    token, public = keyed
    from conftest import SHELL_SIGNER
    draw = random.Random(6)
    for _ in range(200):
        proc = subprocess.Popen(["bash", str(SHELL_SIGNER), *token.args()], env=token.env,
                                cwd=token.home, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        # From the moment bash has opened the script (fd 255): bash's own start before
        # that is no script's to guard.
        script = f"/proc/{proc.pid}/fd/255"
        end = time.monotonic() + 10
        while not os.path.exists(script) and time.monotonic() < end:
            pass
        time.sleep(draw.uniform(0.001, 0.005))
        proc.send_signal(draw.choice([signal.SIGTERM, signal.SIGINT, signal.SIGHUP]))
        stdout, stderr = proc.communicate(MESSAGE, timeout=30)
        result = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
        assert proc.returncode >= 0, f"died of signal {-proc.returncode}"
        if proc.returncode == 0:
            verify(public, MESSAGE, gateway_decode(stdout))
        else:
            assert_failure(result, "SIGNING_FAILED", 70)


@pytest.mark.parametrize("which", ["env file", "PIN file"])
def test_a_fifo_swapped_in_after_the_checks_never_blocks(signer, keyed, which):
    """Another user who may rename entries in the directory swaps a FIFO and a regular
    file under the name. Before (shell): an open of the FIFO blocked forever."""
    token, public = keyed
    folder = token.home / "race"
    folder.mkdir()
    regular = folder / "a"
    regular.write_text("X=1\n" if which == "env file" else USER_PIN + "\n")
    regular.chmod(0o600)
    target = folder / "named"
    stop = threading.Event()

    def swap():
        while not stop.is_set():
            try:
                os.link(regular, folder / "t1")
            except FileExistsError:
                pass
            os.rename(folder / "t1", target)
            if not (folder / "t2").exists():
                os.mkfifo(folder / "t2", 0o600)
            os.rename(folder / "t2", target)

    env = dict(token.env)
    args = [*token.args(), "--timeout-ms", "500"]
    if which == "env file":
        args += ["--env-file", str(target)]
    else:
        env.pop("PKCS11_PIN", None)
        args += ["--pin-file", str(target)]
    swapper = threading.Thread(target=swap)
    swapper.start()
    try:
        for _ in range(60):
            started = time.monotonic()
            try:
                result = signer(args, MESSAGE, env=env, cwd=token.home, timeout=1.5)
            except subprocess.TimeoutExpired:
                pytest.fail("an open blocked past the deadline + 1 s")
            assert time.monotonic() - started < 1.5
            if result.returncode:
                assert_failure(result, "CONFIG_INVALID" if result.returncode == 64
                               else "TIMEOUT", result.returncode)
    finally:
        stop.set()
        swapper.join()


@SHELL_ONLY
def test_a_killed_signers_tool_keeps_the_token_locked(keyed):
    """FAKE wait-go: the signer is SIGKILLed while its slow tool runs; a second signer
    starts its tool only once the first tool has finished. Before: the lock went with
    the signer and the second tool ran beside the first."""
    token, _ = keyed
    shell = IMPLEMENTATIONS["shell"]()
    order = token.home / "order"
    go = token.home / "go"
    env, args = fake(token, "wait-go")
    env.update(FAKE_ORDER=str(order), FAKE_GO=str(go))
    args = [*args, "--timeout-ms", "5000"]
    first = subprocess.Popen([*shell.argv, *args], env=env, cwd=token.home,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
    first.stdin.write(MESSAGE)
    first.stdin.close()
    assert wait_for(lambda: order.exists() and "start" in order.read_text())
    first.kill()
    first.wait()
    second = subprocess.Popen([*shell.argv, *args], env=env, cwd=token.home,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)
    second.stdin.write(MESSAGE)
    second.stdin.close()
    time.sleep(0.5)
    go.touch()
    second.wait(timeout=30)
    events = [line.split()[0] for line in order.read_text().splitlines()]
    assert events[:3] == ["start", "finish", "start"], order.read_text()


def test_an_inherited_ignored_sigchld_changes_nothing(signer, keyed):
    """The caller left SIGCHLD ignored (the kernel then reaps children unasked, and no
    exit status can be read): the signature is made and verifies. Before: the Python
    signer failed with an internal error (ChildProcessError)."""
    token, public = keyed

    def ignore_sigchld():
        signal.signal(signal.SIGCHLD, signal.SIG_IGN)

    result = subprocess.run([*signer.argv, *token.args()], input=MESSAGE, env=token.env,
                            cwd=token.home, capture_output=True, timeout=60,
                            preexec_fn=ignore_sigchld)
    assert result.returncode == 0, result.stderr
    verify(public, MESSAGE, gateway_decode(result.stdout))
