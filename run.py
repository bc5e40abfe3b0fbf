"""Train and evaluate Coconut (and its baselines) from one YAML config.

    python run.py args/demo.yaml                                 # one process
    torchrun --nproc_per_node 4 run.py args/prosqa_coconut.yaml   # one node
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d \\
        --rdzv_endpoint HOST:29500 run.py args/gsm_coconut.yaml    # several nodes

Every epoch (DESIGN §5): build the stage's data, train, save `checkpoint_{epoch+1}`,
validation loss, then generation accuracy and CoT match (trainer.py). A run whose
folder already holds checkpoints resumes from the newest complete one. Bad configs
and data stop before anything heavy is imported or loaded: one line, exit status 2.
"""

import os
import sys

from cli import main_guard
from utils import ConfigError, load_config

USAGE = "usage: python run.py CONFIG.yaml   (or: torchrun --nproc_per_node N run.py CONFIG.yaml)"


def check_paths(config, config_path) -> None:
    """The files the config names exist (train_path only when training)."""
    needed = [("val_path", config.val_path)]
    if not config.only_eval:
        needed.insert(0, ("train_path", config.train_path))
    if config.load_model_path is not None:
        needed.append(("load_model_path", config.load_model_path))
    for key, path in needed:
        if not os.path.isfile(path):
            raise ConfigError(f"config {config_path}: key '{key}' names a file that does not exist: {path}")


def read_data(config, load_data_file) -> dict:
    """Parse and validate the data files; DataError names the file and the example."""
    data = {"val": load_data_file(config.val_path)}
    if not config.only_eval:
        data["train"] = load_data_file(config.train_path)
    return data


def start(config_path: str) -> int:
    config = load_config(config_path)
    check_paths(config, config_path)
    from dataset import load_data_file  # imports `datasets`: only for a good config

    data = read_data(config, load_data_file)
    import trainer  # torch, transformers: only once the inputs are known to be good

    return trainer.main(config, data)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0] in ("-h", "--help"):
        print(USAGE, file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    return main_guard(lambda: start(argv[0]))


if __name__ == "__main__":
    sys.exit(main())
