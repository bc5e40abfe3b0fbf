"""Checkpoint files: crash-safe writing, listing, loading and resuming (DESIGN §5, §9).

Layout of a run folder (`save_path/name/`), compatible with the published code:

    checkpoint_{epoch}         the model weights: a plain state dict (name -> tensor),
                               written with torch.save exactly as the published code did,
                               so `torch.load(path, weights_only=True)` reads it. Keys are
                               `base_causallm.*` for coconut runs, the HF model's own
                               keys otherwise.
    checkpoint_{epoch}.state   everything else an exact resume needs (optimizer state,
                               best accuracy, ...): a dict of tensors and
                               plain python values, also readable with weights_only=True.
                               Folders written by the published code have none; such
                               checkpoints still resume, without that state.

What this module fixes in the published code (DESIGN §9):
- Every file is written to a temporary name in the same folder, fsynced, then renamed
  onto its final name (`atomic_torch_save`), so a kill during a save never leaves a
  half-written `checkpoint_N`; the `.state` file is written before the model file, so a
  model file present means its `.state` (if any) was complete before it.
- Only files named exactly `checkpoint_{int}` count as checkpoints; anything else in
  the folder (notes, backups, temporary files, directories) is ignored.
- Loading uses `weights_only=True`; a file that does not load is reported with one line
  naming it, and `find_resume_point` then falls back to the next older checkpoint.

It knows nothing of FSDP, ranks, configs or the model: callers hand it plain (CPU)
state dicts and decide which rank writes; run.py keeps the .state files of the
newest checkpoints only (`prune_train_states`). Depends on torch and the standard
library. Resumes need no RNG state: run.py reseeds every epoch from (seed, epoch).
"""

from __future__ import annotations

import collections
import os
import re
import secrets
from typing import Any, Callable, Iterable, Mapping, Optional

import torch

from cli import UserError

__all__ = [
    "CheckpointError",
    "atomic_torch_save",
    "checkpoint_path",
    "find_resume_point",
    "list_checkpoints",
    "load_model_state",
    "load_train_state",
    "prune_train_states",
    "save_checkpoint",
    "state_path",
]

STATE_SUFFIX = ".state"
# Written into every .state file by save_checkpoint (and stripped by load_train_state)
# to tie it to its model file's epoch.
_EPOCH_KEY = "checkpoint_epoch"

_CHECKPOINT_RE = re.compile(r"checkpoint_(0|[1-9][0-9]*)")
# Temporary files of atomic_torch_save for checkpoint files: `.checkpoint_3.tmp-...`,
# `.checkpoint_3.state.tmp-...`.
_TEMP_RE = re.compile(r"\.checkpoint_[0-9]+(\.state)?\.tmp-.*", re.DOTALL)


class CheckpointError(UserError):
    """A checkpoint file that cannot be used; the message is one line naming the file."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = os.fspath(path)
        self.reason = " ".join(str(reason).split()) or "unknown error"
        super().__init__(f"checkpoint {self.path}: {self.reason}")


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
    path = os.fspath(path)
    folder, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(folder, f".{name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    # os.open rather than tempfile.mkstemp: mkstemp creates mode 0600 files, and the
    # checkpoint should get the usual permissions (0666 less the umask).
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(folder)


def _fsync_dir(folder: str) -> None:
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


def save_checkpoint(
    save_dir: str | os.PathLike,
    epoch: int,
    model_state: Mapping[str, torch.Tensor],
    train_state: Optional[Mapping[str, Any]] = None,
) -> str:
    """Write `checkpoint_{epoch}` (and `checkpoint_{epoch}.state`) under `save_dir`.

    `model_state` is a plain state dict (str -> tensor; gather it to CPU first).
    `train_state` is whatever an exact resume needs (e.g. {"epoch", "best_acc",
    "optimizer"}), made only of tensors and plain
    python values so it loads with weights_only=True; this is checked before anything
    is written (TypeError naming the bad entry). With `train_state` None only the
    model file is written, and a stale `.state` of that epoch is removed.

    The `.state` file is written first, then the model file, both atomically, so a
    model file present means its `.state` was complete before it. An existing
    `checkpoint_{epoch}` is deleted before the new `.state` is written, so the two
    always come from the same save (a save that dies half way loses that epoch, and
    resume falls back to the one before). Leftover temporary files of killed earlier
    saves in `save_dir` are removed first (they can be as big as a model). Creates
    `save_dir` if missing. Returns the model file's path.
    """
    _check_epoch(epoch)
    _check_model_state(model_state)
    if train_state is not None:
        if not isinstance(train_state, Mapping):
            raise TypeError(f"train_state must be a dict, got {type(train_state).__name__}")
        if _EPOCH_KEY in train_state and train_state[_EPOCH_KEY] != epoch:
            raise ValueError(f"train_state[{_EPOCH_KEY!r}] is reserved for the epoch ({epoch})")
        _check_weights_only_safe(train_state, "train_state")
    save_dir = os.fspath(save_dir)
    os.makedirs(save_dir, exist_ok=True)
    _remove_temp_files(save_dir)
    mpath, spath = checkpoint_path(save_dir, epoch), state_path(save_dir, epoch)
    # Re-saving an epoch: drop the old model file first, so that a kill between the two
    # writes below cannot pair the old model with the new .state (resume then falls
    # back to the previous epoch instead).
    if _unlink(mpath):
        _fsync_dir(save_dir)
    if train_state is not None:
        atomic_torch_save({**dict(train_state), _EPOCH_KEY: epoch}, spath)
    elif _unlink(spath):
        _fsync_dir(save_dir)
    atomic_torch_save(model_state, mpath)
    return mpath


def _unlink(path: str) -> bool:
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True


def _remove_temp_files(save_dir: str) -> None:
    """Remove temporary checkpoint files left by killed saves (one writer per folder)."""
    for entry in os.scandir(save_dir):
        if _TEMP_RE.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
            _unlink(entry.path)


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
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, unpickling refused, I/O error, ...
        first_line = next((ln for ln in str(e).splitlines() if ln.strip()), "")
        reason = f"does not load ({type(e).__name__}: {first_line[:200]})"
        raise CheckpointError(path, reason) from e


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

    Raises CheckpointError if the `.state` file exists but does not load, is not a
    dict, or was written for another epoch.
    """
    path = state_path(save_dir, epoch)
    if not os.path.isfile(path):
        return None
    obj = _torch_load(path)
    if not isinstance(obj, dict):
        raise CheckpointError(path, f"holds a {type(obj).__name__}, not a dict")
    saved_epoch = obj.pop(_EPOCH_KEY, epoch)
    if saved_epoch != epoch:
        raise CheckpointError(path, f"was written for epoch {saved_epoch!r}, not {epoch}")
    return obj


def find_resume_point(
    save_dir: str | os.PathLike, warn: Callable[[str], Any] = print
) -> Optional[tuple[int, dict[str, torch.Tensor], Optional[dict[str, Any]]]]:
    """The newest usable checkpoint in `save_dir`: (epoch, model_state, train_state).

    Tries checkpoints newest first; one whose model file, or whose `.state` file when
    present, does not load is skipped with one `warn` line naming it. train_state is
    None for a checkpoint without a `.state` file (e.g. written by the published code).
    Returns None if there is no usable checkpoint.
    """
    for epoch in reversed(list_checkpoints(save_dir)):
        try:
            model_state = load_model_state(checkpoint_path(save_dir, epoch))
            train_state = load_train_state(save_dir, epoch)
        except CheckpointError as e:
            warn(f"Skipping unusable {e}")
            continue
        return epoch, model_state, train_state
    return None


def prune_train_states(save_dir: str | os.PathLike, keep_epochs: Iterable[int]) -> list[str]:
    """Delete every `checkpoint_{N}.state` in `save_dir` whose N is not in `keep_epochs`.

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
        if not entry.name.endswith(STATE_SUFFIX):
            continue
        match = _CHECKPOINT_RE.fullmatch(entry.name[: -len(STATE_SUFFIX)])
        if match and int(match.group(1)) not in keep and entry.is_file():
            os.unlink(entry.path)
            removed.append(entry.path)
    return sorted(removed)
