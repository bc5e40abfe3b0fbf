"""wandb for run.py: which mode a run logs in, and the pre-flight check of that mode.

A run logs to wandb from its first process (not with debug or only_eval), one wandb run
per run folder. Not logged in and WANDB_MODE unset: it logs offline and says so.
WANDB_MODE set to a value wandb refuses, or "online" without credentials, stops the
run in one line before any heavy work (`check_mode`, called by the pre-flight):
wandb.init would fail only after the model is built and the data tokenized.
"""

import os

import checkpoint
from cli import UserError

# what wandb's Settings accept for WANDB_MODE (wandb 0.2x: a pydantic Literal)
MODES = ("online", "offline", "disabled", "shared", "dryrun", "run")
ONLINE_MODES = ("online", "shared", "run")


def logs(config) -> bool:
    """Whether a run of `config` logs to wandb (from its first process)."""
    return not (config.debug or config.only_eval)


def check_mode(config) -> None:
    """UserError naming WANDB_MODE when wandb.init would refuse it: a value that is not a
    mode, or an online mode without credentials (it would ask for an API key)."""
    mode = os.environ.get("WANDB_MODE")
    if mode is None or not logs(config):
        return
    if mode not in MODES:
        raise UserError(f"WANDB_MODE {mode!r} is not a wandb mode ({', '.join(MODES)})")
    if mode in ONLINE_MODES and not logged_in():
        raise UserError(f"WANDB_MODE {mode!r} but wandb finds no credentials (WANDB_API_KEY, a netrc entry): "
                        "run `wandb login`, or set WANDB_MODE=offline or disabled")


def init_wandb(config, env, log):
    if not env.is_main or not logs(config):
        return None
    import wandb

    if "WANDB_MODE" not in os.environ and not logged_in():
        os.environ["WANDB_MODE"] = "offline"
        log("wandb: not logged in and WANDB_MODE unset, logging offline (run `wandb login` or set WANDB_MODE)")
    # one wandb run per run folder: a relaunch continues its curves instead of starting another run
    return wandb.init(project=config.project, name=config.name, config=config.to_dict(),
                      id=checkpoint.wandb_run_id(config.save_dir), resume="allow")


def logged_in() -> bool:
    """Whether wandb finds credentials without a prompt, looked up as wandb does: an API
    key or identity token file in the environment, else the netrc file (NETRC, else
    ~/.netrc, else ~/_netrc: the first that exists) entry of the W&B server
    (WANDB_BASE_URL, else the base_url `wandb login --host` keeps in its settings file,
    else api.wandb.ai), named with its port when it has one."""
    import netrc
    from urllib.parse import urlparse

    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    server = urlparse(os.environ.get("WANDB_BASE_URL") or _settings_base_url() or "https://api.wandb.ai")
    candidates = [os.environ["NETRC"]] if os.environ.get("NETRC") else ["~/.netrc", "~/_netrc"]
    paths = [path for path in map(os.path.expanduser, candidates) if os.path.exists(path)]
    try:
        entries = netrc.netrc(paths[0]) if paths else None
    except (OSError, netrc.NetrcParseError):
        return False
    return entries is not None and any(entries.authenticators(machine) for machine in {server.netloc, server.hostname})


def _settings_base_url():
    """The server `wandb login --host URL` recorded in wandb's settings file, if any."""
    import configparser

    folder = os.environ.get("WANDB_CONFIG_DIR") or os.path.join("~", ".config", "wandb")
    settings = configparser.ConfigParser()
    try:
        settings.read(os.path.join(os.path.expanduser(folder), "settings"))
        return settings.get("default", "base_url", fallback=None)
    except configparser.Error:
        return None
