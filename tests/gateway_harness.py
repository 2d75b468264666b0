"""The real LAP gateway as tests/test_gateway_e2e.py and benchmarks/gateway_bench.py run it.

The gateway (lattice-audit-protocol, from the archive in ../shared/lap, or
$LAP_GATEWAY_SRC_DIR) is installed once with its `gateway` extra into a venv
cached under /var/tmp (or $LAP_TEST_GATEWAY_CACHE), keyed by the archive's hash
and the Python version; a lock makes concurrent runs build it once. Around it:
the tool server it calls on 127.0.0.1, a free port, and evidence it approves.
"""

import fcntl
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ARCHIVE_PATTERN = "lattice-audit-protocol-*.tar.xz"


def gateway_archive():
    """The gateway's source archive: beside the clone, else in $LAP_GATEWAY_SRC_DIR; or None."""
    for folder in (ROOT.parent / "shared" / "lap", os.environ.get("LAP_GATEWAY_SRC_DIR")):
        if folder and Path(folder).is_dir():
            found = sorted(Path(folder).glob(ARCHIVE_PATTERN))
            if found:
                return found[-1]
    return None


def install_gateway(archive):
    """The folder of the gateway installed from ``archive`` (src/ and venv/), built once."""
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()[:16]
    cache = Path(os.environ.get("LAP_TEST_GATEWAY_CACHE", "/var/tmp/lap-pkcs11-gateway"))
    cache.mkdir(parents=True, exist_ok=True)
    home = cache / f"{digest}-py{sys.version_info[0]}{sys.version_info[1]}"
    with open(cache / f"{home.name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # concurrent runs build it once
        if not (home / "ready").exists():
            shutil.rmtree(home, ignore_errors=True)
            (home / "src").mkdir(parents=True)
            subprocess.run(["tar", "-xJf", archive, "-C", home / "src"], check=True)
            source = next(path for path in (home / "src").iterdir() if path.is_dir())
            subprocess.run([sys.executable, "-m", "venv", home / "venv"], check=True)
            pip = subprocess.run([home / "venv" / "bin" / "python", "-m", "pip", "install", "-q",
                                  "--disable-pip-version-check", f"{source}[gateway]"],
                                 capture_output=True, text=True, timeout=900)
            if pip.returncode != 0:
                raise RuntimeError(f"installing the gateway failed:\n{pip.stderr[-3000:]}")
            (home / "ready").write_text(f"{archive.name} {digest}\n")
    return home


class ToolServer:
    """The tool behind the gateway: answers every POST with what it got, counts calls."""

    def __init__(self):
        self.calls = 0
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                size = int(self.headers.get("Content-Length") or 0)
                body = json.dumps({"ok": True, "received": json.loads(self.rfile.read(size) or
                                                                      b"{}")}).encode()
                owner.calls += 1
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def request(base, method, path, payload=None, headers=None, timeout=60):
    """One JSON request to the gateway at ``base``: (status, decoded body)."""
    data = json.dumps(payload).encode() if payload is not None else None
    message = urllib.request.Request(base + path, data=data, method=method, headers={
        "Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(message, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def evidence(action_id, purpose):
    """Evidence the gateway approves at T2 (as its own demo sends), for a ``purpose``
    ("end-to-end test", "benchmark")."""
    return {
        "action_id": action_id,
        "description": f"lap-pkcs11 {purpose} action; long enough to pass the evidence "
                       "quality minimum of the gateway.",
        "timestamp_utc": "2026-01-13T00:00:00Z",
        "irreversibility": {"score": 0.35, "reversibility_plan": f"Nothing outside the {purpose} "
                                                                "changes."},
        "outcome_delta": {"summary": "A local echo tool; no side effects."},
        "necessity_confidence": 0.9, "novelty_loss_estimate": 0.0, "novelty_method": "none",
        "suffering_risk_estimate": 0.1, "suffering_method": "heuristic",
        "provenance": {"lap_pkcs11": purpose}, "alternatives": [{"description": "Skip the call."}],
        "attestations": [],
    }
