"""Checkpoint files: crash-safe writing, listing, loading and resuming (DESIGN §5, §9).

Layout of a run folder (`save_path/name/`), compatible with the published code:

    checkpoint_{epoch}         the model weights: a plain state dict (name -> tensor),
                               written with torch.save exactly as the published code did,
                               so `torch.load(path, weights_only=True)` reads it. Keys are
                               `base_causallm.*` for coconut runs, the HF model's own
                               keys otherwise. Written by one process, last.
    checkpoint_{epoch}.state/  everything else an exact resume needs, a folder:
        train_state.pt         plain values (epoch, best accuracy, ...), torch.save,
                               readable with weights_only=True;
        .metadata, *.distcp    the sharded part (the optimizer state, keyed by parameter
                               name) in torch.distributed.checkpoint (DCP) format: every
                               process writes its own shard, nothing is gathered, and
                               any number of processes can load it back (DCP reshards).
                               `read_sharded_state(folder)` returns it whole.
    checkpoint_{epoch}.state   (a file) what earlier versions wrote: one torch.save of
                               {"epoch", "best_acc", "optimizer": whole state dict};
                               still resumes. Folders written by the published code have
                               no .state at all; such checkpoints resume without it.
    progress.json              {"epochs_done", "newest_checkpoint", "best_acc"}, rewritten
                               after every epoch's evaluation: a save_only_improve run's
                               newest checkpoint is its best epoch, not its last, and other
                               runs save before evaluating (`write_progress`, `read_progress`,
                               `read_recorded_best`).
    .latest/                   a save_only_improve run's newest epoch when it did not
                               improve: a checkpoint_{epoch} and its .state as above,
                               where the run resumes from (`find_run_resume_point`);
                               emptied when an epoch is saved in the run folder.
    wandb_run_id               the run's wandb id, written at its first launch: every
                               relaunch logs to the same wandb run (`wandb_run_id`).
    config.yaml                the config and process count of the launch that saved
                               the newest epoch: a relaunch says what it changes
                               (`write_launch_config`).

What this module fixes in the published code (DESIGN §9):
- Every file is written to a temporary name in the same folder, fsynced, then renamed
  onto its final name (`atomic_torch_save`); the .state folder is written under a
  temporary name by all processes and renamed once all have finished. The .state is
  complete before the model file is written, so a model file present means its
  `.state` (if any) was complete before it.
- Only files named exactly `checkpoint_{int}` count as checkpoints; anything else in
  the folder (notes, backups, temporary files, directories) is ignored.
- Loading uses `weights_only=True`, and DCP folders are read through safe_dcp.py
  (torch's own reader unpickles them freely); a file that does not load (or a .state folder with
  a missing or short shard file) is reported with one line naming it, and
  `find_resume_point` then falls back to the next older checkpoint (not past a file the
  file system will not read: UnreadableCheckpoint).

It knows nothing of FSDP, configs or the model: callers hand it the model's state dict
(a plain CPU one, or a `StreamedModelState` that delivers one whole tensor at a time so
no process holds them all), the sharded part as a state dict DCP can save (tensors or
DTensors), and, when several processes save, whether this one is rank 0 and a barrier. run.py keeps the .state
of the newest checkpoints only (`prune_train_states`). Resumes need no RNG state: run.py
reseeds every epoch from (seed, epoch).
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import pickle
import re
import secrets
import zipfile
import shutil
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Optional

import torch
import torch.distributed.checkpoint as dcp
import yaml
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

from cli import UserError, atomic_write, first_line, fsync_dir
from safe_dcp import SafeEmptyLoadPlanner, SafeLoadPlanner, SafeReader
from streamed_save import StreamedModelState, write_streamed

__all__ = [
    "CheckpointError",
    "ShardedState",
    "StreamedModelState",
    "atomic_torch_save",
    "checkpoint_path",
    "find_resume_point",
    "find_run_resume_point",
    "latest_folder",
    "list_checkpoints",
    "load_model_state",
    "load_train_state",
    "load_sharded",
    "prune_train_states",
    "read_launch_config",
    "read_progress",
    "read_recorded_best",
    "read_sharded_state",
    "remove_checkpoints",
    "save_checkpoint",
    "state_path",
    "run_folder_leftovers",
    "tidy_run_folder",
    "wandb_run_id",
    "write_launch_config",
    "write_progress",
]

STATE_SUFFIX = ".state"
# save_only_improve runs: how many epochs are trained (their newest checkpoint is their best)
PROGRESS_FILE = "progress.json"
WANDB_ID_FILE = "wandb_run_id"
# a save_only_improve run's newest epoch when it is not its best (find_run_resume_point)
LATEST_FOLDER = ".latest"
LAUNCH_CONFIG_FILE = "config.yaml"
# the plain part of a .state folder; the sharded part is DCP's own files beside it
PLAIN_STATE_FILE = "train_state.pt"
# Written into train_state.pt: the top-level keys whose values are in the DCP part.
_SHARDED_KEYS = "sharded_keys"
# Written into every .state file by save_checkpoint (and stripped by load_train_state)
# to tie it to its model file's epoch.
_EPOCH_KEY = "checkpoint_epoch"

_CHECKPOINT_RE = re.compile(r"checkpoint_(0|[1-9][0-9]*)")
# Temporary files of the atomic writes into a run folder: `.checkpoint_3.tmp-...`,
# `.checkpoint_3.state.tmp-...` (also the .state folders being written or deleted), the
# small files' (`.progress.json.tmp-...`, ...), and, inside a .state folder, its plain
# state's (mark_evaluated rewrites it).
_ATOMIC_FILES = (PROGRESS_FILE, LAUNCH_CONFIG_FILE, WANDB_ID_FILE, PLAIN_STATE_FILE)
_TEMP_RE = re.compile(r"\.(checkpoint_[0-9]+(\.state)?|" + "|".join(map(re.escape, _ATOMIC_FILES)) + r")\.tmp-.*",
                      re.DOTALL)


class CheckpointError(UserError):
    """A checkpoint file that cannot be used; the message is one line naming the file."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = os.fspath(path)
        self.reason = " ".join(str(reason).split()) or "unknown error"
        super().__init__(f"checkpoint {self.path}: {self.reason}")


class UnreadableCheckpoint(CheckpointError):
    """A checkpoint the file system would not read (an I/O error, no permission): not
    damaged, so a resume stops at it rather than train again from an older one and
    overwrite it."""


@dataclass(frozen=True)
class ShardedState:
    """A value of a training state kept in DCP format: `key` of the folder `path`.

    load_train_state returns these instead of the values (which may be larger than one
    process should hold); `load_sharded` fills a caller's template with them.
    """

    path: str
    key: str


# ---------------------------------------------------------------------------------
# Paths


def checkpoint_path(save_dir: str | os.PathLike, epoch: int) -> str:
    """`save_dir/checkpoint_{epoch}`: the model weights file of that epoch."""
    return os.path.join(os.fspath(save_dir), f"checkpoint_{_check_epoch(epoch)}")


def state_path(save_dir: str | os.PathLike, epoch: int) -> str:
    """`save_dir/checkpoint_{epoch}.state`: the training state saved beside it."""
    return checkpoint_path(save_dir, epoch) + STATE_SUFFIX


def _check_epoch(epoch: int) -> int:
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
        raise ValueError(f"checkpoint epoch must be a non-negative int, got {epoch!r}")
    return epoch


# ---------------------------------------------------------------------------------
# Writing


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save `obj` to `path` so that `path` is either untouched or complete.

    Writes `.{name}.tmp-{pid}-{random}` in the same folder, flushes and fsyncs it,
    renames it onto `path` (atomic on POSIX) and fsyncs the folder so the rename
    survives a power loss. On any error the temporary file is removed and the error
    re-raised; a SIGKILL may leave the temporary file behind, never a partial `path`.
    """
    atomic_write(os.fspath(path), lambda f: torch.save(obj, f))


def save_checkpoint(
    save_dir: str | os.PathLike,
    epoch: int,
    model_state: Mapping[str, torch.Tensor],
    train_state: Optional[Mapping[str, Any]] = None,
    sharded_state: Optional[Mapping[str, Any]] = None,
    *,
    is_main: bool = True,
    barrier: Callable[[], Any] = lambda: None,
) -> str:
    """Write `checkpoint_{epoch}` (and its `checkpoint_{epoch}.state` folder) under `save_dir`.

    Called by every process of a run at once (with `is_main` true on rank 0 only and a
    `barrier` over all of them), or by a lone process with the defaults.
    `model_state` is a plain state dict (str -> tensor, on CPU) on rank 0 (other ranks
    pass {}), or a StreamedModelState on every rank. `train_state` holds the plain values an exact resume needs (e.g. {"epoch",
    "best_acc"}; tensors and plain python values only, so it loads with
    weights_only=True: checked before anything is written, TypeError naming the bad
    entry). `sharded_state` (e.g. {"optimizer": ...}) is saved through DCP, each process
    writing its own part. With both None only the model file is written, and a stale
    `.state` of that epoch is removed.

    Order: rank 0 removes leftover temporary files of killed saves (they can be as big
    as a model) and this epoch's old files (the model file first, so an old model is
    never paired with a new .state); all processes write the .state folder under a
    temporary name; rank 0 renames it, then writes the model file atomically. A save
    that dies half way loses that epoch, and resume falls back to the one before.
    Creates `save_dir` if missing. Returns the model file's path.
    """
    _check_epoch(epoch)
    streamed = isinstance(model_state, StreamedModelState)
    if is_main:
        _check_model_state(model_state.templates if streamed else model_state)
    if train_state is not None and not isinstance(train_state, Mapping):
        raise TypeError(f"train_state must be a dict, got {type(train_state).__name__}")
    plain = dict(train_state or {})
    for reserved in (_EPOCH_KEY, _SHARDED_KEYS):
        if reserved in plain:
            raise ValueError(f"train_state key {reserved!r} is reserved")
    _check_weights_only_safe(plain, "train_state")
    save_dir = os.fspath(save_dir)
    mpath, spath = checkpoint_path(save_dir, epoch), state_path(save_dir, epoch)
    tmp = os.path.join(save_dir, f".checkpoint_{epoch}{STATE_SUFFIX}.tmp-saving")  # one name for every rank
    if is_main:
        os.makedirs(save_dir, exist_ok=True)
        _remove_temp_files(save_dir)
        if _unlink(mpath):
            fsync_dir(save_dir)
        _remove_state(spath)
    barrier()
    if train_state is not None or sharded_state is not None:
        _write_state_folder(tmp, epoch, plain, sharded_state, is_main)
        if is_main:
            os.replace(tmp, spath)
            fsync_dir(save_dir)
    if streamed:
        _atomic_streamed_save(model_state, mpath, is_main)
    elif is_main:
        atomic_torch_save(model_state, mpath)
    return mpath


def _atomic_streamed_save(state: StreamedModelState, path: str, is_main: bool) -> None:
    """write_streamed to a temporary name, fsync, rename (as atomic_torch_save); the
    other ranks take part in the gathers only."""
    if not is_main:
        for _ in state.tensors():
            pass
        return
    folder, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(folder, f".{name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        write_streamed(state, tmp)
        os.replace(tmp, path)
    except BaseException:
        _unlink(tmp)
        raise
    fsync_dir(folder)


def _write_state_folder(folder: str, epoch: int, plain: dict, sharded_state, is_main: bool) -> None:
    """DCP's files (every rank its own shard; rank 0 writes `.metadata` once all have
    written theirs) and rank 0's train_state.pt, all fsynced."""
    if sharded_state is not None:
        writer = dcp.FileSystemWriter(folder, single_file_per_rank=True, sync_files=True)
        with _lone_process_quiet(), _interrupts_as_they_are():
            dcp.save(dict(sharded_state), storage_writer=writer, no_dist=_no_dist())
    if is_main:
        os.makedirs(folder, exist_ok=True)
        keys = sorted(sharded_state) if sharded_state is not None else []
        atomic_torch_save({**plain, _EPOCH_KEY: epoch, _SHARDED_KEYS: keys}, os.path.join(folder, PLAIN_STATE_FILE))


def _remove_state(path: str) -> None:
    """Remove a .state file or folder; a folder is first renamed to a temporary name, so
    a kill half way leaves nothing that looks like a .state."""
    if os.path.isdir(path) and not os.path.islink(path):
        doomed = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp-del-{secrets.token_hex(4)}")
        os.replace(path, doomed)
        fsync_dir(os.path.dirname(path))
        shutil.rmtree(doomed, ignore_errors=True)
    elif _unlink(path):
        fsync_dir(os.path.dirname(path))


def _unlink(path: str) -> bool:
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True


def run_folder_leftovers(save_dir: str | os.PathLike) -> list[str]:
    """What stopped writes left in a run folder: temporary files in the folder, its
    .latest and their .state folders, and .state folders whose model file is gone (a
    stop between deleting a checkpoint's model file and its .state, or between writing
    the two). The next save removes only its own folder's, and a finished run saves no more."""
    found = []
    for folder in (os.fspath(save_dir), latest_folder(save_dir)):
        if not os.path.isdir(folder):
            continue
        saved = list_checkpoints(folder)
        states = [state_path(folder, epoch) for epoch in saved if os.path.isdir(state_path(folder, epoch))]
        for place in [folder, *states]:
            found += [entry.path for entry in os.scandir(place) if _TEMP_RE.fullmatch(entry.name)]
        for entry in os.scandir(folder):
            epoch = _state_epoch(entry.name)
            if epoch is not None and epoch not in saved:
                found.append(entry.path)
    return sorted(found)


def _state_epoch(name: str) -> Optional[int]:
    """N for a `checkpoint_N.state` name, None for any other."""
    match = name.endswith(STATE_SUFFIX) and _CHECKPOINT_RE.fullmatch(name[: -len(STATE_SUFFIX)])
    return int(match.group(1)) if match else None


def tidy_run_folder(save_dir: str | os.PathLike) -> None:
    """Remove run_folder_leftovers(save_dir), as far as the file system lets it (they are
    harmless where they stay); only while no run writes the folder (its lock held)."""
    for path in run_folder_leftovers(save_dir):
        with contextlib.suppress(OSError):
            if _TEMP_RE.fullmatch(os.path.basename(path)):
                _remove_temp(path)
            else:
                _remove_state(path)  # a .state without its model file


def _remove_temp_files(save_dir: str) -> None:
    """Remove temporary checkpoint files and folders left by killed saves (one run per folder)."""
    for entry in os.scandir(save_dir):
        if _TEMP_RE.fullmatch(entry.name) and (entry.is_dir(follow_symlinks=False)
                                               or entry.is_file(follow_symlinks=False)):
            _remove_temp(entry.path)


def _remove_temp(path: str) -> None:
    """A temporary file or folder of an atomic write (a folder: a .state being written or deleted)."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        _unlink(path)


def _check_model_state(model_state: Any) -> None:
    if not isinstance(model_state, Mapping):
        raise TypeError(f"model_state must be a dict of tensors, got {type(model_state).__name__}")
    if not model_state:
        raise ValueError("model_state is empty")
    for key, value in model_state.items():
        if not isinstance(key, str):
            raise TypeError(f"model_state key {key!r} is not a str")
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"model_state[{key!r}] is {type(value).__name__}, not a tensor")


# Types that torch.load(weights_only=True) reads back (plain tensors only: tensor
# subclasses such as DTensor do not load).
_SAFE_SCALARS = (str, bytes, int, float, complex, bool, type(None), torch.dtype, torch.device)
_SAFE_TENSORS = (torch.Tensor, torch.nn.Parameter)


def _check_weights_only_safe(obj: Any, where: str) -> None:
    kind = type(obj)
    if kind in _SAFE_SCALARS or kind is torch.Size:
        return
    if kind in _SAFE_TENSORS:
        return
    if kind in (dict, collections.OrderedDict):
        for key, value in obj.items():
            _check_weights_only_safe(key, f"{where} key {key!r}")
            _check_weights_only_safe(value, f"{where}[{key!r}]")
        return
    if kind in (list, tuple, set, frozenset):
        for i, value in enumerate(obj):
            _check_weights_only_safe(value, f"{where}[{i}]")
        return
    raise TypeError(
        f"{where} is {kind.__module__}.{kind.__qualname__}; a .state file holds only "
        "tensors and plain python values (dict, list, tuple, str, int, float, bool, None) "
        "so that it loads with weights_only=True"
    )


# ---------------------------------------------------------------------------------
# Listing and loading


def list_checkpoints(save_dir: str | os.PathLike) -> list[int]:
    """Epochs of the files named exactly `checkpoint_{int}` in `save_dir`, ascending.

    Everything else is ignored: `.state` files, temporary files, `checkpoint_3.bak`,
    `checkpoint_03`, directories. A missing `save_dir` has none.
    """
    try:
        entries = list(os.scandir(os.fspath(save_dir)))
    except (FileNotFoundError, NotADirectoryError):
        return []
    epochs = []
    for entry in entries:
        match = _CHECKPOINT_RE.fullmatch(entry.name)
        if match and entry.is_file():
            epochs.append(int(match.group(1)))
    return sorted(epochs)


def _torch_load(path: str) -> Any:
    # mmap: tensors are read from the file as they are used, not copied in all at once
    zipped = zipfile.is_zipfile(path)
    head = b"" if zipped else _first_bytes(path)
    if not zipped and not head:
        raise CheckpointError(path, "is empty")
    if head == b"PK":  # a zip file without its directory: cut short
        raise CheckpointError(path, "does not load (a torch.save zip file cut short or damaged)")
    if not zipped and head[:1] != b"\x80":  # torch.save's legacy format is a pickle (protocol 2+)
        raise CheckpointError(path, "is not a PyTorch checkpoint (neither torch.save's zip format nor a pickle)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=zipped)
    except pickle.UnpicklingError as e:
        if "Unsupported global" in str(e):  # torch's message advises weights_only=False: unsafe, and not the fix
            raise CheckpointError(path, "does not load: it holds objects other than tensors and plain values, "
                                        "which torch.load(weights_only=True) refuses to run") from e
        raise CheckpointError(path, f"does not load (damaged: {first_line(e)})") from e
    except Exception as e:  # truncated zip, an I/O error, ...
        if _unreadable(e):
            raise UnreadableCheckpoint(path, f"cannot be read ({e.strerror or first_line(e)})") from e
        raise CheckpointError(path, f"does not load ({type(e).__name__}: {first_line(e)})") from e


def _unreadable(error: BaseException) -> bool:
    """Whether reading failed in the file system (an I/O error, no permission, a stale
    network handle), which may pass, rather than on a file that is missing or damaged."""
    return isinstance(error, OSError) and not isinstance(error, (FileNotFoundError, IsADirectoryError,
                                                                 NotADirectoryError))


def _first_bytes(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(2)
    except OSError as e:
        error = UnreadableCheckpoint if _unreadable(e) else CheckpointError
        raise error(path, f"cannot be read ({e.strerror or type(e).__name__})") from None


def load_model_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a model state dict with weights_only=True onto the CPU.

    Raises CheckpointError (one line naming the file) if it does not load or is not a
    non-empty dict of str -> tensor.
    """
    path = os.fspath(path)
    obj = _torch_load(path)
    if not isinstance(obj, dict):
        raise CheckpointError(path, f"holds a {type(obj).__name__}, not a state dict")
    if not obj:
        raise CheckpointError(path, "holds an empty state dict")
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(
                path, f"is not a state dict of tensors (entry {key!r} is {type(value).__name__})"
            )
    return obj


def load_train_state(save_dir: str | os.PathLike, epoch: int) -> Optional[dict[str, Any]]:
    """The training state saved beside `checkpoint_{epoch}`, or None if it has none.

    From a .state folder: its plain values, and a `ShardedState` for each value in the
    DCP part (e.g. "optimizer"). From an earlier version's .state file: everything in
    it. Raises CheckpointError if the .state does not load, is not a dict, was written
    for another epoch, or misses DCP files (or has short ones).
    """
    path = state_path(save_dir, epoch)
    if os.path.isdir(path):
        return _load_state_folder(path, epoch)
    if not os.path.isfile(path):
        return None
    obj = _torch_load(path)
    if not isinstance(obj, dict):
        raise CheckpointError(path, f"holds a {type(obj).__name__}, not a dict")
    _pop_epoch(obj, epoch, path)
    return obj


def _pop_epoch(obj: dict, epoch: int, path: str) -> None:
    saved_epoch = obj.pop(_EPOCH_KEY, epoch)
    if saved_epoch != epoch:
        raise CheckpointError(path, f"was written for epoch {saved_epoch!r}, not {epoch}")


def _load_state_folder(folder: str, epoch: int) -> dict[str, Any]:
    plain_path = os.path.join(folder, PLAIN_STATE_FILE)
    if not os.path.isfile(plain_path):
        raise CheckpointError(folder, f"has no {PLAIN_STATE_FILE}")
    obj = _torch_load(plain_path)
    if not isinstance(obj, dict):
        raise CheckpointError(plain_path, f"holds a {type(obj).__name__}, not a dict")
    _pop_epoch(obj, epoch, plain_path)
    keys = obj.pop(_SHARDED_KEYS, [])
    if keys:
        _check_dcp_files(folder)
    obj.update({key: ShardedState(folder, key) for key in keys})
    return obj


def _check_dcp_files(folder: str) -> None:
    """DCP's metadata reads and names files that exist and are long enough (a cheap
    check for a damaged or half-copied folder; the contents are read at load time)."""
    try:
        metadata = SafeReader(folder).read_metadata()
    except Exception as e:  # missing or unreadable .metadata
        if _unreadable(e):
            raise UnreadableCheckpoint(os.path.join(folder, ".metadata"), f"cannot be read ({e.strerror})") from e
        raise CheckpointError(folder, f"has no readable DCP metadata ({type(e).__name__}: {str(e)[:200]})") from e
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        end = info.offset + info.length
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), end)
    for name, size in sorted(needed.items()):
        file = os.path.join(folder, name)
        if not os.path.isfile(file):
            raise CheckpointError(file, "is missing")
        if os.path.getsize(file) < size:
            raise CheckpointError(file, f"is truncated ({os.path.getsize(file)} of {size} bytes)")


def load_sharded(state: ShardedState, template: Any) -> Any:
    """Fill `template` (a state dict laid out for this run: its tensors or DTensors give
    each process's share) with the saved value of `state.key`, in place; returns it.

    Called by every process at once when several run; DCP reads each one's share
    whatever the number of processes that saved it.
    """
    wrapped = {state.key: template}
    check_sharded_fits(state, template)
    try:
        with _lone_process_quiet(), _interrupts_as_they_are():
            dcp.load(wrapped, storage_reader=SafeReader(state.path), planner=SafeLoadPlanner(), no_dist=_no_dist())
    except (CheckpointException, Exception) as e:  # DCP's own is a BaseException; every process gets one
        raise CheckpointError(state.path, f"its {state.key} could not be loaded ({_dcp_failure(e)})") from None
    return wrapped[state.key]


class StateMismatch(CheckpointError):
    """A saved sharded state without a key of this run's, or with another shape: the
    state of another model (or method, or run), not a damaged file."""


def check_sharded_fits(state: ShardedState, template: Any) -> None:
    """StateMismatch naming the first entry of `template` that `state` lacks or holds in
    another shape (global shapes, whatever the processes that saved it), from DCP's
    metadata alone. Every process reads the same metadata, so all agree."""
    from torch.distributed.checkpoint._nested_dict import flatten_state_dict

    try:
        saved = SafeReader(state.path).read_metadata().state_dict_metadata
    except Exception as e:
        raise CheckpointError(state.path, f"has no readable DCP metadata ({type(e).__name__}: {first_line(e)})") from e
    wanted, _ = flatten_state_dict({state.key: template})
    for key, value in wanted.items():
        if key not in saved:
            raise StateMismatch(state.path, f"it holds no {key}, which this run's {state.key} has")
        size = getattr(saved[key], "size", None)
        if isinstance(value, torch.Tensor) and size != value.size():
            raise StateMismatch(state.path, f"its {key} has shape {tuple(size) if size is not None else None}, "
                                            f"this run's {tuple(value.size())}")


def _dcp_failure(error: BaseException) -> str:
    """The first process's exception inside DCP's CheckpointException, in one line."""
    if isinstance(error, CheckpointException) and error.failures:
        error = next(iter(error.failures.values()))[0]
    return f"{type(error).__name__}: {first_line(error)}"


@contextlib.contextmanager
def _interrupts_as_they_are():
    """A Ctrl-C inside DCP's save or load is a KeyboardInterrupt again: DCP wraps every
    process's exception, that one included, into its CheckpointException, which the
    scripts' Ctrl-C handling (one line, `interrupted`, exit 130) would not recognise."""
    try:
        yield
    except CheckpointException as e:
        if any(isinstance(failure[0], KeyboardInterrupt) for failure in e.failures.values()):
            raise KeyboardInterrupt from None
        raise


@contextlib.contextmanager
def _lone_process_quiet():
    """DCP warns on every save and load without a process group: our one-process case."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _no_dist() -> bool:
    """A lone process (no process group): DCP then reads and writes without collectives."""
    return not (torch.distributed.is_available() and torch.distributed.is_initialized())


def read_sharded_state(folder: str | os.PathLike) -> dict[str, Any]:
    """The whole DCP part of a .state folder as plain tensors, in this one process
    (for inspection and tests; it holds everything in memory); {} for a folder without
    one (the optimizer left out: the next epoch started a new AdamW)."""
    result: dict[str, Any] = {}
    if not os.path.isfile(os.path.join(os.fspath(folder), ".metadata")):
        return result
    # as torch's own dcp_to_torch_save does: an empty planner takes every saved key
    _load_state_dict(result, storage_reader=SafeReader(os.fspath(folder)), planner=SafeEmptyLoadPlanner(),
                     no_dist=True)
    return result


def find_resume_point(
    save_dir: str | os.PathLike, warn: Callable[[str], Any] = print
) -> Optional[tuple[int, dict[str, torch.Tensor], Optional[dict[str, Any]]]]:
    """The newest usable checkpoint in `save_dir`: (epoch, model_state, train_state).

    Tries checkpoints newest first; one whose model file, or whose `.state` file when
    present, does not load is skipped with one `warn` line naming it, unless the file
    system would not read it (UnreadableCheckpoint, raised: an I/O error may pass, and
    training again from an older checkpoint would overwrite this one). train_state is
    None for a checkpoint without a `.state` file (e.g. written by the published code).
    Returns None if there is no usable checkpoint.
    """
    for epoch in reversed(list_checkpoints(save_dir)):
        try:
            model_state = load_model_state(checkpoint_path(save_dir, epoch))
            train_state = load_train_state(save_dir, epoch)
        except UnreadableCheckpoint as e:
            raise UnreadableCheckpoint(e.path, f"{e.reason}: fix it, or move it aside to resume from an older "
                                               "checkpoint") from None
        except CheckpointError as e:
            warn(f"Skipping unusable {e}")
            continue
        return epoch, model_state, train_state
    return None


@dataclass
class ResumePoint:
    """Where a run folder resumes (find_run_resume_point)."""

    epoch: int
    model_state: dict
    train_state: Optional[dict]  # None for a checkpoint without a .state (the published layout)
    path: str  # its model file
    # the run folder's own newest checkpoint: a save_only_improve run's best epoch, which
    # its progress record names; None when it holds none
    newest_saved: Optional[int]


def latest_folder(save_dir: str | os.PathLike) -> str:
    """Where a save_only_improve run keeps its newest epoch when that epoch is not its best."""
    return os.path.join(os.fspath(save_dir), LATEST_FOLDER)


def find_run_resume_point(save_dir: str | os.PathLike, warn: Callable[[str], Any] = print) -> Optional[ResumePoint]:
    """find_resume_point of the run folder, or of its latest_folder when that one is newer
    (a save_only_improve launch's epoch after its best), so a stop loses no epoch that did
    not improve, whatever save_only_improve says now."""
    found = find_resume_point(save_dir, warn)
    newest = None if found is None else found[0]
    point = None if found is None else ResumePoint(*found, checkpoint_path(save_dir, newest), newest)
    latest = find_resume_point(latest_folder(save_dir), warn)
    if latest is not None and (newest is None or latest[0] > newest):
        point = ResumePoint(*latest, checkpoint_path(latest_folder(save_dir), latest[0]), newest)
    return point


def remove_checkpoints(save_dir: str | os.PathLike, keep: Iterable[int] = ()) -> None:
    """Delete every checkpoint_N of `save_dir` whose N is not in `keep`, its model file
    first (without it no checkpoint is one: a stop in between leaves an orphan .state,
    which the next save_checkpoint of that epoch replaces), then its .state."""
    keep = set(keep)
    for epoch in list_checkpoints(save_dir):
        if epoch not in keep:
            os.remove(checkpoint_path(save_dir, epoch))
    prune_train_states(save_dir, keep)


def mark_evaluated(save_dir: str | os.PathLike, epoch: int) -> None:
    """Set `evaluated: True` in checkpoint_{epoch}'s train state (atomically): a run that
    saves before evaluating writes False, so a relaunch after a stop in between knows
    that epoch still wants its evaluation. Nothing for a checkpoint without a .state folder."""
    path = os.path.join(state_path(save_dir, epoch), PLAIN_STATE_FILE)
    if os.path.isfile(path):
        atomic_torch_save({**_torch_load(path), "evaluated": True}, path)


def write_launch_config(save_dir: str | os.PathLike, config: dict) -> None:
    """Write (atomically) the config of this launch as YAML: LAUNCH_CONFIG_FILE."""
    _write_text(save_dir, LAUNCH_CONFIG_FILE, yaml.safe_dump(config, sort_keys=False))


def read_launch_config(save_dir: str | os.PathLike) -> dict:
    """The config the launch that saved the run folder's newest epoch recorded, {} when
    there is none or it does not read (a folder of the published code or of an earlier
    version)."""
    try:
        with open(os.path.join(os.fspath(save_dir), LAUNCH_CONFIG_FILE), encoding="utf-8") as f:
            config = yaml.safe_load(f)
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return {}
    return config if isinstance(config, dict) else {}


def wandb_run_id(save_dir: str | os.PathLike) -> str:
    """The wandb run id of this run folder (WANDB_ID_FILE), made and written (atomically)
    at its first launch: every relaunch logs to the same wandb run."""
    path = os.path.join(os.fspath(save_dir), WANDB_ID_FILE)
    try:
        with open(path) as f:
            run_id = f.read().strip()
        if run_id.isalnum() and len(run_id) <= 64:
            return run_id
    except (OSError, UnicodeDecodeError):
        pass
    run_id = secrets.token_hex(4)  # 8 characters of [0-9a-f], as wandb makes its ids
    _write_text(save_dir, WANDB_ID_FILE, run_id)
    return run_id


def write_progress(save_dir: str | os.PathLike, epochs_done: int, newest_checkpoint: Optional[int],
                   best_acc: Optional[float] = None) -> None:
    """Record, atomically, that the run has trained (and evaluated) `epochs_done` epochs
    while its newest checkpoint is `newest_checkpoint` (None: none yet), and the best
    validation accuracy so far. A save_only_improve run's newest checkpoint is its best
    epoch, not its last; another run's checkpoint is saved before its epoch's
    evaluation, so its .state's best_acc leaves that epoch out."""
    record = {"epochs_done": int(epochs_done), "newest_checkpoint": newest_checkpoint, "best_acc": best_acc}
    _write_text(save_dir, PROGRESS_FILE, json.dumps(record))


def _write_text(save_dir: str | os.PathLike, name: str, text: str) -> None:
    """save_dir/name holds `text` (UTF-8), written atomically; the folder made if needed."""
    os.makedirs(save_dir, exist_ok=True)
    atomic_write(os.path.join(os.fspath(save_dir), name), lambda f: f.write(text.encode()))


def _progress_record(save_dir, newest_checkpoint: Optional[int]) -> dict:
    """The progress record, {} when there is none, it does not read, or the folder
    changed since (its newest checkpoint is no longer `newest_checkpoint`: a record of
    another run's folder, or of deleted checkpoints)."""
    try:
        with open(os.path.join(os.fspath(save_dir), PROGRESS_FILE)) as f:
            record = json.load(f)
        matches = record["newest_checkpoint"] == newest_checkpoint
    except (OSError, ValueError, TypeError, KeyError):
        return {}
    return record if matches else {}


def read_progress(save_dir: str | os.PathLike, newest_checkpoint: Optional[int]) -> int:
    """Epochs the run has trained by its progress record (_progress_record), else 0."""
    epochs_done = _progress_record(save_dir, newest_checkpoint).get("epochs_done")
    return epochs_done if isinstance(epochs_done, int) and not isinstance(epochs_done, bool) else 0


def read_recorded_best(save_dir: str | os.PathLike, newest_checkpoint: Optional[int]) -> Optional[float]:
    """The best validation accuracy by the progress record (_progress_record), else None."""
    best = _progress_record(save_dir, newest_checkpoint).get("best_acc")
    return float(best) if isinstance(best, (int, float)) and not isinstance(best, bool) else None


def prune_train_states(save_dir: str | os.PathLike, keep_epochs: Iterable[int]) -> list[str]:
    """Delete every `checkpoint_{N}.state` (file or folder) in `save_dir` whose N is not
    in `keep_epochs`.

    Optimizer states are about twice the model's size; the caller decides which
    checkpoints stay exactly resumable (normally at least the newest). Model files are
    never touched. Returns the paths removed.
    """
    keep = {_check_epoch(e) for e in keep_epochs}
    removed = []
    try:
        entries = list(os.scandir(os.fspath(save_dir)))
    except FileNotFoundError:
        return removed
    for entry in entries:
        epoch = _state_epoch(entry.name)
        if epoch is not None and epoch not in keep and (entry.is_file() or entry.is_dir()):
            _remove_state(entry.path)
            removed.append(entry.path)
    return sorted(removed)
