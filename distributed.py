"""Process-group setup, model sharding and sharded training state for run.py.

One process (`python run.py cfg.yaml`) runs without a process group. Under
`torchrun` (one node or many, through torchrun's own rendezvous) every process joins
a group: NCCL when CUDA is available, gloo on CPU. Training shards the model with
FSDP2 (`fully_shard`) over the model's own transformer block classes, taken from
`_no_split_modules`; `only_eval` replicates rank 0's model on every process
(`replicate_from_main`).

No process but rank 0 ever holds the whole model while training: the others build it
on the meta device, every rank shards it, and `fill_from_main` copies rank 0's weights
into the shards (`broadcast_from_rank0`). The optimizer state is keyed by parameter
name (`optimizer_state`) and saved sharded through DCP (checkpoint.py), so it loads
into any number of processes. `mixed_precision` is FSDP2's MixedPrecisionPolicy (fp32
parameters and optimizer, low-precision compute, fp32 gradient reduction), or
torch.autocast where nothing is sharded.
"""

import contextlib
import datetime
import functools
import logging
import os
import secrets
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader, DistributedSampler

import checkpoint
from cli import UserError

FROM_RANK0 = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
# the `mixed_precision` key's values: the compute dtype (None: no mixed precision)
COMPUTE_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


_joined_gloo = False  # set by setup(): this process started gloo's worker threads
# How long a collective waits for the slowest process. Rank 0 alone reads (or downloads)
# the weights while the others wait in a broadcast (startup.build_and_place): NCCL's
# default of 10 minutes is shorter than an 8B model takes to come from the hub.
PROCESS_GROUP_TIMEOUT = datetime.timedelta(minutes=60)


def setup() -> DistEnv:
    """Join the process group that torchrun describes in the environment, if any."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if device.type == "cpu":
        return_large_blocks_to_the_os()
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=PROCESS_GROUP_TIMEOUT)
        global _joined_gloo
        _joined_gloo = backend == "gloo"
    rank = dist.get_rank() if dist.is_initialized() else 0
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


# glibc's mallopt parameter number, and the size from which blocks are mmapped
M_MMAP_THRESHOLD, MMAP_FROM_BYTES = -3, 1 << 20


def return_large_blocks_to_the_os() -> bool:
    """Training on the CPU frees megabyte-sized tensors every step (gathered blocks and
    gradients under FSDP, AdamW's temporaries). glibc raises its mmap threshold as they
    are freed, so later ones come from the heap, which fragments and is not given back:
    +0.5 GB of peak memory a process for a 200M model under FSDP (bench/host_memory.py).
    A fixed threshold keeps such blocks mmapped, returned on free. False where the C
    library is not glibc (nothing changed)."""
    import ctypes

    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_FROM_BYTES))


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def exit_process(status: int):
    """End the process with exit status `status`; after a gloo group, without Python's
    finalization.

    Gloo's worker threads drop their reference to a collective's tensors just after the
    caller has seen it complete; a tensor that Python has dropped by then is freed on
    that thread, which must take the GIL to do it. Should the interpreter be finalizing
    by then, the thread exits inside a destructor and the process aborts (SIGABRT,
    "terminate called without an active exception") after a run that succeeded: in 3
    of 12 two-process runs of tests/test_scale.py's jobs on a CPU, and in none of 30
    since. destroy_process_group does not stop those threads while FSDP2's state still
    refers to the group. By then files are closed and checkpoints renamed into place;
    what finalization would still do that matters is done here: a wandb run left open
    by an error is finished, the streams flushed."""
    if not _joined_gloo:
        sys.exit(status)
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish(exit_code=status)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def share(obj, env: DistEnv):
    """Rank 0's `obj` (small, picklable) on every process."""
    if not env.distributed:
        return obj
    box = [obj if env.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def check_shared_folder(folder: str, env: DistEnv, wait_s: float = 60.0) -> None:
    """UserError on every process unless all of them see `folder` as rank 0 does: every
    process writes its part of the optimizer state there, and on node-local disks the
    other nodes' parts would land elsewhere, to be found missing only at the resume.
    Rank 0 writes a file of its own; the others look for it, up to `wait_s` seconds (a
    network file system may cache the folder's listing for a while)."""
    if not env.distributed:
        return
    token = share(secrets.token_hex(8) if env.is_main else None, env)
    path = os.path.join(folder, f".shared-check-{token}")
    if env.is_main:
        with contextlib.suppress(OSError):  # not written: every process, rank 0 too, says so below
            os.makedirs(folder, exist_ok=True)
            with open(path, "w") as f:
                f.write(token)
    barrier(env)
    deadline = time.monotonic() + wait_s
    while not _holds(path, token) and time.monotonic() < deadline:
        time.sleep(1.0)
    blind = all_reduce_sum([0.0 if _holds(path, token) else 1.0], env)[0]
    if env.is_main:
        with contextlib.suppress(OSError):
            os.remove(path)
    if blind:
        raise UserError(f"run folder {folder}: {int(blind)} of {env.world_size} processes do not see the file rank 0 "
                        "wrote there: save_path must be one folder every node sees (a shared file system)")


def _holds(path: str, token: str) -> bool:
    try:
        with open(path) as f:
            return f.read() == token
    except OSError:
        return False


def loader(dataset, batch_size: int, collator, env: DistEnv) -> DataLoader:
    """Batches in order; with several processes each takes its equal share (no shuffle:
    the staged data sets are shuffled when built)."""
    sampler = DistributedSampler(dataset, env.world_size, env.rank, shuffle=False) if env.distributed else None
    return DataLoader(dataset, batch_size=batch_size, collate_fn=collator, sampler=sampler)


def to_device(batch: dict, device) -> dict:
    """A collated batch's model inputs on `device` (the example indices stay behind)."""
    return {k: v.to(device) for k, v in batch.items() if k != "idx"}


def all_reduce_sum(values: list, env: DistEnv) -> list:
    """Sum numbers over all processes."""
    if not env.distributed:
        return list(values)
    device = env.device if env.device.type == "cuda" else torch.device("cpu")
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def transformer_blocks(base_causallm) -> list:
    """The model's own transformer blocks: modules of the classes it says must not be
    split (`_no_split_modules`). The unit of sharding, checkpointing and compilation."""
    names = set(getattr(base_causallm, "_no_split_modules", None) or [])
    blocks = [m for m in base_causallm.modules() if type(m).__name__ in names]
    if not blocks:
        raise ValueError(f"{type(base_causallm).__name__} declares no _no_split_modules: no transformer blocks")
    return blocks


def shard(model, base_causallm, compute_dtype=None, reshard_after_forward=True):
    """FSDP2: each transformer block is one unit, the rest (embeddings, head) the root.

    compute_dtype (e.g. torch.bfloat16): FSDP2 mixed precision, parameters kept in their
    own dtype (fp32) and cast for compute, gradients reduced in fp32. `bf16: True`
    instead casts the whole model before this, as published.

    reshard_after_forward=False: a block keeps the weights it gathered for its first pass
    until reshard_blocks frees them (the trainer calls it before each optimizer step and
    after each evaluation): one all-gather per block and optimizer step, where FSDP's
    default gathers a block again for every pass and for every pass's backward (a
    stage-k step runs k + 1 passes). The cost: every block's whole weights, in the
    compute dtype, on every process for the whole step.
    """
    policy = MixedPrecisionPolicy() if compute_dtype is None else \
        MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    for block in transformer_blocks(base_causallm):
        fully_shard(block, mp_policy=policy, reshard_after_forward=reshard_after_forward)
        if not reshard_after_forward:  # the backward of the step's other passes needs them too
            block.set_reshard_after_backward(False)
    fully_shard(model, mp_policy=policy)
    return model


def is_sharded(model) -> bool:
    """Whether `model` is sharded by FSDP (fully_shard), not a whole model or replica."""
    return isinstance(model, FSDPModule)


def reshard_blocks(model) -> None:
    """Free the gathered weights that shard(reshard_after_forward=False) keeps (every FSDP
    unit's; a sharded one is left as it is). Due before the optimizer changes the shards,
    or the next forward would run on the kept, stale copy; and before a new optimizer or
    an optimizer state dict reads model.parameters(), which name the gathered copies
    while they are kept."""
    if not is_sharded(model):  # one process: nothing is sharded
        return
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def fill_from_main(model, source, env: DistEnv) -> None:
    """Give a sharded model built on the meta device rank 0's weights and buffers.

    `source` is the whole model on rank 0 (None elsewhere), same structure. Every rank
    allocates only its shards; rank 0's state dict is broadcast one tensor at a time
    into them. Buffers outside the state dict (rotary `inv_freq`, causal masks) are
    copied from rank 0's model too, rather than recomputed per model type.
    """
    model.to_empty(device=env.device)
    set_model_state_dict(model, source.state_dict() if env.is_main else {}, options=FROM_RANK0)
    source_buffers = dict(source.named_buffers()) if env.is_main else {}
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if env.is_main:
                buffer.copy_(source_buffers[name])
            dist.broadcast(buffer.view(torch.uint8) if buffer.dtype == torch.bool else buffer, src=0)


def autocast_forward(model, compute_dtype, device: torch.device) -> None:
    """Run the model's forward (and generate) under torch.autocast: mixed precision
    without FSDP (one process, or a replica per process for only_eval), parameters and
    optimizer left in fp32. `model` is what the run calls: the Coconut wrapper, whose
    passes call the base model's parts directly, or the base model itself."""
    for name in ("forward", "generate"):
        method = getattr(model, name, None)
        if method is not None:
            setattr(model, name, _in_autocast(method, device.type, compute_dtype))


def _in_autocast(method, device_type: str, dtype):
    @functools.wraps(method)
    def in_autocast(*args, **kwargs):
        with torch.autocast(device_type=device_type, dtype=dtype):
            return method(*args, **kwargs)

    return in_autocast


def replicate_from_main(model, env: DistEnv):
    """only_eval under torchrun: every process gets a whole replica of rank 0's model on its
    device. `model` is rank 0's model there (built and loaded) and the same structure on
    the meta device elsewhere, so no other process reads the weights or holds them in host
    memory; rank 0's parameters and buffers are broadcast one tensor at a time, as DDP's
    constructor broadcasts them. No DDP wrapper: evaluation runs no backward, and DDP
    would reserve a model-sized gradient buffer on every device for nothing."""
    # rank 0's dtypes: a model built from its config keeps some buffers in fp32 (Gemma's
    # embed_scale) that one built on the meta device in bf16 holds in bf16
    dtypes = share({name: tensor.dtype for name, tensor in (*model.named_parameters(), *model.named_buffers())}
                   if env.is_main else None, env)
    if env.is_main:
        model.to(env.device)
    else:
        _to_empty_keeping_ties(model, env.device)
        _cast_to(model, dtypes)
    with torch.no_grad():
        # by rank 0's names, in one order everywhere: moving rank 0's model to a GPU gives a
        # buffer that several modules share a copy per module, which the replicas keep one
        for name in dtypes:
            tensor = _tensor_named(model, name)
            dist.broadcast(tensor.view(torch.uint8) if tensor.dtype == torch.bool else tensor, src=0)
    return model


def _tensor_named(model, name: str) -> torch.Tensor:
    """The parameter or buffer `name` of `model`."""
    try:
        return model.get_parameter(name)
    except AttributeError:
        return model.get_buffer(name)


def _cast_to(model, dtypes: dict) -> None:
    """Each parameter and buffer of `model` in the dtype `dtypes` names for it (tied
    parameters and buffers shared by several modules stay one: `dtypes`, from
    named_parameters and named_buffers, names each under its first name only)."""
    for name, param in model.named_parameters():
        if param.dtype != dtypes[name]:
            param.data = param.data.to(dtypes[name])
    cast = {}  # id(buffer) -> the buffer in its dtype, for every module that holds it
    for module_name, module in model.named_modules():
        for name, buffer in module._buffers.items():
            if buffer is None:
                continue
            if id(buffer) not in cast:
                wanted = dtypes.get(f"{module_name}.{name}" if module_name else name, buffer.dtype)
                cast[id(buffer)] = buffer.to(wanted)
            module._buffers[name] = cast[id(buffer)]


def _to_empty_keeping_ties(model, device) -> None:
    """model.to_empty(device=device), with parameters and buffers shared by several modules
    (GPT-2's tied embedding and head) still one: to_empty gives each module a tensor of its
    own, and rank 0 broadcasts a shared one once, under its first name."""
    places = {}  # (kind, id(tensor)) -> [(module's parameters or buffers, name), ...]
    for module in model.modules():
        for kind, tensors in (("parameter", module._parameters), ("buffer", module._buffers)):
            for name, tensor in tensors.items():
                if tensor is not None:
                    places.setdefault((kind, id(tensor)), []).append((tensors, name))
    model.to_empty(device=device)
    for (first, first_name), *others in places.values():
        for tensors, name in others:
            tensors[name] = first[first_name]


@contextlib.contextmanager
def gathered_root(model):
    """Keep the FSDP root's parameters (embeddings, head) whole while generating.

    Generation calls the embedding outside the root module's forward, where FSDP would
    otherwise leave it sharded; the blocks still gather themselves in their hooks.
    """
    if is_sharded(model):
        model.unshard()
        try:
            yield
        finally:
            model.reshard()
    else:
        yield


def _on_cpu_keeping_ties(state: dict, to_cpu=lambda t: t.detach().cpu()) -> dict:
    """`state` detached on the CPU, tensors that share a storage (tied embeddings) still
    sharing one: .cpu() of each from a GPU would write the tied matrix twice. to_cpu: the
    copy (the tests pass a clone, which copies on a CPU too)."""
    copies, out = {}, {}
    for name, value in state.items():
        key = (value.untyped_storage().data_ptr(), value.storage_offset(), value.shape, value.stride(), value.dtype)
        if key not in copies:
            copies[key] = to_cpu(value)
        out[name] = copies[key]
    return out


def full_model_state(model):
    """The whole (unsharded) state dict for the checkpoint file. One process: the
    model's own tensors (detached, on CPU). FSDP: a checkpoint.StreamedModelState that
    gathers one tensor at a time to rank 0, which writes it and lets it go."""
    if not is_sharded(model):
        return _on_cpu_keeping_ties(model.state_dict())
    sharded = model.state_dict()  # name -> DTensor (parameters) or tensor (buffers)
    owner = {}  # id(parameter) -> its first name: tied weights share one storage in the file
    for name, param in model.named_parameters(remove_duplicate=False):
        owner.setdefault(id(param), name)
    params = dict(model.named_parameters(remove_duplicate=False))
    templates, first = {}, {}
    for name, value in sharded.items():
        tied_to = owner.get(id(params[name])) if name in params else None
        if tied_to is not None and tied_to != name and tied_to in first:
            templates[name] = first[tied_to]
            continue
        templates[name] = first[name] = torch.empty(value.shape, dtype=value.dtype, device="meta")
    is_main = dist.get_rank() == 0

    def tensors():
        for name, value in sharded.items():
            if templates[name] is not first.get(name):
                yield name, None  # a tied name: its storage is written under the first name
                continue
            whole = value.full_tensor() if isinstance(value, DTensor) else value
            yield name, whole.cpu() if is_main else None
            del whole

    return checkpoint.StreamedModelState(templates, tensors)


def optimizer_state(model, optimizer) -> dict:
    """The optimizer state keyed by parameter name (the same in every layout), each
    rank's own shard under FSDP: what DCP saves and reshards."""
    return get_optimizer_state_dict(model, optimizer)


def load_optimizer_state(model, optimizer, state, env: DistEnv) -> None:
    """Restore a saved optimizer state into this run's optimizer, any process count.

    `state` is a checkpoint.ShardedState (DCP, read by every rank), or a whole state
    dict from an earlier version's .state file, on rank 0 ({} elsewhere): keyed by
    parameter name (saved under FSDP) or by parameter index (a lone process's
    `optimizer.state_dict()`), broadcast from rank 0.
    """
    if isinstance(state, checkpoint.ShardedState):
        # The template in this run's layout: get_optimizer_state_dict creates the moments
        # (zero) by a step with zero gradients, but only if no gradient is set; with one
        # left over, the template would be empty and nothing load.
        optimizer.zero_grad(set_to_none=True)
        template = checkpoint.load_sharded(state, get_optimizer_state_dict(model, optimizer))
        set_optimizer_state_dict(model, optimizer, template)
        return
    whole = by_parameter_name(model, state) if env.is_main else {}
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=env.distributed)
    set_optimizer_state_dict(model, optimizer, whole, options=options)


def by_parameter_name(model, state: dict) -> dict:
    """A whole optimizer state dict keyed by parameter name: index keys (the i-th
    parameter of `model.parameters()`, which is how run.py builds AdamW) are renamed."""
    names = [name for name, _ in model.named_parameters()]

    def name_of(key):
        return names[key] if isinstance(key, int) else key

    groups = [{**group, "params": [name_of(k) for k in group["params"]]} for group in state["param_groups"]]
    return {"state": {name_of(k): v for k, v in state["state"].items()}, "param_groups": groups}
