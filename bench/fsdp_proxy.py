"""FSDP's weight gathers in latent passes, measured on CPU: 2 processes (gloo).

    python bench/fsdp_proxy.py           # about 40 seconds; `make bench` runs it too
    python bench/fsdp_proxy.py --quick   # a 2-layer model, a few steps (the tests)

FSDP gathers a block's weights for each call of the block and frees them after it, so a
training step with k latents per example (k + 1 passes) gathers every block 2(k + 1)
times, forward and backward. `reshard_after_forward: False` keeps what a block gathers
until the optimizer step: one gather per block and step.

The model and batches are bench/proxy.py's (a deep, very narrow GPT-2, where each pass
costs about what its dispatch costs, as on a GPU), each process holding half of the
batch and one thread. Both settings of reshard_after_forward train side by side, steps
with 6 latents and with none, the four kinds of step in rotating order (barriers
around each step, rank 0's wall clock, the median over the rounds): the stage-6 step
over the stage-0 step, and FSDP's all-gathers per step, counted from the profiler's
`FSDP::all_gather` marks in one more step of each kind.
A step is what run.py's trainer runs: forward, backward, trainer.optimizer_step (AdamW).
"""

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if __name__ == "__main__":  # as a script, sys.path[0] is bench/, where bench.py shadows the package
    sys.path[0] = str(ROOT)

import torch  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

import distributed  # noqa: E402
import trainer  # noqa: E402
from bench import proxy, workload  # noqa: E402
from bench.host_memory import free_port  # noqa: E402
from coconut import Coconut  # noqa: E402

WORLD_SIZE = 2


def all_gathers(profile) -> int:
    """FSDP's gathers of a unit's weights in a profiled step (FSDP2 marks each with a
    record_function named `FSDP::all_gather (module)`)."""
    return sum(event.name.split(" (")[0] == "FSDP::all_gather" for event in profile.events())


def _sharded_model(reshard_after_forward: bool, layers: int):
    torch.manual_seed(0)
    model = workload.make_model(layers, proxy.WIDTH, proxy.HEADS, vocab=proxy.SHAPE.vocab, n_positions=256)
    ids = workload.ids_for(proxy.SHAPE.vocab)
    coconut = Coconut(model, ids.latent, ids.start, ids.end, ids.eos)
    coconut.sync_passes_across_ranks = True
    distributed.shard(coconut, model, None, reshard_after_forward)
    coconut.train()
    return coconut, torch.optim.AdamW(coconut.parameters(), lr=1e-4)


def _measure(env, layers: int, steps: int) -> dict:
    """{str(reshard_after_forward): its figures}: both models trained side by side, the
    four (setting, stage) steps in an order that rotates from one round to the next."""
    models = {flag: _sharded_model(flag, layers) for flag in (True, False)}
    batches = {k: {name: t[env.rank::WORLD_SIZE] for name, t in
                   workload.training_batch(proxy.SHAPE, WORLD_SIZE * proxy.BATCH, k).items()}
               for k in (0, proxy.LATENTS)}

    def step(flag, k):
        coconut, optimizer = models[flag]
        coconut(**batches[k], return_logits=False).loss.backward()
        trainer.optimizer_step(coconut, optimizer)

    kinds = [(flag, k) for flag in (True, False) for k in (0, proxy.LATENTS)]
    results, times = {flag: {} for flag in models}, {kind: [] for kind in kinds}
    for flag, k in kinds:
        step(flag, k)  # warm-up
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
            step(flag, k)
        results[flag][f"all_gathers_stage_{k}"] = all_gathers(profile)
    for i in range(steps):
        for kind in kinds[i % len(kinds):] + kinds[:i % len(kinds)]:
            distributed.barrier(env)
            start = time.perf_counter()
            step(*kind)
            distributed.barrier(env)
            times[kind].append(time.perf_counter() - start)
    for (flag, k), seconds in times.items():
        results[flag][f"stage_{k}_s"] = statistics.median(seconds)
    for result in results.values():
        result["ratio"] = result[f"stage_{proxy.LATENTS}_s"] / result["stage_0_s"]
    return {str(flag): result for flag, result in results.items()}


def _worker(rank, port, layers, steps, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(WORLD_SIZE), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    env = distributed.setup()
    try:
        results = _measure(env, layers, steps)
    finally:
        distributed.teardown()
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    distributed.exit_process(0)  # as run.py ends: Python's finalization can abort after gloo (see exit_process)


def summary_lines(result: dict) -> list:
    """The measured figures as lines: the setup, each setting's steps, the speedup."""
    k = result["latents"]
    lines = [f"FSDP, {result['processes']} processes x 1 thread (GPT-2 {result['layers']} layers x {result['width']}, "
             f"batch {result['batch_per_process']} per process; forward, backward and AdamW step)"]
    for flag, r in result["reshard_after_forward"].items():
        lines.append(f"  reshard_after_forward: {flag:>5}: no latents {r['stage_0_s'] * 1e3:5.0f} ms "
                     f"({r['all_gathers_stage_0']:3} all-gathers), {k} latents {r[f'stage_{k}_s'] * 1e3:5.0f} ms "
                     f"({r[f'all_gathers_stage_{k}']:3} all-gathers): {r['ratio']:.2f}x")
    lines.append(f"  a step with {k} latents: {result['latent_step_speedup']:.2f}x faster with reshard_after_forward: False")
    return lines


def run(quick: bool = False, log=print) -> dict:
    layers, steps = (2, 2) if quick else (proxy.LAYERS, 12)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "fsdp.json"
        mp.spawn(_worker, args=(free_port(), layers, steps, str(out)), nprocs=WORLD_SIZE)
        by_setting = json.loads(out.read_text())
    result = {"processes": WORLD_SIZE, "threads_per_process": 1, "layers": layers, "width": proxy.WIDTH,
              "batch_per_process": proxy.BATCH, "latents": proxy.LATENTS, "steps": steps,
              "reshard_after_forward": by_setting,
              "latent_step_speedup": (by_setting["True"][f"stage_{proxy.LATENTS}_s"]
                                      / by_setting["False"][f"stage_{proxy.LATENTS}_s"])}
    for line in summary_lines(result):
        log(line)
    return result


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a 2-layer model, 2 timed steps")
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args()
    measured = run(quick=args.quick)
    if args.json:
        Path(args.json).write_text(json.dumps(measured, indent=2) + "\n")
