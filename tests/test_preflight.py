"""Pre-flight checks (preflight.py), the run-folder lock (runlock.py), command-line
overrides and the endings of run.py that used to be silent (DESIGN §5).

Every mistake: one line on stderr naming the culprit, exit status 2, before any
training, nothing written. In-process runs of run.main on the tiny GPT-2 of conftest
(512 positions); the few subprocess tests (torchrun, Ctrl-C, a killed lock holder)
are marked slow.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from builders import (REPO, RUN_PY, free_port, keys_for, run_in_process, run_sub, silent, sub_env, write_cfg,
                      write_examples)

import checkpoint
import preflight
import runlock
from dataset import get_dataset, load_data_file, question_dataset, training_dataset, Staging
from layout import PromptLayout
from modeling import ModelLoadError, build_model, build_tokenizer
from utils import Config, ConfigError, load_config, parse_overrides

CONTEXT = 512  # conftest's tiny models


def config_file(tmp_path, gpt2_folder, chain_data, **over):
    keys = keys_for(gpt2_folder, chain_data, tmp_path / "ckpt", "run", coconut=True)
    keys.update(over)
    return write_cfg(tmp_path / "cfg.yaml", keys)


def assert_fails(tmp_path, argv, *expected):
    """run.main(argv) stops with one line holding every `expected` text, exit 2, before
    the model is built, and writes nothing."""
    rc, out, err = run_in_process(*argv)
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert rc == 2, (rc, err[-2000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), err[-2000:]
    for text in expected:
        assert text in lines[0], lines[0]
    assert "Running on one process" not in out and "from scratch" not in out  # no model was built
    assert not (tmp_path / "ckpt").exists()
    return lines[0]


def write_json(path, data) -> str:
    path.write_text(json.dumps(data))
    return str(path)


def long_example(n_words=700):
    """An example far longer than 512 tokens."""
    return {"question": " ".join(["Every wumpus is a yumpus."] * (n_words // 5)), "steps": ["Tom is a wumpus."],
            "answer": "Tom is a yumpus."}


# ------------------------------------------------------------------ data
@pytest.mark.parametrize("part", ["train", "val"])
def test_an_empty_data_file_stops_the_run(tmp_path, gpt2_folder, chain_data, part):
    empty = write_json(tmp_path / "empty.json", [])
    cfg = config_file(tmp_path, gpt2_folder, chain_data, **{f"{part}_path": empty})
    assert_fails(tmp_path, [cfg], f"{part}_path {empty}: the file holds no examples")


@pytest.mark.parametrize("part", ["train", "val"])
def test_an_example_longer_than_the_context_is_named(tmp_path, gpt2_folder, chain_data, part):
    examples = load_data_file(chain_data[part])
    examples.insert(3, long_example())
    path = write_json(tmp_path / f"{part}_long.json", examples)
    cfg = config_file(tmp_path, gpt2_folder, chain_data, **{f"{part}_path": path})
    line = assert_fails(tmp_path, [cfg], f"{path}: example 3 is ", f"is {CONTEXT} positions")
    assert gpt2_folder in line


@pytest.mark.parametrize("part", ["train", "val"])
def test_text_spelling_a_special_token_stops_the_run_before_the_model(tmp_path, gpt2_folder, chain_data, part):
    """'<|endoftext|>' in a step is GPT-2's EOS to its tokenizer: the model would learn to stop there."""
    examples = load_data_file(chain_data[part])
    examples[2]["steps"][1] += " <|endoftext|>"
    path = write_json(tmp_path / f"{part}_eos.json", examples)
    cfg = config_file(tmp_path, gpt2_folder, chain_data, **{f"{part}_path": path})
    assert_fails(tmp_path, [cfg], f"{path}: example 2: 'steps' contains <|endoftext|>, one of the tokenizer's")


def test_an_evaluation_prompt_needs_room_for_max_new_tokens(tmp_path, gpt2_folder, chain_data):
    tokenizer, _ = build_tokenizer(gpt2_folder)
    question = "Tom is a wumpus."
    while len(tokenizer.encode(question + "\n")) < CONTEXT - 40:
        question += " Every wumpus is a yumpus."
    examples = load_data_file(chain_data["val"]) + [{"question": question, "steps": [], "answer": "x"}]
    path = write_json(tmp_path / "val.json", examples)
    # it fits with 16 new tokens; only_eval (no training sequence to check) with 64 it does not
    cfg = config_file(tmp_path, gpt2_folder, chain_data, val_path=path, max_new_tokens=64, only_eval=True,
                      load_model_path=chain_data["val"])  # any existing file: the context check comes first
    assert_fails(tmp_path, [cfg], f"{path}: example {len(examples) - 1} has an evaluation prompt of",
                 "max_new_tokens 64", "lower max_new_tokens")


STAGED_CASES = {  # name -> (config keys, the stages the run trains at: one epoch each)
    "coconut": (dict(coconut=True, c_thought=2, max_latent_stage=2, num_epochs=4), [0, 1, 2, 3]),
    "coconut_unpadded_uniform": (dict(coconut=True, c_thought=3, max_latent_stage=3, num_epochs=2, uniform_prob=0.5),
                                 [0, 1]),
    "coconut_padded_past_the_last_stage": (dict(coconut=True, c_thought=4, max_latent_stage=1, num_epochs=3,
                                                pad_latent_to_max=True, resume=1), [1, 2]),
    "pause_as_thought": (dict(pause_as_thought=True, c_thought=1, max_latent_stage=3, num_epochs=4), [0, 1, 2, 3]),
    "no_cot": (dict(no_cot=True, c_thought=1, max_latent_stage=1, num_epochs=1), [0]),
    "no_thoughts": (dict(no_thoughts=True, c_thought=1, max_latent_stage=2, num_epochs=3), [0, 1, 2]),
}


@pytest.mark.parametrize("case", list(STAGED_CASES))
def test_counted_lengths_are_the_staged_data_lengths(case, gpt2_folder, chain_data):
    """The reference: the data sets the trainer builds (dataset.py), every stage and every
    uniform draw it can make; the counted longest sequence and prompt equal theirs."""
    keys, stages = STAGED_CASES[case]
    config = Config.from_dict(dict(train_path=chain_data["train"], val_path=chain_data["val"], **keys))
    assert preflight.run_stages(config) == stages
    tokenizer, tokens = build_tokenizer(gpt2_folder)
    layout = PromptLayout.for_config(config, tokens)
    examples = load_data_file(chain_data["train"])
    base = get_dataset(chain_data["train"], tokenizer, examples=examples)
    longest = [0] * len(examples)
    draws = range(40) if config.uniform_prob else [0]  # many epochs: every uniform draw is seen
    staging = Staging(layout, config.uniform_prob, drop_steps=not config.method.keeps_steps, seed=0)
    for stage in stages:
        for epoch in draws:
            for row in training_dataset(base, staging, stage, epoch):
                longest[row["idx"]] = max(longest[row["idx"]], len(row["input_ids"]))
    prompts = [0] * len(examples)
    for stage in stages:
        for row in question_dataset(base, layout, stage):
            prompts[row["idx"]] = max(prompts[row["idx"]], len(row["input_ids"]))

    counted = preflight.piece_lengths(tokenizer, examples)
    assert [preflight.longest_training(config, layout, p, stages)[0] for p in counted] == longest
    assert [preflight.longest_prompt(layout, p, stages)[0] for p in counted] == prompts


def test_the_byte_bound_passes_over_no_example_that_does_not_fit(gpt2_folder, tmp_path):
    """Only examples the byte-count bound cannot clear are tokenized: it must flag every
    example the exact count finds too long, at any context (non-ASCII text included)."""
    config = Config.from_dict(dict(coconut=True, train_path="t", val_path="v", c_thought=2, max_latent_stage=2,
                                   num_epochs=3, uniform_prob=0.3, max_new_tokens=8))
    tokenizer, tokens = build_tokenizer(gpt2_folder)
    assert preflight.byte_bound_holds(tokenizer)
    layout = PromptLayout.for_config(config, tokens)
    examples = load_data_file(write_examples(tmp_path / "d.json", 200, seed=3, steps=(0, 1, 2, 3)))
    for k, ex in enumerate(examples[::7]):
        ex["question"] += " ünïcödé 中文 ✓" * k
    rng = __import__("random").Random(0)
    for ex in examples[1::5]:  # characters the tokenizer never merged: about one token per byte
        ex["question"], ex["answer"] = "".join(rng.choices("~^|`@$", k=rng.randint(1, 30))), "~"
        ex["steps"] = ["".join(rng.choices("~^|`@$", k=rng.randint(0, 9))) for _ in ex["steps"]]
    exact = preflight.piece_lengths(tokenizer, examples)
    stages = preflight.run_stages(config)
    specials = len(tokenizer.encode("", add_special_tokens=True))
    both = False
    for context in range(10, 200, 3):
        flagged = set(preflight.may_not_fit(config, layout, examples, context, True, specials))
        too_long = {i for i, p in enumerate(exact) if preflight.misfit(config, layout, p, stages, context, True)}
        assert too_long <= flagged, context
        both |= bool(too_long) and len(flagged) < len(examples)
    assert both  # the premise: some context has examples too long and examples cleared unread


# ------------------------------------------------------------------ the model
def test_model_id_an_empty_folder(tmp_path, gpt2_folder, chain_data):
    empty = tmp_path / "empty_model"
    empty.mkdir()
    cfg = config_file(tmp_path, gpt2_folder, chain_data, model_id=str(empty))
    assert_fails(tmp_path, [cfg], f"model_id {empty}: the folder holds no config.json")


def _tokenizer_variant(tmp_path, gpt2_folder, name, edit_config=None, edit_tokenizer=None, keep_tokenizer=True):
    """A copy of gpt2_folder whose tokenizer files are edited (or left out)."""
    folder = tmp_path / name
    folder.mkdir()
    shutil.copy(os.path.join(gpt2_folder, "config.json"), folder)
    if keep_tokenizer:
        for file, edit in (("tokenizer_config.json", edit_config), ("tokenizer.json", edit_tokenizer)):
            content = json.loads(open(os.path.join(gpt2_folder, file)).read())
            (folder / file).write_text(json.dumps(edit(content) if edit else content))
    return str(folder)


def test_a_model_folder_without_tokenizer_files_stops_the_run(tmp_path, gpt2_folder, chain_data):
    """transformers loads it as an empty tokenizer, which would train on empty token lists."""
    folder = _tokenizer_variant(tmp_path, gpt2_folder, "no_tokenizer", keep_tokenizer=False)
    cfg = config_file(tmp_path, gpt2_folder, chain_data, model_id=folder)
    assert_fails(tmp_path, [cfg], f"model_id {folder}: the tokenizer turns text into no tokens")


def test_a_tokenizer_without_eos_stops_the_run(tmp_path, gpt2_folder, chain_data):
    def drop_eos(config):
        return {key: value for key, value in config.items() if key != "eos_token"}

    folder = _tokenizer_variant(tmp_path, gpt2_folder, "no_eos", edit_config=drop_eos)
    cfg = config_file(tmp_path, gpt2_folder, chain_data, model_id=folder)
    assert_fails(tmp_path, [cfg], f"model_id {folder}: the tokenizer has no EOS token")


def test_pieces_the_tokenizer_splices_inconsistently_stop_the_run_before_the_model(tmp_path, gpt2_folder, chain_data):
    """A tokenizer that appends a special token to every text (as BERT's [SEP]) puts it
    mid-sequence when the pieces are spliced: refused in the pre-flight checks."""
    def append_eos(tokenizer):
        eos = {"id": "<|endoftext|>", "type_id": 0}
        tokenizer["post_processor"] = {
            "type": "TemplateProcessing", "single": [{"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": eos}],
            "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 0}}],
            "special_tokens": {"<|endoftext|>": {"id": "<|endoftext|>", "ids": [0], "tokens": ["<|endoftext|>"]}}}
        return tokenizer

    folder = _tokenizer_variant(tmp_path, gpt2_folder, "sep", edit_tokenizer=append_eos)
    cfg = config_file(tmp_path, gpt2_folder, chain_data, model_id=folder)
    assert_fails(tmp_path, [cfg], f"{chain_data['train']}: example 0: the tokenizer does not tokenize the pieces")


def _with_unresized_pad_token(tmp_path, gpt2_folder, content="<pad>", special=True, pad=True):
    """gpt2_folder whose embeddings have a row per token of its tokenizer's vocabulary
    and a token added after the last one: by default a pad token (as a fine-tune that
    added one without resizing the embeddings)."""
    rows = []

    def add_token(tokenizer):
        rows.append(len(tokenizer["model"]["vocab"]))
        tokenizer["added_tokens"].append({"id": rows[0], "content": content, "single_word": False, "lstrip": False,
                                          "rstrip": False, "normalized": False, "special": special})
        return tokenizer

    name = f"past_rows_{special}_{pad}"
    folder = _tokenizer_variant(tmp_path, gpt2_folder, name, edit_tokenizer=add_token,
                                edit_config=lambda config: {**config, "pad_token": content} if pad else config)
    model_config = json.loads(open(os.path.join(folder, "config.json")).read())
    write_json(tmp_path / name / "config.json", {**model_config, "vocab_size": rows[0]})
    return folder


@pytest.mark.parametrize("special, refused", [(True, False), (False, True)])
def test_only_tokens_text_can_produce_must_index_the_embeddings(tmp_path, gpt2_folder, chain_data, special, refused):
    """A special token no data uses (Gemma 3's image token, past its text model's rows) is
    no reason to refuse a cot run; an ordinary added token, which text can produce, is."""
    folder = _with_unresized_pad_token(tmp_path, gpt2_folder, content="<image_soft_token>", special=special, pad=False)
    config = Config.from_dict(dict(train_path="t", val_path="v", model_id=folder, cot=True))
    tokenizer, tokens = build_tokenizer(folder)
    rows = preflight.check_checkpoint_fits(config, preflight.resolve_model("model_id", folder), tokenizer, tokens,
                                           None, None)
    assert tokenizer.convert_tokens_to_ids("<image_soft_token>") == rows  # the premise: past the last row
    if refused:
        with pytest.raises(preflight.UserError, match="ids up to .* \\('<image_soft_token>'\\)"):
            preflight.check_vocabulary(config, tokenizer, tokens, rows, "model_id")
    else:
        preflight.check_vocabulary(config, tokenizer, tokens, rows, "model_id")


def test_a_tokenizer_with_ids_past_the_embeddings_stops_a_run_that_adds_no_rows(tmp_path, gpt2_folder, chain_data,
                                                                                monkeypatch):
    """A cot run pads with the pad token, past the embeddings' last row: refused before the
    model is built. The premise: the run fails in training without the check."""
    folder = _with_unresized_pad_token(tmp_path, gpt2_folder)
    tokenizer, _ = build_tokenizer(folder)
    rows = json.loads(open(os.path.join(folder, "config.json")).read())["vocab_size"]
    assert tokenizer.pad_token_id == rows
    cfg = config_file(tmp_path, gpt2_folder, chain_data, model_id=folder, coconut=False, cot=True)
    assert_fails(tmp_path, [cfg], f"model_id {folder}: its tokenizer gives token ids up to {rows} ('<pad>')",
                 f"input embeddings have {rows} rows, and a cot run adds none")
    monkeypatch.setattr(preflight, "check_vocabulary", lambda *args: None)
    with pytest.raises(IndexError, match="index out of range"):
        run_in_process(cfg)


def test_a_run_that_adds_rows_takes_a_tokenizer_with_ids_past_the_embeddings(tmp_path, gpt2_folder, chain_data):
    """coconut resizes the embeddings to the tokenizer: the same tokenizer passes the check."""
    folder = _with_unresized_pad_token(tmp_path, gpt2_folder)
    config = Config.from_dict(dict(train_path="t", val_path="v", model_id=folder, coconut=True))
    tokenizer, tokens = build_tokenizer(folder)
    hf_config = preflight.resolve_model("model_id", folder)
    rows = preflight.check_checkpoint_fits(config, hf_config, tokenizer, tokens, None, None)
    assert rows == len(tokenizer) == hf_config.vocab_size + 4  # <pad> and the three latent tokens
    preflight.check_vocabulary(config, tokenizer, tokens, rows, "model_id")
    assert build_model(config, None, None, silent).base_causallm.get_input_embeddings().weight.shape[0] == rows


def test_a_model_that_is_no_causal_lm_stops_the_run(tmp_path, gpt2_folder, chain_data):
    """A vision-language (or encoder-decoder) config: transformers has no causal-LM class
    for it, which the meta-device build meets first."""
    from transformers import T5Config

    folder = _tokenizer_variant(tmp_path, gpt2_folder, "t5")
    T5Config(vocab_size=400, d_model=16, num_layers=1, num_heads=2, d_kv=8, d_ff=32).save_pretrained(folder)
    cfg = config_file(tmp_path, gpt2_folder, chain_data, model_id=folder)
    assert_fails(tmp_path, [cfg], f"model_id {folder}: transformers builds no causal language model from its "
                                  "config (t5): Coconut needs a decoder-only causal LM")


@pytest.mark.parametrize("over, needs", [(dict(activation_checkpointing=True), "activation_checkpointing needs"),
                                         (dict(), None)])
def test_a_model_that_names_no_transformer_blocks_stops_a_run_that_needs_them(tmp_path, gpt2_folder, chain_data,
                                                                               over, needs):
    """BioGPT (as openai-gpt, CTRL, ...) has no _no_split_modules: activation checkpointing,
    FSDP and compiled blocks cannot find its blocks; a plain run trains it."""
    import shutil

    from transformers import AutoConfig, BioGptConfig

    folder = tmp_path / "biogpt"
    shutil.copytree(gpt2_folder, folder)
    vocab = AutoConfig.from_pretrained(gpt2_folder).vocab_size
    BioGptConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                 max_position_embeddings=512, bos_token_id=0, eos_token_id=0, pad_token_id=0).save_pretrained(folder)
    cfg = config_file(tmp_path, gpt2_folder, chain_data, model_id=str(folder), **over)
    if needs:
        assert_fails(tmp_path, [cfg], f"model_id {folder}: BioGptForCausalLM names no transformer blocks "
                                      f"(_no_split_modules), which {needs}")
    else:
        rc, out, err = run_in_process(write_cfg(tmp_path / "plain.yaml", {**yaml.safe_load(open(cfg)), "debug": True,
                                                                           "num_epochs": 1, "max_new_tokens": 2}))
        assert rc == 0, err[-3000:]


def test_a_mamba_model_stops_the_run_before_it_trains_an_epoch(tmp_path, gpt2_folder, chain_data):
    """Mamba (v1) trains without a cache but fails in every pass on one (validation,
    generation): refused at once, and by Coconut itself."""
    import shutil

    from transformers import AutoConfig, MambaConfig, MambaForCausalLM

    from coconut import Coconut

    folder = tmp_path / "mamba"
    shutil.copytree(gpt2_folder, folder)
    vocab = AutoConfig.from_pretrained(gpt2_folder).vocab_size
    config = MambaConfig(vocab_size=vocab, hidden_size=32, state_size=8, num_hidden_layers=1, bos_token_id=0,
                         eos_token_id=0, pad_token_id=0)
    config.save_pretrained(folder)
    cfg = config_file(tmp_path, gpt2_folder, chain_data, model_id=str(folder))
    assert_fails(tmp_path, [cfg], f"model_id {folder}: Mamba models are not supported")
    with pytest.raises(ValueError, match="Mamba models are not supported"):
        Coconut(MambaForCausalLM(config), 1, 2, 3, 0)


@pytest.mark.parametrize("kind, expected", [
    ("string_width", "the model's config does not load"),  # "n_embd": "128": transformers' strict check
    ("negative_depth", "the gpt2 model its config describes does not work"),  # builds, then no pass runs
    ("bert", "bert is an encoder (bidirectional attention, is_decoder False)"),  # failed after the build
    ("bert-generation", "bert-generation is an encoder (bidirectional attention, is_decoder False)"),
    ("damaged_weights", "its weights file model.safetensors is damaged (Error while deserializing header"),
    ("lfs_pointer_bin", "its weights file pytorch_model.bin is a Git LFS pointer, not the weights"),
    ("lfs_pointer_safetensors", "its weights file model.safetensors is a Git LFS pointer, not the weights"),
    ("text_bin", "its weights file pytorch_model.bin is not a PyTorch weights file"),
    ("lfs_pointer_bin_beside_safetensors", "its weights file model.safetensors is damaged"),
])
def test_a_model_folder_that_cannot_train_is_one_line_before_the_build(tmp_path, gpt2_folder, chain_data, kind,
                                                                         expected):
    """Each gave a traceback, or failed only after the model was built (a BERT config
    ended in a head-mismatch error about something else)."""
    import shutil

    from transformers import BertConfig, BertGenerationConfig

    folder = tmp_path / kind
    shutil.copytree(gpt2_folder, folder)
    settings = json.loads((folder / "config.json").read_text())
    if kind == "string_width":
        settings["n_embd"] = "128"
    elif kind == "negative_depth":
        settings["n_layer"] = -1
    elif kind in ("bert", "bert-generation"):
        encoder = BertConfig if kind == "bert" else BertGenerationConfig
        settings = encoder(vocab_size=settings["vocab_size"], hidden_size=32, num_hidden_layers=1,
                           num_attention_heads=2, intermediate_size=64).to_dict()
    elif kind == "damaged_weights":
        (folder / "model.safetensors").write_bytes(b"a copy cut short")
    elif kind == "lfs_pointer_bin_beside_safetensors":  # the .bin is not loaded: only the safetensors file counts
        (folder / "pytorch_model.bin").write_text("version https://git-lfs.github.com/spec/v1\n")
        (folder / "model.safetensors").write_bytes(b"a copy cut short")
    elif kind.startswith("lfs_pointer"):  # a clone without git lfs: the weights' pointer files
        name = "pytorch_model.bin" if kind.endswith("bin") else "model.safetensors"
        (folder / name).write_text("version https://git-lfs.github.com/spec/v1\noid sha256:4d7a\nsize 548105171\n")
    else:
        (folder / "pytorch_model.bin").write_text("<html>a download's error page</html>")
    (folder / "config.json").write_text(json.dumps(settings))
    cfg = config_file(tmp_path, gpt2_folder, chain_data, model_id=str(folder))
    assert_fails(tmp_path, [cfg], f"model_id {folder}: {expected}")


def test_files_beside_the_weights_that_transformers_does_not_load_are_not_judged(tmp_path):
    """training_args.bin, optimizer.pt and the like sit in many model folders (and may be
    Git LFS pointers left unpulled): only the weights transformers loads are checked, the
    safetensors files, else pytorch_model*.bin."""
    from safetensors.torch import save_file

    from preflight import check_weight_files

    pointer = "version https://git-lfs.github.com/spec/v1\noid sha256:4d7a\nsize 5481\n"
    with_safetensors, with_bin = tmp_path / "safetensors", tmp_path / "bin"
    for folder in (with_safetensors, with_bin):
        folder.mkdir()
        (folder / "training_args.bin").write_text(pointer)
        (folder / "optimizer.pt").write_text("not torch's")
    save_file({"w": torch.zeros(2)}, with_safetensors / "model.safetensors")
    (with_safetensors / "pytorch_model.bin").write_text(pointer)  # not loaded: the safetensors file is
    torch.save({"w": torch.zeros(2)}, with_bin / "pytorch_model-00001-of-00001.bin")
    for folder in (with_safetensors, with_bin):
        check_weight_files("model_id", str(folder))  # no UserError


def test_a_causal_lm_config_transformers_cannot_build_is_named_as_such(tmp_path, llama_folder, chain_data):
    """A rope type this transformers does not know: not "no causal LM", but what failed."""
    import shutil

    folder = tmp_path / "new_rope"
    shutil.copytree(llama_folder, folder)
    model_config = json.loads((folder / "config.json").read_text())
    write_json(folder / "config.json", {**model_config, "rope_scaling": {"rope_type": "longrope2", "factor": 2.0}})
    cfg = config_file(tmp_path, llama_folder, chain_data, model_id=str(folder))
    assert_fails(tmp_path, [cfg], f"model_id {folder}: transformers cannot build the llama model its config "
                                  "describes (KeyError: 'longrope2')")


@pytest.mark.parametrize("rank, local_rank, reported", [("0", "0", True), ("1", "1", False), ("2", "0", True)])
def test_the_first_process_of_each_node_reports_a_user_error(monkeypatch, capsys, tmp_path, rank, local_rank,
                                                             reported):
    """A file missing on one node is met by that node's processes alone: its first one says
    so. Every process writes the line into its torchrun error file: the one torchrun's
    report names as the root cause is whichever exited first."""
    from cli import UserError, fail

    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("LOCAL_RANK", local_rank)
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(tmp_path / "error.json"))
    assert fail(UserError("train_path t.json: no such file")) == 2
    assert capsys.readouterr().err == ("error: train_path t.json: no such file\n" if reported else "")
    record = json.loads((tmp_path / "error.json").read_text())
    assert record["message"]["message"] == "error: train_path t.json: no such file"


@pytest.mark.parametrize("local_rank, gpus, refused", [("1", 2, False), ("2", 2, True), ("0", 1, False)])
def test_more_processes_than_visible_gpus_is_one_line(monkeypatch, local_rank, gpus, refused):
    """torchrun --nproc_per_node 4 on a node with 2 visible GPUs: processes 2 and 3 say so
    (the GPUs are stood in for: this machine has none)."""
    monkeypatch.setenv("LOCAL_RANK", local_rank)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    if not refused:
        preflight.check_device()
        return
    with pytest.raises(preflight.UserError) as error:
        preflight.check_device()
    assert str(error.value) == (f"this process is LOCAL_RANK {local_rank} but the node has {gpus} visible GPU(s): "
                                "start at most that many processes per node (torchrun --nproc_per_node)")


@pytest.mark.parametrize("name", ["./models/nope", "models/nope", "/nowhere/model"])
def test_model_id_a_path_that_does_not_exist(tmp_path, gpt2_folder, chain_data, name, monkeypatch):
    monkeypatch.chdir(REPO)  # where models/ exists: `models/nope` is a path, not a hub id
    cfg = config_file(tmp_path, gpt2_folder, chain_data, model_id=name)
    assert_fails(tmp_path, [cfg], f"model_id {name}: no such folder")


@pytest.mark.parametrize("how", ["HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "unreachable"])
def test_a_hub_id_fails_at_once_when_the_hub_is_offline(tmp_path, gpt2_folder, chain_data, how, monkeypatch):
    for variable in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HTTPS_PROXY", "https_proxy"):
        monkeypatch.delenv(variable, raising=False)
    if how == "unreachable":
        with __import__("socket").socket() as s:  # a port nothing listens on: refused at once
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    else:
        monkeypatch.setenv(how, "1")
    name = "someone/not-cached-model"
    cfg = config_file(tmp_path, gpt2_folder, chain_data, model_id=name)
    began = time.monotonic()
    line = assert_fails(tmp_path, [cfg], f"model_id {name}: not a local folder", "not in the local Hugging Face cache")
    assert (f"{how}=1 is set" if how != "unreachable" else "cannot be reached") in line
    assert time.monotonic() - began < 30  # not a minute of retries (most of this is importing)


def test_a_cached_hub_id_loads_from_the_cache_when_the_hub_cannot_be_reached(tmp_path, gpt2_folder, chain_data,
                                                                            monkeypatch):
    """No offline setting, the hub unreachable, the model cached: one line says so and the
    run loads the cached copy at once (transformers alone retries every optional file for
    minutes); a cached config without weights is not a cached model."""
    import shutil

    from huggingface_hub import constants
    from transformers import AutoConfig, AutoModelForCausalLM

    for variable in ("TRANSFORMERS_OFFLINE", "HTTPS_PROXY", "https_proxy"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # restored after the test, which sets it
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with __import__("socket").socket() as s:  # a port nothing listens on: refused at once
        s.bind(("127.0.0.1", 0))
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{s.getsockname()[1]}")
    revision = "0" * 40
    for name, with_weights in (("someone/cached-config", False), ("someone/cached-model", True)):
        repo = tmp_path / "hub" / f"models--{name.replace('/', '--')}"
        (repo / "refs").mkdir(parents=True)
        (repo / "refs" / "main").write_text(revision)
        shutil.copytree(gpt2_folder, repo / "snapshots" / revision)
        if with_weights:
            AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(gpt2_folder)).save_pretrained(
                repo / "snapshots" / revision)
    cfg = config_file(tmp_path, gpt2_folder, chain_data, model_id="someone/cached-config")
    assert_fails(tmp_path, [cfg], "model_id someone/cached-config: not a local folder", "cannot be reached")
    cfg = config_file(tmp_path, gpt2_folder, chain_data, model_id="someone/cached-model", num_epochs=1, debug=True,
                      max_new_tokens=2)
    began = time.monotonic()
    rc, out, err = run_in_process(cfg)
    assert rc == 0, err[-3000:]
    assert "model_id someone/cached-model: the hub (127.0.0.1:" in out and "using its copy in the local" in out
    assert time.monotonic() - began < 60


def _state_of(folder, **method):
    config = Config.from_dict(dict(train_path="t", val_path="v", model_id=folder, **method))
    torch.manual_seed(0)
    return build_model(config, None, None, silent).model.state_dict()


LOADS = [  # (method of the checkpoint, method of the run)
    ({"coconut": True}, {"coconut": True}), ({"cot": True}, {"coconut": True}),
    ({"pause_as_thought": True}, {"coconut": True}), ({"cot": True}, {"cot": True}),
    ({"pause_as_thought": True}, {"pause_as_thought": True}), ({"coconut": True}, {"cot": True}),
    ({"no_thoughts": True}, {"pause_as_thought": True}),
]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])  # tied and untied output heads
@pytest.mark.parametrize("saved, run", LOADS)
@pytest.mark.parametrize("damage", [None, "shape", "missing", "extra"])
def test_checkpoint_check_on_the_meta_device_agrees_with_loading(tmp_path, request, arch, saved, run, damage):
    """The reference is modeling.build_model itself: the pre-flight refuses exactly the
    checkpoints it refuses, with the same line, without loading the weights."""
    folder = request.getfixturevalue(f"{arch}_folder")
    state = _state_of(folder, **saved)
    key = sorted(k for k in state if k.endswith(("mlp.c_fc.weight", "mlp.up_proj.weight")))[0]
    if damage == "shape":
        state[key] = torch.zeros(3, 3)
    elif damage == "missing":
        del state[key]
    elif damage == "extra":
        state["extra.weight"] = torch.zeros(2)
    path = str(tmp_path / "checkpoint_1")
    torch.save(state, path)
    config = Config.from_dict(dict(train_path="t", val_path="v", model_id=folder, **run))
    tokenizer, tokens = build_tokenizer(folder)
    hf_config = preflight.resolve_model("model_id", folder)
    mapped = checkpoint.load_model_state(path)

    def outcome(call):
        try:
            call()
        except ModelLoadError as e:
            return str(e)
        return None

    expected = outcome(lambda: build_model(config, checkpoint.load_model_state(path), path, silent))
    found = outcome(lambda: preflight.check_checkpoint_fits(config, hf_config, tokenizer, tokens, mapped, path))
    assert found == expected
    # the premise: the reference refuses exactly the damaged files and coconut weights in a plain run
    assert (expected is None) == (damage is None and not (saved == {"coconut": True} and run != saved))


def test_a_checkpoint_of_another_model_stops_the_run(tmp_path, gpt2_folder, chain_data):
    state = _state_of(gpt2_folder, cot=True)
    state["transformer.wpe.weight"] = torch.zeros(1024, 64)  # another context size
    bad = str(tmp_path / "other.pt")
    torch.save(state, bad)
    cfg = config_file(tmp_path, gpt2_folder, chain_data, load_model_path=bad, resume=1)
    assert_fails(tmp_path, [cfg], f"{bad}: transformer.wpe.weight has shape (1024, 64) in the checkpoint")


def test_a_run_folder_of_another_model_stops_the_run(tmp_path, gpt2_folder, chain_data):
    state = _state_of(gpt2_folder, coconut=True)
    state["base_causallm.transformer.wpe.weight"] = torch.zeros(1024, 64)
    save_dir = tmp_path / "ckpt" / "run"
    checkpoint.save_checkpoint(str(save_dir), 1, state)
    rc, out, err = run_in_process(config_file(tmp_path, gpt2_folder, chain_data))
    assert rc == 2 and err.strip().splitlines() == [
        f"error: {save_dir}/checkpoint_1: base_causallm.transformer.wpe.weight has shape (1024, 64) in the "
        "checkpoint but (512, 64) in this model (a checkpoint of another model?)"], err
    assert sorted(os.listdir(save_dir)) == ["checkpoint_1"]  # no lock taken, nothing written


def test_load_model_path_must_exist_unless_the_run_resumes_its_own_folder(tmp_path, gpt2_folder, chain_data):
    """A preempted run that started from load_model_path resumes its own checkpoints
    (SPEC: they win over resume and load_model_path), even once that file is gone."""
    missing = str(tmp_path / "gone" / "checkpoint_22")
    cfg = config_file(tmp_path, gpt2_folder, chain_data, load_model_path=missing, resume=1, num_epochs=2)
    assert_fails(tmp_path, [cfg], f"load_model_path {missing}: no such file")
    save_dir = tmp_path / "ckpt" / "run"
    checkpoint.save_checkpoint(str(save_dir), 2, _state_of(gpt2_folder, coconut=True))
    rc, out, err = run_in_process(cfg)
    assert rc == 0 and "this run is finished" in out, err[-2000:]


@pytest.mark.parametrize("key", ["load_model_path", "train_path", "val_path"])
def test_a_folder_where_a_file_belongs_is_named_as_a_folder(tmp_path, gpt2_folder, chain_data, key):
    """An export.py folder as load_model_path, a data folder as a data file: not "no such file"."""
    cfg = config_file(tmp_path, gpt2_folder, chain_data, **{key: gpt2_folder})
    if key == "load_model_path":
        assert_fails(tmp_path, [cfg], f"load_model_path {gpt2_folder}: is a folder; it names a checkpoint_N file "
                                      "(an exported model folder goes in model_id)")
        cfg = config_file(tmp_path, gpt2_folder, chain_data, **{key: os.devnull})
        assert_fails(tmp_path, [cfg], f"load_model_path {os.devnull}: is not a regular file")
    else:
        assert_fails(tmp_path, [cfg], f"key '{key}' names a folder, not a data file: {gpt2_folder}")
        cfg = config_file(tmp_path, gpt2_folder, chain_data, **{key: os.devnull})  # exists, but no file: not "no such"
        assert_fails(tmp_path, [cfg], f"key '{key}' names something that is not a regular file: {os.devnull}")


def test_a_file_that_is_no_checkpoint_stops_the_run(tmp_path, gpt2_folder, chain_data):
    cfg = config_file(tmp_path, gpt2_folder, chain_data, load_model_path=chain_data["val"])
    assert_fails(tmp_path, [cfg], f"checkpoint {chain_data['val']}: is not a PyTorch checkpoint")


def test_the_note_says_where_the_weights_come_from(gpt2_folder):
    """No "from scratch" when a checkpoint supplies the weights (DESIGN §5)."""
    lines = []
    config = Config.from_dict(dict(train_path="t", val_path="v", model_id=gpt2_folder, cot=True))
    build_model(config, _state_of(gpt2_folder, cot=True), "ckpt/checkpoint_3", lines.append)
    assert lines == [f"no weights in {gpt2_folder}: building gpt2 from its config; the weights come from ckpt/checkpoint_3"]
    build_model(config, None, None, lines.append)
    assert lines[-1] == f"no weights in {gpt2_folder}: training gpt2 from scratch"


# ------------------------------------------------------------------ keys and folders
def test_save_path_that_cannot_be_written(tmp_path, gpt2_folder, chain_data):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    keys = keys_for(gpt2_folder, chain_data, blocker, "run", coconut=True)
    rc, out, err = run_in_process(write_cfg(tmp_path / "cfg.yaml", keys))
    assert rc == 2 and err.strip().splitlines() == [
        f"error: save_path {blocker}: cannot write checkpoints into {blocker}/run (Not a directory)"], err
    assert "Running on one process" not in out


@pytest.mark.parametrize("over, expected", [
    (dict(only_eval=True), "only_eval is True but load_model_path is None and model_id MODEL holds no weights"),
    (dict(only_eval=True, load_model_path="LOAD", resume=2, num_epochs=2),
     "resume is 2 but num_epochs is 2: no epoch left to evaluate"),
    (dict(resume=3, num_epochs=3), "resume is 3 but num_epochs is 3: no epoch left to train"),
])
def test_runs_with_nothing_to_do(tmp_path, gpt2_folder, chain_data, over, expected):
    over = {k: (chain_data["val"] if v == "LOAD" else v) for k, v in over.items()}
    assert_fails(tmp_path, [config_file(tmp_path, gpt2_folder, chain_data, **over)],
                 expected.replace("MODEL", gpt2_folder))


def test_a_finished_run_says_so_and_trains_nothing(tmp_path, gpt2_folder, chain_data):
    cfg = config_file(tmp_path, gpt2_folder, chain_data, num_epochs=1, save_only_improve=False)
    rc, out, err = run_in_process(cfg)
    assert rc == 0, err[-2000:]
    save_dir = tmp_path / "ckpt" / "run"
    files = {p.name: p.stat().st_mtime_ns for p in save_dir.iterdir() if p.name != ".run.lock"}
    leftover = save_dir / ".config.yaml.tmp-7-ab"  # a stop during the last save: tidied (under the run's lock)
    leftover.write_text("half")
    rc, out, err = run_in_process(cfg)
    assert rc == 0, err[-2000:]
    assert not leftover.exists()
    # the published first line: the config (every key's value here), then the verdict
    assert out.splitlines()[0] == f"Config: {load_config(cfg).to_dict()}" and "'num_epochs': 1," in out
    assert out.splitlines()[1:] == [
        f"run folder {save_dir} already holds checkpoint_1 and num_epochs is 1: this run is finished, nothing to "
        f"train. To evaluate it: only_eval=True load_model_path={save_dir}/checkpoint_1 resume=0; to train on: a "
        "larger num_epochs; to start again: another name"], out
    assert "Training Epoch" not in err
    assert {p.name: p.stat().st_mtime_ns for p in save_dir.iterdir() if p.name != ".run.lock"} == files


def test_save_only_improve_says_when_it_skips_a_save(tmp_path, gpt2_folder, chain_data):
    # one new token cannot write an answer: accuracy stays 0, never above the best (0)
    cfg = config_file(tmp_path, gpt2_folder, chain_data, num_epochs=1, save_only_improve=True, max_new_tokens=1)
    rc, out, err = run_in_process(cfg)
    assert rc == 0, err[-2000:]
    # which the pre-flight says: no answer fits one token (the shortest is `### ` + 3 tokens)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gpt2_folder)
    answers = [len(tokenizer.encode("### " + ex["answer"], add_special_tokens=False))
               for ex in json.load(open(chain_data["val"]))]
    assert min(answers) > 1 and (
        f"warning: max_new_tokens 1 is fewer than the tokens of '### ' + answer in 12 of 12 validation examples "
        f"(up to {max(answers)}; the first: example 0): their answers can never be counted correct") in out
    assert "Accuracy on validation set: 0 / 12 = 0.0" in out
    assert "save_only_improve: not saving checkpoint_1, its accuracy 0.0 does not beat the best so far (0.0)" in out
    save_dir = tmp_path / "ckpt" / "run"
    assert checkpoint.list_checkpoints(save_dir) == []
    # launched again, it knows it is finished though it saved nothing
    rc, out, err = run_in_process(cfg)
    assert rc == 0 and out.splitlines()[1].startswith("warning: max_new_tokens 1") and out.splitlines()[2:] == [
        f"run folder {save_dir} has trained all 1 epochs (num_epochs) and holds no checkpoint (its last epoch's "
        f"weights: {save_dir}/.latest/checkpoint_1): save_only_improve saved none, no epoch's validation accuracy beat 0. This run is finished, nothing to train; to train on: a "
        "larger num_epochs; to start again: another name"], (out, err[-2000:])


def test_a_finished_run_in_a_folder_it_cannot_lock_still_says_so_and_exits_0(tmp_path, gpt2_folder, chain_data,
                                                                              monkeypatch):
    """A read-only (archived) run folder: the finished line, exit 0, and one line that
    the leftovers of a stopped write stay; no lock file is made where nothing is left."""
    import runlock
    from cli import UserError

    cfg = config_file(tmp_path, gpt2_folder, chain_data, num_epochs=1, save_only_improve=False)
    assert run_in_process(cfg)[0] == 0
    save_dir = tmp_path / "ckpt" / "run"
    (save_dir / ".run.lock").unlink()
    rc, out, err = run_in_process(cfg)
    assert rc == 0 and "this run is finished" in out and not (save_dir / ".run.lock").exists(), err[-2000:]
    leftover = save_dir / ".progress.json.tmp-7-ab"
    leftover.write_text("half")

    def read_only(save_dir, warn=print):
        raise UserError(f"cannot create the lock file {save_dir}/.run.lock: Read-only file system")

    monkeypatch.setattr(runlock, "hold", read_only)
    rc, out, err = run_in_process(cfg)
    assert rc == 0 and "this run is finished" in out, (out, err[-2000:])
    assert f"warning: {save_dir}: what stopped writes left there was not removed (cannot create the lock file" in out
    assert leftover.exists()


def test_the_progress_record_names_the_newest_usable_checkpoint(tmp_path, gpt2_folder, chain_data):
    """An unusable checkpoint file newer than the rest is skipped when the run resumes, so
    the progress record must not name it, or a finished run would not be seen as one."""
    save_dir = tmp_path / "ckpt" / "run"
    save_dir.mkdir(parents=True)
    (save_dir / "checkpoint_3").write_bytes(b"half a file")  # e.g. a copy cut short
    cfg = config_file(tmp_path, gpt2_folder, chain_data, num_epochs=1, save_only_improve=True, max_new_tokens=1)
    rc, out, err = run_in_process(cfg)
    assert rc == 0 and "not saving checkpoint_1" in out, err[-2000:]
    assert checkpoint.read_progress(save_dir, None) == 1
    rc, out, err = run_in_process(cfg)
    assert rc == 0 and "This run is finished, nothing to train" in out, (out, err[-2000:])


def test_a_resumed_run_takes_the_best_accuracy_its_progress_record_holds(tmp_path, gpt2_folder, chain_data):
    """A checkpoint saved before its epoch's evaluation (save_only_improve off) leaves that
    epoch's accuracy out of its .state; the progress record, written after evaluating,
    has it, so save_only_improve turned on later compares against the true best."""
    import startup

    save_dir = tmp_path / "ckpt" / "run"
    checkpoint.save_checkpoint(str(save_dir), 2, _state_of(gpt2_folder, coconut=True), {"epoch": 2, "best_acc": 0.25})
    config = load_config(config_file(tmp_path, gpt2_folder, chain_data, num_epochs=4, save_only_improve=True))
    assert startup._find_start(config, silent).train_state["best_acc"] == 0.25  # no record
    checkpoint.write_progress(save_dir, 2, 2, 0.75)
    assert startup._find_start(config, silent).train_state["best_acc"] == 0.75
    checkpoint.write_progress(save_dir, 1, 1, 0.9)  # the record of an older checkpoint: not this one's
    assert startup._find_start(config, silent).train_state["best_acc"] == 0.25


def test_a_finished_run_whose_best_checkpoint_is_damaged_says_so_and_claims_no_accuracy(
        tmp_path, gpt2_folder, chain_data):
    """The best (checkpoint_3) cut short: checkpoint_2 is named as the newest usable one,
    not as the best, and without the best accuracy, which was checkpoint_3's (it used to
    be paired with checkpoint_2, and nothing said checkpoint_3 was skipped)."""
    save_dir = tmp_path / "ckpt" / "run"
    state = _state_of(gpt2_folder, coconut=True)
    checkpoint.save_checkpoint(str(save_dir), 2, state, {"best_acc": 0.25})
    checkpoint.save_checkpoint(str(save_dir), 3, state, {"best_acc": 0.75})
    checkpoint.save_checkpoint(checkpoint.latest_folder(save_dir), 4, state, {"best_acc": 0.75, "evaluated": True})
    checkpoint.write_progress(save_dir, 4, 3)
    damaged = save_dir / "checkpoint_3"
    damaged.write_bytes(damaged.read_bytes()[:300])
    cfg = config_file(tmp_path, gpt2_folder, chain_data, num_epochs=4, save_only_improve=True)
    rc, out, err = run_in_process(cfg)
    lines = out.splitlines()[1:]
    assert rc == 0 and len(lines) == 2, (out, err[-2000:])
    assert lines[0].startswith(f"Skipping unusable checkpoint {damaged}: does not load"), lines
    assert lines[1].startswith(f"run folder {save_dir} has trained all 4 epochs (num_epochs); its newest usable "
                               "checkpoint is checkpoint_2 (the newer ones above do not load): this run is finished")
    assert "validation accuracy" not in lines[1] and "its best" not in lines[1], lines


def test_a_save_only_improve_run_past_its_best_epoch_is_finished_or_says_what_it_trains_again(
        tmp_path, gpt2_folder, chain_data):
    """Its newest checkpoint is its best epoch, not its last: the progress record says
    how far it got (trainer writes it every epoch)."""
    save_dir = tmp_path / "ckpt" / "run"
    checkpoint.save_checkpoint(str(save_dir), 2, _state_of(gpt2_folder, coconut=True), {"best_acc": 0.75})
    checkpoint.write_progress(save_dir, 4, 2)  # epochs 3 and 4 did not beat epoch 2
    cfg = config_file(tmp_path, gpt2_folder, chain_data, num_epochs=4, save_only_improve=True)
    rc, out, err = run_in_process(cfg)
    assert rc == 0 and out.splitlines()[1:] == [
        f"run folder {save_dir} has trained all 4 epochs (num_epochs); its best, checkpoint_2 (validation accuracy "
        f"0.75), is its newest checkpoint (save_only_improve): this run is finished, nothing to train. To evaluate "
        f"it: only_eval=True load_model_path={save_dir}/checkpoint_2 resume=3; to train on: a larger num_epochs; "
        "to start again: another name"], (out, err[-2000:])
    # killed in epoch 5 of 6, a folder of an earlier version (no .latest): it resumes from
    # its best and says which epochs run again
    import startup

    lines = []
    config = load_config(config_file(tmp_path, gpt2_folder, chain_data, num_epochs=6, save_only_improve=True))
    assert startup._find_start(config, lines.append).epoch == 2
    assert lines[-1] == ("save_only_improve: this run had trained 4 epochs; it resumes from checkpoint_2, "
                         "so epochs 3 to 4 are trained again")
    # with epoch 4's state in .latest: it resumes after epoch 4, its record's best kept
    checkpoint.save_checkpoint(checkpoint.latest_folder(save_dir), 4, _state_of(gpt2_folder, coconut=True),
                               {"best_acc": 0.75})
    lines.clear()
    start = startup._find_start(config, lines.append)
    assert (start.epoch, start.newest_saved, start.model_path) == (4, 2, f"{save_dir}/.latest/checkpoint_4")
    assert not [line for line in lines if "trained again" in line]


def test_a_second_run_on_a_held_folder_names_the_holder(tmp_path, gpt2_folder, chain_data):
    cfg = config_file(tmp_path, gpt2_folder, chain_data)
    save_dir = tmp_path / "ckpt" / "run"
    save_dir.mkdir(parents=True)
    with runlock.hold(str(save_dir)):
        rc, out, err = run_in_process(cfg)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and f"run folder {save_dir} is in use by another run (pid {os.getpid()} on " in lines[0]
    assert "Running on one process" not in out
    assert os.listdir(save_dir) == [runlock.LOCK_NAME]
    with runlock.hold(str(save_dir)):  # released when the block ended
        pass


def test_clearing_a_run_folder_removes_nothing_under_a_live_run(tmp_path, capsys):
    """make demo's `python runlock.py --clear checkpoints/demo`: the folder emptied when no
    run holds it; one line and exit 2, nothing removed, when one does (rm -rf would pull
    it from under that run); a missing folder stays missing."""
    save_dir = tmp_path / "run"
    (save_dir / "checkpoint_1.state").mkdir(parents=True)
    (save_dir / "checkpoint_1").write_text("weights")
    with runlock.hold(str(save_dir)):
        assert runlock.main(["--clear", str(save_dir)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"run folder {save_dir} is in use by another run (pid {os.getpid()} on " in err
    assert sorted(os.listdir(save_dir)) == sorted([runlock.LOCK_NAME, "checkpoint_1", "checkpoint_1.state"])
    nested = save_dir / "inner"  # a live run in a run folder inside the one named: not emptied either
    nested.mkdir()
    with runlock.hold(str(nested)):
        assert runlock.main(["--clear", str(save_dir)]) == 2
    assert "is in use by another run" in capsys.readouterr().err and (save_dir / "checkpoint_1").exists()
    assert runlock.main(["--clear", str(save_dir)]) == 0
    assert os.listdir(save_dir) == [runlock.LOCK_NAME]
    assert runlock.main(["--clear", str(tmp_path / "missing")]) == 0 and not (tmp_path / "missing").exists()


def test_clearing_refuses_what_is_not_a_run_folder(tmp_path, capsys):
    """`--clear checkpoints` for `checkpoints/demo`, or a project folder: a folder no run
    has used (no lock file) keeps every file, with one line and exit 2; so does a file.
    An empty folder is a run folder not yet used."""
    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    (project / "data" / "train.json").write_text("[]")
    (project / "run").mkdir()
    with runlock.hold(str(project / "run")):
        pass  # a run folder inside: the parent is still not one
    (tmp_path / "notes.txt").write_text("notes")
    (tmp_path / "dangling").symlink_to(tmp_path / "unmounted")
    for target, says in ((project, "is not a run folder (no .run.lock"), (tmp_path / "notes.txt", "is a file"),
                         (tmp_path / "dangling", f"is a broken symbolic link (to {tmp_path / 'unmounted'})")):
        assert runlock.main(["--clear", str(target)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{target}: {says}" in err and "nothing removed" in err, err
    assert (project / "data" / "train.json").exists() and (tmp_path / "notes.txt").exists()
    (tmp_path / "empty").mkdir()
    assert runlock.main(["--clear", str(tmp_path / "empty")]) == 0


def test_a_file_system_without_locks_warns_and_goes_on(tmp_path, monkeypatch):
    import errno

    def refuse(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(runlock.fcntl, "flock", refuse)
    said = []
    with runlock.hold(str(tmp_path), warn=said.append):
        ran = True
    assert ran and said == [f"warning: {tmp_path}'s file system cannot lock files (No locks available): "
                            "nothing stops a second run from writing into this folder"]


@pytest.mark.slow
def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import runlock, sys, time\nwith runlock.hold(sys.argv[1]):\n    print('held', flush=True)\n"
         "    time.sleep(60)", str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(runlock.RunFolderBusy, match=f"pid {holder.pid} on "):
            with runlock.hold(str(tmp_path)):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with runlock.hold(str(tmp_path)):
        assert f"pid {os.getpid()} on " in (tmp_path / runlock.LOCK_NAME).read_text()


@pytest.mark.slow
def test_a_killed_holders_forked_workers_do_not_keep_its_lock(tmp_path):
    """datasets.map forks workers while the run holds its folder; killed alone (OOM, kill
    -9 of its pid), the run must not leave them holding the lock."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import os, runlock, sys, time\nwith runlock.hold(sys.argv[1]):\n"
         "    child = os.fork()\n    if child == 0:\n        time.sleep(60)\n        os._exit(0)\n"
         "    print(child, flush=True)\n    time.sleep(60)", str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    child = None
    try:
        child = int(holder.stdout.readline())
        with pytest.raises(runlock.RunFolderBusy):  # premise: the lock is held
            with runlock.hold(str(tmp_path)):
                pass
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        os.kill(child, 0)  # the orphaned worker still lives
        with runlock.hold(str(tmp_path)):
            pass
    finally:
        holder.kill()
        holder.wait()
        if child is not None:
            with __import__("contextlib").suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)


# ------------------------------------------------------------------ command-line keys
def test_command_line_keys_are_checked_like_yaml_keys(tmp_path, gpt2_folder, chain_data):
    cfg = config_file(tmp_path, gpt2_folder, chain_data)
    assert parse_overrides(["lr=1e-4", "--name", "try2", "--num-epochs=3", "load_model_path=None"]) == {
        "lr": "1e-4", "name": "try2", "num_epochs": 3, "load_model_path": "None"}
    config = load_config(cfg, parse_overrides(["lr=1e-4", "--name", "try2", "load_model_path=None"]))
    reference = dict(yaml.safe_load(open(cfg)), lr="1e-4", name="try2", load_model_path="None")
    assert config == Config.from_dict(reference)  # the same as writing them in the file
    assert config.lr == 1e-4 and config.name == "try2"
    for argv, message in [
        (["c_thougth=2"], "command line: unknown key 'c_thougth' (did you mean 'c_thought'?)"),
        (["--bf16", "yes please"], "command line: key 'bf16' must be True or False, got 'yes please'"),
        (["num_epochs=1.5"], "command line: key 'num_epochs' must be an integer, got 1.5"),
        (["lr=0"], "key 'lr' must be > 0"),
        (["lr=1", "--lr", "2"], "command line: key 'lr' is given twice"),
        (["--lr"], "command line: --lr needs a value"),
        (["--coconut", "--lr", "1e-4"], "command line: --coconut needs a value"),  # not '--lr' as its value
        (["x"], "command line: expected KEY=VALUE or --KEY VALUE"),
    ]:
        with pytest.raises(ConfigError, match=__import__("re").escape(message)):
            load_config(cfg, parse_overrides(argv))


def test_keys_before_the_config_file_are_one_line(tmp_path, gpt2_folder, chain_data, monkeypatch):
    """`run.py --lr 1e-4 cfg.yaml` took '--lr' for the config file and '1e-4' for a key."""
    monkeypatch.delenv("TORCHELASTIC_ERROR_FILE", raising=False)
    cfg = config_file(tmp_path, gpt2_folder, chain_data)
    rc, out, err = run_in_process("--lr", "1e-4", cfg)
    assert rc == 2 and err.strip().splitlines() == [
        "error: the config file comes first, got '--lr' (usage: python run.py CONFIG.yaml [KEY=VALUE | --KEY VALUE ...]"
        "   (or: torchrun --nproc_per_node N run.py CONFIG.yaml [KEY=VALUE ...]))"], err


def test_command_line_keys_reach_the_run_and_its_echo(tmp_path, gpt2_folder, chain_data):
    cfg = config_file(tmp_path, gpt2_folder, chain_data, num_epochs=2)
    rc, out, err = run_in_process(*[cfg, "num_epochs=1", "--name", "try2", "--save-only-improve", "True",
                             "max_new_tokens=1"])
    assert rc == 0, err[-2000:]
    assert out.splitlines()[1:5] == ["command line: num_epochs = 1", "command line: name = 'try2'",
                                    "command line: save_only_improve = True", "command line: max_new_tokens = 1"]
    assert "'name': 'try2'," in out.splitlines()[0]  # the Config line shows the command line's values
    assert "not saving checkpoint_1" in out and out.count("Accuracy on validation set") == 1
    assert (tmp_path / "ckpt" / "try2").is_dir() and not (tmp_path / "ckpt" / "run").exists()
    rc, out, err = run_in_process(cfg, "c_thougth=2")
    assert rc == 2 and err.strip().splitlines() == [
        "error: command line: unknown key 'c_thougth' (did you mean 'c_thought'?)"], err


# ------------------------------------------------------------------ torchrun and Ctrl-C
@pytest.mark.slow
def test_a_bad_config_under_torchrun_is_one_line_from_rank_0(tmp_path, gpt2_folder, chain_data):
    cfg = config_file(tmp_path, gpt2_folder, chain_data)
    proc = run_sub(["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
                    RUN_PY, cfg, "c_thougth=2"], timeout=120)
    ours = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert ours == ["error: command line: unknown key 'c_thougth' (did you mean 'c_thought'?)"], proc.stderr
    # torchrun's own failure report (its exit status 1) names the line, not a link
    assert "traceback : error: command line: unknown key 'c_thougth'" in proc.stderr
    assert proc.stderr.count("exitcode  : 2") >= 1 and proc.returncode != 0
    assert not (tmp_path / "ckpt").exists()


@pytest.mark.slow
def test_ctrl_c_stops_with_one_line(tmp_path, gpt2_folder, chain_data):
    cfg = config_file(tmp_path, gpt2_folder, chain_data, num_epochs=50)
    err_path = tmp_path / "err.txt"
    with open(err_path, "w") as err:
        # SIGINT as a terminal sends it (a child of a background job may inherit it ignored)
        proc = subprocess.Popen([sys.executable, RUN_PY, cfg], cwd=REPO, env=sub_env(), stdout=subprocess.DEVNULL,
                                stderr=err, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 120
        while "Training Epoch: 2" not in err_path.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, err_path.read_text()[-2000:]
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
    text = err_path.read_text()
    assert "Traceback" not in text and text.rstrip().endswith("interrupted"), text[-2000:]
    assert checkpoint.list_checkpoints(tmp_path / "ckpt" / "run")[:1] == [1]
