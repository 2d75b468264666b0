"""Files the signer reads or keeps, opened so that a hostile host cannot swap them.

A host is shared: another user may plant a FIFO where a file was expected (a
reader would hang), a symlink (a writer would write elsewhere), or a file of
their own in a shared directory (its content would be trusted). So every file is
opened without blocking and checked through ``fstat`` on the descriptor that was
opened: what is checked is what is read.

- ``read_named_file``: the env file and the PIN file the operator names. A
  regular file of bounded size, owned by us or root, that nobody else may write.
- ``private_dir`` and ``open_private``: the directory of the lock and PIN-guard
  files, and the files in it. Ours alone (never through a symlink, not writable
  by anyone else); any other file there is refused, never silently ignored.

This module is on the per-signature path: it imports only what Python has built in.
"""

import os
import stat

from lap_pkcs11.per_signature.errors import ConfigInvalid

_NOBLOCK = os.O_NONBLOCK | os.O_CLOEXEC


def _refuse(path, what, problem, fix):
    raise ConfigInvalid(f"{what} {path} {problem}; {fix}")


def read_named_file(path, what, limit, secret=False):
    """The bytes of the operator's file ``path``, after the checks; at most ``limit`` bytes.

    ``what`` names the file in errors ("env file", "PIN file"). A ``secret`` file
    must also give others no access at all.
    """
    try:
        fd = os.open(path, os.O_RDONLY | _NOBLOCK)
    except OSError as err:
        _refuse(path, what, f"cannot be read ({err.strerror})", "fix the path or its permissions")
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            _refuse(path, what, "is not a regular file", "name a regular file")
        if info.st_uid not in (os.geteuid(), 0):
            _refuse(path, what, f"belongs to uid {info.st_uid}, not to this user or root",
                    "chown it to the signer's user or root")
        loose = 0o022 | (0o007 if secret else 0)
        if info.st_mode & loose:
            _refuse(path, what, f"has mode {stat.S_IMODE(info.st_mode):04o}",
                    "chmod go-w" + (",o-rwx" if secret else "") + " it")
        if info.st_size > limit:
            _refuse(path, what, f"is larger than {limit} bytes", "shorten it")
        data = os.read(fd, limit + 1)
        if len(data) > limit:
            _refuse(path, what, f"is larger than {limit} bytes", "shorten it")
        return data
    except OSError as err:
        _refuse(path, what, f"cannot be read ({err.strerror})", "fix the path or its permissions")
    finally:
        os.close(fd)


def private_dir(base, explicit):
    """The private directory of lock and guard files: ``base`` itself when the operator
    named it (``explicit``), else ``base/lap-pkcs11-<euid>``, made 0700 when missing."""
    uid = os.geteuid()
    # "dir/" would follow a symlink named dir; the check is of the name itself.
    base = base.rstrip("/") or "/"
    _check_ancestors(base if explicit else os.path.join(base, "x"), uid)
    folder = base if explicit else os.path.join(base, f"lap-pkcs11-{uid}")
    if not explicit:
        try:
            os.mkdir(folder, 0o700)
        except FileExistsError:
            pass
        except OSError as err:
            _refuse(folder, "lock directory", f"cannot be made ({err.strerror})",
                    "set --lock-dir to a directory only this user can write")
    try:
        info = os.lstat(folder)
    except OSError as err:
        _refuse(folder, "lock directory", f"cannot be used ({err.strerror})",
                "set --lock-dir to a directory only this user can write")
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != uid or info.st_mode & 0o022:
        kind = "a directory" if stat.S_ISDIR(info.st_mode) else "not a directory"
        _refuse(folder, "lock directory",
                f"is not private ({kind}, owner uid {info.st_uid}, mode "
                f"{stat.S_IMODE(info.st_mode):04o})",
                "set --lock-dir to a directory only this user can write")
    return folder


def _check_ancestors(path, uid):
    """Every directory above ``path`` must be root's or ours, and nobody else may
    rename entries in it (not writable by others, or sticky like /tmp): else the
    private directory could be swapped for another one between check and use."""
    folder = os.path.dirname(os.path.abspath(path))
    while True:
        try:
            info = os.lstat(folder)
        except OSError as err:
            _refuse(folder, "lock directory", f"cannot be used ({err.strerror})",
                    "set --lock-dir to a directory only this user can write")
        loose = not stat.S_ISLNK(info.st_mode) and info.st_mode & 0o022 and not info.st_mode & 0o1000
        if info.st_uid not in (0, uid) or loose:
            _refuse(folder, "lock directory's parent",
                    f"is not safe (owner uid {info.st_uid}, mode {stat.S_IMODE(info.st_mode):04o})",
                    "set --lock-dir to a directory whose parents only root or this user can "
                    "change")
        if folder == "/":
            return
        folder = os.path.dirname(folder)


def check_private(fd, path, limit=None):
    """Refuse a descriptor in the private directory that is not our own plain 0600 file."""
    info = os.fstat(fd)
    problem = None
    if not stat.S_ISREG(info.st_mode):
        problem = "is not a regular file"
    elif info.st_uid != os.geteuid():
        problem = f"belongs to uid {info.st_uid}"
    elif info.st_mode & 0o077:
        problem = f"has mode {stat.S_IMODE(info.st_mode):04o}"
    elif limit is not None and info.st_size > limit:
        problem = f"is larger than {limit} bytes"
    if problem:
        os.close(fd)
        _refuse(path, "signer state file", problem,
                "remove it (only the signer's user may create files in its lock directory)")


def open_private(path, flags, limit=None):
    """Open ``path`` in the private directory (never through a symlink, never blocking),
    checked by ``check_private``; None when it does not exist and ``flags`` do not create it."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | _NOBLOCK, 0o600)
    except FileNotFoundError:
        if flags & os.O_CREAT:
            raise
        return None
    except FileExistsError:
        raise
    except OSError as err:
        _refuse(path, "signer state file", f"cannot be opened ({err.strerror})",
                "remove it (only the signer's user may create files in its lock directory)")
    check_private(fd, path, limit)
    return fd
