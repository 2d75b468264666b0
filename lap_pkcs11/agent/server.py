"""The agent's accept loop, worker pool, deadlines, limits and peer checks.

One thread runs the loop (``selectors``/epoll): it accepts, checks the peer's
credentials before reading a byte (as ssh-agent does), reads each request under
a deadline, answers status requests itself and hands signing requests to a
fixed pool of workers. Each worker owns one PKCS#11 session of the
``TokenSession`` and answers on the connection itself. Every connection has two
deadlines the loop enforces: the read deadline (``--read-timeout-ms``: a
connection that has not sent a whole request by then is closed unanswered) and
the request's own deadline (the client's forwarded budget, capped by
``--timeout-ms``): when it passes before a worker has answered, the loop answers
TIMEOUT, so no request waits forever for a worker. Open connections are bounded
(``--max-connections``); the queue holds at most one job per connection.

SIGTERM (or SIGINT) closes the listening socket, lets the requests in flight
finish within their deadlines and returns 0; a PIN rejected during recovery
stops the agent the same way with the PIN error's exit code.
"""

import grp
import heapq
import itertools
import os
import pwd
import queue
import select
import selectors
import signal
import socket
import struct
import threading
import time

from lap_pkcs11.per_signature import errors, process
from lap_pkcs11.agent import protocol, systemd
from lap_pkcs11.backends.pkcs11_session import bind_worker

SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)
RECV_BYTES = 65536
# An answer is at most a few KB and goes into an empty socket buffer; a peer that
# does not take it within this is given up.
SEND_SECONDS = 0.5
_LISTENER, _WAKE = object(), object()

# Journal priorities (sd-daemon(3) prefixes): what an operator should look at.
_PRIORITY = {"OK": 6, "INPUT_INVALID": 5, "MESSAGE_TOO_LARGE": 5, "TIMEOUT": 4}


class Peers:
    """Who may connect: uids (the agent's own, root and --allow-users) and gids."""

    def __init__(self, uids, gids):
        self.uids = frozenset(uids)
        self.gids = frozenset(gids)

    @classmethod
    def from_config(cls, config):
        uids, gids = {os.geteuid(), 0}, set()
        for name in (config.agent_allow_users or "").split(",") if config.agent_allow_users else ():
            uids.add(_resolve(name, pwd.getpwnam, "pw_uid", "user", "--allow-users"))
        for name in (config.agent_allow_groups or "").split(",") if config.agent_allow_groups else ():
            gids.add(_resolve(name, grp.getgrnam, "gr_gid", "group", "--allow-groups"))
        return cls(uids, gids)

    def allows(self, sock, uid, gid):
        if uid in self.uids or gid in self.gids:
            return True
        if not self.gids:
            return False
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 1024)
        except OSError:  # more than 256 groups, or an old kernel: the primary gid decided.
            return False
        return not self.gids.isdisjoint(struct.unpack(f"{len(raw) // 4}I", raw))

    def describe(self):
        users = ",".join(str(uid) for uid in sorted(self.uids))
        groups = ",".join(str(gid) for gid in sorted(self.gids)) or "none"
        return f"uids {users}, groups {groups}"


def _resolve(name, lookup, field, what, flag):
    if name.isdigit():
        return int(name)
    try:
        return getattr(lookup(name), field)
    except KeyError:
        raise errors.ConfigInvalid(f"{flag}: no {what} named {name!r} on this host") from None


def peer_credentials(sock):
    """(pid, uid, gid) of the connected peer, from SO_PEERCRED."""
    return struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))


class Connection:
    """One client connection and the request on it."""

    __slots__ = ("sock", "pid", "uid", "gid", "accepted", "first_byte", "received", "buffer",
                 "eof", "kind", "deadline", "message", "size", "registered", "lingering",
                 "answered", "closed", "lock")

    def __init__(self, sock, pid, uid, gid, now):
        self.sock = sock
        self.pid, self.uid, self.gid = pid, uid, gid
        self.accepted = now
        self.first_byte = None
        self.received = None
        self.buffer = bytearray()
        self.eof = False
        self.kind = None
        self.deadline = None
        self.message = None
        self.size = 0
        self.registered = False
        self.lingering = False
        self.answered = False
        self.closed = False
        self.lock = threading.Lock()

    def claim(self):
        """True for the one caller that may answer (a worker, or the loop at the deadline)."""
        with self.lock:
            if self.answered:
                return False
            self.answered = True
            return True


class Agent:
    """The accept loop and the workers around one ``TokenSession``."""

    def __init__(self, config, session, listener, peers, metrics, log, environ, socket_path=None,
                 debug=False):
        self.config = config
        self.session = session
        self.listener = listener
        self.peers = peers
        self.metrics = metrics
        self.log = log
        self.environ = environ
        self.socket_path = socket_path
        self.debug = debug
        self.deadline_cap = config.deadline_ms() / 1000
        self.read_timeout = config.agent_read_timeout_ms / 1000
        self.max_connections = config.agent_max_connections
        self.jobs = queue.SimpleQueue()
        self.selector = selectors.DefaultSelector()
        self.timers = []
        self._sequence = itertools.count()
        self.stop_reason = None
        self.exit_error = None
        self.stopping = False
        self.workers = []
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._signals_taken = False

    # -- life cycle ---------------------------------------------------------

    def start_workers(self):
        for index in range(self.config.agent_workers):
            thread = threading.Thread(target=self._work, args=(index,), daemon=True,
                                      name=f"worker-{index}")
            thread.start()
            self.workers.append(thread)

    def refused(self, error):
        """Called by the session's recovery thread: the PIN was rejected; stop."""
        self.exit_error = error
        self.wake()

    def wake(self):
        try:
            os.write(self._wake_w, b"\0")
        except BlockingIOError:
            pass  # The loop has wake-ups pending already.

    def _on_signal(self, signum, _frame):
        if signum == signal.SIGHUP:
            self.log(5, "SIGHUP ignored: restart the agent to read its configuration again")
            return
        if self.stop_reason is None:
            self.stop_reason = signal.Signals(signum).name

    def take_signals(self):
        """From here on SIGTERM/SIGINT/SIGHUP drain and stop the agent (before READY=1:
        systemd may stop it the moment it is ready)."""
        if self._signals_taken:
            return
        self._signals_taken = True
        self.listener.setblocking(False)
        self.selector.register(self.listener, selectors.EVENT_READ, _LISTENER)
        self.selector.register(self._wake_r, selectors.EVENT_READ, _WAKE)
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, self._on_signal)

    def run(self):
        """Serve until SIGTERM/SIGINT or a refused PIN; return the exit code."""
        self.take_signals()
        ping = systemd.watchdog_seconds(self.environ)
        next_ping = time.monotonic()
        while True:
            now = time.monotonic()
            if ping is not None and now >= next_ping:
                systemd.notify(self.environ, WATCHDOG=1)
                next_ping = now + ping
            timeout = self._timeout(now, next_ping if ping is not None else None)
            for key, _ in self.selector.select(timeout):
                if key.data is _LISTENER:
                    if not self.stopping:
                        self._accept()
                elif key.data is _WAKE:
                    self._drain_wake()
                else:
                    self._read(key.data)
            self._expire(time.monotonic())
            if not self.stopping and (self.stop_reason or self.exit_error):
                self._begin_stop()
            if self.stopping and self.metrics.connections == 0:
                break
        self._stop_workers()
        return 0 if self.exit_error is None else self.exit_error.exit_code

    def _begin_stop(self):
        self.stopping = True
        why = self.stop_reason or self.exit_error.name
        self.log(5, f"stopping ({why}): no new connections; finishing "
                    f"{self.metrics.connections} in flight within their deadlines")
        systemd.notify(self.environ, STOPPING=1, STATUS=f"stopping ({why})")
        self.selector.unregister(self.listener)
        self.listener.close()
        if self.socket_path:
            try:
                os.unlink(self.socket_path)
            except OSError:
                pass

    def _stop_workers(self):
        for _ in self.workers:
            self.jobs.put(None)
        end = time.monotonic() + 2
        for thread in self.workers:
            thread.join(max(end - time.monotonic(), 0))
        self.session.close()

    def _drain_wake(self):
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    # -- timers -------------------------------------------------------------

    def _timer(self, when, conn, what):
        heapq.heappush(self.timers, (when, next(self._sequence), conn, what))

    def _timeout(self, now, next_ping):
        ends = [self.timers[0][0]] if self.timers else []
        if next_ping is not None:
            ends.append(next_ping)
        return max(min(ends) - now, 0) if ends else None

    def _expire(self, now):
        while self.timers and self.timers[0][0] <= now:
            _, _, conn, what = heapq.heappop(self.timers)
            if conn.closed:
                continue
            if what == "answer" and not conn.answered:
                self._answer(conn, errors.Timeout(
                    "the request's deadline passed before it was signed; the token or the "
                    "agent is too busy, or the client's budget too small"))
            elif what == "read" and conn.registered:
                if conn.lingering:
                    self._close(conn)
                elif not conn.answered:
                    self.metrics.drop("idle")
                    self.log(5, f"connection dropped reason=idle uid={conn.uid} pid={conn.pid} "
                                f"bytes={len(conn.buffer)}: no whole request within "
                                f"{self.config.agent_read_timeout_ms} ms")
                    conn.answered = True
                    self._close(conn)

    # -- connections --------------------------------------------------------

    def _accept(self):
        while True:
            try:
                sock, _ = self.listener.accept()
            except BlockingIOError:
                return
            except OSError as err:  # EMFILE and friends: try again on the next event.
                self.log(3, f"accept failed: {err.strerror}")
                return
            now = time.monotonic()
            try:
                pid, uid, gid = peer_credentials(sock)
            except OSError:
                sock.close()
                continue
            if not self.peers.allows(sock, uid, gid):
                sock.close()
                self.metrics.drop("peer")
                self.log(4, f"connection refused reason=peer uid={uid} gid={gid} pid={pid}: "
                            f"not an allowed peer ({self.peers.describe()})")
                continue
            if self.metrics.connections >= self.max_connections:
                sock.close()
                self.metrics.drop("limit")
                self.log(4, f"connection refused reason=limit uid={uid} pid={pid}: "
                            f"{self.max_connections} connections are open (--max-connections)")
                continue
            sock.setblocking(False)
            conn = Connection(sock, pid, uid, gid, now)
            self.metrics.opened()
            self.selector.register(sock, selectors.EVENT_READ, conn)
            conn.registered = True
            self._timer(now + self.read_timeout, conn, "read")

    def _read(self, conn):
        try:
            data = conn.sock.recv(RECV_BYTES)
        except BlockingIOError:
            return
        except OSError:
            data = None
        now = time.monotonic()
        if data is None or (conn.lingering and not data):
            conn.answered = True
            self._close(conn)
            return
        if conn.lingering:
            return  # Input after an early answer is read and dropped until EOF.
        if not data:
            conn.eof = True
        elif conn.first_byte is None:
            conn.first_byte = now
        conn.buffer += data
        try:
            request = protocol.parse(conn.buffer, conn.eof)
        except errors.SignerError as err:
            conn.kind = err.kind
            conn.received = now
            conn.size = len(conn.buffer)
            self._answer(conn, err)
            return
        if request is None:
            if conn.eof:  # Only a framed header without its end can stop here.
                conn.answered = True
                self._close(conn)
            return
        conn.received = now
        conn.kind = request.kind
        conn.buffer = None
        self._unregister(conn)
        if request.kind == protocol.STATUS:
            self._answer(conn, None, self.metrics.render().encode())
            return
        cap = self.deadline_cap
        if request.kind == protocol.SIGN_FRAMED:
            cap = min(cap, request.deadline_ms / 1000)
        conn.deadline = (conn.first_byte or now) + cap
        encoding = self.config.input if request.kind == protocol.SIGN_FRAMED else "base64"
        conn.size = len(request.body)
        try:
            conn.message = protocol.decode(request.body, encoding)
        except errors.SignerError as err:
            self._answer(conn, err)
            return
        conn.size = len(conn.message)
        self._timer(conn.deadline, conn, "answer")
        self.jobs.put(conn)

    def _unregister(self, conn):
        if conn.registered:
            self.selector.unregister(conn.sock)
            conn.registered = False

    def _close(self, conn):
        with conn.lock:
            if conn.closed:
                return
            conn.closed = True
        if threading.current_thread() is threading.main_thread():
            self._unregister(conn)
        conn.sock.close()
        self.metrics.closed()
        if self.stopping:
            self.wake()

    # -- answers ------------------------------------------------------------

    def _work(self, index):
        bind_worker(index)
        while True:
            conn = self.jobs.get()
            if conn is None:
                return
            if conn.answered:
                continue  # Answered TIMEOUT by the loop while it waited.
            self.metrics.working(1)
            signature, error = None, None
            try:
                signature = self.session.sign(index, conn.message, conn.deadline)
            except errors.SignerError as err:
                error = err
            except Exception as err:  # A bug must still fail closed, in one line.
                if self.debug:
                    import traceback

                    traceback.print_exc()
                error = errors.SigningFailed(f"internal error ({type(err).__name__}); run the "
                                             "agent with --debug and report it")
            finally:
                self.metrics.working(-1)
            self._answer(conn, error, signature=signature)

    def _answer(self, conn, error, payload=b"", signature=None):
        """Answer once (a worker or the loop, whoever claims first), log, count, close."""
        if not conn.claim():
            return
        if conn.kind == protocol.SIGN_LINE:
            payload = process.encode_signature(signature, "base64") if error is None else b""
        elif conn.kind == protocol.SIGN_FRAMED and error is None:
            payload = process.encode_signature(signature, self.config.output)
        if conn.kind != protocol.SIGN_LINE:
            payload = protocol.framed_answer(error, payload)
        sent = self._send(conn, payload) if payload else True
        done = time.monotonic()
        outcome = "OK" if error is None else error.name
        seconds = done - (conn.received or done)
        self.metrics.request(outcome, conn.kind or protocol.SIGN_LINE, seconds)
        line = (f"request outcome={outcome} protocol={conn.kind} bytes={conn.size} "
                f"uid={conn.uid} ms={seconds * 1000:.2f}")
        if not sent:
            line += " (the answer could not be written)"
        if error is not None:
            line += f" error={error.line()[len('lap-pkcs11: '):]}"
        self.log(7 if conn.kind == protocol.STATUS else _PRIORITY.get(outcome, 3), line)
        if conn.registered and not conn.eof and conn.kind == protocol.SIGN_FRAMED:
            # Answered before the whole request arrived: read and drop the rest until
            # EOF or the read deadline, so the client reads the answer, not a reset.
            conn.lingering = True
            return
        self._close(conn)

    def _send(self, conn, data):
        end = time.monotonic() + SEND_SECONDS
        view = memoryview(data)
        poller = None
        while view:
            try:
                view = view[conn.sock.send(view):]
                continue
            except BlockingIOError:
                pass
            except OSError:
                return False
            left = end - time.monotonic()
            if left <= 0:
                return False
            if poller is None:
                poller = select.poll()
                poller.register(conn.sock, select.POLLOUT)
            poller.poll(left * 1000)
        return True
