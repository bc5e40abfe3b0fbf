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
- `write_json(path, data)`: a JSON file written whole or not at all (the data scripts).

Standard library only, so a script can fail fast before torch is imported.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from typing import Callable


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


def write_json(path: str, data, **dump_options) -> None:
    """`data` as JSON at `path`, creating its folder; written to a temporary file beside
    it and renamed, so a stopped or failed write leaves no half a file under the name.
    An OSError names `path` (not the temporary file)."""
    folder = os.path.dirname(path)
    try:
        if folder:
            os.makedirs(folder, exist_ok=True)
        fd, temporary = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.tmp-", dir=folder or ".")
    except OSError as e:
        raise OSError(e.errno, e.strerror, path) from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, **dump_options)
        os.chmod(temporary, 0o666 & ~_umask())  # mkstemp's 0600: as open() would have made it
        os.replace(temporary, path)
    except BaseException as e:
        os.unlink(temporary)
        if isinstance(e, OSError):
            raise OSError(e.errno, e.strerror, path) from None
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def quiet_transformers() -> None:
    """No per-file progress bars from transformers: a script's output is its own."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
