"""Shared tiny fixtures: an offline model folder and small reasoning data sets."""

import json
import os
import random

import pytest
from tiny import make_tokenizer
from transformers import GPT2Config, LlamaConfig

NAMES = ["Tom", "Sally", "Alex"]
WORDS = ["wumpus", "yumpus", "rempus", "gorpus", "lempus", "zumpus", "brimpus", "numpus"]


def chain_example(rng: random.Random, n_steps: int) -> dict:
    """A small ProsQA-like example: a chain of 'Every X is a Y.' facts and a distractor."""
    name = rng.choice(NAMES)
    words = rng.sample(WORDS, n_steps + 2)
    chain, distractor = words[: n_steps + 1], words[-1]
    facts = [f"{name} is a {chain[0]}."] + [f"Every {a} is a {b}." for a, b in zip(chain, chain[1:])]
    steps = list(facts)
    rng.shuffle(facts)
    options = [chain[-1], distractor]
    rng.shuffle(options)
    question = " ".join(facts) + f" Is {name} a {options[0]} or {options[1]}?"
    return {"question": question, "steps": steps[:-1] if n_steps > 1 else steps, "answer": f"{name} is a {chain[-1]}."}


def write_examples(path, n, seed=0, steps=(2, 3)):
    rng = random.Random(seed)
    data = [chain_example(rng, rng.choice(steps)) for _ in range(n)]
    with open(path, "w") as f:
        json.dump(data, f)
    return str(path)


def write_model_folder(folder, arch="gpt2"):
    """config.json + tokenizer, no weights: run.py trains it from scratch."""
    os.makedirs(folder, exist_ok=True)
    rng = random.Random(1)
    corpus = [json.dumps(chain_example(rng, 3)) for _ in range(50)] + ["<< >> ###"]
    tokenizer = make_tokenizer(corpus, vocab_size=400)
    tokenizer.save_pretrained(folder)
    n = len(tokenizer)
    if arch == "gpt2":
        config = GPT2Config(vocab_size=n, n_layer=2, n_embd=64, n_head=4, n_positions=512, bos_token_id=0, eos_token_id=0)
    else:
        config = LlamaConfig(vocab_size=n, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                             bos_token_id=0, eos_token_id=0, tie_word_embeddings=False)
    config.save_pretrained(folder)
    return str(folder)


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
    from test_export import tiny_prosqa_model

    return tiny_prosqa_model(tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_val(tiny):
    """The validation examples of `tiny`."""
    with open(tiny.val) as f:
        return json.load(f)
