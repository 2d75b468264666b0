"""``lap-pkcs11 serve``: one signature over a socket-activated connection (systemd Accept=yes).

stdin and stdout are the connection. It reads the client's framed request,
signs exactly as ``lap-pkcs11 sign`` does with the signer's own configuration
(its flags, environment and env file), and answers with a framed response
carrying sign's stdout or its error line and exit code. Errors are also
logged to stderr (the journal). Not for people: run ``lap-pkcs11 client``.

The whole request must arrive within the signer's own deadline (its
``--timeout-ms``, or 1500 ms when its configuration cannot be read), then
within the client's: a peer that sends nothing, or trickles, gets a TIMEOUT
answer then and the connection is dropped, so silent connections cannot hold
the socket's MaxConnections. The process is hardened as sign's is.
"""

import os

from lap_pkcs11.per_signature import config as configuration
from lap_pkcs11.per_signature import errors, process, wire
from lap_pkcs11.per_signature.options import BY_ATTR
from lap_pkcs11.per_signature.sign_command import parse_args, run
from lap_pkcs11.per_signature.process import answer, begin, write_stderr, write_stdout

# What serve reads after answering early (e.g. a bad configuration, before the
# payload was read), so that closing does not reset the client's connection
# before it has read the answer.
DRAIN_LIMIT = 1 << 16


class Request:
    """The bytes of one request, read from the connection up to a bound and a deadline."""

    def __init__(self, deadline, fd=0):
        self.fd = fd
        self.deadline = deadline
        self.buffer = b""
        self.eof = False

    def _read_some(self, size):
        if not process.wait_readable(self.fd, self.deadline):  # a noted signal raises
            raise errors.Timeout("the client's request did not arrive before the deadline; "
                                 "the connection is dropped")
        try:
            chunk = os.read(self.fd, size)
        except OSError as err:
            raise errors.InputInvalid(f"the connection cannot be read ({err.strerror})") from None
        if not chunk:
            self.eof = True
        self.buffer += chunk

    def header(self):
        """The client's deadline in ms, or None when the request does not start with a header."""
        while b"\n" not in self.buffer and len(self.buffer) < wire.MAX_HEADER and not self.eof:
            self._read_some(wire.MAX_HEADER - len(self.buffer))
        line, newline, rest = self.buffer.partition(b"\n")
        if not newline:
            return None
        self.buffer = rest
        return wire.parse_request_header(line)

    def read(self, limit):
        """Up to ``limit`` + 1 bytes of the payload (one more tells that it was too long)."""
        while len(self.buffer) <= limit and not self.eof:
            self._read_some(limit + 1 - len(self.buffer))
        return self.buffer[:limit + 1]

    def drain(self):
        """Read what the client still sends (within the deadline), then give up quietly."""
        try:
            while not self.eof and len(self.buffer) <= DRAIN_LIMIT:
                self._read_some(DRAIN_LIMIT + 1 - len(self.buffer))
        except errors.SignerError:
            pass


class Reply:
    """The connection's one answer, sent once: by ``Deadline`` at the deadline itself when
    pkcs11-tool is still in its grace (an ``Announcer``), else when signing returns."""

    def __init__(self):
        self.done = False

    def __call__(self, error):
        self.fail(error.exit_code, error.line() + "\n")

    def fail(self, code, line):
        name = line.split(": ", 2)[1] if line.count(": ") >= 2 else "SIGNING_FAILED"
        write_stderr(line)  # the journal
        self.send(code, name, line.encode("utf-8", "replace"))

    def send(self, code, name, payload):
        if self.done:
            return
        self.done = True
        try:
            write_stdout(wire.response(code, name, payload))
        except errors.SignerError as failure:
            write_stderr(failure.line() + "\n")
            return
        end_of_answer()


def end_of_answer():
    """Shut the connection's sending side: the client reads the answer to its end now,
    not when this process exits (after a pkcs11-tool's grace, or draining)."""
    _socket = process.socket_module()
    duplicate = os.dup(1)
    try:
        connection = _socket.socket(fileno=duplicate)
    except OSError:  # not a socket (serve run by hand on a pipe): exit ends it
        os.close(duplicate)
        return
    try:
        connection.shutdown(_socket.SHUT_WR)
    except OSError:
        pass
    finally:
        connection.close()


def own_deadline_ms(args):
    """The signer's own deadline, which bounds the request before the client's is known."""
    try:
        flags = parse_args(args)[0]
        return configuration.resolve(flags, dict(os.environ)).deadline_ms()
    except errors.SignerError:  # run() reports the configuration error to the client
        return int(BY_ATTR["timeout_ms"].default)


USAGE = """Usage: lap-pkcs11 serve [SIGN OPTIONS]

Sign one framed request on stdin/stdout, the connection systemd hands over
(lap-pkcs11-signer.socket, Accept=yes); the options are those of
`lap-pkcs11 sign --help`. Not run by hand: the gateway runs `lap-pkcs11 client`.
"""


def main(args, started=None):
    """Serve one connection on stdin/stdout; return 0 (the outcome travels in the response)."""
    if any(arg in ("-h", "--help") for arg in args):
        return answer(0, USAGE.encode(), "")
    started, code = begin(started, (0, 1), "serve has no connection on stdin and stdout; it "
                          "is started by lap-pkcs11-signer.socket")
    if code is not None:
        return code
    reply = Reply()
    request = Request(started + own_deadline_ms(args) / 1000)
    try:
        deadline_ms = request.header()
        if deadline_ms is None:
            code, out, err = errors.InputInvalid.exit_code, b"", errors.InputInvalid(
                "the request is not lap-pkcs11 client framing").line() + "\n"
        else:
            client_deadline = started + deadline_ms / 1000
            request.deadline = min(request.deadline, client_deadline)
            code, out, err = run(args, started, read=request.read, caller_deadline=client_deadline,
                                 announce=reply)
    except errors.SignerError as failure:  # the deadline or a signal before signing
        code, out, err = failure.exit_code, b"", failure.line() + "\n"
    if code == 0:
        reply.send(0, "OK", out)
    elif err:
        reply.fail(code, err)
    request.drain()
    return 0
