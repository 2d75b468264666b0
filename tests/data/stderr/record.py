#!/usr/bin/env python3
"""Record real pkcs11-tool stderr for the failures lap-pkcs11 classifies.

Usage: .venv/bin/python tests/data/stderr/record.py PKCS11_TOOL OUT_DIR

Every case runs PKCS11_TOOL the way lap-pkcs11 does (see lap_pkcs11/backends/pkcs11_tool.py:
sign_argv, list_objects_argv, token_listing_argv), against throwaway SoftHSM2
tokens, each token directory with its own SOFTHSM2_CONF. For each case it saves
OUT_DIR/<case>.stderr (the exact bytes) and OUT_DIR/cases.json:

    {case: {"argv_tail": [...], "status": N, "phrase": P or null, "note": "..."}}

argv_tail is the argv after the tool's path; "phrase" is the first of PHRASES
(lap-pkcs11's _CLASSES order) that the stderr contains; two extra keys:
"all_phrases" (every phrase it contains, in that order) and "expected" (the
phrase the case was meant to provoke, or null). OUT_DIR/meta.json says
which tool and OpenSC version recorded them.

PINs never go into an argv: pkcs11-tool gets them as env:NAME (--pin, --so-pin,
--new-pin), softhsm2-util --import reads the user PIN from a pseudo-terminal,
and the CKA_SIGN=false key is made through ctypes (C_SetAttributeValue) in a
child process of this script. Uses only the standard library and `cryptography`.
"""

import ctypes
import json
import os
import pty
import select
import re
import shutil
import subprocess
import sys
import time

from lap_pkcs11.backends.pkcs11_tool import _CLASSES

MODULE = "/usr/lib/softhsm/libsofthsm2.so"
SOFTHSM2_UTIL = "softhsm2-util"
LABEL = "lap-test"
USER_PIN = "123456"
SO_PIN = "12345678"
PIN_ENV = "PKCS11_PIN"
SO_ENV = "SO_PIN"
NEW_ENV = "NEW_PIN"
TIMEOUT = 120

# The phrases lap-pkcs11 classifies by, in their order (the package is installed in
# the venv this runs in).
PHRASES = [needle for needle, _, _ in _CLASSES]


def first_phrase(text):
    for phrase in PHRASES:
        if phrase in text:
            return phrase
    return None


# ---------------------------------------------------------------- tokens


class Tokens:
    """A throwaway SoftHSM2 token directory with its own SOFTHSM2_CONF."""

    def __init__(self, root, name, tool):
        self.dir = os.path.join(root, name)
        self.tokendir = os.path.join(self.dir, "tokens")
        self.conf = os.path.join(self.dir, "softhsm2.conf")
        self.tool = tool
        os.makedirs(self.tokendir)
        with open(self.conf, "w") as f:
            f.write(f"directories.tokendir = {self.tokendir}\n"
                    "objectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n")

    def env(self, **extra):
        env = base_env()
        env["SOFTHSM2_CONF"] = self.conf
        env.update(extra)
        return env

    def setup(self, args, **extra):
        """A setup step with the tool under test; it must succeed."""
        env = self.env(**{PIN_ENV: USER_PIN, SO_ENV: SO_PIN, NEW_ENV: USER_PIN}, **extra)
        proc = subprocess.run([self.tool, "--module", MODULE, *args], env=env, stdin=subprocess.DEVNULL,
                              capture_output=True, timeout=TIMEOUT)
        if proc.returncode != 0:
            raise RuntimeError(f"setup {args} failed ({proc.returncode}): {proc.stderr.decode(errors='replace')}")
        return proc.stdout.decode(errors="replace")

    def init_token(self, label, user_pin=True):
        """Initialise the first free slot's token (and its user PIN)."""
        slots = self.slots()
        free = [s for s in slots if not s["initialized"]]
        self.setup(["--slot", str(free[0]["id"]), "--init-token", "--label", label, "--so-pin", "env:" + SO_ENV])
        if user_pin:
            self.setup(["--token-label", label, "--login", "--login-type", "so", "--so-pin", "env:" + SO_ENV,
                        "--init-pin", "--new-pin", "env:" + NEW_ENV])

    def slots(self):
        """[{id, index, initialized, label}] from --list-slots."""
        out = self.setup(["--list-slots"])
        slots = []
        for line in out.splitlines():
            m = re.match(r"Slot (\d+) \(0x([0-9a-fA-F]+)\):", line)
            if m:
                slots.append({"index": int(m.group(1)), "id": int(m.group(2), 16),
                              "initialized": True, "label": None})
            elif slots and "token state:" in line and "uninitialized" in line:
                slots[-1]["initialized"] = False
            elif slots and re.match(r"\s+token label\s*:", line):
                slots[-1]["label"] = line.split(":", 1)[1].strip()
        return slots

    def keygen(self, label, key_id, key_type, *usage):
        self.setup(["--token-label", label, "--login", "--pin", "env:" + PIN_ENV, "--keypairgen",
                    "--key-type", key_type, "--id", key_id, "--label", "k" + key_id, *usage])

    def import_pem(self, label, key_id, pem):
        """softhsm2-util --import of a PKCS#8 PEM; the PIN goes in through a pty."""
        path = os.path.join(self.dir, f"key{key_id}.pem")
        with open(path, "wb") as f:
            f.write(pem)
        argv = [SOFTHSM2_UTIL, "--import", path, "--token", label, "--label", "k" + key_id, "--id", key_id]
        master, slave = pty.openpty()
        proc = None
        out = b""
        try:
            proc = subprocess.Popen(argv, env=self.env(), stdin=slave, stdout=slave, stderr=slave,
                                    start_new_session=True)
            os.close(slave)
            slave = None
            sent = 0
            deadline = time.monotonic() + TIMEOUT
            while time.monotonic() < deadline:
                ready, _, _ = select.select([master], [], [], 1.0)
                if not ready:
                    continue
                try:
                    chunk = os.read(master, 4096)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not chunk:
                    break
                out += chunk
                while out.count(b"PIN: ") > sent:  # a prompt (enter, then re-enter): echo is off
                    os.write(master, USER_PIN.encode() + b"\n")
                    sent += 1
            status = proc.wait(timeout=5)
        finally:
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
            os.close(master)
            if slave is not None:
                os.close(slave)
        os.unlink(path)
        if status != 0:
            raise RuntimeError(f"softhsm2-util --import failed ({status}): {out.decode(errors='replace')}")

    def unset_sign(self, label, key_id):
        """CKA_SIGN=false on the private key KEY_ID, through ctypes in a child process."""
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--unset-sign", label, key_id],
                              env=self.env(**{PIN_ENV: USER_PIN}), capture_output=True, timeout=TIMEOUT)
        if proc.returncode != 0:
            raise RuntimeError("unset-sign failed: " + proc.stderr.decode(errors="replace"))


def base_env():
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C"}
    env["HOME"] = os.environ.get("RECORD_HOME", "/nonexistent")
    return env


# ---------------------------------------------------------------- ctypes helper

def unset_sign_main(label, key_id):
    """Child process: C_SetAttributeValue(CKA_SIGN=false) on a private key, PIN from $PKCS11_PIN."""
    ul = ctypes.c_ulong

    class Attr(ctypes.Structure):
        _fields_ = [("type", ul), ("pValue", ctypes.c_void_p), ("ulValueLen", ul)]

    lib = ctypes.CDLL(MODULE)
    for name in ("C_Initialize", "C_GetSlotList", "C_GetTokenInfo", "C_OpenSession", "C_Login",
                 "C_FindObjectsInit", "C_FindObjects", "C_FindObjectsFinal", "C_SetAttributeValue",
                 "C_Logout", "C_CloseSession", "C_Finalize"):
        getattr(lib, name).restype = ul

    def ok(rv, what):
        if rv != 0:
            raise SystemExit(f"{what} failed: 0x{rv:x}")

    ok(lib.C_Initialize(None), "C_Initialize")
    count = ul(0)
    ok(lib.C_GetSlotList(ctypes.c_ubyte(1), None, ctypes.byref(count)), "C_GetSlotList")
    slots = (ul * count.value)()
    ok(lib.C_GetSlotList(ctypes.c_ubyte(1), slots, ctypes.byref(count)), "C_GetSlotList")
    slot = None
    for s in slots[:count.value]:
        info = ctypes.create_string_buffer(1024)
        if lib.C_GetTokenInfo(ul(s), info) == 0 and info.raw[:32].rstrip(b" ") == label.encode():
            slot = s
    if slot is None:
        raise SystemExit("token not found")
    session = ul(0)
    ok(lib.C_OpenSession(ul(slot), ul(6), None, None, ctypes.byref(session)), "C_OpenSession")
    pin = os.environ[PIN_ENV].encode()
    ok(lib.C_Login(session, ul(1), ctypes.c_char_p(pin), ul(len(pin))), "C_Login")
    cls = ul(3)  # CKO_PRIVATE_KEY
    kid = ctypes.create_string_buffer(bytes.fromhex(key_id), len(key_id) // 2)
    tmpl = (Attr * 2)(Attr(0x0, ctypes.cast(ctypes.byref(cls), ctypes.c_void_p), ctypes.sizeof(cls)),
                      Attr(0x102, ctypes.cast(kid, ctypes.c_void_p), len(key_id) // 2))
    ok(lib.C_FindObjectsInit(session, tmpl, ul(2)), "C_FindObjectsInit")
    objs = (ul * 4)()
    found = ul(0)
    ok(lib.C_FindObjects(session, objs, ul(4), ctypes.byref(found)), "C_FindObjects")
    ok(lib.C_FindObjectsFinal(session), "C_FindObjectsFinal")
    if found.value != 1:
        raise SystemExit(f"found {found.value} private keys with id {key_id}")
    false = ctypes.c_ubyte(0)
    attr = (Attr * 1)(Attr(0x108, ctypes.cast(ctypes.byref(false), ctypes.c_void_p), 1))  # CKA_SIGN
    ok(lib.C_SetAttributeValue(session, objs[0], attr, ul(1)), "C_SetAttributeValue(CKA_SIGN)")
    lib.C_Logout(session)
    lib.C_CloseSession(session)
    lib.C_Finalize(None)


# ---------------------------------------------------------------- keys

def der(tag, body):
    n = len(body)
    if n < 0x80:
        head = bytes([n])
    else:
        size = n.to_bytes((n.bit_length() + 7) // 8, "big")
        head = bytes([0x80 | len(size)]) + size
    return bytes([tag]) + head + body


def der_oid(dotted):
    parts = [int(p) for p in dotted.split(".")]
    body = bytes([40 * parts[0] + parts[1]])
    for p in parts[2:]:
        chunk = [p & 0x7F]
        p >>= 7
        while p:
            chunk.append(0x80 | (p & 0x7F))
            p >>= 7
        body += bytes(reversed(chunk))
    return der(0x06, body)


def ec_pkcs8_pem(curve_oid, scalar_len):
    """A PKCS#8 PEM of an EC private key on any named curve (no public key: OpenSSL derives it).

    For curves `cryptography` cannot generate (secp224k1 here); the scalar is random
    and shorter than the order."""
    import base64
    d = b"\x00" * 2 + b"\x01" + os.urandom(scalar_len - 3)
    ec_private_key = der(0x30, der(0x02, b"\x01") + der(0x04, d))
    info = der(0x30, der(0x02, b"\x00") + der(0x30, der_oid("1.2.840.10045.2.1") + der_oid(curve_oid))
               + der(0x04, ec_private_key))
    b64 = base64.encodebytes(info).decode().replace("\n", "")
    lines = [b64[i:i + 64] for i in range(0, len(b64), 64)]
    return ("-----BEGIN PRIVATE KEY-----\n" + "\n".join(lines) + "\n-----END PRIVATE KEY-----\n").encode()


def pkcs8(key):
    from cryptography.hazmat.primitives import serialization
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


# ---------------------------------------------------------------- recording

class Recorder:
    def __init__(self, tool, out_dir, work):
        self.tool = tool
        self.out = out_dir
        self.work = work
        self.cases = {}
        self.input = os.path.join(work, "message.bin")
        with open(self.input, "wb") as f:
            f.write(b"lap-pkcs11 stderr recording\n")

    def input_file(self, size):
        path = os.path.join(self.work, f"message-{size}.bin")
        with open(path, "wb") as f:
            f.write(b"m" * size)
        return path

    def run(self, case, argv_tail, env, note, expected=None):
        """Run the tool as lap-pkcs11 does: no shell, a new session, no terminal, stdin /dev/null."""
        proc = subprocess.run([self.tool, *argv_tail], env=env, stdin=subprocess.DEVNULL,
                              capture_output=True, timeout=TIMEOUT, start_new_session=True)
        with open(os.path.join(self.out, case + ".stderr"), "wb") as f:
            f.write(proc.stderr)
        text = proc.stderr.decode("utf-8", errors="replace")
        phrase = first_phrase(text)
        self.cases[case] = {"argv_tail": argv_tail, "status": proc.returncode, "phrase": phrase, "note": note,
                            "all_phrases": [p for p in PHRASES if p in text], "expected": expected}
        mark = "" if expected is None or expected == phrase else f"   <-- expected {expected!r}"
        last = [l for l in text.splitlines() if l.strip()]
        print(f"{case:40} {proc.returncode:4} {phrase!r:34} {last[-1][:90] if last else ''}{mark}")
        return proc

    def save(self):
        with open(os.path.join(self.out, "cases.json"), "w") as f:
            json.dump(self.cases, f, indent=2, sort_keys=False)
            f.write("\n")


def sel(module=MODULE, label=LABEL, slot=None, index=None):
    args = ["--module", module]
    if slot is not None:
        args += ["--slot", str(slot)]
    elif index is not None:
        args += ["--slot-index", str(index)]
    elif label is not None:
        args += ["--token-label", label]
    return args


def sign(selector, key_id="01", mechanism="EDDSA", input_file=None):
    return [*selector, "--login", "--pin", "env:" + PIN_ENV, "--sign", "--mechanism", mechanism,
            "--id", key_id, "--input-file", input_file]


def list_objects(selector, login=True):
    return [*selector, *(["--login", "--pin", "env:" + PIN_ENV] if login else []),
            "--list-objects", "--type", "privkey"]


def token_listing(selector):
    return [*selector, "--show-info", "--list-token-slots"]


def tool_version(tool):
    opensc_tool = os.path.join(os.path.dirname(os.path.realpath(tool)), "opensc-tool")
    try:
        out = subprocess.run([opensc_tool, "--info"], capture_output=True, timeout=30).stdout.decode()
        return opensc_tool, out.splitlines()[0] if out else None
    except OSError:
        return opensc_tool, None


def main(tool, out_dir):
    tool = os.path.abspath(tool) if os.sep in tool else shutil.which(tool)
    os.makedirs(out_dir, exist_ok=True)
    for name in os.listdir(out_dir):
        if name.endswith(".stderr") or name in ("cases.json", "meta.json"):
            os.unlink(os.path.join(out_dir, name))
    here = os.path.dirname(os.path.abspath(__file__))
    # A fixed place, so that the paths in argv_tail and in the recorded stderr are the same on every run.
    work = os.path.join(here, "work")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    os.environ["RECORD_HOME"] = os.path.join(work, "home")
    os.makedirs(os.environ["RECORD_HOME"])
    try:
        record(tool, out_dir, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def record(tool, out_dir, work):
    from cryptography.hazmat.primitives.asymmetric import ed448, ed25519

    opensc_tool, version = tool_version(tool)
    with open(os.path.join(out_dir, "meta.json"), "w") as f:
        json.dump({"pkcs11_tool": tool, "opensc_tool": opensc_tool, "version": version,
                   "module": MODULE,
                   "softhsm2_util": subprocess.run([SOFTHSM2_UTIL, "--version"], capture_output=True,
                                                   text=True).stdout.strip()}, f, indent=2)
        f.write("\n")
    print(f"# {tool}: {version}")
    rec = Recorder(tool, out_dir, work)
    msg = rec.input

    # The main token: one of each key.
    main_t = Tokens(work, "main", tool)
    main_t.init_token(LABEL)
    main_t.keygen(LABEL, "01", "EC:edwards25519", "--usage-sign")
    main_t.keygen(LABEL, "02", "EC:prime256v1", "--usage-sign")
    main_t.keygen(LABEL, "03", "rsa:2048", "--usage-sign")
    main_t.keygen(LABEL, "04", "EC:edwards25519", "--usage-sign")
    main_t.unset_sign(LABEL, "04")
    have_ed448 = True
    try:
        main_t.import_pem(LABEL, "05", pkcs8(ed448.Ed448PrivateKey.generate()))
    except RuntimeError as e:
        have_ed448 = False
        print("# no ed448 key:", str(e).strip().splitlines()[-1])
    main_t.import_pem(LABEL, "06", ec_pkcs8_pem("1.3.132.0.32", 29))  # secp224k1
    main_t.import_pem(LABEL, "07", pkcs8(ed25519.Ed25519PrivateKey.generate()))
    slots = main_t.slots()
    free = [s for s in slots if not s["initialized"]][0]
    good = main_t.env(**{PIN_ENV: USER_PIN})

    def with_pin(pin):
        return main_t.env(**{PIN_ENV: pin})

    # Baseline.
    rec.run("sign_ok", sign(sel(), input_file=msg), good, "baseline: Ed25519 key 01, right PIN; succeeds")
    rec.run("sign_ok_slot_index", sign(sel(index=[s["index"] for s in slots if s["label"] == LABEL][0]),
                                       input_file=msg), good, "baseline by --slot-index")
    rec.run("list_objects_ok", list_objects(sel()), good, "baseline listing")
    rec.run("token_listing_ok", token_listing(sel(label=None)), good, "baseline token listing")

    # PINs.
    rec.run("pin_incorrect", sign(sel(), input_file=msg), with_pin("87654321"),
            "wrong PIN (8 digits)", "CKR_PIN_INCORRECT")
    rec.run("pin_len_300", sign(sel(), input_file=msg), with_pin("7" * 300),
            "300-character PIN (SoftHSM2 allows 4..255)", "CKR_PIN_LEN_RANGE")
    rec.run("pin_len_256", sign(sel(), input_file=msg), with_pin("7" * 256),
            "256-character PIN (SoftHSM2 allows 4..255)", "CKR_PIN_LEN_RANGE")
    rec.run("pin_len_3", sign(sel(), input_file=msg), with_pin("777"),
            "3-character PIN (SoftHSM2 allows 4..255)", "CKR_PIN_LEN_RANGE")
    rec.run("pin_len_1", sign(sel(), input_file=msg), with_pin("7"),
            "1-character PIN", "CKR_PIN_LEN_RANGE")
    rec.run("pin_empty", sign(sel(), input_file=msg), with_pin(""),
            "PKCS11_PIN set but empty: pkcs11-tool's login() returns 1 without a word (empty stderr)", None)
    rec.run("pin_env_unset", sign(sel(), input_file=msg), main_t.env(),
            "PKCS11_PIN not in the environment at all: pkcs11-tool prompts on stdout and fails to read "
            "the PIN from stdin (/dev/null)", None)
    rec.run("list_objects_pin_incorrect", list_objects(sel()), with_pin("87654321"),
            "listing with a wrong PIN", "CKR_PIN_INCORRECT")

    # Lockout: 20 wrong logins, then the right PIN.
    for i in range(20):
        subprocess.run([tool, *sign(sel(), input_file=msg)], env=with_pin("87654321"),
                       stdin=subprocess.DEVNULL, capture_output=True, timeout=TIMEOUT)
    rec.run("pin_incorrect_after_20_wrong", sign(sel(), input_file=msg), with_pin("87654321"),
            "21st wrong PIN in a row: SoftHSM2 has no retry counter, so still CKR_PIN_INCORRECT, "
            "never CKR_PIN_LOCKED", "CKR_PIN_LOCKED")
    rec.run("pin_correct_after_21_wrong", sign(sel(), input_file=msg), good,
            "right PIN after 21 wrong ones: succeeds (no lockout in SoftHSM2)", None)

    # Token selection.
    rec.run("token_label_missing", sign(sel(label="no-such-token"), input_file=msg), good,
            "--token-label of no token", "No slot with token named")
    rec.run("list_objects_token_label_missing", list_objects(sel(label="no-such-token")), good,
            "listing, --token-label of no token", "No slot with token named")
    rec.run("slot_id_invalid", sign(sel(slot=424242), input_file=msg), good,
            "--slot 424242 (no such slot id)", "CKR_SLOT_ID_INVALID")
    rec.run("list_objects_slot_id_invalid", list_objects(sel(slot=424242)), good,
            "listing, --slot 424242", "CKR_SLOT_ID_INVALID")
    rec.run("token_listing_slot_id_invalid", token_listing(sel(slot=424242)), good,
            "token listing with --slot 424242 in front: succeeds, --show-info --list-token-slots never "
            "uses the selected slot", None)
    rec.run("slot_index_7", sign(sel(index=7), input_file=msg), good,
            "--slot-index 7 (SoftHSM2 has 2 slots here)", "is not available")
    rec.run("list_objects_slot_index_7", list_objects(sel(index=7)), good,
            "listing, --slot-index 7", "is not available")
    rec.run("uninit_slot_by_index", sign(sel(index=free["index"]), input_file=msg), good,
            f"--slot-index {free['index']}: SoftHSM2's free slot (uninitialised token)", "Token not initialized")
    rec.run("uninit_slot_by_id", sign(sel(slot=free["id"]), input_file=msg), good,
            f"--slot {free['id']}: SoftHSM2's free slot (uninitialised token)", "Token not initialized")
    rec.run("list_objects_uninit_slot_by_index", list_objects(sel(index=free["index"])), good,
            "listing with login on the free slot", "CKR_TOKEN_NOT_RECOGNIZED")
    rec.run("list_objects_uninit_slot_by_id_nologin", list_objects(sel(slot=free["id"]), login=False), good,
            "listing without login on the free slot", "CKR_TOKEN_NOT_RECOGNIZED")

    # A token whose user PIN was never set.
    nopin = Tokens(work, "nopin", tool)
    nopin.init_token("no-user-pin", user_pin=False)
    rec.run("user_pin_not_initialized", sign(sel(label="no-user-pin"), input_file=msg),
            nopin.env(**{PIN_ENV: USER_PIN}),
            "token initialised without a user PIN (CKR_USER_PIN_NOT_INITIALIZED is not in _CLASSES)", None)

    # A token directory with no tokens at all (SoftHSM2 still shows one free slot).
    empty = Tokens(work, "empty", tool)
    empty_env = empty.env(**{PIN_ENV: USER_PIN})
    rec.run("empty_tokendir_sign_label", sign(sel(), input_file=msg), empty_env,
            "empty token directory, --token-label", "No slot with token named")
    rec.run("empty_tokendir_sign_slot_index_0", sign(sel(index=0), input_file=msg), empty_env,
            "empty token directory, --slot-index 0 (the free slot)", "Token not initialized")
    rec.run("empty_tokendir_sign_no_selector", sign(sel(label=None), input_file=msg), empty_env,
            "empty token directory, no selector (pkcs11-tool picks the first slot with a token: "
            "the free one)", "Token not initialized")
    rec.run("empty_tokendir_token_listing", token_listing(sel(label=None)), empty_env,
            "empty token directory, --show-info --list-token-slots: SoftHSM2 always has the free slot, "
            "so no 'No slots'", None)

    # Module problems.
    rec.run("module_missing", sign(sel(module="/nonexistent/libnothere.so"), input_file=msg), good,
            "--module path that does not exist", "Failed to load pkcs11 module")
    rec.run("module_missing_token_listing", token_listing(sel(module="/nonexistent/libnothere.so", label=None)),
            good, "token listing, --module path that does not exist", "Failed to load pkcs11 module")
    rec.run("module_not_elf", sign(sel(module="/etc/hostname"), input_file=msg), good,
            "--module /etc/hostname (not a shared object)", "Failed to load pkcs11 module")
    libz = next((p for p in ("/lib/x86_64-linux-gnu/libz.so.1", "/usr/lib/x86_64-linux-gnu/libz.so.1")
                 if os.path.exists(p)), None)
    if libz:
        rec.run("module_not_pkcs11", sign(sel(module=libz), input_file=msg), good,
                f"--module {libz} (a shared object without C_GetFunctionList)", "Failed to load pkcs11 module")
    rec.run("module_is_directory", sign(sel(module="/usr/lib"), input_file=msg), good,
            "--module /usr/lib (a directory)", "Failed to load pkcs11 module")
    conf_missing = main_t.env(**{PIN_ENV: USER_PIN, "SOFTHSM2_CONF": os.path.join(work, "no-such.conf")})
    rec.run("conf_missing", sign(sel(), input_file=msg), conf_missing,
            "SOFTHSM2_CONF names a missing file: SoftHSM2's C_Initialize fails", "C_Initialize failed")
    rec.run("conf_missing_token_listing", token_listing(sel(label=None)), conf_missing,
            "token listing, SOFTHSM2_CONF names a missing file", "C_Initialize failed")
    bad_conf = os.path.join(work, "bad-tokendir.conf")
    with open(bad_conf, "w") as f:
        f.write(f"directories.tokendir = {os.path.join(work, 'no-such-dir')}\nobjectstore.backend = file\n"
                "log.level = ERROR\n")
    rec.run("conf_tokendir_missing", sign(sel(), input_file=msg),
            main_t.env(**{PIN_ENV: USER_PIN, "SOFTHSM2_CONF": bad_conf}),
            "SOFTHSM2_CONF whose tokendir does not exist", "C_Initialize failed")
    rec.run("conf_tokendir_missing_token_listing", token_listing(sel(label=None)),
            main_t.env(**{PIN_ENV: USER_PIN, "SOFTHSM2_CONF": bad_conf}),
            "token listing, tokendir does not exist", "C_Initialize failed")

    # Keys.
    rec.run("key_absent", sign(sel(), key_id="99", input_file=msg), good,
            "--id 99: no such key (0.23 says 'Private key not found')", "Private/secret key not found")
    rec.run("key_ec_p256_eddsa", sign(sel(), key_id="02", input_file=msg), good,
            "EC P-256 key (keypairgen EC:prime256v1) with EDDSA. 0.26.1 rejects the curve itself (its "
            "curve match compares hex strings case-sensitively, so P-256 is 'unknown'); 0.23 (no check) and "
            "0.27.1 (P-256 is known) pass it to SoftHSM2, whose C_SignInit accepts it and C_Sign fails "
            "with CKR_GENERAL_ERROR; pkcs11-tool then retries in parts: CKR_OPERATION_NOT_INITIALIZED",
            "Unknown or unsupported EC curve")
    rec.run("key_rsa_eddsa", sign(sel(), key_id="03", input_file=msg), good,
            "RSA-2048 key with EDDSA (0.23 has no EC_PARAMS check: CKR_OPERATION_NOT_INITIALIZED)",
            "Key has no EC_PARAMS attribute")
    rec.run("key_sign_false", sign(sel(), key_id="04", input_file=msg), good,
            "Ed25519 key with CKA_SIGN set to false (C_SetAttributeValue; pkcs11-tool --keypairgen "
            "cannot make one: SoftHSM2 defaults CKA_SIGN to true)", "CKR_KEY_FUNCTION_NOT_PERMITTED")
    if have_ed448:
        rec.run("key_ed448_eddsa", sign(sel(), key_id="05", input_file=msg), good,
                "Ed448 key (imported with softhsm2-util) with EDDSA", None)
    rec.run("key_secp224k1_eddsa", sign(sel(), key_id="06", input_file=msg), good,
            "imported EC secp224k1 key (a curve pkcs11-tool does not know) with EDDSA",
            "Unknown or unsupported EC curve")
    rec.run("key_imported_ed25519_eddsa", sign(sel(), key_id="07", input_file=msg), good,
            "Ed25519 key imported with softhsm2-util (EC_PARAMS is OID 1.3.101.112)", None)

    # Mechanisms.
    rec.run("mech_unknown", sign(sel(), mechanism="FOO", input_file=msg), good,
            "--mechanism FOO", "Unknown PKCS11 mechanism")
    rec.run("mech_pss_on_ed25519", sign(sel(), mechanism="SHA1-RSA-PKCS-PSS", input_file=msg), good,
            "--mechanism SHA1-RSA-PKCS-PSS on the Ed25519 key: SoftHSM2 accepts C_SignInit and "
            "C_SignUpdate, C_SignFinal fails with CKR_GENERAL_ERROR (unclassified)", "CKR_KEY_TYPE_INCONSISTENT")
    rec.run("mech_rsa_pkcs_on_ed25519", sign(sel(), mechanism="RSA-PKCS", input_file=msg), good,
            "--mechanism RSA-PKCS on the Ed25519 key: SoftHSM2's C_Sign fails (CKR_GENERAL_ERROR), the "
            "multi-part retry gives CKR_OPERATION_NOT_INITIALIZED", "CKR_KEY_TYPE_INCONSISTENT")
    rec.run("mech_ecdsa_on_ed25519", sign(sel(), mechanism="ECDSA", input_file=msg), good,
            "--mechanism ECDSA on the Ed25519 key: as RSA-PKCS", "CKR_KEY_TYPE_INCONSISTENT")
    rec.run("mech_ecdsa_sha256_on_ed25519", sign(sel(), mechanism="ECDSA-SHA256", input_file=msg), good,
            "--mechanism ECDSA-SHA256 (SoftHSM2 2.6 lacks it) on the Ed25519 key", "CKR_MECHANISM_INVALID")
    rec.run("mech_ecdsa_sha256_on_p256", sign(sel(), key_id="02", mechanism="ECDSA-SHA256", input_file=msg),
            good, "--mechanism ECDSA-SHA256 (SoftHSM2 2.6 lacks it) on the P-256 key", "CKR_MECHANISM_INVALID")
    rec.run("mech_gost_on_ed25519", sign(sel(), mechanism="GOSTR3410", input_file=msg), good,
            "--mechanism GOSTR3410 (SoftHSM2 here has no GOST) on the Ed25519 key", "CKR_MECHANISM_INVALID")
    rec.run("mech_sha256_hmac_on_ed25519", sign(sel(), mechanism="SHA256-HMAC", input_file=msg), good,
            "--mechanism SHA256-HMAC (a MAC): pkcs11-tool looks for a secret key, 'Could not find key of "
            "type: Secret' (unclassified)", None)

    # Input sizes: pkcs11-tool signs in one part below 1025 bytes, else in parts.
    rec.run("input_1024_eddsa", sign(sel(), input_file=rec.input_file(1024)), good,
            "1024-byte message: one-part C_Sign; succeeds", None)
    rec.run("input_1025_eddsa", sign(sel(), input_file=rec.input_file(1025)), good,
            "1025-byte message: pkcs11-tool switches to C_SignUpdate, which EdDSA in SoftHSM2 cannot do "
            "(lap-pkcs11 caps messages at 1024 bytes)", "CKR_OPERATION_NOT_INITIALIZED")
    rec.run("input_100000_eddsa", sign(sel(), input_file=rec.input_file(100000)), good,
            "100000-byte message (multi-part)", "CKR_OPERATION_NOT_INITIALIZED")
    rec.run("input_missing", sign(sel(), input_file="/nonexistent/message.bin"), good,
            "--input-file that does not exist", None)

    rec.save()


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--unset-sign":
        unset_sign_main(sys.argv[2], sys.argv[3])
    elif len(sys.argv) == 3:
        main(sys.argv[1], sys.argv[2])
    else:
        sys.exit("usage: python3 record.py PKCS11_TOOL OUT_DIR")
