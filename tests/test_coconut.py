"""Coconut against a naive reference: equal loss, gradients and greedy generations.

The reference is the obviously-correct algorithm: one example at a time, no padding,
and for every latent a full forward over the whole prefix (no cache), then one more
full forward for the loss. Decoding recomputes the whole sequence for each token.
"""

import random

import pytest
import torch
import torch.nn.functional as F
from tiny import make_gpt2, make_llama, make_qwen3

from coconut import Coconut, LatentLayoutError, align_latents, latent_columns

VOCAB = 64
LATENT, START, END, EOS = 61, 62, 63, 0
TOLERANCE = 1e-4


def naive_embeds(model, ids, detach=False):
    """(seq, hidden) input embeddings of one unpadded example with latents filled."""
    embeds = model.get_input_embeddings()(ids[None])[0]
    for pos in (ids == LATENT).nonzero().flatten().tolist():
        hidden = model(inputs_embeds=embeds[None, :pos], output_hidden_states=True).hidden_states[-1]
        thought = hidden[0, -1:].detach() if detach else hidden[0, -1:]
        embeds = torch.cat([embeds[:pos], thought, embeds[pos + 1 :]])
    return embeds


def naive_loss(model, examples, detach=False):
    """Mean cross-entropy over every supervised token of all examples."""
    total, count = 0.0, 0
    for ids, labels in examples:
        logits = model(inputs_embeds=naive_embeds(model, ids, detach)[None]).logits[0]
        total = total + F.cross_entropy(logits[:-1], labels[1:], ignore_index=-100, reduction="sum")
        count += int((labels[1:] != -100).sum())
    return total / count


def naive_generate(model, ids, max_new_tokens):
    """Published batch-1 semantics: first token always kept, stop at the next EOS."""
    embeds = naive_embeds(model, ids)
    tokens = ids.tolist()
    for step in range(max_new_tokens):
        token = int(model(inputs_embeds=embeds[None]).logits[0, -1].argmax())
        if step > 0 and token == EOS:
            break
        tokens.append(token)
        embeds = torch.cat([embeds, model.get_input_embeddings()(torch.tensor([token]))])
    return tokens


def make_example(rng, n_latents, question_len, answer_len):
    question = [rng.randrange(1, 60) for _ in range(question_len)]
    marked = [START] + [LATENT] * n_latents + [END] if n_latents else []
    answer = [rng.randrange(1, 60) for _ in range(answer_len)] + [EOS]
    ids = question + marked + answer
    labels = [-100] * (len(question) + len(marked)) + answer
    return torch.tensor(ids), torch.tensor(labels)


def collate(examples):
    """Left-pad to align first latents, then right-pad (DESIGN §3), written plainly."""
    firsts = [ids.tolist().index(LATENT) for ids, _ in examples if LATENT in ids.tolist()]
    target = max(firsts, default=0)
    rows = []
    for ids, labels in examples:
        shift = target - ids.tolist().index(LATENT) if LATENT in ids.tolist() else 0
        rows.append(([EOS] * shift + ids.tolist(), [-100] * shift + labels.tolist(), [0] * shift + [1] * len(ids),
                     [0] * shift + list(range(len(ids)))))
    width = max(len(r[0]) for r in rows)
    pads = (EOS, -100, 0, 0)
    cols = [[r[k] + [pads[k]] * (width - len(r[k])) for r in rows] for k in range(4)]
    return dict(zip(("input_ids", "labels", "attention_mask", "position_ids"), map(torch.tensor, cols)))


def mixed_batch(seed, c_thought):
    rng = random.Random(seed)
    return [make_example(rng, c_thought * rng.randrange(0, 4), rng.randrange(3, 9), rng.randrange(1, 5))
            for _ in range(5)] + [make_example(rng, 6, 4, 2), make_example(rng, 0, 5, 3)]


MODELS = {"gpt2": lambda: make_gpt2(VOCAB), "llama": lambda: make_llama(VOCAB), "qwen3": lambda: make_qwen3(VOCAB)}


def relative_difference(a, b):
    return float((a - b).norm() / b.norm().clamp(min=1e-12))


@pytest.mark.parametrize("arch", MODELS)
@pytest.mark.parametrize("c_thought", [1, 2])
def test_loss_and_gradients_match_naive_reference(arch, c_thought):
    base = MODELS[arch]()
    coconut = Coconut(base, LATENT, START, END, EOS)
    examples = mixed_batch(seed=c_thought, c_thought=c_thought)

    expected = naive_loss(base, examples)
    expected_grads = torch.autograd.grad(expected, list(base.parameters()), allow_unused=True)
    out = coconut(**collate(examples))
    grads = torch.autograd.grad(out.loss, list(base.parameters()), allow_unused=True)

    assert abs(out.loss.item() - expected.item()) < TOLERANCE * abs(expected.item())
    checked = 0
    for got, want in zip(grads, expected_grads):
        if want is None:
            assert got is None or got.abs().max() == 0
            continue
        assert relative_difference(got, want) < TOLERANCE
        checked += 1
    assert checked > 10


def assert_trains_and_generates_as_the_naive_reference(base):
    """Loss and gradients (with grad; without: the validation loss, on a cache) and batched
    greedy decoding of a Coconut around `base`, against the naive loops."""
    coconut = Coconut(base, LATENT, START, END, EOS)
    examples = mixed_batch(seed=1, c_thought=1)
    expected = naive_loss(base, examples)
    expected_grads = torch.autograd.grad(expected, list(base.parameters()), allow_unused=True)
    out = coconut(**collate(examples))
    grads = torch.autograd.grad(out.loss, list(base.parameters()), allow_unused=True)
    assert abs(out.loss.item() - expected.item()) < TOLERANCE * abs(expected.item())
    for got, want in zip(grads, expected_grads):
        if want is not None:
            assert relative_difference(got, want) < TOLERANCE
    with torch.no_grad():
        assert abs(coconut(**collate(examples)).loss.item() - expected.item()) < TOLERANCE * abs(expected.item())
    rng = random.Random(5)
    prompts = [make_example(rng, n, rng.randrange(2, 10), 1)[0][:-2] for n in [3, 1, 0, 2]]
    batch = collate([(p, p) for p in prompts])
    with torch.no_grad():
        got = coconut.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=8).tolist()
        expected_tokens = [naive_generate(base, p, 8) for p in prompts]
    width = max(map(len, expected_tokens))
    assert got == [want + [EOS] * (width - len(want)) for want in expected_tokens]


def test_a_causal_lm_whose_base_model_is_itself_trains_and_generates_as_the_naive_reference():
    """Llama 4's causal LM names its decoder `model` while its base_model_prefix says
    `language_model`, so its base_model is the causal LM itself: the passes must still
    run the decoder alone (coconut.decoder_of). Its chunked attention (chunks of 4) is
    local attention: decoded in gapless sub-batches."""
    import transformers

    torch.manual_seed(0)
    config = transformers.Llama4TextConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, intermediate_size_mlp=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=2, interleave_moe_layer_step=1,
        attention_chunk_size=4, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    base = transformers.Llama4ForCausalLM(config).eval()
    assert base.base_model is base  # the premise
    assert_trains_and_generates_as_the_naive_reference(base)


def make_hybrid(kind):
    """Hybrid models: Granite 4.0-H (Mamba and attention layers), LFM (convolution, sliding
    window and full attention layers)."""
    import transformers

    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=512, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    if kind == "granite_hybrid":
        config = transformers.GraniteMoeHybridConfig(
            **common, intermediate_size=128, layer_types=["mamba", "attention"], mamba_n_heads=4, mamba_d_head=16,
            mamba_n_groups=1, mamba_d_state=16, mamba_expand=1, num_local_experts=0, shared_intermediate_size=128)
    else:
        config = transformers.Lfm3Config(**{**common, "num_hidden_layers": 3}, intermediate_size=128, head_dim=16,
                                         layer_types=["conv", "sliding_attention", "full_attention"], sliding_window=64)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("kind", ["granite_hybrid", "lfm3_sliding_window"])
def test_a_hybrid_model_with_recurrent_states_trains_and_generates_as_the_naive_reference(kind):
    """Granite 4.0-H's Mamba layers (LFM's convolutions) update their cached states in
    place, which a later latent pass would do to states an earlier pass saved for the
    backward: training runs each pass over the whole prefix without a cache; decoding
    keeps the cache, in sub-batches without padding inside a row (a padding column would
    run through the states), also where a sliding window alone would not ask for them."""
    from coconut import holds_recurrent_states

    base = make_hybrid(kind)
    assert holds_recurrent_states(base.config) and not holds_recurrent_states(make_llama(VOCAB).config)
    assert_trains_and_generates_as_the_naive_reference(base)


def make_model_with_odd_positions_or_states(kind):
    """MPT: ALiBi from the batch's columns, not positions (a padding gap moves them).
    Jamba: transformers' Jamba restarts its Mamba scan from zero in a pass over several
    columns on a cache; its Mamba output weighs 20x the random init, as a trained model's
    would, so that a lost state shows in the numbers."""
    import transformers

    torch.manual_seed(0)
    if kind == "mpt":
        config = transformers.MptConfig(vocab_size=VOCAB, d_model=64, n_layers=2, n_heads=4, max_seq_len=512)
        return transformers.MptForCausalLM(config).eval()
    config = transformers.JambaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, attn_layer_period=2, attn_layer_offset=1, expert_layer_period=99,
        expert_layer_offset=98, num_experts=1, mamba_d_state=8, mamba_expand=2, use_mamba_kernels=False,
        bos_token_id=0, eos_token_id=0, pad_token_id=0)
    base = transformers.JambaForCausalLM(config).eval()
    with torch.no_grad():
        for layer in base.model.layers:
            if hasattr(layer, "mamba"):
                layer.mamba.out_proj.weight.mul_(20.0)
    return base


@pytest.mark.parametrize("kind", ["mpt", "jamba"])
def test_models_with_column_positions_or_one_column_continuation_match_the_naive_reference(kind):
    """MPT decodes in gapless sub-batches (batched decoding gave other tokens than one
    prompt alone); Jamba's passes on a cache after the first go one column at a time (its
    validation loss and prefill were off by up to 1e-2)."""
    assert_trains_and_generates_as_the_naive_reference(make_model_with_odd_positions_or_states(kind))


def test_jamba_passes_stay_one_column_wide_when_another_process_needs_more_passes(monkeypatch):
    """Under torchrun a process runs as many passes as the one that needs most: a batch
    without latents is cut into more pieces, and for Jamba none after the first may span
    several columns (its validation loss moved by 3e-4 when the tail was cut in one)."""
    import coconut as coconut_module

    model = Coconut(make_model_with_odd_positions_or_states("jamba"), LATENT, START, END, EOS).eval()
    rng = random.Random(3)
    batch = collate([make_example(rng, 0, rng.randrange(4, 10), 1) for _ in range(2)])  # no latents
    with torch.no_grad():
        alone = model(**batch).loss
        model.sync_passes_across_ranks = True
        monkeypatch.setattr(coconut_module, "_all_ranks_max", lambda value, device: max(value, 6))
        synced = model(**batch).loss
    assert relative_difference(synced, alone) < 1e-6


def test_models_coconut_cannot_run_are_refused_with_the_reason():
    """Each fails or computes other numbers on passes over a cache: refused by name, at
    build (and so in pre-flight, which asks unsupported_model)."""
    import transformers

    from coconut import unsupported_model

    small = dict(vocab_size=VOCAB, num_hidden_layers=2)
    configs = {
        "OpenAI GPT models": transformers.OpenAIGPTConfig(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2),
        "RWKV models": transformers.RwkvConfig(**small, hidden_size=32, attention_hidden_size=32),
        "RecurrentGemma models": transformers.RecurrentGemmaConfig(
            **small, hidden_size=32, lru_width=32, num_attention_heads=2, block_types=["recurrent", "attention"]),
        "Gemma 4 models with per-layer embeddings": transformers.Gemma4TextConfig(
            **small, hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
            hidden_size_per_layer_input=8),
    }
    configs["XLNet models"] = transformers.XLNetConfig(vocab_size=VOCAB, d_model=32, n_layer=1, n_head=2)
    # a linear-attention cache of its own (refuses a DynamicCache); inputs_embeds scaled in place
    configs["MiniMax models"] = transformers.MiniMaxConfig(
        **small, hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
        num_local_experts=2, layer_types=["linear_attention", "full_attention"])
    configs["CTRL models"] = transformers.CTRLConfig(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2, dff=64)
    # per-layer embeddings by token id, left out when the model is given input embeddings
    configs["Gemma 3n models"] = transformers.Gemma3nConfig(text_config=transformers.Gemma3nTextConfig(
        **small, hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
        hidden_size_per_layer_input=8, vocab_size_per_layer_input=VOCAB, laurel_rank=4, num_kv_shared_layers=0,
        layer_types=["sliding_attention", "full_attention"], activation_sparsity_pattern=[0.0, 0.0]).to_dict())
    for name, config in configs.items():
        assert unsupported_model(config).startswith(f"{name} are not supported: "), config.model_type
    with pytest.raises(ValueError, match="^RWKV models are not supported"):
        Coconut(transformers.AutoModelForCausalLM.from_config(configs["RWKV models"]), LATENT, START, END, EOS)
    # Gemma 4 without per-layer embeddings runs (the refusal is about them only)
    gemma4 = transformers.Gemma4TextConfig(**{**configs["Gemma 4 models with per-layer embeddings"].to_dict(),
                                              "hidden_size_per_layer_input": 0})
    assert unsupported_model(gemma4) is None


def make_transformed_head(kind):
    """Models whose causal-LM forward changes the head's output: Granite scales the
    logits down, Cohere scales them, Gemma 2 soft-caps them (coconut.logit_transform)."""
    import transformers

    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    name, extra = {"granite": ("Granite", dict(logits_scaling=8.0)), "cohere": ("Cohere", dict(logit_scale=4.0)),
                   "gemma2": ("Gemma2", dict(head_dim=16, final_logit_softcapping=0.05, attn_logit_softcapping=None)),
                   "hyperclovax": ("HyperCLOVAX", dict(logits_scaling=0.25))}[kind]  # multiplies, where Granite divides
    if not hasattr(transformers, f"{name}Config"):
        pytest.skip(f"this transformers has no {name}")
    config = getattr(transformers, f"{name}Config")(**common, **extra)
    return getattr(transformers, f"{name}ForCausalLM")(config).eval()


@pytest.mark.parametrize("kind", ["granite", "cohere", "gemma2", "hyperclovax"])
def test_models_that_transform_their_head_output_keep_it_in_loss_and_logits(kind):
    """The loss, its gradients and the returned logits are the model's own (the naive
    reference calls the model's forward); a plain loss on the bare head would differ."""
    base = make_transformed_head(kind)
    coconut = Coconut(base, LATENT, START, END, EOS)
    assert coconut.logit_transform is not None
    examples = mixed_batch(seed=5, c_thought=1)
    expected = naive_loss(base, examples)
    expected_grads = torch.autograd.grad(expected, list(base.parameters()), allow_unused=True)
    batch = collate(examples)
    out = coconut(**batch)
    grads = torch.autograd.grad(out.loss, list(base.parameters()), allow_unused=True)
    assert abs(out.loss.item() - expected.item()) < TOLERANCE * abs(expected.item())
    compared = [relative_difference(g, w) for g, w in zip(grads, expected_grads) if w is not None]
    assert len(compared) > 10 and max(compared) < TOLERANCE
    with torch.no_grad():  # validation's path
        assert abs(coconut(**batch, return_logits=False).loss.item() - out.loss.item()) < 1e-6 * out.loss.item()
    no_latents = [e for e in examples if LATENT not in e[0].tolist()][:1]
    ids = no_latents[0][0][None]
    assert torch.allclose(coconut(ids, torch.ones_like(ids)).logits, base(ids).logits, atol=1e-5)
    # the premise: the bare head's loss is another number
    with torch.no_grad():
        bare = Coconut(base, LATENT, START, END, EOS)
        bare.logit_transform = None
        assert abs(bare(**batch).loss.item() - expected.item()) > 10 * TOLERANCE * abs(expected.item())


def test_a_model_whose_forward_changes_its_head_output_unknowably_is_refused():
    """Coconut computes the loss from the decoder stack and the LM head; a model whose
    own forward does something else to the logits is named at once, not trained on
    another objective."""
    from transformers import GPT2LMHeadModel

    from coconut import HeadMismatchError

    class ScaledGPT2(GPT2LMHeadModel):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 3.0
            return out

    base = make_gpt2(VOCAB)
    Coconut(base, LATENT, START, END, EOS)  # premise: the plain model passes
    scaled = ScaledGPT2(base.config)
    with pytest.raises(HeadMismatchError, match="ScaledGPT2 .gpt2.: its forward changes its LM head's output"):
        Coconut(scaled, LATENT, START, END, EOS)
    assert scaled.training  # the check ran in eval mode and put the mode back
    # a plain decoder (the evaluation of cot and the other methods) computes no loss, and
    # a scaled head keeps greedy decoding's choices: not refused
    Coconut(scaled, None, START, END, EOS)


def test_gradient_flows_through_the_continuous_thoughts():
    """Our gradients differ from those of the reference with detached thoughts (that
    they equal the reference's is test_loss_and_gradients_match_naive_reference)."""
    base = make_gpt2(VOCAB)
    coconut = Coconut(base, LATENT, START, END, EOS)
    examples = mixed_batch(seed=7, c_thought=1)
    params = list(base.parameters())
    ours = torch.autograd.grad(coconut(**collate(examples)).loss, params)
    detached = torch.autograd.grad(naive_loss(base, examples, detach=True), params)
    wte = 0  # the embedding matrix: reached through the thoughts' inputs too
    assert relative_difference(ours[wte], detached[wte]) > 1e-2


@pytest.mark.parametrize("arch", MODELS)
@pytest.mark.parametrize("c_thought", [1, 2])
def test_batched_generation_matches_naive_reference(arch, c_thought):
    base = MODELS[arch]()
    coconut = Coconut(base, LATENT, START, END, EOS).eval()
    rng = random.Random(10 + c_thought)
    prompts = []
    for n in [0, 1, 3, 6, 2, 0]:
        ids, _ = make_example(rng, n * c_thought if n < 6 else 6, rng.randrange(2, 10), 1)
        prompts.append(ids[: len(ids) - 2])  # question + markers, no answer
    batch = collate([(p, p) for p in prompts])
    with torch.no_grad():
        got = coconut.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=12)
        expected = [naive_generate(base, p, 12) for p in prompts]
    width = max(map(len, expected))
    assert got.shape == (len(prompts), width)
    for row, want in zip(got.tolist(), expected):
        assert row == want + [EOS] * (width - len(want))


def make_sliding(kind, window=4):
    """Models whose layers attend to a window of the last `window` columns (Gemma 2: every other layer)."""
    import transformers

    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, bos_token_id=0, eos_token_id=0, pad_token_id=0,
                  sliding_window=window)
    if kind == "gemma3_multimodal":  # what AutoModelForCausalLM builds from Gemma 3 4B and up: the
        # text model's settings (its window) in text_config, not in the config itself
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      image_size=28, patch_size=14)
        config = transformers.Gemma3Config(text_config={**common, "head_dim": 16}, vision_config=vision,
                                           mm_tokens_per_image=4, image_token_index=VOCAB - 4, boi_token_index=VOCAB - 6,
                                           eoi_token_index=VOCAB - 5, bos_token_id=0, eos_token_id=0, pad_token_id=0)
        return transformers.AutoModelForCausalLM.from_config(config).eval()
    extra = {"mistral": {}, "gemma2": dict(head_dim=16, attn_logit_softcapping=None)}[kind]
    name = {"mistral": "Mistral", "gemma2": "Gemma2"}[kind]
    return getattr(transformers, f"{name}ForCausalLM")(getattr(transformers, f"{name}Config")(**common, **extra)).eval()


@pytest.mark.parametrize("kind", ["mistral", "gemma2", "gemma3_multimodal"])
def test_batched_generation_with_a_sliding_window_matches_naive_reference(kind):
    """A window counts columns: padding between a prompt and its new tokens would take
    real tokens' places in it, so such models decode gapless sub-batches (rows with
    3, 1, 0, 2 latents and prompts of different lengths here)."""
    from coconut import gapless_groups

    base = make_sliding(kind)
    coconut = Coconut(base, LATENT, START, END, EOS)
    rng = random.Random(5)
    prompts = [make_example(rng, n, rng.randrange(2, 10), 1)[0][:-2] for n in [3, 1, 0, 2, 0, 3]]
    batch = collate([(p, p) for p in prompts])
    assert len(gapless_groups(batch["input_ids"], batch["attention_mask"], LATENT)) == 3  # 3, 2 and 1 latents + END
    with torch.no_grad():
        got = coconut.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=12)
        expected = [naive_generate(base, p, 12) for p in prompts]
        aligned = align_latents(batch["input_ids"], batch["attention_mask"], LATENT, EOS)
        one_batch = coconut._decode_aligned(*aligned, 12, False)
    width = max(map(len, expected))
    assert got.shape == (len(prompts), width)
    for row, want in zip(got.tolist(), expected):
        assert row == want + [EOS] * (width - len(want))
    # premise: decoded as one padded batch, some row would differ
    assert any(row[: len(want)] != want for row, want in zip(one_batch.tolist(), expected))


def test_which_models_count_a_local_attention_window():
    """Local: Mistral's window, Gemma 2's sliding layers, GPT-Neo's local layers. Not:
    GPT-2, Llama, a window of 0 (Qwen2-MoE's "off"), a window no layer uses (Qwen2 whose
    layer types are all full)."""
    from transformers import GPTNeoConfig, Qwen2Config, Qwen2MoeConfig

    from coconut import local_attention_window

    assert local_attention_window(make_sliding("mistral").config) == 4
    assert local_attention_window(make_sliding("gemma2", window=8).config) == 8
    composite = make_sliding("gemma3_multimodal", window=8).config
    assert getattr(composite, "sliding_window", None) is None and local_attention_window(composite) == 8
    assert local_attention_window(GPTNeoConfig(window_size=256)) == 256
    assert local_attention_window(make_gpt2(VOCAB).config) is None
    assert local_attention_window(make_llama(VOCAB).config) is None
    assert local_attention_window(Qwen2MoeConfig()) is None
    full_qwen = Qwen2Config(use_sliding_window=True, sliding_window=64, num_hidden_layers=2,
                            layer_types=["full_attention"] * 2)
    assert full_qwen.sliding_window == 64 and local_attention_window(full_qwen) is None


def test_a_window_wider_than_every_row_decodes_as_one_batch(monkeypatch):
    """Gapless sub-batches only when a window could reach past a gap: a window wider than
    the aligned prompts plus the new tokens sees every real token anyway."""
    base = make_sliding("mistral", window=64)
    coconut = Coconut(base, LATENT, START, END, EOS)
    rng = random.Random(5)
    prompts = [make_example(rng, n, rng.randrange(2, 10), 1)[0][:-2] for n in [3, 1, 0, 2]]
    batch = collate([(p, p) for p in prompts])
    calls = []
    monkeypatch.setattr(coconut, "_generate_gapless", lambda *args: calls.append(args))
    with torch.no_grad():
        got = coconut.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=12)
        expected = [naive_generate(base, p, 12) for p in prompts]
        coconut.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=64)  # 64 columns and more
    assert len(calls) == 1  # only the second: its last tokens lie 64 columns or more in
    width = max(map(len, expected))
    for row, want in zip(got.tolist(), expected):
        assert row == want + [EOS] * (width - len(want))


def test_generation_accepts_any_padding():
    """Left-padded or right-padded prompts without the collator's layout give the same rows."""
    base = make_gpt2(VOCAB)
    coconut = Coconut(base, LATENT, START, END, EOS).eval()
    rng = random.Random(3)
    prompts = [make_example(rng, n, q, 1)[0][:-2] for n, q in [(2, 7), (4, 3), (0, 5)]]
    width = max(map(len, prompts))
    left = torch.stack([F.pad(p, (width - len(p), 0), value=EOS) for p in prompts])
    left_mask = torch.stack([F.pad(torch.ones_like(p), (width - len(p), 0)) for p in prompts])
    right = torch.stack([F.pad(p, (0, width - len(p)), value=EOS) for p in prompts])
    right_mask = torch.stack([F.pad(torch.ones_like(p), (0, width - len(p))) for p in prompts])
    with torch.no_grad():
        got = coconut.generate(left, left_mask, max_new_tokens=6)
        assert coconut.generate(right, right_mask, max_new_tokens=6).tolist() == got.tolist()
    for row, prompt in zip(got.tolist(), prompts):
        naive = naive_generate(base, prompt, 6)  # the prompt, then the kept tokens
        assert row == naive + [EOS] * (len(row) - len(naive))  # then only EOS


def test_generation_stops_when_every_row_hit_eos():
    base = make_gpt2(VOCAB)
    with torch.no_grad():  # every hidden state becomes ln_f's bias, which points at EOS
        base.transformer.ln_f.weight.zero_()
        base.transformer.wte.weight[EOS] = 50 * base.transformer.ln_f.bias
    coconut = Coconut(base, LATENT, START, END, EOS).eval()
    calls = []
    # a pass calls every block (a lean pass, lean_passes, calls no decoder module)
    base.transformer.h[0].register_forward_hook(lambda *args: calls.append(1))
    ids = torch.tensor([[5, 6, 7], [8, 9, 10]])
    with torch.no_grad():
        out = coconut.generate(ids, torch.ones_like(ids), max_new_tokens=50)
    # the first EOS is kept (published behaviour), the second stops both rows
    assert out.tolist() == [[5, 6, 7, EOS], [8, 9, 10, EOS]]
    assert len(calls) == 2  # the prompt pass and one decoding pass, not 50


def test_align_latents_matches_the_collator_layout():
    rng = random.Random(4)
    examples = [make_example(rng, n, q, 2) for n, q in [(3, 4), (0, 6), (1, 9)]]
    batch = collate(examples)
    # scramble to right padding, then re-align
    rows = [ids for ids, _ in examples]
    width = max(map(len, rows))
    right = torch.stack([F.pad(r, (0, width - len(r)), value=EOS) for r in rows])
    mask = torch.stack([F.pad(torch.ones_like(r), (0, width - len(r))) for r in rows])
    ids, attention, positions = align_latents(right, mask, LATENT, EOS)
    assert ids.tolist() == batch["input_ids"].tolist()
    assert attention.tolist() == batch["attention_mask"].tolist()
    assert positions.tolist() == batch["position_ids"].tolist()


def test_misaligned_latents_are_refused():
    ids = torch.tensor([[1, LATENT, LATENT, 2], [1, 2, LATENT, 3]])
    with pytest.raises(LatentLayoutError, match="contiguous"):
        latent_columns(ids, LATENT)
    with pytest.raises(LatentLayoutError, match="first column"):  # nothing before it: no value for it
        Coconut(make_gpt2(VOCAB), LATENT, START, END, EOS)(torch.tensor([[LATENT, 1, 2]]), torch.ones(1, 3).long())


def test_passes_cover_the_sequence_in_n_plus_one_pieces():
    assert Coconut._segments(10, [4, 5, 6], 4) == [(0, 4), (4, 5), (5, 6), (6, 10)]
    assert Coconut._segments(10, [], 1) == [(0, 10)]
    # another rank needs more passes: split the tail, then empty passes
    assert Coconut._segments(10, [8], 4) == [(0, 8), (8, 9), (9, 10), None]


def test_bf16_forward_runs_and_stays_close():
    """A bf16 model fills the thoughts as the fp32 one does, within bf16's precision (the
    loss alone would not show it: an untrained model's loss barely depends on them)."""
    base = make_llama(VOCAB)
    batch = collate(mixed_batch(5, 1)[:3])
    is_latent = batch["input_ids"] == LATENT
    assert is_latent.any()  # premise: there are thoughts to fill
    with torch.no_grad():
        fp32 = Coconut(base, LATENT, START, END, EOS)(**batch)
        bf16 = Coconut(base.to(torch.bfloat16), LATENT, START, END, EOS)(**batch)
        unfilled = base.get_input_embeddings()(batch["input_ids"])[is_latent].float()
    assert abs(bf16.loss.item() - fp32.loss.item()) < 0.05 * fp32.loss.item()
    thoughts32, thoughts16 = fp32.inputs_embeds[is_latent], bf16.inputs_embeds[is_latent].float()
    assert relative_difference(thoughts16, thoughts32) < 0.05
    assert relative_difference(unfilled, thoughts32) > 0.5  # premise: an unfilled latent is far off


@pytest.mark.parametrize("layer_class", ["_BufferedLayer", "_UncopiedFirstLayer"])
def test_cache_layers_match_concatenation(layer_class):
    """The no-grad decoding cache and the training cache return exactly what
    concatenation would, across growth; the training cache keeps the first keys and
    values as they came (no copy onto an empty tensor)."""
    from transformers.cache_utils import DynamicLayer

    import coconut as coconut_module

    ours, plain = getattr(coconut_module, layer_class)(), DynamicLayer()
    torch.manual_seed(0)
    for i, length in enumerate([5, 1, 1, 40, 1, 100, 1]):  # forces the buffer to grow twice
        keys, values = torch.randn(2, 3, length, 4), torch.randn(2, 3, length, 4)
        got = ours.update(keys, values)
        want = plain.update(keys, values)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        if i == 0 and layer_class == "_UncopiedFirstLayer":
            assert got[0] is keys and got[1] is values
    assert ours.get_seq_length() == plain.get_seq_length() == 149


@pytest.mark.parametrize("arch", MODELS)
def test_training_passes_use_the_uncopied_first_cache_layer(arch, monkeypatch):
    """What the latent passes of a training step get (premise of the test above): every
    layer's first update is stored as it is."""
    import coconut as coconut_module

    first_updates = []
    original = coconut_module._UncopiedFirstLayer.update

    def counting(layer, keys, values, *args, **kwargs):
        first_updates.append(not layer.is_initialized)
        return original(layer, keys, values, *args, **kwargs)

    monkeypatch.setattr(coconut_module._UncopiedFirstLayer, "update", counting)
    base = MODELS[arch]()
    rng = random.Random(3)
    batch = collate([make_example(rng, 2, 5, 2)])
    Coconut(base, LATENT, START, END, EOS)(**batch).loss.backward()
    n_layers = base.config.num_hidden_layers
    assert sum(first_updates) == n_layers and len(first_updates) == 3 * n_layers  # 2 latents: 3 passes


@pytest.mark.parametrize("arch", MODELS)
def test_static_cache_decoding_matches_naive_reference(arch):
    """The CUDA decoding path (preallocated cache, one step per token), run eagerly here."""
    from compiling import CACHE_BUCKET, CapturedDecoder

    base = MODELS[arch]()
    coconut = Coconut(base, LATENT, START, END, EOS).eval()
    rng = random.Random(11)
    prompts = [make_example(rng, n, rng.randrange(2, 10), 1)[0][:-2] for n in [0, 1, 3, 6, 2, 0]]
    batch = collate([(p, p) for p in prompts])
    decoder = CapturedDecoder(coconut, capture=False)
    with torch.no_grad():
        ids, mask, positions = align_latents(batch["input_ids"], batch["attention_mask"], LATENT, EOS)
        for _ in range(2):  # the second call reuses (resets) the first call's cache
            got = coconut._assemble(ids, mask, *decoder.run(ids, mask, positions, 12))
        expected = [naive_generate(base, p, 12) for p in prompts]
    assert next(iter(decoder._caches))[1] == CACHE_BUCKET  # prompt + 12 tokens, rounded up
    for row, want in zip(got.tolist(), expected):
        assert row == want + [EOS] * (got.shape[1] - len(want))


def test_static_cache_decoding_stops_one_step_after_every_row_is_done():
    """The static-cache loop reads "every row done" a step late (compiling.LaggedFlag: on
    CUDA the host then prepares a step while the GPU runs the previous one): one step more
    than needed, whose token is EOS, and the same tokens as the eager loop."""
    from compiling import CapturedDecoder

    base = make_gpt2(VOCAB)
    prompt = make_example(random.Random(11), 2, 6, 1)[0][:-2]
    batch = collate([(prompt, prompt)])
    ids, mask, positions = align_latents(batch["input_ids"], batch["attention_mask"], LATENT, EOS)

    def decode(eos, static):
        coconut = Coconut(base, LATENT, START, END, eos).eval()
        decoder, steps = CapturedDecoder(coconut, capture=False), []
        call_step = decoder._call_step
        decoder._call_step = lambda *args: steps.append(1) or call_step(*args)
        with torch.no_grad():
            loop = decoder.run if static else lambda *args: coconut._decode_eager(*args, False)
            return coconut._assemble(ids, mask, *loop(ids, mask, positions, 12))[0, ids.shape[1]:].tolist(), len(steps)

    free, _ = decode(VOCAB, False)  # an EOS no token can be: all 12 tokens
    _, steps_to_the_end = decode(VOCAB, True)  # the prompt's steps, then 11
    stop = free[2]  # the tiny model's third token as EOS: decoding stops at the first repeat of it
    at = next(i for i in range(1, 12) if free[i] == stop)
    got, steps = decode(stop, True)
    assert got == free[:at] and got == decode(stop, False)[0]
    assert steps_to_the_end - steps == 11 - (at + 1)  # the steps for tokens 1..at, then one more


def test_training_forward_can_skip_the_full_logits():
    base = make_gpt2(VOCAB)
    coconut = Coconut(base, LATENT, START, END, EOS)
    batch = collate(mixed_batch(seed=3, c_thought=1))
    full = coconut(**batch)
    lean = coconut(**batch, return_logits=False)
    assert full.logits.shape == (*batch["input_ids"].shape, VOCAB) and lean.logits is None
    assert torch.equal(full.loss, lean.loss)
    # the returned logits give the loss: shifted cross-entropy over the supervised tokens
    want = F.cross_entropy(full.logits[:, :-1].reshape(-1, VOCAB), batch["labels"][:, 1:].reshape(-1))
    assert abs(full.loss.item() - want.item()) < TOLERANCE * want.item()


def test_validation_loss_is_the_mean_batch_loss_without_full_logits(monkeypatch):
    """evaluate.validation_loss: the mean of the batches' losses, as forward gives them,
    with the LM head applied only where the loss needs it (no (batch, seq, vocab) logits)."""
    from distributed import DistEnv
    from evaluate import validation_loss

    coconut = Coconut(make_gpt2(VOCAB), LATENT, START, END, EOS)
    examples = mixed_batch(seed=4, c_thought=1)
    with torch.no_grad():
        want = sum(coconut(**collate(examples[i : i + 3])).loss.item() for i in range(0, len(examples), 3)) / 3
    asked, forward = [], Coconut.forward

    def spied(self, *args, **kwargs):
        asked.append(kwargs.get("return_logits"))
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(Coconut, "forward", spied)
    got = validation_loss(coconut, examples, collate, 3, DistEnv())
    assert abs(got - want) < 1e-6 * want and asked == [False] * 3


@pytest.mark.parametrize("other_ranks_passes", [6, 40])
def test_passes_matched_to_other_ranks_keep_the_naive_loss_and_gradients(monkeypatch, other_ranks_passes):
    """Under FSDP every process runs as many decoder passes as the one that needs most
    (_all_ranks_max stands for that process here): this batch needs 3, so its tail is
    cut into one-column passes and, past its width (40), empty passes run tied into the
    loss with weight 0. Loss and gradients stay the naive reference's; the passes ran."""
    import coconut as coconut_module

    monkeypatch.setattr(coconut_module, "_all_ranks_max", lambda value, device: max(value, other_ranks_passes))
    base = make_gpt2(VOCAB)
    coconut = Coconut(base, LATENT, START, END, EOS)
    coconut.sync_passes_across_ranks = True
    rng = random.Random(5)
    examples = [make_example(rng, 2, 4, 3), make_example(rng, 2, 5, 2)]  # 3 passes, 14 columns
    calls = []
    base.transformer.h[0].register_forward_pre_hook(lambda module, args: calls.append(1))  # once a pass
    out = coconut(**collate(examples))
    assert len(calls) == other_ranks_passes
    grads = torch.autograd.grad(out.loss, list(base.parameters()))
    expected = naive_loss(base, examples)
    expected_grads = torch.autograd.grad(expected, list(base.parameters()))
    assert abs(out.loss.item() - expected.item()) < TOLERANCE * abs(expected.item())
    assert all(relative_difference(got, want) < TOLERANCE for got, want in zip(grads, expected_grads))


def test_chunked_loss_matches_plain_cross_entropy_across_chunks(monkeypatch):
    """Several chunks, a bias, and a scaled backward give plain autograd's numbers."""
    import coconut as coconut_module

    monkeypatch.setattr(coconut_module, "LOSS_CHUNK_ROWS", 7)
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50)
    hidden = torch.randn(3, 12, 16, requires_grad=True)
    labels = torch.randint(0, 50, (3, 12))
    labels[0, :5] = -100
    got = coconut_module.supervised_loss(hidden, labels, head)
    got_grads = torch.autograd.grad(3 * got, [hidden, head.weight, head.bias])
    want = F.cross_entropy(head(hidden)[:, :-1].reshape(-1, 50), labels[:, 1:].reshape(-1))
    want_grads = torch.autograd.grad(3 * want, [hidden, head.weight, head.bias])
    assert abs(got.item() - want.item()) < 1e-6 * want.item()
    for a, b in zip(got_grads, want_grads):
        assert relative_difference(a, b) < 1e-5
    # validation (no grad): the same loss, and none of the gradients' work
    with torch.no_grad(), torch.profiler.profile() as profile:
        quiet = coconut_module.supervised_loss(hidden, labels, head)
    assert quiet.item() == got.item()
    assert not [e.name for e in profile.events() if e.name in ("aten::mm", "aten::exp_", "aten::scatter_add_")]
    # a batch with nothing supervised: a NaN loss as F.cross_entropy's, and gradients of
    # zeros, not NaN (tensors all the same: every process under FSDP needs one)
    unsupervised = coconut_module.supervised_loss(hidden, torch.full_like(labels, -100), head)
    grads = torch.autograd.grad(unsupervised, [hidden, head.weight, head.bias])
    assert unsupervised.isnan() and all(g is not None and not g.any() for g in grads)


def test_chunked_loss_hands_its_head_gradient_over_without_a_copy(monkeypatch):
    """The backward scales the forward's fp32 head gradient in place and autograd keeps
    it as .grad: no second (vocab, hidden) buffer at the backward's start. A second
    backward through the same loss is refused with one line, not silently rescaled."""
    import coconut as coconut_module

    computed = []
    real = coconut_module._chunked_cross_entropy

    def spy(*args, **kwargs):
        total, grads = real(*args, **kwargs)
        # the head's gradient as computed, before any scaling, and where it lies (a reference
        # held here would make autograd copy it)
        computed.extend([grads[1].clone(), grads[1].data_ptr()])
        return total, grads

    monkeypatch.setattr(coconut_module, "_chunked_cross_entropy", spy)
    torch.manual_seed(2)
    head = torch.nn.Linear(16, 50, bias=False)
    hidden = torch.randn(2, 6, 16, requires_grad=True)
    labels = torch.randint(0, 50, (2, 6))
    loss = coconut_module.supervised_loss(hidden, labels, head)
    (4 * loss).backward(retain_graph=True)
    unscaled, address = computed
    count = (labels[:, 1:] != -100).sum()
    assert head.weight.grad.data_ptr() == address
    assert relative_difference(head.weight.grad, unscaled * 4 / count) < 1e-6
    with pytest.raises(RuntimeError, match="already backpropagated"):
        loss.backward()


@pytest.mark.parametrize("arch", MODELS)
def test_ready_made_pass_masks_equal_hugging_faces(arch):
    """pass_mask gives what create_causal_mask builds for a pass after a cached prefix,
    on rows with left and right padding (None from it means: causal, nothing padded)."""
    from transformers import DynamicCache
    from transformers.masking_utils import create_causal_mask

    from coconut import builds_plain_masks, pass_mask

    config = MODELS[arch]().config
    assert builds_plain_masks(config)
    attention_mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 0, 0],
                                   [1, 1, 1, 1, 1, 1, 1, 1, 1]])
    for start, end in [(4, 5), (5, 6), (6, 9), (3, 9), (8, 9)]:
        cache = DynamicCache(config=config)
        heads, head_dim = config.num_attention_heads, config.hidden_size // config.num_attention_heads
        for layer in range(config.num_hidden_layers):
            cache.update(torch.zeros(3, heads, start, head_dim), torch.zeros(3, heads, start, head_dim), layer)
        embeds = torch.zeros(3, end - start, config.hidden_size)
        positions = torch.arange(start, end)[None].expand(3, -1)
        want = create_causal_mask(config, embeds, attention_mask[:, :end], cache, positions)
        if want is None:
            want = torch.ones(end - start, end, dtype=torch.bool).tril(start)[None, None]
        got = pass_mask(attention_mask, start, end)
        assert torch.equal(got.expand(3, 1, end - start, end), want.expand(3, 1, end - start, end)), (start, end)


def test_latent_passes_skip_hugging_faces_mask_work_where_it_is_plain(monkeypatch):
    """Training with six latents has Hugging Face build one mask (the first pass), decoding
    one per prompt; a sliding-window or non-sdpa model keeps Hugging Face's masks."""
    from transformers.models.gpt2 import modeling_gpt2

    from coconut import builds_plain_masks

    calls = []  # the calls that build a mask: given the (batch, seq) padding mask, not a 4-D one
    real = modeling_gpt2.create_causal_mask

    def spy(*args, **kwargs):
        mask = kwargs["attention_mask"]  # None: Coconut's construction-time head check
        calls.extend([1] if mask is not None and mask.dim() == 2 else [])
        return real(*args, **kwargs)

    monkeypatch.setattr(modeling_gpt2, "create_causal_mask", spy)
    base = make_gpt2(VOCAB)
    coconut = Coconut(base, LATENT, START, END, EOS)
    rng = random.Random(3)
    coconut(**collate([make_example(rng, 6, 5, 2), make_example(rng, 6, 3, 3)])).loss.backward()
    assert len(calls) == 1
    calls.clear()
    prompt = make_example(rng, 6, 4, 1)[0][:-2]
    with torch.no_grad():
        coconut.generate(prompt[None], max_new_tokens=5)
    assert len(calls) == 1
    base.config._attn_implementation = "eager"
    assert not builds_plain_masks(base.config)
    calls.clear()
    coconut(**collate([make_example(rng, 6, 5, 2)]))
    assert len(calls) == 7
    from transformers import GPTNeoConfig, MistralConfig

    assert builds_plain_masks(MistralConfig(sliding_window=None, attn_implementation="sdpa"))
    assert not builds_plain_masks(MistralConfig(sliding_window=16, attn_implementation="sdpa"))
    assert not builds_plain_masks(GPTNeoConfig(attn_implementation="sdpa"))  # local layers: its own windows


def test_chunked_loss_under_bf16_autocast_matches_plain_cross_entropy(monkeypatch):
    """With autocast the chunks' logits are bf16 and the LM head is cast once for all of
    them: same loss and gradients as autocast's plain cross-entropy, to bf16 precision."""
    import coconut as coconut_module

    monkeypatch.setattr(coconut_module, "LOSS_CHUNK_ROWS", 7)
    torch.manual_seed(1)
    head = torch.nn.Linear(16, 50, bias=False)
    hidden = torch.randn(3, 12, 16, requires_grad=True)
    labels = torch.randint(0, 50, (3, 12))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = coconut_module.supervised_loss(hidden, labels, head)
        want = F.cross_entropy(head(hidden)[:, :-1].float().reshape(-1, 50), labels[:, 1:].reshape(-1))
    got_grads = torch.autograd.grad(got, [hidden, head.weight])
    want_grads = torch.autograd.grad(want, [hidden, head.weight])
    assert got.dtype == torch.float32 and abs(got.item() - want.item()) < 1e-2 * want.item()
    for a, b in zip(got_grads, want_grads):
        assert a.dtype == b.dtype == torch.float32 and relative_difference(a, b) < 2e-2


def test_the_head_gradient_under_fp16_autocast_does_not_overflow():
    """The head's gradient is formed per chunk as a sum over its rows, up to the chunk's
    row count times the mean's: with a large, consistent hidden feature that sum passes
    fp16's 65504 where the mean's does not. It is summed in fp32 (mixed_precision: fp16)."""
    import coconut as coconut_module

    torch.manual_seed(0)
    head = torch.nn.Linear(32, 64, bias=False)
    hidden = torch.randn(1, 1001, 32)
    hidden[..., 3] = 80.0  # an outlier feature
    hidden.requires_grad_(True)
    labels = torch.full((1, 1001), 5)  # one frequent target
    with torch.autocast("cpu", dtype=torch.float16):
        got = coconut_module.supervised_loss(hidden, labels, head)
        want = F.cross_entropy(head(hidden)[:, :-1].float().reshape(-1, 64), labels[:, 1:].reshape(-1))
    got_grad = torch.autograd.grad(got, [head.weight])[0]
    want_grad = torch.autograd.grad(want, [head.weight])[0]
    assert bool(torch.isfinite(want_grad).all()) and want_grad.abs().max() > 50  # premise: a large mean gradient
    assert bool(torch.isfinite(got_grad).all()) and relative_difference(got_grad, want_grad) < 2e-2
