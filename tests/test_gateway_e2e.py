"""End to end with the real LAP gateway, configured exactly as the README says.

The gateway (lattice-audit-protocol, from the archive in ../shared/lap, or
$LAP_GATEWAY_SRC_DIR) is installed once with its `gateway` extra into a venv
cached under /var/tmp (or $LAP_TEST_GATEWAY_CACHE), keyed by the archive's
hash. Each test starts `lap-gateway` on 127.0.0.1 with the README's signer
env file and either the lines `lap-pkcs11 pubkey --format gateway-env` prints
(checked to be the README's block) or the README's keyset, runs a tool server
on 127.0.0.1, and drives sessions, evaluate and invoke over HTTP. Every
capability token and receipt is checked with the gateway's own verifier
against the token's public key (and against another key, which must fail);
the audit log with `lap-verify` and our trusted_keys.json, which also passes
the gateway's schema check. Then a wrong PIN, a missing token and a hung tool
each give a deny whose reason carries our error name, and the same gateway
process signs again once the fault is gone.
"""

import base64
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import FAKE_TOOL, ROOT, TEST_TOOL, USER_PIN, tool_program
from gateway_harness import (ARCHIVE_PATTERN, ToolServer, evidence, free_port, gateway_archive,
                             install_gateway, request)
from lap_pkcs11.per_signature import envfile

LAP = str(Path(sys.executable).parent / "lap-pkcs11")
README = ROOT / "README.md"
API_KEY, AGENT = "e2e-key-1", "e2e_agent"
# What the README's examples name, and what this test puts in their place.
README_LAP = "/opt/lap-pkcs11/.venv/bin/lap-pkcs11"
README_SIGNER_ENV = "/etc/lap-pkcs11/signer.env"
HEALTH_SECONDS = 60
# RFC 8032 test 1's public key: a valid key that signed none of this test's artifacts.
OTHER_KEY = "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"


class Install:
    """The gateway installed in a venv: its programs, and the source for schemas."""

    def __init__(self, home):
        self.home = home
        self.bin = home / "venv" / "bin"
        self.source = next(path for path in (home / "src").iterdir() if path.is_dir())
        self.schemas = self.source / "spec" / "schemas"


@pytest.fixture(scope="session")
def gateway():
    archive = gateway_archive()
    if archive is None:
        pytest.skip(f"the LAP gateway's archive ({ARCHIVE_PATTERN}) is in neither "
                    f"{ROOT.parent / 'shared' / 'lap'} nor $LAP_GATEWAY_SRC_DIR")
    return Install(install_gateway(archive))


@pytest.fixture
def tool_server():
    server = ToolServer()
    yield server
    server.close()


class RunningGateway:
    """`lap-gateway` on 127.0.0.1 with a given environment, and an HTTP client for it."""

    def __init__(self, install, env, workdir):
        self.log_path = workdir / "gateway.log"
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [install.bin / "lap-gateway", "--host", "127.0.0.1", "--port", str(self.port)],
                env=env, cwd=workdir, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True)
        deadline = time.monotonic() + HEALTH_SECONDS
        while True:
            assert self.process.poll() is None, f"the gateway exited:\n{self.log()}"
            try:
                status, body = self.call("GET", "/v1/health", timeout=2)
                if status == 200 and body.get("status") == "healthy":
                    return
            except OSError:
                pass
            assert time.monotonic() < deadline, f"the gateway did not become healthy:\n{self.log()}"
            time.sleep(0.2)

    def log(self):
        return self.log_path.read_text(errors="replace")[-3000:]

    def call(self, method, path, payload=None, headers=None, timeout=60):
        return request(self.base, method, path, payload,
                       {"X-Api-Key": API_KEY, "X-Agent-Id": AGENT, **(headers or {})}, timeout)

    def stop(self):
        if self.process.poll() is None:
            os.killpg(self.process.pid, 15)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, 9)
                self.process.wait(10)


class Agent:
    """Drives the gateway as an agent does; keeps every token and receipt it got."""

    def __init__(self, running):
        self.gateway = running
        self.tokens, self.receipts, self.count = [], [], 0
        status, body = running.call("POST", "/v1/session/new", {"ttl_seconds": 3600})
        assert status == 200, body
        self.headers = {"X-Session-Id": body["session_id"]}

    def evaluate(self):
        self.count += 1
        status, body = self.gateway.call("POST", "/v1/evaluate",
                                         evidence(f"E2E_{self.count}", "end-to-end test"),
                                         self.headers)
        assert status == 200, body
        return body

    def tool_call(self):
        """evaluate, then invoke with the token; both must succeed."""
        decision = self.evaluate()
        assert decision["outcome"] == "approve" and decision.get("capability_token"), decision
        token = decision["capability_token"]
        status, body = self.gateway.call("POST", "/v1/tools/http/invoke", {
            "tool_name": "http", "operation": "execute", "params": {"n": self.count},
            "capability_token": token, "nonce": f"nonce-{self.count}"}, self.headers)
        assert status == 200 and body.get("success") and body.get("receipt"), body
        self.tokens.append(token)
        self.receipts.append(body["receipt"])

    def denied(self, name):
        """evaluate must be denied for a signer failure that carries our error NAME."""
        decision = self.evaluate()
        assert decision["outcome"] == "deny" and not decision.get("capability_token"), decision
        assert decision["reason"].startswith("SIGNER_UNAVAILABLE: "), decision["reason"]
        assert f"lap-pkcs11: {name}: " in decision["reason"], decision["reason"]
        assert USER_PIN not in decision["reason"]


VERIFIER = r"""
import json, sys
from lap_gateway.crypto import TrustedKeyStore
from lap_gateway.receipts import ToolInvocationReceipt
from lap_gateway.tokens import CapabilityToken
data = json.load(sys.stdin)
out = {}
for name, keys in data["stores"].items():
    store = TrustedKeyStore.from_config(keys)
    out[name] = {
        "tokens": [CapabilityToken.from_compact(t).verify(store) for t in data["tokens"]],
        "receipts": [ToolInvocationReceipt.from_dict(r).verify(store) for r in data["receipts"]],
    }
json.dump(out, sys.stdout)
"""


def verify_with_the_gateway(install, agent, stores):
    result = subprocess.run([install.bin / "python", "-c", VERIFIER], capture_output=True,
                            text=True, timeout=120, input=json.dumps(
                                {"stores": stores, "tokens": agent.tokens,
                                 "receipts": agent.receipts}))
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def readme_blocks():
    """The bash blocks of the README's gateway section."""
    text = README.read_text()
    start = text.index("## Configure the LAP gateway")
    section = text[start:text.index("\n## ", start + 1)]
    return re.findall(r"```bash\n(.*?)```", section, re.S)


def readme_command(fmt):
    """The README's `lap-pkcs11 pubkey ... --format FMT` command as argv (up to `>`)."""
    for block in readme_blocks():
        text = block.replace("\\\n", " ")
        for line in text.splitlines():
            if line.startswith("lap-pkcs11 pubkey") and f"--format {fmt}" in line:
                words = shlex.split(line, comments=True)
                words = words[:words.index(">")] if ">" in words else words
                return [LAP, *words[1:]]
    raise AssertionError(f"the README shows no `lap-pkcs11 pubkey --format {fmt}` command")


class Setup:
    """The README's signer env file for a test token, and how the gateway runs."""

    def __init__(self, token, workdir):
        self.token, self.workdir = token, workdir
        self.pin_file = workdir / "pin"
        self.pin_file.write_text(USER_PIN + "\n")
        self.pin_file.chmod(0o600)  # the signer refuses a PIN file others may read
        (block,) = [b for b in readme_blocks() if "LAP_PKCS11_MODULE=" in b]
        values = envfile.parse(block)
        ours = {"LAP_PKCS11_MODULE": token.module, "LAP_PKCS11_TOKEN_LABEL": token.label,
                "LAP_PKCS11_KEY_ID": "01", "LAP_PKCS11_PIN_FILE": str(self.pin_file)}
        assert set(values) == set(ours), f"the README's signer.env changed: {sorted(values)}"
        # The module's own configuration, and the pkcs11-tool under test.
        extra = {"SOFTHSM2_CONF": str(token.conf)}
        if TEST_TOOL:
            extra["LAP_PKCS11_TOOL"] = tool_program()
        self.signer_env = workdir / "signer.env"
        self.signer_lines = [f"{name}={ours[name]}" for name in values] + [
            f"{name}={value}" for name, value in extra.items()]
        self.write_signer_env()

    def write_signer_env(self, *extra):
        self.signer_env.write_text("\n".join([*self.signer_lines, *extra]) + "\n")

    def pubkey(self, fmt):
        """Run the README's pubkey command for FMT against this setup; its stdout."""
        return self.lap([str(self.signer_env) if word == README_SIGNER_ENV else word
                         for word in readme_command(fmt)])

    def lap(self, argv):
        """Run lap-pkcs11 with nothing but the env file to configure it."""
        env = {k: v for k, v in self.token.env.items()
               if k not in ("PKCS11_PIN", "SOFTHSM2_CONF", "LAP_PKCS11_TOOL")}
        result = subprocess.run(argv, env=env, cwd=self.workdir, capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 0, result.stderr
        return result.stdout

    def gateway_env(self, tool_server, config):
        """The gateway's environment: its own settings, then exactly the README's lines."""
        env = {"PATH": os.environ["PATH"], "HOME": str(self.workdir), "LANG": "C.UTF-8",
               "XDG_RUNTIME_DIR": str(self.token.home / "run"),
               "LAP_GATEWAY_DB_PATH": str(self.workdir / "gateway.db"),
               "LAP_HTTP_TOOL_URL": tool_server.url,
               "LAP_API_KEYS_JSON": json.dumps({API_KEY: AGENT})}
        env.update(config)
        return env


def readme_gateway_env(public):
    (block,) = [b for b in readme_blocks() if b.startswith("LAP_GATEWAY_SIGNING_CMD=")]
    return block.replace(README_LAP, LAP).replace("<64 hex>", public.hex())


@pytest.fixture
def setup(keyed, tmp_path):
    token, public = keyed
    return Setup(token, tmp_path), public


@pytest.mark.parametrize("configuration", ["gateway-env", "keyset"])
def test_the_readme_configuration_runs_the_real_gateway(gateway, setup, tool_server,
                                                         configuration):
    config_setup, public = setup
    workdir = config_setup.workdir
    if configuration == "gateway-env":
        printed = config_setup.pubkey("gateway-env")
        # What pubkey prints is the README's block, word for word (paths and key aside).
        assert printed == readme_gateway_env(public).replace(README_SIGNER_ENV,
                                                             str(config_setup.signer_env))
        config = envfile.parse(printed)  # as EnvironmentFile= loads it
        kid = config["LAP_GATEWAY_SIGNING_KEY_ID"]
    else:
        keyset = config_setup.pubkey("keyset")
        assert "LAP_GATEWAY_KEYSET_FILE=" in "".join(readme_blocks())
        (workdir / "keyset.json").write_text(keyset)
        config = {"LAP_GATEWAY_KEYSET_FILE": str(workdir / "keyset.json")}
        kid = json.loads(keyset)["active_kid"]
    running = RunningGateway(gateway, config_setup.gateway_env(tool_server, config), workdir)
    try:
        agent = Agent(running)
        agent.tool_call()
        agent.tool_call()

        # A wrong PIN; the same wrong PIN again is refused by the guard, not the token.
        config_setup.pin_file.write_text("000000\n")
        agent.denied("PIN_INCORRECT")
        agent.denied("PIN_INCORRECT")
        config_setup.pin_file.write_text(USER_PIN + "\n")
        agent.tool_call()

        # The token goes away (a card pulled), then comes back.
        (stored,) = [path for path in config_setup.token.dir.iterdir() if path.is_dir()]
        stored.rename(workdir / "away")
        agent.denied("TOKEN_NOT_FOUND")
        (workdir / "away").rename(stored)
        agent.tool_call()

        # pkcs11-tool hangs: the signer answers TIMEOUT before the gateway's deadline.
        config_setup.write_signer_env(f"LAP_PKCS11_TOOL={FAKE_TOOL}", "FAKE_MODE=hang")
        started = time.monotonic()
        agent.denied("TIMEOUT")
        assert time.monotonic() - started < 10
        config_setup.write_signer_env()
        agent.tool_call()

        assert running.process.poll() is None  # one gateway process throughout
        assert tool_server.calls == len(agent.receipts) == 5  # denied calls never reached it
    finally:
        running.stop()

    # Every token and receipt verifies with the gateway's own code, under the token's key
    # and under our trusted_keys.json; under another key none does.
    trusted = workdir / "trusted_keys.json"
    trusted.write_text(config_setup.lap([LAP, "pubkey", "--env-file", str(config_setup.signer_env),
                                         "--format", "trusted-keys", "--kid", kid]))
    assert OTHER_KEY != public.hex()
    verdicts = verify_with_the_gateway(gateway, agent, {
        "token key": {kid: public.hex()}, "trusted_keys.json": json.loads(trusted.read_text()),
        "other key": {kid: OTHER_KEY}})
    for name in ("token key", "trusted_keys.json"):
        assert verdicts[name] == {"tokens": [True] * 5, "receipts": [True] * 5}, name
    assert verdicts["other key"] == {"tokens": [False] * 5, "receipts": [False] * 5}
    for compact in agent.tokens:
        assert json.loads(base64.urlsafe_b64decode(compact))["key_id"] == kid
    assert {receipt["key_id"] for receipt in agent.receipts} == {kid}

    # The gateway's schema check accepts our trusted_keys.json by that name, and its
    # audit-log verifier accepts the log our signer signed.
    schema = subprocess.run([gateway.bin / "lap", "schema-validate", trusted, "--schemas-dir",
                             gateway.schemas], capture_output=True, text=True, timeout=120)
    assert schema.returncode == 0, schema.stdout + schema.stderr
    audit = subprocess.run([gateway.bin / "lap-verify", "audit-log",
                            workdir / "gateway.audit.jsonl", "--trusted-keys", trusted],
                           capture_output=True, text=True, timeout=120)
    assert audit.returncode == 0 and "AUDIT_LOG_OK" in audit.stdout, audit.stdout + audit.stderr


# ---- the compiled client and the agent ---------------------------------------------------

README_CLIENT = "/opt/lap-pkcs11/.venv/bin/lap-pkcs11-client"
README_AGENT_SOCKET = "/run/lap-pkcs11/agent.sock"


def readme_section_blocks(heading):
    text = README.read_text()
    start = text.index(heading)
    section = text[start:text.index("\n## ", start + 1)]
    return re.findall(r"```bash\n(.*?)```", section, re.S)


@pytest.fixture(scope="session")
def installed_client():
    """lap-pkcs11-client beside lap-pkcs11, built from this tree as scripts/setup.sh does."""
    result = subprocess.run([LAP, "install-client"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return Path(result.stdout.split(" ", 1)[1].strip())


def test_the_gateway_signs_through_the_compiled_client_and_the_agent(gateway, setup, tool_server,
                                                                     installed_client):
    """The README's agent configuration: the agent's socket in the signer's env file, and
    the gateway's lines as pubkey prints them (the compiled client's command)."""
    from test_agent import Agent as SigningAgent

    config_setup, public = setup
    workdir = config_setup.workdir
    signer = SigningAgent(config_setup.token, workdir, name="agent")
    try:
        (line,) = [line for block in readme_section_blocks("## The compiled client")
                   for line in block.splitlines() if line.startswith("LAP_PKCS11_AGENT_SOCKET=")]
        config_setup.write_signer_env(line.replace(README_AGENT_SOCKET, str(signer.path)))
        printed = config_setup.pubkey("gateway-env")
        (block,) = [b for b in readme_section_blocks("## The compiled client")
                    if b.startswith("LAP_GATEWAY_SIGNING_CMD=")]
        assert printed == block.replace(README_CLIENT, str(installed_client)).replace(
            README_AGENT_SOCKET, str(signer.path)).replace("<64 hex>", public.hex())
        config = envfile.parse(printed)
        assert shlex.split(config["LAP_GATEWAY_SIGNING_CMD"])[0] == str(installed_client)
        running = RunningGateway(gateway, config_setup.gateway_env(tool_server, config), workdir)
        try:
            agent = Agent(running)
            for _ in range(3):
                agent.tool_call()
            signer.stop()  # the agent is gone: the error's name reaches the deny reason
            agent.denied("SIGNER_UNAVAILABLE")
            assert running.process.poll() is None
        finally:
            running.stop()
    finally:
        signer.close()
    kid = config["LAP_GATEWAY_SIGNING_KEY_ID"]
    verdicts = verify_with_the_gateway(gateway, agent, {"token key": {kid: public.hex()},
                                                        "other key": {kid: OTHER_KEY}})
    assert verdicts["token key"] == {"tokens": [True] * 3, "receipts": [True] * 3}
    assert verdicts["other key"] == {"tokens": [False] * 3, "receipts": [False] * 3}


def test_a_gateway_pinned_to_another_key_fails_its_first_tool_call(gateway, setup, tool_server,
                                                                   installed_client):
    """What the compiled client leaves to the agent and the gateway: with an agent whose key
    is not the gateway's, the gateway's own check of its capability token refuses the
    first invoke, and no receipt is signed."""
    from test_agent import Agent as SigningAgent

    config_setup, public = setup
    workdir = config_setup.workdir
    signer = SigningAgent(config_setup.token, workdir, name="agent")
    try:
        config = {"LAP_GATEWAY_SIGNING_CMD": f"{installed_client} --socket {signer.path} "
                                             "--input base64",
                  "LAP_GATEWAY_PUBLIC_KEY_HEX": OTHER_KEY}
        running = RunningGateway(gateway, config_setup.gateway_env(tool_server, config), workdir)
        try:
            agent = Agent(running)
            decision = agent.evaluate()
            assert decision["outcome"] == "approve", decision  # the token: signed by the agent
            status, body = running.call("POST", "/v1/tools/http/invoke", {
                "tool_name": "http", "operation": "execute", "params": {},
                "capability_token": decision["capability_token"], "nonce": "n-1"}, agent.headers)
            assert not body.get("success") and not body.get("receipt"), (status, body)
            assert "INVALID_SIGNATURE" in body.get("error", ""), body
            assert tool_server.calls == 0
        finally:
            running.stop()
    finally:
        signer.close()
