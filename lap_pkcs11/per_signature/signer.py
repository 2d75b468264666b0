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

from lap_pkcs11.backends import pkcs11_tool
from lap_pkcs11.per_signature import errors, files, process

# pkcs11-tool reads at most 1025 bytes with one read() and falls back to
# multi-part signing beyond 1024, which EdDSA tokens refuse.
MAX_MESSAGE = 1024
PIN_FILE_LIMIT = 4096
LOCK_POLL_SECONDS = 0.002
# Lock names keep [A-Za-z0-9._-] and make every other byte "_", as the shell mirror does.
_LOCK_NAME_BYTES = {byte: "_" for byte in range(256)
                    if not (chr(byte).isascii() and (chr(byte).isalnum() or chr(byte) in "._-"))}


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
        data = files.read_named_file(config.pin_file, "PIN file", PIN_FILE_LIMIT, secret=True)
        first = data.split(b"\n", 1)[0].rstrip(b"\r")
        # Bytes that are not UTF-8 still reach pkcs11-tool unchanged (PINs are bytes).
        if not first:
            raise errors.PinMissing(f"PIN file {config.pin_file} is empty; write the user PIN "
                                    "in it")
        env[name] = first.decode("utf-8", "surrogateescape")
        return name
    if name not in env:
        raise errors.PinMissing(f"no PIN: set {name} or give --pin-file")
    if not env[name]:
        raise errors.PinMissing(f"no PIN: {name} is empty")
    return name


def state_dir(config, env):
    """The private directory of the lock and PIN-guard files, or None (``--lock-dir none``)."""
    folder = config.lock_dir
    if folder == "none":
        return None
    if folder is not None:
        return files.private_dir(folder, explicit=True)
    base = env.get("RUNTIME_DIRECTORY", "").split(":")[0] or env.get("XDG_RUNTIME_DIR") or "/tmp"
    return files.private_dir(base, explicit=False)


def lock_name(module_stat, env):
    """The name shared by the lock file and the PIN-guard marker of one token store.

    One lock per module file and SoftHSM2 configuration file (``env`` is
    pkcs11-tool's environment), each known by its device and inode whatever path
    names it: SoftHSM2 rewrites token files at every login, and a concurrent
    reader of the same token store then sees no token. A configuration path that
    names no file keeps its spelling (bytes outside ``[A-Za-z0-9._-]`` as ``_``,
    160 at most). The shell mirror builds the same name.
    """
    name = f"{module_stat.st_dev}-{module_stat.st_ino}"
    conf = env.get("SOFTHSM2_CONF", "")
    if not conf:
        return name
    try:
        info = os.stat(conf)
        return f"{name}-{info.st_dev}-{info.st_ino}"
    except (OSError, ValueError):
        text = conf.encode("utf-8", "surrogateescape").decode("latin-1")
        return f"{name}-{text.translate(_LOCK_NAME_BYTES)[:160]}"


class PinGuard:
    """Remembers the PINs the token rejected, so that no later call tries them again.

    Real tokens lock the user PIN after a few wrong tries, and the gateway runs
    the signer for every signature: without this, one wrong PIN would lock the
    token within seconds. The marker holds one line per rejected PIN (the last
    MAX_REMEMBERED), sha256(per-user secret, newline, PIN) in hex, never the PIN;
    marker and secret live in the signer's private state directory and are
    refused unless they are the signer user's own 0600 files (that user can read
    the PIN itself anyway). The guard is read and written only while the token
    lock is held, so of many concurrent callers with one wrong PIN exactly one
    reaches the token. The shell mirror reads and writes the same files.
    """

    LIMIT = 4096
    MAX_REMEMBERED = 8
    _HEX = frozenset("0123456789abcdef")

    def __init__(self, folder, name):
        self.marker = os.path.join(folder, name + ".pin-rejected")
        self.secret_file = os.path.join(folder, "secret")

    def _lines(self, path):
        fd = files.open_private(path, os.O_RDONLY, self.LIMIT)
        if fd is None:
            return []
        try:
            text = os.read(fd, self.LIMIT).decode("ascii", "replace")
        finally:
            os.close(fd)
        return [line for line in text.split("\n") if len(line) == 64 and self._HEX.issuperset(line)]

    def _write(self, path, lines):
        fd = files.open_private(path, os.O_WRONLY | os.O_CREAT)
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, "".join(line + "\n" for line in lines).encode(), 0)
        finally:
            os.close(fd)

    def _secret(self, create):
        """The per-user secret; a missing or damaged one is made anew when ``create``."""
        found = self._lines(self.secret_file)
        if found or not create:
            return found[0] if found else None
        fresh = os.urandom(32).hex()
        self._write(self.secret_file, [fresh])
        return fresh

    @staticmethod
    def _fingerprint(secret, pin):
        from hashlib import sha256

        return sha256(secret.encode() + b"\n" + pin.encode("utf-8", "surrogateescape")).hexdigest()

    def check(self, pin):
        """Refuse a PIN the token has rejected before, without asking the token."""
        seen = self._lines(self.marker)
        secret = self._secret(create=False) if seen else None
        if secret and self._fingerprint(secret, pin) in seen:
            raise errors.PinIncorrect(
                "the token rejected this PIN before and it is not tried again, so the token "
                f"cannot lock; fix the PIN (if the token's PIN was changed to it, remove "
                f"{self.marker})")

    def remember(self, pin):
        fingerprint = self._fingerprint(self._secret(create=True), pin)
        seen = [line for line in self._lines(self.marker) if line != fingerprint]
        self._write(self.marker, [*seen, fingerprint][-self.MAX_REMEMBERED:])

    def forget(self):
        if os.path.lexists(self.marker):
            try:
                os.unlink(self.marker)
            except FileNotFoundError:
                pass


def forget_rejected_pin(config, env):
    """Clear the PIN guard's marker (after a login that the token accepted)."""
    folder = state_dir(config, env)
    if folder is not None:
        PinGuard(folder, lock_name(pkcs11_tool.require_module(config), env)).forget()


def acquire_lock(path, deadline):
    """Open and flock ``path`` (ours alone, never through a symlink) while a tool run still fits."""
    fd = files.open_private(path, os.O_RDWR | os.O_CREAT)
    # Waiting stops where a pkcs11-tool run would no longer fit before the deadline.
    give_up = deadline.end - pkcs11_tool.MIN_TOOL_MS / 1000
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return fd
            except BlockingIOError:
                if time.monotonic() >= give_up:
                    raise errors.Timeout("the token stayed busy with other signatures until the "
                                         "deadline; raise --timeout-ms or lower concurrency") from None
                process.pause(min(LOCK_POLL_SECONDS, max(give_up - time.monotonic(), 0)))
    except BaseException:
        os.close(fd)
        raise


def _constraints(config):
    from lap_pkcs11.per_signature.options import TOKEN_CONSTRAINTS

    return {attr: getattr(config, attr) for attr in TOKEN_CONSTRAINTS
            if getattr(config, attr) is not None}


def _wanted(pairs):
    from lap_pkcs11.per_signature.uri import ATTRIBUTE_OF

    return ", ".join(f"{ATTRIBUTE_OF[attr]}={value}" for attr, value in pairs.items())


def choose_token(config, listing):
    """The slot id of the one token of ``listing`` (a pkcs11_tool.TokenListing) that matches
    every token attribute ``config`` gives (label, slot id, serial, manufacturer, model)
    on a module whose information matches the library attributes; else TOKEN_NOT_FOUND."""
    wanted = _constraints(config)
    library = {attr: value for attr, value in wanted.items() if attr.startswith("library_")}
    seen = {"library_manufacturer": listing.library.get("manufacturer"),
            "library_description": listing.library.get("description"),
            "library_version": listing.library.get("version")}
    if any(seen[attr] != value for attr, value in library.items()):
        raise errors.TokenNotFound(
            f"the module is {seen['library_manufacturer']!r} {seen['library_description']!r} "
            f"version {seen['library_version']}, not the URI's {_wanted(library)}; check the "
            "URI and --module")
    token = {"token_label": config.token_label, "slot": config.slot,
             **{attr: value for attr, value in wanted.items() if attr.startswith("token_")}}
    token = {attr: value for attr, value in token.items() if value is not None}
    fields = {"token_label": "label", "slot": "slot", "token_serial": "serial",
              "token_manufacturer": "manufacturer", "token_model": "model"}
    found = [entry for entry in listing.tokens
             if all(entry.get(fields[attr]) == value for attr, value in token.items())]
    if len(found) == 1:
        return found[0]["slot"]
    tokens = "; ".join(f"{entry.get('label')!r} serial {entry.get('serial')!r}"
                       for entry in listing.tokens) or "none"
    if not found:
        raise errors.TokenNotFound(f"no token has {_wanted(token)}; tokens seen: {tokens}; "
                                   "check the URI (pkcs11-tool --list-token-slots)")
    raise errors.TokenNotFound(f"{len(found)} tokens have {_wanted(token)}; add serial= to the "
                               "URI to tell them apart")


def resolve_token(config, tool_path, env, deadline):
    """``config``, or when it narrows the token by serial, manufacturer, model or the
    module's information, a copy that selects the one matching token by its slot id
    (one pkcs11-tool run: pkcs11-tool itself selects only by label, slot or index)."""
    if not _constraints(config):
        return config
    from lap_pkcs11.per_signature.config import Config
    from lap_pkcs11.per_signature.options import TOKEN_CONSTRAINTS

    result = pkcs11_tool.run(pkcs11_tool.token_listing_argv(tool_path, config), env, deadline)
    if result.status != 0:
        raise pkcs11_tool.classify(result)
    slot = choose_token(config, pkcs11_tool.read_token_listing(
        result.stdout.decode("utf-8", "replace"), result.stderr))
    values = dict(config.values(), slot=slot, token_label=None, slot_index=None,
                  **{attr: None for attr in TOKEN_CONSTRAINTS})
    return Config(values, config.sources, config.env_file, config.file_env)


def one_key(found, config, kind="private key"):
    """The one key in ``found`` (what the key selection of ``config`` matched on the
    token: the agent's and the operator commands' rule), else KEY_NOT_FOUND."""
    if not found:
        raise errors.KeyNotFound(f"no {kind} with {config.key_selection()} on the token; "
                                 "check --key-id or --key-label (lap-pkcs11 keys)")
    if len(found) > 1:
        raise errors.KeyNotFound(f"{len(found)} {kind}s have {config.key_selection()}; give "
                                 "each key its own id and label")
    return found[0]


def resolve_key_id(config, tool_path, env, pin_env, deadline):
    """The CKA_ID to sign with: the configured id, the id of the one key with the label,
    or, given both, the id after checking that the one key with it carries the label."""
    if config.key_label is None:
        return config.key_id
    result = pkcs11_tool.run(pkcs11_tool.list_objects_argv(tool_path, config, "privkey", pin_env),
                             env, deadline)
    if result.status != 0:
        raise pkcs11_tool.classify(result)
    keys = [key for key in pkcs11_tool.parse_objects(result.stdout.decode("utf-8", "replace"))
            if key.kind == "private key"]
    if config.key_id is not None:
        # pkcs11-tool signs with the first key of that id: it must be the one, and labelled so.
        same = [key for key in keys if key.id == config.key_id]
        if not same:
            raise errors.KeyNotFound(f"no private key with id {config.key_id} on the token; "
                                     "check --key-id (lap-pkcs11 keys)")
        if len(same) > 1:
            raise errors.KeyNotFound(f"{len(same)} private keys have id {config.key_id}; give "
                                     "each key its own id")
        if same[0].label != config.key_label:
            raise errors.KeyNotFound(f"the private key with id {config.key_id} is labelled "
                                     f"{same[0].label!r}, not {config.key_label!r}; check "
                                     "--key-label or the URI's object= (lap-pkcs11 keys)")
        return config.key_id
    ids = {key.id for key in keys if key.label == config.key_label}
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


def _sign_locked(config, message, env, pin_env, tool_path, deadline, guard):
    """The token work, under the lock: PIN guard, key id, signature."""
    pin = env[pin_env]
    if guard is not None:
        guard.check(pin)
    try:
        config = resolve_token(config, tool_path, env, deadline)
        key_id = resolve_key_id(config, tool_path, env, pin_env, deadline)
        result = pkcs11_tool.run(
            pkcs11_tool.sign_argv(tool_path, config, key_id, pin_env, "/dev/fd/3"), env,
            deadline, stdin_data=message, last=True)
        if result.status != 0:
            raise pkcs11_tool.classify(result)
    except errors.PinIncorrect:
        if guard is not None:
            guard.remember(pin)
        raise
    if guard is not None:
        guard.forget()
    return result.stdout


def sign(config, message, environ, deadline):
    """The 64-byte Ed25519 signature of ``message``, or a SignerError.

    ``deadline`` is a ``pkcs11_tool.Deadline`` (or monotonic seconds).
    """
    if not isinstance(deadline, pkcs11_tool.Deadline):
        deadline = pkcs11_tool.Deadline(deadline)
        try:
            return sign(config, message, environ, deadline)
        finally:
            deadline.release()
    check_message(message)
    env = config.child_environment(environ)
    pin_env = read_pin(config, env)
    module = pkcs11_tool.require_module(config)
    tool_path = pkcs11_tool.require_tool(config, env)
    folder = state_dir(config, env)
    if folder is None:
        signature = _sign_locked(config, message, env, pin_env, tool_path, deadline, None)
    else:
        name = lock_name(module, env)
        lock = acquire_lock(os.path.join(folder, name + ".lock"), deadline)
        deadline.held = lock
        try:
            signature = _sign_locked(config, message, env, pin_env, tool_path, deadline,
                                     PinGuard(folder, name))
        finally:
            deadline.held = None
            os.close(lock)
    if len(signature) != 64:
        raise errors.SigningFailed(f"pkcs11-tool printed {len(signature)} bytes, not a "
                                   "64-byte Ed25519 signature; check --mechanism and the key")
    if config.expect_public_key is not None:
        from lap_pkcs11.per_signature import ed25519

        if not ed25519.is_valid(bytes.fromhex(config.expect_public_key), message, signature):
            raise errors.KeyMismatch(
                "the signature does not verify under the pinned public key "
                f"{config.expect_public_key[:16]}...; the token key is not the one the gateway "
                "trusts (check slot, token and key id, or the pinned key)")
    return signature
