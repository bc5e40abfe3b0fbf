"""compile: True (compiling.compile_decoder, compiling.compile_blocks) gives eager's loss,
gradients and tokens.

The decoder stack, or each block, of a tiny GPT-2 is compiled in place and the model
runs a batch mixing stages (so passes of every shape: the first piece, one column per
latent, the rest), then (slow test only) generates. The fast test uses the aot_eager
backend (dynamo's tracing and AOT autograd, without code generation); the slow one
inductor, what `compile: True` uses, and no-grad decoding too (minutes on one CPU core).
"""

import contextlib
import random

import pytest
import torch
from test_coconut import END, EOS, LATENT, START, VOCAB, collate, make_example, mixed_batch, relative_difference
from tiny import make_gpt2, make_llama

from coconut import Coconut
from compiling import RECOMPILE_LIMIT, CompileFriendlyCache, compile_blocks, compile_decoder


def loss_and_grads(coconut, batch):
    params = list(coconut.base_causallm.parameters())
    loss = coconut(**batch, return_logits=False).loss
    return loss.item(), torch.autograd.grad(loss, params)


def prompts_batch(seed):
    rng = random.Random(seed)
    prompts = [make_example(rng, n, rng.randrange(2, 8), 1)[0][:-2] for n in (0, 3, 1)]
    return collate([(p, p) for p in prompts])


def check_compiled_matches_eager(backend, generate: bool, whole_decoder: bool, make_model=make_gpt2):
    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    counters.clear()
    base = make_model(VOCAB)
    coconut = Coconut(base, LATENT, START, END, EOS)
    batch = collate(mixed_batch(seed=1, c_thought=1))
    keys = list(coconut.state_dict())
    want_loss, want_grads = loss_and_grads(coconut, batch)
    prompts = prompts_batch(2)
    if generate:
        with torch.no_grad():
            want_tokens = coconut.generate(prompts["input_ids"], prompts["attention_mask"], max_new_tokens=4)

    if whole_decoder:
        compile_decoder(coconut, backend=backend)
        assert coconut.compiled_decoder and coconut.cache_class is not CompileFriendlyCache and not coconut.compiled_blocks
    else:
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
    # the model really ran compiled, in a bounded number of graphs
    graphs = counters["stats"]["unique_graphs"]
    assert 0 < graphs <= RECOMPILE_LIMIT
    if whole_decoder:  # one graph per pass shape, none broken at the cache update
        assert not counters["graph_break"] and graphs <= (12 if generate else 3), (graphs, dict(counters["graph_break"]))
    torch._dynamo.reset()


@pytest.mark.parametrize("make_model", [make_gpt2, make_llama], ids=["gpt2", "llama"])
@pytest.mark.parametrize("whole_decoder", [True, False], ids=["decoder", "blocks"])
def test_compiled_model_matches_eager(whole_decoder, make_model):
    check_compiled_matches_eager("aot_eager", generate=False, whole_decoder=whole_decoder, make_model=make_model)


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compiled_decoder_trains_every_stage_in_three_graphs(backend):
    """Each graph costs about a minute to compile on a GPU host, so their number is the
    start-up cost: the first pass, with an empty cache (a batch without latents, or the
    piece before a batch's first latent), one-column passes, and longer passes after
    latents. Each of these made one more graph before: a batch without latents run
    without a cache; a view and a copy of the same shape; with inductor, the first
    latent pass's cache keys laid out otherwise than the next one's."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    coconut = Coconut(make_gpt2(VOCAB), LATENT, START, END, EOS)
    from torch._inductor import config as inductor_config

    # mix-order reductions on, as a process starts (an earlier test's compile turned them off);
    # inductor's own patch restores the setting (pytest's monkeypatch would delete it)
    has_setting = hasattr(inductor_config.triton, "mix_order_reduction")
    with inductor_config.patch({"triton.mix_order_reduction": True}) if has_setting else contextlib.nullcontext():
        compile_decoder(coconut, backend=backend)
        assert not (has_setting and inductor_config.triton.mix_order_reduction)  # their size guard: a graph more on GPUs
    rng = random.Random(3)
    without_latents = collate([make_example(rng, 0, rng.randrange(3, 9), 2) for _ in range(3)])
    with_latents = collate([make_example(rng, k, rng.randrange(3, 9), 2) for k in (1, 3, 2)])
    for batch in (without_latents, with_latents, without_latents, with_latents):
        loss_and_grads(coconut, batch)
    assert (counters["stats"]["unique_graphs"], dict(counters["graph_break"])) == (3, {})
    torch._dynamo.reset()


def test_captured_decoding_compiles_one_step_graph_per_batch_bucket():
    """The CUDA decoding step is compiled with dynamic=False (a CUDA graph per shape): its
    inputs must not carry the prompt's width in their strides, or every prompt width
    would compile and capture a graph of its own (a minute or so each on a GPU host),
    past dynamo's recompile limit into silent eager steps; and a sub-batch (gapless
    decoding's) runs as the next power of two rows (compiling.bucket_rows), so that
    sub-batches of varying sizes share a few graphs; whole batches run as they come.
    Run here with the step compiled by the eager backend, which guards as inductor does."""
    from torch._dynamo.utils import counters

    from coconut import align_latents
    from compiling import CapturedDecoder

    torch._dynamo.reset()
    counters.clear()
    coconut = Coconut(make_gpt2(VOCAB), LATENT, START, END, EOS).eval()
    decoder = CapturedDecoder(coconut, capture=False)
    decoder.step = torch.compile(decoder._step, backend="eager", dynamic=False)
    rng = random.Random(5)
    prompts = [make_example(rng, 2, q, 1)[0][:-2] for q in (3, 5, 8, 11)]  # four widths
    with torch.no_grad():
        runs = {}
        for batch in [[p] for p in prompts] + [prompts, prompts, prompts[:3], prompts[:3]]:
            collated = collate([(p, p) for p in batch])
            ids, mask, positions = align_latents(collated["input_ids"], collated["attention_mask"], LATENT, EOS)
            # a sub-batch of 3 rows (of a batch of 6) runs as 4 rows, first; then as a whole batch of 3
            sub_batch = len(batch) == 3 and len(batch) not in runs
            runs.setdefault(len(batch), []).append(decoder.run(ids, mask, positions, 4, rows_up_to=6 if sub_batch else None))
            if sub_batch:
                assert counters["stats"]["unique_graphs"] == 2  # batch 1 and batch 4, one cache bucket
    assert counters["stats"]["unique_graphs"] == 3  # and the whole batch of 3
    assert all(torch.equal(a, b) for a, b in zip(*runs[3]))  # the same tokens either way
    torch._dynamo.reset()


def test_captured_decoding_marks_the_cache_static_when_the_prompt_passes_are_compiled():
    """With compile: True the prompt's first pass, compiled, allocates the StaticCache's
    tensors, and a StaticCache marks its tensors as static addresses only when it
    allocates them eagerly: unmarked, inductor would replay the captured step, which
    writes into them, without CUDA graphs ("mutated inputs"). Eager backend here; the
    compiled decoder (compiled blocks allocate it inside their graphs alike, and the step
    marks it whatever compiled it)."""
    from coconut import align_latents
    from compiling import CapturedDecoder

    torch._dynamo.reset()
    coconut = Coconut(make_gpt2(VOCAB), LATENT, START, END, EOS).eval()
    compile_decoder(coconut, backend="eager")
    decoder = CapturedDecoder(coconut, capture=False)
    prompts = [make_example(random.Random(5), 2, q, 1)[0][:-2] for q in (3, 5)]
    collated = collate([(p, p) for p in prompts])
    with torch.no_grad():
        decoder.run(*align_latents(collated["input_ids"], collated["attention_mask"], LATENT, EOS), 4)
    layers = next(iter(decoder._caches.values())).layers
    tensors = [t for layer in layers for t in (layer.keys, layer.values, layer.cumulative_length)]
    assert len(tensors) == 3 * coconut.base_causallm.config.n_layer
    assert all(getattr(t, "_dynamo_static_input_type", None) for t in tensors)
    torch._dynamo.reset()


def test_captured_step_runs_compiled_for_the_prompts_latents_under_compiled_blocks():
    """With compiled blocks, one-column passes run in dynamo's force-eager stance (they
    are dispatch-bound); the captured decoding step is compiled as a whole and must not
    be: the prompt's latent passes ran it eagerly on the static cache. Counted here as
    calls into the step's compiled graph, with one new token (no token step at all)."""
    from coconut import align_latents
    from compiling import CapturedDecoder

    torch._dynamo.reset()
    coconut = Coconut(make_gpt2(VOCAB, n_layer=1), LATENT, START, END, EOS).eval()  # one block: less to trace
    compile_blocks(coconut, backend="eager")
    graph_calls = []

    def counting_backend(graph, example_inputs):
        def run(*args):
            graph_calls.append(1)
            return graph(*args)
        return run

    decoder = CapturedDecoder(coconut, capture=False)
    decoder.step = torch.compile(decoder._step, backend=counting_backend, dynamic=False)
    prompts = [make_example(random.Random(5), 3, q, 1)[0][:-2] for q in (3, 5)]  # 3 latents each
    collated = collate([(p, p) for p in prompts])
    ids, mask, positions = align_latents(collated["input_ids"], collated["attention_mask"], LATENT, EOS)
    assert (ids == LATENT).sum(1).tolist() == [3, 3]  # the premise
    with torch.no_grad():
        decoder.run(ids, mask, positions, max_new_tokens=1)
    # the first latent's value comes from the prompt's first piece; each later one from a
    # one-column pass over the latent before it: 2 such passes (the third latent's pass
    # runs on to the prompt's end, two columns)
    assert len(graph_calls) == 2
    torch._dynamo.reset()


@pytest.mark.slow
@pytest.mark.parametrize("whole_decoder", [True, False], ids=["decoder", "blocks"])
def test_inductor_compiled_model_matches_eager(whole_decoder):
    check_compiled_matches_eager("inductor", generate=True, whole_decoder=whole_decoder)


@pytest.mark.parametrize("blocks", [False, True])
def test_a_method_without_latents_generates_through_its_compiled_base(gpt2_folder, blocks):
    """compile: True with cot: the run's model is the compiled base, and the evaluation's
    plain decoder (evaluate.generator_for) wraps it: it must use the caches that base's
    compilation needs, and answer as the eager model does. Blocks are compiled under
    FSDP or activation checkpointing (taken here), the whole decoder otherwise. Inductor:
    AOT autograd alone traces the plain decoder's buffered cache, which inductor cannot."""
    import startup
    from distributed import DistEnv
    from utils import Config

    ids = torch.tensor([[5, 6, 7, 8, 9], [0, 0, 1, 2, 3]])
    mask = (torch.arange(5) >= torch.tensor([[0], [2]])).long()

    def answers(compile_):
        config = Config.from_dict({"cot": True, "model_id": gpt2_folder, "train_path": "t", "val_path": "v",
                                   "compile": compile_, "activation_checkpointing": blocks})
        torch.manual_seed(0)
        built, model = startup.build_and_place(config, startup.Start(), DistEnv(), lambda message: None)
        generator = startup.evaluation_decoder(model, built, config, DistEnv())
        assert (generator.compiled_blocks, generator.compiled_decoder) == ((blocks, not blocks) if compile_
                                                                           else (False, False))
        return generator.generate(ids, mask, max_new_tokens=4)

    torch._dynamo.reset()
    try:
        assert torch.equal(answers(True), answers(False))
    finally:
        torch._dynamo.reset()


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


@pytest.mark.slow
def test_compile_in_one_process_trains_as_eager(tmp_path, gpt2_folder, chain_data, monkeypatch):
    """compile: True through run.py in one process compiles the whole decoder (no graph
    break, so not the blocks, whose cache update breaks the graph): two epochs (stages 0
    and 1, so one-column latent passes), then evaluation, with the eval losses of the
    eager run of the same config. The aot_eager backend (inductor's code generation costs
    minutes of CI on a cold cache; test_inductor_compiled_model_matches_eager covers it):
    AOT autograd's decompositions reorder a few float sums, which Adam's first steps
    amplify, so the losses agree to 0.5%, not bit for bit."""
    import functools
    import re

    import compiling
    from builders import keys_for, run_in_process, write_cfg
    from torch._dynamo.utils import counters

    monkeypatch.setattr(compiling, "compile_decoder", functools.partial(compiling.compile_decoder, backend="aot_eager"))

    def losses_and_accuracies(compile_):
        keys = keys_for(gpt2_folder, chain_data, tmp_path / f"ckpt-{compile_}", "compiled", coconut=True,
                        max_latent_stage=2, pad_latent_to_max=False, batch_size_training=4, batch_size_eval=4,
                        compile=compile_)
        rc, out, err = run_in_process(write_cfg(tmp_path / f"cfg-{compile_}.yaml", keys))
        assert rc == 0, err[-4000:]
        losses = [float(x) for x in re.findall(r"^eval loss (\S+)", out, re.M)]
        return losses, re.findall(r"^Accuracy on validation set: .*$", out, re.M)

    torch._dynamo.reset()
    counters.clear()
    try:
        eager_losses, eager_accuracies = losses_and_accuracies(False)
        assert not counters["stats"]
        compiled_losses, compiled_accuracies = losses_and_accuracies(True)
        graphs, breaks = counters["stats"]["unique_graphs"], dict(counters["graph_break"])
    finally:
        torch._dynamo.reset()
    assert 0 < graphs <= RECOMPILE_LIMIT and not breaks, (graphs, breaks)
    assert len(eager_losses) == 2 and len(compiled_accuracies) == len(eager_accuracies) == 2
    assert compiled_losses == pytest.approx(eager_losses, rel=5e-3)
