"""A dispatch-bound CPU proxy of a GPU training step and decoding step.

    python bench/proxy.py                 # about a minute on one thread; `make bench` runs it too
    python bench/proxy.py --compile       # also the training steps with compile: True (minutes of compiling)
    python bench/proxy.py --compile-only  # only those (`make bench` runs it last, within its time budget)

On a GPU a latent pass over one column of a batch costs what launching its kernels
costs (Python, Hugging Face's per-call mask and cache work, one kernel per small op),
not its arithmetic. On a CPU a normal-sized model hides that: the arithmetic
dominates. This proxy makes the CPU behave like the GPU: a deep and very narrow GPT-2
(12 layers x 64 wide, 4 heads, GPT-2's vocabulary) on short sequences (batch 4, ~60
tokens), one thread, so every op costs about its dispatch.

Measured side by side, as this process's CPU time (one thread: what other jobs on the
cores disturb least; wall-clock figures beside it):
- a training step (forward + backward) with 6 latents per example over the step with
  none, on the same tokens (bench/workload.py: latents replace step tokens, so both
  batches have the same length): the median ratio of 30 back-to-back pairs of steps
  (load on a shared machine comes in bursts longer than a step). Target: at most 1.5x.
- the time per generated token at batch 1 of `Coconut.generate` and of the naive
  no-cache loop (bench/naive.py), from the difference of two generation lengths (so
  the prompt's passes cancel out).
- both again with every pass through Hugging Face's forward (`lean_passes` off: no
  lean one-column passes, lean_passes.py), in the same process after them.
- the process keeps the memory it frees (glibc's mallopt), as a GPU's caching allocator
  does: by default glibc hands the LM head's large buffers back to the system after
  each step and page-faults them in again on the next, a cost no GPU step has, and an
  uneven one: it moved the ratio between 1.44x and 1.70x from run to run of the same code.
- with --compile, the training ratio again with the decoder compiled as `compile: True`
  compiles it in one process (compiling.compile_decoder, inductor), after a warm-up that
  compiles every pass shape (its seconds reported). Compiling the graphs takes 1 to 3
  minutes here (inductor's on-disk cache warm or cold): `make bench` runs it last, in a
  process of its own, when its 10-minute budget leaves the time.
"""

import ctypes
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if __name__ == "__main__":  # as a script, sys.path[0] is bench/, where bench.py shadows the package
    sys.path[0] = str(ROOT)

import torch  # noqa: E402

from bench import workload  # noqa: E402
from bench.naive import naive_generate_one  # noqa: E402
from coconut import Coconut  # noqa: E402

SHAPE = workload.Shape(question=40, question_jitter=4, steps=14, answer=4)  # ~60 tokens
LAYERS, WIDTH, HEADS, BATCH, LATENTS = 12, 64, 4, 4, 6
TARGET_RATIO = 1.5


def _median_time(fn, repeats):
    """Median seconds of fn(), as this process's CPU time: with one thread it is what other
    jobs on the same cores disturb least (the wall clock is reported beside it)."""
    cpu, wall = [], []
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        fn()
        cpu.append(time.process_time() - c)
        wall.append(time.perf_counter() - t)
    _median_time.last_wall = statistics.median(wall)
    return statistics.median(cpu)


def train_ratio(coconut, pairs: int) -> dict:
    """Step time with LATENTS latents per example over the step with none: `pairs` pairs of
    one step each, back to back (the order alternating), so both see the same load; the
    ratio is the median of the pairs' ratios."""
    batches = {k: workload.training_batch(SHAPE, BATCH, k) for k in (0, LATENTS)}

    def step(k):
        coconut.zero_grad(set_to_none=True)
        coconut(**batches[k], return_logits=False).loss.backward()  # as the trainer calls it

    for k in (0, LATENTS, 0, LATENTS):  # warm-up
        step(k)
    cpu, wall = {0: [], LATENTS: []}, {0: [], LATENTS: []}
    for p in range(pairs):
        for k in ((0, LATENTS) if p % 2 == 0 else (LATENTS, 0)):
            cpu[k].append(_median_time(lambda: step(k), 1))  # noqa: B023 - called at once
            wall[k].append(_median_time.last_wall)
    ratio = statistics.median(b / a for a, b in zip(cpu[0], cpu[LATENTS]))
    return {"batch": BATCH, "seq_len": batches[0]["input_ids"].shape[1], "latents": LATENTS, "pairs": pairs,
            "clock": "process CPU time", "stage_0_s": statistics.median(cpu[0]),
            f"stage_{LATENTS}_s": statistics.median(cpu[LATENTS]), "ratio": ratio, "target": TARGET_RATIO,
            "target_met": ratio <= TARGET_RATIO, "wall_stage_0_s": statistics.median(wall[0]),
            f"wall_stage_{LATENTS}_s": statistics.median(wall[LATENTS]),
            "wall_ratio": statistics.median(b / a for a, b in zip(wall[0], wall[LATENTS]))}


def decode_per_token(model, coconut, repeats: int, short=1, long=33, naive_too=True) -> dict:
    """Seconds per generated token at batch 1: (time(long) - time(short)) / (long - short);
    of the naive loop too, unless naive_too is False."""
    ids = workload.ids_for(SHAPE.vocab)
    prompt = workload.prompts(SHAPE, 1, n_latents=LATENTS)[0]
    mask = torch.ones_like(prompt[None])

    def ours(n):
        with torch.no_grad():
            return coconut.generate(prompt[None], mask, max_new_tokens=n)[0].tolist()

    def naive(n):
        return naive_generate_one(model, prompt, ids.latent, ids.eos, n)

    got, want = ours(long), naive(long)
    assert got == want + [ids.eos] * (len(got) - len(want)), "decoding differs from naive"
    result = {"prompt_tokens": len(prompt), "new_tokens": long - short}
    for name, fn in [("ours", ours)] + ([("naive", naive)] if naive_too else []):
        t_long = _median_time(lambda: fn(long), repeats)
        t_short = _median_time(lambda: fn(short), repeats)
        result[f"{name}_s_per_token"] = (t_long - t_short) / (long - short)
    if naive_too:
        result["naive_over_ours"] = result["naive_s_per_token"] / result["ours_s_per_token"]
    return result


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory in this process (no mmap'd blocks, no trimming), as a
    GPU's caching allocator keeps its blocks; False where there is no mallopt (not glibc)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    # 32 MiB: glibc's largest mmap threshold; the LM head's buffers here are ~13 MiB
    return bool(mallopt(m_mmap_threshold, 32 << 20)) and bool(mallopt(m_trim_threshold, 1 << 30))


def make_coconut():
    model = workload.make_model(LAYERS, WIDTH, HEADS, vocab=SHAPE.vocab, n_positions=256)
    ids = workload.ids_for(SHAPE.vocab)
    return model, Coconut(model, ids.latent, ids.start, ids.end, ids.eos)


def hugging_faces_passes(model, coconut, repeats: int, pairs: int, log) -> dict:
    """The training ratio and decoding time with lean_passes off: every pass through
    Hugging Face's forward, what lean one-column passes are measured against."""
    coconut.lean_passes = False
    try:
        model.train()
        train = train_ratio(coconut, pairs)
        log_train(log, train, ", Hugging Face's passes (lean_passes off)", judged=False)
        model.eval()
        decode = decode_per_token(model, coconut, repeats, naive_too=False)
        log(f"proxy decoding at batch 1, Hugging Face's passes: {decode['ours_s_per_token'] * 1e3:.2f} ms/token")
    finally:
        coconut.lean_passes = True
    return {"train_hf_passes": train, "decode_hf_passes": decode}


def log_train(log, train, how, judged=True):
    target = f"target <= {TARGET_RATIO}x; " if judged else ""
    log(f"proxy train step{how} ({LAYERS} layers x {WIDTH}, batch {BATCH} x {train['seq_len']} tokens, 1 thread): "
        f"no latents {train['stage_0_s'] * 1e3:.1f} ms, {LATENTS} latents {train[f'stage_{LATENTS}_s'] * 1e3:.1f} ms, "
        f"ratio {train['ratio']:.2f}x ({target}CPU time, wall clock {train['wall_ratio']:.2f}x)")


def compiled_train_ratio(pairs: int, log, **compile_kwargs) -> dict:
    """train_ratio with the decoder compiled as compile: True does in one process."""
    from compiling import compile_decoder

    model, coconut = make_coconut()
    model.train()
    compile_decoder(coconut, **compile_kwargs)
    start = time.perf_counter()
    train_ratio(coconut, 1)  # compiles every pass shape of both steps
    compile_s = time.perf_counter() - start
    log(f"proxy compile: True, warm-up (compilation) {compile_s:.0f} s")
    return {"compile_s": compile_s, **train_ratio(coconut, pairs)}


def run(repeats: int = 5, pairs: int = 30, log=print, eager=True, compiled=False, **compile_kwargs) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    allocator = "freed memory kept (mallopt)" if keep_freed_memory() else "the system's default"
    result = {"model": {"n_layer": LAYERS, "n_embd": WIDTH, "n_head": HEADS, "vocab": SHAPE.vocab},
              "threads": 1, "allocator": allocator}
    try:
        if eager:
            model, coconut = make_coconut()
            model.train()
            result["train"] = train_ratio(coconut, pairs)
            log_train(log, result["train"], "")
            model.eval()
            decode = result["decode"] = decode_per_token(model, coconut, repeats)
            log(f"proxy decoding at batch 1: ours {decode['ours_s_per_token'] * 1e3:.2f} ms/token, naive "
                f"{decode['naive_s_per_token'] * 1e3:.2f} ms/token ({decode['naive_over_ours']:.1f}x)")
            result.update(hugging_faces_passes(model, coconut, repeats, pairs, log))
        if compiled:
            result["train_compiled"] = compiled_train_ratio(pairs, log, **compile_kwargs)
            log_train(log, result["train_compiled"], ", compile: True")
    finally:
        torch.set_num_threads(threads)
    return result


if __name__ == "__main__":
    import argparse
    import json

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compile", action="store_true", help="also time the training steps with compile: True")
    parser.add_argument("--compile-only", action="store_true", help="time only the training steps with compile: True")
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args()
    result = run(eager=not args.compile_only, compiled=args.compile or args.compile_only)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    sys.exit(0)
