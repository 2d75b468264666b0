#!/usr/bin/env python3
"""Benchmark: lap-pkcs11 agent against bare pkcs11-tool, interleaved, on a SoftHSM2 token.

Usage: .venv/bin/python benchmarks/agent_bench.py [--rounds N] [--size BYTES] [--throughput N]

Makes a throwaway SoftHSM2 token with one Ed25519 key and starts `lap-pkcs11
agent` on it. Then, per round and in turn (so load changes hit all alike), it
times from spawn to exit, as the LAP gateway does:

- bare `pkcs11-tool --sign` (the floor every ratio is taken against),
- `/bin/true` (what starting any process costs here),
- the venv's `python -c pass` (the interpreter's own start, which any Python
  client pays before its first line runs),
- `lap-pkcs11 client` -> agent (the framed protocol),
- `lap-pkcs11-client` -> agent (the same contract compiled: the one installed
  beside lap-pkcs11 when it is this version's, else built here by the
  install-client code),
- `socat -t 2 - UNIX-CONNECT:` -> agent (the gateway's line protocol).

It prints p50 and p95 in ms and the p50 ratio to bare pkcs11-tool; for the
client also what it adds above `python -c pass`. Then the agent's own service
time (last byte received to answer sent, from its journal lines) and the
in-agent throughput of one worker (TokenSession.sign, which signs and verifies,
called in a loop in this process). Nothing is asserted: it prints numbers.
"""

import argparse
import base64
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sign_bench import LABEL, PIN, provision

def start_agent(home, module, env, bin_dir):
    path = home / "agent.sock"
    pin = home / "pin"
    pin.write_text(PIN + "\n")
    pin.chmod(0o600)
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(home / "notify"))
    notify.settimeout(30)
    agent_env = {k: v for k, v in env.items() if k != "PKCS11_PIN"}
    agent_env.update(LAP_PKCS11_MODULE=module, LAP_PKCS11_TOKEN_LABEL=LABEL,
                     LAP_PKCS11_KEY_ID="01", LAP_PKCS11_INPUT="base64",
                     NOTIFY_SOCKET=str(home / "notify"))
    log = open(home / "agent.log", "wb")
    proc = subprocess.Popen([str(bin_dir / "lap-pkcs11"), "agent", "--pin-file", str(pin),
                             "--socket", str(path)], env=agent_env, stderr=log,
                            stdout=subprocess.DEVNULL)
    while b"READY=1" not in notify.recv(4096):
        pass
    notify.close()
    return proc, path, home / "agent.log"


def compiled_client(bin_dir, home):
    """lap-pkcs11-client: the installed one when it is this version's, else one built here."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from lap_pkcs11.admin import compiled_client as build

    path, current = build.state(bin_dir)
    if path is not None and current:
        return path, "installed"
    return build.build(home / build.NAME), "built for this run"


def variants(env, tool, message_file, bin_dir, path, client):
    """name -> (argv, stdin bytes, environment)."""
    message = message_file.read_bytes()
    gateway_stdin = base64.b64encode(message) + b"\n"
    plain = {"PATH": env["PATH"]}
    return {
        "bare pkcs11-tool --sign": (
            [*tool, "--sign", "--mechanism", "EDDSA", "--id", "01", "--input-file",
             str(message_file)], b"", env),
        "/bin/true (process start)": (["/bin/true"], b"", plain),
        "venv python -c pass (interpreter start)": (
            [str(bin_dir / "python"), "-c", "pass"], b"", plain),
        "lap-pkcs11 client -> agent": (
            [str(bin_dir / "lap-pkcs11"), "client", "--socket", str(path)], gateway_stdin, plain),
        "lap-pkcs11-client -> agent": (
            [str(client), "--socket", str(path)], gateway_stdin, plain),
        "socat -t 2 - UNIX-CONNECT: -> agent": (
            [shutil.which("socat"), "-t", "2", "-", f"UNIX-CONNECT:{path}"], gateway_stdin,
            plain),
    }


def timed(argv, stdin, env):
    start = time.perf_counter()
    proc = subprocess.run(argv, input=stdin, env=env, capture_output=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0 or (argv[0] != "/bin/true" and argv[-1] != "pass" and
                                len(proc.stdout) not in (89, 129, 64)):
        sys.exit(f"{argv[0]} failed: {proc.stderr.decode(errors='replace').strip()}")
    return elapsed


def percentile(values, fraction):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(fraction * (len(values) - 1))))]


def service_times(log_path, protocol):
    text = log_path.read_text(errors="replace")
    return [float(ms) for ms in re.findall(
        rf"^<6>request outcome=OK protocol={protocol} .* ms=(\d+\.\d+)$", text, re.M)]


def in_agent_throughput(module, env, count, size):
    """Signatures per second of one worker: TokenSession.sign (sign + verify) in a loop."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    os.environ["SOFTHSM2_CONF"] = env["SOFTHSM2_CONF"]
    from lap_pkcs11.per_signature import config as configuration
    from lap_pkcs11.agent.metrics import Metrics
    from lap_pkcs11.backends.pkcs11_session import TokenSession
    from lap_pkcs11.agent.cli import Secret

    config = configuration.resolve({"module": module, "token_label": LABEL, "key_id": "01"},
                                   {})
    session = TokenSession(config, Secret(PIN), None, 1, lambda *_: None, Metrics(1),
                           lambda _: None)
    session.start()
    rates = []
    for message_size in (size, 2048, 65536):
        message = os.urandom(message_size)
        n = count if message_size < 65536 else max(count // 8, 50)
        deadline = time.monotonic() + 3600
        session.sign(0, message, deadline)
        start = time.perf_counter()
        for _ in range(n):
            session.sign(0, message, deadline)
        rates.append((message_size, n / (time.perf_counter() - start)))
    session.close()
    return rates


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--size", type=int, default=700, help="message size in bytes")
    parser.add_argument("--throughput", type=int, default=4000,
                        help="signatures for the in-agent throughput loop")
    args = parser.parse_args()
    for program in ("pkcs11-tool", "softhsm2-util", "socat"):
        if not shutil.which(program):
            sys.exit(f"needs {program}: apt-get install opensc softhsm2 socat")
    bin_dir = Path(sys.executable).parent
    with tempfile.TemporaryDirectory(prefix="lap-agent-bench-") as folder:
        home = Path(folder)
        module, env, tool = provision(home)
        message_file = home / "message"
        message_file.write_bytes(os.urandom(args.size))
        agent, path, log_path = start_agent(home, module, env, bin_dir)
        client, client_origin = compiled_client(bin_dir, home)
        try:
            rows = variants(env, tool, message_file, bin_dir, path, client)
            for argv, stdin, row_env in rows.values():  # warm caches once, untimed
                timed(argv, stdin, row_env)
            samples = {name: [] for name in rows}
            for _ in range(args.rounds):
                for name, (argv, stdin, row_env) in rows.items():
                    samples[name].append(timed(argv, stdin, row_env) * 1000)
            agent.terminate()
            agent.wait(timeout=30)
            service = {protocol: service_times(log_path, protocol) for protocol in ("lap1", "line")}
        finally:
            if agent.poll() is None:
                agent.kill()
        rates = in_agent_throughput(module, env, args.throughput, args.size)
    floor = statistics.median(samples["bare pkcs11-tool --sign"])
    interpreter = statistics.median(samples["venv python -c pass (interpreter start)"])
    print(f"{args.rounds} rounds, {args.size}-byte message, interleaved; "
          f"python {sys.version.split()[0]}, {os.cpu_count()} cpus, load "
          f"{os.getloadavg()[0]:.2f}; lap-pkcs11-client {client_origin}")
    print(f"| {'variant':<42} | {'p50 ms':>7} | {'p95 ms':>7} | {'p50 ratio':>9} |")
    print(f"|{'-' * 44}|{'-' * 9}|{'-' * 9}|{'-' * 11}|")
    for name, values in samples.items():
        p50 = statistics.median(values)
        print(f"| {name:<42} | {p50:7.1f} | {percentile(values, 0.95):7.1f} | "
              f"{p50 / floor:8.2f}x |")
    client = statistics.median(samples["lap-pkcs11 client -> agent"])
    print(f"client above the interpreter's start: {client - interpreter:.1f} ms = "
          f"{(client - interpreter) / floor:.2f}x bare pkcs11-tool")
    start = statistics.median(samples["/bin/true (process start)"])
    compiled = statistics.median(samples["lap-pkcs11-client -> agent"])
    print(f"lap-pkcs11-client above /bin/true: {compiled - start:.1f} ms = "
          f"{(compiled - start) / floor:.2f}x bare pkcs11-tool")
    for protocol, values in service.items():
        print(f"agent service time ({protocol}, last byte in to answer out, from its journal): "
              f"p50 {statistics.median(values):.2f} ms, p95 {percentile(values, 0.95):.2f} ms, "
              f"n={len(values)}")
    for size, rate in rates:
        print(f"in-agent throughput, one worker, {size}-byte messages (sign + verify): "
              f"{rate:.0f} signatures/s")


if __name__ == "__main__":
    main()
