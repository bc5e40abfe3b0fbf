"""modeling.build_model: the loading rules of DESIGN §5 for every method's checkpoints."""

import pytest
import torch

from modeling import ModelLoadError, build_model
from utils import Config


def config_for(folder, **method):
    return Config.from_dict(dict(model_id=folder, train_path="t.json", val_path="v.json", **method))


def silent(message):
    pass


def trained_state(model) -> dict:
    """The model's state dict with every tensor changed, as training would leave it."""
    return {k: v + 0.5 for k, v in model.state_dict().items()}


def assert_loaded(model, state):
    loaded = model.state_dict()
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) for k in state)


@pytest.mark.parametrize("method", ["coconut", "pause_as_thought", "cot", "no_thoughts"])
def test_a_runs_own_checkpoint_loads_back(gpt2_folder, method):
    """What resume, only_eval and export.py do: a run's checkpoint into the same run."""
    config = config_for(gpt2_folder, **{method: True})
    state = trained_state(build_model(config, None, None, silent).model)
    assert_loaded(build_model(config, state, "ckpt", silent).model, state)


def test_pause_as_thought_checkpoint_feeds_a_coconut_run(gpt2_folder):
    """Its embeddings already hold the three new rows: they load as they are."""
    pause = build_model(config_for(gpt2_folder, pause_as_thought=True), None, None, silent)
    state = trained_state(pause.model)
    coconut = build_model(config_for(gpt2_folder, coconut=True), state, "ckpt", silent)
    assert_loaded(coconut.base_causallm, state)


def test_cot_checkpoint_feeds_a_coconut_run_with_new_rows_from_the_marker(gpt2_folder):
    cot = build_model(config_for(gpt2_folder, cot=True), None, None, silent)
    state = trained_state(cot.model)
    coconut = build_model(config_for(gpt2_folder, coconut=True), state, "ckpt", silent)
    embedding = coconut.base_causallm.get_input_embeddings().weight
    marker = coconut.tokenizer.encode("<<", add_special_tokens=False)[0]
    assert torch.equal(embedding[: state["transformer.wte.weight"].shape[0]], state["transformer.wte.weight"])
    for token_id in (coconut.tokens.start_id, coconut.tokens.end_id, coconut.tokens.latent_id):
        assert torch.equal(embedding[token_id], state["transformer.wte.weight"][marker])


def test_checkpoint_of_another_size_names_the_key(gpt2_folder):
    config = config_for(gpt2_folder, cot=True)
    state = build_model(config, None, None, silent).model.state_dict()
    state["transformer.h.0.mlp.c_fc.weight"] = torch.zeros(3, 3)
    with pytest.raises(ModelLoadError, match=r"ckpt: transformer\.h\.0\.mlp\.c_fc\.weight has shape \(3, 3\)"):
        build_model(config, state, "ckpt", silent)
