"""The one owner of the PKCS#11 module: it logs in once, signs, verifies and recovers.

``TokenSession`` loads the module through PyKCS11 (which initialises it with
``CKF_OS_LOCKING_OK``, so the module may be called from several threads), logs in
once, opens one PKCS#11 session per worker (they share the login), finds the key
and checks it against the pinned public key with a probe signature. Every
signature is verified against the pinned key (``cryptography``) before it is
returned.

Recovery is an explicit state machine; every edge is logged:

    READY --(session or handle error)--> LOST --> RECOVERING --> READY
                                                      |  ^
                                   (token, key gone)  v  | (backoff)
                                                     GONE
    RECOVERING --(PIN rejected)--> REFUSED (the agent stops, exit 77)
    any --(close)--> CLOSED

A recovery attempt finalises and initialises the module, finds the token, logs
in exactly once, finds the key again and signs a probe that must verify under
the pinned key: a new key under the same id is KEY_MISMATCH, never a signature.
While the state is GONE requests fail at once with the last attempt's error and
the recovery thread tries again with exponential backoff.

PyKCS11 holds the GIL inside every PKCS#11 call (its SWIG module is built
without thread support), so calls into the module never overlap: the worker
sessions give concurrency of requests, not parallel signing. A module call
that hangs stops the whole process; the systemd watchdog restarts it.
"""

import os
import threading
import time

import PyKCS11
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from PyKCS11 import LowLevel

from lap_pkcs11.per_signature import errors
from lap_pkcs11.per_signature.options import TOKEN_CONSTRAINTS
from lap_pkcs11.per_signature.signer import choose_token, one_key
from lap_pkcs11.backends.pkcs11_tool import TokenListing

READY, LOST, RECOVERING, GONE, REFUSED, CLOSED = (
    "ready", "lost", "recovering", "gone", "refused", "closed")
STATES = (READY, LOST, RECOVERING, GONE, REFUSED, CLOSED)

# Errors after which only C_Finalize + C_Initialize + login brings the token back
# (measured on SoftHSM2: a re-initialised or removed token gives these).
SESSION_ERRORS = frozenset(getattr(PyKCS11, name) for name in (
    "CKR_SESSION_HANDLE_INVALID", "CKR_OBJECT_HANDLE_INVALID", "CKR_KEY_HANDLE_INVALID",
    "CKR_GENERAL_ERROR", "CKR_DEVICE_REMOVED", "CKR_DEVICE_ERROR", "CKR_TOKEN_NOT_PRESENT",
    "CKR_USER_NOT_LOGGED_IN", "CKR_SESSION_CLOSED", "CKR_CRYPTOKI_NOT_INITIALIZED"))

BACKOFF_FIRST_SECONDS = 0.1
BACKOFF_MAX_SECONDS = 5.0
SIGNATURE_BYTES = 64
# The probe that proves the private key behind the handle is the pinned key.
PROBE = b"lap-pkcs11 agent: key check "

_PIN_ERRORS = {
    PyKCS11.CKR_PIN_INCORRECT: (errors.PinIncorrect, "the token rejected the PIN; fix the PIN "
                                "(real tokens lock after a few wrong tries)"),
    PyKCS11.CKR_PIN_LEN_RANGE: (errors.PinIncorrect, "the token rejected the PIN's length; "
                                "fix the PIN"),
    PyKCS11.CKR_PIN_LOCKED: (errors.PinLocked, "the user PIN is locked; unlock it with the SO PIN"),
    PyKCS11.CKR_PIN_EXPIRED: (errors.PinLocked, "the user PIN has expired; set a new one"),
}
_SIGN_ERRORS = {
    PyKCS11.CKR_MECHANISM_INVALID: (errors.MechanismUnsupported,
                                    "the token cannot do EDDSA; use a token with Ed25519 support"),
    PyKCS11.CKR_KEY_TYPE_INCONSISTENT: (errors.MechanismUnsupported,
                                        "the key's type does not fit EDDSA; use an Ed25519 key"),
    PyKCS11.CKR_KEY_FUNCTION_NOT_PERMITTED: (errors.MechanismUnsupported,
                                             "the key may not sign (CKA_SIGN is false)"),
    PyKCS11.CKR_DATA_LEN_RANGE: (errors.MessageTooLarge,
                                 "the token refused the message's length"),
}
_ABSENT = frozenset((PyKCS11.CKR_TOKEN_NOT_PRESENT, PyKCS11.CKR_DEVICE_REMOVED,
                     PyKCS11.CKR_TOKEN_NOT_RECOGNIZED, PyKCS11.CKR_SLOT_ID_INVALID))


def ckr_name(err):
    """The CKR_* name of a PyKCS11 error (never anything else from it)."""
    return PyKCS11.CKR.get(err.value, f"0x{err.value & 0xFFFFFFFF:08X}") if err.value >= 0 \
        else "module load failure"


def ed25519_point(value):
    """The 32 key bytes of a CKA_EC_POINT: DER-wrapped (keypairgen) or raw (imports)."""
    data = bytes(value)
    if len(data) == 34 and data[:2] == b"\x04\x20":
        return data[2:]
    if len(data) == 32:
        return data
    raise errors.KeyNotFound("the public key is not an Ed25519 key (CKA_EC_POINT is "
                             f"{len(data)} bytes); select an Ed25519 key")


def mechanism_type(name):
    """CKM_EDDSA for the configured mechanism; the agent signs Ed25519 only."""
    if name in ("EDDSA", "CKM_EDDSA", f"0X{PyKCS11.CKM_EDDSA:X}"):
        return PyKCS11.CKM_EDDSA
    raise errors.ConfigInvalid(f"--mechanism {name}: the agent signs only with EDDSA (Ed25519); "
                               "remove LAP_PKCS11_MECHANISM or set it to EDDSA")


class TokenSession:
    """The PKCS#11 module, its login, one session per worker and the pinned key.

    ``log(priority, text)`` writes one journal line; ``metrics`` counts logins,
    recoveries and the state; ``on_refused(error)`` is called (from the recovery
    thread) when a recovery login was rejected, so the agent stops.
    """

    def __init__(self, config, pin, pinned_key, workers, log, metrics, on_refused):
        self.config = config
        self._pin = pin
        self.pinned_key = pinned_key
        self.pinned_source = "configured" if pinned_key is not None else None
        self.workers = workers
        self.log = log
        self.metrics = metrics
        self.on_refused = on_refused
        self._mechanism = PyKCS11.Mechanism(mechanism_type(config.mechanism))
        self._native_mechanism = self._mechanism.to_native()
        self._lib = None
        self._sessions = []
        self._key = None
        self._verifier = None
        self.slot = None
        self.key_id = None
        self.state = CLOSED
        self.generation = 0
        self.last_error = None
        self.attempts = 0
        self._users = 0
        self._attempting = False
        self._cond = threading.Condition()

    # -- the module ---------------------------------------------------------

    def start(self):
        """Load the module, log in once, find and check the key; raise a typed error."""
        try:
            self._lib = PyKCS11.PyKCS11Lib().load(self.config.module)
        except PyKCS11.PyKCS11Error as err:
            raise errors.ModuleLoadFailed(
                f"the PKCS#11 module {self.config.module} cannot be loaded or initialised "
                f"({ckr_name(err)}); check --module and the module's own configuration "
                "(e.g. SOFTHSM2_CONF)") from None
        self._open()
        with self._cond:
            self._set_state(READY)

    def _open(self):
        """Find the token, open the sessions, log in once, find and check the key."""
        self.slot = self._find_slot()
        lib = self._lib
        try:
            self._sessions = [lib.openSession(self.slot, PyKCS11.CKF_SERIAL_SESSION)
                              for _ in range(self.workers)]
        except PyKCS11.PyKCS11Error as err:
            raise self._classify(err, "opening a session") from None
        self._login(self._sessions[0])
        self._key, self.key_id = self._find_key(self._sessions[0])
        if self.pinned_key is None:
            self.pinned_key = self._read_public_key(self._sessions[0], self.key_id)
            self.pinned_source = "read from the token"
        self._verifier = Ed25519PublicKey.from_public_bytes(self.pinned_key)
        probe = PROBE + os.urandom(16).hex().encode()
        try:
            signature = self._raw_sign(self._sessions[0], self._key, probe)
        except PyKCS11.PyKCS11Error as err:
            raise self._classify(err, "signing the key check") from None
        self._verify(signature, probe, "the key check")

    def _find_slot(self):
        lib, config = self._lib, self.config
        try:
            if any(getattr(config, attr) is not None for attr in TOKEN_CONSTRAINTS):
                return self._match_slot()
            if config.slot is not None or config.slot_index is not None:
                slots = lib.getSlotList(tokenPresent=False)
                if config.slot is not None:
                    if config.slot not in slots:
                        raise errors.TokenNotFound(f"no slot {config.slot}; check --slot "
                                                   "(pkcs11-tool --list-slots)")
                    return config.slot
                if config.slot_index >= len(slots):
                    raise errors.TokenNotFound(f"no slot at index {config.slot_index}; check "
                                               "--slot-index (pkcs11-tool --list-slots)")
                return slots[config.slot_index]
            slots = lib.getSlotList(tokenPresent=True)
            if config.token_label is None:
                if not slots:
                    raise errors.TokenNotFound("the module sees no token; check the token is "
                                               "present and initialised")
                return slots[0]
            for slot in slots:
                if lib.getTokenInfo(slot).label.strip() == config.token_label:
                    return slot
        except PyKCS11.PyKCS11Error as err:
            raise self._classify(err, "listing the slots") from None
        raise errors.TokenNotFound(f"no token labelled {config.token_label!r}; check "
                                   "--token-label (pkcs11-tool --list-token-slots)")

    def _match_slot(self):
        """The one token that matches the URI's serial, manufacturer, model (and label or
        slot id) on a module that matches its library attributes: sign's own rule."""
        lib = self._lib
        info = lib.getInfo()
        library = {"manufacturer": info.manufacturerID.strip(" "),
                   "description": info.libraryDescription.strip(" "),
                   "version": "%d.%d" % tuple(info.libraryVersion)}
        tokens = []
        for slot in lib.getSlotList(tokenPresent=True):
            token = lib.getTokenInfo(slot)
            if token.flags & PyKCS11.CKF_TOKEN_INITIALIZED:
                tokens.append({"slot": slot, "label": token.label.strip(" "),
                               "manufacturer": token.manufacturerID.strip(" "),
                               "model": token.model.strip(" "),
                               "serial": token.serialNumber.strip(" ")})
        return choose_token(self.config, TokenListing(library, tokens, None))

    def _login(self, session):
        """The one C_Login of a start or a recovery attempt."""
        self.metrics.login()
        try:
            session.login(self._pin.reveal())
        except PyKCS11.PyKCS11Error as err:
            if err.value == PyKCS11.CKR_USER_ALREADY_LOGGED_IN:
                return
            if err.value in _PIN_ERRORS:
                cls, advice = _PIN_ERRORS[err.value]
                raise cls(advice) from None
            raise self._classify(err, "logging in") from None

    def _find_key(self, session):
        """The one private key with the configured id and/or label, and its CKA_ID."""
        template = [(PyKCS11.CKA_CLASS, PyKCS11.CKO_PRIVATE_KEY)]
        if self.config.key_id is not None:
            template.append((PyKCS11.CKA_ID, bytes.fromhex(self.config.key_id)))
        if self.config.key_label is not None:
            template.append((PyKCS11.CKA_LABEL, self.config.key_label))
        try:
            keys = session.findObjects(template)
            if len(keys) == 1:
                key_id = bytes(session.getAttributeValue(keys[0], [PyKCS11.CKA_ID],
                                                         allAsBinary=True)[0]).hex()
        except PyKCS11.PyKCS11Error as err:
            raise self._classify(err, "finding the key") from None
        return one_key(keys, self.config), key_id

    def _read_public_key(self, session, key_id):
        """The key's 32 public bytes from its public key object (pinned at start)."""
        try:
            found = session.findObjects([(PyKCS11.CKA_CLASS, PyKCS11.CKO_PUBLIC_KEY),
                                         (PyKCS11.CKA_ID, bytes.fromhex(key_id))])
            points = {ed25519_point(session.getAttributeValue(obj, [PyKCS11.CKA_EC_POINT],
                                                              allAsBinary=True)[0])
                      for obj in found}
        except PyKCS11.PyKCS11Error as err:
            raise self._classify(err, "reading the public key") from None
        if len(points) != 1:
            raise errors.KeyNotFound(
                f"{'no' if not points else 'more than one'} public key with id {key_id} on the "
                "token, so none can be pinned; pin it with --expect-public-key")
        return points.pop()

    def _raw_sign(self, session, key, message):
        """C_SignInit + one single-part C_Sign (any size the module accepts)."""
        lib, handle = self._lib.lib, session.session
        rv = lib.C_SignInit(handle, self._native_mechanism, key)
        if rv != PyKCS11.CKR_OK:
            raise PyKCS11.PyKCS11Error(rv)
        signature = LowLevel.ckbytelist(SIGNATURE_BYTES)
        rv = lib.C_Sign(handle, message, signature)
        if rv != PyKCS11.CKR_OK:
            raise PyKCS11.PyKCS11Error(rv)
        return bytes(signature)

    def _verify(self, signature, message, what="the signature"):
        if len(signature) != SIGNATURE_BYTES:
            raise errors.SigningFailed(f"the token returned {len(signature)} bytes for "
                                       f"{what}, not a 64-byte Ed25519 signature")
        try:
            self._verifier.verify(signature, message)
        except InvalidSignature:
            raise errors.KeyMismatch(
                f"{what} does not verify under the pinned public key "
                f"{self.pinned_key.hex()}; the token holds another key under "
                f"{self.config.key_selection()} (re-initialised or swapped?)") from None

    def _classify(self, err, doing):
        value = err.value
        if value in _PIN_ERRORS:
            cls, advice = _PIN_ERRORS[value]
            return cls(advice)
        if value in _SIGN_ERRORS:
            cls, advice = _SIGN_ERRORS[value]
            return cls(advice)
        if value in _ABSENT or value in SESSION_ERRORS:
            return errors.TokenNotFound(f"the token is not usable ({ckr_name(err)} while "
                                        f"{doing}); check that it is present")
        return errors.SigningFailed(f"{ckr_name(err)} while {doing}")

    # -- signing ------------------------------------------------------------

    def sign(self, worker, message, deadline):
        """A signature over ``message`` verified against the pinned key, or a typed error.

        On a session or handle error the token is recovered (by the recovery
        thread) and the request is retried once, within ``deadline``.
        """
        retried = False
        while True:
            generation, session, key = self._enter(deadline)
            try:
                signature = self._raw_sign(session, key, message)
            except PyKCS11.PyKCS11Error as err:
                self._leave()
                if err.value not in SESSION_ERRORS:
                    raise self._classify(err, "signing") from None
                self.lost(generation, ckr_name(err))
                if retried:
                    raise errors.TokenNotFound(f"the token was lost again ({ckr_name(err)}) "
                                               "right after a recovery") from None
                retried = True
                continue
            self._leave()
            try:
                self._verify(signature, message)
            except errors.KeyMismatch:
                self.lost(generation, "a signature that does not verify")
                raise
            return signature

    def _enter(self, deadline):
        with self._cond:
            while True:
                if self.state == READY:
                    if time.monotonic() >= deadline:
                        raise errors.Timeout("the request's deadline passed before a signature "
                                             "could start; raise the client's timeout")
                    self._users += 1
                    return self.generation, self._sessions[self._worker_index()], self._key
                if self.state == GONE:
                    raise type(self.last_error)(self.last_error.message)
                if self.state == REFUSED:
                    raise type(self.last_error)(self.last_error.message)
                if self.state == CLOSED:
                    raise errors.SignerUnavailable("the agent is stopping")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise errors.Timeout("the token is being recovered and did not come back "
                                         "before the request's deadline")
                self._cond.wait(remaining)

    def _worker_index(self):
        return getattr(_worker, "index", 0) % len(self._sessions)

    def _leave(self):
        with self._cond:
            self._users -= 1
            if self._users == 0:
                self._cond.notify_all()

    def lost(self, generation, why):
        """Mark the token lost (once per generation) and wake the recovery thread."""
        with self._cond:
            if self.state != READY or self.generation != generation:
                return
            self.log(3, f"token lost ({why}); recovering: finalise, initialise, log in once, "
                        "check the key")
            self._set_state(LOST)

    # -- recovery -----------------------------------------------------------

    def recover_forever(self):
        """The recovery thread: wait for LOST, then attempt with backoff until READY or stop."""
        delay = BACKOFF_FIRST_SECONDS
        with self._cond:
            while True:
                while self.state not in (LOST, GONE, CLOSED):
                    self._cond.wait()
                if self.state == CLOSED:
                    return
                if self.state == GONE:
                    end = time.monotonic() + delay
                    while self.state == GONE and (left := end - time.monotonic()) > 0:
                        self._cond.wait(left)
                    if self.state != GONE:
                        continue
                    delay = min(delay * 2, BACKOFF_MAX_SECONDS)
                self._set_state(RECOVERING)
                while self._users:
                    self._cond.wait()
                self.attempts += 1
                self._attempting = True
                self._cond.release()
                try:
                    failure = None
                    self._reinitialise()
                    self._open()
                except errors.SignerError as err:
                    failure = err
                finally:
                    self._cond.acquire()
                    self._attempting = False
                if self.state == CLOSED:
                    self._finalize()
                    return
                self._after_attempt(failure)
                if failure is None:
                    delay = BACKOFF_FIRST_SECONDS

    def _reinitialise(self):
        lib = self._lib.lib
        self._sessions, self._key = [], None
        lib.C_Finalize()  # Its result does not matter: the module may be half gone.
        rv = lib.C_Initialize()
        if rv != PyKCS11.CKR_OK:
            raise errors.ModuleLoadFailed(f"the module did not initialise again "
                                          f"({PyKCS11.CKR.get(rv, rv)})")

    def _after_attempt(self, failure):
        if failure is None:
            self.metrics.recovery("ok")
            self.log(5, f"token recovered after {self.attempts} attempt(s): logged in once, "
                        f"key {self.key_id} is still the pinned key {self.pinned_key.hex()}")
            self.attempts = 0
            self.generation += 1
            self._set_state(READY)
            return
        self.metrics.recovery("failed")
        self.last_error = failure
        if isinstance(failure, (errors.PinIncorrect, errors.PinLocked)):
            self.log(2, f"recovery stopped: {failure.line()}; the PIN is never tried again")
            self._set_state(REFUSED)
            self.on_refused(failure)
            return
        if self.attempts == 1 or self.attempts & (self.attempts - 1) == 0:
            self.log(3, f"recovery attempt {self.attempts} failed: {failure.line()}; "
                        "requests fail at once until the token is back; trying again "
                        f"with backoff (at most every {BACKOFF_MAX_SECONDS:g} s)")
        self._set_state(GONE)

    def _set_state(self, state):
        self.state = state
        self.metrics.state = state
        self._cond.notify_all()

    def close(self):
        """Stop recovering; finalise the module when no call is in it.

        A worker still inside the module (a hung call) or a recovery attempt in
        progress keeps it: the attempt finalises when it ends, and a hung call
        is left to the process's exit.
        """
        with self._cond:
            self._set_state(CLOSED)
            if self._users == 0 and not self._attempting:
                self._finalize()

    def _finalize(self):
        if self._lib is not None:
            self._sessions, self._key = [], None
            self._lib.lib.C_Finalize()
            self._lib = None


_worker = threading.local()


def bind_worker(index):
    """Tie the calling thread to PKCS#11 session ``index`` (one per worker)."""
    _worker.index = index
