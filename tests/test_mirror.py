"""The shell mirror and the Python command: one contract, byte for byte."""

import base64
import os
import re

import pytest

from conftest import IMPLEMENTATIONS, SHELL_SIGNER
from lap_pkcs11.options import OPTIONS


def test_shell_option_table_is_the_python_one():
    text = SHELL_SIGNER.read_text()
    table = re.search(r"OPTION_TABLE=\(\n(.*?)\n\)", text, re.S).group(1)
    rows = [line.strip().strip('"').split("|") for line in table.splitlines()]
    expected = [[o.attr, o.flag or "", " ".join(o.envs), o.default or ""] for o in OPTIONS]
    assert rows == expected


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
    locks = list((token.home / "run").iterdir())
    assert len(locks) == 1 and locks[0].name.startswith("lap-pkcs11-")
