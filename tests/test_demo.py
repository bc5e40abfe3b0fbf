"""`make demo`, shortened: the same data command, args/demo.yaml and run.py, on a tiny split.

The Makefile's demo recipe generates `data/demo/` with `preprocessing/prosqa.py --split
$(DEMO_DATA_ARGS)` and trains with `run.py args/demo.yaml`. Here the same arguments write a
tiny split into tmp_path and the same config runs two epochs (stage 0 chain-of-thought,
then latent stage 1), in one process and under `torchrun --nproc_per_node 2`, so a broken
demo shows up in `make test`, not on a user's machine.
"""

import os
import re
import shlex

import pytest
import yaml

import run
from test_run import free_port, run_sub
from preprocessing import prosqa
from utils import load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_YAML = os.path.join(REPO, "args", "demo.yaml")
ACCURACY = re.compile(r"^Accuracy on validation set: (\d+) / (\d+) = ([\d.]+)$", re.M)


def makefile_demo_data_args() -> list:
    """The DEMO_DATA_ARGS line of the Makefile, as an argument list."""
    with open(os.path.join(REPO, "Makefile")) as f:
        for line in f:
            if line.startswith("DEMO_DATA_ARGS"):
                return shlex.split(line.split("=", 1)[1])
    raise AssertionError("Makefile has no DEMO_DATA_ARGS line")


def makefile_demo_recipe() -> str:
    """The command lines of the Makefile's `demo:` target."""
    with open(os.path.join(REPO, "Makefile")) as f:
        lines = f.read().split("\n")
    start = next(i for i, line in enumerate(lines) if line.startswith("demo:"))
    recipe = []
    for line in lines[start + 1 :]:
        if not line.startswith("\t"):
            break
        recipe.append(line.strip())
    return "\n".join(recipe)


def with_option(args: list, option: str, value: str) -> list:
    """args with `option`'s value replaced (or the option added)."""
    out = list(args)
    if option in out:
        out[out.index(option) + 1] = value
    else:
        out += [option, value]
    return out


def test_demo_config_is_a_plain_relative_coconut_run():
    config = load_config(DEMO_YAML)
    assert config.coconut and not config.debug and not config.only_eval
    assert config.load_model_path is None and config.resume == 0
    # relative paths, so `python run.py args/demo.yaml` works in any checkout
    for path in (config.model_id, config.train_path, config.val_path, config.save_path):
        assert not os.path.isabs(path), path
    assert config.save_dir == os.path.join("checkpoints", "demo")
    assert config.train_path == "data/demo/prosqa_train.json"
    assert config.val_path == "data/demo/prosqa_valid.json"
    assert os.path.isfile(os.path.join(REPO, config.model_id, "config.json"))
    data_args = makefile_demo_data_args()
    assert "--output_dir" not in data_args  # the recipe names data/demo itself
    min_steps = int(data_args[data_args.index("--min_steps") + 1])
    max_steps = int(data_args[data_args.index("--max_steps") + 1])
    assert 3 <= min_steps <= max_steps
    # the whole curriculum: chain of thought first, and by the last epoch every step of
    # every example is a continuous thought
    stages = [config.scheduled_stage(epoch) for epoch in range(config.num_epochs)]
    assert stages[0] == 0 and stages[-1] >= min(max_steps, config.max_latent_stage)
    assert max_steps <= config.max_latent_stage or stages[-1] > config.max_latent_stage


def test_makefile_demo_recipe():
    recipe = makefile_demo_recipe()
    assert "preprocessing/prosqa.py --split $(DEMO_DATA_ARGS) --output_dir data/demo" in recipe
    # a finished run in checkpoints/demo would make run.py resume and do nothing
    assert recipe.index("rm -rf checkpoints/demo") < recipe.index("run.py args/demo.yaml")
    assert "WANDB_MODE=disabled" in recipe  # no wandb prompt


def shortened_demo(tmp_path, model_id: str) -> tuple:
    """The Makefile's data command on a tiny split and args/demo.yaml cut to 2 epochs.

    Returns (config path, run directory). Stage 0 then stage 1, checkpoints in tmp_path.
    """
    data_dir = tmp_path / "data"
    args = with_option(makefile_demo_data_args(), "--split_sizes", "24,6,0")
    assert prosqa.main(["--split", *args, "--output_dir", str(data_dir)]) == 0

    with open(DEMO_YAML) as f:
        raw = yaml.safe_load(f)
    raw.update(
        num_epochs=2,
        epochs_per_stage=1,
        save_path=str(tmp_path / "checkpoints"),
        train_path=str(data_dir / "prosqa_train.json"),
        val_path=str(data_dir / "prosqa_valid.json"),
        model_id=model_id,
        max_new_tokens=16,
    )
    config_path = tmp_path / "demo.yaml"
    config_path.write_text(yaml.safe_dump(raw))
    return str(config_path), tmp_path / "checkpoints" / raw["name"]


def assert_two_epochs(out: str, run_dir):
    accuracies = ACCURACY.findall(out)
    assert len(accuracies) == 2, out[-2000:]
    assert all(int(total) == 6 for _, total, _ in accuracies)
    assert "from scratch" in out
    saved = sorted(p.name for p in run_dir.iterdir() if p.name.startswith("checkpoint_"))
    assert {"checkpoint_1", "checkpoint_2"} <= set(saved), saved


def test_demo_path_shortened(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    with open(DEMO_YAML) as f:
        model_id = os.path.join(REPO, yaml.safe_load(f)["model_id"])
    config_path, run_dir = shortened_demo(tmp_path, model_id)
    assert run.main([config_path]) == 0
    assert_two_epochs(capsys.readouterr().out, run_dir)


def test_demo_path_shortened_torchrun(tmp_path):
    """The same under `torchrun --nproc_per_node 2` from the repository root, with the
    config's relative model folder (models/prosqa-gpt2-tiny) as committed."""
    with open(DEMO_YAML) as f:
        model_id = yaml.safe_load(f)["model_id"]
    assert not os.path.isabs(model_id)
    config_path, run_dir = shortened_demo(tmp_path, model_id)
    args = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
            "run.py", config_path]
    proc = run_sub(args, timeout=240, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "world size = 2" in proc.stdout
    assert_two_epochs(proc.stdout, run_dir)


if __name__ == "__main__":
    raise SystemExit(pytest.main([__file__, "-q"]))
