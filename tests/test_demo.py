"""`make demo`, shortened: the same data command, args/demo.yaml and run.py, on a tiny split.

The Makefile's demo recipe generates `data/demo/` with `preprocessing/prosqa.py --split
$(DEMO_DATA_ARGS)` and trains with `run.py args/demo.yaml`. Here the same arguments write a
tiny split into tmp_path and the same config runs two epochs (stage 0 chain-of-thought,
then latent stage 1), so a broken demo shows up in `make test`, not on a user's machine.
"""

import os
import re
import shlex

import pytest
import yaml

import run
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
    # the whole curriculum: CoT, then latent stages, ending with every step replaced
    assert config.num_epochs > config.epochs_per_stage * (config.max_latent_stage + 1) - 1
    data_args = makefile_demo_data_args()
    assert int(data_args[data_args.index("--min_steps") + 1]) >= 3
    assert "--output_dir" not in data_args  # the recipe names data/demo itself


def test_demo_path_shortened(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "disabled")
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
        model_id=os.path.join(REPO, raw["model_id"]),
        max_new_tokens=16,
    )
    config_path = tmp_path / "demo.yaml"
    config_path.write_text(yaml.safe_dump(raw))

    assert run.main([str(config_path)]) == 0
    out = capsys.readouterr().out
    accuracies = ACCURACY.findall(out)
    assert len(accuracies) == 2, out[-2000:]
    assert all(int(total) == 6 for _, total, _ in accuracies)
    assert "from scratch" in out
    run_dir = tmp_path / "checkpoints" / raw["name"]
    saved = sorted(p.name for p in run_dir.iterdir() if p.name.startswith("checkpoint_"))
    assert {"checkpoint_1", "checkpoint_2"} <= set(saved), saved


if __name__ == "__main__":
    raise SystemExit(pytest.main([__file__, "-q"]))
