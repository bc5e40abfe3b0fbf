"""Tests for checkpoint.py: layout, weights_only loading, resume choice, crash safety.

All on real files under tmp_path, in one process (DCP without a process group; the
multi-process saves and loads are in test_scale.py). The crash tests kill real writer
processes with SIGKILL at random moments and check that no half-written checkpoint is
ever chosen.
"""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import checkpoint
from checkpoint import (
    CheckpointError,
    ShardedState,
    atomic_torch_save,
    find_resume_point,
    list_checkpoints,
    load_model_state,
    load_sharded,
    load_train_state,
    prune_train_states,
    read_sharded_state,
    save_checkpoint,
)

REPO = Path(__file__).resolve().parent.parent


def model_state(marker=1.0):
    """A small state dict with the awkward parts of a real one (bf16, tied weights)."""
    wte = torch.full((16, 8), float(marker))
    return {
        "base_causallm.transformer.wte.weight": wte,
        "base_causallm.lm_head.weight": wte,  # tied: same storage, as in GPT-2
        "base_causallm.transformer.h.0.attn.bias": torch.ones(4, dtype=torch.bfloat16),
        "base_causallm.transformer.h.0.step": torch.tensor(3, dtype=torch.int64),
    }


def optimizer_state():
    """A real AdamW state dict after one step, keyed by parameter name (as run.py saves it)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Linear(5, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    model(torch.randn(4, 3)).square().sum().backward()
    opt.step()
    return get_optimizer_state_dict(model, opt)


def train_state(**extra):
    """The plain part of a training state."""
    return {
        "epoch": 4,
        "best_acc": 0.375,
        "stage": 1,
        # nested plain values of the kinds a .state may hold
        "extra": {"tuple": (3, [1, 2], 0.5, "s"), "bytes": torch.arange(4, dtype=torch.uint8), "none": None},
        **extra,
    }


def sharded(marker=0.0):
    """The sharded part: an optimizer state and a tensor that identifies the save."""
    return {"optimizer": optimizer_state(), "marker": {"value": torch.full((3,), float(marker))}}


def legacy_save(folder, epoch, model, state):
    """A checkpoint as earlier versions wrote it: the model file and a .state *file*
    (torch.save of the plain values and the whole optimizer state dict)."""
    os.makedirs(folder, exist_ok=True)
    torch.save({**state, "checkpoint_epoch": epoch}, os.path.join(folder, f"checkpoint_{epoch}.state"))
    torch.save(model, os.path.join(folder, f"checkpoint_{epoch}"))


def assert_same(a, b, ordered=True):
    """Deep equality for nested dicts/lists/tuples of tensors and plain values."""
    assert type(a) is type(b) or (isinstance(a, dict) and isinstance(b, dict)), (type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    elif isinstance(a, dict):
        assert list(a.keys()) == list(b.keys()) if ordered else a.keys() == b.keys()
        for k in a:
            assert_same(a[k], b[k], ordered)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y, ordered)
    else:
        assert a == b


def one_line_naming(err, path):
    msg = str(err)
    assert "\n" not in msg, msg
    assert str(path) in msg, msg
    return msg


# ---------------------------------------------------------------------------------
# Round trip and layout


def test_round_trip_model_and_train_state(tmp_path):
    model, state, parts = model_state(2.5), train_state(note="x", losses=[1.0, 0.5]), sharded(7)
    path = save_checkpoint(tmp_path / "run", 3, model, state, parts)

    assert path == str(tmp_path / "run" / "checkpoint_3")
    assert sorted(os.listdir(tmp_path / "run")) == ["checkpoint_3", "checkpoint_3.state"]
    assert_same(load_model_state(path), model)
    folder = str(tmp_path / "run" / "checkpoint_3.state")
    loaded = load_train_state(tmp_path / "run", 3)
    assert loaded.keys() == {*state, *parts}
    assert_same({k: loaded[k] for k in state}, state)
    assert loaded["optimizer"] == ShardedState(folder, "optimizer")
    # the sharded part comes back whole, or into a template laid out for the loader
    assert_same(read_sharded_state(folder), parts, ordered=False)
    save_checkpoint(tmp_path / "run", 4, model, state)  # no sharded part (the optimizer left out)
    assert read_sharded_state(tmp_path / "run" / "checkpoint_4.state") == {}
    template = {"value": torch.zeros(3)}
    assert load_sharded(loaded["marker"], template) is template
    assert torch.equal(template["value"], torch.full((3,), 7.0))
    # Tied weights stay tied (one storage, as torch.save of the model's state dict).
    weights = load_model_state(path)
    wte, head = weights["base_causallm.transformer.wte.weight"], weights["base_causallm.lm_head.weight"]
    assert wte.untyped_storage().data_ptr() == head.untyped_storage().data_ptr()


def test_files_are_plain_and_load_with_weights_only(tmp_path):
    model, state = model_state(), train_state()
    save_checkpoint(tmp_path, 1, model, state, sharded())

    # The model file is exactly the state dict, as the published code wrote it.
    raw_model = torch.load(tmp_path / "checkpoint_1", weights_only=True)
    assert_same(raw_model, model)
    raw_state = torch.load(tmp_path / "checkpoint_1.state" / "train_state.pt", weights_only=True)
    assert isinstance(raw_state, dict)
    for key, value in state.items():
        assert_same(raw_state[key], value)
    assert {".metadata", "__0_0.distcp"} <= set(os.listdir(tmp_path / "checkpoint_1.state"))


@pytest.mark.parametrize("with_empty_tensor", [False, True])
def test_streamed_model_state_writes_the_same_file(tmp_path, with_empty_tensor):
    """Under FSDP the model file is written one tensor at a time (StreamedModelState);
    it must load as torch.save's file of the whole dict does, ties and zip CRCs included.
    A zero-size tensor's record has no data descriptor after it (its CRC is in its header)."""
    import zipfile

    whole = model_state(3.5)
    if with_empty_tensor:  # in the middle: writing after an empty record must not touch the next header
        items = list(whole.items())
        whole = dict(items[:2] + [("base_causallm.transformer.empty", torch.zeros(0, 4))] + items[2:])
    templates, first = {}, {}
    for name, value in whole.items():  # the tied head shares the embedding's template
        twin = next((n for n in first if whole[n] is value), None)
        templates[name] = first[twin] if twin else first.setdefault(name, torch.empty(value.shape, dtype=value.dtype, device="meta"))
    arrived = []

    def tensors():
        for name, value in whole.items():
            arrived.append(name)
            yield name, value if name in first else None

    path = save_checkpoint(tmp_path, 1, checkpoint.StreamedModelState(templates, tensors), train_state())
    assert arrived == list(whole)
    loaded = load_model_state(path)
    assert_same(loaded, whole)
    wte, head = loaded["base_causallm.transformer.wte.weight"], loaded["base_causallm.lm_head.weight"]
    assert wte.untyped_storage().data_ptr() == head.untyped_storage().data_ptr()
    with zipfile.ZipFile(path) as z:
        assert z.testzip() is None  # every record's CRC-32 is right
    torch.save(whole, tmp_path / "plain")
    with zipfile.ZipFile(path) as streamed, zipfile.ZipFile(tmp_path / "plain") as plain:
        data = [n.split("/", 1)[1] for n in plain.namelist() if "/data/" in n]
        assert data == [n.split("/", 1)[1] for n in streamed.namelist() if "/data/" in n]


def test_earlier_versions_state_file_still_loads(tmp_path):
    """Earlier versions wrote `.state` as one file holding the whole optimizer state."""
    params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(3))]
    opt = torch.optim.AdamW(params)
    sum((p**2).sum() for p in params).backward()
    opt.step()
    legacy_save(tmp_path, 2, model_state(2), {"epoch": 2, "best_acc": 0.5, "optimizer": opt.state_dict()})
    epoch, model, state = find_resume_point(tmp_path)
    assert (epoch, state["best_acc"]) == (2, 0.5)
    assert_same(state["optimizer"], opt.state_dict())
    # the next save of that epoch replaces the file by a folder
    save_checkpoint(tmp_path, 2, model_state(3), train_state(), sharded())
    assert (tmp_path / "checkpoint_2.state").is_dir()


def test_save_rejects_values_that_weights_only_cannot_load(tmp_path):
    np = pytest.importorskip("numpy")
    with pytest.raises(TypeError, match=r"best_acc.*numpy"):
        save_checkpoint(tmp_path, 1, model_state(), {"best_acc": np.float64(0.5)})
    with pytest.raises(TypeError, match=r"extra"):
        save_checkpoint(tmp_path, 1, model_state(), {"extra": [1, object()]})
    with pytest.raises(TypeError):
        save_checkpoint(tmp_path, 1, {"w": [1.0]}, None)
    assert os.listdir(tmp_path) == []  # nothing written


def test_list_checkpoints_ignores_other_files(tmp_path):
    for epoch in (10, 2, 1):
        save_checkpoint(tmp_path, epoch, model_state(), train_state())
    for name in ("checkpoint_2.bak", "notes.txt", ".checkpoint_11.tmp-123-abcd",
                 ".checkpoint_11.state.tmp-9-ff", "checkpoint_4.state", "checkpoint_",
                 "checkpoint_x", "checkpoint_05", "checkpoint_-1", "xcheckpoint_7",
                 "checkpoint_7 "):
        (tmp_path / name).write_bytes(b"junk")
    (tmp_path / "checkpoint_9x").mkdir()
    (tmp_path / "checkpoint_12").mkdir()

    assert list_checkpoints(tmp_path) == [1, 2, 10]
    assert list_checkpoints(tmp_path / "missing") == []


def test_find_resume_point_picks_newest(tmp_path):
    for epoch in (1, 3, 2):
        save_checkpoint(tmp_path, epoch, model_state(epoch), train_state(epoch=epoch), sharded(epoch))
    warnings = []
    epoch, model, state = find_resume_point(tmp_path, warn=warnings.append)
    assert (epoch, state["epoch"], warnings) == (3, 3, [])
    assert_same(model, model_state(3))
    assert find_resume_point(tmp_path / "empty", warn=warnings.append) is None
    assert warnings == []


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty", "not_a_dict", "pickled_object"])
def test_find_resume_point_skips_damaged_newest(tmp_path, damage):
    save_checkpoint(tmp_path, 1, model_state(1), train_state(epoch=1))
    save_checkpoint(tmp_path, 2, model_state(2), train_state(epoch=2))
    newest = tmp_path / "checkpoint_2"
    data = newest.read_bytes()
    if damage == "truncate":
        newest.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        newest.write_bytes(os.urandom(len(data)))
    elif damage == "empty":
        newest.write_bytes(b"")
    elif damage == "not_a_dict":
        torch.save([torch.zeros(2)], newest)
    else:  # weights_only must refuse arbitrary objects
        torch.save({"w": torch.zeros(2), "obj": Path("x")}, newest)

    warnings = []
    epoch, model, state = find_resume_point(tmp_path, warn=warnings.append)
    assert epoch == 1 and state["epoch"] == 1
    assert_same(model, model_state(1))
    assert len(warnings) == 1
    one_line_naming(warnings[0], newest)


@pytest.mark.parametrize("unreadable", ["model", "state", "dcp_metadata"])
def test_find_resume_point_stops_at_a_file_it_cannot_read(tmp_path, unreadable):
    """An I/O error is not damage: falling back would train the newer epochs again and
    overwrite the file once it reads again. A real one: reading /proc/self/mem at offset 0
    fails with EIO (Linux)."""
    if not os.path.exists("/proc/self/mem"):
        pytest.skip("needs Linux's /proc/self/mem for a real I/O error")
    save_checkpoint(tmp_path, 1, model_state(1), train_state(epoch=1), sharded(1))
    save_checkpoint(tmp_path, 2, model_state(2), train_state(epoch=2), sharded(2))
    named = tmp_path / {"model": "checkpoint_2", "state": "checkpoint_2.state/train_state.pt",
                        "dcp_metadata": "checkpoint_2.state/.metadata"}[unreadable]
    named.unlink()
    named.symlink_to("/proc/self/mem")
    warnings = []
    with pytest.raises(checkpoint.UnreadableCheckpoint) as info:
        find_resume_point(tmp_path, warn=warnings.append)
    one_line_naming(str(info.value), named)
    assert "cannot be read (Input/output error): fix it, or move it aside" in str(info.value) and warnings == []


def _damage_state(folder, damage):
    """Damage checkpoint_2's .state the given way; returns the path the warning must name."""
    state = folder / "checkpoint_2.state"
    shard, plain = state / "__0_0.distcp", state / "train_state.pt"
    if damage == "truncated_shard":
        shard.write_bytes(shard.read_bytes()[:100])
        return shard
    if damage == "missing_shard":
        shard.unlink()
        return shard
    if damage == "missing_metadata":
        (state / ".metadata").unlink()
        return state
    if damage == "garbage_train_state":
        plain.write_bytes(b"junk")
        return plain
    if damage == "missing_train_state":
        plain.unlink()
        return state
    # an earlier version's .state file, truncated
    legacy = folder / "legacy.state"
    torch.save({"best_acc": 0.5, "checkpoint_epoch": 2}, legacy)
    import shutil

    shutil.rmtree(state)
    state.write_bytes(legacy.read_bytes()[:100])
    legacy.unlink()
    return state


@pytest.mark.parametrize("damage", ["truncated_shard", "missing_shard", "missing_metadata",
                                    "garbage_train_state", "missing_train_state", "truncated_file"])
def test_find_resume_point_skips_checkpoint_with_damaged_state(tmp_path, damage):
    save_checkpoint(tmp_path, 1, model_state(1), train_state(epoch=1), sharded(1))
    save_checkpoint(tmp_path, 2, model_state(2), train_state(epoch=2), sharded(2))
    named = _damage_state(tmp_path, damage)

    warnings = []
    epoch, _, state = find_resume_point(tmp_path, warn=warnings.append)
    assert (epoch, state["epoch"]) == (1, 1)
    assert len(warnings) == 1
    one_line_naming(warnings[0], named)


class _Payload:
    """Unpickling it makes a folder: what a crafted checkpoint file could do instead."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_a_crafted_dcp_metadata_is_refused_without_running_it(tmp_path):
    """torch's own reader unpickles .metadata freely (the premise, checked); ours skips the
    checkpoint with one line and runs nothing."""
    import pickle

    import torch.distributed.checkpoint as dcp

    save_checkpoint(tmp_path, 1, model_state(1), train_state(epoch=1), sharded(1))
    save_checkpoint(tmp_path, 2, model_state(2), train_state(epoch=2), sharded(2))
    state, marker = tmp_path / "checkpoint_2.state", tmp_path / "ran"
    genuine = dcp.FileSystemReader(state).read_metadata()
    (state / ".metadata").write_bytes(pickle.dumps([_Payload(marker), genuine]))
    warnings = []
    epoch, _, _ = find_resume_point(tmp_path, warn=warnings.append)
    assert epoch == 1 and not marker.exists()
    assert "posix.mkdir" in one_line_naming(warnings[0], state) and "refused" in warnings[0]
    with pytest.raises(Exception):
        dcp.FileSystemReader(state).read_metadata()
    assert marker.exists()


def test_dcp_metadata_may_name_paths_of_any_python_but_nothing_else(monkeypatch):
    """The checkpoint id in DCP's metadata is a path object: `pathlib.PosixPath` up to
    Python 3.12, `pathlib._local.PosixPath` on 3.13 (a module faked here on older ones)."""
    import pathlib
    import types

    from safe_dcp import _MetadataUnpickler

    monkeypatch.setitem(sys.modules, "pathlib._local", types.SimpleNamespace(PosixPath=pathlib.PosixPath, open=open))
    allowed = _MetadataUnpickler._allowed
    assert allowed("pathlib", "PosixPath") and allowed("pathlib._local", "PosixPath")
    assert allowed("torch.distributed.checkpoint.metadata", "TensorStorageMetadata") and allowed("torch", "bfloat16")
    assert not allowed("pathlib._local", "open") and not allowed("torch", "load") and not allowed("posix", "system")
    assert not allowed("torch.distributed.checkpoint.format_utils", "dcp_to_torch_save")


def test_a_crafted_plain_value_in_the_sharded_state_is_refused_without_running_it(tmp_path):
    """A non-tensor value (the optimizer's param_groups are those) that unpickles into a
    call: torch's default planner runs it (the premise, checked), ours refuses it."""
    import torch.distributed.checkpoint as dcp

    marker = tmp_path / "ran"
    save_checkpoint(tmp_path, 1, model_state(1), train_state(epoch=1), {"extra": {"value": _Payload(marker)}})
    assert not marker.exists()
    saved = load_train_state(tmp_path, 1)["extra"]
    with pytest.raises(CheckpointError) as refused:
        load_sharded(saved, {"value": None})
    assert not marker.exists()
    assert "UnsafeCheckpointError: extra.value is not made of plain values" in one_line_naming(refused.value, saved.path)
    dcp.load({"extra": {"value": None}}, storage_reader=dcp.FileSystemReader(saved.path), no_dist=True)
    assert marker.exists()


def test_find_resume_point_none_when_all_damaged(tmp_path):
    for epoch in (1, 2):
        (tmp_path / f"checkpoint_{epoch}").write_bytes(b"PK\x03\x04 broken")
    warnings = []
    assert find_resume_point(tmp_path, warn=warnings.append) is None
    assert len(warnings) == 2
    one_line_naming(warnings[0], tmp_path / "checkpoint_2")
    one_line_naming(warnings[1], tmp_path / "checkpoint_1")


def test_published_layout_resumes_without_train_state(tmp_path):
    # As the published code wrote them: torch.save(state_dict, save_dir/checkpoint_N).
    for epoch in (1, 2, 3):
        torch.save({"transformer.wte.weight": torch.full((4, 4), float(epoch))},
                   os.path.join(tmp_path, f"checkpoint_{epoch}"))
    warnings = []
    epoch, model, state = find_resume_point(tmp_path, warn=warnings.append)
    assert (epoch, state, warnings) == (3, None, [])
    assert torch.equal(model["transformer.wte.weight"], torch.full((4, 4), 3.0))
    assert load_train_state(tmp_path, 2) is None


def test_load_model_state_errors_name_the_file(tmp_path):
    cases = {
        "missing": None,
        "garbage": b"not a checkpoint at all",
        "list": [torch.zeros(1)],
        "non_tensor_value": {"w": torch.zeros(1), "step": 3},
        "empty_dict": {},
        "unsafe_object": {"w": torch.zeros(1), "p": Path("x")},
    }
    for name, content in cases.items():
        path = tmp_path / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif content is not None:
            torch.save(content, path)
        with pytest.raises(CheckpointError) as info:
            load_model_state(path)
        assert isinstance(info.value, ValueError)
        assert info.value.path == str(path)
        one_line_naming(info.value, path)


def test_load_train_state(tmp_path):
    save_checkpoint(tmp_path, 1, model_state(), train_state(epoch=1), sharded())
    assert load_train_state(tmp_path, 2) is None  # no such file
    # A .state that belongs to another epoch is refused, not silently paired.
    os.replace(tmp_path / "checkpoint_1.state", tmp_path / "checkpoint_2.state")
    with pytest.raises(CheckpointError, match="epoch 1"):
        load_train_state(tmp_path, 2)
    legacy_save(tmp_path, 4, model_state(), {"best_acc": 0.0})
    os.replace(tmp_path / "checkpoint_4.state", tmp_path / "checkpoint_5.state")
    with pytest.raises(CheckpointError, match="epoch 4"):
        load_train_state(tmp_path, 5)
    (tmp_path / "checkpoint_3.state").write_bytes(b"junk")
    with pytest.raises(CheckpointError) as info:
        load_train_state(tmp_path, 3)
    one_line_naming(info.value, tmp_path / "checkpoint_3.state")


def test_save_without_train_state_drops_stale_state(tmp_path):
    save_checkpoint(tmp_path, 1, model_state(1), train_state(epoch=1), sharded())
    save_checkpoint(tmp_path, 1, model_state(2), None)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint_1"]
    epoch, model, state = find_resume_point(tmp_path)
    assert (epoch, state) == (1, None)
    assert_same(model, model_state(2))


def test_train_state_without_sharded_part(tmp_path):
    """keep_optimizer off (the stage changes, reset_optimizer): plain values only."""
    save_checkpoint(tmp_path, 1, model_state(), train_state(), None)
    assert os.listdir(tmp_path / "checkpoint_1.state") == ["train_state.pt"]
    assert_same(load_train_state(tmp_path, 1), train_state())


def test_prune_train_states(tmp_path):
    for epoch in (1, 2, 3):
        save_checkpoint(tmp_path, epoch, model_state(epoch), train_state(epoch=epoch), sharded(epoch))
    legacy_save(tmp_path, 4, model_state(4), {"epoch": 4})
    (tmp_path / "notes.state").write_bytes(b"keep me")
    removed = prune_train_states(tmp_path, keep_epochs=[3])
    assert removed == [str(tmp_path / f"checkpoint_{e}.state") for e in (1, 2, 4)]
    assert sorted(os.listdir(tmp_path)) == [
        "checkpoint_1", "checkpoint_2", "checkpoint_3", "checkpoint_3.state", "checkpoint_4", "notes.state"]
    assert load_train_state(tmp_path, 3)["epoch"] == 3


# ---------------------------------------------------------------------------------
# Crash safety


def test_atomic_save_failing_mid_write_leaves_old_file(tmp_path, monkeypatch):
    target = tmp_path / "checkpoint_1"
    real_save = torch.save

    def dying_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a zip")  # a partial write, then the "crash"
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.torch, "save", dying_save)
    with pytest.raises(OSError, match="disk full"):
        atomic_torch_save(model_state(1), target)
    assert os.listdir(tmp_path) == []  # no final file, no temp file

    monkeypatch.setattr(checkpoint.torch, "save", real_save)
    atomic_torch_save(model_state(1), target)
    monkeypatch.setattr(checkpoint.torch, "save", dying_save)
    with pytest.raises(OSError):
        atomic_torch_save(model_state(2), target)
    assert os.listdir(tmp_path) == ["checkpoint_1"]
    assert_same(load_model_state(target), model_state(1))  # old content intact


def test_atomic_save_failing_at_rename(tmp_path, monkeypatch):
    def failing_replace(src, dst):
        raise OSError("rename failed")

    monkeypatch.setattr(checkpoint.os, "replace", failing_replace)
    with pytest.raises(OSError, match="rename failed"):
        atomic_torch_save(model_state(), tmp_path / "checkpoint_1")
    assert os.listdir(tmp_path) == []


def test_crash_between_state_and_model_file(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, 1, model_state(1), train_state(epoch=1), sharded(1))
    real = checkpoint.atomic_torch_save
    calls = []

    def crash_on_second_file(obj, path):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed after the .state, before the model file
        real(obj, path)

    monkeypatch.setattr(checkpoint, "atomic_torch_save", crash_on_second_file)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 2, model_state(2), train_state(epoch=2), sharded(2))
    assert calls == [str(tmp_path / ".checkpoint_2.state.tmp-saving" / "train_state.pt"), str(tmp_path / "checkpoint_2")]
    assert list_checkpoints(tmp_path) == [1]
    warnings = []
    epoch, _, state = find_resume_point(tmp_path, warn=warnings.append)
    assert (epoch, state["epoch"], warnings) == (1, 1, [])

    # Re-saving an existing epoch and dying half way must not pair old model + new state.
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 1, model_state(5), train_state(epoch=5), sharded(5))
    assert find_resume_point(tmp_path, warn=warnings.append) is None
    assert warnings == []


def test_crash_while_writing_the_sharded_state(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, 1, model_state(1), train_state(epoch=1), sharded(1))

    def dying_save(state_dict, storage_writer, **kwargs):
        os.makedirs(storage_writer.path, exist_ok=True)
        (storage_writer.path / "__0_0.distcp").write_bytes(b"half a shard")
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.dcp, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 2, model_state(2), train_state(epoch=2), sharded(2))
    assert sorted(os.listdir(tmp_path)) == [".checkpoint_2.state.tmp-saving", "checkpoint_1", "checkpoint_1.state"]
    assert find_resume_point(tmp_path)[0] == 1
    monkeypatch.undo()
    save_checkpoint(tmp_path, 2, model_state(2), train_state(epoch=2), sharded(2))  # clears the leftover
    assert sorted(os.listdir(tmp_path)) == ["checkpoint_1", "checkpoint_1.state", "checkpoint_2", "checkpoint_2.state"]


def test_ctrl_c_inside_dcp_stays_a_keyboard_interrupt(tmp_path, monkeypatch):
    """DCP wraps a Ctrl-C met in its writer (or reader) into its CheckpointException, which
    the scripts' Ctrl-C handling (`interrupted`, exit 130) did not know: a traceback and
    exit 1. The save and the load raise KeyboardInterrupt again."""
    from safe_dcp import SafeReader

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    save_checkpoint(tmp_path, 1, model_state(1), train_state(epoch=1), sharded(1))
    with monkeypatch.context() as patch:
        patch.setattr(checkpoint.dcp.FileSystemWriter, "write_data", interrupted)
        with pytest.raises(KeyboardInterrupt):
            save_checkpoint(tmp_path, 2, model_state(2), train_state(epoch=2), sharded(2))
    monkeypatch.setattr(SafeReader, "read_data", interrupted)
    with pytest.raises(KeyboardInterrupt):
        load_sharded(load_train_state(tmp_path, 1)["marker"], {"value": torch.zeros(3)})


def test_save_removes_leftover_temp_files(tmp_path):
    leftovers = [".checkpoint_3.tmp-123-abcd", ".checkpoint_3.state.tmp-123-beef", ".progress.json.tmp-123-cafe"]
    for name in leftovers:
        (tmp_path / name).write_bytes(b"x" * 100)
    (tmp_path / ".checkpoint_3.state.tmp-saving").mkdir()
    (tmp_path / ".checkpoint_3.state.tmp-saving" / "__1_0.distcp").write_bytes(b"x")
    (tmp_path / ".other.tmp-1").write_bytes(b"not ours")
    save_checkpoint(tmp_path, 4, model_state(), train_state(), sharded())
    assert sorted(os.listdir(tmp_path)) == [".other.tmp-1", "checkpoint_4", "checkpoint_4.state"]


# Imports torch once, then for each folder read on stdin forks a writer that saves in a
# loop until the test kills it (forking saves a torch import per kill).
WRITER = """
import os, sys, torch
sys.path.insert(0, {repo!r})
from checkpoint import save_checkpoint
# A SIGKILL, unlike a power cut, keeps what reached the page cache: fsync only adds time
# here, and skipping it keeps the writer inside torch.save most of the time.
os.fsync = lambda fd: None
n = {numel}
while True:
    folder = sys.stdin.readline().strip()
    if not folder:
        break
    pid = os.fork()
    if pid == 0:
        for k in range(1, 1_000_000):
            model = {{"w": torch.full((n,), k, dtype=torch.int64), "b": torch.full((7,), k)}}
            parts = {{"optimizer": {{"m": torch.full((n,), k, dtype=torch.int64)}}}}
            save_checkpoint(folder, k % 3 + 1, model, {{"k": k}}, parts)  # cycles: rewrites old epochs
            if k == 3:  # every epoch exists: from now on each save rewrites one
                print("ready", os.getpid(), flush=True)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    print("exit", status, flush=True)
"""


@pytest.mark.slow
def test_sigkill_during_saves_never_leaves_a_usable_half_checkpoint(tmp_path):
    numel = 1_000_000  # 8 MB per tensor: a kill usually lands inside a write
    script = tmp_path / "writer.py"
    script.write_text(WRITER.format(repo=str(REPO), numel=numel))
    seed = int(time.time() * 1000) % 100_000
    rng = random.Random(seed)
    folders = [tmp_path / f"run{i}" for i in range(6)]
    proc = subprocess.Popen([sys.executable, str(script)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for folder in folders:  # one writer per folder, each killed at a random moment
            proc.stdin.write(f"{folder}\n")
            proc.stdin.flush()
            ready, pid = proc.stdout.readline().split()
            assert ready == "ready", proc.stderr.read()
            time.sleep(rng.uniform(0.0, 0.4))
            os.kill(int(pid), signal.SIGKILL)
            exited, status = proc.stdout.readline().split()
            assert os.WIFSIGNALED(int(status)) and os.WTERMSIG(int(status)) == signal.SIGKILL
        proc.stdin.close()
        assert proc.wait(timeout=30) == 0, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    for folder in folders:
        context = f"seed {seed}, {folder}: {sorted(os.listdir(folder))}"
        epochs = list_checkpoints(folder)
        assert epochs, context
        for epoch in epochs:  # every final name loads completely, with its own .state
            model = load_model_state(folder / f"checkpoint_{epoch}")
            k = int(model["w"][0])
            assert model["w"].shape == (numel,) and bool((model["w"] == k).all()), context
            assert k % 3 + 1 == epoch, context
            state = load_train_state(folder, epoch)
            saved_k = state and state["k"]
            assert saved_k == k, f"model {k}, state {saved_k}; {context}"
        warnings = []
        epoch, model, state = find_resume_point(folder, warn=warnings.append)
        assert warnings == [], context
        k = int(model["w"][0])
        assert state["k"] == k, context  # the .state belongs to this very model file
        moments = read_sharded_state(state["optimizer"].path)["optimizer"]["m"]
        assert moments.numel() == numel and bool((moments == k).all()), context
        # The next save clears what the killed one left behind.
        save_checkpoint(folder, 9, {"w": torch.zeros(1)}, None)
        assert not [n for n in os.listdir(folder) if ".tmp-" in n], context


def test_progress_record_counts_only_for_the_folder_it_was_written_in(tmp_path):
    """save_only_improve's record of trained epochs holds while the folder's newest
    checkpoint is the one it names; missing, unreadable or stale, it says 0."""
    assert checkpoint.read_progress(tmp_path, None) == 0  # none written
    checkpoint.write_progress(tmp_path, 7, 3)
    assert checkpoint.read_progress(tmp_path, 3) == 7
    assert checkpoint.read_progress(tmp_path, 5) == 0  # newer checkpoints since: another run's record
    assert checkpoint.read_progress(tmp_path, None) == 0  # its checkpoints deleted
    checkpoint.write_progress(tmp_path, 2, None)  # replaced whole
    assert checkpoint.read_progress(tmp_path, None) == 2
    assert [p.name for p in tmp_path.iterdir()] == [checkpoint.PROGRESS_FILE]  # no temporary file left
    (tmp_path / checkpoint.PROGRESS_FILE).write_text('{"epochs_done": 2, "newest')
    assert checkpoint.read_progress(tmp_path, None) == 0
    (tmp_path / checkpoint.PROGRESS_FILE).write_text('{"epochs_done": "2", "newest_checkpoint": null}')
    assert checkpoint.read_progress(tmp_path, None) == 0


def test_a_file_that_is_no_checkpoint_is_named_as_such_not_with_torchs_unsafe_advice(tmp_path):
    """torch.load's own message for these advises weights_only=False (running the file's code)."""
    import types

    not_torch = tmp_path / "data.json"
    not_torch.write_text('[{"question": "q"}]')
    with pytest.raises(CheckpointError, match="data.json: is not a PyTorch checkpoint"):
        load_model_state(not_torch)
    objects = tmp_path / "objects.pt"
    torch.save({"weight": torch.zeros(2), "args": types.SimpleNamespace(lr=1)}, objects)  # a class weights_only refuses
    with pytest.raises(CheckpointError, match="objects.pt: does not load: it holds objects other than tensors") as info:
        load_model_state(objects)
    assert "weights_only=False" not in str(info.value) and "weights_only set to False" not in str(info.value)
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(b"\x80\x02not a pickle at all")  # a pickle's first bytes, then garbage: not blamed on objects
    with pytest.raises(CheckpointError, match="damaged.pt: does not load .damaged: "):
        load_model_state(damaged)


def _tree(folder: Path) -> set:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def test_tidying_a_run_folder_removes_what_stopped_writes_left_and_nothing_else(tmp_path):
    """The temporary files of every atomic write (the small files' too, and the plain
    state's inside a .state folder) and a .state whose model file is gone, in the run
    folder and its .latest; a save removed only its own folder's checkpoint files, and a
    finished run saves no more."""
    from checkpoint import latest_folder, run_folder_leftovers, state_path, tidy_run_folder, write_progress

    save_dir = tmp_path / "run"
    state = {"w": torch.zeros(2)}
    save_checkpoint(str(save_dir), 3, state, {"best_acc": 0.5})
    latest = Path(latest_folder(save_dir))
    save_checkpoint(str(latest), 4, state, {"best_acc": 0.5})
    save_checkpoint(str(latest), 5, state, {"best_acc": 0.5})
    write_progress(save_dir, 5, 3)
    kept = _tree(save_dir)
    os.remove(latest / "checkpoint_4")  # stopped between a checkpoint's model file and its .state
    kept -= {".latest/checkpoint_4"}
    leftovers = [save_dir / ".config.yaml.tmp-12-ab", save_dir / ".wandb_run_id.tmp-12-cd",
                 save_dir / ".progress.json.tmp-12-ef", latest / ".checkpoint_6.tmp-12-01",
                 Path(state_path(save_dir, 3)) / ".train_state.pt.tmp-12-aa"]
    for path in leftovers:
        path.write_bytes(b"half")
    (latest / ".checkpoint_6.state.tmp-saving").mkdir()
    assert Path(state_path(latest, 4)).is_dir()  # the premise: an orphan .state
    assert run_folder_leftovers(save_dir) == sorted(
        [str(p) for p in leftovers] + [str(latest / ".checkpoint_6.state.tmp-saving"), state_path(latest, 4)])
    tidy_run_folder(save_dir)
    assert run_folder_leftovers(save_dir) == []
    assert _tree(save_dir) == {p for p in kept if not p.startswith(".latest/checkpoint_4.state")}
    tidy_run_folder(tmp_path / "no_such_run")  # nothing there: nothing to do
