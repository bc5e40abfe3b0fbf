"""ProntoQA conversion (preprocessing/prontoqa.py) on a hand-written generator-shaped file."""

import json
from pathlib import Path

import pytest

from preprocessing import prontoqa

FIXTURE = Path(__file__).parent / "fixtures" / "preprocessing" / "prontoqa_sample.json"


def load(path):
    return json.loads(Path(path).read_text())


def test_convert_joins_question_and_query_and_pairs_sentences():
    examples = prontoqa.convert(load(FIXTURE))
    assert len(examples) == 5
    first = examples[0]
    assert first["question"] == ("Every wumpus is a yumpus. Yumpuses are dull. Every yumpus is a zumpus. "
                                 "Zumpuses are cold. Alex is a wumpus. True or false: Alex is cold.")
    assert first["steps"] == [
        "Alex is a wumpus. Every wumpus is a yumpus.",
        "Alex is a yumpus. Every yumpus is a zumpus.",
        "Alex is a zumpus. Zumpuses are cold.",
        "Alex is cold.",
    ]
    assert first["answer"] == "True"
    assert examples[2]["steps"] == ["Rex is an impus. Each impus is bright.", "Rex is bright. So the claim holds."]
    assert [ex["answer"] for ex in examples] == ["True", "False", "True", "False", "True"]


def test_split_sizes_and_order(tmp_path):
    argv = ["--input", str(FIXTURE), "--output_dir", str(tmp_path), "--train_size", "3", "--valid_size", "1"]
    assert prontoqa.main(argv) == 0
    parts = [load(tmp_path / f"prontoqa_{name}.json") for name in ("train", "valid", "test")]
    assert [len(p) for p in parts] == [3, 1, 1]
    assert parts[0] + parts[1] + parts[2] == prontoqa.convert(load(FIXTURE))
    assert parts[1][0]["question"].startswith("Jompuses are large.")


def test_default_split_is_9000_200_rest():
    examples = list(range(9500))
    train, valid, test = prontoqa.split(examples, 9000, 200)
    assert (len(train), len(valid), len(test)) == (9000, 200, 300)
    assert valid[0] == 9000 and test[0] == 9200
    args = prontoqa.build_parser().parse_args([])
    assert (args.input, args.train_size, args.valid_size) == ("data/5hop_0shot_random.json", 9000, 200)


@pytest.mark.parametrize("raw, key", [
    ({"ex1": {"in_context_example0": {}}}, "ex1"),
    ({"ex2": {"test_example": {"question": "Q", "query": "q", "chain_of_thought": "not a list", "answer": "True"}}},
     "ex2"),
    ({"ex3": {"test_example": {"question": "Q", "query": "q", "chain_of_thought": ["a"]}}}, "ex3"),
])
def test_malformed_entry_is_reported(tmp_path, capsys, raw, key):
    bad = tmp_path / "raw.json"
    bad.write_text(json.dumps(raw))
    assert prontoqa.main(["--input", str(bad), "--output_dir", str(tmp_path)]) == 2
    assert repr(key) in capsys.readouterr().err
    assert not (tmp_path / "prontoqa_train.json").exists()


def test_a_file_without_entries_is_one_line_not_three_empty_splits(tmp_path, capsys):
    empty = tmp_path / "raw.json"
    empty.write_text("{}")
    assert prontoqa.main(["--input", str(empty), "--output_dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"{empty}: the file holds no entries (an empty JSON object)\n"
    assert not (tmp_path / "prontoqa_train.json").exists()


def test_a_file_that_is_not_utf8_text_is_one_line(tmp_path, capsys):
    compressed = tmp_path / "5hop.json.gz"
    compressed.write_bytes(__import__("gzip").compress(b"{}"))
    assert prontoqa.main(["--input", str(compressed), "--output_dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"{compressed}: not UTF-8 text (a compressed file?)\n"


def test_help(capsys):
    with pytest.raises(SystemExit) as err:
        prontoqa.main(["--help"])
    assert err.value.code == 0
    assert "chain_of_thought" in capsys.readouterr().out
