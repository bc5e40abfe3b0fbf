"""`make compare`: the paper's Table 1 (ProsQA column) in miniature.

    python bench/compare.py                        # every method x seeds 0 1 2, 2 jobs at once
    python bench/compare.py --methods coconut cot --seeds 0 --epochs 4 --work /tmp/cmp

The same tiny GPT-2 as `make demo` (args/demo.yaml: from scratch, 12 epochs, batch 4,
lr 5e-4) is trained with every method on the demo's data, one run per (method, seed):
the seed picks both the generated data set and the training seed. The budget is the
same for every method: the demo's epochs, examples and steps. As in the paper, the
checkpoint kept is the one with the best validation accuracy (the first, on ties), and
it is scored on a held-out test split it never saw, with generate.py, which also
counts the tokens each answer took: language tokens generated, and latent positions
(continuous thoughts, or pause tokens) in the prompt.

Runs go `--jobs` at a time (default 2, one thread each: a 2-core machine), each as
run.py -> export.py -> generate.py in subprocesses, logs under WORK/logs/. A finished
run is not run again when its config is unchanged, so a killed `make compare` picks up
where it stopped; the run it was in starts again (its validation curve needs every
epoch's log line). The best checkpoint answers the test split at the stage its
validation accuracy was measured at. Writes
bench/results/compare.json and bench/results/compare.png, and prints the table.
"""

import argparse
import hashlib
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import yaml

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # as a script, sys.path[0] is bench/
    sys.path.insert(0, str(ROOT))

from cli import OneLineParser, UserError, main_guard, positive_int  # noqa: E402
from utils import METHOD_FLAGS, Config  # noqa: E402 - the config class and its method keys (imports no torch)

DEMO_CONFIG = ROOT / "args" / "demo.yaml"
RESULTS = ROOT / "bench" / "results"


@dataclass(frozen=True)
class Row:
    key: str  # the run's name and compare.json's key
    label: str  # the paper's name for it
    method: str  # the method key (utils.METHOD_FLAGS) set True
    no_curriculum: bool
    paper_prosqa: float
    paper_tokens: Optional[float] = None  # tokens per answer, continuous thoughts included, where the paper gives it


# The rows of the paper's Table 1, ProsQA column (accuracy, %; tokens per answer), and the
# method that each trains on top of args/demo.yaml (which is coconut).
ROWS = (
    Row("cot", "CoT", "cot", False, 77.5, 49.4),
    Row("no_cot", "No-CoT", "no_cot", False, 76.7),
    Row("coconut", "Coconut", "coconut", False, 97.0, 14.2),
    Row("no_curriculum", "w/o curriculum", "coconut", True, 76.1),
    Row("no_thoughts", "w/o thought", "no_thoughts", False, 95.5),
    Row("pause_as_thought", "pause as thought", "pause_as_thought", False, 96.6),
)
ROW_BY_KEY = {row.key: row for row in ROWS}
ACCURACY_LINE = re.compile(r"^Accuracy on validation set: (\d+) / (\d+) = ", re.MULTILINE)


def run_config(row: Row, seed: int, data_dir: Path, work: Path, epochs: int) -> dict:
    """args/demo.yaml with the method, the seed and this run's paths."""
    config = yaml.safe_load(DEMO_CONFIG.read_text())
    for flag in METHOD_FLAGS:
        config[flag] = flag == row.method
    config.update(
        no_curriculum=row.no_curriculum, seed=seed, num_epochs=epochs, name=f"{row.key}_s{seed}",
        save_path=str(work / "runs"), train_path=str(data_dir / "prosqa_train.json"),
        val_path=str(data_dir / "prosqa_valid.json"), model_id=str(ROOT / config["model_id"]),
    )
    return config


DEFAULT_DATA_ARGS = "--split_sizes 6000,200,500 --num_nodes 7 --min_steps 3 --max_steps 3"


def data_folder(seed: int, data_args: str, work: Path) -> Path:
    folder = work / "data"
    if shlex.split(data_args) != shlex.split(DEFAULT_DATA_ARGS):
        folder = folder / hashlib.sha256(" ".join(shlex.split(data_args)).encode()).hexdigest()[:12]
    return folder / f"seed{seed}"


def make_data(seed: int, data_args: str, work: Path) -> Path:
    """The demo's generator settings with a test split, for one seed (written once).

    Other --data_args write to a folder of their own (named by a hash of them), so the
    runs' configs, which name their data files, change with them: no run or result of
    other data is reused."""
    out = data_folder(seed, data_args, work)
    if not (out / "prosqa_test.json").is_file():
        command = [sys.executable, str(ROOT / "preprocessing" / "prosqa.py"), "--split",
                   *shlex.split(data_args), "--seed", str(seed), "--output_dir", str(out)]
        if subprocess.run(command, stdout=subprocess.DEVNULL).returncode != 0:  # its error line is above
            raise UserError(f"--data_args {data_args!r}: preprocessing/prosqa.py refused them")
    return out


def validation_curve(log_text: str) -> list:
    """Per-epoch validation accuracy from run.py's published log lines."""
    return [int(c) / int(t) for c, t in ACCURACY_LINE.findall(log_text)]


def best_epoch(curve: list) -> int:
    """0-based epoch of the best validation accuracy, the first on ties."""
    return max(range(len(curve)), key=lambda e: (curve[e], -e))


def _step(command: list, log_path: Path, env: dict) -> None:
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"$ {shlex.join(command)}\n")
        log.flush()
        done = subprocess.run(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise RuntimeError(f"{shlex.join(command)} exited {done.returncode}; see {log_path}")


def score_answers(path: Path) -> dict:
    records = json.loads(path.read_text())
    return {
        "test_acc": sum(r["correct"] for r in records) / len(records),
        "test_questions": len(records),
        "generated_tokens": statistics.mean(r["generated_tokens"] for r in records),
        "latent_tokens": statistics.mean(r["latent_tokens"] for r in records),
    }


def run_one(row: Row, seed: int, data_dir: Path, work: Path, epochs: int, threads: int) -> tuple:
    """Train, export the best-validation checkpoint, answer the test split: (one result,
    whether it was read back from an earlier compare instead)."""
    config = run_config(row, seed, data_dir, work, epochs)
    name = config["name"]
    for sub in ("configs", "logs", "results"):
        (work / sub).mkdir(parents=True, exist_ok=True)
    config_path, result_path = work / "configs" / f"{name}.yaml", work / "results" / f"{name}.json"
    if result_path.is_file() and config_path.is_file() and yaml.safe_load(config_path.read_text()) == config:
        return json.loads(result_path.read_text()), True  # finished before, same config
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), WANDB_MODE="disabled")
    log_path = work / "logs" / f"{name}.log"
    log_path.write_text("")
    run_dir = work / "runs" / name
    # a run stopped part-way starts again: its validation curve needs every epoch's line in
    # this log, and run.py would resume from its checkpoints and print only the rest
    shutil.rmtree(run_dir, ignore_errors=True)
    began = time.monotonic()
    _step([sys.executable, "run.py", str(config_path)], log_path, env)
    train_s = time.monotonic() - began
    curve = validation_curve(log_path.read_text())
    if len(curve) != epochs:
        raise RuntimeError(f"{log_path}: {len(curve)} validation accuracies, expected {epochs}")
    best = best_epoch(curve)
    stage = test_stage(config, best)
    exported, answers = work / "exported" / name, work / "answers" / f"{name}.json"
    answers.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(exported, ignore_errors=True)  # an export stopped part-way: export.py refuses a folder of other files
    _step([sys.executable, "export.py", str(config_path), str(run_dir / f"checkpoint_{best + 1}"), str(exported)],
          log_path, env)
    _step([sys.executable, "generate.py", str(exported), "--questions", str(data_dir / "prosqa_test.json"),
           "--output", str(answers), "--batch_size", "100", "--max_new_tokens", str(config["max_new_tokens"]),
           "--stage", str(stage), "--device", "cpu"], log_path, env)
    shutil.rmtree(run_dir)  # 12 checkpoints of every run would be gigabytes; the export stays
    result = {"method": row.key, "seed": seed, "val_acc_per_epoch": curve, "best_epoch": best + 1, "test_stage": stage,
              "train_wall_s": round(train_s, 1), **score_answers(answers)}
    result_path.write_text(json.dumps(result, indent=1))
    return result, False


def test_stage(config: dict, best: int) -> int:
    """The stage to test the best epoch's export at: the one its validation accuracy was
    measured at, capped as generate.py caps it; 0 for methods without latent tokens,
    whose export has no latent stages (their prompt is the question at every stage)."""
    parsed = Config.from_dict(config)
    if not parsed.method.latent_tokens:
        return 0
    return min(parsed.scheduled_stage(best), config["max_latent_stage"])


def summarize(results: list) -> list:
    """One table row per method: test accuracy over seeds, tokens per answer."""
    table = []
    for row in ROWS:
        runs = [r for r in results if r["method"] == row.key]
        if not runs:
            continue
        accs = [100 * r["test_acc"] for r in runs]
        table.append({
            "method": row.key, "label": row.label, "paper_prosqa": row.paper_prosqa, "paper_tokens": row.paper_tokens,
            "seeds": [r["seed"] for r in runs], "test_acc": accs,
            "test_acc_mean": statistics.mean(accs),
            "test_acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
            "generated_tokens": statistics.mean(r["generated_tokens"] for r in runs),
            "latent_tokens": statistics.mean(r["latent_tokens"] for r in runs),
            "val_acc_per_epoch_mean": [statistics.mean(e) for e in zip(*(r["val_acc_per_epoch"] for r in runs))],
        })
    return table


def format_table(table: list) -> str:
    """Markdown: accuracy and tokens per answer (latent positions + generated), paper and ours."""
    lines = ["| method | paper: accuracy (%) | paper: tokens | ours: test accuracy (%), mean ± sd [seeds] "
             "| ours: tokens (latent + generated) |", "|---|---|---|---|---|"]
    for t in table:
        seeds = " ".join(f"{a:.1f}" for a in t["test_acc"])
        paper_tokens = "" if t["paper_tokens"] is None else t["paper_tokens"]
        tokens = t["latent_tokens"] + t["generated_tokens"]
        lines.append(f"| {t['label']} | {t['paper_prosqa']} | {paper_tokens} | {t['test_acc_mean']:.1f} ± "
                     f"{t['test_acc_std']:.1f} [{seeds}] | {tokens:.1f} ({t['latent_tokens']:.1f} + "
                     f"{t['generated_tokens']:.1f}) |")
    return "\n".join(lines)


def plot(table: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, t in enumerate(table):
        left.scatter([i] * len(t["test_acc"]), t["test_acc"], color="tab:blue", alpha=0.6, s=18)
        left.errorbar(i, t["test_acc_mean"], yerr=t["test_acc_std"], fmt="o", color="tab:blue", capsize=4)
        left.scatter(i, t["paper_prosqa"], marker="x", color="tab:red", s=40,
                     label="paper (GPT-2, full ProsQA)" if i == 0 else None)
        curve = [100 * a for a in t["val_acc_per_epoch_mean"]]
        right.plot(range(1, len(curve) + 1), curve, marker=".", label=t["label"])
    left.set_xticks(range(len(table)), [t["label"] for t in table], rotation=20)
    left.set_ylabel("test accuracy (%): seeds, mean ± sd")
    left.legend(loc="lower left")
    left.set_title("best-validation checkpoint on the test split")
    right.set_xlabel("epoch")
    right.set_ylabel("validation accuracy (%), mean over seeds")
    right.legend(fontsize=8)
    right.set_title("accuracy per epoch")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def parse_args(argv=None):
    p = OneLineParser(prog="compare.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", choices=list(ROW_BY_KEY), default=list(ROW_BY_KEY))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--epochs", type=positive_int, default=yaml.safe_load(DEMO_CONFIG.read_text())["num_epochs"])
    p.add_argument("--jobs", type=positive_int, default=2, help="runs at once (default 2)")
    p.add_argument("--threads", type=int, default=0, help="threads per run (default: cores / jobs)")
    p.add_argument("--data_args", default=DEFAULT_DATA_ARGS,
                   help="preprocessing/prosqa.py arguments besides --seed (default: make demo's, with a test split)")
    p.add_argument("--work", default=str(ROOT / "runs" / "compare"), help="runs, logs, exports (default runs/compare)")
    p.add_argument("--output", default=str(RESULTS / "compare.json"))
    args = p.parse_args(argv)
    if args.threads < 0:
        p.error("--threads must be >= 0 (0: cores / jobs)")
    if Path(args.output).is_dir():  # found when the table is written, after hours of training
        p.error(f"--output {args.output}: is a folder; name the JSON file to write")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    work = Path(args.work).resolve()
    threads = args.threads or max(1, (os.cpu_count() or 2) // args.jobs)
    began = time.monotonic()
    data = {seed: make_data(seed, args.data_args, work) for seed in args.seeds}
    # seed-major order: a stopped compare has whole seeds done
    todo = [(ROW_BY_KEY[m], seed) for seed in args.seeds for m in args.methods]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = [pool.submit(run_one, row, seed, data[seed], work, args.epochs, threads) for row, seed in todo]
        results, reused = [], []
        for (row, seed), future in zip(todo, futures):
            result, was_reused = future.result()
            results.append(result)
            if was_reused:
                reused.append(f"{row.key}_s{seed}")
            print(f"{row.key} seed {seed}: test {result['test_acc']:.3f}" + (" (earlier run)" if was_reused else ""),
                  flush=True)
    table = summarize(results)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "command": shlex.join([os.path.relpath(sys.argv[0], ROOT), *(argv if argv is not None else sys.argv[1:])]),
        "wall_s": round(time.monotonic() - began, 1),  # of this call: runs read back cost nothing
        "reused_runs": reused,
        "budget": {"config": "args/demo.yaml", "epochs": args.epochs, "data_args": args.data_args,
                   "jobs": args.jobs, "threads_per_run": threads, "seeds": args.seeds},
        "table": table, "runs": results,
    }
    output.write_text(json.dumps(report, indent=1))
    plot(table, output.with_suffix(".png"))
    print(format_table(table))
    print(f"wrote {output} and {output.with_suffix('.png')} ({report['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main_guard(main))
