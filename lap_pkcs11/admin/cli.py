"""The administrative ``lap-pkcs11`` commands (typer).

This is the only module that imports typer, prints for people or exits. Every
command takes the signer options of ``lap_pkcs11.per_signature.options`` (generated, so they
stay the one definition) and resolves them through ``lap_pkcs11.admin.settings``.
``sign`` is listed here for ``--help`` only: the console script routes it to the
lean ``lap_pkcs11.per_signature.sign_command`` before typer is imported.
"""

import inspect
import json
import os
import sys
from typing import Annotated, Optional

import typer
from typer.exceptions import TyperException

from lap_pkcs11 import __version__
from lap_pkcs11.admin import keyformats, settings
from lap_pkcs11.per_signature import errors
from lap_pkcs11.per_signature.config import CALLER_MARGIN_MS
from lap_pkcs11.per_signature.options import OPTIONS

# -h works wherever --help does (the lean commands parse their own).
CONTEXT = {"help_option_names": ["-h", "--help"]}
app = typer.Typer(add_completion=True, no_args_is_help=True, rich_markup_mode=None,
                  pretty_exceptions_enable=False, context_settings=CONTEXT,
                  help="Ed25519 signing for the LAP gateway with a key on a PKCS#11 token.")


def _print_version(value: bool):
    if value:
        typer.echo(f"lap-pkcs11 {__version__}")
        raise typer.Exit(0)


@app.callback()
def main(version: Annotated[bool, typer.Option(
        "--version", callback=_print_version, is_eager=True,
        help="Print the version and exit.")] = False):
    """Ed25519 signing for the LAP gateway with a key on a PKCS#11 token."""


def _signer_parameters():
    params = []
    for option in OPTIONS:
        if option.flag is None:
            continue
        params.append(inspect.Parameter(
            option.attr, inspect.Parameter.KEYWORD_ONLY, default=None,
            annotation=Annotated[Optional[str], typer.Option(
                option.flag, metavar=option.metavar, show_default=False,
                help=f"{option.help} Env: {', '.join(option.envs)}."
                     + (f" [default: {option.default}]" if option.default else ""),
                rich_help_panel="Signer options")]))
    return params


def with_signer_options(function):
    """Give ``function`` every signer option; it receives them as ``flags`` (attr -> text)."""
    own = [p for p in inspect.signature(function).parameters.values() if p.name != "flags"]
    signer = _signer_parameters()
    names = {p.name for p in signer}

    def command(**kwargs):
        flags = {k: v for k, v in kwargs.items() if k in names and v is not None}
        rest = {k: v for k, v in kwargs.items() if k not in names}
        return function(flags=flags, **rest)

    command.__signature__ = inspect.Signature(own + signer)
    command.__annotations__ = {p.name: p.annotation for p in own + signer}
    command.__name__ = function.__name__
    command.__doc__ = function.__doc__
    return command


def fail(err):
    """Print the one error line and exit with the error's code."""
    typer.echo(err.line(), err=True)
    raise typer.Exit(err.exit_code)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
             add_help_option=False)
def sign():
    """Sign stdin with the token key and print the signature (the gateway's SIGNER_CMD).

    Run `lap-pkcs11 sign --help` for its options.
    """
    from lap_pkcs11.per_signature.sign_command import main as sign_main

    raise typer.Exit(sign_main(sys.argv[2:]))


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
             add_help_option=False)
def client():
    """Send stdin to the socket-activated signer (the gateway's SIGNER_CMD in that mode).

    Run `lap-pkcs11 client --help` for its options.
    """
    from lap_pkcs11.per_signature.client_command import main as client_main

    raise typer.Exit(client_main(sys.argv[2:]))


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
             add_help_option=False)
def serve():
    """Sign one framed request on stdin/stdout (systemd socket activation, Accept=yes)."""
    from lap_pkcs11.per_signature.serve_command import main as serve_main

    raise typer.Exit(serve_main(sys.argv[2:]))


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
             add_help_option=False)
def agent():
    """Log in once and sign every request on a unix socket (the production signer).

    Run `lap-pkcs11 agent --help` for its options.
    """
    from lap_pkcs11.agent.cli import main as agent_main

    raise typer.Exit(agent_main(sys.argv[1:]))


@app.command("agent-status", context_settings={"allow_extra_args": True,
                                               "ignore_unknown_options": True},
             add_help_option=False)
def agent_status():
    """Print the running agent's metrics (Prometheus text)."""
    from lap_pkcs11.agent.cli import main as agent_main

    raise typer.Exit(agent_main(sys.argv[1:]))


@app.command("config")
@with_signer_options
def show_config(flags, as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False):
    """Show the resolved configuration and where each value came from.

    The last line is the configuration as one PKCS#11 URI (token, key, module-path
    and a chosen pin-source), for --uri or LAP_PKCS11_URI.
    """
    from lap_pkcs11.per_signature import uri

    try:
        config = settings.load(flags)
        pin = pin_status(config)
        as_uri = uri.config_uri(config)
    except errors.SignerError as err:
        fail(err)
    rows = [(option.attr, getattr(config, option.attr), config.sources[option.attr])
            for option in OPTIONS]
    if as_json:
        typer.echo(json.dumps({"options": {attr: {"value": value, "source": source}
                                           for attr, value, source in rows},
                               "pin": pin, "uri": as_uri}, indent=2))
        return
    width = max(len(attr) for attr, _, _ in rows)
    for attr, value, source in rows:
        shown = "-" if value is None else str(value)
        typer.echo(f"{attr:<{width}}  {shown:<40}  {source}")
    typer.echo(f"{'pin':<{width}}  {pin['state']:<40}  {pin['source']}")
    typer.echo(f"{'as uri':<{width}}  {as_uri}")


@app.command()
@with_signer_options
def pubkey(flags,
           fmt: Annotated[str, typer.Option("--format", metavar="|".join(keyformats.FORMATS),
                                            help="Output format.")] = "hex",
           kid: Annotated[Optional[str], typer.Option(
               "--kid", help="Key id for trusted-keys and keyset.")] = None):
    """Print the selected key's Ed25519 public key, in the format the gateway wants.

    gateway-env prints the gateway's variables for this key (LAP_GATEWAY_SIGNING_CMD,
    _PUBLIC_KEY_HEX, _SIGNING_KEY_ID, _SIGNING_CMD_TIMEOUT_SECONDS) for an
    EnvironmentFile=; keyset a LAP_GATEWAY_KEYSET_JSON; trusted-keys a verifier's
    trusted_keys.json; uri the key's PKCS#11 URI (token, id, object, type).
    """
    from lap_pkcs11.admin.token_inspection import Session

    try:
        config = settings.load(flags)
        if fmt not in keyformats.FORMATS:
            raise errors.ConfigInvalid(f"--format must be one of {', '.join(keyformats.FORMATS)}")
        if fmt in ("trusted-keys", "keyset") or (fmt == "gateway-env" and kid is not None):
            keyformats.check_kid(kid)
        session = Session(config)
        if fmt == "uri":
            typer.echo(session.key_uri())
            return
        key = session.public_key()
        # A keyset's timeout_seconds is invisible to the signer, so its command carries
        # the matching --timeout-ms; LAP_GATEWAY_SIGNING_CMD_TIMEOUT_SECONDS the signer reads.
        text = keyformats.render(key, fmt, kid,
                                 signing_command(config, key, fixed_deadline=fmt == "keyset"),
                                 keyset_timeout_seconds(config))
    except errors.SignerError as err:
        fail(err)
    typer.echo(text, nl=False)


def signing_command(config, key, fixed_deadline=False, commands=None):
    """The command line the gateway runs for this configuration (no PIN).

    With an agent socket configured (``--socket``, LAP_PKCS11_AGENT_SOCKET), a
    client of that agent: ``lap-pkcs11-client`` when it is installed beside
    ``lap-pkcs11`` (in ``commands``), else ``lap-pkcs11 client``. Otherwise
    `lap-pkcs11 sign`: options the env file set are left to it (the command names
    the env file, so editing it keeps working); options from flags or this shell's
    environment become flags, since the gateway has neither. ``fixed_deadline``
    always writes ``--timeout-ms``, for a caller whose deadline the signer cannot see.
    """
    import shlex
    from pathlib import Path

    from lap_pkcs11.admin import compiled_client

    commands = Path(commands or compiled_client.commands_dir())
    exe = commands / "lap-pkcs11"
    lap = str(exe) if exe.exists() else "lap-pkcs11"
    if config.sources["agent_socket"] != "default":
        binary = compiled_client.installed(commands)
        args = [str(binary)] if binary else [lap, "client"]
        args += ["--socket", config.agent_socket, "--input", "base64"]
        if fixed_deadline or config.sources["timeout_ms"] != "default":
            args += ["--timeout-ms", str(config.timeout_ms)]
        # The compiled client leaves this check to the agent, which verifies every
        # signature against its own pinned key; the Python client checks it itself.
        args += ["--expect-public-key", key.hex()]
        return shlex.join(args)
    args = [lap, "sign", "--input", "base64"]

    def from_file(source):
        return source.startswith(("file:", "uri:file:"))

    def given(attr):
        source = config.sources[attr]
        # What a URI filled travels as the URI itself (below), unless the env file holds it.
        return getattr(config, attr) is not None and not from_file(source) and not (
            source.startswith("uri:"))

    if config.uri is not None and not from_file(config.sources["uri"]):
        args += ["--uri", config.uri]
    for attr, flag in (("module", "--module"), ("slot", "--slot"),
                       ("slot_index", "--slot-index"), ("token_label", "--token-label"),
                       ("key_id", "--key-id"), ("key_label", "--key-label")):
        if given(attr):
            args += [flag, str(getattr(config, attr))]
    if given("mechanism") and config.mechanism != "EDDSA":
        args += ["--mechanism", config.mechanism]
    if given("pin_file"):
        args += ["--pin-file", config.pin_file]
    elif given("pin_env") and config.pin_env != "PKCS11_PIN":
        args += ["--pin-env", config.pin_env]
    if config.env_file is not None:
        args += ["--env-file", str(Path(config.env_file).absolute())]
    if given("lock_dir"):
        args += ["--lock-dir", config.lock_dir]
    if given("pkcs11_tool") and config.sources["pkcs11_tool"] != "default":
        args += ["--pkcs11-tool", config.pkcs11_tool]
    if fixed_deadline or (given("timeout_ms") and config.sources["timeout_ms"] != "default"):
        args += ["--timeout-ms", str(config.timeout_ms)]
    args += ["--expect-public-key", key.hex()]
    return shlex.join(args)


def keyset_timeout_seconds(config):
    """The gateway's timeout for this signer: its own deadline plus twice the start-up margin."""
    return round((config.timeout_ms + 2 * CALLER_MARGIN_MS) / 1000, 3)


@app.command("install-client")
def install_client(
        cc: Annotated[Optional[str], typer.Option(
            "--cc", metavar="PROGRAM", help="The C compiler. [default: $CC, else cc]")] = None,
        dest: Annotated[Optional[str], typer.Option(
            "--dest", metavar="DIR", help="Where to install it. [default: beside lap-pkcs11]")]
        = None,
        sanitize: Annotated[bool, typer.Option(
            "--sanitize", help="Build with AddressSanitizer and UBSan (for tests only).")] = False):
    """Build lap-pkcs11-client, the compiled client, beside lap-pkcs11.

    The gateway's fastest command for the agent: the contract of `lap-pkcs11 client`
    without a Python start per signature. Without a working C compiler nothing is
    installed (exit 69): point the gateway at `lap-pkcs11 client` instead.
    """
    from lap_pkcs11.admin import compiled_client

    try:
        path = compiled_client.install(dest, cc=cc, sanitize=sanitize)
    except errors.SignerError as err:
        fail(err)
    typer.echo(f"installed {path}")


@app.command()
@with_signer_options
def keygen(flags,
           fmt: Annotated[str, typer.Option("--format", metavar="|".join(keyformats.FORMATS[:4]),
                                            help="Format of the printed public key.")] = "hex"):
    """Generate a sensitive, non-extractable Ed25519 key pair on the token.

    Needs both --key-id and --key-label (or a URI's id= and object=); refuses (and
    changes nothing) when either is taken.
    """
    from lap_pkcs11.admin.token_inspection import Session

    try:
        config = settings.load(flags, require_key=False)
        if config.key_id is None or config.key_label is None:
            raise errors.ConfigInvalid("keygen needs both --key-id HEX and --key-label LABEL")
        if fmt not in keyformats.FORMATS[:4]:
            raise errors.ConfigInvalid("--format must be one of hex, base64, pem, jwk")
        session = Session(config)
        session.generate(config.key_id, config.key_label)
        text = keyformats.render(session.public_key(), fmt)
    except errors.SignerError as err:
        fail(err)
    typer.echo(text, nl=False)


@app.command()
@with_signer_options
def doctor(flags, as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False):
    """Check everything the signer needs, in order, and sign a test message."""
    from lap_pkcs11.admin import doctor as checks

    report = checks.run(flags)
    if as_json:
        typer.echo(json.dumps(report.as_dict(), indent=2))
    else:
        colours = {"pass": typer.colors.GREEN, "warn": typer.colors.YELLOW,
                   "fail": typer.colors.RED}
        colour = use_colour(sys.stdout, os.environ)
        for check in report.checks:
            label = f"{check.status.upper():<4}"
            if colour:
                label = typer.style(label, fg=colours[check.status], bold=True)
            typer.echo(f"{label}  {check.name}: {check.detail}", color=colour)
            if check.fix and check.status != "pass":
                typer.echo(f"      {'fix' if check.status == 'fail' else 'advice'}: {check.fix}")
        if report.key_uri is not None:
            typer.echo(f"key URI: {report.key_uri}")
        if report.latency_ms is not None:
            typer.echo(f"signing latency: {report.latency_ms} ms")
    raise typer.Exit(report.exit_code)


def use_colour(stream, environ):
    """Colour only on a terminal, and never with NO_COLOR set (https://no-color.org) or
    TERM=dumb."""
    try:
        terminal = stream.isatty()
    except (AttributeError, ValueError):
        terminal = False
    return terminal and not environ.get("NO_COLOR") and environ.get("TERM") != "dumb"


@app.command()
@with_signer_options
def keys(flags, as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False):
    """List the Ed25519 keys on the token: id, label, URI, protection, public key.

    Needs the module, a token selector (or the first token) and the PIN, as private
    keys are listed logged in; no key selector.
    """
    from lap_pkcs11.admin.token_inspection import Session

    try:
        config = settings.load(flags, require_key=False)
        session = Session(config)
        token, found = session.token(), session.ed25519_keys()
    except errors.SignerError as err:
        fail(err)
    if as_json:
        typer.echo(json.dumps({"token": token, "keys": found}, indent=2))
        return
    typer.echo(f"token {token['label']!r} (serial {token.get('serial', '?')}, slot "
               f"0x{token['slot']:x}): {len(found)} Ed25519 key{'s' if len(found) != 1 else ''}")
    for key in found:
        protection = ", ".join(
            ["sensitive" if key["sensitive"] else "NOT sensitive",
             "EXTRACTABLE" if key["extractable"] else "not extractable",
             "generated on the token" if key["never_extractable"] and key["local"]
             else "imported or once extractable"])
        typer.echo(f"\nid {key['id']}  label {key['label']!r}")
        typer.echo(f"  uri:        {key['uri']}")
        typer.echo(f"  public key: {key['public_key_hex'] or '(no public key object)'}")
        typer.echo(f"  protection: {protection}")


@app.command("install-units")
def install_units(
        prefix: Annotated[str, typer.Option(
            "--prefix", metavar="DIR",
            help="Write into DIR/etc/systemd/system (default: / itself).")] = "/",
        force: Annotated[bool, typer.Option(
            "--force", help="Replace units that exist with other content.")] = False):
    """Write the systemd units with the path of this installation's lap-pkcs11.

    The socket-activated signer (lap-pkcs11-signer.socket, lap-pkcs11-signer@.service)
    and the agent (lap-pkcs11-agent.socket, .service); then systemctl daemon-reload
    and enable the socket you use (systemd/README.md).
    """
    from lap_pkcs11.admin import packaged

    try:
        written = packaged.install_units(prefix, force=force)
    except errors.SignerError as err:
        fail(err)
    except OSError as err:
        fail(errors.ConfigInvalid(f"cannot write the units ({err.strerror}: {err.filename}); "
                                  "run as root or give --prefix"))
    for path, state in written:
        typer.echo(f"{state}: {path}")


@app.command("files")
def packaged_files():
    """Print where the shell mirror, the smoke test and the systemd units are installed."""
    from lap_pkcs11.admin import packaged

    for name, path in packaged.files():
        typer.echo(f"{name}\t{path}")


def pin_status(config):
    """Whether a PIN is set and where it comes from; never the PIN itself."""
    import os

    if config.pin_file is not None:
        return {"state": "set" if os.path.isfile(config.pin_file) else "unset",
                "source": f"file:{config.pin_file}"}
    env = config.child_environment(dict(os.environ))
    name = config.pin_env
    origin = "env" if os.environ.get(name) else "env-file" if config.file_env.get(name) else "none"
    return {"state": "set" if env.get(name) else "unset", "source": f"{origin}:{name}"}


def _command_path(err):
    """"lap-pkcs11 COMMAND" for a usage error of COMMAND, else "lap-pkcs11"."""
    context = getattr(err, "ctx", None)
    if context is not None and context.command_path:
        return context.command_path
    names = set(typer.main.get_command(app).commands)
    first = next((arg for arg in sys.argv[1:] if not arg.startswith("-")), None)
    return f"lap-pkcs11 {first}" if first in names else "lap-pkcs11"


def run():
    """Entry point for every command but ``sign``, ``client`` and ``serve``."""
    debug = "--debug" in sys.argv
    if debug:
        sys.argv.remove("--debug")
    try:
        code = app(prog_name="lap-pkcs11", standalone_mode=False)
    except SystemExit as done:
        return done.code
    except TyperException as err:  # a usage error: one line and 64, like sign's
        if type(err).__name__ == "NoArgsIsHelpError":  # no command: the help, on stdout
            typer.echo(err.format_message())
            return 0
        command = _command_path(err)
        usage = errors.ConfigInvalid(
            f"{err.format_message().rstrip('.')}; see {command} --help")
        typer.echo(usage.line(), err=True)
        return usage.exit_code
    except typer.Abort:
        return 130
    except Exception as err:  # A bug still ends in one line, without a traceback.
        if debug:
            raise
        failure = errors.SigningFailed(
            f"internal error ({type(err).__name__}); rerun with --debug and report it")
        typer.echo(failure.line(), err=True)
        return failure.exit_code
    return code if isinstance(code, int) else 0
