"""What a per-signature command does to its own process before it reads a byte.

The gateway, or whoever runs us, may hand us closed or broken standard streams,
hundreds of stray descriptors, a core-dump limit that would write the PIN to a
disk, and signals at any moment. ``harden`` makes the process safe to work in.

Signals: ``install_signal_handlers`` makes every catchable signal whose default
is to end the process only *note* it (and wake any ``poll`` through a wakeup
pipe); the code then stops at its next step. A handler that raised could fire
between the start of pkcs11-tool and the wait for it, leave the tool to its
parent-less fate inside a login, and destroy a SoftHSM2 token.

It also holds what every per-signature command reads and writes: stdin under
a deadline, the answer on stdout, the one line on stderr, and strict base64
(``sign``, ``client`` and ``serve`` share these; the client needs nothing else
of the signing path, so it does not import it).

This module is on the per-signature path: it imports only what Python has built in.
"""

import binascii
import os
import time

from lap_pkcs11.per_signature import errors

_PR_SET_DUMPABLE = 4
_RLIMIT_CORE = 4
# Catchable signals whose default action ends the process (SIGPIPE and SIGXFSZ
# Python already ignores): each is noted, and the command ends in one line.
SIGNALS = {1: "SIGHUP", 2: "SIGINT", 3: "SIGQUIT", 10: "SIGUSR1", 12: "SIGUSR2",
           14: "SIGALRM", 15: "SIGTERM", 26: "SIGVTALRM", 27: "SIGPROF"}
_FD_LIMIT = 1 << 20

# The signal noted first, and the read end of the wakeup pipe (None until installed).
interrupted = None
wakeup_fd = None
# Whether ``harden`` left marking the process not dumpable to ``finish_hardening``.
_dumpable = False


def _libc_functions(public=False):
    """libc's prctl and setrlimit, through ctypes' core (a third of ctypes' import time);
    through the public ``ctypes`` when asked or when the core's API is not the one known."""
    try:
        if public:
            raise ImportError("the public module was asked for")
        import _ctypes

        class Libc:
            _handle = _ctypes.dlopen(None, 0)

        class Int(_ctypes._SimpleCData):
            _type_ = "i"

        class Function(_ctypes.CFuncPtr):
            _flags_ = _ctypes.FUNCFLAG_CDECL
            _restype_ = Int

        return Function(("prctl", Libc)), Function(("setrlimit", Libc))
    except (ImportError, AttributeError, TypeError):  # another Python: the public module
        import ctypes

        libc = ctypes.CDLL(None)
        return libc.prctl, libc.setrlimit


def no_core_dumps(public=False):
    """No core file ever holds the PIN: core limit 0 (inherited by pkcs11-tool), not dumpable."""
    prctl, setrlimit = _libc_functions(public)
    # struct rlimit {rlim_t cur, max} of zeros.
    if setrlimit(_RLIMIT_CORE, bytes(16)) != 0 or prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        raise errors.SigningFailed("core dumps cannot be switched off (prctl/setrlimit failed)")


def no_core_file():
    """Core limit 0, at once and for pkcs11-tool too (it inherits it): no core file.

    When the soft limit is 0 already (the default on most hosts, and under the
    units' LimitCORE=0), no core file can be written and pkcs11-tool inherits
    that: the limit is left alone, which spares this command the import of
    ``resource``. ``finish_hardening`` sets both limits to 0 either way.
    """
    if _soft_core_limit() == b"0":
        return
    import resource

    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _soft_core_limit():
    """The soft core-size limit as /proc/self/limits shows it (b"0", b"unlimited", ...),
    or None when it cannot be read."""
    try:
        fd = os.open("/proc/self/limits", os.O_RDONLY | os.O_CLOEXEC)
        try:
            text = os.read(fd, 8192)
        finally:
            os.close(fd)
    except OSError:
        return None
    for line in text.split(b"\n"):
        if line.startswith(b"Max core file size"):
            fields = line.split()
            return fields[4] if len(fields) > 4 else None
    return None


def finish_hardening():
    """Mark the process not dumpable, once, after ``harden`` (the signer calls this while
    pkcs11-tool runs: loading ctypes' core there costs the caller nothing; the core
    limit is 0 from the start, so no core file can be written before it either)."""
    global _dumpable
    if _dumpable:
        _dumpable = False
        no_core_dumps()


def harden():
    """Open the standard streams that are closed, close every other inherited descriptor,
    take over the signals, set the core limit to 0; return the set of standard
    descriptors that were closed. ``finish_hardening`` completes it."""
    global _dumpable
    closed = set()
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            # Occupy the slot, so that no file we open later becomes "stdout".
            null = os.open("/dev/null", os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
            closed.add(fd)
    os.closerange(3, _FD_LIMIT)
    install_signal_handlers()
    no_core_file()
    _dumpable = True
    return closed


def stat_fields(pid="self"):
    """The fields of /proc/PID/stat from the state on (field 3 is [0]), as bytes: what
    follows the last ")", so that no command name can shift them. OSError when there
    is no such process."""
    fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.read(fd, 4096).rsplit(b")", 1)[1].split()
    finally:
        os.close(fd)


def start_ticks(pid="self"):
    """Field 22 of /proc/PID/stat, the process's start time in clock ticks since boot."""
    return stat_fields(pid)[19]


def started_at():
    """When this process began, in ``time.monotonic()`` seconds.

    The caller's deadline runs from before it started us, and under load the
    interpreter's own start can take hundreds of milliseconds: the kernel's start
    time of the process (clock ticks since boot) counts them, Python's clock at
    ``main`` does not.
    """
    now = time.monotonic()
    try:
        ticks = int(start_ticks())
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return now
    return now - min(max(age, 0.0), 60.0)


def _note(signum, frame):
    global interrupted
    if interrupted is None:
        interrupted = signum


# The standard library's private C modules below save the per-signature commands
# their public wrappers' imports (measured here, CPU over ``python -I -c pass``:
# _signal 0 against signal +4.4 ms, _socket +0.4 against socket +6.5 ms, _ctypes
# +0.4 against ctypes +1.5 ms, _sha512 0 against hashlib +2.9 ms in ed25519.py).
# Each falls back to the public module when this Python has no such private one;
# the tests run every per-signature command with the private ones refused too
# (the "python-public" signer of tests/conftest.py).


def _signal_module():
    try:
        import _signal as module
    except ImportError:
        import signal as module
    return module


def socket_module():
    """``_socket``, or ``socket`` where there is no such private module."""
    try:
        import _socket as module
    except ImportError:
        import socket as module
    return module


def install_signal_handlers():
    """Note the terminating signals instead of dying of them; wake ``poll`` on each.
    SIGCHLD gets its default back: ignored (as a caller may leave it), the kernel would
    reap our children itself and no exit status of pkcs11-tool could be read."""
    global wakeup_fd
    module = _signal_module()
    if wakeup_fd is None:
        read_end, write_end = os.pipe()
        os.set_blocking(read_end, False)
        os.set_blocking(write_end, False)
        module.set_wakeup_fd(write_end, warn_on_full_buffer=False)
        wakeup_fd = read_end
    for signum in SIGNALS:
        module.signal(signum, _note)
    module.signal(module.SIGCHLD, module.SIG_DFL)


def drain_wakeups():
    """Empty the wakeup pipe (after a poll saw it readable)."""
    try:
        while os.read(wakeup_fd, 512):
            pass
    except (BlockingIOError, TypeError):
        pass


def interruption():
    """The error for the signal noted, or None."""
    if interrupted is None:
        return None
    return errors.SigningFailed(
        f"interrupted by {SIGNALS.get(interrupted, interrupted)}; nothing was signed")


def check_interrupted():
    """Stop here, in one line, when a signal was noted."""
    error = interruption()
    if error is not None:
        raise error


def wait_readable(fd, deadline):
    """Whether ``fd`` became readable before the monotonic ``deadline``; a noted signal
    raises its error (the poll wakes up for it)."""
    from select import POLLIN, poll

    poller = poll()
    poller.register(fd, POLLIN)
    if wakeup_fd is not None:
        poller.register(wakeup_fd, POLLIN)
    while True:
        check_interrupted()
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        ready = [ready_fd for ready_fd, _ in poller.poll(left * 1000)]
        if fd in ready:
            return True
        if ready:
            drain_wakeups()


def pause(seconds):
    """Sleep ``seconds``, or less when a signal arrives; a noted signal raises its error."""
    check_interrupted()
    if wakeup_fd is None:
        time.sleep(seconds)
        return
    from select import POLLIN, poll

    poller = poll()
    poller.register(wakeup_fd, POLLIN)
    if poller.poll(seconds * 1000):
        drain_wakeups()
    check_interrupted()


def write_all(fd, data, deadline):
    """Write all of ``data`` to ``fd`` before the monotonic ``deadline``.

    OSError (EPIPE, ENOSPC, EBADF, EFBIG) propagates; Python ignores SIGPIPE, so a
    reader that went away is EPIPE here, not death. A reader that never reads is
    TimeoutError at the deadline, not a hang. When a regular file took part of
    the data before failing, that part is cut off again: no half signature stays.
    """
    from select import POLLOUT, poll

    poller = poll()
    poller.register(fd, POLLOUT)
    start = None  # a pipe, socket or terminal: writes this small are all or nothing
    try:
        info = os.fstat(fd)
        if info.st_mode & 0o170000 == 0o100000:
            from fcntl import F_GETFL, fcntl

            if fcntl(fd, F_GETFL) & os.O_APPEND or info.st_size == os.lseek(fd, 0, os.SEEK_CUR):
                start = info.st_size  # a regular file, written at its end
    except OSError:
        pass
    view = memoryview(data)
    try:
        while view:
            left = deadline - time.monotonic()
            if left <= 0 or not poller.poll(left * 1000):
                raise TimeoutError(110, "nobody reads it")
            view = view[os.write(fd, view):]
    except OSError:
        if start is not None and len(view) < len(data):
            try:
                os.ftruncate(fd, start)
            except OSError:
                pass
        raise


# ---- the standard streams ---------------------------------------------------------------

_WHITESPACE = b" \t\r\n\v\f"


def read_stdin(limit, deadline=None):
    """Up to ``limit`` + 1 bytes of stdin (one more tells that it was too long).

    With ``deadline`` (monotonic seconds), a writer that has not finished by then
    (one byte at a time, or never closing) is TIMEOUT, not a hang.
    """
    chunks, size = [], 0
    while size <= limit:
        if deadline is not None and not wait_readable(0, deadline):
            raise errors.Timeout("stdin did not end before the deadline; the caller must "
                                 "write the whole message and close stdin")
        try:
            chunk = os.read(0, limit + 1 - size)
        except OSError as err:
            raise errors.InputInvalid(f"stdin cannot be read ({err.strerror})") from None
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def decode_base64(data, what="stdin", fix="with --input base64 send base64(message) and a "
                                          "newline"):
    """The message in ``data``: strict, canonical base64, surrounding whitespace allowed
    (sign, client and the agent read base64 so; ``what`` and ``fix`` word the error)."""
    text = data.strip(_WHITESPACE)
    try:
        message = binascii.a2b_base64(text, strict_mode=True)
    except binascii.Error:
        message = None
    # Canonical only: unused bits must be zero, as every encoder writes them.
    if message is None or binascii.b2a_base64(message, newline=False) != text:
        raise errors.InputInvalid(f"{what} is not strict base64 (standard alphabet, padded); "
                                  f"{fix}")
    return message


def encode_signature(signature, encoding):
    """The signature as sign prints it (and the agent sends it): base64 or hex with a
    newline, or the raw 64 bytes."""
    if encoding == "base64":
        return binascii.b2a_base64(signature)
    if encoding == "hex":
        return signature.hex().encode() + b"\n"
    return signature


# How long a full pipe may hold up the last line (the answer is ready by then).
OUTPUT_WAIT_SECONDS = 0.2


def write_stdout(data, deadline=None):
    """The answer on stdout, within ``deadline`` (default: OUTPUT_WAIT_SECONDS from now)."""
    try:
        write_all(1, data, deadline or time.monotonic() + OUTPUT_WAIT_SECONDS)
    except OSError as err:
        raise errors.SigningFailed(f"stdout cannot be written ({err.strerror})") from None


def write_stderr(text):
    """The one stderr line; a stderr that cannot take it changes nothing else."""
    try:
        write_all(2, text.encode("utf-8", "replace"),
                          time.monotonic() + OUTPUT_WAIT_SECONDS)
    except OSError:
        pass


def begin(started, streams, refusal):
    """How every per-signature command begins: harden the process (``harden``), count
    its start from the kernel's clock (the caller's deadline runs from before it
    started us), and refuse to go on when one of ``streams`` (standard descriptors the
    command needs) was closed, ``refusal`` saying why. Return (start time, None), or
    (None, the exit code) once the one line is on stderr."""
    failure = None
    try:
        closed = harden()
    except (OSError, ImportError) as err:  # e.g. no descriptor left to load a module with
        failure = errors.SigningFailed(f"the process cannot be prepared ({err}); nothing was "
                                       "signed")
    else:
        if closed & set(streams):
            failure = errors.SigningFailed(refusal)
    if failure is not None:
        write_stderr(failure.line() + "\n")
        return None, failure.exit_code
    return min(started or time.monotonic(), started_at()), None


def answer(code, out, err):
    """Print a command's outcome: ``out`` on stdout (a failure to is the error then),
    ``err`` on stderr; return the exit code."""
    if out:
        try:
            write_stdout(out)
        except errors.SignerError as failure:
            code, err = failure.exit_code, failure.line() + "\n"
    if err:
        write_stderr(err)
    return code
