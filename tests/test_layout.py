"""The layout's promise, checked: the per-signature path imports nothing but the standard
library and its own modules.

``sign``, ``client`` and ``serve`` start afresh for every signature, so a third-party
import there (typer, pydantic, cryptography, PyKCS11) would cost every signature its
load time, and a module of the operator commands would bring one along. The walk reads
every import statement of each module it reaches, those inside functions too (the lazy
ones run only on some paths: a pinned key, an env file), so it sees the worst case.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import lap_pkcs11

PACKAGE = Path(lap_pkcs11.__file__).resolve().parent
ENTRY_POINTS = ("lap_pkcs11.per_signature.sign_command",
                "lap_pkcs11.per_signature.client_command",
                "lap_pkcs11.per_signature.serve_command")
# What the per-signature path may import of its own.
ALLOWED = ("lap_pkcs11", "lap_pkcs11.per_signature", "lap_pkcs11.backends",
           "lap_pkcs11.backends.pkcs11_tool")


def source_of(module):
    """The file of a lap_pkcs11 module (a package's __init__.py), or None."""
    path = PACKAGE.parent.joinpath(*module.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imports_of(module):
    """Every module that ``module``'s import statements name, wherever they stand."""
    tree = ast.parse(source_of(module).read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            # The package names its own modules in full; a relative import would need
            # resolving here first.
            assert node.level == 0, f"{module}: a relative import; name the module in full"
            base = node.module
            found.add(base)
            for alias in node.names:  # `from package import module` names a module
                if source_of(f"{base}.{alias.name}") is not None:
                    found.add(f"{base}.{alias.name}")
    return found


def import_graph(start):
    """{module: the modules it imports} for everything reachable from ``start`` inside
    lap_pkcs11; the modules outside it are leaves."""
    graph, todo = {}, [start]
    while todo:
        module = todo.pop()
        if module in graph:
            continue
        graph[module] = imports_of(module)
        for name in graph[module]:
            # Importing a.b.c imports a and a.b too.
            parts = name.split(".")
            for end in range(1, len(parts) + 1):
                prefix = ".".join(parts[:end])
                if prefix.startswith("lap_pkcs11") and source_of(prefix) is not None:
                    todo.append(prefix)
    return graph


def outsiders(start):
    """(importer, imported) pairs that leave the standard library and ALLOWED."""
    bad = []
    for module, names in import_graph(start).items():
        for name in names:
            top = name.split(".")[0]
            if top == "lap_pkcs11":
                if name not in ALLOWED and not name.startswith("lap_pkcs11.per_signature."):
                    bad.append((module, name))
            elif top not in sys.stdlib_module_names:
                bad.append((module, name))
    return sorted(bad)


@pytest.mark.parametrize("entry_point", ENTRY_POINTS)
def test_the_per_signature_path_imports_only_the_standard_library(entry_point):
    assert outsiders(entry_point) == []
    assert entry_point in import_graph(entry_point)


def test_the_walk_sees_what_the_operator_commands_import():
    """The same walk over the operator commands finds typer and pydantic-settings, and a
    lazy import inside a function: it would see them on the per-signature path too."""
    found = {name for _, name in outsiders("lap_pkcs11.admin.cli")}
    assert {"typer", "pydantic_settings"} <= {name.split(".")[0] for name in found}
    assert ("lap_pkcs11.per_signature.signer", "lap_pkcs11.per_signature.ed25519") in [
        (module, name) for module, names in import_graph(ENTRY_POINTS[0]).items()
        for name in names]


def test_the_dispatcher_imports_only_the_standard_library_before_it_dispatches():
    """``lap_pkcs11.entry`` (the lap-pkcs11 command) and the three per-signature
    commands, imported for real: nothing outside the standard library and lap_pkcs11's
    per-signature modules is loaded."""
    code = ("import sys; before = set(sys.modules)\n"
            "import lap_pkcs11.entry\n" +
            "".join(f"import {name}\n" for name in ENTRY_POINTS) +
            "print('\\n'.join(sorted(set(sys.modules) - before)))")
    loaded = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True,
                            check=True).stdout.split()
    strays = [name for name in loaded
              if name.split(".")[0] not in sys.stdlib_module_names
              and not (name in ALLOWED or name == "lap_pkcs11.entry"
                       or name.startswith("lap_pkcs11.per_signature."))]
    assert strays == []
    assert "lap_pkcs11.per_signature.sign_command" in loaded


REPORT = """
from lap_pkcs11.per_signature import ed25519, process
prctl, _ = process._libc_functions()
print(process._signal_module().__name__, process.socket_module().__name__,
      ed25519.sha512.__module__, type(prctl).__module__)
"""


@pytest.mark.parametrize("refused", [False, True])
def test_the_private_modules_and_their_fallbacks(tmp_path, refused):
    """The per-signature path uses the private C modules (_signal, _socket, _sha512,
    _ctypes' core); with them refused, as the "python-public" signer runs every sign test,
    each helper falls back to the public module and still works."""
    from conftest import PUBLIC_MODULES_ONLY

    script = tmp_path / "report.py"
    script.write_text(REPORT)
    argv = ([sys.executable, "-I", "-c", PUBLIC_MODULES_ONLY, str(script)] if refused
            else [sys.executable, "-I", str(script)])
    used = subprocess.run(argv, capture_output=True, text=True, check=True).stdout.split()
    if refused:
        assert used[:2] == ["signal", "socket"] and used[2] != "_sha512"
        assert used[3] == "ctypes"
    else:
        assert used == ["_signal", "_socket", "_sha512", "lap_pkcs11.per_signature.process"]
