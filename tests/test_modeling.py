"""modeling.build_model: the loading rules of DESIGN §5 for every method's checkpoints."""

import pytest
import torch

from modeling import ModelLoadError, build_model
from tiny import make_llama, make_tokenizer
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
    marker = coconut.tokenizer.get_vocab()["<<"]
    assert torch.equal(embedding[: state["transformer.wte.weight"].shape[0]], state["transformer.wte.weight"])
    for token_id in (coconut.tokens.start_id, coconut.tokens.end_id, coconut.tokens.latent_id):
        assert torch.equal(embedding[token_id], state["transformer.wte.weight"][marker])


def test_an_untied_head_starts_its_new_rows_from_the_markers_row_too(llama_folder):
    """Llama's LM head is its own matrix: its three new rows copy the row of `<<` as the
    input embedding's do (SPEC §1), on the weights of a CoT checkpoint."""
    cot = build_model(config_for(llama_folder, cot=True), None, None, silent)
    state = trained_state(cot.model)
    coconut = build_model(config_for(llama_folder, coconut=True), state, "ckpt", silent)
    marker = coconut.tokenizer.get_vocab()["<<"]  # the premise: the copied row, not the mean
    head = coconut.base_causallm.get_output_embeddings().weight
    embedding = coconut.base_causallm.get_input_embeddings().weight
    assert head.data_ptr() != embedding.data_ptr()
    for token_id in (coconut.tokens.start_id, coconut.tokens.end_id, coconut.tokens.latent_id):
        assert torch.equal(head[token_id], state["lm_head.weight"][marker])
        assert torch.equal(embedding[token_id], state["model.embed_tokens.weight"][marker])


def _with_latent_tokens(tokenizer):
    """`tokenizer` with the three latent tokens added, as modeling.load_tokenizer adds them."""
    from layout import END, LATENT, START, LatentTokens

    tokenizer.add_tokens([START, END, LATENT], special_tokens=True)
    return tokenizer, LatentTokens.of(tokenizer)


def test_new_rows_start_as_the_mean_row_where_the_marker_is_not_one_token():
    """A tokenizer whose vocabulary has no `<<` (trained on text without it): each
    matrix's new rows start as the mean of its old rows (a naive fp64 mean here), said
    in one log line."""
    from modeling import init_new_token_rows

    tokenizer, tokens = _with_latent_tokens(make_tokenizer(["Tom is a wumpus. Every wumpus is a < yumpus."], 300))
    assert "<<" not in tokenizer.get_vocab() and len(tokenizer.encode("<<", add_special_tokens=False)) == 2
    model = make_llama(tokens.start_id)
    old = {name: weight.detach().double().clone() for name, weight in
           (("embedding", model.get_input_embeddings().weight), ("head", model.get_output_embeddings().weight))}
    said = []
    init_new_token_rows(model, tokenizer, tokens, said.append)
    assert said == ["'<<' is not one token of this tokenizer: new token rows start as the mean embedding"]
    for name, weight in (("embedding", model.get_input_embeddings().weight), ("head", model.get_output_embeddings().weight)):
        mean = old[name].mean(0)
        for token_id in (tokens.start_id, tokens.end_id, tokens.latent_id):
            assert torch.allclose(weight[token_id].double(), mean, atol=1e-6), name


def word_prefix_tokenizer():
    """A SentencePiece-style tokenizer (a word's first piece carries "▁", as Llama 2's and
    Mistral's do) whose vocabulary holds both `<<` and `▁<<`: the text "<<" encodes as
    `▁<<`, another token than `<<`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "▁": 3, "<": 4, "<<": 5, "▁<": 6, "▁<<": 7, "a": 8, "▁a": 9}
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=[("▁", "<"), ("▁<", "<"), ("<", "<"), ("▁", "a")], unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    bpe.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_new_rows_copy_the_token_named_marker_not_what_the_text_encodes_to():
    """SPEC §1: the rows start as copies of the token `<<`, looked up by name. With a
    word-prefix tokenizer the text "<<" encodes as `▁<<` (another row), so looking it up
    by encoding copied the wrong row."""
    from modeling import init_new_token_rows

    tokenizer, tokens = _with_latent_tokens(word_prefix_tokenizer())
    assert tokenizer.convert_ids_to_tokens(tokenizer.encode("<<", add_special_tokens=False)) == ["▁<<"]  # the premise
    model = make_llama(tokens.start_id)
    said = []
    init_new_token_rows(model, tokenizer, tokens, said.append)
    assert said == []
    for weight in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
        for token_id in (tokens.start_id, tokens.end_id, tokens.latent_id):
            assert torch.equal(weight[token_id], weight[5]) and not torch.equal(weight[token_id], weight[7])


def test_a_model_that_already_has_the_latent_tokens_keeps_their_trained_rows(gpt2_folder, tmp_path):
    """model_id a folder export.py wrote (its tokenizer and embeddings hold the three
    tokens): their rows are trained values, not reset to `<<`'s; a fresh model's are."""
    config = config_for(gpt2_folder, coconut=True)
    fresh = build_model(config, None, None, silent)
    embedding = fresh.base_causallm.get_input_embeddings().weight
    marker = fresh.tokenizer.get_vocab()["<<"]
    ids = (fresh.tokens.start_id, fresh.tokens.end_id, fresh.tokens.latent_id)
    assert all(torch.equal(embedding[i], embedding[marker]) for i in ids)
    with torch.no_grad():
        embedding[fresh.tokens.start_id] = 7.0  # as training leaves it
    fresh.base_causallm.save_pretrained(tmp_path)
    fresh.tokenizer.save_pretrained(tmp_path)
    lines = []
    again = build_model(config_for(str(tmp_path), coconut=True), None, None, lines.append)
    assert torch.equal(again.base_causallm.get_input_embeddings().weight, embedding)
    assert again.tokens == fresh.tokens
    assert lines == ["the model's tokenizer already holds the latent tokens, and its embeddings their rows: kept as they are"]


@pytest.mark.parametrize("with_weights", [True, False])
@pytest.mark.parametrize("bf16", [False, True])
def test_a_model_saved_in_bf16_trains_in_the_precision_the_config_asks(llama_folder, tmp_path, with_weights, bf16):
    """Hub checkpoints of Llama, Qwen, Mistral, ... are bf16 and their configs say so:
    transformers 5 would keep that dtype; a run keeps fp32 parameters unless bf16: True."""
    import shutil

    from transformers import AutoConfig, AutoModelForCausalLM

    folder = tmp_path / "bf16_model"
    shutil.copytree(llama_folder, folder)
    hf_config = AutoConfig.from_pretrained(folder)
    hf_config.dtype = torch.bfloat16
    if with_weights:
        AutoModelForCausalLM.from_config(hf_config).to(torch.bfloat16).save_pretrained(folder)
    else:
        hf_config.save_pretrained(folder)
    # the premise: transformers alone gives bf16 parameters here
    plain = (AutoModelForCausalLM.from_pretrained(folder) if with_weights
             else AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder)))
    assert next(plain.parameters()).dtype == torch.bfloat16
    built = build_model(config_for(str(folder), coconut=True, bf16=bf16), None, None, silent)
    assert {p.dtype for p in built.model.parameters()} == {torch.bfloat16 if bf16 else torch.float32}
    # the buffers as transformers makes them for a bf16 model: the rotary inv_freq in fp32
    reference = AutoModelForCausalLM.from_config(hf_config, dtype=torch.bfloat16)
    assert {name: (b.dtype, b.tolist()) for name, b in built.base_causallm.named_buffers()} == {
        name: (b.dtype, b.tolist()) for name, b in reference.named_buffers()}
    assert any(b.dtype == torch.float32 for b in reference.buffers())  # premise: a buffer to keep
    if with_weights:  # read in bf16 or in fp32: the saved values either way
        saved = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).state_dict()
        ours = built.base_causallm.state_dict()
        rows = saved["model.embed_tokens.weight"].shape[0]
        for key, value in saved.items():
            assert torch.equal(ours[key][:rows] if "embed" in key or "lm_head" in key else ours[key],
                               value.to(ours[key].dtype)), key


def test_checkpoint_of_another_size_names_the_key(gpt2_folder):
    config = config_for(gpt2_folder, cot=True)
    state = build_model(config, None, None, silent).model.state_dict()
    state["transformer.h.0.mlp.c_fc.weight"] = torch.zeros(3, 3)
    with pytest.raises(ModelLoadError, match=r"ckpt: transformer\.h\.0\.mlp\.c_fc\.weight has shape \(3, 3\)"):
        build_model(config, state, "ckpt", silent)


def test_fused_gelu_computes_gelu_new_in_one_operation_and_changes_nothing_saved():
    """The swapped activation gives gelu_new's loss and gradients to rounding, on a real
    Coconut batch with latents; the config and the state dict stay as they were."""
    import copy

    from test_coconut import END, EOS, LATENT, START, VOCAB, collate, mixed_batch, relative_difference
    from tiny import make_gpt2, make_llama
    from transformers.activations import GELUTanh

    from coconut import Coconut
    from modeling import fuse_gelu

    plain = make_gpt2(VOCAB, n_layer=3)
    fused = copy.deepcopy(plain)
    assert fuse_gelu(fused) == 3 and fuse_gelu(fused) == 0
    assert all(type(block.mlp.act) is GELUTanh for block in fused.transformer.h)
    assert fused.config.activation_function == "gelu_new"
    assert_loaded(fused, plain.state_dict())
    batch = collate(mixed_batch(seed=4, c_thought=1))
    losses, grads = [], []
    for model in (plain, fused):
        loss = Coconut(model, LATENT, START, END, EOS)(**batch).loss
        losses.append(loss.item())
        grads.append(torch.autograd.grad(loss, list(model.parameters())))
    assert abs(losses[0] - losses[1]) < 1e-6 * losses[0]
    assert all(relative_difference(b, a) < 1e-5 for a, b in zip(*grads))
    assert fuse_gelu(make_llama(VOCAB)) == 0  # SiLU: one operation already


@pytest.mark.parametrize("fused", [True, False])
def test_the_run_fuses_gelu_unless_told_not_to(gpt2_folder, fused):
    from transformers.activations import GELUTanh, NewGELUActivation

    import startup
    from distributed import DistEnv

    config = config_for(gpt2_folder, coconut=True, fused_gelu=fused)
    built, _ = startup.build_and_place(config, startup.Start(), DistEnv(), silent)
    activations = {type(block.mlp.act) for block in built.base_causallm.transformer.h}
    assert activations == {GELUTanh if fused else NewGELUActivation}


@pytest.mark.parametrize("damage", ["more layers in config.json", "another width in config.json", "truncated weights",
                                    "a pickle that is not torch's"])
def test_a_model_folder_whose_weights_do_not_fit_its_config_is_one_line(gpt2_folder, tmp_path, damage):
    """transformers would train the missing layers from random values with a report, or
    stop with a traceback: ModelLoadError names the folder, before any training."""
    import json
    import shutil

    from transformers import AutoConfig, AutoModelForCausalLM

    folder = tmp_path / "damaged"
    shutil.copytree(gpt2_folder, folder)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder)).save_pretrained(folder)  # its weights
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text())
    if damage == "more layers in config.json":
        config_file.write_text(json.dumps({**config, "n_layer": config["n_layer"] + 1}))
        expected = "its weights lack 12 tensor(s) of the model its config.json describes (first: transformer.h.2."
    elif damage == "another width in config.json":
        config_file.write_text(json.dumps({**config, "n_embd": 2 * config["n_embd"]}))
        expected = "its weights do not load ("
    elif damage == "truncated weights":
        weights = folder / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        expected = "its weights do not load ("
    else:  # starts as a legacy torch file, passes the pre-flight's look at its first bytes; torch.load refuses it
        (folder / "model.safetensors").unlink()
        (folder / "pytorch_model.bin").write_bytes(b"\x80\x02not a pickle of tensors")
        expected = "its weights do not load ("
    with pytest.raises(ModelLoadError) as error:
        build_model(config_for(str(folder), coconut=True), None, None, silent)
    assert str(error.value).startswith(f"model {folder}: {expected}") and "\n" not in str(error.value)
