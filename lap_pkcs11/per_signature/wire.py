"""The framing between ``lap-pkcs11 client`` and a socket-activated ``lap-pkcs11 serve``.

Request: ``LAP1 <deadline ms>\\n`` then the client's stdin, unchanged, then the
client shuts its side down. Response: ``LAP1 <exit code> <NAME or OK>\\n`` then,
on success, exactly what ``sign`` would print on stdout, or on failure the one
``lap-pkcs11: NAME: ...`` line ``sign`` would print on stderr. So the gateway
cannot tell the client from ``sign``.

This module is on the per-signature path: it imports nothing.
"""

MAGIC = b"LAP1"
MAX_HEADER = 64
# The client's deadline less this, so the signer answers TIMEOUT before the client gives up.
SERVER_MARGIN_MS = 250
MAX_NAME = 40
# The most a request body carries: base64 of the agent's largest message (64 KiB,
# lap_pkcs11.agent.protocol) plus room for whitespace. The client forwards up to
# one byte more, so a longer stdin is refused whole, never signed cut short.
MAX_BODY = 4 * ((64 * 1024 + 2) // 3) + 4096


def request_header(deadline_ms):
    return b"%s %d\n" % (MAGIC, deadline_ms)


def parse_request_header(line):
    """The deadline in ms from a request header line, or None when malformed."""
    parts = line.split()
    if len(parts) != 2 or parts[0] != MAGIC or not parts[1].isdigit():
        return None
    return int(parts[1])


def response(code, name, payload):
    return b"%s %d %s\n" % (MAGIC, code, name.encode()) + payload


def _is_name(word):
    """An error name as errors.py spells them (or OK): upper-case ASCII, digits, underscores."""
    return 0 < len(word) <= MAX_NAME and word[:1].isalpha() and word.isupper() and \
        word.replace(b"_", b"").isalnum()


def parse_response(data):
    """(code, name, payload) of a response exactly as ``response`` writes it, or None.

    Strict on purpose: the client passes on nothing of an answer it cannot read
    exactly (one space between fields, a decimal code without leading zeros, a
    name of capitals and underscores), so no byte of a foreign header reaches a log.
    """
    line, newline, payload = data.partition(b"\n")
    parts = line.split(b" ")
    if not newline or len(parts) != 3 or parts[0] != MAGIC:
        return None
    code, name = parts[1], parts[2]
    if not (code.isdigit() and len(code) <= 3 and code == b"%d" % int(code)) or not _is_name(name):
        return None
    return int(code), name.decode("ascii"), payload
