"""systemd units: verified, scored offline, and run end to end through real socket
activation (systemd-socket-activate, no PID 1 needed) with the unit's own ExecStart."""

import base64
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import FAKE_TOOL, ROOT, USER_PIN, assert_failure, gateway_decode, verify

UNITS = ROOT / "systemd"
SERVICE = UNITS / "lap-pkcs11-signer@.service"
SOCKET_UNIT = UNITS / "lap-pkcs11-signer.socket"
LAP = Path(sys.executable).parent / "lap-pkcs11"
INSTALLED = "/opt/lap-pkcs11/.venv/bin/lap-pkcs11"
MAX_EXPOSURE = 1.0
DROP_INS = sorted((UNITS / "examples").glob("*.conf"))


def unit_value(path, key):
    return [line.split("=", 1)[1] for line in path.read_text().splitlines()
            if line.startswith(key + "=")]


def exposure(unit_path):
    result = subprocess.run(["systemd-analyze", "security", "--offline=yes", str(unit_path)],
                            capture_output=True, text=True)
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    return float(match.group(1))


def local_copy(tmp_path, unit, extra=""):
    """The unit with ExecStart pointing at this venv (verify checks the binary exists)."""
    text = unit.read_text().replace(INSTALLED, str(LAP)) + extra
    copy = tmp_path / unit.name
    copy.write_text(text)
    return copy


def test_units_verify(tmp_path):
    service = local_copy(tmp_path, SERVICE)
    socket_copy = local_copy(tmp_path, SOCKET_UNIT)
    result = subprocess.run(["systemd-analyze", "verify", str(socket_copy), str(service)],
                            capture_output=True, text=True)
    assert result.returncode == 0 and result.stderr == "", result.stderr


def test_service_exposure_is_at_most_one(tmp_path):
    score = exposure(local_copy(tmp_path, SERVICE))
    assert score <= MAX_EXPOSURE, score
    readme = (UNITS / "README.md").read_text()
    assert f"| `lap-pkcs11-signer@.service` | {score:.1f} |" in readme


def test_socket_limits_are_set_deliberately():
    assert unit_value(SOCKET_UNIT, "Accept") == ["yes"]
    assert unit_value(SOCKET_UNIT, "MaxConnections") == ["128"]
    assert unit_value(SOCKET_UNIT, "TriggerLimitBurst") == ["2000"]
    assert unit_value(SOCKET_UNIT, "SocketMode") == ["0660"]


@pytest.mark.parametrize("drop_in", DROP_INS, ids=lambda p: p.name)
def test_each_loosening_drop_in_states_its_measured_score(tmp_path, drop_in):
    text = drop_in.read_text()
    score = exposure(local_copy(tmp_path, SERVICE, "\n" + text))
    stated = re.search(r"exposure (\d+\.\d+)", text)
    assert stated and float(stated.group(1)) == score, (drop_in.name, score)
    assert f"| `examples/{drop_in.name}` | {score:.1f} |" in (UNITS / "README.md").read_text()


def test_no_core_dumps():
    assert unit_value(SERVICE, "LimitCORE") == ["0"]


def test_pin_comes_from_a_credential_not_the_environment_file():
    exec_start = unit_value(SERVICE, "ExecStart")[0]
    assert "--pin-file %d/pin" in exec_start
    assert unit_value(SERVICE, "LoadCredential") == ["pin:/etc/lap-pkcs11/pin"]


SO_ACCEPTCON = 0x10000  # the flag /proc/net/unix shows on a listening socket


def listening(path):
    """Whether a socket bound at ``path`` listens, read from /proc/net/unix without
    connecting (a probe connection would start a service instance)."""
    with open("/proc/net/unix") as table:
        next(table)
        for line in table:
            fields = line.split()
            if len(fields) >= 8 and fields[7] == str(path) and int(fields[3], 16) & SO_ACCEPTCON:
                return True
    return False


def activation_flags(socket_unit=SOCKET_UNIT, service=SERVICE):
    """systemd-socket-activate's flags for what the units say: Accept=yes is --accept (an
    instance per connection), StandardInput=socket with StandardOutput=socket is --inetd
    (the connection is stdin and stdout). Anything else fails: these tests must run the
    service the way systemd would."""
    accept = unit_value(socket_unit, "Accept")
    streams = (unit_value(service, "StandardInput"), unit_value(service, "StandardOutput"))
    if accept != ["yes"] or streams != (["socket"], ["socket"]):
        raise AssertionError(f"the units say Accept={accept}, StandardInput/Output={streams}; "
                             "the activation below knows only yes and socket")
    return ["--accept", "--inetd"]


class Activated:
    """systemd-socket-activate running the service's own ExecStart per connection."""

    def __init__(self, token, tmp_path, env_overrides=None, tool=None, **popen):
        self.path = tmp_path / "run" / "signer.sock"
        credentials = tmp_path / "credentials"
        credentials.mkdir(mode=0o700)
        (credentials / "pin").write_text(USER_PIN + "\n")
        (credentials / "pin").chmod(0o600)  # as systemd hands over a credential
        state = tmp_path / "state"
        state.mkdir()
        argv = shlex.split(unit_value(SERVICE, "ExecStart")[0].replace("%d", str(credentials)))
        assert argv[0] == INSTALLED
        argv[0] = str(LAP)
        # What EnvironmentFile= and Environment= give the service, as -E flags.
        env = {"LAP_PKCS11_MODULE": token.module, "LAP_PKCS11_TOKEN_LABEL": token.label,
               "LAP_PKCS11_KEY_ID": "01", "LAP_PKCS11_INPUT": "base64",
               "SOFTHSM2_CONF": str(token.conf), "LAP_PKCS11_LOCK_DIR": str(state),
               "PATH": os.environ["PATH"]}
        if tool:
            env["LAP_PKCS11_TOOL"] = str(tool)
            env["FAKE_MODE"] = "hang"
        env.update(env_overrides or {})
        flags = [f"-E{name}={value}" for name, value in env.items()]
        self.log = open(tmp_path / "activate.log", "wb")
        self.proc = subprocess.Popen(["systemd-socket-activate", *activation_flags(),
                                      "-l", str(self.path), *flags, *argv],
                                     stdout=self.log, stderr=self.log, start_new_session=True,
                                     **popen)
        # The path appears at bind(), before listen(): a connect() in between is refused.
        deadline = time.monotonic() + 10
        while not listening(self.path):
            assert time.monotonic() < deadline, "socket never listened"
            time.sleep(0.02)

    def close(self):
        os.killpg(self.proc.pid, signal.SIGTERM)
        self.proc.wait(timeout=10)
        self.log.close()


@pytest.fixture
def activated(keyed, tmp_path):
    (tmp_path / "run").mkdir(exist_ok=True)
    servers = []

    def start(**kwargs):
        server = Activated(keyed[0], tmp_path, **kwargs)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


PYTHON_CLIENT = [str(LAP), "client"]


@pytest.fixture(params=["python", "c"])
def client_argv(request, compiled_client):
    """Either client: `lap-pkcs11 client` or the compiled lap-pkcs11-client."""
    return PYTHON_CLIENT if request.param == "python" else [str(compiled_client)]


@pytest.fixture
def client(client_argv):
    """Run the client as the gateway does; the compiled client's result must be the Python
    client's on the same case, byte for byte (``reset`` restores the signer's state first)."""

    def run_one(argv, server_path, stdin, env, timeout, reset):
        if reset is not None:
            reset()
        env = env if env is not None else {"PATH": os.environ["PATH"]}
        return subprocess.run([*argv, "--socket", str(server_path)], input=stdin, env=env,
                              capture_output=True, timeout=timeout)

    def run(server_path, stdin, env=None, timeout=30, reset=None):
        result = run_one(client_argv, server_path, stdin, env, timeout, reset)
        if client_argv != PYTHON_CLIENT:
            reference = run_one(PYTHON_CLIENT, server_path, stdin, env, timeout, reset)
            assert (result.returncode, result.stdout, result.stderr) == \
                (reference.returncode, reference.stdout, reference.stderr), (result, reference)
        return result

    return run


def test_client_signs_through_socket_activation(keyed, activated, client):
    token, public = keyed
    server = activated()
    message = b"\x00receipt\x00" * 40
    result = client(server.path, base64.b64encode(message) + b"\n")
    assert result.returncode == 0, result.stderr
    signature = gateway_decode(result.stdout)
    verify(public, message, signature)
    direct = subprocess.run([str(LAP), "sign", *token.args(), "--input", "base64"],
                            input=base64.b64encode(message) + b"\n", env=token.env,
                            capture_output=True)
    assert direct.stdout == result.stdout  # the gateway cannot tell the difference


@pytest.mark.parametrize("case, name, code", [
    ("wrong pin", "PIN_INCORRECT", 77),
    ("missing key", "KEY_NOT_FOUND", 69),
    ("bad input", "INPUT_INVALID", 65),
    ("timeout", "TIMEOUT", 75),
])
def test_signer_errors_reach_the_client_unchanged(keyed, activated, tmp_path, client, case, name, code):
    overrides, tool, stdin = {}, None, base64.b64encode(b"m") + b"\n"
    if case == "missing key":
        overrides["LAP_PKCS11_KEY_ID"] = "99"
    if case == "bad input":
        stdin = b"not base64\n"
    if case == "timeout":
        tool = FAKE_TOOL
        overrides["LAP_PKCS11_TIMEOUT_MS"] = "500"
    server = activated(env_overrides=overrides, tool=tool)
    if case == "wrong pin":
        (tmp_path / "credentials" / "pin").write_text("000000\n")

    def forget_the_rejected_pin():  # so that each client meets the token, not the guard
        for marker in (tmp_path / "state").glob("*.pin-rejected"):
            marker.unlink()

    result = client(server.path, stdin, reset=forget_the_rejected_pin)
    assert_failure(result, name, code, pin="000000")


@pytest.mark.parametrize("caller", ["SIGNER_TIMEOUT_SECONDS",
                                    "LAP_GATEWAY_SIGNING_CMD_TIMEOUT_SECONDS"])
def test_client_deadline_reaches_the_signer(keyed, activated, client, caller):
    server = activated(tool=FAKE_TOOL)
    env = {"PATH": os.environ["PATH"], caller: "1.0"}
    result = client(server.path, base64.b64encode(b"m") + b"\n", env=env, timeout=1.0)
    assert_failure(result, "TIMEOUT", 75)


def test_missing_socket_is_signer_unavailable(tmp_path, client):
    result = client(tmp_path / "absent.sock", b"aGVsbG8=\n")
    assert_failure(result, "SIGNER_UNAVAILABLE", 69)


def test_silent_socket_is_signer_unavailable(tmp_path, client):
    path = tmp_path / "silent.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    held = []
    thread = threading.Thread(target=lambda: held.append(listener.accept()), daemon=True)
    thread.start()
    try:
        env = {"PATH": os.environ["PATH"], "LAP_PKCS11_CLIENT_TIMEOUT_MS": "400"}
        result = client(path, b"aGVsbG8=\n", env=env)
        assert_failure(result, "SIGNER_UNAVAILABLE", 69)
    finally:
        listener.close()


def test_refused_socket_is_signer_unavailable(tmp_path, client):
    path = tmp_path / "dead.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.close()  # the file stays, nobody listens: connection refused
    assert_failure(client(path, b"aGVsbG8=\n"), "SIGNER_UNAVAILABLE", 69)


def test_sixteen_concurrent_clients(keyed, activated, client):
    _, public = keyed
    server = activated()
    messages = [os.urandom(100 + i) for i in range(16)]
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(
            lambda m: client(server.path, base64.b64encode(m) + b"\n",
                             env={"PATH": os.environ["PATH"],
                                  "LAP_PKCS11_CLIENT_TIMEOUT_MS": "20000"}), messages))
    for message, result in zip(messages, results):
        assert result.returncode == 0, result.stderr
        verify(public, message, gateway_decode(result.stdout))


def test_client_help_and_bad_option(client_argv):
    assert subprocess.run([*client_argv, "--help"], capture_output=True).returncode == 0
    result = subprocess.run([*client_argv, "--key-id", "01"], capture_output=True, input=b"")
    assert_failure(result, "CONFIG_INVALID", 64)


def test_the_activation_runs_the_service_as_the_units_say(tmp_path):
    """The end-to-end tests activate the service with flags read from the units; a unit
    that changes how the service gets its connection makes them fail, not pass on a
    setup systemd would never use."""
    assert activation_flags() == ["--accept", "--inetd"]
    for unit, setting in ((SOCKET_UNIT, "Accept=yes"), (SERVICE, "StandardInput=socket"),
                          (SERVICE, "StandardOutput=socket")):
        changed = tmp_path / unit.name
        text = unit.read_text()
        assert setting in text
        changed.write_text(text.replace(setting, setting.split("=")[0] + "=no"))
        units = {SOCKET_UNIT.name: SOCKET_UNIT, SERVICE.name: SERVICE, unit.name: changed}
        with pytest.raises(AssertionError, match="the activation below knows only"):
            activation_flags(units[SOCKET_UNIT.name], units[SERVICE.name])


def fake_server(path, answer):
    """A FAKE signer socket that answers ``answer`` to one connection."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)

    def serve():
        connection, _ = listener.accept()
        connection.recv(65536)
        connection.sendall(answer)
        connection.close()
        listener.close()

    threading.Thread(target=serve, daemon=True).start()


@pytest.mark.parametrize("answer", [b"garbage", b"LAP1 77 NOT_A_NAME\nx\n",
                                    b"LAP1 64 PIN_MISSING\nx\n", b""])
def test_garbled_answers_are_signer_unavailable(tmp_path, client_argv, answer):
    path = tmp_path / "fake.sock"
    fake_server(path, answer)
    result = subprocess.run([*client_argv, "--socket", str(path)], input=b"aGVsbG8=\n",
                            env={"PATH": os.environ["PATH"]}, capture_output=True, timeout=30)
    assert_failure(result, "SIGNER_UNAVAILABLE", 69)


def test_serve_refuses_a_request_without_framing(keyed, activated):
    server = activated()
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    connection.connect(str(server.path))
    connection.sendall(b"aGVsbG8=\n")  # a bare payload, as if sign's stdin
    connection.shutdown(socket.SHUT_WR)
    answer = b""
    while chunk := connection.recv(4096):
        answer += chunk
    connection.close()
    assert answer.startswith(b"LAP1 65 INPUT_INVALID\nlap-pkcs11: INPUT_INVALID: ")


def expand_syscall_group(group, cache={}):
    """The system calls of a systemd group, nested groups expanded."""
    if group not in cache:
        out = subprocess.run(["systemd-analyze", "syscall-filter", group], capture_output=True,
                             text=True, check=True).stdout
        names = set()
        for line in out.splitlines()[1:]:
            word = line.strip()
            if word.startswith("@"):
                names |= expand_syscall_group(word)
            elif re.fullmatch(r"[a-z0-9_]+", word):
                names.add(word)
        cache[group] = names
    return cache[group]


def allowed_syscalls(service=SERVICE):
    """What the unit's SystemCallFilter= lines allow, applied in order (the agent's unit
    too, in tests/test_agent.py)."""
    allowed = set()
    for value in unit_value(service, "SystemCallFilter"):
        remove = value.startswith("~")
        names = set()
        for item in value.lstrip("~").split():
            names |= expand_syscall_group(item) if item.startswith("@") else {item}
        allowed = allowed - names if remove else allowed | names
    return allowed


def test_every_system_call_of_a_signature_passes_the_unit_filter(keyed, tmp_path):
    """A blocked call fails every signature, and no offline score shows it: trace one."""
    token, public = keyed
    strace = shutil.which("strace")
    assert strace, "strace missing: apt-get install strace"
    pin = tmp_path / "pin"
    pin.write_text(USER_PIN + "\n")
    pin.chmod(0o600)
    request = tmp_path / "request"
    request.write_bytes(b"LAP1 1500\n" + base64.b64encode(b"traced") + b"\n")
    env = {k: v for k, v in token.env.items() if k != "PKCS11_PIN"}
    env.update(LAP_PKCS11_MODULE=token.module, LAP_PKCS11_TOKEN_LABEL=token.label,
               LAP_PKCS11_KEY_ID="01", LAP_PKCS11_INPUT="base64",
               LAP_PKCS11_EXPECT_PUBLIC_KEY=public.hex())
    trace = tmp_path / "trace"
    argv = shlex.split(unit_value(SERVICE, "ExecStart")[0].replace("%d", str(tmp_path)))
    argv[0] = str(LAP)
    with open(request, "rb") as stdin:
        result = subprocess.run([strace, "-f", "-qq", "-o", str(trace), *argv], stdin=stdin,
                                env=env, capture_output=True, timeout=60)
    assert result.stdout.startswith(b"LAP1 0 OK\n"), result.stdout + result.stderr
    used = set(re.findall(r"^\d+\s+([a-z0-9_]+)\(", trace.read_text(), re.M))
    assert {"execve", "prctl", "setsid", "pidfd_open"} <= used  # the trace is real
    assert used - allowed_syscalls() == set()


@pytest.mark.parametrize("env", [{"LAP_PKCS11_CLIENT_TIMEOUT_MS": "soon"},
                                 {"SIGNER_TIMEOUT_SECONDS": "0.2"},
                                 {"LAP_GATEWAY_SIGNING_CMD_TIMEOUT_SECONDS": "0.2"}])
def test_client_bad_deadline_is_config_invalid(tmp_path, client, env):
    result = client(tmp_path / "absent.sock", b"aGVsbG8=\n",
                    env={"PATH": os.environ["PATH"], **env})
    assert_failure(result, "CONFIG_INVALID", 64)
