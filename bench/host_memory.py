"""Host memory of large-model training: sharding and activation checkpointing.

    python bench/host_memory.py            # both measurements (~5 minutes on 2 cores)
    python bench/host_memory.py --quick    # tiny models, to check that it runs (tests)
    python bench/host_memory.py --only sharding   # or: --only checkpointing
    python bench/host_memory.py --only kept_weights   # not in the default run (~1.5 minutes)

Writes bench/results/host_memory.json and prints the figures. `measure_sharding` and
`measure_checkpointing` can also be called from bench/bench.py.

1. Sharding (README, "Large models"): a ~200M-parameter Llama built from a config (16
   layers x 1024 wide, no weights) trained by run.py for one epoch (build, a few
   optimizer steps, save checkpoint_1 and its sharded state, validation loss,
   generation), once as one process and once as `torchrun --nproc_per_node 2` with the
   same effective batch. Each process records its peak resident memory (VmHWM) when
   the run ends; the figure is the largest process of the 2-process run over the
   1-process run. Target: at most 0.7 (FSDP over 2 processes: each holds half the
   parameters, gradients and AdamW moments, and no process but rank 0 ever holds the
   whole model).
2. Activation checkpointing: one Coconut training step at stage 6 (6 latent passes)
   of bench/workload.py's GPT-2 (4 layers, 256 wide, batch 16, ~300 tokens), with and
   without `activation_checkpointing` (and with bf16 autocast, what `mixed_precision:
   bf16` does in one process), each in a fresh process: peak RSS during the step over
   the RSS just before it, and the bytes of the tensors autograd keeps for the backward
   pass (deterministic).
3. Kept weights (`--only kept_weights`; README, "FSDP and latent passes"): the Llama of
   1 on 2 processes for an epoch at stage 1 (one latent pass), with FSDP's default and
   with `reshard_after_forward: False`, which keeps every block's gathered weights
   through each step: the largest process's peak of each, and the startup line's
   estimate of the difference (startup.regather_note: the blocks' fp32 weights).
"""

import argparse
import gc
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if __name__ == "__main__":  # as a script, sys.path[0] is bench/; the repository root is needed
    sys.path[0] = str(ROOT)

RESULTS = ROOT / "bench" / "results"
TARGET_RATIO = 0.7
# (layers, hidden, intermediate, heads, train examples, validation examples); 16 x 1024
# with a 2816-wide MLP and the small tokenizer below is ~206M parameters
LLAMA_SIZES = {"full": (16, 1024, 2816, 16, 8, 4), "quick": (2, 64, 128, 4, 8, 4)}
NAMES, WORDS = ["Tom", "Sally", "Alex"], ["wumpus", "yumpus", "rempus", "gorpus", "lempus", "zumpus"]


# ----------------------------------------------------------------------------- peak RSS
def status_bytes(field: str) -> int:
    """VmRSS (resident now) or VmHWM (peak resident) of this process, from /proc (Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # kB
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux 4.0+); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# ----------------------------------------------------------------------------- 1. sharding
def examples(n: int, seed: int) -> list:
    """Small ProsQA-like examples (3-step chains): the run's data, not what is measured."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        name, chain = rng.choice(NAMES), rng.sample(WORDS, 4)
        steps = [f"{name} is a {chain[0]}."] + [f"Every {a} is a {b}." for a, b in zip(chain, chain[1:-1])]
        question = " ".join(steps + [f"Every {chain[-2]} is a {chain[-1]}."]) + f" Is {name} a {chain[-1]}?"
        out.append({"question": question, "steps": steps, "answer": f"{name} is a {chain[-1]}."})
    return out


def write_run(folder: Path, size: str) -> Path:
    """A Llama model folder (config and tokenizer, no weights), data and a config."""
    from transformers import LlamaConfig

    from preprocessing.tiny_model import train_tokenizer

    layers, hidden, intermediate, heads, n_train, n_val = LLAMA_SIZES[size]
    data = {"train": examples(n_train, 0), "val": examples(n_val, 1)}
    for split, rows in data.items():
        (folder / f"{split}.json").write_text(json.dumps(rows))
    tokenizer = train_tokenizer([json.dumps(r) for r in data["train"] + data["val"]] + ["<< >>"], 300)
    model = folder / "llama"
    tokenizer.save_pretrained(model)
    LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate,
                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                max_position_embeddings=512, tie_word_embeddings=False, bos_token_id=0,
                eos_token_id=0).save_pretrained(model)
    return model


def config_for(folder: Path, model: Path, name: str, per_process_batch: int, **over) -> Path:
    import yaml

    keys = dict(coconut=True, model_id=str(model), train_path=str(folder / "train.json"),
                val_path=str(folder / "val.json"), save_path=str(folder / "runs"), name=name, num_epochs=1,
                batch_size_training=per_process_batch, batch_size_eval=2, max_new_tokens=4, c_thought=1,
                max_latent_stage=1, seed=0, lr=1e-4)
    keys.update(over)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(keys))
    return path


def worker(cfg: str, out_dir: str) -> int:
    """Inside each process: run.py's main, then write this process's peak RSS."""
    import run

    status = run.main([cfg])
    rank = int(os.environ.get("RANK", "0"))
    Path(out_dir, f"peak_{rank}.json").write_text(json.dumps({"rank": rank, "vmhwm": status_bytes("VmHWM")}))
    return status


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_peaks(cfg: Path, nproc: int, out_dir: Path, log) -> list:
    """Peak RSS of every process of one run.py launch (1: python, else torchrun)."""
    out_dir.mkdir()
    me = [str(Path(__file__).resolve()), "--_worker", str(cfg), str(out_dir)]
    launcher = [] if nproc == 1 else ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                                      "--master_port", str(free_port())]
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, *launcher, *me], cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"run.py on {nproc} process(es) failed:\n{proc.stderr[-3000:]}")
    peaks = sorted((json.loads(p.read_text()) for p in out_dir.glob("peak_*.json")), key=lambda p: p["rank"])
    log(f"  {nproc} process(es): peak RSS per process {[round(p['vmhwm'] / 2**20) for p in peaks]} MiB")
    return [p["vmhwm"] for p in peaks]


def measure_sharding(size: str = "full", log=print) -> dict:
    """Largest process's peak RSS of a 2-process run over the 1-process run's peak."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with tempfile.TemporaryDirectory(prefix="host_memory_") as tmp:
        folder = Path(tmp)
        model = write_run(folder, size)
        with torch.device("meta"):
            n_params = sum(p.numel() for p in AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model)).parameters())
        n_train = LLAMA_SIZES[size][4]
        log(f"sharding: Llama {LLAMA_SIZES[size][:2]} ({n_params / 1e6:.0f}M parameters), "
            f"{n_train} training examples, batch 4 in all (2 optimizer steps)")
        one = run_peaks(config_for(folder, model, "one", 4), 1, folder / "one_peaks", log)
        two = run_peaks(config_for(folder, model, "two", 2), 2, folder / "two_peaks", log)
    ratio = max(two) / one[0]
    return {"method": "VmHWM of every process at the end of a 1-epoch run.py run (build, train, save, evaluate)",
            "parameters": n_params, "size": size, "one_process_peak_bytes": one[0],
            "two_process_peak_bytes": two, "ratio": ratio, "target": TARGET_RATIO, "target_met": ratio <= TARGET_RATIO}


def measure_kept_weights(size: str = "full", log=print) -> dict:
    """Largest process's peak RSS of a 2-process stage-1 epoch, FSDP's default against
    reshard_after_forward: False."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    import startup

    with tempfile.TemporaryDirectory(prefix="host_memory_") as tmp:
        folder = Path(tmp)
        model = write_run(folder, size)
        with torch.device("meta"):
            note = startup.regather_note(AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model)),
                                         torch.float32)
        log(f"kept weights: Llama {LLAMA_SIZES[size][:2]}, 2 processes, an epoch at stage 1; startup: {note}")
        peaks = {str(flag): max(run_peaks(config_for(folder, model, f"kept_{flag}", 2, reshard_after_forward=flag,
                                                     resume=1, num_epochs=2), 2, folder / f"kept_{flag}", log))
                 for flag in (True, False)}
    return {"method": "VmHWM of the largest of 2 processes over a stage-1 epoch of run.py", "size": size,
            "largest_peak_bytes": peaks, "difference_bytes": peaks["False"] - peaks["True"], "startup_note": note}


# ----------------------------------------------------------------------------- 2. checkpointing
# variant -> (activation_checkpointing, compute dtype under autocast or None)
STEP_VARIANTS = {"plain": (False, None), "checkpointing": (True, None), "bf16": (False, "bf16"),
                 "checkpointing_bf16": (True, "bf16")}


def step_probe(quick: bool, variant: str) -> dict:
    """In a fresh process: one stage-6 Coconut step's peak RSS over the RSS before it."""
    import torch

    import distributed
    from bench import workload
    from coconut import Coconut
    from modeling import checkpoint_blocks

    checkpointed, compute = STEP_VARIANTS[variant]
    shape, (layers, width, batch) = (workload.QUICK, (2, 64, 4)) if quick else (workload.FULL, (4, 256, 16))
    model = workload.make_model(layers, width, 4, vocab=shape.vocab)
    ids = workload.ids_for(shape.vocab)
    coconut = Coconut(model, ids.latent, ids.start, ids.end, ids.eos).train()
    if checkpointed:
        checkpoint_blocks(model)
    if compute is not None:  # what run.py does in one process with mixed_precision
        distributed.autocast_forward(coconut, distributed.COMPUTE_DTYPES[compute], torch.device("cpu"))
    data = workload.training_batch(shape, batch, 6)
    saved = {}
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    gc.collect()
    reset = reset_peak()
    before = status_bytes("VmRSS")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = coconut(**data).loss
    gc.collect()
    # what the forward leaves for the backward, whoever holds it: the hook above does not
    # see what a checkpointed block keeps by itself (its inputs, the cache it was given)
    held = status_bytes("VmRSS") - before
    loss.backward()
    return {"variant": variant, "loss": float(loss), "peak_reset": reset, "forward_held_bytes": held,
            "step_peak_delta": status_bytes("VmHWM") - before, "saved_activation_bytes": sum(saved.values())}


def measure_checkpointing(quick: bool = False, log=print) -> dict:
    """A stage-6 step with each of STEP_VARIANTS, each in a fresh process; ratios to plain."""
    log("stage-6 step (bench/workload.py GPT-2, one process), with and without activation checkpointing")
    results = {}
    for variant in STEP_VARIANTS:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--_step-probe", variant]
        proc = subprocess.run(cmd + (["--quick"] if quick else []), cwd=ROOT, capture_output=True, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
        if proc.returncode != 0:
            raise RuntimeError(f"step probe {variant} failed:\n{proc.stderr[-3000:]}")
        results[variant] = probe = json.loads(proc.stdout.strip().splitlines()[-1])
        log(f"  {variant:>18}: step peak {probe['step_peak_delta'] / 2**20:.0f} MiB, held after the forward "
            f"{probe['forward_held_bytes'] / 2**20:.0f} MiB, saved-tensor hooks {probe['saved_activation_bytes'] / 2**20:.0f} "
            f"MiB, loss {probe['loss']:.5f}")
    plain = results["plain"]
    for probe in results.values():
        probe["peak_ratio"] = probe["step_peak_delta"] / plain["step_peak_delta"]
        probe["forward_held_ratio"] = probe["forward_held_bytes"] / plain["forward_held_bytes"]
        probe["saved_activation_ratio"] = probe["saved_activation_bytes"] / plain["saved_activation_bytes"]
    same = abs(results["checkpointing"]["loss"] - plain["loss"]) <= 1e-5 * max(1.0, abs(plain["loss"]))
    return {"method": "stage-6 Coconut step in a fresh process: VmHWM minus RSS before; RSS held after the "
                      "forward; bytes autograd's saved-tensor hooks see (not what checkpointing holds itself)",
            "variants": results, "checkpointing_same_loss": same}


# ----------------------------------------------------------------------------- main
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny models: seconds, to check that it runs")
    parser.add_argument("--only", choices=["sharding", "checkpointing", "kept_weights"])
    parser.add_argument("--output", default=str(RESULTS / "host_memory.json"))
    parser.add_argument("--_worker", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--_step-probe", choices=list(STEP_VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._worker:
        return worker(*args._worker)
    if args._step_probe is not None:
        print(json.dumps(step_probe(args.quick, args._step_probe)))
        return 0
    results = {}
    if args.only in (None, "sharding"):
        results["sharding"] = measure_sharding("quick" if args.quick else "full")
        s = results["sharding"]
        print(f"sharding: largest of 2 processes {max(s['two_process_peak_bytes']) / 2**20:.0f} MiB / one process "
              f"{s['one_process_peak_bytes'] / 2**20:.0f} MiB = {s['ratio']:.2f} (target <= {TARGET_RATIO})")
    if args.only in (None, "checkpointing"):
        results["checkpointing"] = c = measure_checkpointing(args.quick)
        for name, v in c["variants"].items():
            print(f"stage-6 step, {name}: peak {v['peak_ratio']:.2f}x, held after the forward "
                  f"{v['forward_held_ratio']:.2f}x, saved-tensor hooks {v['saved_activation_ratio']:.2f}x of plain")
        print(f"activation checkpointing gives the same loss: {c['checkpointing_same_loss']}")
    if args.only == "kept_weights":
        results["kept_weights"] = k = measure_kept_weights("quick" if args.quick else "full")
        peaks = k["largest_peak_bytes"]
        print(f"kept weights: largest process {peaks['True'] / 2**20:.0f} MiB with FSDP's default, "
              f"{peaks['False'] / 2**20:.0f} MiB with reshard_after_forward: False "
              f"({k['difference_bytes'] / 2**20:+.0f} MiB)")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    from cli import exit_after_main

    exit_after_main(main())  # a --_worker process ran run.py's main: it ends as run.py does
