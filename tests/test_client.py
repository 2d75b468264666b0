"""``lap-pkcs11 client`` and ``serve`` under a hostile or broken peer.

The client checks what the signer answers as the gateway would have to: FAKE
signer sockets (a few lines of Python here) send what no real ``serve`` sends:
empty, short or foreign signatures, error frames without a line, escape
sequences, silence, a trickle. ``serve`` is run through real socket activation
(systemd-socket-activate, the unit's own ExecStart) against a real token, and
fed silence and trickles by raw connections. Every failure is the contract:
exit code, one clean ``lap-pkcs11: NAME: ...`` line, empty stdout.
"""

import base64
import os
import resource
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from conftest import FAKE_TOOL, USER_PIN, assert_failure, gateway_decode, verify
from test_sign_errors import alive
from test_systemd import activated  # noqa: F401  (a fixture)

LAP = str(Path(sys.executable).parent / "lap-pkcs11")
MESSAGE = b"\x00lap receipt\x00" * 30
GATEWAY_STDIN = base64.b64encode(MESSAGE) + b"\n"
SIGNAL_NAMES = {signal.SIGINT: "SIGINT", signal.SIGTERM: "SIGTERM", signal.SIGHUP: "SIGHUP"}


def clean_line(result):
    """The one stderr line, checked to hold nothing a terminal or a log would interpret."""
    line = result.stderr.decode("utf-8")
    assert line.endswith("\n") and line.count("\n") == 1, repr(line)
    assert line[:-1].isprintable(), f"control characters reach the gateway's log: {line!r}"
    return line[:-1]


def assert_clean_failure(result, name, code, pin=USER_PIN):
    assert_failure(result, name, code, pin=pin)
    return clean_line(result)


class Key:
    """A software Ed25519 key the FAKE signer signs with."""

    def __init__(self):
        self.private = Ed25519PrivateKey.generate()
        self.public = self.private.public_key().public_bytes(serialization.Encoding.Raw,
                                                             serialization.PublicFormat.Raw)

    def sign(self, message):
        return self.private.sign(message)


def request_message(request, encoding="base64"):
    """The message a client request carries (header line, then stdin as sent)."""
    header, _, payload = request.partition(b"\n")
    assert header.startswith(b"LAP1 "), request
    return base64.b64decode(payload.strip(), validate=True) if encoding == "base64" else payload


def ok_frame(signature, output="base64"):
    if output == "base64":
        body = base64.b64encode(signature) + b"\n"
    elif output == "hex":
        body = signature.hex().encode() + b"\n"
    else:
        body = signature
    return b"LAP1 0 OK\n" + body


class FakeSigner:
    """A FAKE signer socket for one connection: reads the request, then does ``behaviour``.

    ``behaviour`` is bytes to answer, a function of the request returning them,
    ``"silent"`` (holds the connection until closed) or ``("trickle", bytes)``
    (sends one byte every 50 ms and never finishes). ``hold`` delays the answer
    until ``release()``.
    """

    def __init__(self, path, behaviour, hold=False):
        self.path = path
        self.behaviour = behaviour
        self.requests = []
        self.connected = threading.Event()
        self.released = threading.Event()
        if not hold:
            self.released.set()
        self.stop = threading.Event()
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(8)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        try:
            connection, _ = self.listener.accept()
        except OSError:
            return
        self.connected.set()
        with connection:
            connection.settimeout(30)
            request = b""
            try:
                while chunk := connection.recv(65536):
                    request += chunk
            except OSError:
                return
            self.requests.append(request)
            self.released.wait(30)
            behaviour = self.behaviour
            try:
                if behaviour == "silent":
                    self.stop.wait(30)
                elif isinstance(behaviour, tuple):
                    for byte in behaviour[1]:
                        if self.stop.wait(0.05):
                            break
                        connection.sendall(bytes([byte]))
                    self.stop.wait(30)
                else:
                    connection.sendall(behaviour(request) if callable(behaviour) else behaviour)
            except OSError:
                pass

    def release(self):
        self.released.set()

    def close(self):
        self.stop.set()
        self.released.set()
        self.listener.close()
        self.thread.join(10)


@pytest.fixture
def fake_signer(tmp_path):
    servers = []

    def start(behaviour, hold=False):
        server = FakeSigner(tmp_path / f"fake{len(servers)}.sock", behaviour, hold)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


def base_env(**extra):
    return {"PATH": os.environ["PATH"], **extra}


def client(server, stdin=GATEWAY_STDIN, args=(), env=None, timeout=30, **popen):
    path = server if isinstance(server, (str, Path)) else server.path
    feed = {} if "stdin" in popen else {"input": stdin}
    popen.setdefault("stdout", subprocess.PIPE)
    popen.setdefault("stderr", subprocess.PIPE)
    return subprocess.run([LAP, "client", "--socket", str(path), *args],
                          env=env if env is not None else base_env(), timeout=timeout,
                          **feed, **popen)


# ---- what a successful answer must be ------------------------------------------------

SIGNATURE = bytes(range(64))


@pytest.mark.parametrize("output", ["base64", "hex", "raw"])
def test_each_encoding_sign_prints_passes_through(fake_signer, output):
    """The positive control of the checks below: sign's three encodings pass unchanged."""
    frame = ok_frame(SIGNATURE, output)
    result = client(fake_signer(frame))
    assert result.returncode == 0, result.stderr
    assert result.stdout == frame.split(b"\n", 1)[1] and result.stderr == b""


@pytest.mark.parametrize("body", [
    b"",                                             # OK with nothing
    b"hello from the signer\n",                      # OK with text
    bytes(63),                                       # 63 raw bytes
    base64.b64encode(bytes(63)) + b"\n",             # 63 bytes, base64
    bytes(63).hex().encode() + b"\n",                # 63 bytes, hex
    bytes(65),                                       # 65 raw bytes
    base64.b64encode(SIGNATURE),                     # base64 without its newline
    base64.b64encode(SIGNATURE) + b"\n\n",           # and a second line
    b" " + base64.b64encode(SIGNATURE) + b"\n",      # leading space
    base64.b64encode(SIGNATURE)[:-3] + b"x==\n",     # non-canonical base64 (unused bits set)
    SIGNATURE.hex().upper().encode() + b"\n",        # upper-case hex: sign never prints it
    SIGNATURE.hex().encode(),                        # hex without its newline
    base64.b64encode(SIGNATURE) + b"\n" + base64.b64encode(SIGNATURE) + b"\n",  # two
], ids=["empty", "text", "raw63", "b64-63", "hex63", "raw65", "b64-no-newline", "b64-two-lines",
        "b64-space", "b64-noncanonical", "hex-upper", "hex-no-newline", "two-signatures"])
def test_an_ok_that_is_not_one_signature_is_signer_unavailable(fake_signer, body):
    result = client(fake_signer(b"LAP1 0 OK\n" + body))
    line = assert_clean_failure(result, "SIGNER_UNAVAILABLE", 69)
    assert "signature" in line


# ---- the pinned key ------------------------------------------------------------------

@pytest.mark.parametrize("how", ["flag", "LAP_PKCS11_EXPECT_PUBLIC_KEY",
                                 "LAP_GATEWAY_PUBLIC_KEY_HEX"])
def test_a_signature_by_another_key_is_key_mismatch(fake_signer, how):
    pinned, other = Key(), Key()
    server = fake_signer(lambda request: ok_frame(other.sign(request_message(request))))
    args, env = ["--input", "base64"], base_env()
    if how == "flag":
        args += ["--expect-public-key", pinned.public.hex()]
    else:
        env[how] = pinned.public.hex()
    assert_clean_failure(client(server, args=args, env=env), "KEY_MISMATCH", 70)


@pytest.mark.parametrize("output", ["base64", "hex", "raw"])
def test_a_signature_by_the_pinned_key_passes(fake_signer, output):
    key = Key()
    server = fake_signer(lambda request: ok_frame(key.sign(request_message(request)), output))
    env = base_env(LAP_GATEWAY_PUBLIC_KEY_HEX=key.public.hex(), SIGNER_MODE="external")
    result = client(server, args=["--input", "base64"], env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout == ok_frame(key.sign(MESSAGE), output).split(b"\n", 1)[1]


def test_a_signature_of_another_message_is_key_mismatch(fake_signer):
    key = Key()
    server = fake_signer(ok_frame(key.sign(b"another message")))
    env = base_env(LAP_PKCS11_EXPECT_PUBLIC_KEY=key.public.hex(), LAP_PKCS11_INPUT="base64")
    assert_clean_failure(client(server, env=env), "KEY_MISMATCH", 70)


def test_raw_input_is_verified_as_raw(fake_signer):
    key = Key()
    server = fake_signer(lambda request: ok_frame(key.sign(request_message(request, "raw"))))
    env = base_env(LAP_PKCS11_EXPECT_PUBLIC_KEY=key.public.hex())
    result = client(server, stdin=MESSAGE, args=["--input", "raw"], env=env)
    assert result.returncode == 0, result.stderr
    # The same signer read as base64 by the client: the signed bytes are not the message.
    server = fake_signer(lambda request: ok_frame(key.sign(request_message(request, "raw"))))
    result = client(server, args=["--input", "base64"], env=env)
    assert_clean_failure(result, "KEY_MISMATCH", 70)


@pytest.mark.parametrize("marker", [{"SIGNER_MODE": "external"},
                                    {"LAP_GATEWAY_SIGNING_CMD": "lap-pkcs11 client"},
                                    {"LAP_GATEWAY_KEYSET_FILE": "/etc/lap/keyset.json"}])
def test_pinned_key_under_the_gateway_needs_input_set(fake_signer, marker):
    key = Key()
    server = fake_signer(lambda request: ok_frame(key.sign(request_message(request))))
    env = base_env(LAP_GATEWAY_PUBLIC_KEY_HEX=key.public.hex(), **marker)
    line = assert_clean_failure(client(server, env=env), "CONFIG_INVALID", 64)
    assert "--input base64" in line
    assert not server.connected.wait(0.2), "the client asked for a signature it cannot check"


@pytest.mark.parametrize("args, env", [
    (["--input", "hex"], {}),
    ([], {"LAP_PKCS11_INPUT": "utf8"}),
    (["--expect-public-key", "abcd"], {}),
    ([], {"LAP_GATEWAY_PUBLIC_KEY_HEX": "zz" * 32}),
    (["--input"], {}),
], ids=["input-flag", "input-env", "key-flag", "key-env", "no-value"])
def test_bad_client_options_are_config_invalid(fake_signer, args, env):
    server = fake_signer(ok_frame(SIGNATURE))
    assert_clean_failure(client(server, args=args, env=base_env(**env)), "CONFIG_INVALID", 64)
    assert not server.connected.wait(0.2)


def test_pinned_key_with_stdin_that_is_not_base64_is_input_invalid(fake_signer):
    key = Key()
    server = fake_signer(ok_frame(SIGNATURE))
    env = base_env(LAP_GATEWAY_PUBLIC_KEY_HEX=key.public.hex())
    result = client(server, stdin=b"not base64\n", args=["--input", "base64"], env=env)
    assert_clean_failure(result, "INPUT_INVALID", 65)


# ---- error frames --------------------------------------------------------------------

@pytest.mark.parametrize("name, code", [("PIN_INCORRECT", 77), ("TIMEOUT", 75),
                                        ("KEY_NOT_FOUND", 69)])
def test_an_error_frame_without_a_line_gets_a_generated_one(fake_signer, name, code):
    result = client(fake_signer(b"LAP1 %d %s\n" % (code, name.encode())))
    line = assert_clean_failure(result, name, code)
    assert "journal" in line or "no message" in line


ESCAPES = (b"lap-pkcs11: PIN_INCORRECT: the \x1b[31mPIN\x1b[0m was \x1b]0;owned\x07wrong"
           b"\x1b]8;;http://x\x1b\\link\x1b\\ \x9b2J \xc2\x9b2J\r\x08\x7f\x00 done "
           b"\xe2\x80\xa8 \xc2\x85 \xe2\x80\xae x\n")


@pytest.mark.parametrize("body", [
    ESCAPES,
    b"lap-pkcs11: PIN_INCORRECT: first\rlap-pkcs11: OK: forged\n",
    b"lap-pkcs11: PIN_INCORRECT: one\nlap-pkcs11: PIN_INCORRECT: two\n",
    b"lap-pkcs11: PIN_INCORRECT: \xff\xfe not utf-8\n",
])
def test_the_servers_text_never_reaches_the_log_raw(fake_signer, body):
    result = client(fake_signer(b"LAP1 77 PIN_INCORRECT\n" + body))
    line = assert_clean_failure(result, "PIN_INCORRECT", 77)
    assert "\x1b" not in line and "[31m" not in line and "owned" not in line
    assert "two" not in line  # the first line only


def test_escape_text_keeps_the_readable_part(fake_signer):
    result = client(fake_signer(b"LAP1 77 PIN_INCORRECT\n" + ESCAPES))
    line = assert_clean_failure(result, "PIN_INCORRECT", 77)
    assert line.startswith("lap-pkcs11: PIN_INCORRECT: the PIN was")
    assert "done" in line


@pytest.mark.parametrize("body", [
    b"lap-pkcs11: KEY_NOT_FOUND: a line of another error\n",
    b"PIN_INCORRECT: without the program\n",
    b"\x1b[2Jlap-pkcs11: PIN_INCORRECT: behind an escape\n",
    b"lap-pkcs11: PIN_INCORRECT:\n",
    b"lap-pkcs11: PIN_INCORRECT: \x1b[0m\n",
])
def test_a_line_that_is_not_the_named_errors_is_replaced(fake_signer, body):
    result = client(fake_signer(b"LAP1 77 PIN_INCORRECT\n" + body))
    line = assert_clean_failure(result, "PIN_INCORRECT", 77)
    assert "KEY_NOT_FOUND" not in line and "without the program" not in line
    assert "behind" not in line


@pytest.mark.parametrize("frame", [
    b"LAP1 77 \x1b[2J\x1b]0;x\x07\n",            # a name that is an escape sequence
    b"LAP1 70 OK\nlap-pkcs11: OK: x\n",          # OK with an error code
    b"LAP1 0 PIN_INCORRECT\n",                   # an error name with code 0
    b"LAP1 0 OK\r\n" + base64.b64encode(SIGNATURE) + b"\n",
    b"LAP1 077 PIN_INCORRECT\n",                 # digits, but not as serve writes them
    b"LAP1 77 PIN_INCORRECT extra\n",
    b"LAP2 0 OK\n" + base64.b64encode(SIGNATURE) + b"\n",
    b"LAP1 0 OK",                                 # no newline at all
    b"\n",
])
def test_a_malformed_frame_is_signer_unavailable(fake_signer, frame):
    line = assert_clean_failure(client(fake_signer(frame)), "SIGNER_UNAVAILABLE", 69)
    assert "\x1b" not in line


def test_an_oversized_answer_is_signer_unavailable(fake_signer):
    frame = b"LAP1 0 OK\n" + b"A" * (1 << 17)
    assert_clean_failure(client(fake_signer(frame)), "SIGNER_UNAVAILABLE", 69)


# ---- time ----------------------------------------------------------------------------

def test_a_silent_signer_is_signer_unavailable_at_the_deadline(fake_signer):
    server = fake_signer("silent")
    env = base_env(LAP_PKCS11_CLIENT_TIMEOUT_MS="400")
    assert_clean_failure(client(server, env=env, timeout=10), "SIGNER_UNAVAILABLE", 69)


@pytest.mark.parametrize("answer", [ok_frame(SIGNATURE),
                                    b"LAP1 77 PIN_INCORRECT\nlap-pkcs11: PIN_INCORRECT: x\n"])
def test_a_trickling_signer_is_cut_at_the_deadline(fake_signer, answer):
    """One byte every 50 ms: each read succeeds, the whole answer would take seconds."""
    server = fake_signer(("trickle", answer))
    env = base_env(LAP_PKCS11_CLIENT_TIMEOUT_MS="500")
    started = time.monotonic()
    assert_clean_failure(client(server, env=env, timeout=10), "SIGNER_UNAVAILABLE", 69)
    assert time.monotonic() - started < 5


def feed_slowly(proc, data, stop):
    try:
        for byte in data:
            if stop.wait(0.05):
                return
            proc.stdin.write(bytes([byte]))
            proc.stdin.flush()
        stop.wait(30)  # and never close
    except OSError:
        pass


@pytest.mark.parametrize("data", [GATEWAY_STDIN * 4, b""], ids=["trickle", "silent"])
def test_stdin_that_does_not_end_is_timeout_at_the_deadline(fake_signer, data):
    server = fake_signer(ok_frame(SIGNATURE))
    proc = subprocess.Popen([LAP, "client", "--socket", str(server.path)],
                            env=base_env(LAP_PKCS11_CLIENT_TIMEOUT_MS="500"),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    stop = threading.Event()
    writer = threading.Thread(target=feed_slowly, args=(proc, data, stop), daemon=True)
    writer.start()
    try:
        proc.wait(timeout=10)  # not communicate(): it would close stdin, the end we withhold
    finally:
        stop.set()
        proc.kill()
        writer.join(5)
    proc.stdin = None
    out, err = proc.communicate(timeout=10)
    result = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    line = assert_clean_failure(result, "TIMEOUT", 75)
    assert "stdin" in line
    assert not server.connected.is_set(), "a message was sent before stdin ended"


# ---- signals, descriptors, core dumps --------------------------------------------------

def start_waiting_client(server, **popen):
    """A client blocked on its signer (``hold``): returns the process once connected."""
    proc = subprocess.Popen([LAP, "client", "--socket", str(server.path)],
                            env=base_env(LAP_PKCS11_CLIENT_TIMEOUT_MS="20000"),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, **popen)
    proc.stdin.write(GATEWAY_STDIN)
    proc.stdin.close()
    proc.stdin = None  # so that communicate() does not flush it
    assert server.connected.wait(10), "the client never connected"
    return proc


@pytest.mark.parametrize("sig", sorted(SIGNAL_NAMES), ids=lambda s: SIGNAL_NAMES[s])
def test_a_signal_while_waiting_is_one_line(fake_signer, sig):
    server = fake_signer(ok_frame(SIGNATURE), hold=True)
    proc = start_waiting_client(server)
    time.sleep(0.1)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=10)
    result = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    line = assert_clean_failure(result, "SIGNING_FAILED", 70)
    assert f"interrupted by {SIGNAL_NAMES[sig]}" in line


def test_a_signal_while_reading_stdin_is_one_line(fake_signer):
    server = fake_signer(ok_frame(SIGNATURE))
    proc = subprocess.Popen([LAP, "client", "--socket", str(server.path)],
                            env=base_env(LAP_PKCS11_CLIENT_TIMEOUT_MS="20000"),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=10)  # stdin stays open: the client is still reading it
    proc.stdin.close()
    proc.stdin = None
    out, err = proc.communicate(timeout=10)
    result = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    assert "interrupted by SIGINT" in assert_clean_failure(result, "SIGNING_FAILED", 70)
    assert not server.connected.is_set()


def high_descriptor(number=1100):
    """The write end of a pipe at fd ``number`` (the audit's caller had fds up to ~1100)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft <= number:
        if hard != resource.RLIM_INFINITY and hard <= number:
            pytest.skip(f"RLIMIT_NOFILE hard limit {hard} allows no fd {number} here")
        resource.setrlimit(resource.RLIMIT_NOFILE, (number + 64, hard))
    read_end, write_end = os.pipe()
    os.dup2(write_end, number)
    os.close(write_end)
    return read_end, number


def nobody_else_holds(read_end):
    """Whether the pipe's write end is closed everywhere (its read end sees EOF).

    Asked of the pipe, not of /proc/PID/fd: a signer makes itself non-dumpable,
    which (rightly) hides its /proc/PID/fd from its own user.
    """
    poller = select.poll()
    poller.register(read_end, select.POLLIN)
    return bool(poller.poll(2000)) and os.read(read_end, 1) == b""


def test_inherited_descriptors_are_closed_and_harmless(fake_signer):
    read_end, high = high_descriptor()
    key = Key()
    server = fake_signer(lambda request: ok_frame(key.sign(request_message(request))), hold=True)
    try:
        proc = start_waiting_client(server, pass_fds=(high,))
    finally:
        os.close(high)
    try:
        closed = nobody_else_holds(read_end)  # while the client runs
        server.release()
        out, err = proc.communicate(timeout=10)
    finally:
        os.close(read_end)
    assert closed, "the client kept an inherited descriptor open"
    assert proc.returncode == 0, err
    verify(key.public, MESSAGE, gateway_decode(out))


def max_core(pid):
    with open(f"/proc/{pid}/limits") as limits:
        for line in limits:
            if line.startswith("Max core file size"):
                return line.split()[4:6]
    raise AssertionError("no core limit in /proc/PID/limits")


def allow_cores():
    """preexec_fn: a core limit above 0, so that the signer visibly lowers it."""
    _, hard = resource.getrlimit(resource.RLIMIT_CORE)
    resource.setrlimit(resource.RLIMIT_CORE, (hard, hard))


def require_core_limit_above_zero():
    if resource.getrlimit(resource.RLIMIT_CORE)[1] == 0:
        pytest.skip("the core hard limit is 0 here: nothing for the signer to lower")


def test_client_sets_the_core_limit_to_zero(fake_signer):
    require_core_limit_above_zero()
    server = fake_signer(ok_frame(SIGNATURE), hold=True)
    proc = start_waiting_client(server, preexec_fn=allow_cores)
    limit = max_core(proc.pid)
    server.release()
    proc.communicate(timeout=10)
    assert limit == ["0", "0"], limit


# ---- stdout and stderr -----------------------------------------------------------------

def close_fd(fd):
    return lambda: os.close(fd)


def test_closed_stdout_is_signing_failed_before_anything_is_signed(fake_signer):
    server = fake_signer(ok_frame(SIGNATURE))
    result = client(server, stdout=None, preexec_fn=close_fd(1))
    assert result.returncode == 70
    assert "stdout is closed" in clean_line(result)
    assert not server.connected.wait(0.2), "the client asked for a signature it cannot print"


def test_full_stdout_is_signing_failed(fake_signer):
    with open("/dev/full", "wb") as full:
        result = client(fake_signer(ok_frame(SIGNATURE)), stdout=full)
    assert result.returncode == 70
    assert clean_line(result).startswith("lap-pkcs11: SIGNING_FAILED: stdout cannot be written")


def test_broken_stdout_is_signing_failed_not_sigpipe(fake_signer):
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = client(fake_signer(ok_frame(SIGNATURE)), stdout=write_end)
    finally:
        os.close(write_end)
    assert result.returncode == 70, result.returncode
    assert clean_line(result).startswith("lap-pkcs11: SIGNING_FAILED: stdout cannot be written")


@pytest.mark.parametrize("how", ["closed", "broken"])
def test_broken_stderr_keeps_the_exit_code(tmp_path, how):
    popen = {"stdout": subprocess.PIPE}
    if how == "closed":
        popen.update(stderr=None, preexec_fn=close_fd(2))
        result = client(tmp_path / "absent.sock", **popen)
    else:
        read_end, write_end = os.pipe()
        os.close(read_end)
        try:
            result = client(tmp_path / "absent.sock", stderr=write_end, **popen)
        finally:
            os.close(write_end)
    assert (result.returncode, result.stdout) == (69, b"")


def test_help_goes_to_stdout():
    result = subprocess.run([LAP, "client", "--help"], capture_output=True, env=base_env())
    assert result.returncode == 0 and b"--expect-public-key" in result.stdout
    assert b"--input" in result.stdout and result.stderr == b""


# ---- through real socket activation ----------------------------------------------------

def test_pinned_client_signs_through_socket_activation(keyed, activated):  # noqa: F811
    _, public = keyed
    server = activated()
    env = base_env(LAP_GATEWAY_PUBLIC_KEY_HEX=public.hex(), SIGNER_MODE="external")
    result = client(server.path, args=["--input", "base64"], env=env)
    assert result.returncode == 0, result.stderr
    verify(public, MESSAGE, gateway_decode(result.stdout))


@pytest.mark.parametrize("output", ["hex", "raw"])
def test_pinned_client_checks_every_encoding_of_the_signer(keyed, activated, output):  # noqa: F811
    _, public = keyed
    server = activated(env_overrides={"LAP_PKCS11_OUTPUT": output})
    env = base_env(LAP_PKCS11_EXPECT_PUBLIC_KEY=public.hex(), LAP_PKCS11_INPUT="base64")
    result = client(server.path, env=env)
    assert result.returncode == 0, result.stderr
    signature = bytes.fromhex(result.stdout.decode()) if output == "hex" else result.stdout
    verify(public, MESSAGE, signature)


def test_a_token_key_other_than_the_pinned_one_is_key_mismatch(keyed, activated):  # noqa: F811
    server = activated()
    env = base_env(LAP_GATEWAY_PUBLIC_KEY_HEX=Key().public.hex(), SIGNER_MODE="external")
    assert_clean_failure(client(server.path, args=["--input", "base64"], env=env),
                         "KEY_MISMATCH", 70)


def read_answer(connection, seconds=10):
    """Everything serve answers, until it closes (a reset: it left what we sent unread)."""
    connection.settimeout(seconds)
    answer = b""
    try:
        while chunk := connection.recv(4096):
            answer += chunk
    except TimeoutError:
        raise AssertionError(f"serve kept the connection open past {seconds} s: {answer!r}")
    except ConnectionResetError:
        pass
    return answer


def connect(path):
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    connection.connect(str(path))
    return connection


TIMEOUT_FRAME = b"LAP1 75 TIMEOUT\nlap-pkcs11: TIMEOUT: "


@pytest.mark.parametrize("sent", [b"", b"LA", b"LAP1 20000\n", b"LAP1 20000\naGVsbG8"],
                         ids=["nothing", "half-header", "header", "half-payload"])
def test_serve_drops_an_unfinished_request_at_its_deadline(keyed, activated, sent):  # noqa: F811
    server = activated(env_overrides={"LAP_PKCS11_TIMEOUT_MS": "500"})
    with connect(server.path) as connection:
        started = time.monotonic()
        connection.sendall(sent)
        answer = read_answer(connection)
        elapsed = time.monotonic() - started
    assert answer.startswith(TIMEOUT_FRAME), answer
    assert answer.count(b"\n") == 2
    assert elapsed >= 0.4, elapsed  # its own deadline, not at once


def test_serve_bounds_the_request_when_its_configuration_is_broken(keyed, activated):  # noqa: F811
    server = activated(env_overrides={"LAP_PKCS11_TIMEOUT_MS": "soon"})
    with connect(server.path) as connection:
        answer = read_answer(connection)
    assert answer.startswith(TIMEOUT_FRAME) or answer.startswith(b"LAP1 64 CONFIG_INVALID\n"), \
        answer


def trickle(connection, data, stop):
    try:
        for byte in data:
            if stop.wait(0.05):
                return
            connection.sendall(bytes([byte]))
    except OSError:
        pass


def test_serve_cuts_a_trickling_request_at_the_deadline(keyed, activated):  # noqa: F811
    server = activated(env_overrides={"LAP_PKCS11_TIMEOUT_MS": "500"})
    stop = threading.Event()
    with connect(server.path) as connection:
        feeder = threading.Thread(target=trickle, daemon=True,
                                  args=(connection, b"LAP1 20000\n" + GATEWAY_STDIN * 8, stop))
        feeder.start()
        try:
            answer = read_answer(connection)
        finally:
            stop.set()
            feeder.join(5)
    assert answer.startswith(TIMEOUT_FRAME), answer


def test_silent_connections_do_not_pile_up(keyed, activated):  # noqa: F811
    _, public = keyed
    server = activated(env_overrides={"LAP_PKCS11_TIMEOUT_MS": "500"})
    silent = [connect(server.path) for _ in range(24)]
    try:
        answers = [read_answer(connection) for connection in silent]
    finally:
        for connection in silent:
            connection.close()
    assert all(answer.startswith(TIMEOUT_FRAME) for answer in answers), answers
    deadline = time.monotonic() + 10
    while children(server.proc.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert children(server.proc.pid) == [], "serve instances outlived their connections"
    result = client(server.path)
    assert result.returncode == 0, result.stderr
    verify(public, MESSAGE, gateway_decode(result.stdout))


def children(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as listing:
            return [int(child) for child in listing.read().split()]
    except FileNotFoundError:
        return []


def test_serve_sets_the_core_limit_to_zero(keyed, activated):  # noqa: F811
    require_core_limit_above_zero()
    server = activated(env_overrides={"LAP_PKCS11_TIMEOUT_MS": "5000"}, preexec_fn=allow_cores)
    with connect(server.path) as connection:
        deadline = time.monotonic() + 10
        while not children(server.proc.pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        (serve_pid,) = children(server.proc.pid)
        # The forked child shows the inherited limit until serve has started: wait for it.
        while (limit := max_core(serve_pid)) != ["0", "0"] and time.monotonic() < deadline:
            time.sleep(0.02)
        connection.shutdown(socket.SHUT_WR)
        read_answer(connection)
    assert limit == ["0", "0"], limit


def serve_directly(token, tmp_path, extra_env=None, **popen):
    """``lap-pkcs11 serve`` on one end of a socket pair, as systemd would start it."""
    ours, theirs = socket.socketpair()
    pin = tmp_path / "serve-pin"
    pin.write_text(USER_PIN + "\n")
    pin.chmod(0o600)
    env = {k: v for k, v in token.env.items() if k != "PKCS11_PIN"}
    env.update(LAP_PKCS11_MODULE=token.module, LAP_PKCS11_TOKEN_LABEL=token.label,
               LAP_PKCS11_KEY_ID="01", LAP_PKCS11_INPUT="base64", **(extra_env or {}))
    proc = subprocess.Popen([LAP, "serve", "--pin-file", str(pin)], stdin=theirs,
                            stdout=theirs, stderr=subprocess.PIPE, env=env, **popen)
    theirs.close()
    return proc, ours


def test_serve_passes_no_inherited_descriptor_to_the_tool(keyed, tmp_path):
    token, _ = keyed
    record = tmp_path / "record"
    read_end, high = high_descriptor()
    try:
        proc, connection = serve_directly(
            token, tmp_path, {"LAP_PKCS11_TOOL": str(FAKE_TOOL), "FAKE_MODE": "hang",
                              "FAKE_RECORD": str(record), "LAP_PKCS11_TIMEOUT_MS": "3000"},
            pass_fds=(high,))
    finally:
        os.close(high)
    try:
        with connection:
            connection.sendall(b"LAP1 20000\n" + GATEWAY_STDIN)
            connection.shutdown(socket.SHUT_WR)
            tool_pid = wait_for_the_tool(record)
            closed = nobody_else_holds(read_end)  # while serve and the (FAKE) tool run
            answer = read_answer(connection)
    finally:
        os.close(read_end)
    proc.wait(10)
    assert closed, "serve or pkcs11-tool kept an inherited descriptor open"
    assert answer.startswith(TIMEOUT_FRAME), answer
    assert not alive(tool_pid)


def wait_for_the_tool(record):
    deadline = time.monotonic() + 10
    while "pid=" not in (record.read_text() if record.exists() else ""):
        assert time.monotonic() < deadline, "the FAKE tool never started"
        time.sleep(0.02)
    return int(record.read_text().split("pid=", 1)[1].split()[0])


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=lambda s: SIGNAL_NAMES[s])
def test_serve_answers_a_signal_in_one_frame(keyed, tmp_path, sig):
    token, _ = keyed
    record = tmp_path / "record"
    proc, connection = serve_directly(
        token, tmp_path, {"LAP_PKCS11_TOOL": str(FAKE_TOOL), "FAKE_MODE": "hang",
                          "FAKE_RECORD": str(record), "LAP_PKCS11_TIMEOUT_MS": "20000"})
    with connection:
        connection.sendall(b"LAP1 20000\n" + GATEWAY_STDIN)
        connection.shutdown(socket.SHUT_WR)
        tool_pid = wait_for_the_tool(record)
        proc.send_signal(sig)
        answer = read_answer(connection)
    _, err = proc.communicate(timeout=10)
    assert answer.startswith(b"LAP1 70 SIGNING_FAILED\nlap-pkcs11: SIGNING_FAILED: interrupted by "
                             + SIGNAL_NAMES[sig].encode()), answer
    assert b"Traceback" not in err and err.count(b"\n") == 1, err
    assert not alive(tool_pid)


def test_serve_with_a_vanished_client_logs_one_line_and_no_traceback(keyed, tmp_path):
    token, _ = keyed
    proc, connection = serve_directly(token, tmp_path)
    connection.sendall(b"LAP1 20000\n" + GATEWAY_STDIN)
    connection.close()  # gone before the answer
    _, err = proc.communicate(timeout=30)
    assert b"Traceback" not in err and len(err.splitlines()) <= 1, err
