"""The one place that runs pkcs11-tool.

``sign_argv``, ``list_objects_argv`` and their siblings build argument vectors (pure functions, and
never with the PIN in them: it travels as ``--pin env:NAME``). ``run`` starts the
tool with no shell, in a new session (so it has no terminal to prompt on and its
whole process group can be killed), watched by a small bash watchdog started
before it (so its whole group is killed at our kill time even when we are gone,
see ``Deadline.watch``),
with the message in an anonymous memory file and its stdout and stderr in two
more, and waits for it against a deadline.
``classify`` turns the tool's stderr into a typed error. ``Deadline`` keeps the
tool from being killed inside a login or a signature that would have finished.

This module is on the per-signature path: it imports only what Python has built in.
"""

import errno
import fcntl
import os
import select
import time

from lap_pkcs11.per_signature import errors, process

# What we read back of the tool's stdout and stderr at most.
OUTPUT_LIMIT = 1 << 16
# The watchdog's shell: bash, whose ``read -t`` waits without a child process.
SHELL = "/bin/bash"
# The tool's descriptor of the watchdog's pipe (the message is 3, the token lock 4).
WATCHDOG_FD = 5
# pkcs11-tool is not started with less than this left: its run measured here
# 6.5 ms idle and 13 ms p50 / 24 ms p99 / 37 ms max with both cores saturated,
# and killing it inside a login can empty SoftHSM2's token file for good.
MIN_TOOL_MS = 50
# When the deadline passes while it runs, it gets this long to finish (TIMEOUT
# is answered at once), then its process group is killed.
GRACE_MS = 200
# The kill comes this long before the caller's own end at the latest.
KILL_RESERVE_MS = 50
# The watchdog's own kill, should we be gone, comes this long after ``kill_at``.
BACKSTOP_SLACK_MS = 20
# The watchdog (bash; ``Deadline.watch`` starts it before any tool). fd 3: the read
# end of a pipe whose write end the signer keeps and hands to every tool as
# WATCHDOG_FD (its helpers inherit it); right after each start the signer writes
# "NONCE PID STARTTIME" into it (what follows the nonce's last appearance in a line
# counts: a tool may have left a line of its own without its end). fd 4: a pipe
# only the watchdog itself writes to (fd 5), to wait on. $1: microseconds until
# the kill; $2: the nonce; $3: the signer's process group.
# Until then it collects the tools it is told of (never pid 1, the signer, itself
# or the signer's group id). When every writer is gone (the signer and the tools
# ended), it looks every 100 ms until no tool it was told of runs (a tool may
# still be exiting, or run on without the pipe; at the kill time it is killed),
# then kills what is left of each told tool's process group (a helper that closed
# the pipe; only while the leader is gone or still the told tool) and ends. What
# it does only then is defined only then: a bash that is released before (the
# normal case) never parses it.
# From the kill time on (the signer is gone or stuck) it SIGKILLs, every 100 ms
# until the pipe is closed: the group of each tool it was told of whose leader
# still runs with the start time it was told (a pid, or a group id, may belong to
# another process by now); and every process started since the watchdog that
# holds the pipe as WATCHDOG_FD, with its group when the group's leader started
# since too (an older holder got the descriptor passed by a tool: it is no tool's
# leftover), but never the signer ($PPID) or the signer's group. Its clock is the
# boot time (/proc/uptime, 10 ms steps), which a wall-clock step cannot move.
# It starts no process of its own (read and kill are builtins): killing it leaves
# no orphan behind.
WATCHDOG = r"""told() {
  (( $# == 3 )) && [[ $2 == [1-9]* && $2 != *[!0-9]* && $3 == [0-9]* && $3 != *[!0-9]*
     && $2 != 1 && $2 != "$PPID" && $2 != $$ && $2 != "$1" ]] && tools+=("$2:$3")
}
heard() {
  [[ $1 == *"$2 "* ]] || return 0
  set -f; told "$3" ${1##*"$2" }; set +f
}
read -r up _ < /proc/uptime; end=$(( 10#${up/./} * 10000 + $1 )) tools=() eof=
while read -r up _ < /proc/uptime; left=$(( end - 10#${up/./} * 10000 )); (( left > 0 )); do
  printf -v wait '%d.%06d' $(( left / 1000000 )) $(( left % 1000000 ))
  read -r -t "$wait" line <&3
  status=$?
  if (( status == 0 )); then
    heard "$line" "$2" "$3"
  elif (( status <= 128 )); then
    eof=1
    break
  fi
done
fields() {
  local stat=
  IFS= read -r -d '' stat 2>/dev/null < "/proc/$1/stat"
  [[ $stat == *") "* ]] || return 1
  set -f; s=(${stat##*) }); set +f
}
running() {
  local tool
  for tool in "${tools[@]}"; do
    fields "${tool%:*}" && [[ ${s[19]} == "${tool#*:}" && ${s[0]} != Z ]] && return 0
  done
  return 1
}
kill_tools() {
  local tool held pid group since
  for tool in "${tools[@]}"; do
    pid=${tool%:*}
    fields "$pid" && [[ ${s[19]} == "${tool#*:}" ]] || continue
    kill -s KILL -- "-$pid" 2>/dev/null
  done
  fields $$ && since=${s[19]} || return 0
  for held in /proc/[0-9]*/fd/5; do
    [[ $held -ef /proc/$$/fd/3 ]] || continue
    pid=${held#/proc/} pid=${pid%%/*}
    [[ $pid != "$PPID" && $pid != $$ ]] && fields "$pid" && (( s[19] >= since )) || continue
    group=${s[2]}
    if [[ $group != "$3" && $group != 0 ]] && fields "$group" && (( s[19] >= since )); then
      kill -s KILL -- "-$group" "$pid" 2>/dev/null
    else
      kill -s KILL -- "$pid" 2>/dev/null
    fi
  done
}
orphans() {
  local tool pid
  for tool in "${tools[@]}"; do
    pid=${tool%:*}
    if fields "$pid"; then [[ ${s[19]} == "${tool#*:}" ]] || continue; fi
    kill -s KILL -- "-$pid" 2>/dev/null
  done
}
if [[ $eof ]]; then
  while running; do
    read -r up _ < /proc/uptime; left=$(( end - 10#${up/./} * 10000 ))
    (( left > 0 )) || { kill_tools; exit 0; }
    (( left > 100000 )) && left=100000
    printf -v wait '%d.%06d' $(( left / 1000000 )) $(( left % 1000000 ))
    read -r -t "$wait" _ <&4
  done
  orphans
  exit 0
fi
while :; do
  kill_tools
  read -r -t 0.1 line <&3
  status=$?
  if (( status == 0 )); then
    heard "$line" "$2" "$3"
  elif (( status <= 128 )); then
    kill_tools
    exit 0
  fi
done
"""
_WATCHDOG_ENV = {"PATH": "/usr/bin:/bin", "LC_ALL": "C"}
_SIGKILL = 9
# How often the tool's state is asked for when no pidfd could be opened.
PID_POLL_MS = 5
# How long the end of a watch waits for the pipe to be let go (a helper killed with
# the tool's group dies asynchronously) before it searches /proc for its holders.
HOLDER_WAIT_MS = 20


def _stat_fields(pid):
    """``process.stat_fields(pid)``, or None when the process is gone (or unreadable)."""
    try:
        return process.stat_fields(pid)
    except (OSError, IndexError):
        return None


def _kill_holders(probe, watchdog, until):
    """SIGKILL the processes that a tool left behind still holding the pipe of ``probe``
    (a read end of it), at any descriptor: a helper that left the tool's process group.

    Only processes started since the watchdog (which starts before any tool) are
    looked at: an older one can hold the pipe only because a tool passed it the
    descriptor, and is no tool's leftover. A holder's process group goes with it
    when the group's leader started since too and the group is not ours. Never
    ourselves or the watchdog. Return False when ``until`` (monotonic seconds)
    came before the search was through.
    """
    pipe = os.fstat(probe)
    fields = _stat_fields(watchdog)
    if fields is None:
        return True  # the watchdog is gone already: nothing to date the tools by
    since, ours, group = int(fields[19]), os.getpid(), os.getpgrp()
    for entry in os.listdir("/proc"):
        if time.monotonic() >= until:
            return False
        if not entry.isdigit() or int(entry) in (ours, watchdog):
            continue
        fields = _stat_fields(entry)
        if fields is None or int(fields[19]) < since:
            continue
        try:
            fds = os.listdir(f"/proc/{entry}/fd")
        except OSError:  # gone, or another user's
            continue
        for fd in fds:
            try:
                info = os.stat(f"/proc/{entry}/fd/{fd}")
            except OSError:
                continue
            if (info.st_dev, info.st_ino) == (pipe.st_dev, pipe.st_ino):
                its_group = int(fields[2])
                leader = _stat_fields(its_group)
                try:
                    if its_group not in (group, 0) and leader is not None and \
                            int(leader[19]) >= since:
                        os.killpg(its_group, _SIGKILL)
                    os.kill(int(entry), _SIGKILL)
                except OSError:
                    pass
                break
    return True


class Deadline:
    """When the answer is due (``end``) and when a running pkcs11-tool is killed (``kill_at``).

    Between the two, a tool that is still running (in a login, which rewrites
    SoftHSM2's token file, or in a signature) may finish: killing it there could
    destroy the token. ``announce(error)``, when given, tells the caller the
    outcome at once, before that wait; all times are ``time.monotonic()`` seconds.
    """

    __slots__ = ("end", "kill_at", "announce", "held", "watchdog", "watch_fd", "probe",
                 "nonce")

    def __init__(self, end, caller_end=None, announce=None):
        self.end = end
        # The token lock's descriptor, once taken: every tool run holds it too (as fd 4),
        # so a tool that outlives a killed signer keeps the token locked until its group
        # is gone, and no second login overlaps it.
        self.held = None
        self.kill_at = end + GRACE_MS / 1000
        if caller_end is not None:
            self.kill_at = min(self.kill_at, caller_end - KILL_RESERVE_MS / 1000)
        self.announce = announce
        # The watchdog's pid and the write end of its pipe, once ``watch`` started it, and
        # a read end of that pipe, whose POLLHUP says that no other process holds it.
        self.watchdog = self.watch_fd = self.probe = self.nonce = None

    def watch(self):
        """Start the watchdog (``WATCHDOG``), once, before any tool run.

        At ``kill_at`` plus a little it kills every tool started under this
        deadline, with its whole process group (a module's helper processes
        too), should we be gone or stuck by then: a caller that SIGKILLs us, at
        any moment, cannot leave a tool running past our deadline, nor kill it
        inside a login, which would empty SoftHSM2's token file. Starting it
        early lets its own start overlap our work up to the tool's (a ``timeout``
        in front of the tool measured +2 ms p50 on sign here). It leads a
        process group of its own, and its standard streams are /dev/null, so
        that it never holds our caller's pipes. ``release`` ends it.
        """
        if self.watchdog is not None:
            return
        if not os.access(SHELL, os.X_OK):
            raise errors.ToolNotFound(f"{SHELL} is missing; the watchdog of pkcs11-tool needs it")
        micros = int((max(self.kill_at - time.monotonic(), 0) + BACKSTOP_SLACK_MS / 1000) * 1e6)
        self.nonce = os.urandom(8).hex()
        fds = []
        try:
            fds += os.pipe()  # the watchdog reads, we and every tool write
            fds += os.pipe()  # the watchdog waits on its own
            sources = high_copies(fds)
            actions = [(os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDWR, 0),
                       (os.POSIX_SPAWN_DUP2, 0, 1), (os.POSIX_SPAWN_DUP2, 0, 2),
                       (os.POSIX_SPAWN_DUP2, sources[0], 3), (os.POSIX_SPAWN_DUP2, sources[2], 4),
                       (os.POSIX_SPAWN_DUP2, sources[3], 5)]
            try:
                self.watchdog = os.posix_spawn(
                    SHELL, [SHELL, "-c", WATCHDOG, "lap-pkcs11-watchdog", str(micros),
                            self.nonce, str(os.getpgrp())], _WATCHDOG_ENV,
                    file_actions=actions, setpgroup=0)
            finally:
                for fd in sources:
                    if fd not in fds:
                        os.close(fd)
        except OSError as err:
            for fd in fds:
                os.close(fd)
            raise errors.SigningFailed(f"the watchdog of pkcs11-tool did not start "
                                       f"({err.strerror or err}); nothing was signed") from None
        for fd in (fds[2], fds[3]):
            os.close(fd)
        self.probe, self.watch_fd = fds[0], fds[1]

    def watching(self):
        """Whether the watchdog still runs (it ends on its own only once ``kill_at``
        passed, or when it was killed): no tool may start without it."""
        if self.watchdog is None:
            return False
        try:
            if os.waitpid(self.watchdog, os.WNOHANG) == (0, 0):
                return True
        except ChildProcessError:
            pass
        self.watchdog = None  # reaped: its pid may be another process's from now on
        return False

    def tell(self, pid):
        """Tell the watchdog of the tool ``pid`` (its start time tells it from a later
        process with the same pid)."""
        line = f"{self.nonce} {pid} {process.start_ticks(pid).decode()}\n".encode()
        os.write(self.watch_fd, line)

    def abandon(self):
        """Leave the watchdog to end what it was told of at the kill time (and then
        itself): close our ends of its pipe, forget it."""
        for fd in (self.watch_fd, self.probe):
            if fd is not None:
                os.close(fd)
        self.watch_fd = self.probe = self.watchdog = None

    def end_watch(self):
        """Every tool run under this deadline is over: kill whatever a tool left behind
        still holding the watchdog's pipe, then the watchdog; ``release`` reaps it (it
        dies meanwhile, while we finish the answer)."""
        if self.watch_fd is not None:
            os.close(self.watch_fd)
            self.watch_fd = None
        if self.probe is not None:
            searched = True
            try:
                poller = select.poll()
                poller.register(self.probe, 0)  # POLLHUP only, whatever data is unread
                # A helper killed with the tool's group closes its descriptors as it dies.
                if not any(events & select.POLLHUP for _, events in poller.poll(HOLDER_WAIT_MS)):
                    searched = _kill_holders(self.probe, self.watchdog, self.kill_at)
            finally:
                os.close(self.probe)
                self.probe = None
            if not searched:  # out of time: the watchdog finds what holds the pipe at its time
                self.watchdog = None
            elif self.watchdog is not None:
                try:
                    os.kill(self.watchdog, _SIGKILL)
                except ProcessLookupError:
                    pass

    def release(self):
        """End the watchdog, if any, and reap it (``end_watch``, then the wait)."""
        self.end_watch()
        if self.watchdog is not None:
            try:
                os.waitpid(self.watchdog, 0)
            except ChildProcessError:  # reaped already (``watching``)
                pass
            self.watchdog = None

    def left(self):
        return self.end - time.monotonic()

    def require_tool_time(self, what="pkcs11-tool"):
        """Refuse to start ``what`` when its normal run no longer fits before the deadline."""
        if self.left() * 1000 < MIN_TOOL_MS:
            raise errors.Timeout(f"too little time was left to run {what} safely before the "
                                 "deadline; raise --timeout-ms or lower concurrency")


class Result:
    """What pkcs11-tool did: exit status, stdout bytes, stderr text."""

    __slots__ = ("status", "stdout", "stderr")

    def __init__(self, status, stdout, stderr):
        self.status = status
        self.stdout = stdout
        self.stderr = stderr


def _selector_args(config):
    args = ["--module", config.module]
    if config.slot is not None:
        args += ["--slot", str(config.slot)]
    elif config.slot_index is not None:
        args += ["--slot-index", str(config.slot_index)]
    elif config.token_label is not None:
        args += ["--token-label", config.token_label]
    return args


def sign_argv(tool, config, key_id, pin_env, input_path):
    """The pkcs11-tool argv that signs ``input_path`` with the key ``key_id``."""
    return [tool, *_selector_args(config), "--login", "--pin", "env:" + pin_env,
            "--sign", "--mechanism", config.mechanism, "--id", key_id,
            "--input-file", input_path]


def list_objects_argv(tool, config, kind, pin_env=None):
    """List the token's objects of ``kind`` (pubkey, privkey); logged in when given a PIN."""
    login = ["--login", "--pin", "env:" + pin_env] if pin_env else []
    return [tool, *_selector_args(config), *login, "--list-objects", "--type", kind]


def module_argv(tool, config, action):
    """A module-level query: --show-info or --list-token-slots (no token selector)."""
    return [tool, "--module", config.module, action]


def list_mechanisms_argv(tool, config):
    """The mechanisms of the selected token."""
    return [tool, *_selector_args(config), "--list-mechanisms"]


def token_listing_argv(tool, config, selected=False):
    """The module's information and every slot's token (--show-info --list-token-slots).

    With ``selected``, the configured token selector goes along, and pkcs11-tool says
    on stderr which slot a slot index (or no selector) chose.
    """
    args = _selector_args(config) if selected else ["--module", config.module]
    return [tool, *args, "--show-info", "--list-token-slots"]


def keygen_argv(tool, config, pin_env, key_id, label):
    """Generate a sensitive, non-extractable Ed25519 key pair on the selected token."""
    return [tool, *_selector_args(config), "--login", "--pin", "env:" + pin_env,
            "--keypairgen", "--key-type", "EC:edwards25519", "--id", key_id, "--label", label,
            "--usage-sign", "--sensitive"]


def find_program(name, environ):
    """The absolute path of ``name`` (searched on PATH when it has no slash), or None."""
    if "/" in name:
        return name if os.access(name, os.X_OK) and os.path.isfile(name) else None
    for folder in environ.get("PATH", os.defpath).split(os.pathsep):
        path = os.path.join(folder or ".", name)
        if os.access(path, os.X_OK) and os.path.isfile(path):
            return path
    return None


def require_tool(config, env):
    """The configured pkcs11-tool's path, or ToolNotFound."""
    path = find_program(config.pkcs11_tool, env)
    if path is None:
        raise errors.ToolNotFound(f"{config.pkcs11_tool} not found; install OpenSC "
                                  "(apt-get install opensc) or set --pkcs11-tool")
    return path


def require_module(config):
    """The module file's ``os.stat`` result; a path that names no file fails here."""
    try:
        info = os.stat(config.module)
    except OSError:
        info = None
    if info is None or (info.st_mode & 0o170000) != 0o100000:
        raise errors.ModuleLoadFailed(f"PKCS#11 module {config.module} does not exist; "
                                      "fix --module")
    return info


# Descriptors below this may be the target of a dup2 in a spawn's file actions.
_FIRST_SAFE_FD = 10


def high_copies(fds):
    """``fds``, each below _FIRST_SAFE_FD replaced by a close-on-exec copy above it: a
    spawn's dup2 actions run in order, and a source that is also an earlier target
    (the token lock at 5, say) would be overwritten before it is copied."""
    return [fd if fd >= _FIRST_SAFE_FD else fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, _FIRST_SAFE_FD)
            for fd in fds]


def memory_file(name, data=b""):
    """An anonymous in-memory file holding ``data``: nothing of it ever reaches a disk."""
    fd = os.memfd_create(name)
    if data:
        os.write(fd, data)
    return fd


def output_file(name):
    """An in-memory file for the tool's output that cannot grow past OUTPUT_LIMIT.

    Its size is fixed and sealed; the tool's writes advance the offset it shares
    with us, which is how much it wrote. A tool that prints without end gets
    EPERM, not our memory.
    """
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, OUTPUT_LIMIT)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL)
    return fd


def _written(fd):
    return os.pread(fd, os.lseek(fd, 0, os.SEEK_CUR), 0)


def run(argv, env, deadline, stdin_data=None, last=False):
    """Run ``argv`` until it exits, within ``deadline`` (a Deadline, or monotonic seconds).

    ``stdin_data`` (bytes) is exposed to the tool as ``/dev/fd/3``, a regular file,
    so one ``read()`` sees all of it. The tool is not started when too little time
    is left or a signal was noted; when the deadline passes while it runs (or a
    signal arrives), the outcome is announced at once, the tool may still finish
    until ``kill_at``, and then its whole process group is killed and reaped. The
    deadline's watchdog (``Deadline.watch``) is running before the tool starts; a
    deadline given as seconds is this run's own, and so is its watchdog. ``last``
    says no other run follows under this deadline: the watchdog is ended as soon as
    this one is over (``Deadline.end_watch``).
    """
    owned = not isinstance(deadline, Deadline)
    if owned:
        deadline = Deadline(deadline)
    fds, pid = [], None
    try:
        process.check_interrupted()
        deadline.require_tool_time()
        deadline.watch()
        try:
            fds += [output_file("stdout"), output_file("stderr")]
            if stdin_data is not None:
                fds.append(memory_file("message", stdin_data))
        except OSError as err:
            raise errors.SigningFailed(f"cannot prepare pkcs11-tool's input and output "
                                       f"({err.strerror or err}); nothing was signed") from None
        targets = [(fds[0], 1), (fds[1], 2), (deadline.watch_fd, WATCHDOG_FD)]
        if stdin_data is not None:
            targets.append((fds[2], 3))
        if deadline.held is not None:
            targets.append((deadline.held, 4))
        try:
            sources = high_copies([source for source, _ in targets])
        except OSError as err:
            raise errors.SigningFailed(f"cannot prepare pkcs11-tool's descriptors "
                                       f"({err.strerror or err}); nothing was signed") from None
        copies = [fd for fd in sources if fd not in fds and fd not in (deadline.watch_fd,
                                                                        deadline.held)]
        fds += copies
        actions = [(os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0)]
        actions += [(os.POSIX_SPAWN_DUP2, source, target)
                    for source, (_, target) in zip(sources, targets)]
        # Last checks: a stall since the first ones must not start a tool unwatched.
        deadline.require_tool_time()
        if not deadline.watching():
            raise errors.Timeout("the deadline passed before pkcs11-tool could start; "
                                 "raise --timeout-ms or lower concurrency")
        try:
            pid = os.posix_spawn(argv[0], argv, env, file_actions=actions, setsid=True)
        except OSError as err:
            if err.errno in (errno.EAGAIN, errno.ENOMEM, errno.EMFILE, errno.ENFILE):
                raise errors.SigningFailed(f"pkcs11-tool could not be started ({err.strerror}): "
                                           "the host's limits; nothing was signed") from None
            # e.g. a script whose interpreter is missing, or no program at all
            raise errors.ToolNotFound(f"{argv[0]} could not be started ({err.strerror or err}); "
                                      "check --pkcs11-tool") from None
        finally:
            # The copies served the spawn only (a copy of the watchdog's pipe left open
            # here would look like a tool's helper still holding it).
            for fd in copies:
                fds.remove(fd)
                os.close(fd)
        try:
            deadline.tell(pid)
        except OSError:
            pass  # the watchdog still finds it by the pipe it holds (when it may see its fds)
        try:
            process.finish_hardening()  # while the tool starts, not before
        except Exception as failure:
            try:  # no answer comes from a dumpable signer; the tool still gets its grace
                _wait(pid, Deadline(time.monotonic()))
            except errors.SignerError:
                pass
            pid = None  # reaped, its group killed
            if isinstance(failure, errors.SignerError):
                raise
            raise errors.SigningFailed(f"core dumps cannot be switched off ({failure}); "
                                       "nothing was signed") from None
        try:
            status = _wait(pid, deadline)
        except errors.SignerError:
            pid = None  # late or interrupted: reaped, its group killed, then raised
            raise
        pid = None  # reaped, its group killed
        if last:
            deadline.end_watch()
        return Result(status, _written(fds[0]), _written(fds[1]).decode("utf-8", "replace"))
    finally:
        for fd in fds:
            os.close(fd)
        if pid is not None:
            # Something unforeseen (KeyboardInterrupt in a command without our signal
            # handlers) left the tool unreaped: the watchdog, which knows it, ends it at
            # the kill time; ending the watchdog now would leave the tool for good.
            deadline.abandon()
        elif owned:
            deadline.release()


def _wait(pid, deadline):
    """The tool's exit code; on the deadline or a signal, the grace, the kill, the error."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:  # no descriptor left (EMFILE): ask for its state every few ms instead
        pidfd = None
    late, until, exited, status = None, deadline.end, False, None
    try:
        poller = select.poll()
        if pidfd is not None:
            poller.register(pidfd, select.POLLIN)
        if process.wakeup_fd is not None:
            poller.register(process.wakeup_fd, select.POLLIN)
        while not exited:
            if late is None:
                if process.interrupted is not None:
                    late = process.interruption()
                    until = min(deadline.kill_at, time.monotonic() + GRACE_MS / 1000)
                elif time.monotonic() >= deadline.end:
                    late = errors.Timeout("pkcs11-tool did not finish before the deadline; "
                                          "check the token, pcscd and --timeout-ms")
                    until = deadline.kill_at
                if late is not None and deadline.announce is not None:
                    deadline.announce(late)  # at once; the tool may still finish
            left = until - time.monotonic()
            if late is not None and left <= 0:
                break  # the grace is over
            wait_ms = max(left, 0) * 1000
            ready = [fd for fd, _ in poller.poll(wait_ms if pidfd is not None else
                                                 min(wait_ms, PID_POLL_MS))]
            if pidfd is not None:
                exited = pidfd in ready
            else:
                done, status = os.waitpid(pid, os.WNOHANG)
                exited = done == pid
            if process.wakeup_fd in ready:
                process.drain_wakeups()  # noted; a second signal changes nothing
    finally:
        if pidfd is not None:
            os.close(pidfd)
    if not exited:
        _kill_group(pid)
    if not exited or pidfd is not None:
        _, status = os.waitpid(pid, 0)
    _kill_group(pid)  # whatever the tool left behind in its process group goes with it
    if late is not None:
        raise late
    return os.waitstatus_to_exitcode(status)


def _kill_group(pid):
    try:
        os.killpg(pid, _SIGKILL)
    except ProcessLookupError:
        pass


# CKA_EC_PARAMS of Ed25519 keys: the PrintableString "edwards25519" (what
# pkcs11-tool --keypairgen writes) or the OID 1.3.101.112 (imported keys).
ED25519_PARAMS = ("130c656477617264733235353139", "06032b6570")
_HEX_DIGITS = frozenset("0123456789abcdef")
# Field names across OpenSC versions: 0.23-0.26 print EC_POINT/EC_PARAMS, 0.27 "EC Point" and
# "EC Params".
_FIELDS = {"label": "label", "ID": "id", "EC_POINT": "ec_point", "EC Point": "ec_point",
           "EC_PARAMS": "ec_params", "EC Params": "ec_params", "Access": "access", "uri": "uri"}
KEY_KINDS = ("private key", "public key", "secret key")


def hex_digits(text):
    """Lowercase hex of a printed byte string (``a1b2``, ``A1:B2``, wrapped), or None."""
    digits = "".join(text.split()).replace(":", "").lower()
    if not digits or len(digits) % 2 or not _HEX_DIGITS.issuperset(digits):
        return None
    return digits


def id_hex(text):
    """A printed CKA_ID as lowercase hex, or None when it cannot be read.

    0.23-0.26 print plain hex (``0102``); 0.27 prints ids of at most 4 bytes that
    are not zero as decimal with the bytes in brackets (``258 (0x01:02)``), others
    as colon hex (``00``, ``a1:b2:...``) wrapped after 32 bytes.
    """
    number, bracket, rest = text.partition(" (0x")
    if bracket:
        if not (number.isascii() and number.isdigit() and rest.endswith(")")):
            return None
        digits = hex_digits(rest[:-1])
        return digits if digits is not None and int(digits, 16) == int(number) else None
    return hex_digits(text)


class TokenListing:
    """What ``token_listing_argv`` printed: the module's information and its tokens.

    ``library`` holds ``manufacturer``, ``description`` and ``version`` (``2.6``);
    ``tokens`` one dict per initialised token: ``slot`` (the slot id, an int),
    ``label``, ``manufacturer``, ``model``, ``serial``; ``used`` is the slot id
    pkcs11-tool said it chose ("Using slot ... (0x...)"), when it said so.
    """

    def __init__(self, library, tokens, used):
        self.library = library
        self.tokens = tokens
        self.used = used

    def token(self, slot):
        found = [token for token in self.tokens if token["slot"] == slot]
        return found[0] if found else None


_TOKEN_FIELDS = {"token label": "label", "token manufacturer": "manufacturer",
                 "token model": "model", "serial num": "serial"}


def _slot_id(text):
    """The slot id in "Slot 0 (0x39da0b99): ..." or "... present token (0x39da0b99)"."""
    inside = text.rpartition("(0x")[2].partition(")")[0]
    return int(inside, 16) if inside and _HEX_DIGITS.issuperset(inside.lower()) else None


def read_token_listing(stdout, stderr=""):
    """A TokenListing of ``--show-info --list-token-slots`` (OpenSC 0.23 to 0.27)."""
    library, tokens, current = {}, [], None
    for line in stdout.splitlines():
        if line.startswith("Manufacturer ") and current is None:
            library["manufacturer"] = line[len("Manufacturer"):].strip(" ")
        elif line.startswith("Library ") and current is None:
            text = line[len("Library"):].strip(" ")
            description, ver, version = text.rpartition(" (ver ")
            if ver and version.endswith(")"):
                library["description"], library["version"] = description, version[:-1]
            else:
                library["description"] = text
        elif line.startswith("Slot "):
            current = {"slot": _slot_id(line.partition(":")[0])}
        elif current is not None and line.startswith("  ") and ":" in line:
            name, _, value = line.strip(" ").partition(":")
            field = _TOKEN_FIELDS.get(name.strip(" "))
            if field:
                current[field] = value.strip(" ")
                if field == "label" and current["slot"] is not None:
                    tokens.append(current)
    used = None
    for line in stderr.splitlines():
        if line.startswith("Using slot "):
            used = _slot_id(line)
    return TokenListing(library, tokens, used)


class TokenObject:
    """One object of a ``--list-objects`` listing: its kind and the fields lap-pkcs11 uses.

    ``id`` and ``ec_point``/``ec_params`` are lowercase hex whatever the OpenSC
    version printed; ``id_text`` keeps what was printed, and ``id`` is None when
    that text was present but unreadable.
    """

    def __init__(self, kind, key_type=None):
        self.kind = kind
        self.key_type = key_type
        self.fields = []
        self.label = None
        self.id = None
        self.id_text = None
        self.ec_point = None
        self.ec_params = None
        self.access = frozenset()
        self.uri = None  # OpenSC 0.26+ prints each object's PKCS#11 URI

    @property
    def is_key(self):
        return self.kind in KEY_KINDS

    def _set(self, name, value):
        if name == "label":
            self.label = value
        elif name == "id":
            self.id_text, self.id = value, id_hex(value)
        elif name == "ec_point":
            self.ec_point = hex_digits(value)
        elif name == "ec_params":
            # Hex, then a description in brackets: "(OID 1.3.101.112)", '("Ed25519" OID:...)'.
            self.ec_params = hex_digits(value.split("(", 1)[0])
        elif name == "uri":
            self.uri = value
        elif name == "access":
            self.access = frozenset(part.strip() for part in value.split(",") if part.strip())

    def public_key(self):
        """The 32-byte Ed25519 key from CKA_EC_POINT, DER-wrapped or raw."""
        if self.ec_params is not None and self.ec_params not in ED25519_PARAMS:
            raise errors.MechanismUnsupported(
                f"the key with id {self.id} is not an Ed25519 key (EC_PARAMS {self.ec_params})")
        raw = bytes.fromhex(self.ec_point or "")
        if len(raw) == 34 and raw[:2] == b"\x04\x20":
            return raw[2:]
        if len(raw) == 32:
            return raw
        raise errors.SigningFailed(f"the public key with id {self.id} has an EC_POINT of "
                                   f"{len(raw)} bytes, not an Ed25519 point")


def _object_kind(line):
    """"private key" for "Private Key Object; EC_EDWARDS", "data" for "Data object 6", or None."""
    words = line.split(";", 1)[0].lower().split()
    if "object" not in words:
        return None
    return " ".join(words[:words.index("object")])


def _key_type(line):
    """"EC_EDWARDS" for "Public Key Object; EC_EDWARDS  EC_POINT 255 bits", or None."""
    words = line.partition(";")[2].split()
    return words[0] if words else None


def parse_objects(listing):
    """The objects of a ``pkcs11-tool --list-objects`` listing, in order."""
    return read_listing(listing)[0]


def read_listing(listing):
    """(objects, stray lines) of a ``pkcs11-tool --list-objects`` listing.

    Reads every format from OpenSC 0.23 to 0.27: an object starts at a line with
    no indent, its fields are ``  name: value`` lines, and a line indented deeper
    (0.27 wraps values over 32 bytes onto lines indented 14 spaces) continues
    the field before it. Lines with no indent that name no object are the stray
    lines, for a caller who must be sure it read everything.
    """
    objects, strays, current, fields, field = [], [], None, {}, None

    def finish():
        if current is not None:
            for name, value in fields.items():
                current._set(name, value)

    for line in listing.splitlines():
        if not line.strip():
            continue
        if not line.startswith(" "):
            finish()
            kind = _object_kind(line)
            current = TokenObject(kind, _key_type(line)) if kind is not None else None
            fields, field = {}, None
            if current is None:
                strays.append(line.strip())
            else:
                objects.append(current)
            continue
        if current is None:
            continue
        if not line.startswith("   ") or field is None:
            name, _, value = line.strip().partition(":")
            current.fields.append(name.strip())
            field = _FIELDS.get(name.strip(), "")
            if field:
                fields[field] = value.strip()
        elif field:
            fields[field] += " " + line.strip()
    finish()
    return objects, strays


# Stable CKR_* names and OpenSC phrases, matched in order against stderr.
_CLASSES = (
    ("Failed to load pkcs11 module", errors.ModuleLoadFailed,
     "the PKCS#11 module cannot be loaded; check --module and the module's own configuration"),
    ("sc_dlopen failed", errors.ModuleLoadFailed,
     "the PKCS#11 module cannot be loaded; check --module"),
    ("sc_dlopen_deep failed", errors.ModuleLoadFailed,
     "the PKCS#11 module cannot be loaded; check --module"),
    ("C_Initialize failed", errors.ModuleLoadFailed,
     "the PKCS#11 module failed to initialise; check its configuration (e.g. SOFTHSM2_CONF)"),
    ("CKR_PIN_INCORRECT", errors.PinIncorrect,
     "the token rejected the PIN; fix the PIN (real tokens lock after a few wrong tries)"),
    ("CKR_PIN_LEN_RANGE", errors.PinIncorrect,
     "the token rejected the PIN's length; fix the PIN"),
    ("CKR_PIN_LOCKED", errors.PinLocked,
     "the user PIN is locked; unlock it with the SO PIN"),
    ("CKR_PIN_EXPIRED", errors.PinLocked,
     "the user PIN has expired; set a new one"),
    ("Token not initialized", errors.TokenNotFound,
     "the selected slot holds no initialised token; check the token selector "
     "(pkcs11-tool --list-token-slots)"),
    ("CKR_TOKEN_NOT_RECOGNIZED", errors.TokenNotFound,
     "the selected slot holds no initialised token; check the token selector "
     "(pkcs11-tool --list-token-slots)"),
    ("No slot with token named", errors.TokenNotFound,
     "no token with that label; check --token-label (pkcs11-tool --list-slots)"),
    ("CKR_SLOT_ID_INVALID", errors.TokenNotFound,
     "no such slot; check --slot (pkcs11-tool --list-slots)"),
    ("CKR_TOKEN_NOT_PRESENT", errors.TokenNotFound,
     "no token in that slot; insert it or fix the slot"),
    ("is not available", errors.TokenNotFound,
     "no token at that slot index; check --slot-index (pkcs11-tool --list-slots)"),
    ("No slot with id", errors.TokenNotFound,
     "no such slot; check --slot (pkcs11-tool --list-slots)"),
    ("No slots", errors.TokenNotFound,
     "the module sees no slots; check the token is present and initialised"),
    ("No slot", errors.TokenNotFound,
     "no usable token; check the token selector (pkcs11-tool --list-slots)"),
    ("Private/secret key not found", errors.KeyNotFound,
     "no private key with that id on the token; check --key-id (lap-pkcs11 doctor)"),
    ("key not found", errors.KeyNotFound,
     "no private key with that id on the token; check --key-id (lap-pkcs11 doctor)"),
    ("Key has no EC_PARAMS attribute", errors.MechanismUnsupported,
     "the key has no EC parameters, so it is not an Ed25519 key; select an Ed25519 key"),
    ("Unknown or unsupported EC curve", errors.MechanismUnsupported,
     "the key is on a curve pkcs11-tool cannot sign EdDSA with; select an Ed25519 key"),
    ("CKR_MECHANISM_INVALID", errors.MechanismUnsupported,
     "the token cannot do this mechanism; check --mechanism and the key type"),
    ("CKR_KEY_TYPE_INCONSISTENT", errors.MechanismUnsupported,
     "the key's type does not fit the mechanism; use an Ed25519 key with EDDSA"),
    ("CKR_KEY_FUNCTION_NOT_PERMITTED", errors.MechanismUnsupported,
     "the key may not sign (CKA_SIGN is false); use a signing key"),
    ("CKR_OPERATION_NOT_INITIALIZED", errors.MechanismUnsupported,
     "the token refused to sign with this mechanism and key; check --mechanism and the key type"),
    ("Unknown PKCS11 mechanism", errors.MechanismUnsupported,
     "pkcs11-tool does not know this mechanism; use EDDSA"),
    ("mechanism not supported", errors.MechanismUnsupported,
     "the token does not support this mechanism"),
)


def classify(result):
    """The typed error for a failed pkcs11-tool run, from its stderr's stable parts."""
    text = result.stderr
    for needle, cls, advice in _CLASSES:
        if needle in text:
            return cls(advice)
    if result.status in (126, 127):  # the shell's convention: the program could not run
        return errors.ToolNotFound("pkcs11-tool could not be started; check --pkcs11-tool")
    if result.status < 0:
        return errors.SigningFailed(f"pkcs11-tool died of signal {-result.status}")
    detail = _last_line(text)
    return errors.SigningFailed(f"pkcs11-tool exited {result.status}" +
                                (f": {detail}" if detail else ""))


def _last_line(text):
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line and line != "Aborting.":
            return line[:200]
    return ""
