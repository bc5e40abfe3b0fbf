"""compile: True (compiling.compile_blocks) gives eager's loss, gradients and tokens.

The blocks of a tiny GPT-2 are compiled in place and the model runs a batch mixing
stages (so passes of every shape: the first piece, one column per latent, the rest),
then (slow test only) generates. The fast test uses the aot_eager backend (dynamo's tracing, the graph
breaks around the cache and AOT autograd, without code generation); the slow one
inductor, what `compile: True` uses, and no-grad decoding too (minutes on one CPU core).
"""

import random

import pytest
import torch
from test_coconut import END, EOS, LATENT, START, VOCAB, collate, make_example, mixed_batch, relative_difference
from tiny import make_gpt2

from coconut import Coconut
from compiling import RECOMPILE_LIMIT, CompileFriendlyCache, compile_blocks


def loss_and_grads(coconut, batch):
    params = list(coconut.base_causallm.parameters())
    loss = coconut(**batch, return_logits=False).loss
    return loss.item(), torch.autograd.grad(loss, params)


def prompts_batch(seed):
    rng = random.Random(seed)
    prompts = [make_example(rng, n, rng.randrange(2, 8), 1)[0][:-2] for n in (0, 3, 1)]
    return collate([(p, p) for p in prompts])


def check_compiled_matches_eager(backend, generate: bool):
    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    counters.clear()
    base = make_gpt2(VOCAB)
    coconut = Coconut(base, LATENT, START, END, EOS)
    batch = collate(mixed_batch(seed=1, c_thought=1))
    keys = list(coconut.state_dict())
    want_loss, want_grads = loss_and_grads(coconut, batch)
    prompts = prompts_batch(2)
    if generate:
        with torch.no_grad():
            want_tokens = coconut.generate(prompts["input_ids"], prompts["attention_mask"], max_new_tokens=4)

    assert compile_blocks(coconut, backend=backend) == 2
    assert coconut.cache_class is CompileFriendlyCache
    assert list(coconut.state_dict()) == keys  # compiled in place: checkpoints unchanged
    got_loss, got_grads = loss_and_grads(coconut, batch)
    assert abs(got_loss - want_loss) < 1e-5 * abs(want_loss)
    for got, want in zip(got_grads, want_grads):
        assert relative_difference(got, want) < 1e-5
    if generate:
        with torch.no_grad():
            got_tokens = coconut.generate(prompts["input_ids"], prompts["attention_mask"], max_new_tokens=4)
        assert torch.equal(got_tokens, want_tokens)
    # the blocks really ran compiled, in a bounded number of graphs
    assert 0 < counters["stats"]["unique_graphs"] <= RECOMPILE_LIMIT
    torch._dynamo.reset()


def test_compiled_blocks_match_eager():
    check_compiled_matches_eager("aot_eager", generate=False)


@pytest.mark.slow
def test_inductor_compiled_blocks_match_eager():
    check_compiled_matches_eager("inductor", generate=True)


@pytest.mark.slow
def test_compile_under_fsdp2_with_two_processes(tmp_path, gpt2_folder, chain_data):
    """compile: True through run.py under torchrun: compiled blocks sharded by FSDP2, ranks
    with different latent counts (so one-column passes and dummy passes), then evaluation."""
    from test_run import RUN_PY, acc_lines, free_port, keys_for, run_sub, write_cfg

    keys = keys_for(gpt2_folder, chain_data, tmp_path / "ckpt", "compiled", coconut=True, max_latent_stage=2,
                    pad_latent_to_max=False, uniform_prob=0.5, batch_size_training=4, batch_size_eval=4,
                    compile=True)
    cfg = write_cfg(tmp_path / "cfg.yaml", keys)
    args = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()), RUN_PY, cfg]
    proc = run_sub(args, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert len(acc_lines(proc.stdout)) == 2 and "Running FSDP on rank = 0, world size = 2" in proc.stdout
