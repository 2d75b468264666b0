"""Token inspection for the administrative commands: objects, keys, slots, mechanisms.

Everything here runs pkcs11-tool through ``lap_pkcs11.backends.pkcs11_tool.run``
(the one place that starts it) and parses its listings with pure functions. Not on the
per-signature path.
"""

import os
import time

from lap_pkcs11.backends import pkcs11_tool
from lap_pkcs11.per_signature import errors, signer, uri
from lap_pkcs11.backends.pkcs11_tool import parse_objects

# Administrative calls may wait on slow tokens longer than a signature may.
ADMIN_DEADLINE_SECONDS = 30.0


def parse_slots(listing):
    """(slot id as 0x hex, token label) of every initialised token in ``--list-token-slots``."""
    return [(f"0x{token['slot']:x}", token["label"])
            for token in pkcs11_tool.read_token_listing(listing).tokens]


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
        self.tool = pkcs11_tool.require_tool(config, self.env)
        self.pin_env = None
        self._selected = None

    @property
    def selected(self):
        """The configuration with the token a URI narrows (serial=, ...) chosen by slot id."""
        if self._selected is None:
            self._selected = signer.resolve_token(
                self.config, self.tool, self.env, time.monotonic() + ADMIN_DEADLINE_SECONDS)
        return self._selected

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
        result = pkcs11_tool.run(argv, self.env, deadline)
        if result.status != 0:
            raise pkcs11_tool.classify(result)
        return result.stdout.decode("utf-8", "replace")

    def check_module(self):
        pkcs11_tool.require_module(self.config)
        return self.run(pkcs11_tool.module_argv(self.tool, self.config, "--show-info"))

    def tokens(self):
        return parse_slots(self.run(pkcs11_tool.module_argv(self.tool, self.config,
                                                            "--list-token-slots")))

    def token(self):
        """The selected token's slot, label, manufacturer, model and serial (a dict)."""
        config = self.selected
        deadline = time.monotonic() + ADMIN_DEADLINE_SECONDS
        result = pkcs11_tool.run(pkcs11_tool.token_listing_argv(self.tool, config, selected=True),
                                 self.env, deadline)
        if result.status != 0:
            raise pkcs11_tool.classify(result)
        listing = pkcs11_tool.read_token_listing(result.stdout.decode("utf-8", "replace"),
                                                 result.stderr)
        if config.token_label is not None:
            found = [entry for entry in listing.tokens if entry["label"] == config.token_label]
        else:
            slot = config.slot if config.slot is not None else listing.used
            found = [entry for entry in listing.tokens if entry["slot"] == slot]
        if not found:
            raise errors.TokenNotFound("the selected token is not among the module's tokens; "
                                       "check the token selector (pkcs11-tool --list-token-slots)")
        token = dict(found[0])
        token["uri"] = uri.build({attr: token.get(field) or None for attr, field in (
            ("token_label", "label"), ("token_manufacturer", "manufacturer"),
            ("token_model", "model"), ("token_serial", "serial"))})
        return token

    def objects(self, kind, login):
        pin_env = self.login() if login else None
        return parse_objects(self.run(pkcs11_tool.list_objects_argv(self.tool, self.selected,
                                                                    kind, pin_env)))

    def mechanisms(self):
        return parse_mechanisms(self.run(pkcs11_tool.list_mechanisms_argv(self.tool,
                                                                          self.selected)))

    def matches(self, obj):
        return ((self.config.key_id is None or obj.id == self.config.key_id)
                and (self.config.key_label is None or obj.label == self.config.key_label))

    def private_key(self):
        return signer.one_key([obj for obj in self.objects("privkey", login=True)
                               if self.matches(obj)], self.config)

    def _public_objects(self):
        found = [obj for obj in self.objects("pubkey", login=False) if self.matches(obj)]
        if not found and self.has_pin():
            found = [obj for obj in self.objects("pubkey", login=True) if self.matches(obj)]
        if not found:
            signer.one_key(found, self.config, "public key")  # KEY_NOT_FOUND
        return found

    def key_uri(self):
        """The selected key's PKCS#11 URI: its token's label, its id and label, type=private."""
        named = {(obj.id, obj.label) for obj in self._public_objects()}
        if len(named) > 1 or None in {key_id for key_id, _ in named}:
            raise errors.KeyNotFound(f"the keys with {self.config.key_selection()} do not share "
                                     "one id and label, so no URI names one of them; select it "
                                     "by id")
        key_id, label = named.pop()
        return uri.key_uri(self.token()["label"], key_id, label)

    def ed25519_keys(self):
        """Every Ed25519 private key on the token (logged in), with its public key, URI and
        protection, as dicts in the token's order."""
        token_label = self.token()["label"]
        publics = [obj for obj in self.objects("pubkey", login=True) if obj.kind == "public key"]
        listed = []
        for key in self.objects("privkey", login=True):
            if key.kind != "private key" or key.key_type != "EC_EDWARDS":
                continue
            try:
                points = {obj.public_key() for obj in publics
                          if key.id is not None and obj.id == key.id}
            except errors.MechanismUnsupported:
                continue  # its public half is on another Edwards curve (Ed448)
            listed.append({
                "id": key.id, "label": key.label,
                "uri": uri.key_uri(token_label, key.id, key.label) if key.id else None,
                "public_key_hex": points.pop().hex() if len(points) == 1 else None,
                **{flag.replace(" ", "_"): flag in key.access
                   for flag in ("sensitive", "always sensitive", "extractable",
                                "never extractable", "local")}})
        return listed

    def public_key(self):
        """The selected key's 32 public key bytes, read without a PIN when the token allows."""
        found = self._public_objects()
        keys = {obj.public_key() for obj in found}
        if len(keys) > 1:
            raise errors.KeyNotFound("several different public keys have "
                                     f"{self.config.key_selection()}; give each key its own id")
        return keys.pop()

    def generate(self, key_id, label):
        """Make a new Ed25519 key pair; refuse, changing nothing, unless the id and label
        are provably free."""
        listed, strays = [], []
        for kind in ("privkey", "pubkey"):
            objects, unread = pkcs11_tool.read_listing(self.run(pkcs11_tool.list_objects_argv(
                self.tool, self.selected, kind, self.login())))
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
        self.run(pkcs11_tool.keygen_argv(self.tool, self.selected, self.login(), key_id, label))


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
