"""One run per run folder: an OS lock on `save_path/name/.run.lock` (DESIGN §5).

    with runlock.hold(config.save_dir):   # RunFolderBusy (a UserError) if another run holds it
        train...

    python runlock.py --clear checkpoints/demo   # empty a run folder no run holds (make demo)

The lock is `fcntl.flock` on the open lock file: the kernel releases it when the
holding process ends, however it ends, so a SIGKILL never leaves a stale lock (the
file itself stays; only the lock on it counts). A flock belongs to the open file, which
a forked child shares (datasets.map's worker processes): children drop their copy at
once, so workers orphaned by a killed run do not keep its folder locked. The holder
writes its pid, host and start time into the file, and a second run names them in its
one-line error. On a file system without flock (some network mounts) the run goes on
unlocked and says so.

Standard library only.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import os
import shutil
import socket
import sys
from typing import Callable, Iterator

from cli import UserError, main_guard

LOCK_NAME = ".run.lock"


_held_fds: set = set()  # descriptors of the lock files this process holds


def _drop_held_locks_in_child() -> None:
    """In a forked child: point each held lock's descriptor at /dev/null, which closes the
    child's reference to the locked file (the parent keeps the lock) and leaves the
    number valid for whatever closes it later in the child."""
    if not _held_fds:
        return
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in _held_fds:
        os.dup2(devnull, fd)
    os.close(devnull)
    _held_fds.clear()


os.register_at_fork(after_in_child=_drop_held_locks_in_child)


class RunFolderBusy(UserError):
    """Another live process holds the run folder."""


def lock_path(save_dir: str) -> str:
    return os.path.join(save_dir, LOCK_NAME)


def holder_line() -> str:
    """Who holds a lock: what this process writes into the lock file."""
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    return f"pid {os.getpid()} on {socket.gethostname()}, started {started}"


@contextlib.contextmanager
def hold(save_dir: str, warn: Callable[[str], object] = print) -> Iterator[None]:
    """Hold `save_dir`'s lock for the duration of the block (the folder must exist)."""
    path = lock_path(save_dir)
    try:
        f = open(path, "a+", encoding="utf-8")
    except OSError as e:
        raise UserError(f"cannot create the lock file {path}: {e.strerror}") from None
    with f:
        locked = True
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "a process that has not written its name yet"
            raise RunFolderBusy(f"run folder {save_dir} is in use by another run ({holder}); "
                                "wait for it to end, or set another name or save_path") from None
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
            locked = False
            warn(f"warning: {save_dir}'s file system cannot lock files ({e.strerror}): "
                 "nothing stops a second run from writing into this folder")
        if locked:
            f.seek(0)
            f.truncate()
            f.write(holder_line() + "\n")
            f.flush()
            _held_fds.add(f.fileno())
        try:
            yield  # closing the file (or the process ending) releases the lock
        finally:
            _held_fds.discard(f.fileno())


def clear(save_dir: str, warn: Callable[[str], object] = print) -> None:
    """Empty `save_dir` while holding its lock and that of every run folder inside it
    (RunFolderBusy, nothing removed, if a run holds one): `rm -rf` would pull a folder
    from under a live run, which would go on writing into a folder the next run then
    shares with it. A missing folder stays missing. Only a run folder (one holding
    LOCK_NAME, which every run makes first) or an empty one is emptied: a slip such as
    `checkpoints` for `checkpoints/demo`, or a project folder, is refused (UserError)."""
    if not os.path.lexists(save_dir):
        return
    if not os.path.exists(save_dir):  # a link to a folder that is not there (an unmounted disk, say)
        raise UserError(f"{save_dir}: is a broken symbolic link (to {os.readlink(save_dir)}); nothing removed")
    if not os.path.isdir(save_dir):
        raise UserError(f"{save_dir}: is a file, not a run folder; nothing removed")
    if os.listdir(save_dir) and not os.path.isfile(lock_path(save_dir)):
        raise UserError(f"{save_dir}: is not a run folder (no {LOCK_NAME}: no run of run.py has used it); "
                        "nothing removed")
    run_folders = [save_dir] + [folder for folder, _, files in os.walk(save_dir)
                                if LOCK_NAME in files and folder != save_dir]
    with contextlib.ExitStack() as held:
        for folder in run_folders:
            held.enter_context(hold(folder, warn=warn))
        for entry in os.scandir(save_dir):
            if entry.name == LOCK_NAME:
                continue  # the held lock: the next run takes it over
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] != "--clear":
        print("usage: python runlock.py --clear RUN_FOLDER", file=sys.stderr)
        return 2
    return main_guard(lambda: _clear_command(argv[1]))


def _clear_command(save_dir: str) -> int:
    try:
        clear(save_dir)
    except OSError as e:  # a file that cannot be removed
        raise UserError(f"{save_dir}: cannot be emptied ({e.filename or save_dir}: {e.strerror or e})") from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
