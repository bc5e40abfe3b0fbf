"""evaluate.generation_accuracy against a naive reference: each question decoded alone by
the no-cache loop (bench/naive.py), its answer and CoT read by SPEC §4's rules written out
here, on references chosen so that a known subset of the answers and CoTs is right."""

import json

import torch

from bench.naive import naive_generate_one
from dataset import MyCollator, get_dataset, question_dataset
from distributed import DistEnv
from evaluate import generation_accuracy
from layout import PromptLayout
from modeling import build_model
from utils import Config


def spec_answer(text: str) -> str:
    """SPEC §4: the decoded text after the last '#', commas removed, stripped."""
    return text[text.rfind("#") + 1:].replace(",", "").strip()


def spec_cot(text: str) -> str:
    """SPEC §4: the generated lines after the (one-line) question and before '#', stripped."""
    return "\n".join(text.split("\n")[1:]).split("#")[0].strip()


def test_scoring_rules_on_literal_texts():
    from evaluate import extract_cot
    from utils import extract_answer, normalize_answer

    assert extract_answer("Q?\nstep # 1\n### 1,234 ") == "1234"  # the last '#', commas gone
    assert extract_answer("no hash, at all") == "no hash at all"
    assert normalize_answer(" 12,000\n") == "12000"
    assert extract_cot("Q?\na\nb\n### 7") == "a\nb" and extract_cot("Q1\nQ2\na\n### 7", question_lines=2) == "a"


def test_generation_accuracy_counts_what_the_naive_loop_scores(gpt2_folder, chain_data):
    """7 questions in batches of 4 (the last padded with a repeat, which must not count);
    answers right for the even ones, CoTs right for the first three."""
    examples = json.load(open(chain_data["val"]))[:7]
    config = Config.from_dict(dict(coconut=True, model_id=gpt2_folder, train_path="t", val_path=chain_data["val"],
                                   batch_size_eval=4, max_new_tokens=8))
    torch.manual_seed(0)
    built = build_model(config, None, None, lambda message: None)
    model, tokenizer, tokens = built.model.eval(), built.tokenizer, built.tokens
    stage = 1
    questions = question_dataset(get_dataset(config.val_path, tokenizer, 10**9, examples),
                                 PromptLayout.for_config(config, tokens), stage)
    texts = []
    with torch.no_grad():
        for i in range(len(examples)):
            prompt = questions[i]["input_ids"]
            generated = naive_generate_one(model.base_causallm, prompt, tokens.latent_id, tokenizer.eos_token_id, 8)
            texts.append(tokenizer.decode(generated, skip_special_tokens=True))
    scored = [dict(ex) for ex in examples]
    for i, (ex, text) in enumerate(zip(scored, texts)):
        ex["answer"] = spec_answer(text) if i % 2 == 0 else spec_answer(text) + " not"
        if i < 3:
            ex["steps"] = spec_cot(text).split("\n")
    assert sum(spec_cot(t) == "\n".join(ex["steps"]) for t, ex in zip(texts, scored)) == 3  # the premise
    collator = MyCollator(tokenizer, latent_id=tokens.latent_id, label_pad_token_id=-100)
    counts = generation_accuracy(model, model, questions, collator, tokenizer, scored, config, DistEnv(),
                                 lambda message: None)
    assert counts == {"correct": 4, "cot_correct": 3, "total": 7}


def test_every_process_answers_its_share_in_as_many_whole_batches_no_larger_than_its_share():
    """Each question answered once over the processes; every process decodes the same
    number of batches of one size (their passes pair up; one shape to compile or
    capture), padded with repeats; the batch is never larger than a process's share (40
    questions with batch_size_eval 100000 decoded 100000 rows)."""
    from evaluate import _rank_share

    for n, world, batch_size in [(40, 1, 100000), (40, 1, 16), (5, 2, 2), (7, 4, 3), (3, 4, 2), (1000, 3, 7)]:
        shares = [_rank_share(n, DistEnv(rank=r, world_size=world), batch_size) for r in range(world)]
        assert sorted(i for own, _, _, _ in shares for i in own) == list(range(n))
        assert len({(n_batches, size) for _, _, n_batches, size in shares}) == 1
        for own, padded, n_batches, size in shares:
            assert padded[: len(own)] == own and set(padded[len(own):]) <= set(own[:1] or [0])
            assert size == min(batch_size, -(-n // world)) and len(padded) == n_batches * size
        # no batch that no process needs
        assert shares[0][2] == -(-max(len(own) for own, _, _, _ in shares) // shares[0][3])


def test_the_logged_output_is_the_row_as_decoding_it_alone_gives_it(gpt2_folder, chain_data):
    """The published log decoded one question at a time; a batch row carries EOS padding
    as long as its longest neighbour's answer (which varied with the process count)."""
    from evaluate import _unpadded

    examples = json.load(open(chain_data["val"]))[:4]
    config = Config.from_dict(dict(coconut=True, model_id=gpt2_folder, train_path="t", val_path=chain_data["val"],
                                   max_new_tokens=12))
    torch.manual_seed(0)
    built = build_model(config, None, None, lambda message: None)
    model, tokenizer, tokens = built.model.eval(), built.tokenizer, built.tokens
    questions = question_dataset(get_dataset(config.val_path, tokenizer, 10**9, examples),
                                 PromptLayout.for_config(config, tokens), 1)
    batch = MyCollator(tokenizer, latent_id=tokens.latent_id)([questions[i] for i in range(len(examples))])
    eos = tokenizer.eos_token_id
    with torch.no_grad():
        rows = model.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=12)
        alone = [model.generate(torch.tensor([questions[i]["input_ids"]]), max_new_tokens=12)[0]
                 for i in range(len(examples))]
    assert any(len(a) < rows.shape[1] for a in alone)  # the premise: some rows are padded
    for k, single in enumerate(alone):
        assert _unpadded(rows[k], int(batch["attention_mask"][k].sum()), eos).tolist() == single.tolist()
