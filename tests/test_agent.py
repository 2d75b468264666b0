"""lap-pkcs11 agent: one login, every signature verified, recovery, limits, protocols, units.

Every test starts the real agent on a throwaway SoftHSM2 token and talks to it
the way the gateway would: through `lap-pkcs11 client`, through socat with the
gateway's line protocol, or with raw sockets where a misbehaving peer is the
point. Logins are counted with OpenSC's pkcs11-spy module configured as the
agent's module.
"""

import base64
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidSignature

from conftest import ROOT, USER_PIN, SO_PIN, assert_failure, gateway_decode, require, verify
from test_systemd import allowed_syscalls

LAP = Path(sys.executable).parent / "lap-pkcs11"
UNITS = ROOT / "systemd"
SERVICE = UNITS / "lap-pkcs11-agent.service"
SOCKET_UNIT = UNITS / "lap-pkcs11-agent.socket"
INSTALLED = "/opt/lap-pkcs11/.venv/bin/lap-pkcs11"
SPY_CANDIDATES = ("/usr/lib/x86_64-linux-gnu/pkcs11-spy.so",
                  "/usr/lib/x86_64-linux-gnu/pkcs11/pkcs11-spy.so",
                  "/usr/lib/aarch64-linux-gnu/pkcs11-spy.so",
                  "/usr/lib/aarch64-linux-gnu/pkcs11/pkcs11-spy.so")
KIB = 1024
NOBODY = 65534  # uid of nobody, gid of nogroup on Debian
READY_SECONDS = 30


def spy_module():
    for path in SPY_CANDIDATES:
        if os.path.exists(path):
            return path
    raise AssertionError("OpenSC's pkcs11-spy.so not found: apt-get install opensc-pkcs11")


class Agent:
    """`lap-pkcs11 agent` started by the test on a token, with its own notify socket."""

    def __init__(self, token, home, args=(), env=None, pin=USER_PIN, socket_dir=None,
                 argv=None, wait=True, name="agent", wrapped=False, activate=False):
        self.token = token
        self.wrapped = wrapped
        self.home = home
        self.dir = Path(socket_dir) if socket_dir else home / "run"
        self.dir.mkdir(exist_ok=True)
        self.path = self.dir / f"{name}.sock"
        self.pin_file = home / f"{name}.pin"
        self.pin_file.write_text(pin + "\n")
        self.pin_file.chmod(0o600)
        self.notify_path = home / f"{name}.notify"
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(self.notify_path))
        self.env = {k: v for k, v in token.env.items() if k != "PKCS11_PIN"}
        self.env.update(LAP_PKCS11_MODULE=token.module, LAP_PKCS11_TOKEN_LABEL=token.label,
                        LAP_PKCS11_KEY_ID="01", LAP_PKCS11_INPUT="base64",
                        NOTIFY_SOCKET=str(self.notify_path))
        self.env.update(env or {})
        self.env = {k: v for k, v in self.env.items() if v is not None}
        self.log_path = home / f"{name}.log"
        self.log = open(self.log_path, "wb")
        argv = argv or [str(LAP), "agent", "--pin-file", str(self.pin_file),
                        "--socket", str(self.path)]
        if activate:  # systemd-socket-activate passes only the variables given with -E.
            argv = [require("systemd-socket-activate"), "-l", str(self.path),
                    *[f"-E{key}={value}" for key, value in self.env.items()],
                    str(LAP), "agent", "--pin-file", str(self.pin_file)]
        self.proc = subprocess.Popen([*argv, *args], env=self.env, stdin=subprocess.DEVNULL,
                                     stdout=self.log, stderr=self.log)
        self.messages = []
        if wait:
            try:
                self.wait_for("READY=1")
            except BaseException:
                self.close()
                raise

    def wait_for(self, field, seconds=READY_SECONDS):
        """Wait for a notify datagram holding ``field``; fail with the log if the agent died."""
        end = time.monotonic() + seconds
        while not any(field in m for m in self.messages):
            if self.proc.poll() is not None:
                raise AssertionError(f"agent exited {self.proc.returncode}: {self.text()}")
            assert time.monotonic() < end, f"no {field} from the agent: {self.text()}"
            self.notify.settimeout(0.1)
            try:
                self.messages.append(self.notify.recv(4096).decode())
            except TimeoutError:
                pass
        return next(m for m in self.messages if field in m)

    def text(self):
        if not self.log.closed:
            self.log.flush()
        return self.log_path.read_text(errors="replace")

    def lines(self):
        return self.text().splitlines()

    def pid(self):
        """The agent's pid: the started process's, or its child's under a wrapper (strace)."""
        if self.wrapped:
            children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text()
            return int(children.split()[0])
        return self.proc.pid

    def stop(self, signum=signal.SIGTERM, timeout=20):
        if self.proc.poll() is None:
            os.kill(self.pid(), signum)
        code = self.proc.wait(timeout=timeout)
        self.close()
        return code

    def close(self):
        if self.proc.poll() is None:
            if self.wrapped:  # the tracer's death would leave the agent running
                try:
                    os.kill(self.pid(), signal.SIGKILL)
                except (OSError, ValueError, IndexError):
                    pass
            self.proc.kill()
            self.proc.wait()
        self.notify.close()
        self.log.close()


@pytest.fixture
def agents(keyed, tmp_path):
    """Start agents on the keyed token: ``agents(args=..., env=...)``; stopped afterwards."""
    token, _ = keyed
    started = []

    def start(**kwargs):
        kwargs.setdefault("name", f"agent{len(started)}")
        agent = Agent(token, tmp_path, **kwargs)
        started.append(agent)
        return agent

    yield start
    for agent in started:
        agent.close()


def client(path, stdin, timeout_ms=5000, timeout=60):
    env = {"PATH": os.environ["PATH"], "LAP_PKCS11_CLIENT_TIMEOUT_MS": str(timeout_ms)}
    return subprocess.run([str(LAP), "client", "--socket", str(path)], input=stdin, env=env,
                          capture_output=True, timeout=timeout)


def socat(path, stdin, user=None):
    argv = [require("socat"), "-t", "2", "-", f"UNIX-CONNECT:{path}"]
    if user is not None:
        argv = [require("setpriv"), f"--reuid={user}", f"--regid={user}", "--clear-groups",
                *argv]
    return subprocess.run(argv, input=stdin, capture_output=True, timeout=30)


def b64(message):
    return base64.b64encode(message) + b"\n"


def raw_exchange(path, data, shut=True):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(20)
        sock.connect(str(path))
        sock.sendall(data)
        if shut:
            sock.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


def metrics(path):
    result = subprocess.run([str(LAP), "agent-status", "--socket", str(path)],
                            capture_output=True, timeout=30)
    assert result.returncode == 0, result.stderr
    values = {}
    for line in result.stdout.decode().splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def until(check, seconds=30, every=0.1):
    """Poll ``check()`` until it returns something true; return it."""
    end = time.monotonic() + seconds
    while True:
        result = check()
        if result:
            return result
        assert time.monotonic() < end, "condition not reached in time"
        time.sleep(every)


# -- signing ----------------------------------------------------------------

@pytest.mark.parametrize("size", [2 * KIB, 64 * KIB])
def test_dsse_sized_and_64k_messages_sign_and_verify(keyed, agents, size):
    _, public = keyed
    agent = agents()
    message = os.urandom(size)
    through_client = client(agent.path, b64(message))
    assert through_client.returncode == 0, through_client.stderr
    verify(public, message, gateway_decode(through_client.stdout))
    through_socat = socat(agent.path, b64(message))
    assert through_socat.returncode == 0, through_socat.stderr
    assert through_socat.stdout == through_client.stdout
    verify(public, message, gateway_decode(through_socat.stdout))


def test_one_byte_over_64k_is_refused(agents):
    agent = agents()
    too_large = b64(os.urandom(64 * KIB + 1))
    assert_failure(client(agent.path, too_large), "MESSAGE_TOO_LARGE", 65)
    line = socat(agent.path, too_large)
    assert line.stdout == b""  # the gateway reads no signature; the name is in the journal
    assert_failure(client(agent.path, b"A" * 200000), "MESSAGE_TOO_LARGE", 65)
    names = [m for m in agent.lines() if "outcome=MESSAGE_TOO_LARGE" in m]
    assert len(names) == 3 and any("protocol=line" in m for m in names), agent.text()


def test_64_concurrent_clients_all_verify(keyed, agents):
    _, public = keyed
    agent = agents()
    messages = [os.urandom(500 + 37 * i) for i in range(64)]
    with ThreadPoolExecutor(64) as pool:
        results = list(pool.map(lambda m: client(agent.path, b64(m), timeout_ms=30000),
                                messages))
    for message, result in zip(messages, results):
        assert result.returncode == 0, result.stderr
        verify(public, message, gateway_decode(result.stdout))
    assert metrics(agent.path)['lap_pkcs11_agent_requests_total{outcome="OK",protocol="lap1"}'] \
        == 64


def test_signatures_are_byte_identical_to_sign(keyed, agents):
    token, _ = keyed
    agent = agents()
    for size in (1, 63, 700, 1024):
        message = os.urandom(size)
        direct = subprocess.run([str(LAP), "sign", *token.args(), "--input", "base64"],
                                input=b64(message), env=token.env, capture_output=True)
        assert direct.returncode == 0, direct.stderr
        assert client(agent.path, b64(message)).stdout == direct.stdout
        assert socat(agent.path, b64(message)).stdout == direct.stdout


@pytest.mark.parametrize("output", ["hex", "raw"])
def test_framed_answers_follow_the_output_option(keyed, agents, output):
    token, public = keyed
    agent = agents(env={"LAP_PKCS11_OUTPUT": output, "LAP_PKCS11_INPUT": "raw"})
    message = b"\x00receipt\x00" * 90
    result = client(agent.path, message)
    direct = subprocess.run([str(LAP), "sign", *token.args(), "--output", output],
                            input=message, env=token.env, capture_output=True)
    assert result.returncode == 0 and result.stdout == direct.stdout, result.stderr
    signature = bytes.fromhex(result.stdout.decode()) if output == "hex" else result.stdout
    verify(public, message, signature)


@pytest.mark.parametrize("stdin", [b"not base64\n", b"aGVsbG8\n", b"\n", b""])
def test_bad_input_is_input_invalid_and_nothing_on_the_line(agents, stdin):
    agent = agents()
    assert_failure(client(agent.path, stdin), "INPUT_INVALID", 65)
    line = socat(agent.path, stdin)
    assert line.stdout == b""


def test_a_spent_deadline_is_timeout_without_signing(agents):
    agent = agents()
    answer = raw_exchange(agent.path, b"LAP1 0\n" + b64(b"late"))
    assert answer.startswith(b"LAP1 75 TIMEOUT\nlap-pkcs11: TIMEOUT: "), answer


def test_requests_queued_past_their_deadline_are_answered_timeout(keyed, agents):
    """One worker, 40 requests of 64 KiB with 40 ms each: the queue outlasts most budgets."""
    _, public = keyed
    agent = agents(args=["--workers", "1"])
    message = os.urandom(64 * KIB)
    request = b"LAP1 40\n" + b64(message)
    socks = []
    for _ in range(40):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(20)
        sock.connect(str(agent.path))
        socks.append(sock)
    started = time.monotonic()
    for sock in socks:
        sock.sendall(request)
        sock.shutdown(socket.SHUT_WR)
    answers = []
    for sock in socks:
        answer = b""
        while chunk := sock.recv(4096):
            answer += chunk
        sock.close()
        answers.append(answer)
    assert time.monotonic() - started < 15
    timeouts = [a for a in answers if a.startswith(b"LAP1 75 TIMEOUT\n")]
    signed = [a for a in answers if a.startswith(b"LAP1 0 OK\n")]
    assert len(timeouts) + len(signed) == len(answers), answers
    assert timeouts, "no request waited past its deadline: the test proves nothing"
    for answer in signed:
        verify(public, message, gateway_decode(answer.split(b"\n", 1)[1]))


def test_pins_the_token_key_at_start_and_says_so(keyed, agents):
    _, public = keyed
    agent = agents()
    ready = [line for line in agent.lines() if "ready:" in line]
    assert len(ready) == 1 and ready[0].startswith("<5>"), agent.text()
    assert f"pinned public key {public.hex()} (read from the token)" in ready[0]
    assert public.hex() in agent.wait_for("STATUS=")


def test_a_configured_pin_of_another_key_stops_the_start(keyed, tmp_path):
    token, public = keyed
    other = bytes(32 - len(b"x")) + b"x"
    agent = Agent(token, tmp_path, env={"LAP_PKCS11_EXPECT_PUBLIC_KEY": other.hex()}, wait=False)
    code = agent.proc.wait(timeout=60)
    agent.close()
    assert code == 70
    lines = agent.lines()
    assert len(lines) == 1 and lines[0].startswith("lap-pkcs11: KEY_MISMATCH: "), lines
    assert not agent.path.exists()


def test_the_env_file_environment_reaches_the_module(keyed, tmp_path):
    """SOFTHSM2_CONF only in the env file: the agent's module must still find the token."""
    token, public = keyed
    env_file = tmp_path / "signer.env"
    env_file.write_text(f"SOFTHSM2_CONF={token.conf}\nLAP_PKCS11_TOKEN_LABEL={token.label}\n")
    env_file.chmod(0o600)
    agent = Agent(token, tmp_path, env={"SOFTHSM2_CONF": None, "LAP_PKCS11_TOKEN_LABEL": None,
                                        "LAP_PKCS11_ENV_FILE": str(env_file)})
    try:
        result = client(agent.path, b64(b"env file"))
        assert result.returncode == 0, result.stderr + agent.text().encode()
        verify(public, b"env file", gateway_decode(result.stdout))
    finally:
        agent.stop()


@pytest.mark.parametrize("stdin", [b"aGVsbG8=\n", b"  aGVsbG8=\r\n\t", b"aGVsbG8=", b"aGVsbG8\n",
                                   b"aGVsbG9=\n", b"aGVs bG8=\n", b"aGVsbG8=\naGk=\n", b"\n",
                                   b"-_8=\n", base64.b64encode(bytes(range(256)) * 4) + b"\n",
                                   base64.b64encode(bytes(1025)) + b"\n"])
def test_framed_base64_rules_are_sign_rules(stdin):
    """protocol.decode takes and refuses what sign's read_message does (up to 1024 bytes)."""
    from lap_pkcs11.per_signature import errors
    from lap_pkcs11.agent import protocol
    from lap_pkcs11.per_signature.sign_command import read_message

    def outcome(decode):
        try:
            return decode()
        except errors.SignerError as err:
            return err.name

    theirs = outcome(lambda: read_message("base64", lambda limit: stdin[:limit + 1]))
    ours = outcome(lambda: protocol.decode(stdin, "base64"))
    if theirs == b"":
        theirs = "INPUT_INVALID"  # sign refuses the empty message a step later
    if theirs == "MESSAGE_TOO_LARGE":  # over sign's 1024 bytes: the agent signs it
        assert isinstance(ours, bytes) and len(ours) == 1025
    else:
        assert ours == theirs


def test_requests_are_told_apart_by_their_first_bytes():
    from lap_pkcs11.agent import protocol

    assert protocol.parse(bytearray(b"LA"), False) is None  # could still be LAP1 framing
    assert protocol.parse(bytearray(b"LAP1 900\nabc"), False) is None  # body until EOF
    framed = protocol.parse(bytearray(b"LAP1 900\nabc\n"), True)
    assert (framed.kind, framed.deadline_ms, framed.body) == ("lap1", 900, b"abc\n")
    line = protocol.parse(bytearray(b"LAP1aGk=\nrest"), False)  # valid base64, not framing
    assert (line.kind, line.body) == ("line", b"LAP1aGk=")
    assert protocol.parse(bytearray(b"LAP1 metrics\n"), False).kind == "metrics"
    with pytest.raises(Exception, match="framing") as caught:
        protocol.parse(bytearray(b"LAP1 soon\n"), False)
    assert caught.value.kind == "lap1"
    with pytest.raises(Exception, match="over") as caught:
        protocol.parse(bytearray(b"A" * (protocol.READ_LIMIT + 1)), False)
    assert caught.value.kind == "line"
    assert protocol.READ_LIMIT == protocol.MAX_BASE64 + 4096


# -- logins -----------------------------------------------------------------

def spy_env(token, tmp_path):
    log = tmp_path / "spy.log"
    return log, {"LAP_PKCS11_MODULE": spy_module(), "PKCS11SPY": token.module,
                 "PKCS11SPY_OUTPUT": str(log)}


def logins(spy_log):
    return len(re.findall(r"^\d+: C_Login$", spy_log.read_text(errors="replace"), re.M))


def test_wrong_pin_at_start_exits_77_after_one_login(keyed, tmp_path):
    token, _ = keyed
    spy_log, env = spy_env(token, tmp_path)
    agent = Agent(token, tmp_path, env=env, pin="000000", wait=False)
    code = agent.proc.wait(timeout=60)
    agent.close()
    assert code == 77
    lines = agent.lines()
    assert len(lines) == 2 and lines[0].startswith("<4>PKCS11SPY"), lines  # the spy warning
    assert lines[1].startswith("lap-pkcs11: PIN_INCORRECT: ") and "000000" not in lines[1]
    assert logins(spy_log) == 1
    assert "CKR_PIN_INCORRECT" in spy_log.read_text(errors="replace")
    assert not agent.path.exists()


def test_logs_in_once_for_many_signatures(keyed, agents, tmp_path):
    token, public = keyed
    spy_log, env = spy_env(token, tmp_path)
    agent = agents(env=env)
    assert logins(spy_log) == 1  # READY=1 came after the login
    for i in range(20):
        message = os.urandom(100 + i)
        result = socat(agent.path, b64(message))
        verify(public, message, gateway_decode(result.stdout))
    assert logins(spy_log) == 1
    assert metrics(agent.path)["lap_pkcs11_agent_logins_total"] == 1
    text = spy_log.read_text(errors="replace")
    assert "CKF_OS_LOCKING_OK" in text and "C_SignUpdate" not in text


# -- recovery ---------------------------------------------------------------

def reinitialise(token, key_id="01", pin=USER_PIN):
    """The same label, a new token, a new key under the same id (as an operator might)."""
    softhsm = require("softhsm2-util")
    subprocess.run([softhsm, "--delete-token", "--token", token.label], env=token.env,
                   check=True, capture_output=True)
    subprocess.run([softhsm, "--init-token", "--free", "--label", token.label, "--so-pin", SO_PIN,
                    "--pin", pin], env=token.env, check=True, capture_output=True)
    if pin != USER_PIN:
        return None
    return token.keygen(key_id)


def restore(token, backup):
    shutil.rmtree(token.dir)
    shutil.copytree(backup, token.dir)


def test_reinitialised_token_is_key_mismatch_until_restored(keyed, agents, tmp_path):
    token, public = keyed
    spy_log, env = spy_env(token, tmp_path)
    agent = agents(env=env)
    message = b"\x00receipt\x00" * 60
    assert client(agent.path, b64(message)).returncode == 0
    backup = tmp_path / "tokens.backup"
    shutil.copytree(token.dir, backup)
    new_public = reinitialise(token)
    assert new_public != public
    assert_failure(client(agent.path, b64(message)), "KEY_MISMATCH", 70)
    assert socat(agent.path, b64(message)).stdout == b""
    restore(token, backup)

    def signed():
        result = client(agent.path, b64(message))
        return result if result.returncode == 0 else None

    result = until(signed)
    verify(public, message, gateway_decode(result.stdout))
    assert agent.proc.poll() is None  # no restart
    values = metrics(agent.path)
    attempts = values['lap_pkcs11_agent_recoveries_total{result="ok"}'] + \
        values['lap_pkcs11_agent_recoveries_total{result="failed"}']
    assert values['lap_pkcs11_agent_recoveries_total{result="ok"}'] == 1
    assert logins(spy_log) == values["lap_pkcs11_agent_logins_total"] <= 1 + attempts
    assert any("token lost (CKR_" in line for line in agent.lines()), agent.text()
    assert any("token recovered" in line for line in agent.lines()), agent.text()


def test_a_pin_rejected_during_recovery_stops_the_agent_with_77(keyed, agents, tmp_path):
    token, _ = keyed
    spy_log, env = spy_env(token, tmp_path)
    agent = agents(env=env)
    assert client(agent.path, b64(b"before")).returncode == 0
    reinitialise(token, pin="13572468")  # another PIN: the configured one is now wrong
    assert_failure(client(agent.path, b64(b"after")), "PIN_INCORRECT", 77)
    assert agent.proc.wait(timeout=30) == 77
    assert agent.lines()[-1].startswith("lap-pkcs11: PIN_INCORRECT: "), agent.text()
    assert logins(spy_log) == 2  # the start, and the one attempt: never tried again


def test_removed_token_directory_is_token_not_found_then_recovers(keyed, agents):
    token, public = keyed
    agent = agents()
    assert client(agent.path, b64(b"before")).returncode == 0
    away = token.dir.with_name("tokens.away")
    token.dir.rename(away)
    token.dir.mkdir()
    assert_failure(client(agent.path, b64(b"while gone")), "TOKEN_NOT_FOUND", 69)
    started = time.monotonic()
    assert_failure(client(agent.path, b64(b"still gone")), "TOKEN_NOT_FOUND", 69)
    assert time.monotonic() - started < 5  # fails fast, does not wait for its deadline
    assert metrics(agent.path)['lap_pkcs11_agent_token_state{state="gone"}'] == 1
    token.dir.rmdir()
    away.rename(token.dir)

    def signed():
        result = client(agent.path, b64(b"after"))
        return result if result.returncode == 0 else None

    verify(public, b"after", gateway_decode(until(signed).stdout))
    assert metrics(agent.path)['lap_pkcs11_agent_token_state{state="ready"}'] == 1


def test_sigkill_under_load_fails_clients_in_time_and_keeps_the_token(keyed, agents, tmp_path):
    token, public = keyed
    agent = agents()
    deadline_ms = 2000
    results, stop = [], threading.Event()

    def load():
        while not stop.is_set():
            message = os.urandom(300)
            started = time.monotonic()
            result = client(agent.path, b64(message), timeout_ms=deadline_ms)
            results.append((message, result, time.monotonic() - started))

    threads = [threading.Thread(target=load) for _ in range(8)]
    for thread in threads:
        thread.start()
    until(lambda: len(results) >= 16, seconds=60, every=0.01)
    agent.proc.kill()
    agent.proc.wait()
    time.sleep(0.5)
    stop.set()
    for thread in threads:
        thread.join()
    failed = 0
    for message, result, seconds in results:
        if result.returncode == 0:
            verify(public, message, gateway_decode(result.stdout))
        else:
            assert_failure(result, "SIGNER_UNAVAILABLE", 69)
            failed += 1
        assert seconds < deadline_ms / 1000 + 3  # the client's deadline, plus its own start
    assert failed >= 1
    # The token is whole: pkcs11-tool signs, and a new agent logs in and signs.
    direct = subprocess.run([str(LAP), "sign", *token.args()], input=b"after kill",
                            env=token.env, capture_output=True)
    assert direct.returncode == 0, direct.stderr
    again = agents()
    verify(public, b"again", gateway_decode(client(again.path, b64(b"again")).stdout))


# -- service behaviour ------------------------------------------------------

def test_sigterm_finishes_the_request_in_flight_and_exits_zero(keyed, agents):
    _, public = keyed
    agent = agents(args=["--read-timeout-ms", "20000"])
    message = os.urandom(900)
    body = b64(message)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(20)
        sock.connect(str(agent.path))
        sock.sendall(b"LAP1 15000\n" + body[:100])
        until(lambda: metrics(agent.path)["lap_pkcs11_agent_connections"] == 2)
        agent.proc.send_signal(signal.SIGTERM)
        agent.wait_for("STOPPING=1")
        until(lambda: not agent.path.exists())
        assert_failure(client(agent.path, b64(b"new")), "SIGNER_UNAVAILABLE", 69)
        sock.sendall(body[100:])
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := sock.recv(4096):
            answer += chunk
    assert answer.startswith(b"LAP1 0 OK\n"), answer
    verify(public, message, gateway_decode(answer.split(b"\n", 1)[1]))
    assert agent.proc.wait(timeout=20) == 0
    assert agent.lines()[-1] == "<5>stopped: every request in flight was answered"


def test_sigterm_the_moment_it_is_ready_is_a_clean_stop(keyed, agents):
    """systemd may stop the agent as soon as READY=1 arrives: it must drain and exit 0,
    not die of the signal (before: the handlers came after READY=1)."""
    agent = agents()  # returns once READY=1 has arrived
    agent.proc.send_signal(signal.SIGTERM)
    assert agent.proc.wait(timeout=20) == 0, agent.text()


def test_a_silent_connection_is_closed_and_blocks_nobody(keyed, agents):
    _, public = keyed
    agent = agents(args=["--read-timeout-ms", "700", "--workers", "1"])
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as silent, \
            socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as trickle:
        silent.connect(str(agent.path))
        trickle.connect(str(agent.path))
        trickle.sendall(b"LAP1 5000\naGVs")  # and never more
        started = time.monotonic()
        result = client(agent.path, b64(b"meanwhile"))
        assert result.returncode == 0, result.stderr
        verify(public, b"meanwhile", gateway_decode(result.stdout))
        for sock in (silent, trickle):
            sock.settimeout(20)
            assert sock.recv(100) == b""  # closed, unanswered
        assert time.monotonic() - started < 15
    idle = [line for line in agent.lines() if "reason=idle" in line]
    assert len(idle) == 2, agent.text()
    assert metrics(agent.path)['lap_pkcs11_agent_connections_dropped_total{reason="idle"}'] == 2


def test_connections_over_the_limit_are_closed_at_once(keyed, agents):
    agent = agents(args=["--max-connections", "3", "--read-timeout-ms", "30000"])
    held = []
    try:
        for _ in range(3):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(str(agent.path))
            held.append(sock)
        # The backlog is first in, first out: the three are accepted before this one.
        started = time.monotonic()
        assert_failure(client(agent.path, b64(b"one too many")), "SIGNER_UNAVAILABLE", 69)
        assert time.monotonic() - started < 4  # refused at once, not at the deadline
    finally:
        for sock in held:
            sock.close()
    until(lambda: client(agent.path, b64(b"room again")).returncode == 0)
    assert any("reason=limit" in line for line in agent.lines()), agent.text()


def test_a_peer_that_is_not_allowed_is_refused(keyed, tmp_path):
    token, public = keyed
    folder = Path(tempfile.mkdtemp(prefix="lap-agent-peer-"))
    folder.chmod(0o755)
    try:
        refused = Agent(token, tmp_path, socket_dir=folder, name="refused")
        allowed = Agent(token, tmp_path, socket_dir=folder, name="allowed",
                        args=["--allow-users", "nobody"])
        by_group = Agent(token, tmp_path, socket_dir=folder, name="group",
                         args=["--allow-groups", "nogroup"])
        try:
            for agent in (refused, allowed, by_group):
                agent.path.chmod(0o666)  # the file mode lets anyone in; the agent decides
            result = socat(refused.path, b64(b"as nobody"), user=NOBODY)
            assert result.stdout == b""
            line = [m for m in refused.lines() if "reason=peer" in m]
            assert len(line) == 1 and "uid=65534" in line[0] and line[0].startswith("<4>")
            for agent in (allowed, by_group):
                result = socat(agent.path, b64(b"as nobody"), user=NOBODY)
                verify(public, b"as nobody", gateway_decode(result.stdout))
            assert metrics(refused.path)[
                'lap_pkcs11_agent_connections_dropped_total{reason="peer"}'] == 1
        finally:
            for agent in (refused, allowed, by_group):
                agent.stop()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_one_journal_line_per_request_with_priorities(agents):
    agent = agents()
    client(agent.path, b64(b"fine"))
    client(agent.path, b"bad input\n")
    requests = [line for line in agent.lines() if " request " in f" {line[3:]}"]
    assert len(requests) == 2, agent.text()
    ok, bad = requests
    assert re.fullmatch(rf"<6>request outcome=OK protocol=lap1 bytes=4 uid={os.getuid()} "
                        r"ms=\d+\.\d\d", ok), ok
    assert bad.startswith("<5>request outcome=INPUT_INVALID protocol=lap1 ")
    assert USER_PIN not in agent.text()


def test_metrics_are_prometheus_text(agents):
    agent = agents()
    for _ in range(3):
        client(agent.path, b64(b"count me"))
    socat(agent.path, b"!!\n")
    result = subprocess.run([str(LAP), "agent-status", "--socket", str(agent.path)],
                            capture_output=True, timeout=30)
    text = result.stdout.decode()
    assert result.returncode == 0 and result.stderr == b""
    for family, kind in (("requests_total", "counter"), ("service_seconds", "histogram"),
                         ("connections", "gauge"), ("recoveries_total", "counter"),
                         ("logins_total", "counter"), ("token_state", "gauge")):
        assert f"# TYPE lap_pkcs11_agent_{family} {kind}\n" in text
    values = metrics(agent.path)
    assert values['lap_pkcs11_agent_requests_total{outcome="OK",protocol="lap1"}'] == 3
    assert values['lap_pkcs11_agent_requests_total{outcome="INPUT_INVALID",protocol="line"}'] == 1
    assert values["lap_pkcs11_agent_service_seconds_count"] >= 4
    assert values['lap_pkcs11_agent_service_seconds_bucket{le="+Inf"}'] == \
        values["lap_pkcs11_agent_service_seconds_count"]
    assert values["lap_pkcs11_agent_connections"] == 1  # the status request itself


def test_agent_status_without_an_agent_is_signer_unavailable(tmp_path):
    result = subprocess.run([str(LAP), "agent-status", "--socket", str(tmp_path / "none.sock")],
                            capture_output=True, timeout=30)
    assert_failure(result, "SIGNER_UNAVAILABLE", 69)


def test_socket_handed_over_by_systemd(keyed, tmp_path):
    token, public = keyed
    agent = Agent(token, tmp_path, name="activated", wait=False, activate=True)
    path = agent.path
    try:
        until(path.exists)
        # systemd-socket-activate starts the agent at the first connection.
        result = client(path, b64(b"activated"), timeout_ms=30000)
        assert result.returncode == 0, result.stderr + agent.text().encode()
        agent.wait_for("READY=1")
        verify(public, b"activated", gateway_decode(result.stdout))
        assert "(from systemd)" in agent.text()
    finally:
        assert agent.stop() == 0
    assert path.exists()  # systemd's socket, not the agent's to remove


def test_config_shows_the_agent_options(keyed):
    token, _ = keyed
    result = subprocess.run([str(LAP), "config", *token.args(), "--workers", "3"],
                            env=token.env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert re.search(r"^agent_workers\s+3\s+flag$", result.stdout, re.M)
    assert re.search(r"^agent_socket\s+/run/lap-pkcs11/agent.sock\s+default$", result.stdout, re.M)


@pytest.mark.parametrize("flag, value", [("--workers", "0"), ("--max-connections", "x"),
                                         ("--allow-users", "no-such-user-here"),
                                         ("--mechanism", "ECDSA"), ("--socket", "/nonexistent/a")])
def test_bad_agent_configuration_is_config_invalid(keyed, tmp_path, flag, value):
    token, _ = keyed
    agent = Agent(token, tmp_path, args=[flag, value], wait=False)
    code = agent.proc.wait(timeout=60)
    agent.close()
    assert code == 64, agent.text()
    lines = agent.lines()
    assert len(lines) == 1 and lines[0].startswith("lap-pkcs11: CONFIG_INVALID: "), lines


def test_an_unset_input_encoding_is_refused(keyed, tmp_path):
    """The gateway's base64 signed as raw bytes would verify, over the wrong bytes."""
    token, _ = keyed
    agent = Agent(token, tmp_path, env={"LAP_PKCS11_INPUT": None}, wait=False)
    code = agent.proc.wait(timeout=60)
    agent.close()
    assert code == 64
    lines = agent.lines()
    assert len(lines) == 1 and lines[0].startswith("lap-pkcs11: CONFIG_INVALID: --input"), lines


def test_the_agent_dumps_no_core(agents):
    agent = agents()
    limits = Path(f"/proc/{agent.proc.pid}/limits").read_text()
    assert re.search(r"^Max core file size\s+0\s+0\s", limits, re.M), limits
    # Not dumpable (PR_SET_DUMPABLE 0) is checked in the system call trace below.


# -- systemd units ------------------------------------------------------------

def unit_value(path, key):
    return [line.split("=", 1)[1] for line in path.read_text().splitlines()
            if line.startswith(key + "=")]


def local_copy(tmp_path, unit):
    copy = tmp_path / unit.name
    copy.write_text(unit.read_text().replace(INSTALLED, str(LAP)))
    return copy


def test_agent_units_verify_and_score_at_most_one(tmp_path):
    service, socket_unit = local_copy(tmp_path, SERVICE), local_copy(tmp_path, SOCKET_UNIT)
    result = subprocess.run(["systemd-analyze", "verify", str(socket_unit), str(service)],
                            capture_output=True, text=True)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    scored = subprocess.run(["systemd-analyze", "security", "--offline=yes", str(service)],
                            capture_output=True, text=True)
    score = float(re.search(r"Overall exposure level for \S+: (\d+\.\d+)",
                            scored.stdout).group(1))
    assert score <= 1.0
    assert f"| `lap-pkcs11-agent.service` | {score:.1f} |" in (ROOT / "README.md").read_text()


def test_agent_units_say_what_the_issue_asks():
    assert unit_value(SOCKET_UNIT, "Accept") == ["no"]
    assert unit_value(SOCKET_UNIT, "SocketMode") == ["0660"]
    assert unit_value(SOCKET_UNIT, "SocketGroup") == ["lap-gateway"]
    assert unit_value(SERVICE, "Type") == ["notify"]
    assert unit_value(SERVICE, "LimitCORE") == ["0"]
    assert "77" in unit_value(SERVICE, "RestartPreventExitStatus")[0].split()
    assert unit_value(SERVICE, "LoadCredential") == ["pin:/etc/lap-pkcs11/pin"]
    assert "--pin-file %d/pin" in unit_value(SERVICE, "ExecStart")[0]
    assert unit_value(SERVICE, "PrivateUsers") == []  # peers must keep their uids


def test_every_system_call_of_the_agent_passes_the_unit_filter(keyed, tmp_path):
    """Start, sign on both protocols, refuse, report, recover and stop, all under strace."""
    token, public = keyed
    strace = require("strace")
    trace = tmp_path / "trace"
    argv = shlex.split(unit_value(SERVICE, "ExecStart")[0].replace("%d", str(tmp_path)))
    assert argv[0] == INSTALLED
    argv[0] = str(LAP)
    path = tmp_path / "run" / "traced.sock"
    (tmp_path / "pin").write_text(USER_PIN + "\n")
    (tmp_path / "pin").chmod(0o600)  # as systemd hands a credential over
    agent = Agent(token, tmp_path, name="traced",
                  argv=[strace, "-f", "-qq", "-o", str(trace), *argv], wrapped=True,
                  env={"LAP_PKCS11_AGENT_SOCKET": str(path)})
    agent.path = path
    try:
        message = os.urandom(2000)
        verify(public, message, gateway_decode(client(path, b64(message)).stdout))
        verify(public, message, gateway_decode(socat(path, b64(message)).stdout))
        assert socat(path, b"bad\n").stdout == b""
        assert metrics(path)["lap_pkcs11_agent_logins_total"] == 1
        away = token.dir.with_name("tokens.away")
        token.dir.rename(away)
        token.dir.mkdir()
        assert_failure(client(path, b64(b"gone")), "TOKEN_NOT_FOUND", 69)
        token.dir.rmdir()
        away.rename(token.dir)
        until(lambda: client(path, b64(b"back")).returncode == 0)
    finally:
        assert agent.stop() == 0
    used = set(re.findall(r"^\d+\s+([a-z0-9_]+)\(", trace.read_text(), re.M))
    assert {"accept4", "epoll_wait", "sendto", "prctl", "getsockopt"} <= used  # a real trace
    assert re.search(r"^\d+\s+prctl\(PR_SET_DUMPABLE, SUID_DUMP_DISABLE", trace.read_text(), re.M)
    assert used - allowed_syscalls(SERVICE) == set()


def test_verification_catches_a_wrong_signature():
    """The test's own verifier is an assertion, not a boolean (guards the checks above)."""
    with pytest.raises(InvalidSignature):
        verify(bytes.fromhex("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"),
               b"", bytes(64))
