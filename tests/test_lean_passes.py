"""Lean one-column passes (lean_passes.py) against Hugging Face's forward.

The lean passes run the same operations on the same values in the same order, so the
reference is the same Coconut with `lean_passes = False`, where every pass goes through
Hugging Face's modules, and the comparison is exact: losses and gradients bit for bit,
with dropout on (the same random numbers in the same order) and under bf16 autocast
(the same casts), and the same greedy tokens. That Coconut itself equals the naive
algorithm is tests/test_coconut.py's work (lean passes on, by default).
"""

import pickle
import random

import pytest
import torch
import torch.multiprocessing as mp
from builders import free_port, run_as_rank
from test_coconut import END, EOS, LATENT, START, VOCAB, collate, make_example
from tiny import make_gpt2, make_llama
from transformers.pytorch_utils import Conv1D

import distributed
import lean_passes
from coconut import Coconut
from modeling import checkpoint_blocks, fuse_gelu

GPT2_VARIANTS = {
    "GPT2Config's defaults (dropout 0.1)": {},
    "scaled by layer, wider mlp, relu": dict(scale_attn_by_inverse_layer_idx=True, n_inner=96,
                                             activation_function="relu"),
    "unscaled attention, no dropout": dict(scale_attn_weights=False, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
}


def latent_batch(seed=0):
    """Rows with 6 and 3 latents: the passes are the first piece, 5 one-column passes, the rest."""
    rng = random.Random(seed)
    return collate([make_example(rng, 6, 5, 2), make_example(rng, 3, 7, 3), make_example(rng, 6, 3, 4)])


def loss_and_grads(coconut, batch, lean: bool, seed=0):
    coconut.lean_passes = lean
    coconut.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # dropout: both runs draw from the same state
    loss = coconut(**batch, return_logits=False).loss
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in coconut.parameters()]


def assert_bitwise_equal(got, want):
    (got_loss, got_grads), (want_loss, want_grads) = got, want
    assert torch.equal(got_loss, want_loss), (got_loss.item(), want_loss.item())
    assert all(torch.equal(g, w) for g, w in zip(got_grads, want_grads))


@pytest.mark.parametrize("variant", GPT2_VARIANTS)
def test_lean_passes_train_as_hugging_faces_forward_bit_for_bit(variant):
    coconut = Coconut(make_gpt2(VOCAB, **GPT2_VARIANTS[variant]), LATENT, START, END, EOS).train()
    assert coconut.lean_family is lean_passes.GPT2
    batch = latent_batch()
    lean = loss_and_grads(coconut, batch, lean=True)
    assert_bitwise_equal(lean, loss_and_grads(coconut, batch, lean=False))
    if variant.startswith("GPT2Config's defaults"):  # premise: dropout drew random numbers (another seed, another loss)
        assert not torch.equal(lean[0], loss_and_grads(coconut, batch, lean=True, seed=1)[0])


def test_lean_passes_under_bf16_autocast_cast_as_hugging_faces_forward():
    coconut = Coconut(make_gpt2(VOCAB), LATENT, START, END, EOS).train()
    fuse_gelu(coconut.base_causallm)  # as run.py trains: the activation is the module the lean pass calls
    batch = latent_batch(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lean = loss_and_grads(coconut, batch, lean=True)
        assert_bitwise_equal(lean, loss_and_grads(coconut, batch, lean=False))
    assert not torch.equal(lean[0], loss_and_grads(coconut, batch, lean=True)[0])  # premise: bf16 changed it


@pytest.mark.parametrize("variant", GPT2_VARIANTS)
def test_lean_decoding_gives_hugging_faces_tokens(variant):
    coconut = Coconut(make_gpt2(VOCAB, seed=2, **GPT2_VARIANTS[variant]), LATENT, START, END, EOS).eval()
    rng = random.Random(4)
    prompts = [make_example(rng, n, q, 1)[0][:-2] for n, q in ((6, 4), (3, 7), (0, 5))]  # question and thoughts
    batch = collate([(p, p) for p in prompts])
    outputs = {}
    for lean in (True, False):
        coconut.lean_passes = lean
        with torch.no_grad():
            outputs[lean] = coconut.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=12)
    assert torch.equal(outputs[True], outputs[False])
    assert outputs[True].shape[1] > batch["input_ids"].shape[1] + 4  # premise: it decoded tokens


def block_calls(coconut, run) -> dict:
    """How often run() calls each GPT-2 block, and Hugging Face's attention inside it."""
    counts = {"block": 0, "attention": 0}
    block = coconut.base_causallm.transformer.h[0]
    hooks = [block.register_forward_pre_hook(lambda *args: counts.__setitem__("block", counts["block"] + 1)),
             block.attn.register_forward_pre_hook(lambda *args: counts.__setitem__("attention", counts["attention"] + 1))]
    try:
        run()
    finally:
        for hook in hooks:
            hook.remove()
    return counts


@pytest.mark.parametrize("lean", [True, False])
def test_one_column_passes_call_the_blocks_but_not_hugging_faces_block_forward(lean):
    """Training with 6 latents: 7 passes call every block as a module (its hooks, FSDP's
    included, run); Hugging Face's block forward runs only in the first piece and the rest
    (the one-column passes are lean). Decoding: each new token's pass is lean too."""
    coconut = Coconut(make_gpt2(VOCAB), LATENT, START, END, EOS)
    coconut.lean_passes = lean
    rng = random.Random(7)
    batch = collate([make_example(rng, 6, 5, 2)])
    assert block_calls(coconut, lambda: coconut(**batch).loss.backward()) == {"block": 7, "attention": 7 - 5 * lean}
    prompt = batch["input_ids"][:, :-3]  # the question and its thoughts
    coconut.eval()
    with torch.no_grad():
        counts = block_calls(coconut, lambda: coconut.generate(prompt, max_new_tokens=4))
    # the prompt's 7 passes, as in training, then one pass per new token after the first
    assert counts == {"block": 7 + 3, "attention": 10 - 8 * lean}


def test_checkpointed_blocks_recompute_their_lean_passes_too(monkeypatch):
    """modeling.checkpoint_blocks wraps the block forward the lean path runs in: the backward
    recomputes every pass, the one-column ones included (4 projections per block and pass),
    and the gradients stay Hugging Face's."""
    plain = Coconut(make_gpt2(VOCAB), LATENT, START, END, EOS).train()
    checkpointed = Coconut(make_gpt2(VOCAB), LATENT, START, END, EOS).train()
    checkpoint_blocks(checkpointed.base_causallm)
    rng = random.Random(7)
    batch = collate([make_example(rng, 6, 5, 2)])  # 7 passes
    checkpointed.lean_passes = True
    loss = checkpointed(**batch).loss
    calls, addmm = [], torch.addmm  # every projection, Hugging Face's (Conv1D) and the lean pass's
    monkeypatch.setattr(torch, "addmm", lambda *args, **kwargs: calls.append(1) or addmm(*args, **kwargs))
    loss.backward()
    monkeypatch.undo()
    assert len(calls) == 4 * 2 * 7  # 2 blocks
    assert_bitwise_equal(loss_and_grads(checkpointed, batch, lean=True), loss_and_grads(plain, batch, lean=False))


class LowRankAdapted(Conv1D):
    """A projection with its own forward, as a LoRA layer has: not what the lean pass computes."""

    def forward(self, x):
        return super().forward(x) + 0.5 * x.sum(-1, keepdim=True)


def adapt_first_projection(base):
    adapted = LowRankAdapted(3 * 64, 64)
    adapted.load_state_dict(base.transformer.h[1].attn.c_attn.state_dict())
    base.transformer.h[1].attn.c_attn = adapted


def test_models_outside_the_lean_families_keep_hugging_faces_forward():
    assert Coconut(make_llama(VOCAB), LATENT, START, END, EOS).lean_family is None
    assert Coconut(make_gpt2(VOCAB, add_cross_attention=True), LATENT, START, END, EOS).lean_family is None
    checkpointing = make_gpt2(VOCAB)
    # Hugging Face's own, inside the block forward (gradient_checkpointing_enable in older transformers)
    enable = getattr(checkpointing, "activation_checkpointing_enable", None) or checkpointing.gradient_checkpointing_enable
    enable()
    assert Coconut(checkpointing, LATENT, START, END, EOS).lean_family is None
    base = make_gpt2(VOCAB)
    adapt_first_projection(base)
    assert Coconut(base, LATENT, START, END, EOS).lean_family is None
    assert Coconut(make_gpt2(VOCAB), LATENT, START, END, EOS).lean_family is lean_passes.GPT2  # premise


def test_a_projection_swapped_after_wrapping_sends_the_passes_back_to_hugging_faces_forward():
    """Checked at each call: an adapter put in after the Coconut was built is computed."""
    coconut = Coconut(make_gpt2(VOCAB), LATENT, START, END, EOS).train()
    assert coconut.lean_family is lean_passes.GPT2
    adapt_first_projection(coconut.base_causallm)
    batch = latent_batch()
    assert_bitwise_equal(loss_and_grads(coconut, batch, lean=True), loss_and_grads(coconut, batch, lean=False))
    coconut.lean_passes = True
    counts = block_calls(coconut, lambda: coconut(**collate([make_example(random.Random(7), 6, 5, 2)])))
    assert counts == {"block": 7, "attention": 7}  # every pass through Hugging Face's block forward


def test_a_wrapped_model_pickles_and_trains_alike_after_loading():
    coconut = Coconut(make_gpt2(VOCAB), LATENT, START, END, EOS).train()
    copy = pickle.loads(pickle.dumps(coconut))
    batch = latent_batch()
    assert_bitwise_equal(loss_and_grads(copy, batch, lean=True), loss_and_grads(coconut, batch, lean=True))
    # the copy's blocks run their own weights: change one and its loss moves, the original's does not
    with torch.no_grad():
        copy.base_causallm.transformer.h[0].attn.c_attn.weight.mul_(2)
    assert not torch.equal(loss_and_grads(copy, batch, lean=True)[0], loss_and_grads(coconut, batch, lean=True)[0])
    assert_bitwise_equal(loss_and_grads(copy, batch, lean=True), loss_and_grads(copy, batch, lean=False))


def test_wrapping_one_base_model_twice_installs_the_lean_path_once():
    """Evaluation wraps the run's base model in a second Coconut (the plain decoder of the
    methods without latents): the blocks keep one lean dispatch, inside checkpointing."""
    base = make_gpt2(VOCAB)
    Coconut(base, LATENT, START, END, EOS)
    checkpoint_blocks(base)
    forward = base.transformer.h[0].forward
    Coconut(base, None, START, END, EOS)
    assert base.transformer.h[0].forward is forward


def test_another_function_registered_as_sdpa_runs_in_every_pass(monkeypatch):
    """Hugging Face's attention interface lets a user register their own "sdpa": the passes
    then call it, lean ones included (they go through Hugging Face's forward)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    calls = []

    def registered(*args, **kwargs):
        calls.append(1)
        return sdpa_attention_forward(*args, **kwargs)

    coconut = Coconut(make_gpt2(VOCAB), LATENT, START, END, EOS)
    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS, "sdpa", registered)
    coconut(**collate([make_example(random.Random(7), 6, 5, 2)]))
    assert len(calls) == 2 * 7  # 2 layers, 7 passes


def test_a_block_put_in_after_wrapping_sends_the_passes_back_to_hugging_faces_forward():
    """Its forward has no lean path: every pass goes through Hugging Face's blocks."""
    from transformers.models.gpt2.modeling_gpt2 import GPT2Block

    coconut = Coconut(make_gpt2(VOCAB), LATENT, START, END, EOS).train()
    transformer = coconut.base_causallm.transformer
    fresh = GPT2Block(transformer.config, layer_idx=1)
    fresh.load_state_dict(transformer.h[1].state_dict())
    transformer.h[1] = fresh
    batch = latent_batch()
    assert_bitwise_equal(loss_and_grads(coconut, batch, lean=True), loss_and_grads(coconut, batch, lean=False))
    coconut.lean_passes = True
    assert block_calls(coconut, lambda: coconut(**batch))["attention"] == 7


def test_hooks_on_a_block_see_the_shapes_hugging_faces_passes_give_them():
    coconut = Coconut(make_gpt2(VOCAB), LATENT, START, END, EOS).eval()
    shapes = {True: [], False: []}
    batch = latent_batch()
    for lean in (True, False):
        coconut.lean_passes = lean
        hook = coconut.base_causallm.transformer.h[1].register_forward_hook(
            lambda module, args, output: shapes[lean].append((tuple(args[0].shape), tuple(output.shape))))  # noqa: B023
        try:
            with torch.no_grad():
                coconut(**batch)
                coconut.generate(batch["input_ids"][:1, :12], max_new_tokens=3)
        finally:
            hook.remove()
    assert shapes[True] == shapes[False] and ((3, 1, 64), (3, 1, 64)) in shapes[True]


def _sharded_worker(rank, world_size, port, out):
    """Both passes' loss and whole gradients, and the attention's calls, of a Coconut
    sharded with FSDP2 (bf16 compute, checkpointed blocks, as run.py builds it)."""

    def work(env):
        coconut = Coconut(make_gpt2(VOCAB), LATENT, START, END, EOS).train()
        checkpoint_blocks(coconut.base_causallm)
        distributed.shard(coconut, coconut.base_causallm, torch.bfloat16)
        coconut.sync_passes_across_ranks = True
        calls = []
        coconut.base_causallm.transformer.h[0].attn.register_forward_pre_hook(lambda *args: calls.append(1))
        results = {}
        for lean in (True, False):
            calls.clear()
            loss, grads = loss_and_grads(coconut, latent_batch(rank), lean)
            results[lean] = (loss, [g.full_tensor() for g in grads], len(calls),
                             lean_passes.usable(lean_passes.GPT2, coconut.decoder))
        return results

    run_as_rank(rank, world_size, port, out, work)


def test_lean_passes_run_under_fsdp2_as_hugging_faces_bit_for_bit(tmp_path):
    """fully_shard gives each block a class of its own, whose forward transformers wraps
    again: the blocks are still GPT-2's, and the lean passes run there, on the gathered
    weights, forward and recomputed in the backward."""
    out = str(tmp_path / "sharded.pt")
    mp.spawn(_sharded_worker, args=(2, free_port(), out), nprocs=2)
    results = torch.load(out, weights_only=False)
    (lean_loss, lean_grads, lean_calls, usable), (loss, grads, calls, _) = results[True], results[False]
    assert usable
    assert torch.equal(lean_loss, loss) and all(torch.equal(a, b) for a, b in zip(lean_grads, grads))
    # rank 0's 7 passes (latent_batch(0)), each recomputed in the backward: Hugging Face's
    # attention runs in the first piece and the rest only when the passes are lean
    assert (lean_calls, calls) == (2 * 2, 2 * 7)
