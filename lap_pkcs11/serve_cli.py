"""``lap-pkcs11 serve``: one signature over a socket-activated connection (systemd Accept=yes).

stdin and stdout are the connection. It reads the client's framed request,
signs exactly as ``lap-pkcs11 sign`` does with the signer's own configuration
(its flags, environment and env file), and answers with a framed response
carrying sign's stdout or its error line and exit code. Errors are also
logged to stderr (the journal). Not for people: run ``lap-pkcs11 client``.
"""

import os
import sys
import time

from lap_pkcs11 import errors, wire
from lap_pkcs11.sign_cli import run, write_stdout


class Request:
    """The bytes of one request, read from the connection up to a bound."""

    def __init__(self, fd=0):
        self.fd = fd
        self.buffer = b""
        self.eof = False

    def _fill(self, size):
        while len(self.buffer) < size and not self.eof:
            chunk = os.read(self.fd, size - len(self.buffer))
            if not chunk:
                self.eof = True
            self.buffer += chunk

    def header(self):
        self._fill(wire.MAX_HEADER)
        line, newline, rest = self.buffer.partition(b"\n")
        if not newline:
            return None
        self.buffer = rest
        return wire.parse_request_header(line)

    def read(self, limit):
        self._fill(limit + 1)
        return self.buffer[:limit + 1]


def main(args, started=None):
    """Serve one connection on stdin/stdout; return 0 (the outcome travels in the response)."""
    started = time.monotonic() if started is None else started
    request = Request()
    try:
        deadline_ms = request.header()
    except OSError:
        deadline_ms = None
    if deadline_ms is None:
        failure = errors.InputInvalid("the request is not lap-pkcs11 client framing")
        code, out, err = failure.exit_code, b"", failure.line() + "\n"
    else:
        code, out, err = run(args, started, read=request.read,
                             caller_deadline=started + max(deadline_ms, 0) / 1000)
    name = "OK" if code == 0 else err.split(": ", 2)[1] if err.count(": ") >= 2 else "SIGNING_FAILED"
    if err:
        sys.stderr.write(err)
    try:
        write_stdout(wire.response(code, name, out if code == 0 else err.encode()))
    except errors.SignerError as failure:
        sys.stderr.write(failure.line() + "\n")
        return failure.exit_code
    return 0
