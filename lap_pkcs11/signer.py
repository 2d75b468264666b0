"""Sign one message with the configured token key, through pkcs11-tool.

``sign`` is the whole per-signature path after configuration: it checks the
message, finds the PIN, takes the per-module lock, resolves a key label to its
CKA_ID, runs pkcs11-tool, checks the result is a 64-byte signature and, when a
public key is pinned, verifies the signature against it before returning it.

This module is on the per-signature path: it imports only what Python has built in.
"""

import fcntl
import os
import time

from lap_pkcs11 import errors, tool

# pkcs11-tool reads at most 1025 bytes with one read() and falls back to
# multi-part signing beyond 1024, which EdDSA tokens refuse.
MAX_MESSAGE = 1024
LOCK_POLL_SECONDS = 0.002
# Lock names keep [A-Za-z0-9._-] and make every other byte "_", as the shell mirror does.
_LOCK_NAME_BYTES = {byte: "_" for byte in range(256)
                    if not (chr(byte).isascii() and (chr(byte).isalnum() or chr(byte) in "._-"))}


class Secret:
    """A PIN that never shows itself in a repr, a log line or a traceback."""

    __slots__ = ("_value",)

    def __init__(self, value):
        self._value = value

    def reveal(self):
        return self._value

    def __repr__(self):
        return "Secret('**********')"

    __str__ = __repr__


def check_message(message):
    if not message:
        raise errors.InputInvalid("the message is empty; the gateway never signs an empty message")
    if len(message) > MAX_MESSAGE:
        raise errors.MessageTooLarge(
            f"the message is over {MAX_MESSAGE} bytes; pkcs11-tool cannot sign longer EdDSA input")


def read_pin(config, env):
    """Put the PIN into ``env`` under ``config.pin_env``; return that name.

    The PIN comes from exactly one place: the variable named by ``--pin-env``
    (real environment or env file) or the first line of ``--pin-file``.
    """
    name = config.pin_env
    if config.pin_file is not None:
        if config.sources.get("pin_env") != "default":
            raise errors.ConfigInvalid("both --pin-file and --pin-env are set; keep only one")
        if env.get(name):
            raise errors.ConfigInvalid(
                f"the PIN is given twice: in {name} and in --pin-file; remove one")
        try:
            with open(config.pin_file, "rb") as handle:
                first = handle.read(4096).split(b"\n", 1)[0].rstrip(b"\r")
        except OSError as err:
            raise errors.ConfigInvalid(
                f"PIN file {config.pin_file} cannot be read ({err.strerror}); "
                "fix --pin-file or its permissions") from None
        # Bytes that are not UTF-8 still reach pkcs11-tool unchanged (PINs are bytes).
        pin = Secret(first.decode("utf-8", "surrogateescape"))
        if not pin.reveal():
            raise errors.PinMissing(f"PIN file {config.pin_file} is empty; write the user PIN in it")
        env[name] = pin.reveal()
        return name
    if name not in env:
        raise errors.PinMissing(f"no PIN: set {name} or give --pin-file")
    if not env[name]:
        raise errors.PinMissing(f"no PIN: {name} is empty")
    return name


def lock_path(config, env):
    """The lock file that serialises token access through this module, or None.

    One lock per module path and SoftHSM2 configuration (``env`` is pkcs11-tool's
    environment): SoftHSM2 rewrites token files at every login, and a concurrent
    reader of the same token store then sees no token. The name is built the same
    way by the shell mirror, so both serialise against each other.
    """
    folder = config.lock_dir
    if folder == "none":
        return None
    if folder is None:
        folder = env.get("RUNTIME_DIRECTORY", "").split(":")[0] or \
            env.get("XDG_RUNTIME_DIR") or "/tmp"
    scope = f"{config.module}\n{env.get('SOFTHSM2_CONF', '')}".encode()
    name = scope.decode("latin-1").translate(_LOCK_NAME_BYTES)[:160]
    return os.path.join(folder, f"lap-pkcs11-{os.geteuid()}-{name}.lock")


class PinGuard:
    """Remembers a PIN the token rejected, so that no later call tries it again.

    Real tokens lock the user PIN after a few wrong tries, and the gateway runs
    the signer for every signature: without this, one wrong PIN would lock the
    token within seconds. The marker beside the lock file holds
    sha256(host secret, newline, PIN), never the PIN; marker and secret are the
    signer user's own files (0600, never through a symlink), and that user can
    read the PIN itself anyway. The shell mirror reads and writes the same files.
    """

    def __init__(self, lock_file):
        self.marker = lock_file[: -len(".lock")] + ".pin-rejected"
        self.secret_file = os.path.join(os.path.dirname(lock_file),
                                        f"lap-pkcs11-{os.geteuid()}.secret")

    def _read(self, path):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return None
        with os.fdopen(fd, "rb") as handle:
            return handle.read(256).split(b"\n", 1)[0].decode("ascii", "replace")

    def _write(self, path, text, exclusive):
        flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        flags |= os.O_EXCL if exclusive else os.O_TRUNC
        try:
            fd = os.open(path, flags, 0o600)
        except OSError:
            return False
        with os.fdopen(fd, "w") as handle:
            handle.write(text + "\n")
        return True

    def _fingerprint(self, pin, create):
        secret = self._read(self.secret_file)
        if not secret and create:
            fresh = os.urandom(32).hex()
            secret = fresh if self._write(self.secret_file, fresh, exclusive=True) else \
                self._read(self.secret_file)
        if not secret:
            return None
        from hashlib import sha256

        return sha256(secret.encode() + b"\n" + pin.encode("utf-8", "surrogateescape")).hexdigest()

    def check(self, pin):
        """Refuse a PIN the token has rejected before, without asking the token."""
        if not os.path.exists(self.marker):
            return
        seen = self._read(self.marker)
        if seen and seen == self._fingerprint(pin, create=False):
            raise errors.PinIncorrect(
                "the token rejected this PIN before and it is not tried again, so the token "
                f"cannot lock; fix the PIN (if the token's PIN was changed to it, remove "
                f"{self.marker})")

    def remember(self, pin):
        fingerprint = self._fingerprint(pin, create=True)
        if fingerprint:
            self._write(self.marker, fingerprint, exclusive=False)

    def forget(self):
        if os.path.exists(self.marker):
            try:
                os.unlink(self.marker)
            except FileNotFoundError:
                pass


def acquire_lock(path, deadline):
    """Open and flock ``path`` (ours alone, never through a symlink) before ``deadline``."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as err:
        raise errors.ConfigInvalid(
            f"lock file {path} cannot be opened ({err.strerror}); "
            "set --lock-dir to a private directory") from None
    if os.fstat(fd).st_uid != os.geteuid():
        os.close(fd)
        raise errors.ConfigInvalid(
            f"lock file {path} belongs to another user; set --lock-dir to a private directory")
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() >= deadline:
                os.close(fd)
                raise errors.Timeout("the token stayed busy with other signatures until the "
                                     "deadline; raise --timeout-ms or lower concurrency") from None
            time.sleep(LOCK_POLL_SECONDS)


def resolve_key_id(config, tool_path, env, pin_env, deadline):
    """The CKA_ID to sign with: the configured id, or the id of the one key with the label."""
    if config.key_id is not None:
        return config.key_id
    result = tool.run(tool.list_objects_argv(tool_path, config, "privkey", pin_env), env, deadline)
    if result.status != 0:
        raise tool.classify(result)
    ids = {key.id for key in tool.parse_objects(result.stdout.decode("utf-8", "replace"))
           if key.kind == "private key" and key.label == config.key_label}
    if not ids:
        raise errors.KeyNotFound(f"no private key labelled {config.key_label!r} on the token; "
                                 "check --key-label (lap-pkcs11 doctor)")
    if None in ids:
        raise errors.KeyNotFound(f"a private key labelled {config.key_label!r} shows no ID that "
                                 "lap-pkcs11 can read; select the key with --key-id")
    if len(ids) > 1:
        raise errors.KeyNotFound(f"the label {config.key_label!r} is not unique on the token; "
                                 "select the key with --key-id")
    return ids.pop()


def sign(config, message, environ, deadline):
    """The 64-byte Ed25519 signature of ``message``, or a SignerError."""
    check_message(message)
    env = config.child_environment(environ)
    pin_env = read_pin(config, env)
    tool.require_module(config)
    tool_path = tool.require_tool(config, env)
    path = lock_path(config, env)
    guard = PinGuard(path) if path else None
    if guard is not None:
        guard.check(env[pin_env])
    lock = acquire_lock(path, deadline) if path else None
    try:
        key_id = resolve_key_id(config, tool_path, env, pin_env, deadline)
        result = tool.run(tool.sign_argv(tool_path, config, key_id, pin_env, "/dev/fd/3"),
                          env, deadline, stdin_data=message)
        if result.status != 0:
            raise tool.classify(result)
    except errors.PinIncorrect:
        if guard is not None:
            guard.remember(env[pin_env])
        raise
    finally:
        if lock is not None:
            os.close(lock)
    if guard is not None:
        guard.forget()
    signature = result.stdout
    if len(signature) != 64:
        raise errors.SigningFailed(f"pkcs11-tool printed {len(signature)} bytes, not a "
                                   "64-byte Ed25519 signature; check --mechanism and the key")
    if config.expect_public_key is not None:
        from lap_pkcs11 import ed25519

        if not ed25519.is_valid(bytes.fromhex(config.expect_public_key), message, signature):
            raise errors.KeyMismatch(
                "the signature does not verify under the pinned public key "
                f"{config.expect_public_key[:16]}...; the token key is not the one the gateway "
                "trusts (check slot, token and key id, or the pinned key)")
    return signature
