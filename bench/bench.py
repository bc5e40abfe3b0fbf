"""CPU benchmark of Coconut against the naive algorithm (bench/naive.py).

    python bench/bench.py            # `make bench`: the full run, under 10 minutes on 2 cores
    python bench/bench.py --quick    # a tiny model and short sequences, seconds (used by the tests)

Writes bench/results/bench.json and bench/results/step_time.png and prints a table.

What is measured (model: GPT-2 4 layers, 256 wide, 4 heads, vocabulary 50257 + 3,
random weights, dropout off; ProsQA-shaped batches from bench/workload.py):

1. Training step time (forward + backward) at stages 0, 2, 4, 6 (--quick: every stage
   0..6), c_thought 1, batch 16, ~300 tokens. Stage k puts k latents in place of k step
   tokens, so every stage has the same length and only the latent filling differs.
   Coconut and the naive algorithm run on
   the same batch, interleaved (the order alternates), each repeat times every stage of
   both; a stage's ratio is the median over repeats of (time at stage k / time at stage 0
   in the same repeat). Their losses must agree to 1e-4 (relative) at every stage.
   Target: Coconut at most 1.2x its stage 0 at every stage.
2. Peak memory of one training step, stage 6 over stage 0. The CPU allocator keeps no
   peak counter, so each measurement runs in a fresh process: peak RSS (VmHWM, reset to
   the current RSS just before the step) after one forward + backward minus the RSS just
   before it (model, batch, libraries loaded).
   Also reported, deterministic: bytes of the distinct tensors autograd saves for the
   backward (the activation memory). Target: at most 1.3x.
3. Generation throughput: questions per second of `Coconut.generate` at batch 1, 8 and 32
   (prompts ~300 tokens, 6 latents, lengths varied, padded by MyCollator; 64 new tokens
   at most; EOS left natural: a random model rarely emits it, the mean number of new
   tokens is reported) over the naive one-question, no-cache loop. The naive loop is
   slow, so one new question per repeat is timed and its seconds per question compared;
   its outputs must equal Coconut's rows at every batch size. Target: 20x at batch 32.
4. The dispatch-bound CPU proxy of bench/proxy.py (a GPU's latent passes on a CPU):
   training step with 6 latents over the step with none (target <= 1.5x), eager, and
   the per-token decoding time at batch 1, ours and the naive loop's; both again with
   Hugging Face's passes (`lean_passes` off), what the lean ones save. Last of all, the
   training ratio again with `compile: True` (`bench/proxy.py --compile-only`), when
   at least COMPILED_PROXY_MIN_S of the run's 10-minute budget is left (its graphs
   take 1 to 3 minutes to compile), and stopped at the budget.
5. FSDP's weight gathers in latent passes (bench/fsdp_proxy.py): the proxy's model on 2
   processes (gloo, 1 thread each), a step with 6 latents and one with none, with FSDP's
   default (each block gathered for every pass and its backward) and with
   `reshard_after_forward: False` (once per step); step times and all-gathers per step.
6. One epoch of args/demo.yaml through run.py (temporary checkpoints, wandb disabled),
   only when that config and its data exist (after `make demo`).
7. Host memory (bench/host_memory.py): the peak RSS of the largest process of a
   2-process (FSDP) run.py run of a ~200M-parameter Llama over the 1-process run's
   (target <= 0.7), and a stage-6 step's peak with and without activation
   checkpointing and bf16 autocast.

Timing on a shared machine is noisy: measurements are interleaved and repeated, only
ratios measured side by side are compared, and every time is taken both on the wall
clock and as this process's CPU time (which other processes on the same cores disturb
least). `--threads N` sets torch's CPU threads. By default: torch's own choice (all
cores, or OMP_NUM_THREADS) on an idle machine, and 1 when the load average says other
jobs are running: OpenMP threads that wait for each other on shared cores are slow and
erratic (thousands of small ops ran 100x slower with 2 threads than with 1 here),
while one thread's CPU time is exact. Whole run: about 10 minutes with one thread on
this 2-core machine while other jobs kept the other core busy.
"""

import argparse
import gc
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if __name__ == "__main__":  # as a script, sys.path[0] is bench/, where this file shadows the package
    sys.path[0] = str(ROOT)

import torch  # noqa: E402

from bench import fsdp_proxy, host_memory, workload  # noqa: E402
from bench.host_memory import reset_peak, status_bytes  # noqa: E402
from bench.naive import DEFAULT_REBUILD, naive_generate_one, naive_train_step_forward  # noqa: E402
from cli import OneLineParser, positive_int  # noqa: E402
from coconut import Coconut  # noqa: E402

RESULTS = ROOT / "bench" / "results"
LOSS_TOLERANCE = 1e-4
BUSY_LOAD = 0.75  # 1-minute load average above which other jobs are taken to share the cores
BUDGET_S = 600  # `make bench` stays under 10 minutes: the compiled proxy runs only in what is left
COMPILED_PROXY_MIN_S = 200  # compiling its graphs took 44 s (inductor's cache warm) to 150 s (cold)
TARGETS = {"step_time_ratio_max": 1.2, "memory_ratio_max": 1.3, "generation_speedup_min_at_32": 20.0}


@dataclass
class Setup:
    """Sizes of one benchmark run."""

    name: str
    n_layer: int
    n_embd: int
    n_head: int
    shape: workload.Shape
    train_batch: int
    stages: list
    repeats: int
    memory_repeats: int
    memory_algos: list  # (algorithm, stage) pairs measured in fresh processes
    gen_batches: list
    gen_questions: dict  # batch size -> questions timed per repeat
    max_new_tokens: int
    gen_latents: int = 6
    naive_questions_per_repeat: int = 1
    naive_rebuild: str = DEFAULT_REBUILD  # how the naive training step builds its per-position list


FULL = Setup(
    name="full", n_layer=4, n_embd=256, n_head=4, shape=workload.FULL, train_batch=16,
    stages=[0, 2, 4, 6], repeats=2, memory_repeats=1,  # every other stage, 2 repeats: `make bench` in 10 minutes
    memory_algos=[("coconut", 0), ("coconut", 6), ("naive", 6)],
    gen_batches=[1, 8, 32], gen_questions={1: 4, 8: 16, 32: 32}, max_new_tokens=64,
)
QUICK = Setup(
    name="quick", n_layer=2, n_embd=64, n_head=4, shape=workload.QUICK, train_batch=4,
    stages=list(range(7)), repeats=1, memory_repeats=1,
    memory_algos=[("coconut", 0), ("coconut", 6)],
    gen_batches=[1, 8, 32], gen_questions={1: 2, 8: 8, 32: 32}, max_new_tokens=8,
)


class Stopwatch:
    """Wall-clock and this process's CPU seconds since start (CPU time is what sharing the
    cores with other processes disturbs least, exact with --threads 1)."""

    def __init__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def read(self):
        return time.perf_counter() - self.wall, time.process_time() - self.cpu


def _median_ratio(values, base):
    return statistics.median(v / b for v, b in zip(values, base))


def build(setup: Setup, seed=0):
    model = workload.make_model(setup.n_layer, setup.n_embd, setup.n_head, vocab=setup.shape.vocab, seed=seed)
    ids = workload.ids_for(setup.shape.vocab)
    return model, Coconut(model, ids.latent, ids.start, ids.end, ids.eos), ids


def train_step(algo, model, coconut, batch, latent_id, rebuild=DEFAULT_REBUILD):
    """One forward + backward; returns the loss (float)."""
    if algo == "coconut":
        loss = coconut(**batch, return_logits=False).loss  # as the trainer calls it
    else:
        loss = naive_train_step_forward(model, batch, latent_id, rebuild)
    loss.backward()
    return loss.item()


# ----------------------------------------------------------------------------- training
def bench_training(setup: Setup, log):
    model, coconut, ids = build(setup)
    model.train()
    batches = {k: workload.training_batch(setup.shape, setup.train_batch, k) for k in setup.stages}
    seq = {k: tuple(b["input_ids"].shape) for k, b in batches.items()}
    log(f"training: batch {setup.train_batch}, widths {sorted({s[1] for s in seq.values()})}, "
        f"stages {setup.stages}, {setup.repeats} repeats, both algorithms interleaved")
    # warm-up, untimed: one Coconut step with a latent runs every code path both use
    train_step("coconut", model, coconut, batches[min((k for k in setup.stages if k), default=0)], ids.latent)
    model.zero_grad(set_to_none=True)
    times = {a: {k: [] for k in setup.stages} for a in ("coconut", "naive")}
    losses = {a: {} for a in ("coconut", "naive")}
    for r in range(setup.repeats):
        for k in setup.stages:
            order = ("coconut", "naive") if (r + k) % 2 == 0 else ("naive", "coconut")
            for algo in order:
                model.zero_grad(set_to_none=True)
                gc.collect()
                watch = Stopwatch()
                loss = train_step(algo, model, coconut, batches[k], ids.latent, setup.naive_rebuild)
                times[algo][k].append(watch.read())
                losses[algo].setdefault(k, loss)
            log(f"  repeat {r} stage {k}: " + ", ".join(
                f"{a} {times[a][k][-1][0]:.2f}s (cpu {times[a][k][-1][1]:.2f}s)" for a in ("coconut", "naive")))
    model.zero_grad(set_to_none=True)

    result = {"batch": setup.train_batch, "seq_len": seq[setup.stages[0]][1], "repeats": setup.repeats, "stages": {}}
    for k in setup.stages:
        a, b = losses["coconut"][k], losses["naive"][k]
        rel = abs(a - b) / max(abs(b), 1e-12)
        assert rel < LOSS_TOLERANCE, f"stage {k}: Coconut loss {a} != naive loss {b} (relative {rel:.2e})"
        entry = {"loss_coconut": a, "loss_naive": b, "loss_rel_diff": rel}
        for algo in ("coconut", "naive"):
            for clock, i in (("", 0), ("_cpu", 1)):
                ts = [t[i] for t in times[algo][k]]
                t0 = [t[i] for t in times[algo][setup.stages[0]]]
                entry[f"{algo}{clock}_s"] = statistics.median(ts)
                entry[f"{algo}{clock}_ratio"] = _median_ratio(ts, t0)
                entry[f"{algo}{clock}_all_s"] = ts
        result["stages"][str(k)] = entry
    for clock in ("", "_cpu"):
        worst = max(result["stages"][str(k)][f"coconut{clock}_ratio"] for k in setup.stages)
        result[f"coconut{clock}_worst_ratio"] = worst
        result[f"target_met{clock}"] = worst <= TARGETS["step_time_ratio_max"]
    return result


# ----------------------------------------------------------------------------- memory
def memory_probe(setup: Setup, algo: str, stage: int) -> dict:
    """In a fresh process: peak RSS of one training step over the RSS just before it.

    VmHWM, not getrusage's ru_maxrss: that one starts from the parent's RSS at fork.
    """
    model, coconut, ids = build(setup)
    model.train()
    batch = workload.training_batch(setup.shape, setup.train_batch, stage)
    gc.collect()
    reset = reset_peak()
    before, peak_before = status_bytes("VmRSS"), status_bytes("VmHWM")
    train_step(algo, model, coconut, batch, ids.latent, setup.naive_rebuild)
    peak = status_bytes("VmHWM")
    return {"algo": algo, "stage": stage, "rss_before": before, "peak_before": peak_before, "peak": peak,
            "peak_reset": reset, "step_peak_delta": peak - before}


def saved_activation_bytes(setup: Setup, algo: str, stage: int) -> int:
    """Bytes of the distinct non-parameter storages autograd keeps for the backward."""
    model, coconut, ids = build(setup)
    model.train()
    batch = workload.training_batch(setup.shape, setup.train_batch, stage)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = max(seen.get(s.data_ptr(), 0), s.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        if algo == "coconut":
            loss = coconut(**batch, return_logits=False).loss  # as the trainer calls it
        else:
            loss = naive_train_step_forward(model, batch, ids.latent, setup.naive_rebuild)
    del loss
    return sum(seen.values())


def bench_memory(setup: Setup, threads, log):
    log(f"memory: one training step per fresh process, {setup.memory_algos}, {setup.memory_repeats} repeat(s)")
    runs = {f"{a}_{k}": [] for a, k in setup.memory_algos}
    jobs = [(algo, k) for _ in range(setup.memory_repeats) for algo, k in setup.memory_algos]
    # two probes at a time: each is its own process, so they do not share a peak; only
    # their speed (not measured) suffers
    for i in range(0, len(jobs), 2):
        running = []
        for algo, k in jobs[i : i + 2]:
            cmd = [sys.executable, str(Path(__file__).resolve()), "--_memory-probe", f"{algo}:{k}", "--setup", setup.name]
            if threads:
                cmd += ["--threads", str(threads)]
            cmd += ["--naive-rebuild", setup.naive_rebuild]
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
            running.append((algo, k, proc))
        for algo, k, proc in running:
            stdout, stderr = proc.communicate()
            if proc.returncode != 0:
                raise RuntimeError(f"memory probe {algo}:{k} failed:\n{stderr[-3000:]}")
            probe = json.loads(stdout.strip().splitlines()[-1])
            runs[f"{algo}_{k}"].append(probe)
            log(f"  {algo} stage {k}: step peak {probe['step_peak_delta'] / 2**20:.0f} MiB over {probe['rss_before'] / 2**20:.0f} MiB")
    result = {"method": "peak RSS (VmHWM) of one forward+backward in a fresh process minus the RSS just before it",
              "runs": runs}
    for key, probes in runs.items():
        result[f"{key}_peak_delta_bytes"] = statistics.median(p["step_peak_delta"] for p in probes)
        algo, k = key.rsplit("_", 1)
        result[f"{key}_saved_activation_bytes"] = saved_activation_bytes(setup, algo, int(k))
    last = max(k for a, k in setup.memory_algos if a == "coconut")
    result["coconut_ratio"] = result[f"coconut_{last}_peak_delta_bytes"] / result["coconut_0_peak_delta_bytes"]
    result["coconut_saved_activation_ratio"] = (result[f"coconut_{last}_saved_activation_bytes"]
                                                / result["coconut_0_saved_activation_bytes"])
    result["stage"] = last
    result["target_met"] = result["coconut_ratio"] <= TARGETS["memory_ratio_max"]
    return result


# ----------------------------------------------------------------------------- generation
def _trim(row, length, eos):
    """A Coconut row without its EOS right-padding (generated tokens after the first are never EOS)."""
    end = len(row)
    while end > length + 1 and row[end - 1] == eos:
        end -= 1
    return row[:end]


def bench_generation(setup: Setup, log):
    model, coconut, ids = build(setup)
    model.eval()
    coconut.eval()
    n_prompts = max(setup.gen_questions.values())
    prompts = workload.prompts(setup.shape, n_prompts, setup.gen_latents)
    lengths = [len(p) for p in prompts]
    log(f"generation: {n_prompts} prompts of {min(lengths)}-{max(lengths)} tokens with {setup.gen_latents} latents, "
        f"batches {setup.gen_batches}, {setup.max_new_tokens} new tokens max, {setup.repeats} repeats")

    def run_coconut(bs):
        rows = []
        for i in range(0, setup.gen_questions[bs], bs):
            batch = workload.prompt_batch(setup.shape, prompts[i : i + bs])
            with torch.no_grad():
                out = coconut.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=setup.max_new_tokens)
            rows += out.tolist()
        return rows

    run_coconut(setup.gen_batches[0])  # warm-up
    ours = {bs: [] for bs in setup.gen_batches}
    naive, naive_rows = [], {}
    outputs = {}
    q = 0
    for r in range(setup.repeats):
        steps = [("naive", None)] + [("coconut", bs) for bs in setup.gen_batches]
        if r % 2:
            steps.reverse()
        for kind, bs in steps:
            gc.collect()
            if kind == "naive":
                chosen = list(range(q, q + setup.naive_questions_per_repeat))
                q += len(chosen)
                watch = Stopwatch()
                for i in chosen:
                    naive_rows[i] = naive_generate_one(model, prompts[i], ids.latent, ids.eos, setup.max_new_tokens)
                naive.append(tuple(x / len(chosen) for x in watch.read()))
            else:
                watch = Stopwatch()
                rows = run_coconut(bs)
                ours[bs].append(tuple(x / len(rows) for x in watch.read()))
                outputs.setdefault(bs, rows)
        log(f"  repeat {r}: naive {naive[-1][0]:.2f} s/question (cpu {naive[-1][1]:.2f}), coconut "
            + ", ".join(f"b{bs} {ours[bs][-1][0]:.3f} (cpu {ours[bs][-1][1]:.3f})" for bs in setup.gen_batches)
            + " s/question")

    # identical outputs: naive vs every batch size, and batch sizes against each other
    for i, want in naive_rows.items():
        for bs, rows in outputs.items():
            if i < len(rows):
                row = rows[i]
                same = row[: len(want)] == want and all(t == ids.eos for t in row[len(want):])
                assert same, f"question {i}: Coconut.generate at batch {bs} differs from the naive loop"
    for bs, rows in outputs.items():
        for i, row in enumerate(rows):
            ref = outputs[setup.gen_batches[-1]][i] if i < len(outputs[setup.gen_batches[-1]]) else None
            if ref is not None:
                assert _trim(row, lengths[i], ids.eos) == _trim(ref, lengths[i], ids.eos), f"question {i}: batch {bs} differs"
    new_tokens = [len(_trim(row, lengths[i], ids.eos)) - lengths[i] for i, row in enumerate(outputs[setup.gen_batches[-1]])]

    result = {"max_new_tokens": setup.max_new_tokens, "prompt_tokens": [min(lengths), max(lengths)],
              "latents": setup.gen_latents, "eos": "natural", "mean_new_tokens": statistics.mean(new_tokens),
              "naive_s_per_question": statistics.median(t[0] for t in naive),
              "naive_cpu_s_per_question": statistics.median(t[1] for t in naive), "naive_all_s": naive,
              "naive_questions_checked": len(naive_rows), "batches": {}}
    for bs in setup.gen_batches:
        entry = {"questions_per_repeat": setup.gen_questions[bs], "all_s_per_question": ours[bs]}
        wall, cpu = [t[0] for t in ours[bs]], [t[1] for t in ours[bs]]
        entry["s_per_question"] = statistics.median(wall)
        entry["questions_per_s"] = 1 / entry["s_per_question"]
        entry["speedup_vs_naive"] = _median_ratio([t[0] for t in naive], wall)
        entry["cpu_s_per_question"] = statistics.median(cpu)
        entry["speedup_cpu_vs_naive"] = _median_ratio([t[1] for t in naive], cpu)
        result["batches"][str(bs)] = entry
    top = result["batches"][str(max(setup.gen_batches))]
    result["target_met"] = top["speedup_vs_naive"] >= TARGETS["generation_speedup_min_at_32"]
    result["target_met_cpu"] = top["speedup_cpu_vs_naive"] >= TARGETS["generation_speedup_min_at_32"]
    return result


# ----------------------------------------------------------------------------- demo epoch
def bench_demo(log, timeout=600):
    """Seconds of ONE epoch of `run.py args/demo.yaml` (its first: stage 0, training and
    evaluation), only when config, run.py and data exist. Writes nothing in the repository:
    checkpoints go to a temporary folder and wandb is disabled."""
    config = ROOT / "args" / "demo.yaml"
    if not config.exists() or not (ROOT / "run.py").exists():
        return {"skipped": "args/demo.yaml or run.py not found"}
    import yaml

    cfg = yaml.safe_load(config.read_text())
    missing = [cfg.get(k) for k in ("train_path", "val_path") if not cfg.get(k) or not (ROOT / cfg[k]).exists()]
    if missing:
        return {"skipped": f"demo data not found ({missing}); run `make demo` first"}
    with tempfile.TemporaryDirectory() as tmp:
        cfg["save_path"] = tmp  # never resume from (or overwrite) the user's demo checkpoints
        cfg["num_epochs"] = 1
        tmp_config = Path(tmp) / "demo.yaml"
        tmp_config.write_text(yaml.safe_dump(cfg))
        env = {**os.environ, "WANDB_MODE": "disabled"}
        t = time.perf_counter()
        out = subprocess.run([sys.executable, "run.py", str(tmp_config)], cwd=ROOT, capture_output=True, text=True,
                             timeout=timeout, check=False, env=env)
        wall = time.perf_counter() - t
    if out.returncode != 0:
        return {"skipped": f"run.py failed (exit {out.returncode}): {out.stderr.strip().splitlines()[-1:]}"}
    log(f"demo: one epoch (stage 0) in {wall:.1f} s")
    return {"epochs": 1, "wall_s": wall, "s_per_epoch": wall}


# ----------------------------------------------------------------------------- dispatch-bound proxy
def bench_proxy(log, options=(), timeout=600):
    """bench/proxy.py in a process of its own, as a training process starts: neither the
    heap the sections before leave behind (gigabytes freed) nor the proxy's allocator
    settings (mallopt) then touch the other's figures."""
    command = " ".join(["bench/proxy.py", *options])
    log(f"proxy: 12 layers x 64 wide, batch 4, ~60 tokens, 1 thread ({command}, a process of its own)")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "proxy.json"
        # a session of its own: at the budget's end, inductor's compile workers go with it
        proc = subprocess.Popen([sys.executable, "bench/proxy.py", *options, "--json", str(out)], cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            return {"skipped": f"stopped after {timeout:.0f} s, at the end of the run's {BUDGET_S} s budget"}
        for line in stdout.splitlines():
            log("  " + line)
        if proc.returncode != 0:
            return {"skipped": f"bench/proxy.py failed (exit {proc.returncode}): {stderr.strip().splitlines()[-1:]}"}
        return json.loads(out.read_text())


def bench_compiled_proxy(log, elapsed_s: float):
    """The proxy's training ratio with compile: True, in what is left of the run's budget."""
    left = BUDGET_S - elapsed_s
    if left < COMPILED_PROXY_MIN_S:
        log(f"proxy, compile: True: skipped ({left:.0f} s left of the {BUDGET_S} s budget)")
        return {"skipped": f"{left:.0f} s left of the run's {BUDGET_S} s budget, under {COMPILED_PROXY_MIN_S} s"}
    return bench_proxy(log, ["--compile-only"], timeout=left)


# ----------------------------------------------------------------------------- report
def table(results) -> str:
    lines = []
    tr = results.get("training")
    if tr:
        lines.append(f"Training step (forward + backward), batch {tr['batch']}, {tr['seq_len']} tokens, median of "
                     f"{tr['repeats']}; ratio = time / the same algorithm's stage-0 time in the same repeat; "
                     f"wall-clock, then this process's CPU time")
        lines.append(f"{'stage':>5} {'coconut s':>10} {'ratio':>6} {'naive s':>9} {'ratio':>6} {'naive/ours':>10} | "
                     f"{'cpu: ours':>9} {'ratio':>6} {'naive':>7} {'ratio':>6} | {'loss rel diff':>13}")
        for k, e in tr["stages"].items():
            lines.append(f"{k:>5} {e['coconut_s']:>10.3f} {e['coconut_ratio']:>6.2f} {e['naive_s']:>9.3f} "
                         f"{e['naive_ratio']:>6.2f} {e['naive_s'] / e['coconut_s']:>10.2f} | "
                         f"{e['coconut_cpu_s']:>9.3f} {e['coconut_cpu_ratio']:>6.2f} {e['naive_cpu_s']:>7.3f} "
                         f"{e['naive_cpu_ratio']:>6.2f} | {e['loss_rel_diff']:>13.1e}")
        lines.append(f"target coconut <= {TARGETS['step_time_ratio_max']}x stage 0 at every stage: worst "
                     f"{tr['coconut_worst_ratio']:.2f}x wall -> {'MET' if tr['target_met'] else 'MISSED'}, "
                     f"{tr['coconut_cpu_worst_ratio']:.2f}x cpu -> {'MET' if tr['target_met_cpu'] else 'MISSED'}")
    mem = results.get("memory")
    if mem:
        k = mem["stage"]
        lines.append("")
        lines.append(f"Peak memory of a training step ({mem['method']})")
        for key in (key for key in mem if key.endswith("_peak_delta_bytes")):
            name = key[: -len("_peak_delta_bytes")]
            lines.append(f"  {name:>10}: peak {mem[key] / 2**20:8.0f} MiB   saved activations "
                         f"{mem[name + '_saved_activation_bytes'] / 2**20:8.0f} MiB")
        lines.append(f"target coconut stage {k} <= {TARGETS['memory_ratio_max']}x stage 0: {mem['coconut_ratio']:.2f}x "
                     f"(saved activations {mem['coconut_saved_activation_ratio']:.2f}x) -> {'MET' if mem['target_met'] else 'MISSED'}")
    gen = results.get("generation")
    if gen:
        lines.append("")
        lines.append(f"Generation, prompts {gen['prompt_tokens'][0]}-{gen['prompt_tokens'][1]} tokens, {gen['latents']} latents, "
                     f"{gen['max_new_tokens']} new tokens max (mean {gen['mean_new_tokens']:.1f}); naive one-question "
                     f"no-cache loop: {gen['naive_s_per_question']:.2f} s/question ({gen['naive_questions_checked']} timed, outputs identical)")
        lines.append(f"{'batch':>5} {'questions/s':>12} {'s/question':>11} {'speedup vs naive':>17} | "
                     f"{'cpu s/question':>14} {'cpu speedup':>11}")
        for bs, e in gen["batches"].items():
            lines.append(f"{bs:>5} {e['questions_per_s']:>12.2f} {e['s_per_question']:>11.3f} {e['speedup_vs_naive']:>16.1f}x | "
                         f"{e['cpu_s_per_question']:>14.3f} {e['speedup_cpu_vs_naive']:>10.1f}x")
        top = max(gen["batches"], key=int)
        lines.append(f"target >= {TARGETS['generation_speedup_min_at_32']:.0f}x at batch {top}: "
                     f"{gen['batches'][top]['speedup_vs_naive']:.1f}x wall -> {'MET' if gen['target_met'] else 'MISSED'}, "
                     f"{gen['batches'][top]['speedup_cpu_vs_naive']:.1f}x cpu -> {'MET' if gen['target_met_cpu'] else 'MISSED'}")
    proxy, compiled = results.get("proxy"), results.get("proxy_compiled")
    if proxy is not None and "skipped" not in proxy:
        tr, dec = proxy["train"], proxy["decode"]
        lines.append("")
        lines.append(f"Dispatch-bound proxy (GPT-2 {proxy['model']['n_layer']} layers x {proxy['model']['n_embd']}, "
                     f"batch {tr['batch']} x {tr['seq_len']} tokens, 1 thread, {proxy.get('allocator', '')})")
        lines.append(_proxy_train_line("training step", tr))
        lines.append(f"  decoding at batch 1: {dec['ours_s_per_token'] * 1e3:.2f} ms/token, naive no-cache loop "
                     f"{dec['naive_s_per_token'] * 1e3:.2f} ms/token ({dec['naive_over_ours']:.1f}x)")
        if "train_hf_passes" in proxy:  # lean one-column passes off: what they are measured against
            lines.append(_proxy_train_line("the same, Hugging Face's passes (lean_passes off)", proxy["train_hf_passes"],
                                           judged=False))
            lines.append(f"  decoding at batch 1, Hugging Face's passes: "
                         f"{proxy['decode_hf_passes']['ours_s_per_token'] * 1e3:.2f} ms/token")
    if compiled is not None and "skipped" in compiled:
        lines.append(f"  training step, compile: True: skipped ({compiled['skipped']})")
    elif compiled is not None:
        tr = compiled["train_compiled"]
        lines.append(_proxy_train_line("training step, compile: True", tr) + f"; compiling took {tr['compile_s']:.0f} s")
    if results.get("fsdp"):
        lines += ["", *fsdp_proxy.summary_lines(results["fsdp"])]
    demo = results.get("demo")
    if demo is not None:
        lines.append("")
        if "skipped" in demo:
            lines.append(f"Demo epoch: skipped ({demo['skipped']})")
        else:
            lines.append(f"Demo epoch: {demo['s_per_epoch']:.1f} s for one epoch of args/demo.yaml (training + evaluation)")
    lines += host_memory_lines(results)
    return "\n".join(lines)


def _proxy_train_line(label: str, tr: dict, judged=True) -> str:
    with_latents = tr[f"stage_{tr['latents']}_s"]
    line = f"  {label}: no latents {tr['stage_0_s'] * 1e3:.1f} ms, {tr['latents']} latents {with_latents * 1e3:.1f} ms: {tr['ratio']:.2f}x"
    return line + (f" (target <= {tr['target']}x) -> {'MET' if tr['target_met'] else 'MISSED'}" if judged else "")


def host_memory_lines(results) -> list:
    """The sharding and activation-checkpointing sections (bench/host_memory.py)."""
    lines = []
    sharding = results.get("sharding")
    if sharding:
        lines += ["", f"Host memory of a whole run.py run, {sharding['parameters'] / 1e6:.0f}M-parameter Llama "
                      f"({sharding['method']})",
                  f"  1 process: {sharding['one_process_peak_bytes'] / 2**20:.0f} MiB; 2 processes (FSDP): "
                  + ", ".join(f"{b / 2**20:.0f}" for b in sharding["two_process_peak_bytes"]) + " MiB",
                  f"  largest of 2 / 1 process: {sharding['ratio']:.2f} (target <= {sharding['target']}) -> "
                  f"{'MET' if sharding['target_met'] else 'MISSED'}"]
    checkpointing = results.get("checkpointing")
    if checkpointing:
        lines += ["", f"Stage-6 step with and without activation checkpointing ({checkpointing['method']})"]
        for name, probe in checkpointing["variants"].items():
            lines.append(f"  {name:>18}: step peak {probe['step_peak_delta'] / 2**20:6.0f} MiB ({probe['peak_ratio']:.2f}x), "
                         f"held after the forward {probe['forward_held_bytes'] / 2**20:6.0f} MiB "
                         f"({probe['forward_held_ratio']:.2f}x), saved-tensor hooks "
                         f"{probe['saved_activation_bytes'] / 2**20:6.0f} MiB ({probe['saved_activation_ratio']:.2f}x)")
    return lines


def main(argv=None):
    parser = OneLineParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model, short sequences, 1 repeat (seconds)")
    parser.add_argument("--repeats", type=positive_int, help="override the number of repeats")
    parser.add_argument("--threads", type=positive_int,
                        help="torch CPU threads (default: torch's choice on an idle machine, 1 on a busy one)")
    parser.add_argument("--naive-rebuild", choices=["unbind", "index"], default=DEFAULT_REBUILD,
                        help="naive training step's per-position list: 'index' is the published code's "
                             "embeds[b, p, :] (its backward is very slow), 'unbind' the same list made cheaply")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for bench.json and step_time.png")
    section_names = ["training", "memory", "generation", "proxy", "fsdp", "demo", "sharding", "checkpointing", "proxy_compiled"]
    parser.add_argument("--skip", action="append", default=[], choices=section_names, help="leave a section out (repeatable)")
    parser.add_argument("--setup", choices=["full", "quick"], help=argparse.SUPPRESS)
    parser.add_argument("--_memory-probe", dest="memory_probe", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.out.exists() and not args.out.is_dir():  # found when the results are written, after minutes
        parser.error(f"--out {args.out}: is a file; name the folder for bench.json and step_time.png")
    setup = QUICK if (args.quick or args.setup == "quick") else FULL
    setup = replace(setup, repeats=args.repeats or setup.repeats, naive_rebuild=args.naive_rebuild)
    if args.threads:
        torch.set_num_threads(args.threads)
    elif not args.memory_probe and os.getloadavg()[0] >= BUSY_LOAD:
        args.threads = 1  # the memory probes get it too
        torch.set_num_threads(1)
    if args.memory_probe:
        algo, stage = args.memory_probe.split(":")
        print(json.dumps(memory_probe(setup, algo, int(stage))))
        return 0

    def log(msg):
        print(msg, flush=True)

    start = time.perf_counter()
    log(f"bench ({setup.name}): GPT-2 {setup.n_layer} layers x {setup.n_embd}, vocabulary {setup.shape.vocab}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores")
    load = os.getloadavg()[0]
    if load >= BUSY_LOAD:
        log(f"note: the machine is busy (load average {load:.1f} on {os.cpu_count()} cores): timings are slower and "
            "noisier; ratios are still measured side by side" + ("" if args.threads != 1 else ", with 1 thread"))
    results = {"setup": {**asdict(setup), "threads": torch.get_num_threads(), "cores": os.cpu_count(),
                         "torch": torch.__version__, "load_average_at_start": load}, "targets": TARGETS}
    sections = {
        "training": lambda: bench_training(setup, log),
        "memory": lambda: bench_memory(setup, args.threads, log),
        "generation": lambda: bench_generation(setup, log),
        "proxy": lambda: {"skipped": "--quick"} if setup.name == "quick" else bench_proxy(log),
        "fsdp": lambda: fsdp_proxy.run(quick=setup.name == "quick", log=log),
        "demo": lambda: {"skipped": "--quick"} if setup.name == "quick" else bench_demo(log),
        # host memory of sharded training and of a stage-6 step with activation checkpointing
        "sharding": lambda: host_memory.measure_sharding("quick" if setup.name == "quick" else "full", log),
        "checkpointing": lambda: host_memory.measure_checkpointing(setup.name == "quick", log),
        # last: it runs in what is left of the 10-minute budget
        "proxy_compiled": lambda: ({"skipped": "--quick"} if setup.name == "quick"
                                   else bench_compiled_proxy(log, time.perf_counter() - start)),
    }
    results["section_s"] = {}
    for name, run in sections.items():
        if name not in args.skip:
            t = time.perf_counter()
            results[name] = run()
            results["section_s"][name] = round(time.perf_counter() - t, 1)
    results["wall_s"] = time.perf_counter() - start
    results["setup"]["load_average_at_end"] = os.getloadavg()[0]

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench.json").write_text(json.dumps(results, indent=2) + "\n")
    if "training" in results:
        from bench.plot import plot_step_times

        plot_step_times(results, args.out / "step_time.png")
    log("")
    log(table(results))
    log(f"\nwrote {args.out / 'bench.json'}" + (f" and {args.out / 'step_time.png'}" if "training" in results else "")
        + f" in {results['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
