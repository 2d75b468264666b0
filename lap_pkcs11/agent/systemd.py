"""systemd's own protocols, a few lines each: sd_notify(3) and sd_listen_fds(3).

- Readiness, stopping, status and the watchdog are datagrams to
  ``$NOTIFY_SOCKET`` (a path, or an abstract name starting with ``@``).
- A listening socket handed over by a ``.socket`` unit is fd 3, announced by
  ``LISTEN_FDS`` and ``LISTEN_PID`` (which must be this process).
Without systemd both are absent and every function here does nothing.
"""

import os
import socket

from lap_pkcs11.per_signature import errors

LISTEN_FDS_START = 3


def listen_fd_count(environ):
    """How many sockets systemd handed to this process (0 when none)."""
    if environ.get("LISTEN_PID") != str(os.getpid()):
        return 0
    text = environ.get("LISTEN_FDS", "")
    return int(text) if text.isdigit() else 0


def listening_socket(environ):
    """The listening unix socket systemd handed over, or None; the variables are removed."""
    count = listen_fd_count(environ)
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)
    if count == 0:
        return None
    if count != 1:
        raise errors.ConfigInvalid(f"systemd handed over {count} sockets; the agent's socket "
                                   "unit must have exactly one ListenStream=")
    sock = socket.socket(fileno=LISTEN_FDS_START)
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM or \
            not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        raise errors.ConfigInvalid("the socket systemd handed over is not a listening unix "
                                   "stream socket; use ListenStream=/run/... with Accept=no")
    os.set_inheritable(sock.fileno(), False)
    return sock


def notify(environ, **fields):
    """Send ``KEY=value`` lines to systemd (READY=1, STOPPING=1, STATUS=..., WATCHDOG=1)."""
    address = environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    message = "".join(f"{key}={value}\n" for key, value in fields.items()).encode()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.sendto(message, address)
        except OSError:
            pass  # systemd gone or not listening: nothing to tell.


def watchdog_seconds(environ):
    """How often to send WATCHDOG=1 (half of WatchdogSec=), or None."""
    if environ.get("WATCHDOG_PID", str(os.getpid())) != str(os.getpid()):
        return None
    text = environ.get("WATCHDOG_USEC", "")
    return int(text) / 2e6 if text.isdigit() and int(text) > 0 else None
