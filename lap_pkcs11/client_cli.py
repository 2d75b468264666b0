"""``lap-pkcs11 client``: the gateway's SIGNER_CMD when the signer runs behind a socket.

Same stdin/stdout contract as ``lap-pkcs11 sign``: stdin goes through unchanged
to the socket-activated signer, and the client then checks the answer as sign
checks its own before anything reaches stdout. A success must be exactly one
64-byte signature in one of sign's encodings (base64 or hex with a newline, or
64 raw bytes), else SIGNER_UNAVAILABLE; with a pinned key it must also verify
over this message, else KEY_MISMATCH. An error comes back under its own name and
exit code; the signer's line is passed on only when it is that error's line, and
only its printable text (no escape sequence reaches the gateway's log). A socket
that is missing, refuses or stays silent is SIGNER_UNAVAILABLE (69).

Options: --socket PATH (LAP_PKCS11_SOCKET, default /run/lap-pkcs11/signer.sock),
--timeout-ms N (LAP_PKCS11_CLIENT_TIMEOUT_MS, default 2000, capped by the
gateway's SIGNER_TIMEOUT_SECONDS or LAP_GATEWAY_SIGNING_CMD_TIMEOUT_SECONDS less
250 ms), and, to check the signature, --expect-public-key HEX
(LAP_PKCS11_EXPECT_PUBLIC_KEY, LAP_GATEWAY_PUBLIC_KEY_HEX) with --input raw|base64
(LAP_PKCS11_INPUT): how to read the message from stdin.

On the per-signature path: it imports only modules built into Python.
"""

import _socket
import binascii
import os
import time

from lap_pkcs11 import errors, process, wire
from lap_pkcs11.config import CALLER_MARGIN_MS, MIN_DEADLINE_MS, check_gateway_input
from lap_pkcs11.options import BY_ATTR, _seconds_as_ms, _timeout_ms
from lap_pkcs11.streams import decode_base64, read_stdin, write_stderr, write_stdout

DEFAULT_SOCKET = "/run/lap-pkcs11/signer.sock"
DEFAULT_TIMEOUT_MS = "2000"
MAX_RESPONSE = 1 << 16
# The longest signer text passed on; sign's own lines are far shorter.
MAX_LINE = 400
USAGE = """Usage: lap-pkcs11 client [OPTIONS] < message > signature

Send stdin to the socket-activated lap-pkcs11 signer and print its answer,
exactly as `lap-pkcs11 sign` would (same output, error line and exit code),
after checking it: one 64-byte signature, by the pinned key when one is set.

  --socket PATH             Env: LAP_PKCS11_SOCKET. [default: /run/lap-pkcs11/signer.sock]
  --timeout-ms N            Env: LAP_PKCS11_CLIENT_TIMEOUT_MS. [default: 2000]
                            Capped by SIGNER_TIMEOUT_SECONDS (or
                            LAP_GATEWAY_SIGNING_CMD_TIMEOUT_SECONDS) less 250 ms.
  --expect-public-key HEX   Pinned Ed25519 public key: the signature must verify.
                            Env: LAP_PKCS11_EXPECT_PUBLIC_KEY, LAP_GATEWAY_PUBLIC_KEY_HEX.
  --input raw|base64        How stdin holds the message (to verify the signature);
                            the gateway sends base64. Env: LAP_PKCS11_INPUT. [default: raw]
"""
FLAGS = {"--socket": "socket", "--timeout-ms": "timeout_ms", "--input": "input",
         "--expect-public-key": "expect_public_key"}
ENVS = {"socket": ("LAP_PKCS11_SOCKET",), "timeout_ms": ("LAP_PKCS11_CLIENT_TIMEOUT_MS",),
        "input": BY_ATTR["input"].envs, "expect_public_key": BY_ATTR["expect_public_key"].envs}


class Settings:
    """The client's options; ``sources`` as sign's configuration has it (check_gateway_input)."""

    __slots__ = ("socket", "deadline_ms", "input", "expect_public_key", "sources")


def _lookup(attr, flags, environ):
    """(raw text, where it came from) of an option: flag, then environment; None if unset."""
    if attr in flags:
        return flags[attr], next(flag for flag, name in FLAGS.items() if name == attr)
    for name in ENVS[attr]:
        if environ.get(name):
            return environ[name], name
    return None, "default"


def parse_args(args, environ):
    """The client's Settings from flags, then environment, then defaults."""
    flags = {}
    i = 0
    while i < len(args):
        name, eq, value = args[i].partition("=")
        if name not in FLAGS:
            raise errors.ConfigInvalid(f"unknown option {name!r}; see lap-pkcs11 client --help")
        if not eq:
            if i + 1 >= len(args):
                raise errors.ConfigInvalid(f"{name} needs a value")
            value = args[i + 1]
            i += 1
        if FLAGS[name] in flags:
            raise errors.ConfigInvalid(f"{name} is given twice; keep one")
        flags[FLAGS[name]] = value
        i += 1
    settings = Settings()
    settings.socket = _lookup("socket", flags, environ)[0] or DEFAULT_SOCKET
    text = _lookup("timeout_ms", flags, environ)[0] or DEFAULT_TIMEOUT_MS
    # The gateway's deadline, as sign reads it: SIGNER_TIMEOUT_SECONDS, then
    # LAP_GATEWAY_SIGNING_CMD_TIMEOUT_SECONDS.
    caller_name = next((name for name in BY_ATTR["caller_timeout_ms"].envs if environ.get(name)),
                       "SIGNER_TIMEOUT_SECONDS")
    try:
        deadline_ms = _timeout_ms(text)
        caller = environ.get(caller_name)
        if caller:
            deadline_ms = min(deadline_ms, _seconds_as_ms(caller) - CALLER_MARGIN_MS)
    except ValueError as err:
        raise errors.ConfigInvalid(f"--timeout-ms or {caller_name} {err}") from None
    if deadline_ms < MIN_DEADLINE_MS:
        raise errors.ConfigInvalid(f"{caller_name} leaves no time for the signer; "
                                   "give the gateway's signer a longer timeout")
    settings.deadline_ms = deadline_ms
    settings.sources = {}
    for attr in ("input", "expect_public_key"):
        text, source = _lookup(attr, flags, environ)
        settings.sources[attr] = source
        try:
            value = BY_ATTR[attr].parse(text) if text is not None else BY_ATTR[attr].default
        except ValueError as err:
            raise errors.ConfigInvalid(f"{source} {err}") from None
        setattr(settings, attr, value)
    if settings.expect_public_key:
        # The signature is checked over the message, so how stdin holds it must be
        # known: under the gateway (base64), an unset --input is refused as sign does.
        check_gateway_input(settings, environ)
    return settings


def exchange(path, request, deadline):
    """Send ``request`` to the signer at ``path``; return its whole response."""
    unavailable = errors.SignerUnavailable
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    chunks, size = [], 0
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
            while size <= MAX_RESPONSE:
                # Waits here, where a signal wakes it (a noted signal raises its error).
                if not process.wait_readable(sock.fileno(), deadline):
                    raise TimeoutError
                chunk = sock.recv(MAX_RESPONSE + 1 - size)
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
        except TimeoutError:
            raise unavailable(f"the signer at {path} did not answer in time") from None
        except ConnectionResetError:
            # serve answered and closed before reading all we sent: its answer came
            # first and is checked like any other.
            if not chunks:
                raise unavailable(f"the signer at {path} reset the connection") from None
        except OSError as err:
            raise unavailable(f"the connection to the signer at {path} failed "
                              f"({err.strerror or err})") from None
    finally:
        sock.close()
    return b"".join(chunks)


def signature_of(body):
    """The 64-byte signature in ``body`` when it is exactly what sign prints, else None."""
    size = len(body)
    if size == 64:
        return body
    if size == 89 and body[-1:] == b"\n":
        try:
            signature = binascii.a2b_base64(body[:-1], strict_mode=True)
        except binascii.Error:
            return None
        canonical = binascii.b2a_base64(signature) == body
        return signature if canonical and len(signature) == 64 else None
    if size == 129 and body[-1:] == b"\n":
        try:
            signature = bytes.fromhex(body[:-1].decode("ascii"))
        except ValueError:
            return None
        return signature if signature.hex().encode() == body[:-1] else None
    return None


# What follows ESC to start a control sequence (CSI) or a control string (OSC, DCS,
# SOS, PM, APC), and the same introducers as single 8-bit (C1) characters.
_CSI, _STRINGS = "[\x9b", "]PX^_\x90\x98\x9d\x9e\x9f"
_C1_INTRODUCERS = "\x9b\x90\x98\x9d\x9e\x9f"


def _skip_escape(text, i):
    """The index after the escape sequence that starts at ``text[i]`` (ESC or a C1 introducer)."""
    n = len(text)
    kind = text[i]
    if kind == "\x1b":
        i += 1
        if i >= n:
            return i
        kind = text[i]
        if kind not in _CSI and kind not in _STRINGS:
            while i < n and " " <= text[i] <= "/":  # intermediates, then one final character
                i += 1
            return i + 1
    i += 1
    if kind in _CSI:
        while i < n and not "@" <= text[i] <= "~":  # parameters and intermediates
            i += 1
        return i + 1
    while i < n:  # a control string: ends at BEL, ST (ESC \\) or the 8-bit ST
        if text[i] in "\x07\x9c":
            return i + 1
        if text[i] == "\x1b":
            return i + 2 if text[i + 1:i + 2] == "\\" else i
        i += 1
    return i


def printable(text):
    """``text`` with escape sequences removed and every other unprintable character
    (control, format, line and paragraph separators) made a space."""
    out, i, n = [], 0, len(text)
    while i < n:
        char = text[i]
        if char == "\x1b" or char in _C1_INTRODUCERS:
            i = _skip_escape(text, i)
            continue
        out.append(char if char.isprintable() else " ")
        i += 1
    return "".join(out)


def failure_of(code, name, body):
    """The error the signer answered, with its own line only when that line is its name's."""
    try:
        known = errors.by_name(name)
    except KeyError:
        known = None
    if known is None or known.exit_code != code:
        return errors.SignerUnavailable(f"the signer answered an unknown error {name} "
                                        f"(exit {code}); check that both ends run one version")
    prefix = f"{errors.PROGRAM}: {name}: ".encode()
    line = body.split(b"\n", 1)[0]
    text = ""
    if line.startswith(prefix):
        text = " ".join(printable(line[len(prefix):].decode("utf-8", "replace")).split())
    if len(text) > MAX_LINE:
        text = text[:MAX_LINE - 3] + "..."
    return known(text or f"the signer answered {name} with no message of its own; see the "
                 "signer's journal (journalctl -u 'lap-pkcs11-signer@*')")


def check_answer(response, settings, message):
    """What to print for the signer's ``response``; raises the error it means otherwise."""
    answer = wire.parse_response(response)
    if answer is None:
        raise errors.SignerUnavailable("the signer's answer is not lap-pkcs11 framing; "
                                       "check that the socket runs lap-pkcs11 serve")
    code, name, body = answer
    if code != 0 or name != "OK":
        raise failure_of(code, name, body)
    signature = signature_of(body)
    if signature is None:
        raise errors.SignerUnavailable(
            f"the signer answered OK with {len(body)} bytes that are not one 64-byte signature "
            "as sign prints it (base64 or hex and a newline, or raw); nothing was printed")
    if settings.expect_public_key:
        from lap_pkcs11 import ed25519  # only with a pinned key: it costs its import

        if not ed25519.is_valid(bytes.fromhex(settings.expect_public_key), message, signature):
            raise errors.KeyMismatch(
                "the signer's signature does not verify with the pinned public key "
                f"{settings.expect_public_key[:16]}...; the socket's signer uses another key, or "
                "its --input differs from the client's (the gateway sends base64)")
    return body


def run(args, started):
    """Ask the signer; return (exit code, stdout bytes, stderr text)."""
    try:
        if args[:1] in (["-h"], ["--help"]):
            return 0, USAGE.encode(), ""
        settings = parse_args(args, os.environ)
        deadline = started + settings.deadline_ms / 1000
        # Up to the agent's largest message (one byte more is refused whole by the
        # signer, never signed cut short); serve refuses more than sign's own limit.
        payload = read_stdin(wire.MAX_BODY, deadline)
        message = None
        if settings.expect_public_key:
            message = payload if settings.input == "raw" else decode_base64(payload)
        server_ms = max(settings.deadline_ms - wire.SERVER_MARGIN_MS - int(
            (time.monotonic() - started) * 1000), 1)
        response = exchange(settings.socket, wire.request_header(server_ms) + payload, deadline)
        out = check_answer(response, settings, message)
        process.check_interrupted()  # a signal noted until now still stops the answer
        return 0, out, ""
    except errors.SignerError as err:
        return err.exit_code, b"", err.line() + "\n"


def main(args, started=None):
    """Run ``client``; return the exit code the signer produced (or the client's own)."""
    try:
        closed = process.harden()
    except errors.SignerError as err:
        write_stderr(err.line() + "\n")
        return err.exit_code
    # The caller's deadline runs from before it started us: count the interpreter's start.
    started = min(started or time.monotonic(), process.started_at())
    if 1 in closed:
        failure = errors.SigningFailed("stdout is closed; there is nowhere to print the "
                                       "signature, so nothing was asked of the signer")
        write_stderr(failure.line() + "\n")
        return failure.exit_code
    code, out, err = run(args, started)
    if out:
        try:
            write_stdout(out)
        except errors.SignerError as failure:
            code, err = failure.exit_code, failure.line() + "\n"
    if err:
        write_stderr(err)
    return code
