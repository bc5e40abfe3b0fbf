"""Validation for run.py: loss on the staged validation set, and generation accuracy.

Accuracy (DESIGN §4): the answer is the decoded text after the last '#', commas
removed, stripped; CoT match compares the generated lines after the question's line
(its lines, for a question of several) and before '#' with the reference steps.
Generation is batched (`batch_size_eval`), every process takes an equal share of the
questions (padded with repeats that are not counted), and counts are summed over
processes.
"""

import math

import torch
from tqdm import tqdm

from coconut import Coconut
from distributed import DistEnv, all_reduce_sum, gathered_root, is_sharded, loader, to_device
from utils import extract_answer, normalize_answer


def extract_cot(text: str, question_lines: int = 1) -> str:
    """The generated steps: the lines after the question's (the first line, as published,
    for a one-line question) and before '#', stripped."""
    return "\n".join(text.split("\n")[question_lines:]).split("#")[0].strip()


def reference_answers(examples: list) -> tuple:
    answers = [normalize_answer(ex["answer"]) for ex in examples]
    cots = ["\n".join(ex["steps"]) for ex in examples]
    return answers, cots


def loss_only(model) -> dict:
    """forward's keywords for a step that needs only the loss: Coconut then applies the LM
    head only where the loss needs it, never over (batch, seq, vocab)."""
    return {"return_logits": False} if isinstance(model, Coconut) else {}


@torch.no_grad()
def validation_loss(model, dataset, collator, batch_size: int, env: DistEnv) -> float:
    """Mean of per-batch losses over all processes (each process gets an equal share)."""
    model.eval()
    total, count, forward_options = 0.0, 0, loss_only(model)
    for batch in loader(dataset, batch_size, collator, env):
        total += float(model(**to_device(batch, env.device), **forward_options).loss)
        count += 1
    total, count = all_reduce_sum([total, count], env)
    return total / max(count, 1)


def generator_for(model, base_causallm, tokens, eos_id) -> Coconut:
    """The Coconut model itself, or a plain-decoding view (no latent id) of the base model."""
    if isinstance(model, Coconut):  # the method fills latents (modeling.build_model)
        return model
    return Coconut(base_causallm, None, tokens.start_id, tokens.end_id, eos_id)


def _rank_share(n: int, env: DistEnv, batch_size: int) -> tuple:
    """(own, padded, n_batches, batch_size): the indices this process answers, and them
    padded with repeats (not counted) to n_batches whole batches, as many on every
    process (their passes pair up; one batch shape, one compiled or captured graph). The
    batch is at most one process's share: a batch_size_eval far above the number of
    questions used to make every process decode batch_size_eval rows."""
    own = list(range(env.rank, n, env.world_size))
    per_rank = max(1, math.ceil(n / env.world_size))
    batch_size = min(batch_size, per_rank)
    n_batches = math.ceil(per_rank / batch_size)
    padded = own + [own[0] if own else 0] * (n_batches * batch_size - len(own))
    return own, padded, n_batches, batch_size


def synced_decoding(model, env: DistEnv) -> bool:
    """Whether the processes decode in step (generate's synced_gpus): under FSDP every
    process runs every pass, its blocks gathering their weights together. Replicas
    (only_eval under torchrun) decode alone: no collective per token, and on CUDA the
    captured step, which synced decoding forgoes."""
    return env.distributed and is_sharded(model)


SAMPLES_SHOWN = 5  # rank 0's first answers printed at each evaluation, as published


def _unpadded(output: torch.Tensor, prompt_length: int, eos_id: int) -> torch.Tensor:
    """A generated row as decoding it alone gives it (the published log's): the prompt,
    then the new tokens up to the first EOS after the first (always kept, as published;
    a later EOS ends the row and is not part of it), without the batch's EOS padding."""
    ends = (output[prompt_length + 1:] == eos_id).nonzero()
    return output if len(ends) == 0 else output[: prompt_length + 1 + int(ends[0])]


@torch.no_grad()
def generation_accuracy(model, generator, dataset, collator, tokenizer, examples, config, env: DistEnv, log) -> dict:
    """Greedy answers for every question; returns counts summed over processes."""
    answers, cots = reference_answers(examples)
    own, padded, n_batches, batch_size = _rank_share(len(dataset), env, config.batch_size_eval)
    model.eval()
    correct = cot_correct = 0
    bar = tqdm(total=n_batches, desc="Test Accuracy", colour="blue", dynamic_ncols=True, disable=not env.is_main)
    with gathered_root(model):
        for b in range(n_batches):
            rows = padded[b * batch_size : (b + 1) * batch_size]
            batch = collator([dataset[i] for i in rows])
            outputs = generator.generate(
                batch["input_ids"].to(env.device), batch["attention_mask"].to(env.device),
                max_new_tokens=config.max_new_tokens, synced_gpus=synced_decoding(model, env),
            )
            for k, (row, output) in enumerate(zip(rows, outputs)):
                if b * batch_size + k >= len(own):
                    continue  # padding: a repeat that keeps the processes in step
                idx = int(batch["idx"][k])
                text = tokenizer.decode(output, skip_special_tokens=True)
                correct += extract_answer(text) == answers[idx]
                cot_correct += extract_cot(text, examples[idx]["question"].count("\n") + 1) == cots[idx]
                if env.is_main and b * batch_size + k < SAMPLES_SHOWN:
                    log(f"Question {idx}: Answer = '{answers[idx]}' CoT = '{cots[idx]}'")
                    shown = _unpadded(output, int(batch["attention_mask"][k].sum()), tokenizer.eos_token_id)
                    log(f"Full output: '{tokenizer.decode(shown)}'")
                    log(f"Extracted Output: '{extract_answer(text)}'")
            bar.update(1)
    bar.close()
    correct, cot_correct, total = all_reduce_sum([correct, cot_correct, len(own)], env)
    return {"correct": int(correct), "cot_correct": int(cot_correct), "total": int(total)}


def report(counts: dict, log) -> dict:
    """Print the published log lines; return the metrics for wandb."""
    c, cc, t = counts["correct"], counts["cot_correct"], max(counts["total"], 1)
    log(f"Accuracy on validation set: {c} / {counts['total']} = {c / t}")
    log(f"CoT match on validation set: {cc} / {counts['total']} = {cc / t}")
    return {"eval/acc": c / t, "eval/cot_em": cc / t}
