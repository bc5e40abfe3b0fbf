"""Run configuration and small shared helpers for Coconut training (DESIGN §5, §10).

A run is described by one YAML file (see args/). This module turns it into a typed,
validated `Config`, so a typo or a wrong type stops the run at once with a one-line
message naming the key and the file, instead of silently training the wrong thing
(the published code accepted anything). It also holds the training methods (`Method`), `set_seed` and the answer scoring
that run.py's evaluation and generate.py share.

It imports neither the model (coconut.py) nor the data code (dataset.py): everything
else depends on it, it depends on nothing of ours.
"""

from __future__ import annotations

import dataclasses
import datetime
import difflib
import math
import operator
import os
import random
import typing
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Union

import yaml

from cli import UserError

@dataclass(frozen=True)
class Method:
    """A training method and what it implies (DESIGN §2). A config turns exactly one on.

    latent_tokens: the data carries `<|start-latent|>`, `<|latent|>` x k, `<|end-latent|>`
        (coconut, pause_as_thought); the other methods see neither markers nor latents.
    curriculum: stages advance with the epochs (`no_curriculum` may then jump to the last).
    fills_latents: `<|latent|>` inputs are replaced by continuous thoughts (the Coconut
        wrapper); for pause_as_thought `<|latent|>` stays an ordinary token.
    keeps_steps: language steps remain in the training text at stage 0 (not no_cot).
    """

    name: str
    latent_tokens: bool
    curriculum: bool
    fills_latents: bool
    keeps_steps: bool = True

    def __str__(self) -> str:
        return self.name


METHODS = {
    "coconut": Method("coconut", latent_tokens=True, curriculum=True, fills_latents=True),
    "cot": Method("cot", latent_tokens=False, curriculum=False, fills_latents=False),
    "no_cot": Method("no_cot", latent_tokens=False, curriculum=False, fills_latents=False, keeps_steps=False),
    "no_thoughts": Method("no_thoughts", latent_tokens=False, curriculum=True, fills_latents=False),
    "pause_as_thought": Method("pause_as_thought", latent_tokens=True, curriculum=True, fills_latents=False),
}
# The published configs name the method by one boolean key each.
METHOD_FLAGS = tuple(METHODS)

# The published code guessed the generation budget from the validation file's name;
# we keep that as the default of the `max_new_tokens` key.
GSM_MAX_NEW_TOKENS = 64
DEFAULT_MAX_NEW_TOKENS = 128
# `debug: True` trains and validates on the first examples only (SPEC §5)
DEBUG_TRAIN_SIZE, DEBUG_VAL_SIZE = 5000, 32

# keys that name files or folders: a leading ~ is the home folder
PATH_KEYS = ("save_path", "train_path", "val_path", "load_model_path", "local_path", "model_id")
# characters wandb refuses in a project name (wandb.init's UsageError, after the model is built)
WANDB_PROJECT_FORBIDDEN = "/\\#?%:"

# The `mixed_precision` key's values (the compute dtype; "none": full precision).
MIXED_PRECISION_VALUES = ("none", "bf16", "fp16")


class ConfigError(UserError):
    """A config that cannot be used; the message is one line naming the key (and file)."""


@dataclass
class Config:
    """Every key a run's YAML may set, with the published defaults (DESIGN §5).

    Build it with `load_config(path)` or `Config.from_dict(d)`, which check types and
    values; constructing it directly skips those checks (call `validate()` yourself).
    """

    # Logging and output
    project: str = "coconut"
    save_path: str = "checkpoints"
    name: str = "run"
    only_eval: bool = False
    debug: bool = False
    save_only_improve: bool = False

    # Method (exactly one True) and curriculum
    coconut: bool = False
    cot: bool = False
    no_thoughts: bool = False
    no_cot: bool = False
    pause_as_thought: bool = False  # ablation: <|latent|> stays an ordinary token
    no_curriculum: bool = False  # ablation: train at the last stage from epoch 0
    c_thought: int = 1
    epochs_per_stage: int = 1
    max_latent_stage: int = 1
    pad_latent_to_max: bool = False
    uniform_prob: float = 0.0

    # Model and data
    model_id: str = "openai-community/gpt2"
    load_model_path: Optional[str] = None
    train_path: Optional[str] = None
    val_path: Optional[str] = None

    # Optimisation
    seed: int = 0
    resume: int = 0
    bf16: bool = False
    # False: one AdamW for the whole run; True (or "stage"): a new AdamW whenever the
    # stage changes (the paper's rule); "epoch": a new AdamW every epoch (what the
    # published run.py did, and what produced the published numbers)
    reset_optimizer: Union[bool, str] = False
    batch_size_training: int = 1
    gradient_accumulation_steps: int = 1
    num_epochs: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.01
    # For large models (README, "Large models"): fp32 parameters and optimizer with
    # low-precision compute ("none", "bf16", "fp16"), unlike `bf16: True`, which casts
    # the whole model as published; and recomputing each block's activations.
    mixed_precision: str = "none"
    activation_checkpointing: bool = False
    # Under FSDP (torchrun training), False keeps each block's gathered weights for the
    # whole step instead of gathering them again for every latent pass and its backward
    reshard_after_forward: bool = True
    compile: bool = False  # torch.compile the decoder pass, or each block under FSDP (compiling.py)
    # GPT-2's gelu_new as one operation (modeling.fuse_gelu: the same formula, equal to rounding)
    fused_gelu: bool = True

    # Keys of later published configs, accepted so those YAML files keep working:
    # `local: True` loads the model from `local_path` instead of `model_id`; the
    # published special_token and grpo switches must stay False (not implemented).
    local: bool = False
    local_path: Optional[str] = None
    special_token: bool = False
    grpo: bool = False

    # Evaluation
    max_new_tokens: Optional[int] = None  # None: 64 if "gsm" in val_path else 128
    batch_size_eval: int = 16  # generation batch size per process

    def __post_init__(self):
        for key in PATH_KEYS:  # `~/data/train.json` as a shell would read it (no folder named `~`)
            value = getattr(self, key)
            if isinstance(value, str) and value.startswith("~"):
                setattr(self, key, os.path.expanduser(value))
        if self.max_new_tokens is None and self.val_path is not None:
            self.max_new_tokens = default_max_new_tokens(self.val_path)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], source: Optional[str] = None) -> "Config":
        """Check `raw` (a parsed YAML mapping) key by key and build a validated Config.

        `source` (the file name) only goes into error messages.
        """
        prefix = _error_prefix(source)
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{prefix}must be a mapping of key: value, got {type(raw).__name__}")
        hints = _field_types()
        values = {}
        for key, value in raw.items():
            if key not in hints:
                raise ConfigError(prefix + _unknown_key_message(key, hints))
            values[key] = _coerce(key, value, hints[key], prefix)
        config = cls(**values)
        config.validate(source)
        return config

    def validate(self, source: Optional[str] = None) -> None:
        """Check the values and their combinations; raise ConfigError on the first problem."""
        prefix = _error_prefix(source)
        for message in _value_problems(self):
            raise ConfigError(prefix + message)

    @property
    def method(self) -> Method:
        """The method whose flag is on (validation guarantees exactly one)."""
        on = [flag for flag in METHOD_FLAGS if getattr(self, flag)]
        if len(on) != 1:
            raise ConfigError(_method_flags_message(on))
        return METHODS[on[0]]

    @property
    def model_path(self) -> str:
        """Where the model and tokenizer load from: local_path when `local`, else model_id."""
        return self.local_path if self.local else self.model_id

    @property
    def save_dir(self) -> str:
        """Where this run's checkpoints go: save_path/name."""
        return os.path.join(self.save_path, self.name)

    def scheduled_stage(self, epoch: int) -> int:
        """The curriculum stage trained at `epoch` (0-based), DESIGN §2.

        cot and no_cot have no curriculum (stage 0 forever); "w/o curriculum" starts
        at the stage past the last latent stage, where all steps are replaced.
        """
        if not self.method.curriculum:
            return 0
        if self.no_curriculum:
            return self.max_latent_stage + 1
        return epoch // self.epochs_per_stage

    def optimizer_carries_over(self, epoch: int) -> bool:
        """The reset rule: does `epoch` (0-based) continue with the optimizer of epoch - 1?

        Always without `reset_optimizer`; within a stage with True or "stage"; never
        with "epoch".
        """
        if epoch <= 0 or self.reset_optimizer == "epoch":
            return False
        return self.reset_optimizer is False or self.scheduled_stage(epoch - 1) == self.scheduled_stage(epoch)

    def to_dict(self) -> dict:
        """A plain dict of every key, e.g. for wandb.init(config=...)."""
        return dataclasses.asdict(self)


def load_config(path: str, overrides: Optional[Mapping[str, Any]] = None) -> Config:
    """Read a YAML config file into a validated Config; ConfigError on any problem.

    `overrides` (key -> value, e.g. from `parse_overrides`) replace or add keys of the
    file; each is checked like a YAML key (unknown keys with a "did you mean", types).
    """
    prefix = _error_prefix(path)
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.load(f, Loader=_StrictLoader)
    except FileNotFoundError:
        raise ConfigError(f"{prefix}file not found") from None
    except OSError as e:
        raise ConfigError(f"{prefix}cannot read file: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{prefix}not UTF-8 text (saved as UTF-16 or Latin-1? save it as UTF-8)") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{prefix}invalid YAML: {_one_line_yaml_error(e)}") from None
    except RecursionError:
        raise ConfigError(f"{prefix}invalid YAML: nested too deeply") from None
    if raw is None:
        raise ConfigError(f"{prefix}file is empty, expected a mapping of key: value")
    if not overrides:
        return Config.from_dict(raw, source=path)
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{prefix}must be a mapping of key: value, got {type(raw).__name__}")
    hints = _field_types()
    for key, value in overrides.items():
        if key not in hints:
            raise ConfigError(COMMAND_LINE + _unknown_key_message(key, hints))
        _coerce(key, value, hints[key], COMMAND_LINE)
    return Config.from_dict({**raw, **overrides}, source=f"{path} with the command line's keys")


# ---------------------------------------------------------------------------------
# Command-line overrides: `run.py CONFIG.yaml lr=1e-4 name=try2` or `--lr 1e-4`

COMMAND_LINE = "command line: "


def parse_overrides(args) -> dict:
    """{key: value} from `key=value`, `--key=value` and `--key value` arguments.

    Values are read as YAML values (so `True`, `1e-4`, `None` mean what they mean in a
    config file); `-` in a key reads as `_`. ConfigError for anything else or a key
    given twice. Keys are checked against Config by load_config.
    """
    overrides, i = {}, 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("--") and "=" in arg:
            (key, text), i = arg[2:].split("=", 1), i + 1
        elif arg.startswith("--"):
            if i + 1 >= len(args) or args[i + 1].startswith("--"):
                raise ConfigError(f"{COMMAND_LINE}{arg} needs a value ({arg} VALUE or {arg}=VALUE)")
            key, text, i = arg[2:], args[i + 1], i + 2
        elif "=" in arg and not arg.startswith("-"):
            (key, text), i = arg.split("=", 1), i + 1
        else:
            raise ConfigError(f"{COMMAND_LINE}expected KEY=VALUE or --KEY VALUE after the config file, got {arg!r}")
        key = key.replace("-", "_")
        if not key:
            raise ConfigError(f"{COMMAND_LINE}{arg!r} names no key")
        if key in overrides:
            raise ConfigError(f"{COMMAND_LINE}key {key!r} is given twice")
        overrides[key] = _yaml_value(key, text)
    return overrides


def _yaml_value(key: str, text: str) -> Any:
    try:
        return yaml.load(text, Loader=_StrictLoader) if text.strip() else text
    except yaml.YAMLError as e:
        raise ConfigError(f"{COMMAND_LINE}key {key!r}: {text!r} is not a YAML value ({_one_line_yaml_error(e)})") from None
    except RecursionError:
        raise ConfigError(f"{COMMAND_LINE}key {key!r}: not a YAML value (nested too deeply)") from None


def default_max_new_tokens(val_path: str) -> int:
    """The published heuristic: GSM8k answers are short, the others need room."""
    return GSM_MAX_NEW_TOKENS if "gsm" in val_path else DEFAULT_MAX_NEW_TOKENS


def set_seed(seed: int) -> None:
    """Seed python's random, numpy (if installed) and torch on CPU and every GPU."""
    random.seed(seed)
    try:
        import numpy as np
    except ImportError:
        pass
    else:
        np.random.seed(seed)
    import torch  # lazily: reading a config should not need torch

    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)  # a no-op without CUDA


def normalize_answer(answer: str) -> str:
    """How answers are compared (DESIGN §4): commas removed, stripped."""
    return answer.replace(",", "").strip()


def extract_answer(text: str) -> str:
    """The model's answer in a decoded generation: the text after the last '#', normalized."""
    return normalize_answer(text.split("#")[-1])


# ---------------------------------------------------------------------------------
# Loading and type checks


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects a key written twice (PyYAML silently keeps the last), in a
    mapping and in each mapping a merge key (`<<: {lr: 1e-4}`) brings in, and a second
    merge key. A merged key the mapping also has is YAML's override, not a repeat: the
    mapping's own wins (PyYAML merges)."""

    def construct_mapping(self, node, deep=False):
        self._check_unique_keys(node, deep)
        return super().construct_mapping(node, deep=deep)

    def _check_unique_keys(self, node, deep):
        seen, merges = set(), 0
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                merges += 1
                if merges > 1:
                    raise yaml.constructor.ConstructorError(None, None, "key '<<' appears twice", key_node.start_mark)
                merged = value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
                for mapping in merged:
                    if isinstance(mapping, yaml.MappingNode):
                        self._check_unique_keys(mapping, deep)
                continue
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, Hashable):
                raise yaml.constructor.ConstructorError(None, None, "a key must be a plain value", key_node.start_mark)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice", key_node.start_mark
                )
            seen.add(key)


def _one_line_yaml_error(error: yaml.YAMLError) -> str:
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None)
    if mark is not None and problem:
        return f"{problem} at line {mark.line + 1}, column {mark.column + 1}"
    return " ".join(str(error).split())


def _error_prefix(source: Optional[str]) -> str:
    return f"config {source}: " if source else "config: "


def _field_types() -> dict:
    # Resolved from the annotations so the dataclass stays the one list of keys.
    return typing.get_type_hints(Config)


def _unknown_key_message(key: Any, known) -> str:
    message = f"unknown key {key!r}"
    if isinstance(key, str):
        by_lower = {k.lower(): k for k in known}  # `LR`, `Num_Epochs`: the key in other case
        close = [by_lower[key.lower()]] if key.lower() in by_lower else difflib.get_close_matches(key, list(known), n=1)
        if close:
            message += f" (did you mean {close[0]!r}?)"
    return message


# keys that take one of a few words as well as (or instead of) their type's values
_WORD_VALUES = {"reset_optimizer": (False, True, "stage", "epoch")}


def _coerce(key: str, value: Any, annotation: Any, prefix: str) -> Any:
    """Check one value against its field's type; return it in that type."""
    if key in _WORD_VALUES:
        allowed = _WORD_VALUES[key]
        if not any(value is a or (isinstance(a, str) and value == a) for a in allowed):
            raise ConfigError(f"{prefix}key {key!r} must be one of {', '.join(map(str, allowed))}, got {value!r}")
        return value
    optional = typing.get_origin(annotation) is typing.Union
    base = next(a for a in typing.get_args(annotation) if a is not type(None)) if optional else annotation

    # Users write `load_model_path: None`, which YAML reads as the string "None".
    if optional and (value is None or value == "None"):
        return None

    def fail(expected: str) -> ConfigError:
        return ConfigError(f"{prefix}key {key!r} must be {expected}, got {value!r}")

    if base is bool:
        # Strings like "True" are refused: they mean the YAML was quoted by mistake.
        if not isinstance(value, bool):
            raise fail("True or False")
        return value
    if base is int:
        # bool is a subclass of int; `c_thought: true` is a mistake, not 1.
        if isinstance(value, bool) or not isinstance(value, int):
            raise fail("an integer")
        return value
    if base is float:
        return _coerce_float(value, fail)
    if base is str:
        if not isinstance(value, str):  # YAML reads name: 2024 as a number, name: on as True
            raise fail("a string (quote it: 'text')" if isinstance(value, (int, float, datetime.date)) else "a string")
        return value
    raise TypeError(f"Config field {key!r} has an unsupported type {annotation!r}")


def _coerce_float(value: Any, fail) -> float:
    # PyYAML follows YAML 1.1, which reads `1e-4` (no dot) as the string "1e-4";
    # published configs work around it with `!!float`. Accept numeric strings too.
    if isinstance(value, bool):
        raise fail("a number")
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise fail("a number") from None
    if not isinstance(value, (int, float)):
        raise fail("a number")
    if not math.isfinite(value):
        raise fail("a finite number")
    return float(value)


# ---------------------------------------------------------------------------------
# Value checks

_COMPARISONS = {">=": operator.ge, ">": operator.gt, "<=": operator.le}

# key -> bounds its value must satisfy (None values, i.e. "use the default", skip them)
_BOUNDS = {
    "c_thought": [(">=", 0)],
    "epochs_per_stage": [(">=", 1)],
    "max_latent_stage": [(">=", 0)],
    "num_epochs": [(">=", 1)],
    "resume": [(">=", 0)],
    "seed": [(">=", 0)],  # numpy refuses negative seeds
    "batch_size_training": [(">=", 1)],
    "batch_size_eval": [(">=", 1)],
    "gradient_accumulation_steps": [(">=", 1)],
    "lr": [(">", 0)],
    "weight_decay": [(">=", 0)],
    "uniform_prob": [(">=", 0), ("<=", 1)],
    "max_new_tokens": [(">=", 1)],
}


def _value_problems(config: Config):
    """Yield a message for every problem with the values of a type-correct Config."""
    for key, bounds in _BOUNDS.items():
        value = getattr(config, key)
        for op, bound in bounds:
            if value is not None and not _COMPARISONS[op](value, bound):
                yield f"key {key!r} must be {op} {bound}, got {value!r}"
    # epoch e runs under set_seed(seed + e), and numpy takes seeds below 2**32 only
    last_seed = config.seed + config.num_epochs - 1
    if config.seed >= 0 and config.num_epochs >= 1 and last_seed >= 2**32:
        yield (f"key 'seed' must be <= {2**32 - config.num_epochs} with num_epochs {config.num_epochs} "
               f"(epoch e seeds with seed + e, below 2**32), got {config.seed}")

    for unsupported in ("special_token", "grpo"):  # before the method keys: such configs set none of them
        if getattr(config, unsupported):
            yield f"key {unsupported!r}: this switch of later published code is not supported; set it to False"
    on = [flag for flag in METHOD_FLAGS if getattr(config, flag)]
    if len(on) != 1:
        yield _method_flags_message(on)
    elif config.no_curriculum and not METHODS[on[0]].curriculum:
        with_curriculum = ", ".join(m.name for m in METHODS.values() if m.curriculum)
        yield f"key 'no_curriculum' needs one of {with_curriculum} (got {on[0]}, which has no curriculum)"
    if len(on) == 1 and METHODS[on[0]].latent_tokens and config.c_thought < 1:
        yield (f"key 'c_thought' must be >= 1 for {on[0]} (latent tokens per replaced step; without any, the "
               f"curriculum is the no_thoughts method: set no_thoughts: True), got {config.c_thought}")
    if len(on) == 1 and METHODS[on[0]].latent_tokens and config.max_latent_stage < 1:
        yield (f"key 'max_latent_stage' must be >= 1 for {on[0]} (the last stage's latent tokens per example; "
               f"with 0 no stage has any, and from stage 1 on every step is dropped as in no_cot), "
               f"got {config.max_latent_stage}")

    if config.mixed_precision not in MIXED_PRECISION_VALUES:
        yield f"key 'mixed_precision' must be one of {', '.join(MIXED_PRECISION_VALUES)}, got {config.mixed_precision!r}"
    elif config.bf16 and config.mixed_precision != "none":
        yield ("keys 'bf16' and 'mixed_precision' cannot both be on: bf16: True casts the whole model "
               "(published behaviour), mixed_precision keeps fp32 parameters; choose one")

    forbidden = set(config.project) & set(WANDB_PROJECT_FORBIDDEN)
    if not config.project.strip() or forbidden or len(config.project) > 128:
        yield (f"key 'project' must be a wandb project name: 1 to 128 characters, none of "
               f"{' '.join(WANDB_PROJECT_FORBIDDEN)}, got {config.project!r}")

    folder = os.path.normpath(config.name.replace("\\", "/")) if config.name.strip() else "."
    if folder == "." or os.path.isabs(folder) or folder.split("/")[0] == "..":
        yield (f"key 'name' must name a folder inside save_path (not empty, not absolute, not '.', no '..'), "
               f"got {config.name!r}")
    if config.local and not config.local_path:
        yield "key 'local_path' is required when local is True"

    # Evaluation always reads val_path; only an evaluation-only run may omit train_path.
    if config.val_path is None:
        yield "key 'val_path' is required"
    if config.train_path is None and not config.only_eval:
        yield "key 'train_path' is required (unless only_eval is True)"


def _method_flags_message(on) -> str:
    flags = ", ".join(METHOD_FLAGS)
    if not on:  # what the published run.py then trained: the latent tokens, no wrapper
        return f"one of {flags} must be True (with all False the published run.py trained pause as thought: " \
               "set pause_as_thought: True)"
    if sorted(on) == ["coconut", "no_thoughts"]:  # the published run.py then turned coconut off
        return f"only one of {flags} may be True (got coconut, no_thoughts: the published run.py trained " \
               "no_thoughts then; set coconut: False)"
    return f"only one of {flags} may be True (got {', '.join(on)})"
