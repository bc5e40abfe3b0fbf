"""Lean one-column passes: a latent's (or a decoded token's) pass through the decoder
stack in the fewest operations, for the model families written out here (GPT-2).

A pass over one column of a batch is dispatch-bound (on a GPU the host launching
kernels, not their arithmetic, sets its time), and Hugging Face's block forward spends
a third of a one-column pass's host time around its arithmetic (bench/proxy.py's
model: 4.0 ms a forward pass through its blocks, 2.5 ms lean): module calls for each
projection, a split and three view-transposes, the attention interface's lookups. Here
the same arithmetic runs as a short list of tensor operations over the model's own
parameters: the same operations on the same values in the same order, dropout
included, so the results are the same bits (tests/test_lean_passes.py compares them
with Hugging Face's forward, losses, gradients and generations, on a CPU). The
attention gets the boolean mask Hugging Face's would, so sdpa picks its kernel and
converts the mask as it does there (on CUDA, cuDNN's conversion differs from the
other kernels').

Each block is still called as a module, taking and returning (batch, 1, hidden) as
Hugging Face's blocks do, so what wraps it keeps working: FSDP2's hooks gather and free
its weights, and compiled blocks run the pass eagerly as before.
`install` (when the first Coconut wraps the model) makes a block's forward take the
lean path when Coconut calls it with the LEAN_CALL keyword, Hugging Face's forward
otherwise. modeling.checkpoint_blocks, called after it as run.py does, wraps that
forward, so the backward recomputes lean passes too; a block checkpointed before
keeps its checkpointed forward inside the lean one, which then skips checkpointing
(only no-grad decoding meets that order: a method without latents, which run.py
wraps for evaluation after checkpointing its blocks).

Where it applies (Coconut decides at each forward and generate): a pass over one
column after the first piece, on a cache Coconut made, with the ready-made mask
(coconut.pass_mask), on a decoder of a family below whose modules are the plain ones
the family is written for (a subclass with its own forward, a wrapped projection such
as LoRA's, Hugging Face's own gradient checkpointing, another function registered as
"sdpa", a block put in after install: Hugging Face's forward). A lean pass
calls the blocks, the position embedding and the MLP's activation as modules, so hooks
on those run; hooks on the decoder stack itself, the attention, the MLP, the norms, the
projections and the dropouts do not. `coconut.lean_passes = False` runs every pass
through Hugging Face's forward.
"""

import functools
import inspect
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.pytorch_utils import Conv1D

LEAN_CALL = "coconut_lean_column"  # the keyword that sends a block call down the lean path


class LeanFamily(NamedTuple):
    """How one model family runs a one-column pass. Each function takes the decoder
    stack (decoder_of's module) or one of its blocks."""

    embed: Callable  # (decoder, embeds (batch, 1, hidden), position_ids (batch, 1)) -> the first block's input
    blocks: Callable  # decoder -> its blocks, in order
    block: Callable  # (block, hidden (batch, 1, hidden), cache, mask (batch, 1, 1, keys) bool) -> hidden
    final: Callable  # (decoder, hidden) -> last hidden state (after the final norm)
    fits: Callable  # decoder -> whether its modules are the plain ones the functions are written for


def _dropout(module: nn.Dropout, x: torch.Tensor) -> torch.Tensor:
    """module(x) without the module call: F.dropout, as nn.Dropout runs it (same random
    numbers in training); nothing in eval mode or at p = 0, where it returns x itself."""
    return F.dropout(x, module.p, True, module.inplace) if module.training and module.p > 0 else x


def _layer_norm(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


# ----------------------------------------------------------------------------- GPT-2
def _gpt2_embed(decoder, embeds, position_ids):
    return _dropout(decoder.drop, embeds + decoder.wpe(position_ids))


def _gpt2_block(block, hidden, cache, mask):
    """GPT2Block.forward with sdpa attention, for one column: hidden (batch, 1, width), as
    Hugging Face's blocks take and return it (hooks on a block see the same shapes);
    two-dimensional inside (no view before and after each projection)."""
    attn, mlp = block.attn, block.mlp
    batch, _, width = hidden.shape
    hidden = hidden.view(batch, width)
    qkv = torch.addmm(attn.c_attn.bias, _layer_norm(block.ln_1, hidden), attn.c_attn.weight)  # (batch, 3 * width)
    query, key, value = qkv.view(batch, 3, attn.num_heads, 1, attn.head_dim).unbind(1)  # (batch, heads, 1, head_dim)
    key, value = cache.update(key, value, attn.layer_idx)  # (batch, heads, keys, head_dim)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=attn.scaling,
                                         dropout_p=attn.attn_dropout.p if attn.training else 0.0)
    out = torch.addmm(attn.c_proj.bias, out.reshape(batch, width), attn.c_proj.weight)
    hidden = _dropout(attn.resid_dropout, out) + hidden
    x = mlp.act(torch.addmm(mlp.c_fc.bias, _layer_norm(block.ln_2, hidden), mlp.c_fc.weight))  # (batch, inner)
    hidden = hidden + _dropout(mlp.dropout, torch.addmm(mlp.c_proj.bias, x, mlp.c_proj.weight))
    return hidden.view(batch, 1, width)


def _gpt2_fits(decoder) -> bool:
    """Whether every module a lean pass steps around is GPT-2's own: a subclass with its
    own forward, a wrapped projection (LoRA, say), cross attention, Hugging Face's
    gradient checkpointing or another function registered as "sdpa" would compute
    something else, or otherwise."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.gpt2.modeling_gpt2 import GPT2Attention, GPT2Block, GPT2MLP

    def plain(module, cls):
        """cls, or a subclass that keeps its forward: FSDP2's class for a sharded block, whose
        forward transformers wraps again (GradientCheckpointingLayer), as it wraps cls's."""
        return isinstance(module, cls) and inspect.unwrap(type(module).forward) is inspect.unwrap(cls.forward)

    def plain_block(block):
        attn, mlp = block.attn, block.mlp
        return (plain(block, GPT2Block) and plain(attn, GPT2Attention) and plain(mlp, GPT2MLP)
                and not hasattr(block, "crossattention")
                and not getattr(block, "gradient_checkpointing", False)  # Hugging Face's own, in its forward
                and all(hasattr(attn, name) for name in ("num_heads", "head_dim", "layer_idx", "scaling"))
                and plain(block.ln_1, nn.LayerNorm) and plain(block.ln_2, nn.LayerNorm)
                and all(plain(m, Conv1D) for m in (attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj))
                and all(plain(m, nn.Dropout) for m in (attn.attn_dropout, attn.resid_dropout, mlp.dropout)))

    return (ALL_ATTENTION_FUNCTIONS["sdpa"] is sdpa_attention_forward
            and plain(decoder.wpe, nn.Embedding) and plain(decoder.drop, nn.Dropout)
            and plain(decoder.ln_f, nn.LayerNorm) and all(plain_block(block) for block in decoder.h))


def _gpt2_blocks(decoder):
    return decoder.h


def _gpt2_final(decoder, hidden):
    return _layer_norm(decoder.ln_f, hidden)


GPT2 = LeanFamily(embed=_gpt2_embed, blocks=_gpt2_blocks, block=_gpt2_block, final=_gpt2_final, fits=_gpt2_fits)

FAMILIES = {"gpt2": GPT2}  # model_type -> LeanFamily


def fits(family: LeanFamily, decoder) -> bool:
    """family.fits(decoder); False for a layout other than the family's (another
    transformers version, say) rather than an error."""
    try:
        return family.fits(decoder)
    except (AttributeError, ImportError, KeyError):
        return False


def usable(family: LeanFamily, decoder) -> bool:
    """Whether a pass may be lean now: the decoder still fits and every block has the lean
    forward (a block put in after install would not)."""
    return fits(family, decoder) and all(getattr(block, "coconut_lean_installed", False)
                                         for block in family.blocks(decoder))


def family_for(model_type: Optional[str], decoder) -> Optional[LeanFamily]:
    """The lean family of this decoder, None where Hugging Face's forward runs every pass."""
    family = FAMILIES.get(model_type)
    return family if family is not None and fits(family, decoder) else None


def install(family: LeanFamily, decoder) -> None:
    """Make every block's forward take the lean path when called with LEAN_CALL=True; once
    per block (several Coconut wrappers may share one base model). A forward already set
    on the block (checkpoint_blocks') stays inside; the class's runs otherwise. The new
    forward holds its block, a reference cycle Python's cyclic collector frees, as
    checkpoint_blocks' does."""
    for block in family.blocks(decoder):
        if not getattr(block, "coconut_lean_installed", False):
            block.forward = functools.partial(_lean_or_own, block, family.block, block.__dict__.get("forward"))
            block.coconut_lean_installed = True


def _lean_or_own(block, lean_block, own_forward, *args, **kwargs):
    if kwargs.pop(LEAN_CALL, False):
        return lean_block(block, args[0], kwargs["cache"], kwargs["attention_mask"])
    if own_forward is None:
        return type(block).forward(block, *args, **kwargs)
    return own_forward(*args, **kwargs)


def run_pass(family: LeanFamily, decoder, embeds, mask, position_ids, cache) -> torch.Tensor:
    """(batch, 1, hidden) last hidden state of a one-column pass, as decoder(...) gives it."""
    hidden = family.embed(decoder, embeds, position_ids)
    for block in family.blocks(decoder):
        hidden = block(hidden, cache=cache, attention_mask=mask, **{LEAN_CALL: True})
    return family.final(decoder, hidden)
