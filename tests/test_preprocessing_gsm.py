"""GSM8k-Aug conversion (preprocessing/gsm_icot.py and gsm_icot.bash), offline."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from preprocessing import gsm_icot

FIXTURE = Path(__file__).parent / "fixtures" / "preprocessing" / "gsm_sample.txt"
REPO = Path(__file__).resolve().parents[1]

EXPECTED = [
    {"question": "A baker makes 12 muffins an hour for 3 hours and sells 20 of them. How many muffins are left?",
     "steps": ["<<12*3=36>>", "<<36-20=16>>"], "answer": "16"},
    {"question": "Sam has 5 boxes with 4 pens each. He gives away 6 pens and buys 1,000 more. "
                 "How many pens does he have?",
     "steps": ["<<5*4=20>>", "<<20-6=14>>", "<<14+1000=1014>>"], "answer": "1,014"},
    {"question": "A rope is 7.5 meters long and is cut in half. How long is each piece?",
     "steps": ["<<7.5/2=3.75>>"], "answer": "3.75"},
    {"question": "What is 2 plus 2?", "steps": [], "answer": "4"},
]


def test_parse_line_splits_question_steps_answer():
    assert gsm_icot.parse_line("Q?||<<1+1=2>> <<2*3=6>> #### 6\n") == {
        "question": "Q?", "steps": ["<<1+1=2>>", "<<2*3=6>>"], "answer": "6"}


@pytest.mark.parametrize("line", ["no separators at all", "Q?|| <<1+1=2>> 2", "Q?||<<1+1=2>> ####  ", "||<<1=1>> #### 1"])
def test_parse_line_rejects_malformed(line):
    with pytest.raises(gsm_icot.MalformedLine):
        gsm_icot.parse_line(line)


def test_convert_fixture_file(tmp_path):
    out = tmp_path / "gsm.json"
    assert gsm_icot.main(["--input", str(FIXTURE), "--output", str(out)]) == 0
    assert json.loads(out.read_text()) == EXPECTED


def test_convert_named_splits_in_data_dir(tmp_path):
    for split in ("valid", "test"):
        shutil.copy(FIXTURE, tmp_path / f"gsm_{split}.txt")
    assert gsm_icot.main(["valid", "test", "--data_dir", str(tmp_path)]) == 0
    for split in ("valid", "test"):
        assert json.loads((tmp_path / f"gsm_{split}.json").read_text()) == EXPECTED
    assert not (tmp_path / "gsm_train.json").exists()


def test_malformed_line_reports_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.txt"
    lines = FIXTURE.read_text().splitlines()
    bad.write_text("\n".join(lines[:2] + ["How many? <<1+1=2>> #### 2"] + lines[2:]) + "\n")
    assert gsm_icot.main(["--input", str(bad), "--output", str(tmp_path / "o.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith(f"{bad}:3: malformed line")
    assert not (tmp_path / "o.json").exists()


def test_a_file_without_examples_is_one_line_not_an_empty_data_set(tmp_path, capsys):
    """An empty or blank download wrote `[]` and said it wrote 0 examples, exit 0."""
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n\n")
    assert gsm_icot.main(["--input", str(blank), "--output", str(tmp_path / "o.json")]) == 2
    assert capsys.readouterr().err == f"{blank}: holds no examples (only blank lines, or nothing)\n"
    assert not (tmp_path / "o.json").exists()


def test_unknown_split_and_missing_file(tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        gsm_icot.main(["dev"])
    assert err.value.code == 2
    assert gsm_icot.main(["train", "--data_dir", str(tmp_path)]) == 2
    assert "gsm_train.txt" in capsys.readouterr().err


def test_a_file_that_is_not_utf8_text_is_one_line(tmp_path, capsys):
    compressed = tmp_path / "gsm.txt.gz"
    compressed.write_bytes(__import__("gzip").compress(b"q||<<1*2=2>> #### 2\n"))
    assert gsm_icot.main(["--input", str(compressed), "--output", str(tmp_path / "o.json")]) == 2
    assert capsys.readouterr().err == f"{compressed}: not UTF-8 text (a compressed file?)\n"


def test_help(capsys):
    with pytest.raises(SystemExit) as err:
        gsm_icot.main(["--help"])
    assert err.value.code == 0
    assert "question||" in capsys.readouterr().out


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
def test_bash_script_converts_files_already_downloaded(tmp_path):
    """With the three .txt files present the script fetches nothing and converts them."""
    for split in ("train", "valid", "test"):
        shutil.copy(FIXTURE, tmp_path / f"gsm_{split}.txt")
    env = dict(os.environ, DATA_DIR=str(tmp_path), PYTHON=sys.executable, KEEP_TXT="1")
    run = subprocess.run(["bash", str(REPO / "preprocessing" / "gsm_icot.bash")], env=env,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    for split in ("train", "valid", "test"):
        assert json.loads((tmp_path / f"gsm_{split}.json").read_text()) == EXPECTED
    assert "gsm_train.txt has 4 lines, expected 385620" in run.stderr
    assert "downloaded" not in run.stdout


@pytest.mark.parametrize("script", ["gsm_icot", "prontoqa", "prosqa", "transform_chat", "tiny_model", "prosqa_stats"])
def test_every_preprocessing_script_says_a_usage_error_in_one_line(script):
    """argparse's own error is its usage, several lines, before the message."""
    proc = subprocess.run([sys.executable, str(REPO / "preprocessing" / f"{script}.py"), "--no-such-flag"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{script}.py: error: ") and lines[0].endswith("(see --help)"), lines
