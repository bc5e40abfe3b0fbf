"""Process-group setup and model sharding for run.py.

One process (`python run.py cfg.yaml`) runs without a process group. Under
`torchrun` (one node or many, through torchrun's own rendezvous) every process joins
a group: NCCL when CUDA is available, gloo on CPU. Training shards the model with
FSDP2 (`fully_shard`) over the model's own transformer block classes, taken from
`_no_split_modules`; `only_eval` replicates it with DDP.
"""

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler

FULL_ON_RANK0 = StateDictOptions(full_state_dict=True, cpu_offload=True)


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


def setup() -> DistEnv:
    """Join the process group that torchrun describes in the environment, if any."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


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


def block_classes(base_causallm) -> set:
    """The model's own transformer block classes (what it says must not be split)."""
    names = set(getattr(base_causallm, "_no_split_modules", None) or [])
    classes = {type(m) for m in base_causallm.modules() if type(m).__name__ in names}
    if not classes:
        raise ValueError(f"{type(base_causallm).__name__} declares no _no_split_modules: cannot shard it")
    return classes


def shard(model, base_causallm):
    """FSDP2: each transformer block is one unit, the rest (embeddings, head) the root.

    `bf16: True` casts the whole model before this, as published (no mixed precision).
    """
    blocks = tuple(block_classes(base_causallm))
    for module in base_causallm.modules():
        if isinstance(module, blocks):
            fully_shard(module)
    fully_shard(model)
    return model


def replicate(model, env: DistEnv):
    """DDP for evaluation only (as published: no sharding bugs at eval time)."""
    if not env.distributed:
        return model
    return DDP(model, device_ids=[env.local_rank] if env.device.type == "cuda" else None)


def unwrap(model):
    return model.module if isinstance(model, DDP) else model


@contextlib.contextmanager
def gathered_root(model):
    """Keep the FSDP root's parameters (embeddings, head) whole while generating.

    Generation calls the embedding outside the root module's forward, where FSDP would
    otherwise leave it sharded; the blocks still gather themselves in their hooks.
    """
    model = unwrap(model)
    if isinstance(model, FSDPModule):
        model.unshard()
        try:
            yield
        finally:
            model.reshard()
    else:
        yield


def full_model_state(model) -> dict:
    """The whole (unsharded) state dict on CPU, on rank 0; empty on other ranks."""
    model = unwrap(model)
    if isinstance(model, FSDPModule):
        return get_model_state_dict(model, options=FULL_ON_RANK0)
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def full_optimizer_state(model, optimizer) -> dict:
    if isinstance(unwrap(model), FSDPModule):
        return get_optimizer_state_dict(unwrap(model), optimizer, options=FULL_ON_RANK0)
    return optimizer.state_dict()


def load_optimizer_state(model, optimizer, state: dict, env: DistEnv) -> None:
    if isinstance(unwrap(model), FSDPModule):
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        set_optimizer_state_dict(unwrap(model), optimizer, state if env.is_main else {}, options=options)
    else:
        optimizer.load_state_dict(state)


def set_gradient_sync(model, sync: bool) -> None:
    """Skip FSDP's reduce-scatter on accumulation micro-batches that do not step."""
    inner = unwrap(model)
    if isinstance(inner, FSDPModule):
        inner.set_requires_gradient_sync(sync)
