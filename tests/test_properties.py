"""Properties (hypothesis): any message of 1-1024 bytes, any encoding, signs and verifies.

One token serves all examples of a run (a token per example would cost more than
the signatures); it is still the test's own throwaway token.
"""

import base64

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import gateway_decode, verify


def decode(stdout, output):
    if output == "base64":
        return gateway_decode(stdout)
    if output == "hex":
        assert stdout.endswith(b"\n")
        return bytes.fromhex(stdout.decode())
    return stdout


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(message=st.binary(min_size=1, max_size=1024),
       encoding=st.sampled_from(["raw", "base64"]),
       output=st.sampled_from(["base64", "hex", "raw"]))
def test_any_message_any_encoding_round_trips(signer, keyed, message, encoding, output):
    token, public = keyed
    stdin = message if encoding == "raw" else base64.b64encode(message) + b"\n"
    result = signer([*token.args(), "--input", encoding, "--output", output], stdin,
                    env=token.env, cwd=token.home)
    assert result.returncode == 0, result.stderr
    verify(public, message, decode(result.stdout, output))
