"""The PIN guard: a PIN the token rejected is never tried again (real tokens lock),
in both implementations and across them."""

import os
import subprocess
import sys
from pathlib import Path

from conftest import IMPLEMENTATIONS, USER_PIN, assert_failure, gateway_decode, verify
from test_sign_errors import fake

WRONG = "135790"
LAP = str(Path(sys.executable).parent / "lap-pkcs11")


def reached_the_tool(record):
    """Whether the (FAKE passthrough) tool ran since the record was last cleared."""
    ran = record.exists()
    if ran:
        record.unlink()
    return ran


def test_a_rejected_pin_is_not_tried_again_until_it_works(signer, keyed):
    token, public = keyed
    record = token.home / "record"
    env, args = fake(token, "passthrough", record)
    wrong = dict(env, PKCS11_PIN=WRONG)
    first = signer(args, b"m", env=wrong, cwd=token.home)
    assert_failure(first, "PIN_INCORRECT", 77, pin=WRONG)
    assert reached_the_tool(record)
    again = signer(args, b"m", env=wrong, cwd=token.home)
    assert_failure(again, "PIN_INCORRECT", 77, pin=WRONG)
    assert b"not tried again" in again.stderr
    assert not reached_the_tool(record), "the rejected PIN was sent to the token again"
    # The right PIN is a different PIN: it is tried, works, and clears the memory.
    right = signer(args, b"m", env=env, cwd=token.home)
    assert right.returncode == 0, right.stderr
    verify(public, b"m", gateway_decode(right.stdout))
    assert reached_the_tool(record)
    assert_failure(signer(args, b"m", env=wrong, cwd=token.home), "PIN_INCORRECT", 77, pin=WRONG)
    assert reached_the_tool(record)


def test_the_guard_files_hold_no_pin(signer, keyed):
    token, _ = keyed
    signer(token.args(), b"m", env=dict(token.env, PKCS11_PIN=WRONG), cwd=token.home)
    state = token.home / "run" / f"lap-pkcs11-{os.geteuid()}"
    assert oct(state.stat().st_mode & 0o777) == "0o700"
    files = {path.name: path for path in state.iterdir()}
    marker = next(path for name, path in files.items() if name.endswith(".pin-rejected"))
    secret = files["secret"]
    for path in (marker, secret):
        assert oct(path.stat().st_mode & 0o777) == "0o600"
        assert WRONG not in path.read_text() and USER_PIN not in path.read_text()
        assert len(path.read_text().strip()) == 64


def test_implementations_share_the_memory(keyed):
    token, _ = keyed
    record = token.home / "record"
    env, args = fake(token, "passthrough", record)
    wrong = dict(env, PKCS11_PIN=WRONG)
    first, second = IMPLEMENTATIONS["python"](), IMPLEMENTATIONS["shell"]()
    assert_failure(first(args, b"m", env=wrong, cwd=token.home), "PIN_INCORRECT", 77, pin=WRONG)
    assert reached_the_tool(record)
    assert_failure(second(args, b"m", env=wrong, cwd=token.home), "PIN_INCORRECT", 77,
                   pin=WRONG)
    assert not reached_the_tool(record)


def test_doctor_clears_the_memory_when_the_token_takes_the_pin(keyed):
    """The SO or user changed the token's PIN to the one configured: doctor proves it works."""
    token, public = keyed
    wrong_env = dict(token.env, PKCS11_PIN=WRONG)
    sign = IMPLEMENTATIONS["python"]()
    assert_failure(sign(token.args(), b"m", env=wrong_env, cwd=token.home), "PIN_INCORRECT", 77,
                   pin=WRONG)
    token.tool("--change-pin", "--new-pin", WRONG)  # logged in with the old PIN
    assert_failure(sign(token.args(), b"m", env=wrong_env, cwd=token.home), "PIN_INCORRECT", 77,
                   pin=WRONG)
    doctor = subprocess.run([LAP, "doctor", *token.args()], env=wrong_env, cwd=token.home,
                            capture_output=True)
    assert doctor.returncode == 0, doctor.stdout
    result = sign(token.args(), b"m", env=wrong_env, cwd=token.home)
    assert result.returncode == 0, result.stderr
    verify(public, b"m", gateway_decode(result.stdout))
