"""``lap-pkcs11 client``: the gateway's SIGNER_CMD when the signer runs behind a socket.

Same stdin/stdout contract as ``lap-pkcs11 sign``: stdin goes through unchanged
to the socket-activated signer, whose stdout comes back on stdout and whose
error line and exit code come back as they are. Input and output encodings,
key and PIN are the signer's configuration, never the client's. A socket that
is missing, refuses or stays silent is SIGNER_UNAVAILABLE (69).

Options: --socket PATH (LAP_PKCS11_SOCKET, default /run/lap-pkcs11/signer.sock),
--timeout-ms N (LAP_PKCS11_CLIENT_TIMEOUT_MS, default 2000), capped by the
gateway's SIGNER_TIMEOUT_SECONDS less 250 ms.

On the per-signature path: it imports only modules built into Python.
"""

import _socket
import os
import sys
import time

from lap_pkcs11 import errors, wire
from lap_pkcs11.config import CALLER_MARGIN_MS, MIN_DEADLINE_MS
from lap_pkcs11.options import _seconds_as_ms, _timeout_ms
from lap_pkcs11.sign_cli import read_stdin, write_stdout

DEFAULT_SOCKET = "/run/lap-pkcs11/signer.sock"
DEFAULT_TIMEOUT_MS = "2000"
MAX_RESPONSE = 1 << 16
USAGE = """Usage: lap-pkcs11 client [--socket PATH] [--timeout-ms N] < message > signature

Send stdin to the socket-activated lap-pkcs11 signer and print its answer,
exactly as `lap-pkcs11 sign` would (same output, error line and exit code).

  --socket PATH    Env: LAP_PKCS11_SOCKET. [default: /run/lap-pkcs11/signer.sock]
  --timeout-ms N   Env: LAP_PKCS11_CLIENT_TIMEOUT_MS. [default: 2000]
                   Capped by SIGNER_TIMEOUT_SECONDS less 250 ms.
"""


def parse_args(args, environ):
    """(socket path, deadline in ms) from flags, then environment, then defaults."""
    values = {"--socket": None, "--timeout-ms": None}
    i = 0
    while i < len(args):
        name, eq, value = args[i].partition("=")
        if name not in values:
            raise errors.ConfigInvalid(f"unknown option {name!r}; see lap-pkcs11 client --help")
        if not eq:
            if i + 1 >= len(args):
                raise errors.ConfigInvalid(f"{name} needs a value")
            value = args[i + 1]
            i += 1
        values[name] = value
        i += 1
    path = values["--socket"] or environ.get("LAP_PKCS11_SOCKET") or DEFAULT_SOCKET
    text = values["--timeout-ms"] or environ.get("LAP_PKCS11_CLIENT_TIMEOUT_MS") or \
        DEFAULT_TIMEOUT_MS
    try:
        deadline_ms = _timeout_ms(text)
        caller = environ.get("SIGNER_TIMEOUT_SECONDS")
        if caller:
            deadline_ms = min(deadline_ms, _seconds_as_ms(caller) - CALLER_MARGIN_MS)
    except ValueError as err:
        raise errors.ConfigInvalid(f"--timeout-ms or SIGNER_TIMEOUT_SECONDS {err}") from None
    if deadline_ms < MIN_DEADLINE_MS:
        raise errors.ConfigInvalid("SIGNER_TIMEOUT_SECONDS leaves no time for the signer; "
                                   "give the gateway's signer a longer timeout")
    return path, deadline_ms


def exchange(path, request, deadline):
    """Send ``request`` to the signer at ``path``; return its whole response."""
    unavailable = errors.SignerUnavailable
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        sock.settimeout(max(deadline - time.monotonic(), 0.001))
        try:
            sock.connect(path)
        except FileNotFoundError:
            raise unavailable(f"no signer socket at {path}; is lap-pkcs11-signer.socket "
                              "running?") from None
        except OSError as err:
            raise unavailable(f"the signer socket {path} refused the connection "
                              f"({err.strerror or err}); check the socket unit and its group") from None
        try:
            sock.sendall(request)
            sock.shutdown(_socket.SHUT_WR)
            chunks, size = [], 0
            while size <= MAX_RESPONSE:
                sock.settimeout(max(deadline - time.monotonic(), 0.001))
                try:
                    chunk = sock.recv(MAX_RESPONSE + 1 - size)
                except ConnectionResetError:
                    if not chunks:
                        raise
                    # The signer answered (e.g. MESSAGE_TOO_LARGE) and closed before
                    # reading all of stdin: a unix socket then resets instead of EOF.
                    break
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
        except TimeoutError:
            raise unavailable(f"the signer at {path} did not answer in time") from None
        except OSError as err:
            raise unavailable(f"the connection to the signer at {path} failed "
                              f"({err.strerror or err})") from None
    finally:
        sock.close()
    return b"".join(chunks)


def main(args, started=None):
    """Run ``client``; return the exit code the signer produced."""
    started = time.monotonic() if started is None else started
    if args[:1] in (["-h"], ["--help"]):
        sys.stdout.write(USAGE)
        return 0
    try:
        path, deadline_ms = parse_args(args, os.environ)
        deadline = started + deadline_ms / 1000
        payload = read_stdin(wire.MAX_BODY)
        server_ms = max(deadline_ms - wire.SERVER_MARGIN_MS - int(
            (time.monotonic() - started) * 1000), 1)
        answer = wire.parse_response(exchange(path, wire.request_header(server_ms) + payload,
                                              deadline))
        if answer is None:
            raise errors.SignerUnavailable("the signer's answer is not lap-pkcs11 framing; "
                                           "check that the socket runs lap-pkcs11 serve")
        code, name, body = answer
        if code == 0:
            write_stdout(body)
            return 0
        try:
            known = errors.by_name(name)
        except KeyError:
            known = None
        if known is None or known.exit_code != code:
            raise errors.SignerUnavailable(f"the signer answered an unknown error {name}")
        sys.stderr.write(body.decode("utf-8", "replace").splitlines()[0] + "\n")
        return code
    except errors.SignerError as err:
        sys.stderr.write(err.line() + "\n")
        return err.exit_code
