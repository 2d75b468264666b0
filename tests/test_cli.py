"""The conventions a CLI user expects: --version, -h/--help on every command, shell
completion, colour only on a terminal and never with NO_COLOR, usage errors as one line
and exit 64 (like sign's)."""

import os
import pty
import re
import subprocess
import sys
from pathlib import Path

import pytest
import typer

from conftest import SHELL_SIGNER, USER_PIN
from lap_pkcs11 import __version__
from lap_pkcs11.admin.cli import app

LAP = str(Path(sys.executable).parent / "lap-pkcs11")
COMMANDS = sorted(typer.main.get_command(app).commands)
ESC = b"\x1b["


def lap(*args, env=None, **kwargs):
    return subprocess.run([LAP, *args], capture_output=True, timeout=60,
                          env=env or {"PATH": os.environ["PATH"]}, **kwargs)


def test_every_command_is_known_here():
    assert {"sign", "client", "serve", "agent", "agent-status", "config", "pubkey", "keygen",
            "keys", "doctor", "install-units", "files"} <= set(COMMANDS)


@pytest.mark.parametrize("argv", [[LAP, "--version"], [LAP, "sign", "--version"],
                                  ["bash", str(SHELL_SIGNER), "--version"]],
                         ids=["lap-pkcs11", "sign", "shell mirror"])
def test_version(argv):
    result = subprocess.run(argv, capture_output=True, timeout=60, env={"PATH": os.environ["PATH"]})
    assert (result.returncode, result.stdout, result.stderr) == (
        0, f"lap-pkcs11 {__version__}\n".encode(), b"")


@pytest.mark.parametrize("flag", ["-h", "--help"])
@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_on_every_command(command, flag):
    result = lap(*([command] if command else []), flag)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(b"Usage: lap-pkcs11"), result.stdout[:200]
    assert result.stderr == b""


def test_no_command_prints_the_help():
    result = lap()
    assert result.returncode == 0 and result.stdout.startswith(b"Usage: lap-pkcs11")
    assert b"keys" in result.stdout and b"install-units" in result.stdout


@pytest.mark.parametrize("args, command", [
    (["--bogus"], "lap-pkcs11"),
    (["bogus"], "lap-pkcs11"),
    (["pubkey", "--format"], "lap-pkcs11 pubkey"),
    (["keys", "--no-such-option"], "lap-pkcs11 keys"),
    (["config", "--json=yes"], "lap-pkcs11 config"),
    (["doctor", "stray"], "lap-pkcs11 doctor"),
    (["install-units", "--prefix"], "lap-pkcs11 install-units"),
    (["keygen", "--module"], "lap-pkcs11 keygen"),
    (["files", "extra"], "lap-pkcs11 files"),
])
def test_usage_errors_are_one_line_and_64(args, command):
    result = lap(*args)
    assert result.returncode == 64 and result.stdout == b""
    lines = result.stderr.decode().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lap-pkcs11: CONFIG_INVALID: ")
    assert lines[0].endswith(f"; see {command} --help")


def test_completion_of_commands_and_options():
    env = {"PATH": os.environ["PATH"], "_LAP_PKCS11_COMPLETE": "complete_bash",
           "COMP_WORDS": "lap-pkcs11 ke", "COMP_CWORD": "1"}
    assert lap(env=env).stdout.decode().split() == ["keygen", "keys"]
    env.update(COMP_WORDS="lap-pkcs11 keys --js", COMP_CWORD="2")
    assert lap(env=env).stdout.decode().split() == ["--json"]


# typer's switch that makes --show-completion take the shell's name; without it, the
# script is the calling shell's (found among the parent processes), whatever is named.
NAMED_SHELL = {"PATH": os.environ["PATH"], "_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION": "1"}


@pytest.mark.parametrize("shell, marker", [
    ("bash", b"complete -o default -F _lap_pkcs11_completion lap-pkcs11"),
    ("zsh", b"#compdef lap-pkcs11"),
    ("fish", b"complete --command lap-pkcs11"),
])
def test_completion_scripts(shell, marker):
    """Each shell's own script (once the test ran without a shell among its parents, and
    every shell's case printed bash's script, or none)."""
    result = lap("--show-completion", shell, env=NAMED_SHELL)
    assert result.returncode == 0, result.stderr
    assert marker in result.stdout and b"_LAP_PKCS11_COMPLETE" in result.stdout


def test_bash_completion_works_in_bash():
    """The script --show-completion prints, loaded into bash, completes a command."""
    script = lap("--show-completion", "bash", env=NAMED_SHELL).stdout.decode()
    probe = (script + '\nCOMP_WORDS=(lap-pkcs11 install-u); COMP_CWORD=1; '
             '_lap_pkcs11_completion lap-pkcs11; printf "%s\\n" "${COMPREPLY[@]}"')
    result = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, timeout=60,
                            env={"PATH": f"{Path(LAP).parent}:{os.environ['PATH']}"})
    assert result.stdout.split() == ["install-units"], result.stderr


def on_terminal(argv, env):
    """Run ``argv`` with stdout on a new pseudo-terminal; return what it printed there."""
    leader, follower = pty.openpty()
    try:
        proc = subprocess.Popen(argv, stdout=follower, stderr=subprocess.PIPE, env=env,
                                stdin=subprocess.DEVNULL)
        os.close(follower)
        out = b""
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the terminal's other side is closed
                break
            if not chunk:
                break
            out += chunk
        proc.wait(timeout=120)
        return proc.returncode, out
    finally:
        os.close(leader)


def test_doctor_colours_only_a_terminal_and_never_with_no_color(keyed):
    token, _ = keyed
    argv = [LAP, "doctor", *token.args()]
    code, out = on_terminal(argv, token.env)
    assert code == 0 and ESC in out and b"PASS" in out
    for env in (dict(token.env, NO_COLOR="1"), dict(token.env, TERM="dumb")):
        code, out = on_terminal(argv, env)
        assert code == 0 and ESC not in out and b"PASS  test signature verifies" in out
    piped = subprocess.run(argv, env=token.env, capture_output=True, timeout=120)
    assert piped.returncode == 0 and ESC not in piped.stdout
    assert re.search(rb"^PASS  pkcs11-tool found", piped.stdout, re.M)
    assert USER_PIN.encode() not in piped.stdout
