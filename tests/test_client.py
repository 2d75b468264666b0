"""``lap-pkcs11 client``, ``lap-pkcs11-client`` and ``serve`` under a hostile or broken peer.

The clients check what the signer answers as the gateway would have to: FAKE
signer sockets (a few lines of Python here) send what no real ``serve`` or agent
sends: empty, short or foreign signatures, error frames without a line, escape
sequences, silence, a trickle. Every client test runs against both clients (the
``run`` fixture): the Python one and the compiled one; each case of the compiled
client is run through the Python client too, and their stdout, stderr and exit
code must be byte-identical. The pinned-key check is the Python client's own
(the compiled client leaves it to the agent, which verifies every signature):
those tests run the Python client. ``serve`` is run through real socket
activation (systemd-socket-activate, the unit's own ExecStart) and the agent as
``lap-pkcs11 agent``, both against a real token, and ``serve`` is fed silence
and trickles by raw connections. Every failure is the contract: exit code, one
clean ``lap-pkcs11: NAME: ...`` line, empty stdout.
"""

import base64
import os
import resource
import select
import shutil
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

from conftest import FAKE_TOOL, OTHER_UID, USER_PIN, assert_failure, gateway_decode, verify
from lap_pkcs11.per_signature import errors
from test_agent import Agent, reinitialise
from test_sign_errors import alive
from test_systemd import activated  # noqa: F401  (a fixture)

LAP = str(Path(sys.executable).parent / "lap-pkcs11")
PYTHON_CLIENT = [LAP, "client"]
MESSAGE = b"\x00lap receipt\x00" * 30
GATEWAY_STDIN = base64.b64encode(MESSAGE) + b"\n"
SIGNAL_NAMES = {signal.SIGINT: "SIGINT", signal.SIGTERM: "SIGTERM", signal.SIGHUP: "SIGHUP"}


def clean_line(result):
    """The one stderr line, checked to hold nothing a terminal or a log would interpret."""
    line = result.stderr.decode("utf-8")
    assert line.endswith("\n") and line.count("\n") == 1, repr(line)
    assert line[:-1].isprintable() and line.isascii(), \
        f"control characters reach the gateway's log: {line!r}"
    return line[:-1]


def assert_clean_failure(result, name, code, pin=USER_PIN):
    assert_failure(result, name, code, pin=pin)
    return clean_line(result)


def assert_same(result, reference):
    """The compiled client's result is the Python client's, byte for byte."""
    assert (result.returncode, result.stdout, result.stderr) == \
        (reference.returncode, reference.stdout, reference.stderr), \
        f"compiled: {result.returncode} {result.stdout!r} {result.stderr!r}\n" \
        f"python:   {reference.returncode} {reference.stdout!r} {reference.stderr!r}"


def base_env(**extra):
    return {"PATH": os.environ["PATH"], **extra}


def run_once(argv, server, stdin=GATEWAY_STDIN, args=(), env=None, timeout=30, **popen):
    """One client run as the gateway runs it: ``argv --socket PATH ARGS``, stdin fed whole."""
    path = server if isinstance(server, (str, Path)) else server.path
    feed = {} if "stdin" in popen else {"input": stdin}
    popen.setdefault("stdout", subprocess.PIPE)
    popen.setdefault("stderr", subprocess.PIPE)
    return subprocess.run([*argv, "--socket", str(path), *args],
                          env=env if env is not None else base_env(), timeout=timeout,
                          **feed, **popen)


class Client:
    """One client implementation. ``each(case)`` runs ``case(argv)`` for it and, for the
    compiled client, for the Python client too, and asserts both results are the same."""

    def __init__(self, name, argv):
        self.name = name
        self.argv = argv

    def __repr__(self):
        return self.name

    def each(self, case):
        result = case(self.argv)
        if self.argv != PYTHON_CLIENT:
            assert_same(result, case(PYTHON_CLIENT))
        return result

    def __call__(self, server, **kwargs):
        return self.each(lambda argv: run_once(argv, server, **kwargs))


client = Client("python", PYTHON_CLIENT)


@pytest.fixture(params=["python", "c"])
def run(request, compiled_client):
    return client if request.param == "python" else Client("c", [str(compiled_client)])


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
    """A FAKE signer socket: reads each request, then does ``behaviour`` on that connection.

    ``behaviour`` is bytes to answer, a function of the request returning them,
    ``"silent"`` (holds the connection until closed) or ``("trickle", bytes)``
    (sends one byte every 50 ms and never finishes). ``hold`` delays every answer
    until ``release()``. With ``unread``, it answers as soon as a request is there and
    closes without reading it. Connections are served each in its own thread, the
    same way.
    """

    def __init__(self, path, behaviour, hold=False, unread=False):
        self.path = path
        self.behaviour = behaviour
        self.unread = unread
        self.requests = []
        self.connected = threading.Event()
        self.accepted = 0
        self.condition = threading.Condition()
        self.released = threading.Event()
        if not hold:
            self.released.set()
        self.stop = threading.Event()
        self.handlers = []
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(16)
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self):
        while not self.stop.is_set():
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            with self.condition:
                self.accepted += 1
                self.condition.notify_all()
            self.connected.set()
            handler = threading.Thread(target=self._serve, args=(connection,), daemon=True)
            handler.start()
            self.handlers.append(handler)

    def wait_accepted(self, count, seconds=10):
        """Whether ``count`` connections came within ``seconds``."""
        with self.condition:
            return self.condition.wait_for(lambda: self.accepted >= count, seconds)

    def _serve(self, connection):
        with connection:
            connection.settimeout(30)
            request = b""
            try:
                if self.unread:
                    connection.recv(1, socket.MSG_PEEK)  # there, and left unread
                while not self.unread and (chunk := connection.recv(65536)):
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
        try:
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() that waits
        except OSError:
            pass
        self.listener.close()
        self.thread.join(10)
        for handler in self.handlers:
            handler.join(10)


@pytest.fixture
def fake_signer(tmp_path):
    servers = []

    def start(behaviour, hold=False, unread=False):
        server = FakeSigner(tmp_path / f"fake{len(servers)}.sock", behaviour, hold, unread)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


# ---- what a successful answer must be ------------------------------------------------

SIGNATURE = bytes(range(64))


@pytest.mark.parametrize("output", ["base64", "hex", "raw"])
def test_each_encoding_sign_prints_passes_through(fake_signer, run, output):
    """The positive control of the checks below: sign's three encodings pass unchanged."""
    frame = ok_frame(SIGNATURE, output)
    result = run(fake_signer(frame))
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
    base64.b64encode(SIGNATURE)[:-1] + b"\x00\n",    # a NUL in place of padding
    b"\x00" * 88 + b"\n",                            # 89 bytes of NULs
    (SIGNATURE.hex()[:-1] + "g").encode() + b"\n",   # not hex
], ids=["empty", "text", "raw63", "b64-63", "hex63", "raw65", "b64-no-newline", "b64-two-lines",
        "b64-space", "b64-noncanonical", "hex-upper", "hex-no-newline", "two-signatures",
        "b64-nul", "nuls", "hex-g"])
def test_an_ok_that_is_not_one_signature_is_signer_unavailable(fake_signer, run, body):
    result = run(fake_signer(b"LAP1 0 OK\n" + body))
    line = assert_clean_failure(result, "SIGNER_UNAVAILABLE", 69)
    assert "signature" in line


# ---- the pinned key ------------------------------------------------------------------

@pytest.mark.parametrize("how", ["flag", "LAP_PKCS11_EXPECT_PUBLIC_KEY",
                                 "LAP_GATEWAY_PUBLIC_KEY_HEX"])
def test_a_signature_by_another_key_is_key_mismatch(fake_signer, how):
    """The Python client's own check (the compiled client leaves it to the agent)."""
    pinned, other = Key(), Key()
    server = fake_signer(lambda request: ok_frame(other.sign(request_message(request))))
    args, env = ["--input", "base64"], base_env()
    if how == "flag":
        args += ["--expect-public-key", pinned.public.hex()]
    else:
        env[how] = pinned.public.hex()
    assert_clean_failure(client(server, args=args, env=env), "KEY_MISMATCH", 70)


@pytest.mark.parametrize("output", ["base64", "hex", "raw"])
def test_a_signature_by_the_pinned_key_passes(fake_signer, run, output):
    key = Key()
    server = fake_signer(lambda request: ok_frame(key.sign(request_message(request)), output))
    env = base_env(LAP_GATEWAY_PUBLIC_KEY_HEX=key.public.hex(), SIGNER_MODE="external")
    result = run(server, args=["--input", "base64"], env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout == ok_frame(key.sign(MESSAGE), output).split(b"\n", 1)[1]


def test_a_signature_of_another_message_is_key_mismatch(fake_signer):
    key = Key()
    server = fake_signer(ok_frame(key.sign(b"another message")))
    env = base_env(LAP_PKCS11_EXPECT_PUBLIC_KEY=key.public.hex(), LAP_PKCS11_INPUT="base64")
    assert_clean_failure(client(server, env=env), "KEY_MISMATCH", 70)


def test_raw_input_is_verified_as_raw(fake_signer, run):
    key = Key()
    server = fake_signer(lambda request: ok_frame(key.sign(request_message(request, "raw"))))
    env = base_env(LAP_PKCS11_EXPECT_PUBLIC_KEY=key.public.hex())
    result = run(server, stdin=MESSAGE, args=["--input", "raw"], env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout == base64.b64encode(key.sign(MESSAGE)) + b"\n"


def test_raw_signed_input_read_as_base64_is_key_mismatch(fake_signer):
    key = Key()
    server = fake_signer(lambda request: ok_frame(key.sign(request_message(request, "raw"))))
    env = base_env(LAP_PKCS11_EXPECT_PUBLIC_KEY=key.public.hex())
    # The signer signed the bytes as sent; read as base64 by the client they are not the message.
    result = client(server, args=["--input", "base64"], env=env)
    assert_clean_failure(result, "KEY_MISMATCH", 70)


def test_the_compiled_client_leaves_the_pinned_key_to_the_signer(fake_signer, compiled_client):
    """The one place the clients differ, by design: lap-pkcs11-client does not verify
    (the agent verifies every signature against its pinned key before it answers; a
    FAKE signer that does not is trusted as far as SO_PEERCRED lets it be)."""
    pinned, other = Key(), Key()
    frame = ok_frame(other.sign(MESSAGE))
    env = base_env(LAP_GATEWAY_PUBLIC_KEY_HEX=pinned.public.hex(), SIGNER_MODE="external")
    compiled = run_once([str(compiled_client)], fake_signer(frame), args=["--input", "base64"],
                        env=env)
    assert (compiled.returncode, compiled.stdout) == (0, frame.split(b"\n", 1)[1])
    python = client(fake_signer(frame), args=["--input", "base64"], env=env)
    assert_clean_failure(python, "KEY_MISMATCH", 70)


@pytest.mark.parametrize("marker", [{"SIGNER_MODE": "external"},
                                    {"SIGNER_MODE": "\u00a0 Command\u2003"},
                                    {"LAP_GATEWAY_SIGNING_CMD": "lap-pkcs11 client"},
                                    {"LAP_GATEWAY_KEYSET_FILE": "/etc/lap/keyset.json"}])
def test_pinned_key_under_the_gateway_needs_input_set(fake_signer, run, marker):
    key = Key()
    server = fake_signer(lambda request: ok_frame(key.sign(request_message(request))))
    env = base_env(LAP_GATEWAY_PUBLIC_KEY_HEX=key.public.hex(), **marker)
    line = assert_clean_failure(run(server, env=env), "CONFIG_INVALID", 64)
    assert "--input base64" in line
    assert not server.connected.wait(0.2), "the client asked for a signature it cannot check"


@pytest.mark.parametrize("mode", ["file", "externally", "ex ternal", "\u00a0"])
def test_other_signer_modes_are_not_the_gateway(fake_signer, run, mode):
    key = Key()
    server = fake_signer(lambda request: ok_frame(key.sign(request_message(request, "raw"))))
    env = base_env(LAP_GATEWAY_PUBLIC_KEY_HEX=key.public.hex(), SIGNER_MODE=mode)
    result = run(server, stdin=MESSAGE, env=env)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("args, env", [
    (["--input", "hex"], {}),
    ([], {"LAP_PKCS11_INPUT": "utf8"}),
    (["--input="], {}),
    (["--expect-public-key", "abcd"], {}),
    ([], {"LAP_GATEWAY_PUBLIC_KEY_HEX": "zz" * 32}),
    (["--input"], {}),
    (["--socket"], {}),
    (["--timeout-ms", "0"], {}),
    (["--timeout-ms", "600001"], {}),
    (["--timeout-ms", "1" * 5000], {}),
    (["--timeout-ms", " 12a"], {}),
    ([], {"LAP_PKCS11_CLIENT_TIMEOUT_MS": "soon"}),
    ([], {"SIGNER_TIMEOUT_SECONDS": "0.29"}),
    ([], {"SIGNER_TIMEOUT_SECONDS": "1.2.3"}),
    ([], {"SIGNER_TIMEOUT_SECONDS": "9" * 5000}),
    ([], {"SIGNER_TIMEOUT_SECONDS": "86400"}),
    ([], {"SIGNER_TIMEOUT_SECONDS": "."}),
    ([], {"LAP_GATEWAY_SIGNING_CMD_TIMEOUT_SECONDS": "-1"}),
    (["--timeout-ms", "1", "--timeout-ms", "2"], {}),
    (["--sign"], {}),
    (["--input=raw=x"], {}),
    (["positional"], {}),
    (["--s\u00e9cket\x1b[31m=x"], {}),
    (["-" * 300], {}),
    (["-h"] * 2, {}),
    (["--help=yes"], {}),
    (["--server-user", "-root"], {}),
    (["--server-user", ""], {}),
    ([], {"LAP_PKCS11_SERVER_USER": "a" * 33}),
    (["--server-user", "r\u00f6ot"], {}),
], ids=["input-flag", "input-env", "input-empty", "key-flag", "key-env", "no-value",
        "socket-no-value", "timeout-0", "timeout-big", "timeout-huge", "timeout-junk",
        "timeout-env", "caller-short", "caller-junk", "caller-huge", "caller-day", "caller-dot",
        "gateway-negative", "twice", "unknown", "input-equals", "positional", "escape-option",
        "long-option", "help-twice", "help-value", "user-dash", "user-empty", "user-long",
        "user-umlaut"])
def test_bad_client_options_are_config_invalid(fake_signer, run, args, env):
    server = fake_signer(ok_frame(SIGNATURE))
    assert_clean_failure(run(server, args=args, env=base_env(**env)), "CONFIG_INVALID", 64)
    assert not server.connected.wait(0.2)


@pytest.mark.parametrize("args, env", [
    (["--timeout-ms", " 000000000003000\t"], {}),
    ([], {"SIGNER_TIMEOUT_SECONDS": "2."}),
    ([], {"SIGNER_TIMEOUT_SECONDS": ".5"}),
    ([], {"SIGNER_TIMEOUT_SECONDS": "", "LAP_GATEWAY_SIGNING_CMD_TIMEOUT_SECONDS": "1.5"}),
    (["--input", " RAW\t", "--expect-public-key", "KEY"], {}),
    ([], {"LAP_PKCS11_INPUT": "Base64", "LAP_PKCS11_EXPECT_PUBLIC_KEY": "KEY"}),
    (["--server-user", " 0 "], {}),
], ids=["timeout-padded", "caller-dot-end", "caller-dot-start", "caller-second", "input-cased",
        "input-env-cased", "user-root"])
def test_odd_but_valid_options_are_read_alike(fake_signer, run, args, env):
    key = Key()
    raw = "RAW" in " ".join(args)
    server = fake_signer(lambda request: ok_frame(key.sign(request_message(
        request, "raw" if raw else "base64"))))
    spelt = " " + key.public.hex().upper() + "\t"
    args = [spelt if arg == "KEY" else arg for arg in args]
    env = {name: spelt if value == "KEY" else value for name, value in env.items()}
    result = run(server, stdin=MESSAGE if raw else GATEWAY_STDIN, args=args, env=base_env(**env))
    assert result.returncode == 0, result.stderr
    verify(key.public, MESSAGE, base64.b64decode(result.stdout))


def test_an_empty_socket_flag_is_the_default_socket(run):
    result = run.each(lambda argv: subprocess.run(
        [*argv, "--socket="], input=GATEWAY_STDIN, capture_output=True,
        env=base_env(LAP_PKCS11_SOCKET="/nonexistent/signer.sock")))
    assert "/nonexistent" not in clean_line(result) and result.returncode != 0


def test_pinned_key_with_stdin_that_is_not_base64_is_input_invalid(fake_signer, run):
    key = Key()
    server = fake_signer(ok_frame(SIGNATURE))
    env = base_env(LAP_GATEWAY_PUBLIC_KEY_HEX=key.public.hex())
    for stdin in (b"not base64\n", b"QQ\n", b"QR==\n", b" \x00QQ==\n", b"A===\n", b"====\n"):
        result = run(server, stdin=stdin, args=["--input", "base64"], env=env)
        assert_clean_failure(result, "INPUT_INVALID", 65)


# ---- error frames --------------------------------------------------------------------

@pytest.mark.parametrize("name, code", [("PIN_INCORRECT", 77), ("TIMEOUT", 75),
                                        ("KEY_NOT_FOUND", 69)])
def test_an_error_frame_without_a_line_gets_a_generated_one(fake_signer, run, name, code):
    result = run(fake_signer(b"LAP1 %d %s\n" % (code, name.encode())))
    line = assert_clean_failure(result, name, code)
    assert "journal" in line or "no message" in line


def every_error():
    found, todo = [], [errors.SignerError]
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        if cls is not errors.SignerError:
            found.append(cls)
    return sorted(found, key=lambda cls: cls.name)


@pytest.mark.parametrize("error", every_error(), ids=lambda cls: cls.name)
def test_every_error_of_sign_comes_through_under_its_name(fake_signer, run, error):
    """Every name and exit code errors.py defines (the compiled client's table is checked
    by the comparison), with its line, and with another error's exit code."""
    line = f"lap-pkcs11: {error.name}: what {error.name} says\n".encode()
    result = run(fake_signer(b"LAP1 %d %s\n%s" % (error.exit_code, error.name.encode(), line)))
    assert assert_clean_failure(result, error.name, error.exit_code) == line.decode()[:-1]
    result = run(fake_signer(b"LAP1 %d %s\n%s" % (error.exit_code + 1, error.name.encode(), line)))
    assert "unknown error" in assert_clean_failure(result, "SIGNER_UNAVAILABLE", 69)


ESCAPES = (b"lap-pkcs11: PIN_INCORRECT: the \x1b[31mPIN\x1b[0m was \x1b]0;owned\x07wrong"
           b"\x1b]8;;http://x\x1b\\link\x1b\\ \x9b2J \xc2\x9b2J\r\x08\x7f\x00 done "
           b"\xe2\x80\xa8 \xc2\x85 \xe2\x80\xae x\n")


@pytest.mark.parametrize("body", [
    ESCAPES,
    b"lap-pkcs11: PIN_INCORRECT: first\rlap-pkcs11: OK: forged\n",
    b"lap-pkcs11: PIN_INCORRECT: one\nlap-pkcs11: PIN_INCORRECT: two\n",
    b"lap-pkcs11: PIN_INCORRECT: \xff\xfe not utf-8\n",
    b"lap-pkcs11: PIN_INCORRECT: \xc2\x90DCS\xc2\x9cafter \xc2\x9dOSC\x1b\\ \x1bP\x07 \x1b(B ok\n",
    b"lap-pkcs11: PIN_INCORRECT: cut \x1b[",
    b"lap-pkcs11: PIN_INCORRECT: cut \x1b]0;title",
    b"lap-pkcs11: PIN_INCORRECT: cut \x1b",
    b"lap-pkcs11: PIN_INCORRECT: cut \xc2",
    b"lap-pkcs11: PIN_INCORRECT: " + b"long words " * 60 + b"\n",
    b"lap-pkcs11: PIN_INCORRECT: " + b"x" * 500 + b"\n",
    b"lap-pkcs11: PIN_INCORRECT: " + b"\x1b[1m \t " * 2000 + b"end\n",
], ids=["escapes", "carriage-return", "two-lines", "not-utf8", "c1-strings", "cut-csi",
        "cut-osc", "cut-esc", "cut-c2", "long-words", "long-word", "many-escapes"])
def test_the_servers_text_never_reaches_the_log_raw(fake_signer, run, body):
    result = run(fake_signer(b"LAP1 77 PIN_INCORRECT\n" + body))
    line = assert_clean_failure(result, "PIN_INCORRECT", 77)
    assert "\x1b" not in line and "[31m" not in line and "owned" not in line
    assert "two" not in line and "DCS" not in line and "OSC" not in line
    assert len(line) <= len("lap-pkcs11: PIN_INCORRECT: ") + 400


def test_escape_text_keeps_the_readable_part(fake_signer, run):
    result = run(fake_signer(b"LAP1 77 PIN_INCORRECT\n" + ESCAPES))
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
def test_a_line_that_is_not_the_named_errors_is_replaced(fake_signer, run, body):
    result = run(fake_signer(b"LAP1 77 PIN_INCORRECT\n" + body))
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
    b"LAP1  0 OK\n",
    b"LAP1 0  OK\n",
    b" LAP1 0 OK\n",
    b"LAP1 0 ok\n",
    b"LAP1 1000 PIN_INCORRECT\n",
    b"LAP1 99999999999999999999999999 PIN_INCORRECT\n",
    b"LAP1 -1 PIN_INCORRECT\n",
    b"LAP1 77 _PIN\n",
    b"LAP1 77 " + b"A" * 41 + b"\n",
    b"LAP1 77 P\xc3\x8dN\n",
    b"LAP1 77 PIN\x00\n",
    b"LAP1\x000 OK\n",
    b"LAP1 0 OK\x00\n" + SIGNATURE,
], ids=["escape-name", "ok-70", "error-0", "crlf", "leading-zero", "extra", "lap2", "no-newline",
        "newline", "two-spaces", "two-spaces-name", "leading-space", "lower-ok", "code-1000",
        "huge-code", "negative", "underscore-first", "name-41", "non-ascii-name", "nul-name",
        "nul-header", "nul-ok"])
def test_a_malformed_frame_is_signer_unavailable(fake_signer, run, frame):
    line = assert_clean_failure(run(fake_signer(frame)), "SIGNER_UNAVAILABLE", 69)
    assert "\x1b" not in line


def test_an_unknown_error_name_is_signer_unavailable(fake_signer, run):
    frame = b"LAP1 77 " + b"A" * 40 + b"\nlap-pkcs11: " + b"A" * 40 + b": x\n"
    line = assert_clean_failure(run(fake_signer(frame)), "SIGNER_UNAVAILABLE", 69)
    assert "unknown error" in line


@pytest.mark.parametrize("size", [(1 << 16) - 10, (1 << 16) - 9, 1 << 17])
def test_an_oversized_answer_is_signer_unavailable(fake_signer, run, size):
    frame = b"LAP1 0 OK\n" + b"A" * size
    assert_clean_failure(run(fake_signer(frame)), "SIGNER_UNAVAILABLE", 69)


# ---- who serves the socket (SO_PEERCRED) ---------------------------------------------

def public_directory():
    """A fresh directory under /tmp that every user may enter (pytest's may not be)."""
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="lap-client-test-"))
    folder.chmod(0o755)
    return folder


class ForeignSigner:
    """A FAKE signer that listens as another user (nobody): root only."""

    SCRIPT = r"""
import socket, sys
listener = socket.socket(socket.AF_UNIX)
listener.bind(sys.argv[1])
listener.listen(8)
print("ready", flush=True)
while True:
    connection, _ = listener.accept()
    try:
        with connection:
            while connection.recv(65536):
                pass
            connection.sendall(bytes.fromhex(sys.argv[2]))
    except OSError:  # a client that refused us and left
        pass
"""

    def __init__(self, answer):
        if os.geteuid() != 0:
            pytest.skip("a signer socket of another user needs root here (the CI root phase "
                        "runs it)")
        self.folder = public_directory()
        self.folder.chmod(0o777)  # for nobody to bind in; closed again once it listens
        self.path = self.folder / "foreign.sock"
        self.proc = subprocess.Popen(
            ["setpriv", f"--reuid={OTHER_UID}", f"--regid={OTHER_UID}", "--clear-groups", "--",
             "/usr/bin/python3", "-I", "-c", self.SCRIPT, str(self.path), answer.hex()],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert self.proc.stdout.readline() == b"ready\n", self.proc.stderr.read()
        self.folder.chmod(0o755)

    def close(self):
        self.proc.kill()
        self.proc.wait(10)
        shutil.rmtree(self.folder)


@pytest.fixture
def foreign_signer():
    servers = []

    def start(answer):
        servers.append(ForeignSigner(answer))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def test_a_socket_served_by_another_user_is_refused_before_sending(foreign_signer, run):
    server = foreign_signer(ok_frame(SIGNATURE))
    line = assert_clean_failure(run(server), "SIGNER_UNAVAILABLE", 69)
    assert f"is served by uid {OTHER_UID} (pid " in line and "--server-user" in line
    line = assert_clean_failure(run(server, args=["--server-user", "root"]),
                                "SIGNER_UNAVAILABLE", 69)
    assert "--server-user root;" in line


@pytest.mark.parametrize("how", ["name", "uid", "env", "padded-uid"])
def test_the_agents_user_is_trusted_when_named(foreign_signer, run, how):
    server = foreign_signer(ok_frame(SIGNATURE))
    name = subprocess.run(["id", "-nu", str(OTHER_UID)], capture_output=True, text=True,
                          check=True).stdout.strip()
    args, env = [], base_env()
    if how == "name":
        args = ["--server-user", name]
    elif how == "uid":
        args = ["--server-user", str(OTHER_UID)]
    elif how == "padded-uid":
        args = [f"--server-user= 000{OTHER_UID}\t"]
    else:
        env["LAP_PKCS11_SERVER_USER"] = name
    result = run(server, args=args, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout == base64.b64encode(SIGNATURE) + b"\n"


def test_an_unknown_server_user_is_config_invalid_when_it_is_needed(foreign_signer, fake_signer,
                                                                     run):
    args = ["--server-user", "no-such-user-here"]
    result = run(fake_signer(ok_frame(SIGNATURE)), args=args)
    assert result.returncode == 0, result.stderr  # our own socket: the name is not looked up
    server = foreign_signer(ok_frame(SIGNATURE))
    line = assert_clean_failure(run(server, args=args), "CONFIG_INVALID", 64)
    assert "no user no-such-user-here" in line


# ---- the socket ----------------------------------------------------------------------

@pytest.mark.parametrize("what", ["missing", "file", "directory", "too-long", "odd-bytes",
                                  "very-long", "not-a-directory", "unreadable"])
def test_a_socket_that_is_not_there_is_signer_unavailable(tmp_path, run, what):
    path = tmp_path / "signer.sock"
    if what == "file":
        path.write_text("")
    elif what == "directory":
        path.mkdir()
    elif what == "too-long":
        path = tmp_path / ("x" * (120 - len(str(tmp_path))))
    elif what == "odd-bytes":
        path = Path(os.fsdecode(bytes(tmp_path) + b"/\xff\x1b[2J \xc3\xa9\tsock"))
    elif what == "very-long":
        path = tmp_path / ("y" * 250) / ("z" * 250)
    elif what == "not-a-directory":
        (tmp_path / "file").write_text("")
        path = tmp_path / "file" / "signer.sock"
    else:
        if os.geteuid() == 0:
            pytest.skip("root reads any directory")
        (tmp_path / "closed").mkdir(mode=0)
        path = tmp_path / "closed" / "signer.sock"
    line = assert_clean_failure(run(path), "SIGNER_UNAVAILABLE", 69)
    assert "signer" in line


@pytest.mark.parametrize("answered", [True, False])
def test_a_signer_that_resets_the_connection(fake_signer, run, answered):
    """A signer that answers (or not) and closes with the request unread, as serve does
    with a request too large to read whole: the client's next read is ECONNRESET. After
    a whole answer, the answer is taken like any other; with none, SIGNER_UNAVAILABLE
    says that the signer reset the connection."""
    result = run(fake_signer(ok_frame(SIGNATURE) if answered else b"", unread=True))
    if answered:
        assert (result.returncode, result.stderr) == (0, b"")
        assert result.stdout == ok_frame(SIGNATURE).split(b"\n", 1)[1]
    else:
        line = assert_clean_failure(result, "SIGNER_UNAVAILABLE", 69)
        assert "reset the connection" in line


# ---- time ----------------------------------------------------------------------------

def test_a_silent_signer_is_signer_unavailable_at_the_deadline(fake_signer, run):
    server = fake_signer("silent")
    env = base_env(LAP_PKCS11_CLIENT_TIMEOUT_MS="400")
    assert_clean_failure(run(server, env=env, timeout=10), "SIGNER_UNAVAILABLE", 69)


@pytest.mark.parametrize("answer", [ok_frame(SIGNATURE),
                                    b"LAP1 77 PIN_INCORRECT\nlap-pkcs11: PIN_INCORRECT: x\n"])
def test_a_trickling_signer_is_cut_at_the_deadline(fake_signer, run, answer):
    """One byte every 50 ms: each read succeeds, the whole answer would take seconds."""
    server = fake_signer(("trickle", answer))
    env = base_env(LAP_PKCS11_CLIENT_TIMEOUT_MS="500")
    started = time.monotonic()
    assert_clean_failure(run(server, env=env, timeout=10), "SIGNER_UNAVAILABLE", 69)
    assert time.monotonic() - started < 10


def test_the_callers_deadline_is_forwarded(fake_signer, run):
    """The framed deadline is the budget left: the client's, capped by the gateway's."""
    for env, most in [({"LAP_PKCS11_CLIENT_TIMEOUT_MS": "5000", "SIGNER_TIMEOUT_SECONDS": "1.25"},
                       1250 - 250 - 150),
                      ({"LAP_PKCS11_CLIENT_TIMEOUT_MS": "600"}, 600 - 150)]:
        server = fake_signer(ok_frame(SIGNATURE))
        assert run(server, env=base_env(**env)).returncode == 0
        budgets = [int(request.split(b"\n", 1)[0].split()[1]) for request in server.requests]
        assert budgets and all(0 < budget <= most for budget in budgets), (most, budgets)


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
def test_stdin_that_does_not_end_is_timeout_at_the_deadline(fake_signer, run, data):
    server = fake_signer(ok_frame(SIGNATURE))

    def case(argv):
        proc = subprocess.Popen([*argv, "--socket", str(server.path)],
                                env=base_env(LAP_PKCS11_CLIENT_TIMEOUT_MS="500"),
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
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
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    line = assert_clean_failure(run.each(case), "TIMEOUT", 75)
    assert "stdin" in line
    assert not server.connected.is_set(), "a message was sent before stdin ended"


@pytest.mark.parametrize("size", ["limit", "over"])
def test_stdin_is_forwarded_up_to_the_agents_limit(fake_signer, run, size):
    """Up to wire.MAX_BODY bytes, and one byte more (the signer refuses it whole)."""
    from lap_pkcs11.per_signature import wire

    stdin = b"A" * (wire.MAX_BODY + (1 if size == "over" else 0))
    server = fake_signer(lambda request: b"LAP1 65 MESSAGE_TOO_LARGE\nlap-pkcs11: "
                         b"MESSAGE_TOO_LARGE: %d bytes\n" % len(request.split(b"\n", 1)[1]))
    line = assert_clean_failure(run(server, stdin=stdin + b"B" * 10000), "MESSAGE_TOO_LARGE", 65)
    assert line.endswith(f": {wire.MAX_BODY + 1} bytes")


# ---- signals, descriptors, core dumps --------------------------------------------------

def start_waiting_client(argv, server, **popen):
    """A client blocked on its signer (``hold``): returns the process once connected."""
    before = server.accepted
    proc = subprocess.Popen([*argv, "--socket", str(server.path)],
                            env=base_env(LAP_PKCS11_CLIENT_TIMEOUT_MS="20000"),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, **popen)
    proc.stdin.write(GATEWAY_STDIN)
    proc.stdin.close()
    proc.stdin = None  # so that communicate() does not flush it
    assert server.wait_accepted(before + 1), "the client never connected"
    return proc


@pytest.mark.parametrize("sig", sorted(SIGNAL_NAMES), ids=lambda s: SIGNAL_NAMES[s])
def test_a_signal_while_waiting_is_one_line(fake_signer, run, sig):
    server = fake_signer(ok_frame(SIGNATURE), hold=True)

    def case(argv):
        proc = start_waiting_client(argv, server)
        time.sleep(0.1)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=10)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    line = assert_clean_failure(run.each(case), "SIGNING_FAILED", 70)
    assert f"interrupted by {SIGNAL_NAMES[sig]}" in line


def test_a_signal_while_reading_stdin_is_one_line(fake_signer, run):
    server = fake_signer(ok_frame(SIGNATURE))

    def case(argv):
        proc = subprocess.Popen([*argv, "--socket", str(server.path)],
                                env=base_env(LAP_PKCS11_CLIENT_TIMEOUT_MS="20000"),
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=10)  # stdin stays open: the client is still reading it
        proc.stdin.close()
        proc.stdin = None
        out, err = proc.communicate(timeout=10)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    assert "interrupted by SIGINT" in assert_clean_failure(run.each(case), "SIGNING_FAILED", 70)
    assert not server.connected.is_set()


def test_a_signal_the_caller_blocked_or_ignored_is_honoured_as_python_does(fake_signer, run):
    """An ignored SIGTERM is taken over (as Python's handlers take it over); SIGHUP that the
    caller blocked stays blocked (Python never unblocks it): the answer is printed."""
    server = fake_signer(ok_frame(SIGNATURE), hold=True)

    def blocked(argv):
        proc = start_waiting_client(argv, server, preexec_fn=lambda: signal.pthread_sigmask(
            signal.SIG_BLOCK, [signal.SIGHUP]))
        time.sleep(0.1)
        proc.send_signal(signal.SIGHUP)
        time.sleep(0.1)
        server.release()
        out, err = proc.communicate(timeout=10)
        server.released.clear()
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    result = run.each(blocked)
    assert result.returncode == 0 and result.stdout == base64.b64encode(SIGNATURE) + b"\n"

    def ignored(argv):
        proc = start_waiting_client(argv, server, preexec_fn=lambda: signal.signal(
            signal.SIGTERM, signal.SIG_IGN))
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=10)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    assert "by SIGTERM" in assert_clean_failure(run.each(ignored), "SIGNING_FAILED", 70)


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


def test_inherited_descriptors_are_closed_and_harmless(fake_signer, run):
    key = Key()

    def case(argv):
        read_end, high = high_descriptor()
        server = fake_signer(lambda request: ok_frame(key.sign(request_message(request))),
                             hold=True)
        try:
            proc = start_waiting_client(argv, server, pass_fds=(high,))
        finally:
            os.close(high)
        try:
            closed = nobody_else_holds(read_end)  # while the client runs
            server.release()
            out, err = proc.communicate(timeout=10)
        finally:
            os.close(read_end)
        assert closed, "the client kept an inherited descriptor open"
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    result = run.each(case)
    assert result.returncode == 0, result.stderr
    verify(key.public, MESSAGE, gateway_decode(result.stdout))


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


def test_client_sets_the_core_limit_to_zero(fake_signer, run):
    require_core_limit_above_zero()
    server = fake_signer(ok_frame(SIGNATURE), hold=True)
    proc = start_waiting_client(run.argv, server, preexec_fn=allow_cores)
    limit = max_core(proc.pid)
    server.release()
    proc.communicate(timeout=10)
    assert limit == ["0", "0"], limit


# ---- stdout and stderr -----------------------------------------------------------------

def close_fd(fd):
    return lambda: os.close(fd)


def test_closed_stdout_is_signing_failed_before_anything_is_signed(fake_signer, run):
    server = fake_signer(ok_frame(SIGNATURE))
    result = run(server, stdout=None, preexec_fn=close_fd(1))
    assert result.returncode == 70
    assert "stdout is closed" in clean_line(result)
    assert not server.connected.wait(0.2), "the client asked for a signature it cannot print"


def test_closed_stdin_is_an_empty_message(fake_signer, run):
    server = fake_signer(lambda request: b"LAP1 65 INPUT_INVALID\nlap-pkcs11: INPUT_INVALID: "
                         b"%d bytes\n" % len(request.split(b"\n", 1)[1]))
    result = run(server, stdin=None, preexec_fn=close_fd(0))
    assert clean_line(result).endswith(": 0 bytes")


def test_full_stdout_is_signing_failed(fake_signer, run):
    with open("/dev/full", "wb") as full:
        result = run(fake_signer(ok_frame(SIGNATURE)), stdout=full)
    assert result.returncode == 70
    assert clean_line(result).startswith("lap-pkcs11: SIGNING_FAILED: stdout cannot be written")


def test_broken_stdout_is_signing_failed_not_sigpipe(fake_signer, run):
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = run(fake_signer(ok_frame(SIGNATURE)), stdout=write_end)
    finally:
        os.close(write_end)
    assert result.returncode == 70, result.returncode
    assert clean_line(result).startswith("lap-pkcs11: SIGNING_FAILED: stdout cannot be written")


def test_a_stdout_nobody_reads_is_signing_failed_in_time(fake_signer, run):
    """A pipe that is full and never read: the answer waits 200 ms, not forever."""
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    try:
        while True:
            os.write(write_end, b"x" * 65536)
    except BlockingIOError:
        pass
    try:
        result = run(fake_signer(ok_frame(SIGNATURE)), stdout=write_end)
    finally:
        os.close(write_end)
        os.close(read_end)
    assert result.returncode == 70
    assert clean_line(result).endswith("SIGNING_FAILED: stdout cannot be written (nobody reads it)")


def test_a_stdout_at_its_size_limit_keeps_no_half_signature(fake_signer, run, tmp_path):
    """A regular file at RLIMIT_FSIZE takes part of the signature: it is cut off again."""
    out = tmp_path / "out"

    def case(argv):
        with open(out, "wb") as handle:
            handle.write(b"before\n")
            handle.flush()
            result = run_once(argv, server, stdout=handle,
                              preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE,
                                                                    (40, 40)))
        assert out.read_bytes() == b"before\n"
        return result

    server = fake_signer(ok_frame(SIGNATURE))
    result = run.each(case)
    assert result.returncode == 70
    assert clean_line(result).endswith("SIGNING_FAILED: stdout cannot be written (File too large)")


@pytest.mark.parametrize("how", ["closed", "broken"])
def test_broken_stderr_keeps_the_exit_code(tmp_path, run, how):
    popen = {"stdout": subprocess.PIPE}
    if how == "closed":
        popen.update(stderr=None, preexec_fn=close_fd(2))
        result = run(tmp_path / "absent.sock", **popen)
    else:
        read_end, write_end = os.pipe()
        os.close(read_end)
        try:
            result = run(tmp_path / "absent.sock", stderr=write_end, **popen)
        finally:
            os.close(write_end)
    assert (result.returncode, result.stdout) == (69, b"")


def test_help_goes_to_stdout(run):
    result = run.each(lambda argv: subprocess.run([*argv, "--help"], capture_output=True,
                                                  env=base_env()))
    assert result.returncode == 0 and b"--expect-public-key" in result.stdout
    assert b"--input" in result.stdout and b"--server-user" in result.stdout
    assert result.stderr == b""


# ---- against the agent -----------------------------------------------------------------

@pytest.fixture
def agent(keyed, tmp_path):
    token, _ = keyed
    started = []

    def start(**kwargs):
        kwargs.setdefault("name", f"agent{len(started)}")
        started.append(Agent(token, tmp_path, **kwargs))
        return started[-1]

    yield start
    for one in started:
        one.close()


@pytest.mark.parametrize("output", ["base64", "hex", "raw"])
def test_both_clients_sign_through_the_agent(keyed, agent, run, output):
    _, public = keyed
    server = agent(env={"LAP_PKCS11_OUTPUT": output})
    env = base_env(LAP_GATEWAY_PUBLIC_KEY_HEX=public.hex(), SIGNER_MODE="external")
    result = run(server.path, args=["--input", "base64"], env=env)
    assert result.returncode == 0, result.stderr
    signature = {"base64": gateway_decode, "hex": lambda out: bytes.fromhex(out.decode()),
                 "raw": lambda out: out}[output](result.stdout)
    verify(public, MESSAGE, signature)


@pytest.mark.parametrize("size", [2 * 1024, 64 * 1024])
def test_both_clients_sign_lap_sized_messages_through_the_agent(keyed, agent, run, size):
    _, public = keyed
    server = agent()
    message = os.urandom(size)
    result = run(server.path, stdin=base64.b64encode(message) + b"\n")
    assert result.returncode == 0, result.stderr
    verify(public, message, gateway_decode(result.stdout))


@pytest.mark.parametrize("stdin, name, code", [
    (base64.b64encode(os.urandom(64 * 1024 + 1)) + b"\n", "MESSAGE_TOO_LARGE", 65),
    (b"A" * 200000, "MESSAGE_TOO_LARGE", 65),
    (b"not base64\n", "INPUT_INVALID", 65),
    (b"", "INPUT_INVALID", 65),
], ids=["64k-and-one", "huge", "not-base64", "empty"])
def test_the_agents_refusals_reach_both_clients_alike(agent, run, stdin, name, code):
    server = agent()
    assert_clean_failure(run(server.path, stdin=stdin), name, code)


def test_a_new_key_on_the_token_is_key_mismatch_from_the_agent(keyed, agent, run):
    """The agent verifies every signature against its pinned key: both clients report it."""
    token, _ = keyed
    server = agent()
    assert run(server.path).returncode == 0
    reinitialise(token)
    line = assert_clean_failure(run(server.path), "KEY_MISMATCH", 70)
    assert "pinned" in line


def test_a_stopped_agent_is_signer_unavailable(agent, run):
    server = agent()
    # Once it has answered, the agent's SIGTERM handler is in place (READY=1 comes before).
    assert client(server.path).returncode == 0
    assert server.stop() == 0
    assert "no signer socket" in assert_clean_failure(run(server.path), "SIGNER_UNAVAILABLE", 69)


def readable_by_others(path):
    """Whether any user can read ``path`` (and so run it, were it a script or module)."""
    return all(folder.stat().st_mode & 0o001 for folder in path.parents) and \
        path.stat().st_mode & 0o004 == 0o004


def test_a_client_the_agent_does_not_allow_is_signer_unavailable(agent, run):
    """The agent closes a connection of a user it does not allow, unanswered.

    How the client sees that close depends on when it comes (before the request is
    sent: a broken pipe; after: a reset, or an empty answer), a race of the two
    processes, not a difference of the clients: so only the error is compared here.
    """
    if os.geteuid() != 0:
        pytest.skip("a client of another user needs root here (the CI root phase runs it)")
    folder = public_directory()
    try:
        server = agent(socket_dir=folder)
        server.path.chmod(0o777)
        as_nobody = ["setpriv", f"--reuid={OTHER_UID}", f"--regid={OTHER_UID}", "--clear-groups",
                     "--"]
        argv = run.argv
        if argv != PYTHON_CLIENT:  # the compiled client, where nobody may run it
            shutil.copy(argv[0], folder / "lap-pkcs11-client")
            argv = [str(folder / "lap-pkcs11-client")]
        elif not all(readable_by_others(Path(path)) for path in
                     (argv[0], Path(errors.__file__), Path(os.path.realpath(sys.executable)))):
            pytest.skip("this checkout and its venv are not readable by other users (CI clones "
                        "it under a private directory); the compiled client's case runs here")
        result = run_once([*as_nobody, *argv], server.path)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    line = assert_clean_failure(result, "SIGNER_UNAVAILABLE", 69)
    assert any(outcome in line for outcome in ("reset the connection", "not lap-pkcs11 framing",
                                               "failed (Broken pipe)")), line


# ---- against serve, through real socket activation -------------------------------------

def test_pinned_client_signs_through_socket_activation(keyed, activated, run):  # noqa: F811
    _, public = keyed
    server = activated()
    env = base_env(LAP_GATEWAY_PUBLIC_KEY_HEX=public.hex(), SIGNER_MODE="external")
    result = run(server.path, args=["--input", "base64"], env=env)
    assert result.returncode == 0, result.stderr
    verify(public, MESSAGE, gateway_decode(result.stdout))


@pytest.mark.parametrize("output", ["hex", "raw"])
def test_pinned_client_checks_every_encoding_of_the_signer(keyed, activated, run,  # noqa: F811
                                                           output):
    _, public = keyed
    server = activated(env_overrides={"LAP_PKCS11_OUTPUT": output})
    env = base_env(LAP_PKCS11_EXPECT_PUBLIC_KEY=public.hex(), LAP_PKCS11_INPUT="base64")
    result = run(server.path, env=env)
    assert result.returncode == 0, result.stderr
    signature = bytes.fromhex(result.stdout.decode()) if output == "hex" else result.stdout
    verify(public, MESSAGE, signature)


def test_a_token_key_other_than_the_pinned_one_is_key_mismatch(keyed, activated):  # noqa: F811
    """The Python client's own check, against serve (which pins nothing here)."""
    server = activated()
    env = base_env(LAP_GATEWAY_PUBLIC_KEY_HEX=Key().public.hex(), SIGNER_MODE="external")
    assert_clean_failure(client(server.path, args=["--input", "base64"], env=env),
                         "KEY_MISMATCH", 70)


def test_serve_with_a_pinned_key_refuses_another_for_both_clients(keyed, activated,  # noqa: F811
                                                                  run):
    """Pinned where serve runs (its env file), the key is checked for either client."""
    server = activated(env_overrides={"LAP_PKCS11_EXPECT_PUBLIC_KEY": Key().public.hex()})
    assert_clean_failure(run(server.path), "KEY_MISMATCH", 70)


@pytest.mark.parametrize("env, name, code", [
    ({"LAP_PKCS11_KEY_ID": "99"}, "KEY_NOT_FOUND", 69),
    ({"LAP_PKCS11_TIMEOUT_MS": "soon"}, "CONFIG_INVALID", 64),
    ({"LAP_PKCS11_TOOL": str(FAKE_TOOL), "LAP_PKCS11_TIMEOUT_MS": "700"}, "TIMEOUT", 75),
], ids=["key", "config", "hung-tool"])
def test_serves_errors_reach_both_clients_alike(keyed, activated, run, env,  # noqa: F811
                                                name, code):
    if "LAP_PKCS11_TOOL" in env:
        env = dict(env, FAKE_MODE="hang")
    server = activated(env_overrides=env)
    assert_clean_failure(run(server.path, timeout=60), name, code)


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
