"""Training at scale on CPU: sharded training state, resume on another process count,
meta-device builds, mixed precision, activation checkpointing (docs/LARGE_MODELS.md).

Multi-process parts use real torch.distributed (gloo) in processes started with
torch.multiprocessing; the run.py end-to-end run (torchrun 2 -> python -> torchrun 2)
is marked slow. Tiny everything: a 2-layer 64-wide GPT-2 and fixed synthetic batches
in which every example has the same number of supervised tokens, so the mean loss of a
global batch equals the mean of the per-process means and runs with different process
counts are comparable step by step.
"""

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
import yaml

import checkpoint
import distributed
import trainer
from coconut import Coconut
from distributed import DistEnv
from modeling import build_model, checkpoint_blocks
from tiny import make_gpt2, make_llama
from utils import Config

VOCAB = 64
LATENT, START, END, EOS = 61, 62, 63, 0
SEQ, GLOBAL_BATCH, STEPS, SAVED_AFTER = 14, 4, 3, 2


# ------------------------------------------------------------------ batches
def coconut_batch(rows, seed=0):
    """`rows` examples of SEQ tokens with 3 latents in the same columns (MyCollator's
    layout) and the same supervised tokens count in every row."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, LATENT, (rows, SEQ), generator=g)
    ids[:, 4], ids[:, 5:8], ids[:, 8] = START, LATENT, END
    labels = ids.clone()
    labels[:, :9] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def rank_share(batch, rank, world_size):
    return {k: v[rank::world_size] for k, v in batch.items()}


def loss_and_grads(model, batch, seed=0):
    torch.manual_seed(seed)  # dropout: the same masks in both runs
    model.train()
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


# ------------------------------------------------------------------ activation checkpointing
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_activation_checkpointing_gives_the_same_loss_and_gradients(arch):
    """Latent passes write the KV cache in every block; the recomputed blocks must see
    the cache as it was, or the gradients (or the recomputation's shapes) differ."""
    make = make_gpt2 if arch == "gpt2" else make_llama
    plain = Coconut(make(VOCAB), LATENT, START, END, EOS)
    checkpointed = Coconut(make(VOCAB), LATENT, START, END, EOS)
    assert checkpoint_blocks(checkpointed.base_causallm) == 2
    batch = coconut_batch(2)
    loss, grads = loss_and_grads(plain, batch)
    ac_loss, ac_grads = loss_and_grads(checkpointed, batch)
    torch.testing.assert_close(ac_loss, loss, rtol=1e-6, atol=1e-6)
    assert grads.keys() == ac_grads.keys()
    for name in grads:
        torch.testing.assert_close(ac_grads[name], grads[name], rtol=1e-5, atol=1e-6, msg=name)
    # premise: there were latent passes, and the checkpointed blocks kept fewer tensors
    assert int((batch["input_ids"] == LATENT).sum()) == 6


def saved_tensor_bytes(model, batch):
    """Bytes of the tensors autograd keeps for the backward pass (distinct storages)."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**batch).loss.backward()
    return sum(seen.values())


def test_activation_checkpointing_keeps_fewer_activations():
    plain = Coconut(make_gpt2(VOCAB, n_layer=4), LATENT, START, END, EOS).train()
    checkpointed = Coconut(make_gpt2(VOCAB, n_layer=4), LATENT, START, END, EOS).train()
    checkpoint_blocks(checkpointed.base_causallm)
    batch = coconut_batch(4)
    assert saved_tensor_bytes(checkpointed, batch) < 0.5 * saved_tensor_bytes(plain, batch)


# ------------------------------------------------------------------ mixed precision, one process
def test_autocast_bf16_matches_fp32_within_bf16_tolerance():
    reference = Coconut(make_gpt2(VOCAB), LATENT, START, END, EOS)
    mixed = Coconut(make_gpt2(VOCAB), LATENT, START, END, EOS)
    distributed.autocast_forward(mixed.base_causallm, torch.bfloat16, torch.device("cpu"))
    batch = coconut_batch(2)
    loss, grads = loss_and_grads(reference, batch)
    mixed_loss, mixed_grads = loss_and_grads(mixed, batch)
    # the parameters and their gradients stay fp32; only the compute is bf16
    assert all(p.dtype == torch.float32 for p in mixed.parameters())
    assert all(g.dtype == torch.float32 for g in mixed_grads.values())
    assert mixed_loss != loss  # premise: the compute really was bf16
    torch.testing.assert_close(mixed_loss, loss, rtol=2e-2, atol=2e-2)
    total = torch.cat([g.flatten() for g in grads.values()])
    mixed_total = torch.cat([g.flatten() for g in mixed_grads.values()])
    assert torch.nn.functional.cosine_similarity(total, mixed_total, dim=0) > 0.99
