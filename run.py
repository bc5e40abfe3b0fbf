"""Train and evaluate Coconut (and its baselines) from one YAML config.

    python run.py args/demo.yaml                                 # one process
    python run.py args/demo.yaml lr=1e-3 name=try2               # keys from the command line
    python run.py args/demo.yaml --lr 1e-3 --name try2           # the same
    torchrun --nproc_per_node 4 run.py args/prosqa_coconut.yaml   # one node
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d \\
        --rdzv_endpoint HOST:29500 run.py args/gsm_coconut.yaml    # several nodes

Every epoch (DESIGN §5): build the stage's data, train, save `checkpoint_{epoch+1}`,
validation loss, then generation accuracy and CoT match (trainer.py). A run whose
folder already holds checkpoints resumes from the newest complete one; one that holds
its last epoch is finished and says so. Keys given on the command line replace the
file's and are checked like them. Bad configs and data stop before anything heavy is
imported or loaded, and the pre-flight checks (preflight.py) stop a run that could not
finish before the model is built: one line, exit status 2, nothing written. A run that
saves checkpoints holds its folder (runlock.py): a second run there exits 2.
"""

import os
import sys
import time

from cli import UserError, exit_after_main, fail, first_line, main_guard, process_rank
from utils import ConfigError, load_config, parse_overrides

USAGE = ("usage: python run.py CONFIG.yaml [KEY=VALUE | --KEY VALUE ...]   "
         "(or: torchrun --nproc_per_node N run.py CONFIG.yaml [KEY=VALUE ...])")


def log(message: str) -> None:
    """Print on rank 0 only (every process runs the same checks)."""
    if process_rank() == 0:
        print(message, flush=True)


def check_paths(config, config_path) -> None:
    """The data files the config names exist (train_path only when training);
    load_model_path is preflight's: a run that resumes its own folder does not read it."""
    needed = [("val_path", config.val_path)]
    if not config.only_eval:
        needed.insert(0, ("train_path", config.train_path))
    for key, path in needed:
        if os.path.isdir(path):
            raise ConfigError(f"config {config_path}: key '{key}' names a folder, not a data file: {path}")
        if os.path.exists(path) and not os.path.isfile(path):  # /dev/null, a pipe
            raise ConfigError(f"config {config_path}: key '{key}' names something that is not a regular file: {path}")
        if not os.path.isfile(path):
            raise ConfigError(f"config {config_path}: key '{key}' names a file that does not exist: {path}")


def read_data(config, load_data_file) -> dict:
    """Parse and validate the data files; DataError names the file and the example."""
    data = {"val": load_data_file(config.val_path)}
    if not config.only_eval:
        data["train"] = load_data_file(config.train_path)
    return data


def start(config_path: str, overrides: dict) -> int:
    config = load_config(config_path, overrides)
    log(f"Config: {config.to_dict()}")  # the published first line (there: the YAML mapping; here every key's value)
    for key in overrides:
        log(f"command line: {key} = {getattr(config, key)!r}")
    check_paths(config, config_path)
    from dataset import load_data_file, unscorable_warnings  # imports `datasets`: only for a good config

    data = read_data(config, load_data_file)
    for warning in unscorable_warnings(config.val_path, data["val"]):
        log(warning)
    import preflight  # torch, transformers: only once the config and the data are good

    # only_eval and debug runs write nothing into the run folder: they neither check it
    # nor hold it; under torchrun rank 0 writes the checkpoints
    saves = not (config.only_eval or config.debug) and process_rank() == 0
    began = time.monotonic()
    found = preflight.check(config, data, saves=saves)
    for warning in found.warnings:
        log(warning)
    if found.finished:
        log(found.finished)
        if saves:
            tidy_when_free(config.save_dir)
        return 0
    log(f"pre-flight checks passed ({time.monotonic() - began:.1f} s)")
    import trainer

    if not saves:
        return trainer.main(config, data)
    import checkpoint
    import runlock

    with runlock.hold(config.save_dir, warn=log):
        checkpoint.tidy_run_folder(config.save_dir)  # what stopped writes left
        return trainer.main(config, data)


def tidy_when_free(save_dir: str) -> None:
    """A finished run's folder is tidied too, when a stop during its last save left
    something and no run holds it; one line when it cannot be (a read-only folder)."""
    import checkpoint
    import runlock

    if not checkpoint.run_folder_leftovers(save_dir):
        return
    try:
        with runlock.hold(save_dir, warn=lambda message: None):
            checkpoint.tidy_run_folder(save_dir)
    except runlock.RunFolderBusy:
        pass
    except UserError as e:  # the lock file cannot be made: a read-only folder, say
        log(f"warning: {save_dir}: what stopped writes left there was not removed ({first_line(e)})")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, file=sys.stderr)
        return 0 if argv else 2
    if argv[0].startswith("-"):  # `run.py --lr 1e-4 cfg.yaml` would read the config from "--lr"
        return fail(UserError(f"the config file comes first, got {argv[0]!r} ({USAGE})"))
    return main_guard(lambda: start(argv[0], parse_overrides(argv[1:])))


if __name__ == "__main__":
    exit_after_main(main())
