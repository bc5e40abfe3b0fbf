"""CUDA benchmark of Coconut (run it through bench/gpu.sh). Nothing is downloaded.

Model: GPT-2 124M architecture (GPT2Config() defaults, vocabulary 50257 + 3 markers),
random weights, dropout off, its gelu_new fused as run.py trains it by default
(`fused_gelu: True`, modeling.fuse_gelu), fp32 weights with bf16 autocast. Data: ProsQA-shaped
batches from bench/workload.py (~300 tokens: ~200-token question, markers, latents,
steps, answer). Imports only torch, transformers and this repository's modules.

Prints, and writes to --out (default bench/results/gpu.json), the rows of issue 13's table:
1. training steps (forward + backward, no optimizer) at stage 0 and stage 6, ours and
   the published algorithm (bench/naive.py: one prefix recomputation per latent, full
   logits): ms per step, tokens/s, MFU, and stage 6 / stage 0. Model FLOPs per step:
   6 x (matmul parameters: transformer blocks + LM head) x tokens + 12 x layers x width
   x sequence x tokens (attention, not halved for causality), every position of the
   padded batch counted, whatever an implementation skips. Stage 6 does the same
   arithmetic as stage 0 by design, so its MFU shows what the 7 passes cost. Peak: 989
   TFLOP/s dense bf16 for H100/H200 (detected by name), else COCONUT_PEAK_TFLOPS.
   Ours again with GPT-2's Python gelu_new (`fused_gelu: False`), on a copy, and with
   every pass through Hugging Face's forward (`lean_passes` off: no lean one-column
   passes, lean_passes.py); a stage-6 step's loss and gradients with lean passes against
   Hugging Face's, beside Hugging Face's against a second run of themselves.
2. attention: eager steps of ours at stages 0 and 6 with PyTorch's default attention
   kernels (cuDNN's on an H100) and with cuDNN attention off, on the fixed batches and
   at stage 6 on batches of new widths (cuDNN plans each new attention shape), and
   the host's top operations by self CPU time in a stage-6 step (launches, syncs).
3. the same two training steps of ours with `compile: True` as one process runs it
   (compiling.compile_decoder: the decoder pass one graph per shape, on a copy of the
   model), after a warm-up that compiles; compile seconds, graphs and graph breaks
   reported. --compile-mode reduce-overhead also replays each pass shape as a CUDA graph
   (an experiment: `compile: True` does not do that).
   Each training row also profiles one step (torch.profiler): GPU operations launched,
   the milliseconds the GPU was busy (the rest of the step is the host's dispatch), and
   the operations that took the most of it.
4. generation (64 new tokens max, natural EOS): questions/s at batch 1 and batch 64
   vs the naive batch-1 loop without a KV cache, with the eager decoding loop and with
   the CUDA-graph step (compiling.CapturedDecoder; the path that actually ran is
   reported, with the error if it fell back). Rows equal to the naive outputs are
   counted (bf16 results depend on the batch layout, so near-ties may differ).

Sections run as training, attention, generation, compile (the compile section
compiles for about 5 minutes on an H100 host; --layers 2, about 1); the compile
section, and CUDA-graph decoding, are skipped when they would start after --budget-s
seconds, and say so. The JSON is rewritten after each section, so a run stopped
midway keeps what it measured. Without CUDA it prints one line and exits 2;
`--cpu-smoke` runs the same code on the CPU with a tiny model (tests), compiling with
the "eager" backend.
"""

import argparse
import copy
import dataclasses
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if __name__ == "__main__":  # as a script, sys.path[0] is bench/, where bench.py shadows the package
    sys.path[0] = str(ROOT)

# dense bf16 peaks, most specific name first: the H100's PCIe and NVL cards run slower than SXM
PEAK_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.0, "H200": 989.0}


def peak_tflops(device_name: str):
    env = os.environ.get("COCONUT_PEAK_TFLOPS")
    if env:
        return float(env)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in device_name), None)


def model_flops_per_token(cfg, seq_len: int) -> float:
    blocks = cfg.n_layer * 12 * cfg.n_embd**2  # qkv 3d^2 + proj d^2 + mlp 8d^2
    head = cfg.vocab_size * cfg.n_embd
    return 6 * (blocks + head) + 12 * cfg.n_layer * cfg.n_embd * seq_len


def timed(fn, sync, n):
    times = []
    for _ in range(n):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return times


class Bench:
    """The model, the batches and the clock shared by the sections."""

    def __init__(self, args):
        import torch

        from bench import workload
        from coconut import Coconut

        self.args, self.torch, self.workload = args, torch, workload
        if args.cpu_smoke:
            self.dev, self.name, self.shape, self.sync = torch.device("cpu"), "cpu (smoke test)", workload.QUICK, lambda: None
            sizes = dict(n_layer=2, n_embd=64, n_head=4)
        else:
            self.dev, self.shape, self.sync = torch.device("cuda"), workload.FULL, torch.cuda.synchronize
            sizes = dict(n_layer=args.layers, n_embd=768, n_head=12)  # GPT2Config()'s
            self.name = torch.cuda.get_device_name(self.dev)
        self.peak = peak_tflops(self.name)
        self.ids = workload.ids_for(self.shape.vocab)
        # dropout off, gelu_new fused as run.py trains it (fused_gelu: True); both algorithms share it
        self.model = workload.make_model(**sizes, vocab=self.shape.vocab, seed=0).to(self.dev)
        self.cfg = self.model.config
        self.coconut = Coconut(self.model, self.ids.latent, self.ids.start, self.ids.end, self.ids.eos)
        self.batches = {k: self.batch(self.shape, k) for k in (0, 6)}
        self.start = time.perf_counter()
        self.mark_cudagraph_steps = False  # set while timing a model compiled with mode="reduce-overhead"

    def batch(self, shape, k: int) -> dict:
        """A training batch of `shape` at stage k, on the device."""
        return {n: t.to(self.dev) for n, t in self.workload.training_batch(shape, self.args.batch, k).items()}

    def autocast(self):
        return self.torch.autocast(self.dev.type, dtype=self.torch.bfloat16)

    def elapsed(self):
        return time.perf_counter() - self.start

    def step(self, coconut, k, algo="coconut", batch=None):
        """One forward and backward at stage k, on the fixed batch unless `batch` is given."""
        from bench.naive import naive_train_step_forward

        batch = self.batches[k] if batch is None else batch
        model = coconut.base_causallm
        model.zero_grad(set_to_none=True)
        if self.mark_cudagraph_steps:  # a new step: the graphs' outputs of the last one are dead
            self.torch.compiler.cudagraph_mark_step_begin()
        with self.autocast():
            if algo == "coconut":
                loss = coconut(**batch, return_logits=False).loss
            else:
                loss = naive_train_step_forward(model, batch, self.ids.latent)
        loss.backward()
        return loss.detach()

    def entry(self, k, seconds):
        rows, cols = self.batches[k]["input_ids"].shape
        tokens = rows * cols
        flops = model_flops_per_token(self.cfg, cols) * tokens
        tflops = flops / seconds / 1e12
        return {"s_per_step": seconds, "tokens_per_s": tokens / seconds, "model_tflops_per_s": tflops,
                "mfu": (tflops / self.peak) if self.peak else None}


def fmt_mfu(e):
    return f"{100 * e['mfu']:.1f}%" if e.get("mfu") is not None else "n/a"


# ----------------------------------------------------------------------------- training
TOP_GPU_OPS = 12


def profiled_step(b: Bench, coconut, k):
    """torch.profiler's record of one training step at stage k (host and, on CUDA, GPU)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if b.dev.type == "cuda" else [])
    b.sync()
    with profile(activities=activities) as prof:
        b.step(coconut, k)
        b.sync()
    return prof


def profile_step(b: Bench, coconut, k) -> dict:
    """GPU operations (kernels, copies) and the milliseconds they kept the GPU busy in one
    training step at stage k (none on the CPU)."""
    from torch.autograd import DeviceType

    return summarize_ops(profiled_step(b, coconut, k).events(), DeviceType.CUDA)


def summarize_ops(events, device_type) -> dict:
    """The count and total milliseconds of the profiler events on `device_type`, and the
    TOP_GPU_OPS names that took the most time: {name: [count, ms]}."""
    by_name = {}
    for event in events:
        if event.device_type == device_type:
            count, ms = by_name.get(event.name, (0, 0.0))
            by_name[event.name] = (count + 1, ms + event.time_range.elapsed_us() / 1e3)
    top = sorted(by_name.items(), key=lambda item: -item[1][1])[:TOP_GPU_OPS]
    return {"gpu_ops": sum(count for count, _ in by_name.values()),
            "gpu_busy_ms": sum(ms for _, ms in by_name.values()),
            "top": {name[:120]: [count, ms] for name, (count, ms) in top}}


def train_ours(b: Bench, coconut, label: str) -> dict:
    """Interleaved rounds of stage 0 and stage 6 steps; median per stage."""
    times = {0: [], 6: []}
    for r in range(b.args.rounds):
        for k in ((0, 6) if r % 2 == 0 else (6, 0)):
            times[k].append(statistics.median(timed(lambda: b.step(coconut, k), b.sync, b.args.steps)))
    result = {f"stage_{k}": {**b.entry(k, statistics.median(times[k])), "all_s": times[k]} for k in (0, 6)}
    result["stage_6_over_0"] = result["stage_6"]["s_per_step"] / result["stage_0"]["s_per_step"]
    for k in (0, 6):
        e = result[f"stage_{k}"]
        e["profile"] = profile_step(b, coconut, k)
        print(f"train {label} stage {k}: {e['s_per_step'] * 1e3:.1f} ms/step, {e['tokens_per_s']:,.0f} tokens/s, "
              f"{e['model_tflops_per_s']:.1f} TFLOP/s, MFU {fmt_mfu(e)}; profiled step: {e['profile']['gpu_ops']} "
              f"GPU operations, GPU busy {e['profile']['gpu_busy_ms']:.1f} ms", flush=True)
        for name, (count, ms) in e["profile"]["top"].items():
            print(f"    {ms:8.2f} ms {count:5d}x {name[:100]}", flush=True)
    print(f"train {label} stage 6 / stage 0: {result['stage_6_over_0']:.2f}x", flush=True)
    return result


def lean_against_hugging_face(b: Bench) -> dict:
    """A stage-6 step's loss and gradients with lean passes, with Hugging Face's, and with
    Hugging Face's again: the lean passes are Hugging Face's bit for bit on a CPU
    (tests/test_lean_passes.py); this says how they compare on this device, beside what
    two runs of the same passes differ by (kernels that sum in a varying order)."""
    runs = []
    try:
        for lean in (True, False, False):
            b.coconut.lean_passes = lean
            loss = b.step(b.coconut, 6)
            runs.append((loss, [p.grad.detach().clone() for p in b.model.parameters() if p.grad is not None]))
    finally:
        b.coconut.lean_passes = True
        b.model.zero_grad(set_to_none=True)

    def compare(x, y):
        diff = max(float((g.float() - h.float()).abs().max()) for g, h in zip(x[1], y[1]))
        return {"loss_equal": bool(b.torch.equal(x[0], y[0])), "grads_equal": diff == 0.0, "max_grad_abs_diff": diff}

    result = {"lean_vs_hf": compare(runs[0], runs[1]), "hf_vs_hf": compare(runs[2], runs[1]),
              "losses": [float(loss) for loss, _ in runs]}
    print(f"lean passes against Hugging Face's, stage 6: {result['lean_vs_hf']}; Hugging Face's against itself: "
          f"{result['hf_vs_hf']}", flush=True)
    return result


def with_gelu_new(model):
    """A copy of `model` with GPT-2's Python gelu_new back in place of the fused
    activation: what `fused_gelu: False` trains."""
    from transformers.activations import GELUTanh, NewGELUActivation

    model = copy.deepcopy(model)
    for block in model.transformer.h:
        if type(block.mlp.act) is GELUTanh:
            block.mlp.act = NewGELUActivation()
    return model


def section_training(b: Bench) -> dict:
    from coconut import Coconut

    for k in (0, 6, 0, 6):  # warm-up
        b.step(b.coconut, k)
    result = {"batch": b.args.batch, "seq_len": b.batches[0]["input_ids"].shape[1]}
    result["ours"] = train_ours(b, b.coconut, "ours")
    unfused = Coconut(with_gelu_new(b.model), b.ids.latent, b.ids.start, b.ids.end, b.ids.eos)
    for k in (0, 6):  # warm-up
        b.step(unfused, k)
    result["ours_gelu_new"] = train_ours(b, unfused, "ours, fused_gelu: False")
    del unfused
    gc.collect()  # its blocks' forwards hold the blocks (lean_passes.install): a cycle only the collector frees
    b.coconut.lean_passes = False
    try:
        for k in (0, 6):  # warm-up
            b.step(b.coconut, k)
        result["ours_hf_passes"] = train_ours(b, b.coconut, "ours, Hugging Face's passes (lean_passes off)")
    finally:
        b.coconut.lean_passes = True
    result["lean_vs_hf"] = lean_against_hugging_face(b)
    b.step(b.coconut, 0, "naive")  # warm-up, both stages: stage 6's first step meets new shapes
    b.step(b.coconut, 6, "naive")
    naive = {0: statistics.median(timed(lambda: b.step(b.coconut, 0, "naive"), b.sync, b.args.steps)),
             6: statistics.median(timed(lambda: b.step(b.coconut, 6, "naive"), b.sync, 2))}
    result["naive"] = {f"stage_{k}": b.entry(k, s) for k, s in naive.items()}
    result["naive"]["stage_6_over_0"] = naive[6] / naive[0]
    for k in (0, 6):
        e = result["naive"][f"stage_{k}"]
        print(f"train published algorithm stage {k}: {e['s_per_step'] * 1e3:.1f} ms/step, MFU {fmt_mfu(e)} "
              f"({e['s_per_step'] / result['ours'][f'stage_{k}']['s_per_step']:.1f}x ours)", flush=True)
    print(f"train published algorithm stage 6 / stage 0: {result['naive']['stage_6_over_0']:.1f}x", flush=True)
    b.model.zero_grad(set_to_none=True)
    return result


def section_compiled_training(b: Bench) -> dict:
    from torch._dynamo.utils import counters

    from coconut import Coconut
    from compiling import compile_decoder

    model = copy.deepcopy(b.model)  # the eager model stays eager for the generation section
    coconut = Coconut(model, b.ids.latent, b.ids.start, b.ids.end, b.ids.eos)
    mode = b.args.compile_mode
    if b.args.cpu_smoke:
        compile_decoder(coconut, backend="eager")
    else:
        compile_decoder(coconut, **({} if mode == "default" else {"mode": mode}))
    b.mark_cudagraph_steps = mode == "reduce-overhead"
    graphs_before, breaks_before = counters["stats"].get("unique_graphs", 0), sum(counters["graph_break"].values())
    t = time.perf_counter()
    for k in (0, 6, 0, 6):  # compiles every pass shape, then runs warm
        b.step(coconut, k)
    b.sync()
    warm_up = time.perf_counter() - t
    result = {"compiled": "decoder", "mode": mode, "warm_up_s": warm_up,
              "graphs": counters["stats"].get("unique_graphs", 0) - graphs_before,
              "graph_breaks": sum(counters["graph_break"].values()) - breaks_before}
    print(f"compile: the decoder pass compiled (mode {mode}), warm-up (compilation) {warm_up:.0f} s, "
          f"{result['graphs']} graphs, {result['graph_breaks']} graph breaks", flush=True)
    result.update(train_ours(b, coconut, f"compiled ({mode})"))
    b.mark_cudagraph_steps = False
    del coconut, model
    return result


TOP_HOST_OPS = 15


def host_profile(b: Bench, coconut, k) -> dict:
    """Where the host's time goes in one training step at stage k: the operations with
    the most self CPU time (launches, syncs, cuDNN calls), {name: [count, ms]}."""
    averages = sorted(profiled_step(b, coconut, k).key_averages(), key=lambda a: -a.self_cpu_time_total)
    return {a.key[:120]: [a.count, a.self_cpu_time_total / 1e3] for a in averages[:TOP_HOST_OPS]}


def new_shape_batches(b: Bench, n: int, offset: int) -> list:
    """n stage-6 batches, each wider than the fixed batch and than each other (questions
    8 tokens longer each time, `offset` more for all): shapes a run meets for the first time."""
    return [b.batch(dataclasses.replace(b.shape, question=b.shape.question + offset + 8 * (j + 1)), 6) for j in range(n)]


def section_attention(b: Bench) -> dict:
    """Eager training steps with PyTorch's default attention kernels (cuDNN's on an H100)
    against the same with cuDNN attention switched off
    (torch.backends.cuda.enable_cudnn_sdp(False)): on the bench's fixed batches, then at
    stage 6 on batches of shapes not seen before, as a run with batches of varying width
    meets them (cuDNN builds an execution plan for each new attention shape)."""
    cuda = b.torch.backends.cuda
    default_cudnn = cuda.cudnn_sdp_enabled()
    result = {"cudnn_sdp_default": default_cudnn, "fixed_shape_stage_6": list(b.batches[6]["input_ids"].shape)}
    try:
        for i, (label, enabled) in enumerate((("default", default_cudnn), ("cudnn_off", False))):
            cuda.enable_cudnn_sdp(enabled)
            for k in (0, 6, 0, 6):  # warm-up
                b.step(b.coconut, k)
            fixed = {k: statistics.median(timed(lambda: b.step(b.coconut, k), b.sync, b.args.steps)) for k in (0, 6)}
            batches = new_shape_batches(b, b.args.steps, offset=4 * i)  # other widths for each setting
            new_shapes = [timed(lambda: b.step(b.coconut, 6, batch=batch), b.sync, 1)[0] for batch in batches]
            result[label] = {"stage_0_s": fixed[0], "stage_6_s": fixed[6], "stage_6_new_shapes_s": new_shapes,
                             "new_shapes": [list(batch["input_ids"].shape) for batch in batches],
                             "host_top_stage_6": host_profile(b, b.coconut, 6)}
            print(f"attention {label} (cuDNN attention {'allowed' if enabled else 'off'}): stage 0 {fixed[0] * 1e3:.1f} ms, "
                  f"stage 6 {fixed[6] * 1e3:.1f} ms; stage 6 on {len(batches)} new shapes: median "
                  f"{statistics.median(new_shapes) * 1e3:.1f} ms, mean {statistics.mean(new_shapes) * 1e3:.1f} ms, "
                  f"max {max(new_shapes) * 1e3:.0f} ms", flush=True)
            for name, (count, ms) in result[label]["host_top_stage_6"].items():
                print(f"    host {ms:8.2f} ms {count:5d}x {name[:100]}", flush=True)
    finally:  # a failed step leaves neither the setting nor gradients behind for the next section
        cuda.enable_cudnn_sdp(default_cudnn)
        b.model.zero_grad(set_to_none=True)
    return result


# ----------------------------------------------------------------------------- generation
def section_generation(b: Bench) -> dict:
    from bench.naive import naive_generate_one

    torch, args = b.torch, b.args
    b.model.eval()
    prompts = b.workload.prompts(b.shape, args.gen_batch, n_latents=6)
    n_single, n_naive = min(4, len(prompts)), min(3, args.rounds)

    def generate(chunk, graphs: bool):
        b.coconut.cuda_graphs = graphs
        batch = b.workload.prompt_batch(b.shape, chunk)
        with torch.no_grad(), b.autocast():
            return b.coconut.generate(batch["input_ids"].to(b.dev), batch["attention_mask"].to(b.dev),
                                      max_new_tokens=args.max_new_tokens).tolist()

    def rate(fn, n_questions):
        b.sync()
        t = time.perf_counter()
        out = fn()
        b.sync()
        return n_questions / (time.perf_counter() - t), out

    naive_rows, naive_rates = {}, []
    for i in range(n_naive):  # a new question each time
        with b.autocast():
            qps, naive_rows[i] = rate(lambda: naive_generate_one(b.model, prompts[i].to(b.dev), b.ids.latent, b.ids.eos,
                                                                 args.max_new_tokens), 1)
        naive_rates.append(qps)
    naive_qps = statistics.median(naive_rates)
    print(f"generate naive (batch 1, no cache): {naive_qps:.2f} questions/s", flush=True)
    result = {"max_new_tokens": args.max_new_tokens, "naive_questions_per_s": naive_qps, "paths": {}}

    def same(row, want):
        return row[: len(want)] == want and all(x == b.ids.eos for x in row[len(want):])

    for label, graphs in (("eager", False), ("cuda_graph", True)):
        if graphs and b.elapsed() > args.budget_s:
            result["paths"][label] = {"skipped": f"over the {args.budget_s} s budget"}
            continue
        t = time.perf_counter()
        for i in range(n_single):  # warm-up: compiles and captures every shape timed below
            generate(prompts[i : i + 1], graphs)
        generate(prompts, graphs)
        warm_up = time.perf_counter() - t
        rates = {"1": [], str(args.gen_batch): []}
        rows = {}
        for _ in range(args.rounds):
            qps, out = rate(lambda: [generate(prompts[i : i + 1], graphs)[0] for i in range(n_single)], n_single)
            rates["1"].append(qps)
            rows[1] = out
            qps, rows[args.gen_batch] = rate(lambda: generate(prompts, graphs), len(prompts))
            rates[str(args.gen_batch)].append(qps)
        decoder = getattr(b.coconut, "_captured_decoder", None)
        entry = {"decode_path": b.coconut.last_decode_path, "warm_up_s": warm_up,
                 "fallback_error": decoder.error if (graphs and decoder is not None) else None, "batches": {}}
        matches = sum(same(rows[bs][i], want) for i, want in naive_rows.items() for bs in rows if i < len(rows[bs]))
        entry["rows_equal_to_naive"] = f"{matches}/{sum(1 for i in naive_rows for bs in rows if i < len(rows[bs]))}"
        for bs, r in rates.items():
            qps = statistics.median(r)
            entry["batches"][bs] = {"questions_per_s": qps, "speedup_vs_naive": qps / naive_qps, "all": r}
            print(f"generate {label} (ran: {entry['decode_path']}) batch {bs}: {qps:.2f} questions/s, "
                  f"{qps / naive_qps:.1f}x naive", flush=True)
        print(f"generate {label}: rows equal to the naive loop's {entry['rows_equal_to_naive']}, warm-up {warm_up:.0f} s"
              + (f", fell back: {entry['fallback_error']}" if entry["fallback_error"] else ""), flush=True)
        result["paths"][label] = entry
    b.coconut.cuda_graphs = True
    return result


def completed(section):
    """A section's result if it ran through (not skipped, not failed), else None."""
    return section if section and "skipped" not in section and "error" not in section else None


def markdown_table(result) -> str:
    """Issue 13's table: published algorithm, ours, ours compiled."""
    tr, comp, gen = result.get("training"), completed(result.get("compile")), completed(result.get("generation"))
    attention = completed(result.get("attention"))
    ms = lambda e: f"{e['s_per_step'] * 1e3:.0f} ms (MFU {fmt_mfu(e)})"  # noqa: E731
    layers = f", GPT-2 with {result['layers']} layers" if result.get("layers", 12) != 12 else ""
    lines = [f"{result['device']}, torch {result['torch']}, transformers {result['transformers']}{layers}",
             "", "| measure | published algorithm | ours | ours, compile: True"
             + (f" (mode {comp['mode']})" if comp and comp.get("mode", "default") != "default" else "") + " |", "|---|---|---|---|"]
    if tr:
        for k in (0, 6):
            lines.append(f"| train step, stage {k} (fwd+bwd) | {ms(tr['naive'][f'stage_{k}'])} | {ms(tr['ours'][f'stage_{k}'])} | "
                         + (ms(comp[f"stage_{k}"]) if comp else "-") + " |")
        lines.append(f"| stage 6 / stage 0 | {tr['naive']['stage_6_over_0']:.1f}x | {tr['ours']['stage_6_over_0']:.2f}x | "
                     + (f"{comp['stage_6_over_0']:.2f}x" if comp else "-") + " |")
        if "ours_gelu_new" in tr:
            unfused = tr["ours_gelu_new"]
            lines.append(f"| the same, fused_gelu: False: stage 0, stage 6 | - | {ms(unfused['stage_0'])}, "
                         f"{ms(unfused['stage_6'])} | - |")
        if "ours_hf_passes" in tr:
            plain = tr["ours_hf_passes"]
            lines.append(f"| the same, Hugging Face's passes (lean_passes off): stage 0, stage 6, stage 6 / stage 0 | - | "
                         f"{ms(plain['stage_0'])}, {ms(plain['stage_6'])}, {plain['stage_6_over_0']:.2f}x | - |")
        if "lean_vs_hf" in tr:
            same = lambda c: ("bit for bit" if c["loss_equal"] and c["grads_equal"]  # noqa: E731
                              else f"loss {'equal' if c['loss_equal'] else 'differs'}, gradients within {c['max_grad_abs_diff']:.1e}")
            lines.append(f"| lean passes against Hugging Face's, stage 6 loss and gradients | - | "
                         f"{same(tr['lean_vs_hf']['lean_vs_hf'])} (Hugging Face's run twice: {same(tr['lean_vs_hf']['hf_vs_hf'])}) | - |")
        busy = lambda e: f"{e['profile']['gpu_ops']:,} ops, busy {e['profile']['gpu_busy_ms']:.0f} ms"  # noqa: E731
        for k in (0, 6):
            lines.append(f"| profiled step, stage {k}: GPU operations, GPU busy | - | {busy(tr['ours'][f'stage_{k}'])} | "
                         + (busy(comp[f"stage_{k}"]) if comp else "-") + " |")
    if attention:
        cells = [f"{label} {a['stage_0_s'] * 1e3:.0f} ms, {a['stage_6_s'] * 1e3:.0f} ms, "
                 f"{statistics.median(a['stage_6_new_shapes_s']) * 1e3:.0f} ms"
                 for label, a in (("default:", attention["default"]), ("cuDNN off:", attention["cudnn_off"]))]
        lines.append("| attention kernels, default and cuDNN off: stage 0, stage 6, stage 6 on new shapes (median) | - | "
                     + "; ".join(cells) + " | - |")
    if gen:
        for bs in sorted({bs for p in gen["paths"].values() for bs in p.get("batches", {})}, key=int, reverse=True):
            cells = []
            for path in ("eager", "cuda_graph"):
                e = gen["paths"].get(path, {}).get("batches", {}).get(bs)
                ran = gen["paths"].get(path, {}).get("decode_path")
                cells.append(f"{e['speedup_vs_naive']:.1f}x ({e['questions_per_s']:.1f} questions/s, ran {ran})" if e else "-")
            lines.append(f"| generation, batch {bs}, vs the naive loop ({gen['naive_questions_per_s']:.2f} questions/s) | 1x | "
                         f"eager decoding: {cells[0]} | CUDA-graph decoding: {cells[1]} |")
    return "\n".join(lines)


def write_result(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Coconut on one CUDA GPU: training MFU and generation throughput")
    parser.add_argument("--batch", type=int, default=32, help="training batch size")
    parser.add_argument("--steps", type=int, default=8, help="timed training steps per stage and round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median taken)")
    parser.add_argument("--gen-batch", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--budget-s", type=float, default=300.0,
                        help="optional sections (CUDA-graph decoding, compiled training) that would start later are skipped")
    parser.add_argument("--compile-mode", default="default", choices=["default", "reduce-overhead", "max-autotune-no-cudagraphs"],
                        help="torch.compile mode of the compile section (compile: True uses the default)")
    parser.add_argument("--layers", type=positive_int, default=12,
                        help="GPT-2's 12 layers, or fewer: graphs and graph breaks are the same, compiled in less time "
                             "(on CUDA; the CPU smoke test has 2)")
    parser.add_argument("--skip", action="append", default=[], choices=["training", "attention", "generation", "compile"])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gpu.json")
    # tests only: the same code on the CPU with a tiny model, to check it without a GPU
    parser.add_argument("--cpu-smoke", action="store_true", help=argparse.SUPPRESS)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)

    import torch

    if not torch.cuda.is_available() and not args.cpu_smoke:
        why = "this torch is a CPU-only build; set PYTHON to a CUDA one" if torch.version.cuda is None else "no CUDA GPU visible"
        print(f"gpu_bench: needs a CUDA GPU ({why}; torch {torch.__version__})", file=sys.stderr)
        return 2

    import transformers

    b = Bench(args)
    print(f"gpu_bench: {b.name}, torch {torch.__version__}, transformers {transformers.__version__}, GPT-2 ({b.cfg.n_layer} layers) "
          f"{sum(p.numel() for p in b.model.parameters()) / 1e6:.1f}M params, bf16 autocast, "
          f"peak {b.peak or 'unknown (set COCONUT_PEAK_TFLOPS)'} TFLOP/s", flush=True)
    result = {"device": b.name, "layers": b.cfg.n_layer, "peak_tflops": b.peak, "torch": torch.__version__,
              "transformers": transformers.__version__, "section_s": {}}
    sections = [("training", section_training), ("attention", section_attention), ("generation", section_generation),
                ("compile", section_compiled_training)]
    for name, run in sections:
        if name in args.skip:
            continue
        if name == "compile" and b.elapsed() > args.budget_s:
            result[name] = {"skipped": f"over the {args.budget_s} s budget"}
            print(f"{name}: skipped (over the {args.budget_s} s budget)", flush=True)
            continue
        t = time.perf_counter()
        try:
            result[name] = run(b)
        except Exception as e:  # an optional section's failure keeps the others' figures and the table
            if name == "training":
                raise
            result[name] = {"error": f"{type(e).__name__}: {e}"}
            print(f"{name}: failed ({result[name]['error']})", flush=True)
        result["section_s"][name] = time.perf_counter() - t
        write_result(args.out, result)  # a run stopped later keeps the sections done
        if b.dev.type == "cuda":
            torch.cuda.empty_cache()
    tr, comp = result.get("training"), completed(result.get("compile"))
    if tr and comp:
        for k in (0, 6):
            print(f"MFU stage {k}: eager {fmt_mfu(tr['ours'][f'stage_{k}'])}, compiled {fmt_mfu(comp[f'stage_{k}'])}")
    result["wall_s"] = b.elapsed()
    print("\n" + markdown_table(result) + "\n")
    write_result(args.out, result)
    print(f"wrote {args.out} in {result['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
