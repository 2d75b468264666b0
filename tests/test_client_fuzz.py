"""lap-pkcs11-client against thousands of generated answers from a FAKE signer.

Each case is an answer a broken or hostile signer could give: sign's own frames,
then the same cut short, grown past 64 KiB, with garbage headers, huge numbers,
NULs, escape sequences, flipped bytes or nothing but noise; sent at once, in a
slow trickle, before the request was read, or never. For every case the
compiled client must not crash (no death by a signal; in CI's sanitizer build
any AddressSanitizer or UBSan finding aborts it), must end within its deadline
(plus a generous margin for the machine), must exit 0 only with exactly the one
signature the signer sent, as sign prints it, and must otherwise print nothing
on stdout and one clean line with a known error name and its exit code on
stderr. A sample of the cases whose outcome does not depend on timing also runs
through the Python client: the two must agree byte for byte.

``LAP_FUZZ_CASES`` (default 2000) and ``LAP_FUZZ_SEED`` (default: fixed) change
the run; a failure names the seed and the case.
"""

import base64
import os
import random
import socket
import subprocess
import threading
import time

import pytest

from lap_pkcs11.per_signature import errors
from lap_pkcs11.per_signature.client_command import signature_of
from test_client import PYTHON_CLIENT, assert_same, base_env

CASES = int(os.environ.get("LAP_FUZZ_CASES", "2000"))
SEED = int(os.environ.get("LAP_FUZZ_SEED", "20260113"))
DEADLINE_MS = 300
# Generous: process start on a loaded machine, and the 200 ms a full stdout may take.
MARGIN_SECONDS = 3.0
NAMES = {}
_todo = [errors.SignerError]
while _todo:
    _cls = _todo.pop()
    _todo.extend(_cls.__subclasses__())
    if _cls is not errors.SignerError:
        NAMES[_cls.name] = _cls.exit_code
STDIN = base64.b64encode(b"\x00a LAP receipt\x00" * 40) + b"\n"


class Case:
    """One generated answer: its bytes, and how the FAKE signer delivers them."""

    __slots__ = ("number", "answer", "how", "what")

    def __init__(self, number, answer, how, what):
        self.number, self.answer, self.how, self.what = number, answer, how, what

    def __repr__(self):
        return f"case {self.number} (seed {SEED}): {self.what}, {self.how}, {self.answer[:120]!r}"


def frames(rng):
    """Answers as serve and the agent write them."""
    signature = rng.randbytes(64)
    name, code = rng.choice(sorted(NAMES.items()))
    line = f"lap-pkcs11: {name}: {rng.choice(['the PIN was wrong', 'x', ''])}\n".encode()
    return [b"LAP1 0 OK\n" + base64.b64encode(signature) + b"\n",
            b"LAP1 0 OK\n" + signature.hex().encode() + b"\n",
            b"LAP1 0 OK\n" + signature,
            b"LAP1 %d %s\n" % (code, name.encode()) + line,
            b"LAP1 %d %s\n" % (code, name.encode())]


NOISE = [b"\x00", b"\x1b[2J", b"\x1b]0;owned\x07", b"\xc2\x9b31m", b"\xc2\x90x\xc2\x9c", b"\r",
         b"\n", b" ", b"\xff", b"\xe2\x80\xae", b"\x1b", b"\x7f", b"=", b"LAP1 ", b"OK", b"\t"]


def mutate(rng, frame):
    """(answer, what was done to it)."""
    kind = rng.randrange(15)
    if kind == 0:
        return frame, "as written"
    if kind == 1:
        cut = rng.randrange(len(frame) + 1)
        return frame[:cut], f"cut at {cut}"
    if kind == 2:
        return frame + rng.randbytes(rng.randrange(1, 300)), "noise after"
    if kind == 3:
        size = rng.choice([65536 - 10, 65536 - 9, 65537, 70000, 200000])
        return frame + bytes([rng.randrange(256)]) * size, f"grown by {size}"
    if kind == 4:
        digits = "".join(rng.choice("0123456789") for _ in range(rng.randrange(1, 40)))
        return b"LAP1 " + digits.encode() + b" " + frame.split(b" ", 2)[-1], "a huge code"
    if kind == 5:
        junk = bytes(rng.choice(b"abcXYZ_019 \x00-.:") for _ in range(rng.randrange(0, 60)))
        head, _, rest = frame.partition(b"\n")
        return b" ".join(head.split(b" ")[:2]) + b" " + junk + b"\n" + rest, "a junk name"
    if kind == 6:
        data = bytearray(frame)
        for _ in range(rng.randrange(1, 6)):
            data.insert(rng.randrange(len(data) + 1), 0)
        return bytes(data), "NULs inserted"
    if kind == 7:
        data = bytearray(frame)
        for _ in range(rng.randrange(1, 4)):
            if data:
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        return bytes(data), "bits flipped"
    if kind == 8:
        data = bytearray(frame)
        for _ in range(rng.randrange(1, 8)):
            data[rng.randrange(len(data) + 1):0] = rng.choice(NOISE)
        return bytes(data), "escapes inserted"
    if kind == 9:
        return rng.randbytes(rng.randrange(0, 200)), "noise only"
    if kind == 10:
        return b"", "nothing"
    if kind == 11:
        return frame.replace(b"\n", b"", 1), "no header end"
    if kind == 12:
        return frame + frame, "twice"
    if kind == 13:
        return b"LAP1 0 OK\n" + rng.randbytes(rng.choice([63, 64, 65, 88, 89, 128, 129])), \
            "a body of signature size"
    return frame.upper() if rng.random() < 0.5 else frame.lower(), "case changed"


def generate(count):
    rng = random.Random(SEED)
    cases = []
    for number in range(count):
        answer, what = mutate(rng, rng.choice(frames(rng)))
        roll = rng.random()
        how = ("at once" if roll < 0.80 else "before reading" if roll < 0.90 else
               "quick trickle" if roll < 0.96 else "slow trickle" if roll < 0.985 else
               "held open" if roll < 0.995 else "silent")
        cases.append(Case(number, answer, how, what))
    return cases


class Signer:
    """The FAKE signer: serves each connection with the current case, in its own thread."""

    def __init__(self, path):
        self.path = path
        self.case = None
        self.stop = threading.Event()
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(16)
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self):
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(connection, self.case), daemon=True).start()

    def _serve(self, connection, case):
        with connection:
            connection.settimeout(10)
            try:
                if case.how != "before reading":
                    while connection.recv(65536):
                        pass
                if case.how in ("at once", "before reading"):
                    connection.sendall(case.answer)
                elif case.how in ("quick trickle", "slow trickle"):
                    pause = 0.001 if case.how == "quick trickle" else 0.05
                    for start in range(0, len(case.answer), 7):
                        if self.stop.wait(pause):
                            return
                        connection.sendall(case.answer[start:start + 7])
                elif case.how == "held open":
                    connection.sendall(case.answer)
                    self.stop.wait(DEADLINE_MS / 1000 + MARGIN_SECONDS)
                else:
                    self.stop.wait(DEADLINE_MS / 1000 + MARGIN_SECONDS)
            except OSError:
                pass

    def close(self):
        self.stop.set()
        try:
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.listener.close()
        self.thread.join(10)


def run(argv, path):
    started = time.monotonic()
    result = subprocess.run([*argv, "--socket", str(path)], input=STDIN, capture_output=True,
                            env=base_env(LAP_PKCS11_CLIENT_TIMEOUT_MS=str(DEADLINE_MS)),
                            timeout=DEADLINE_MS / 1000 + 30)
    return result, time.monotonic() - started


def check(case, result, elapsed):
    assert result.returncode >= 0, f"killed by signal {-result.returncode}: {case}"
    assert elapsed < DEADLINE_MS / 1000 + MARGIN_SECONDS, f"took {elapsed:.2f} s: {case}"
    if result.returncode == 0:
        header, newline, body = case.answer.partition(b"\n")
        assert header == b"LAP1 0 OK" and newline and signature_of(body) is not None, \
            f"exit 0 without one signature: {case}"
        assert result.stdout == body and result.stderr == b"", case
        return
    assert result.stdout == b"", f"stdout not empty: {case}"
    line = result.stderr.decode("ascii", "replace")
    assert line.endswith("\n") and line.count("\n") == 1, f"{line!r}: {case}"
    assert line.isascii() and line[:-1].isprintable(), f"{line!r}: {case}"
    assert line.startswith("lap-pkcs11: ") and line.count(": ") >= 2, f"{line!r}: {case}"
    name = line.split(": ", 2)[1]
    assert NAMES.get(name) == result.returncode, f"{line!r} with exit {result.returncode}: {case}"


@pytest.fixture
def signer(tmp_path):
    server = Signer(tmp_path / "fuzz.sock")
    yield server
    server.close()


def test_generated_answers_never_crash_hang_or_pass_without_a_signature(signer, compiled_client):
    seen = {"ok": 0, "error": 0, "slow": 0}
    compared = 0
    for case in generate(CASES):
        signer.case = case
        result, elapsed = run([str(compiled_client)], signer.path)
        check(case, result, elapsed)
        seen["ok" if result.returncode == 0 else "error"] += 1
        seen["slow"] += case.how in ("slow trickle", "held open", "silent")
        # Whether a quick answer arrives before the deadline, or one sent before the
        # request was read arrives at all, is timing; the rest must be the same bytes.
        if case.number % 10 == 0 and case.how == "at once":
            reference, _ = run(PYTHON_CLIENT, signer.path)
            assert_same(result, reference)
            compared += 1
    # The generator reaches every outcome (else the test would prove little).
    assert seen["ok"] > CASES // 50 and seen["error"] > CASES // 2 and seen["slow"] > 0, seen
    assert compared >= CASES // 20, compared
