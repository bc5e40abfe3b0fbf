"""Where the latent tokens go in a prompt or training sample (DESIGN §2).

`PromptLayout` holds the three token ids and the curriculum settings that decide how
many continuous thoughts a sample carries at a stage. dataset.py (staged training and
evaluation data), inference.py (prompts for an exported model), the trainer and the
benchmarks all build their token lists through it, so the rule lives in one place.

    layout = PromptLayout.for_config(config, tokens)      # a run's layout
    ids = layout.question_prompt(question_ids, stage, n_steps)
    kept_steps, n_thoughts = layout.training_thoughts(stage, n_steps)

Plain python, no torch: reading a config or an exported folder stays cheap.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

# Added to the tokenizer in this order (as published), as special tokens.
START, END, LATENT = "<|start-latent|>", "<|end-latent|>", "<|latent|>"


@dataclass(frozen=True)
class LatentTokens:
    """The ids of the three tokens in one tokenizer."""

    start_id: int
    end_id: int
    latent_id: int

    @classmethod
    def of(cls, tokenizer) -> "LatentTokens":
        start, end, latent = tokenizer.convert_tokens_to_ids([START, END, LATENT])
        return cls(start_id=start, end_id=end, latent_id=latent)


@dataclass(frozen=True)
class PromptLayout:
    start_id: int
    latent_id: int
    end_id: int
    c_thought: int  # continuous thoughts per replaced language step
    max_latent_stage: int  # stages past this replace every step
    pad_latent_to_max: bool  # past the last stage, always max_latent_stage groups
    markers: bool = True  # the start/end markers surround the latents

    @classmethod
    def for_config(cls, config, tokens: LatentTokens) -> "PromptLayout":
        """A run's layout; methods without latent tokens get neither markers nor latents
        (the published no_thoughts ran the curriculum with c_thought 0)."""
        uses_latents = config.method.latent_tokens
        return cls(tokens.start_id, tokens.latent_id, tokens.end_id,
                   config.c_thought if uses_latents else 0, config.max_latent_stage,
                   config.pad_latent_to_max, markers=uses_latents)

    @classmethod
    def from_settings(cls, settings: dict, uses_latents: bool) -> "PromptLayout":
        """The layout of an exported model (its coconut_config.json)."""
        return cls(settings["start_latent_id"], settings["latent_token_id"], settings["end_latent_id"],
                   settings["c_thought"] if uses_latents else 0, settings["max_latent_stage"],
                   settings["pad_latent_to_max"], markers=uses_latents)

    def question_thoughts(self, stage: int, n_steps: Optional[int] = None) -> int:
        """Latents of an evaluation prompt: min(stage, cap) * c_thought, cap =
        max_latent_stage, or min(it, n_steps) without pad_latent_to_max when the
        example's step count is known."""
        cap = self.max_latent_stage
        if n_steps is not None and not self.pad_latent_to_max:
            cap = min(cap, n_steps)
        return min(stage, cap) * self.c_thought

    def training_thoughts(self, stage: int, n_steps: int) -> tuple:
        """(index of the first language step kept, latents) of a training sample.

        Past the last stage every step is replaced, by max_latent_stage groups with
        pad_latent_to_max, else by min(n_steps, max_latent_stage); before it the first
        `stage` steps are replaced by `stage` groups, even when the sample has fewer.
        """
        if stage > self.max_latent_stage:
            groups = self.max_latent_stage if self.pad_latent_to_max else min(n_steps, self.max_latent_stage)
            return n_steps, groups * self.c_thought
        return stage, stage * self.c_thought

    def latent_block(self, n_thoughts: int) -> list:
        """[start] + [latent] * n_thoughts + [end] (no markers when the layout has none)."""
        latents = [self.latent_id] * n_thoughts
        return [self.start_id, *latents, self.end_id] if self.markers else latents

    def question_prompt(self, question_ids: list, stage: int, n_steps: Optional[int] = None) -> list:
        """The evaluation prompt: question + [start] + [latent] * k + [end]."""
        return list(question_ids) + self.latent_block(self.question_thoughts(stage, n_steps))


def special_token_texts(tokenizer) -> set:
    """The texts a tokenizer reads as one special token (`<|endoftext|>`, `<s>`, the three
    latent tokens, ...), not as text: data and questions must not spell them."""
    specials = set(tokenizer.all_special_tokens)
    specials.update(t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special)
    specials.discard("")
    return specials


def spelled_tokens(text: str, tokens: set) -> set:
    """The tokens that occur in `text`. Tokens are grouped by their first two characters,
    and each occurrence of such a prefix is looked up by length: the cost follows the
    prefixes' occurrences, not the number of tokens (Gemma names thousands, '<unusedN>'),
    and is a few substring searches for text without them (GSM8k's 385k examples: 0.5 s)."""
    groups = {}  # prefix -> {length: {token, ...}}
    for token in tokens:
        groups.setdefault(token[:2], {}).setdefault(len(token), set()).add(token)
    found = set()
    for prefix, by_length in groups.items():
        at = text.find(prefix)
        while at != -1:
            found.update(text[at: at + length] for length, group in by_length.items() if text[at: at + length] in group)
            at = text.find(prefix, at + 1)
    return found


def is_text(text: str) -> bool:
    """Whether `text` is text a tokenizer can take: no lone UTF-16 surrogate (half an
    emoji), which JSON and a command line allow and a fast tokenizer refuses."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def first_spelled(text: str, tokens: set) -> Optional[str]:
    """The token of `tokens` that `text` spells first (the longest of those at one place,
    as the tokenizer reads it), None when it spells none."""
    present = spelled_tokens(text, tokens)
    return min(present, key=lambda token: (text.index(token), -len(token), token)) if present else None
