"""Tests for dataset.py: DESIGN §1 (data files, tokenization), DESIGN §2 (stage layouts), DESIGN §3 (collator).

Expected layouts come from hand-written tables (thought groups and first kept step per
example and stage) spliced from pieces tokenized exactly as DESIGN §1 says.
"""

import inspect
import json
import os
import random
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from datasets import Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import dataset as D  # noqa: E402
from layout import first_spelled, spelled_tokens  # noqa: E402
from tiny import make_tokenizer  # noqa: E402

# Marker ids: any ints work for layouts; distinct from each other and from pieces' tokens.
S, L, E = 1001, 1002, 1003
MAX_STAGE = 2

EXAMPLES = [
    {
        "question": "Tom is a wumpus.",
        "steps": ["Every wumpus is a yumpus.", "Every yumpus is a rempus.", "Tom is a rempus."],
        "answer": "Tom is a rempus.",
    },
    {"question": "Alex is a lempus.", "steps": ["Every lempus is a zumpus."], "answer": "Alex is a zumpus.", "extra": {"ignored": [1]}},
    {"question": "12 + 30 = ?", "steps": [], "answer": "42"},
]

# (thought groups, index of the first kept step) for stages 0..MAX_STAGE+1, per example.
TRAIN_TABLE = {
    True: [  # pad_latent_to_max
        [(0, 0), (1, 1), (2, 2), (2, 3)],
        [(0, 0), (1, 1), (2, 1), (2, 1)],
        [(0, 0), (1, 0), (2, 0), (2, 0)],
    ],
    False: [
        [(0, 0), (1, 1), (2, 2), (2, 3)],
        [(0, 0), (1, 1), (2, 1), (1, 1)],  # beyond max: min(len(steps)=1, 2) groups
        [(0, 0), (1, 0), (2, 0), (0, 0)],  # beyond max: min(0, 2) groups
    ],
}
# Thought groups in the evaluation prompt for stages 0..MAX_STAGE+1, per example.
QUESTION_TABLE = {
    True: [[0, 1, 2, 2], [0, 1, 2, 2], [0, 1, 2, 2]],
    False: [[0, 1, 2, 2], [0, 1, 1, 1], [0, 0, 0, 0]],
}


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def data_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "small.json"
    path.write_text(json.dumps(EXAMPLES))
    return path


@pytest.fixture(scope="module")
def base(data_path, tok):
    return D.get_dataset(str(data_path), tok)


def pieces(tok, ex):
    """DESIGN §1 pieces, tokenized independently of dataset.py."""
    q = tok.encode(ex["question"] + "\n", add_special_tokens=True)
    steps = [tok.encode(s + "\n", add_special_tokens=False) for s in ex["steps"]]
    a = tok.encode("### " + ex["answer"], add_special_tokens=False) + [tok.eos_token_id]
    return q, steps, a


def cfg(**kw):
    base_cfg = dict(c_thought=1, max_latent_stage=MAX_STAGE, pad_latent_to_max=True, uniform_prob=0.0, no_cot=False, seed=0)
    base_cfg.update(kw)
    return types.SimpleNamespace(**base_cfg)


def flat(lists):
    return [t for x in lists for t in x]


def expected_train(tok, ex, groups, first_kept, c_thought, markers=True):
    q, steps, a = pieces(tok, ex)
    prefix = q + ([S] if markers else []) + [L] * (groups * c_thought) + ([E] if markers else [])
    suffix = flat(steps[first_kept:]) + a
    return prefix + suffix, [-100] * len(prefix) + suffix


def check_row(row, ids, labels=None, idx=None):
    assert row["input_ids"] == ids
    if labels is not None:
        assert row["labels"] == labels
    assert row["attention_mask"] == [1] * len(ids)
    assert row["position_ids"] == list(range(len(ids)))
    if idx is not None:
        assert row["idx"] == idx


# ---------------------------------------------------------------------------------------
# DESIGN §1: reading, validating, tokenizing


def test_get_dataset_pieces_columns_and_idx(base, tok):
    assert base.column_names == ["question_tokenized", "steps_tokenized", "answer_tokenized", "idx"]
    assert len(base) == len(EXAMPLES)
    for i, ex in enumerate(EXAMPLES):
        q, steps, a = pieces(tok, ex)
        row = base[i]
        assert row["question_tokenized"] == q
        assert row["steps_tokenized"] == steps
        assert row["answer_tokenized"] == a
        assert row["answer_tokenized"][-1] == tok.eos_token_id == 0
        assert row["idx"] == i
        if ex["steps"]:  # DESIGN §1's whole-text identity (with no steps it has a doubled newline)
            whole = ex["question"] + "\n" + "\n".join(ex["steps"]) + "\n### " + ex["answer"]
            assert q + flat(steps) + a == tok.encode(whole, add_special_tokens=True) + [0]


def test_get_dataset_max_size_keeps_first(data_path, tok):
    ds = D.get_dataset(str(data_path), tok, max_size=2)
    assert ds["idx"] == [0, 1]
    assert ds[1]["question_tokenized"] == pieces(tok, EXAMPLES[1])[0]


def test_get_dataset_from_examples_already_read(data_path, tok, base, tmp_path):
    # run.py parses and checks the files before the model loads; the data set is built
    # from that content, without reading the file again (path only names it)
    examples = D.load_data_file(str(data_path))
    ds = D.get_dataset(str(tmp_path / "never_read.json"), tok, examples=examples)
    assert ds.to_list() == base.to_list()
    assert D.get_dataset(str(data_path), tok, max_size=2, examples=examples).to_list() == base.to_list()[:2]


def test_get_dataset_stepless_first_sample_keeps_int_schema(tmp_path, tok):
    # A first batch of step-less samples must not fix steps_tokenized as list<null>.
    path = tmp_path / "d.json"
    path.write_text(json.dumps([EXAMPLES[2], EXAMPLES[0]]))
    ds = D.get_dataset(str(path), tok)
    assert ds[0]["steps_tokenized"] == []
    assert ds[1]["steps_tokenized"] == pieces(tok, EXAMPLES[0])[1]


def test_a_data_file_nested_too_deeply_is_one_line(tmp_path):
    """json recurses once per level: 100,000 levels were a RecursionError traceback."""
    path = tmp_path / "deep.json"
    path.write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(D.DataError, match="deep.json: not valid JSON .nested too deeply.$"):
        D.load_data_file(str(path))
    from cli import UserError, read_json_list  # generate.py --questions

    with pytest.raises(UserError, match="deep.json: not a readable JSON file .nested too deeply.$"):
        read_json_list(str(path), "questions")


def test_load_data_file_ignores_extra_keys(data_path):
    data = D.load_data_file(str(data_path))
    assert [d["question"] for d in data] == [e["question"] for e in EXAMPLES]


BAD_FILES = [
    # (file content, example index or None, words the message must contain)
    ("{not json", None, "json"),
    (json.dumps({"question": "q", "answer": "a", "steps": []}), None, "list"),
    (json.dumps([EXAMPLES[0], ["not", "an", "object"]]), 1, "object"),
    (json.dumps([EXAMPLES[0], EXAMPLES[1], {"answer": "a", "steps": []}]), 2, "question"),
    (json.dumps([{"question": "q", "steps": []}]), 0, "answer"),
    (json.dumps([EXAMPLES[0], {"question": "q", "answer": "a"}]), 1, "steps"),
    (json.dumps([{"question": 3, "answer": "a", "steps": []}]), 0, "question"),
    (json.dumps([EXAMPLES[0], {"question": "q", "answer": 42, "steps": []}]), 1, "answer"),
    (json.dumps([EXAMPLES[0], EXAMPLES[0], EXAMPLES[0], {"question": "q", "answer": "a", "steps": "one step"}]), 3, "steps"),
    (json.dumps([{"question": "q", "answer": "a", "steps": ["ok", 7]}]), 0, "steps"),
    # text the tokenizer would read as a latent marker's id, and text that is not text
    (json.dumps([EXAMPLES[0], {"question": "Use <|latent|> here", "answer": "a", "steps": []}]), 1, "question"),
    (json.dumps([{"question": "q", "answer": "a", "steps": ["ok", "é <|start-latent|>"]}]), 0, "reserved"),
    (json.dumps([{"question": "q", "answer": "<|end-latent|>", "steps": []}]), 0, "answer"),
    ('[{"question": "half an emoji \\ud83d", "answer": "a", "steps": []}]', 0, "surrogate"),
]


@pytest.mark.parametrize("content,index,word", BAD_FILES)
def test_data_errors_name_file_and_example(tmp_path, tok, content, index, word):
    path = tmp_path / "x.json"
    path.write_text(content)
    for call in (lambda: D.load_data_file(str(path)), lambda: D.get_dataset(str(path), tok)):
        with pytest.raises(D.DataError) as err:
            call()
        msg = str(err.value)
        assert "\n" not in msg
        prefix = f"{path}: example {index}: " if index is not None else f"{path}: "
        assert msg.startswith(prefix)
        assert word in msg.lower()
        if index is None:
            assert "example" not in msg
    assert issubclass(D.DataError, ValueError)


def test_validation_examples_that_can_never_score_are_named():
    """An answer holding '#' is never extracted whole (the answer is read after the last
    '#'), a step holding one never matches (CoT is read before the first): warned."""
    from utils import extract_answer, normalize_answer

    examples = [{"question": "q", "answer": "4", "steps": ["a"]},
                {"question": "q", "answer": "C#", "steps": ["see #3"]},
                {"question": "q", "answer": "x", "steps": ["b", "#2 wins"]}]
    perfect = "q\n" + "\n".join(examples[1]["steps"]) + "\n### " + examples[1]["answer"]
    assert extract_answer(perfect) != normalize_answer(examples[1]["answer"])  # premise: it can never score
    assert D.unscorable_warnings("v.json", examples) == [
        "warning: v.json: 1 example(s) have '#' in their answer (first: example 1); answer accuracy can never "
        "count them",
        "warning: v.json: 2 example(s) have '#' in their steps (first: example 1); CoT match can never count them"]
    assert D.unscorable_warnings("v.json", examples[:1]) == []


def test_text_near_the_markers_and_non_ascii_text_are_data(tmp_path, tok):
    """What the marker and surrogate checks must not refuse (premise of BAD_FILES' cases)."""
    ok = [{"question": "<|lat ent|> <|", "answer": "émoji 🙂", "steps": ["\u00e9", "<|endoftext|>"]}]
    path = tmp_path / "ok.json"
    path.write_text(json.dumps(ok))
    assert D.load_data_file(str(path)) == ok


@pytest.mark.parametrize("text", ["plain words", "ends <|endoftext|> here", "<|endoftext", "<|end of text|>",
                                  "<|endoftext|>", "a<|latent|>b", "<", "x <|start-latent|><|end-latent|> y"])
def test_text_is_refused_exactly_where_the_tokenizer_reads_a_special_token_in_it(text, tok, tmp_path):
    """check_special_text against the naive oracle: the tokenizer's own ids for the text
    hold a special token's id."""
    from modeling import build_tokenizer

    tok.save_pretrained(tmp_path / "tok")
    tokenizer, _ = build_tokenizer(str(tmp_path / "tok"))  # with the three latent markers, as runs have it
    special_ids = {i for i, t in tokenizer.added_tokens_decoder.items() if t.special} | set(tokenizer.all_special_ids)
    reads_a_special = bool(special_ids & set(tokenizer.encode(text, add_special_tokens=False)))
    examples = [{"question": "q", "answer": "a", "steps": ["s"]}, {"question": "q", "answer": "a", "steps": ["s", text]}]
    if not reads_a_special:
        D.check_special_text("v.json", examples, tokenizer)
        return
    with pytest.raises(D.DataError) as err:
        D.check_special_text("v.json", examples, tokenizer)
    token = tokenizer.convert_ids_to_tokens([i for i in tokenizer.encode(text, add_special_tokens=False)
                                             if i in special_ids][0])
    assert str(err.value) == (f"v.json: example 1: 'steps' contains {token}, one of the tokenizer's special tokens: "
                              "it would be read as that token, not as text")


def test_special_tokens_are_found_by_prefix_as_a_plain_substring_search_finds_them():
    """layout.spelled_tokens against the naive search: every token, in the whole text."""
    rng = random.Random(3)
    tokens = {f"<unused{i}>" for i in range(300)} | {"<|endoftext|>", "<|eot_id|>", "<s>", "</s>", "[PAD]", "<u>"}
    alphabet = ["<unused", "<|", "<u", ">", "|>", "1", "17", "299", "s", "eot_id", "endoftext", " ", "[PAD]", "/"]
    for _ in range(200):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 30)))
        assert spelled_tokens(text, tokens) == {token for token in tokens if token in text}, text
        # the first one, the longest of those starting at one place (as the tokenizer reads it)
        naive = min(((text.index(t), -len(t), t) for t in tokens if t in text), default=(None, None, None))[2]
        assert first_spelled(text, tokens) == naive, text


def test_special_token_text_names_the_first_example_and_key_and_stops_get_dataset(tmp_path, tok):
    examples = [{"question": "q", "answer": "a", "steps": ["s"]},
                {"question": "Why <|endoftext|>?", "answer": "a", "steps": ["s"]},
                {"question": "q", "answer": "<|endoftext|>", "steps": []}]
    path = tmp_path / "v.json"
    path.write_text(json.dumps(examples))
    with pytest.raises(D.DataError, match=r"v.json: example 1: 'question' contains <\|endoftext\|>"):
        D.get_dataset(str(path), tok)
    D.get_dataset(str(path), tok, examples=examples[:1])  # read and checked by run.py: not checked again


def test_a_data_path_that_cannot_be_read_is_one_line(tmp_path):
    with pytest.raises(D.DataError, match="cannot be read") as err:
        D.load_data_file(str(tmp_path))  # a folder
    assert str(err.value) == f"{tmp_path}: cannot be read (Is a directory)"


def test_data_error_missing_file(tmp_path):
    path = tmp_path / "missing.json"
    with pytest.raises(D.DataError, match="missing.json") as err:
        D.load_data_file(str(path))
    assert str(err.value).startswith(str(path))


class CharTokenizer:
    """Fake tokenizer: one id per character; optional BOS prefix and SEP suffix specials."""

    eos_token_id = 0
    all_special_tokens = ["<eos>"]
    added_tokens_decoder = {}

    def __init__(self, bos=False, sep=False):
        self.bos, self.sep = bos, sep

    def encode(self, text, add_special_tokens=True):
        ids = [ord(c) for c in text]
        if add_special_tokens:
            ids = ([1] if self.bos else []) + ids + ([2] if self.sep else [])
        return ids


def test_tokenizer_check_rejects_inconsistent_pieces(data_path):
    # A BERT-like trailing special token lands mid-sequence when pieces are spliced.
    with pytest.raises(D.DataError) as err:
        D.get_dataset(str(data_path), CharTokenizer(sep=True))
    msg = str(err.value)
    assert msg.startswith(f"{data_path}: ") and "tokenize" in msg and "consistent" in msg


def test_tokenizer_check_accepts_bos(data_path):
    ds = D.get_dataset(str(data_path), CharTokenizer(bos=True))
    assert ds[0]["question_tokenized"][:2] == [1, ord("T")]


def test_map_num_proc(monkeypatch):
    assert D.map_num_proc(0) is None
    assert D.map_num_proc(9_999) is None
    for cores, expected in [(2, 2), (1, 1), (64, 8), (None, 1)]:
        monkeypatch.setattr(os, "cpu_count", lambda c=cores: c)
        assert D.map_num_proc(10_000) == expected
        assert D.map_num_proc(400_000) == expected


# ---------------------------------------------------------------------------------------
# DESIGN §2: stage layouts


@pytest.mark.parametrize("c_thought", [1, 2])
@pytest.mark.parametrize("pad", [True, False])
@pytest.mark.parametrize("stage", range(MAX_STAGE + 2))
def test_cot_latent_layout(base, tok, stage, pad, c_thought):
    ds = D.get_cot_latent_dataset(stage, base, cfg(c_thought=c_thought, pad_latent_to_max=pad), S, L, E)
    assert ds.column_names == ["input_ids", "labels", "attention_mask", "position_ids", "idx"]
    for i, ex in enumerate(EXAMPLES):
        groups, first_kept = TRAIN_TABLE[pad][i][stage]
        ids, labels = expected_train(tok, ex, groups, first_kept, c_thought)
        check_row(ds[i], ids, labels, idx=i)


def test_cot_latent_literal_example(base, tok):
    # One layout spelled out piece by piece: example 0, stage 1, two thoughts per step.
    q, (s0, s1, s2), a = pieces(tok, EXAMPLES[0])
    row = D.get_cot_latent_dataset(1, base, cfg(c_thought=2), S, L, E)[0]
    assert row["input_ids"] == q + [S, L, L, E] + s1 + s2 + a
    assert row["labels"] == [-100] * (len(q) + 4) + s1 + s2 + a


@pytest.mark.parametrize("stage", range(MAX_STAGE + 2))
def test_no_cot_drops_all_steps_and_thoughts(base, tok, stage):
    ds = D.get_cot_latent_dataset(stage, base, cfg(no_cot=True), S, L, E, no_special_marker=True)
    for i, ex in enumerate(EXAMPLES):
        q, _, a = pieces(tok, ex)
        check_row(ds[i], q + a, [-100] * len(q) + a, idx=i)


def test_cot_method_layout(base, tok):
    ds = D.get_cot_latent_dataset(0, base, cfg(c_thought=0, max_latent_stage=0), S, L, E, no_special_marker=True)
    for i, ex in enumerate(EXAMPLES):
        q, steps, a = pieces(tok, ex)
        check_row(ds[i], q + flat(steps) + a, [-100] * len(q) + flat(steps) + a, idx=i)


@pytest.mark.parametrize("stage", range(MAX_STAGE + 2))
def test_no_thoughts_layout(base, tok, stage):
    ds = D.get_cot_latent_dataset(stage, base, cfg(c_thought=0), S, L, E, no_special_marker=True)
    for i, ex in enumerate(EXAMPLES):
        groups, first_kept = TRAIN_TABLE[True][i][stage]
        ids, labels = expected_train(tok, ex, groups, first_kept, 0, markers=False)
        assert L not in ids
        check_row(ds[i], ids, labels, idx=i)


@pytest.mark.parametrize("c_thought", [1, 2])
@pytest.mark.parametrize("pad", [True, False])
@pytest.mark.parametrize("stage", range(MAX_STAGE + 2))
def test_question_latent_layout(base, tok, stage, pad, c_thought):
    ds = D.get_question_latent_dataset(stage, base, cfg(c_thought=c_thought, pad_latent_to_max=pad), S, L, E)
    assert ds.column_names == ["input_ids", "attention_mask", "position_ids", "idx"]
    for i, ex in enumerate(EXAMPLES):
        q, _, _ = pieces(tok, ex)
        check_row(ds[i], q + [S] + [L] * (QUESTION_TABLE[pad][i][stage] * c_thought) + [E], idx=i)


def test_question_latent_without_markers(base, tok):
    ds = D.get_question_latent_dataset(1, base, cfg(c_thought=0), S, L, E, no_special_marker=True)
    for i, ex in enumerate(EXAMPLES):
        check_row(ds[i], pieces(tok, ex)[0], idx=i)


def uniform_base(n, n_steps=3):
    """A tokenized set of n samples with n_steps one-token steps (ids 100..)."""
    return Dataset.from_dict(
        {
            "question_tokenized": [[7, 8]] * n,
            "steps_tokenized": [[[100 + j] for j in range(n_steps)]] * n,
            "answer_tokenized": [[9, 0]] * n,
            "idx": list(range(n)),
        }
    )


def drawn_stages(ds, n_steps=3):
    """Recover each sample's stage from its layout (max_latent_stage >= n_steps, c_thought 1)."""
    stages = []
    for row in ds:
        k = row["input_ids"].count(L)
        assert 0 <= k <= n_steps
        assert row["input_ids"] == [7, 8, S] + [L] * k + [E] + [100 + j for j in range(k, n_steps)] + [9, 0]
        stages.append(k)
    return stages


def test_uniform_prob_draws_in_range_deterministic_and_varying():
    base_ds = uniform_base(60)
    c = cfg(uniform_prob=1.0, max_latent_stage=10, seed=0)
    epoch0 = drawn_stages(D.get_cot_latent_dataset(0, base_ds, c, S, L, E, epoch=0))
    assert drawn_stages(D.get_cot_latent_dataset(0, base_ds, c, S, L, E, epoch=0)) == epoch0
    assert set(epoch0) == {0, 1, 2, 3}  # inclusive range 0..len(steps)
    epoch1 = drawn_stages(D.get_cot_latent_dataset(0, base_ds, c, S, L, E, epoch=1))
    assert epoch1 != epoch0
    other_seed = drawn_stages(D.get_cot_latent_dataset(0, base_ds, cfg(uniform_prob=1.0, max_latent_stage=10, seed=1), S, L, E))
    assert other_seed != epoch0
    # The draw depends on the sample's idx, not its row position.
    assert drawn_stages(D.get_cot_latent_dataset(0, base_ds.select(range(30, 60)), c, S, L, E, epoch=0)) == epoch0[30:]


def test_a_fractional_uniform_prob_draws_each_samples_stage_as_the_naive_redraw_says():
    """uniform_prob 0.5 at scheduled stage 1: each sample's stage, redrawn here from its
    own generator (SPEC §2: with probability p, uniform over 0..len(steps)), is the
    layout it gets; about half of them draw."""
    from dataset import sample_rng

    base_ds = uniform_base(200)
    c = cfg(uniform_prob=0.5, max_latent_stage=10, seed=3)
    got = drawn_stages(D.get_cot_latent_dataset(1, base_ds, c, S, L, E, epoch=2))
    expected, drew = [], 0
    for idx in range(200):
        rng = sample_rng(3, 2, idx)
        if rng.random() < 0.5:
            drew += 1
            expected.append(rng.randint(0, 3))
        else:
            expected.append(1)
    assert got == expected and 70 <= drew <= 130


def test_uniform_prob_beyond_max_stage_follows_table():
    """A drawn stage above max_latent_stage is treated like a scheduled one (SPEC §2):
    all steps dropped, min(len(steps), max_latent_stage) thought groups."""
    c = cfg(uniform_prob=1.0, max_latent_stage=1, pad_latent_to_max=False, seed=0)
    rows = [row["input_ids"] for row in D.get_cot_latent_dataset(0, uniform_base(60), c, S, L, E, epoch=0)]
    layouts = {0: [7, 8, S, E, 100, 101, 102, 9, 0],  # drawn 0
               1: [7, 8, S, L, E, 101, 102, 9, 0],  # drawn 1
               "beyond": [7, 8, S, L, E, 9, 0]}  # drawn 2 or 3: every step dropped, one group
    assert all(row in layouts.values() for row in rows)
    # premise: 60 draws from 0..3 reach past the maximum (about half of them)
    assert {k for k, layout in layouts.items() if layout in rows} == {0, 1, "beyond"}


def resumable_draws(D, Dataset):
    """Stages drawn and shuffle order for epoch 2; also run in a fresh process below."""
    base_ds = Dataset.from_dict(
        {"question_tokenized": [[7]] * 30, "steps_tokenized": [[[100], [101], [102]]] * 30, "answer_tokenized": [[0]] * 30, "idx": list(range(30))}
    )
    c = types.SimpleNamespace(c_thought=1, max_latent_stage=10, pad_latent_to_max=True, uniform_prob=1.0, no_cot=False, seed=5)
    ds = D.get_cot_latent_dataset(0, base_ds, c, S, L, E, shuffle=True, epoch=2)
    return [(row["idx"], row["input_ids"].count(L)) for row in ds]


def test_draws_and_order_stable_across_processes():
    # A resumed run is a new process with another str-hash salt: it must see the same
    # stages and the same order (so no hash() of strings, no unseeded randomness).
    # The helper's source runs there, without this file's slow imports (transformers).
    code = (
        f"import sys, types; sys.path.insert(0, '.'); S, L, E = {S}, {L}, {E}\n"
        "import dataset as D; from datasets import Dataset\n"
        f"{inspect.getsource(resumable_draws)}\n"
        "print(resumable_draws(D, Dataset))"
    )
    root = Path(D.__file__).resolve().parent
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, check=True)
    here = resumable_draws(D, Dataset)
    assert out.stdout.strip().splitlines()[-1] == str(here)
    assert len({k for _, k in here}) > 1 and [i for i, _ in here] != list(range(30))


def test_uniform_default_seed_is_zero():
    base_ds = uniform_base(20)
    without_seed = types.SimpleNamespace(**{k: v for k, v in vars(cfg(uniform_prob=1.0, max_latent_stage=10)).items() if k != "seed"})
    a = drawn_stages(D.get_cot_latent_dataset(0, base_ds, without_seed, S, L, E, epoch=3))
    b = drawn_stages(D.get_cot_latent_dataset(0, base_ds, cfg(uniform_prob=1.0, max_latent_stage=10, seed=0), S, L, E, epoch=3))
    assert a == b


def test_shuffle_deterministic_per_seed_and_epoch():
    base_ds = uniform_base(40)

    def order(seed, epoch, shuffle=True):
        return D.get_cot_latent_dataset(1, base_ds, cfg(seed=seed), S, L, E, shuffle=shuffle, epoch=epoch)["idx"]

    assert order(0, 0, shuffle=False) == list(range(40))
    first = order(0, 0)
    assert sorted(first) == list(range(40)) and first != list(range(40))
    assert order(0, 0) == first
    assert order(0, 1) != first
    assert order(1, 0) != first
    assert order(0, 1) == order(0, 1)


# ---------------------------------------------------------------------------------------
# DESIGN §3: the collator

P = -100  # label pad


def feat(ids, labels=None, idx=None, **extra):
    f = {"input_ids": ids, "attention_mask": [1] * len(ids), "position_ids": list(range(len(ids)))}
    if labels is not None:
        f["labels"] = labels
    if idx is not None:
        f["idx"] = idx
    f.update(extra)
    return f


def test_collator_aligns_first_latents(tok):
    features = [
        feat([5, 6, S, L, L, E, 20], [P, P, P, P, P, P, 20], idx=4),  # first latent at 3
        feat([5, 6, 7, 8, S, L, L, E, 21, 22], [P] * 8 + [21, 22], idx=0),  # first latent at 5
        feat([5, 9, 30], [P, P, 30], idx=7, steps_tokenized=[[1]]),  # no latent: not shifted
    ]
    batch = D.MyCollator(tok, latent_id=L)(features)
    assert set(batch) == {"input_ids", "attention_mask", "position_ids", "labels", "idx"}
    assert all(v.dtype == torch.long for v in batch.values())
    pad = tok.eos_token_id  # tiny tokenizer has no pad token
    assert batch["input_ids"].tolist() == [
        [pad, pad, 5, 6, S, L, L, E, 20, pad],
        [5, 6, 7, 8, S, L, L, E, 21, 22],
        [5, 9, 30, pad, pad, pad, pad, pad, pad, pad],
    ]
    assert batch["attention_mask"].tolist() == [
        [0, 0, 1, 1, 1, 1, 1, 1, 1, 0],
        [1] * 10,
        [1, 1, 1, 0, 0, 0, 0, 0, 0, 0],
    ]
    assert batch["position_ids"].tolist() == [
        [0, 0, 0, 1, 2, 3, 4, 5, 6, 0],
        list(range(10)),
        [0, 1, 2, 0, 0, 0, 0, 0, 0, 0],
    ]
    assert batch["labels"].tolist() == [
        [P, P, P, P, P, P, P, P, 20, P],
        [P] * 8 + [21, 22],
        [P, P, 30, P, P, P, P, P, P, P],
    ]
    assert batch["idx"].tolist() == [4, 0, 7]
    firsts = [row.index(L) for row in batch["input_ids"].tolist()[:2]]
    assert firsts == [5, 5]
    # The real tokens (attention 1) are exactly the inputs, in order.
    for f, ids, mask, pos in zip(features, batch["input_ids"], batch["attention_mask"], batch["position_ids"]):
        assert ids[mask.bool()].tolist() == f["input_ids"]
        assert pos[mask.bool()].tolist() == f["position_ids"]


def test_collator_uses_pad_token_and_right_pads_only_without_latents():
    fake = types.SimpleNamespace(pad_token_id=3, eos_token_id=0)
    features = [feat([5, L, 6]), feat([5, 6, 7, L, 8])]
    batch = D.MyCollator(fake)(features)  # latent_id None: no alignment
    assert set(batch) == {"input_ids", "attention_mask", "position_ids"}
    assert batch["input_ids"].tolist() == [[5, L, 6, 3, 3], [5, 6, 7, L, 8]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1] * 5]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 0], list(range(5))]
    # With latent_id set the same batch is aligned, left pads using the pad token.
    aligned = D.MyCollator(fake, latent_id=L)(features)
    assert aligned["input_ids"].tolist() == [[3, 3, 5, L, 6], [5, 6, 7, L, 8]]


def test_collator_no_latents_in_batch_is_plain_right_padding(tok):
    features = [feat([5, 6], [P, 6]), feat([7, 8, 9], [P, 8, 9])]
    batch = D.MyCollator(tok, latent_id=L)(features)
    assert batch["input_ids"].tolist() == [[5, 6, 0], [7, 8, 9]]
    assert batch["labels"].tolist() == [[P, 6, P], [P, 8, 9]]


def test_collator_on_staged_dataset_via_dataloader(base, tok):
    ds = D.get_cot_latent_dataset(1, base, cfg(c_thought=2, pad_latent_to_max=False), S, L, E)
    loader = torch.utils.data.DataLoader(ds, batch_size=3, collate_fn=D.MyCollator(tok, latent_id=L))
    batch = next(iter(loader))
    rows = batch["input_ids"].tolist()
    assert len({row.index(L) for row in rows}) == 1
    for i in range(3):
        mask = batch["attention_mask"][i].bool()
        assert batch["input_ids"][i][mask].tolist() == ds[i]["input_ids"]
        assert batch["labels"][i][mask].tolist() == ds[i]["labels"]
        assert batch["position_ids"][i][mask].tolist() == list(range(len(ds[i]["input_ids"])))
    assert batch["idx"].tolist() == [0, 1, 2]
