"""A strict reader of dotenv files, treated as data: nothing is sourced or expanded.

It accepts the common subset of the dotenv format that python-dotenv, systemd's
``EnvironmentFile=`` and the shell mirror read alike: ``KEY=VALUE`` lines, an
optional ``export`` prefix, ``#`` comment lines, unquoted values with an optional
`` # comment`` after them, and single- or double-quoted values on one line. Anything
else is refused with the line number, so a file never means one thing to the
signer and another to the tools around it. ``${VAR}`` expansion is refused rather
than guessed at.

One grammar for every reader (this one, ``config``/``doctor`` through it, and the
shell mirror): lines end in LF or CRLF; a bare CR, any other control character
but TAB, DEL, U+0085, U+2028 and U+2029 are refused wherever they stand, because
some reader takes them for a line break or for whitespace; whitespace is space
and TAB. A file over 1 MiB is refused, never cut.

This module is on the per-signature path: it imports only what Python has built in.
"""

from lap_pkcs11.per_signature.errors import ConfigInvalid
from lap_pkcs11.per_signature.files import read_named_file

MAX_SIZE = 1 << 20
# Characters that some reader or other takes for a line break or whitespace (Python's
# str.splitlines and str.strip, bash's [[:space:]], python-dotenv): refused anywhere,
# so that a file can never mean one thing to one reader and another to the next.
# TAB is the one control character allowed; CR only as part of a CRLF line end.
_AMBIGUOUS = frozenset([chr(c) for c in range(0x20) if c != 0x09] + ["\x7f", "\x85", "\u2028",
                                                                        "\u2029"])
_BLANKS = " \t"

_ESCAPES = {"\\": "\\", "'": "'", '"': '"', "a": "\a", "b": "\b", "f": "\f",
            "n": "\n", "r": "\r", "t": "\t", "v": "\v"}


def _is_key(text):
    return bool(text) and text.isascii() and (text[0].isalpha() or text[0] == "_") and all(
        c.isalnum() or c == "_" for c in text)


def _quoted(rest, quote):
    """Parse a quoted value at the start of ``rest``; return (value, remainder)."""
    out, i = [], 1
    while i < len(rest):
        c = rest[i]
        if c == quote:
            return "".join(out), rest[i + 1:]
        if c == "\\" and i + 1 < len(rest):
            nxt = rest[i + 1]
            if quote == '"' and nxt in _ESCAPES:
                out.append(_ESCAPES[nxt])
                i += 2
                continue
            if quote == "'" and nxt in "\\'":
                out.append(nxt)
                i += 2
                continue
        out.append(c)
        i += 1
    raise ValueError("the quoted value does not end on this line")


def _value(raw):
    """The value after ``KEY=``: quoted, or unquoted up to a comment."""
    rest = raw.lstrip(_BLANKS)
    if rest[:1] in ("'", '"'):
        quote = rest[0]
        value, tail = _quoted(rest, quote)
        tail = tail.strip(_BLANKS)
        if tail and not tail.startswith("#"):
            raise ValueError("unexpected text after the closing quote")
        if quote == '"' and "${" in value:
            raise ValueError("${...} expansion is not supported; write the value out")
        return value
    # A comment starts at a "#" after a space or TAB; "A=#a" is the value "#a".
    cut = len(raw)
    for i, c in enumerate(raw):
        if c == "#" and i > 0 and raw[i - 1] in _BLANKS:
            cut = i
            break
    value = raw[:cut].strip(_BLANKS)
    if "${" in value:
        raise ValueError("${...} expansion is not supported; write the value out")
    return value


def _lines(text):
    """The lines of ``text``: LF or CRLF line ends only; anything ambiguous is refused."""
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    for number, line in enumerate(lines, 1):
        ends_with_lf = number < len(lines) or text.endswith("\n")
        if line.endswith("\r") and ends_with_lf:
            line = line[:-1]
        if not _AMBIGUOUS.isdisjoint(line):
            bad = next(c for c in line if c in _AMBIGUOUS)
            raise ValueError(f"line {number} holds the character U+{ord(bad):04X}, which readers "
                             "disagree on; use LF or CRLF line ends and no control characters")
        yield number, line


def parse(text):
    """Parse dotenv ``text`` into an ordered dict; raise ValueError naming the line."""
    values = {}
    for number, raw in _lines(text):
        line = raw.strip(_BLANKS)
        if not line or line.startswith("#"):
            continue
        if line.startswith("export ") or line.startswith("export\t"):
            line = line[7:].lstrip(_BLANKS)
        key, sep, rest = line.partition("=")
        key = key.rstrip(_BLANKS)
        if not sep or not _is_key(key):
            raise ValueError(f"line {number} is not KEY=VALUE")
        try:
            values[key] = _value(rest)
        except ValueError as err:
            raise ValueError(f"line {number}: {err}") from None
    return values


def load(path):
    """Read and parse the env file at ``path``; every failure is ConfigInvalid."""
    data = read_named_file(path, "env file", MAX_SIZE)
    # Bytes that are not UTF-8 pass through unchanged, as they do for the shell mirror.
    try:
        return parse(data.decode("utf-8", "surrogateescape"))
    except ValueError as err:
        raise ConfigInvalid(f"env file {path}: {err}") from None
