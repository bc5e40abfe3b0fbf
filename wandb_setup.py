"""wandb for run.py: which mode a run logs in, and the pre-flight check of that mode.

A run logs to wandb from its first process (not with debug or only_eval), one wandb run
per run folder. Not logged in and WANDB_MODE unset: it logs offline and says so.
WANDB_MODE set to a value wandb refuses stops the run in one line before any heavy
work (`check_mode`, called by the pre-flight); wandb.init would refuse it only after
the model is built and the data tokenized. Whether an online mode has credentials
depends on the wandb version's servers and stores, so that is left to wandb.init,
whose refusal (no API key, say) is one line too.
"""

import os

import checkpoint
from cli import UserError, first_line

# what wandb's Settings accept for WANDB_MODE (wandb 0.2x-0.3x: a pydantic Literal, case-sensitive)
MODES = ("online", "offline", "disabled", "shared", "dryrun", "run")


def logs(config) -> bool:
    """Whether a run of `config` logs to wandb (from its first process)."""
    return not (config.debug or config.only_eval)


def check_mode(config) -> None:
    """UserError naming WANDB_MODE when it is not a mode wandb.init accepts."""
    mode = os.environ.get("WANDB_MODE")
    if mode is not None and logs(config) and mode not in MODES:
        raise UserError(f"WANDB_MODE {mode!r} is not a wandb mode ({', '.join(MODES)})")


def init_wandb(config, env, log):
    """The run's wandb run (first process of a run that logs), else None; UserError when
    wandb.init refuses to start."""
    if not env.is_main or not logs(config):
        return None
    import wandb

    if "WANDB_MODE" not in os.environ and not logged_in():
        os.environ["WANDB_MODE"] = "offline"
        log("wandb: not logged in and WANDB_MODE unset, logging offline (run `wandb login` or set WANDB_MODE)")
    try:  # one wandb run per run folder: a relaunch continues its curves instead of starting another run
        return wandb.init(project=config.project, name=config.name, config=config.to_dict(),
                          id=checkpoint.wandb_run_id(config.save_dir), resume="allow")
    except (wandb.errors.Error, ValueError) as e:  # ValueError: a setting wandb's pydantic refuses
        raise UserError(f"wandb could not start ({type(e).__name__}: {first_line(e)}); "
                        "WANDB_MODE=offline or disabled runs without the server") from None


def logged_in() -> bool:
    """Whether wandb finds credentials without a prompt, looked up as wandb does: an API
    key or identity token file in the environment, else the netrc file (NETRC, else
    ~/.netrc, else ~/_netrc: the first that exists) entry of the W&B server, named with
    its port when it has one: WANDB_BASE_URL, else the base_url `wandb login --host`
    keeps in its settings file, else the installed wandb's default server or
    api.wandb.ai (wandb 0.31's default is api.forge.coreweave.com, and it reads
    api.wandb.ai's entry too)."""
    import netrc
    from urllib.parse import urlparse

    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    chosen = os.environ.get("WANDB_BASE_URL") or _settings_base_url()
    servers = [urlparse(url) for url in ([chosen] if chosen else [_default_base_url(), "https://api.wandb.ai"])]
    candidates = [os.environ["NETRC"]] if os.environ.get("NETRC") else ["~/.netrc", "~/_netrc"]
    paths = [path for path in map(os.path.expanduser, candidates) if os.path.exists(path)]
    try:
        entries = netrc.netrc(paths[0]) if paths else None
    except (OSError, netrc.NetrcParseError):
        return False
    machines = {name for server in servers for name in (server.netloc, server.hostname)}
    return entries is not None and any(entries.authenticators(machine) for machine in machines)


def _default_base_url() -> str:
    """The server the installed wandb logs to by default."""
    try:
        from wandb.sdk.lib.urls import DEFAULT_BASE_URL
    except ImportError:  # a wandb without the module: one whose server was api.wandb.ai
        return "https://api.wandb.ai"
    return DEFAULT_BASE_URL


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
