"""Answering with an exported Coconut model (a folder written by export.py): the library
behind generate.py and analysis/probe_prosqa.py.

    exported = open_exported(model_dir)             # settings, tokenizer, context; no weights
    layout = exported.layout
    prompts = [layout.question_prompt(ids, stage) for ids in ...]   # DESIGN §2
    exported.load_model("cpu")
    results = answer_batch(exported, questions, prompts, max_new_tokens=128)

Prompts follow the run's evaluation layout (`layout.PromptLayout`), decoding is greedy
with Coconut.generate, and answers are scored as run.py scores them (utils.extract_answer).
Bad input raises cli.UserError with a one-line message.
"""

import functools
import os
from dataclasses import dataclass, field
from typing import Optional

import torch

from cli import UserError, cannot_write_in, first_line
from coconut import Coconut, align_latents, context_length
from layout import END, LATENT, START, LatentTokens, PromptLayout, first_spelled, is_text, special_token_texts
from modeling import fuse_gelu
from utils import METHODS, extract_answer

TOP_K = 5


# ---------------------------------------------------------------------------------
# Loading


@dataclass
class Exported:
    """An export.py folder: settings, tokenizer and context first, the weights on demand."""

    model_dir: str
    settings: dict  # coconut_config.json
    tokenizer: object
    context: Optional[int]  # the model's positions, None if its config does not say
    model: Optional[Coconut] = None

    @property
    def latent_id(self) -> int:
        return self.settings["latent_token_id"]

    @property
    def method(self):
        return METHODS[self.settings["method"]]

    @functools.cached_property
    def special_texts(self) -> set:
        """The texts its tokenizer reads as special tokens (layout.special_token_texts)."""
        return special_token_texts(self.tokenizer)

    @property
    def layout(self) -> PromptLayout:
        """The evaluation prompt layout the model was trained with."""
        return PromptLayout.from_settings(self.settings, self.method.latent_tokens)

    def load_model(self, device="cpu") -> Coconut:
        """Coconut.from_pretrained(model_dir) on device, in eval mode; UserError if it fails."""
        if self.model is None:
            device = check_device(device)  # before the slow part
            try:
                model = Coconut.from_pretrained(self.model_dir)
            except Exception as e:  # a damaged weights file raises safetensors' own error, too
                raise UserError(f"{self.model_dir}: the model does not load ({type(e).__name__}: {first_line(e)})") \
                    from None
            fuse_gelu(model.base_causallm)  # as training ran it (the `fused_gelu` default)
            self.model = model.to(device).eval()
        return self.model


def check_device(name) -> torch.device:
    """The device `name` (--device) names, UserError unless this machine has it."""
    try:
        device = torch.device(name)
    except RuntimeError as e:  # "gpu", "cuda:x", ...
        raise UserError(f"--device {name}: {first_line(e)}") from None
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA devices")
    return device


def open_exported(model_dir: str) -> Exported:
    """Settings, tokenizer and context of an export.py folder, without the weights.

    UserError (one line) for a missing folder, a folder without a usable
    coconut_config.json, or a tokenizer that does not match it.
    """
    from transformers import AutoConfig, AutoTokenizer

    try:
        settings = Coconut.read_coconut_config(model_dir)
    except (OSError, ValueError) as e:
        raise UserError(str(e)) from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        config = AutoConfig.from_pretrained(model_dir)
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"{model_dir}: the tokenizer or config does not load ({first_line(e)})") from None
    if settings["method"] not in METHODS:
        raise UserError(f"{model_dir}: unknown method {settings['method']!r} in coconut_config.json")
    if METHODS[settings["method"]].latent_tokens:
        found = LatentTokens.of(tokenizer)
        expected = LatentTokens(start_id=settings["start_latent_id"], end_id=settings["end_latent_id"],
                                latent_id=settings["latent_token_id"])
        if found != expected:
            raise UserError(f"{model_dir}: the tokenizer's latent token ids {found} differ from coconut_config.json's {expected}")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return Exported(model_dir, settings, tokenizer, context_length(config))


def load_exported(model_dir: str, device="cpu") -> Exported:
    """open_exported, then the weights."""
    exported = open_exported(model_dir)
    exported.load_model(device)
    return exported


# ---------------------------------------------------------------------------------
# Prompts


def resolve_stage(settings: dict, stage: Optional[int]) -> int:
    """The stage to prompt at: default max_latent_stage; UserError beyond it."""
    top = settings["max_latent_stage"]
    if stage is None:
        return top
    if stage < 0:
        raise UserError(f"--stage must be >= 0, got {stage}")
    if stage > top:
        why = "" if top else f" (a {settings['method']} model has no latent stages)"
        raise UserError(f"--stage {stage} is beyond this model's max_latent_stage {top}{why}")
    return stage


def prompt_ids(exported: "Exported", question: str, stage: int, n_steps: Optional[int] = None) -> list:
    """The evaluation prompt of a question: question + "\\n" (with special tokens), then
    the latent block of `stage`; n_steps (when known) caps the thoughts unless
    pad_latent_to_max."""
    shown = question if len(question) <= 60 else question[:57] + "..."
    if not is_text(question):  # as run.py refuses such data (dataset._check_text)
        raise UserError(f"the question {shown!r} is not valid text (a lone UTF-16 surrogate, e.g. half an emoji)")
    marker = next((m for m in (START, END, LATENT) if m in question), None)
    if marker is not None:  # it would tokenize to a latent token the prompt does not place
        raise UserError(f"the question {shown!r} holds {marker}, a token of the prompt's latent block; "
                        "give the question alone")
    special = first_spelled(question, exported.special_texts)
    if special is not None:  # as run.py refuses such data (dataset.check_special_text)
        raise UserError(f"the question {shown!r} holds {special}, one of the tokenizer's special tokens: "
                        "it would be read as that token, not as text")
    question_ids = exported.tokenizer.encode(question + "\n", add_special_tokens=True)
    return exported.layout.question_prompt(question_ids, stage, n_steps)


def check_output_file(flag: str, path: str, protected: Optional[str] = None) -> None:
    """`flag` (--output, --json, --plot) names a file that can be written, not the input
    file `protected`: UserError before any work if not."""
    same = protected is not None and os.path.exists(path) and os.path.exists(protected)
    if same and os.path.samefile(path, protected):
        raise UserError(f"{flag} {path}: is the input file {protected}; name another file")
    if path.endswith(("/", os.sep)) or os.path.isdir(path):
        example = {"--plot": "probe.png", "--json": "probe.json"}.get(flag, "answers.json")
        raise UserError(f"{flag} {path}: is a folder; name the file to write, e.g. {os.path.join(path, example)}")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UserError(f"{flag} {path}: its folder does not exist")
    if cannot_write_in(folder) is not None or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise UserError(f"{flag} {path}: cannot be written")


def check_context(prompts: list, context: Optional[int]) -> None:
    """UserError naming the first prompt that leaves no room to generate a token."""
    if context is None:
        return
    for i, ids in enumerate(prompts):
        if len(ids) >= context:
            raise UserError(
                f"question {i} is {len(ids)} tokens with its latent tokens and markers; "
                f"the model's context is {context} positions"
            )


# ---------------------------------------------------------------------------------
# Decoding


@dataclass
class Result:
    question: str
    output: str  # the generated text, special tokens skipped
    answer: str  # after the last '#' of question and output, commas removed, stripped (as run.py scores)
    latent_tokens: int
    generated_tokens: int  # the stopping EOS not counted
    thoughts: list = field(default_factory=list)  # per thought: [(token, probability)] * top_k


def pad_batch(prompts: list, pad_id: int, latent_id: int, device):
    """Right-pad, then align the first latents in one column (DESIGN §3)."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([p + [pad_id] * (width - len(p)) for p in prompts], dtype=torch.long, device=device)
    mask = torch.tensor([[1] * len(p) + [0] * (width - len(p)) for p in prompts], dtype=torch.long, device=device)
    return align_latents(ids, mask, latent_id, pad_id)


def _kept_generation(row: list, eos_id: int) -> list:
    """The tokens Coconut.generate kept after a prompt: the first always, then up to EOS."""
    kept = list(row)
    while len(kept) > 1 and kept[-1] == eos_id:
        kept.pop()
    return kept


@torch.no_grad()
def thought_distributions(model: Coconut, input_ids, attention_mask, position_ids):
    """Per row, the LM-head probabilities (n_thoughts, vocab) of its continuous thoughts.

    The thought at latent column c is the last hidden state at c - 1, so its
    next-token distribution is the logits of column c - 1.
    """
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
    is_thought = input_ids == model.latent_token_id if model.latent_token_id is not None else torch.zeros_like(input_ids, dtype=torch.bool)
    probs = []
    for row in range(input_ids.shape[0]):
        cols = is_thought[row].nonzero(as_tuple=True)[0]
        probs.append(torch.softmax(out.logits[row, cols - 1].float(), dim=-1))
    return probs


@torch.no_grad()
def answer_batch(exported: Exported, questions: list, prompts: list, max_new_tokens: int,
                 show_thoughts: bool = False, top_k: int = TOP_K) -> list:
    """Greedy answers for one batch of prompts (token id lists). A prompt too long for
    max_new_tokens more positions gets what the context leaves it, in a batch of its own:
    the others keep their whole budget, whatever batch they share with it."""
    budgets = [generation_budget(len(prompt), max_new_tokens, exported.context) for prompt in prompts]
    results = [None] * len(prompts)
    for budget in sorted(set(budgets)):
        rows = [i for i, b in enumerate(budgets) if b == budget]
        answers = _answer_rows(exported, [questions[i] for i in rows], [prompts[i] for i in rows], budget,
                               show_thoughts, top_k)
        for i, result in zip(rows, answers):
            results[i] = result
    return results


def generation_budget(prompt_length: int, max_new_tokens: int, context: Optional[int]) -> int:
    """New tokens a prompt may get: max_new_tokens, or (at least one) what the context leaves."""
    return max_new_tokens if context is None else max(1, min(max_new_tokens, context - prompt_length))


def _answer_rows(exported: Exported, questions: list, prompts: list, max_new_tokens: int, show_thoughts: bool,
                 top_k: int) -> list:
    model, tokenizer = exported.model, exported.tokenizer
    device = next(model.parameters()).device
    eos = model.eos_token_id
    ids, mask, positions = pad_batch(prompts, tokenizer.pad_token_id, exported.latent_id, device)
    outputs = model.generate(ids, mask, max_new_tokens=max_new_tokens)
    thoughts = thought_distributions(model, ids, mask, positions) if show_thoughts else None
    results = []
    for i, (question, prompt) in enumerate(zip(questions, prompts)):
        kept = _kept_generation(outputs[i, len(prompt):].tolist(), eos)
        text = tokenizer.decode(kept, skip_special_tokens=True)
        # run.py's answer: after the last '#' of the whole decoded row, question included
        answer = extract_answer(tokenizer.decode(prompt + kept, skip_special_tokens=True))
        result = Result(question, text, answer, prompt.count(exported.latent_id), len(kept) - (kept == [eos]))
        if thoughts is not None:
            top = thoughts[i].topk(min(top_k, thoughts[i].shape[-1]), dim=-1)
            result.thoughts = [
                [(tokenizer.decode([t]), float(p)) for t, p in zip(idx.tolist(), val.tolist())]
                for val, idx in zip(top.values, top.indices)
            ]
        results.append(result)
    return results
