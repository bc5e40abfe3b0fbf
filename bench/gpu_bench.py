"""CUDA benchmark of Coconut (run it through bench/gpu.sh). Nothing is downloaded.

Model: GPT-2 124M architecture (GPT2Config() defaults, vocabulary 50257 + 3 markers),
random weights, dropout off, fp32 weights with bf16 autocast. Data: ProsQA-shaped
batches from bench/workload.py (~300 tokens: ~200-token question, markers, latents,
steps, answer).

Prints, and writes to --out (default bench/results/gpu.json):
- training steps (forward + backward, no optimizer) at stage 0 and stage 6: seconds per
  step, tokens/s (every position of the padded batch) and MFU = model FLOPs per second /
  the GPU's dense bf16 peak. Model FLOPs per step: 6 x (matmul parameters: transformer
  blocks + LM head) x tokens + 12 x layers x width x sequence x tokens (attention,
  not halved for causality). Stage 6 does the same arithmetic as stage 0 by design, so
  its MFU shows what the 7 passes cost. Peak: 989 TFLOP/s for H100/H200 (detected by
  name), else set COCONUT_PEAK_TFLOPS (MFU is left out without it). Also one naive
  stage-6 step for comparison.
- generation (bf16 autocast, 64 new tokens max, natural EOS): questions/s of
  Coconut.generate at batch 1 and 64 vs the naive batch-1 loop without a KV cache, and
  how many rows equal the naive outputs (bf16 results depend on the batch layout, so
  near-ties may differ: reported, not asserted).

Without CUDA it prints one line and exits 2. Finishes in well under 5 minutes on an H100.
"""

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if __name__ == "__main__":  # as a script, sys.path[0] is bench/, where bench.py shadows the package
    sys.path[0] = str(ROOT)

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0}


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


def main(argv=None):
    parser = argparse.ArgumentParser(description="Coconut on one CUDA GPU: training MFU and generation throughput")
    parser.add_argument("--batch", type=int, default=32, help="training batch size")
    parser.add_argument("--steps", type=int, default=8, help="timed training steps per stage and round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median taken)")
    parser.add_argument("--gen-batch", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gpu.json")
    # tests only: the same code on the CPU with a tiny model, to check it without a GPU
    parser.add_argument("--cpu-smoke", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    import torch

    if not torch.cuda.is_available() and not args.cpu_smoke:
        why = "this torch is a CPU-only build; set PYTHON to a CUDA one" if torch.version.cuda is None else "no CUDA GPU visible"
        print(f"gpu_bench: needs a CUDA GPU ({why}; torch {torch.__version__})", file=sys.stderr)
        return 2

    from transformers import GPT2Config, GPT2LMHeadModel

    from bench import workload
    from bench.naive import naive_generate_one, naive_train_step_forward
    from coconut import Coconut

    if args.cpu_smoke:
        dev, name, shape, sync = torch.device("cpu"), "cpu (smoke test)", workload.QUICK, lambda: None
        sizes = dict(n_layer=2, n_embd=64, n_head=4)
    else:
        dev, shape, sync, sizes = torch.device("cuda"), workload.FULL, torch.cuda.synchronize, {}
        name = torch.cuda.get_device_name(dev)
    peak = peak_tflops(name)
    ids = workload.ids_for(shape.vocab)
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=shape.vocab, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                     bos_token_id=ids.eos, eos_token_id=ids.eos, **sizes)
    model = GPT2LMHeadModel(cfg).to(dev)
    coconut = Coconut(model, ids.latent, ids.start, ids.end, ids.eos)
    autocast = lambda: torch.autocast(dev.type, dtype=torch.bfloat16)  # noqa: E731
    t_start = time.perf_counter()
    print(f"gpu_bench: {name}, torch {torch.__version__}, GPT-2 {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
          f"params, bf16 autocast, peak {peak or 'unknown (set COCONUT_PEAK_TFLOPS)'} TFLOP/s", flush=True)

    # ---------------------------------------------------------------- training
    model.train()
    batches = {k: {n: t.to(dev) for n, t in workload.training_batch(shape, args.batch, k).items()} for k in (0, 6)}

    def step(k, algo="coconut"):
        model.zero_grad(set_to_none=True)
        with autocast():
            if algo == "coconut":
                loss = coconut(**batches[k]).loss
            else:
                loss = naive_train_step_forward(model, batches[k], ids.latent)
        loss.backward()

    for k in (0, 6):  # warm-up
        step(k)
        step(k)
    times = {0: [], 6: []}
    for r in range(args.rounds):
        for k in ((0, 6) if r % 2 == 0 else (6, 0)):
            times[k].append(statistics.median(timed(lambda: step(k), sync, args.steps)))
    naive_s = statistics.median(timed(lambda: step(6, "naive"), sync, 2))
    training = {"batch": args.batch, "seq_len": batches[0]["input_ids"].shape[1]}
    for k in (0, 6):
        rows_, cols_ = batches[k]["input_ids"].shape
        tokens = rows_ * cols_
        s = statistics.median(times[k])
        flops = model_flops_per_token(cfg, cols_) * tokens
        training[f"stage_{k}"] = {"s_per_step": s, "tokens_per_s": tokens / s, "model_tflops_per_s": flops / s / 1e12,
                                  "mfu": (flops / s / 1e12 / peak) if peak else None, "all_s": times[k]}
    training["stage_6_over_0"] = training["stage_6"]["s_per_step"] / training["stage_0"]["s_per_step"]
    training["naive_stage_6_s_per_step"] = naive_s
    for k in (0, 6):
        e = training[f"stage_{k}"]
        mfu = f"{100 * e['mfu']:.1f}%" if e["mfu"] is not None else "n/a"
        print(f"train stage {k}: {e['s_per_step'] * 1e3:.1f} ms/step, {e['tokens_per_s']:,.0f} tokens/s, "
              f"{e['model_tflops_per_s']:.1f} TFLOP/s, MFU {mfu}", flush=True)
    print(f"train stage 6 / stage 0: {training['stage_6_over_0']:.2f}x; naive stage 6: {naive_s * 1e3:.0f} ms/step "
          f"({naive_s / training['stage_6']['s_per_step']:.1f}x Coconut)", flush=True)
    del batches
    model.zero_grad(set_to_none=True)
    torch.cuda.empty_cache()

    # ---------------------------------------------------------------- generation
    model.eval()
    prompts = workload.prompts(shape, args.gen_batch, n_latents=6)
    n_single, n_naive = min(8, len(prompts)), min(3, args.rounds)

    def generate(chunk):
        batch = workload.prompt_batch(shape, chunk)
        with torch.no_grad(), autocast():
            return coconut.generate(batch["input_ids"].to(dev), batch["attention_mask"].to(dev),
                                    max_new_tokens=args.max_new_tokens).tolist()

    def naive(i):
        with autocast():
            return naive_generate_one(model, prompts[i].to(dev), ids.latent, ids.eos, args.max_new_tokens)

    generate(prompts[:1])
    generate(prompts)  # warm-up
    rows, rates = {}, {"naive": [], "1": [], str(args.gen_batch): []}
    naive_rows = {}
    for r in range(args.rounds):
        sync()
        t = time.perf_counter()
        for i in range(n_single):
            rows.setdefault(1, {})[i] = generate(prompts[i : i + 1])[0]
        sync()
        rates["1"].append(n_single / (time.perf_counter() - t))
        t = time.perf_counter()
        out = generate(prompts)
        sync()
        rates[str(args.gen_batch)].append(len(prompts) / (time.perf_counter() - t))
        rows[args.gen_batch] = dict(enumerate(out))
        if r < n_naive:  # a new question each round
            t = time.perf_counter()
            naive_rows[r] = naive(r)
            sync()
            rates["naive"].append(1 / (time.perf_counter() - t))

    def same(row, want):
        return row[: len(want)] == want and all(x == ids.eos for x in row[len(want):])

    matches = sum(same(rows[bs][i], want) for i, want in naive_rows.items() for bs in rows)
    checked = sum(1 for i in naive_rows for bs in rows)
    naive_qps = statistics.median(rates["naive"])
    generation = {"max_new_tokens": args.max_new_tokens, "naive_questions_per_s": naive_qps,
                  "rows_equal_to_naive": f"{matches}/{checked}", "batches": {}}
    print(f"generate naive (batch 1, no cache): {naive_qps:.2f} questions/s", flush=True)
    for bs in ("1", str(args.gen_batch)):
        qps = statistics.median(rates[bs])
        generation["batches"][bs] = {"questions_per_s": qps, "speedup_vs_naive": qps / naive_qps, "all": rates[bs]}
        print(f"generate batch {bs}: {qps:.2f} questions/s, {qps / naive_qps:.1f}x naive", flush=True)
    print(f"rows equal to the naive loop's: {matches}/{checked}", flush=True)

    result = {"device": name, "peak_tflops": peak, "torch": torch.__version__, "training": training,
              "generation": generation, "wall_s": time.perf_counter() - t_start}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out} in {result['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
