"""The administrative commands' view of the configuration, through pydantic-settings.

The settings model is generated from ``lap_pkcs11.per_signature.options.OPTIONS``, so every
option keeps one definition; pydantic-settings layers the sources (flags, then
the real environment, then the env file as lap_pkcs11.per_signature.envfile reads
it, then defaults),
and the values go through the same parsers and cross-option rules as the lean
``sign`` path. A test proves that this resolver and ``lap_pkcs11.per_signature.config.resolve``
agree on every input.
"""

import os
from typing import Optional

from pydantic import AliasChoices, Field, create_model
from pydantic_settings import BaseSettings, EnvSettingsSource, SettingsConfigDict

from lap_pkcs11.per_signature import config as configuration
from lap_pkcs11.per_signature import envfile
from lap_pkcs11.per_signature.options import BY_ATTR, OPTIONS

_CONFIG = SettingsConfigDict(case_sensitive=True, env_ignore_empty=True, extra="ignore",
                             populate_by_name=True)


class _Environment(EnvSettingsSource):
    """The environment source, over a given mapping instead of ``os.environ``."""

    def __init__(self, settings_cls, environ):
        self._given = environ
        super().__init__(settings_cls, case_sensitive=True, env_ignore_empty=True)

    def _load_env_vars(self):
        return {key: value for key, value in self._given.items() if value}


Settings = create_model(
    "Settings", __base__=BaseSettings, __config__=None,
    **{option.attr: (Optional[str], Field(
        default=None, description=option.help,
        validation_alias=AliasChoices(*option.envs)))
       for option in OPTIONS if option.envs and option.attr != "env_file"})
Settings.model_config = _CONFIG


def _provider(raw, option):
    """The first of ``option``'s variables that ``raw`` sets, or None."""
    return next((name for name in option.envs if raw.get(name)), None)


def load(flags, environ=None, require_key=True):
    """Resolve ``flags`` (attr -> raw text) the way ``config.resolve`` does, into a Config."""
    environ = dict(os.environ) if environ is None else environ
    path = configuration.env_file_path(flags.get("env_file"), environ)
    # The env file is read once, by the same strict reader as sign's: one grammar.
    file_env = envfile.load(path) if path is not None else {}
    # (label, the raw variables that label reads, the source's data for pydantic)
    # pydantic-settings keys every source by an option's first variable; so do the flags.
    given = {BY_ATTR[attr].envs[0]: text for attr, text in flags.items() if attr != "env_file"}
    layers = [("flag", {}, given),
              ("env", environ, _Environment(Settings, environ)())]
    if path is not None:
        layers.append(("file", file_env, _Environment(Settings, file_env)()))

    class Layered(Settings):
        @classmethod
        def settings_customise_sources(cls, settings_cls, **_):
            return tuple(lambda data=data: data for _, _, data in layers)

    model = Layered()
    raw = {}
    for option in OPTIONS:
        if option.attr == "env_file":
            text, source = path, configuration.env_file_source(flags, environ, path)
        elif not option.envs:  # filled only by a URI
            text, source = None, None
        else:
            text = getattr(model, option.attr)
            source = "flag" if option.attr in flags else next(
                (f"{label}:{name}" for label, raw_vars, _ in layers[1:]
                 for name in [_provider(raw_vars, option)] if name), None)
            if text is None and option.default is not None:
                text, source = option.default, "default"
        raw[option.attr] = (text, source or "unset")
    return configuration.finish(raw, path, file_env, require_key)
