"""PKCS#11 URIs (RFC 7512): read one into the signer's options, and write a key's URI.

``parse`` reads the RFC's grammar strictly (section 2.3): the ``pkcs11:`` scheme,
path attributes separated by ``;``, an optional query after ``?`` with
attributes separated by ``&``, every value made of the characters the grammar
allows for its component or of ``%HH`` escapes, no attribute twice, no
whitespace, no fragment. ``options`` maps the attributes lap-pkcs11 can honour
to the raw text of its options (the option parsers then check them as they check
a flag) and refuses every other one, naming it: an attribute that was ignored
could select another token or key than the one the URI names.

This module is on the per-signature path when a URI is given (and only then: the
resolver imports it lazily): it imports nothing.
"""

SCHEME = "pkcs11:"
MAX_LENGTH = 4096

_ALPHA = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_DIGITS = "0123456789"
_HEX = frozenset("0123456789abcdefABCDEF")
_UNRESERVED = frozenset(_ALPHA + _DIGITS + "-._~")
# pk11-res-avail: reserved characters that delimit nothing inside a value.
_RES_AVAIL = frozenset(":[]@!$'()*+,=")
PATH_CHARS = _UNRESERVED | _RES_AVAIL | {"&"}            # pk11-pchar, without pct-encoded
QUERY_CHARS = _UNRESERVED | _RES_AVAIL | {"/", "?", "|"}  # pk11-qchar, without pct-encoded
_NAME_CHARS = frozenset(_ALPHA + _DIGITS + "-_")          # pk11-v-attr-nm-char

# RFC 7512's attributes and the option each fills (None: refused, with the reason).
PATH_ATTRIBUTES = {
    "token": "token_label", "manufacturer": "token_manufacturer", "serial": "token_serial",
    "model": "token_model", "library-manufacturer": "library_manufacturer",
    "library-description": "library_description", "library-version": "library_version",
    "object": "key_label", "type": None, "id": "key_id", "slot-id": "slot",
    "slot-description": None, "slot-manufacturer": None,
}
QUERY_ATTRIBUTES = {"module-path": "module", "pin-source": None, "pin-value": None,
                    "module-name": None}
# The URI attribute behind each option it can fill (pin-source fills two).
ATTRIBUTE_OF = {attr: name for name, attr in {**PATH_ATTRIBUTES, **QUERY_ATTRIBUTES}.items()
                if attr}
ATTRIBUTE_OF.update(pin_env="pin-source", pin_file="pin-source")
TYPES = ("public", "private", "cert", "secret-key", "data")
_REFUSED = {
    "pin-value": "a PIN must not sit in a command line or an environment listing; use "
                 "pin-source=file:PATH or pin-source=env:NAME",
    "module-name": "it needs p11-kit's module registry, which lap-pkcs11 does not read; give "
                   "module-path=",
    "slot-description": "pkcs11-tool cannot select by it; select the token with token=, "
                        "serial= or slot-id=",
    "slot-manufacturer": "pkcs11-tool cannot select by it; select the token with token=, "
                         "serial= or slot-id=",
}
_TEXT = ("token", "manufacturer", "serial", "model", "library-manufacturer",
         "library-description", "object", "module-path")


class Attribute:
    """One ``name=value`` of a URI: its component (path or query), raw and decoded value."""

    __slots__ = ("component", "name", "raw", "value")

    def __init__(self, component, name, raw, value):
        self.component = component
        self.name = name
        self.raw = raw
        self.value = value

    def __repr__(self):
        return f"Attribute({self.component!r}, {self.name!r}, {self.raw!r})"


def _decode(raw, allowed, name):
    """The bytes of a value: allowed characters as they are, %HH as the byte HH."""
    out = bytearray()
    i = 0
    while i < len(raw):
        c = raw[i]
        if c == "%":
            pair = raw[i + 1:i + 3]
            if len(pair) != 2 or not _HEX.issuperset(pair):
                raise ValueError(f"has a % in {name}= that is not followed by two hex digits; "
                                 "write a literal % as %25")
            out.append(int(pair, 16))
            i += 3
            continue
        if c not in allowed:
            shown = (f"the character {c}" if " " < c < "\x7f"
                     else "a space, control or non-ASCII character")
            raise ValueError(f"has {shown} in {name}=, which a PKCS#11 URI must percent-encode")
        out.append(ord(c))
        i += 1
    return bytes(out)


def _attributes(text, separator, allowed, component):
    found = []
    for item in text.split(separator):
        name, eq, raw = item.partition("=")
        if not eq or not name or not _NAME_CHARS.issuperset(name):
            raise ValueError(f"has an attribute in its {component} that is not name=value "
                             f"(attributes are separated by {separator})")
        found.append(Attribute(component, name, raw, _decode(raw, allowed, name)))
    return found


def parse(text):
    """The attributes of a PKCS#11 URI, in order; ValueError says what is wrong."""
    if len(text) > MAX_LENGTH:
        raise ValueError(f"is longer than {MAX_LENGTH} characters")
    # ASCII only: str.lower() would take the Kelvin sign (U+212A) for "k".
    if not text[:len(SCHEME)].isascii() or text[:len(SCHEME)].lower() != SCHEME:
        raise ValueError("is not a PKCS#11 URI: it must start with pkcs11:")
    if "#" in text:
        raise ValueError("has a # (a fragment), which a PKCS#11 URI does not have; "
                         "write a # in a value as %23")
    path, question, query = text[len(SCHEME):].partition("?")
    found = _attributes(path, ";", PATH_CHARS, "path") if path else []
    if query:
        found += _attributes(query, "&", QUERY_CHARS, "query")
    seen = set()
    for attribute in found:
        if attribute.name in seen:
            raise ValueError(f"gives {attribute.name}= twice; keep one")
        seen.add(attribute.name)
    return found


def _text(attribute):
    """A text value: UTF-8 (strict), no control characters, not empty."""
    name = attribute.name
    try:
        value = attribute.value.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"has a {name}= that is not UTF-8 once percent-decoded") from None
    if any(ord(c) < 0x20 or 0x7f <= ord(c) <= 0x9f for c in value):
        raise ValueError(f"has a control character in {name}=")
    if not value:
        raise ValueError(f"gives {name}= no value; remove it or give one")
    return value


def _pin_source(attribute):
    """pin-source: file:/PATH (file:///PATH) or, as an extension, env:NAME."""
    source = _text(attribute)
    if source.startswith("env:"):
        return {"pin_env": source[4:]}
    if source.startswith("file:"):
        path = source[5:]
        if path.startswith("//"):
            authority, slash, rest = path[2:].partition("/")
            if authority:
                raise ValueError("has a pin-source= on another host; give file:/PATH")
            path = slash + rest
        if path.startswith("/"):
            return {"pin_file": path}
        raise ValueError("has a pin-source=file: that is not an absolute path; give "
                         "file:/PATH")
    raise ValueError("has a pin-source= that lap-pkcs11 cannot read; give file:/PATH or "
                     "env:NAME")


def options(text):
    """The raw text of the options ``text`` fills, {attr: text}; ValueError otherwise.

    The values are checked further by the options' own parsers, as a flag is.
    """
    filled = {}
    for attribute in parse(text):
        name, component = attribute.name, attribute.component
        own = PATH_ATTRIBUTES if component == "path" else QUERY_ATTRIBUTES
        other = QUERY_ATTRIBUTES if component == "path" else PATH_ATTRIBUTES
        if name not in own:
            if name in other:
                where = "query (after ?)" if component == "path" else "path (before ?)"
                raise ValueError(f"has {name}= in its {component}; it belongs in the {where}")
            raise ValueError(f"has the attribute {name}=, which lap-pkcs11 does not know; "
                             "it refuses what it cannot honour, remove it")
        if name in _REFUSED:
            raise ValueError(f"has {name}=, which lap-pkcs11 refuses: {_REFUSED[name]}")
        if name == "type":
            if attribute.raw not in TYPES:
                raise ValueError("has a type= that RFC 7512 does not define")
            if attribute.raw != "private":
                raise ValueError(f"has type={attribute.raw}; lap-pkcs11 signs with a private "
                                 "key: give type=private or leave type= out")
            continue
        if name == "id":
            if not attribute.value:
                raise ValueError("gives id= no value; remove it or give one")
            filled["key_id"] = attribute.value.hex()
        elif name == "slot-id":
            if not attribute.raw or not all(c in _DIGITS for c in attribute.raw):
                raise ValueError("has a slot-id= that is not a decimal number")
            filled["slot"] = attribute.raw
        elif name == "library-version":
            major, dot, minor = attribute.raw.partition(".")
            if not major or not all(c in _DIGITS for c in major + minor) or (dot and not minor):
                raise ValueError("has a library-version= that is not MAJOR or MAJOR.MINOR")
            filled["library_version"] = attribute.raw
        elif name == "pin-source":
            filled.update(_pin_source(attribute))
        else:
            filled[own[name]] = _text(attribute)
    return filled


def encode(value, plain):
    """``value`` (text or bytes) percent-encoded, leaving the characters in ``plain``."""
    data = value.encode("utf-8", "surrogateescape") if isinstance(value, str) else value
    return "".join(chr(byte) if chr(byte) in plain else f"%{byte:02X}" for byte in data)


# What lap-pkcs11 writes unencoded: letters, digits, -._~ and :@, (and / in the query);
# everything a shell, an env file or a form decoder might read differently is encoded.
_WRITE_PATH = frozenset(_UNRESERVED | set(":@,"))
_WRITE_QUERY = _WRITE_PATH | {"/"}
# Path attributes in the order lap-pkcs11 writes them, with the option behind each.
_ORDER = (("token", "token_label"), ("manufacturer", "token_manufacturer"),
          ("model", "token_model"), ("serial", "token_serial"),
          ("library-manufacturer", "library_manufacturer"),
          ("library-description", "library_description"),
          ("library-version", "library_version"), ("slot-id", "slot"), ("id", "key_id"),
          ("object", "key_label"))


def build(values, query=()):
    """A URI from option values ({attr: value}, None for unset) and query pairs.

    ``id`` is written fully percent-encoded, as p11tool and OpenSC write it;
    ``type=private`` ends the path whenever a key is named.
    """
    path = []
    for name, attr in _ORDER:
        value = values.get(attr)
        if value is None:
            continue
        if attr == "key_id":
            path.append("id=" + "".join(f"%{b:02X}" for b in bytes.fromhex(value)))
        elif attr in ("slot", "library_version"):
            path.append(f"{name}={value}")
        else:
            path.append(f"{name}={encode(value, _WRITE_PATH)}")
    if values.get("key_id") is not None or values.get("key_label") is not None:
        path.append("type=private")
    text = SCHEME + ";".join(path)
    pairs = [f"{name}={encode(value, _WRITE_QUERY)}" for name, value in query]
    return text + ("?" + "&".join(pairs) if pairs else "")


def file_source(path):
    """pin-source for a PIN file: file:/PATH (file:///PATH for a path that starts with //)."""
    return ("file://" if path.startswith("//") else "file:") + path


def key_uri(token_label, key_id, key_label):
    """The URI that names one key as its neighbours write it: token, id, object, type."""
    return build({"token_label": token_label, "key_id": key_id, "key_label": key_label})


def config_uri(config):
    """The configuration's token, key, module and PIN source as one URI.

    What cannot be written as a URI attribute (a slot index, the PIN variable's
    default name) is left out; a PIN source is written only when one was chosen.
    """
    values = {attr: getattr(config, attr, None) for _, attr in _ORDER}
    query = [("module-path", config.module)] if config.module else []
    if config.pin_file is not None:
        from os.path import abspath

        query.append(("pin-source", file_source(abspath(config.pin_file))))
    elif config.sources.get("pin_env", "default") != "default":
        query.append(("pin-source", "env:" + config.pin_env))
    return build(values, query)
