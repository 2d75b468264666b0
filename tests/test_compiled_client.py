"""lap-pkcs11-client as source, build and install: careful C, one library, the install
that succeeds without a compiler, and what doctor and pubkey say about it.

Its contract (the same as ``lap-pkcs11 client``, byte for byte) is tested in
test_client.py, and against generated server answers in test_client_fuzz.py.
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, assert_failure
from lap_pkcs11.admin import compiled_client as build, doctor
from lap_pkcs11.per_signature import config as configuration
from lap_pkcs11.per_signature.client_command import USAGE
from lap_pkcs11.admin.cli import signing_command

LAP = str(Path(sys.executable).parent / "lap-pkcs11")
SOURCE = build.SOURCE
KEY = bytes(range(32))


def compiler():
    path = shutil.which(os.environ.get("CC") or "cc")
    assert path, "no C compiler: apt-get install gcc libc6-dev"
    return path


def test_the_source_ships_in_the_package():
    assert SOURCE.is_file() and SOURCE.parent.parent == ROOT / "lap_pkcs11"
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert '"csrc/lap-pkcs11-client.c"' in pyproject


@pytest.mark.parametrize("flags", [
    ["-std=c11", "-Wall", "-Wextra", "-Werror", "-O2"],           # what the issue asks
    [*build.WARNINGS, *build.HARDENING],     # what install-client uses
    ["-std=c11", "-Wall", "-Wextra", "-Werror", "-O2", "-fanalyzer"],  # gcc's static analyser
], ids=["issue", "install", "analyzer"])
def test_the_source_compiles_without_a_warning(tmp_path, flags):
    if "-fanalyzer" in flags and b"Free Software Foundation" not in subprocess.run(
            [compiler(), "--version"], capture_output=True).stdout:
        pytest.skip("-fanalyzer is gcc's")
    result = subprocess.run([compiler(), *flags, "-o", str(tmp_path / "client"), str(SOURCE)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stderr == "", result.stderr


def test_the_binary_needs_only_the_c_library(compiled_client):
    if os.environ.get("LAP_TEST_C_CLIENT"):
        pytest.skip("a sanitizer build links its runtime")
    dynamic = subprocess.run(["readelf", "-d", str(compiled_client)], capture_output=True,
                             text=True, check=True).stdout
    assert re.findall(r"\(NEEDED\)\s+Shared library: \[(.+?)\]", dynamic) == ["libc.so.6"]


def test_the_source_allocates_nothing_and_keeps_its_buffers_fixed():
    """Static, bounded buffers: no heap, no stack arrays sized at run time (-Wvla too)."""
    code = re.sub(r"/\*.*?\*/", "", SOURCE.read_text(), flags=re.S)
    code = re.sub(r'"(\\.|[^"\\])*"', '""', code)
    for call in ("malloc", "calloc", "realloc", "free", "alloca", "strdup", "strndup",
                 "asprintf", "getline", "fopen", "printf", "puts", "gets", "strcpy", "strcat",
                 "sprintf", "system", "popen"):
        assert not re.search(rf"\b{call}\s*\(", code), call
    includes = set(re.findall(r"#include <([^>]+)>", code))
    assert includes <= {"errno.h", "fcntl.h", "limits.h", "poll.h", "pwd.h", "signal.h",
                        "stdarg.h", "stdbool.h", "stddef.h", "stdint.h", "stdio.h", "stdlib.h",
                        "string.h", "sys/resource.h", "sys/socket.h", "sys/stat.h",
                        "sys/syscall.h", "sys/types.h", "sys/un.h", "time.h", "unistd.h"}


def test_the_compiled_client_knows_every_error_of_errors_py():
    from lap_pkcs11.per_signature import errors

    table = dict(re.findall(r'\{"([A-Z_]+)", (\d+)\}', SOURCE.read_text()))
    names = {}
    todo = [errors.SignerError]
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        if cls is not errors.SignerError:
            names[cls.name] = str(cls.exit_code)
    assert table == names


# ---- install-client ------------------------------------------------------------------

def test_install_client_puts_a_checked_binary_where_it_is_told(tmp_path):
    dest = tmp_path / "bin"
    result = subprocess.run([LAP, "install-client", "--dest", str(dest)], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    binary = dest / build.NAME
    assert result.stdout == f"installed {binary}\n"
    assert os.stat(binary).st_mode & 0o777 == 0o755
    assert build.usage_of(binary) == USAGE.encode()
    assert sorted(path.name for path in dest.iterdir()) == [build.NAME]
    first = os.stat(binary).st_ino
    assert subprocess.run([LAP, "install-client", "--dest", str(dest)], capture_output=True,
                          timeout=300).returncode == 0
    assert os.stat(binary).st_ino != first  # replaced by a rename, never written in place


@pytest.mark.parametrize("how", ["missing", "broken", "no-headers"])
def test_without_a_working_compiler_nothing_is_installed_and_it_says_what_to_run(tmp_path, how):
    fake = tmp_path / "fake-cc"
    if how == "broken":
        fake.write_text("#!/bin/sh\nexit 1\n")
    elif how == "no-headers":
        fake.write_text("#!/bin/sh\necho 'x.c:1:10: fatal error: errno.h: No such file or "
                        "directory' >&2\nexit 1\n")
    if fake.exists():
        fake.chmod(0o755)
    dest = tmp_path / "bin"
    result = subprocess.run([LAP, "install-client", "--dest", str(dest), "--cc", str(fake)],
                            capture_output=True, timeout=60)
    line = result.stderr.decode()
    assert_failure(result, "TOOL_NOT_FOUND", 69)
    assert "`lap-pkcs11 client`" in line
    if how == "no-headers":
        assert "errno.h" in line
    assert not dest.exists() or list(dest.iterdir()) == []


def test_a_build_that_prints_another_usage_is_not_installed(tmp_path):
    """A binary of another version of the source never replaces the installed one."""
    fake = tmp_path / "fake-cc"
    fake.write_text('#!/bin/sh\nwhile [ "$1" != -o ]; do shift; done\n'
                    'printf "#!/bin/sh\\necho another usage\\n" > "$2"\n')
    fake.chmod(0o755)
    dest = tmp_path / "bin"
    result = subprocess.run([LAP, "install-client", "--dest", str(dest), "--cc", str(fake)],
                            capture_output=True, timeout=60)
    assert_failure(result, "SIGNING_FAILED", 70)
    assert list(dest.iterdir()) == []


@pytest.mark.parametrize("works", [True, False], ids=["compiler", "no-compiler"])
def test_setup_installs_lap_pkcs11_either_way(tmp_path, works):
    """scripts/setup.sh's hook: a failed build says what to run instead, and setup goes on."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    stub = venv / "bin" / "lap-pkcs11"
    stub.write_text(f"#!/bin/sh\n[ \"$1\" = install-client ] || exit 2\n"
                    f"{'echo installed here' if works else 'echo no compiler >&2; exit 69'}\n")
    stub.chmod(0o755)
    script = f'set -Eeuo pipefail; source {ROOT / "scripts" / "setup.sh"}; ' \
             f'install_client {venv}; echo after'
    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0 and result.stdout == "after\n", result.stderr
    if works:
        assert "installed here" in result.stderr and "no lap-pkcs11-client" not in result.stderr
    else:
        assert f"'{venv}/bin/lap-pkcs11 client'" in result.stderr


# ---- doctor and pubkey -----------------------------------------------------------------

def agent_config(**flags):
    values = {"module": "/usr/lib/x.so", "key_id": "01", "agent_socket": "/run/lap/agent.sock",
              **flags}
    return configuration.resolve(values, {})


@pytest.mark.parametrize("state", ["absent", "current", "stale"])
def test_doctor_says_which_client_the_gateway_should_run(tmp_path, compiled_client, state):
    if state == "current":
        shutil.copy(compiled_client, tmp_path / compiled_client.name)
    elif state == "stale":
        stale = tmp_path / compiled_client.name
        stale.write_text("#!/bin/sh\necho an older usage\n")
        stale.chmod(0o755)
    report = doctor.Report()
    doctor.client_check(report, agent_config(), tmp_path)
    (check,) = report.checks
    assert check.name == "compiled client installed"
    if state == "current":
        assert check.status == "pass" and str(tmp_path) in check.detail
    else:
        assert check.status == "warn"
        assert "`lap-pkcs11 client --socket /run/lap/agent.sock --input base64`" in check.fix
        assert "install-client" in check.fix


def test_doctor_looks_at_the_client_only_with_an_agent_socket(keyed):
    token, _ = keyed
    for extra, present in (([], False), (["--socket", "/run/lap/agent.sock"], True)):
        result = subprocess.run([LAP, "doctor", *token.args(), *extra, "--json"],
                                capture_output=True, env=token.env, timeout=120)
        names = [check["name"] for check in __import__("json").loads(result.stdout)["checks"]]
        assert ("compiled client installed" in names) == present, names
        assert result.returncode == 0, result.stdout


def commands(tmp_path, with_client, compiled=None):
    folder = tmp_path / ("with" if with_client else "without")
    folder.mkdir()
    (folder / "lap-pkcs11").symlink_to(LAP)
    if with_client:
        shutil.copy(compiled, folder / build.NAME)
    return folder


def test_the_signing_command_is_sign_without_an_agent_socket(tmp_path, compiled_client):
    config = configuration.resolve({"module": "/usr/lib/x.so", "key_id": "01"}, {})
    command = signing_command(config, KEY, commands=commands(tmp_path, True, compiled_client))
    assert command.split()[1:4] == ["sign", "--input", "base64"]


@pytest.mark.parametrize("with_client", [True, False], ids=["installed", "absent"])
@pytest.mark.parametrize("fixed", [False, True], ids=["gateway-env", "keyset"])
def test_the_signing_command_for_an_agent_is_its_client(tmp_path, compiled_client, with_client,
                                                        fixed):
    folder = commands(tmp_path, with_client, compiled_client)
    command = signing_command(agent_config(), KEY, fixed_deadline=fixed, commands=folder)
    first = [str(folder / build.NAME)] if with_client else [str(folder / "lap-pkcs11"),
                                                                      "client"]
    expected = [*first, "--socket", "/run/lap/agent.sock", "--input", "base64"]
    if fixed:
        expected += ["--timeout-ms", "1500"]
    assert command.split() == [*expected, "--expect-public-key", KEY.hex()]


def test_pubkey_prints_the_installed_client_for_a_configured_agent(keyed, tmp_path):
    """As an operator runs it: the agent socket from the env file, the client beside lap-pkcs11."""
    token, public = keyed
    env_file = tmp_path / "signer.env"
    env_file.write_text(f"LAP_PKCS11_MODULE={token.module}\nLAP_PKCS11_TOKEN_LABEL={token.label}\n"
                        f"LAP_PKCS11_KEY_ID=01\nLAP_PKCS11_AGENT_SOCKET={tmp_path}/agent.sock\n"
                        f"SOFTHSM2_CONF={token.conf}\n")
    env = {k: v for k, v in token.env.items() if k not in ("PKCS11_PIN", "SOFTHSM2_CONF")}
    result = subprocess.run([LAP, "pubkey", "--env-file", str(env_file), "--format", "gateway-env"],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    installed = build.installed()
    first = str(installed) if installed else f"{LAP} client"
    assert result.stdout.startswith(
        f'LAP_GATEWAY_SIGNING_CMD="{first} --socket {tmp_path}/agent.sock --input base64 '
        f'--expect-public-key {public.hex()}"\n'), result.stdout
