"""The one definition of every signer option.

Each ``Option`` names its attribute, its command-line flag, the environment
variables that set it (looked up in order, first in the real environment, then in
the env file), its default, its parser and its help text. The lean ``sign``
command, the pydantic-settings model of the administrative commands, the README
table and ``.env.pkcs11.example`` are all derived from ``OPTIONS``; a test checks
that the two resolvers agree.

This module is on the per-signature path: it imports nothing.
"""

_HEX = frozenset("0123456789abcdef")
# The only whitespace trimmed around a value, in every reader (str.strip() would
# also take NBSP and other Unicode spaces, which the shell mirror does not).
_BLANKS = " \t"


def _text(value):
    if "\0" in value or "\n" in value:
        raise ValueError("must be one line of text")
    return value


def _hex_bytes(value):
    text = value.lower().replace(":", "")
    if not text or len(text) % 2 or not _HEX.issuperset(text):
        raise ValueError("must be an even number of hex digits, e.g. 01 or a1b2")
    return text


def _public_key_hex(value):
    text = value.strip(_BLANKS).lower()
    if len(text) != 64 or not _HEX.issuperset(text):
        raise ValueError("must be 64 hex characters (a 32-byte Ed25519 public key)")
    return text


def _digits(text):
    return bool(text) and text.isascii() and text.isdigit()


def _unsigned(value):
    text = value.strip(_BLANKS)
    if text[:2].lower() == "0x" and text[2:] and _HEX.issuperset(text[2:].lower()):
        return int(text[2:], 16)
    if not _digits(text):
        raise ValueError("must be a non-negative whole number (decimal, or hex with 0x)")
    return int(text)


def _timeout_ms(value):
    text = value.strip(_BLANKS)
    # More than 6 significant digits is out of range: said so without int() of a huge string.
    if not _digits(text) or len(text.lstrip("0")) > 6 or not 1 <= int(text) <= 600000:
        raise ValueError("must be a whole number of milliseconds from 1 to 600000")
    return int(text)


def _seconds_as_ms(value):
    """Seconds as written (e.g. 2 or 1.5) to whole milliseconds, without float rounding."""
    whole, dot, fraction = value.strip(_BLANKS).partition(".")
    if not (whole or fraction) or (whole and not _digits(whole)) or (
            fraction and not _digits(fraction)) or (dot and not fraction and not whole):
        raise ValueError("must be a number of seconds such as 2 or 1.5")
    if len(whole.lstrip("0")) > 5:  # 100000 s or more; int() of a huge string would fail
        raise ValueError("must be more than 0 and less than 86400 seconds")
    ms = int(whole or "0") * 1000 + int((fraction + "000")[:3])
    if not 0 < ms < 86400000:
        raise ValueError("must be more than 0 and less than 86400 seconds")
    return ms


def _env_name(value):
    if not value or not (value[0].isalpha() or value[0] == "_") or not all(
        c.isalnum() or c == "_" for c in value
    ) or not value.isascii():
        raise ValueError("must be an environment variable name such as PKCS11_PIN")
    return value


def _mechanism(value):
    text = value.strip(_BLANKS).upper()
    if not text or not all(c.isalnum() or c in "_-" for c in text) or not text.isascii():
        raise ValueError("must be a pkcs11-tool mechanism name such as EDDSA")
    return text


def _choice(*choices):
    def parse(value):
        text = value.strip(_BLANKS).lower()
        if text not in choices:
            raise ValueError("must be one of " + ", ".join(choices))
        return text

    parse.choices = choices
    return parse


def _names(value):
    """A list of user or group names or numeric ids, separated by commas or spaces."""
    items = value.replace(",", " ").split()
    if not items or not all(item.isascii() and all(c.isalnum() or c in "._-" for c in item)
                            and not item.startswith("-") for item in items):
        raise ValueError("must be user or group names or numeric ids separated by commas, "
                         "e.g. lap-gateway,1001")
    return ",".join(items)


def _library_version(value):
    major, dot, minor = value.strip(_BLANKS).partition(".")
    if not _digits(major) or (dot and not _digits(minor)):
        raise ValueError("must be a version such as 2 or 2.6")
    return f"{int(major)}.{int(minor or '0')}"


def _count(low, high):
    def parse(value):
        text = value.strip()
        if not _digits(text) or not low <= int(text) <= high:
            raise ValueError(f"must be a whole number from {low} to {high}")
        return int(text)

    return parse


class Option:
    """One configuration option: flag, environment variables, default and parser."""

    __slots__ = ("attr", "flag", "envs", "default", "parse", "metavar", "help")

    def __init__(self, attr, flag, envs, default, parse, metavar, help):
        self.attr = attr
        self.flag = flag
        self.envs = envs
        self.default = default
        self.parse = parse
        self.metavar = metavar
        self.help = help


OPTIONS = (
    Option("uri", "--uri", ("LAP_PKCS11_URI",), None, _text, "URI",
           "PKCS#11 URI (RFC 7512) of the key, e.g. pkcs11:token=lap-gateway;id=%01;type=private; "
           "it fills the options it names (set otherwise to another value: an error)."),
    Option("module", "--module", ("LAP_PKCS11_MODULE",), None, _text, "PATH",
           "PKCS#11 module (.so) of the token. Required."),
    Option("slot", "--slot", ("LAP_PKCS11_SLOT",), None, _unsigned, "ID",
           "Select the token by slot id."),
    Option("slot_index", "--slot-index", ("LAP_PKCS11_SLOT_INDEX",), None, _unsigned, "N",
           "Select the token by slot index (counting from 0)."),
    Option("token_label", "--token-label", ("LAP_PKCS11_TOKEN_LABEL",), None, _text, "LABEL",
           "Select the token by label (stable; SoftHSM slot ids are not)."),
    Option("key_id", "--key-id", ("LAP_PKCS11_KEY_ID",), None, _hex_bytes, "HEX",
           "Select the private key by CKA_ID."),
    Option("key_label", "--key-label", ("LAP_PKCS11_KEY_LABEL",), None, _text, "LABEL",
           "Select the private key by CKA_LABEL (resolved to its CKA_ID first)."),
    # Filled only by a URI (serial=, manufacturer=, model=, library-*=): they narrow the
    # token the other selectors choose, at the cost of one more pkcs11-tool run.
    Option("token_serial", None, (), None, _text, "TEXT", "The token's serial number (URI)."),
    Option("token_manufacturer", None, (), None, _text, "TEXT", "The token's manufacturer (URI)."),
    Option("token_model", None, (), None, _text, "TEXT", "The token's model (URI)."),
    Option("library_manufacturer", None, (), None, _text, "TEXT",
           "The module's manufacturer (URI)."),
    Option("library_description", None, (), None, _text, "TEXT",
           "The module's description (URI)."),
    Option("library_version", None, (), None, _library_version, "VERSION",
           "The module's version (URI)."),
    Option("mechanism", "--mechanism", ("LAP_PKCS11_MECHANISM",), "EDDSA", _mechanism, "M",
           "pkcs11-tool signing mechanism."),
    Option("pin_env", "--pin-env", ("LAP_PKCS11_PIN_ENV",), "PKCS11_PIN", _env_name, "NAME",
           "Name of the environment variable that holds the user PIN."),
    Option("pin_file", "--pin-file", ("LAP_PKCS11_PIN_FILE",), None, _text, "PATH",
           "File whose first line is the user PIN (e.g. a systemd credential)."),
    Option("input", "--input", ("LAP_PKCS11_INPUT",), "raw", _choice("raw", "base64"), "raw|base64",
           "Encoding of stdin: raw message bytes, or base64 as the LAP gateway sends."),
    Option("output", "--output", ("LAP_PKCS11_OUTPUT", "SIGNER_OUTPUT"), "base64",
           _choice("base64", "hex", "raw"), "base64|hex|raw",
           "Encoding of the signature on stdout; base64 and hex end with a newline."),
    Option("timeout_ms", "--timeout-ms", ("LAP_PKCS11_TIMEOUT_MS", "SIGNER_TIMEOUT_MS"), "1500",
           _timeout_ms, "N", "Hard deadline for the whole command, in milliseconds."),
    Option("env_file", "--env-file", ("LAP_PKCS11_ENV_FILE",), None, _text, "PATH",
           "dotenv file, read as data; the real environment wins over it."),
    Option("pkcs11_tool", "--pkcs11-tool", ("LAP_PKCS11_TOOL",), "pkcs11-tool", _text, "PATH",
           "The pkcs11-tool program (default: found on PATH)."),
    Option("expect_public_key", "--expect-public-key",
           ("LAP_PKCS11_EXPECT_PUBLIC_KEY", "LAP_GATEWAY_PUBLIC_KEY_HEX"), None, _public_key_hex,
           "HEX", "Pinned Ed25519 public key: every signature is verified against it before release."),
    Option("lock_dir", "--lock-dir", ("LAP_PKCS11_LOCK_DIR",), None, _text, "PATH",
           "Directory for the per-module lock that serialises token access "
           "(default: $RUNTIME_DIRECTORY, $XDG_RUNTIME_DIR, then /tmp); 'none' turns it off."),
    Option("caller_timeout_ms", None,
           ("SIGNER_TIMEOUT_SECONDS", "LAP_GATEWAY_SIGNING_CMD_TIMEOUT_SECONDS"), None,
           _seconds_as_ms, "SECONDS",
           "The gateway's own deadline (inherited); the signer finishes before it."),
    # lap-pkcs11 agent only (the other commands ignore them).
    Option("agent_socket", "--socket", ("LAP_PKCS11_AGENT_SOCKET",), "/run/lap-pkcs11/agent.sock",
           _text, "PATH", "agent: the unix socket to listen on, unless systemd hands one over "
           "(LISTEN_FDS)."),
    Option("agent_allow_users", "--allow-users", ("LAP_PKCS11_AGENT_ALLOW_USERS",), None, _names,
           "LIST", "agent: users (names or uids, comma-separated) who may connect, besides the "
           "agent's own user and root."),
    Option("agent_allow_groups", "--allow-groups", ("LAP_PKCS11_AGENT_ALLOW_GROUPS",), None,
           _names, "LIST", "agent: groups (names or gids) whose members may connect."),
    Option("agent_workers", "--workers", ("LAP_PKCS11_AGENT_WORKERS",), "2", _count(1, 64), "N",
           "agent: worker threads, each with its own PKCS#11 session under the one login."),
    Option("agent_max_connections", "--max-connections", ("LAP_PKCS11_AGENT_MAX_CONNECTIONS",),
           "128", _count(1, 1000), "N",
           "agent: open connections at most; one more is closed at once, unanswered."),
    Option("agent_read_timeout_ms", "--read-timeout-ms", ("LAP_PKCS11_AGENT_READ_TIMEOUT_MS",),
           "1000", _timeout_ms, "N",
           "agent: a connection that has not sent its whole request in this time is closed."),
)

# Options that narrow the token beyond its label or slot (matched against a listing).
TOKEN_CONSTRAINTS = ("token_serial", "token_manufacturer", "token_model",
                     "library_manufacturer", "library_description", "library_version")

BY_FLAG = {option.flag: option for option in OPTIONS if option.flag}
BY_ATTR = {option.attr: option for option in OPTIONS}
