"""What every per-signature command reads and writes: stdin under a deadline, the
answer on stdout, the one line on stderr, and strict base64.

``sign``, ``client`` and ``serve`` share these; the client needs nothing else of
the signing path, so it does not import it.

This module is on the per-signature path: it imports only what Python has built in.
"""

import binascii
import os
import time

from lap_pkcs11 import errors, process

_WHITESPACE = b" \t\r\n\v\f"


def read_stdin(limit, deadline=None):
    """Up to ``limit`` + 1 bytes of stdin (one more tells that it was too long).

    With ``deadline`` (monotonic seconds), a writer that has not finished by then
    (one byte at a time, or never closing) is TIMEOUT, not a hang.
    """
    chunks, size = [], 0
    while size <= limit:
        if deadline is not None and not process.wait_readable(0, deadline):
            raise errors.Timeout("stdin did not end before the deadline; the caller must "
                                 "write the whole message and close stdin")
        try:
            chunk = os.read(0, limit + 1 - size)
        except OSError as err:
            raise errors.InputInvalid(f"stdin cannot be read ({err.strerror})") from None
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def decode_base64(data):
    """The message in ``data``: strict, canonical base64, surrounding whitespace allowed."""
    text = data.strip(_WHITESPACE)
    try:
        message = binascii.a2b_base64(text, strict_mode=True)
    except binascii.Error:
        message = None
    # Canonical only: unused bits must be zero, as every encoder writes them.
    if message is None or binascii.b2a_base64(message, newline=False) != text:
        raise errors.InputInvalid("stdin is not strict base64 (standard alphabet, padded); "
                                  "with --input base64 send base64(message) and a newline")
    return message


# How long a full pipe may hold up the last line (the answer is ready by then).
OUTPUT_WAIT_SECONDS = 0.2


def write_stdout(data, deadline=None):
    """The answer on stdout, within ``deadline`` (default: OUTPUT_WAIT_SECONDS from now)."""
    try:
        process.write_all(1, data, deadline or time.monotonic() + OUTPUT_WAIT_SECONDS)
    except OSError as err:
        raise errors.SigningFailed(f"stdout cannot be written ({err.strerror})") from None


def write_stderr(text):
    """The one stderr line; a stderr that cannot take it changes nothing else."""
    try:
        process.write_all(2, text.encode("utf-8", "replace"),
                          time.monotonic() + OUTPUT_WAIT_SECONDS)
    except OSError:
        pass


def start(started=None):
    """Harden the process (``process.harden``) and count its start from the kernel's
    clock: the caller's deadline runs from before it started us. Return (start,
    the standard descriptors that were closed); a failure raises SignerError."""
    try:
        closed = process.harden()
    except (OSError, ImportError) as err:  # e.g. no descriptor left to load a module with
        raise errors.SigningFailed(f"the process cannot be prepared ({err}); nothing was "
                                   "signed") from None
    return min(started or time.monotonic(), process.started_at()), closed


def answer(code, out, err):
    """Print a command's outcome: ``out`` on stdout (a failure to is the error then),
    ``err`` on stderr; return the exit code."""
    if out:
        try:
            write_stdout(out)
        except errors.SignerError as failure:
            code, err = failure.exit_code, failure.line() + "\n"
    if err:
        write_stderr(err)
    return code
