"""Resolve the signer's configuration from flags, environment, env file and defaults.

This is the stdlib resolver used by the per-signature ``sign`` command; the
administrative commands resolve the same ``OPTIONS`` through pydantic-settings
(``lap_pkcs11.settings``), and a test checks that both agree.

Precedence, per option: command-line flag, then the real environment (each of
the option's variables in order), then the env file (same variables, same
order), then the default. An empty environment value counts as unset.

This module is on the per-signature path: it imports only what Python has built in.
"""

import os

from lap_pkcs11.errors import ConfigInvalid
from lap_pkcs11.options import OPTIONS

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
    """How to name an option in an error: its flag, or the variable that set it."""
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
        from lap_pkcs11 import envfile  # only when there is a file: sign runs per signature

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


def check(values):
    """Cross-option rules shared by every resolver."""
    if not values["module"]:
        raise ConfigInvalid("no PKCS#11 module: give --module PATH or set LAP_PKCS11_MODULE")
    selectors = [flag for attr, flag in (("slot", "--slot"), ("slot_index", "--slot-index"),
                                         ("token_label", "--token-label"))
                 if values[attr] is not None]
    if len(selectors) > 1:
        raise ConfigInvalid(f"{' and '.join(selectors)} both select a token; keep only one")
    if (values["key_id"] is None) == (values["key_label"] is None):
        which = "both" if values["key_id"] is not None else "neither"
        raise ConfigInvalid(f"{which} of --key-id and --key-label given; give exactly one")


def resolve(flags, environ):
    """Resolve ``flags`` (attr -> raw text) over ``environ`` into a checked Config."""
    raw, path, file_env = raw_layers(flags, environ)
    values, sources = {}, {}
    for option in OPTIONS:
        text, source = raw[option.attr]
        values[option.attr] = parse_value(option, text, source)
        sources[option.attr] = source
    check(values)
    return Config(values, sources, path, file_env)


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
