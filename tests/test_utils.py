"""Tests for utils.py: loading, typing and validating run configs; set_seed."""

import dataclasses
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from utils import METHODS, Config, ConfigError, load_config, parse_overrides, set_seed

ROOT = Path(__file__).resolve().parent.parent

# args/prosqa_coconut.yaml as published (DESIGN §6), including the `!!float` spelling.
PROSQA_COCONUT_YAML = """\
project: coconut
save_path: /checkpoints
name: prosqa-coconut

only_eval: False

coconut: True
cot: False
no_thoughts: False
no_cot: False

c_thought: 1
epochs_per_stage: 5
max_latent_stage: 6
pad_latent_to_max: True

save_only_improve: False
uniform_prob: 0.0
model_id: openai-community/gpt2
load_model_path: None
seed: 0
resume: 0
bf16: False
train_path: data/prosqa_train.json
val_path: data/prosqa_valid.json
reset_optimizer: True
batch_size_training: 32
debug: False
gradient_accumulation_steps: 1
num_epochs: 50
lr: !!float "1e-4"
weight_decay: 0.01
"""

# The smallest valid config: one method and the data paths.
MINIMAL = {"coconut": True, "train_path": "data/t.json", "val_path": "data/v.json"}


def write(tmp_path, text, name="x.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def load_with(tmp_path, **overrides):
    """Load the published prosqa config with some lines replaced or added."""
    lines = [
        line
        for line in PROSQA_COCONUT_YAML.splitlines()
        if line.split(":")[0] not in overrides
    ]
    lines += [f"{key}: {value}" for key, value in overrides.items()]
    return load_config(write(tmp_path, "\n".join(lines) + "\n"))


def error_of(tmp_path, **overrides) -> str:
    with pytest.raises(ConfigError) as info:
        load_with(tmp_path, **overrides)
    message = str(info.value)
    assert "\n" not in message, "ConfigError messages must be one line"
    return message


# --- loading the published config --------------------------------------------------


def test_published_prosqa_config_loads_with_every_value(tmp_path):
    config = load_config(write(tmp_path, PROSQA_COCONUT_YAML))
    assert config.project == "coconut"
    assert config.save_path == "/checkpoints"
    assert config.name == "prosqa-coconut"
    assert config.coconut is True and config.cot is False
    assert config.no_thoughts is False and config.no_cot is False
    assert config.c_thought == 1
    assert config.epochs_per_stage == 5
    assert config.max_latent_stage == 6
    assert config.pad_latent_to_max is True
    assert config.uniform_prob == 0.0
    assert config.model_id == "openai-community/gpt2"
    assert config.train_path == "data/prosqa_train.json"
    assert config.val_path == "data/prosqa_valid.json"
    assert config.reset_optimizer is True
    assert config.batch_size_training == 32
    assert config.num_epochs == 50
    assert config.lr == pytest.approx(1e-4) and isinstance(config.lr, float)
    assert config.weight_decay == pytest.approx(0.01)
    assert config.method.name == "coconut"
    assert config.save_dir.endswith("checkpoints/prosqa-coconut")


@pytest.mark.parametrize(
    "overrides, method, max_new_tokens",
    [
        # gsm_cot: stage 0 forever, c_thought 0 and max_latent_stage 0 must be allowed
        (dict(coconut="False", cot="True", c_thought="0", epochs_per_stage="1",
              max_latent_stage="0", num_epochs="25", save_only_improve="True",
              reset_optimizer="False", val_path="data/gsm_valid.json"), "cot", 64),
        # gsm_coconut: resumes into stage 1 from a CoT checkpoint
        (dict(c_thought="2", epochs_per_stage="3", max_latent_stage="3", num_epochs="25",
              resume="3", load_model_path="YOUR_PATH_TO_THE_COT_CHECKPOINT",
              val_path="data/gsm_valid.json"), "coconut", 64),
        # prontoqa_coconut_eval
        (dict(only_eval="True", load_model_path="ckpt/prontoqa/checkpoint_50",
              val_path="data/prontoqa_test.json"), "coconut", 128),
    ],
)
def test_other_published_configs_load(tmp_path, overrides, method, max_new_tokens):
    config = load_with(tmp_path, **overrides)
    assert config.method.name == method
    assert config.max_new_tokens == max_new_tokens


def test_keys_left_out_get_the_defaults(tmp_path):
    config = load_config(write(tmp_path, "cot: True\ntrain_path: t.json\nval_path: v.json\n"))
    assert config.project == "coconut"
    assert config.save_path == "checkpoints"
    assert config.name == "run"
    assert config.only_eval is False
    assert config.c_thought == 1
    assert config.epochs_per_stage == 1
    assert config.max_latent_stage == 1
    assert config.model_id == "openai-community/gpt2"
    assert config.load_model_path is None
    assert config.seed == 0 and config.resume == 0
    assert config.batch_size_training == 1
    assert config.gradient_accumulation_steps == 1
    assert config.num_epochs == 1
    assert config.lr == pytest.approx(1e-4)
    assert config.weight_decay == pytest.approx(0.01)
    assert config.batch_size_eval == 16
    assert config.pause_as_thought is False and config.no_curriculum is False


def test_load_model_path_none_string_and_null_mean_none(tmp_path):
    assert load_with(tmp_path, load_model_path="None").load_model_path is None
    assert load_with(tmp_path, load_model_path="null").load_model_path is None
    path = load_with(tmp_path, load_model_path="ckpt/gsm-cot/checkpoint_6").load_model_path
    assert path == "ckpt/gsm-cot/checkpoint_6"


def test_plain_1e_minus_4_which_yaml_reads_as_a_string_is_a_float(tmp_path):
    config = load_with(tmp_path, lr="1e-4")
    assert config.lr == pytest.approx(1e-4) and isinstance(config.lr, float)


def test_integer_values_for_float_keys_become_floats(tmp_path):
    config = load_with(tmp_path, weight_decay="0", uniform_prob="1")
    assert config.weight_decay == 0.0 and isinstance(config.weight_decay, float)
    assert config.uniform_prob == 1.0 and isinstance(config.uniform_prob, float)


def test_to_dict_has_every_key_with_its_value(tmp_path):
    config = load_config(write(tmp_path, PROSQA_COCONUT_YAML))
    d = config.to_dict()
    assert set(d) == {f.name for f in dataclasses.fields(Config)}
    assert d["max_latent_stage"] == 6 and d["name"] == "prosqa-coconut"
    assert d["max_new_tokens"] == 128


# --- max_new_tokens -----------------------------------------------------------------


def test_max_new_tokens_defaults_to_64_for_gsm(tmp_path):
    assert load_with(tmp_path, val_path="data/gsm_valid.json").max_new_tokens == 64


def test_max_new_tokens_defaults_to_128_otherwise(tmp_path):
    assert load_with(tmp_path, val_path="data/prosqa_valid.json").max_new_tokens == 128


def test_explicit_max_new_tokens_wins_over_the_default(tmp_path):
    config = load_with(tmp_path, val_path="data/gsm_valid.json", max_new_tokens="300")
    assert config.max_new_tokens == 300


# --- method flags and the curriculum --------------------------------------------------


@pytest.mark.parametrize("flag", ["cot", "no_cot", "no_thoughts", "pause_as_thought"])
def test_method_is_the_one_flag_set(flag):
    config = Config.from_dict({**MINIMAL, "coconut": False, flag: True})
    assert config.method.name == flag


def test_two_method_flags_are_rejected(tmp_path):
    message = error_of(tmp_path, cot="True")
    assert "only one of coconut, cot, no_cot, no_thoughts, pause_as_thought" in message
    assert "(got coconut, cot)" in message
    assert "x.yaml" in message


def test_pause_as_thought_counts_as_a_method(tmp_path):
    assert "(got coconut, pause_as_thought)" in error_of(tmp_path, pause_as_thought="True")


def test_no_method_flag_is_rejected(tmp_path):
    """With all False the published run.py trained pause as thought: the line says which key that is."""
    message = error_of(tmp_path, coconut="False")
    assert "one of coconut, cot, no_cot, no_thoughts, pause_as_thought must be True" in message
    assert "set pause_as_thought: True" in message


def test_coconut_with_no_thoughts_names_what_the_published_code_did(tmp_path):
    message = error_of(tmp_path, no_thoughts="True")
    assert "(got coconut, no_thoughts: the published run.py trained no_thoughts then; set coconut: False)" in message


@pytest.mark.parametrize("method", ["coconut", "pause_as_thought", "no_thoughts"])
def test_no_curriculum_goes_with_curriculum_methods(method):
    config = Config.from_dict({**MINIMAL, "coconut": False, method: True, "no_curriculum": True})
    assert config.no_curriculum is True


@pytest.mark.parametrize("method", ["cot", "no_cot"])
def test_no_curriculum_without_a_curriculum_is_rejected(method):
    with pytest.raises(ConfigError, match="'no_curriculum'.*" + method):
        Config.from_dict({**MINIMAL, "coconut": False, method: True, "no_curriculum": True})


def test_scheduled_stage_follows_the_curriculum():
    config = Config.from_dict({**MINIMAL, "epochs_per_stage": 3, "max_latent_stage": 2})
    assert [config.scheduled_stage(e) for e in range(10)] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3]


def test_scheduled_stage_is_zero_for_cot_and_no_cot():
    for method in ("cot", "no_cot"):
        config = Config.from_dict({**MINIMAL, "coconut": False, method: True, "epochs_per_stage": 1})
        assert config.scheduled_stage(7) == 0


def test_scheduled_stage_without_curriculum_is_past_the_last_latent_stage():
    config = Config.from_dict({**MINIMAL, "no_curriculum": True, "max_latent_stage": 6})
    assert config.scheduled_stage(0) == 7 and config.scheduled_stage(12) == 7


# --- rejections -------------------------------------------------------------------------


def test_unknown_key_suggests_the_close_one(tmp_path):
    message = error_of(tmp_path, c_thougth="1")
    assert "unknown key 'c_thougth'" in message
    assert "did you mean 'c_thought'?" in message
    assert "x.yaml" in message


def test_unknown_key_in_another_case_suggests_the_key(tmp_path):
    """`LR` is too far from `lr` for a spelling match (one letter, two edits)."""
    assert "unknown key 'LR' (did you mean 'lr'?)" in error_of(tmp_path, LR="1e-4")
    assert "(did you mean 'num_epochs'?)" in error_of(tmp_path, Num_Epochs="3")


def test_unknown_key_without_a_close_one_has_no_suggestion(tmp_path):
    message = error_of(tmp_path, zzzzzz="1")
    assert "unknown key 'zzzzzz'" in message and "did you mean" not in message


def test_non_numeric_float_is_rejected(tmp_path):
    message = error_of(tmp_path, lr="abc")
    assert "key 'lr' must be a number, got 'abc'" in message


@pytest.mark.parametrize("value", ["'True'", "1", "yes please"])
def test_bool_keys_need_yaml_booleans(tmp_path, value):
    assert "key 'bf16' must be True or False" in error_of(tmp_path, bf16=value)


@pytest.mark.parametrize("value", ["2.5", "true", "'3'"])
def test_int_keys_need_integers(tmp_path, value):
    assert "key 'c_thought' must be an integer" in error_of(tmp_path, c_thought=value)


def test_bool_is_not_a_number_for_float_keys(tmp_path):
    assert "key 'lr' must be a number, got True" in error_of(tmp_path, lr="True")


@pytest.mark.parametrize("value, shown", [("123", "123"), ("2024-05-01", "datetime.date(2024, 5, 1)"), ("1.5", "1.5"),
                                          ("on", "True")])  # YAML 1.1's boolean
def test_string_keys_need_strings(tmp_path, value, shown):
    """YAML reads these as a number, a date or a boolean: the message says how to write them as text."""
    assert f"key 'name' must be a string (quote it: 'text'), got {shown}" in error_of(tmp_path, name=value)
    assert load_with(tmp_path, name=f"'{value}'").name == value
    assert "key 'name' must be a string, got [1]" in error_of(tmp_path, name="[1]")  # no quoting makes a list text


@pytest.mark.parametrize(
    "key, value, expected",
    [
        ("c_thought", "-1", ">= 0, got -1"),
        ("epochs_per_stage", "0", ">= 1, got 0"),
        ("max_latent_stage", "-1", ">= 0, got -1"),
        ("num_epochs", "0", ">= 1, got 0"),
        ("resume", "-2", ">= 0, got -2"),
        ("seed", "-1", ">= 0, got -1"),
        ("batch_size_training", "0", ">= 1, got 0"),
        ("batch_size_eval", "0", ">= 1, got 0"),
        ("gradient_accumulation_steps", "0", ">= 1, got 0"),
        ("lr", "0", "> 0, got 0.0"),
        ("lr", "-1e-3", "> 0, got -0.001"),
        ("weight_decay", "-0.1", ">= 0, got -0.1"),
        ("uniform_prob", "-0.5", ">= 0, got -0.5"),
        ("uniform_prob", "1.5", "<= 1, got 1.5"),
        ("max_new_tokens", "0", ">= 1, got 0"),
    ],
)
def test_out_of_range_values_are_rejected(tmp_path, key, value, expected):
    message = error_of(tmp_path, **{key: value})
    assert f"key '{key}' must be {expected}" in message
    assert "x.yaml" in message


@pytest.mark.parametrize("project", ['"team/coconut"', '"a:b"', '"50%"', '"' + "p" * 129 + '"', '" "'])
def test_a_project_wandb_would_refuse_is_a_config_error(tmp_path, project):
    """wandb.init refuses these names with a traceback, after the model is built."""
    message = error_of(tmp_path, project=project)
    assert "key 'project' must be a wandb project name: 1 to 128 characters, none of / \\ # ? % :" in message
    assert load_with(tmp_path, project='"my-project_2.0 test"').project == "my-project_2.0 test"


def test_a_path_that_starts_with_the_home_folder_is_read_as_the_shell_reads_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    config = load_with(tmp_path, save_path="~/checkpoints", train_path="~/data/train.json", val_path="~/v.json",
                       load_model_path="~/ckpt/checkpoint_2", model_id="~/models/gpt2")
    home = str(tmp_path / "home")
    assert (config.save_path, config.train_path, config.val_path, config.load_model_path, config.model_id) == (
        f"{home}/checkpoints", f"{home}/data/train.json", f"{home}/v.json", f"{home}/ckpt/checkpoint_2",
        f"{home}/models/gpt2")
    assert load_with(tmp_path, name="run~1").name == "run~1"  # not a path key


def test_a_seed_that_an_epoch_would_push_past_numpys_range_is_rejected(tmp_path):
    """Epoch e seeds with seed + e; numpy refuses seeds of 2**32 and more."""
    assert load_with(tmp_path, seed=str(2**32 - 50), num_epochs="50").seed == 2**32 - 50
    message = error_of(tmp_path, seed=str(2**32 - 49), num_epochs="50")
    assert f"key 'seed' must be <= {2**32 - 50} with num_epochs 50" in message and f"got {2**32 - 49}" in message


def test_infinite_float_is_rejected(tmp_path):
    assert "key 'lr' must be a finite number" in error_of(tmp_path, lr=".inf")


def test_val_path_is_required():
    with pytest.raises(ConfigError, match="'val_path' is required"):
        Config.from_dict({"coconut": True, "train_path": "t.json"})


def test_train_path_is_required_unless_only_eval():
    with pytest.raises(ConfigError, match="'train_path' is required"):
        Config.from_dict({"coconut": True, "val_path": "v.json"})
    config = Config.from_dict({"coconut": True, "val_path": "v.json", "only_eval": True})
    assert config.train_path is None


def test_key_written_twice_is_rejected(tmp_path):
    text = PROSQA_COCONUT_YAML + "lr: 0.5\n"
    with pytest.raises(ConfigError, match="x.yaml: invalid YAML: key 'lr' appears twice"):
        load_config(write(tmp_path, text))


def test_yaml_merge_keys_load_as_yaml_says(tmp_path):
    """`<<:` merges a mapping's keys into this one, its own keys winning: valid YAML that
    the duplicate-key check refused as "invalid YAML"; the same keys as PyYAML's own
    safe_load gives, and a key written twice beside a merge is still refused."""
    import yaml

    text = PROSQA_COCONUT_YAML + "<<: {lr: 0.5, max_new_tokens: 40}\n"  # lr is the file's own too
    config = load_config(write(tmp_path, text))
    merged = yaml.safe_load(text)
    assert (config.lr, config.max_new_tokens) == (merged["lr"], merged["max_new_tokens"]) == (1e-4, 40)
    with pytest.raises(ConfigError, match="key 'mixed_precision' appears twice"):
        load_config(write(tmp_path, text + "mixed_precision: bf16\nmixed_precision: fp16\n"))
    with pytest.raises(ConfigError, match="key 'max_new_tokens' appears twice"):  # inside the merged mapping
        load_config(write(tmp_path, PROSQA_COCONUT_YAML + "<<: {max_new_tokens: 40, max_new_tokens: 41}\n"))
    with pytest.raises(ConfigError, match="key '<<' appears twice"):
        load_config(write(tmp_path, text + "<<: {max_new_tokens: 41}\n"))


def test_a_key_that_is_not_a_plain_value_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match="x.yaml: invalid YAML: a key must be a plain value at line 1"):
        load_config(write(tmp_path, "? [a, b]\n: 1\n" + PROSQA_COCONUT_YAML))


@pytest.mark.parametrize("name", ["''", "' '", "/abs/run", "../elsewhere", "runs/../../x", ".", "./", "a/./..", "a/.."])
def test_a_name_outside_save_path_is_rejected(tmp_path, name):
    """save_dir is save_path/name: an empty name would put checkpoints in save_path itself."""
    assert "key 'name' must name a folder inside save_path" in error_of(tmp_path, name=name)


def test_a_nested_name_is_a_folder_inside_save_path(tmp_path):
    assert load_with(tmp_path, name="prosqa/run1").save_dir.endswith("prosqa/run1")
    assert load_with(tmp_path, name="runs/../run1").save_dir.endswith("runs/../run1")  # still inside save_path


def test_missing_file_is_a_one_line_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"nope\.yaml: file not found$"):
        load_config(str(tmp_path / "nope.yaml"))


def test_invalid_yaml_is_a_one_line_config_error(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, "coconut: True\n  cot: [False\n"))
    message = str(info.value)
    assert "x.yaml: invalid YAML" in message and "line" in message
    assert "\n" not in message


def test_yaml_nested_too_deeply_is_a_one_line_config_error(tmp_path):
    """PyYAML recurses once per level: 5,000 levels were a 3,000-line RecursionError."""
    deep = "[" * 5000 + "]" * 5000
    with pytest.raises(ConfigError, match="x.yaml: invalid YAML: nested too deeply$"):
        load_config(write(tmp_path, f"coconut: True\nlr: {deep}\n"))
    with pytest.raises(ConfigError, match="^command line: key 'lr': not a YAML value .nested too deeply.$"):
        parse_overrides([f"lr={deep}"])


@pytest.mark.parametrize("method", ["coconut", "pause_as_thought"])
def test_methods_with_latent_tokens_need_a_thought_per_step(method):
    """c_thought 0 trained the no_thoughts curriculum under another name."""
    with pytest.raises(ConfigError, match=f"key 'c_thought' must be >= 1 for {method} .*set no_thoughts: True"):
        Config.from_dict({**MINIMAL, "coconut": False, method: True, "c_thought": 0})
    assert Config.from_dict({**MINIMAL, "coconut": False, "no_thoughts": True, "c_thought": 0}).c_thought == 0


@pytest.mark.parametrize("method", ["coconut", "pause_as_thought"])
def test_methods_with_latent_tokens_need_a_latent_stage(method):
    """max_latent_stage 0 trained no thought at all: no_cot from stage 1 on, under another name."""
    with pytest.raises(ConfigError, match=f"key 'max_latent_stage' must be >= 1 for {method} .*got 0"):
        Config.from_dict({**MINIMAL, "coconut": False, method: True, "max_latent_stage": 0})
    assert Config.from_dict({**MINIMAL, "coconut": False, method: True, "max_latent_stage": 1}).max_latent_stage == 1
    assert Config.from_dict({**MINIMAL, "coconut": False, "cot": True, "max_latent_stage": 0}).max_latent_stage == 0


@pytest.mark.parametrize("text, kind", [("- coconut\n- cot\n", "list"), ("just words\n", "str")])
def test_yaml_that_is_not_a_mapping_is_rejected(tmp_path, text, kind):
    with pytest.raises(ConfigError, match=f"x.yaml: must be a mapping of key: value, got {kind}"):
        load_config(write(tmp_path, text))


def test_empty_yaml_is_rejected(tmp_path):
    with pytest.raises(ConfigError, match="x.yaml: file is empty"):
        load_config(write(tmp_path, ""))


def test_from_dict_errors_name_no_file():
    with pytest.raises(ConfigError, match=r"^config: unknown key 'epoch'"):
        Config.from_dict({**MINIMAL, "epoch": 3})


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


# --- set_seed ---------------------------------------------------------------------------


def test_set_seed_makes_python_numpy_and_torch_repeat():
    import torch

    def draw():
        numpy_draw = None
        try:
            import numpy as np

            numpy_draw = np.random.rand()
        except ImportError:
            pass
        return random.random(), numpy_draw, torch.rand(3).tolist()

    set_seed(1234)
    first = draw()
    set_seed(1234)
    assert draw() == first
    set_seed(4321)
    assert draw() != first


@pytest.mark.parametrize("module", ["utils", "cli", "layout", "run"])
def test_config_checks_load_no_torch(module):
    """A bad config fails in a fraction of a second: reading one imports neither torch,
    transformers, datasets nor our model and data modules, not even indirectly."""
    heavy = ["torch", "transformers", "datasets", "coconut", "dataset"]
    code = f"import sys, {module}; print([m for m in {heavy!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_later_published_keys_load_and_local_path_wins(tmp_path):
    path = tmp_path / "legacy.yaml"
    path.write_text(
        "coconut: True\nlocal: True\nlocal_path: /models/gpt2\nspecial_token: False\ngrpo: False\n"
        "model_id: openai-community/gpt2\ntrain_path: t.json\nval_path: v.json\n"
    )
    config = load_config(str(path))
    assert config.model_path == "/models/gpt2"
    path.write_text("coconut: True\nmodel_id: m\ntrain_path: t.json\nval_path: v.json\n")
    assert load_config(str(path)).model_path == "m"


@pytest.mark.parametrize("coconut", ["True", "False"])  # later published configs set coconut: False beside it
@pytest.mark.parametrize("key", ["special_token", "grpo"])
def test_unsupported_published_switches_are_refused(tmp_path, key, coconut):
    path = tmp_path / "legacy.yaml"
    path.write_text(f"coconut: {coconut}\n{key}: True\ntrain_path: t.json\nval_path: v.json\n")
    with pytest.raises(ConfigError, match=f"key '{key}': this switch of later published code is not supported"):
        load_config(str(path))


@pytest.mark.parametrize("encoding", ["latin-1", "utf-16"])
def test_a_config_file_that_is_not_utf8_is_one_line(tmp_path, encoding):
    path = tmp_path / "legacy.yaml"
    path.write_text("# modèle de test\ncoconut: True\ntrain_path: t.json\nval_path: v.json\n", encoding=encoding)
    with pytest.raises(ConfigError, match="legacy.yaml.*not UTF-8 text"):
        load_config(str(path))


def new_optimizer_epochs_naive(reset, epochs_per_stage, num_epochs):
    """The epochs that build a new AdamW, read off the loop the way each rule is stated:
    False once; True / "stage" when the stage differs from the previous epoch's (the
    paper); "epoch" at every epoch (the published run.py)."""
    built, previous_stage = [], None
    for epoch in range(num_epochs):
        stage = epoch // epochs_per_stage
        if epoch == 0 or reset == "epoch" or (reset in (True, "stage") and stage != previous_stage):
            built.append(epoch)
        previous_stage = stage
    return built


@pytest.mark.parametrize("reset", [False, True, "stage", "epoch"])
@pytest.mark.parametrize("epochs_per_stage", [1, 3])
def test_reset_rule_matches_the_naive_loop(tmp_path, reset, epochs_per_stage):
    config = load_with(tmp_path, reset_optimizer=reset if isinstance(reset, str) else str(reset),
                       epochs_per_stage=str(epochs_per_stage), num_epochs="9")
    ours = [epoch for epoch in range(9) if not config.optimizer_carries_over(epoch)]
    assert ours == new_optimizer_epochs_naive(reset, epochs_per_stage, 9)


@pytest.mark.parametrize("value", ["yes", "sometimes", 1, "True"])
def test_reset_optimizer_takes_only_its_values(tmp_path, value):
    with pytest.raises(ConfigError, match="'reset_optimizer' must be one of False, True, stage, epoch"):
        Config.from_dict(dict(coconut=True, train_path="t", val_path="v", reset_optimizer=value))


# SPEC §6: (method, c_thought, epochs_per_stage, max_latent_stage, num_epochs, other keys)
PUBLISHED_TABLE = {
    "gsm_cot": ("cot", 0, 1, 0, 25, dict(save_only_improve=True, val_path="data/gsm_valid.json")),
    "gsm_coconut": ("coconut", 2, 3, 3, 25, dict(resume=3, val_path="data/gsm_valid.json")),
    "gsm_coconut_eval": ("coconut", 2, 3, 3, 25, dict(only_eval=True, val_path="data/gsm_test.json")),
    "prontoqa_coconut": ("coconut", 1, 5, 6, 50, dict(val_path="data/prontoqa_valid.json")),
    "prontoqa_coconut_eval": ("coconut", 1, 5, 6, 50, dict(only_eval=True, val_path="data/prontoqa_test.json")),
    "prosqa_coconut": ("coconut", 1, 5, 6, 50, dict(val_path="data/prosqa_valid.json")),
    "prosqa_coconut_eval": ("coconut", 1, 5, 6, 50, dict(only_eval=True, val_path="data/prosqa_test.json")),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED_TABLE))
def test_the_published_configs_hold_spec_6s_values(name):
    """Every value of SPEC §6's table and its "All" line (the reset rule: the test below)."""
    method, c_thought, epochs_per_stage, max_latent_stage, num_epochs, other = PUBLISHED_TABLE[name]
    config = load_config(str(ROOT / "args" / f"{name}.yaml"))
    assert (config.method.name, config.c_thought, config.epochs_per_stage, config.max_latent_stage,
            config.num_epochs) == (method, c_thought, epochs_per_stage, max_latent_stage, num_epochs)
    assert {key: getattr(config, key) for key in other} == other
    assert config.only_eval == other.get("only_eval", False) and config.resume == other.get("resume", config.resume)
    assert config.save_only_improve == other.get("save_only_improve", False)
    assert (config.model_id, config.lr, config.weight_decay, config.batch_size_training, config.seed) == (
        "openai-community/gpt2", 1e-4, 0.01, 32, 0)
    assert (config.pad_latent_to_max, config.uniform_prob, config.bf16) == (True, 0.0, False)
    if name == "gsm_coconut":  # it starts from a CoT checkpoint
        assert config.load_model_path is not None
    assert sorted(PUBLISHED_TABLE) == sorted(p.stem for p in (ROOT / "args").glob("*.yaml") if p.stem != "demo")


def test_published_configs_reset_the_optimizer_as_the_published_run_did():
    """The published run.py built a new AdamW every epoch; its CoT config never did."""
    for path in sorted((ROOT / "args").glob("*.yaml")):
        config = load_config(str(path))
        expected = False if path.name == "gsm_cot.yaml" else "stage" if path.name == "demo.yaml" else "epoch"
        assert config.reset_optimizer in ((True, "stage") if expected == "stage" else (expected,)), path.name


@pytest.mark.parametrize("name", sorted(METHODS))
def test_each_method_flag_selects_its_method(name):
    config = Config.from_dict(dict({name: True}, train_path="t", val_path="v"))
    assert config.method is METHODS[name] and str(config.method) == name


def test_write_json_writes_whole_keeping_links_permissions_and_devices(tmp_path):
    """cli.write_json (the data scripts' outputs): a temporary file renamed onto the name,
    but a symbolic link keeps pointing at its target (which is written), an existing file
    keeps its mode, a new one gets open()'s, and a device such as /dev/null is written in
    place, not replaced by a file."""
    import stat

    from cli import write_json

    real = tmp_path / "real.json"
    real.write_text("[]")
    real.chmod(0o640)
    link = tmp_path / "link.json"
    link.symlink_to(real)
    write_json(str(link), [1, "é"], ensure_ascii=False)
    assert link.is_symlink() and json.loads(real.read_text(encoding="utf-8")) == [1, "é"]
    assert stat.S_IMODE(real.stat().st_mode) == 0o640
    umask = os.umask(0)
    os.umask(umask)
    write_json(str(tmp_path / "made" / "new.json"), {"a": 1})
    assert stat.S_IMODE((tmp_path / "made" / "new.json").stat().st_mode) == 0o666 & ~umask
    write_json(os.devnull, [1])
    assert stat.S_ISCHR(os.stat(os.devnull).st_mode)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["link.json", "made", "new.json", "real.json"]
