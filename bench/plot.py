"""Plot training step time per curriculum stage, Coconut vs the naive algorithm.

    python bench/plot.py [bench/results/bench.json [out.png]]

Left: each algorithm's step time over its own stage-0 time (the 1.2x target dashed).
Right: the median seconds per step.
"""

import json
import sys
from pathlib import Path


def plot_step_times(results: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    training = results["training"]
    stages = sorted(training["stages"], key=int)
    x = [int(k) for k in stages]
    series = {"Coconut (KV cache, vectorised fill)": ("coconut", "tab:blue", "o"),
              "naive (recompute prefix per latent)": ("naive", "tab:red", "s")}
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for label, (key, color, marker) in series.items():
        left.plot(x, [training["stages"][k][f"{key}_ratio"] for k in stages], marker=marker, color=color, label=label)
        right.plot(x, [training["stages"][k][f"{key}_s"] for k in stages], marker=marker, color=color, label=label)
    target = results.get("targets", {}).get("step_time_ratio_max")
    if target:
        left.axhline(target, color="tab:blue", linestyle="--", linewidth=1, label=f"target {target}x")
    left.axhline(1.0, color="gray", linewidth=0.8)
    left.set(xlabel="stage (latents per example)", ylabel="step time / stage-0 step time",
             title="Step time relative to stage 0", xticks=x)
    left.set_ylim(bottom=0)
    right.set(xlabel="stage (latents per example)", ylabel="seconds per step (median)",
              title="Step time (forward + backward)", xticks=x)
    right.set_ylim(bottom=0)
    left.legend(fontsize=8)
    right.legend(fontsize=8)
    setup = results.get("setup", {})
    fig.suptitle(f"GPT-2 {setup.get('n_layer')}x{setup.get('n_embd')}, batch {training['batch']}, "
                 f"{training['seq_len']} tokens, {setup.get('threads')} CPU thread(s)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    src = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent / "results" / "bench.json"
    dst = Path(sys.argv[2]) if len(sys.argv) > 2 else src.with_name("step_time.png")
    plot_step_times(json.loads(src.read_text()), dst)
    print(f"wrote {dst}")
