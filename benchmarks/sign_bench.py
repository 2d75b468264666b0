#!/usr/bin/env python3
"""Benchmark: lap-pkcs11 sign against bare pkcs11-tool, interleaved, on a SoftHSM2 token.

Usage: .venv/bin/python benchmarks/sign_bench.py [--rounds N] [--size BYTES]

Makes a throwaway SoftHSM2 token with one Ed25519 key, then runs every variant
once per round, in turn, so that load changes hit all variants alike. Each call
is timed from spawn to exit, the way the LAP gateway times it (subprocess with
stdin and stdout pipes). Prints p50 and p95 in milliseconds and the p50 ratio
to bare pkcs11-tool (the floor). Nothing here is asserted: it prints numbers.
"""

import argparse
import base64
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODULES = ("/usr/lib/softhsm/libsofthsm2.so", "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
           "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so")
PIN = "246813"
LABEL = "lap-bench"


def provision(home):
    """A SoftHSM2 token in ``home`` with one Ed25519 key (id 01): (module, environment
    without the caller's LAP_/SIGNER_/PKCS11/OPENSC variables, pkcs11-tool's argv
    logged in to it). The benchmarks of this folder share it."""
    module = next(path for path in MODULES if os.path.exists(path))
    (home / "tokens").mkdir()
    conf = home / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {home / 'tokens'}\nobjectstore.backend = file\n"
                    "log.level = ERROR\n")
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("LAP_", "SIGNER_", "PKCS11", "OPENSC"))}
    env.update(SOFTHSM2_CONF=str(conf), PKCS11_PIN=PIN, XDG_RUNTIME_DIR=str(home))
    subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", LABEL, "--so-pin",
                    "97531864", "--pin", PIN], env=env, check=True, capture_output=True)
    tool = ["pkcs11-tool", "--module", module, "--token-label", LABEL, "--login", "--pin",
            "env:PKCS11_PIN"]
    subprocess.run([*tool, "--keypairgen", "--key-type", "EC:edwards25519", "--id", "01",
                    "--label", "bench"], env=env, check=True, capture_output=True)
    return module, env, tool


def public_key_hex(tool, env):
    """The key's public key, read by the package's own listing parser (0.27 prints
    "EC Point:", wrapped)."""
    from lap_pkcs11.backends.pkcs11_tool import parse_objects

    listing = subprocess.run([*tool, "--list-objects", "--type", "pubkey"], env=env, check=True,
                             capture_output=True, text=True).stdout
    (key,) = [obj for obj in parse_objects(listing) if obj.kind == "public key" and obj.id == "01"]
    return key.public_key().hex()


def start_socket_signer(home, module, env, bin_dir):
    """systemd-socket-activate running `lap-pkcs11 serve` per connection, as the unit does."""
    if not shutil.which("systemd-socket-activate"):
        return None, None
    path = home / "signer.sock"
    pin = home / "pin"
    pin.write_text(PIN + "\n")
    pin.chmod(0o600)  # the signer refuses a PIN file others may read
    settings = {"LAP_PKCS11_MODULE": module, "LAP_PKCS11_TOKEN_LABEL": LABEL,
                "LAP_PKCS11_KEY_ID": "01", "LAP_PKCS11_INPUT": "base64",
                "SOFTHSM2_CONF": env["SOFTHSM2_CONF"], "LAP_PKCS11_LOCK_DIR": str(home),
                "PATH": env["PATH"]}
    proc = subprocess.Popen(["systemd-socket-activate", "--accept", "--inetd", "-l", str(path),
                             *[f"-E{k}={v}" for k, v in settings.items()],
                             str(bin_dir / "lap-pkcs11"), "serve", "--pin-file", str(pin)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    while not path.exists():
        time.sleep(0.01)
    return proc, path


def variants(module, env, tool, public_hex, message_file, bin_dir, socket_path=None):
    """name -> (argv, stdin bytes, environment)."""
    message = message_file.read_bytes()
    gateway_stdin = base64.b64encode(message) + b"\n"
    sign = [str(bin_dir / "lap-pkcs11"), "sign", "--module", module, "--token-label", LABEL,
            "--key-id", "01"]
    rows = {
        "bare pkcs11-tool --sign": (
            [*tool, "--sign", "--mechanism", "EDDSA", "--id", "01", "--input-file",
             str(message_file)], b"", env),
        "lap-pkcs11 sign --input base64": ([*sign, "--input", "base64"], gateway_stdin, env),
        "  + pinned key check": ([*sign, "--input", "base64"], gateway_stdin,
                                 dict(env, LAP_GATEWAY_PUBLIC_KEY_HEX=public_hex)),
    }
    if socket_path is not None:
        rows["lap-pkcs11 client + socket-activated serve"] = (
            [str(bin_dir / "lap-pkcs11"), "client", "--socket", str(socket_path)],
            gateway_stdin, {"PATH": env["PATH"]})
    script = ROOT / "scripts" / "pkcs11_signer.sh"
    if script.exists():
        rows["scripts/pkcs11_signer.sh --input base64"] = (
            [str(script), "--module", module, "--token-label", LABEL, "--key-id", "01",
             "--input", "base64"], gateway_stdin, env)
        # What any bash signer with the contract's guarantees must at least run: no
        # parsing, no stdin, no checks; just the lock and the setpriv/setsid chain.
        floor = ('exec {l}<>"$0"; flock "$l"; '
                 'exec setsid -- timeout -s KILL 2 pkcs11-tool "$@"')
        rows["  (floor: bash + flock + setsid + timeout)"] = (
            ["/bin/bash", "-c", floor, str(message_file.parent / "floor.lock"),
             *tool[1:], "--sign", "--mechanism", "EDDSA", "--id", "01", "--input-file",
             str(message_file)], b"", env)
    return rows


def timed(argv, stdin, env):
    start = time.perf_counter()
    proc = subprocess.run(argv, input=stdin, env=env, capture_output=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{argv[0]} failed: {proc.stderr.decode(errors='replace').strip()}")
    return elapsed


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--size", type=int, default=700, help="message size in bytes")
    args = parser.parse_args()
    if not shutil.which("pkcs11-tool") or not shutil.which("softhsm2-util"):
        sys.exit("needs pkcs11-tool and softhsm2-util: apt-get install opensc softhsm2")
    bin_dir = Path(sys.executable).parent
    with tempfile.TemporaryDirectory(prefix="lap-bench-") as folder:
        home = Path(folder)
        module, env, tool = provision(home)
        public_hex = public_key_hex(tool, env)
        message_file = home / "message"
        message_file.write_bytes(os.urandom(args.size))
        server, socket_path = start_socket_signer(home, module, env, bin_dir)
        try:
            rows = variants(module, env, tool, public_hex, message_file, bin_dir, socket_path)
            for argv, stdin, row_env in rows.values():  # warm caches once, untimed
                timed(argv, stdin, row_env)
            samples = {name: [] for name in rows}
            for _ in range(args.rounds):
                for name, (argv, stdin, row_env) in rows.items():
                    samples[name].append(timed(argv, stdin, row_env) * 1000)
        finally:
            if server is not None:
                os.killpg(server.pid, 15)
                server.wait()
    floor = statistics.median(samples["bare pkcs11-tool --sign"])
    print(f"{args.rounds} rounds, {args.size}-byte message, interleaved; "
          f"python {sys.version.split()[0]}, {os.cpu_count()} cpus")
    print(f"| {'variant':<42} | {'p50 ms':>7} | {'p95 ms':>7} | {'p50 ratio':>9} |")
    print(f"|{'-' * 44}|{'-' * 9}|{'-' * 9}|{'-' * 11}|")
    for name, values in samples.items():
        values.sort()
        p50 = statistics.median(values)
        p95 = values[min(len(values) - 1, int(round(0.95 * (len(values) - 1))))]
        print(f"| {name:<42} | {p50:7.1f} | {p95:7.1f} | {p50 / floor:8.2f}x |")


if __name__ == "__main__":
    main()
