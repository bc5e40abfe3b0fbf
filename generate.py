"""Answer questions with an exported Coconut model (a folder written by export.py).

    python generate.py MODEL_DIR --question "Every wumpus is a yumpus. ... Is Tom a yumpus or rempus?"
    python generate.py MODEL_DIR --question "..." --stage 1 --show-thoughts
    python generate.py MODEL_DIR --questions data/prosqa_test.json --batch_size 32 --output answers.json

The prompt is SPEC 2's evaluation prompt: `question + "\\n"` tokenized with the
tokenizer's special tokens, then `<|start-latent|>`, k `<|latent|>`, `<|end-latent|>`
with k = min(stage, max_latent_stage) * c_thought. `--stage` defaults to the model's
max_latent_stage (fully latent, as the final evaluation); a stage beyond it is an
error. For a questions file whose examples carry `steps` and a model exported with
pad_latent_to_max False, the cap is min(max_latent_stage, len(steps)), exactly as
run.py evaluates. Models trained with cot / no_cot / no_thoughts get the bare question
(stage 0 only); pause_as_thought models get the coconut layout with `<|latent|>` as an
ordinary token.

Decoding is greedy (KV cache, batched), until EOS or --max_new_tokens. For every
question it prints the generated text, the answer (text after the last '#', commas
removed, as run.py scores it) and how many latent tokens the prompt held and how many
tokens were generated (EOS not counted). A questions file is a JSON list of objects
with a "question" (e.g. a Coconut data file) or of strings; when its examples carry an
"answer", the accuracy is printed too.

--show-thoughts decodes each continuous thought through the language-model head: the
thought at a latent position is the last hidden state of the position before it, so
its next-token distribution is that position's logits. The top 5 tokens and their
probabilities are printed per thought.

Bad input (missing or non-Coconut model folder, unreadable questions file, a question
longer than the model's context, a stage beyond max_latent_stage): one line on
stderr, exit status 2.
"""

import argparse
import json
import os
import sys
from dataclasses import dataclass, field
from typing import Optional

import torch

from coconut import Coconut, align_latents
from utils import extract_answer, normalize_answer, question_thoughts

LATENT_METHODS = ("coconut", "pause_as_thought")  # methods whose prompt holds the latent markers
DEFAULT_MAX_NEW_TOKENS = 128
TOP_K = 5


class UsageError(ValueError):
    """Bad input from the user; the message is one line."""


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line on stderr, exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


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

    def load_model(self, device="cpu") -> Coconut:
        """Coconut.from_pretrained(model_dir) on device, in eval mode; UsageError if it fails."""
        if self.model is None:
            try:
                model = Coconut.from_pretrained(self.model_dir)
            except (OSError, ValueError, RuntimeError, KeyError) as e:
                raise UsageError(f"{self.model_dir}: the model does not load ({_first_line(e)})") from None
            self.model = model.to(device).eval()
        return self.model


def _first_line(error: Exception) -> str:
    line = next((ln.strip() for ln in str(error).splitlines() if ln.strip()), type(error).__name__)
    return line[:200]


def open_exported(model_dir: str) -> Exported:
    """Settings, tokenizer and context of an export.py folder, without the weights.

    UsageError (one line) for a missing folder, a folder without a usable
    coconut_config.json, or a tokenizer that does not match it.
    """
    from transformers import AutoConfig, AutoTokenizer

    try:
        settings = Coconut.read_coconut_config(model_dir)
    except (OSError, ValueError) as e:
        raise UsageError(str(e)) from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        config = AutoConfig.from_pretrained(model_dir)
    except (OSError, ValueError, KeyError) as e:
        raise UsageError(f"{model_dir}: the tokenizer or config does not load ({_first_line(e)})") from None
    if settings["method"] in LATENT_METHODS:
        ids = tokenizer.convert_tokens_to_ids(["<|start-latent|>", "<|end-latent|>", "<|latent|>"])
        expected = [settings["start_latent_id"], settings["end_latent_id"], settings["latent_token_id"]]
        if ids != expected:
            raise UsageError(f"{model_dir}: the tokenizer's latent token ids {ids} differ from coconut_config.json's {expected}")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    return Exported(model_dir, settings, tokenizer, context)


def load_exported(model_dir: str, device="cpu") -> Exported:
    """open_exported, then the weights."""
    exported = open_exported(model_dir)
    exported.load_model(device)
    return exported


# ---------------------------------------------------------------------------------
# Prompts


def resolve_stage(settings: dict, stage: Optional[int]) -> int:
    """The stage to prompt at: default max_latent_stage; UsageError beyond it."""
    top = settings["max_latent_stage"]
    if stage is None:
        return top
    if stage < 0:
        raise UsageError(f"--stage must be >= 0, got {stage}")
    if stage > top:
        why = "" if top else f" (a {settings['method']} model has no latent stages)"
        raise UsageError(f"--stage {stage} is beyond this model's max_latent_stage {top}{why}")
    return stage


def n_thoughts(settings: dict, stage: int, n_steps: Optional[int] = None) -> int:
    """SPEC 2's evaluation k; n_steps (when known) caps it unless pad_latent_to_max."""
    if settings["method"] not in LATENT_METHODS:
        return 0
    return question_thoughts(stage, settings["c_thought"], settings["max_latent_stage"],
                             settings["pad_latent_to_max"], n_steps)


def prompt_ids(tokenizer, settings: dict, question: str, stage: int, n_steps: Optional[int] = None) -> list:
    """question + "\\n" (with special tokens) + [start] + [latent] * k + [end]."""
    ids = tokenizer.encode(question + "\n", add_special_tokens=True)
    if settings["method"] in LATENT_METHODS:
        k = n_thoughts(settings, stage, n_steps)
        ids += [settings["start_latent_id"]] + [settings["latent_token_id"]] * k + [settings["end_latent_id"]]
    return ids


def check_context(prompts: list, context: Optional[int]) -> None:
    """UsageError naming the first prompt that leaves no room to generate a token."""
    if context is None:
        return
    for i, ids in enumerate(prompts):
        if len(ids) >= context:
            raise UsageError(
                f"question {i} is {len(ids)} tokens with its latent tokens and markers; "
                f"the model's context is {context} positions"
            )


# ---------------------------------------------------------------------------------
# Decoding


@dataclass
class Result:
    question: str
    output: str  # the generated text, special tokens skipped
    answer: str  # after the last '#', commas removed, stripped
    latent_tokens: int
    generated_tokens: int
    thoughts: list = field(default_factory=list)  # per thought: [(token, probability)] * top_k


def pad_batch(prompts: list, pad_id: int, latent_id: int, device):
    """Right-pad, then align the first latents in one column (SPEC 3)."""
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
    probs = []
    for row in range(input_ids.shape[0]):
        cols = (input_ids[row] == model.latent_token_id).nonzero(as_tuple=True)[0]
        probs.append(torch.softmax(out.logits[row, cols - 1].float(), dim=-1))
    return probs


@torch.no_grad()
def answer_batch(exported: Exported, questions: list, prompts: list, max_new_tokens: int,
                 show_thoughts: bool = False, top_k: int = TOP_K) -> list:
    """Greedy answers for one batch of prompts (token id lists)."""
    model, tokenizer = exported.model, exported.tokenizer
    device = next(model.parameters()).device
    eos = model.eos_token_id
    ids, mask, positions = pad_batch(prompts, tokenizer.pad_token_id, exported.latent_id, device)
    if exported.context is not None:  # generated positions must stay inside the context
        max_new_tokens = max(1, min(max_new_tokens, exported.context - max(len(p) for p in prompts)))
    outputs = model.generate(ids, mask, max_new_tokens=max_new_tokens)
    thoughts = thought_distributions(model, ids, mask, positions) if show_thoughts else None
    results = []
    for i, (question, prompt) in enumerate(zip(questions, prompts)):
        kept = _kept_generation(outputs[i, len(prompt):].tolist(), eos)
        text = tokenizer.decode(kept, skip_special_tokens=True)
        result = Result(question, text, extract_answer(text), prompt.count(exported.latent_id), len(kept))
        if thoughts is not None:
            top = thoughts[i].topk(min(top_k, thoughts[i].shape[-1]), dim=-1)
            result.thoughts = [
                [(tokenizer.decode([t]), float(p)) for t, p in zip(idx.tolist(), val.tolist())]
                for val, idx in zip(top.values, top.indices)
            ]
        results.append(result)
    return results


def format_result(result: Result, index: Optional[int] = None) -> str:
    head = "Question" if index is None else f"[{index}] Question"
    lines = [f"{head}: {result.question}"]
    for j, top in enumerate(result.thoughts, 1):
        lines.append(f"  thought {j}: " + "  ".join(f"{tok!r} {p:.3f}" for tok, p in top))
    lines.append("Output: " + result.output.replace("\n", "\n        "))
    lines.append(f"Answer: {result.answer}")
    lines.append(f"Tokens: {result.latent_tokens} latent, {result.generated_tokens} generated")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------
# Questions file


def read_json_list(path: str, items: str) -> list:
    """A non-empty JSON list from `path`; UsageError (one line) otherwise."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise UsageError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"{path}: not a readable JSON file ({' '.join(str(e).split())})") from None
    if not isinstance(data, list) or not data:
        raise UsageError(f"{path}: must be a non-empty JSON list of {items}")
    return data


def load_questions(path: str) -> list:
    """[{"question": str, ...}] (answer and steps optional) or [str]; UsageError if not."""
    data = read_json_list(path, "questions")
    examples = []
    for i, item in enumerate(data):
        if isinstance(item, str):
            item = {"question": item}
        if not isinstance(item, dict) or not isinstance(item.get("question"), str):
            raise UsageError(f"{path}: example {i} has no string 'question'")
        examples.append(item)
    return examples


def _n_steps(example: dict) -> Optional[int]:
    steps = example.get("steps")
    return len(steps) if isinstance(steps, list) else None


def run(args) -> int:
    exported = open_exported(args.model_dir)
    stage = resolve_stage(exported.settings, args.stage)
    if args.question is not None:
        examples = [{"question": args.question}]
    else:
        examples = load_questions(args.questions)
    prompts = [prompt_ids(exported.tokenizer, exported.settings, ex["question"], stage, _n_steps(ex)) for ex in examples]
    check_context(prompts, exported.context)
    if args.output and not os.path.isdir(os.path.dirname(os.path.abspath(args.output))):
        raise UsageError(f"--output {args.output}: its folder does not exist")
    exported.load_model(args.device)  # the slow part, once the input is known to be good

    from tqdm import tqdm

    many = args.questions is not None
    results = []
    bar = tqdm(total=len(prompts), desc="Answering", unit="q", disable=not many, file=sys.stderr)
    for start in range(0, len(prompts), args.batch_size):
        stop = start + args.batch_size
        batch = answer_batch(exported, [ex["question"] for ex in examples[start:stop]], prompts[start:stop],
                             args.max_new_tokens, args.show_thoughts)
        for k, result in enumerate(batch):
            text = format_result(result, start + k if many else None)
            if many:
                tqdm.write(text + "\n", file=sys.stdout)
            else:
                print(text)
        results.extend(batch)
        bar.update(len(batch))
    bar.close()
    if args.show_thoughts and exported.settings["method"] != "coconut":
        print(f"(no continuous thoughts: this is a {exported.settings['method']} model)")

    records = [_record(result, example) for result, example in zip(results, examples)]
    scored = [r for r in records if "correct" in r]
    if scored:
        correct = sum(r["correct"] for r in scored)
        print(f"Accuracy: {correct} / {len(scored)} = {correct / len(scored)}")
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump(records, f, indent=1)
        print(f"wrote {len(records)} answers to {args.output}")
    return 0


def _record(result: Result, example: dict) -> dict:
    record = {
        "question": result.question,
        "output": result.output,
        "answer": result.answer,
        "latent_tokens": result.latent_tokens,
        "generated_tokens": result.generated_tokens,
    }
    if result.thoughts:
        record["thoughts"] = [[{"token": t, "prob": p} for t, p in top] for top in result.thoughts]
    if isinstance(example.get("answer"), str):
        record["reference"] = example["answer"]
        record["correct"] = result.answer == normalize_answer(example["answer"])  # as run.py scores
    return record


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="generate.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir", metavar="MODEL_DIR", help="a folder written by export.py")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--question", help="one question")
    source.add_argument("--questions", metavar="FILE.json", help="a JSON list of questions (e.g. a data file)")
    p.add_argument("--stage", type=int, default=None,
                   help="curriculum stage of the prompt (default: the model's max_latent_stage)")
    p.add_argument("--show-thoughts", "--show_thoughts", dest="show_thoughts", action="store_true",
                   help=f"print each continuous thought's top-{TOP_K} tokens under the LM head")
    p.add_argument("--batch_size", "--batch-size", type=int, default=16, help="questions per batch (default 16)")
    p.add_argument("--max_new_tokens", "--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS,
                   help=f"generation budget (default {DEFAULT_MAX_NEW_TOKENS})")
    p.add_argument("--output", metavar="OUT.json", help="also write the answers as JSON")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def quiet_transformers() -> None:
    """No per-file progress bars from transformers: the CLI's output is its own."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error("--batch_size must be >= 1")
    if args.max_new_tokens < 1:
        parser.error("--max_new_tokens must be >= 1")
    quiet_transformers()
    try:
        return run(args)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
