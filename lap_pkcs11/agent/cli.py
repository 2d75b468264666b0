"""``lap-pkcs11 agent`` and ``lap-pkcs11 agent-status``.

``agent`` takes the same options, environment and env file as ``sign`` (one
option table), plus the agent's own (``--socket``, ``--allow-users``,
``--allow-groups``, ``--workers``, ``--max-connections``,
``--read-timeout-ms``). It hardens the process (no core dumps, not dumpable:
the PIN and the session live in its memory), puts the env file's other
variables (``SOFTHSM2_CONF``, a vendor module's settings) into its own
environment before the module is loaded, reads the PIN once, logs in once,
tells systemd it is ready and serves until SIGTERM. A failure at start is one
``lap-pkcs11: NAME: ...`` line and the error's exit code (PIN_INCORRECT: 77,
which the unit does not restart into). Everything else goes to the journal,
one line per event with a ``<N>`` priority prefix.

``agent-status`` prints the agent's metrics (Prometheus text) from its socket;
it needs no PIN, only a connection the agent allows.
"""

import os
import socket
import stat
import sys
import threading

from lap_pkcs11.per_signature import config as configuration
from lap_pkcs11.per_signature import errors, wire
from lap_pkcs11.agent import protocol, systemd
from lap_pkcs11.per_signature.config import parse_flags
from lap_pkcs11.per_signature.options import BY_ATTR, OPTIONS

# Variables that make a module log PIN-bearing traffic. The agent loads the module
# it is told to in its own environment (a spy module is a deliberate choice), but
# says so at start; pkcs11-tool children of `sign` never get them.
DEBUG_VARIABLES = ("OPENSC_DEBUG", "PKCS11SPY", "PKCS11SPY_OUTPUT")
PR_SET_DUMPABLE = 4
STATUS_TIMEOUT_MS = "2000"
MAX_STATUS = 1 << 20


def usage():
    lines = ["Usage: lap-pkcs11 agent [OPTIONS]", "",
             "Log in to the token once and sign every request on a unix socket: the framing",
             "of `lap-pkcs11 client` and the gateway's own line protocol (base64 in, base64",
             "out), up to 64 KiB per message, each signature verified against the pinned key.",
             "", "Options (the same table as `lap-pkcs11 sign`; the agent's own start with "
             "agent:):"]
    for option in OPTIONS:
        if option.flag is None or option.attr in ("pkcs11_tool", "lock_dir", "env_file"):
            continue
        default = f" [default: {option.default}]" if option.default else ""
        lines.append(f"  {option.flag} {option.metavar}")
        lines.append(f"      {option.help} Env: {', '.join(option.envs)}.{default}")
    env_file = BY_ATTR["env_file"]
    lines += [f"  {env_file.flag} {env_file.metavar}",
              f"      {env_file.help} Env: {', '.join(env_file.envs)}.",
              "  --debug", "      Show a traceback on internal errors.",
              "  -h, --help", "      Show this message and exit."]
    return "\n".join(lines) + "\n"


STATUS_USAGE = """Usage: lap-pkcs11 agent-status [--socket PATH] [--timeout-ms N]

Print the running agent's metrics in the Prometheus text format.

  --socket PATH    Env: LAP_PKCS11_AGENT_SOCKET. [default: /run/lap-pkcs11/agent.sock]
  --timeout-ms N   [default: 2000]
"""


def parse_args(args):
    """Map ``args`` to {attr: raw text} by the option table; return (flags, debug, help)."""
    flags, given = parse_flags(args, "agent", ("-h", "--help", "--debug"))
    return flags, "--debug" in given, bool(given & {"-h", "--help"})


class Journal:
    """One line per event on stderr, with the sd-daemon(3) ``<N>`` priority prefix."""

    def __init__(self, fd=2):
        self.fd = fd
        self._lock = threading.Lock()

    def __call__(self, priority, text):
        data = f"<{priority}>{' '.join(text.split())}\n".encode("utf-8", "replace")
        with self._lock:
            try:
                os.write(self.fd, data)
            except OSError:
                pass  # The journal is gone; the metrics still count.


def harden(keep_fds):
    """No core dumps, not dumpable, fds 0-2 open, inherited fds closed, umask 077."""
    import ctypes
    import resource

    # Under the unit LimitCORE=0 is already in force, and its filter refuses setrlimit.
    if resource.getrlimit(resource.RLIMIT_CORE) != (0, 0):
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
    first = systemd.LISTEN_FDS_START + keep_fds
    os.closerange(first, max(resource.getrlimit(resource.RLIMIT_NOFILE)[0], first))
    os.umask(0o077)


def load_file_environment(config, log):
    """Give the env file's other variables to the agent's own environment (real env wins).

    The module reads them when it is loaded (e.g. SOFTHSM2_CONF), as pkcs11-tool
    does when ``sign`` starts it. The PIN variable stays out.
    """
    for name, value in config.file_env.items():
        if name != config.pin_env and name not in os.environ:
            os.environ[name] = value
    present = [name for name in DEBUG_VARIABLES if os.environ.get(name)]
    if present:
        log(4, f"{', '.join(present)} set: the module may log PIN-bearing traffic; unset "
               "them outside debugging")


class Secret:
    """The PIN the agent keeps for its logins: it never shows itself in a repr, a log line
    or a traceback, and it lives in this object only (not in the environment)."""

    __slots__ = ("_value",)

    def __init__(self, value):
        self._value = value

    def reveal(self):
        return self._value

    def __repr__(self):
        return "Secret('**********')"

    __str__ = __repr__


def read_pin(config):
    """The PIN from exactly one source, as ``sign`` reads it, then out of the environment."""
    from lap_pkcs11.per_signature.signer import read_pin as read_signer_pin

    env = dict(os.environ)
    env.update({name: value for name, value in config.file_env.items() if name not in env})
    name = read_signer_pin(config, env)
    pin = Secret(env[name])
    os.environ.pop(name, None)
    return pin


def open_listener(config, log):
    """(listening socket, path we created or None): systemd's, or our own at --socket."""
    handed = systemd.listening_socket(os.environ)
    if handed is not None:
        return handed, None
    path = config.agent_socket
    folder = os.path.dirname(path) or "."
    if not os.path.isdir(folder):
        raise errors.ConfigInvalid(f"the socket directory {folder} does not exist; create it "
                                   "or set --socket")
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        info = None
    if info is not None:
        if not stat.S_ISSOCK(info.st_mode):
            raise errors.ConfigInvalid(f"{path} exists and is not a socket; remove it or set "
                                       "--socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)  # A socket nobody listens on: a previous agent's.
        else:
            raise errors.ConfigInvalid(f"another process listens on {path}; stop it or set "
                                       "--socket")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o117)  # 0660: the owner and its group, as the socket unit makes it.
    try:
        sock.bind(path)
    except OSError as err:
        sock.close()
        raise errors.ConfigInvalid(f"cannot listen on {path} ({err.strerror or err}); set "
                                   "--socket") from None
    finally:
        os.umask(old)
    return sock, path


def agent_main(args):
    """Run the agent; return its exit code."""
    harden(systemd.listen_fd_count(os.environ))
    log = Journal()
    debug = "--debug" in args
    path = None
    try:
        flags, debug, want_help = parse_args(args)
        if want_help:
            sys.stdout.write(usage())
            return 0
        config = configuration.resolve(flags, dict(os.environ))
        if config.sources["input"] == "default":
            # As sign refuses it when the gateway starts it: signing the gateway's
            # base64 text as raw bytes gives valid signatures over the wrong bytes.
            raise errors.ConfigInvalid(
                "--input is not set; `lap-pkcs11 client` passes the gateway's "
                "base64(message) through, so set LAP_PKCS11_INPUT=base64 (or raw explicitly)")
        load_file_environment(config, log)
        pin = read_pin(config)
        pinned = bytes.fromhex(config.expect_public_key) if config.expect_public_key else None
        from lap_pkcs11.agent.server import Agent, Peers

        peers = Peers.from_config(config)
        try:
            from lap_pkcs11.agent.metrics import Metrics
            from lap_pkcs11.backends.pkcs11_session import TokenSession
        except ImportError as err:
            raise errors.ConfigInvalid(f"the agent needs its extra ({err.name} is missing): "
                                       "pip install 'lap-pkcs11[agent]'") from None
        listener, path = open_listener(config, log)
        listener.listen(min(config.agent_max_connections, socket.SOMAXCONN))
        metrics = Metrics(config.agent_workers)
        stop = {}
        session = TokenSession(config, pin, pinned, config.agent_workers, log, metrics,
                               lambda error: stop["agent"].refused(error))
        session.start()
        agent = Agent(config, session, listener, peers, metrics, log, os.environ,
                      socket_path=path, debug=debug)
        stop["agent"] = agent
        threading.Thread(target=session.recover_forever, daemon=True, name="recovery").start()
        where = path or f"{listener.getsockname()} (from systemd)"
        selection = f"id {session.key_id}"
        log(5, f"ready: logged in once; key {selection}, pinned public key "
               f"{session.pinned_key.hex()} ({session.pinned_source}); "
               f"{config.agent_workers} workers; socket {where}; peers {peers.describe()}")
        agent.start_workers()
        agent.take_signals()
        systemd.notify(os.environ, READY=1, MAINPID=os.getpid(),
                       STATUS=f"signing with key {session.key_id}, public key "
                              f"{session.pinned_key.hex()}")
        code = agent.run()
        if agent.exit_error is not None:
            sys.stderr.write(agent.exit_error.line() + "\n")
        else:
            log(5, "stopped: every request in flight was answered")
        return code
    except errors.SignerError as err:
        if path:
            _unlink(path)
        sys.stderr.write(err.line() + "\n")
        return err.exit_code
    except Exception as err:  # A bug must still fail closed, in one line.
        if path:
            _unlink(path)
        if debug:
            import traceback

            traceback.print_exc()
        failure = errors.SigningFailed(f"internal error ({type(err).__name__}); rerun with "
                                       "--debug and report it")
        sys.stderr.write(failure.line() + "\n")
        return failure.exit_code


def _unlink(path):
    try:
        os.unlink(path)
    except OSError:
        pass


def status_main(args):
    """Print the agent's metrics; return 0, or SIGNER_UNAVAILABLE's exit code."""
    if args[:1] in (["-h"], ["--help"]):
        sys.stdout.write(STATUS_USAGE)
        return 0
    try:
        values = {"--socket": None, "--timeout-ms": None}
        i = 0
        while i < len(args):
            name, eq, value = args[i].partition("=")
            if name not in values:
                raise errors.ConfigInvalid(f"unknown option {name!r}; see lap-pkcs11 "
                                           "agent-status --help")
            if not eq:
                if i + 1 >= len(args):
                    raise errors.ConfigInvalid(f"{name} needs a value")
                value = args[i + 1]
                i += 1
            values[name] = value
            i += 1
        path = values["--socket"] or os.environ.get("LAP_PKCS11_AGENT_SOCKET") or \
            BY_ATTR["agent_socket"].default
        try:
            timeout = BY_ATTR["timeout_ms"].parse(values["--timeout-ms"] or STATUS_TIMEOUT_MS)
        except ValueError as err:
            raise errors.ConfigInvalid(f"--timeout-ms {err}") from None
        answer = wire.parse_response(_exchange(path, wire.MAGIC + b" " + protocol.METRICS + b"\n",
                                               timeout / 1000))
        if answer is None or answer[0] != 0:
            raise errors.SignerUnavailable(f"the agent at {path} did not answer with its "
                                           "metrics; is it lap-pkcs11 agent?")
        sys.stdout.write(answer[2].decode("utf-8", "replace"))
        return 0
    except errors.SignerError as err:
        sys.stderr.write(err.line() + "\n")
        return err.exit_code


def _exchange(path, request, timeout):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    chunks, size = [], 0
    try:
        sock.connect(path)
        sock.sendall(request)
        sock.shutdown(socket.SHUT_WR)
        while size <= MAX_STATUS:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as err:
        raise errors.SignerUnavailable(f"no answer from the agent at {path} "
                                       f"({err.strerror or err}); is lap-pkcs11-agent running, "
                                       "and may this user connect?") from None
    finally:
        sock.close()
    return b"".join(chunks)


def main(args, started=None):
    """``lap-pkcs11 agent ...`` or ``lap-pkcs11 agent-status ...`` (``args`` includes the name)."""
    if args[:1] == ["agent-status"]:
        return status_main(args[1:])
    return agent_main(args[1:])
