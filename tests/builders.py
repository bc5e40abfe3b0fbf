"""Builders shared by the tests: tiny data sets and model folders, end-to-end run
helpers (configs, in-process and subprocess runs, output parsing), and the tiny trained
and exported models (built once per session, cached under pytest's base temporary folder).
"""

import contextlib
import io
import json
import os
import random
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
import yaml
from tiny import make_tokenizer
from transformers import GPT2Config, LlamaConfig

import checkpoint
import export
from modeling import build_model
from preprocessing import prosqa
from utils import load_config

# ------------------------------------------------------------------ data and model folders
NAMES = ["Tom", "Sally", "Alex"]
WORDS = ["wumpus", "yumpus", "rempus", "gorpus", "lempus", "zumpus", "brimpus", "numpus"]


def chain_example(rng: random.Random, n_steps: int) -> dict:
    """A small ProsQA-like example: a chain of 'Every X is a Y.' facts and a distractor."""
    name = rng.choice(NAMES)
    words = rng.sample(WORDS, n_steps + 2)
    chain, distractor = words[: n_steps + 1], words[-1]
    facts = [f"{name} is a {chain[0]}."] + [f"Every {a} is a {b}." for a, b in zip(chain, chain[1:])]
    steps = list(facts)
    rng.shuffle(facts)
    options = [chain[-1], distractor]
    rng.shuffle(options)
    question = " ".join(facts) + f" Is {name} a {options[0]} or {options[1]}?"
    return {"question": question, "steps": steps[:-1] if n_steps > 1 else steps, "answer": f"{name} is a {chain[-1]}."}


def write_examples(path, n, seed=0, steps=(2, 3)):
    rng = random.Random(seed)
    data = [chain_example(rng, rng.choice(steps)) for _ in range(n)]
    with open(path, "w") as f:
        json.dump(data, f)
    return str(path)


def write_model_folder(folder, arch="gpt2"):
    """config.json + tokenizer, no weights: run.py trains it from scratch."""
    os.makedirs(folder, exist_ok=True)
    rng = random.Random(1)
    corpus = [json.dumps(chain_example(rng, 3)) for _ in range(50)] + ["<< >> ###"]
    tokenizer = make_tokenizer(corpus, vocab_size=400)
    tokenizer.save_pretrained(folder)
    n = len(tokenizer)
    if arch == "gpt2":
        config = GPT2Config(vocab_size=n, n_layer=2, n_embd=64, n_head=4, n_positions=512, bos_token_id=0, eos_token_id=0)
    else:
        config = LlamaConfig(vocab_size=n, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                             bos_token_id=0, eos_token_id=0, tie_word_embeddings=False)
    config.save_pretrained(folder)
    return str(folder)



# ------------------------------------------------------------------ end-to-end runs
REPO = ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN_PY = os.path.join(REPO, "run.py")
PREFIX = "base_causallm."
ACC_RE = re.compile(r"^Accuracy on validation set: (\d+) / (\d+) = (\S+)$", re.M)
COT_RE = re.compile(r"^CoT match on validation set: (\d+) / (\d+) = (\S+)$", re.M)
FULL_RE = re.compile(r"^Full output: '(.*?)'\nExtracted Output:", re.M | re.S)
EPOCH_START_RE = re.compile(r"Training Epoch: (\d+):\s+0%")  # tqdm's first refresh of an epoch's bar
N_VAL = 12  # conftest's chain_data


def makefile_variable(name: str) -> str:
    """The value of a `NAME := value` (or `?=`) line of the Makefile, with the
    `$(OTHER)` variables in it expanded."""
    with open(os.path.join(REPO, "Makefile")) as f:
        for line in f:
            match = re.match(rf"{name}\s*[:?]?=\s*(.*)$", line)
            if match:
                return re.sub(r"\$\((\w+)\)", lambda m: makefile_variable(m.group(1)), match.group(1).strip())
    raise AssertionError(f"Makefile has no {name} line")


def makefile_demo_data_args() -> list:
    """The DEMO_DATA_ARGS line of the Makefile, as an argument list."""
    return shlex.split(makefile_variable("DEMO_DATA_ARGS"))


# ------------------------------------------------------------------ helpers
def keys_for(model_folder, data, save_path, name, **over):
    keys = dict(
        model_id=model_folder, train_path=data["train"], val_path=data["val"], save_path=str(save_path), name=name,
        num_epochs=2, batch_size_training=8, lr=1e-3, max_new_tokens=16, c_thought=1, epochs_per_stage=1,
        max_latent_stage=1, seed=0,
    )
    keys.update(over)
    return keys


def write_cfg(path, keys) -> str:
    with open(path, "w") as f:
        yaml.safe_dump(keys, f)
    return str(path)


def run_in_process(cfg, *keys):
    """run.main([cfg, *keys]) with stdout/stderr captured: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    saved = {k: os.environ.get(k) for k in ("WANDB_MODE", "WORLD_SIZE")}
    os.environ["WANDB_MODE"] = "disabled"
    os.environ.pop("WORLD_SIZE", None)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: a second thread only spins (5x slower on a busy machine)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = run_main([cfg, *keys])
    finally:
        torch.set_num_threads(threads)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return rc, out.getvalue(), err.getvalue()


def sub_env(**extra):
    """Environment of a subprocess run: no wandb settings but WANDB_MODE=disabled, one thread."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("WANDB_") and k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(WANDB_MODE="disabled", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def _descendants(pid):
    """Ids of every process below `pid` (from /proc)."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def run_sub(args, env=None, timeout=300, cwd=REPO):
    """Run `python ARGS`; on timeout kill it and all its descendants, then fail."""
    proc = subprocess.Popen([sys.executable, *args], cwd=cwd, env=env or sub_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for pid in [proc.pid, *_descendants(proc.pid)]:  # torchrun's workers start sessions of their own
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"python {' '.join(map(str, args))} ran over {timeout} s; stderr ends:\n{err[-3000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def acc_lines(stdout):
    """[(C, T, A)] of the accuracy lines, checking A = C / T and T = the validation size."""
    found = []
    for regex in (ACC_RE, COT_RE):
        rows = [(int(c), int(t), float(a)) for c, t, a in regex.findall(stdout)]
        for c, t, a in rows:
            assert t == N_VAL and 0 <= c <= t and a == c / t
        found.append(rows)
    assert len(found[0]) == len(found[1])
    return found[0]


def epochs_started(stderr):
    return [int(n) for n in EPOCH_START_RE.findall(stderr)]


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_tensors(a_path, b_path):
    a, b = load(a_path), load(b_path)
    assert a.keys() == b.keys(), a_path
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{a_path} vs {b_path}: tensors differ: {different[:5]}"


def assert_same_values(a, b, where):
    """Equal nested dicts/lists of tensors and plain values (a .state file's content)."""
    assert type(a) is type(b), where
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same_values(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_values(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    else:
        assert a == b, where


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def join_group(rank, world_size, port):
    """What torchrun gives a process in its environment, then distributed.setup (gloo)."""
    import distributed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    return distributed.setup()


def run_as_rank(rank, world_size, port, out, work):
    """The body of an mp.spawn worker: join a gloo group as torchrun's process `rank`
    would, run work(env), save rank 0's result to `out`, and end as run.py does
    (distributed.exit_process). What a rank raises goes to out.rank{rank}.error before
    the teardown: should the process then die by a signal, mp.spawn reports only that."""
    import traceback

    import distributed

    torch.set_num_threads(1)
    env = join_group(rank, world_size, port)
    try:
        result = work(env)
    except BaseException:
        with open(f"{out}.rank{rank}.error", "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        distributed.teardown()
    if rank == 0:
        torch.save(result, out)
    distributed.exit_process(0)



def run_main(argv):
    import run

    return run.main(argv)


# ------------------------------------------------------------------ tiny trained models
PROSQA_TOKENIZER = os.path.join(ROOT, "models", "prosqa-gpt2-tiny")


def silent(message):
    pass


def write_yaml(path, config: dict) -> str:
    with open(path, "w") as f:
        yaml.safe_dump(config, f)
    return str(path)


def prosqa_model_folder(folder) -> str:
    """The demo's ProsQA tokenizer with a smaller GPT-2 config (no weights)."""
    os.makedirs(folder, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(PROSQA_TOKENIZER, name), os.path.join(folder, name))
    GPT2Config(vocab_size=450, n_layer=2, n_embd=64, n_head=4, n_positions=256,
               bos_token_id=0, eos_token_id=0).save_pretrained(folder)
    return str(folder)


def tiny_prosqa_model(tmp_path_factory) -> SimpleNamespace:
    """A tiny coconut GPT-2 trained by run.py on ProsQA-style data, and its export.

    Three epochs (stages 0, 1, 2; c_thought 1, max_latent_stage 2, pad_latent_to_max):
    enough to exercise every path, not to answer well. Cached for the session.
    """
    root = tmp_path_factory.getbasetemp() / "tiny-prosqa-coconut"
    paths = SimpleNamespace(
        root=str(root), model=str(root / "model"), train=str(root / "train.json"), val=str(root / "val.json"),
        config=str(root / "coconut.yaml"), checkpoint=str(root / "ckpt" / "tiny" / "checkpoint_3"),
        export=str(root / "export"),
    )
    if (root / "done").exists():
        return paths

    shutil.rmtree(root, ignore_errors=True)
    prosqa_model_folder(paths.model)
    examples = prosqa.generate(38, 0, prosqa.Options(num_nodes=10, max_steps=3))
    for path, part in ((paths.train, examples[:32]), (paths.val, examples[32:])):
        with open(path, "w") as f:
            json.dump(part, f)
    write_yaml(paths.config, dict(
        project="test", save_path=str(root / "ckpt"), name="tiny", coconut=True, c_thought=1,
        epochs_per_stage=1, max_latent_stage=2, pad_latent_to_max=True, num_epochs=3,
        model_id=paths.model, train_path=paths.train, val_path=paths.val, batch_size_training=8,
        lr=1e-3, seed=0, max_new_tokens=8, batch_size_eval=8,
    ))
    with mock.patch.dict(os.environ, {"WANDB_MODE": "disabled"}):
        assert run_main([paths.config]) == 0
    assert export.main([paths.config, paths.checkpoint, paths.export]) == 0
    (root / "done").touch()
    return paths


def tiny_cot_model(tmp_path_factory) -> SimpleNamespace:
    """A cot run's checkpoint (random weights, published layout) and its export."""
    root = tmp_path_factory.getbasetemp() / "tiny-prosqa-cot"
    coconut = tiny_prosqa_model(tmp_path_factory)
    paths = SimpleNamespace(root=str(root), config=str(root / "cot.yaml"),
                            checkpoint=str(root / "checkpoint_1"), export=str(root / "export"), val=coconut.val)
    if (root / "done").exists():
        return paths
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)
    write_yaml(paths.config, dict(cot=True, c_thought=0, max_latent_stage=0, model_id=coconut.model,
                                   train_path=coconut.train, val_path=coconut.val))
    torch.manual_seed(0)
    built = build_model(load_config(paths.config), None, None, silent)
    checkpoint.save_checkpoint(str(root), 1, built.model.state_dict())
    assert export.main([paths.config, paths.checkpoint, paths.export]) == 0
    (root / "done").touch()
    return paths


