"""The naive Coconut algorithm: the baseline the benchmarks compare against.

This is the cost model of the published implementation (DESIGN §9), written plainly so
that it is obviously correct; `coconut.Coconut` must give the same numbers faster.

Training forward, `naive_train_step_forward`:
  for every column holding a latent (left to right), run the base model over the whole
  prefix [0, col) from scratch (no KV cache), take the last-layer hidden state at col-1,
  and put it in as the input embedding at col by rebuilding the batch's embeddings as a
  Python list of per-example, per-position tensors and stacking them again (as the
  published code did on every pass). Then one full forward over the filled embeddings
  gives the logits and the loss (mean cross-entropy over every supervised token of the
  batch, shifted by one: Coconut's loss). Gradients flow through the thoughts.
  Cost: one prefix forward (and its backward) per latent on top of a full step, plus
  batch x seq Python-level tensors per latent.

  The per-position list can be made two ways (`rebuild`), with the same values:
  - "unbind" (default): `embeds.unbind`, one autograd node per row, so the backward
    costs about one copy of the embeddings per latent;
  - "index": `embeds[b, p, :]` for every (b, p), as the published code wrote it. Each of
    those batch x seq views gets its own backward, which allocates a zero tensor the
    size of the whole batch's embeddings and adds it up: quadratic in batch x seq
    (16 x 307 tokens x 256 wide: about 1.1 s per latent on one CPU thread, and
    minutes with two OpenMP threads on cores other jobs are using). The benchmark
    uses "unbind" by default (`bench.py --naive-rebuild index` for the other), so its
    naive ratios are a lower bound on the published code's.

Generation, `naive_generate_one`:
  one question at a time, no KV cache: the latents are filled as above, then every new
  token re-runs the base model over the whole sequence so far. Published semantics: the
  first generated token is always kept, later decoding stops at EOS (not appended).

Where this baseline is *kinder* than the published code, on purpose, so ratios are not
inflated: the prefix passes and the decoding passes ask the model for the logits of the
last position only (`logits_to_keep=1`; the LM head over 50k words is most of a small
model's arithmetic). Where it is harsher: the published training forward reused a KV
cache between its latent passes; this baseline recomputes each prefix, which is what
its generation did and what the brief for this benchmark asks for.
"""

import inspect

import torch
import torch.nn.functional as F

# How the training step builds its per-position list; see the module docstring.
DEFAULT_REBUILD = "unbind"


def _keep_last(model) -> dict:
    """Ask for the last position's logits only, where the model supports it."""
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}


def _positions(attention_mask):
    return ((attention_mask.cumsum(1) - 1).clamp(min=0) * attention_mask).long()


def _as_list(embeds, rebuild):
    """The batch's embeddings as a Python list (per example) of lists (per position) of tensors."""
    if rebuild == "index":  # what the published code wrote
        return [[embeds[b, p, :] for p in range(embeds.shape[1])] for b in range(embeds.shape[0])]
    if rebuild == "unbind":
        return [list(row.unbind(0)) for row in embeds.unbind(0)]
    raise ValueError(f"rebuild must be 'index' or 'unbind', not {rebuild!r}")


def _fill_latents(model, input_ids, attention_mask, position_ids, latent_id, rebuild=DEFAULT_REBUILD):
    """(batch, seq, hidden) input embeddings with every latent filled, the naive way."""
    embeds = model.get_input_embeddings()(input_ids)
    is_latent = input_ids == latent_id
    for col in sorted(set(is_latent.nonzero()[:, 1].tolist())):
        # full recomputation of the prefix before this latent column, no cache
        out = model(
            inputs_embeds=embeds[:, :col],
            attention_mask=attention_mask[:, :col],
            position_ids=position_ids[:, :col],
            output_hidden_states=True,
            **_keep_last(model),
        )
        thought = out.hidden_states[-1][:, col - 1]  # (batch, hidden): last layer, after ln_f
        # the published rebuild: a Python list of batch x seq tensors, then two stacks
        rows = _as_list(embeds, rebuild)
        for b in is_latent[:, col].nonzero()[:, 0].tolist():
            rows[b][col] = thought[b]
        embeds = torch.stack([torch.stack(row) for row in rows])
    return embeds


def naive_train_step_forward(model, batch, latent_id, rebuild=DEFAULT_REBUILD):
    """Loss of a collated batch (input_ids, attention_mask, labels[, position_ids]).

    The batch may be in any padding: each latent column is filled in order. Returns the
    scalar loss (mean cross-entropy over supervised tokens, logits shifted by one).
    """
    input_ids, attention_mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    position_ids = batch.get("position_ids")
    if position_ids is None:
        position_ids = _positions(attention_mask)
    embeds = _fill_latents(model, input_ids, attention_mask, position_ids, latent_id, rebuild)
    logits = model(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids).logits
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
        labels[:, 1:].reshape(-1),
        ignore_index=-100,
    )


@torch.no_grad()
def naive_generate_one(model, ids, latent_id, eos_id, max_new_tokens):
    """Greedy decoding of one unpadded prompt without a KV cache.

    ids: 1-D LongTensor or list of ints. Returns prompt + generated tokens as a list.
    """
    ids = torch.as_tensor(ids, dtype=torch.long).reshape(1, -1)
    mask = torch.ones_like(ids)
    embeds = _fill_latents(model, ids, mask, _positions(mask), latent_id)[0]  # (seq, hidden)
    embedding = model.get_input_embeddings()
    tokens = ids[0].tolist()
    for step in range(max_new_tokens):
        # every new token re-runs the whole sequence (positions default to 0..n-1)
        logits = model(inputs_embeds=embeds[None], **_keep_last(model)).logits
        token = int(logits[0, -1].argmax())
        if step > 0 and token == eos_id:  # published: the first token is always kept
            break
        tokens.append(token)
        embeds = torch.cat([embeds, embedding(ids.new_tensor([token]))])
    return tokens
