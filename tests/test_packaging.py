"""A production install: the licence, setup.sh without test tools, and a wheel built from
the tree that installs into a fresh venv, signs, carries the shell mirror, the smoke test
and the units, and writes units that name the installed command and pass systemd-analyze."""

import os
import shlex
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from conftest import ROOT, gateway_decode, verify

SETUP = ROOT / "scripts" / "setup.sh"
UNITS = ("lap-pkcs11-signer.socket", "lap-pkcs11-signer@.service", "lap-pkcs11-agent.socket",
         "lap-pkcs11-agent.service")
APACHE_SECTIONS = ("1. Definitions.", "2. Grant of Copyright License.", "3. Grant of Patent License.",
                   "4. Redistribution.", "5. Submission of Contributions.", "6. Trademarks.",
                   "7. Disclaimer of Warranty.", "8. Limitation of Liability.",
                   "9. Accepting Warranty or Additional Liability.")


def test_the_licence_file_is_the_one_pyproject_names():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == {"text": "Apache-2.0"}
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License\n                           Version 2.0, January 2004" in text
    positions = [text.index(section) for section in APACHE_SECTIONS]
    assert positions == sorted(positions)
    assert "END OF TERMS AND CONDITIONS" in text and "APPENDIX: How to apply" in text


def setup_run(tmp_path, *args):
    """setup.sh with every tool it looks for present and a stub venv: what it would install."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for tool in ("pkcs11-tool", "softhsm2-util", "openssl", "socat", "shellcheck", "strace"):
        if not (bin_dir / tool).exists():
            (bin_dir / tool).symlink_to("/bin/true")
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True, exist_ok=True)
    record = tmp_path / "pip-args"
    stub = venv / "bin" / "python"
    stub.write_text(f"#!/bin/sh\nprintf '%s\\n' \"$@\" > {record}\n")
    stub.chmod(0o755)
    result = subprocess.run(["bash", str(SETUP), *args], capture_output=True, text=True,
                            timeout=60, env={"PATH": f"{bin_dir}:/usr/bin:/bin",
                                             "VENV": str(venv)})
    return result, record.read_text().split() if record.exists() else None


def test_setup_installs_test_tools_only_for_the_test_command(tmp_path):
    production, pip = setup_run(tmp_path)
    assert production.returncode == 0, production.stderr
    assert pip[-1] == f"{ROOT}[agent]"
    tested, pip = setup_run(tmp_path, "--test")
    assert tested.returncode == 0, tested.stderr
    assert pip[-1] == f"{ROOT}[test,agent]"
    assert setup_run(tmp_path, "--bogus")[0].returncode != 0
    # The Debian packages: none of the test tools for production.
    probe = 'source "$1"; missing_packages "$2"; printf "%s\\n" "${MISSING[@]}"'
    empty = tmp_path / "empty"
    empty.mkdir()
    lists = [subprocess.run([shutil.which("bash"), "-c", probe, "_", str(SETUP), mode], capture_output=True,
                            text=True, env={"PATH": str(empty)}, timeout=60).stdout.split()
             for mode in ("", "test")]
    assert {"opensc", "softhsm2", "openssl", "socat"} <= set(lists[0])
    assert not {"shellcheck", "strace"} & set(lists[0])
    assert set(lists[1]) - set(lists[0]) == {"shellcheck", "strace"}
    # test.sh and CI ask for the test tools.
    for path in (ROOT / "scripts" / "test.sh", ROOT / ".ci" / "run", ROOT / ".ci" / "opensc.sh"):
        assert "setup.sh\" --test" in path.read_text(), path


def test_the_production_dependencies_hold_no_test_tool():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = " ".join(project["dependencies"] + project["optional-dependencies"]["agent"])
    assert "pytest" not in names and "hypothesis" not in names
    assert {"pytest", "hypothesis"} <= {dep.split(">")[0].split("=")[0] for dep in
                                        project["optional-dependencies"]["test"]}


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A wheel built from the tree, installed with its dependencies (no extras) into a fresh
    venv of the system's Python, as an operator would."""
    work = tmp_path_factory.mktemp("wheel")
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w",
                            str(work / "dist"), str(ROOT)], capture_output=True, text=True,
                           timeout=600)
    assert built.returncode == 0, built.stderr
    (wheel,) = (work / "dist").glob("lap_pkcs11-*.whl")
    python = "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else sys.base_prefix
    venv = work / "venv"
    subprocess.run([python, "-m", "venv", str(venv)], check=True, timeout=300)
    install = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q",
                              "--disable-pip-version-check", str(wheel)],
                             capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr
    return wheel, venv


def test_the_wheel_carries_the_mirror_the_smoke_test_units_and_licence(installed):
    wheel, _ = installed
    names = zipfile.ZipFile(wheel).namelist()
    for name in ("lap_pkcs11/shell/pkcs11_signer.sh", "lap_pkcs11/shell/smoke.sh",
                 *(f"lap_pkcs11/units/{unit}" for unit in UNITS),
                 "lap_pkcs11/units/examples/usb-token.conf"):
        assert name in names, name
    assert any(name.endswith("LICENSE") and ".dist-info/" in name for name in names)
    assert not any(name.startswith(("tests/", "scripts/")) for name in names)
    # Packaged as they are in the tree, executable.
    info = zipfile.ZipFile(wheel).getinfo("lap_pkcs11/shell/pkcs11_signer.sh")
    assert zipfile.ZipFile(wheel).read(info) == (ROOT / "scripts" / "pkcs11_signer.sh").read_bytes()
    assert (info.external_attr >> 16) & 0o111


def test_the_installed_venv_holds_no_test_tool(installed):
    _, venv = installed
    listed = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "list",
                             "--format=freeze"], capture_output=True, text=True, check=True)
    names = {line.split("==")[0].lower() for line in listed.stdout.split()}
    assert "lap-pkcs11" in names and not {"pytest", "hypothesis"} & names


def test_the_installed_command_signs_and_its_files_work(installed, keyed):
    token, public = keyed
    _, venv = installed
    command = venv / "bin" / "lap-pkcs11"
    message = b"\x00receipt\x00" * 30
    env = {k: v for k, v in token.env.items()}
    signed = subprocess.run([str(command), "sign", *token.args()], input=message, env=env,
                            cwd=token.home, capture_output=True, timeout=60)
    assert signed.returncode == 0, signed.stderr
    verify(public, message, gateway_decode(signed.stdout))
    version = subprocess.run([str(command), "--version"], capture_output=True, text=True)
    assert version.stdout.startswith("lap-pkcs11 ")
    files = dict(line.split("\t") for line in subprocess.run(
        [str(command), "files"], capture_output=True, text=True, check=True).stdout.splitlines())
    assert set(files) == {"pkcs11_signer.sh", "smoke.sh", *UNITS}
    assert all(path.startswith(str(venv)) for path in files.values())
    # The packaged shell mirror signs; the packaged smoke test passes through the installed sign.
    mirror = subprocess.run(["bash", files["pkcs11_signer.sh"], *token.args()], input=message,
                            env=env, cwd=token.home, capture_output=True, timeout=60)
    assert mirror.returncode == 0, mirror.stderr
    verify(public, message, gateway_decode(mirror.stdout))
    smoke_env = dict(env, LAP_GATEWAY_PUBLIC_KEY_HEX=public.hex())
    smoke = subprocess.run(["bash", files["smoke.sh"], shlex.join(
        [str(command), "sign", "--input", "base64", *token.args()])], env=smoke_env,
        cwd=token.home, capture_output=True, text=True, timeout=60)
    assert smoke.returncode == 0 and smoke.stdout.startswith("smoke.sh: PASS"), smoke.stdout


def unit_value(path, key):
    return [line.split("=", 1)[1] for line in path.read_text().splitlines()
            if line.startswith(key + "=")]


def test_install_units_writes_units_that_name_the_installed_command(installed, tmp_path):
    _, venv = installed
    command = venv / "bin" / "lap-pkcs11"
    result = subprocess.run([str(command), "install-units", "--prefix", str(tmp_path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    target = tmp_path / "etc" / "systemd" / "system"
    assert sorted(path.name for path in target.iterdir()) == sorted(UNITS)
    for unit in UNITS:
        text = (target / unit).read_text()
        assert "/opt/lap-pkcs11" not in text
        assert oct((target / unit).stat().st_mode & 0o777) == "0o644"
        for line in unit_value(target / unit, "ExecStart"):
            assert shlex.split(line)[0] == str(command)
        (readme,) = unit_value(target / unit, "Documentation")
        assert readme.startswith(f"file://{venv}/") and Path(readme[7:]).is_file()
        # Everything but the command and the README is the unit of the tree.
        tree = (ROOT / "systemd" / unit).read_text()
        assert text == tree.replace("/opt/lap-pkcs11/.venv/bin/lap-pkcs11", str(command)).replace(
            "file:///opt/lap-pkcs11/systemd/README.md", readme)
    for pair in (("lap-pkcs11-signer.socket", "lap-pkcs11-signer@.service"),
                 ("lap-pkcs11-agent.socket", "lap-pkcs11-agent.service")):
        verified = subprocess.run(["systemd-analyze", "verify", *(str(target / u) for u in pair)],
                                  capture_output=True, text=True, timeout=120)
        assert verified.returncode == 0 and verified.stderr == "", verified.stderr
    # A second run changes nothing; an edited unit is kept unless --force.
    again = subprocess.run([str(command), "install-units", "--prefix", str(tmp_path)],
                           capture_output=True, text=True, timeout=60)
    assert again.stdout.count("unchanged: ") == len(UNITS)
    edited = target / "lap-pkcs11-agent.service"
    edited.write_text(edited.read_text() + "# local change\n")
    refused = subprocess.run([str(command), "install-units", "--prefix", str(tmp_path)],
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 64 and refused.stdout == ""
    assert refused.stderr.startswith("lap-pkcs11: CONFIG_INVALID: ") and "--force" in refused.stderr
    assert edited.read_text().endswith("# local change\n")
    forced = subprocess.run([str(command), "install-units", "--prefix", str(tmp_path), "--force"],
                            capture_output=True, text=True, timeout=60)
    assert forced.returncode == 0 and "written: " + str(edited) in forced.stdout


def test_install_units_refuses_a_path_systemd_would_split(tmp_path):
    from lap_pkcs11.admin import packaged
    from lap_pkcs11.per_signature import errors

    with pytest.raises(errors.ConfigInvalid, match="ExecStart"):
        packaged.install_units(tmp_path, command="/opt/my tools/bin/lap-pkcs11")
    assert not (tmp_path / "etc").exists()


def test_systemd_analyze_is_there():
    assert shutil.which("systemd-analyze"), "apt-get install systemd"
