"""`make compare` (bench/compare.py): each row trains the method it names, the log is read
as run.py writes it, the best-validation checkpoint is the one scored, and a short
comparison runs end to end and resumes without training again.
"""

import json
import shlex

import pytest
import yaml
from builders import makefile_demo_data_args

from bench import compare
from evaluate import report
from utils import load_config


@pytest.mark.parametrize("row", compare.ROWS, ids=lambda row: row.key)
def test_each_row_is_a_valid_config_of_its_method(tmp_path, row):
    config = compare.run_config(row, seed=2, data_dir=tmp_path / "data", work=tmp_path, epochs=5)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    loaded = load_config(str(path))
    assert loaded.method.name == row.method
    assert loaded.no_curriculum == row.no_curriculum
    assert (loaded.seed, loaded.num_epochs, loaded.name) == (2, 5, f"{row.key}_s2")
    demo = load_config(str(compare.DEMO_CONFIG))
    same = ("lr", "batch_size_training", "epochs_per_stage", "max_latent_stage", "c_thought", "reset_optimizer")
    assert all(getattr(loaded, key) == getattr(demo, key) for key in same)  # one budget for every method


@pytest.mark.parametrize("row", compare.ROWS, ids=lambda row: row.key)
def test_every_best_epoch_is_tested_at_a_stage_its_export_has(tmp_path, row):
    """generate.py refuses a --stage past the exported max_latent_stage (0 for methods
    without latent tokens): the stage compare.py passes must be one it takes, at the
    stage the validation accuracy was measured at where the export has it."""
    from export import exported_settings
    from inference import resolve_stage

    config = compare.run_config(row, seed=0, data_dir=tmp_path / "data", work=tmp_path, epochs=12)
    parsed = load_config(str(compare.DEMO_CONFIG)).__class__.from_dict(config)
    for best in range(12):
        stage = compare.test_stage(config, best)
        assert resolve_stage(exported_settings(parsed), stage) == stage
        if parsed.method.latent_tokens:
            assert stage == min(parsed.scheduled_stage(best), parsed.max_latent_stage)


def test_the_default_data_is_the_demos_plus_a_test_split():
    def options(args):
        pairs = dict(zip(args[::2], args[1::2]))
        sizes = pairs.pop("--split_sizes").split(",")
        pairs.pop("--seed", None)
        return pairs, sizes

    demo, demo_sizes = options(makefile_demo_data_args())
    ours, our_sizes = options(shlex.split(compare.parse_args([]).data_args))
    assert ours == demo  # the same graphs
    assert our_sizes[:2] == demo_sizes[:2] and int(our_sizes[2]) > 0  # the demo's train and valid, then a test split


def test_validation_curve_reads_what_run_py_prints():
    lines = []
    counts = [{"correct": c, "cot_correct": 0, "total": 200} for c in (12, 150, 199)]
    for epoch, count in enumerate(counts):
        lines.append(f"Training Epoch: {epoch + 1}/3, batch 10/10 completed (loss: 0.5")
        report(count, lines.append)
    assert compare.validation_curve("\n".join(lines)) == [0.06, 0.75, 0.995]


def test_best_epoch_is_the_first_best():
    assert compare.best_epoch([0.2, 0.7, 0.5, 0.7]) == 1
    assert compare.best_epoch([0.9]) == 0
    naive = {curve: next(i for i, a in enumerate(curve) if a == max(curve))
             for curve in [(0.1, 0.3, 0.3), (0.5, 0.4), (0.2, 0.2, 0.6, 0.6)]}
    assert all(compare.best_epoch(list(curve)) == best for curve, best in naive.items())


def test_summary_averages_seeds_per_method():
    runs = [{"method": "coconut", "seed": s, "test_acc": a, "generated_tokens": g, "latent_tokens": 3,
             "val_acc_per_epoch": [a / 2, a]} for s, a, g in ((0, 0.9, 8), (1, 0.7, 10))]
    runs.append({"method": "cot", "seed": 0, "test_acc": 0.5, "generated_tokens": 30, "latent_tokens": 0,
                 "val_acc_per_epoch": [0.1, 0.5]})
    table = {row["method"]: row for row in compare.summarize(runs)}
    assert table["coconut"]["test_acc_mean"] == pytest.approx(80.0)
    assert table["coconut"]["test_acc_std"] == pytest.approx(14.142, abs=1e-3)
    assert table["coconut"]["generated_tokens"] == 9
    assert table["coconut"]["val_acc_per_epoch_mean"] == pytest.approx([0.4, 0.8])
    assert table["cot"]["test_acc_std"] == 0.0
    assert list(table) == ["cot", "coconut"]  # the paper's row order
    lines = compare.format_table(compare.summarize(runs)).splitlines()
    assert "| Coconut | 97.0 | 14.2 | 80.0 ± 14.1 [90.0 70.0] | 12.0 (3.0 + 9.0) |" in lines
    assert "| CoT | 77.5 | 49.4 | 50.0 ± 0.0 [50.0] | 30.0 (0.0 + 30.0) |" in lines


@pytest.mark.slow
def test_a_short_comparison_runs_end_to_end_and_resumes(tmp_path):
    args = ["--methods", "coconut", "cot", "--seeds", "0", "--epochs", "1", "--jobs", "2",
            "--data_args", "--split_sizes 24,8,6 --num_nodes 7 --min_steps 3 --max_steps 3",
            "--work", str(tmp_path / "work"), "--output", str(tmp_path / "compare.json")]
    assert compare.main(args) == 0
    report_ = json.loads((tmp_path / "compare.json").read_text())
    assert (tmp_path / "compare.png").stat().st_size > 0
    runs = {run["method"]: run for run in report_["runs"]}
    assert set(runs) == {"coconut", "cot"}
    assert all(len(run["val_acc_per_epoch"]) == 1 and run["test_questions"] == 6 for run in runs.values())
    # one epoch: the best checkpoint is stage 0's, and it is tested at stage 0 (no thoughts yet)
    assert [runs[m]["test_stage"] for m in ("coconut", "cot")] == [0, 0]
    assert runs["coconut"]["latent_tokens"] == 0 and runs["cot"]["latent_tokens"] == 0
    answers = json.loads((tmp_path / "work" / "answers" / "coconut_s0.json").read_text())
    assert runs["coconut"]["test_acc"] == sum(a["correct"] for a in answers) / 6
    assert not (tmp_path / "work" / "runs" / "coconut_s0").exists()  # checkpoints go once exported
    logs = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "work" / "logs").iterdir()}
    assert compare.main(args) == 0  # finished runs are not trained again
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "work" / "logs").iterdir()} == logs
    again = json.loads((tmp_path / "compare.json").read_text())
    assert again["runs"] == report_["runs"]
    assert report_["reused_runs"] == [] and again["reused_runs"] == ["coconut_s0", "cot_s0"]
    # a compare stopped during a run: that run starts again (run.py would resume it and log only
    # the epochs left), and gives the same result
    import checkpoint
    from coconut import Coconut

    (tmp_path / "work" / "results" / "coconut_s0.json").unlink()
    stopped = Coconut.from_pretrained(tmp_path / "work" / "exported" / "coconut_s0")  # its epoch-1 weights
    checkpoint.save_checkpoint(tmp_path / "work" / "runs" / "coconut_s0", 1, stopped.state_dict())
    assert compare.main(args) == 0
    third = json.loads((tmp_path / "compare.json").read_text())
    assert third["reused_runs"] == ["cot_s0"]
    strip = lambda run: {k: v for k, v in run.items() if k != "train_wall_s"}  # noqa: E731
    assert [strip(r) for r in third["runs"]] == [strip(r) for r in report_["runs"]]


def test_other_data_args_get_data_of_their_own(tmp_path):
    """The runs' configs name their data files, so other data means other configs: no
    result of the default data is read back for them."""
    default = compare.data_folder(0, compare.DEFAULT_DATA_ARGS, tmp_path)
    assert default == tmp_path / "data" / "seed0"  # where earlier compares wrote it
    assert compare.data_folder(0, "  " + compare.DEFAULT_DATA_ARGS.replace(" ", "  "), tmp_path) == default
    other = compare.data_folder(0, "--split_sizes 17886,300,500", tmp_path)
    assert other.name == "seed0" and other != default
    assert compare.data_folder(0, "--split_sizes 17886,300,400", tmp_path) != other


@pytest.mark.parametrize("argv, says", [
    (["--output", "."], "--output .: is a folder; name the JSON file to write"),
    (["--jobs", "0"], "argument --jobs: must be at least 1, got 0"),
    (["--threads", "-2"], "--threads must be >= 0"),
])
def test_arguments_found_wrong_only_after_the_runs_are_refused_first(argv, says, capsys):
    """A folder as --output failed with a traceback after every run had trained (hours)."""
    with pytest.raises(SystemExit) as stop:
        compare.parse_args(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1 and says in err, err


def test_data_args_the_generator_refuses_are_one_line(tmp_path):
    from cli import UserError

    with pytest.raises(UserError, match="--data_args '--split_sizes 40,10': preprocessing/prosqa.py refused them"):
        compare.make_data(0, "--split_sizes 40,10", tmp_path)
