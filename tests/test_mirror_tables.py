"""Every table the shell mirror holds is Python's: read from the sourced script, not its text.

The mirror keeps its own copies (options, exit codes, error classification, limits,
timings, signals, URI attributes); these tests source it in bash, read each table as
bash holds it, and compare it with the Python module that owns it. The classification
is compared by running the mirror's own ``classify`` on every phrase Python knows, alone
and in every pair, so that a missing, reordered or differently advised pattern fails.
"""

import itertools
import subprocess

from conftest import SHELL_SIGNER
from test_listings import RECORDED
from lap_pkcs11 import __version__
from lap_pkcs11.backends import pkcs11_tool as tool
from lap_pkcs11.per_signature import (config, envfile, errors, options, process, sign_command,
                                      signer, uri)

SCALARS = ("VERSION", "MAX_MESSAGE", "READ_LIMIT", "CALLER_MARGIN_MS", "MIN_DEADLINE_MS",
           "WRITE_WAIT", "MIN_TOOL_MS", "GRACE_MS", "KILL_RESERVE_MS", "BACKSTOP_MS",
           "ENV_FILE_LIMIT", "PIN_FILE_LIMIT", "STATE_FILE_LIMIT", "OUTPUT_LIMIT",
           "GUARD_REMEMBERED", "URI_UNRESERVED", "URI_PATH_CHARS", "URI_QUERY_CHARS",
           "URI_MAX_LENGTH")
ARRAYS = ("SIGNALS", "OPTION_TABLE", "SCRUBBED_ENV", "GATEWAY_MARKERS", "TOKEN_CONSTRAINTS")
MAPS = ("EXIT_CODE", "URI_PATH", "URI_QUERY", "URI_NAME", "URI_REFUSED")
# Errors that sign never raises: the socket client's and keygen's.
NOT_SIGNS = {"SIGNER_UNAVAILABLE", "KEY_EXISTS"}


def shell(script, stdin=""):
    """Run ``script`` in bash after sourcing the mirror (which does not run main then)."""
    result = subprocess.run(["bash", "-c", f'source "$1"; set +eu; {script}',
                             "lap-tables", SHELL_SIGNER],
                            input=stdin, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def shell_tables():
    """{name: value}: a str for a scalar, a list for an array, a dict for a map."""
    dump = shell(
        f'for n in {" ".join(SCALARS)}; do printf "s\\t%s\\t\\t%s\\n" "$n" "${{!n}}"; done\n'
        f'for n in {" ".join(ARRAYS)}; do declare -n a=$n\n'
        '  for v in "${a[@]}"; do printf "a\\t%s\\t\\t%s\\n" "$n" "$v"; done; unset -n a; done\n'
        f'for n in {" ".join(MAPS)}; do declare -n m=$n\n'
        '  for k in "${!m[@]}"; do printf "m\\t%s\\t%s\\t%s\\n" "$n" "$k" "${m[$k]}"; done\n'
        '  unset -n m; done')
    tables = {name: [] for name in ARRAYS} | {name: {} for name in MAPS}
    for line in dump.splitlines():
        kind, name, key, value = line.split("\t")
        if kind == "s":
            tables[name] = value
        elif kind == "a":
            tables[name].append(value)
        else:
            tables[name][key] = value
    return tables


def test_every_table_of_the_mirror_is_pythons():
    tables = shell_tables()
    assert set(tables) == set(SCALARS) | set(ARRAYS) | set(MAPS)
    assert tables["OPTION_TABLE"] == [
        "|".join([o.attr, o.flag or "", " ".join(o.envs), o.default or ""])
        for o in options.OPTIONS]
    assert {name: int(code) for name, code in tables["EXIT_CODE"].items()} == {
        cls.name: cls.exit_code for cls in errors._all_errors()
        if cls is not errors.SignerError and cls.name not in NOT_SIGNS}
    python = {
        "VERSION": __version__, "MAX_MESSAGE": signer.MAX_MESSAGE,
        "READ_LIMIT": sign_command.READ_LIMIT, "CALLER_MARGIN_MS": config.CALLER_MARGIN_MS,
        "MIN_DEADLINE_MS": config.MIN_DEADLINE_MS, "WRITE_WAIT": process.OUTPUT_WAIT_SECONDS,
        "MIN_TOOL_MS": tool.MIN_TOOL_MS, "GRACE_MS": tool.GRACE_MS,
        "KILL_RESERVE_MS": tool.KILL_RESERVE_MS, "BACKSTOP_MS": tool.BACKSTOP_SLACK_MS,
        "ENV_FILE_LIMIT": envfile.MAX_SIZE, "PIN_FILE_LIMIT": signer.PIN_FILE_LIMIT,
        "STATE_FILE_LIMIT": signer.PinGuard.LIMIT, "OUTPUT_LIMIT": tool.OUTPUT_LIMIT,
        "GUARD_REMEMBERED": signer.PinGuard.MAX_REMEMBERED, "URI_MAX_LENGTH": uri.MAX_LENGTH}
    for name, value in python.items():
        assert tables[name] == str(value), name
    assert set(tables["URI_UNRESERVED"]) == uri._UNRESERVED
    assert set(tables["URI_PATH_CHARS"]) == uri.PATH_CHARS
    assert set(tables["URI_QUERY_CHARS"]) == uri.QUERY_CHARS
    assert tables["SIGNALS"] == [name[3:] for name in process.SIGNALS.values()]
    assert tables["SCRUBBED_ENV"] == list(config.SCRUBBED_ENV)
    assert tables["GATEWAY_MARKERS"] == list(config.GATEWAY_MARKERS)
    assert tables["TOKEN_CONSTRAINTS"] == list(options.TOKEN_CONSTRAINTS)
    assert tables["URI_PATH"] == {k: v or "" for k, v in uri.PATH_ATTRIBUTES.items()}
    assert tables["URI_QUERY"] == {k: v or "" for k, v in uri.QUERY_ATTRIBUTES.items()}
    assert tables["URI_NAME"] == uri.ATTRIBUTE_OF
    assert tables["URI_REFUSED"] == uri._REFUSED


def shell_classifications(texts, status=1):
    """The mirror's classify on each stderr text (of a tool that exited ``status``):
    [(NAME, advice)], run by its own code."""
    script = ('fail() { printf "%s\\t%s\\n" "$1" "$2"; exit 0; }; remember_rejected_pin() { :; }\n'
              'while IFS= read -r ERR_TEXT; do ERR_TEXT=${ERR_TEXT//\\\\n/$\'\\n\'} '
              f'STATUS={status}\n'
              '  (classify) 2>/dev/null || printf "none\\t\\n"; done')
    out = shell(script, "".join(text.replace("\n", "\\n") + "\n" for text in texts))
    return [tuple(line.split("\t")) for line in out.splitlines()]


def test_the_mirror_classifies_every_phrase_as_python_does():
    """Each phrase alone and every ordered pair (the first pattern in the table wins, so
    the order is compared too): the same error name and the same advice."""
    needles = [needle for needle, _, _ in tool._CLASSES]
    texts = [f"error: {needle}\nAborting." for needle in needles]
    texts += [f"{first}\n{second}" for first, second in itertools.permutations(needles, 2)]
    expected = []
    for text in texts:
        error = tool.classify(tool.Result(1, b"", text))
        expected.append((error.name, error.message))
    assert shell_classifications(texts) == expected


def test_the_mirror_classifies_recorded_stderr_as_python_does():
    """Real pkcs11-tool stderr of every recorded failure (tests/data/stderr, OpenSC 0.23 to
    0.27.1), the generic ones with the tool's last line too: the same name and line."""
    assert {status for _, _, status, _ in RECORDED} == {1}
    texts = [stderr.replace("\\", "/") for _, _, _, stderr in RECORDED]
    expected = []
    for text in texts:
        error = tool.classify(tool.Result(1, b"", text))
        expected.append((error.name, error.message))
    assert shell_classifications(texts) == expected
