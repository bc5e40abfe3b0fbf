"""End-to-end runs of run.py (DESIGN §5, §9) on tiny offline models, on CPU.

In-process runs call `run.main([cfg])`; subprocesses cover torchrun, killing and
resuming, exit statuses and stderr. Every run has WANDB_MODE=disabled except the one
test of the offline fallback. Tiny everything: 2-layer 64-wide models, 48 training and
12 validation examples, 16 new tokens.
"""

import concurrent.futures
import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

import startup
import trainer
import wandb_setup
from builders import (ACC_RE, COT_RE, FULL_RE, PREFIX, REPO, RUN_PY, acc_lines, assert_same_tensors,
                      assert_same_values, epochs_started, free_port, keys_for, load, makefile_demo_data_args,
                      makefile_variable, run_in_process, run_sub, sub_env, write_cfg)
from checkpoint import list_checkpoints, load_train_state, read_sharded_state
from evaluate import SAMPLES_SHOWN
from layout import END, LATENT, START
from preprocessing import prosqa
from utils import load_config

# ------------------------------------------------------------------ shared runs
@pytest.fixture(scope="module")
def coconut_run(tmp_path_factory, gpt2_folder, chain_data):
    """A 2-epoch coconut run (stage 0 then stage 1), reused by several tests."""
    folder = tmp_path_factory.mktemp("coconut_run")
    cfg = write_cfg(folder / "cfg.yaml", keys_for(gpt2_folder, chain_data, folder / "ckpt", "coconut", coconut=True))
    rc, out, err = run_in_process(cfg)
    assert rc == 0, err[-3000:]
    return {"cfg": cfg, "out": out, "err": err, "dir": str(folder / "ckpt" / "coconut")}


@pytest.fixture(scope="module")
def cot_run(tmp_path_factory, gpt2_folder, chain_data):
    folder = tmp_path_factory.mktemp("cot_run")
    cfg = write_cfg(folder / "cfg.yaml", keys_for(gpt2_folder, chain_data, folder / "ckpt", "cot", cot=True, c_thought=0, max_latent_stage=0))
    rc, out, err = run_in_process(cfg)
    assert rc == 0, err[-3000:]
    return {"cfg": cfg, "out": out, "err": err, "dir": str(folder / "ckpt" / "cot")}


# ------------------------------------------------------------------ 1. every method, end to end
# method -> (extra keys, wrapper checkpoint?, latents in the eval prompt at epoch 1 and 2, markers?)
METHODS = {
    "coconut": ({"coconut": True}, True, (0, 1), True),
    "cot": ({"cot": True}, False, (0, 0), False),
    "no_cot": ({"no_cot": True}, False, (0, 0), False),
    "no_thoughts": ({"no_thoughts": True}, False, (0, 0), False),
    "pause_as_thought": ({"pause_as_thought": True}, False, (0, 1), True),
    "no_curriculum": ({"coconut": True, "no_curriculum": True}, True, (1, 1), True),
    "coconut_llama": ({"coconut": True}, True, (0, 1), True),
}


@pytest.mark.parametrize("method", list(METHODS))
def test_method_runs_two_epochs(method, request, tmp_path, gpt2_folder, llama_folder, chain_data):
    extra, wrapper, latents, markers = METHODS[method]
    if method in ("coconut", "cot"):
        result = request.getfixturevalue(f"{method}_run")
        out, save_dir = result["out"], result["dir"]
    else:
        folder = llama_folder if method == "coconut_llama" else gpt2_folder
        cfg = write_cfg(tmp_path / "cfg.yaml", keys_for(folder, chain_data, tmp_path / "ckpt", method, **extra))
        rc, out, err = run_in_process(cfg)
        assert rc == 0, err[-3000:]
        save_dir = str(tmp_path / "ckpt" / method)

    assert len(acc_lines(out)) == 2, out  # one Accuracy and one CoT line per epoch
    assert list_checkpoints(save_dir) == [1, 2]
    for epoch in (1, 2):
        state = load(os.path.join(save_dir, f"checkpoint_{epoch}"))
        assert state and all(isinstance(v, torch.Tensor) for v in state.values())
        prefixed = [k.startswith(PREFIX) for k in state]
        assert all(prefixed) if wrapper else not any(prefixed), sorted(state)[:3]

    # The method's layout shows in the generated text (prompt included): markers, latents per stage.
    outputs = FULL_RE.findall(out)
    assert len(outputs) == 2 * SAMPLES_SHOWN, out  # the first five answers, as published, each epoch
    for i, text in enumerate(outputs):
        assert (START in text and END in text) == markers, text
        assert text.count(LATENT) == latents[i // SAMPLES_SHOWN], (i, text)


# ------------------------------------------------------------------ demo path
DEMO_YAML = os.path.join(REPO, "args", "demo.yaml")


def with_option(args: list, option: str, value: str) -> list:
    """args with `option`'s value replaced (or the option added)."""
    out = list(args)
    if option in out:
        out[out.index(option) + 1] = value
    else:
        out += [option, value]
    return out


def test_demo_config_is_a_plain_relative_coconut_run():
    config = load_config(DEMO_YAML)
    assert config.coconut and not config.debug and not config.only_eval
    assert config.load_model_path is None and config.resume == 0
    # relative paths, so `python run.py args/demo.yaml` works in any checkout
    for path in (config.model_id, config.train_path, config.val_path, config.save_path):
        assert not os.path.isabs(path), path
    assert config.save_dir == os.path.join("checkpoints", "demo")
    assert config.train_path == "data/demo/prosqa_train.json"
    assert config.val_path == "data/demo/prosqa_valid.json"
    assert os.path.isfile(os.path.join(REPO, config.model_id, "config.json"))
    data_args = makefile_demo_data_args()
    assert "--output_dir" not in data_args  # the recipe names data/demo itself
    min_steps = int(data_args[data_args.index("--min_steps") + 1])
    max_steps = int(data_args[data_args.index("--max_steps") + 1])
    assert 3 <= min_steps <= max_steps
    # the whole curriculum: chain of thought first, and by the last epoch every step of
    # every example is a continuous thought
    stages = [config.scheduled_stage(epoch) for epoch in range(config.num_epochs)]
    assert stages[0] == 0 and stages[-1] >= min(max_steps, config.max_latent_stage)
    assert max_steps <= config.max_latent_stage or stages[-1] > config.max_latent_stage


def shortened_demo(tmp_path, model_id: str) -> tuple:
    """The Makefile's data command on a tiny split and args/demo.yaml cut to 2 epochs.

    Returns (config path, run directory). Stage 0 then stage 1, checkpoints in tmp_path.
    """
    data_dir = tmp_path / "data"
    args = with_option(makefile_demo_data_args(), "--split_sizes", "24,6,0")
    assert prosqa.main(["--split", *args, "--output_dir", str(data_dir)]) == 0

    with open(DEMO_YAML) as f:
        raw = yaml.safe_load(f)
    raw.update(
        num_epochs=2,
        epochs_per_stage=1,
        save_path=str(tmp_path / "checkpoints"),
        train_path=str(data_dir / "prosqa_train.json"),
        val_path=str(data_dir / "prosqa_valid.json"),
        model_id=model_id,
        max_new_tokens=16,
    )
    config_path = tmp_path / "demo.yaml"
    config_path.write_text(yaml.safe_dump(raw))
    return str(config_path), tmp_path / "checkpoints" / raw["name"]


def assert_two_epochs(out: str, run_dir):
    accuracies = ACC_RE.findall(out)
    assert len(accuracies) == 2, out[-2000:]
    assert all(int(total) == 6 for _, total, _ in accuracies)
    assert "from scratch" in out
    saved = sorted(p.name for p in run_dir.iterdir() if p.name.startswith("checkpoint_"))
    assert {"checkpoint_1", "checkpoint_2"} <= set(saved), saved


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["python", "torchrun"])
def test_demo_path_shortened(tmp_path, launcher):
    """`make demo`, shortened: the Makefile's data command on a tiny split and
    args/demo.yaml cut to 2 epochs (stage 0, then latent stage 1), from the repository
    root with the config's relative model folder as committed, in one process and under
    `torchrun --nproc_per_node 2`. In one process, with the Makefile's thread count, it
    runs twice and must give the same losses and accuracies, digit for digit."""
    with open(DEMO_YAML) as f:
        model_id = yaml.safe_load(f)["model_id"]
    assert not os.path.isabs(model_id)
    config_path, run_dir = shortened_demo(tmp_path, model_id)
    if launcher == "python":
        env = sub_env(OMP_NUM_THREADS=makefile_variable("DEMO_THREADS"))
        proc = run_sub([RUN_PY, config_path], env=env, timeout=240, cwd=REPO)
        again_path, _ = shortened_demo(tmp_path / "again", model_id)
        again = run_sub([RUN_PY, again_path], env=env, timeout=240, cwd=REPO)
        assert again.returncode == 0, again.stderr[-4000:]
        numbers = re.compile(r"^(eval loss .*|Accuracy on validation set: .*)$", re.M)
        assert numbers.findall(proc.stdout) == numbers.findall(again.stdout)
        assert len(numbers.findall(proc.stdout)) == 4
    else:
        proc = run_sub(["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
                        "run.py", config_path], timeout=240, cwd=REPO)
        assert "world size = 2" in proc.stdout
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert_two_epochs(proc.stdout, run_dir)


# ------------------------------------------------------------------ 2. torchrun, two processes
def training_state(folder):
    """A .state folder's content: its plain values and its sharded part, whole."""
    return {"plain": load(folder / "train_state.pt"), "sharded": read_sharded_state(folder)}


def _per_rank_batch_latents(cfg, gpt2_folder):
    """Max latents of every training batch on each of 2 ranks (the number of passes - 1)."""
    from torch.utils.data import DistributedSampler

    from dataset import get_cot_latent_dataset, get_dataset
    from modeling import build_tokenizer

    config = load_config(cfg)
    tokenizer, ids = build_tokenizer(gpt2_folder)
    base = get_dataset(config.train_path, tokenizer)
    per_rank = {0: [], 1: []}
    for epoch in range(config.num_epochs):
        data = get_cot_latent_dataset(config.scheduled_stage(epoch), base, config, ids.start_id,
                                      ids.latent_id, ids.end_id, shuffle=True, epoch=epoch)
        for rank in (0, 1):
            order = list(DistributedSampler(data, 2, rank, shuffle=False))
            for b in range(0, len(order), config.batch_size_training):
                rows = [data[i]["input_ids"] for i in order[b: b + config.batch_size_training]]
                per_rank[rank].append(max(r.count(ids.latent_id) for r in rows))
    return per_rank


@pytest.mark.slow
def test_torchrun_two_processes(tmp_path, gpt2_folder, chain_data):
    keys = keys_for(gpt2_folder, chain_data, tmp_path / "ckpt", "ddp", coconut=True, max_latent_stage=2,
                    pad_latent_to_max=False, uniform_prob=0.5, batch_size_training=4, batch_size_eval=4)
    cfg = write_cfg(tmp_path / "cfg.yaml", keys)
    # the premise: the two processes see different latent counts in some batch, so the
    # number of continuous-thought passes must be agreed across ranks
    per_rank = _per_rank_batch_latents(cfg, gpt2_folder)
    assert per_rank[0] != per_rank[1], per_rank

    args = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()), RUN_PY, cfg]
    proc = run_sub(args, timeout=150)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert len(acc_lines(proc.stdout)) == 2, proc.stdout  # printed by rank 0 only, once per epoch
    assert "Running FSDP on rank = 0, world size = 2" in proc.stdout
    assert "rank = 1" not in proc.stdout
    save_dir = tmp_path / "ckpt" / "ddp"
    assert list_checkpoints(save_dir) == [1, 2]
    state = load(save_dir / "checkpoint_2")
    assert all(k.startswith(PREFIX) for k in state)


@pytest.mark.slow
def test_torchrun_with_blocks_that_keep_their_gathered_weights(tmp_path, gpt2_folder, chain_data):
    """reshard_after_forward: False under FSDP, over what follows an evaluation (whose
    passes leave the blocks' weights gathered): a new AdamW (reset_optimizer, stage 0 ->
    1) trains as FSDP's default does (the weights kept over accumulated micro-batches),
    the same lines and checkpoints; a save with the optimizer state (save_only_improve,
    the optimizer carried over) finds the parameters sharded."""
    def launch(name, **over):
        keys = keys_for(gpt2_folder, chain_data, tmp_path / "ckpt", name, coconut=True, batch_size_training=4,
                        batch_size_eval=4, **over)
        args = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()), RUN_PY,
                write_cfg(tmp_path / f"{name}.yaml", keys)]
        proc = run_sub(args, timeout=150)
        assert proc.returncode == 0, proc.stderr[-4000:]
        assert (startup.REGATHER_NOTE in proc.stdout) == keys["reshard_after_forward"]  # with the default only
        return re.findall(r"^(?:eval loss|Accuracy|CoT match|Full output).*$", proc.stdout, re.M)

    lines = {reshard: launch(f"reset_{reshard}", reset_optimizer=True, gradient_accumulation_steps=2,
                             reshard_after_forward=reshard) for reshard in (True, False)}
    assert len([line for line in lines[True] if line.startswith("eval loss")]) == 2
    assert lines[False] == lines[True]
    for epoch in (1, 2):
        assert_same_tensors(tmp_path / "ckpt" / "reset_False" / f"checkpoint_{epoch}",
                            tmp_path / "ckpt" / "reset_True" / f"checkpoint_{epoch}")
    launch("saved_after_evaluation", reset_optimizer=False, save_only_improve=True, gradient_accumulation_steps=4,
           reshard_after_forward=False)  # 6 batches: a partial last group


# ------------------------------------------------------------------ 3. only_eval reproduces the run's last evaluation
def test_only_eval_matches_end_of_run(tmp_path, coconut_run):
    keys = yaml.safe_load(open(coconut_run["cfg"]))
    checkpoint_2 = os.path.join(coconut_run["dir"], "checkpoint_2")
    keys.update(only_eval=True, load_model_path=checkpoint_2, resume=1)
    assert load_config(write_cfg(tmp_path / "probe.yaml", keys)).scheduled_stage(1) == 1  # the stage evaluated at the end
    rc, out, err = run_in_process(write_cfg(tmp_path / "eval.yaml", keys))
    assert rc == 0, err[-3000:]

    trained = coconut_run["out"]
    assert ACC_RE.findall(out) == ACC_RE.findall(trained)[-1:]
    assert COT_RE.findall(out) == COT_RE.findall(trained)[-1:]
    outputs, run_outputs = FULL_RE.findall(out), FULL_RE.findall(trained)
    assert outputs == run_outputs[-SAMPLES_SHOWN:]
    # not trivially equal: the model changed between epochs, so another checkpoint or
    # stage generates something else (compared after the prompt, whose latents differ)
    def generated(output):
        return output.split("<|end-latent|>")[-1]

    assert [generated(o) for o in run_outputs[:SAMPLES_SHOWN]] != [generated(o) for o in outputs]
    assert not os.path.exists(os.path.join(coconut_run["dir"], "checkpoint_3"))


def test_only_eval_without_load_model_path_evaluates_model_id(tmp_path, coconut_run):
    """As published: no load_model_path evaluates model_id as it loads; here a folder
    export.py wrote from checkpoint_2, whose trained latent-token rows must be kept (the
    run's own model folder has no weights: that is refused, test_preflight.py)."""
    import export

    keys = yaml.safe_load(open(coconut_run["cfg"]))
    exported = str(tmp_path / "export")
    assert export.main([coconut_run["cfg"], os.path.join(coconut_run["dir"], "checkpoint_2"), exported]) == 0
    keys.update(only_eval=True, model_id=exported, resume=1)
    rc, out, err = run_in_process(write_cfg(tmp_path / "eval.yaml", keys))
    assert rc == 0, err[-3000:]
    trained = coconut_run["out"]
    assert ACC_RE.findall(out) == ACC_RE.findall(trained)[-1:]
    assert FULL_RE.findall(out) == FULL_RE.findall(trained)[-SAMPLES_SHOWN:]


@pytest.mark.slow
def test_only_eval_under_torchrun_answers_as_one_process(tmp_path, coconut_run):
    """Two processes (rank 0's model replicated, each answering every other question)
    print the lines the run printed at its last evaluation."""
    keys = yaml.safe_load(open(coconut_run["cfg"]))
    keys.update(only_eval=True, load_model_path=os.path.join(coconut_run["dir"], "checkpoint_2"), resume=1)
    cfg = write_cfg(tmp_path / "eval.yaml", keys)
    proc = run_sub(["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
                    RUN_PY, cfg], timeout=150)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Running DDP on rank = 0, world size = 2" in proc.stdout
    trained = coconut_run["out"]
    assert ACC_RE.findall(proc.stdout) == ACC_RE.findall(trained)[-1:]
    assert COT_RE.findall(proc.stdout) == COT_RE.findall(trained)[-1:]


def test_an_effective_batch_larger_than_the_training_set_is_said(tmp_path, gpt2_folder, chain_data):
    keys = keys_for(gpt2_folder, chain_data, tmp_path / "ckpt", "big", coconut=True, num_epochs=1, debug=True,
                    batch_size_training=10, gradient_accumulation_steps=5, max_new_tokens=2)
    rc, out, err = run_in_process(write_cfg(tmp_path / "cfg.yaml", keys))
    assert rc == 0, err[-3000:]
    assert ("warning: the effective batch (50) is larger than the training set (48 examples): one optimizer step per "
            "epoch") in out


def test_gradient_accumulation_steps_as_one_batch_of_all_its_micro_batches(tmp_path):
    """batch_size_training 2 with gradient_accumulation_steps 2 takes the optimizer steps
    of batch_size_training 4: examples with equal token counts (each micro-batch's mean
    weighs the same), one epoch, the same weights; batch 2 alone steps twice as often
    (the premise: the comparison can tell)."""
    import random

    from builders import chain_example
    from test_scale import model_folder

    model = model_folder(tmp_path / "model")  # no dropout: its masks would differ with the batching
    rng = random.Random(0)
    data = {part: str(tmp_path / f"{part}.json") for part in ("train", "val")}
    with open(data["train"], "w") as f:
        json.dump([chain_example(rng, 2) for _ in range(8)], f)
    with open(data["val"], "w") as f:
        json.dump([chain_example(rng, 2) for _ in range(2)], f)

    def weights(batch, accumulation):
        name = f"b{batch}a{accumulation}"
        keys = keys_for(model, data, tmp_path / "ckpt", name, num_epochs=1, batch_size_training=batch,
                        gradient_accumulation_steps=accumulation, max_new_tokens=2, lr=1e-2, cot=True)
        rc, _, err = run_in_process(write_cfg(tmp_path / f"{name}.yaml", keys))
        assert rc == 0, err[-3000:]
        return load(tmp_path / "ckpt" / name / "checkpoint_1")

    whole, accumulated, alone = weights(4, 1), weights(2, 2), weights(2, 1)
    def largest_difference(other):
        return max(float((other[k] - v).abs().max()) for k, v in whole.items())

    # float sums in another order, which Adam's first steps amplify where gradients are tiny
    assert largest_difference(accumulated) < 1e-4
    assert largest_difference(alone) > 1e-2


@pytest.mark.parametrize("reset", [False, "stage", "epoch"])
def test_the_training_loop_builds_a_new_adamw_where_the_reset_rule_says(tmp_path, gpt2_folder, chain_data, reset,
                                                                       monkeypatch):
    """TrainingRun, not only the rule: the epochs at which a new AdamW is built over 4
    epochs of 2 per stage equal the naive loop's (test_utils); the others keep training
    with the one before."""
    from test_utils import new_optimizer_epochs_naive

    built, real = [], trainer.new_optimizer

    def spy(model, config, start, epoch, env, log):
        built.append(epoch)
        return real(model, config, start, epoch, env, log)

    monkeypatch.setattr(trainer, "new_optimizer", spy)
    keys = keys_for(gpt2_folder, chain_data, tmp_path / "ckpt", f"reset_{reset}", coconut=True, num_epochs=4,
                    epochs_per_stage=2, max_new_tokens=2, reset_optimizer=reset)
    rc, _, err = run_in_process(write_cfg(tmp_path / "cfg.yaml", keys))
    assert rc == 0, err[-3000:]
    assert built == new_optimizer_epochs_naive(reset, 2, 4)
    assert built == {False: [0], "stage": [0, 2], "epoch": [0, 1, 2, 3]}[reset]  # the premise: they differ


def test_a_debug_run_evaluates_32_questions_and_writes_nothing(tmp_path, gpt2_folder, chain_data):
    """debug: True (SPEC §5): the first 32 validation examples, no checkpoint, no lock, no
    progress record, and no resume even from a folder that holds a checkpoint."""
    from builders import write_examples

    keys = keys_for(gpt2_folder, {"train": chain_data["train"], "val": write_examples(tmp_path / "val.json", 40)},
                    tmp_path / "ckpt", "debugged", coconut=True, num_epochs=2, max_new_tokens=2)
    rc, _, err = run_in_process(write_cfg(tmp_path / "first.yaml", {**keys, "num_epochs": 1}))
    assert rc == 0, err[-3000:]
    folder = tmp_path / "ckpt" / "debugged"
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    assert "checkpoint_1" in before  # the premise: a checkpoint a run would resume from
    rc, out, err = run_in_process(write_cfg(tmp_path / "debug.yaml", {**keys, "debug": True}))
    assert rc == 0, err[-3000:]
    assert "resume from that" not in out and epochs_started(err) == [1, 2]
    assert [total for _, total, _ in ACC_RE.findall(out)] == ["32", "32"]
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before  # nothing written, no lock taken


def test_save_only_improve_saves_the_epochs_that_beat_the_best_so_far(tmp_path, gpt2_folder, chain_data, monkeypatch):
    """Accuracies 0.5, 0.5, 0.75, 0.25 (set here: an untrained model answers nothing right):
    checkpoints 1 and 3 only (an equal accuracy is no improvement), best 0.75 recorded."""
    accuracies = iter([0.5, 0.5, 0.75, 0.25])

    def evaluate(self, stage):
        return {"eval/acc": next(accuracies), "eval/cot_em": 0.0}

    monkeypatch.setattr(trainer.TrainingRun, "evaluate", evaluate)
    keys = keys_for(gpt2_folder, chain_data, tmp_path / "ckpt", "improving", coconut=True, num_epochs=4,
                    save_only_improve=True, max_new_tokens=2)
    rc, out, err = run_in_process(write_cfg(tmp_path / "cfg.yaml", keys))
    assert rc == 0, err[-3000:]
    folder = tmp_path / "ckpt" / "improving"
    assert list_checkpoints(folder) == [1, 3]
    assert "not saving checkpoint_2, its accuracy 0.5 does not beat the best so far (0.5)" in out
    assert "not saving checkpoint_4, its accuracy 0.25 does not beat the best so far (0.75)" in out
    assert load_train_state(folder, 3)["best_acc"] == 0.75
    assert json.loads((folder / "progress.json").read_text()) == {"epochs_done": 4, "newest_checkpoint": 3,
                                                                   "best_acc": 0.75}


def test_a_save_only_improve_run_resumes_after_its_last_epoch_not_its_best(tmp_path, gpt2_folder, chain_data,
                                                                         monkeypatch):
    """Epochs that do not improve leave their state in .latest (the newest only), so a run
    stopped after one resumes after it instead of training again every epoch since its
    best; an epoch that improves is saved in the run folder and empties .latest. The
    stopped and relaunched run ends with the uninterrupted run's checkpoints."""
    accuracies = []

    def evaluate(self, stage):
        return {"eval/acc": accuracies.pop(0), "eval/cot_em": 0.0}

    monkeypatch.setattr(trainer.TrainingRun, "evaluate", evaluate)

    def launch(name, num_epochs, accs):
        accuracies[:] = accs
        keys = keys_for(gpt2_folder, chain_data, tmp_path / "ckpt", name, coconut=True, num_epochs=num_epochs,
                        save_only_improve=True, max_latent_stage=2)
        rc, out, err = run_in_process(write_cfg(tmp_path / f"{name}{num_epochs}.yaml", keys))
        assert rc == 0 and not accuracies, err[-3000:]
        return out, err

    launch("whole", 4, [0.5, 0.25, 0.25, 0.75])
    out, _ = launch("stopped", 3, [0.5, 0.25, 0.25])
    folder = tmp_path / "ckpt" / "stopped"
    latest = folder / ".latest"
    assert list_checkpoints(folder) == [1] and list_checkpoints(latest) == [3]
    assert sorted(os.listdir(latest)) == ["checkpoint_3", "checkpoint_3.state"]
    assert "its state is kept in .latest for a resume" in out
    out, err = launch("stopped", 4, [0.75])
    assert epochs_started(err) == [4] and "Loading from previous run epoch_3!" in out and "trained again" not in out
    assert list_checkpoints(folder) == [1, 4] and list_checkpoints(latest) == [] and not os.listdir(latest)
    whole = tmp_path / "ckpt" / "whole"
    assert list_checkpoints(whole) == [1, 4]
    assert_same_tensors(folder / "checkpoint_4", whole / "checkpoint_4")
    assert json.loads((folder / "progress.json").read_text()) == json.loads((whole / "progress.json").read_text())


def test_a_run_that_saves_every_epoch_empties_a_save_only_improve_launchs_latest(tmp_path, gpt2_folder, chain_data,
                                                                                  monkeypatch):
    """A folder trained with save_only_improve, then without: its .latest epoch is older
    than the checkpoints saved since, and would otherwise win a later save_only_improve
    resume and stay on disk."""
    monkeypatch.setattr(trainer.TrainingRun, "evaluate", lambda self, stage: {"eval/acc": 0.0, "eval/cot_em": 0.0})
    keys = keys_for(gpt2_folder, chain_data, tmp_path / "ckpt", "mixed", coconut=True, num_epochs=1,
                    save_only_improve=True)
    rc, out, err = run_in_process(write_cfg(tmp_path / "a.yaml", keys))
    folder = tmp_path / "ckpt" / "mixed"
    assert rc == 0 and list_checkpoints(folder / ".latest") == [1] and list_checkpoints(folder) == [], err[-3000:]
    rc, out, err = run_in_process(write_cfg(tmp_path / "b.yaml", {**keys, "num_epochs": 2, "save_only_improve": False}))
    assert rc == 0 and "Loading from previous run epoch_1!" in out, err[-3000:]
    assert list_checkpoints(folder) == [2] and not os.listdir(folder / ".latest")


def test_a_stop_between_recording_an_epoch_and_marking_it_evaluated_loses_no_accuracy(
        tmp_path, gpt2_folder, chain_data, monkeypatch):
    """The progress record (with the epoch's accuracy) is written before the checkpoint is
    marked evaluated: a stop in between leaves the record whole and the epoch unmarked, so
    the relaunch evaluates it again. The other order lost that accuracy from the best."""
    import checkpoint

    accuracies = iter([0.25, 0.75, 0.75])  # epochs 1 and 2, then epoch 2 again on the relaunch

    class Stopped(Exception):
        pass

    def evaluate(self, stage):
        return {"eval/acc": next(accuracies), "eval/cot_em": 0.0}

    mark_evaluated = checkpoint.mark_evaluated

    def stop_at_epoch_2(save_dir, epoch):
        if epoch == 2:
            raise Stopped
        mark_evaluated(save_dir, epoch)

    monkeypatch.setattr(trainer.TrainingRun, "evaluate", evaluate)
    monkeypatch.setattr(checkpoint, "mark_evaluated", stop_at_epoch_2)
    keys = keys_for(gpt2_folder, chain_data, tmp_path / "ckpt", "stopped", coconut=True, max_new_tokens=2)
    cfg = write_cfg(tmp_path / "cfg.yaml", keys)
    with pytest.raises(Stopped):
        run_in_process(cfg)
    folder = tmp_path / "ckpt" / "stopped"
    record = {"epochs_done": 2, "newest_checkpoint": 2, "best_acc": 0.75}
    assert json.loads((folder / "progress.json").read_text()) == record
    assert load_train_state(folder, 2)["evaluated"] is False
    monkeypatch.setattr(checkpoint, "mark_evaluated", mark_evaluated)
    rc, out, err = run_in_process(cfg)
    assert rc == 0, err[-3000:]
    assert "evaluating it first" in out and epochs_started(err) == []
    assert json.loads((folder / "progress.json").read_text()) == record
    assert load_train_state(folder, 2)["evaluated"] is True


# ------------------------------------------------------------------ 4. kill and resume
def _kill_config(tmp_path, gpt2_folder, chain_data, name):
    keys = keys_for(gpt2_folder, chain_data, tmp_path / "ckpt", name, coconut=True, uniform_prob=0.3)
    return write_cfg(tmp_path / f"{name}.yaml", keys), tmp_path / "ckpt" / name


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, gpt2_folder, chain_data):
    """The uninterrupted run the killed ones must reproduce exactly (a subprocess too: same threads)."""
    tmp_path = tmp_path_factory.mktemp("reference")
    cfg, save_dir = _kill_config(tmp_path, gpt2_folder, chain_data, "reference")
    start = time.monotonic()
    proc = run_sub([RUN_PY, cfg])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert epochs_started(proc.stderr) == [1, 2]
    return {"dir": save_dir, "seconds": time.monotonic() - start, "out": proc.stdout}


def _start(cfg, log_dir, tag):
    out_path, err_path = log_dir / f"{tag}.out", log_dir / f"{tag}.err"
    with open(out_path, "w") as out, open(err_path, "w") as err:
        proc = subprocess.Popen([sys.executable, RUN_PY, cfg], cwd=REPO, env=sub_env(), stdout=out, stderr=err)
    return proc, out_path, err_path


@pytest.mark.parametrize("train_state, unevaluated", [
    ({"epoch": 2, "best_acc": 0.5, "evaluated": False}, True), ({"epoch": 2, "best_acc": 0.5, "evaluated": True}, False),
    ({"epoch": 2, "best_acc": 0.5}, False),  # an earlier version's: not judged
    ({}, False), (None, False)])  # the published layout (no .state), no resume
def test_only_a_checkpoint_marked_before_its_evaluation_is_evaluated_again(train_state, unevaluated):
    from startup import never_evaluated

    assert never_evaluated(train_state) is unevaluated


def test_a_checkpoint_saved_before_a_kill_in_its_evaluation_is_evaluated_on_relaunch(tmp_path, coconut_run):
    """A run killed during its last epoch's evaluation has every checkpoint but not that
    epoch's accuracy: the relaunch evaluates it (the lines the uninterrupted run printed),
    records it, and trains nothing; a second relaunch finds the run finished."""
    import shutil

    from checkpoint import PLAIN_STATE_FILE, atomic_torch_save

    save_dir = tmp_path / "ckpt" / "coconut"
    shutil.copytree(coconut_run["dir"], save_dir)
    record = json.loads((save_dir / "progress.json").read_text())
    assert record["epochs_done"] == record["newest_checkpoint"] == 2
    # the folder as the kill left it: checkpoint_2 saved, its evaluation not done, nor recorded
    (save_dir / "progress.json").write_text(json.dumps({**record, "epochs_done": 1, "newest_checkpoint": 1}))
    plain = save_dir / "checkpoint_2.state" / PLAIN_STATE_FILE
    saved = torch.load(plain, weights_only=True)
    assert saved["evaluated"] is True
    atomic_torch_save({**saved, "evaluated": False}, plain)
    # and the .state of an older checkpoint, which the save would have dropped next
    shutil.copy(save_dir / "checkpoint_1", save_dir / "checkpoint_0")
    shutil.copytree(save_dir / "checkpoint_1.state", save_dir / "checkpoint_0.state")
    keys = yaml.safe_load(open(coconut_run["cfg"]))
    cfg = write_cfg(tmp_path / "cfg.yaml", {**keys, "save_path": str(tmp_path / "ckpt")})
    rc, out, err = run_in_process(cfg)
    assert rc == 0, err[-3000:]
    assert "checkpoint_2 was saved but its epoch's evaluation did not finish: evaluating it first" in out
    assert ACC_RE.findall(out) == ACC_RE.findall(coconut_run["out"])[-1:] and epochs_started(err) == []
    assert json.loads((save_dir / "progress.json").read_text()) == record
    assert torch.load(plain, weights_only=True) == saved
    assert not (save_dir / "checkpoint_0.state").exists() and (save_dir / "checkpoint_1.state").is_dir()
    assert (save_dir / "checkpoint_0").is_file()  # model files stay
    rc, out, _ = run_in_process(cfg)
    assert rc == 0 and "this run is finished" in out and not ACC_RE.findall(out)


@pytest.mark.slow
@pytest.mark.parametrize("when", ["after_checkpoint_1", "random"])
def test_kill_and_resume_is_exact(when, tmp_path, gpt2_folder, chain_data, reference_run):
    cfg, save_dir = _kill_config(tmp_path, gpt2_folder, chain_data, "killed")
    proc, _, _ = _start(cfg, tmp_path, "first")
    if when == "after_checkpoint_1":
        deadline = time.monotonic() + 120
        while not (save_dir / "checkpoint_1").exists():
            assert proc.poll() is None, "the run ended before writing checkpoint_1"
            assert time.monotonic() < deadline
            time.sleep(0.02)
    else:
        delay = random.uniform(1.0, reference_run["seconds"])
        print(f"killing after {delay:.2f} s")
        time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = max(list_checkpoints(save_dir), default=0)
    if save_dir.is_dir():  # what a kill during a small file's write leaves: tidied by the relaunch
        (save_dir / ".config.yaml.tmp-1-ab").write_text("half")
    if when == "after_checkpoint_1":
        assert done == 1
    # a checkpoint is saved before its epoch's evaluation: was that evaluation recorded?
    evaluated = done == 0 or load_train_state(save_dir, done)["evaluated"]
    print(f"killed with {done} checkpoints, the last {'evaluated' if evaluated else 'not evaluated'}")

    proc, out_path, err_path = _start(cfg, tmp_path, "second")
    assert proc.wait(timeout=300) == 0, err_path.read_text()[-3000:]
    out, err = out_path.read_text(), err_path.read_text()
    if done == 2 and evaluated:  # killed after its last evaluation: nothing left to do
        assert "already holds checkpoint_2 and num_epochs is 2: this run is finished" in out
    elif done:
        assert f"Loading from previous run epoch_{done}!" in out
        assert (f"restored the optimizer state of epoch {done}" in out) == (done < 2)
    else:
        assert "resume from that" not in out
    assert (f"checkpoint_{done} was saved but its epoch's evaluation did not finish" in out) == (not evaluated)
    # no finished epoch is trained again, every evaluation that did not finish runs, as the uninterrupted run did it
    assert epochs_started(err) == list(range(done + 1, 3))
    evaluations = 2 - done + (not evaluated)
    assert len(acc_lines(out)) == evaluations
    assert ACC_RE.findall(out) == ACC_RE.findall(reference_run["out"])[2 - evaluations:]
    assert load_train_state(save_dir, 2)["evaluated"] is True

    assert list_checkpoints(save_dir) == [1, 2]
    assert not [p for p in save_dir.rglob("*") if ".tmp-" in p.name]
    for epoch in (1, 2):
        assert_same_tensors(save_dir / f"checkpoint_{epoch}", reference_run["dir"] / f"checkpoint_{epoch}")
        name = f"checkpoint_{epoch}.state"  # optimizer state and best accuracy too
        assert_same_values(training_state(save_dir / name), training_state(reference_run["dir"] / name), name)


def test_only_the_newest_checkpoints_keep_their_training_state(tmp_path):
    """Every epoch keeps its weights; the .state files (optimizer: twice the model) are
    kept for the trainer.STATES_KEPT newest checkpoints, the resume point first."""
    from distributed import DistEnv
    from utils import Config

    config = Config.from_dict(dict(coconut=True, train_path="t.json", val_path="v.json",
                                   save_path=str(tmp_path), name="prune"))
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    save_dir = tmp_path / "prune"
    for epoch in range(1, 5):
        trainer.save_run_state(model, optimizer, config.save_dir, epoch, 0.0, DistEnv())
        assert list_checkpoints(save_dir) == list(range(1, epoch + 1))
        states = sorted(p.name for p in save_dir.iterdir() if p.name.endswith(".state"))
        assert states == [f"checkpoint_{e}.state" for e in range(max(1, epoch - trainer.STATES_KEPT + 1), epoch + 1)]
    assert read_sharded_state(save_dir / "checkpoint_4.state")["optimizer"]["state"]  # the newest keeps its AdamW moments
    assert load(save_dir / "checkpoint_1").keys() == model.state_dict().keys()


# ------------------------------------------------------------------ 5. checkpoints in the published layout
def _tiny_lr_keys(cfg_path, save_path, name, **over):
    """The config of a shared run with an lr so small that training barely moves the weights."""
    keys = yaml.safe_load(open(cfg_path))
    keys.update(save_path=str(save_path), name=name, lr=1e-9, weight_decay=0.0, **over)
    return keys


def test_cot_state_dict_into_coconut(tmp_path, cot_run, coconut_run):
    cot_state = load(os.path.join(cot_run["dir"], "checkpoint_2"))
    plain = tmp_path / "cot_model.pt"
    torch.save(cot_state, plain)  # the published layout: torch.save(model.state_dict())
    keys = _tiny_lr_keys(coconut_run["cfg"], tmp_path / "ckpt", "from_cot", load_model_path=str(plain), resume=1)
    rc, out, err = run_in_process(write_cfg(tmp_path / "cfg.yaml", keys))
    assert rc == 0, err[-3000:]
    assert f"Loading from {plain} and skip the first 1 epochs" in out
    assert f"the weights come from {plain}" in out and "from scratch" not in out
    assert epochs_started(err) == [2] and len(acc_lines(out)) == 1
    save_dir = tmp_path / "ckpt" / "from_cot"
    assert list_checkpoints(save_dir) == [2]
    coconut_state = load(save_dir / "checkpoint_2")
    # the CoT weights are in the coconut model (the embeddings gained the 3 new rows)
    for key, value in cot_state.items():
        mine = coconut_state[PREFIX + key]
        if mine.shape != value.shape:
            assert mine.shape[0] == value.shape[0] + 3 and mine.shape[1:] == value.shape[1:], key
            mine = mine[: value.shape[0]]
        torch.testing.assert_close(mine, value, atol=1e-6, rtol=0, msg=key)


def _published_coconut_state(path):
    """A coconut checkpoint as the published code wrote it: base_causallm.* plus `embedding.weight`."""
    state = load(path)
    state["embedding.weight"] = state[PREFIX + "transformer.wte.weight"]
    return state


def test_published_coconut_state_dict_loads(tmp_path, coconut_run):
    published = tmp_path / "published_checkpoint"
    torch.save(_published_coconut_state(os.path.join(coconut_run["dir"], "checkpoint_2")), published)
    keys = yaml.safe_load(open(coconut_run["cfg"]))
    keys.update(only_eval=True, load_model_path=str(published), resume=1)
    rc, out, err = run_in_process(write_cfg(tmp_path / "cfg.yaml", keys))
    assert rc == 0, err[-3000:]
    # the weights of epoch 2 are what generates: same outputs as the end of that run
    assert FULL_RE.findall(out) == FULL_RE.findall(coconut_run["out"])[-SAMPLES_SHOWN:]
    assert ACC_RE.findall(out) == ACC_RE.findall(coconut_run["out"])[-1:]


@pytest.mark.slow
def test_coconut_state_dict_into_cot_fails(tmp_path, cot_run, coconut_run):
    bad = os.path.join(coconut_run["dir"], "checkpoint_2")
    keys = yaml.safe_load(open(cot_run["cfg"]))
    keys.update(save_path=str(tmp_path / "ckpt"), load_model_path=bad, resume=1)
    proc = run_sub([RUN_PY, write_cfg(tmp_path / "cfg.yaml", keys)])
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and bad in lines[0] and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "ckpt").exists()


def test_resume_from_published_layout_folder(tmp_path, coconut_run):
    save_dir = tmp_path / "ckpt" / "published"
    save_dir.mkdir(parents=True)
    for epoch in (1, 2):
        torch.save(_published_coconut_state(os.path.join(coconut_run["dir"], f"checkpoint_{epoch}")),
                   save_dir / f"checkpoint_{epoch}")
    (save_dir / "notes.txt").write_text("my notes\n")
    (save_dir / "checkpoint_1.tmp").write_bytes(b"\x00 half a file")
    keys = _tiny_lr_keys(coconut_run["cfg"], tmp_path / "ckpt", "published", num_epochs=3, resume=0)
    rc, out, err = run_in_process(write_cfg(tmp_path / "cfg.yaml", keys))
    assert rc == 0, err[-3000:]
    assert "Loading from previous run epoch_2!" in out
    assert "no optimizer state (no .state beside it: the published layout, or pruned): starting a new AdamW" in out
    assert epochs_started(err) == [3] and len(acc_lines(out)) == 1
    assert list_checkpoints(save_dir) == [1, 2, 3]
    assert (save_dir / "notes.txt").read_text() == "my notes\n"
    # epoch 3 started from checkpoint_2's weights
    before, after = load(save_dir / "checkpoint_2"), load(save_dir / "checkpoint_3")
    for key, value in after.items():
        torch.testing.assert_close(value, before[key], atol=1e-6, rtol=0, msg=key)


# ------------------------------------------------------------------ 6. bad input: one line, exit 2, nothing written
def _bad_cases(folder, gpt2_folder, chain_data):
    """name -> (argv after run.py, text the one stderr line must contain)."""
    def cfg(name, **over):
        keys = keys_for(gpt2_folder, chain_data, folder / "ckpt", name, coconut=True)
        keys.update(over)
        return write_cfg(folder / f"{name}.yaml", keys)

    def data(name, content):
        path = folder / name
        path.write_text(content if isinstance(content, str) else json.dumps(content))
        return str(path)

    good = {"question": "q", "answer": "a", "steps": ["s"]}
    missing = str(folder / "nowhere" / "train.json")
    no_model = str(folder / "nowhere" / "model.pt")
    not_json = data("val_not_json.json", "[{'question': 1,")
    no_steps = data("no_steps.json", [good, {"question": "q", "answer": "a"}])
    bad_steps = data("bad_steps.json", [good, good, {"question": "q", "answer": "a", "steps": ["ok", 3]}])
    return {
        "no_argument": ([], "usage"),
        "unknown_key": ([cfg("typo", c_thougth=1)], "did you mean 'c_thought'"),
        "wrong_type": ([cfg("type", num_epochs="two")], "'num_epochs'"),
        "two_methods": ([cfg("two", cot=True)], "coconut, cot"),
        "missing_train_path": ([cfg("train", train_path=missing)], missing),
        "missing_load_model_path": ([cfg("load", load_model_path=no_model)], no_model),
        "val_not_json": ([cfg("val", val_path=not_json)], not_json),
        "example_without_steps": ([cfg("nosteps", train_path=no_steps)], "example 1: missing key 'steps'"),
        "steps_not_strings": ([cfg("badsteps", val_path=bad_steps)], "example 2: 'steps' must be a list of strings"),
    }


BAD_CASES = ["no_argument", "unknown_key", "wrong_type", "two_methods", "missing_train_path",
             "missing_load_model_path", "val_not_json", "example_without_steps", "steps_not_strings"]


@pytest.fixture(scope="module")
def bad_runs(tmp_path_factory, gpt2_folder, chain_data):
    """Every bad-input run, three at a time (each pays python start-up and run.py's imports, ~4 s of CPU)."""
    folder = tmp_path_factory.mktemp("bad")
    cases = _bad_cases(folder, gpt2_folder, chain_data)
    results = {}

    def one(name):
        proc = run_sub([RUN_PY, *cases[name][0]], timeout=120)
        results[name] = (proc.returncode, proc.stdout, proc.stderr, cases[name][1])

    with concurrent.futures.ThreadPoolExecutor(max_workers=3) as pool:
        list(pool.map(one, cases))
    return results, folder


@pytest.mark.slow
@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_fails_cleanly(case, bad_runs):
    results, folder = bad_runs
    rc, out, err, expected = results[case]
    assert rc == 2, (rc, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert expected in lines[0], lines[0]
    assert "Traceback" not in err
    assert not (folder / "ckpt").exists()


# ------------------------------------------------------------------ 7. wandb without login
@pytest.mark.slow
def test_wandb_without_login_logs_offline(tmp_path, gpt2_folder, chain_data):
    """Needs the wandb package; its offline start adds about 5 s."""
    pytest.importorskip("wandb")
    keys = keys_for(gpt2_folder, chain_data, tmp_path / "ckpt", "wandb", coconut=True, num_epochs=1, debug=False)
    cfg = write_cfg(tmp_path / "cfg.yaml", keys)
    env = sub_env(HOME=str(tmp_path))
    del env["WANDB_MODE"]
    proc = run_sub([RUN_PY, cfg], env=env, cwd=tmp_path, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    offline = [line for line in proc.stdout.splitlines() if "offline" in line]
    assert len(offline) == 1 and offline[0].startswith("wandb:"), proc.stdout
    assert len(acc_lines(proc.stdout)) == 1
    assert (tmp_path / "wandb").is_dir()  # the offline run's files, for `wandb sync`


@pytest.mark.parametrize("case, logged_in", [
    ("nothing", False), ("api key", True), ("netrc for wandb.ai", True), ("netrc for another host", False),
    ("netrc for the installed wandb's default server", True),
    ("self-hosted netrc", True), ("self-hosted with a port", True), ("server from wandb login --host", True),
    ("NETRC file", True), ("NETRC without the entry, ~/.netrc with it", False), ("unreadable netrc", False)])
def test_wandb_credentials_are_found_where_wandb_looks_for_them(tmp_path, monkeypatch, case, logged_in):
    """Not logged in means offline logging, logged in means wandb.init would find a key: a
    self-hosted server's entry (named with its port when it has one, the server named by
    WANDB_BASE_URL or by `wandb login --host`'s settings file) is a login; wandb reads one
    netrc file only (NETRC when set)."""
    for key in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL", "NETRC", "WANDB_CONFIG_DIR"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))

    def entry(path, host):
        path.write_text(f"machine {host}\n  login user\n  password {'k' * 40}\n")
        path.chmod(0o600)

    if case == "api key":
        monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    elif case == "netrc for wandb.ai":
        entry(tmp_path / ".netrc", "api.wandb.ai")
    elif case == "netrc for the installed wandb's default server":  # what `wandb login` writes (wandb 0.31: not api.wandb.ai)
        from urllib.parse import urlparse

        entry(tmp_path / ".netrc", urlparse(wandb_setup._default_base_url()).hostname)
    elif case == "netrc for another host":
        entry(tmp_path / ".netrc", "wandb.corp.example")
    elif case == "self-hosted netrc":
        entry(tmp_path / ".netrc", "wandb.corp.example")
        monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.corp.example")
    elif case == "self-hosted with a port":
        entry(tmp_path / ".netrc", "localhost:8080")
        monkeypatch.setenv("WANDB_BASE_URL", "http://localhost:8080")
    elif case == "server from wandb login --host":
        entry(tmp_path / ".netrc", "wandb.corp.example")
        (tmp_path / ".config" / "wandb").mkdir(parents=True)
        (tmp_path / ".config" / "wandb" / "settings").write_text("[default]\nbase_url = https://wandb.corp.example\n")
    elif case == "NETRC file":
        entry(tmp_path / "elsewhere", "api.wandb.ai")
        monkeypatch.setenv("NETRC", str(tmp_path / "elsewhere"))
    elif case == "NETRC without the entry, ~/.netrc with it":
        entry(tmp_path / "elsewhere", "another.example")
        entry(tmp_path / ".netrc", "api.wandb.ai")
        monkeypatch.setenv("NETRC", str(tmp_path / "elsewhere"))
    elif case == "unreadable netrc":
        (tmp_path / ".netrc").mkdir()
    assert wandb_setup.logged_in() is logged_in


@pytest.mark.parametrize("mode, says, before_the_build", [
    ("disable", "WANDB_MODE 'disable' is not a wandb mode (online, offline, disabled", True),
    ("online", "wandb could not start (UsageError: ", False),  # no credentials: wandb.init's own refusal
])
def test_a_wandb_mode_wandb_refuses_is_one_line(tmp_path, gpt2_folder, chain_data, mode, says, before_the_build,
                                                monkeypatch):
    """wandb.init refused these with a traceback after the model was built and the data
    tokenized: a mode that is not one (a typo) is now refused by the pre-flight; online
    without credentials is wandb's to judge (its servers and stores change between
    versions), in one line. only_eval and debug runs do not log: the mode is not theirs."""
    pytest.importorskip("wandb")
    keys = keys_for(gpt2_folder, chain_data, tmp_path / "ckpt", "wandb", coconut=True, num_epochs=1, debug=False)
    cfg = write_cfg(tmp_path / "cfg.yaml", keys)
    env = sub_env(HOME=str(tmp_path), WANDB_MODE=mode)
    for key in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "NETRC"):
        env.pop(key, None)
    proc = run_sub([RUN_PY, cfg], env=env, cwd=tmp_path, timeout=180)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]  # beside progress bars
    assert proc.returncode == 2 and len(errors) == 1 and errors[0].startswith(f"error: {says}"), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and ("pre-flight checks passed" not in proc.stdout) == before_the_build
    if before_the_build:  # the mode of a run that does not log is not checked
        monkeypatch.setenv("WANDB_MODE", mode)
        with pytest.raises(wandb_setup.UserError, match="is not a wandb mode"):
            wandb_setup.check_mode(load_config(cfg))
        for quiet in ("debug", "only_eval"):
            wandb_setup.check_mode(load_config(cfg, {quiet: True}))


def test_a_relaunched_run_logs_to_the_same_wandb_run(tmp_path, gpt2_folder, chain_data, monkeypatch):
    """wandb.init gets the run folder's id, made at the first launch, and resume="allow";
    another folder gets another id."""
    wandb = pytest.importorskip("wandb")
    calls, real_init = [], wandb.init

    def init(**kwargs):
        calls.append(kwargs)
        return real_init(**kwargs)  # WANDB_MODE=disabled (run_in_process)

    monkeypatch.setattr(wandb, "init", init)
    monkeypatch.setattr(trainer.TrainingRun, "evaluate", lambda self, stage: {"eval/acc": 0.0, "eval/cot_em": 0.0})
    keys = keys_for(gpt2_folder, chain_data, tmp_path / "ckpt", "first", coconut=True, num_epochs=1)
    for cfg in (write_cfg(tmp_path / "a.yaml", keys), write_cfg(tmp_path / "b.yaml", {**keys, "num_epochs": 2}),
                write_cfg(tmp_path / "c.yaml", {**keys, "name": "second"})):
        rc, _, err = run_in_process(cfg)
        assert rc == 0, err[-3000:]
    assert [call["resume"] for call in calls] == ["allow"] * 3
    ids = [call["id"] for call in calls]
    assert ids[0] == ids[1] != ids[2] and ids[0] == (tmp_path / "ckpt" / "first" / "wandb_run_id").read_text()


def test_a_relaunch_says_which_config_keys_changed_since_the_launch_that_saved_the_newest_epoch(
        tmp_path, gpt2_folder, chain_data, monkeypatch):
    """The run folder keeps the config of the launch that saved its newest epoch
    (config.yaml, written at a launch's first save); a resume names every key that
    differs, not resume or load_model_path, which a resume ignores (the latter said in a
    line of its own); a launch that saved nothing changes no record."""
    from utils import load_config

    class Stopped(Exception):
        pass

    monkeypatch.setattr(trainer.TrainingRun, "evaluate", lambda self, stage: {"eval/acc": 0.0, "eval/cot_em": 0.0})
    keys = keys_for(gpt2_folder, chain_data, tmp_path / "ckpt", "drift", coconut=True, num_epochs=1)
    rc, out, err = run_in_process(write_cfg(tmp_path / "a.yaml", keys))
    assert rc == 0, err[-3000:]
    assert "differs" not in out
    edited = write_cfg(tmp_path / "b.yaml", {**keys, "num_epochs": 2, "lr": 2e-3, "seed": 7, "resume": 1,
                                             "load_model_path": str(tmp_path / "elsewhere")})
    rc, out, err = run_in_process(edited)
    assert rc == 0, err[-3000:]
    assert [line for line in out.splitlines() if "differs" in line] == [
        "the config differs from the launch that saved this run folder's newest epoch (seed 0 -> 7, num_epochs 1 -> 2, "
        "lr 0.001 -> 0.002): from epoch 2 on, the run trains with the new values"]
    assert f"load_model_path {tmp_path / 'elsewhere'} is not loaded either: the run goes on from its own checkpoint_1" in out
    recorded = yaml.safe_load((tmp_path / "ckpt" / "drift" / "config.yaml").read_text())
    assert recorded == {**load_config(edited).to_dict(), "processes": 1}
    assert "effective batch: 8 per process x 1 accumulation step(s) x 1 process(es) = 8 examples per optimizer step" in out
    assert "warning: the effective batch" not in out  # 48 training examples
    # a launch with another lr stopped before it saved: the record stays that of the launch that saved epoch 2
    with monkeypatch.context() as stop:
        stop.setattr(trainer.TrainingRun, "train_epoch", lambda self, stage, epoch: (_ for _ in ()).throw(Stopped()))
        with pytest.raises(Stopped):
            run_in_process(write_cfg(tmp_path / "c.yaml", {**keys, "num_epochs": 3, "lr": 5e-3, "seed": 7}))
    assert yaml.safe_load((tmp_path / "ckpt" / "drift" / "config.yaml").read_text()) == recorded
    rc, out, err = run_in_process(write_cfg(tmp_path / "d.yaml", {**keys, "num_epochs": 3, "lr": 5e-3, "seed": 7}))
    assert rc == 0, err[-3000:]
    assert "newest epoch (num_epochs 2 -> 3, lr 0.002 -> 0.005): from epoch 3 on" in out
    assert "load_model_path" not in out.split("\n", 1)[1]  # past the Config line
