"""One definition, two resolvers: the lean sign path and pydantic-settings must agree."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lap_pkcs11.per_signature import config, errors
from lap_pkcs11.admin import settings as admin_settings
from lap_pkcs11.per_signature.options import OPTIONS

# Candidate raw values per option: valid ones and a few invalid ones.
VALUES = {
    "uri": ["pkcs11:token=lap;id=%01", "pkcs11:id=%02;object=k?module-path=/opt/vendor/p11.so",
            "pkcs11:serial=9;slot-id=3;id=%01", "pkcs11:type=cert",
            "pkcs11:id=%01?pin-source=env:HSM_PIN",
            "pkcs11:object=signer;library-version=2.6?pin-source=file:/run/credentials/pin"],
    "module": ["/usr/lib/softhsm/libsofthsm2.so", "/opt/vendor/p11.so"],
    "slot": ["0", "7", "0x1f", "-1", "x", "+3", "1_0", " 4 "],
    "slot_index": ["0", "2", "z"],
    "token_label": ["lap", "my token"],
    "key_id": ["01", "A1:B2", "0g", "abc"],
    "key_label": ["signer", "lap key"],
    "mechanism": ["EDDSA", "eddsa", "0x1057", "bad mech"],
    "pin_env": ["PKCS11_PIN", "HSM_PIN", "1X"],
    "pin_file": ["/run/credentials/pin"],
    "input": ["raw", "base64", "BASE64", "hex"],
    "output": ["base64", "hex", "raw", "pem"],
    "timeout_ms": ["1500", "20", "0", "many", "600001", "+20"],
    "pkcs11_tool": ["pkcs11-tool", "/usr/bin/pkcs11-tool"],
    "expect_public_key": ["ab" * 32, "AB" * 32, "ab"],
    "lock_dir": ["/run/lap", "none"],
    "caller_timeout_ms": ["2.0", "0.5", "1.001", ".5", "3", "-1", "soon", "1e3", "."],
}
SETTABLE = [o for o in OPTIONS if o.attr in VALUES]



@st.composite
def inputs(draw):
    flags, environ, file_env = {}, {}, {}
    for option in SETTABLE:
        where = draw(st.sets(st.sampled_from(["flag", "env", "file"]), max_size=3))
        for place in where:
            value = draw(st.sampled_from(VALUES[option.attr] + [""]))
            name = draw(st.sampled_from(option.envs))
            if place == "flag" and option.flag:
                flags[option.attr] = value or VALUES[option.attr][0]
            elif place == "env":
                environ[name] = value
            elif place == "file":
                file_env[name] = value
    return flags, environ, file_env


def resolve_both(flags, environ, file_env, tmp_path):
    path = tmp_path / "signer.env"
    path.write_text("".join(f"{k}='{v}'\n" for k, v in file_env.items()))
    flags = dict(flags, env_file=str(path))
    outcomes = []
    for resolver in (config.resolve, admin_settings.load):
        try:
            resolved = resolver(flags, environ)
            outcomes.append(("ok", resolved.values(), resolved.sources, resolved.file_env))
        except errors.SignerError as err:
            outcomes.append(("error", err.name, err.message))
    return outcomes


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=inputs())
def test_sign_and_admin_resolvers_agree(tmp_path, case):
    lean, admin = resolve_both(*case, tmp_path)
    assert lean == admin


def test_precedence_flag_env_file_default(tmp_path):
    environ = {"LAP_PKCS11_MODULE": "/env.so", "SIGNER_OUTPUT": "raw"}
    file_env = {"LAP_PKCS11_MODULE": "/file.so", "LAP_PKCS11_KEY_ID": "0a",
                "LAP_PKCS11_OUTPUT": "hex", "LAP_PKCS11_SLOT": "3"}
    for outcome in resolve_both({"slot": "4"}, environ, file_env, tmp_path):
        assert outcome[0] == "ok", outcome
        values, sources = outcome[1], outcome[2]
        assert (values["module"], sources["module"]) == ("/env.so", "env:LAP_PKCS11_MODULE")
        assert (values["key_id"], sources["key_id"]) == ("0a", "file:LAP_PKCS11_KEY_ID")
        # The environment's second variable beats the env file's first.
        assert (values["output"], sources["output"]) == ("raw", "env:SIGNER_OUTPUT")
        assert (values["slot"], sources["slot"]) == (4, "flag")
        assert (values["mechanism"], sources["mechanism"]) == ("EDDSA", "default")


def test_caller_deadline_caps_our_own(tmp_path):
    base = {"LAP_PKCS11_MODULE": "/m.so", "LAP_PKCS11_KEY_ID": "01"}
    assert config.resolve({}, base).deadline_ms() == 1500
    assert config.resolve({}, dict(base, SIGNER_TIMEOUT_SECONDS="1.0")).deadline_ms() == 750
    assert config.resolve({}, dict(base, SIGNER_TIMEOUT_SECONDS="30")).deadline_ms() == 1500
    with pytest.raises(errors.ConfigInvalid):
        config.resolve({}, dict(base, SIGNER_TIMEOUT_SECONDS="0.25")).deadline_ms()
    gateway = dict(base, LAP_GATEWAY_SIGNING_CMD_TIMEOUT_SECONDS="1.0")
    assert config.resolve({}, gateway).deadline_ms() == 750
    with pytest.raises(errors.ConfigInvalid, match="LAP_GATEWAY_SIGNING_CMD_TIMEOUT_SECONDS"):
        config.resolve({}, dict(base, LAP_GATEWAY_SIGNING_CMD_TIMEOUT_SECONDS="0.25")
                       ).deadline_ms()
