"""Reading torch.distributed.checkpoint (DCP) folders without running code from them.

Torch's own DCP reader unpickles a folder's `.metadata` with plain `pickle` and the
non-tensor values (the optimizer's param_groups) with `torch.load(weights_only=False)`:
a crafted `.state` folder in a run directory would run its code as soon as a run
looks for its resume point. checkpoint.py reads every `.state` folder through
`SafeReader` and the planners below instead, which refuse anything but what DCP's
own metadata and plain values are made of (DESIGN §9: loading a checkpoint cannot run
code).

    dcp.load(state, storage_reader=SafeReader(folder), planner=SafeLoadPlanner())
"""

from __future__ import annotations

import io
import os
import pathlib
import pickle
import sys

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, _EmptyStateDictLoadPlanner

# the metadata's own types: dataclasses and enums, whose construction does nothing else
METADATA_MODULES = ("torch.distributed.checkpoint.metadata",)
ALLOWED_GLOBALS = {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # a layout from its name
    ("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "slice"),
}


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A DCP file names something a checkpoint is not made of."""


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        found = super().find_class(module, name) if self._allowed(module, name) else None
        if found is None:
            raise UnsafeCheckpointError(f"its metadata names {module}.{name}, which no checkpoint is made of "
                                        "(refused: unpickling it could run code)")
        return found

    @staticmethod
    def _allowed(module: str, name: str) -> bool:
        if (module, name) in ALLOWED_GLOBALS:
            return True
        if module == "torch":  # dtypes (torch.float32, ...), nothing else of torch's namespace
            return isinstance(getattr(torch, name, None), torch.dtype)
        found = getattr(sys.modules.get(module), name, None)
        if module in METADATA_MODULES:  # classes only: a module function could do anything
            return isinstance(found, type)
        if module == "pathlib" or module.startswith("pathlib."):  # the checkpoint id (pathlib._local on Python 3.13)
            return isinstance(found, type) and issubclass(found, pathlib.PurePath)
        return False


def check_metadata_file(path: str | os.PathLike) -> None:
    """UnsafeCheckpointError unless the pickle at `path` holds only metadata types."""
    with open(path, "rb") as f:
        _MetadataUnpickler(f).load()


class SafeReader(dcp.FileSystemReader):
    """DCP's file reader, its metadata checked by a restricted unpickler before torch's
    reader unpickles it."""

    def read_metadata(self, *args, **kwargs):
        rank = kwargs.get("rank")
        check_metadata_file(os.path.join(self.path, ".metadata" if rank is None else f"__{rank}.metadata"))
        return super().read_metadata(*args, **kwargs)


class _SafeBytes:
    """A planner mixin: each non-tensor value is loaded with weights_only=True first."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        data = value.getvalue()
        try:
            torch.load(io.BytesIO(data), weights_only=True)
        except pickle.UnpicklingError as e:
            lines = [line for line in str(e).splitlines() if "GLOBAL" in line] or [str(e).splitlines()[0]]
            raise UnsafeCheckpointError(f"{read_item.dest_index.fqn} is not made of plain values ({lines[0].strip()}); "
                                        "refused: unpickling it could run code") from None
        super().load_bytes(read_item, io.BytesIO(data))


class SafeLoadPlanner(_SafeBytes, DefaultLoadPlanner):
    """DCP's default planner (fill the given state dict), plain values only."""


class SafeEmptyLoadPlanner(_SafeBytes, _EmptyStateDictLoadPlanner):
    """DCP's planner that takes every saved key into an empty dict, plain values only."""
