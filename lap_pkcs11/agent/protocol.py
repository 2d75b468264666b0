"""What the agent reads and writes on a connection.

Three kinds of request share one socket, told apart by their first bytes:

- ``LAP1 <deadline ms>\\n`` + body until the client shuts its side: the framing
  of ``lap-pkcs11 client`` (``lap_pkcs11.per_signature.wire``). The body is decoded by the
  agent's ``--input`` (raw or base64, as ``sign`` decodes stdin), and the answer
  is ``LAP1 <exit code> <NAME or OK>\\n`` + what ``sign`` would print on stdout
  (by ``--output``) or its one error line.
- ``LAP1 metrics\\n``: the Prometheus text of the agent's metrics, framed as a
  success.
- anything else: the LAP gateway's own line protocol, so that
  ``socat -t 2 - UNIX-CONNECT:PATH`` can be its SIGNER_CMD: one line of strict
  base64 in, one line of base64 signature out, and nothing at all on failure
  (the error's name stays in the agent's journal).

A base64 line never starts with ``LAP1 ``: a space is not in its alphabet.
"""

from lap_pkcs11.per_signature import errors, process, wire

# C_Sign is single-part, and SoftHSM2 signs 1 MiB that way; 64 KiB is far above
# any LAP message (DSSE envelopes are about 2 KB) and bounds memory per request.
MAX_MESSAGE = 64 * 1024
MAX_BASE64 = 4 * ((MAX_MESSAGE + 2) // 3)
# The most a request body may hold: base64 of the largest message plus room for
# surrounding whitespace, as sign allows. More is refused unread.
READ_LIMIT = wire.MAX_BODY
FRAMED = wire.MAGIC + b" "
METRICS = b"metrics"

SIGN_FRAMED, SIGN_LINE, STATUS = "lap1", "line", "metrics"


class Request:
    """A complete request: its kind, the client's deadline (ms, framed only) and body."""

    __slots__ = ("kind", "deadline_ms", "body")

    def __init__(self, kind, deadline_ms=None, body=b""):
        self.kind = kind
        self.deadline_ms = deadline_ms
        self.body = body


def kind_of(buffer, eof):
    """SIGN_FRAMED or SIGN_LINE once the first bytes tell, else None (read more)."""
    if buffer.startswith(FRAMED):
        return SIGN_FRAMED
    if not eof and len(buffer) < len(FRAMED) and FRAMED.startswith(bytes(buffer)):
        return None
    return SIGN_LINE


def parse(buffer, eof):
    """The request in ``buffer`` once it is complete, else None; a typed error when bad.

    The error carries ``kind`` (which protocol to answer in) as an attribute.
    """
    kind = kind_of(buffer, eof)
    if kind is None:
        return None
    try:
        if kind == SIGN_FRAMED:
            return _framed(buffer, eof)
        return _line(buffer, eof)
    except errors.SignerError as err:
        err.kind = kind
        raise


def _framed(buffer, eof):
    end = buffer.find(b"\n", 0, wire.MAX_HEADER)
    if end < 0:
        if len(buffer) >= wire.MAX_HEADER or eof:
            raise errors.InputInvalid("the request is not lap-pkcs11 client framing")
        return None
    header = bytes(buffer[:end])
    if header.split()[1:] == [METRICS]:
        return Request(STATUS)
    deadline_ms = wire.parse_request_header(header)
    if deadline_ms is None:
        raise errors.InputInvalid("the request is not lap-pkcs11 client framing")
    body = buffer[end + 1:]
    if len(body) > READ_LIMIT:
        raise errors.MessageTooLarge(f"the request is over {READ_LIMIT} bytes; the agent signs "
                                     f"messages of at most {MAX_MESSAGE} bytes")
    if not eof:
        return None
    return Request(SIGN_FRAMED, deadline_ms, bytes(body))


def _line(buffer, eof):
    end = buffer.find(b"\n")
    if end < 0:
        if len(buffer) > READ_LIMIT:
            raise errors.MessageTooLarge(f"the line is over {READ_LIMIT} bytes; the agent signs "
                                         f"messages of at most {MAX_MESSAGE} bytes")
        if not eof:
            return None
        end = len(buffer)
    return Request(SIGN_LINE, None, bytes(buffer[:end]))


def check_size(message):
    if not message:
        raise errors.InputInvalid("the message is empty; the gateway never signs an empty message")
    if len(message) > MAX_MESSAGE:
        raise errors.MessageTooLarge(f"the message is over {MAX_MESSAGE} bytes, the agent's "
                                     "limit for one single-part signature")
    return message


def decode(body, encoding):
    """The message in ``body``: raw bytes, or strict canonical base64 as ``sign`` reads it."""
    if encoding == "raw":
        return check_size(body)
    if len(body) > READ_LIMIT:
        raise errors.MessageTooLarge(f"the base64 input is over {READ_LIMIT} bytes; the agent "
                                     f"signs messages of at most {MAX_MESSAGE} bytes")
    return check_size(process.decode_base64(body, "the input",
                                            "send base64(message) and a newline"))


def framed_answer(error=None, payload=b""):
    """The LAP1 response: OK with ``payload``, or the error's code, name and line."""
    if error is None:
        return wire.response(0, "OK", payload)
    return wire.response(error.exit_code, error.name, (error.line() + "\n").encode())
