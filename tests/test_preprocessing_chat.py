"""Chat-trace conversion (preprocessing/transform_chat.py): offline sentence steps."""

import json
import os
import re
from pathlib import Path

import pytest

from preprocessing import transform_chat as tc

FIXTURE = Path(__file__).parent / "fixtures" / "preprocessing" / "chat_sample.jsonl"


@pytest.fixture(scope="module")
def nlp():
    return tc.load_pipeline()


def squeeze(text):
    return re.sub(r"\s+", "", text)


@pytest.mark.parametrize("text, expected", [
    ("Dr. Lee met Mr. Kim in the U.S. last year. They talked.",
     ["Dr. Lee met Mr. Kim in the U.S. last year.", "They talked."]),
    ("Use Fig. 3 here, e.g. for scale. See Smith et al. for details. It costs approx. five dollars.",
     ["Use Fig. 3 here, e.g. for scale.", "See Smith et al. for details.", "It costs approx. five dollars."]),
    ("Pi is 3.14159 and e is 2.718. Their sum is 5.86. It was No. 5 on p. 12 of Vol. 2.",
     ["Pi is 3.14159 and e is 2.718.", "Their sum is 5.86.", "It was No. 5 on p. 12 of Vol. 2."]),
    ("We bought apples, pears, etc. and ate them. We left at 9 a.m. on Jan. 5. Then we slept.",
     ["We bought apples, pears, etc. and ate them.", "We left at 9 a.m. on Jan. 5.", "Then we slept."]),
    ("Apples, pears, etc. Then more fruit.", ["Apples, pears, etc.", "Then more fruit."]),
    ("First paragraph has no full stop\n\nSecond one does. Third sentence.",
     ["First paragraph has no full stop", "Second one does.", "Third sentence."]),
    ("Is it? Yes! Sure.", ["Is it?", "Yes!", "Sure."]),
])
def test_sentences_with_abbreviations_and_decimals(nlp, text, expected):
    assert tc.split_sentences(text, nlp) == expected


def test_bare_sentencizer_would_get_these_wrong(nlp):
    """The cases above are not what spaCy's rule-based sentencizer gives on its own."""
    text = "Use Fig. 3 here. See Smith et al. for details. It was No. 5 in the list."
    bare = [s.text for s in nlp(text).sents]
    assert len(bare) > 3
    assert len(tc.split_sentences(text, nlp)) == 3


@pytest.mark.parametrize("text, expected", [
    ("The fact <citation>Smith, J. (2020). Title. Journal!</citation> holds. Next.",
     ["The fact <citation>Smith, J. (2020). Title. Journal!</citation> holds.", "Next."]),
    ('Claim one. <citation id="7">Doe et al. 2021. A paper? Yes.</citation> Claim two.',
     ['Claim one. <citation id="7">Doe et al. 2021. A paper? Yes.</citation>', "Claim two."]),
    ("<reasoning>Step A. Step B.\n\nStep C.</reasoning> So it follows. Done.",
     ["<reasoning>Step A. Step B.\n\nStep C.</reasoning> So it follows.", "Done."]),
    ("Outer <a>one. <b>two. three.</b> four.</a> After. End.",
     ["Outer <a>one. <b>two. three.</b> four.</a> After.", "End."]),
    ("Stray </x> close tag. Then <y> unclosed. Done.",
     ["Stray </x> close tag.", "Then <y> unclosed.", "Done."]),
    # an open tag that never closes leaves the spans after it protected
    ("We use a List<String> here. It holds. <citation>Smith et al. 2020. A Study. Journal.</citation> Next.",
     ["We use a List<String> here.", "It holds. <citation>Smith et al. 2020. A Study. Journal.</citation>",
      "Next."]),
])
def test_tag_spans_stay_whole_in_one_step(nlp, text, expected):
    assert tc.split_sentences(text, nlp) == expected


def test_nothing_is_dropped_and_every_span_is_in_exactly_one_step(nlp):
    text = ("Dr. No said 2.5 <citation>Ref. 1. Ibid.</citation> was right. <reasoning>Think. "
            "Again.</reasoning> Then, e.g., we stop at 3.0. Later <note a='1'>x. y.</note>. End")
    steps = tc.split_sentences(text, nlp)
    assert squeeze("".join(steps)) == squeeze(text)
    for m in re.finditer(r"<(citation|reasoning|note)[^>]*>.*?</\1>", text, flags=re.S):
        assert sum(m.group(0) in step for step in steps) == 1


def test_tag_spans_finds_outermost_pairs():
    text = "a <x>b <y>c</y> d</x> e <z k='v'>f</z> </q> <open>"
    spans = [text[s:e] for s, e in tc.tag_spans(text)]
    assert spans == ["<x>b <y>c</y> d</x>", "<z k='v'>f</z>"]
    # unclosed opens before, inside and around pairs are plain text
    text = "<br> a <x>b <p> c</x> <y><u>d</u> e <y>f</y>"
    assert [text[s:e] for s, e in tc.tag_spans(text)] == ["<x>b <p> c</x>", "<u>d</u>", "<y>f</y>"]


@pytest.mark.parametrize("text, expected", [
    ("Steps:\n1. Add the numbers. 2. Divide by two.\n3. Done.",
     ["Steps:", "1. Add the numbers.", "2. Divide by two.", "3. Done."]),
    ("Do this.\n1) Read it.\n2) Check it.", ["Do this.", "1) Read it.", "2) Check it."]),
    ("The answer is 1. Then we stop.", ["The answer is 1.", "Then we stop."]),  # a number ending a sentence stays
])
def test_a_list_number_starts_its_item_and_is_no_step_of_its_own(nlp, text, expected):
    assert tc.split_sentences(text, nlp) == expected


def test_summary_marker_is_the_last_outside_tags():
    trace, answer = tc.split_summary("A. In summary, B. <r>In summary: no</r> C. In summary: D. ")
    assert trace == "A. In summary, B. <r>In summary: no</r> C. "
    assert answer == "D."
    with pytest.raises(tc.Skip, match="no summary marker"):
        tc.split_summary("Nothing to see <r>In summary: hidden</r>.")


def test_convert_fixture_file(tmp_path, capsys):
    out = tmp_path / "chat.json"
    assert tc.main(["--input", str(FIXTURE), "--output", str(out), "--no_progress"]) == 0
    data = json.loads(out.read_text())
    assert data == [
        {"question": "Which metal conducts best?",
         "steps": ["Dr. Ohm measured many metals, e.g. copper and silver.",
                   "Silver has a resistivity of 1.59e-8 ohm m, vs. 1.68 for copper in the same units. "
                   "<citation>Handbook of Physics, Vol. 3, p. 12. U.S. edition.</citation>",
                   "The difference is about 5.4 percent."],
         "answer": "silver."},
        {"question": "What is 2.5 times 4?",
         "steps": ["<reasoning>Multiply 2.5 by 4. That is 10.0 exactly.</reasoning> The product is 10.0.",
                   "No rounding is needed."],
         "answer": "10"},
        {"question": "How much did Mr. Smith pay?",
         "steps": ["Mr. Smith paid $3.50 at 9 a.m. on Jan. 5.",
                   "He then paid $1.25 more, i.e. $4.75 in all.",
                   "That settles it <citation>Receipt No. 7.</citation>."],
         "answer": "$4.75"},
    ]
    report = capsys.readouterr().out
    assert "kept 3 examples, skipped 5" in report
    # line 8: a follow-up question; the last assistant message answers it, not the first
    assert "more than one user message: 1" in report
    assert "no summary marker: 1" in report
    assert "fewer than 2 steps: 1" in report
    assert "malformed: 2 (lines 5, 6)" in report


def test_min_steps_option(tmp_path, capsys):
    out = tmp_path / "chat.json"
    assert tc.main(["--input", str(FIXTURE), "--output", str(out), "--no_progress", "--min_steps", "1"]) == 0
    assert len(json.loads(out.read_text())) == 4
    assert "fewer than" not in capsys.readouterr().out


def test_progress_bar_is_shown(tmp_path, capsys):
    assert tc.main(["--input", str(FIXTURE), "--output", str(tmp_path / "c.json")]) == 0
    assert "traces" in capsys.readouterr().err


def test_empty_answer_and_nothing_kept(tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    record = {"messages": [{"role": "user", "content": "Q?"},
                           {"role": "assistant", "content": "One. Two. In summary:  "}]}
    src.write_text(json.dumps(record) + "\n\n")
    assert tc.main(["--input", str(src), "--output", str(tmp_path / "o.json"), "--no_progress"]) == 1
    assert "empty answer: 1" in capsys.readouterr().out
    assert json.loads((tmp_path / "o.json").read_text()) == []


def test_a_lone_surrogate_is_a_malformed_line_not_half_a_file(tmp_path, capsys):
    """JSON allows "\\ud800" (half an emoji), UTF-8 does not: writing the output crashed
    with a traceback and left `[{"question": ` under the output's name."""
    src = tmp_path / "in.jsonl"
    good = {"messages": [{"role": "user", "content": "Q?"},
                         {"role": "assistant", "content": "First add two. Then add two more. In summary: 4"}]}
    in_question = {"messages": [{"role": "user", "content": "Q\ud800"}, good["messages"][1]]}
    in_reply = {"messages": [good["messages"][0], {"role": "assistant", "content": "One \udfff. Two. In summary: 4"}]}
    src.write_text("\n".join(json.dumps(r) for r in (in_question, good, in_reply)) + "\n")
    out = tmp_path / "o.json"
    assert tc.main(["--input", str(src), "--output", str(out), "--no_progress"]) == 0
    assert "malformed: 2 (lines 1, 3)" in capsys.readouterr().out
    assert json.loads(out.read_text()) == [tc.convert_line(json.dumps(good), tc.load_pipeline())]


def test_an_output_write_that_fails_leaves_no_half_file(tmp_path, monkeypatch, capsys):
    """The JSON goes to a temporary file renamed onto the name when whole (cli.write_json);
    the error names the output."""
    import cli

    out = tmp_path / "o.json"
    out.write_text("[]")  # an earlier output stays as it was

    def full_disk(fd):  # where a full disk shows on many file systems: the written data's flush
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cli.os, "fsync", full_disk)
    assert tc.main(["--input", str(FIXTURE), "--output", str(out), "--no_progress"]) == 2
    assert os.listdir(tmp_path) == ["o.json"] and out.read_text() == "[]"
    assert capsys.readouterr().err == f"{out}: No space left on device\n"


def test_spacy_model_option_loads_a_saved_pipeline(tmp_path, nlp):
    """--spacy_model takes any installed pipeline name or path (here a saved one)."""
    saved = tmp_path / "pipeline"
    nlp.to_disk(saved)
    out = tmp_path / "o.json"
    argv = ["--input", str(FIXTURE), "--output", str(out), "--no_progress", "--spacy_model", str(saved)]
    assert tc.main(argv) == 0
    assert len(json.loads(out.read_text())) == 3


def test_unknown_spacy_model_fails_cleanly(tmp_path, capsys):
    argv = ["--input", str(FIXTURE), "--output", str(tmp_path / "o.json"), "--spacy_model", "no_such_model_xyz"]
    assert tc.main(argv) == 2
    assert "no_such_model_xyz" in capsys.readouterr().err


def test_a_file_that_is_not_utf8_text_is_one_line(tmp_path, capsys):
    compressed = tmp_path / "traces.jsonl.gz"
    compressed.write_bytes(__import__("gzip").compress(FIXTURE.read_bytes()))
    assert tc.main(["--input", str(compressed), "--output", str(tmp_path / "o.json"), "--no_progress"]) == 2
    assert capsys.readouterr().err == f"{compressed}: not UTF-8 text (a compressed file?)\n"


def test_without_spacy_installed_it_says_so(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "spacy", None)  # `import spacy` then raises ImportError
    assert tc.main(["--input", str(FIXTURE), "--output", str(tmp_path / "o.json"), "--no_progress"]) == 2
    assert capsys.readouterr().err == "spaCy is not installed: pip install spacy\n"


def test_help(capsys):
    with pytest.raises(SystemExit) as err:
        tc.main(["--help"])
    assert err.value.code == 0
    assert "In summary" in capsys.readouterr().out


@pytest.mark.parametrize("spelling", ["same", "relative", "symlink", "hardlink"])
def test_output_equal_to_input_fails_before_writing(tmp_path, capsys, monkeypatch, spelling):
    src = tmp_path / "traces.jsonl"
    src.write_text(FIXTURE.read_text())
    before = src.read_bytes()
    monkeypatch.chdir(tmp_path)
    out = {"same": str(src), "relative": "./sub/../traces.jsonl", "symlink": str(tmp_path / "link.json"),
           "hardlink": str(tmp_path / "hard.json")}[spelling]
    (tmp_path / "sub").mkdir()
    if spelling == "symlink":
        os.symlink(src, out)
    elif spelling == "hardlink":
        os.link(src, out)
    assert tc.main(["--input", str(src), "--output", out, "--no_progress"]) == 2
    captured = capsys.readouterr()
    assert captured.err.strip().splitlines() == [
        f"error: --output {out} is the input file {src}: it would be overwritten"]
    assert captured.out == "" and src.read_bytes() == before


def test_output_a_folder_fails_before_reading(tmp_path, capsys):
    assert tc.main(["--input", str(FIXTURE), "--output", str(tmp_path), "--no_progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: --output {tmp_path} is a folder; name the JSON file to write"]
