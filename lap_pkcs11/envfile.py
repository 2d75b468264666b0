"""A strict reader of dotenv files, treated as data: nothing is sourced or expanded.

It accepts the common subset of the dotenv format that python-dotenv, systemd's
``EnvironmentFile=`` and the shell mirror read alike: ``KEY=VALUE`` lines, an
optional ``export`` prefix, ``#`` comment lines, unquoted values with an optional
`` # comment`` after them, and single- or double-quoted values on one line. Anything
else is refused with the line number, so a file never means one thing to the
signer and another to the tools around it. ``${VAR}`` expansion is refused rather
than guessed at.

This module is on the per-signature path: it imports nothing.
"""

from lap_pkcs11.errors import ConfigInvalid

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


def _value(rest):
    if rest[:1] in ("'", '"'):
        quote = rest[0]
        value, tail = _quoted(rest, quote)
        tail = tail.strip()
        if tail and not tail.startswith("#"):
            raise ValueError("unexpected text after the closing quote")
        if quote == '"' and "${" in value:
            raise ValueError("${...} expansion is not supported; write the value out")
        return value
    cut = len(rest)
    for i, c in enumerate(rest):
        if c == "#" and (i == 0 or rest[i - 1] in " \t"):
            cut = i
            break
    value = rest[:cut].strip()
    if "${" in value:
        raise ValueError("${...} expansion is not supported; write the value out")
    return value


def parse(text):
    """Parse dotenv ``text`` into an ordered dict; raise ValueError naming the line."""
    values = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export ") or line.startswith("export\t"):
            line = line[7:].lstrip()
        key, sep, rest = line.partition("=")
        key = key.rstrip()
        if not sep or not _is_key(key):
            raise ValueError(f"line {number} is not KEY=VALUE")
        try:
            values[key] = _value(rest.lstrip())
        except ValueError as err:
            raise ValueError(f"line {number}: {err}") from None
    return values


def load(path):
    """Read and parse the env file at ``path``; every failure is ConfigInvalid."""
    try:
        # Bytes that are not UTF-8 pass through unchanged, as they do for the shell mirror.
        with open(path, encoding="utf-8", errors="surrogateescape") as handle:
            text = handle.read(1 << 20)
    except OSError as err:
        raise ConfigInvalid(f"env file {path} cannot be read ({err.strerror}); "
                            "fix the path in --env-file or LAP_PKCS11_ENV_FILE") from None
    try:
        return parse(text)
    except ValueError as err:
        raise ConfigInvalid(f"env file {path}: {err}") from None
