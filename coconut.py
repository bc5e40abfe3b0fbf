"""The Coconut module: a causal LM that reasons with continuous thoughts.

`Coconut` wraps any Hugging Face decoder-only causal LM. At every `<|latent|>`
position the input embedding is replaced by the model's own last-layer hidden state
at the position just before it (DESIGN §4). Batches come from `dataset.MyCollator`,
which puts the i-th latent of every example in the same column; that lets pass i
fill the i-th latents of the whole batch at once and reuse the KV cache, so a step
with N latents costs one forward over the sequence split into N + 1 pieces.

    model = Coconut(AutoModelForCausalLM.from_pretrained(...), latent_id, start_id, end_id, eos_id)
    out = model(**batch)            # out.loss, out.logits, out.inputs_embeds
    tokens = model.generate(**prompt_batch, max_new_tokens=64)

This module knows nothing of files, configs or ranks, except one collective used
when several processes must run the same number of forward passes (FSDP).
"""

import inspect
import json
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from utils import METHODS


@dataclass
class CoconutOutput:
    loss: Optional[torch.Tensor]
    inputs_embeds: torch.Tensor  # (batch, seq, hidden), latents filled
    logits: torch.Tensor  # (batch, seq, vocab)


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
    return [first_col + i for i in range(n_latents)]


def align_latents(input_ids: torch.Tensor, attention_mask: torch.Tensor, latent_id: int, pad_id: int):
    """Re-lay out any padded batch the way MyCollator does (DESIGN §3), vectorised.

    Real tokens (attention 1) keep their order; rows with latents are shifted right
    so their first latents share a column; the rest is padding with attention 0.
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
    width = int((shift + lengths).max())
    new_cols = torch.where(in_row, cols + shift[:, None], width)  # padding goes to a dropped column
    new_ids = input_ids.new_full((batch, width + 1), pad_id).scatter(1, new_cols, packed)[:, :width]
    new_mask = input_ids.new_zeros((batch, width + 1)).scatter(1, new_cols, in_row.long())[:, :width]
    position_ids = ((new_mask.cumsum(1) - 1).clamp(min=0) * new_mask).long()
    return new_ids, new_mask, position_ids


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


def new_cache(config, buffered: bool) -> DynamicCache:
    """A transformers 5 cache; buffered (no-grad decoding only) avoids a copy per token."""
    cache = DynamicCache(config=config)
    if buffered:
        cache.layers = [_BufferedLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


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
        self._cache_kwarg = "cache" if "cache" in inspect.signature(base_causallm.forward).parameters else "past_key_values"
        self._takes_logits_to_keep = "logits_to_keep" in inspect.signature(base_causallm.forward).parameters

    @property
    def embedding(self) -> nn.Module:
        # a property, not a submodule: the state dict keeps only `base_causallm.*` keys
        return self.base_causallm.get_input_embeddings()

    # ----------------------------------------------------------------- passes
    def _base_pass(self, embeds, attention_mask, position_ids, cache, logits_to_keep=None):
        kwargs = {self._cache_kwarg: cache}
        if logits_to_keep is not None and self._takes_logits_to_keep:
            kwargs["logits_to_keep"] = logits_to_keep
        return self.base_causallm(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            output_hidden_states=True,
            **kwargs,
        )

    @staticmethod
    def _segments(seq_len: int, columns: list, n_passes: int) -> list:
        """(start, end) column ranges of the passes: up to each latent, then the rest.

        When other ranks need more passes, the tail is cut into more pieces (exact: the
        cache makes the split invisible); what cannot be cut becomes empty passes (None).
        """
        bounds = [0] + columns + [seq_len]
        while len(bounds) - 1 < n_passes and bounds[-1] - bounds[-2] > 1:
            bounds.insert(-1, bounds[-2] + 1)
        segments = list(zip(bounds[:-1], bounds[1:]))
        return segments + [None] * (n_passes - len(segments))

    def _run_passes(self, input_ids, attention_mask, position_ids, sync: bool, logit_cols=None):
        """Run the base model pass by pass, filling latents from hidden states.

        logit_cols=None keeps the logits of every column: (batch, seq, vocab).
        logit_cols=(batch,) column indices keeps only those: (batch, vocab).
        Returns (inputs_embeds, logits, cache, padding_term); padding_term is a zero
        tying empty passes (sync only) into the graph so all ranks run one backward.
        """
        token_embeds = self.embedding(input_ids)  # (batch, seq, hidden)
        columns = latent_columns(input_ids, self.latent_token_id)
        n_passes = len(columns) + 1
        if sync:
            n_passes = _all_ranks_max(n_passes, input_ids.device)
        segments = self._segments(input_ids.shape[1], columns, n_passes)

        cache = new_cache(self.base_causallm.config, buffered=not torch.is_grad_enabled())
        chunks, logit_chunks, padding_term = [], [], token_embeds.new_zeros(())
        kept_logits = None
        filled = None  # (batch, hidden): value for the latent at column `start`, if any
        for segment in segments:
            if segment is None:  # another rank still fills latents: run a matching pass
                dummy = self.base_causallm(inputs_embeds=token_embeds[:, :1], attention_mask=attention_mask[:, :1])
                padding_term = padding_term + 0.0 * dummy.logits.float().sum()
                continue
            start, end = segment
            chunk = token_embeds[:, start:end]
            if filled is not None:
                is_latent = (input_ids[:, start] == self.latent_token_id)[:, None]  # (batch, 1)
                first = torch.where(is_latent, filled, chunk[:, 0])
                chunk = torch.cat([first[:, None], chunk[:, 1:]], dim=1)
            keep = None if logit_cols is None else self._columns_to_keep(logit_cols, start, end)
            out = self._base_pass(chunk, attention_mask[:, :end], position_ids[:, start:end], cache, keep)
            chunks.append(chunk)
            if logit_cols is None:
                logit_chunks.append(out.logits)
            else:
                kept_logits = self._gather_kept(out.logits, keep, logit_cols, start, end, kept_logits)
            filled = out.hidden_states[-1][:, -1]  # last layer, after the final norm
        inputs_embeds = torch.cat(chunks, dim=1)
        if logit_cols is not None:
            logits = kept_logits
        else:  # one chunk (no latents) needs no copy of the (batch, seq, vocab) logits
            logits = logit_chunks[0] if len(logit_chunks) == 1 else torch.cat(logit_chunks, dim=1)
        return inputs_embeds, logits, cache, padding_term

    def _columns_to_keep(self, logit_cols, start, end):
        """Distinct wanted columns inside [start, end), relative to start (1 if none)."""
        if not self._takes_logits_to_keep:
            return None
        inside = logit_cols[(logit_cols >= start) & (logit_cols < end)]
        return torch.unique(inside) - start if inside.numel() else 1

    def _gather_kept(self, logits, keep, logit_cols, start, end, kept):
        """Copy into kept (batch, vocab) the logits of rows whose wanted column is here."""
        rows = ((logit_cols >= start) & (logit_cols < end)).nonzero(as_tuple=True)[0]
        if rows.numel() == 0:
            return kept
        if kept is None:
            kept = logits.new_zeros(len(logit_cols), logits.shape[-1])
        rel = logit_cols[rows] - start
        where = rel if keep is None else torch.searchsorted(keep, rel)
        kept[rows] = logits[rows, where]
        return kept

    # ----------------------------------------------------------------- training
    def forward(self, input_ids, attention_mask, labels=None, position_ids=None, **kwargs):
        if position_ids is None:
            position_ids = ((attention_mask.cumsum(1) - 1).clamp(min=0) * attention_mask).long()
        inputs_embeds, logits, _, padding_term = self._run_passes(
            input_ids, attention_mask, position_ids, sync=self.sync_passes_across_ranks
        )  # logits: (batch, seq, vocab)
        loss = None
        if labels is not None:
            # one mean over every supervised token of the batch
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                labels[:, 1:].reshape(-1),
                ignore_index=-100,
            )
            loss = loss + padding_term
        return CoconutOutput(loss=loss, inputs_embeds=inputs_embeds, logits=logits)

    # ----------------------------------------------------------------- generation
    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, max_new_tokens=16, synced_gpus=False, **kwargs):
        """Greedy decoding for a batch of prompts in any padding (DESIGN §4).

        Returns a LongTensor (batch, T): each row is its prompt without padding, then
        its generated tokens, right-padded with EOS. As published, the first token is
        always kept and decoding stops at the next EOS. With synced_gpus every process
        runs forward passes until all processes are done.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        input_ids, prompt_mask, position_ids = align_latents(
            input_ids, attention_mask, self.latent_token_id, self.eos_token_id
        )
        batch = input_ids.shape[0]
        lengths = prompt_mask.sum(1)  # (batch,) real prompt tokens
        last_col = (torch.arange(input_ids.shape[1], device=input_ids.device) * prompt_mask).argmax(1)
        _, logits, cache, _ = self._run_passes(input_ids, prompt_mask, position_ids, synced_gpus, last_col)

        generated = input_ids.new_full((batch, max_new_tokens), self.eos_token_id)
        n_kept = torch.zeros_like(lengths)
        done = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
        next_token = logits.argmax(-1)  # (batch,)
        attention_mask = prompt_mask
        step = 0
        while True:  # under synced_gpus a finished process keeps stepping until all are done
            if 0 < step < max_new_tokens:  # published: the first token is kept even when it is EOS
                done |= next_token == self.eos_token_id
            if step < max_new_tokens:
                token = torch.where(done, torch.full_like(next_token, self.eos_token_id), next_token)
                generated[:, step] = token
                n_kept += (~done).long()
            if self._stop(bool(done.all()) or step >= max_new_tokens - 1, synced_gpus, input_ids.device):
                break
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(batch, 1)], dim=1)
            positions = (lengths + step)[:, None]
            out = self._base_pass(self.embedding(token[:, None]), attention_mask, positions, cache, logits_to_keep=1)
            next_token = out.logits[:, -1].argmax(-1)
            step += 1
        return self._assemble(input_ids, prompt_mask, generated, n_kept)

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

    def save_pretrained(self, save_directory, tokenizer=None, **kwargs):
        """Write a standard Hugging Face folder plus `coconut_config.json`.

        The base model goes through its own `save_pretrained` (safetensors; any other
        keyword argument is passed on), the tokenizer too when given (it should hold
        the three latent tokens). The keyword arguments c_thought, max_latent_stage,
        pad_latent_to_max and method are stored in `coconut_config.json` with the
        token ids; unset ones come from `self.coconut_config` (set by from_pretrained),
        else 1, 1, False, "coconut". `AutoModelForCausalLM.from_pretrained(folder)`
        loads the base model; `Coconut.from_pretrained(folder)` loads it all back.
        """
        settings = {key: kwargs.pop(key) for key in self.COCONUT_SETTINGS if key in kwargs}
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
        self.base_causallm.save_pretrained(save_directory, **kwargs)
        if tokenizer is not None:
            tokenizer.save_pretrained(save_directory)
        with open(os.path.join(save_directory, self.COCONUT_CONFIG_NAME), "w", encoding="utf-8") as f:
            json.dump({key: config[key] for key in self.COCONUT_CONFIG_KEYS}, f, indent=2)
            f.write("\n")

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
        for key in cls.COCONUT_CONFIG_KEYS:
            value = config[key]
            if key == "method":
                ok = value in METHODS
            elif key == "pad_latent_to_max":
                ok = isinstance(value, bool)
            else:
                ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
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
