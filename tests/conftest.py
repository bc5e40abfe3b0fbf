"""Shared tiny fixtures: offline model folders, small reasoning data sets, and the tiny
trained and exported models (builders.py makes them)."""

import json

import pytest
from builders import tiny_prosqa_model, write_examples, write_model_folder


@pytest.fixture(scope="session")
def gpt2_folder(tmp_path_factory):
    return write_model_folder(tmp_path_factory.mktemp("models") / "tiny-gpt2", "gpt2")


@pytest.fixture(scope="session")
def llama_folder(tmp_path_factory):
    return write_model_folder(tmp_path_factory.mktemp("models") / "tiny-llama", "llama")


@pytest.fixture(scope="session")
def chain_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    return {"train": write_examples(folder / "train.json", 48, seed=0), "val": write_examples(folder / "val.json", 12, seed=1)}


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """test_export.py's tiny coconut GPT-2, trained on ProsQA-style data once a session."""
    return tiny_prosqa_model(tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_val(tiny):
    """The validation examples of `tiny`."""
    with open(tiny.val) as f:
        return json.load(f)
