"""Token inspection for the administrative commands: objects, keys, slots, mechanisms.

Everything here runs pkcs11-tool through ``lap_pkcs11.tool.run`` (the one place
that starts it) and parses its listings with pure functions. Not on the
per-signature path.
"""

import os
import time

from lap_pkcs11 import errors, signer, tool
from lap_pkcs11.tool import parse_objects

# Administrative calls may wait on slow tokens longer than a signature may.
ADMIN_DEADLINE_SECONDS = 30.0


def parse_slots(listing):
    """(slot id, token label) of every slot with a token in ``--list-token-slots``."""
    slots, slot = [], None
    for line in listing.splitlines():
        if line.startswith("Slot "):
            slot = line.split("(", 1)[1].split(")", 1)[0] if "(" in line else line.split()[1]
        elif slot is not None and line.strip().startswith("token label"):
            slots.append((slot, line.split(":", 1)[1].strip()))
    return slots


def parse_mechanisms(listing):
    """Mechanism names of a ``--list-mechanisms`` listing."""
    return [line.strip().split(",")[0].split()[0] for line in listing.splitlines()
            if line.startswith("  ") and line.strip()]


class Session:
    """The resolved tool, environment and deadline for administrative calls."""

    def __init__(self, config, environ=None):
        self.config = config
        self.environ = dict(os.environ) if environ is None else environ
        self.env = config.child_environment(self.environ)
        self.tool = tool.require_tool(config, self.env)
        self.pin_env = None

    def login(self):
        """Read the PIN (as sign does); return the variable that carries it."""
        if self.pin_env is None:
            self.pin_env = signer.read_pin(self.config, self.env)
        return self.pin_env

    def has_pin(self):
        try:
            self.login()
        except errors.SignerError:
            return False
        return True

    def run(self, argv):
        """Run pkcs11-tool; its output on success, its typed error on failure."""
        deadline = time.monotonic() + ADMIN_DEADLINE_SECONDS
        result = tool.run(argv, self.env, deadline)
        if result.status != 0:
            raise tool.classify(result)
        return result.stdout.decode("utf-8", "replace")

    def check_module(self):
        tool.require_module(self.config)
        return self.run(tool.module_argv(self.tool, self.config, "--show-info"))

    def tokens(self):
        return parse_slots(self.run(tool.module_argv(self.tool, self.config, "--list-token-slots")))

    def objects(self, kind, login):
        pin_env = self.login() if login else None
        return parse_objects(self.run(tool.list_objects_argv(self.tool, self.config, kind,
                                                             pin_env)))

    def mechanisms(self):
        return parse_mechanisms(self.run(tool.list_mechanisms_argv(self.tool, self.config)))

    def matches(self, obj):
        if self.config.key_id is not None:
            return obj.id == self.config.key_id
        return obj.label == self.config.key_label

    def selection(self):
        if self.config.key_id is not None:
            return f"id {self.config.key_id}"
        return f"label {self.config.key_label!r}"

    def private_key(self):
        keys = [obj for obj in self.objects("privkey", login=True) if self.matches(obj)]
        if not keys:
            raise errors.KeyNotFound(f"no private key with {self.selection()} on the token; "
                                     "check --key-id or --key-label")
        if len(keys) > 1:
            raise errors.KeyNotFound(f"{len(keys)} private keys have {self.selection()}; "
                                     "give each key its own id and label")
        return keys[0]

    def public_key(self):
        """The selected key's 32 public key bytes, read without a PIN when the token allows."""
        found = [obj for obj in self.objects("pubkey", login=False) if self.matches(obj)]
        if not found and self.has_pin():
            found = [obj for obj in self.objects("pubkey", login=True) if self.matches(obj)]
        if not found:
            raise errors.KeyNotFound(f"no public key with {self.selection()} on the token; "
                                     "check --key-id or --key-label")
        keys = {obj.public_key() for obj in found}
        if len(keys) > 1:
            raise errors.KeyNotFound(f"several different public keys have {self.selection()}; "
                                     "give each key its own id")
        return keys.pop()

    def generate(self, key_id, label):
        """Make a new Ed25519 key pair; refuse, changing nothing, unless the id and label
        are provably free."""
        listed, strays = [], []
        for kind in ("privkey", "pubkey"):
            objects, unread = tool.read_listing(self.run(tool.list_objects_argv(
                self.tool, self.config, kind, self.login())))
            listed += objects
            strays += unread
        doubt = listing_doubt(listed, strays)
        if doubt:
            raise errors.KeyExists(f"cannot prove that id {key_id} and label {label!r} are free: "
                                   f"{doubt}; nothing was changed; check the token with "
                                   "pkcs11-tool --list-objects or use another pkcs11-tool")
        taken = [obj for obj in listed if obj.id == key_id or obj.label == label]
        if taken:
            raise errors.KeyExists(f"the token already holds a key with id {key_id} or label "
                                   f"{label!r}; nothing was changed; pick a new id and label")
        self.run(tool.keygen_argv(self.tool, self.config, self.login(), key_id, label))


# Every field pkcs11-tool 0.23 to 0.27 prints for a key object.
KNOWN_KEY_FIELDS = frozenset((
    "label", "ID", "Usage", "Access", "uri", "Unique ID", "Allowed mechanisms",
    "EC_POINT", "EC_PARAMS", "EC Point", "EC Params", "Modulus", "Public exp",
    "Params OID", "PARAMS OID", "Value", "VALUE"))


# Chatter some builds print before a listing.
HARMLESS_STRAYS = ("Using slot", "Logging in to")


def listing_doubt(objects, strays=()):
    """Why a listing cannot prove which ids and labels its keys have, or None."""
    for line in strays:
        if not line.startswith(HARMLESS_STRAYS):
            return f"pkcs11-tool printed a line lap-pkcs11 cannot read ({line[:60]!r})"
    for obj in objects:
        if not obj.is_key:
            continue
        unknown = [name for name in obj.fields if name not in KNOWN_KEY_FIELDS]
        if unknown:
            return (f"a {obj.kind} shows a field lap-pkcs11 does not know "
                    f"({unknown[0][:40]!r})")
        if obj.id_text is None:
            return f"a {obj.kind} (label {obj.label!r}) shows no ID"
        if obj.id is None:
            return f"a {obj.kind} shows an ID lap-pkcs11 cannot read ({obj.id_text[:60]!r})"
    return None
