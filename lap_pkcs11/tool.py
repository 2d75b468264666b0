"""The one place that runs pkcs11-tool.

``sign_argv``, ``list_objects_argv`` and their siblings build argument vectors (pure functions, and
never with the PIN in them: it travels as ``--pin env:NAME``). ``run`` starts the
tool with no shell, in a new session (so it has no terminal to prompt on and its
whole process group can be killed), under ``setpriv --pdeathsig KILL`` (so it dies
with us even when we are SIGKILLed), with the message in an anonymous memory file
and its stdout and stderr in two more, and waits for it against a deadline.
``classify`` turns the tool's stderr into a typed error.

This module is on the per-signature path: it imports only what Python has built in.
"""

import os
import select
import time

from lap_pkcs11 import errors

# What we read back of the tool's stdout and stderr at most.
OUTPUT_LIMIT = 1 << 16
SETPRIV_CANDIDATES = ("/usr/bin/setpriv", "/bin/setpriv")


class Result:
    """What pkcs11-tool did: exit status, stdout bytes, stderr text."""

    __slots__ = ("status", "stdout", "stderr")

    def __init__(self, status, stdout, stderr):
        self.status = status
        self.stdout = stdout
        self.stderr = stderr


def _selector_args(config):
    args = ["--module", config.module]
    if config.slot is not None:
        args += ["--slot", str(config.slot)]
    elif config.slot_index is not None:
        args += ["--slot-index", str(config.slot_index)]
    elif config.token_label is not None:
        args += ["--token-label", config.token_label]
    return args


def sign_argv(tool, config, key_id, pin_env, input_path):
    """The pkcs11-tool argv that signs ``input_path`` with the key ``key_id``."""
    return [tool, *_selector_args(config), "--login", "--pin", "env:" + pin_env,
            "--sign", "--mechanism", config.mechanism, "--id", key_id,
            "--input-file", input_path]


def list_objects_argv(tool, config, kind, pin_env=None):
    """List the token's objects of ``kind`` (pubkey, privkey); logged in when given a PIN."""
    login = ["--login", "--pin", "env:" + pin_env] if pin_env else []
    return [tool, *_selector_args(config), *login, "--list-objects", "--type", kind]


def module_argv(tool, config, action):
    """A module-level query: --show-info or --list-token-slots (no token selector)."""
    return [tool, "--module", config.module, action]


def list_mechanisms_argv(tool, config):
    """The mechanisms of the selected token."""
    return [tool, *_selector_args(config), "--list-mechanisms"]


def keygen_argv(tool, config, pin_env, key_id, label):
    """Generate a sensitive, non-extractable Ed25519 key pair on the selected token."""
    return [tool, *_selector_args(config), "--login", "--pin", "env:" + pin_env,
            "--keypairgen", "--key-type", "EC:edwards25519", "--id", key_id, "--label", label,
            "--usage-sign", "--sensitive"]


def find_program(name, environ):
    """The absolute path of ``name`` (searched on PATH when it has no slash), or None."""
    if "/" in name:
        return name if os.access(name, os.X_OK) and os.path.isfile(name) else None
    for folder in environ.get("PATH", os.defpath).split(os.pathsep):
        path = os.path.join(folder or ".", name)
        if os.access(path, os.X_OK) and os.path.isfile(path):
            return path
    return None


def require_tool(config, env):
    """The configured pkcs11-tool's path, or ToolNotFound."""
    path = find_program(config.pkcs11_tool, env)
    if path is None:
        raise errors.ToolNotFound(f"{config.pkcs11_tool} not found; install OpenSC "
                                  "(apt-get install opensc) or set --pkcs11-tool")
    return path


def require_module(config):
    """A module path that names no file fails here, before pkcs11-tool runs."""
    if not os.path.isfile(config.module):
        raise errors.ModuleLoadFailed(f"PKCS#11 module {config.module} does not exist; "
                                      "fix --module")


def setpriv_path():
    """util-linux's setpriv, which arms the parent-death signal before exec."""
    for path in SETPRIV_CANDIDATES:
        if os.access(path, os.X_OK):
            return path
    raise errors.ToolNotFound("setpriv (util-linux) is missing; install util-linux")


def memory_file(name, data=b""):
    """An anonymous in-memory file holding ``data``: nothing of it ever reaches a disk."""
    fd = os.memfd_create(name)
    if data:
        os.write(fd, data)
    return fd


def run(argv, env, deadline, stdin_data=None):
    """Run ``argv`` until it exits or the monotonic ``deadline`` passes.

    ``stdin_data`` (bytes) is exposed to the tool as ``/dev/fd/3``, a regular file,
    so one ``read()`` sees all of it. On the deadline the tool's whole process
    group is killed and reaped, and ``errors.Timeout`` is raised.
    """
    fds = [memory_file("stdout"), memory_file("stderr")]
    actions = [(os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
               (os.POSIX_SPAWN_DUP2, fds[0], 1), (os.POSIX_SPAWN_DUP2, fds[1], 2)]
    if stdin_data is not None:
        fds.append(memory_file("message", stdin_data))
        actions.append((os.POSIX_SPAWN_DUP2, fds[2], 3))
    try:
        spawn_argv = [setpriv_path(), "--pdeathsig", "KILL", "--", *argv]
        pid = os.posix_spawn(spawn_argv[0], spawn_argv, env, file_actions=actions, setsid=True)
        try:
            status = _wait(pid, deadline)
        except BaseException:
            _kill_group(pid)
            raise
        stdout = os.pread(fds[0], OUTPUT_LIMIT, 0)
        stderr = os.pread(fds[1], OUTPUT_LIMIT, 0).decode("utf-8", "replace")
        return Result(status, stdout, stderr)
    finally:
        for fd in fds:
            os.close(fd)


def _wait(pid, deadline):
    pidfd = os.pidfd_open(pid)
    try:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([pidfd], [], [], remaining)[0]:
            raise errors.Timeout("pkcs11-tool did not finish before the deadline; "
                                 "check the token, pcscd and --timeout-ms")
    finally:
        os.close(pidfd)
    _, status = os.waitpid(pid, 0)
    # Whatever the tool left behind in its process group goes with it.
    try:
        os.killpg(pid, 9)
    except ProcessLookupError:
        pass
    return os.waitstatus_to_exitcode(status)


def _kill_group(pid):
    try:
        os.killpg(pid, 9)
    except ProcessLookupError:
        pass
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass


# CKA_EC_PARAMS of Ed25519 keys: the PrintableString "edwards25519" (what
# pkcs11-tool --keypairgen writes) or the OID 1.3.101.112 (imported keys).
ED25519_PARAMS = ("130c656477617264733235353139", "06032b6570")
_HEX_DIGITS = frozenset("0123456789abcdef")
# Field names across OpenSC versions: 0.23-0.26 print EC_POINT/EC_PARAMS, 0.27 "EC Point"/"EC Params".
_FIELDS = {"label": "label", "ID": "id", "EC_POINT": "ec_point", "EC Point": "ec_point",
           "EC_PARAMS": "ec_params", "EC Params": "ec_params", "Usage": "usage",
           "Access": "access"}
KEY_KINDS = ("private key", "public key", "secret key")


def hex_digits(text):
    """Lowercase hex of a printed byte string (``a1b2``, ``A1:B2``, wrapped), or None."""
    digits = "".join(text.split()).replace(":", "").lower()
    if not digits or len(digits) % 2 or not _HEX_DIGITS.issuperset(digits):
        return None
    return digits


def id_hex(text):
    """A printed CKA_ID as lowercase hex, or None when it cannot be read.

    0.23-0.26 print plain hex (``0102``); 0.27 prints ids of at most 4 bytes that
    are not zero as decimal with the bytes in brackets (``258 (0x01:02)``), others
    as colon hex (``00``, ``a1:b2:...``) wrapped after 32 bytes.
    """
    number, bracket, rest = text.partition(" (0x")
    if bracket:
        if not (number.isascii() and number.isdigit() and rest.endswith(")")):
            return None
        digits = hex_digits(rest[:-1])
        return digits if digits is not None and int(digits, 16) == int(number) else None
    return hex_digits(text)


class TokenObject:
    """One object of a ``--list-objects`` listing: its kind and the fields lap-pkcs11 uses.

    ``id`` and ``ec_point``/``ec_params`` are lowercase hex whatever the OpenSC
    version printed; ``id_text`` keeps what was printed, and ``id`` is None when
    that text was present but unreadable.
    """

    def __init__(self, kind):
        self.kind = kind
        self.fields = []
        self.label = None
        self.id = None
        self.id_text = None
        self.ec_point = None
        self.ec_params = None
        self.access = frozenset()
        self.usage = frozenset()

    @property
    def is_key(self):
        return self.kind in KEY_KINDS

    def _set(self, name, value):
        if name == "label":
            self.label = value
        elif name == "id":
            self.id_text, self.id = value, id_hex(value)
        elif name == "ec_point":
            self.ec_point = hex_digits(value)
        elif name == "ec_params":
            # Hex, then a description in brackets: "(OID 1.3.101.112)", '("Ed25519" OID:...)'.
            self.ec_params = hex_digits(value.split("(", 1)[0])
        elif name in ("access", "usage"):
            setattr(self, name, frozenset(part.strip() for part in value.split(",")
                                          if part.strip()))

    def public_key(self):
        """The 32-byte Ed25519 key from CKA_EC_POINT, DER-wrapped or raw."""
        if self.ec_params is not None and self.ec_params not in ED25519_PARAMS:
            raise errors.MechanismUnsupported(
                f"the key with id {self.id} is not an Ed25519 key (EC_PARAMS {self.ec_params})")
        raw = bytes.fromhex(self.ec_point or "")
        if len(raw) == 34 and raw[:2] == b"\x04\x20":
            return raw[2:]
        if len(raw) == 32:
            return raw
        raise errors.SigningFailed(f"the public key with id {self.id} has an EC_POINT of "
                                   f"{len(raw)} bytes, not an Ed25519 point")


def _object_kind(line):
    """"private key" for "Private Key Object; EC_EDWARDS", "data" for "Data object 6", or None."""
    words = line.split(";", 1)[0].lower().split()
    if "object" not in words:
        return None
    return " ".join(words[:words.index("object")])


def parse_objects(listing):
    """The objects of a ``pkcs11-tool --list-objects`` listing, in order."""
    return read_listing(listing)[0]


def read_listing(listing):
    """(objects, stray lines) of a ``pkcs11-tool --list-objects`` listing.

    Reads every format from OpenSC 0.23 to 0.27: an object starts at a line with
    no indent, its fields are ``  name: value`` lines, and a line indented deeper
    (0.27 wraps values over 32 bytes onto lines indented 14 spaces) continues
    the field before it. Lines with no indent that name no object are the stray
    lines, for a caller who must be sure it read everything.
    """
    objects, strays, current, fields, field = [], [], None, {}, None

    def finish():
        if current is not None:
            for name, value in fields.items():
                current._set(name, value)

    for line in listing.splitlines():
        if not line.strip():
            continue
        if not line.startswith(" "):
            finish()
            kind = _object_kind(line)
            current = TokenObject(kind) if kind is not None else None
            fields, field = {}, None
            if current is None:
                strays.append(line.strip())
            else:
                objects.append(current)
            continue
        if current is None:
            continue
        if not line.startswith("   ") or field is None:
            name, _, value = line.strip().partition(":")
            current.fields.append(name.strip())
            field = _FIELDS.get(name.strip(), "")
            if field:
                fields[field] = value.strip()
        elif field:
            fields[field] += " " + line.strip()
    finish()
    return objects, strays


# Stable CKR_* names and OpenSC phrases, matched in order against stderr.
_CLASSES = (
    ("Failed to load pkcs11 module", errors.ModuleLoadFailed,
     "the PKCS#11 module cannot be loaded; check --module and the module's own configuration"),
    ("sc_dlopen failed", errors.ModuleLoadFailed,
     "the PKCS#11 module cannot be loaded; check --module"),
    ("sc_dlopen_deep failed", errors.ModuleLoadFailed,
     "the PKCS#11 module cannot be loaded; check --module"),
    ("C_Initialize failed", errors.ModuleLoadFailed,
     "the PKCS#11 module failed to initialise; check its configuration (e.g. SOFTHSM2_CONF)"),
    ("CKR_PIN_INCORRECT", errors.PinIncorrect,
     "the token rejected the PIN; fix the PIN (real tokens lock after a few wrong tries)"),
    ("CKR_PIN_LEN_RANGE", errors.PinIncorrect,
     "the token rejected the PIN's length; fix the PIN"),
    ("CKR_PIN_LOCKED", errors.PinLocked,
     "the user PIN is locked; unlock it with the SO PIN"),
    ("CKR_PIN_EXPIRED", errors.PinLocked,
     "the user PIN has expired; set a new one"),
    ("Token not initialized", errors.TokenNotFound,
     "the selected slot holds no initialised token; check the token selector "
     "(pkcs11-tool --list-token-slots)"),
    ("CKR_TOKEN_NOT_RECOGNIZED", errors.TokenNotFound,
     "the selected slot holds no initialised token; check the token selector "
     "(pkcs11-tool --list-token-slots)"),
    ("No slot with token named", errors.TokenNotFound,
     "no token with that label; check --token-label (pkcs11-tool --list-slots)"),
    ("CKR_SLOT_ID_INVALID", errors.TokenNotFound,
     "no such slot; check --slot (pkcs11-tool --list-slots)"),
    ("CKR_TOKEN_NOT_PRESENT", errors.TokenNotFound,
     "no token in that slot; insert it or fix the slot"),
    ("is not available", errors.TokenNotFound,
     "no token at that slot index; check --slot-index (pkcs11-tool --list-slots)"),
    ("No slot with id", errors.TokenNotFound,
     "no such slot; check --slot (pkcs11-tool --list-slots)"),
    ("No slots", errors.TokenNotFound,
     "the module sees no slots; check the token is present and initialised"),
    ("No slot", errors.TokenNotFound,
     "no usable token; check the token selector (pkcs11-tool --list-slots)"),
    ("Private/secret key not found", errors.KeyNotFound,
     "no private key with that id on the token; check --key-id (lap-pkcs11 doctor)"),
    ("key not found", errors.KeyNotFound,
     "no private key with that id on the token; check --key-id (lap-pkcs11 doctor)"),
    ("Key has no EC_PARAMS attribute", errors.MechanismUnsupported,
     "the key has no EC parameters, so it is not an Ed25519 key; select an Ed25519 key"),
    ("Unknown or unsupported EC curve", errors.MechanismUnsupported,
     "the key is on a curve pkcs11-tool cannot sign EdDSA with; select an Ed25519 key"),
    ("CKR_MECHANISM_INVALID", errors.MechanismUnsupported,
     "the token cannot do this mechanism; check --mechanism and the key type"),
    ("CKR_KEY_TYPE_INCONSISTENT", errors.MechanismUnsupported,
     "the key's type does not fit the mechanism; use an Ed25519 key with EDDSA"),
    ("CKR_KEY_FUNCTION_NOT_PERMITTED", errors.MechanismUnsupported,
     "the key may not sign (CKA_SIGN is false); use a signing key"),
    ("CKR_OPERATION_NOT_INITIALIZED", errors.MechanismUnsupported,
     "the token refused to sign with this mechanism and key; check --mechanism and the key type"),
    ("Unknown PKCS11 mechanism", errors.MechanismUnsupported,
     "pkcs11-tool does not know this mechanism; use EDDSA"),
    ("mechanism not supported", errors.MechanismUnsupported,
     "the token does not support this mechanism"),
)


def classify(result):
    """The typed error for a failed pkcs11-tool run, from its stderr's stable parts."""
    text = result.stderr
    for needle, cls, advice in _CLASSES:
        if needle in text:
            return cls(advice)
    if result.status == 127:
        return errors.ToolNotFound("pkcs11-tool could not be started; check --pkcs11-tool")
    if result.status < 0:
        return errors.SigningFailed(f"pkcs11-tool died of signal {-result.status}")
    detail = _last_line(text)
    return errors.SigningFailed(f"pkcs11-tool exited {result.status}" +
                                (f": {detail}" if detail else ""))


def _last_line(text):
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line and line != "Aborting.":
            return line[:200]
    return ""
