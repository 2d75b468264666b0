"""``lap-pkcs11 sign``: the per-signature command the LAP gateway runs as SIGNER_CMD.

It parses its flags by the one option table, reads the message from stdin, signs
it and prints only the encoded signature on stdout. On any failure stdout stays
empty and stderr gets one ``lap-pkcs11: NAME: ...`` line; the exit code is the
error's. It deliberately imports neither typer nor pydantic (each signature is a
new process, and those imports alone cost many times a signature).
"""

import os

from lap_pkcs11.per_signature import config as configuration
from lap_pkcs11.per_signature import errors, process
from lap_pkcs11.per_signature.config import check_gateway_input, parse_flags
from lap_pkcs11.per_signature.options import OPTIONS
from lap_pkcs11.per_signature.signer import MAX_MESSAGE, check_message, sign
from lap_pkcs11.per_signature.process import (answer, begin, decode_base64, encode_signature,
                                              read_stdin, write_stderr)
from lap_pkcs11.backends.pkcs11_tool import Deadline

# Base64 of MAX_MESSAGE bytes, plus generous room for surrounding whitespace: stdin
# beyond this is refused unread, so a huge stdin costs neither time nor memory.
MAX_BASE64 = 4 * ((MAX_MESSAGE + 2) // 3)
READ_LIMIT = MAX_BASE64 + 4096


def usage():
    """The help text, derived from the option table."""
    lines = ["Usage: lap-pkcs11 sign [OPTIONS] < message > signature", "",
             "Sign stdin with an Ed25519 key on a PKCS#11 token; print the signature.", "",
             "Options:"]
    for option in OPTIONS:
        if option.flag is None:
            continue
        default = f" [default: {option.default}]" if option.default else ""
        lines.append(f"  {option.flag} {option.metavar}")
        lines.append(f"      {option.help} Env: {', '.join(option.envs)}.{default}")
    lines += ["  --debug", "      Show a traceback on internal errors.", "  -h, --help",
              "      Show this message and exit.", "  --version",
              "      Print the version and exit."]
    return "\n".join(lines) + "\n"


def parse_args(args):
    """Map ``args`` to {attr: raw text}; return (flags, debug, help): help is "help",
    "version" or False."""
    flags, given = parse_flags(args, "sign", ("-h", "--help", "--version", "--debug"))
    want_help = "help" if given & {"-h", "--help"} else "version" if "--version" in given \
        else False
    return flags, "--debug" in given, want_help


def read_message(encoding, read):
    """The message to sign, decoded by ``encoding`` (raw or base64) from ``read(limit)``."""
    if encoding == "raw":
        # One byte over the limit is enough for sign's check_message to refuse it.
        return read(MAX_MESSAGE)
    data = read(READ_LIMIT)
    if len(data) > READ_LIMIT:
        check_message(data)  # more base64 than any allowed message: MESSAGE_TOO_LARGE
    return decode_base64(data)


class Announcer:
    """Writes a failure line at once (the deadline passed while pkcs11-tool finishes
    its grace), so that the caller is answered in time and the line is written once."""

    def __init__(self, write=None):
        self.write = write
        self.done = False

    def __call__(self, error):
        if self.write is not None and not self.done:
            self.done = True
            self.write(error.line() + "\n")


def run(args, started, read=None, caller_deadline=None, caller_end=None, announce=None):
    """Sign as ``args`` say; return (exit code, stdout bytes, stderr text).

    ``read(limit)`` supplies the input (default: stdin under the deadline);
    ``caller_deadline`` (monotonic seconds), when given, caps the deadline, as the
    socket client's does; ``caller_end`` is when whoever waits for us gives up (a
    running pkcs11-tool is killed before it); ``announce`` (an ``Announcer``)
    writes a TIMEOUT line at the deadline itself. A line already announced is not
    returned again.
    """
    announce = announce or Announcer()
    debug = "--debug" in args
    try:
        flags, debug, want_help = parse_args(args)
        if want_help == "version":
            from lap_pkcs11 import __version__

            return 0, f"lap-pkcs11 {__version__}\n".encode(), ""
        if want_help:
            return 0, usage().encode(), ""
        environ = dict(os.environ)
        config = configuration.resolve(flags, environ)
        check_gateway_input(config, environ)
        end = started + config.deadline_ms() / 1000
        if caller_deadline is not None:
            end = min(end, caller_deadline)
        if caller_end is None and config.caller_timeout_ms is not None:
            caller_end = started + config.caller_timeout_ms / 1000
        deadline = Deadline(end, caller_end, announce)
        try:
            # pkcs11-tool's watchdog, started now: its start overlaps reading the message.
            deadline.watch()
            message = read_message(config.input, read or (
                lambda limit: read_stdin(limit, deadline.end)))
            process.check_interrupted()
            signature = sign(config, message, environ, deadline)
        finally:
            deadline.release()
        return 0, encode_signature(signature, config.output), ""
    except errors.SignerError as err:
        return err.exit_code, b"", "" if announce.done else err.line() + "\n"
    except Exception as err:  # A bug must still fail closed, in one line.
        if debug:  # on fd 2, which begin() opened: never stdout, even with stderr closed
            import traceback

            write_stderr(traceback.format_exc())
        failure = errors.SigningFailed(
            f"internal error ({type(err).__name__}); rerun with --debug and report it")
        return failure.exit_code, b"", "" if announce.done else failure.line() + "\n"


def main(args, started=None):
    """Run ``sign`` with ``args``; return the exit code."""
    started, code = begin(started, (1,), "stdout is closed; there is nowhere to print the "
                          "signature, so nothing was signed")
    if code is not None:
        return code
    return answer(*run(args, started, announce=Announcer(write_stderr)))
