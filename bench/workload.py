"""ProsQA-shaped synthetic batches and random-weight GPT-2 models for the benchmarks.

Nothing is downloaded: token ids are drawn from a seeded generator and the models have
random weights. The vocabulary is GPT-2's 50257 tokens plus the three Coconut markers.

A training example at stage k (c_thought 1) is

    question (~200 tokens) + <start> + <latent> * k + <end> + step tokens + answer + EOS

where the k latents *replace k step tokens*, so the sequence length is the same at
every stage: what changes between stages is only the latent filling, which is what the
step-time-per-stage measurement isolates. Labels cover the step and answer tokens
(the question, markers and latents are not supervised), as in dataset.py.
"""

import random
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from layout import PromptLayout

IGNORE_INDEX = -100


def aligned_collate(features: list, pad_id: int, latent_id: int) -> dict:
    """DESIGN §3's layout, as dataset.MyCollator makes it (tests/test_bench.py checks they
    agree), for machines without the `datasets` package that dataset.py imports (the GPU
    benchmark's): examples with latents are left-padded so their first latents share a
    column, then all are right-padded. Pads: pad_id, attention 0, position 0, label -100."""
    pads = {"input_ids": pad_id, "attention_mask": 0, "position_ids": 0, "labels": IGNORE_INDEX}
    rows = []
    for f in features:
        ids = list(f["input_ids"])
        row = {"input_ids": ids, "attention_mask": [1] * len(ids), "position_ids": list(range(len(ids)))}
        if "labels" in f:
            row["labels"] = list(f["labels"])
        rows.append(row)
    firsts = [r["input_ids"].index(latent_id) if latent_id in r["input_ids"] else None for r in rows]
    target = max((i for i in firsts if i is not None), default=0)
    width = max(len(r["input_ids"]) + (0 if i is None else target - i) for r, i in zip(rows, firsts))
    batch = {}
    for key in rows[0]:
        padded = []
        for row, first in zip(rows, firsts):
            left = [pads[key]] * (0 if first is None else target - first) + row[key]
            padded.append(left + [pads[key]] * (width - len(left)))
        batch[key] = torch.tensor(padded, dtype=torch.long)
    return batch

GPT2_VOCAB = 50257
EOS_ID = 50256  # <|endoftext|>
START_ID, END_ID, LATENT_ID = GPT2_VOCAB, GPT2_VOCAB + 1, GPT2_VOCAB + 2
VOCAB_SIZE = GPT2_VOCAB + 3


@dataclass(frozen=True)
class Shape:
    """Token counts of one ProsQA-shaped example (the question length varies per example)."""

    question: int = 200  # mean question length
    question_jitter: int = 12  # question length drawn from question +- jitter
    steps: int = 90  # step tokens at stage 0; stage k turns k of them into latents
    answer: int = 6  # answer tokens, EOS included
    vocab: int = VOCAB_SIZE

    @property
    def length(self) -> int:
        return self.question + 2 + self.steps + self.answer


FULL = Shape()
QUICK = Shape(question=24, question_jitter=4, steps=10, answer=3, vocab=300)


def ids_for(vocab: int):
    """(eos, start, end, latent) ids for a vocabulary whose last three rows are the markers."""
    return SimpleNamespace(eos=vocab - 4, start=vocab - 3, end=vocab - 2, latent=vocab - 1)


def layout_for(vocab: int) -> PromptLayout:
    """The run's prompt layout with these ids: one thought per latent, no cap."""
    ids = ids_for(vocab)
    return PromptLayout(ids.start, ids.latent, ids.end, c_thought=1, max_latent_stage=10**6, pad_latent_to_max=False)


def make_model(n_layer=4, n_embd=256, n_head=4, vocab=VOCAB_SIZE, seed=0, n_positions=1024):
    """GPT-2 with random weights and dropout off (so losses of two algorithms compare),
    its activation fused as run.py trains it by default (modeling.fuse_gelu)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from modeling import fuse_gelu

    torch.manual_seed(seed)
    cfg = GPT2Config(
        n_layer=n_layer, n_embd=n_embd, n_head=n_head, vocab_size=vocab, n_positions=n_positions,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=ids_for(vocab).eos, eos_token_id=ids_for(vocab).eos,
    )
    model = GPT2LMHeadModel(cfg)
    fuse_gelu(model)
    return model


def collator(vocab: int):
    """dataset.MyCollator (pad = EOS, DESIGN §1), or aligned_collate where `datasets` is missing."""
    ids = ids_for(vocab)
    try:
        from dataset import MyCollator
    except ImportError:
        return lambda features: aligned_collate(features, ids.eos, ids.latent)
    tokenizer = SimpleNamespace(pad_token_id=None, eos_token_id=ids.eos)  # pad = EOS (DESIGN §1)
    return MyCollator(tokenizer, latent_id=ids.latent)


def _tokens(rng, n, vocab):
    # ordinary tokens only: below EOS, so no marker or EOS appears by chance
    return [rng.randrange(0, ids_for(vocab).eos) for _ in range(n)]


def training_examples(shape: Shape, batch: int, seed: int = 0):
    """Stage-independent content: (question, steps, answer) token lists per example."""
    rng = random.Random(seed)
    out = []
    for _ in range(batch):
        q = shape.question + rng.randint(-shape.question_jitter, shape.question_jitter)
        out.append((_tokens(rng, q, shape.vocab), _tokens(rng, shape.steps, shape.vocab),
                    _tokens(rng, shape.answer - 1, shape.vocab) + [ids_for(shape.vocab).eos]))
    return out


def training_batch(shape: Shape, batch: int, stage, seed: int = 0) -> dict:
    """A collated batch at `stage` (one int, or one per example): k latents replace the first k step tokens."""
    stages = [stage] * batch if isinstance(stage, int) else list(stage)
    layout = layout_for(shape.vocab)
    features = []
    for stage, (question, steps, answer) in zip(stages, training_examples(shape, batch, seed)):
        prefix = question + layout.latent_block(stage)
        suffix = steps[stage:] + answer
        tokens = prefix + suffix
        features.append({"input_ids": tokens, "labels": [IGNORE_INDEX] * len(prefix) + suffix})
    return collator(shape.vocab)(features)


def prompts(shape: Shape, n: int, n_latents: int = 6, seed: int = 1) -> list:
    """n evaluation prompts (question + <start> + latents + <end>), ~shape.length tokens, varied."""
    rng = random.Random(seed)
    latent_block = layout_for(shape.vocab).latent_block(n_latents)
    out = []
    for _ in range(n):
        q = shape.question + shape.steps + rng.randint(-3 * shape.question_jitter, 3 * shape.question_jitter)
        out.append(torch.tensor(_tokens(rng, q, shape.vocab) + latent_block))
    return out


def prompt_batch(shape: Shape, prompt_list: list) -> dict:
    """Prompts collated with MyCollator (first latents aligned, pads masked)."""
    return collator(shape.vocab)([{"input_ids": p.tolist()} for p in prompt_list])
