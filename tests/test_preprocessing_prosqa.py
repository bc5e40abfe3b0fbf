"""ProsQA generator (preprocessing/prosqa.py) and its statistics script.

Every example is checked against an independent reading of its own fields: a
plain BFS over `edges` decides reachability and shortest distances, and the
question / steps / answer texts are parsed back into edges.
"""

import json
import re
import statistics
from collections import Counter, deque
from pathlib import Path

import pytest

from preprocessing import prosqa, prosqa_stats

SMALL = prosqa.Options(num_nodes=12, min_steps=3, max_steps=4)
FACT = re.compile(r"(Every )?(\w+) is a (\w+)\.")


@pytest.fixture(scope="module")
def default_examples():
    return prosqa.generate(300, seed=11)


@pytest.fixture(scope="module")
def small_examples():
    return prosqa.generate(200, seed=12, opts=SMALL)


def distances(edges, source):
    """Reference BFS: hops from source along edges (u, v) = "u is a v"."""
    out = {}
    for u, v in edges:
        out.setdefault(u, []).append(v)
    dist, queue = {source: 0}, deque([source])
    while queue:
        u = queue.popleft()
        for v in out.get(u, []):
            if v not in dist:
                dist[v] = dist[u] + 1
                queue.append(v)
    return dist


def parse_fact(sentence, ex):
    """'Every X is a Y.' / 'Tom is a X.' -> (index of X, index of Y, has 'Every')."""
    m = FACT.fullmatch(sentence)
    assert m, sentence
    sym = ex["idx_to_symbol"]
    return sym.index(m.group(2)), sym.index(m.group(3)), bool(m.group(1))


def question_facts(ex):
    body, _, choice = ex["question"].rpartition(" Is ")
    return re.findall(r"[^.]+\.", body), "Is " + choice


def check_example(ex):
    sym, edges = ex["idx_to_symbol"], ex["edges"]
    n = len(sym)
    # shapes and types as in the published files
    assert isinstance(ex["question"], str) and isinstance(ex["answer"], str)
    assert isinstance(ex["steps"], list) and all(isinstance(s, str) for s in ex["steps"])
    assert all(isinstance(s, str) for s in sym) and len(set(sym)) == n
    assert all(isinstance(e, list) and len(e) == 2 and all(isinstance(i, int) for i in e) for e in edges)
    for key in ("root", "target", "neg_target"):
        assert isinstance(ex[key], int) and 0 <= ex[key] < n
    assert len({tuple(e) for e in edges}) == len(edges), "duplicate edge"
    assert all(u < v for u, v in edges), "edges go from earlier to later nodes"
    indegree = Counter(v for _, v in edges)
    linked = {u for e in edges for u in e}
    assert linked == set(range(n)), "every node takes part in an edge"
    # people are the parentless nodes and carry names; concepts carry words
    for i, s in enumerate(sym):
        assert s in (prosqa.CONCEPTS if indegree[i] else prosqa.NAMES), (i, s)
    root, target, neg = ex["root"], ex["target"], ex["neg_target"]
    assert indegree[root] == 0 and indegree[target] > 0 and indegree[neg] > 0
    # reachability: answer only from the person asked, distractor not from them
    near = distances(edges, root)
    assert target in near
    assert neg not in near
    assert any(neg in distances(edges, p) for p in range(n) if indegree[p] == 0 and p != root)
    # steps: a shortest path root -> target, one fact per hop
    hops = [parse_fact(s, ex) for s in ex["steps"]]
    assert len(hops) == near[target]
    assert hops[0][0] == root and not hops[0][2]
    assert hops[-1][1] == target
    for (u, v, _), (u2, _, every) in zip(hops, hops[1:]):
        assert v == u2 and every
    assert all([u, v] in edges for u, v, _ in hops)
    # question: exactly one fact per edge, "Every" only for concepts, then the choice
    facts, choice = question_facts(ex)
    parsed = [parse_fact(f.strip(), ex) for f in facts]
    assert sorted([u, v] for u, v, _ in parsed) == sorted(edges)
    assert all(every == (indegree[u] > 0) for u, _, every in parsed)
    options = re.fullmatch(rf"Is {sym[root]} a (\w+) or (\w+)\?", choice)
    assert options and set(options.groups()) == {sym[target], sym[neg]}
    assert ex["answer"] == f"{sym[root]} is a {sym[target]}."


def test_default_examples_hold_every_invariant(default_examples):
    for ex in default_examples:
        check_example(ex)


def test_small_graph_examples_hold_every_invariant(small_examples):
    for ex in small_examples:
        check_example(ex)


def test_steps_respect_bounds(default_examples, small_examples):
    assert {len(ex["steps"]) for ex in default_examples} <= {3, 4, 5, 6}  # the published set's range
    unbounded = prosqa.generate(1000, seed=11, opts=prosqa.Options(max_steps=0))
    assert max(len(ex["steps"]) for ex in unbounded) > 6  # premise: the bound is what keeps them out
    assert {len(ex["steps"]) for ex in small_examples} <= {3, 4}
    assert max(len(ex["idx_to_symbol"]) for ex in small_examples) <= 12


def test_answer_is_the_deepest_exclusive_concept(default_examples):
    """The asked person's answer is as far away as any concept only it reaches."""
    for ex in default_examples:
        edges, root = ex["edges"], ex["root"]
        others = [p for p in (0, 1) if p != root]
        far = set(distances(edges, others[0]))
        near = distances(edges, root)
        has_category = {u for u, _ in edges}
        own = [v for v in near if v not in far and v not in has_category and v != root]
        assert near[ex["target"]] == max(near[v] for v in own)


def test_default_statistics_are_close_to_the_published_ones(default_examples):
    nodes = statistics.mean(len(ex["idx_to_symbol"]) for ex in default_examples)
    edges = statistics.mean(len(ex["edges"]) for ex in default_examples)
    steps = Counter(len(ex["steps"]) for ex in default_examples)
    people = [sum(1 for i in range(len(ex["idx_to_symbol"])) if i not in {v for _, v in ex["edges"]})
              for ex in default_examples]
    first = sum(question_facts(ex)[1].split(" a ", 1)[1].startswith(ex["idx_to_symbol"][ex["target"]] + " ")
                for ex in default_examples)
    assert 21.5 < nodes < 24.5  # published: 22.8
    assert 33 < edges < 39.5  # published: 36
    assert 0.33 < steps[3] / 300 < 0.50 and 0.35 < steps[4] / 300 < 0.52  # published: 40%, 43%
    assert 0.07 < steps[5] / 300 < 0.21  # published: 14%
    assert 2 <= min(people) and max(people) <= 6
    assert 0.4 < first / 300 < 0.6


def test_same_seed_same_data_other_seed_other_data():
    assert prosqa.generate(40, seed=5) == prosqa.generate(40, seed=5)
    assert prosqa.generate(40, seed=5) != prosqa.generate(40, seed=6)


def test_questions_are_distinct(default_examples):
    assert len({ex["question"] for ex in default_examples}) == len(default_examples)


def test_cli_output_file_matches_in_process_generation(tmp_path):
    out = tmp_path / "p.json"
    assert prosqa.main(["--num_examples", "25", "--seed", "3", "--output", str(out)]) == 0
    assert json.loads(out.read_text()) == prosqa.generate(25, seed=3)


def test_cli_split_writes_three_disjoint_files(tmp_path):
    argv = ["--split", "--output_dir", str(tmp_path), "--split_sizes", "30,7,5",
            "--num_nodes", "12", "--max_steps", "4", "--seed", "1"]
    assert prosqa.main(argv) == 0
    parts = {name: json.loads((tmp_path / f"prosqa_{name}.json").read_text())
             for name in ("train", "valid", "test")}
    assert {k: len(v) for k, v in parts.items()} == {"train": 30, "valid": 7, "test": 5}
    questions = [ex["question"] for part in parts.values() for ex in part]
    assert len(set(questions)) == len(questions)
    for part in parts.values():
        for ex in part:
            check_example(ex)
            assert 3 <= len(ex["steps"]) <= 4


def test_split_defaults_are_the_published_sizes():
    args = prosqa.build_parser().parse_args(["--split"])
    assert args.split_sizes == (17886, 300, 500)
    assert args.output_dir == "data"


@pytest.mark.parametrize("argv", [
    [],  # neither --output nor --split
    ["--output", "x.json", "--min_steps", "5", "--max_steps", "4"],
    ["--split", "--split_sizes", "10,20"],
    ["--output", "x.json", "--num_nodes", "200"],
    # no edges at all (no answer in 100,000 tries, blamed on --num_nodes), NaN, and means that
    # looked hung for minutes before the same error
    ["--output", "x.json", "--mean_in_nodes", "0"],
    ["--output", "x.json", "--mean_in_nodes", "nan"],
    ["--output", "x.json", "--mean_in_nodes", "6"],
    ["--output", "x.json", "--mean_in_nodes", "inf"],
])
def test_cli_rejects_bad_arguments(argv, capsys):
    with pytest.raises(SystemExit) as err:
        prosqa.main(argv)
    assert err.value.code == 2
    if "--mean_in_nodes" in argv:
        assert "--mean_in_nodes must be above 0 and at most 5" in capsys.readouterr().err


@pytest.mark.parametrize("module", [prosqa, prosqa_stats])
def test_help(module, capsys):
    with pytest.raises(SystemExit) as err:
        module.main(["--help"])
    assert err.value.code == 0
    assert "usage" in capsys.readouterr().out


def test_stats_table_side_by_side(tmp_path, capsys, default_examples, small_examples):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(default_examples))
    b.write_text(json.dumps(small_examples))
    assert prosqa_stats.main([str(a), str(b)]) == 0
    table = capsys.readouterr().out
    rows = {}
    for line in table.splitlines()[1:]:
        label, *values = re.split(r"\s{2,}", line.strip())
        rows[label] = values
    assert rows["examples"] == ["300", "200"]
    assert rows["one fact per edge"] == ["100.0%", "100.0%"]
    assert rows["answer = deepest own sink"] == ["100.0%", "100.0%"]
    assert "steps = 3" in rows and "people = 2" in rows
    small_steps = Counter(len(ex["steps"]) for ex in small_examples)
    assert rows["steps = 3"][1] == f"{100 * small_steps[3] / 200:.1f}%"


def test_impossible_options_fail_cleanly(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(prosqa, "MAX_TRIES", 200)
    assert prosqa.main(["--num_nodes", "5", "--output", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err
    assert "raise --num_nodes" in err and "--mean_in_nodes" not in err
    assert not (tmp_path / "x.json").exists()
    # a sparse graph rarely reaches 3 hops: the error names the mean too
    assert prosqa.main(["--mean_in_nodes", "0.001", "--output", str(tmp_path / "x.json")]) == 2
    assert "or raise --mean_in_nodes (0.001: few edges)" in capsys.readouterr().err


@pytest.mark.parametrize("content, message", [
    ("[]", "must be a non-empty JSON list of ProsQA examples"),  # make demo's empty test split
    ('[{"question": "q", "steps": [], "answer": "a"}]', "example 0 is not a ProsQA example as prosqa.py writes them (no 'idx_to_symbol')"),
    ("[{", "not a readable JSON file"),
    # the keys, but not the contents, of a ProsQA example
    (json.dumps([{"question": "Tom is a wumpus.", "steps": [], "idx_to_symbol": ["Tom", "wumpus"], "edges": [[0, 1]],
                  "root": 0, "target": 1, "neg_target": 0}]), "example 0 is not a ProsQA example"),
    (json.dumps([{"question": "q. Is Tom a a or b?", "steps": [], "idx_to_symbol": ["Tom"], "edges": [[0, 5]],
                  "root": 0, "target": 0, "neg_target": 0}]), "example 0 is not a ProsQA example as prosqa.py writes them (IndexError"),
])
def test_stats_on_a_file_it_cannot_read_is_one_line(tmp_path, capsys, content, message):
    path = tmp_path / "prosqa_test.json"
    path.write_text(content)
    assert prosqa_stats.main([str(path)]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}: ") and message in lines[0], captured.err
    assert captured.out == ""


OUTPUT_UNDER_A_FILE = {  # script -> its arguments, with OUT a path whose folder is a file
    "prosqa": ["--split", "--split_sizes", "2,1,1", "--output_dir", "OUT"],
    "prontoqa": ["--input", "FIXTURES/prontoqa_sample.json", "--output_dir", "OUT"],
    "gsm_icot": ["--input", "FIXTURES/gsm_sample.txt", "--output", "OUT/gsm.json"],
    "transform_chat": ["--input", "FIXTURES/chat_sample.jsonl", "--output", "OUT/chat.json", "--no_progress"],
}


@pytest.mark.parametrize("script", sorted(OUTPUT_UNDER_A_FILE))
def test_an_output_path_that_cannot_be_written_is_one_line(script, tmp_path, capsys):
    """An output folder under a file: one line naming the path, exit 2, no traceback."""
    import importlib

    (tmp_path / "afile").write_text("")
    out = tmp_path / "afile" / "sub"
    fixtures = Path(__file__).parent / "fixtures" / "preprocessing"
    argv = [a.replace("OUT", str(out)).replace("FIXTURES", str(fixtures)) for a in OUTPUT_UNDER_A_FILE[script]]
    if script == "transform_chat":
        pytest.importorskip("spacy")
    module = importlib.import_module(f"preprocessing.{script}")
    assert module.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(tmp_path / "afile") in err[0] and "Not a directory" in err[0], err


def test_a_negative_example_count_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        prosqa.main(["--output", str(tmp_path / "p.json"), "--num_examples", "-5"])
    assert stop.value.code == 2 and "--num_examples must be >= 0" in capsys.readouterr().err
    assert not (tmp_path / "p.json").exists()


def test_tiny_model_rebuilds_the_checked_in_demo_model_folder(tmp_path):
    """The README's command writes the demo's folder again, byte for byte: another
    tokenizer would give the demo's data other token ids than its checkpoints and exports
    hold (a change of the generator's defaults once did)."""
    from preprocessing import tiny_model

    assert tiny_model.main(["--output", str(tmp_path)]) == 0
    checked_in = Path(__file__).resolve().parent.parent / "models" / "prosqa-gpt2-tiny"
    names = sorted(p.name for p in checked_in.iterdir())
    assert names == sorted(p.name for p in tmp_path.iterdir())
    for name in names:
        assert (tmp_path / name).read_bytes() == (checked_in / name).read_bytes(), name
