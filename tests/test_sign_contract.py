"""The sign contract, against a real SoftHSM2 token and the real pkcs11-tool.

Every test here runs against each signer implementation (the Python command and
the shell mirror), so the two cannot drift apart.
"""

import base64
import os

import pytest
from cryptography.exceptions import InvalidSignature

from conftest import USER_PIN, assert_failure, gateway_decode, verify

MESSAGE = bytes(range(256)) * 2 + b"\x00lap receipt\x00"


def test_raw_in_base64_out_verifies(signer, keyed):
    token, public = keyed
    result = signer(token.args(), MESSAGE, env=token.env, cwd=token.home)
    assert result.returncode == 0, result.stderr
    assert result.stderr == b""
    assert result.stdout.endswith(b"\n") and result.stdout.count(b"\n") == 1
    signature = gateway_decode(result.stdout)
    verify(public, MESSAGE, signature)


def test_gateway_call_base64_in_base64_out(signer, keyed):
    token, public = keyed
    stdin = base64.b64encode(MESSAGE) + b"\n"
    result = signer([*token.args(), "--input", "base64"], stdin, env=token.env, cwd=token.home)
    assert result.returncode == 0, result.stderr
    verify(public, MESSAGE, gateway_decode(result.stdout))


@pytest.mark.parametrize("output", ["base64", "hex", "raw"])
def test_output_encodings_are_exact(signer, keyed, output):
    token, public = keyed
    result = signer([*token.args(), "--output", output], MESSAGE, env=token.env, cwd=token.home)
    assert result.returncode == 0, result.stderr
    if output == "base64":
        signature = gateway_decode(result.stdout)
        assert result.stdout == base64.b64encode(signature) + b"\n"
    elif output == "hex":
        assert len(result.stdout) == 129 and result.stdout.endswith(b"\n")
        signature = bytes.fromhex(result.stdout[:-1].decode())
    else:
        signature = result.stdout
    assert len(signature) == 64
    verify(public, MESSAGE, signature)


def test_signer_output_env_is_honoured_after_lap_output(signer, keyed):
    token, public = keyed
    env = dict(token.env, SIGNER_OUTPUT="hex")
    result = signer(token.args(), MESSAGE, env=env, cwd=token.home)
    assert len(result.stdout) == 129
    env["LAP_PKCS11_OUTPUT"] = "raw"
    result = signer(token.args(), MESSAGE, env=env, cwd=token.home)
    assert len(result.stdout) == 64
    verify(public, MESSAGE, result.stdout)


def test_the_signature_covers_exactly_the_message_read(signer, keyed):
    """The signature is over the bytes read, every one of them and nothing else: the same
    message raw and as base64 gives one signature (Ed25519 is deterministic); one byte
    changed, one byte more or one byte less gives another, which does not verify for the
    original message (a signer that cut, padded or re-encoded its input fails here)."""
    token, public = keyed

    def sign(message, encoding="raw"):
        stdin = message if encoding == "raw" else base64.b64encode(message) + b"\n"
        result = signer([*token.args(), "--input", encoding], stdin, env=token.env,
                        cwd=token.home)
        assert result.returncode == 0, result.stderr
        return gateway_decode(result.stdout)

    signature = sign(MESSAGE)
    verify(public, MESSAGE, signature)
    assert sign(MESSAGE, "base64") == signature
    for other in (MESSAGE[:-1] + b"!", MESSAGE + b"\n", MESSAGE[:-1]):
        changed = sign(other)
        verify(public, other, changed)
        assert changed != signature
        with pytest.raises(InvalidSignature):
            verify(public, MESSAGE, changed)


@pytest.mark.parametrize("size", [1, 1024])
def test_message_size_limits_are_inclusive(signer, keyed, size):
    token, public = keyed
    message = os.urandom(size)
    result = signer(token.args(), message, env=token.env, cwd=token.home)
    assert result.returncode == 0, result.stderr
    verify(public, message, gateway_decode(result.stdout))


def test_settings_from_env_and_env_file(signer, keyed):
    token, public = keyed
    env_file = token.home / "signer.env"
    env_file.write_text(f"# signer\nexport LAP_PKCS11_MODULE={token.module}\n"
                        f"LAP_PKCS11_TOKEN_LABEL='{token.label}'\n"
                        f'SOFTHSM2_CONF="{token.conf}"\nPKCS11_PIN={USER_PIN}  # the PIN\n')
    env = {k: v for k, v in token.env.items() if k not in ("SOFTHSM2_CONF", "PKCS11_PIN")}
    env["LAP_PKCS11_KEY_ID"] = "01"
    result = signer(["--env-file", str(env_file)], MESSAGE, env=env, cwd=token.home)
    assert result.returncode == 0, result.stderr
    verify(public, MESSAGE, gateway_decode(result.stdout))


def test_no_env_file_is_read_from_the_working_directory(signer, keyed):
    """The gateway's working directory is no place for configuration: .env.pkcs11 there
    (anyone's file) is ignored; only --env-file or LAP_PKCS11_ENV_FILE name one."""
    token, public = keyed
    (token.home / ".env.pkcs11").write_text(
        f"LAP_PKCS11_MODULE={token.module}\nLAP_PKCS11_TOKEN_LABEL={token.label}\n"
        "LAP_PKCS11_KEY_ID=01\nLAP_PKCS11_OUTPUT=hex\n")
    assert_failure(signer([], MESSAGE, env=token.env, cwd=token.home), "CONFIG_INVALID", 64)
    result = signer(token.args(), MESSAGE, env=token.env, cwd=token.home)
    assert result.returncode == 0, result.stderr
    verify(public, MESSAGE, gateway_decode(result.stdout))  # base64: the file was not read
    named = signer([], MESSAGE, env=dict(token.env, LAP_PKCS11_ENV_FILE=".env.pkcs11"),
                   cwd=token.home)
    assert named.returncode == 0, named.stderr
    verify(public, MESSAGE, bytes.fromhex(named.stdout.decode()))


def test_real_environment_beats_env_file_and_flag_beats_both(signer, keyed):
    token, public = keyed
    env_file = token.home / "signer.env"
    env_file.write_text(f"LAP_PKCS11_MODULE={token.module}\nLAP_PKCS11_KEY_ID=01\n"
                        "LAP_PKCS11_TOKEN_LABEL=missing-token\nLAP_PKCS11_OUTPUT=raw\n")
    env = dict(token.env, LAP_PKCS11_TOKEN_LABEL=token.label, LAP_PKCS11_OUTPUT="hex")
    result = signer(["--env-file", str(env_file), "--output", "base64"], MESSAGE, env=env,
                    cwd=token.home)
    assert result.returncode == 0, result.stderr
    verify(public, MESSAGE, gateway_decode(result.stdout))


def test_pin_file_as_systemd_credential(signer, keyed):
    token, public = keyed
    pin_file = token.home / "pin"
    pin_file.write_text(USER_PIN + "\nsecond line ignored\n")
    pin_file.chmod(0o400)  # as systemd's LoadCredential= leaves it
    env = {k: v for k, v in token.env.items() if k != "PKCS11_PIN"}
    result = signer([*token.args(), "--pin-file", str(pin_file)], MESSAGE, env=env,
                    cwd=token.home)
    assert result.returncode == 0, result.stderr
    verify(public, MESSAGE, gateway_decode(result.stdout))


def test_custom_pin_env(signer, keyed):
    token, public = keyed
    env = {k: v for k, v in token.env.items() if k != "PKCS11_PIN"}
    env["HSM_USER_PIN"] = USER_PIN
    result = signer([*token.args(), "--pin-env", "HSM_USER_PIN"], MESSAGE, env=env,
                    cwd=token.home)
    assert result.returncode == 0, result.stderr
    verify(public, MESSAGE, gateway_decode(result.stdout))


def test_key_label_selects_exactly_that_key(signer, token):
    first = token.keygen("01", "first")
    second = token.keygen("02", "second")
    args = ["--module", token.module, "--token-label", token.label, "--key-label", "second"]
    result = signer(args, MESSAGE, env=token.env, cwd=token.home)
    assert result.returncode == 0, result.stderr
    signature = gateway_decode(result.stdout)
    verify(second, MESSAGE, signature)
    with pytest.raises(InvalidSignature):
        verify(first, MESSAGE, signature)


def test_unknown_key_label_is_key_not_found(signer, keyed):
    token, _ = keyed
    args = ["--module", token.module, "--token-label", token.label, "--key-label", "nope"]
    assert_failure(signer(args, MESSAGE, env=token.env, cwd=token.home), "KEY_NOT_FOUND", 69)


def test_ambiguous_key_label_is_refused(signer, token):
    token.keygen("01", "twin")
    token.keygen("02", "twin")
    args = ["--module", token.module, "--token-label", token.label, "--key-label", "twin"]
    assert_failure(signer(args, MESSAGE, env=token.env, cwd=token.home), "KEY_NOT_FOUND", 69)


def test_slot_and_slot_index_select_the_token(signer, keyed):
    token, public = keyed
    for selector in (["--slot", str(token.slot_id())], ["--slot-index", "0"]):
        result = signer(["--module", token.module, *selector, "--key-id", "01"], MESSAGE,
                        env=token.env, cwd=token.home)
        assert result.returncode == 0, result.stderr
        verify(public, MESSAGE, gateway_decode(result.stdout))


def test_pinned_public_key_accepts_the_right_key(signer, keyed):
    token, public = keyed
    for how in ("flag", "LAP_PKCS11_EXPECT_PUBLIC_KEY", "LAP_GATEWAY_PUBLIC_KEY_HEX"):
        env, args = dict(token.env), list(token.args())
        if how == "flag":
            args += ["--expect-public-key", public.hex()]
        else:
            env[how] = public.hex()
        result = signer(args, MESSAGE, env=env, cwd=token.home)
        assert result.returncode == 0, (how, result.stderr)
        verify(public, MESSAGE, gateway_decode(result.stdout))


def test_pinned_public_key_catches_the_wrong_key(signer, token):
    token.keygen("01", "live")
    other = token.keygen("02", "other")
    env = dict(token.env, LAP_GATEWAY_PUBLIC_KEY_HEX=other.hex())
    assert_failure(signer(token.args("01"), MESSAGE, env=env, cwd=token.home),
                   "KEY_MISMATCH", 70)


def test_empty_message_is_refused(signer, keyed):
    token, _ = keyed
    assert_failure(signer(token.args(), b"", env=token.env, cwd=token.home), "INPUT_INVALID", 65)
    assert_failure(signer([*token.args(), "--input", "base64"], b"\n", env=token.env,
                          cwd=token.home), "INPUT_INVALID", 65)


@pytest.mark.parametrize("stdin", [b"not base64!\n", b"aGVsbG8\n", b"aGVs bG8=\n",
                                   b"aGVsbG9=\n", b"aGVsbG8=aGVs\n", b"aGVsbG8_\n",
                                   b"\xff\xfe\n"])
def test_non_strict_base64_is_refused(signer, keyed, stdin):
    token, _ = keyed
    result = signer([*token.args(), "--input", "base64"], stdin, env=token.env, cwd=token.home)
    assert_failure(result, "INPUT_INVALID", 65)


def test_base64_with_surrounding_whitespace_is_accepted(signer, keyed):
    token, public = keyed
    stdin = b"  \r\n" + base64.b64encode(b"hello") + b" \r\n\n"
    result = signer([*token.args(), "--input", "base64"], stdin, env=token.env, cwd=token.home)
    assert result.returncode == 0, result.stderr
    verify(public, b"hello", gateway_decode(result.stdout))


@pytest.mark.parametrize("encoding", ["raw", "base64"])
def test_message_over_1024_bytes_is_too_large(signer, keyed, encoding):
    token, _ = keyed
    message = os.urandom(1025)
    stdin = message if encoding == "raw" else base64.b64encode(message) + b"\n"
    result = signer([*token.args(), "--input", encoding], stdin, env=token.env, cwd=token.home)
    assert_failure(result, "MESSAGE_TOO_LARGE", 65)


@pytest.mark.parametrize("encoding", ["raw", "base64"])
def test_huge_stdin_is_refused_without_reading_it(signer, keyed, encoding):
    token, _ = keyed
    huge = token.home / "huge"
    with open(huge, "wb") as handle:
        handle.truncate(1 << 30)  # sparse: 1 GiB that takes no disk
    with open(huge, "rb") as stdin:
        result = signer([*token.args(), "--input", encoding], None, env=token.env,
                        cwd=token.home, stdin=stdin)
        # The signer shares this open file, so its offset is what the signer read.
        consumed = os.lseek(stdin.fileno(), 0, os.SEEK_CUR)
    assert_failure(result, "MESSAGE_TOO_LARGE", 65)
    assert consumed <= 64 * 1024, f"read {consumed} bytes of a 1 GiB stdin"


def test_no_file_is_left_behind(signer, keyed):
    token, _ = keyed
    tmp = token.home / "tmpdir"
    tmp.mkdir()
    env = dict(token.env, TMPDIR=str(tmp))
    before = sorted(p.name for p in token.home.iterdir())
    assert signer(token.args(), MESSAGE, env=env, cwd=token.home).returncode == 0
    assert signer(token.args("99"), MESSAGE, env=env, cwd=token.home).returncode == 69
    assert sorted(p.name for p in token.home.iterdir()) == before
    assert list(tmp.iterdir()) == []
