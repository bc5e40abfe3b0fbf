"""generate.py on the tiny exported models of test_export.py."""

import dataclasses
import itertools
import json
import os
import re

import pytest
import torch
from builders import tiny_cot_model

import generate
import inference
from coconut import Coconut
from utils import extract_answer


@pytest.fixture(scope="module")
def exported(tiny):
    return inference.load_exported(tiny.export)


def _run(capsys, argv):
    capsys.readouterr()
    code = generate.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_prompt_is_the_spec_evaluation_prompt(exported, tiny_val):
    tok, s = exported.tokenizer, exported.settings
    q = tiny_val[0]["question"]
    base = tok.encode(q + "\n", add_special_tokens=True)
    for stage in (0, 1, 2):
        expected = base + [s["start_latent_id"]] + [s["latent_token_id"]] * stage + [s["end_latent_id"]]
        assert inference.prompt_ids(exported, q, stage) == expected
    unpadded = dataclasses.replace(exported, settings={**s, "pad_latent_to_max": False, "c_thought": 2})
    assert inference.prompt_ids(unpadded, q, 2, n_steps=1).count(s["latent_token_id"]) == 2  # min(2, 1) * 2
    cot = dataclasses.replace(exported, settings={**s, "method": "cot"})
    assert inference.prompt_ids(cot, q, 0) == base


def test_one_question_prints_output_answer_and_counts(tiny, exported, tiny_val, capsys):
    q = tiny_val[0]["question"]
    code, out, err = _run(capsys, [tiny.export, "--question", q, "--max_new_tokens", "12"])
    assert code == 0, err
    assert out.startswith(f"Question: {q}\n")
    counts = re.search(r"^Tokens: (\d+) latent, (\d+) generated$", out, re.M)
    assert counts and int(counts.group(1)) == 2 and 1 <= int(counts.group(2)) <= 12

    # the same greedy decoding as Coconut.generate on the evaluation prompt
    prompt = inference.prompt_ids(exported, q, 2)
    full = exported.model.generate(torch.tensor([prompt]), max_new_tokens=12)[0]
    new, eos = full[len(prompt):].tolist(), exported.model.eos_token_id
    kept = new[:1] + list(itertools.takewhile(lambda token: token != eos, new[1:]))  # the first always, then to EOS
    assert int(counts.group(2)) == len(kept) - (kept == [eos])  # EOS not counted
    # scored as run.py scores: the answer after the last '#' of the whole decoded row
    # (without a '#' that is the whole row, question and newlines included)
    answer = extract_answer(exported.tokenizer.decode(full, skip_special_tokens=True))
    assert f"\nAnswer: {answer}\n" in out


def test_answers_are_scored_as_run_py_scores_them(exported):
    """An output without '#': run.py's answer is then the whole decoded row (question
    included), never the output alone (published scoring; SPEC §4)."""
    tok, eos = exported.tokenizer, exported.model.eos_token_id
    prompt = inference.prompt_ids(exported, "Is Tom a rempus?", 0)
    output = tok.encode(" Tom is a rempus.", add_special_tokens=False)
    original = exported.model.generate
    try:
        exported.model.generate = lambda ids, mask, max_new_tokens: torch.tensor([prompt + output + [eos]])
        result = inference.answer_batch(exported, ["Is Tom a rempus?"], [prompt], 8)[0]
        exported.model.generate = lambda ids, mask, max_new_tokens: torch.tensor([prompt + [eos] * 3])
        lone_eos = inference.answer_batch(exported, ["Is Tom a rempus?"], [prompt], 3)[0]
    finally:
        exported.model.generate = original
    assert result.output == tok.decode(output, skip_special_tokens=True)
    assert result.answer == extract_answer(tok.decode(prompt + output + [eos], skip_special_tokens=True))
    assert result.answer != extract_answer(result.output) and result.generated_tokens == len(output)
    assert (lone_eos.output, lone_eos.generated_tokens) == ("", 0)  # the kept first EOS is no generated token


def test_cot_match_reads_the_steps_after_every_line_of_the_question():
    from evaluate import extract_cot

    steps = "Two plus two.\nIt is four."
    assert extract_cot(f"What is 2+2?\n{steps}\n### 4") == steps  # published: after the first line
    assert extract_cot(f"Read this:\nWhat is 2+2?\n{steps}\n### 4", question_lines=2) == steps


def test_stage_sets_the_number_of_thoughts(tiny, tiny_val, capsys):
    for stage in (0, 1):
        code, out, _ = _run(capsys, [tiny.export, "--question", tiny_val[1]["question"], "--stage", str(stage),
                                     "--max_new_tokens", "2"])
        assert code == 0 and f"Tokens: {stage} latent," in out


def test_show_thoughts_are_the_thoughts_under_the_lm_head(tiny, exported, tiny_val, capsys):
    q = tiny_val[2]["question"]
    code, out, _ = _run(capsys, [tiny.export, "--question", q, "--show-thoughts", "--max_new_tokens", "2"])
    assert code == 0
    lines = [ln for ln in out.splitlines() if ln.startswith("  thought ")]
    assert [ln.split(":")[0] for ln in lines] == ["  thought 1", "  thought 2"]

    # independently: the continuous thought is the input embedding at the latent
    # column; decode it with the output embeddings
    model = exported.model
    ids = torch.tensor([inference.prompt_ids(exported, q, 2)])
    with torch.no_grad():
        embeds = model(input_ids=ids, attention_mask=torch.ones_like(ids)).inputs_embeds[0]
        cols = (ids[0] == exported.latent_id).nonzero(as_tuple=True)[0]
        probs = torch.softmax(model.base_causallm.get_output_embeddings()(embeds[cols]), dim=-1)
    for line, p in zip(lines, probs):
        top = p.topk(5)
        expected = "  ".join(f"{exported.tokenizer.decode([t])!r} {v:.3f}"
                             for t, v in zip(top.indices.tolist(), top.values.tolist()))
        assert line.split(": ", 1)[1] == expected


def test_questions_file_batched_with_progress_and_output(tiny, exported, tiny_val, tmp_path, capsys):
    out_file = tmp_path / "answers.json"
    code, out, err = _run(capsys, [tiny.export, "--questions", tiny.val, "--batch_size", "4",
                                   "--max_new_tokens", "6", "--output", str(out_file)])
    assert code == 0, err
    assert "Answering" in err  # the progress bar
    records = json.loads(out_file.read_text())
    assert [r["question"] for r in records] == [ex["question"] for ex in tiny_val]
    assert all(r["latent_tokens"] == 2 and 1 <= r["generated_tokens"] <= 6 for r in records)
    assert re.search(rf"^Accuracy: \d+ / {len(tiny_val)} = ", out, re.M)
    assert out.count("Question: ") == len(tiny_val)

    # batching does not change the answers
    prompts = [inference.prompt_ids(exported, ex["question"], 2) for ex in tiny_val[:3]]
    alone = [inference.answer_batch(exported, [ex["question"]], [p], 6)[0] for ex, p in zip(tiny_val, prompts)]
    assert [(r.output, r.generated_tokens) for r in alone] == [(r["output"], r["generated_tokens"]) for r in records[:3]]


def test_a_long_prompt_leaves_the_rest_of_its_batch_their_whole_budget(exported, tiny_val):
    """Near the end of the context a prompt gets the positions left, the other prompts of
    its batch all of max_new_tokens: each answers as it would alone."""
    prompts = [inference.prompt_ids(exported, ex["question"], 2) for ex in tiny_val[:4]]
    questions = [ex["question"] for ex in tiny_val[:4]]
    longest = max(range(4), key=lambda i: len(prompts[i]))
    near_the_end = dataclasses.replace(exported, context=len(prompts[longest]) + 2)
    alone = [inference.answer_batch(near_the_end, [q], [p], 8)[0] for q, p in zip(questions, prompts)]
    batched = inference.answer_batch(near_the_end, questions, prompts, 8)
    assert [(r.output, r.generated_tokens) for r in batched] == [(r.output, r.generated_tokens) for r in alone]
    assert alone[longest].generated_tokens <= 2 < max(r.generated_tokens for r in alone)  # premise


def test_the_default_budget_is_the_runs_max_new_tokens(tiny, exported, tiny_val, tmp_path, capsys):
    """export.py keeps the run's max_new_tokens; generate.py decodes with it unless told:
    an answer is read after the last '#' generated, so the budget can change it."""
    budget = exported.settings["max_new_tokens"]
    prompts = [inference.prompt_ids(exported, ex["question"], 2) for ex in tiny_val]
    questions = [ex["question"] for ex in tiny_val]
    longer = inference.answer_batch(exported, questions, prompts, 4 * budget)
    assert max(r.generated_tokens for r in longer) > budget  # premise: the budget cuts some output
    out_file = tmp_path / "answers.json"
    code, _, err = _run(capsys, [tiny.export, "--questions", tiny.val, "--output", str(out_file)])
    assert code == 0, err
    within = inference.answer_batch(exported, questions, prompts, budget)
    records = json.loads(out_file.read_text())
    assert [(r["output"], r["generated_tokens"]) for r in records] == [(r.output, r.generated_tokens) for r in within]


def test_cot_model_answers_without_latents(tmp_path_factory, tiny_val, capsys):
    cot = tiny_cot_model(tmp_path_factory)
    code, out, _ = _run(capsys, [cot.export, "--question", tiny_val[0]["question"], "--max_new_tokens", "3", "--show-thoughts"])
    assert code == 0 and "Tokens: 0 latent," in out and "no continuous thoughts" in out
    code, _, err = _run(capsys, [cot.export, "--question", "x", "--stage", "1"])
    assert code == 2 and "max_latent_stage 0" in err


@pytest.mark.parametrize("case", ["missing_folder", "not_coconut", "too_long", "stage", "bad_file", "bad_example",
                                  "latent_marker", "device", "no_cuda", "damaged_weights", "special_text",
                                  "bad_answer", "half_an_emoji"])
def test_bad_input_is_one_line_exit_2(case, tiny, tmp_path, capsys):
    import shutil

    argv = [tiny.export, "--question", "Is Tom a wumpus?"]
    if case == "latent_marker":  # as the training logs print prompts
        argv[2] = "Tom is a <|latent|> wumpus. Is Tom a wumpus?"
    elif case == "device":
        argv += ["--device", "gpu"]
    elif case == "no_cuda":
        argv += ["--device", f"cuda:{torch.cuda.device_count()}"]  # one past the last (none on a CPU machine)
    elif case == "damaged_weights":
        argv[0] = str(tmp_path / "damaged")
        shutil.copytree(tiny.export, argv[0])
        weights = os.path.join(argv[0], "model.safetensors")
        open(weights, "r+b").truncate(os.path.getsize(weights) // 2)
    elif case == "missing_folder":
        argv[0] = str(tmp_path / "nope")
    elif case == "not_coconut":
        argv[0] = tiny.model  # a Hugging Face folder, not an export
    elif case == "too_long":
        argv[2] = "Every wumpus is a yumpus. " * 60  # > 256 positions
    elif case == "stage":
        argv += ["--stage", "3"]
    elif case == "bad_file":
        (tmp_path / "q.json").write_text("{not json")
        argv[1:3] = ["--questions", str(tmp_path / "q.json")]
    elif case == "special_text":
        argv[2] = "Is Tom a wumpus?<|endoftext|> Or not?"  # read as EOS, not text
    elif case == "bad_answer":  # would leave the accuracy's count silently
        questions = [{"question": "ok", "answer": None}, {"question": "q", "answer": 42}]  # None: no reference
        (tmp_path / "q.json").write_text(json.dumps(questions))
        argv[1:3] = ["--questions", str(tmp_path / "q.json")]
    elif case == "bad_example":
        (tmp_path / "q.json").write_text(json.dumps([{"question": "ok"}, {"answer": "no question"}]))
        argv[1:3] = ["--questions", str(tmp_path / "q.json")]
    elif case == "half_an_emoji":  # JSON allows a lone surrogate; the tokenizer refuses it with a TypeError
        (tmp_path / "q.json").write_text('["ok", "Is Tom a wumpus \\ud83d?"]')
        argv[1:3] = ["--questions", str(tmp_path / "q.json")]
    code, out, err = _run(capsys, argv)
    assert code == 2 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1, err
    expected = {"missing_folder": "no such model folder", "not_coconut": "not an exported Coconut model",
                "too_long": "context is 256 positions", "stage": "beyond this model's max_latent_stage 2",
                "bad_file": "not a readable JSON file", "bad_example": "example 1 has no string 'question'",
                "latent_marker": "holds <|latent|>, a token of the prompt's latent block", "device": "--device gpu: ",
                "no_cuda": "CUDA devices", "damaged_weights": "damaged: the model does not load (",
                "special_text": "holds <|endoftext|>, one of the tokenizer's special tokens",
                "bad_answer": "q.json: example 1: 'answer' must be a string, got int",
                "half_an_emoji": "the question 'Is Tom a wumpus \\ud83d?' is not valid text"}[case]
    assert expected in err


def test_from_pretrained_refuses_a_plain_folder(tiny):
    with pytest.raises(ValueError, match="not an exported Coconut model"):
        Coconut.from_pretrained(tiny.model)


@pytest.mark.parametrize("kind", ["trailing_slash", "existing_folder", "missing_folder", "questions_file"])
def test_output_is_checked_before_generating(tiny, tiny_val, capsys, tmp_path, kind):
    questions = tmp_path / "questions.json"
    questions.write_text(json.dumps(tiny_val[:2]))
    output = {"trailing_slash": str(tmp_path / "new") + "/", "existing_folder": str(tmp_path),
              "missing_folder": str(tmp_path / "nowhere" / "a.json"), "questions_file": str(questions)}[kind]
    code, out, err = _run(capsys, [tiny.export, "--questions", str(questions), "--output", output])
    assert code == 2 and out == ""  # not one answer generated
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: --output {output}: "), err
    assert {"missing_folder": "its folder does not exist", "questions_file": "is the input file"}.get(
        kind, "is a folder") in lines[0]
    assert os.listdir(tmp_path) == ["questions.json"] and json.loads(questions.read_text()) == tiny_val[:2]
