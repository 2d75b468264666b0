"""What a per-signature command does to its own process before it reads a byte.

The gateway, or whoever runs us, may hand us closed or broken standard streams,
hundreds of stray descriptors, a core-dump limit that would write the PIN to a
disk, and signals at any moment. ``harden`` makes the process safe to work in;
``install_signal_handlers`` turns SIGINT, SIGTERM and SIGHUP into an ordinary
failure (so a running pkcs11-tool gets the same bounded grace as at the
deadline, and the caller gets one line, not a traceback); ``write_all`` writes
without ever dying of SIGPIPE.

This module is on the per-signature path: it imports only what Python has built in.
"""

import os

from lap_pkcs11 import errors

_PR_SET_DUMPABLE = 4
_RLIMIT_CORE = 4
_SIGNALS = {2: "SIGINT", 15: "SIGTERM", 1: "SIGHUP"}
_FD_LIMIT = 1 << 20


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


def harden():
    """Open the standard streams that are closed, close every other inherited descriptor,
    switch core dumps off; return the set of standard descriptors that were closed."""
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
    no_core_dumps()
    return closed


def _interrupted(signum, frame):
    raise errors.SigningFailed(f"interrupted by {_SIGNALS.get(signum, signum)}; nothing was signed")


def _signal_module():
    try:
        import _signal as module  # built in; the public module costs its enum import
    except ImportError:
        import signal as module
    return module


def install_signal_handlers():
    """SIGINT, SIGTERM and SIGHUP raise SigningFailed where the program stands."""
    module = _signal_module()
    for signum in _SIGNALS:
        module.signal(signum, _interrupted)


def ignore_signals():
    """From here on (the answer is being written) a signal changes nothing."""
    module = _signal_module()
    for signum in _SIGNALS:
        module.signal(signum, module.SIG_IGN)


def write_all(fd, data):
    """Write all of ``data`` to ``fd``; OSError (EPIPE, ENOSPC, EBADF) propagates.

    Python ignores SIGPIPE, so a reader that went away is EPIPE here, not death.
    """
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
