"""Data for Coconut: reading and validating data files, tokenizing, staging, collating.

A data file is a JSON list of ``{"question": str, "answer": str, "steps": [str, ...]}``
(DESIGN §1). ``get_dataset`` tokenizes every sample in pieces once; ``training_dataset`` and
``question_dataset`` lay a tokenized set out for one curriculum stage through a
``layout.PromptLayout`` (DESIGN §2; ``get_cot_latent_dataset`` and
``get_question_latent_dataset`` are the published entry points to them); ``MyCollator``
builds batches whose first latents share one column, so every continuous-thought pass can
reuse the KV cache (DESIGN §3).

Unlike the published code, every random choice here is seeded from (seed, epoch, idx), so
a resumed run sees the same stages and the same order, and ``datasets.map`` never starts
more processes than the machine has cores.
"""

import json
import os
import random
from dataclasses import dataclass
from typing import Optional

import torch
from datasets import Dataset, Features, List, Value

from cli import UserError
from layout import END, LATENT, START, PromptLayout, first_spelled, is_text, special_token_texts, spelled_tokens

IGNORE_INDEX = -100
# Below this many examples, worker start-up costs more than tokenizing in one process.
PARALLEL_MAP_THRESHOLD = 10_000
MAX_MAP_PROCS = 8

_IDS = List(Value("int64"))
# Explicit schemas: with inferred ones, a first batch of step-less samples would give
# `list<null>` columns that later batches cannot be cast to.
RAW_FEATURES = Features({"question": Value("string"), "answer": Value("string"), "steps": List(Value("string")), "idx": Value("int64")})
TOKENIZED_FEATURES = Features({"question_tokenized": _IDS, "steps_tokenized": List(_IDS), "answer_tokenized": _IDS, "idx": Value("int64")})
QUESTION_FEATURES = Features({"input_ids": _IDS, "attention_mask": _IDS, "position_ids": _IDS, "idx": Value("int64")})
COT_FEATURES = Features({"input_ids": _IDS, "labels": _IDS, "attention_mask": _IDS, "position_ids": _IDS, "idx": Value("int64")})


class DataError(UserError):
    """A data file (or the tokenizer applied to it) does not meet DESIGN §1."""


# ---------------------------------------------------------------------------------------
# Reading and validating


def _check_example(path, i, item):
    """Raise DataError unless item is {question: str, answer: str, steps: [str]}."""
    where = f"{path}: example {i}"
    if not isinstance(item, dict):
        raise DataError(f"{where}: must be a JSON object, got {type(item).__name__}")
    for key in ("question", "answer", "steps"):
        if key not in item:
            raise DataError(f"{where}: missing key '{key}'")
    for key in ("question", "answer"):
        if not isinstance(item[key], str):
            raise DataError(f"{where}: '{key}' must be a string")
    steps = item["steps"]
    if not isinstance(steps, list) or not all(isinstance(s, str) for s in steps):
        raise DataError(f"{where}: 'steps' must be a list of strings")
    for key, text in _texts(item):
        _check_text(where, key, text)


def _check_text(where: str, key: str, text: str) -> None:
    """DataError for text the tokenizer would misread: a latent marker (the tokenizer maps
    it to the marker's id, which the run then treats as a thought or, without new rows,
    indexes past the embeddings) or a lone surrogate (not UTF-8 text: JSON allows it)."""
    if "<|" in text:
        marker = next((m for m in (START, END, LATENT) if m in text), None)
        if marker is not None:
            raise DataError(f"{where}: '{key}' contains {marker}, a token reserved for the latent tokens")
    if not is_text(text):
        raise DataError(f"{where}: '{key}' is not valid text (a lone UTF-16 surrogate, e.g. half an emoji)")


def _texts(example: dict) -> list:
    """(key, text) of every text of a validated example, as DataError messages name them."""
    return [("question", example["question"]), ("answer", example["answer"])] + [("steps", s) for s in example["steps"]]


def check_special_text(path, examples: list, tokenizer) -> None:
    """DataError naming the first example whose text spells one of the tokenizer's special
    tokens (`<|endoftext|>`, `<|eot_id|>`, `<s>`, ...): the tokenizer reads it as that
    token, not as text, so a step holding the EOS string trains the model to stop there
    (and a token past the embeddings, such as an image token, crashes mid-epoch)."""
    specials = special_token_texts(tokenizer)
    joined = "\0".join(text for example in examples for _, text in _texts(example))
    found = spelled_tokens(joined, specials)
    if not found:
        return
    for i, example in enumerate(examples):
        for key, text in _texts(example):
            token = first_spelled(text, found)
            if token is not None:
                raise DataError(f"{path}: example {i}: '{key}' contains {token}, one of the tokenizer's special "
                                "tokens: it would be read as that token, not as text")


def unscorable_warnings(path, examples: list) -> list:
    """Warnings for validation examples that evaluation can never count (DESIGN §4): the
    answer is read after the last '#' of the output, so an answer holding '#' never
    matches; CoT match reads the steps before the first '#', so a step holding one never
    matches either. Valid data all the same (SPEC): said, not refused."""
    warnings = []
    for what, bad in (("answer", [i for i, ex in enumerate(examples) if "#" in ex["answer"]]),
                      ("steps", [i for i, ex in enumerate(examples) if any("#" in s for s in ex["steps"])])):
        if bad:
            never = "answer accuracy" if what == "answer" else "CoT match"
            warnings.append(f"warning: {path}: {len(bad)} example(s) have '#' in their {what} (first: example "
                            f"{bad[0]}); {never} can never count them")
    return warnings


def load_data_file(path) -> list[dict]:
    """Read and validate a data file; raises DataError naming the file (and example)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    except RecursionError:
        raise DataError(f"{path}: not valid JSON (nested too deeply)") from None
    except OSError as e:  # a folder, no permission, an I/O error
        raise DataError(f"{path}: cannot be read ({e.strerror or type(e).__name__})") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: top level must be a JSON list, got {type(data).__name__}")
    for i, item in enumerate(data):
        _check_example(path, i, item)
    return data


def map_num_proc(n_examples: int) -> Optional[int]:
    """Processes for datasets.map: none for small sets, else at most the cores (and 8)."""
    if n_examples < PARALLEL_MAP_THRESHOLD:
        return None
    return min(os.cpu_count() or 1, MAX_MAP_PROCS)


# ---------------------------------------------------------------------------------------
# Tokenizing (DESIGN §1)


def tokenize_sample(sample, tokenizer):
    """Tokenize one raw sample in pieces: question (+specials), steps, answer + EOS."""
    return {
        "question_tokenized": tokenizer.encode(sample["question"] + "\n", add_special_tokens=True),
        "steps_tokenized": [tokenizer.encode(s + "\n", add_special_tokens=False) for s in sample["steps"]],
        "answer_tokenized": tokenizer.encode("### " + sample["answer"], add_special_tokens=False) + [tokenizer.eos_token_id],
        "idx": sample["idx"],
    }


def check_piecewise(path, sample, tokenizer):
    """The staged layouts splice pieces together, so pieces must tokenize like the whole
    (checked on one sample: run.py's pre-flight checks and get_dataset)."""
    pieces = tokenize_sample({**sample, "idx": 0}, tokenizer)
    joined = pieces["question_tokenized"] + sum(pieces["steps_tokenized"], []) + pieces["answer_tokenized"]
    # Equals DESIGN §1's question + "\n" + "\n".join(steps) + "\n### " + answer whenever there
    # are steps; with none, that formula has a doubled "\n" the pieces never produce.
    text = sample["question"] + "\n" + "".join(s + "\n" for s in sample["steps"]) + "### " + sample["answer"]
    whole = tokenizer.encode(text, add_special_tokens=True) + [tokenizer.eos_token_id]
    if joined != whole:
        raise DataError(
            f"{path}: example {sample['idx']}: the tokenizer does not tokenize the pieces consistently "
            "(question + steps + answer tokenized separately differ from the whole text tokenized at once)"
        )


def get_dataset(path, tokenizer, max_size=1000000000, examples=None) -> Dataset:
    """Load, validate and tokenize the first max_size examples of a data file.

    `examples`: the file's content already read by load_data_file (run.py checks the
    data before loading the model), so it is not parsed twice; path then only names it.
    Columns: question_tokenized, steps_tokenized, answer_tokenized, idx (position in file).
    """
    if examples is None:
        examples = load_data_file(path)
        check_special_text(path, examples, tokenizer)
    data = examples[:max_size]
    raw = Dataset.from_dict(
        {
            "question": [d["question"] for d in data],
            "answer": [d["answer"] for d in data],
            "steps": [d["steps"] for d in data],
            "idx": list(range(len(data))),
        },
        features=RAW_FEATURES,
    )
    if len(raw):
        check_piecewise(path, raw[0], tokenizer)
    return raw.map(
        tokenize_sample,
        fn_kwargs={"tokenizer": tokenizer},
        remove_columns=["question", "answer", "steps"],
        features=TOKENIZED_FEATURES,
        num_proc=map_num_proc(len(raw)),
    )


# ---------------------------------------------------------------------------------------
# Staging (DESIGN §2)


def _layout(configs, start_id, latent_id, end_id, no_special_marker) -> PromptLayout:
    """The published signatures pass the ids and settings loose; gather them."""
    return PromptLayout(start_id, latent_id, end_id, configs.c_thought, configs.max_latent_stage,
                        configs.pad_latent_to_max, markers=not no_special_marker)


def _question_sample(sample, layout: PromptLayout, stage: int):
    ids = layout.question_prompt(sample["question_tokenized"], stage, len(sample["steps_tokenized"]))
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "position_ids": list(range(len(ids))), "idx": sample["idx"]}


def question_dataset(base_dataset, layout: PromptLayout, stage: int) -> Dataset:
    """Evaluation prompts at a stage: question + [start] + [latent] * k + [end]."""
    return base_dataset.map(
        _question_sample,
        fn_kwargs={"layout": layout, "stage": stage},
        remove_columns=base_dataset.column_names,
        features=QUESTION_FEATURES,
        num_proc=map_num_proc(len(base_dataset)),
    )


def get_question_latent_dataset(scheduled_stage, base_dataset_valid, configs, start_id, latent_id, end_id, no_special_marker=False) -> Dataset:
    """The published entry point of `question_dataset`."""
    return question_dataset(base_dataset_valid, _layout(configs, start_id, latent_id, end_id, no_special_marker), scheduled_stage)


def sample_rng(seed, epoch, idx) -> random.Random:
    """Per-sample generator; seeding from a str hashes it with sha512, so it is stable
    across processes (unlike hash() of a str, which is salted per process)."""
    return random.Random(f"coconut-stage:{seed}:{epoch}:{idx}")


def shuffle_seed(seed, epoch) -> int:
    """Shuffle seed for an epoch, derived only from (seed, epoch) so resumes match."""
    return (int(seed) * 1_000_003 + int(epoch)) % (2**32)


@dataclass(frozen=True)
class Staging:
    """What a training sample's layout depends on besides the stage."""

    layout: PromptLayout
    uniform_prob: float = 0.0  # chance that a sample draws its stage uniformly from 0..len(steps)
    drop_steps: bool = False  # no_cot: question -> answer, no steps, no thoughts
    seed: int = 0


def _cot_sample(sample, staging: Staging, stage: int, epoch: int):
    steps = sample["steps_tokenized"]
    rng = sample_rng(staging.seed, epoch, sample["idx"])
    if rng.random() < staging.uniform_prob:
        stage = rng.randint(0, len(steps))  # inclusive: 0..len(steps)
    first_kept, n_thoughts = staging.layout.training_thoughts(stage, len(steps))
    if staging.drop_steps:
        first_kept, n_thoughts = len(steps), 0
    prefix = sample["question_tokenized"] + staging.layout.latent_block(n_thoughts)
    suffix = [t for step in steps[first_kept:] for t in step] + sample["answer_tokenized"]
    ids = prefix + suffix
    return {
        "input_ids": ids,
        "labels": [IGNORE_INDEX] * len(prefix) + suffix,
        "attention_mask": [1] * len(ids),
        "position_ids": list(range(len(ids))),
        "idx": sample["idx"],
    }


def training_dataset(base_dataset, staging: Staging, stage: int, epoch: int = 0, shuffle: bool = False) -> Dataset:
    """Training samples at a stage (DESIGN §2), deterministic in (staging.seed, epoch)."""
    staged = base_dataset.map(
        _cot_sample,
        fn_kwargs={"staging": staging, "stage": stage, "epoch": epoch},
        remove_columns=base_dataset.column_names,
        features=COT_FEATURES,
        num_proc=map_num_proc(len(base_dataset)),
    )
    return staged.shuffle(seed=shuffle_seed(staging.seed, epoch)) if shuffle else staged


def get_cot_latent_dataset(scheduled_stage, base_dataset, configs, start_id, latent_id, end_id, no_special_marker=False, shuffle=False, epoch=0) -> Dataset:
    """The published entry point of `training_dataset`."""
    staging = Staging(_layout(configs, start_id, latent_id, end_id, no_special_marker), configs.uniform_prob,
                      drop_steps=bool(getattr(configs, "no_cot", False)), seed=getattr(configs, "seed", 0))
    return training_dataset(base_dataset, staging, scheduled_stage, epoch, shuffle)


# ---------------------------------------------------------------------------------------
# Collating (DESIGN §3)


def _first_latent(ids, latent_id):
    return ids.index(latent_id) if latent_id is not None and latent_id in ids else None


@dataclass
class MyCollator:
    """Pads a batch so the first latent of every example sits in one column.

    Left pads (input pad id, attention 0, label -100, position 0) shift each example with
    latents; examples without latents stay put; then all are right-padded to the longest.
    """

    tokenizer: object
    latent_id: Optional[int] = None
    label_pad_token_id: int = IGNORE_INDEX

    def _pad_id(self):
        pad = self.tokenizer.pad_token_id
        return self.tokenizer.eos_token_id if pad is None else pad

    def __call__(self, features: list[dict]) -> dict:
        if len({"labels" in f for f in features}) > 1:
            raise ValueError("MyCollator: some features have 'labels' and some do not")
        rows = [self._row(f) for f in features]
        firsts = [_first_latent(r["input_ids"], self.latent_id) for r in rows]
        col = max((i for i in firsts if i is not None), default=None)
        pads = {"input_ids": self._pad_id(), "attention_mask": 0, "position_ids": 0, "labels": self.label_pad_token_id}
        for row, first in zip(rows, firsts):
            shift = 0 if first is None else col - first
            for key in row:
                row[key] = [pads[key]] * shift + row[key]
        width = max(len(r["input_ids"]) for r in rows)
        batch = {key: torch.tensor([r[key] + [pads[key]] * (width - len(r[key])) for r in rows], dtype=torch.long) for key in rows[0]}
        if "idx" in features[0]:
            batch["idx"] = torch.tensor([int(f["idx"]) for f in features], dtype=torch.long)
        return batch

    @staticmethod
    def _row(feature):
        """Plain int lists of the padded keys; masks and positions default to 1 and 0..n-1."""
        ids = [int(t) for t in feature["input_ids"]]
        row = {
            "input_ids": ids,
            "attention_mask": [int(t) for t in feature.get("attention_mask", [1] * len(ids))],
            "position_ids": [int(t) for t in feature.get("position_ids", range(len(ids)))],
        }
        if "labels" in feature:
            row["labels"] = [int(t) for t in feature["labels"]]
        return row

