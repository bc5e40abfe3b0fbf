"""Tokenizer and model construction for run.py (DESIGN §1 and the loading rules of DESIGN §5).

- `model_id` is a hub id or a local folder; a local folder with a config but no
  weights builds the model from scratch (said in the log).
- The three latent tokens are added to the tokenizer (ids: start, end, latent, in
  that order, as published). Methods that use them resize the embeddings and start
  the new rows as copies of the row of `<<` (the mean row when `<<` is not one token).
- `load_model_path`: a plain state dict loads into the base model (before the resize,
  so a CoT checkpoint feeds a coconut run); a coconut state dict (`base_causallm.*`)
  loads into the Coconut wrapper, and into a non-coconut run is an error.
- `build_empty_model`: the same modules on the meta device (no memory, no weights), for
  the processes of a sharded run that receive rank 0's weights (distributed.py).
- `checkpoint_blocks`: activation checkpointing per transformer block that stays exact
  when a block writes the KV cache, as Coconut's latent passes do.
"""

import functools
import glob
import os
import pickle
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch.utils.checkpoint import checkpoint
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.cache_utils import Cache

from cli import UserError, first_line
from coconut import Coconut, HeadMismatchError
from distributed import transformer_blocks
from layout import END, LATENT, START, LatentTokens
WRAPPER_PREFIX = "base_causallm."
# the published wrapper registered the input embedding as `embedding`, a second name
# for a weight `base_causallm.*` already holds
PUBLISHED_ALIAS_KEYS = ("embedding.weight",)
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth")


class ModelLoadError(UserError):
    """One line naming the file or key that cannot be loaded."""


@dataclass
class BuiltModel:
    model: torch.nn.Module  # what trains and is saved: Coconut or the base model
    base_causallm: torch.nn.Module
    tokenizer: object
    tokens: LatentTokens
    loaded_from: Optional[str]


def build_tokenizer(model_id: str):
    tokenizer, tokens, _ = load_tokenizer(model_id)
    return tokenizer, tokens


def load_tokenizer(model_id: str):
    """(tokenizer, tokens, already): `already`, the three tokens were in model_id's own
    tokenizer (a model export.py wrote, say), whose rows then hold trained values."""
    tokenizer = AutoTokenizer.from_pretrained(model_id)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # special, so decoding with skip_special_tokens drops them from answers
    already = tokenizer.add_tokens([START, END, LATENT], special_tokens=True) == 0
    return tokenizer, LatentTokens.of(tokenizer), already


def has_weights(model_id: str) -> bool:
    if not os.path.isdir(model_id):
        return True  # a hub id: from_pretrained fetches the weights
    return any(glob.glob(os.path.join(model_id, p)) for p in WEIGHT_PATTERNS)


def load_base_model(model_id: str, log, weights_from: Optional[str] = None,
                    weights_dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The model in fp32, whatever dtype its files or config name (transformers 5 would
    keep a bf16 checkpoint's bf16: parameters and AdamW state below fp32, which the
    precision settings promise, DESIGN §5); `bf16: True` casts the parameters afterwards,
    as published.
    weights_dtype: the dtype saved weights are read in (bf16 for `bf16: True` runs: the
    values that loading in fp32 then casting give, in half the host memory); a model
    built from its config is initialised in fp32 all the same (the same random values).
    weights_from: the checkpoint that will supply the weights, if any (for the log; it also
    covers tensors the model's own files lack). ModelLoadError (one line) for weights that
    do not load, or that lack tensors of the model its config.json describes (they would
    train from random values without a word)."""
    if has_weights(model_id):
        from safetensors import SafetensorError

        try:
            model, info = AutoModelForCausalLM.from_pretrained(model_id, dtype=weights_dtype, output_loading_info=True)
        except (OSError, RuntimeError, ValueError, KeyError, SafetensorError, pickle.UnpicklingError) as e:
            raise ModelLoadError(f"model {model_id}: its weights do not load ({first_line(e)})") from None
        missing = sorted(info["missing_keys"])
        if missing and weights_from is None:
            raise ModelLoadError(f"model {model_id}: its weights lack {len(missing)} tensor(s) of the model its "
                                 f"config.json describes (first: {missing[0]}): config and weights do not match")
        return model
    model_type = AutoConfig.from_pretrained(model_id).model_type
    if weights_from is None:
        log(f"no weights in {model_id}: training {model_type} from scratch")
    else:
        log(f"no weights in {model_id}: building {model_type} from its config; the weights come from {weights_from}")
    return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_id), dtype=torch.float32)


def init_new_token_rows(model, tokenizer, tokens: LatentTokens, log, already_in_tokenizer=False) -> None:
    """Resize and start the three new rows as copies of `<<` (stabilises training).

    Not when the tokens were in the model's own tokenizer and its embeddings have their
    rows (a model export.py wrote): those rows are trained and stay as they are.
    """
    rows_before = model.get_input_embeddings().weight.shape[0]
    new_ids = [tokens.start_id, tokens.end_id, tokens.latent_id]
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # rows are set below
    if already_in_tokenizer and max(new_ids) < rows_before:
        log("the model's tokenizer already holds the latent tokens, and its embeddings their rows: kept as they are")
        return
    # the token `<<` by name, as the vocabulary holds it: encoding the text "<<" gives
    # another token (or two) where the tokenizer marks a word's start ("▁<<")
    source = tokenizer.get_vocab().get("<<")
    matrices = [model.get_input_embeddings().weight]
    head = model.get_output_embeddings()
    if head is not None and head.weight is not matrices[0]:
        matrices.append(head.weight)
    if source is None:
        log("'<<' is not one token of this tokenizer: new token rows start as the mean embedding")
    with torch.no_grad():
        for weight in matrices:
            old_rows = weight[: min(new_ids)]
            row = weight[source].clone() if source is not None else old_rows.float().mean(0).to(weight.dtype)
            for token_id in new_ids:
                weight[token_id] = row


def is_wrapper_state(state: dict) -> bool:
    return any(k.startswith(WRAPPER_PREFIX) for k in state)


def load_state_checked(module, state: dict, path: str) -> None:
    """load_state_dict that tolerates only tied or published alias keys."""
    state = {k: v for k, v in state.items() if k not in PUBLISHED_ALIAS_KEYS}
    expected = module.state_dict()
    for key, value in state.items():
        if key in expected and tuple(value.shape) != tuple(expected[key].shape):
            raise ModelLoadError(f"{path}: {key} has shape {tuple(value.shape)} in the checkpoint but "
                                 f"{tuple(expected[key].shape)} in this model (a checkpoint of another model?)")
    result = module.load_state_dict(state, strict=False)
    tied = _tied_keys(module)
    missing = [k for k in result.missing_keys if k not in tied]
    if missing or result.unexpected_keys:
        keys = (missing or result.unexpected_keys)[:3]
        kind = "is missing" if missing else "has unexpected"
        raise ModelLoadError(f"{path}: checkpoint {kind} keys {keys} for this model")


def holds_new_token_rows(base, state: dict, vocab_with_new_tokens: int) -> bool:
    """Whether a plain state dict's input embedding already has the three new rows."""
    weight = base.get_input_embeddings().weight
    name = next((n for n, p in base.named_parameters() if p is weight), None)
    return (name in state and state[name].shape[0] == vocab_with_new_tokens
            and weight.shape[0] != vocab_with_new_tokens)


def _tied_keys(module) -> set:
    """Names of parameters that share storage with another, earlier-named parameter."""
    seen, tied = {}, set()
    for name, param in module.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            tied.add(name)
        seen.setdefault(id(param), name)
    return tied


def build_model(config, state: Optional[dict], state_path: Optional[str], log) -> BuiltModel:
    """Tokenizer, base model, new tokens, optional weights, and the wrapper if coconut."""
    tokenizer, tokens, already = load_tokenizer(config.model_path)
    base = load_base_model(config.model_path, log, state_path if state is not None else None,
                           torch.bfloat16 if config.bf16 else torch.float32)
    model = place_weights(config, base, tokenizer, tokens, state, state_path,
                          add_token_rows=lambda b: init_new_token_rows(b, tokenizer, tokens, log, already))
    if config.bf16:
        cast_parameters(model, torch.bfloat16)
    return BuiltModel(model, base, tokenizer, tokens, state_path if state is not None else None)


def cast_parameters(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """`bf16: True`'s cast of every parameter, as published (tied ones stay one; also those
    transformers would keep in fp32 for some models, `_keep_in_fp32_modules`), not of the
    buffers: rotary embeddings' inv_freq stays fp32, as transformers keeps it for a model
    loaded in bf16; `model.to(dtype)` would round it, and with it every position's angle
    (by up to 0.18 rad within 1,000 positions)."""
    for param in model.parameters():
        param.data = param.data.to(dtype)


def place_weights(config, base, tokenizer, tokens, state: Optional[dict], state_path: Optional[str],
                  add_token_rows: Callable) -> torch.nn.Module:
    """DESIGN §5's loading rules, in the one order build_model and the pre-flight check
    (on a meta-device copy) both follow: the checkpoint into `base` before or after its
    new token rows (`add_token_rows(base)`, for methods with latent tokens), or into the
    Coconut wrapper. Returns the model the run trains (the wrapper or `base`)."""
    wrapper_state = state is not None and is_wrapper_state(state)
    if wrapper_state and not config.method.fills_latents:
        raise ModelLoadError(f"{state_path}: coconut weights (base_causallm.*) cannot load into a {config.method} run")
    plain_state = state is not None and not wrapper_state
    resized_state = plain_state and holds_new_token_rows(base, state, len(tokenizer))
    if plain_state and not resized_state:
        load_state_checked(base, state, state_path)  # e.g. a CoT checkpoint to skip stage 0
    if config.method.latent_tokens:
        add_token_rows(base)
    elif resized_state:
        base.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # the checkpoint sets the rows
    if resized_state:  # e.g. a pause_as_thought checkpoint: its embeddings hold the new rows
        load_state_checked(base, state, state_path)
    model = _wrap(config, base, tokenizer, tokens)
    if wrapper_state:
        load_state_checked(model, state, state_path)
    return model


def _wrap(config, base, tokenizer, tokens):
    if config.method.fills_latents:
        try:
            return Coconut(base, tokens.latent_id, tokens.start_id, tokens.end_id, tokenizer.eos_token_id)
        except HeadMismatchError as e:
            raise ModelLoadError(f"model {config.model_path}: {e}") from None
    return base


def build_empty_model(config, dtype: torch.dtype, embedding_rows: int) -> BuiltModel:
    """build_model's modules on the meta device, in `dtype` and with `embedding_rows`
    rows (those of rank 0's model: place_weights adds the new tokens' rows for latent
    methods, and for a checkpoint that holds them): no memory and no weights until
    distributed.fill_from_main gives them rank 0's."""
    tokenizer, tokens = build_tokenizer(config.model_path)
    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(config.model_path), dtype=dtype)
        if base.get_input_embeddings().weight.shape[0] != embedding_rows:
            base.resize_token_embeddings(embedding_rows, mean_resizing=False)
    return BuiltModel(_wrap(config, base, tokenizer, tokens), base, tokenizer, tokens, None)


# ------------------------------------------------------------------ fused activation
def fuse_gelu(model) -> int:
    """Replace each `gelu_new` activation module (NewGELUActivation: GPT-2, GPT-J, Phi, ...)
    by transformers' GELUTanh, in place; returns how many.

    gelu_new is Python arithmetic over the (batch, seq, 4 x hidden) MLP activation: eight
    elementwise operations forward and about as many backward, one kernel each on a GPU.
    GELUTanh computes the same formula, 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))),
    as one operation (F.gelu(approximate="tanh")): equal to float rounding (fp32: about
    1e-7 relative). Modules only: the config (activation_function) and the state dict
    stay as they are, so a saved model is unchanged. `fused_gelu: False` keeps gelu_new.
    """
    from transformers.activations import GELUTanh, NewGELUActivation

    swapped = 0
    for parent in model.modules():
        for name, child in list(parent.named_children()):
            if type(child) is NewGELUActivation:
                setattr(parent, name, GELUTanh())
                swapped += 1
    return swapped


# ------------------------------------------------------------------ activation checkpointing
def checkpoint_blocks(base_causallm) -> int:
    """Recompute each transformer block's activations in the backward pass instead of
    keeping them (torch.utils.checkpoint, non-reentrant). Returns the number of blocks.

    The block's `forward` is replaced, not its `__call__`, so FSDP's hooks stay outside
    and run once. Hugging Face's own gradient checkpointing turns the KV cache off in
    training, which Coconut's latent passes need; here the cache stays on (see
    `_checkpointed`).
    """
    blocks = transformer_blocks(base_causallm)
    for block in blocks:
        block.forward = functools.partial(_checkpointed, block.forward)
    return len(blocks)


def _checkpointed(forward, *args, **kwargs):
    """forward(*args, **kwargs), its activations recomputed in the backward pass.

    A block appends its keys and values to the KV cache; when the backward pass
    recomputes it, later passes have appended more. So the recomputation runs with the
    cache as it was at the first call (cache layers replace their tensors instead of
    writing into them, so the old ones are intact) and puts the later state back after.
    """
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    cache = next((v for v in (*args, *kwargs.values()) if isinstance(v, Cache)), None)
    at_first_call = _cache_state(cache)
    calls = 0

    def run(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == 1 or cache is None:
            return forward(*args, **kwargs)
        now = _cache_state(cache)
        _set_cache_state(cache, at_first_call)
        try:
            return forward(*args, **kwargs)
        finally:  # also when checkpoint stops the recomputation early
            _set_cache_state(cache, now)

    return checkpoint(run, *args, use_reentrant=False, **kwargs)


def _cache_state(cache):
    if cache is None:
        return None
    return list(cache.layers), [dict(layer.__dict__) for layer in cache.layers]


def _set_cache_state(cache, state) -> None:
    layers, attributes = state
    cache.layers = list(layers)
    for layer, saved in zip(layers, attributes):
        layer.__dict__.clear()
        layer.__dict__.update(saved)
