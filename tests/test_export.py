"""export.py and Coconut.save_pretrained / from_pretrained.

The tiny models here are shared with test_generate.py and test_probe.py (trained or
exported once per session, cached under pytest's base temporary folder).
"""

import json
import os
import shutil

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

import checkpoint
import export
from coconut import Coconut
from layout import END, LATENT, START
from modeling import build_model
from builders import silent, tiny_cot_model, write_yaml
from utils import load_config

COCONUT_KEYS = {"latent_token_id", "start_latent_id", "end_latent_id", "eos_token_id",
                "c_thought", "max_latent_stage", "pad_latent_to_max", "method", "max_new_tokens"}


@pytest.fixture(scope="module")
def tiny_cot(tmp_path_factory):
    return tiny_cot_model(tmp_path_factory)


def _built(config_path, checkpoint_path):
    state = checkpoint.load_model_state(checkpoint_path)
    return build_model(load_config(config_path), state, checkpoint_path, silent)


def _training_batch(tokenizer, val_path, latent_id, start_id, end_id, config, stage):
    from dataset import MyCollator, get_cot_latent_dataset, get_dataset

    base = get_dataset(val_path, tokenizer)
    staged = get_cot_latent_dataset(stage, base, config, start_id, latent_id, end_id)
    batch = MyCollator(tokenizer, latent_id=latent_id)([staged[i] for i in range(len(staged))])
    batch.pop("idx", None)
    return batch


# ---------------------------------------------------------------------------------


def test_export_writes_a_standard_folder(tiny):
    files = set(os.listdir(tiny.export))
    assert {"config.json", "model.safetensors", "coconut_config.json", "tokenizer.json"} <= files
    with open(os.path.join(tiny.export, "coconut_config.json")) as f:
        settings = json.load(f)
    assert set(settings) == COCONUT_KEYS
    tokenizer = AutoTokenizer.from_pretrained(tiny.export)
    ids = tokenizer.convert_tokens_to_ids([START, END, LATENT])
    assert ids == [settings["start_latent_id"], settings["end_latent_id"], settings["latent_token_id"]]
    assert settings["eos_token_id"] == tokenizer.eos_token_id
    assert (settings["c_thought"], settings["max_latent_stage"], settings["pad_latent_to_max"], settings["method"],
            settings["max_new_tokens"]) == (1, 2, True, "coconut", load_config(tiny.config).max_new_tokens)


def test_round_trip_same_logits_with_latents(tiny):
    built = _built(tiny.config, tiny.checkpoint)
    original = built.model.eval()
    loaded = Coconut.from_pretrained(tiny.export)
    assert isinstance(loaded, Coconut) and not loaded.training
    assert loaded.coconut_config["max_latent_stage"] == 2 and loaded.coconut_config["c_thought"] == 1
    assert (loaded.latent_token_id, loaded.start_latent_id, loaded.end_latent_id, loaded.eos_token_id) == (
        original.latent_token_id, original.start_latent_id, original.end_latent_id, original.eos_token_id)

    config = load_config(tiny.config)
    tokens = built.tokens
    batch = _training_batch(built.tokenizer, tiny.val, tokens.latent_id, tokens.start_id, tokens.end_id, config, stage=2)
    assert int((batch["input_ids"] == tokens.latent_id).sum()) == 2 * batch["input_ids"].shape[0]
    with torch.no_grad():
        before, after = original(**batch), loaded(**batch)
    torch.testing.assert_close(after.logits, before.logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(after.inputs_embeds, before.inputs_embeds, rtol=0, atol=1e-5)
    torch.testing.assert_close(after.loss, before.loss, rtol=0, atol=1e-5)

    prompt = {k: batch[k][:3] for k in ("input_ids", "attention_mask")}
    assert torch.equal(original.generate(**prompt, max_new_tokens=8), loaded.generate(**prompt, max_new_tokens=8))


def test_auto_model_loads_the_base_model(tiny):
    built = _built(tiny.config, tiny.checkpoint)
    auto = AutoModelForCausalLM.from_pretrained(tiny.export).eval()
    ids = torch.tensor([[5, 17, 42, 450, 452, 451, 99]])  # includes the three new rows
    with torch.no_grad():
        torch.testing.assert_close(auto(ids).logits, built.base_causallm.eval()(ids).logits, rtol=0, atol=1e-5)


def test_save_pretrained_round_trip_keeps_settings(tiny, tmp_path):
    loaded = Coconut.from_pretrained(tiny.export)
    loaded.save_pretrained(tmp_path / "again", max_latent_stage=1)
    again = Coconut.from_pretrained(tmp_path / "again")
    assert again.coconut_config == {**loaded.coconut_config, "max_latent_stage": 1}
    assert loaded.state_dict().keys() == again.state_dict().keys()
    for (name, p), (_, q) in zip(loaded.state_dict().items(), again.state_dict().items()):
        assert torch.equal(p, q), name


def test_exported_files_are_as_readable_as_new_files(tiny, tmp_path):
    """transformers writes model.safetensors with mode 0600: others on a shared machine
    could read the config and tokenizer, not the weights."""
    (tmp_path / "again").mkdir()
    private = tmp_path / "again" / "notes.txt"  # a file of the user's own keeps its mode
    private.write_text("mine")
    private.chmod(0o600)
    Coconut.from_pretrained(tiny.export).save_pretrained(tmp_path / "again")
    (tmp_path / "new").write_text("")
    new_file_mode = (tmp_path / "new").stat().st_mode & 0o777
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "again").iterdir() if p != private}
    assert "model.safetensors" in modes and set(modes.values()) == {new_file_mode}, modes
    assert private.stat().st_mode & 0o777 == 0o600 and new_file_mode != 0o600  # premise


def test_export_cot_checkpoint(tiny_cot):
    with open(os.path.join(tiny_cot.export, "coconut_config.json")) as f:
        settings = json.load(f)
    assert settings["method"] == "cot" and settings["c_thought"] == 0 and settings["max_latent_stage"] == 0
    loaded = Coconut.from_pretrained(tiny_cot.export)
    assert loaded.latent_token_id is None  # plain decoding, as evaluate.generator_for
    assert loaded.coconut_config["latent_token_id"] == settings["latent_token_id"]
    built = _built(tiny_cot.config, tiny_cot.checkpoint)
    ids = torch.tensor([[5, 17, 42, 99]])
    with torch.no_grad():
        torch.testing.assert_close(loaded.base_causallm(ids).logits, built.base_causallm.eval()(ids).logits, rtol=0, atol=1e-5)


def test_export_untied_llama_round_trip(llama_folder, chain_data, tmp_path):
    config = write_yaml(tmp_path / "llama.yaml", dict(coconut=True, c_thought=2, max_latent_stage=1,
                                                       model_id=llama_folder, train_path=chain_data["train"],
                                                       val_path=chain_data["val"]))
    torch.manual_seed(1)
    built = build_model(load_config(config), None, None, silent)
    with torch.no_grad():  # make the new head rows differ from the embedding rows
        built.base_causallm.get_output_embeddings().weight[-3:].normal_()
    checkpoint.save_checkpoint(str(tmp_path / "ckpt"), 1, built.model.state_dict())
    assert export.main([config, str(tmp_path / "ckpt" / "checkpoint_1"), str(tmp_path / "out")]) == 0
    loaded = Coconut.from_pretrained(tmp_path / "out")
    tokens = built.tokens
    batch = _training_batch(built.tokenizer, chain_data["val"], tokens.latent_id, tokens.start_id, tokens.end_id,
                            load_config(config), stage=1)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, built.model.eval()(**batch).logits, rtol=0, atol=1e-5)


def test_export_bad_input_is_one_line_exit_2(tiny, tiny_cot, tmp_path, capsys):
    keys = yaml.safe_load(open(tiny.config))
    moved_model = str(tmp_path / "moved.yaml")
    with open(moved_model, "w") as f:
        yaml.safe_dump({**keys, "model_id": str(tmp_path / "no_such_model")}, f)
    shutil.copytree(keys["model_id"], tmp_path / "lfs_model")
    (tmp_path / "lfs_model" / "pytorch_model.bin").write_text("version https://git-lfs.github.com/spec/v1\n")
    lfs_model = str(tmp_path / "lfs.yaml")
    write_yaml(lfs_model, {**keys, "model_id": str(tmp_path / "lfs_model")})
    cases = [
        [tiny.config, str(tmp_path / "missing"), str(tmp_path / "o1")],  # no checkpoint
        [str(tmp_path / "missing.yaml"), tiny.checkpoint, str(tmp_path / "o2")],  # no config
        [tiny_cot.config, tiny.checkpoint, str(tmp_path / "o3")],  # coconut weights into a cot run
        [tiny.config, tiny.checkpoint, str(tmp_path / "afile" / "o4")],  # a folder under a file
        [moved_model, tiny.checkpoint, str(tmp_path / "o5")],  # model_id a folder that is not there
        [tiny.config, str(tmp_path / "checkpoint_1.state"), str(tmp_path / "o6")],  # the state folder
        # a folder no file can be made in (root's os.access says it can: it failed after the build)
        [tiny.config, tiny.checkpoint, "/proc/coconut-no-such-folder/o7"],
        [lfs_model, tiny.checkpoint, str(tmp_path / "o8")],  # model_id a clone without git lfs
    ]
    (tmp_path / "afile").write_text("")
    (tmp_path / "checkpoint_1.state").mkdir()
    said = []
    for argv in cases:
        capsys.readouterr()
        assert export.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err
        assert not os.path.exists(argv[2])
        said.append(err)
    assert "o4: cannot be made" in said[3] and "afile is a file" in said[3]
    assert f"model_id {tmp_path / 'no_such_model'}: no such folder" in said[4]
    assert "checkpoint_1.state: is a folder, not a checkpoint file (the weights are checkpoint_N" in said[5]
    assert "o7: cannot be written, /proc is not writable" in said[6]
    assert "pytorch_model.bin is a Git LFS pointer, not the weights" in said[7]


def test_export_never_writes_over_the_model_it_started_from_or_other_files(tiny, tmp_path, capsys):
    """OUT_DIR the config's own model_id would overwrite that model's config, tokenizer and
    weights (and the next run would start from the export); a folder of other files
    likewise. An earlier export's folder may be written again."""
    keys = yaml.safe_load(open(tiny.config))
    model = tmp_path / "model"
    shutil.copytree(keys["model_id"], model)
    config = str(tmp_path / "c.yaml")
    write_yaml(config, {**keys, "model_id": str(model)})
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.json").write_text("[]")
    before = {p.name: p.read_bytes() for p in model.iterdir()}
    for out_dir, says in [(str(model), "is the config's model_id, the model the run started from"),
                          (str(tmp_path / "." / "model"), "is the config's model_id"),
                          (str(data), "holds other files and no earlier export (coconut_config.json)")]:
        capsys.readouterr()
        assert export.main([config, tiny.checkpoint, out_dir]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and says in err, err
    assert {p.name: p.read_bytes() for p in model.iterdir()} == before
    assert os.listdir(data) == ["train.json"]
    again = tmp_path / "again"
    shutil.copytree(tiny.export, again)
    assert export.main([config, tiny.checkpoint, str(again)]) == 0
