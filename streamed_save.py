"""Writing a torch.save file of a state dict that no process holds whole.

Under FSDP the weights are gathered one tensor at a time; `write_streamed` puts each
into its place in the file as it arrives, so rank 0 never holds the whole model.
torch.save runs first under `skip_data` on empty (never resident) tensors, which lays
out the zip file with room for every storage; each tensor's bytes then go to its
storage's record, and its CRC-32 into the zip's tables. The result is a torch.save file
like any other (`torch.load(path, weights_only=True)` reads it). checkpoint.py makes it
atomic.
"""

from __future__ import annotations

import os
import struct
import zipfile
import zlib
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch


@dataclass
class StreamedModelState:
    """A model state dict that no process holds whole: written one tensor at a time.

    `templates`: name -> a tensor with the saved shape and dtype (e.g. on the meta
    device), in the order of the state dict; names given the same template object
    share one storage in the file (tied weights, as torch.save of a state dict keeps
    them). `tensors()`: called on every process at once (it may gather, a collective);
    yields each name of `templates` once, in order, with its whole value on CPU on
    rank 0, and None elsewhere (or for a name whose storage an earlier name holds).
    """

    templates: dict
    tensors: Callable[[], Iterator[tuple[str, Optional[torch.Tensor]]]]


def write_streamed(state: StreamedModelState, path: str) -> None:
    """The torch.save file of the streamed state dict at `path`, flushed and fsynced."""
    storages = {}  # id(template) -> empty tensor, one per storage of the file
    empties = {name: storages.setdefault(id(t), torch.empty(t.shape, dtype=t.dtype)) for name, t in state.templates.items()}
    with torch.serialization.skip_data():
        torch.save(empties, path)
    offsets = _storage_offsets(path, [t.untyped_storage().nbytes() for t in storages.values()])
    first_name = {id(t): n for n, t in reversed(list(empties.items()))}  # the name that writes each storage
    order = {id(t): i for i, t in enumerate(storages.values())}
    crcs = {}  # record name -> CRC-32 of its bytes
    with open(path, "r+b") as f:
        for key, tensor in state.tensors():
            empty = empties[key]
            if first_name[id(empty)] != key:
                continue
            if tensor is None or tensor.shape != empty.shape or tensor.dtype != empty.dtype:
                raise ValueError(f"streamed model state: {key} is not a {empty.dtype} tensor of shape {tuple(empty.shape)}")
            data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
            f.seek(offsets[order[id(empty)]])
            f.write(data)
            crcs[f"data/{order[id(empty)]}"] = zlib.crc32(data)
        if len(crcs) != len(storages):
            raise ValueError("streamed model state: some tensors never arrived")
        _write_crcs(f, path, crcs)
        f.flush()
        os.fsync(f.fileno())


def _write_crcs(f, path: str, crcs: dict) -> None:
    """Put each record's CRC-32 where zip readers look for it (skip_data leaves 0): the
    data descriptor after its data, and its central directory entry."""
    with zipfile.ZipFile(path) as z:
        central, infos = z.start_dir, z.infolist()
    for info in infos:
        crc = crcs.get(info.filename.split("/", 1)[1])
        if crc is None:
            continue
        f.seek(info.header_offset + 6)
        (flags,) = struct.unpack("<H", f.read(2))
        if not flags & 0x08:  # no data descriptor (torch writes none for an empty record): the local header's CRC
            f.seek(info.header_offset + 14)
            f.write(struct.pack("<I", crc))
            continue
        f.seek(info.header_offset + 26)
        name_length, extra_length = struct.unpack("<HH", f.read(4))
        descriptor = info.header_offset + 30 + name_length + extra_length + info.compress_size
        f.seek(descriptor)
        has_signature = f.read(4) == b"PK\x07\x08"
        f.seek(descriptor + (4 if has_signature else 0))
        f.write(struct.pack("<I", crc))
    position = central
    for info in infos:
        f.seek(position)
        header = f.read(46)
        if header[:4] != b"PK\x01\x02":
            raise RuntimeError(f"{path}: unexpected zip central directory")
        name_length, extra_length, comment_length = struct.unpack("<HHH", header[28:34])
        crc = crcs.get(f.read(name_length).decode("utf-8").split("/", 1)[1])
        if crc is not None:
            f.seek(position + 16)
            f.write(struct.pack("<I", crc))
        position += 46 + name_length + extra_length + comment_length


def _storage_offsets(path: str, sizes: list) -> list:
    """File offsets of the data of storages 0, 1, ... of a torch.save zip file, checked
    against their expected sizes (torch numbers storages in the order it meets them)."""
    with zipfile.ZipFile(path) as z:
        records = {info.filename.split("/", 1)[1]: info for info in z.infolist()}
    with open(path, "rb") as f:
        reader = torch._C.PyTorchFileReader(f)
        offsets = []
        for i, size in enumerate(sizes):
            info = records.get(f"data/{i}")
            if info is None or info.file_size != size:
                raise RuntimeError(f"{path}: torch.save laid out storage {i} unexpectedly")
            offsets.append(reader.get_record_offset(f"data/{i}"))
    return offsets


