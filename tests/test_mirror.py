"""The shell mirror and the Python command: one contract, byte for byte."""

import base64
import os

import pytest

from conftest import IMPLEMENTATIONS


@pytest.mark.parametrize("output", ["base64", "hex", "raw"])
@pytest.mark.parametrize("encoding", ["raw", "base64"])
def test_both_implementations_print_identical_bytes(keyed, output, encoding):
    token, _ = keyed
    for size in (1, 63, 700, 1024):
        message = os.urandom(size)
        stdin = message if encoding == "raw" else base64.b64encode(message) + b"\n"
        outputs = set()
        for make in IMPLEMENTATIONS.values():
            result = make()([*token.args(), "--input", encoding, "--output", output], stdin,
                            env=token.env, cwd=token.home)
            assert result.returncode == 0, result.stderr
            outputs.add(result.stdout)
        assert len(outputs) == 1, f"the implementations differ for a {size}-byte message"


def test_both_implementations_share_one_lock(keyed):
    """Mixed concurrent callers: the lock file name is the same in both."""
    from concurrent.futures import ThreadPoolExecutor

    token, _ = keyed
    signers = [make() for make in IMPLEMENTATIONS.values()] * 8
    with ThreadPoolExecutor(len(signers)) as pool:
        results = list(pool.map(lambda s: s([*token.args(), "--timeout-ms", "20000"], b"m",
                                            env=token.env, cwd=token.home), signers))
    assert [r.returncode for r in results] == [0] * len(signers)
    assert len({r.stdout for r in results}) == 1
    (state,) = (token.home / "run").iterdir()
    assert state.name == f"lap-pkcs11-{os.geteuid()}"
    locks = [path.name for path in state.iterdir()]
    assert len(locks) == 1 and locks[0].endswith(".lock"), locks


def test_shell_pinned_key_without_openssl_is_config_invalid(keyed, tmp_path):
    """The script checks the pinned key with openssl; without it, it must refuse, not skip."""
    from conftest import assert_failure

    token, public = keyed
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for folder in ("/usr/bin", "/bin", "/usr/sbin", "/sbin"):
        for entry in os.scandir(folder):
            if entry.name != "openssl" and not (bin_dir / entry.name).exists():
                (bin_dir / entry.name).symlink_to(entry.path)
    env = dict(token.env, PATH=str(bin_dir))
    result = IMPLEMENTATIONS["shell"]()([*token.args(), "--expect-public-key", public.hex()],
                                        b"m", env=env, cwd=token.home)
    assert_failure(result, "CONFIG_INVALID", 64)


def test_pin_and_env_file_bytes_that_are_not_utf8_behave_alike(keyed):
    token, _ = keyed
    pin_file = token.home / "pin"
    pin_file.write_bytes(b"\xff\xfe-not-the-pin\n")
    pin_file.chmod(0o600)  # a PIN file others may read is refused
    env = {k: v for k, v in token.env.items() if k != "PKCS11_PIN"}
    codes = set()
    for make in IMPLEMENTATIONS.values():
        result = make()([*token.args(), "--pin-file", str(pin_file)], b"m", env=env,
                        cwd=token.home)
        codes.add((result.returncode, result.stderr.split(b":")[1]))
    assert codes == {(77, b" PIN_INCORRECT")}
    # An env file: bytes that are not UTF-8 in a comment are skipped, in a value they are
    # the value (here a token label no token has), in both implementations alike.
    env_file = token.home / "signer.env"
    args = ["--module", token.module, "--key-id", "01", "--env-file", str(env_file)]
    for label, expected in ((token.label.encode(), (0, b"")),
                            (token.label.encode() + b"\xff", (69, b" TOKEN_NOT_FOUND"))):
        env_file.write_bytes(b"# \xfe\xff not UTF-8\nLAP_PKCS11_TOKEN_LABEL=" + label + b"\n")
        env_file.chmod(0o600)
        outcomes = set()
        for make in IMPLEMENTATIONS.values():
            result = make()(args, b"m", env=token.env, cwd=token.home)
            error = result.stderr.split(b":")[1] if result.stderr else b""
            outcomes.add((result.returncode, error, result.stdout))
        assert len(outcomes) == 1, (label, outcomes)
        assert outcomes.pop()[:2] == expected, label
