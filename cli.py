"""What every command-line script of this repository shares.

- `UserError`: the base class of every error caused by the user's input (a config, a
  data file, a checkpoint, a command-line argument). Its message is one line naming
  the culprit; scripts print it and exit with status 2 instead of a traceback.
- `main_guard(main)`: runs a script's main, turning a UserError into that one line and
  exit 2, and Ctrl-C into one line and exit 130. Under torchrun only rank 0 prints
  (every rank meets the same bad input; the others exit quietly with the same status),
  and the line also goes to torchrun's error file, so its failure report names it.
- `exit_after_main(status)`: how a script that may have joined a process group ends
  (run.py, and bench scripts that call its main).
- `OneLineParser`: argparse whose usage errors are one line, exit status 2;
  `positive_int` an argument type.
- `read_json_list`: a non-empty JSON list from a file, or a UserError.
- `cannot_write_in(folder)`: why a file cannot be created in a folder, by trying.
- `atomic_write(path, write)`: a file written whole or not at all (checkpoints);
  `write_json(path, data)` a JSON file so (the data scripts).

Standard library only, so a script can fail fast before torch is imported.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import stat
import sys
import tempfile
import time
from typing import Callable, Optional


class UserError(ValueError):
    """Bad input from the user; the message is one line naming the key, file or example."""


def process_rank() -> int:
    """This process's rank under torchrun (its RANK variable), 0 otherwise."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def reports_errors() -> bool:
    """Whether this process prints the run's one-line errors: rank 0, and the first
    process of every other node (a file missing on one node is met there alone)."""
    return process_rank() == 0 or os.environ.get("LOCAL_RANK", "0") == "0"


def fail(error: BaseException) -> int:
    """Print a user error as one line on stderr (reports_errors); the exit status for it.
    Every process writes it into its torchrun error file: whichever exits first is the
    root cause torchrun's failure report shows."""
    line = f"error: {error}"
    if reports_errors():
        print(line, file=sys.stderr)
    _tell_torchrun(line)
    return 2


def _tell_torchrun(line: str) -> None:
    """Under torchrun, write the line to the worker's error file: torchrun's failure
    report ("Root Cause ... traceback :") then shows it instead of a link to its docs."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    record = {"message": {"message": line, "extraInfo": {"py_callstack": line, "timestamp": str(int(time.time()))}}}
    try:
        with open(path, "w") as f:
            json.dump(record, f)
    except OSError:
        pass  # the line is on stderr anyway


def exit_after_main(status: int) -> None:
    """End a script whose main may have joined a process group: through
    distributed.exit_process when distributed was imported (Python's finalization can
    abort a process after gloo, see there), else sys.exit. Importing distributed here
    would import torch after a bad config."""
    distributed = sys.modules.get("distributed")
    (distributed.exit_process if distributed else sys.exit)(status)


def main_guard(main: Callable[[], int]) -> int:
    """main() with user errors and Ctrl-C reported in one line (exit 2 and 130)."""
    try:
        return main()
    except UserError as error:
        return fail(error)
    except KeyboardInterrupt:
        _close_progress_bars()
        if reports_errors():
            print("interrupted", file=sys.stderr, flush=True)
        return 130


def _close_progress_bars() -> None:
    """End open tqdm bars now, so the last line is ours (not a bar closed at exit)."""
    std = sys.modules.get("tqdm.std")
    for bar in list(getattr(getattr(std, "tqdm", None), "_instances", ())):
        bar.close()


def first_line(error: BaseException) -> str:
    """An exception's first non-empty line (its type's name if none), at most 200 characters:
    what a one-line error quotes of a library's message."""
    return next((ln.strip() for ln in str(error).splitlines() if ln.strip()), type(error).__name__)[:200]


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line on stderr, exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def read_json_list(path: str, items: str) -> list:
    """A non-empty JSON list from `path`; UserError (one line) otherwise."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not a readable JSON file ({' '.join(str(e).split())})") from None
    except RecursionError:
        raise UserError(f"{path}: not a readable JSON file (nested too deeply)") from None
    if not isinstance(data, list) or not data:
        raise UserError(f"{path}: must be a non-empty JSON list of {items}")
    return data


def cannot_write_in(folder: str):
    """None when a file can be created in `folder`, else why not (its strerror). Tried
    with a file made and removed at once: os.access says yes to root for a read-only
    file system or /proc, where writing fails later, after the heavy work."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        return e.strerror or type(e).__name__
    return None


def atomic_write(path: str, write: Callable, mode: Optional[int] = None) -> None:
    """write(f) into a binary file that becomes `path` whole or not at all: written as
    `.{name}.tmp-{pid}-{random}` in the same folder, fsynced, renamed onto `path`
    (atomic on POSIX), the folder fsynced so that the rename survives a power loss. On
    any error the temporary file is removed and the error re-raised; a SIGKILL may
    leave it behind, never a partial `path`. `mode`: the file's permissions (default
    0666 less the umask, as open() gives; mkstemp would give 0600)."""
    folder, name = os.path.split(os.path.abspath(path))
    temporary = os.path.join(folder, f".{name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        if mode is not None:
            os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    fsync_dir(folder)


def fsync_dir(folder: str) -> None:
    """fsync a folder (its entries: a rename in it), where the file system allows it."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open a directory
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a directory
        pass
    finally:
        os.close(fd)


def write_json(path: str, data, **dump_options) -> None:
    """`data` as JSON at `path`, creating its folder, whole or not at all (atomic_write).
    A symbolic link keeps pointing where it did (its target is written), an existing
    file keeps its permissions, and what is not a regular file (/dev/stdout) or lies in
    a folder this process cannot create files in is written in place. An OSError names
    `path` (not a temporary file)."""
    encoded = json.dumps(data, **dump_options).encode("utf-8")
    target = os.path.realpath(path)
    try:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        exists = os.path.exists(target)
        if not exists or os.path.isfile(target):
            try:
                atomic_write(target, lambda f: f.write(encoded), stat.S_IMODE(os.stat(target).st_mode) if exists else None)
                return
            except PermissionError:  # no new file in the folder: an existing one is written in place
                if not exists:
                    raise
        with open(target, "wb") as f:
            f.write(encoded)
    except OSError as e:
        raise OSError(e.errno, e.strerror, path) from None


def quiet_transformers() -> None:
    """No per-file progress bars from transformers: a script's output is its own."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
