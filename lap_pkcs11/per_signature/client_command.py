"""``lap-pkcs11 client``: the gateway's SIGNER_CMD when the signer runs behind a socket.

Same stdin/stdout contract as ``lap-pkcs11 sign``: stdin goes through unchanged
to the socket-activated signer, and the client then checks the answer as sign
checks its own before anything reaches stdout. A success must be exactly one
64-byte signature in one of sign's encodings (base64 or hex with a newline, or
64 raw bytes), else SIGNER_UNAVAILABLE; with a pinned key it must also verify
over this message, else KEY_MISMATCH. An error comes back under its own name and
exit code; the signer's line is passed on only when it is that error's line, and
only its printable ASCII text (no escape sequence, control character or other
byte reaches the gateway's log). A socket that is missing, refuses, is served by
a process of another user, or stays silent is SIGNER_UNAVAILABLE (69).

Before it sends a byte, the client checks who serves the socket (SO_PEERCRED):
root (systemd's socket units), its own user, or the user named by --server-user
(LAP_PKCS11_SERVER_USER, the agent's user when the agent listens itself). The
socket's path alone proves nothing: whoever may create it there could listen.

``lap-pkcs11-client`` (lap_pkcs11/csrc/lap-pkcs11-client.c) is the same client
compiled: the same options, environment, lines and exit codes, byte for byte,
except that it leaves the pinned-key check to the signer (the agent verifies
every signature against its pinned key before it answers).

Options: --socket PATH (LAP_PKCS11_SOCKET, default /run/lap-pkcs11/signer.sock),
--timeout-ms N (LAP_PKCS11_CLIENT_TIMEOUT_MS, default 2000, capped by the
gateway's SIGNER_TIMEOUT_SECONDS or LAP_GATEWAY_SIGNING_CMD_TIMEOUT_SECONDS less
250 ms), and, to check the signature, --expect-public-key HEX
(LAP_PKCS11_EXPECT_PUBLIC_KEY, LAP_GATEWAY_PUBLIC_KEY_HEX) with --input raw|base64
(LAP_PKCS11_INPUT): how to read the message from stdin; --server-user USER
(LAP_PKCS11_SERVER_USER): who besides root and this user may serve the socket.

On the per-signature path: it imports only modules built into Python.
"""

import binascii
import os
import struct
import time

from lap_pkcs11.per_signature import errors, process, wire
from lap_pkcs11.per_signature.config import CALLER_MARGIN_MS, MIN_DEADLINE_MS, check_gateway_input
from lap_pkcs11.per_signature.options import BY_ATTR, _seconds_as_ms, _timeout_ms
from lap_pkcs11.per_signature.process import answer, begin, decode_base64, read_stdin

_socket = process.socket_module()

DEFAULT_SOCKET = "/run/lap-pkcs11/signer.sock"
DEFAULT_TIMEOUT_MS = "2000"
MAX_RESPONSE = 1 << 16
# The longest signer text passed on; sign's own lines are far shorter.
MAX_LINE = 400
# The longest local text (a path, an option, a user) quoted in a line, in bytes.
MAX_SHOWN = 200
# Each byte outside printable ASCII is shown as "?".
_SHOWN = bytes(b if 0x20 <= b < 0x7f else 0x3f for b in range(256))
USAGE = """Usage: lap-pkcs11 client [OPTIONS] < message > signature
       lap-pkcs11-client [OPTIONS] < message > signature

Send stdin to the lap-pkcs11 agent (or the socket-activated signer) and print
its answer exactly as `lap-pkcs11 sign` would (same output, error line and exit
code), after checking it: one 64-byte signature, by the pinned key when one is
set.

  --socket PATH             Env: LAP_PKCS11_SOCKET. [default: /run/lap-pkcs11/signer.sock]
  --timeout-ms N            Env: LAP_PKCS11_CLIENT_TIMEOUT_MS. [default: 2000]
                            Capped by SIGNER_TIMEOUT_SECONDS (or
                            LAP_GATEWAY_SIGNING_CMD_TIMEOUT_SECONDS) less 250 ms.
  --expect-public-key HEX   Pinned Ed25519 public key: the signature must verify.
                            Env: LAP_PKCS11_EXPECT_PUBLIC_KEY, LAP_GATEWAY_PUBLIC_KEY_HEX.
  --input raw|base64        How stdin holds the message (to verify the signature);
                            the gateway sends base64. Env: LAP_PKCS11_INPUT. [default: raw]
  --server-user USER        Who may serve the socket besides root and this user
                            (a name or uid: the agent's user when it listens
                            itself). Env: LAP_PKCS11_SERVER_USER.

lap-pkcs11-client, the compiled client, leaves the pinned-key check to the
signer: the agent verifies every signature against its pinned key.
"""
FLAGS = {"--socket": "socket", "--timeout-ms": "timeout_ms", "--input": "input",
         "--expect-public-key": "expect_public_key", "--server-user": "server_user"}
ENVS = {"socket": ("LAP_PKCS11_SOCKET",), "timeout_ms": ("LAP_PKCS11_CLIENT_TIMEOUT_MS",),
        "input": BY_ATTR["input"].envs, "expect_public_key": BY_ATTR["expect_public_key"].envs,
        "server_user": ("LAP_PKCS11_SERVER_USER",)}
# A user name as useradd(8) takes it, or a uid.
_USER_CHARACTERS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-")
MAX_USER = 32


class Settings:
    """The client's options; ``sources`` as sign's configuration has it (check_gateway_input)."""

    __slots__ = ("socket", "deadline_ms", "input", "expect_public_key", "server_user",
                 "sources")


def shown(text):
    """A path, option or user name from the command line or environment, as a line quotes
    it: its bytes, each outside printable ASCII as "?", cut after MAX_SHOWN bytes."""
    data = os.fsencode(text)
    quoted = data[:MAX_SHOWN].translate(_SHOWN).decode("ascii")
    return quoted + "..." if len(data) > MAX_SHOWN else quoted


def _server_user(text):
    """The --server-user value: a user name or a uid (resolved only when it is needed)."""
    value = text.strip(" \t")
    if not value or len(value) > MAX_USER or not _USER_CHARACTERS.issuperset(value) or \
            value.startswith("-"):
        raise ValueError("must be a user name or a uid, e.g. lap-pkcs11 or 998")
    return value


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
            raise errors.ConfigInvalid(f"unknown option '{shown(name)}'; see lap-pkcs11 client "
                                       "--help")
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
    text, source = _lookup("server_user", flags, environ)
    settings.sources["server_user"] = source
    try:
        settings.server_user = _server_user(text) if text is not None else None
    except ValueError as err:
        raise errors.ConfigInvalid(f"{source} {err}") from None
    return settings


def check_server(sock, path, settings):
    """Refuse a socket served by anyone but root, this user or --server-user (SO_PEERCRED).

    The uid is the one that called listen(): systemd's (root) for socket units.
    A process of this user can already change what the gateway runs and reads,
    and root anything, so trusting them adds nothing; any other user is refused
    before a byte of the message is sent. The name is resolved only when needed.
    """
    pid, uid, _ = struct.unpack("iII", sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED,
                                                       12))
    euid = os.geteuid()
    if uid in (0, euid):
        return
    expected = settings.server_user
    if expected is not None:
        if expected.isdigit():
            if int(expected) == uid:
                return
        else:
            import pwd

            try:
                if pwd.getpwnam(expected).pw_uid == uid:
                    return
            except KeyError:
                raise errors.ConfigInvalid(
                    f"{settings.sources['server_user']}: there is no user {shown(expected)} on "
                    "this host; name the agent's user (or its uid)") from None
    allowed = f"--server-user {shown(expected)}" if expected is not None else "a --server-user"
    raise errors.SignerUnavailable(
        f"the signer socket {shown(path)} is served by uid {uid} (pid {pid}), not by root, this "
        f"user (uid {euid}) or {allowed}; another user's process may listen there: stop it, or "
        "set --server-user (LAP_PKCS11_SERVER_USER) to the agent's user")


def exchange(path, request, deadline, settings):
    """Send ``request`` to the signer at ``path`` once its server is trusted; return its
    whole response (up to one byte over MAX_RESPONSE)."""
    unavailable = errors.SignerUnavailable
    where = shown(path)
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    chunks, size = [], 0
    try:
        sock.settimeout(max(deadline - time.monotonic(), 0.001))
        try:
            sock.connect(path)
        except FileNotFoundError:
            raise unavailable(f"no signer socket at {where}; is lap-pkcs11-signer.socket "
                              "running?") from None
        except OSError as err:
            raise unavailable(f"the signer socket {where} refused the connection "
                              f"({err.strerror or err}); check the socket unit and its group") from None
        try:
            check_server(sock, path, settings)
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
            raise unavailable(f"the signer at {where} did not answer in time") from None
        except ConnectionResetError:
            # serve answered and closed before reading all we sent: its answer came
            # first and is checked like any other.
            if not chunks:
                raise unavailable(f"the signer at {where} reset the connection") from None
        except OSError as err:
            raise unavailable(f"the connection to the signer at {where} failed "
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
# SOS, PM, APC); the same introducers as 8-bit (C1) characters follow C2 in UTF-8.
_ESC, _BEL, _CSI, _STRINGS = 0x1b, 0x07, 0x5b, b"]PX^_"
_C1_CSI, _C1_STRINGS, _C1_ST = 0x9b, b"\x90\x98\x9d\x9e\x9f", 0x9c


def _introduces(data, i):
    """Whether an escape sequence starts at ``data[i]``: ESC, or C2 and a C1 introducer."""
    byte = data[i]
    return byte == _ESC or (byte == 0xc2 and i + 1 < len(data) and (
        data[i + 1] == _C1_CSI or data[i + 1] in _C1_STRINGS))


def _skip_escape(data, i):
    """The index after the escape sequence that starts at ``data[i]`` (see _introduces)."""
    n = len(data)
    if data[i] == _ESC:
        i += 1
        if i >= n:
            return i
        csi = data[i] == _CSI
        if not csi and data[i] not in _STRINGS:
            while i < n and 0x20 <= data[i] <= 0x2f:  # intermediates, then one final byte
                i += 1
            return i + 1
        i += 1
    else:
        csi = data[i + 1] == _C1_CSI
        i += 2
    if csi:
        while i < n and not 0x40 <= data[i] <= 0x7e:  # parameters and intermediates
            i += 1
        return i + 1
    while i < n:  # a control string: ends at BEL, ST (ESC \\) or the 8-bit ST (C2 9C)
        if data[i] == _BEL:
            return i + 1
        if data[i] == _ESC:
            return i + 2 if data[i + 1:i + 2] == b"\\" else i
        if data[i] == 0xc2 and data[i + 1:i + 2] == bytes([_C1_ST]):
            return i + 2
        i += 1
    return i


def printable(data):
    """The signer's bytes as the text of a line: escape sequences removed, control
    characters (C0, DEL, and C1 as UTF-8) made spaces, any other byte outside printable
    ASCII shown as "?". Bytes, not characters: the compiled client, which carries no
    Unicode tables, reads them the same way."""
    out, i, n = [], 0, len(data)
    while i < n:
        byte = data[i]
        if _introduces(data, i):
            i = _skip_escape(data, i)
            continue
        if 0x20 <= byte < 0x7f:
            out.append(chr(byte))
        elif byte < 0x20 or byte == 0x7f:
            out.append(" ")
        elif byte == 0xc2 and i + 1 < n and 0x80 <= data[i + 1] <= 0x9f:
            out.append(" ")  # a C1 control character
            i += 1
        else:
            out.append("?")
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
        text = " ".join(printable(line[len(prefix):]).split())
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
        from lap_pkcs11.per_signature import ed25519  # only with a pinned key: it costs its import

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
        response = exchange(settings.socket, wire.request_header(server_ms) + payload, deadline,
                            settings)
        out = check_answer(response, settings, message)
        process.check_interrupted()  # a signal noted until now still stops the answer
        return 0, out, ""
    except errors.SignerError as err:
        return err.exit_code, b"", err.line() + "\n"


def main(args, started=None):
    """Run ``client``; return the exit code the signer produced (or the client's own)."""
    started, code = begin(started, (1,), "stdout is closed; there is nowhere to print the "
                          "signature, so nothing was asked of the signer")
    if code is not None:
        return code
    return answer(*run(args, started))
