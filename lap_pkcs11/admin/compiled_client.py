"""``lap-pkcs11-client``, the compiled client: its source, where it is installed, how it is built.

The C source ships in the package (``csrc/lap-pkcs11-client.c``). ``lap-pkcs11
install-client``, which ``scripts/setup.sh`` runs after installing the package,
compiles it with the host's C compiler and puts the binary beside the
``lap-pkcs11`` command. Built on the host at install time, not by a setuptools
build step, because:

- the wheel stays one pure-Python wheel for every platform, built and tested
  once, and ``pip install`` never needs a compiler, so it cannot fail for the
  lack of one;
- a wheel is often built on another machine than the gateway's: a binary built
  there may not run here (another C library), while ``install-client`` builds
  against this host's and checks the result before it replaces anything;
- without a working compiler nothing breaks: ``install-client`` says so in one
  line and the gateway runs ``lap-pkcs11 client``, which has the same contract
  (``doctor`` and ``pubkey`` say which one is installed).

After building, the binary's ``--help`` must be ``client_command.USAGE`` byte for
byte: a binary from another version of the source is never installed, and
``doctor`` reports one that differs.
"""

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from lap_pkcs11.per_signature import errors

NAME = "lap-pkcs11-client"
SOURCE = Path(__file__).resolve().parent.parent / "csrc" / f"{NAME}.c"
# What the issue asks (warnings are errors), and more warnings that careful C passes.
WARNINGS = ("-std=c11", "-Wall", "-Wextra", "-Werror", "-Wpedantic", "-Wformat=2", "-Wshadow",
            "-Wconversion", "-Wsign-conversion", "-Wvla")
# Debian's hardening (dpkg-buildflags): fortified libc calls, stack protector,
# position independent, read-only relocations bound at start.
HARDENING = ("-O2", "-D_FORTIFY_SOURCE=2", "-fstack-protector-strong", "-fPIE", "-pie",
             "-Wl,-z,relro,-z,now")
# CI's second build: the client tests run under AddressSanitizer and UBSan, and any
# finding aborts (a report alone would pass unnoticed).
SANITIZERS = ("-O1", "-g", "-fno-omit-frame-pointer", "-fsanitize=address,undefined",
              "-fno-sanitize-recover=all")
COMPILE_SECONDS = 120


def commands_dir():
    """The directory of the ``lap-pkcs11`` command that runs (a venv's bin)."""
    return Path(sys.executable).parent


def installed(directory=None):
    """The compiled client beside ``lap-pkcs11`` (in ``directory``), or None."""
    path = Path(directory or commands_dir()) / NAME
    return path if path.is_file() and os.access(path, os.X_OK) else None


def find_compiler(cc=None, environ=None):
    """The C compiler to use: ``cc``, else $CC, else ``cc`` on PATH; ToolNotFound if none."""
    environ = os.environ if environ is None else environ
    name = cc or environ.get("CC") or "cc"
    path = shutil.which(name, path=environ.get("PATH"))
    if path is None:
        raise errors.ToolNotFound(
            f"no C compiler ({name}) to build {NAME}: install one (apt-get install gcc "
            "libc6-dev) and run `lap-pkcs11 install-client`, or let the gateway run "
            "`lap-pkcs11 client` (the same contract, a slower start)")
    return path


def flags(sanitize=False):
    return [*WARNINGS, *(SANITIZERS if sanitize else HARDENING)]


def usage_of(binary, timeout=10):
    """What ``binary --help`` prints (bytes), or None when it does not run cleanly."""
    try:
        result = subprocess.run([str(binary), "--help"], capture_output=True, timeout=timeout,
                                env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")})
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout if result.returncode == 0 and result.stderr == b"" else None


def expected_usage():
    from lap_pkcs11.per_signature.client_command import USAGE

    return USAGE.encode()


def build(target, cc=None, sanitize=False):
    """Compile the client to ``target``: built beside it under a temporary name, checked
    (its --help is this version's), then renamed over it, so that a gateway starting the
    old one never finds a half-written file. Returns ``target``."""
    compiler = find_compiler(cc)
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{NAME}.", dir=target.parent)
    os.close(handle)
    try:
        try:
            result = subprocess.run([compiler, *flags(sanitize), "-o", temporary, str(SOURCE)],
                                    capture_output=True, text=True, timeout=COMPILE_SECONDS)
        except (OSError, subprocess.TimeoutExpired) as err:
            raise errors.ToolNotFound(f"the C compiler {compiler} did not run ({err}); the "
                                      "gateway can run `lap-pkcs11 client` instead") from None
        if result.returncode != 0:
            lines = result.stderr.strip().splitlines()
            first = next((line for line in lines if "error" in line),
                         lines[-1] if lines else "no message")
            raise errors.ToolNotFound(
                f"{compiler} cannot build {NAME} ({first.strip()}); install a working C "
                "compiler (apt-get install gcc libc6-dev), or let the gateway run "
                "`lap-pkcs11 client` (the same contract, a slower start)")
        os.chmod(temporary, 0o755)
        if usage_of(temporary) != expected_usage():
            raise errors.SigningFailed(f"the {NAME} just built does not print this version's "
                                       "--help; nothing was installed (report it)")
        os.replace(temporary, target)
    finally:
        try:
            os.unlink(temporary)
        except FileNotFoundError:
            pass
    return target


def install(directory=None, cc=None, sanitize=False):
    """Build the client into ``directory`` (default: beside ``lap-pkcs11``); its path."""
    return build(Path(directory or commands_dir()) / NAME, cc=cc, sanitize=sanitize)


def state(directory=None):
    """(path or None, matches this version): what ``doctor`` and ``pubkey`` look at."""
    path = installed(directory)
    if path is None:
        return None, False
    return path, usage_of(path) == expected_usage()
