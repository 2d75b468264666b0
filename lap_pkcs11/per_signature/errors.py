"""The one error root of lap-pkcs11, with its stable names and exit codes.

Every failure the signer can report is a ``SignerError`` subclass. Each carries a
stable ``name`` (what the LAP gateway copies into its deny reason), an exit code
from the BSD ``sysexits.h`` family, and a message that says what to do next. The
command-line layers catch ``SignerError`` once and print ``line()``.

This module is on the per-signature path: it imports nothing.
"""

PROGRAM = "lap-pkcs11"


class SignerError(Exception):
    """Base of every lap-pkcs11 failure."""

    name = "SIGNING_FAILED"
    exit_code = 70

    def __init__(self, message):
        super().__init__(message)
        self.message = message

    def line(self):
        """The single stderr line for this error, without its newline.

        Whatever it quotes (pkcs11-tool's stderr, a path) cannot put a control
        character or an escape sequence into the gateway's log: each is a "?".
        """
        text = " ".join(self.message.split())
        if not text.isprintable():
            text = "".join(c if c.isprintable() else "?" for c in text)
        return f"{PROGRAM}: {self.name}: {text}"


class ConfigInvalid(SignerError):
    name, exit_code = "CONFIG_INVALID", 64


class InputInvalid(SignerError):
    name, exit_code = "INPUT_INVALID", 65


class MessageTooLarge(SignerError):
    name, exit_code = "MESSAGE_TOO_LARGE", 65


class ToolNotFound(SignerError):
    name, exit_code = "TOOL_NOT_FOUND", 69


class ModuleLoadFailed(SignerError):
    name, exit_code = "MODULE_LOAD_FAILED", 69


class TokenNotFound(SignerError):
    name, exit_code = "TOKEN_NOT_FOUND", 69


class KeyNotFound(SignerError):
    name, exit_code = "KEY_NOT_FOUND", 69


class MechanismUnsupported(SignerError):
    name, exit_code = "MECHANISM_UNSUPPORTED", 69


class SignerUnavailable(SignerError):
    name, exit_code = "SIGNER_UNAVAILABLE", 69


class PinMissing(SignerError):
    name, exit_code = "PIN_MISSING", 77


class PinIncorrect(SignerError):
    name, exit_code = "PIN_INCORRECT", 77


class PinLocked(SignerError):
    name, exit_code = "PIN_LOCKED", 77


class Timeout(SignerError):
    name, exit_code = "TIMEOUT", 75


class KeyMismatch(SignerError):
    name, exit_code = "KEY_MISMATCH", 70


class KeyExists(SignerError):
    name, exit_code = "KEY_EXISTS", 73


class SigningFailed(SignerError):
    name, exit_code = "SIGNING_FAILED", 70


def _all_errors():
    found, todo = [], [SignerError]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo.extend(cls.__subclasses__())
    return found


def by_name(name):
    """The error class with this stable name (used to rebuild errors from a wire format)."""
    for cls in _all_errors():
        if cls is not SignerError and cls.name == name:
            return cls
    raise KeyError(name)
