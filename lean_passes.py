"""Lean one-column passes: a latent's (or a decoded token's) pass through the decoder
stack in the fewest operations, for the model families written out here (GPT-2).

A pass over one column of a batch is dispatch-bound (on a GPU the host launching
kernels, not their arithmetic, sets its time), and Hugging Face's block forward spends
a third of a one-column pass's host time around its arithmetic: module calls for each
projection, a split and three view-transposes, the attention interface's lookups. Here
the same arithmetic runs as a short list of tensor operations over the model's own
parameters: the same operations on the same values in the same order, dropout
included, so the results are the same bits (tests/test_lean_passes.py compares them
with Hugging Face's forward, losses, gradients and generations). The attention mask
is turned into sdpa's additive form once per pass (AttentionBias), where sdpa would
convert it in every block.

Each block is still called as a module, so what wraps it keeps working: FSDP2's hooks
gather and free its weights, activation checkpointing (modeling.checkpoint_blocks
replaces the block's forward, around this one) recomputes it, and compiled blocks run
the pass eagerly as before. `install` makes a block's forward take the lean path when
Coconut calls it with the LEAN_CALL keyword, and Hugging Face's forward otherwise.

Where it applies (Coconut decides per pass): a pass over one column after the first
piece, on a cache Coconut made, with the ready-made mask (coconut.pass_mask), on a
decoder of a family below whose modules are the plain ones the family is written for
(a wrapped projection, LoRA say, keeps Hugging Face's forward). Hooks registered on
modules inside a block do not run in lean passes (a block's own hooks do); set
`coconut.lean_passes = False` to run every pass through Hugging Face's forward.
"""

import functools
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.pytorch_utils import Conv1D

LEAN_CALL = "coconut_lean_column"  # the keyword that sends a block call down the lean path


class LeanFamily(NamedTuple):
    """How one model family runs a one-column pass. Each function takes the decoder
    stack (decoder_of's module) or one of its blocks."""

    embed: Callable  # (decoder, embeds (batch, 1, hidden), position_ids (batch, 1)) -> block input
    blocks: Callable  # decoder -> its blocks, in order
    block: Callable  # (block, hidden (batch, 1, hidden), cache, AttentionBias) -> hidden
    final: Callable  # (decoder, hidden) -> last hidden state (after the final norm)
    fits: Callable  # decoder -> whether its modules are the plain ones the functions are written for


def _dropout(module: nn.Dropout, x: torch.Tensor) -> torch.Tensor:
    """module(x) without the module call: F.dropout, as nn.Dropout runs it (same random
    numbers in training); nothing in eval mode or at p = 0, where it returns x itself."""
    return F.dropout(x, module.p, True, module.inplace) if module.training and module.p > 0 else x


class AttentionBias:
    """A pass's boolean mask (batch, 1, 1, keys) as the additive one sdpa turns it into in
    every call (0 where a key is seen, -inf elsewhere, in the queries' dtype), made once
    for all blocks. Its rows are laid out 8 columns apart, the alignment CUDA's attention
    kernels need, which they would otherwise pad the mask to in every call."""

    ALIGNMENT = 8

    def __init__(self, mask: torch.Tensor):
        self.mask, self.bias = mask, None

    def of(self, dtype: torch.dtype) -> torch.Tensor:
        if self.bias is None or self.bias.dtype != dtype:
            keys = self.mask.shape[-1]
            padded = self.mask.new_zeros((*self.mask.shape[:-1], -(-keys // self.ALIGNMENT) * self.ALIGNMENT),
                                         dtype=dtype)
            self.bias = padded[..., :keys].masked_fill_(self.mask.logical_not(), float("-inf"))
        return self.bias


def _layer_norm(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


# ----------------------------------------------------------------------------- GPT-2
def _gpt2_embed(decoder, embeds, position_ids):
    return _dropout(decoder.drop, embeds + decoder.wpe(position_ids))


def _gpt2_scaling(attn) -> float:
    """The attention's scale, as GPT2Attention computes it."""
    scaling = attn.head_dim ** -0.5 if attn.scale_attn_weights else 1.0
    return scaling / float(attn.layer_idx + 1) if attn.scale_attn_by_inverse_layer_idx else scaling


def _gpt2_block(block, hidden, cache, mask):
    """GPT2Block.forward with sdpa attention, for one column: hidden (batch, 1, width)."""
    attn, mlp = block.attn, block.mlp
    batch, _, width = hidden.shape
    x = _layer_norm(block.ln_1, hidden).view(batch, width)
    qkv = torch.addmm(attn.c_attn.bias, x, attn.c_attn.weight)  # (batch, 3 * width): queries, keys, values
    query, key, value = qkv.view(batch, 3, attn.num_heads, 1, attn.head_dim).unbind(1)  # (batch, heads, 1, head_dim)
    key, value = cache.update(key, value, attn.layer_idx)  # (batch, heads, keys, head_dim)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask.of(query.dtype), scale=_gpt2_scaling(attn),
                                         dropout_p=attn.attn_dropout.p if attn.training else 0.0)
    out = torch.addmm(attn.c_proj.bias, out.reshape(batch, width), attn.c_proj.weight)
    hidden = _dropout(attn.resid_dropout, out.view(batch, 1, width)) + hidden
    x = _layer_norm(block.ln_2, hidden).view(batch, width)
    x = mlp.act(torch.addmm(mlp.c_fc.bias, x, mlp.c_fc.weight))  # (batch, inner)
    x = torch.addmm(mlp.c_proj.bias, x, mlp.c_proj.weight).view(batch, 1, width)
    return hidden + _dropout(mlp.dropout, x)


def _gpt2_fits(decoder) -> bool:
    def plain(module, cls):
        return type(module) is cls

    return (plain(decoder.wpe, nn.Embedding) and plain(decoder.drop, nn.Dropout) and plain(decoder.ln_f, nn.LayerNorm)
            and all(plain(block.ln_1, nn.LayerNorm) and plain(block.ln_2, nn.LayerNorm)
                    and not hasattr(block, "crossattention")
                    and all(plain(m, Conv1D) for m in (block.attn.c_attn, block.attn.c_proj,
                                                       block.mlp.c_fc, block.mlp.c_proj))
                    and all(plain(m, nn.Dropout) for m in (block.attn.attn_dropout, block.attn.resid_dropout,
                                                           block.mlp.dropout))
                    for block in decoder.h))


GPT2 = LeanFamily(embed=_gpt2_embed, blocks=lambda decoder: decoder.h, block=_gpt2_block,
                  final=lambda decoder, hidden: _layer_norm(decoder.ln_f, hidden), fits=_gpt2_fits)

FAMILIES = {"gpt2": GPT2}  # model_type -> LeanFamily


def family_for(model_type: Optional[str], decoder) -> Optional[LeanFamily]:
    """The lean family of this decoder, None where Hugging Face's forward runs every pass."""
    family = FAMILIES.get(model_type)
    try:
        return family if family is not None and family.fits(decoder) else None
    except AttributeError:  # another layout than the family's (another transformers version, say)
        return None


def install(family: LeanFamily, decoder) -> None:
    """Make every block's forward take the lean path when called with LEAN_CALL=True; once
    per block (several Coconut wrappers may share one base model)."""
    for block in family.blocks(decoder):
        if not getattr(block, "coconut_lean_installed", False):
            block.forward = functools.partial(_lean_or_own, block, family.block, block.forward)
            block.coconut_lean_installed = True


def _lean_or_own(block, lean_block, own_forward, *args, **kwargs):
    if kwargs.pop(LEAN_CALL, False):
        return lean_block(block, args[0], kwargs["cache"], kwargs["attention_mask"])
    return own_forward(*args, **kwargs)


def run_pass(family: LeanFamily, decoder, embeds, mask, position_ids, cache) -> torch.Tensor:
    """(batch, 1, hidden) last hidden state of a one-column pass, as decoder(...) gives it."""
    hidden = family.embed(decoder, embeds, position_ids)
    mask = AttentionBias(mask)
    for block in family.blocks(decoder):
        hidden = block(hidden, cache=cache, attention_mask=mask, **{LEAN_CALL: True})
    return family.final(decoder, hidden)
