"""The files that travel with the package, and the units written from them.

The wheel carries the shell mirror and the smoke test (``lap_pkcs11/shell``, from
``scripts/``) and the systemd units (``lap_pkcs11/units``, from ``systemd/``) as
package data; a checkout (an editable install) reads them where they live.
``install_units`` writes the units with the path of the ``lap-pkcs11`` command that
is really installed (and of their README), instead of the ``/opt/lap-pkcs11`` paths
they name in the tree.
"""

import os
import sys
from pathlib import Path

from lap_pkcs11.per_signature.errors import ConfigInvalid

_PACKAGE = Path(__file__).resolve().parent.parent  # lap_pkcs11/
SHELL = ("pkcs11_signer.sh", "smoke.sh")
UNITS = ("lap-pkcs11-signer.socket", "lap-pkcs11-signer@.service",
         "lap-pkcs11-agent.socket", "lap-pkcs11-agent.service")
# The command's path and their README's as the units in the tree name them.
TREE_COMMAND = "/opt/lap-pkcs11/.venv/bin/lap-pkcs11"
TREE_README = "file:///opt/lap-pkcs11/systemd/README.md"
# What ExecStart= may hold unquoted and unescaped: no spaces, %, $, quotes or backslashes.
_SAFE = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789/._-+@")


def folder(kind):
    """The directory of the packaged ``shell`` scripts or systemd ``units``."""
    installed = _PACKAGE / kind
    if installed.is_dir():
        return installed
    return _PACKAGE.parent / {"shell": "scripts", "units": "systemd"}[kind]


def files():
    """(name, path) of every packaged file a user runs or installs."""
    return ([(name, folder("shell") / name) for name in SHELL]
            + [(name, folder("units") / name) for name in UNITS])


def installed_command():
    """The absolute path of this installation's ``lap-pkcs11`` command.

    It lives beside the interpreter that runs us (a venv's ``bin``, or the
    system's with ``pip install --prefix``); the venv's path is kept as it is,
    not resolved through the interpreter's symlink.
    """
    command = Path(os.path.abspath(sys.executable)).parent / "lap-pkcs11"
    if not (command.is_file() and os.access(command, os.X_OK)):
        raise ConfigInvalid(f"no lap-pkcs11 command beside {sys.executable}; install the "
                            "package (pip install lap-pkcs11) and run its lap-pkcs11")
    return str(command)


def unit_text(name, command):
    """The unit ``name`` with ExecStart= naming ``command`` and Documentation= the
    installed README."""
    readme = folder("units") / "README.md"
    for path in (command, str(readme)):
        if not _SAFE.issuperset(path):
            raise ConfigInvalid(f"{path} holds characters systemd's ExecStart= or "
                                "Documentation= reads differently (spaces, %, $, quotes); "
                                "install lap-pkcs11 under a plain path")
    text = (folder("units") / name).read_text()
    if name.endswith(".service") and TREE_COMMAND not in text:
        raise ConfigInvalid(f"the packaged {name} does not name {TREE_COMMAND}; reinstall "
                            "lap-pkcs11")
    return text.replace(TREE_COMMAND, command).replace(TREE_README, f"file://{readme}")


def install_units(prefix="/", command=None, force=False):
    """Write every unit into ``PREFIX/etc/systemd/system``; return [(path, state)].

    A unit already there with other content is left alone unless ``force``
    (ConfigInvalid names it), so an operator's edits are never lost silently.
    """
    command = command or installed_command()
    target = Path(prefix) / "etc" / "systemd" / "system"
    texts = [(target / name, unit_text(name, command)) for name in UNITS]
    for path, text in texts:
        if path.exists() and path.read_text() != text and not force:
            raise ConfigInvalid(f"{path} exists and differs (edited?); move it aside, or give "
                                "--force to replace it")
    target.mkdir(parents=True, exist_ok=True)
    written = []
    for path, text in texts:
        if path.exists() and path.read_text() == text:
            written.append((path, "unchanged"))
            continue
        temporary = path.with_name(f".{path.name}.tmp")
        temporary.write_text(text)
        temporary.chmod(0o644)
        temporary.replace(path)
        written.append((path, "written"))
    return written
