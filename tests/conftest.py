"""Fixtures: a throwaway SoftHSM2 token per test, and the signer implementations.

Every token lives in the test's own temporary directory with its own
SOFTHSM2_CONF, so tests never share state. The tools are required: when
softhsm2 or opensc is missing or broken the tests fail, they do not skip.

``LAP_TEST_PKCS11_TOOL`` selects the pkcs11-tool under test (e.g. one built from
an OpenSC release tag; default: Debian's on PATH). The fixtures use it, and each
token's environment carries it as ``LAP_PKCS11_TOOL``, so the signers use the
same binary. Listings are read with the package's own parser.
"""

import base64
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from lap_pkcs11.admin.token_inspection import parse_slots
from lap_pkcs11.backends.pkcs11_tool import parse_objects

ROOT = Path(__file__).resolve().parent.parent
FAKE_TOOL = ROOT / "tests" / "fakes" / "fake-pkcs11-tool"
SHELL_SIGNER = ROOT / "scripts" / "pkcs11_signer.sh"
MODULE_CANDIDATES = ("/usr/lib/softhsm/libsofthsm2.so",
                     "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
                     "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so")
USER_PIN = "246813"
SO_PIN = "97531864"
TOKEN_LABEL = "lap-test"

# The pkcs11-tool under test, read before the LAP_ variables are dropped below.
TEST_TOOL = os.environ.get("LAP_TEST_PKCS11_TOOL", "")

# Variables of the outer environment that would change what a signer does.
_LEAKY = re.compile(r"^(LAP_|SIGNER_|PKCS11|SOFTHSM2_CONF$|OPENSC|XDG_RUNTIME_DIR$|RUNTIME_DIRECTORY$)")


def installed_differences():
    """How the lap-pkcs11 that the CLI tests run (the venv's installed copy, as ``python
    -I`` finds it) differs from this tree: [relative path] of every file that is
    missing, extra or different. The in-process tests import the tree (pytest puts the
    checkout first on sys.path); the command-line tests run the installed command."""
    found = subprocess.run([sys.executable, "-I", "-c",
                            "import lap_pkcs11, os; print(os.path.dirname(lap_pkcs11.__file__))"],
                           capture_output=True, text=True)
    if found.returncode != 0:
        return ["lap_pkcs11 (not installed)"]
    installed = Path(found.stdout.strip())
    wanted = {path.relative_to(ROOT): path for path in (ROOT / "lap_pkcs11").rglob("*")
              if path.is_file() and "__pycache__" not in path.parts}
    wanted.update({Path("lap_pkcs11/shell", name): ROOT / "scripts" / name
                   for name in ("pkcs11_signer.sh", "smoke.sh")})
    have = {Path("lap_pkcs11") / path.relative_to(installed): path
            for path in installed.rglob("*") if path.is_file()
            and "__pycache__" not in path.parts
            and path.relative_to(installed).parts[0] != "units"}
    differences = sorted(str(name) for name in set(wanted) ^ set(have))
    differences += sorted(str(name) for name in set(wanted) & set(have)
                          if wanted[name].read_bytes() != have[name].read_bytes())
    command = Path(sys.executable).parent / "lap-pkcs11"
    tree_command = (ROOT / "bin" / "lap-pkcs11").read_bytes().split(b"\n", 1)[1]
    if not command.is_file() or command.read_bytes().split(b"\n", 1)[1] != tree_command:
        differences.append("bin/lap-pkcs11")
    return differences


def pytest_sessionstart(session):
    """Refuse to test an installed copy that is not this tree (an edit not installed
    yet, or a stale file a build left behind): the CLI tests would test the old code.

    A suite started in the background by a non-interactive shell (``cmd &``) inherits
    SIGINT and SIGQUIT ignored, under nohup SIGHUP, and so would every signer it
    starts: bash cannot trap a signal ignored at its entry, so the shell mirror's
    signal tests would see it sign on. The signals the signers note get their
    defaults back, as a caller gives them."""
    import signal

    from lap_pkcs11.per_signature.process import SIGNALS

    for signum in SIGNALS:
        if signal.getsignal(signum) == signal.SIG_IGN:
            signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT
                          else signal.SIG_DFL)
    differences = installed_differences()
    if differences:
        pytest.exit(f"the installed lap-pkcs11 ({sys.executable}) is not this tree: "
                    f"{', '.join(differences[:5])}{' ...' if len(differences) > 5 else ''}; "
                    "run scripts/setup.sh --test (or scripts/test.sh, which runs it)",
                    returncode=3)


def softhsm_module():
    for path in MODULE_CANDIDATES:
        if os.path.exists(path):
            return path
    raise AssertionError("SoftHSM2 module not found: apt-get install softhsm2")


def require(program):
    path = shutil.which(program)
    assert path, f"{program} not found: apt-get install opensc softhsm2"
    return path


def tool_program():
    """The pkcs11-tool under test: $LAP_TEST_PKCS11_TOOL, else Debian's on PATH.

    A selected version that is not built here skips the test that needs it, saying so.
    """
    if not TEST_TOOL:
        return require("pkcs11-tool")
    if not (os.path.isfile(TEST_TOOL) and os.access(TEST_TOOL, os.X_OK)):
        pytest.skip(f"LAP_TEST_PKCS11_TOOL={TEST_TOOL} is not present here "
                    "(.ci/opensc.sh build makes the OpenSC release builds)")
    return TEST_TOOL


def run_checked(argv, env, **kwargs):
    result = subprocess.run(argv, env=env, capture_output=True, **kwargs)
    assert result.returncode == 0, f"{argv[0]} failed: {result.stderr.decode(errors='replace')}"
    return result


def clean_environment(home):
    env = {key: value for key, value in os.environ.items() if not _LEAKY.match(key)}
    env["XDG_RUNTIME_DIR"] = str(home / "run")
    (home / "run").mkdir(exist_ok=True, mode=0o700)
    return env


class Token:
    """A SoftHSM2 token in its own directory, with helpers to put keys on it."""

    def __init__(self, home, label=TOKEN_LABEL):
        self.home = home
        self.label = label
        self.module = softhsm_module()
        self.dir = home / "tokens"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.conf = home / "softhsm2.conf"
        self.conf.write_text(f"directories.tokendir = {self.dir}\nobjectstore.backend = file\n"
                             "log.level = ERROR\nslots.removable = false\n")
        self.env = clean_environment(home)
        self.env["SOFTHSM2_CONF"] = str(self.conf)
        self.env["PKCS11_PIN"] = USER_PIN
        if TEST_TOOL:
            self.env["LAP_PKCS11_TOOL"] = tool_program()
        run_checked([require("softhsm2-util"), "--init-token", "--free", "--label", label,
                     "--so-pin", SO_PIN, "--pin", USER_PIN], self.env)

    def tool(self, *args, stdin=None):
        """Run the real pkcs11-tool against this token, logged in."""
        argv = [tool_program(), "--module", self.module, "--token-label", self.label,
                "--login", "--pin", "env:PKCS11_PIN", *args]
        return run_checked(argv, self.env, input=stdin)

    def keygen(self, key_id="01", label="lap-key"):
        """Generate an Ed25519 key pair on the token; return its public key bytes."""
        self.tool("--keypairgen", "--key-type", "EC:edwards25519", "--id", key_id,
                  "--label", label)
        return self.public_key(key_id)

    def import_seed(self, seed, key_id, label):
        """Import an Ed25519 seed as a PKCS#8 PEM (how RFC 8032 keys reach the token)."""
        key = Ed25519PrivateKey.from_private_bytes(seed)
        pem = self.home / f"import-{key_id}.pem"
        pem.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
        run_checked([require("softhsm2-util"), "--import", str(pem), "--token", self.label,
                     "--id", key_id, "--label", label, "--pin", USER_PIN], self.env)
        pem.unlink()
        return key.public_key().public_bytes(serialization.Encoding.Raw,
                                             serialization.PublicFormat.Raw)

    def public_key(self, key_id):
        """The 32-byte public key with this CKA_ID, read from the token's listing."""
        # pkcs11-tool 0.23 ignores --id when listing, so pick the object here.
        listing = self.tool("--list-objects", "--type", "pubkey").stdout.decode()
        found = [obj for obj in parse_objects(listing) if obj.kind == "public key"
                 and obj.id == key_id]
        assert len(found) == 1, f"{len(found)} public keys with id {key_id} on the token"
        return found[0].public_key()

    def slot_id(self):
        """The token's current slot id (SoftHSM picks a new one at every init)."""
        listing = run_checked([tool_program(), "--module", self.module, "--list-token-slots"],
                              self.env).stdout.decode()
        slots = [slot for slot, label in parse_slots(listing) if label == self.label]
        assert len(slots) == 1, listing
        return int(slots[0], 16)

    def args(self, key_id="01"):
        return ["--module", self.module, "--token-label", self.label, "--key-id", key_id]


class Signer:
    """One implementation of the signer contract, run as the gateway runs it."""

    def __init__(self, name, argv):
        self.name = name
        self.argv = argv

    def __call__(self, args, data=b"", env=None, cwd=None, timeout=60, stdin=None):
        feed = {"stdin": stdin} if stdin is not None else {"input": data}
        return subprocess.run([*self.argv, *args], env=env, cwd=cwd, capture_output=True,
                              timeout=timeout, **feed)

    def __repr__(self):
        return self.name


def python_signer():
    exe = Path(sys.executable).parent / "lap-pkcs11"
    assert exe.exists(), "lap-pkcs11 is not installed in this venv: pip install -e '.[test]'"
    return Signer("python", [str(exe), "sign"])


# The standard library's private modules the per-signature path uses for speed
# (lap_pkcs11/per_signature/process.py says which and why), and a start-up that refuses
# each of them to lap_pkcs11's own imports only (the public modules still load theirs),
# then runs the installed lap-pkcs11 command: every fallback to a public module runs.
PRIVATE_MODULES = ("_signal", "_socket", "_ctypes", "_sha512")
PUBLIC_MODULES_ONLY = f"""
import builtins, sys
real_import = builtins.__import__
def only_public(name, globals=None, locals=None, fromlist=(), level=0):
    importer = (globals or {{}}).get("__name__", "")
    if name in {PRIVATE_MODULES!r} and importer.startswith("lap_pkcs11"):
        raise ImportError(f"{{name}} is refused, to test the fallback to the public module")
    return real_import(name, globals, locals, fromlist, level)
builtins.__import__ = only_public
sys.argv = sys.argv[1:]
exec(compile(open(sys.argv[0]).read(), sys.argv[0], "exec"), {{"__name__": "__main__"}})
"""


def public_modules_signer():
    exe = Path(sys.executable).parent / "lap-pkcs11"
    return Signer("python-public", [sys.executable, "-I", "-c", PUBLIC_MODULES_ONLY, str(exe),
                                    "sign"])


IMPLEMENTATIONS = {"python": python_signer, "python-public": public_modules_signer}
if SHELL_SIGNER.exists():
    IMPLEMENTATIONS["shell"] = lambda: Signer("shell", ["bash", str(SHELL_SIGNER)])


@pytest.fixture(params=sorted(IMPLEMENTATIONS))
def signer(request):
    return IMPLEMENTATIONS[request.param]()


@pytest.fixture
def token(tmp_path):
    return Token(tmp_path)


@pytest.fixture
def keyed(token):
    """A token with one generated Ed25519 key (id 01); returns (token, public key)."""
    return token, token.keygen()


def verify(public_key, message, signature):
    """Independent Ed25519 verification; raises InvalidSignature on a bad signature."""
    Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)


def gateway_decode(stdout):
    """Decode stdout exactly as the LAP gateway does."""
    signature = base64.b64decode(stdout.decode("utf-8").strip(), validate=True)
    assert len(signature) == 64
    return signature


def assert_failure(result, name, code, pin=USER_PIN):
    """The failure contract: exit code, one stderr line with the name, empty stdout, no PIN."""
    stderr = result.stderr.decode(errors="replace")
    assert result.stdout == b"", f"stdout not empty: {result.stdout!r}"
    assert result.returncode == code, f"exit {result.returncode}, stderr: {stderr}"
    lines = stderr.splitlines()
    assert len(lines) == 1, f"expected one stderr line, got: {stderr!r}"
    assert lines[0].startswith(f"lap-pkcs11: {name}: "), lines[0]
    assert pin not in stderr


# Another user, for files and runs that are not ours: nobody.
OTHER_UID = 65534


def ordinary_user(tree):
    """An argv prefix that runs a command as an ordinary user, and the user's uid.

    As root: nobody, through setpriv, with ``tree`` (a directory the command works in)
    given to nobody. As an ordinary user already: no prefix, our own uid.
    """
    if os.geteuid() != 0:
        return [], os.geteuid()
    for folder, dirs, names in os.walk(tree):
        for name in [folder, *(os.path.join(folder, n) for n in dirs + names)]:
            os.lchown(name, OTHER_UID, OTHER_UID)
    return ["setpriv", f"--reuid={OTHER_UID}", f"--regid={OTHER_UID}", "--clear-groups",
            "--"], OTHER_UID


class Foreign:
    """Files and directories of another user, in places only we can write to.

    As root, ``plant`` writes the file (``plant_dir`` makes the directory) and gives it to
    nobody. An ordinary user cannot give a file away: ``plant`` then leaves our own empty
    file (or directory) there, and ``wrap`` runs the signer in a user and mount namespace
    where a root-owned file (directory), which shows there as nobody's, is bind-mounted
    over it. In such a namespace every directory of root's shows as nobody's too, and the
    signer rightly refuses a lock directory below one: so it runs there chrooted into a
    fresh root of our own that holds the same paths (``home``, the checkout, the venv,
    bound in from outside; the rest of / bound as it is). Either way the signer sees
    uid 65534 at each planted path, and runs with euid ``EUID``.
    """

    ROOT_OWNED = "/etc/os-release"  # valid KEY=VALUE lines: only the owner is wrong
    ROOT_OWNED_DIR = "/usr"
    EUID = 0  # root, or root in the namespace
    _SCRIPT = r"""
root=$1 home=$2
shift 2
mount -t tmpfs -o mode=755 lap-root "$root" || exit 125
top=${home#/}
top=/${top%%/*}
for entry in /*; do
  if [ "$entry" = "$top" ]; then mkdir "$root$entry"
  elif [ -L "$entry" ]; then ln -s "$(readlink "$entry")" "$root$entry"
  elif [ -d "$entry" ]; then mkdir "$root$entry" && mount --rbind "$entry" "$root$entry"
  fi
done
while [ "$1" != -- ]; do
  case $1 in "$top"/*) mkdir -p "$root$1" && mount --rbind "$1" "$root$1" ;; esac
  shift
done
shift
while [ "$1" != -- ]; do
  mount --bind "$1" "$root$2" || exit 125
  shift 2
done
shift
chroot=$(PATH=/usr/sbin:/sbin:$PATH command -v chroot) || exit 125
exec "$chroot" "$root" sh -c 'cd "$1" && shift && exec "$@"' sh "$home" "$@"
"""

    def __init__(self, home):
        self.home = Path(home)
        self.mounts = []

    def plant(self, path, content=b""):
        path = Path(path)
        if os.geteuid() == 0:
            path.write_bytes(content or Path(self.ROOT_OWNED).read_bytes())
            os.chown(path, OTHER_UID, OTHER_UID)
        else:
            path.write_bytes(b"")
            self.mounts += [self.ROOT_OWNED, str(path)]
        return path

    def plant_dir(self, path):
        path = Path(path)
        path.mkdir(mode=0o700)
        if os.geteuid() == 0:
            os.chown(path, OTHER_UID, OTHER_UID)
        else:
            self.mounts += [self.ROOT_OWNED_DIR, str(path)]
        return path

    def wrap(self, signer):
        if not self.mounts:
            return signer
        keep = sorted({str(self.home), str(ROOT), sys.prefix, sys.base_prefix})
        return _Chrooted(signer.name, signer.argv,
                         [*keep, "--", *self.mounts, "--"], str(self.home))


class _Chrooted(Signer):
    """A Signer run by Foreign's namespace script in a root of its own (made for each run)."""

    def __init__(self, name, argv, mounts, home):
        super().__init__(name, argv)
        self.mounts = mounts
        self.home = home

    def __call__(self, args, data=b"", env=None, cwd=None, timeout=60, stdin=None):
        root = tempfile.mkdtemp(prefix="lap-root-")
        try:
            prefix = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                      Foreign._SCRIPT, "sh", root, self.home, *self.mounts]
            return Signer(self.name, [*prefix, *self.argv])(args, data, env, cwd, timeout, stdin)
        finally:
            os.rmdir(root)


# The compiled client under test: CI's sanitizer build ($LAP_TEST_C_CLIENT), else one
# built from this tree by the session (never a stale binary of an earlier install).
C_CLIENT = os.environ.get("LAP_TEST_C_CLIENT", "")


@pytest.fixture(scope="session")
def compiled_client(tmp_path_factory):
    """The path of lap-pkcs11-client, built as `lap-pkcs11 install-client` builds it."""
    if C_CLIENT:
        assert os.access(C_CLIENT, os.X_OK), f"LAP_TEST_C_CLIENT={C_CLIENT} is not executable"
        return Path(C_CLIENT)
    from lap_pkcs11.admin import compiled_client as build

    assert shutil.which(os.environ.get("CC") or "cc"), \
        "no C compiler for lap-pkcs11-client: apt-get install gcc libc6-dev"
    return build.build(tmp_path_factory.mktemp("c-client") / build.NAME)
