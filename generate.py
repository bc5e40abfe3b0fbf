"""Answer questions with an exported Coconut model (a folder written by export.py).

    python generate.py MODEL_DIR --question "Every wumpus is a yumpus. ... Is Tom a yumpus or rempus?"
    python generate.py MODEL_DIR --question "..." --stage 1 --show-thoughts
    python generate.py MODEL_DIR --questions data/prosqa_test.json --batch_size 32 --output answers.json

The prompt is DESIGN §2's evaluation prompt: `question + "\\n"` tokenized with the
tokenizer's special tokens, then `<|start-latent|>`, k `<|latent|>`, `<|end-latent|>`
with k = min(stage, max_latent_stage) * c_thought. `--stage` defaults to the model's
max_latent_stage (fully latent, as the final evaluation); a stage beyond it is an
error. For a questions file whose examples carry `steps` and a model exported with
pad_latent_to_max False, the cap is min(max_latent_stage, len(steps)), exactly as
run.py evaluates. Models trained with cot / no_cot / no_thoughts get the bare question
(stage 0 only); pause_as_thought models get the coconut layout with `<|latent|>` as an
ordinary token.

Decoding is greedy (KV cache, batched), until EOS or --max_new_tokens. Generated
positions stay inside the model's context: a prompt near its limit gets the positions
left (in a batch of its own, so the others keep the whole --max_new_tokens). For
every question it prints the generated text, the answer (text after the last '#' of
the question and the output, commas removed, as run.py scores it) and how many latent
tokens the prompt held and how many tokens were generated (EOS not counted). A
questions file is a JSON list of objects with a "question" (e.g. a Coconut data file)
or of strings; when its examples carry an "answer", the accuracy is printed too.

--show-thoughts decodes each continuous thought through the language-model head: the
thought at a latent position is the last hidden state of the position before it, so
its next-token distribution is that position's logits. The top 5 tokens and their
probabilities are printed per thought.

Bad input (missing or non-Coconut model folder, unreadable questions file, a question
longer than the model's context, a stage beyond max_latent_stage, an --output that is a
folder, cannot be written or is the questions file): one line on stderr, exit status 2,
before any answer is generated.
"""

import argparse
import json
import sys
from typing import Optional

import torch

from cli import OneLineParser, UserError, main_guard, quiet_transformers, read_json_list
from inference import (TOP_K, Result, answer_batch, check_context, check_output_file, open_exported, prompt_ids,
                       resolve_stage)
from utils import DEFAULT_MAX_NEW_TOKENS, normalize_answer


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


def load_questions(path: str) -> list:
    """[{"question": str, ...}] (answer and steps optional) or [str]; UserError if not."""
    data = read_json_list(path, "questions")
    examples = []
    for i, item in enumerate(data):
        if isinstance(item, str):
            item = {"question": item}
        if not isinstance(item, dict) or not isinstance(item.get("question"), str):
            raise UserError(f"{path}: example {i} has no string 'question'")
        # a reference answer of another type would leave the example out of the accuracy, silently
        if item.get("answer") is not None and not isinstance(item["answer"], str):  # null: no reference
            raise UserError(f"{path}: example {i}: 'answer' must be a string, got {type(item['answer']).__name__}")
        examples.append(item)
    return examples


def _n_steps(example: dict) -> Optional[int]:
    steps = example.get("steps")
    return len(steps) if isinstance(steps, list) else None


def run(args) -> int:
    if args.output:
        check_output_file("--output", args.output, args.questions)
    exported = open_exported(args.model_dir)
    stage = resolve_stage(exported.settings, args.stage)
    if args.question is not None:
        examples = [{"question": args.question}]
    else:
        examples = load_questions(args.questions)
    prompts = [prompt_ids(exported, ex["question"], stage, _n_steps(ex)) for ex in examples]
    check_context(prompts, exported.context)
    exported.load_model(args.device)  # the slow part, once the input is known to be good
    # the run's own budget by default: its answers are read after the last '#' generated
    max_new_tokens = args.max_new_tokens or exported.settings.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)

    from tqdm import tqdm

    many = args.questions is not None
    results = []
    bar = tqdm(total=len(prompts), desc="Answering", unit="q", disable=not many, file=sys.stderr)
    for start in range(0, len(prompts), args.batch_size):
        stop = start + args.batch_size
        batch = answer_batch(exported, [ex["question"] for ex in examples[start:stop]], prompts[start:stop],
                             max_new_tokens, args.show_thoughts)
        for k, result in enumerate(batch):
            text = format_result(result, start + k if many else None)
            if many:
                tqdm.write(text + "\n", file=sys.stdout)
            else:
                print(text)
        results.extend(batch)
        bar.update(len(batch))
    bar.close()
    if args.show_thoughts and not exported.method.fills_latents:
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
    p.add_argument("--max_new_tokens", "--max-new-tokens", type=int, default=None,
                   help="generation budget (default: the run's max_new_tokens, kept in coconut_config.json; "
                        f"{DEFAULT_MAX_NEW_TOKENS} for exports without it)")
    p.add_argument("--output", metavar="OUT.json", help="also write the answers as JSON")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error("--batch_size must be >= 1")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        parser.error("--max_new_tokens must be >= 1")
    quiet_transformers()
    return main_guard(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
