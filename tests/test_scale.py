"""Training at scale on CPU: sharded training state, resume on another process count,
meta-device builds, mixed precision, activation checkpointing (README, "Large models").

Multi-process parts use real torch.distributed (gloo) in processes started with
torch.multiprocessing; the run.py end-to-end run (torchrun 2 -> python -> torchrun 2)
is marked slow. Tiny everything: a 2-layer 64-wide GPT-2 and fixed synthetic batches
in which every example has the same number of supervised tokens, so the mean loss of a
global batch equals the mean of the per-process means and runs with different process
counts are comparable step by step.
"""

import contextlib
import os

import pytest
import torch
import torch.multiprocessing as mp
from builders import free_port, join_group, run_as_rank
from torch.utils._pytree import tree_map

import checkpoint
import distributed
import evaluate
import startup
import trainer
from bench.fsdp_proxy import all_gathers
from coconut import Coconut
from distributed import DistEnv
import modeling
from modeling import checkpoint_blocks
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


# ------------------------------------------------------------------ config keys
def test_config_keys_for_large_models():
    from utils import ConfigError

    base = dict(coconut=True, train_path="t.json", val_path="v.json")
    config = Config.from_dict(base)
    assert (config.mixed_precision, config.activation_checkpointing) == ("none", False)
    assert Config.from_dict({**base, "mixed_precision": "bf16", "activation_checkpointing": True}).mixed_precision == "bf16"
    with pytest.raises(ConfigError, match="'mixed_precision' must be one of none, bf16, fp16, got 'fp8'"):
        Config.from_dict({**base, "mixed_precision": "fp8"})
    with pytest.raises(ConfigError, match="'bf16' and 'mixed_precision'"):
        Config.from_dict({**base, "bf16": True, "mixed_precision": "bf16"})
    assert Config.from_dict({**base, "bf16": True, "mixed_precision": "none"}).bf16  # the published meaning


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
    # premise: there were latent passes (that the checkpointed blocks keep fewer tensors is the next test)
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
    distributed.autocast_forward(mixed, torch.bfloat16, torch.device("cpu"))
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


@pytest.mark.parametrize("method", ["cot", "coconut"])
def test_evaluation_decodes_in_the_runs_precision(gpt2_folder, method):
    """mixed_precision without FSDP is autocast: the plain decoder evaluation builds for a
    method without latents gets it too (the coconut model is the run's own, wrapped once)."""
    config = Config.from_dict({method: True, "model_id": gpt2_folder, "train_path": "t", "val_path": "v",
                               "mixed_precision": "bf16"})
    built, model = startup.build_and_place(config, startup.Start(), DistEnv(), lambda message: None)
    generator = startup.evaluation_decoder(model, built, config, DistEnv())
    assert (generator is model) == (method == "coconut")
    seen = []
    block = distributed.transformer_blocks(built.base_causallm)[0]  # every pass calls it, lean ones too
    block.register_forward_pre_hook(lambda module, args: seen.append(torch.is_autocast_enabled("cpu")))
    ids = torch.tensor([[5, 6, 7, 8]])
    generator.generate(ids, torch.ones_like(ids), max_new_tokens=3)
    assert len(seen) == 3 and all(seen)  # the prompt's pass and two decoding passes


# ------------------------------------------------------------------ optimizer state, one process
def test_optimizer_state_round_trip_with_gradients_left_over(tmp_path):
    """Restoring must not depend on the gradients being cleared first (DCP's template
    is built by a step with zero gradients, which torch skips if any gradient is set)."""
    model = Coconut(make_gpt2(VOCAB), LATENT, START, END, EOS)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for seed in (0, 1):
        loss_and_grads(model, coconut_batch(2, seed))
        optimizer.step()  # gradients stay set
    checkpoint.save_checkpoint(tmp_path, 1, distributed.full_model_state(model), {},
                               {"optimizer": distributed.optimizer_state(model, optimizer)})
    restored = torch.optim.AdamW(model.parameters(), lr=1e-2)
    distributed.load_optimizer_state(model, restored, checkpoint.load_train_state(tmp_path, 1)["optimizer"], DistEnv())
    assert len(restored.state) == len(optimizer.state) == len(list(model.parameters()))
    for param, moments in optimizer.state.items():
        for key, value in moments.items():
            assert torch.equal(restored.state[param][key], value), key


def test_a_resumed_optimizer_takes_the_configs_lr_and_weight_decay(tmp_path):
    """The moments come back from the checkpoint; lr and weight_decay come from the
    relaunched run's config (load_state_dict would bring the saved ones back too)."""
    model = Coconut(make_gpt2(VOCAB), LATENT, START, END, EOS)
    saved = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    loss_and_grads(model, coconut_batch(2))
    saved.step()
    checkpoint.save_checkpoint(tmp_path, 1, distributed.full_model_state(model), {},
                               {"optimizer": distributed.optimizer_state(model, saved)})
    resume = startup.Start(epoch=1, train_state=checkpoint.load_train_state(tmp_path, 1))
    lines = []
    for lr, weight_decay in ((1e-2, 0.01), (5e-3, 0.0)):
        config = run_config("unused", str(tmp_path / "run"), lr=lr, weight_decay=weight_decay)
        optimizer = trainer.new_optimizer(model, config, resume, 1, DistEnv(), lines.append)
        assert [(g["lr"], g["weight_decay"]) for g in optimizer.param_groups] == [(lr, weight_decay)]
        assert all(torch.equal(optimizer.state[p]["exp_avg"], saved.state[p]["exp_avg"]) for p in model.parameters())
    assert lines == ["restored the optimizer state of epoch 1", "restored the optimizer state of epoch 1",
                     "lr = 0.005 (the config's) replaces the restored optimizer's 0.01",
                     "weight_decay = 0.0 (the config's) replaces the restored optimizer's 0.01"]


def test_an_optimizer_state_of_other_parameters_starts_a_new_adamw_with_one_line(tmp_path):
    """The folder's checkpoint was trained as another model (a cot run relaunched as
    coconut: three more embedding rows, other names): the run goes on with a new AdamW,
    as if the optimizer had been reset, and says why, instead of a DCP traceback at
    every relaunch."""
    other = make_gpt2(VOCAB - 3)
    saved = torch.optim.AdamW(other.parameters(), lr=1e-2)
    other(torch.tensor([[1, 2, 3]]), labels=torch.tensor([[1, 2, 3]])).loss.backward()
    saved.step()
    checkpoint.save_checkpoint(tmp_path, 1, distributed.full_model_state(other), {"epoch": 1},
                               {"optimizer": distributed.optimizer_state(other, saved)})
    model = Coconut(make_gpt2(VOCAB), LATENT, START, END, EOS)
    config = run_config("unused", "unused", reset_optimizer=False)
    resume = startup.Start(epoch=1, train_state=checkpoint.load_train_state(tmp_path, 1))
    lines = []
    optimizer = trainer.new_optimizer(model, config, resume, 1, DistEnv(), lines.append)
    assert not optimizer.state  # a new AdamW: no moments, not even the zero ones DCP's template makes
    [line] = lines
    assert line == (f"checkpoint {tmp_path / 'checkpoint_1.state'}: it holds no optimizer.state.base_causallm.transformer."
                    "wte.weight.step, which this run's optimizer has: starting a new AdamW")


def test_an_optimizer_state_that_cannot_be_read_stops_the_run_with_one_line(tmp_path, monkeypatch):
    """An I/O error is not a mismatch: the run stops (a relaunch may read it), and the
    saved moments are not dropped for a new AdamW that later saves would write over."""
    import torch.distributed.checkpoint as dcp

    model = Coconut(make_gpt2(VOCAB), LATENT, START, END, EOS)
    saved = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loss_and_grads(model, coconut_batch(2))
    saved.step()
    checkpoint.save_checkpoint(tmp_path, 1, distributed.full_model_state(model), {"epoch": 1},
                               {"optimizer": distributed.optimizer_state(model, saved)})

    def unreadable(*args, **kwargs):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(dcp.FileSystemReader, "read_data", unreadable)
    resume = startup.Start(epoch=1, model_path=str(tmp_path / "checkpoint_1"),
                           train_state=checkpoint.load_train_state(tmp_path, 1))
    config = run_config("unused", "unused", reset_optimizer=False)
    with pytest.raises(distributed.UserError) as stopped:
        trainer.new_optimizer(model, config, resume, 1, DistEnv(), print)
    assert str(stopped.value) == (f"checkpoint {tmp_path / 'checkpoint_1.state'}: its optimizer could not be loaded "
                                  f"(OSError: [Errno 5] Input/output error); to resume from the checkpoint before it, "
                                  f"move {tmp_path / 'checkpoint_1'} and its .state out of the run folder")


@pytest.mark.parametrize("train_state, said", [
    ({"epoch": 1, "best_acc": 0.5}, "checkpoint_1 was saved without optimizer state (the reset_optimizer rule it "
                                    "was trained under started a new AdamW at this epoch): starting a new AdamW"),
    ({}, "the checkpoint has no optimizer state (no .state beside it: the published layout, or pruned): "
         "starting a new AdamW")])
def test_a_resumed_run_without_an_optimizer_state_says_why(train_state, said):
    """A .state folder saved under a rule that started a new AdamW at that epoch is not
    the published layout (a weights file alone): each is named as what it is."""
    model = Coconut(make_gpt2(VOCAB), LATENT, START, END, EOS)
    config = run_config("unused", "unused", reset_optimizer=False)  # carries the optimizer over
    lines = []
    trainer.new_optimizer(model, config, startup.Start(epoch=1, train_state=train_state), 1, DistEnv(), lines.append)
    assert lines == [said]


# ------------------------------------------------------------------ several processes
def model_folder(folder):
    """conftest's tiny GPT-2 folder (tied embeddings, a causal-mask buffer) without
    dropout, so that runs with different process counts draw no different masks."""
    from conftest import write_model_folder
    from transformers import GPT2Config

    write_model_folder(folder, "gpt2")
    config = GPT2Config.from_pretrained(folder)
    config.resid_pdrop = config.embd_pdrop = config.attn_pdrop = 0.0
    config.save_pretrained(folder)
    return str(folder)


def run_config(model, save_dir, **over):
    keys = dict(coconut=True, model_id=model, train_path="unused.json", val_path="unused.json",
                save_path=os.path.dirname(save_dir), name=os.path.basename(save_dir), lr=1e-2,
                epochs_per_stage=100, reset_optimizer=False, seed=0)
    keys.update(over)
    return Config.from_dict(keys)


def global_batch(tokens, step):
    """Step `step`'s batch of GLOBAL_BATCH examples, in the layout coconut_batch builds,
    with this tokenizer's latent ids."""
    batch = coconut_batch(GLOBAL_BATCH, seed=step)
    ids = batch["input_ids"] % 300  # ordinary tokens of the tiny tokenizer
    ids[:, 4], ids[:, 5:8], ids[:, 8] = tokens.start_id, tokens.latent_id, tokens.end_id
    return {**batch, "input_ids": ids}


def train(config, env, save_at=None):
    """What run.py does, on fixed batches: one optimizer step per "epoch", from the
    resume point (if any) to STEPS. Returns {"losses": {step: global mean loss},
    "restored": the optimizer state right after the resume (whole, on rank 0)}."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    def log(message):
        pass

    trainer.set_seed(config.seed)
    resume = startup.find_start(config, log, env)
    built, model = startup.build_and_place(config, resume, env, log)
    optimizer = trainer.new_optimizer(model, config, resume, resume.epoch, env, log)
    start = resume.epoch
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    restored = get_optimizer_state_dict(model, optimizer, options=full) if start else None
    # a copy: some values are the optimizer's own tensors, which the next step changes
    result = {"losses": {}, "restored": tree_map(lambda v: v.clone() if isinstance(v, torch.Tensor) else v, restored)}
    model.train()
    for step in range(start, STEPS):
        batch = rank_share(global_batch(built.tokens, step), env.rank, env.world_size)
        profiled = step == start and env.distributed  # FSDP's gathers, counted in the first step
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) if profiled \
                else contextlib.nullcontext() as profile:
            loss = model(**batch).loss
            loss.backward()
            trainer.optimizer_step(model, optimizer)
        if profiled:
            result["all_gathers"] = all_gathers(profile)
        result["losses"][step] = distributed.all_reduce_sum([loss.item()], env)[0] / env.world_size
        if step + 1 == save_at:
            trainer.save_run_state(model, optimizer, config.save_dir, step + 1, 0.0, env)
            result["file_is_the_model"] = model_file_is_the_model(model, config, step + 1, env)
    result["generated"] = evaluation_tokens(model, built, config, env)
    result["synced"] = evaluate.synced_decoding(model, env)
    return result


def evaluation_tokens(model, built, config, env):
    """What the run's evaluation decoder (the model, or a plain view of a sharded base
    for cot) generates for two fixed prompts, as evaluate.generation_accuracy calls it."""
    generator = startup.evaluation_decoder(model, built, config, env)
    prompts = global_batch(built.tokens, 0)["input_ids"][:2, :6]
    model.eval()
    with torch.no_grad(), distributed.gathered_root(model):
        out = generator.generate(prompts, torch.ones_like(prompts), max_new_tokens=3,
                                 synced_gpus=evaluate.synced_decoding(model, env))
    return out.tolist()


def model_file_is_the_model(model, config, epoch, env):
    """checkpoint_N (written one gathered tensor at a time under FSDP) holds exactly the
    model's whole state dict, GPT-2's tied embedding once, as torch.save writes it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    whole = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not env.is_main:
        return None
    saved = torch.load(checkpoint.checkpoint_path(config.save_dir, epoch), weights_only=True)
    wte, head = saved["base_causallm.transformer.wte.weight"], saved["base_causallm.lm_head.weight"]
    return (saved.keys() == whole.keys() and all(torch.equal(saved[k], whole[k]) for k in whole)
            and wte.untyped_storage().data_ptr() == head.untyped_storage().data_ptr())


def _worker(rank, world_size, port, jobs, out):
    run_as_rank(rank, world_size, port, out, lambda env: {
        name: train(run_config(**keys), env, save_at) for name, (keys, save_at) in jobs.items()})


def spawn(world_size, jobs, tmp):
    """Run `jobs` ({name: (run_config keys, save_at)}) in `world_size` processes, in turn."""
    out = str(tmp / f"results_{world_size}.pt")
    try:
        mp.spawn(_worker, args=(world_size, free_port(), jobs, out), nprocs=world_size)
    except mp.ProcessExitedException as e:  # killed by a signal: say what the ranks raised first
        errors = [open(f"{out}.rank{r}.error").read() for r in range(world_size) if os.path.exists(f"{out}.rank{r}.error")]
        raise AssertionError(f"{e}; the ranks' errors: {errors or 'none written'}") from e
    return torch.load(out, weights_only=True)


def _shared_folder_worker(rank, world_size, port, folders, out):
    env = join_group(rank, world_size, port)
    try:
        distributed.check_shared_folder(folders[rank], env, wait_s=0.5)
        said = None
    except distributed.UserError as error:
        said = str(error)
    finally:
        distributed.teardown()
    torch.save({"said": said, "left": sorted(os.listdir(folders[rank]))}, f"{out}.rank{rank}")


@pytest.mark.parametrize("shared", [True, False])
def test_processes_that_do_not_see_rank_0s_run_folder_stop_with_one_line(tmp_path, shared):
    """Node-local save_path disks stand in: process 1 looks in another folder."""
    folders = [str(tmp_path / "run"), str(tmp_path / ("run" if shared else "other"))]
    os.makedirs(folders[1], exist_ok=True)
    out = str(tmp_path / "said")
    mp.spawn(_shared_folder_worker, args=(2, free_port(), folders, out), nprocs=2)
    results = [torch.load(f"{out}.rank{rank}", weights_only=True) for rank in range(2)]
    expected = [None if shared else (f"run folder {folder}: 1 of 2 processes do not see the file rank 0 wrote there: "
                                     "save_path must be one folder every node sees (a shared file system)")
                for folder in folders]  # the same folder name on every node in a run
    assert [r["said"] for r in results] == expected
    assert results[0]["left"] == []  # the check's file is removed


def test_a_one_process_checkpoint_keeps_tied_weights_tied_when_copied_off_the_device():
    """On a GPU each tensor is copied to the CPU: GPT-2's tied embedding must stay one
    tensor (one matrix in the file), as FSDP's streamed state keeps it (a clone stands in
    for the device copy here)."""
    model = make_gpt2(VOCAB)
    copied = distributed._on_cpu_keeping_ties(model.state_dict(), to_cpu=lambda t: t.detach().clone())
    wte, head = copied["transformer.wte.weight"], copied["lm_head.weight"]
    assert wte is head and wte.data_ptr() != model.transformer.wte.weight.data_ptr()
    assert all(torch.equal(copied[k], v) for k, v in model.state_dict().items())
    assert len({t.data_ptr() for t in copied.values()}) == len(copied) - 1  # only the tie is shared


def _timeout_worker(rank, world_size, port, out):
    env = join_group(rank, world_size, port)
    try:
        options = torch.distributed.group.WORLD._get_backend(env.device).options
        if rank == 0:
            torch.save({"timeout_s": options._timeout.total_seconds()}, out)
    finally:
        distributed.teardown()


def test_the_process_group_waits_as_long_as_rank_0_may_load_the_model_alone(tmp_path):
    """Ranks > 0 wait in a broadcast while rank 0 reads the weights: the group's timeout
    is distributed.PROCESS_GROUP_TIMEOUT (60 min), not NCCL's default 10 (gloo's is 30)."""
    out = str(tmp_path / "timeout.pt")
    mp.spawn(_timeout_worker, args=(2, free_port(), out), nprocs=2)
    assert torch.load(out)["timeout_s"] == distributed.PROCESS_GROUP_TIMEOUT.total_seconds() == 3600


def in_process(jobs):
    return {name: train(run_config(**keys), DistEnv(), save_at) for name, (keys, save_at) in jobs.items()}


def copy_run(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return str(dst)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Uninterrupted runs on 1 and 2 processes, and resumes on 1, 2 and 4 processes of
    checkpoints written after step SAVED_AFTER by another process count."""
    tmp = tmp_path_factory.mktemp("scale")
    model = model_folder(tmp / "model")
    # a plain checkpoint whose embeddings hold the new tokens' rows (pause_as_thought's),
    # loaded by a cot run: rank 0's loading rules resize, so must every rank's empty model
    pause = modeling.build_model(run_config(model, str(tmp / "unused"), coconut=False, pause_as_thought=True),
                                 None, None, lambda message: None)
    torch.save({k: v + 0.01 for k, v in pause.model.state_dict().items()}, tmp / "pause.pt")
    cot_from_pause = dict(model=model, coconut=False, cot=True, load_model_path=str(tmp / "pause.pt"))
    one = in_process({"plain": (dict(model=model, save_dir=str(tmp / "one")), SAVED_AFTER),
                      "cot_from_pause": (dict(cot_from_pause, save_dir=str(tmp / "one_cot")), None)})
    # what an earlier version wrote on one process: the optimizer state keyed by index
    legacy = copy_run(tmp / "one", tmp / "legacy")
    opt_state = checkpoint.read_sharded_state(os.path.join(legacy, "checkpoint_2.state"))["optimizer"]
    names = list(opt_state["state"])  # one process: named in model.parameters() order
    indexed = {"state": {names.index(k): v for k, v in opt_state["state"].items()},
               "param_groups": [{**g, "params": [names.index(p) for p in g["params"]]} for g in opt_state["param_groups"]]}
    import shutil

    shutil.rmtree(os.path.join(legacy, "checkpoint_2.state"))
    torch.save({"epoch": 2, "best_acc": 0.0, "optimizer": indexed, "checkpoint_epoch": 2},
               os.path.join(legacy, "checkpoint_2.state"))
    for name in ("two_to_one", "two_to_four"):
        os.makedirs(tmp / name)
    two = spawn(2, {
        "plain": (dict(model=model, save_dir=str(tmp / "two")), SAVED_AFTER),
        "checkpointed": (dict(model=model, save_dir=str(tmp / "two_ac"), activation_checkpointing=True), None),
        "gathered_once": (dict(model=model, save_dir=str(tmp / "two_gathered"), reshard_after_forward=False), SAVED_AFTER),
        "gathered_once_checkpointed": (dict(model=model, save_dir=str(tmp / "two_gathered_ac"),
                                            reshard_after_forward=False, activation_checkpointing=True), None),
        "gathered_once_bf16": (dict(model=model, save_dir=str(tmp / "two_gathered_bf16"), reshard_after_forward=False,
                                    mixed_precision="bf16"), None),
        "bf16": (dict(model=model, save_dir=str(tmp / "two_bf16"), mixed_precision="bf16"), None),
        "one_to_two": (dict(model=model, save_dir=copy_run(tmp / "one", tmp / "one_to_two")), STEPS),
        "legacy_to_two": (dict(model=model, save_dir=legacy), None),
        "cot_from_pause": (dict(cot_from_pause, save_dir=str(tmp / "two_cot")), None),
    }, tmp)
    resumed_on_one = in_process({"two_to_one": (dict(model=model, save_dir=copy_run(tmp / "two", tmp / "2to1")), STEPS)})
    four = spawn(4, {"two_to_four": (dict(model=model, save_dir=copy_run(tmp / "two", tmp / "2to4")), None)}, tmp)
    return {"one": one, "two": two, "resumed_on_one": resumed_on_one, "four": four, "tmp": tmp}


def only_eval_replica(config, env):
    """What an only_eval launch builds on this process, and what it tells of it."""
    built_from_files = []

    def build_model(*args):  # counts the processes that build the model from the files
        built_from_files.append(True)
        return modeling.build_model(*args)

    startup.build_model = build_model
    start = startup.find_start(config, lambda message: None, env)
    read_the_checkpoint = start.model_state is not None
    built, model = startup.build_and_place(config, start, env, lambda message: None)
    base = built.base_causallm
    return {"read_the_checkpoint": read_the_checkpoint, "built_from_files": bool(built_from_files),
            "plain_coconut": type(model) is Coconut,
            "tied": base.get_output_embeddings().weight is base.get_input_embeddings().weight,
            "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "buffers": {k: v.clone() for k, v in model.named_buffers()},
            "generated": evaluation_tokens(model, built, config, env), "synced": evaluate.synced_decoding(model, env)}


def _eval_worker(rank, world_size, port, keys, out):
    torch.set_num_threads(1)
    env = join_group(rank, world_size, port)
    try:
        torch.save(only_eval_replica(run_config(**keys), env), f"{out}.rank{rank}")
    finally:
        distributed.teardown()
    distributed.exit_process(0)


def test_casting_a_replica_to_rank_0s_dtypes_keeps_shared_tensors_shared():
    """A buffer held by two modules is one tensor on the replica, as the tied parameters
    are, after to_empty (the replica's structure comes on the meta device) and the cast:
    otherwise named_buffers lists one more than rank 0's and the broadcasts stop pairing up."""
    with torch.device("meta"):
        model = torch.nn.Module()
        model.a, model.b = torch.nn.Module(), torch.nn.Module()
        shared = torch.ones(3)
        model.a.register_buffer("x", shared)
        model.b.register_buffer("x", shared)
        model.a.w = model.b.w = torch.nn.Parameter(torch.ones(2))
    distributed._to_empty_keeping_ties(model, torch.device("cpu"))
    distributed._cast_to(model, {"a.x": torch.bfloat16, "a.w": torch.bfloat16})
    assert [(name, b.dtype) for name, b in model.named_buffers()] == [("a.x", torch.bfloat16)]
    assert model.a.x is model.b.x and model.a.w is model.b.w and model.b.w.dtype == torch.bfloat16


def gemma_folder(folder, gpt2_model):
    """A tiny Gemma config (tied embeddings, an embed_scale buffer) with GPT-2's tokenizer,
    no weights."""
    import shutil

    from transformers import AutoConfig, GemmaConfig

    shutil.copytree(gpt2_model, folder)
    os.remove(os.path.join(folder, "config.json"))
    GemmaConfig(vocab_size=AutoConfig.from_pretrained(gpt2_model).vocab_size, hidden_size=32, intermediate_size=64,
                num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                max_position_embeddings=512, bos_token_id=0, eos_token_id=0, pad_token_id=0).save_pretrained(folder)
    return str(folder)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["gpt2", "gemma in bf16"])
def test_only_eval_under_torchrun_reads_the_model_on_rank_0_alone_and_replicates_it(tmp_path, kind):
    """Only rank 0 reads load_model_path and builds the model from the files (the others
    build it on the meta device: no host copy per process); every process ends with rank
    0's parameters and buffers (dtypes too: built from its config in bf16, Gemma keeps an
    fp32 buffer that the meta-device model holds in bf16), the embedding and head still
    one tensor, no DDP wrapper (its gradient buffer would be a second model on every
    device), and generates what one process generates."""
    model = model_folder(tmp_path / "model")
    precision = {}
    if kind == "gemma in bf16":
        model, precision = gemma_folder(tmp_path / "gemma", model), {"bf16": True}
    trained = modeling.build_model(run_config(model, str(tmp_path / "unused"), **precision), None, None,
                                   lambda message: None)
    torch.save({k: v + 0.01 for k, v in trained.model.state_dict().items()}, tmp_path / "trained.pt")
    keys = dict(model=model, save_dir=str(tmp_path / "eval"), only_eval=True, load_model_path=str(tmp_path / "trained.pt"),
                resume=1, num_epochs=2, **precision)
    alone = only_eval_replica(run_config(**keys), DistEnv())
    out = str(tmp_path / "replica")
    mp.spawn(_eval_worker, args=(2, free_port(), keys, out), nprocs=2)
    ranks = [torch.load(f"{out}.rank{rank}", weights_only=True) for rank in range(2)]
    assert [(r["read_the_checkpoint"], r["built_from_files"]) for r in ranks] == [(True, True), (False, False)]
    for replica in ranks:
        assert replica["plain_coconut"] and replica["tied"] and not replica["synced"]  # replicas decode alone
        for part in ("state", "buffers"):
            assert replica[part].keys() == alone[part].keys()
            assert all(replica[part][k].dtype == alone[part][k].dtype and torch.equal(replica[part][k], alone[part][k])
                       for k in alone[part]), part
        assert replica["generated"] == alone["generated"]
    head = next(k for k in alone["state"] if k.endswith("lm_head.weight"))
    assert torch.equal(alone["state"][head], trained.model.state_dict()[head] + 0.01)  # premise: the loaded weights


def assert_same_curve(losses, reference, tol):
    assert losses.keys() <= reference.keys() and losses, (losses, reference)
    for step, loss in losses.items():
        assert abs(loss - reference[step]) <= tol * max(1.0, abs(reference[step])), (step, losses, reference)


@pytest.mark.slow  # the shared multi-process runs (~40 s)
def test_two_processes_give_the_one_process_loss_curve(runs):
    reference = runs["one"]["plain"]["losses"]
    assert list(reference) == list(range(STEPS))
    assert len(set(reference.values())) == STEPS  # premise: the model learns, steps differ
    assert_same_curve(runs["two"]["plain"]["losses"], reference, 1e-5)


@pytest.mark.slow  # the shared multi-process runs (~40 s)
def test_evaluation_decoders_generate_alike_on_one_and_two_processes(runs):
    """A cot run's evaluation decodes through a plain view of its FSDP-sharded base model
    (built after sharding), a coconut run's through the model itself."""
    for name in ("plain", "cot_from_pause"):
        assert runs["two"][name]["generated"] == runs["one"][name]["generated"], name
        assert len(runs["one"][name]["generated"][0]) == 6 + 3
        assert runs["two"][name]["synced"] and not runs["one"][name]["synced"]  # FSDP's processes decode in step


@pytest.mark.slow  # the shared multi-process runs (~40 s)
def test_a_cot_run_from_a_checkpoint_with_the_new_rows_shards_and_trains_alike(runs):
    """Under FSDP every rank's empty model takes rank 0's embedding rows: a cot run (no
    latent tokens of its own) loading a checkpoint that holds the three new rows."""
    assert_same_curve(runs["two"]["cot_from_pause"]["losses"], runs["one"]["cot_from_pause"]["losses"], 1e-5)


@pytest.mark.slow  # the shared multi-process runs (~40 s)
def test_two_processes_with_activation_checkpointing_give_the_same_curve(runs):
    assert_same_curve(runs["two"]["checkpointed"]["losses"], runs["one"]["plain"]["losses"], 1e-5)


@pytest.mark.slow  # the shared multi-process runs (~40 s)
def test_blocks_that_keep_their_gathered_weights_train_alike_and_gather_once_a_step(runs):
    """reshard_after_forward: False. Each step runs 4 passes (3 latents) through 2 blocks:
    FSDP's default gathers each block for every pass and every pass's backward, and the
    root once; kept weights, each of the 3 units once. The kept copies are freed before
    each optimizer step: a step on stale weights would change the curve. Also with
    activation checkpointing, and with FSDP's bf16 policy (weights gathered in bf16)."""
    default, kept = runs["two"]["plain"], runs["two"]["gathered_once"]
    passes, blocks = 4, 2
    assert default["all_gathers"] == 2 * passes * blocks + 1
    assert kept["all_gathers"] == blocks + 1
    for name, reference in (("gathered_once", "plain"), ("gathered_once_checkpointed", "plain"),
                            ("gathered_once_bf16", "bf16")):
        assert runs["two"][name]["losses"] == runs["two"][reference]["losses"], name
        assert runs["two"][name]["generated"] == runs["two"][reference]["generated"], name
    assert kept["file_is_the_model"]


def test_the_fsdp_startup_note_says_what_keeping_the_gathered_weights_costs():
    """The blocks' weights in the compute dtype: GPT-2's blocks (not its embeddings),
    counted here layer by layer."""
    model = make_gpt2(VOCAB, n_layer=3, n_embd=512)
    block_bytes = sum(p.numel() for layer in model.transformer.h for p in layer.parameters()) * 4
    assert 2**20 < block_bytes < 2**30  # premise: shown in MiB
    assert f"the blocks' whole weights, {block_bytes / 2**20:.0f} MiB," in startup.regather_note(model, torch.float32)
    assert f"weights, {block_bytes / 2 / 2**20:.0f} MiB," in startup.regather_note(model, torch.bfloat16)
    assert startup.regather_note(model, torch.float32).startswith(startup.REGATHER_NOTE)


@pytest.mark.slow  # the shared multi-process runs (~40 s)
def test_fsdp_bf16_mixed_precision_stays_within_bf16_tolerance(runs):
    mixed, reference = runs["two"]["bf16"]["losses"], runs["one"]["plain"]["losses"]
    assert mixed != reference  # premise: the compute really was bf16
    assert_same_curve(mixed, reference, 3e-2)


def _assert_restored(result, saved_folder):
    """The optimizer state after the resume is exactly the one saved, and the next step
    continues the uninterrupted run."""
    saved = checkpoint.read_sharded_state(os.path.join(saved_folder, "checkpoint_2.state"))["optimizer"]
    restored = result["restored"]
    assert restored["state"].keys() == saved["state"].keys()
    for name, moments in saved["state"].items():
        for key, value in moments.items():
            assert torch.equal(restored["state"][name][key], value), (name, key)
    assert list(result["losses"]) == [SAVED_AFTER]


@pytest.mark.slow  # the shared multi-process runs (~40 s)
@pytest.mark.parametrize("direction", ["one_to_two", "two_to_one", "two_to_four"])
def test_resume_on_another_process_count(runs, direction):
    source, result = {
        "one_to_two": ("one", runs["two"]["one_to_two"]),
        "two_to_one": ("two", runs["resumed_on_one"]["two_to_one"]),
        "two_to_four": ("two", runs["four"]["two_to_four"]),
    }[direction]
    _assert_restored(result, runs["tmp"] / source)
    assert_same_curve(result["losses"], runs["one"]["plain"]["losses"], 1e-5)


@pytest.mark.slow  # the shared multi-process runs (~40 s)
def test_checkpoint_file_is_the_whole_model_on_any_process_count(runs):
    assert runs["one"]["plain"]["file_is_the_model"] is True
    assert runs["two"]["plain"]["file_is_the_model"] is True
    assert runs["two"]["one_to_two"]["file_is_the_model"] is True


@pytest.mark.slow  # the shared multi-process runs (~40 s)
def test_resumed_run_saves_again_in_its_own_layout(runs):
    """1 -> 2 and 2 -> 1 saved checkpoint_3 with each process's own shard."""
    on_two = os.listdir(runs["tmp"] / "one_to_two" / "checkpoint_3.state")
    on_one = os.listdir(runs["tmp"] / "2to1" / "checkpoint_3.state")
    assert {"__0_0.distcp", "__1_0.distcp"} <= set(on_two) and "__1_0.distcp" not in on_one
    assert checkpoint.list_checkpoints(runs["tmp"] / "one_to_two") == [2, 3]


@pytest.mark.slow  # the shared multi-process runs (~40 s)
def test_earlier_versions_index_keyed_state_resumes_on_two_processes(runs):
    """The reported bug: one process's `.state` (parameter indices, not names) resumed
    under torchrun raised KeyError '0'."""
    result = runs["two"]["legacy_to_two"]
    _assert_restored(result, runs["tmp"] / "one")
    assert_same_curve(result["losses"], runs["one"]["plain"]["losses"], 1e-5)


# ------------------------------------------------------------------ the end of a process
EXITING_RANK = """
import atexit, sys
sys.path.insert(0, {repo!r})
import torch, torch.distributed as dist
import distributed
env = distributed.setup()
total = torch.ones(3)
if env.distributed:
    dist.all_reduce(total)  # a collective on a Python tensor, as trainer's all_reduce_sum
distributed.teardown()
atexit.register(lambda: print("finalized"))
print(f"rank {{env.rank}} summed {{total.tolist()}}", end="")  # no newline: flushed by exit_process
distributed.exit_process(3)
"""


def test_a_process_that_joined_gloo_exits_with_its_status_without_finalizing(tmp_path):
    """distributed.exit_process: after a gloo group, the status given, the output flushed,
    and no interpreter finalization (no atexit handler runs; there gloo's threads could
    abort the process); without a group, a plain sys.exit."""
    import subprocess
    import sys

    from builders import REPO, sub_env

    script = tmp_path / "rank.py"
    script.write_text(EXITING_RANK.format(repo=str(REPO)))
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, str(script)], text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env=sub_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                                          MASTER_PORT=port)) for r in range(2)]
    for rank, proc in enumerate(procs):
        out, err = proc.communicate(timeout=120)
        assert (proc.returncode, out) == (3, f"rank {rank} summed [2.0, 2.0, 2.0]"), err[-2000:]
    alone = subprocess.run([sys.executable, str(script)], text=True, capture_output=True, timeout=120, env=sub_env())
    assert (alone.returncode, alone.stdout) == (3, "rank 0 summed [1.0, 1.0, 1.0]finalized\n"), alone.stderr[-2000:]


# ------------------------------------------------------------------ run.py, end to end
@pytest.mark.slow
def test_torchrun_then_one_process_then_torchrun_on_one_run_folder(tmp_path, gpt2_folder, chain_data):
    """The issue's scenario: each launch raises num_epochs and resumes the same folder
    with the optimizer state (reset_optimizer False) on another process count. The
    later launches also turn on mixed precision (autocast on one process, FSDP's policy
    under torchrun) and activation checkpointing, which leave the saved state's layout
    (fp32, by parameter name) unchanged."""
    from test_run import RUN_PY, acc_lines, epochs_started, keys_for, run_sub, write_cfg

    save_dir = tmp_path / "ckpt" / "mixed"
    launches = [("torchrun", 1, {}), ("python", 2, {"mixed_precision": "bf16"}),
                ("torchrun", 3, {"mixed_precision": "bf16", "activation_checkpointing": True})]
    for launcher, num_epochs, options in launches:
        keys = keys_for(gpt2_folder, chain_data, tmp_path / "ckpt", "mixed", coconut=True, num_epochs=num_epochs,
                        reset_optimizer=False, max_latent_stage=2, batch_size_training=4, **options)
        cfg = write_cfg(tmp_path / f"cfg_{num_epochs}.yaml", keys)
        torchrun = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())]
        proc = run_sub([*(torchrun if launcher == "torchrun" else []), RUN_PY, cfg], timeout=240)
        assert proc.returncode == 0, proc.stderr[-4000:]
        assert epochs_started(proc.stderr) == [num_epochs]  # one new epoch per launch
        assert len(acc_lines(proc.stdout)) == 1
        if num_epochs > 1:
            assert f"restored the optimizer state of epoch {num_epochs - 1}" in proc.stdout
            before, now = (2, 1) if launcher == "python" else (1, 2)  # another effective batch: said
            assert f"processes {before} -> {now}" in proc.stdout
        assert checkpoint.list_checkpoints(save_dir) == list(range(1, num_epochs + 1))
    for epoch in (2, 3):  # the two newest keep their sharded training state
        assert checkpoint.read_sharded_state(save_dir / f"checkpoint_{epoch}.state")["optimizer"]["state"]
    assert not (save_dir / "checkpoint_1.state").exists()


@pytest.mark.slow
def test_host_memory_bench_runs(tmp_path):
    """bench/host_memory.py --quick: both measurements on tiny models (~40 s)."""
    import json
    import subprocess
    import sys

    out = tmp_path / "host_memory.json"
    proc = subprocess.run([sys.executable, "bench/host_memory.py", "--quick", "--output", str(out)],
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), capture_output=True,
                          text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    sharding, steps = results["sharding"], results["checkpointing"]
    assert len(sharding["two_process_peak_bytes"]) == 2
    assert sharding["ratio"] == max(sharding["two_process_peak_bytes"]) / sharding["one_process_peak_bytes"]
    assert steps["checkpointing_same_loss"] is True
    variants = steps["variants"]
    assert variants["checkpointing"]["saved_activation_bytes"] < variants["plain"]["saved_activation_bytes"]
    assert all(v["forward_held_bytes"] > 0 and v["forward_held_ratio"] > 0 for v in variants.values())


@pytest.mark.slow
def test_host_memory_bench_measures_kept_weights(tmp_path):
    """bench/host_memory.py --quick --only kept_weights (~20 s): both settings run on 2
    processes, and the startup line's estimate is the one run.py prints."""
    import json
    import subprocess
    import sys

    out = tmp_path / "host_memory.json"
    proc = subprocess.run([sys.executable, "bench/host_memory.py", "--quick", "--only", "kept_weights", "--output",
                           str(out)], cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    kept = json.loads(out.read_text())["kept_weights"]
    peaks = kept["largest_peak_bytes"]
    assert set(peaks) == {"True", "False"} and all(peak > 0 for peak in peaks.values())
    assert kept["difference_bytes"] == peaks["False"] - peaks["True"]
    assert kept["startup_note"].startswith(startup.REGATHER_NOTE)
