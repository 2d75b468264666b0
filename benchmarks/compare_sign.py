#!/usr/bin/env python3
"""Benchmark: two or more `lap-pkcs11` installs' `sign` against bare pkcs11-tool, interleaved.

Usage: python benchmarks/compare_sign.py ROUNDS NAME=PATH/TO/lap-pkcs11 [NAME=PATH ...]

For comparing two versions of the signer in one run (e.g. before and after a
change, each installed in its own non-editable venv): a throwaway SoftHSM2 token
with one Ed25519 key, a 700-byte message sent as base64 the way the gateway
sends it, every variant once per round in turn, p50 and its ratio to bare
pkcs11-tool printed. Nothing is asserted: it prints numbers.

The order of the variants is reversed every other round, and each variant after
the first is also compared with the first one (say, before=) round by round: the
median of those paired differences, with an approximate 95% confidence interval
(order statistics), is steadier on a noisy machine than a difference of p50s.
"""

import base64
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sign_bench import LABEL, provision



def main(argv):
    rounds = int(argv[0])
    home = Path(tempfile.mkdtemp(prefix="lap-compare-"))
    module, env, tool = provision(home)
    message = os.urandom(700)
    (home / "msg").write_bytes(message)
    stdin = base64.b64encode(message) + b"\n"
    args = ["sign", "--module", module, "--token-label", LABEL, "--key-id", "01", "--input",
            "base64"]
    variants = {"bare": ([*tool, "--sign", "--mechanism", "EDDSA", "--id", "01",
                          "--input-file", str(home / "msg")], None)}
    for spec in argv[1:]:
        name, exe = spec.split("=", 1)
        variants[name] = ([exe, *args], stdin)
    samples = {name: [] for name in variants}
    names = list(variants)
    for round_number in range(rounds):
        for name in names if round_number % 2 == 0 else names[::-1]:
            command, data = variants[name]
            start = time.perf_counter()
            result = subprocess.run(command, input=data, env=env, capture_output=True)
            samples[name].append((time.perf_counter() - start) * 1000)
            if result.returncode != 0:
                sys.exit(f"{name} failed: {result.stderr.decode(errors='replace').strip()}")
    bare = statistics.median(samples["bare"])
    first = names[1] if len(names) > 1 else None
    for name, values in samples.items():
        p50 = statistics.median(values)
        line = f"{name:10s} p50 {p50:6.2f} ms  ratio {p50 / bare:5.2f}x"
        if first is not None and name not in ("bare", first):
            low, middle, high = paired_difference(values, samples[first])
            line += f"  vs {first}: {middle:+.2f} ms paired median (95% {low:+.2f}..{high:+.2f})"
        print(line)


def paired_difference(values, reference):
    """Median of the round-by-round differences, with an approximate 95% interval."""
    differences = sorted(a - b for a, b in zip(values, reference))
    n = len(differences)
    spread = 1.96 * n ** 0.5 / 2
    low = differences[max(int(n / 2 - spread), 0)]
    high = differences[min(int(n / 2 + spread), n - 1)]
    return low, statistics.median(differences), high


if __name__ == "__main__":
    main(sys.argv[1:])
