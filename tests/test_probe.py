"""analysis/probe_prosqa.py on the tiny exported models of test_export.py."""

import json
import os
import subprocess
import sys

import pytest
import torch
from builders import ROOT, tiny_cot_model

import inference
from analysis import probe_prosqa


def _run(capsys, argv):
    capsys.readouterr()
    code = probe_prosqa.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_graph_depths_and_concepts():
    # Tom(0) -> a(1) -> b(2) -> c(3); Tom -> b; Sam(4) -> d(5)
    edges = [[0, 1], [1, 2], [2, 3], [0, 2], [4, 5]]
    assert probe_prosqa.bfs_depths(6, edges, 0) == {0: 0, 1: 1, 2: 1, 3: 2}
    assert probe_prosqa.concept_nodes(6, edges) == [1, 2, 3, 5]
    depths = probe_prosqa.bfs_depths(6, edges, 0)
    assert [probe_prosqa.group_of(depths.get(v), 1) for v in (1, 2, 3, 5)] == ["frontier", "frontier", "reachable", "unreachable"]


def test_probe_table_json_and_plot(tiny, tiny_val, tmp_path, capsys):
    index = 1
    plot, numbers = tmp_path / "probe.png", tmp_path / "probe.json"
    code, out, err = _run(capsys, [tiny.export, tiny.val, "--index", str(index), "--plot", str(plot), "--json", str(numbers)])
    assert code == 0, err
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = json.loads(numbers.read_text())
    example = tiny_val[index]

    # groups follow the graph: BFS depths by the tests' own reference (not the probe's)
    from test_preprocessing_prosqa import distances

    depth = distances(example["edges"], example["root"])
    concepts = {c["node"]: c for c in result["concepts"]}
    assert set(concepts) == {v for _, v in example["edges"]}  # every concept, no person
    assert result["frontier_depths"] == [1, 2]
    for node, c in concepts.items():
        for t, group in enumerate(c["groups"]):
            want = "unreachable" if node not in depth else ("frontier" if depth[node] == t + 1 else "reachable")
            assert group == want, (c["symbol"], t)
    assert concepts[example["target"]]["role"] == "answer"
    assert concepts[example["neg_target"]]["role"] == "distractor"

    # values: softmax over the vocabulary of the thought decoded by the LM head
    exported = inference.load_exported(tiny.export)
    ids = torch.tensor([inference.prompt_ids(exported, example["question"], 2)])
    with torch.no_grad():
        embeds = exported.model(input_ids=ids, attention_mask=torch.ones_like(ids)).inputs_embeds[0]
        cols = (ids[0] == exported.latent_id).nonzero(as_tuple=True)[0]
        probs = torch.softmax(exported.model.base_causallm.get_output_embeddings()(embeds[cols]), dim=-1)
    for c in concepts.values():
        token = exported.tokenizer.encode(" " + c["symbol"], add_special_tokens=False)[0]
        assert c["probs"] == pytest.approx(probs[:, token].tolist(), abs=1e-6)
    assert len(result["masses"]) == 2  # one per thought
    for t, masses in enumerate(result["masses"]):
        for group in ("frontier", "reachable", "unreachable"):  # sums of the probabilities computed here
            members = [probs[t, exported.tokenizer.encode(" " + c["symbol"], add_special_tokens=False)[0]].item()
                       for c in concepts.values() if c["groups"][t] == group]
            assert masses[group] == pytest.approx(sum(members), abs=1e-6), group

    # the table: one row per concept, the group sums, frontier cells starred
    lines = out.splitlines()
    header = next(i for i, ln in enumerate(lines) if ln.startswith("concept"))
    assert lines[header].split()[-2:] == ["thought", "2"]
    rows = lines[header + 1 : header + 1 + len(concepts)]
    assert [r.split()[0] for r in rows] == [c["symbol"] for c in result["concepts"]]
    assert sum(r.count("*") for r in rows) == sum(g == "frontier" for c in concepts.values() for g in c["groups"])
    for label in ("frontier (sum)", "other reachable (sum)", "unreachable (sum)", "frontier share of concepts"):
        assert any(ln.startswith(label) for ln in lines), label


def test_the_answer_gets_the_runs_budget(tiny, tiny_val, tmp_path):
    """The probe's "Model:" answer is generate.py's: the export's max_new_tokens, not a
    budget of the probe's own."""
    import shutil

    folder = tmp_path / "export"
    shutil.copytree(tiny.export, folder)
    config_file = folder / "coconut_config.json"
    config = json.loads(config_file.read_text())
    config["max_new_tokens"] = 2
    config_file.write_text(json.dumps(config))
    exported, example = inference.load_exported(str(folder)), tiny_val[0]
    ids = inference.prompt_ids(exported, example["question"], 2, len(example["steps"]))

    def answer(budget):
        return inference.answer_batch(exported, [example["question"]], [ids], budget)[0].answer

    assert answer(2) != answer(64)  # premise: the tiny model writes more than 2 tokens
    assert probe_prosqa.probe(exported, example, stage=2).model_answer == answer(2)


@pytest.mark.parametrize("case", ["index", "no_graph", "stage0", "cot", "not_coconut", "json_folder", "plot_nowhere"])
def test_bad_input_is_one_line_exit_2(case, tiny, tmp_path_factory, tmp_path, capsys):
    argv = [tiny.export, tiny.val, "--index", "0"]
    if case == "index":
        argv[3] = "99"
    elif case == "no_graph":
        (tmp_path / "plain.json").write_text(json.dumps([{"question": "q", "steps": [], "answer": "a"}]))
        argv[1] = str(tmp_path / "plain.json")
    elif case == "stage0":
        argv += ["--stage", "0"]
    elif case == "cot":
        argv[0] = tiny_cot_model(tmp_path_factory).export
    elif case == "not_coconut":
        argv[0] = tiny.model
    elif case == "json_folder":  # refused before the work, not after it
        argv += ["--json", str(tmp_path)]
    elif case == "plot_nowhere":
        argv += ["--plot", str(tmp_path / "nowhere" / "p.png")]
    code, out, err = _run(capsys, argv)
    assert code == 2 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1, err
    expected = {"index": "out of range", "no_graph": "has no idx_to_symbol, edges, root",
                "stage0": "no continuous thoughts", "cot": "trained with cot", "not_coconut": "not an exported Coconut",
                "json_folder": f"--json {tmp_path}: is a folder", "plot_nowhere": "its folder does not exist"}[case]
    assert expected in err


@pytest.mark.slow
def test_runs_as_a_script(tiny, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, os.path.join(ROOT, "analysis", "probe_prosqa.py"), tiny.export, tiny.val,
                           "--index", "0", "--plot", str(tmp_path / "p.png")],
                          cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "frontier (sum)" in done.stdout and (tmp_path / "p.png").exists()


def test_a_concepts_token_skips_a_lone_leading_space():
    """SentencePiece tokenizers may encode " wumpus" as a lone "▁" then the word: the
    probe must read the word's token, not the space every concept shares."""
    from analysis.probe_prosqa import first_token_ids

    class SpaceFirst:  # " word" -> [space, word]; decode of the space is whitespace only
        vocab = {"wumpus": 7, "yumpus": 8}

        def encode(self, text, add_special_tokens=False):
            return [5, self.vocab[text.strip()]]

        def decode(self, ids):
            return " " if ids == [5] else "?"

    class Merged:  # GPT-2 style: " word" is one token
        def encode(self, text, add_special_tokens=False):
            return [{"wumpus": 17, "yumpus": 18}[text.strip()]]

        def decode(self, ids):
            return " word"

    assert first_token_ids(SpaceFirst(), ["wumpus", "yumpus"]) == [7, 8]
    assert first_token_ids(Merged(), ["wumpus", "yumpus"]) == [17, 18]
