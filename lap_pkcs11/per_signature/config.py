"""Resolve the signer's configuration from flags, environment, env file and defaults.

This is the stdlib resolver used by the per-signature ``sign`` command; the
administrative commands resolve the same ``OPTIONS`` through pydantic-settings
(``lap_pkcs11.admin.settings``), and a test checks that both agree.

Precedence, per option: command-line flag, then the real environment (each of
the option's variables in order), then the env file (same variables, same
order), then the default. An empty environment value counts as unset. A PKCS#11
URI (``--uri``, itself resolved so) fills the options its attributes name; the
same option set any other way to another value is an error, never a silent choice.

This module is on the per-signature path: it imports only what Python has built in.
"""

from lap_pkcs11.per_signature.errors import ConfigInvalid
from lap_pkcs11.per_signature.options import BY_ATTR, BY_FLAG, OPTIONS, TOKEN_CONSTRAINTS

# Variables that make OpenSC or its spy module log PIN-bearing traffic: they never
# reach pkcs11-tool, whatever the gateway's environment holds.
SCRUBBED_ENV = ("OPENSC_DEBUG", "PKCS11SPY", "PKCS11SPY_OUTPUT")

# Time kept back from the caller's deadline (SIGNER_TIMEOUT_SECONDS) for start-up,
# killing and reaping, so that the gateway reads TIMEOUT instead of killing us.
CALLER_MARGIN_MS = 250
MIN_DEADLINE_MS = 50


class Config:
    """A resolved configuration: one attribute per option, plus where each came from."""

    def __init__(self, values, sources, env_file, file_env):
        self.__dict__.update(values)
        self.sources = sources
        self.env_file = env_file
        self.file_env = file_env

    def values(self):
        """The option values as a plain dict, in OPTIONS order."""
        return {option.attr: getattr(self, option.attr) for option in OPTIONS}

    def key_selection(self):
        """How the key is selected, as error lines say it: "id 01 and label 'k'"."""
        parts = []
        if self.key_id is not None:
            parts.append(f"id {self.key_id}")
        if self.key_label is not None:
            parts.append(f"label {self.key_label!r}")
        return " and ".join(parts)

    def deadline_ms(self):
        """The effective deadline: our own, capped by the caller's less a margin."""
        deadline = self.timeout_ms
        if self.caller_timeout_ms is not None:
            caller_ms = self.caller_timeout_ms - CALLER_MARGIN_MS
            if caller_ms < MIN_DEADLINE_MS:
                raise ConfigInvalid(
                    f"{self.sources['caller_timeout_ms'].split(':', 1)[-1]} leaves less than "
                    f"{MIN_DEADLINE_MS} ms after the "
                    f"{CALLER_MARGIN_MS} ms start-up margin; give the gateway's signer a longer "
                    "timeout")
            deadline = min(deadline, caller_ms)
        return deadline

    def child_environment(self, environ):
        """pkcs11-tool's environment: env file variables under the real environment."""
        env = dict(self.file_env)
        env.update(environ)
        for name in SCRUBBED_ENV:
            env.pop(name, None)
        return env


def _describe(option, source):
    """How to name an option in an error: its flag, or the variable or URI attribute that set it."""
    if source.startswith("uri:"):
        from lap_pkcs11.per_signature.uri import ATTRIBUTE_OF

        return f"the URI's {ATTRIBUTE_OF[option.attr]}= ({_describe(BY_ATTR['uri'], source[4:])})"
    if ":" not in source:
        return option.flag or option.envs[0]
    where = "env file" if source.startswith("file:") else "environment"
    return f"{source.split(':', 1)[1]} (from the {where})"


def env_file_path(flag_value, environ):
    """The env file to read: the flag's, LAP_PKCS11_ENV_FILE's, or None.

    There is no implicit file in the working directory: the gateway's working
    directory is no place for the signer's configuration, and a file there may
    belong to anyone who can write to it.
    """
    if flag_value is not None:
        return flag_value
    return environ.get("LAP_PKCS11_ENV_FILE") or None


def env_file_source(flags, environ, path):
    """Where the env file's path came from."""
    if path is None:
        return "unset"
    if "env_file" in flags:
        return "flag"
    return "env:LAP_PKCS11_ENV_FILE"


def raw_layers(flags, environ):
    """Pick each option's raw text and source by precedence, before parsing."""
    path = env_file_path(flags.get("env_file"), environ)
    file_env = {}
    if path is not None:
        # Only when there is a file: sign runs per signature.
        from lap_pkcs11.per_signature import envfile

        file_env = envfile.load(path)
    raw = {}
    for option in OPTIONS:
        if option.attr == "env_file":
            raw[option.attr] = (path, env_file_source(flags, environ, path))
            continue
        if option.attr in flags:
            raw[option.attr] = (flags[option.attr], "flag")
            continue
        found = next((("env:" + name, environ[name]) for name in option.envs if environ.get(name)), None)
        if found is None:
            found = next((("file:" + name, file_env[name]) for name in option.envs
                          if file_env.get(name)), None)
        if found is not None:
            raw[option.attr] = (found[1], found[0])
        elif option.default is not None:
            raw[option.attr] = (option.default, "default")
        else:
            raw[option.attr] = (None, "unset")
    return raw, path, file_env


def parse_value(option, text, source):
    """Parse one option's raw text; a bad value is ConfigInvalid naming where it came from."""
    if text is None or option.attr == "env_file":
        return text
    try:
        return option.parse(text)
    except ValueError as err:
        raise ConfigInvalid(f"{_describe(option, source)} {err}") from None


def apply_uri(raw):
    """Fill the options a PKCS#11 URI names (``raw``: attr -> (text, source), changed in place).

    The URI is read only when one is given, so that ``sign`` without one pays nothing
    for it. An option the URI fills that is set any other way (flag, environment, env
    file) to a value that differs once parsed is CONFIG_INVALID.
    """
    text, source = raw["uri"]
    if text is None:
        return
    from lap_pkcs11.per_signature import uri

    try:
        filled = uri.options(text)
    except ValueError as err:
        raise ConfigInvalid(f"{_describe(BY_ATTR['uri'], source)} {err}") from None
    for attr, value in filled.items():
        option = BY_ATTR[attr]
        mine = "uri:" + source
        other_text, other_source = raw[attr]
        if other_source not in ("unset", "default") and parse_value(
                option, value, mine) != parse_value(option, other_text, other_source):
            raise ConfigInvalid(f"{_describe(option, other_source)} and "
                                f"{_describe(option, mine)} differ; keep one")
        raw[attr] = (value, mine)


def check(values, sources=None, require_key=True):
    """Cross-option rules shared by every resolver."""
    sources = sources or {}

    def name(attr):
        return _describe(BY_ATTR[attr], sources.get(attr, "flag"))

    if not values["module"]:
        raise ConfigInvalid("no PKCS#11 module: give --module PATH or set LAP_PKCS11_MODULE")
    selectors = [name(attr) for attr in ("slot", "slot_index", "token_label")
                 if values[attr] is not None]
    if len(selectors) > 1:
        raise ConfigInvalid(f"{' and '.join(selectors)} both select a token; keep only one")
    constraints = [attr for attr in TOKEN_CONSTRAINTS if values[attr] is not None]
    if constraints and values["slot_index"] is not None:
        raise ConfigInvalid(f"{name('slot_index')} cannot be combined with "
                            f"{name(constraints[0])}; select the token by label or slot id")
    if require_key and values["key_id"] is None and values["key_label"] is None:
        raise ConfigInvalid("neither --key-id nor --key-label given; give one (or both: the "
                            "key must then carry both)")


def finish(raw, path, file_env, require_key=True):
    """Parse the picked raw texts (after the URI's) and check them together: the Config."""
    apply_uri(raw)
    values, sources = {}, {}
    for option in OPTIONS:
        text, source = raw[option.attr]
        values[option.attr] = parse_value(option, text, source)
        sources[option.attr] = source
    check(values, sources, require_key)
    return Config(values, sources, path, file_env)


def resolve(flags, environ, require_key=True):
    """Resolve ``flags`` (attr -> raw text) over ``environ`` into a checked Config.

    ``require_key`` False is for commands that list a token rather than use one key.
    """
    raw, path, file_env = raw_layers(flags, environ)
    return finish(raw, path, file_env, require_key)


# Variables that only the LAP gateway's environment holds: when the signer
# inherits one, it was started by the gateway, which always sends base64.
GATEWAY_MARKERS = ("LAP_GATEWAY_SIGNING_CMD", "LAP_GATEWAY_KEYSET_JSON", "LAP_GATEWAY_KEYSET_FILE")


def check_gateway_input(config, environ):
    """Refuse the silent misconfiguration: the gateway's base64 signed as raw bytes.

    Signing the base64 text instead of the message yields a valid signature over
    the wrong bytes, which nothing notices until an offline audit.
    """
    if config.sources["input"] != "default":
        return
    # The gateway compares SIGNER_MODE after strip().lower(); these select its external signer.
    mode = environ.get("SIGNER_MODE", "").strip().lower()
    started_by_gateway = mode in ("external", "cmd", "command") or any(
        environ.get(name) for name in GATEWAY_MARKERS)
    if started_by_gateway:
        raise ConfigInvalid(
            "started by the LAP gateway, which sends base64(message), but --input is not set; "
            "add --input base64 to SIGNER_CMD (or set --input raw explicitly)")


def parse_flags(args, command, switches):
    """Map ``args`` to ({attr: raw text} by the option table, {switch given}): a flag takes
    its value as ``--flag VALUE`` or ``--flag=VALUE``, once; ``switches`` take none.
    ``command`` names the help to see in the line of an unknown option."""
    flags, given = {}, set()
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg in switches:
            given.add(arg)
            continue
        name, eq, value = arg.partition("=")
        option = BY_FLAG.get(name)
        if option is None:
            what = "option" if arg.startswith("-") else "argument"
            raise ConfigInvalid(f"unknown {what} {name!r}; see lap-pkcs11 {command} --help")
        if not eq:
            if i >= len(args):
                raise ConfigInvalid(f"{name} needs a value ({option.metavar})")
            value = args[i]
            i += 1
        if option.attr in flags:
            raise ConfigInvalid(f"{name} is given twice; keep one")
        flags[option.attr] = value
    return flags, given
