#!/usr/bin/env python3
"""Benchmark: the LAP gateway's tool calls per second, hard key through the agent vs in-process key.

Usage: .venv/bin/python benchmarks/gateway_bench.py [--rounds N] [--calls N] [--python-client]

The real gateway, installed as tests/test_gateway_e2e.py installs it (from
../shared/lap or $LAP_GATEWAY_SRC_DIR into a venv cached under /var/tmp, or
$LAP_TEST_GATEWAY_CACHE), runs on 127.0.0.1 in two (or three) configurations,
each its own `lap-gateway` process with its own database, next to one tool
server on 127.0.0.1:

- in-process key: LAP_GATEWAY_SIGNING_KEY (a software seed), the gateway's
  fastest configuration and the reference of every ratio;
- hard key, `lap-pkcs11-client` -> `lap-pkcs11 agent` on a SoftHSM2 token:
  LAP_GATEWAY_SIGNING_CMD as `lap-pkcs11 pubkey --socket ... --format
  gateway-env` prints it;
- with --python-client, the same through `lap-pkcs11 client`.

A tool call is what an agent does: evaluate (the gateway signs a capability
token) and invoke through the tool server (it signs a receipt and an audit
record), one after the other from one client. Per round every configuration
makes --calls tool calls in turn, so that load changes hit all alike; the
loops are bounded and every request has a timeout. It prints calls per second
per configuration and the ratio to the in-process key. Nothing is asserted.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
from agent_bench import compiled_client, start_agent  # noqa: E402
from sign_bench import LABEL, provision  # noqa: E402
from gateway_harness import (ARCHIVE_PATTERN, ToolServer, evidence, free_port,  # noqa: E402
                             gateway_archive, install_gateway, request)

API_KEY, AGENT_ID = "bench-key-1", "bench_agent"
HEALTH_SECONDS = 60


def gateway_install():
    """The gateway's bin directory: the cached venv of tests/test_gateway_e2e.py, or a new one."""
    archive = gateway_archive()
    if archive is None:
        sys.exit(f"the gateway's archive ({ARCHIVE_PATTERN}) is in neither ../shared/lap nor "
                 "$LAP_GATEWAY_SRC_DIR")
    return install_gateway(archive) / "venv" / "bin"


class Gateway:
    """One `lap-gateway` on 127.0.0.1 with its own database, and a client session on it."""

    def __init__(self, bin_dir, name, config, home, tool_url):
        self.name = name
        self.workdir = home / name
        self.workdir.mkdir()
        self.base = f"http://127.0.0.1:{free_port()}"
        env = {"PATH": os.environ["PATH"], "HOME": str(self.workdir), "LANG": "C.UTF-8",
               "LAP_GATEWAY_DB_PATH": str(self.workdir / "gateway.db"),
               "LAP_HTTP_TOOL_URL": tool_url, "LAP_API_KEYS_JSON": json.dumps({API_KEY: AGENT_ID}),
               **config}
        self.log = open(self.workdir / "gateway.log", "wb")
        self.process = subprocess.Popen(
            [bin_dir / "lap-gateway", "--host", "127.0.0.1", "--port", self.base.rsplit(":", 1)[1]],
            env=env, cwd=self.workdir, stdout=self.log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + HEALTH_SECONDS
        while True:
            if self.process.poll() is not None:
                sys.exit(f"{name}: the gateway exited; see {self.workdir / 'gateway.log'}")
            try:
                if self.call("GET", "/v1/health", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                sys.exit(f"{name}: the gateway did not become healthy")
            time.sleep(0.2)
        status, body = self.call("POST", "/v1/session/new", {"ttl_seconds": 3600})
        if status != 200:
            sys.exit(f"{name}: no session: {body}")
        self.session = {"X-Session-Id": body["session_id"]}
        self.count = 0

    def call(self, method, path, payload=None, headers=None, timeout=30):
        return request(self.base, method, path, payload,
                       {"X-Api-Key": API_KEY, "X-Agent-Id": AGENT_ID, **(headers or {})}, timeout)

    def tool_call(self):
        """evaluate, then invoke with the capability token: three signatures."""
        self.count += 1
        status, decision = self.call("POST", "/v1/evaluate",
                                     evidence(f"BENCH_{self.count}", "benchmark"), self.session)
        if status != 200 or decision.get("outcome") != "approve":
            sys.exit(f"{self.name}: evaluate failed: {status} {decision}")
        status, body = self.call("POST", "/v1/tools/http/invoke", {
            "tool_name": "http", "operation": "execute", "params": {"n": self.count},
            "capability_token": decision["capability_token"], "nonce": f"nonce-{self.count}"},
            self.session)
        if status != 200 or not body.get("success") or not body.get("receipt"):
            sys.exit(f"{self.name}: invoke failed: {status} {body}")

    def close(self):
        if self.process.poll() is None:
            os.killpg(self.process.pid, 15)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, 9)
                self.process.wait(10)
        self.log.close()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--calls", type=int, default=10, help="tool calls per round and gateway")
    parser.add_argument("--python-client", action="store_true",
                        help="also through `lap-pkcs11 client` (the interpreter per signature)")
    args = parser.parse_args()
    for program in ("pkcs11-tool", "softhsm2-util"):
        if not shutil.which(program):
            sys.exit(f"needs {program}: apt-get install opensc softhsm2")
    gateway_bin = gateway_install()
    bin_dir = Path(sys.executable).parent
    with tempfile.TemporaryDirectory(prefix="lap-gateway-bench-") as folder:
        home = Path(folder)
        module, env, tool = provision(home)
        agent, path, _ = start_agent(home, module, env, bin_dir)
        client, client_origin = compiled_client(bin_dir, home)
        tools = ToolServer()
        gateways = []
        try:
            public = subprocess.run(
                [str(bin_dir / "lap-pkcs11"), "pubkey", "--module", module, "--token-label", LABEL,
                 "--key-id", "01"], env=env, capture_output=True, text=True, check=True,
                timeout=120).stdout.strip()
            hard = {"LAP_GATEWAY_PUBLIC_KEY_HEX": public, "LAP_GATEWAY_SIGNING_KEY_ID": "gw-1",
                    "LAP_GATEWAY_SIGNING_CMD_TIMEOUT_SECONDS": "2.0"}
            configs = {
                "in-process key (LAP_GATEWAY_SIGNING_KEY)": {
                    "LAP_GATEWAY_SIGNING_KEY": os.urandom(32).hex()},
                "hard key: lap-pkcs11-client -> agent": dict(
                    hard, LAP_GATEWAY_SIGNING_CMD=f"{client} --socket {path} --input base64"),
            }
            if args.python_client:
                configs["hard key: lap-pkcs11 client -> agent"] = dict(
                    hard, LAP_GATEWAY_SIGNING_CMD=f"{bin_dir / 'lap-pkcs11'} client --socket "
                                                  f"{path} --input base64")
            for index, (name, config) in enumerate(configs.items()):
                gateways.append(Gateway(gateway_bin, f"gateway{index}", config, home, tools.url))
                gateways[-1].name = name
            for gateway in gateways:  # warm up, untimed
                for _ in range(3):
                    gateway.tool_call()
            seconds = {gateway.name: [] for gateway in gateways}
            for _ in range(args.rounds):
                for gateway in gateways:
                    start = time.perf_counter()
                    for _ in range(args.calls):
                        gateway.tool_call()
                    seconds[gateway.name].append(time.perf_counter() - start)
        finally:
            for gateway in gateways:
                gateway.close()
            tools.close()
            agent.terminate()
            agent.wait(timeout=30)
    total = args.rounds * args.calls
    reference = total / sum(seconds[gateways[0].name])
    print(f"{args.rounds} rounds of {args.calls} tool calls (evaluate + invoke: 3 signatures) "
          f"per gateway, interleaved; {os.cpu_count()} cpus, load {os.getloadavg()[0]:.2f}; "
          f"lap-pkcs11-client {client_origin}")
    print(f"| {'gateway signing key':<40} | {'calls/s':>7} | {'ms/call p50':>11} | {'ratio':>6} |")
    print(f"|{'-' * 42}|{'-' * 9}|{'-' * 13}|{'-' * 8}|")
    for name, values in seconds.items():
        rate = total / sum(values)
        per_call = statistics.median(values) / args.calls * 1000
        print(f"| {name:<40} | {rate:7.1f} | {per_call:11.1f} | {rate / reference:5.2f}x |")


if __name__ == "__main__":
    main()
