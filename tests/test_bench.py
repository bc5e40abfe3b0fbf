"""The benchmark's baseline is right, and the benchmark scripts run.

bench/naive.py is the naive algorithm the speed-ups are measured against: it must give
Coconut's loss, gradients and generations. bench/bench.py --quick must write its JSON;
bench/gpu.sh must refuse clearly without a GPU.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import workload
from bench.naive import naive_generate_one, naive_train_step_forward
from coconut import Coconut

ROOT = Path(__file__).resolve().parent.parent
SHAPE = workload.QUICK
IDS = workload.ids_for(SHAPE.vocab)
TOLERANCE = 1e-4


def tiny():
    model = workload.make_model(n_layer=2, n_embd=64, n_head=4, vocab=SHAPE.vocab, seed=0)
    return model, Coconut(model, IDS.latent, IDS.start, IDS.end, IDS.eos)


def relative(a, b):
    return float((a - b).norm() / b.norm().clamp(min=1e-12))


@pytest.mark.parametrize("rebuild", ["unbind", "index"])
def test_naive_forward_gives_coconuts_loss_and_gradients(rebuild):
    model, coconut = tiny()
    batch = workload.training_batch(SHAPE, 5, stage=[0, 3, 1, 6, 2])  # mixed, aligned by MyCollator
    params = list(model.parameters())
    ours = coconut(**batch).loss
    ours_grads = torch.autograd.grad(ours, params)
    naive = naive_train_step_forward(model, batch, IDS.latent, rebuild=rebuild)
    naive_grads = torch.autograd.grad(naive, params)
    assert abs(ours.item() - naive.item()) < TOLERANCE * abs(naive.item())
    for got, want in zip(ours_grads, naive_grads):
        assert relative(got, want) < TOLERANCE


def test_naive_forward_lets_gradients_through_the_thoughts():
    """The same loss with the thoughts' values held fixed (detached) gives other
    gradients: the naive step's gradients also flow back through the thoughts."""
    from bench.naive import _fill_latents, _positions

    model, _ = tiny()
    batch = workload.training_batch(SHAPE, 3, stage=4)
    params = list(model.parameters())
    loss = naive_train_step_forward(model, batch, IDS.latent)
    through = torch.autograd.grad(loss, params)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    positions = batch.get("position_ids", _positions(mask))
    with torch.no_grad():
        filled = _fill_latents(model, ids, mask, positions, IDS.latent)
    embeds = torch.where((ids == IDS.latent)[..., None], filled, model.get_input_embeddings()(ids))
    logits = model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).logits
    held = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                             labels[:, 1:].reshape(-1), ignore_index=-100)
    assert abs(held.item() - loss.item()) < 1e-6 * loss.item()  # premise: the same forward
    held_grads = torch.autograd.grad(held, params)
    assert relative(torch.cat([g.flatten() for g in through]), torch.cat([g.flatten() for g in held_grads])) > 1e-2


def test_naive_generation_equals_coconut_rows():
    model, coconut = tiny()
    model.eval()
    prompts = workload.prompts(SHAPE, 6, n_latents=3)
    prompts[1] = prompts[1][:-5]  # [..., start, latent] and no end: still a valid prompt
    prompts.append(workload.prompts(SHAPE, 1, n_latents=0, seed=9)[0])
    batch = workload.prompt_batch(SHAPE, prompts)
    with torch.no_grad():
        rows = coconut.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=10).tolist()
    for row, prompt in zip(rows, prompts):
        want = naive_generate_one(model, prompt, IDS.latent, IDS.eos, 10)
        assert want[: len(prompt)] == prompt.tolist() and len(want) == len(prompt) + 10
        assert row == want + [IDS.eos] * (len(row) - len(want))


def test_naive_generation_keeps_the_first_token_then_stops_at_eos():
    model, coconut = tiny()
    model.eval()
    with torch.no_grad():  # every hidden state becomes ln_f's bias, which points at EOS
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.normal_()
        model.transformer.wte.weight[IDS.eos] = 50 * model.transformer.ln_f.bias
    prompt = workload.prompts(SHAPE, 1, n_latents=2)[0]
    want = naive_generate_one(model, prompt, IDS.latent, IDS.eos, 20)
    assert want == prompt.tolist() + [IDS.eos]
    with torch.no_grad():
        got = coconut.generate(prompt[None], torch.ones_like(prompt[None]), max_new_tokens=20)
    assert got.tolist() == [want]


@pytest.mark.slow
def test_quick_bench_runs_every_section_and_agrees_with_the_naive_algorithm(tmp_path):
    """make bench's code on a tiny setup: every section runs, and what it compares agrees
    (the naive algorithm's losses at every stage, checkpointing's loss)."""
    out = subprocess.run(
        [sys.executable, "bench/bench.py", "--quick", "--threads", "1", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=240,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads((tmp_path / "bench.json").read_text())
    assert {"setup", "targets", "training", "memory", "generation", "demo", "wall_s"} <= set(results)
    stages = results["training"]["stages"]
    assert sorted(stages, key=int) == [str(k) for k in range(7)]
    for entry in stages.values():
        assert {"coconut_s", "coconut_ratio", "naive_s", "naive_ratio", "loss_rel_diff"} <= set(entry)
        assert entry["loss_rel_diff"] < TOLERANCE
    assert {"coconut_ratio", "coconut_0_peak_delta_bytes", "coconut_6_peak_delta_bytes", "target_met"} <= set(results["memory"])
    assert results["memory"]["coconut_0_peak_delta_bytes"] > 0
    gen = results["generation"]
    assert set(gen["batches"]) == {"1", "8", "32"}
    assert all(e["questions_per_s"] > 0 and e["speedup_vs_naive"] > 0 for e in gen["batches"].values())
    assert (tmp_path / "step_time.png").stat().st_size > 10_000
    assert results["checkpointing"]["checkpointing_same_loss"]
    assert len(results["sharding"]["two_process_peak_bytes"]) == 2
    # FSDP's default gathers the root once and each of 2 blocks for each of 7 passes and its backward
    fsdp = results["fsdp"]["reshard_after_forward"]
    assert (fsdp["True"]["all_gathers_stage_6"], fsdp["False"]["all_gathers_stage_6"]) == (1 + 2 * 2 * 7, 1 + 2)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_gpu_script_refuses_clearly_without_cuda():
    out = subprocess.run(["bash", "bench/gpu.sh"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHON": sys.executable})
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "needs a CUDA GPU" in lines[0]
    assert out.stdout == ""


@pytest.mark.slow
def test_gpu_bench_logic_runs_on_cpu_in_smoke_mode(tmp_path):
    """Every section and row of the GPU benchmark, on the CPU, where datasets, wandb and
    spacy cannot be imported (the GPU machine has none of them)."""
    blocked = tmp_path / "blocked"
    for name in ("datasets", "wandb", "spacy"):
        (blocked / name).mkdir(parents=True)
        (blocked / name / "__init__.py").write_text(f"raise ImportError('{name} is not installed here')\n")
    out = subprocess.run(
        [sys.executable, "bench/gpu_bench.py", "--cpu-smoke", "--batch", "3", "--steps", "1", "--rounds", "1",
         "--gen-batch", "4", "--max-new-tokens", "4", "--out", str(tmp_path / "gpu.json")],
        cwd=ROOT, capture_output=True, text=True, timeout=240,
        env={"OMP_NUM_THREADS": "1", "PATH": "", "PYTHONPATH": str(blocked)},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "| the same, Hugging Face's passes (lean_passes off)" in out.stdout  # the table's row
    assert "| lean passes against Hugging Face's, stage 6 loss and gradients | - | bit for bit" in out.stdout  # a CPU
    result = json.loads((tmp_path / "gpu.json").read_text())
    lean_vs_hf = result["training"]["lean_vs_hf"]
    assert lean_vs_hf["lean_vs_hf"] == {"loss_equal": True, "grads_equal": True, "max_grad_abs_diff": 0.0}
    assert len(set(lean_vs_hf["losses"])) == 1 and lean_vs_hf["hf_vs_hf"]["loss_equal"]
    for algo in ("ours", "ours_gelu_new", "ours_hf_passes", "naive"):
        assert result["training"][algo]["stage_0"]["tokens_per_s"] > 0
        assert result["training"][algo]["stage_6_over_0"] > 0
    assert result["compile"]["compiled"] == "decoder" and result["compile"]["stage_6"]["tokens_per_s"] > 0
    assert result["compile"]["graphs"] == 3 and result["compile"]["graph_breaks"] == 0
    compiled_generation = result["compile"]["generation"]  # what a compile: True run's evaluation runs
    assert compiled_generation["decode_path"] == "eager" and compiled_generation["cudagraph_skips"] == 0  # no CUDA
    for section in (result["training"]["ours"], result["compile"]):  # no CUDA: no GPU operations to count
        assert section["stage_6"]["profile"] == {"gpu_ops": 0, "gpu_busy_ms": 0.0, "top": {}}
    new_widths = []
    for setting in ("default", "cudnn_off"):  # timed on the fixed batches and on one batch of a new shape
        attention = result["attention"][setting]
        assert attention["stage_0_s"] > 0 and attention["stage_6_s"] > 0 and len(attention["stage_6_new_shapes_s"]) == 1
        new_widths += [width for _, width in attention["new_shapes"]]
        host_top = attention["host_top_stage_6"]  # the step's operations with their counts
        assert host_top and all(count > 0 and ms >= 0 for count, ms in host_top.values())
    fixed_width = result["attention"]["fixed_shape_stage_6"][1]
    assert len(set(new_widths + [fixed_width])) == 3  # shapes neither the fixed batch nor the other setting had
    for path in ("eager", "cuda_graph"):
        entry = result["generation"]["paths"][path]
        assert set(entry["batches"]) == {"1", "4"} and entry["decode_path"] == "eager"  # no CUDA: eager
        assert entry["cudagraph_skips"] == 0
        assert entry["rows_equal_to_naive"].split("/")[0] == entry["rows_equal_to_naive"].split("/")[1]


def test_attention_section_leaves_the_attention_setting_and_no_gradients_when_a_step_fails():
    """A failed optional section must not change what the next sections time."""
    from bench import gpu_bench

    b = gpu_bench.Bench(gpu_bench.build_parser().parse_args(["--cpu-smoke", "--batch", "2", "--steps", "1"]))
    cuda = torch.backends.cuda
    original = cuda.cudnn_sdp_enabled()
    real_step, settings_seen = b.step, []

    def step_failing_under_the_second_setting(coconut, k, algo="coconut", batch=None):
        settings_seen.append(cuda.cudnn_sdp_enabled())
        real_step(coconut, k, algo, batch)
        if not settings_seen[-1]:  # after its backward: gradients are there
            raise RuntimeError("CUDA out of memory")

    b.step = step_failing_under_the_second_setting
    try:
        cuda.enable_cudnn_sdp(True)
        with pytest.raises(RuntimeError, match="out of memory"):
            gpu_bench.section_attention(b)
        assert settings_seen[0] is True and settings_seen[-1] is False  # it failed with cuDNN attention off
        assert cuda.cudnn_sdp_enabled() is True
        assert all(p.grad is None for p in b.model.parameters())
    finally:
        cuda.enable_cudnn_sdp(original)


def test_gpu_bench_layers_option_is_checked_and_named_in_the_table(capsys):
    from bench import gpu_bench

    parser = gpu_bench.build_parser()
    assert parser.parse_args([]).layers == 12 and parser.parse_args(["--layers", "2"]).layers == 2
    with pytest.raises(SystemExit):
        parser.parse_args(["--layers", "0"])
    assert "--layers: must be at least 1, got 0" in capsys.readouterr().err
    header = {"device": "x", "torch": "t", "transformers": "v"}
    assert gpu_bench.markdown_table({**header, "layers": 2}).splitlines()[0] == "x, torch t, transformers v, GPT-2 with 2 layers"
    assert gpu_bench.markdown_table({**header, "layers": 12}).splitlines()[0] == "x, torch t, transformers v"


def test_mfu_peaks_by_card_and_a_failed_optional_section_keeps_the_table(monkeypatch):
    from bench import gpu_bench

    monkeypatch.delenv("COCONUT_PEAK_TFLOPS", raising=False)
    assert [gpu_bench.peak_tflops(n) for n in ("NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe", "NVIDIA H100 NVL",
                                               "NVIDIA H200", "NVIDIA A10")] == [989.0, 756.0, 835.0, 989.0, None]
    def step(ms):
        return {"s_per_step": ms / 1e3, "mfu": 0.1, "profile": {"gpu_ops": 7, "gpu_busy_ms": 1.0}}

    training = {algo: {"stage_0": step(70), "stage_6": step(140), "stage_6_over_0": 2.0} for algo in ("naive", "ours")}
    attention = {setting: {"stage_0_s": s0, "stage_6_s": s6, "stage_6_new_shapes_s": [s6, 2 * s6, 3 * s6]}
                 for setting, s0, s6 in (("default", 0.033, 0.168), ("cudnn_off", 0.040, 0.202))}
    table = gpu_bench.markdown_table({"device": "x", "torch": "t", "transformers": "v", "training": training,
                                      "attention": attention, "compile": {"error": "RuntimeError: boom"},
                                      "generation": {"error": "e"}})
    lines = table.splitlines()
    assert lines[0] == "x, torch t, transformers v"
    # the training rows stay, with "-" where the failed compile section would be
    assert "| train step, stage 6 (fwd+bwd) | 140 ms (MFU 10.0%) | 140 ms (MFU 10.0%) | - |" in lines
    assert "| stage 6 / stage 0 | 2.0x | 2.00x | - |" in lines
    assert not any(line.startswith("| generation") for line in lines)
    assert ("| attention kernels, default and cuDNN off: stage 0, stage 6, stage 6 on new shapes (median) | - | "
            "default: 33 ms, 168 ms, 336 ms; cuDNN off: 40 ms, 202 ms, 404 ms | - |") in lines


def test_profile_summary_counts_and_ranks_operations():
    """gpu_bench.summarize_ops, on a real CPU profile (on a GPU it reads the CUDA events)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    from bench.gpu_bench import TOP_GPU_OPS, summarize_ops

    big, small = torch.randn(400, 400), torch.randn(4, 4)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            big @ big
        for _ in range(40):
            small + small
    events = [e for e in prof.events() if e.device_type == DeviceType.CPU]
    summary = summarize_ops(events, DeviceType.CPU)
    assert summary["gpu_ops"] == len(events) and summary["top"]["aten::mm"][0] == 3
    assert summary["top"]["aten::add"][0] == 40 and len(summary["top"]) <= TOP_GPU_OPS
    ms = [ms for _, ms in summary["top"].values()]
    assert ms == sorted(ms, reverse=True) and sum(ms) <= summary["gpu_busy_ms"] + 1e-6
    assert summary["top"]["aten::mm"][1] > summary["top"]["aten::add"][1] / 40  # one product outweighs one small add
    assert summarize_ops(events, DeviceType.CUDA) == {"gpu_ops": 0, "gpu_busy_ms": 0.0, "top": {}}


def test_gpu_benchmarks_collator_equals_mycollator():
    """workload.aligned_collate (for machines without `datasets`) lays batches out as MyCollator does."""
    collator = workload.collator(SHAPE.vocab)
    for stage in (0, [0, 3, 1, 6, 2]):
        stages = [stage] * 4 if isinstance(stage, int) else stage
        features = []
        for k, (question, steps, answer) in zip(stages, workload.training_examples(SHAPE, len(stages))):
            prefix = question + [IDS.start] + [IDS.latent] * k + [IDS.end]
            features.append({"input_ids": prefix + steps[k:] + answer, "labels": [-100] * len(prefix) + steps[k:] + answer})
        want = collator(features)
        got = workload.aligned_collate(features, IDS.eos, IDS.latent)
        assert set(got) == set(want) and all(torch.equal(got[key], want[key]) for key in want)
    prompts = workload.prompts(SHAPE, 5, n_latents=3) + workload.prompts(SHAPE, 1, n_latents=0)
    features = [{"input_ids": p.tolist()} for p in prompts]
    want, got = collator(features), workload.aligned_collate(features, IDS.eos, IDS.latent)
    assert set(got) == set(want) and all(torch.equal(got[key], want[key]) for key in want)


def test_proxy_times_lean_passes_and_hugging_faces_side_by_side(monkeypatch):
    """bench/proxy.py's eager section: the ratio and decoding time with lean one-column
    passes (the target's row), then with Hugging Face's passes (reported, not judged)."""
    from bench import bench, proxy

    monkeypatch.setattr(proxy, "LAYERS", 2)
    threads = torch.get_num_threads()
    lines = []
    try:
        result = proxy.run(repeats=1, pairs=1, log=lines.append)
    finally:
        torch.set_num_threads(threads)
    for train in (result["train"], result["train_hf_passes"]):
        assert train["ratio"] > 0 and train["pairs"] == 1
    assert result["decode_hf_passes"]["ours_s_per_token"] > 0 and "naive_s_per_token" not in result["decode_hf_passes"]
    assert any("Hugging Face's passes (lean_passes off)" in line for line in lines)
    table = bench.table({"proxy": result}).splitlines()
    hf_line = next(line for line in table if "Hugging Face's passes (lean_passes off)" in line)
    assert f"{result['train_hf_passes']['ratio']:.2f}x" in hf_line and "target" not in hf_line
    assert any("training step: " in line and "target <= 1.5x" in line for line in table)


@pytest.mark.slow
def test_proxy_times_the_compiled_decoder(monkeypatch):
    """bench/proxy.py --compile times steps of a model whose decoder really is compiled
    (graphs, no graph break), the same batches as the eager ratio; aot_eager and 2 of the
    12 layers here (no code generation, a shorter trace), inductor in the real run."""
    from torch._dynamo.utils import counters

    from bench import proxy

    monkeypatch.setattr(proxy, "LAYERS", 2)
    torch._dynamo.reset()
    counters.clear()
    threads = torch.get_num_threads()
    lines = []
    try:
        result = proxy.compiled_train_ratio(1, lines.append, backend="aot_eager")
        graphs, breaks = counters["stats"]["unique_graphs"], dict(counters["graph_break"])
    finally:
        torch.set_num_threads(threads)
        torch._dynamo.reset()
    assert graphs >= 3 and not breaks, (graphs, breaks)  # the first pass, one-column passes, the rest
    assert result["compile_s"] > 0 and result["ratio"] > 0 and result["pairs"] == 1
    assert lines and "compile: True" in lines[0]
    from bench.bench import table

    line = table({"proxy_compiled": {"train_compiled": result}})
    assert f"compile: True: no latents {result['stage_0_s'] * 1e3:.1f} ms" in line
    assert f"{result['ratio']:.2f}x (target <= 1.5x) -> {'MET' if result['ratio'] <= 1.5 else 'MISSED'}" in line


def test_make_bench_compiles_the_proxy_only_in_what_is_left_of_its_budget():
    """The compiled proxy runs last, only with COMPILED_PROXY_MIN_S of the 10 minutes left,
    and is stopped at the budget's end: make bench stays under 10 minutes either way."""
    from bench import bench

    lines = []
    late = bench.bench_compiled_proxy(lines.append, elapsed_s=bench.BUDGET_S - bench.COMPILED_PROXY_MIN_S + 1)
    assert late == {"skipped": f"{bench.COMPILED_PROXY_MIN_S - 1} s left of the run's {bench.BUDGET_S} s budget, "
                               f"under {bench.COMPILED_PROXY_MIN_S} s"}
    assert len(lines) == 1 and "skipped" in lines[0]  # nothing started
    stopped = bench.bench_proxy(lines.append, ["--compile-only"], timeout=1)
    assert stopped == {"skipped": f"stopped after 1 s, at the end of the run's {bench.BUDGET_S} s budget"}
    assert f"compile: True: skipped ({stopped['skipped']})" in bench.table({"proxy_compiled": stopped})


@pytest.mark.parametrize("argv, says", [
    (["--threads", "-1"], "argument --threads: must be at least 1, got -1"),
    (["--repeats", "0"], "argument --repeats: must be at least 1, got 0"),
    (["--out", "README.md"], "--out README.md: is a file; name the folder for bench.json and step_time.png"),
])
def test_bench_arguments_are_refused_before_any_timing(argv, says, capsys, monkeypatch):
    """A traceback before (--threads) or after the first sections had run (--repeats, --out)."""
    from bench import bench

    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as stop:
        bench.main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1 and says in err, err
