"""The Coconut module: a causal LM that reasons with continuous thoughts.

`Coconut` wraps any Hugging Face decoder-only causal LM. At every `<|latent|>`
position the input embedding is replaced by the model's own last-layer hidden state
at the position just before it (DESIGN §4). Batches come from `dataset.MyCollator`,
which puts the i-th latent of every example in the same column; that lets pass i
fill the i-th latents of the whole batch at once and reuse the KV cache, so a step
with N latents costs one forward over the sequence split into N + 1 pieces.

The passes run the transformer stack alone (`decoder_of(base_causallm)`): a latent
needs only the last hidden state, so no LM head and no per-layer hidden states there.
The loss applies the LM head only where labels are supervised, in chunks. A pass over
one column (a latent, a decoded token) of a GPT-2 runs in fewer operations
(lean_passes.py), with the same results bit for bit.

    model = Coconut(AutoModelForCausalLM.from_pretrained(...), latent_id, start_id, end_id, eos_id)
    out = model(**batch)            # out.loss, out.logits, out.inputs_embeds
    out = model(**batch, return_logits=False)   # training: the same loss, no (batch, seq, vocab) logits
    tokens = model.generate(**prompt_batch, max_new_tokens=64)

This module knows nothing of files, configs or ranks, except one collective used
when several processes must run the same number of forward passes (FSDP).
"""

import contextlib
import functools
import inspect
import json
import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

import lean_passes
from utils import METHODS


@dataclass
class CoconutOutput:
    loss: Optional[torch.Tensor]
    inputs_embeds: torch.Tensor  # (batch, seq, hidden), latents filled
    logits: Optional[torch.Tensor]  # (batch, seq, vocab); None with return_logits=False


class LatentLayoutError(ValueError):
    """The batch does not put the i-th latent of every example in one column."""


def _all_ranks_max(value: int, device: torch.device) -> int:
    """The largest `value` over all processes (itself when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    t = torch.tensor([value], dtype=torch.long, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def standalone(t: torch.Tensor) -> torch.Tensor:
    """`t` contiguous and not a view: compiled graphs guard on strides, and on a view's
    base, so a view and a copy of the same shape would each compile a graph."""
    return t.clone(memory_format=torch.contiguous_format) if t._base is not None else t.contiguous()


# Model types whose decoder builds its mask with create_causal_mask and nothing else
# (read in their transformers 5 modeling files) once the config has no sliding window and
# no sliding or chunked layers; other models (GPT-Neo's local layers, Gemma 3's image
# tokens, ...) keep Hugging Face's own masks.
PLAIN_MASK_MODEL_TYPES = frozenset(
    {"gpt2", "llama", "mistral", "qwen2", "qwen3", "phi", "phi3", "olmo", "olmo2", "gemma", "granite", "smollm3"})


def text_config(config):
    """The config of the language model itself: a model that AutoModelForCausalLM builds
    around a multimodal checkpoint (Gemma 3 from 4B on, Gemma 3n, ...) keeps its attention
    settings (sliding window, layer types, soft-capping, positions) in `text_config`."""
    get = getattr(config, "get_text_config", None)
    return get() if get is not None else config


def context_length(config) -> Optional[int]:
    """The model's positions (max_position_embeddings or n_positions), None when its config
    does not say."""
    config = text_config(config)
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def decoder_of(causal_lm) -> nn.Module:
    """The transformer stack without the LM head (GPT2Model, LlamaModel, ...): the model's
    base_model, or its `model` where base_model_prefix names no attribute of it (Llama 4's
    and Mllama's causal LMs, whose base_model is then the causal LM itself)."""
    base = causal_lm.base_model
    if base is causal_lm and isinstance(getattr(causal_lm, "model", None), nn.Module):
        return causal_lm.model
    return base


def builds_plain_masks(config) -> bool:
    """Whether every layer of the decoder attends with the plain causal-and-padding mask in
    sdpa's boolean form (no sliding window, no chunked attention), so a pass may be given
    that mask ready-made (pass_mask) instead of Hugging Face building it."""
    config = text_config(config)
    return (getattr(config, "model_type", None) in PLAIN_MASK_MODEL_TYPES
            and getattr(config, "_attn_implementation", None) == "sdpa"
            and getattr(config, "sliding_window", None) is None
            and getattr(config, "attention_chunk_size", None) is None
            and all(kind == "full_attention" for kind in getattr(config, "layer_types", None) or ()))


def pass_mask(attention_mask: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """(batch, 1, end - start, end) bool: query column q sees key column k when k <= q and k
    is real (attention 1), the mask Hugging Face's create_causal_mask builds for sdpa.

    Built here for the passes that follow a cached prefix, because Hugging Face's
    per-call mask work is some 20 small operations and, in eager mode, a read of a
    tensor's value (a GPU sync) in every latent pass.
    """
    keys = attention_mask[:, None, None, :end].bool()  # (batch, 1, 1, end)
    if end - start == 1:  # one query, the last column: causality hides nothing from it
        return keys
    cols = torch.arange(end, device=attention_mask.device)
    return keys & (cols <= cols[start:end, None])  # (batch, 1, end - start, end)


# Decoders Coconut cannot run pass by pass, and why: each was tried and fails or gives
# other numbers than the naive reference (a shape error in every pass on a cache for
# Mamba), except Reformer and xLSTM, which transformers' own generate gives no DynamicCache.
_WHOLE_PREFIX_MASK = ("their decoder applies the whole prefix's attention mask to each pass, which Coconut's passes "
                      "on a cache (validation, generation) cannot give it")
_NO_CACHE = ("they keep no state in transformers' cache (no key-value cache at all, or a state of their own), so a "
             "latent pass cannot continue the passes before it")
UNSUPPORTED_MODEL_TYPES = {
    "mamba": ("Mamba", _WHOLE_PREFIX_MASK),
    "falcon_mamba": ("FalconMamba", _WHOLE_PREFIX_MASK),
    "openai-gpt": ("OpenAI GPT", _NO_CACHE),
    "rwkv": ("RWKV", _NO_CACHE),
    "xlnet": ("XLNet", _NO_CACHE),
    "reformer": ("Reformer", _NO_CACHE),
    "xlstm": ("xLSTM", _NO_CACHE),
    "minimax": ("MiniMax", _NO_CACHE),  # its linear-attention cache refuses a DynamicCache (MiniMax M2 is "minimax_m2")
    "ctrl": ("CTRL", "their forward scales inputs_embeds in place, which would overwrite the input embeddings "
                     "that Coconut's passes keep for the backward"),
    "recurrent_gemma": ("RecurrentGemma", "their recurrent layers keep their state in the modules and start it again "
                                          "at every pass over several columns, so passes on a cache (validation, "
                                          "generation) cannot continue a prefix"),
}


def unsupported_model(config) -> Optional[str]:
    """Why Coconut cannot run this model, None when it can."""
    config = text_config(config)
    model_type = getattr(config, "model_type", None) or ""
    if model_type in UNSUPPORTED_MODEL_TYPES:
        name, why = UNSUPPORTED_MODEL_TYPES[model_type]
        return f"{name} models are not supported: {why}"
    if model_type.startswith("gemma3n") and getattr(config, "hidden_size_per_layer_input", 0):
        return ("Gemma 3n models are not supported: they look up a second embedding per layer "
                "(hidden_size_per_layer_input) by token id, and given input embeddings, as Coconut's passes give "
                "them, transformers' Gemma 3n leaves it out for every token")
    if model_type.startswith("gemma4") and getattr(config, "hidden_size_per_layer_input", 0):
        return ("Gemma 4 models with per-layer embeddings are not supported: they look up a second embedding "
                "(hidden_size_per_layer_input) by each position's token id, found by matching the input embedding "
                "to a row of the embedding matrix, and a continuous thought matches none")
    return None


# Models whose attention positions are the columns of the batch, not position_ids or the
# mask: MPT's ALiBi bias. Padding between a prompt and its new tokens would move them, so
# they decode in gapless sub-batches, as local-attention models do.
COLUMN_POSITION_MODEL_TYPES = {"mpt"}

# Models that continue a cached prefix exactly only one column at a time: transformers'
# Jamba restarts its Mamba scan from zero in a pass over several columns on a cache. Their
# passes on a cache after the first go one column at a time (exact, slower).
ONE_COLUMN_CONTINUATION_MODEL_TYPES = {"jamba"}


def holds_recurrent_states(config) -> bool:
    """Whether the model's cache holds recurrent states (the linear-attention and Mamba
    layers of hybrid models: Granite 4.0-H, Jamba, Qwen3-Next, ...), which its layers
    update in place: a later latent pass would overwrite what an earlier pass saved for
    the backward, so training runs those models' passes without a cache. (Layers that
    cache nothing of their own, such as Gemma 3n's key-value sharing ones, are not.)"""
    layers = DynamicCache(config=config).layers
    try:
        from transformers.cache_utils import LinearAttentionCacheLayerMixin as recurrent
    except ImportError:  # an earlier transformers 5 release: any layer of its own that is no key-value one
        return any(not isinstance(layer, DynamicLayer) and type(layer).__name__ != "DummyLayer" for layer in layers)
    return any(isinstance(layer, recurrent) for layer in layers)


def latent_columns(input_ids: torch.Tensor, latent_id: int) -> list:
    """Column of the i-th latent, shared by every example that has one.

    Raises LatentLayoutError when the i-th latents of two examples sit in different
    columns or an example's latents are not contiguous (use MyCollator).
    """
    if latent_id is None:  # a plain decoder: no continuous thoughts
        return []
    is_latent = input_ids == latent_id  # (batch, seq)
    n_latents = int(is_latent.sum(1).max())
    if n_latents == 0:
        return []
    rows, cols = is_latent.nonzero(as_tuple=True)
    rank_in_row = is_latent.long().cumsum(1)[rows, cols] - 1
    first_col = int(cols.min())
    if not bool((cols - rank_in_row == first_col).all()):
        raise LatentLayoutError(
            "latent tokens must be contiguous and the first latent of every example in the same "
            "column; batch the examples with dataset.MyCollator"
        )
    if first_col == 0:  # its value is the last hidden state before it: there is none
        raise LatentLayoutError("a latent token in the first column has no token before it to take its value from; "
                                "a prompt starts with the question")
    return [first_col + i for i in range(n_latents)]


def align_latents(input_ids: torch.Tensor, attention_mask: torch.Tensor, latent_id: int, pad_id: int,
                  right_align: bool = False):
    """Re-lay out any padded batch the way MyCollator does (DESIGN §3), vectorised.

    Real tokens (attention 1) keep their order; rows with latents are shifted right
    so their first latents share a column; the rest is padding with attention 0.
    right_align: every row ends at the last column instead (left padding only), which
    shares the first latents' column only when every row with latents has as many
    real tokens from its first latent on (gapless_groups makes such batches).
    Returns (input_ids, attention_mask, position_ids), each (batch, new_seq).
    """
    batch, seq = input_ids.shape
    real = attention_mask.bool()
    lengths = real.sum(1)  # (batch,)
    # stable sort moves each row's real tokens to its front, in order
    order = torch.sort((~real).to(torch.int8), dim=1, stable=True).indices
    packed = input_ids.gather(1, order)  # (batch, seq), real tokens first
    cols = torch.arange(seq, device=input_ids.device).expand(batch, seq)
    in_row = cols < lengths[:, None]
    is_latent = (packed == latent_id) & in_row if latent_id is not None else torch.zeros_like(in_row)
    has_latent = is_latent.any(1)
    first_latent = torch.where(has_latent, is_latent.float().argmax(1), torch.zeros_like(lengths))
    target = first_latent[has_latent].max() if bool(has_latent.any()) else first_latent.new_tensor(0)
    shift = torch.where(has_latent, target - first_latent, torch.zeros_like(lengths))
    if right_align:
        shift = lengths.max() - lengths
    width = int((shift + lengths).max())
    new_cols = torch.where(in_row, cols + shift[:, None], width)  # padding goes to a dropped column
    new_ids = input_ids.new_full((batch, width + 1), pad_id).scatter(1, new_cols, packed)[:, :width]
    new_mask = input_ids.new_zeros((batch, width + 1)).scatter(1, new_cols, in_row.long())[:, :width]
    position_ids = ((new_mask.cumsum(1) - 1).clamp(min=0) * new_mask).long()
    return new_ids, new_mask, position_ids


def local_attention_window(config) -> Optional[int]:
    """The fewest last columns a layer attends to (a sliding window, an attention chunk,
    GPT-Neo's local layers), None when every layer attends to the whole sequence; 0 when
    some layer is local but the config names no size. Past that many columns, a padding
    column between a prompt and its generated tokens takes the place of a real token."""
    config = text_config(config)

    def positive(name):
        value = getattr(config, name, None)
        return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None

    layer_types = getattr(config, "layer_types", None)
    if layer_types:  # transformers 5 names each layer's kind: the sizes below matter only for local ones
        local = any(kind != "full_attention" for kind in layer_types)
    elif getattr(config, "attention_layers", None):  # GPT-Neo
        local = any(kind != "global" for kind in config.attention_layers)
    else:
        local = positive("sliding_window") is not None or positive("attention_chunk_size") is not None
    if not local:
        return None
    sizes = [size for size in map(positive, ("sliding_window", "attention_chunk_size", "window_size")) if size]
    return min(sizes) if sizes else 0


def gapless_groups(input_ids: torch.Tensor, attention_mask: torch.Tensor, latent_id) -> list:
    """Row indices of sub-batches that decode without padding inside any row: right-aligned
    (align_latents' right_align), the rows of one group keep their first latents in one
    column when they have as many real tokens from the first latent on, so rows are grouped
    by that count; rows without latents join the first group."""
    real = attention_mask.bool()
    is_latent = (input_ids == latent_id) & real if latent_id is not None else torch.zeros_like(real)
    from_first_latent = (real & (is_latent.long().cumsum(1) > 0)).sum(1)  # (batch,)
    tails = torch.where(is_latent.any(1), from_first_latent, -1).tolist()
    groups = {}
    for row, tail in enumerate(tails):
        groups.setdefault(tail, []).append(row)
    plain = groups.pop(-1, [])
    ordered = [groups[tail] for tail in sorted(groups)] or [[]]
    ordered[0] = sorted(ordered[0] + plain)
    return ordered


# Rows of the LM head's logits computed at once by the loss: (rows, vocab) fp32 at a time,
# about 200 MB for GPT-2's vocabulary, never (batch, seq, vocab).
LOSS_CHUNK_ROWS = 1024


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of F.linear(hidden, weight, bias) against targets, chunk by chunk.

    The gradients are computed in the forward, chunk by chunk, so neither the logits nor
    their fp32 softmax are kept for the backward; the backward scales them. Same sums
    and the same gradients as the plain cross-entropy of the full logits.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, transform=None):
        total, grads = _chunked_cross_entropy(hidden, weight, bias, targets, ctx.needs_input_grad, transform)
        # kept on ctx, not saved for backward: the backward scales them in place and hands
        # them over, so the head's fp32 (vocab, hidden) gradient becomes .grad as it is,
        # with no second buffer of that size for the scaled copy
        ctx.grads = grads
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        if ctx.grads is None:
            raise RuntimeError("Coconut's loss was already backpropagated: its gradients were computed in the "
                               "forward and scaled in place by the first backward; run the forward again")
        (grad_hidden, grad_weight, grad_bias), ctx.grads = ctx.grads, None
        weight_dtype, bias_dtype = ctx.dtypes

        def scaled(grad, dtype):
            return None if grad is None else grad.mul_(grad_total).to(dtype)

        return (scaled(grad_hidden, None if grad_hidden is None else grad_hidden.dtype),
                scaled(grad_weight, weight_dtype), scaled(grad_bias, bias_dtype), None, None)


def _chunked_cross_entropy(hidden, weight, bias, targets, needs=(False, False, False), transform=None) -> tuple:
    """(summed loss, (grad_hidden, grad_weight, grad_bias)) of _LinearCrossEntropy; a
    gradient is computed only where `needs` asks (all None without grad mode: validation).
    `transform` (logit_transform's) is applied to the head's output first."""
    # hidden (n, hidden), weight (vocab, hidden), bias (vocab,) or None, targets (n,)
    total = hidden.new_zeros((), dtype=torch.float32)
    grad_hidden = torch.empty_like(hidden) if needs[0] else None
    # the head's gradients are summed in fp32, starting from the first chunk's (no zero-fill
    # of a (vocab, hidden) buffer)
    grad_weight = grad_bias = None
    wants_weight, wants_bias = needs[1], bias is not None and needs[2]
    wanted = grad_hidden is not None or wants_weight or wants_bias
    compute_weight = None  # for grad_hidden: the weight in the logits' dtype, cast once for every chunk
    for start in range(0, hidden.shape[0], LOSS_CHUNK_ROWS):
        rows = hidden[start : start + LOSS_CHUNK_ROWS]
        target = targets[start : start + LOSS_CHUNK_ROWS, None]  # (rows, 1)
        logits = F.linear(rows, weight, bias)  # (rows, vocab), autocast's dtype
        if grad_hidden is not None and compute_weight is None:
            compute_weight = weight.to(logits.dtype)
        if transform is not None:  # d(loss) / d(logits) through the transform, by autograd on this chunk
            with torch.enable_grad():
                head_out = logits.detach().requires_grad_(wanted)
                chunk_total = F.cross_entropy(transform(head_out).float(), target[:, 0], reduction="sum")
            total = total + chunk_total.detach()
            if not wanted:
                continue
            grad_logits = torch.autograd.grad(chunk_total, head_out)[0]
        else:
            log_probs = logits.float().log_softmax(-1)
            total = total - log_probs.gather(1, target).sum()
            if not wanted:
                continue
            grad_logits = log_probs.exp_().scatter_add_(1, target, log_probs.new_full(target.shape, -1.0))
            grad_logits = grad_logits.to(logits.dtype)  # d(sum of losses) / d(logits)
        if grad_hidden is not None:
            grad_hidden[start : start + LOSS_CHUNK_ROWS] = grad_logits @ compute_weight
        if wants_weight:
            grad_weight = _fp32_sum(grad_weight, _rows_sum(grad_logits, rows))
        if wants_bias:
            grad_bias = _fp32_sum(grad_bias, grad_logits.sum(0))
    if wants_weight and grad_weight is None:  # no supervised row
        grad_weight = torch.zeros_like(weight, dtype=torch.float32)
    if wants_bias and grad_bias is None:
        grad_bias = torch.zeros_like(bias, dtype=torch.float32)
    return total, (grad_hidden, grad_weight, grad_bias)


def _rows_sum(grad_logits: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """grad_logits.t() @ rows, the head's gradient summed over a chunk's rows (up to
    LOSS_CHUNK_ROWS times the mean's): in fp32 outside autocast when the logits are fp16,
    whose 65504 such a sum can pass; in the logits' dtype otherwise."""
    if grad_logits.dtype != torch.float16:
        return grad_logits.t() @ rows.to(grad_logits.dtype)
    with torch.autocast(rows.device.type, enabled=False):
        return grad_logits.t().float() @ rows.float()


def _fp32_sum(total: Optional[torch.Tensor], term: torch.Tensor) -> torch.Tensor:
    """total + term in fp32, in place; the first term itself when it is fp32 already."""
    return term.float() if total is None else total.add_(term)


def logit_transform(config) -> Optional[Callable]:
    """What the model's own causal-LM forward does to its LM head's output, for models
    that do something (None for the others: GPT-2, Llama, Qwen, ...), read in their
    transformers 5 modeling files: Granite divides the logits by `logits_scaling` and
    HyperCLOVAX multiplies them by it, Cohere multiplies them by `logit_scale`, Gemma 2
    and later soft-cap them at `final_logit_softcapping`.
    Each keeps the logits' order, so greedy decoding needs none of them; the loss and
    returned logits do. Coconut checks the result against the model's own forward
    (check_head_matches_model)."""
    config = text_config(config)
    model_type = getattr(config, "model_type", "") or ""

    def factor(name):  # a factor of 1 changes nothing
        value = getattr(config, name, None)
        return None if value in (None, 1) else value

    scaling, scaling_multiplies = factor("logits_scaling"), model_type.startswith("hyperclovax")
    divisor = None if scaling_multiplies else scaling
    multipliers = [value for value in (scaling if scaling_multiplies else None,
                                       factor("logit_scale") if "cohere" in model_type else None) if value is not None]
    softcap = getattr(config, "final_logit_softcapping", None)
    if divisor is None and not multipliers and softcap is None:
        return None

    def transform(logits):  # (..., vocab), in the head's dtype, as the model's forward computes it
        if divisor is not None:
            logits = logits / divisor
        for multiplier in multipliers:
            logits = logits * multiplier
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        return logits

    return transform


def _is_sharded(tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch without distributed support
        return False
    return isinstance(tensor, DTensor)


class HeadMismatchError(ValueError):
    """The model's forward does to its LM head's output what logit_transform does not."""


@torch.no_grad()
def check_head_matches_model(coconut) -> None:
    """HeadMismatchError unless the decoder stack, the LM head and logit_transform give the
    model's own logits, on two tokens in eval mode: the loss would otherwise train another
    objective than the model's, without a word. Both sides run in the precision the
    model's forward runs in (an autocast wrapper of the run's included: read inside it).
    Skipped on the meta device and on sharded (FSDP) parameters: the model is checked
    where it is built, before sharding."""
    base, head = coconut.base_causallm, coconut.lm_head
    if head.weight.is_meta or _is_sharded(head.weight):
        return
    device = head.weight.device
    precision = []  # (autocast on, its dtype) where the model's forward applies its head

    def read_precision(module, args, output):
        precision.append((torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type)))

    was_training = base.training
    base.eval()
    hook = head.register_forward_hook(read_precision)
    try:
        embeds = coconut.embedding(torch.tensor([[0, 1]], device=device))
        theirs = base(inputs_embeds=embeds.clone()).logits.float()  # a copy each: a forward may write into it
        enabled, dtype = precision[0] if precision else (False, None)  # the forward's own call, read first
        with torch.autocast(device.type, dtype=dtype, enabled=enabled):
            ours = head(coconut.decoder(inputs_embeds=embeds.clone()).last_hidden_state)
            if coconut.logit_transform is not None:
                ours = coconut.logit_transform(ours)
    finally:
        hook.remove()
        base.train(was_training)
    ours = ours.float()
    if ours.shape != theirs.shape or not bool(((ours - theirs).norm() <= 1e-3 * theirs.norm() + 1e-6).item()):
        raise HeadMismatchError(
            f"{type(base).__name__} ({getattr(base.config, 'model_type', '?')}): its forward changes its LM head's "
            "output in a way Coconut does not reproduce (coconut.logit_transform), so the loss would not be the "
            "model's own")


def supervised_loss(hidden: torch.Tensor, labels: torch.Tensor, lm_head: nn.Linear,
                    transform: Optional[Callable] = None) -> torch.Tensor:
    """Mean cross-entropy of next-token logits over every supervised token of the batch.

    hidden (batch, seq, hidden), labels (batch, seq) with -100 where unsupervised. The
    LM head runs only on the positions whose next label is supervised (DESIGN §4's
    loss: shifted logits, one mean over the batch's tokens). NaN when nothing is supervised,
    as F.cross_entropy gives. `transform`: logit_transform's, applied to the head's output.
    """
    targets = labels[:, 1:]  # (batch, seq - 1): the token each position predicts
    supervised = targets != -100
    rows = hidden[:, :-1][supervised]  # (n, hidden)
    if torch.is_grad_enabled():
        total = _LinearCrossEntropy.apply(rows, lm_head.weight, lm_head.bias, targets[supervised], transform)
    else:  # validation: an autograd.Function would still compute the gradients (needs_input_grad)
        total, _ = _chunked_cross_entropy(rows, lm_head.weight, lm_head.bias, targets[supervised], transform=transform)
    count = supervised.sum()
    # nothing supervised: a NaN loss, as F.cross_entropy gives, but no gradient (0 / 0 in
    # the backward would put NaN into the head and, tied, the embeddings); no sync
    return torch.where(count > 0, total / count.clamp(min=1), torch.full_like(total, float("nan")))


@dataclass
class DecodeState:
    """What greedy decoding has produced so far, one row per prompt."""

    generated: torch.Tensor  # (batch, max_new_tokens): kept tokens, then EOS
    n_kept: torch.Tensor  # (batch,) tokens kept per row
    done: torch.Tensor  # (batch,) bool: the row has stopped

    def record(self, step: int, next_token, max_new_tokens: int, eos: int) -> torch.Tensor:
        """Store step's token (EOS for finished rows); returns the token fed back."""
        if 0 < step < max_new_tokens:  # published: the first token is kept even when it is EOS
            self.done |= next_token == eos
        token = torch.where(self.done, torch.full_like(next_token, eos), next_token)
        if step < max_new_tokens:
            self.generated[:, step] = token
            self.n_kept += (~self.done).long()
        return token


class _BufferedLayer(DynamicLayer):
    """A cache layer for decoding without gradients: keys and values go into a buffer
    that doubles when full, instead of a new concatenated copy for every token."""

    _key_buffer = _value_buffer = None

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        used = self.get_seq_length()
        needed = used + key_states.shape[-2]
        if self._key_buffer is None or self._key_buffer.shape[-2] < needed:
            capacity = max(2 * needed, 64)
            self._key_buffer = self._reallocate(self._key_buffer, key_states, used, capacity)
            self._value_buffer = self._reallocate(self._value_buffer, value_states, used, capacity)
        self._key_buffer[..., used:needed, :] = key_states
        self._value_buffer[..., used:needed, :] = value_states
        self.keys = self._key_buffer[..., :needed, :]  # (batch, heads, seq, head_dim) views
        self.values = self._value_buffer[..., :needed, :]
        return self.keys, self.values

    @staticmethod
    def _reallocate(old, like, used, capacity):
        new = like.new_empty((*like.shape[:-2], capacity, like.shape[-1]))
        if used:
            new[..., :used, :] = old[..., :used, :]
        return new

    def reset(self):
        self._key_buffer = self._value_buffer = None
        super().reset()


class _UncopiedFirstLayer(DynamicLayer):
    """A cache layer that keeps the first pass's keys and values as they are: the plain
    layer concatenates them onto an empty tensor, one copy forward and one more node
    backward per layer and pass sequence, for nothing."""

    def update(self, key_states, value_states, *args, **kwargs):
        if self.is_initialized:
            return super().update(key_states, value_states, *args, **kwargs)
        self.lazy_initialization(key_states, value_states)
        self.keys, self.values = key_states, value_states
        return self.keys, self.values


def new_cache(config, buffered: bool, cache_class=DynamicCache) -> DynamicCache:
    """A transformers 5 cache; buffered (no-grad decoding only) avoids a copy per token."""
    cache = cache_class(config=config)
    layer_class = _BufferedLayer if buffered else _UncopiedFirstLayer
    cache.layers = [layer_class() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


def _files_and_times(folder) -> dict:
    """{name: modification time (ns)} of the files in `folder`."""
    return {entry.name: entry.stat(follow_symlinks=False).st_mtime_ns for entry in os.scandir(folder)
            if entry.is_file(follow_symlinks=False)}


def _readable_as(reference: str, folder, before: dict) -> None:
    """Give the files written in `folder` since `before` (_files_and_times) the mode of
    `reference`, a file opened for writing as usual (0666 less the umask): transformers
    writes model.safetensors with mode 0600, which other users of a shared machine cannot
    read, beside a config and tokenizer they can. Other files keep their modes."""
    mode = os.stat(reference).st_mode & 0o777
    for name, written in _files_and_times(folder).items():
        if before.get(name) != written:
            os.chmod(os.path.join(folder, name), mode)


class Coconut(nn.Module):
    """latent_token_id None makes a plain decoder: no position is a continuous thought
    (how models of the other methods generate)."""

    def __init__(self, base_causallm, latent_token_id, start_latent_id, end_latent_id, eos_token_id):
        super().__init__()
        self.base_causallm = base_causallm
        self.latent_token_id = latent_token_id
        self.start_latent_id = start_latent_id
        self.end_latent_id = end_latent_id
        self.eos_token_id = eos_token_id
        # Set by the launcher under FSDP: every process must run as many forward passes
        # of the base model as the others, or the sharded collectives deadlock.
        self.sync_passes_across_ranks = False
        unsupported = unsupported_model(base_causallm.config)
        if unsupported is not None:
            raise ValueError(unsupported)
        # what the model's own forward does to its head's output (Granite, Cohere, Gemma 2, ...)
        self.logit_transform = logit_transform(base_causallm.config)
        if latent_token_id is not None:  # a plain decoder computes no loss, and greedy decoding needs no transform
            check_head_matches_model(self)
        decoder_args = inspect.signature(decoder_of(base_causallm).forward).parameters
        self._cache_kwarg = "cache" if "cache" in decoder_args else "past_key_values"
        # compiling.compile_blocks sets a cache whose update stays outside compiled graphs,
        # and compiled_blocks: one-column passes then run eagerly (see _pass_mode)
        self.cache_class = DynamicCache
        self.compiled_blocks = False
        # compiling.compile_decoder sets it: the cache update is traced, so no-grad decoding
        # keeps the plain cache (inductor cannot trace the buffered layer's reallocation)
        self.compiled_decoder = False
        # how generate() decoded last: "eager", "static-cache" or "cuda-graph" (bench/gpu_bench.py reports it)
        self.last_decode_path = None
        # on CUDA, decode with a preallocated cache and CUDA-graph steps (compiling.py)
        self.cuda_graphs = True
        self.recurrent_states = holds_recurrent_states(base_causallm.config)
        model_type = getattr(text_config(base_causallm.config), "model_type", None)
        self.column_positions = model_type in COLUMN_POSITION_MODEL_TYPES
        self.one_column_continuation = model_type in ONE_COLUMN_CONTINUATION_MODEL_TYPES
        # one-column passes in the fewest operations, for the families lean_passes writes out
        self.lean_family = lean_passes.family_for(model_type, self.decoder)
        if self.lean_family is not None:
            lean_passes.install(self.lean_family, self.decoder)
        self.lean_passes = True  # False: every pass through Hugging Face's forward

    @property
    def embedding(self) -> nn.Module:
        # a property, not a submodule: the state dict keeps only `base_causallm.*` keys
        return self.base_causallm.get_input_embeddings()

    @property
    def decoder(self) -> nn.Module:
        """The transformer stack without the LM head (GPT2Model, LlamaModel, ...): its
        last_hidden_state is after the final norm, i.e. hidden_states[-1] (DESIGN §4)."""
        return decoder_of(self.base_causallm)

    @property
    def lm_head(self) -> nn.Module:
        return self.base_causallm.get_output_embeddings()

    # ----------------------------------------------------------------- passes
    def _decoder_pass(self, embeds, attention_mask, position_ids, cache) -> torch.Tensor:
        """(batch, len, hidden) last hidden states of one pass; no LM head, no all-layer list."""
        if self.compiled_decoder:  # column slices of the batch: compiled graphs guard on strides
            embeds, attention_mask, position_ids = (standalone(t) for t in (embeds, attention_mask, position_ids))
        out = self.decoder(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=cache is not None,
            **{self._cache_kwarg: cache},
        )
        return out.last_hidden_state

    def _column_pass(self) -> Callable:
        """What runs a pass over one column on a cache this module made, with pass_mask's
        mask: lean_passes' where the model's family is written out there and its modules
        are still the plain ones (checked at each call: modules swapped after wrapping,
        LoRA say, count), else _decoder_pass."""
        family = self.lean_family if self.lean_passes else None
        if family is None or not lean_passes.usable(family, self.decoder):
            return self._decoder_pass
        return functools.partial(lean_passes.run_pass, family, self.decoder)

    def _builds_own_masks(self) -> bool:
        """Whether passes on a cache this module made get pass_mask's masks. Not when the
        decoder is compiled: Hugging Face's mask work is traced into the graph there and
        costs nothing."""
        return not self.compiled_decoder and builds_plain_masks(self.base_causallm.config)

    def _pass_mode(self, width: int):
        """With compiled blocks, a one-column pass (a latent, a decoded token) runs eagerly:
        it is dispatch-bound, and a compiled block's guards and runtime wrappers cost more
        than the few kernels they would save (measured: 2x slower latent steps)."""
        if self.compiled_blocks and width == 1:
            return torch.compiler.set_stance("force_eager")
        return contextlib.nullcontext()

    @staticmethod
    def _segments(seq_len: int, columns: list, n_passes: int, one_column: bool = False) -> list:
        """(start, end) column ranges of the passes: up to each latent, then the rest
        (one_column: one column at a time from the first latent on).

        When other ranks need more passes, the tail is cut into more pieces (exact: the
        cache makes the split invisible); one_column cuts the first piece's last columns
        off one at a time instead, so that no piece after the first is wider than one
        column. What cannot be cut becomes empty passes (None).
        """
        bounds = [0] + columns + [seq_len]
        if one_column:
            first_end = columns[0] if columns else seq_len
            first_end = max(1, first_end - max(0, n_passes - (1 + seq_len - first_end)))
            bounds = [0] + list(range(first_end, seq_len + 1))
        while len(bounds) - 1 < n_passes and bounds[-1] - bounds[-2] > 1:
            bounds.insert(-1, bounds[-2] + 1)
        segments = list(zip(bounds[:-1], bounds[1:]))
        return segments + [None] * (n_passes - len(segments))

    def _run_passes(self, input_ids, attention_mask, position_ids, sync: bool, cache=None, keep_cache=True,
                    one_column_pass=None):
        """Run the decoder pass by pass, filling latents from last hidden states.

        Returns (inputs_embeds, hidden, cache, padding_term): inputs_embeds and hidden
        are (batch, seq, hidden); padding_term is a zero tying empty passes (sync only)
        into the graph so all ranks run one backward. keep_cache=False (training) runs a
        batch without latents, one pass, without a cache (with one if the decoder is
        compiled). one_column_pass, if given,
        replaces _decoder_pass for passes over one column (the captured decoding step).
        """
        token_embeds = self.embedding(input_ids)  # (batch, seq, hidden)
        columns = latent_columns(input_ids, self.latent_token_id)
        # a model whose recurrent states are updated in place trains pass by pass without
        # a cache: each pass runs the whole prefix again (see holds_recurrent_states)
        recompute = torch.is_grad_enabled() and self.recurrent_states
        one_column = self.one_column_continuation and not recompute  # see ONE_COLUMN_CONTINUATION_MODEL_TYPES
        n_passes = len(self._segments(input_ids.shape[1], columns, 1, one_column))
        if sync:
            n_passes = _all_ranks_max(n_passes, input_ids.device)
        segments = self._segments(input_ids.shape[1], columns, n_passes, one_column)
        is_latent = input_ids == self.latent_token_id  # (batch, seq)

        # a compiled decoder always gets a cache: a batch without latents then runs the
        # graph of a latent batch's first piece instead of compiling one of its own
        own_masks = False  # ready-made masks for the passes after the first (pass_mask)
        if cache is None and not recompute and (keep_cache or len(segments) > 1 or self.compiled_decoder):
            buffered = not torch.is_grad_enabled() and not self.compiled_decoder
            cache = new_cache(self.base_causallm.config, buffered, self.cache_class)
            own_masks = self._builds_own_masks()
        column_pass = self._column_pass() if own_masks else None
        # one split, not a slice per pass: the backward then joins the pieces' gradients
        # once instead of zero-filling and adding a whole (batch, seq, hidden) per pass;
        # the whole width is passed as it is, not as a view (a compiled decoder would copy it)
        spans = [segment for segment in segments if segment is not None]
        pieces = iter(token_embeds.split([end - start for start, end in spans], dim=1) if len(spans) > 1
                      else [token_embeds])
        chunks, hiddens, padding_term = [], [], token_embeds.new_zeros(())
        filled = None  # (batch, 1, hidden): value for the latent at column `start`, if any
        for segment in segments:
            if segment is None:  # another rank still fills latents: run a matching pass
                dummy = self.decoder(inputs_embeds=token_embeds[:, :1], attention_mask=attention_mask[:, :1])
                padding_term = padding_term + 0.0 * dummy.last_hidden_state.float().sum()
                continue
            start, end = segment
            chunk = next(pieces)  # (batch, end - start, hidden)
            if filled is not None:  # a piece's only latents are in its first column (segments cut at each)
                chunk = torch.where(is_latent[:, start:end, None], filled, chunk)
            if recompute:  # the prefix with the latents filled so far; its last pass is the whole sequence
                chunks.append(chunk)
                prefix = torch.cat(chunks, dim=1) if len(chunks) > 1 else chunk
                hiddens = [self._decoder_pass(prefix, attention_mask[:, :end], position_ids[:, :end], None)]
                filled = hiddens[0][:, -1:]
                continue
            ready_mask = own_masks and start > 0
            run_pass = self._decoder_pass
            if end - start == 1 and one_column_pass is not None:
                run_pass = one_column_pass
            elif end - start == 1 and ready_mask:
                run_pass = column_pass
            mask = pass_mask(attention_mask, start, end) if ready_mask else attention_mask[:, :end]
            # a given one-column pass (the captured decoding step) is compiled whole, as it is for
            # the decoded tokens: the eager stance of compiled blocks' latent passes would cover it
            mode = contextlib.nullcontext() if run_pass is one_column_pass else self._pass_mode(end - start)
            with mode:
                hidden = run_pass(chunk, mask, position_ids[:, start:end], cache)
            chunks.append(chunk)
            hiddens.append(hidden)
            # last layer, after the final norm; a one-column pass's whole output (no select to undo)
            filled = hidden if end - start == 1 else hidden[:, -1:]
        if len(chunks) == 1:  # no latents: no copies
            return chunks[0], hiddens[0], cache, padding_term
        return torch.cat(chunks, dim=1), torch.cat(hiddens, dim=1), cache, padding_term

    # ----------------------------------------------------------------- training
    def forward(self, input_ids, attention_mask, labels=None, position_ids=None, return_logits=True, **kwargs):
        """loss (one mean over every supervised token), inputs_embeds and logits.

        return_logits=False (what training uses) leaves logits None: the LM head then
        runs only at supervised positions, inside the loss, never over (batch, seq, vocab).
        """
        if position_ids is None:
            position_ids = ((attention_mask.cumsum(1) - 1).clamp(min=0) * attention_mask).long()
        inputs_embeds, hidden, _, padding_term = self._run_passes(
            input_ids, attention_mask, position_ids, sync=self.sync_passes_across_ranks, keep_cache=False
        )  # hidden: (batch, seq, hidden)
        loss = None
        if labels is not None:
            loss = supervised_loss(hidden, labels, self.lm_head, self.logit_transform) + padding_term
        logits = None
        if return_logits:
            logits = self.lm_head(hidden)  # (batch, seq, vocab)
            if self.logit_transform is not None:
                logits = self.logit_transform(logits)
        return CoconutOutput(loss=loss, inputs_embeds=inputs_embeds, logits=logits)

    # ----------------------------------------------------------------- generation
    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, max_new_tokens=16, synced_gpus=False, **kwargs):
        """Greedy decoding for a batch of prompts in any padding (DESIGN §4).

        Returns a LongTensor (batch, T): each row is its prompt without padding, then
        its generated tokens, right-padded with EOS. As published, the first token is
        always kept and decoding stops at the next EOS. With synced_gpus every process
        runs forward passes until all processes are done.

        On CUDA, without synced_gpus, the KV cache is preallocated and each token's
        step is one captured CUDA graph (compiling.py); elsewhere, or if that cannot
        run, the eager loop with a growing buffered cache.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        aligned = align_latents(input_ids, attention_mask, self.latent_token_id, self.eos_token_id)
        if self._needs_gapless_rows(aligned[0], max_new_tokens, synced_gpus):
            return self._generate_gapless(input_ids, attention_mask, max_new_tokens, synced_gpus)
        return self._decode_aligned(*aligned, max_new_tokens, synced_gpus)

    def _needs_gapless_rows(self, aligned_ids, max_new_tokens, synced_gpus) -> bool:
        """Whether a local-attention window could reach past a padding gap of the batch
        align_latents laid out (aligned_ids): some row's last new token lies `window` or
        more columns after its first column; or the model has recurrent states, which a
        padding column between a prompt and its new tokens would run through, or takes
        its positions from the columns (MPT), which such a gap would shift. Decided alike
        on every process under synced_gpus (their passes pair up)."""
        window = local_attention_window(self.base_causallm.config)
        always = self.recurrent_states or self.column_positions
        if window is None and not always:
            return False
        batch, width = aligned_ids.shape
        needed = batch > 1 and (always or width + max_new_tokens > window)
        if synced_gpus:
            needed = _all_ranks_max(int(needed), aligned_ids.device) == 1
        return needed

    def _generate_gapless(self, input_ids, attention_mask, max_new_tokens, synced_gpus):
        """generate for models with local attention: a window counts columns, so a row
        must have no padding between its prompt and its new tokens, or its tokens would
        depend on the other prompts of the batch. Decodes gapless_groups one by one."""
        groups = gapless_groups(input_ids, attention_mask, self.latent_token_id)
        n_calls = _all_ranks_max(len(groups), input_ids.device) if synced_gpus else len(groups)
        outputs = []
        for i in range(n_calls):  # past its own groups a process decodes one row again: the others need its passes
            rows = torch.tensor(groups[i] if i < len(groups) else groups[0][:1], device=input_ids.device)
            aligned = align_latents(input_ids[rows], attention_mask[rows], self.latent_token_id, self.eos_token_id,
                                    right_align=True)
            # sub-batch sizes vary from batch to batch: a captured step runs them in a few sizes
            outputs.append(self._decode_aligned(*aligned, max_new_tokens, synced_gpus, rows_up_to=len(input_ids)))
        width = max(out.shape[1] for out in outputs[:len(groups)])
        result = input_ids.new_full((input_ids.shape[0], width), self.eos_token_id)
        for rows, out in zip(groups, outputs):
            result[torch.tensor(rows, device=input_ids.device), : out.shape[1]] = out
        return result

    def _decode_aligned(self, input_ids, prompt_mask, position_ids, max_new_tokens, synced_gpus, rows_up_to=None):
        """generate for one batch that align_latents laid out; rows_up_to: see CapturedDecoder.run."""
        decoder = None
        if input_ids.device.type == "cuda" and self.cuda_graphs and not synced_gpus and max_new_tokens > 1:
            from compiling import captured_decoder

            decoder = captured_decoder(self, input_ids.shape, max_new_tokens)
        if decoder is not None:
            try:
                generated, n_kept = decoder.run(input_ids, prompt_mask, position_ids, max_new_tokens, rows_up_to)
                self.last_decode_path = decoder.path
                return self._assemble(input_ids, prompt_mask, generated, n_kept)
            except Exception as error:  # noqa: BLE001 - any failure of the captured path: decode eagerly
                decoder.disable(error)
        generated, n_kept = self._decode_eager(input_ids, prompt_mask, position_ids, max_new_tokens, synced_gpus)
        self.last_decode_path = "eager"
        return self._assemble(input_ids, prompt_mask, generated, n_kept)

    def _prefill(self, input_ids, prompt_mask, position_ids, synced_gpus, cache=None, one_column_pass=None):
        """Fill the prompts' latents; returns ((batch,) first tokens, cache)."""
        _, hidden, cache, _ = self._run_passes(input_ids, prompt_mask, position_ids, synced_gpus, cache,
                                               one_column_pass=one_column_pass)
        last_col = (torch.arange(input_ids.shape[1], device=input_ids.device) * prompt_mask).argmax(1)
        last = hidden[torch.arange(hidden.shape[0], device=hidden.device), last_col]  # (batch, hidden)
        return self.lm_head(last).argmax(-1), cache

    def _decode_eager(self, input_ids, prompt_mask, position_ids, max_new_tokens, synced_gpus):
        """(generated (batch, max_new_tokens), n_kept (batch,)) by the plain greedy loop."""
        next_token, cache = self._prefill(input_ids, prompt_mask, position_ids, synced_gpus)
        batch = input_ids.shape[0]
        lengths = prompt_mask.sum(1)  # (batch,) real prompt tokens
        state = DecodeState(input_ids.new_full((batch, max_new_tokens), self.eos_token_id), torch.zeros_like(lengths),
                            torch.zeros(batch, dtype=torch.bool, device=input_ids.device))
        attention_mask = prompt_mask
        own_masks = self._builds_own_masks()
        run_pass = self._column_pass() if own_masks else self._decoder_pass
        step = 0
        while True:  # under synced_gpus a finished process keeps stepping until all are done
            token = state.record(step, next_token, max_new_tokens, self.eos_token_id)
            if self._stop(bool(state.done.all()) or step >= max_new_tokens - 1, synced_gpus, input_ids.device):
                break
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(batch, 1)], dim=1)
            positions = (lengths + step)[:, None]
            width = attention_mask.shape[1]
            mask = pass_mask(attention_mask, width - 1, width) if own_masks else attention_mask
            with self._pass_mode(1):
                hidden = run_pass(self.embedding(token[:, None]), mask, positions, cache)
            next_token = self.lm_head(hidden[:, -1]).argmax(-1)
            step += 1
        return state.generated, state.n_kept

    @staticmethod
    def _stop(locally_done: bool, synced_gpus: bool, device) -> bool:
        if not synced_gpus:
            return locally_done
        return _all_ranks_max(int(not locally_done), device) == 0

    def _assemble(self, prompt_ids, prompt_mask, generated, n_kept):
        """Rows of (prompt without padding, kept generated tokens), right-padded with EOS."""
        lengths = prompt_mask.sum(1)[:, None]  # (batch, 1)
        first_real = prompt_mask.float().argmax(1)[:, None]  # real tokens are contiguous from here
        width = int((lengths + n_kept[:, None]).max())
        cols = torch.arange(width, device=prompt_ids.device)[None, :]
        prompt_part = prompt_ids.gather(1, (first_real + cols).clamp(max=prompt_ids.shape[1] - 1))
        generated_part = generated.gather(1, (cols - lengths).clamp(0, generated.shape[1] - 1))
        eos = torch.full_like(prompt_part, self.eos_token_id)
        result = torch.where(cols < lengths + n_kept[:, None], generated_part, eos)
        return torch.where(cols < lengths, prompt_part, result)

    # ----------------------------------------------------------------- export
    # Written beside the base model's files by save_pretrained: the latent token ids and
    # the curriculum settings a prompt needs (generate.py, analysis/probe_prosqa.py).
    COCONUT_CONFIG_NAME = "coconut_config.json"
    COCONUT_SETTINGS = ("c_thought", "max_latent_stage", "pad_latent_to_max", "method")
    COCONUT_CONFIG_KEYS = ("latent_token_id", "start_latent_id", "end_latent_id", "eos_token_id") + COCONUT_SETTINGS
    # the run's evaluation budget (generate.py's default); exports of earlier versions have none
    OPTIONAL_SETTINGS = ("max_new_tokens",)

    def save_pretrained(self, save_directory, tokenizer=None, **kwargs):
        """Write a standard Hugging Face folder plus `coconut_config.json`.

        The base model goes through its own `save_pretrained` (safetensors; any other
        keyword argument is passed on), the tokenizer too when given (it should hold
        the three latent tokens). The keyword arguments c_thought, max_latent_stage,
        pad_latent_to_max and method (and max_new_tokens, if given) are stored in
        `coconut_config.json` with the token ids; unset ones come from
        `self.coconut_config` (set by from_pretrained), else 1, 1, False, "coconut".
        `AutoModelForCausalLM.from_pretrained(folder)` loads the base model;
        `Coconut.from_pretrained(folder)` loads it all back.
        """
        settings = {key: kwargs.pop(key) for key in self.COCONUT_SETTINGS + self.OPTIONAL_SETTINGS if key in kwargs}
        config = {
            "latent_token_id": self.latent_token_id,
            "start_latent_id": self.start_latent_id,
            "end_latent_id": self.end_latent_id,
            "eos_token_id": self.eos_token_id,
            "c_thought": 1,
            "max_latent_stage": 1,
            "pad_latent_to_max": False,
            "method": "coconut",
        }
        config.update(getattr(self, "coconut_config", None) or {})  # keeps the true latent id
        config.update(settings)
        os.makedirs(save_directory, exist_ok=True)
        before = _files_and_times(save_directory)
        self.base_causallm.save_pretrained(save_directory, **kwargs)
        if tokenizer is not None:
            tokenizer.save_pretrained(save_directory)
        with open(os.path.join(save_directory, self.COCONUT_CONFIG_NAME), "w", encoding="utf-8") as f:
            json.dump({key: config[key] for key in self.COCONUT_CONFIG_KEYS + self.OPTIONAL_SETTINGS if key in config},
                      f, indent=2)
            f.write("\n")
        _readable_as(os.path.join(save_directory, self.COCONUT_CONFIG_NAME), save_directory, before)

    @classmethod
    def read_coconut_config(cls, path) -> dict:
        """The checked settings of an exported folder; ValueError (one line) if unusable."""
        file = os.path.join(os.fspath(path), cls.COCONUT_CONFIG_NAME)
        if not os.path.isdir(os.fspath(path)):
            raise FileNotFoundError(f"{path}: no such model folder")
        if not os.path.isfile(file):
            raise ValueError(f"{path}: not an exported Coconut model (no {cls.COCONUT_CONFIG_NAME}; write one with export.py)")
        try:
            with open(file, encoding="utf-8") as f:
                config = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{file}: cannot be read ({' '.join(str(e).split())})") from None
        if not isinstance(config, dict):
            raise ValueError(f"{file}: must hold a JSON object")
        missing = [key for key in cls.COCONUT_CONFIG_KEYS if key not in config]
        if missing:
            raise ValueError(f"{file}: missing key(s) {', '.join(missing)}")
        for key in cls.COCONUT_CONFIG_KEYS + tuple(key for key in cls.OPTIONAL_SETTINGS if key in config):
            value = config[key]
            if key == "method":
                ok = value in METHODS
            elif key == "pad_latent_to_max":
                ok = isinstance(value, bool)
            else:
                ok = isinstance(value, int) and not isinstance(value, bool) and value >= (key == "max_new_tokens")
            if not ok:
                raise ValueError(f"{file}: bad value {value!r} for {key!r}")
        return config

    @classmethod
    def from_pretrained(cls, path, **kwargs):
        """Load a folder written by save_pretrained (export.py): one call, no config.

        Keyword arguments go to `AutoModelForCausalLM.from_pretrained` (e.g. dtype).
        The settings are attached as `model.coconut_config` (a dict). Only a "coconut"
        model replaces `<|latent|>` by continuous thoughts; for other methods the
        wrapper decodes plainly (latent_token_id None, as evaluate.generator_for does), so for
        pause_as_thought `<|latent|>` stays an ordinary token. Load the tokenizer with
        `AutoTokenizer.from_pretrained(path)`.
        """
        from transformers import AutoModelForCausalLM

        config = cls.read_coconut_config(path)
        base = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        latent_id = config["latent_token_id"] if METHODS[config["method"]].fills_latents else None
        model = cls(base, latent_id, config["start_latent_id"], config["end_latent_id"], config["eos_token_id"])
        model.coconut_config = dict(config)
        return model.eval()
