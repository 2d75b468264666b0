"""``lap-pkcs11 doctor``: the checks that tell an operator the signer will work.

The checks run in order and stop at the first failure; each says what it saw
and, on failure, what to fix. The signing check goes through the same code
path as ``lap-pkcs11 sign`` and verifies the result against the token's own
public key.
"""

import os
import time

from lap_pkcs11.per_signature import config as configuration
from lap_pkcs11.admin import settings
from lap_pkcs11.backends import pkcs11_tool
from lap_pkcs11.per_signature import ed25519, errors, signer, uri
from lap_pkcs11.admin.token_inspection import Session


class Check:
    """One doctor line: name, status (pass, warn, fail), what was seen, the fix."""

    def __init__(self, name, status, detail, fix=None, error=None):
        self.name = name
        self.status = status
        self.detail = detail
        self.fix = fix
        self.error = error

    def as_dict(self):
        data = {"name": self.name, "status": self.status, "detail": self.detail}
        if self.fix:
            data["fix"] = self.fix
        if self.error is not None:
            data["error"] = self.error.name
        return data


class Report:
    """The checks made so far, the measured signing latency and the exit code."""

    def __init__(self):
        self.checks = []
        self.latency_ms = None
        self.key_uri = None

    def add(self, name, status, detail, fix=None, error=None):
        self.checks.append(Check(name, status, detail, fix, error))
        return status != "fail"

    def fail(self, name, err, fix=None):
        return self.add(name, "fail", err.message, fix or err.message, err)

    @property
    def ok(self):
        return all(check.status != "fail" for check in self.checks)

    @property
    def exit_code(self):
        failed = [check for check in self.checks if check.status == "fail"]
        return failed[0].error.exit_code if failed else 0

    def as_dict(self):
        return {"ok": self.ok, "checks": [check.as_dict() for check in self.checks],
                "key_uri": self.key_uri, "signing_latency_ms": self.latency_ms}


def tool_version(path, env):
    """The OpenSC version of the pkcs11-tool at ``path``.

    pkcs11-tool has no --version option; the opensc-tool installed beside it (the
    same package or build) prints the version of the OpenSC they share. The one
    on PATH may belong to another OpenSC.
    """
    beside = os.path.join(os.path.dirname(os.path.realpath(path)), "opensc-tool")
    if not os.access(beside, os.X_OK):
        return "version unknown: no opensc-tool beside it"
    try:
        result = pkcs11_tool.run([beside, "--info"], env, time.monotonic() + 5)
    except errors.SignerError:
        return "version unknown"
    first = result.stdout.decode("utf-8", "replace").splitlines()[:1]
    if result.status != 0 or not first or not first[0].startswith("OpenSC "):
        return "version unknown"
    return first[0].split("[")[0].strip()


def run(flags, environ=None):
    """Run every check in order; return the Report."""
    environ = dict(os.environ) if environ is None else environ
    report = Report()
    try:
        config, config_error = settings.load(flags, environ), None
    except errors.SignerError as err:
        config, config_error = None, err
    tool_name = config.pkcs11_tool if config else (
        flags.get("pkcs11_tool") or environ.get("LAP_PKCS11_TOOL") or "pkcs11-tool")
    path = pkcs11_tool.find_program(tool_name, environ)
    if path is None:
        report.fail("pkcs11-tool found", errors.ToolNotFound(f"{tool_name} not found"),
                    "install OpenSC (apt-get install opensc) or set --pkcs11-tool")
        return report
    report.add("pkcs11-tool found", "pass", f"{path} ({tool_version(path, environ)})")
    if config_error is not None:
        report.fail("configuration valid", config_error,
                    "fix the option it names; `lap-pkcs11 config` shows where each value came from")
        return report
    report.add("configuration valid", "pass", f"module {config.module}")
    if config.sources["agent_socket"] != "default":
        client_check(report, config)
    _token_checks(report, config, environ)
    return report


def client_check(report, config, directory=None):
    """With an agent socket configured: is the gateway's fast client installed, and current?"""
    from lap_pkcs11.admin import compiled_client

    name = "compiled client installed"
    path, current = compiled_client.state(directory)
    fallback = (f"point the gateway at `lap-pkcs11 client --socket {config.agent_socket} --input "
                "base64` (the same contract, a slower start), or install a C compiler (apt-get "
                "install gcc libc6-dev) and run `lap-pkcs11 install-client`")
    if path is None:
        report.add(name, "warn", f"{compiled_client.NAME} is not installed beside lap-pkcs11",
                   fallback)
    elif not current:
        report.add(name, "warn", f"{path} was built from another version of lap-pkcs11",
                   "run `lap-pkcs11 install-client` again; until then " + fallback.split(", or ")[0])
    else:
        report.add(name, "pass", f"{path}, the gateway's command for the agent at "
                                 f"{config.agent_socket}")


def _token_checks(report, config, environ):
    try:
        session = Session(config, environ)
        session.check_module()
    except errors.SignerError as err:
        report.fail("module loads", err)
        return
    report.add("module loads", "pass", config.module)
    try:
        mechanisms = session.mechanisms()
    except errors.SignerError as err:
        seen = ", ".join(f"{label!r} (slot {slot})" for slot, label in _tokens(session)) or "none"
        report.add("token present", "fail", f"{err.message}; tokens seen: {seen}",
                   "select one of the tokens seen with --token-label (stable) or --slot", err)
        return
    report.add("token present", "pass", _selector(config))
    try:
        session.objects("privkey", login=True)
    except errors.SignerError as err:
        report.fail("PIN accepted", err)
        return
    report.add("PIN accepted", "pass", f"PIN from {_pin_source(config)}")
    signer.forget_rejected_pin(config, session.env)  # the token took it: sign may try it again
    try:
        key = session.private_key()
    except errors.SignerError as err:
        report.fail("private key found", err)
        return
    try:
        report.key_uri = uri.key_uri(session.token()["label"], key.id, key.label)
    except errors.SignerError:
        report.key_uri = None
    report.add("private key found", "pass", f"id {key.id}, label {key.label!r}"
               + (f", {report.key_uri}" if report.key_uri else ""))
    _protection_check(report, key)
    wanted = config.mechanism
    if wanted not in mechanisms:
        report.add("token lists the mechanism", "fail",
                   f"{wanted} is not among the token's mechanisms ({', '.join(mechanisms)})",
                   "use a token and key that support Ed25519 (EDDSA)",
                   errors.MechanismUnsupported(f"{wanted} not listed"))
        return
    report.add("token lists the mechanism", "pass", wanted)
    _sign_checks(report, config, environ, session)


def _tokens(session):
    try:
        return session.tokens()
    except errors.SignerError:
        return []


def _selector(config):
    if config.token_label is not None:
        return f"token label {config.token_label!r}"
    if config.slot is not None:
        return f"slot {config.slot}"
    if config.slot_index is not None:
        return f"slot index {config.slot_index}"
    return "first token"


def _pin_source(config):
    if config.pin_file is not None:
        return f"file {config.pin_file}"
    return f"variable {config.pin_env}"


def _protection_check(report, key):
    name = "key is sensitive and never extractable"
    if "extractable" in key.access or "sensitive" not in key.access:
        report.add(name, "warn", f"access: {', '.join(sorted(key.access)) or 'none'}",
                   "generate a new key on the token (lap-pkcs11 keygen): this one can leave it")
    elif "never extractable" not in key.access:
        report.add(name, "warn", f"access: {', '.join(sorted(key.access))}",
                   "the key was imported, so it has existed outside the token; prefer a key "
                   "generated on the token (lap-pkcs11 keygen)")
    else:
        report.add(name, "pass", ", ".join(sorted(key.access)))


def _sign_checks(report, config, environ, session):
    message = os.urandom(200)
    # The PIN was read once already (a --pin-file may be a pipe): hand it on in the
    # environment, and leave the pinned-key comparison to its own check below.
    pin_env = session.login()
    unpinned = configuration.Config(
        dict(config.values(), expect_public_key=None, pin_file=None, pin_env=pin_env),
        config.sources, config.env_file, config.file_env)
    started = time.monotonic()
    try:
        signature = signer.sign(unpinned, message, session.env,
                                started + config.deadline_ms() / 1000)
        report.latency_ms = round((time.monotonic() - started) * 1000, 1)
        public = session.public_key()
    except errors.SignerError as err:
        report.fail("test signature verifies", err)
        return
    if not ed25519.is_valid(public, message, signature):
        report.add("test signature verifies", "fail",
                   "the signature does not verify under the token's own public key",
                   "the public and private objects with this id do not belong together; "
                   "regenerate the key", errors.KeyMismatch("token key pair inconsistent"))
        return
    report.add("test signature verifies", "pass",
               f"{report.latency_ms} ms, public key {public.hex()}")
    if config.expect_public_key is None:
        return
    if public.hex() != config.expect_public_key:
        report.add("public key is the expected one", "fail",
                   f"token key {public.hex()} is not the expected {config.expect_public_key}",
                   "point the signer at the key the gateway pins, or pin this key "
                   "(lap-pkcs11 pubkey --format hex)",
                   errors.KeyMismatch("public key differs from the expected one"))
        return
    report.add("public key is the expected one", "pass", public.hex())
