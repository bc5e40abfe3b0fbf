"""Pre-flight checks of a run: what run.py can check in seconds, before it builds or
trains the model (DESIGN §5). Each problem is a UserError whose one line names the
culprit (key, file, example, checkpoint tensor); nothing has been written by then.

    found = preflight.check(config, data, saves=True)
    if found.finished: print(found.finished)    # a finished run: nothing to train

Checked, in order:
- the run has something to do: only_eval has weights to evaluate (load_model_path, or
  a model_id with weights) and an epoch to evaluate, a training run an epoch to train
  (resume < num_epochs);
- the data files hold examples (run.py has already parsed and validated them);
- `model_id` (or `local_path`) resolves: a local folder must hold a config.json, a
  path that does not exist is an error, and a hub id that is not in the local cache
  fails at once when the hub is offline (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE set,
  or the hub unreachable within 2 s) instead of retrying for a minute; a cached one
  (config and weights) with the hub unreachable loads from the cache, said in a line;
  a local folder's safetensors files are whole (their headers read);
- the tokenizer loads, has an EOS token and a vocabulary, and tokenizes each file's
  first example in pieces as it tokenizes the whole text (DESIGN §1); no example's
  text spells one of its special tokens (it would be read as that token);
- every example fits the model's context (max_position_embeddings or n_positions):
  the longest training sequence the run's stages give it (question, latent tokens and
  markers, kept steps, answer, EOS), and for validation examples also the evaluation
  prompt plus `max_new_tokens`. Tokenized exactly as dataset.tokenize_sample does;
  every example of both files, also in debug runs;
- the checkpoint the run will load (its own folder's newest usable one when it
  resumes, else load_model_path, which must then exist) fits the model: the model is
  built on the meta device from its config (no weights), resized for the three new
  tokens as modeling.build_model does, and the checkpoint's keys and shapes are
  compared by modeling's loading rules; the file is memory-mapped, so no tensor data
  is read here; a model Coconut cannot run (coconut.unsupported_model) or an encoder
  (BERT, RoBERTa, ...: encoder_model) is named, and so is a config transformers builds
  a model from that cannot run (n_layer: -1);
- every token id the tokenizer can give indexes a row of the model's input embeddings
  as the run will have them (that meta-device model's): methods without latent tokens
  add no rows, so a tokenizer that is not the model's own (a pad token added without
  resizing, say) would index past them, an IndexError mid-epoch on a CPU and a device
  assert on a GPU;
- a run whose folder already holds its last epoch is finished (`Preflight.finished`),
  and so is a save_only_improve run whose progress record (checkpoint.write_progress)
  says it trained every epoch, its newest checkpoint being its best;
- save_path is writable (runs that save checkpoints, on the process that writes);
- and a warning (Preflight.warnings), not a stop, when max_new_tokens is fewer than the
  tokens of some validation answers' `### ` + answer, which can then never count.
"""

from __future__ import annotations

import copy
import glob
import os
import re
import socket
import warnings
from dataclasses import dataclass, field
from typing import Optional
from urllib.parse import urlparse

import torch
from huggingface_hub.errors import StrictDataclassError

import checkpoint
import wandb_setup
from cli import UserError, cannot_write_in, first_line, reports_errors
from coconut import context_length, unsupported_model
from dataset import check_piecewise, check_special_text
from distributed import transformer_blocks
from layout import PromptLayout
from modeling import build_tokenizer, has_weights, place_weights
from startup import never_evaluated
from utils import DEBUG_VAL_SIZE

HUB_PROBE_SECONDS = 2.0
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
# a hub repository id: "name" or "owner/name"
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
TOKENIZE_CHUNK = 4096


@dataclass
class Preflight:
    finished: Optional[str] = None  # set when the run folder already holds the last epoch
    warnings: list = field(default_factory=list)  # lines for the log: nothing to stop the run for


def check(config, data: dict, saves: bool) -> Preflight:
    """Every check of the module docstring; UserError on the first problem.

    data: run.py's parsed files, {"val": [...], "train": [...] unless only_eval}.
    saves: this process writes the run's checkpoints (rank 0 of a run that saves).
    """
    check_run_keys(config)
    wandb_setup.check_mode(config)
    check_data_present(config, data)
    check_device()
    key, name = model_source(config)
    hf_config = resolve_model(key, name)
    check_weight_files(key, name)
    try:
        tokenizer, tokens = build_tokenizer(name)
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"{key} {name}: the tokenizer does not load ({first_line(e)})") from None
    check_tokenizer(config, data, tokenizer, f"{key} {name}")
    check_context(config, data, tokenizer, PromptLayout.for_config(config, tokens), context_length(hf_config), f"{key} {name}")

    evaluated = data["val"][:DEBUG_VAL_SIZE] if config.debug else data["val"]
    result = Preflight(warnings=answer_budget_warnings(config, evaluated, tokenizer))
    state, state_path = None, None
    # as trainer.find_start: a training run resumes its own folder's newest checkpoint
    # (the run warns about the checkpoints it skips; here they are said only when the run
    # is finished, so no training start says them)
    skipped = []
    found = None if config.only_eval or config.debug else checkpoint.find_run_resume_point(config.save_dir,
                                                                                            warn=skipped.append)
    if found is not None:
        state, state_path = found.model_state, found.path
        trained = max(found.epoch, checkpoint.read_progress(config.save_dir, found.newest_saved))
        if trained >= config.num_epochs and not never_evaluated(found.train_state):
            # a skipped checkpoint may have been the best: neither its accuracy nor "its best" is said
            result.finished = "\n".join(skipped + [finished_message(config, found.newest_saved, found.train_state,
                                                                     found.path, skipped=bool(skipped))])
    elif not (config.only_eval or config.debug) and checkpoint.read_progress(config.save_dir, None) >= config.num_epochs:
        result.finished = finished_message(config, None, None)
        return result
    elif config.load_model_path is not None:  # not read when the run resumes its own folder
        state_path = config.load_model_path
        if os.path.isdir(state_path):  # an export.py folder, or a checkpoint's .state folder
            raise UserError(f"load_model_path {state_path}: is a folder; it names a checkpoint_N file (an exported "
                            "model folder goes in model_id)")
        if os.path.exists(state_path) and not os.path.isfile(state_path):  # /dev/null, a pipe
            raise UserError(f"load_model_path {state_path}: is not a regular file")
        if not os.path.isfile(state_path):
            raise UserError(f"load_model_path {state_path}: no such file")
        state = checkpoint.load_model_state(state_path)  # memory-mapped: no tensor data is read
    rows = check_checkpoint_fits(config, hf_config, tokenizer, tokens, state, state_path)
    check_vocabulary(config, tokenizer, tokens, rows, f"{key} {name}")
    if saves and result.finished is None:
        check_writable(config)
    return result


# ------------------------------------------------------------------ keys
def check_run_keys(config) -> None:
    """A run with nothing to do, or an evaluation of random weights, is an error.

    only_eval without load_model_path evaluates the model as it loads, as published: a
    pretrained hub model, or a folder export.py wrote; not a folder without weights.
    """
    key, name = model_source(config)
    if config.only_eval and config.load_model_path is None and not has_weights(name):
        raise UserError(f"only_eval is True but load_model_path is None and {key} {name} holds no weights: "
                        "name the checkpoint to evaluate")
    if config.resume >= config.num_epochs:
        what = "evaluate (only_eval evaluates epoch resume)" if config.only_eval else "train"
        raise UserError(f"resume is {config.resume} but num_epochs is {config.num_epochs}: "
                        f"no epoch left to {what}; resume must be below num_epochs")


def check_device() -> None:
    """Under torchrun on a machine with CUDA, this process's GPU (LOCAL_RANK) exists:
    more processes than visible GPUs would stop in torch.cuda.set_device with a CUDA
    error, after every other check."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0") or 0)
    if torch.cuda.is_available() and local_rank >= torch.cuda.device_count():
        raise UserError(f"this process is LOCAL_RANK {local_rank} but the node has {torch.cuda.device_count()} "
                        "visible GPU(s): start at most that many processes per node (torchrun --nproc_per_node)")


def check_data_present(config, data: dict) -> None:
    files = [("val_path", config.val_path, data["val"])]
    if not config.only_eval:
        files.insert(0, ("train_path", config.train_path, data["train"]))
    for key, path, examples in files:
        if not examples:
            raise UserError(f"{key} {path}: the file holds no examples (an empty JSON list)")


# ------------------------------------------------------------------ the model
def model_source(config) -> tuple:
    """(the key that names it, the folder or hub id) the model and tokenizer load from."""
    return ("local_path", config.local_path) if config.local else ("model_id", config.model_id)


def looks_like_path(name: str) -> bool:
    """Not a hub id: absolute, relative with ./ ~ or a trailing /, too many parts, or
    under a folder that exists here (`models/nope` next to `models/`)."""
    if os.path.isabs(name) or name.startswith((".", "~")) or name.endswith(("/", os.sep)):
        return True
    if not HUB_ID.fullmatch(name):
        return True
    return "/" in name and os.path.isdir(name.split("/", 1)[0])


def resolve_model(key: str, name: str) -> object:
    """The model's transformers config; UserError naming the key when it cannot be had."""
    from transformers import AutoConfig

    if os.path.isdir(name):
        if not os.path.isfile(os.path.join(name, "config.json")):
            raise UserError(f"{key} {name}: the folder holds no config.json (not a Hugging Face model folder)")
    elif os.path.exists(name):
        raise UserError(f"{key} {name}: is a file; expected a model folder or a hub id")
    elif looks_like_path(name):
        raise UserError(f"{key} {name}: no such folder")
    else:
        check_hub(key, name)
    try:
        return AutoConfig.from_pretrained(name)
    except (OSError, ValueError, KeyError, TypeError, StrictDataclassError) as e:  # the last: "n_embd": "128"
        raise UserError(f"{key} {name}: the model's config does not load ({first_line(e)})") from None


LFS_POINTER = b"version https://git-lfs"  # how a Git LFS pointer file starts: the weights were never pulled


def check_weight_files(key: str, name: str) -> None:
    """The weight files of a local model folder hold weights: safetensors headers parse and
    cover each file (a copy cut short, a file of something else); where there are none,
    the PyTorch weight files transformers loads instead (pytorch_model*.bin) start as
    torch.save writes one; neither is a Git LFS pointer. Other files (training_args.bin,
    optimizer.pt) are not loaded, and not looked at. Reads the headers only."""
    if not os.path.isdir(name):
        return
    from safetensors import SafetensorError, safe_open

    def refuse(path, why):
        return UserError(f"{key} {name}: its weights file {os.path.basename(path)} {why}")

    safetensors = sorted(glob.glob(os.path.join(glob.escape(name), "*.safetensors")))
    for path in safetensors:
        if (_head(path) or b"").startswith(LFS_POINTER):  # unreadable: safe_open names it
            raise refuse(path, "is a Git LFS pointer, not the weights (git lfs pull fetches them)")
        try:
            with safe_open(path, framework="pt"):
                pass
        except (SafetensorError, OSError) as e:
            raise refuse(path, f"is damaged ({first_line(e)})") from None
    if safetensors:
        return  # what transformers loads
    for path in sorted(glob.glob(os.path.join(glob.escape(name), "pytorch_model*.bin"))):
        head = _head(path)
        if head is None:
            continue  # what cannot be read is named where it is loaded
        if head.startswith(LFS_POINTER):
            raise refuse(path, "is a Git LFS pointer, not the weights (git lfs pull fetches them)")
        if not _is_torch_file(head):
            raise refuse(path, "is not a PyTorch weights file (torch.save writes a zip archive)")


def _head(path: str) -> Optional[bytes]:
    """The first bytes of a file, enough to tell its format; None when it cannot be read."""
    try:
        with open(path, "rb") as f:
            return f.read(263)
    except OSError:
        return None


def _is_torch_file(head: bytes) -> bool:
    """Whether a file starting with `head` is torch.save's zip archive, or a legacy format
    torch.load still reads: a pickle (protocol 2 or later starts with 0x80) or a tar archive."""
    return head.startswith(b"PK\x03\x04") or head.startswith(b"\x80") or head[257:262] == b"ustar"


def check_hub(key: str, name: str) -> None:
    """A hub id needs the hub unless it is cached; offline and not cached: fail at once.
    Cached, with the hub unreachable and no offline setting: this process loads from the
    cache only (transformers would otherwise retry every optional file for minutes)."""
    cached = in_hub_cache(name)
    reason = offline_by_setting()
    if reason is None:
        reason = hub_unreachable()
        if reason is not None and cached:
            use_hub_cache_only()
            if reports_errors():
                print(f"{key} {name}: {reason}: using its copy in the local Hugging Face cache", flush=True)
    if reason is not None and not cached:
        raise UserError(f"{key} {name}: not a local folder, and as a hub id it must be downloaded, but {reason} "
                        "and it is not in the local Hugging Face cache (give a local folder, or download it first)")


def use_hub_cache_only() -> None:
    """HF_HUB_OFFLINE for this process from now on (huggingface_hub reads its setting once,
    at import: its constant is set too)."""
    from huggingface_hub import constants

    os.environ["HF_HUB_OFFLINE"] = "1"
    constants.HF_HUB_OFFLINE = True


def offline_by_setting() -> Optional[str]:
    for variable in OFFLINE_VARIABLES:
        if os.environ.get(variable, "").strip().upper() in ("1", "ON", "YES", "TRUE"):
            return f"{variable}={os.environ[variable]} is set"
    return None


def hub_unreachable() -> Optional[str]:
    """Why the hub (HF_ENDPOINT, through the HTTPS proxy if one is set) cannot be
    reached within HUB_PROBE_SECONDS, or None when a connection opens."""
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    target = urlparse(proxy if proxy and "://" in proxy else f"http://{proxy}") if proxy else endpoint
    host = target.hostname or "huggingface.co"
    port = target.port or (443 if target.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=HUB_PROBE_SECONDS).close()
    except OSError as e:
        return f"the hub ({host}:{port}) cannot be reached ({e.strerror or type(e).__name__})"
    return None


# a cached hub model has its config and one of these
HUB_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                    "pytorch_model.bin.index.json")


def in_hub_cache(name: str) -> bool:
    """Whether the local Hugging Face cache holds the model's config.json and weights."""
    try:
        from huggingface_hub import try_to_load_from_cache

        def cached(file):
            return isinstance(try_to_load_from_cache(name, file), str)

        return cached("config.json") and any(cached(file) for file in HUB_WEIGHT_FILES)
    except Exception:  # an id the cache cannot even name: not cached
        return False


# ------------------------------------------------------------------ the tokenizer
def check_tokenizer(config, data: dict, tokenizer, source: str) -> None:
    """The tokenizer can tokenize the data as dataset.tokenize_sample does: it has an EOS
    (every answer ends with it), it has a vocabulary (a model folder without tokenizer
    files loads as an empty tokenizer that turns every text into no tokens), and it
    tokenizes each file's first example in pieces as it tokenizes the whole; no text
    spells one of its special tokens (check_special_text)."""
    if tokenizer.eos_token_id is None:
        raise UserError(f"{source}: the tokenizer has no EOS token (every answer ends with it; set eos_token)")
    if not tokenizer.encode("### ", add_special_tokens=False):
        raise UserError(f"{source}: the tokenizer turns text into no tokens (are its vocabulary files missing?)")
    for key, part in [("train_path", "train"), ("val_path", "val")]:
        if part in data:  # check_data_present: each file holds an example
            check_piecewise(getattr(config, key), {**data[part][0], "idx": 0}, tokenizer)
            check_special_text(getattr(config, key), data[part], tokenizer)


# ------------------------------------------------------------------ the data fits the context
def piece_lengths(tokenizer, examples: list) -> list:
    """Per example (question, [step, ...], answer) token counts, tokenized as
    dataset.tokenize_sample tokenizes them (the answer's count includes EOS)."""

    def counts(texts, special):
        out = []
        for i in range(0, len(texts), TOKENIZE_CHUNK):
            ids = tokenizer(texts[i: i + TOKENIZE_CHUNK], add_special_tokens=special)["input_ids"]
            out.extend(len(x) for x in ids)
        return out

    questions = counts([ex["question"] + "\n" for ex in examples], True)
    steps = iter(counts([s + "\n" for ex in examples for s in ex["steps"]], False))
    answers = counts(["### " + ex["answer"] for ex in examples], False)
    return [(q, [next(steps) for _ in ex["steps"]], a + 1) for ex, q, a in zip(examples, questions, answers)]


def byte_bound_holds(tokenizer) -> bool:
    """Whether a piece of text never takes more tokens than its UTF-8 bytes plus one.

    True for fast tokenizers whose normalizer cannot lengthen the text (none, as in
    GPT-2 and Llama 3, or SentencePiece's prepend-and-replace-space): every token then
    covers at least one byte (byte-level BPE, byte fallback) or one character, and the
    "plus one" is the prepended word marker. Unicode normalizers (NFC, NFKC, ...) and
    lowercasing may lengthen some texts: those tokenizers count every example exactly.
    """
    from tokenizers import normalizers

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return False
    normalizer = backend.normalizer
    parts = [] if normalizer is None else list(normalizer) if isinstance(normalizer, normalizers.Sequence) else [normalizer]
    for part in parts:
        if isinstance(part, normalizers.Prepend) and len(part.prepend) == 1:
            continue
        if isinstance(part, normalizers.Replace) and len(part.content) <= 1:
            continue
        return False
    return True


def may_not_fit(config, layout: PromptLayout, examples: list, context: int, validation: bool, specials: int) -> list:
    """Indices of the examples that a byte-count bound cannot show to fit (when
    byte_bound_holds): each piece at most its UTF-8 bytes + 1 tokens (the question also
    the special tokens the tokenizer adds), and at most max_latent_stage * c_thought
    latents with their markers at any stage."""
    latents = len(layout.latent_block(layout.max_latent_stage * layout.c_thought))
    budget = context - latents - specials
    prompt_budget = budget - (config.max_new_tokens - 1)
    out = []
    for i, ex in enumerate(examples):
        question = len(ex["question"].encode("utf-8")) + 2  # + "\n" + a word marker
        whole = question + len(ex["answer"].encode("utf-8")) + 7  # "### ", +1, EOS
        whole += sum(len(step.encode("utf-8")) + 2 for step in ex["steps"])
        if (not config.only_eval and whole > budget) or (validation and question > prompt_budget):
            out.append(i)
    return out


def run_stages(config) -> list:
    """The stages the run trains or evaluates at (a superset when it resumes later)."""
    epochs = [config.resume] if config.only_eval else range(config.resume, config.num_epochs)
    return sorted({config.scheduled_stage(e) for e in epochs})


def longest_training(config, layout: PromptLayout, pieces: tuple, stages: list) -> tuple:
    """(positions, stage) of the longest training sequence of one example (DESIGN §2);
    with uniform_prob a sample may also draw any stage 0..len(steps)."""
    q, steps, a = pieces
    drawn = range(len(steps) + 1) if config.uniform_prob > 0 else ()
    tail = [sum(steps[i:]) for i in range(len(steps) + 1)]  # tokens of the steps kept from i on
    best = (0, 0)
    for stage in sorted({*stages, *drawn}):
        first_kept, thoughts = layout.training_thoughts(stage, len(steps))
        if not config.method.keeps_steps:
            first_kept, thoughts = len(steps), 0
        best = max(best, (q + len(layout.latent_block(thoughts)) + tail[min(first_kept, len(steps))] + a, stage))
    return best


def longest_prompt(layout: PromptLayout, pieces: tuple, stages: list) -> tuple:
    """(tokens, stage) of the longest evaluation prompt of one example."""
    q, steps, _ = pieces
    return max((q + len(layout.latent_block(layout.question_thoughts(s, len(steps)))), s) for s in stages)


def misfit(config, layout: PromptLayout, pieces: tuple, stages: list, context: int, validation: bool) -> Optional[str]:
    """Why one example does not fit the context, or None."""
    if not config.only_eval:  # training, and the validation loss on the staged validation set
        length, stage = longest_training(config, layout, pieces, stages)
        if length > context:
            return (f"is {length} tokens at stage {stage} (question, latent tokens and markers, steps, "
                    f"answer, EOS)")
    if validation:
        prompt, stage = longest_prompt(layout, pieces, stages)
        # the last generated token is never fed back: prompt + max_new_tokens - 1 positions
        if prompt + config.max_new_tokens - 1 > context:
            return (f"has an evaluation prompt of {prompt} tokens at stage {stage}, and max_new_tokens "
                    f"{config.max_new_tokens} more need {prompt + config.max_new_tokens - 1} positions "
                    "(lower max_new_tokens)")
    return None


def check_context(config, data: dict, tokenizer, layout: PromptLayout, context: Optional[int], model: str) -> None:
    """UserError naming the file and example index of the first example that does not fit.

    Examples whose byte-count bound fits are not tokenized (GSM8k's 385,620 fit at
    once); the others, or all with a tokenizer the bound does not hold for, are.
    """
    if context is None:
        return
    stages = run_stages(config)
    files = [("val", config.val_path)] if config.only_eval else [("train", config.train_path), ("val", config.val_path)]
    bounded = byte_bound_holds(tokenizer)
    specials = len(tokenizer.encode("", add_special_tokens=True))
    for part, path in files:
        examples, validation = data[part], part == "val"
        todo = range(len(examples))
        if bounded:
            todo = may_not_fit(config, layout, examples, context, validation, specials)
        for i, pieces in zip(todo, piece_lengths(tokenizer, [examples[i] for i in todo])):
            problem = misfit(config, layout, pieces, stages, context, validation)
            if problem:
                raise UserError(f"{path}: example {i} {problem}; the context of {model} is {context} positions")


def answer_budget_warnings(config, examples: list, tokenizer) -> list:
    """A warning when max_new_tokens cannot reach some validation answers: the answer is
    read after the last '#' generated, and `### ` + answer alone (DESIGN §1's answer
    piece, no steps before it) takes more tokens than the budget, so those examples can
    never be counted correct."""
    pieces = tokenizer(["### " + example["answer"] for example in examples], add_special_tokens=False)["input_ids"]
    lengths = [len(ids) for ids in pieces]
    short = [i for i, n in enumerate(lengths) if n > config.max_new_tokens]
    if not short:
        return []
    return [f"warning: max_new_tokens {config.max_new_tokens} is fewer than the tokens of '### ' + answer in "
            f"{len(short)} of {len(examples)} validation examples (up to {max(lengths)}; the first: example "
            f"{short[0]}): their answers can never be counted correct; raise max_new_tokens"]


# ------------------------------------------------------------------ checkpoints
def finished_message(config, epoch: Optional[int], train_state: Optional[dict],
                     last_path: Optional[str] = None, skipped: bool = False) -> str:
    """The line of a run with every epoch trained: its newest checkpoint `epoch` (a
    save_only_improve run's best, which may be older than its last epoch; None when no
    epoch beat accuracy 0, so none was saved: `last_path`, its last epoch's state in
    .latest, if any, is named instead). `skipped`: newer checkpoints did not load, so
    `epoch` is only the newest usable one, and the best accuracy may have been theirs."""
    to_train_on = "to train on: a larger num_epochs; to start again: another name"
    if epoch is None:
        last = f" (its last epoch's weights: {last_path})" if last_path else ""
        return (f"run folder {config.save_dir} has trained all {config.num_epochs} epochs (num_epochs) and holds no "
                f"checkpoint{last}: save_only_improve saved none, no epoch's validation accuracy beat 0. This run is "
                f"finished, nothing to train; {to_train_on}")
    path = checkpoint.checkpoint_path(config.save_dir, epoch)
    accuracy = ""
    if config.save_only_improve and train_state and "best_acc" in train_state and not skipped:
        accuracy = f" (validation accuracy {train_state['best_acc']})"
    held = f"already holds {os.path.basename(path)}{accuracy} and num_epochs is {config.num_epochs}"
    if skipped:
        held = (f"has trained all {config.num_epochs} epochs (num_epochs); its newest usable checkpoint is "
                f"{os.path.basename(path)} (the newer ones above do not load)")
    elif epoch < config.num_epochs:  # its progress record says every epoch is trained
        held = (f"has trained all {config.num_epochs} epochs (num_epochs); its best, {os.path.basename(path)}{accuracy}, "
                "is its newest checkpoint (save_only_improve)")
    return (f"run folder {config.save_dir} {held}: this run is finished, nothing to train. To evaluate it: "
            f"only_eval=True load_model_path={path} resume={config.num_epochs - 1}; {to_train_on}")


def check_checkpoint_fits(config, hf_config, tokenizer, tokens, state: Optional[dict], path: Optional[str]) -> int:
    """The checkpoint's keys and shapes (if the run loads one) against the model of this
    run, built on the meta device (DESIGN §5's loading rules, in modeling.build_model's
    order). Returns the rows of that model's input embeddings."""
    from transformers import AutoModelForCausalLM

    key, name = model_source(config)
    model_type = getattr(hf_config, "model_type", "?")
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "copying ... to a meta parameter ... is a no-op": that is the point
        try:
            base = AutoModelForCausalLM.from_config(copy.deepcopy(hf_config))  # resizing sets the config's vocab_size
        except (ValueError, KeyError) as e:
            if "Unrecognized configuration class" in str(e):  # a vision-language or encoder-decoder config, say
                raise UserError(f"{key} {name}: transformers builds no causal language model from its config "
                                f"({model_type}): Coconut needs a decoder-only causal LM") from None
            raise UserError(f"{key} {name}: transformers cannot build the {model_type} model its config describes "
                            f"({type(e).__name__}: {first_line(e)})") from None
        unsupported = unsupported_model(hf_config) or encoder_model(hf_config)
        if unsupported is not None:
            raise UserError(f"{key} {name}: {unsupported}")
        try:
            place_weights(config, base, tokenizer, tokens, state, path,
                          add_token_rows=lambda b: b.resize_token_embeddings(len(tokenizer), mean_resizing=False))
        except UserError:
            raise
        except (ValueError, TypeError, RuntimeError) as e:  # built, but no pass runs on it (n_layer: -1)
            raise UserError(f"{key} {name}: the {model_type} model its config describes "
                            f"does not work ({type(e).__name__}: {first_line(e)})") from None
    check_blocks(config, base)
    return base.get_input_embeddings().weight.shape[0]


# Encoders (bidirectional attention) that AutoModelForCausalLM builds with a language-model
# head when their config's is_decoder is False; BART's family builds its decoder instead.
ENCODER_MODEL_TYPES = {"bert", "bert-generation", "big_bird", "camembert", "data2vec-text", "electra", "ernie",
                       "megatron-bert", "rembert", "roberta", "roberta-prelayernorm", "roc_bert", "roformer", "xlm",
                       "xlm-roberta", "xlm-roberta-xl", "xmod"}


def encoder_model(hf_config) -> Optional[str]:
    """Why an encoder config is no model for Coconut, None for any other."""
    model_type = getattr(hf_config, "model_type", None)
    if model_type in ENCODER_MODEL_TYPES and not getattr(hf_config, "is_decoder", False):
        return (f"{model_type} is an encoder (bidirectional attention, is_decoder False): Coconut needs a decoder-only "
                "causal LM")
    return None


def check_blocks(config, base) -> None:
    """A run that works block by block (FSDP training under torchrun, activation
    checkpointing, compiled blocks) needs the model to name its transformer blocks
    (`_no_split_modules`); some transformers models (openai-gpt, CTRL, BioGPT, ...) do not."""
    sharded = int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 and not config.only_eval
    needs = [what for what, on in (("training under torchrun (FSDP shards each block)", sharded),
                                   ("activation_checkpointing", config.activation_checkpointing)) if on]
    if not needs:  # compile: True compiles blocks only in these two cases
        return
    try:
        transformer_blocks(base)
    except ValueError:
        key, name = model_source(config)
        raise UserError(f"{key} {name}: {type(base).__name__} names no transformer blocks (_no_split_modules), "
                        f"which {' and '.join(needs)} needs") from None


def check_vocabulary(config, tokenizer, tokens, rows: int, source: str) -> None:
    """Every id the run's data can hold is below `rows`: any token text can produce (the
    vocabulary and added tokens that are not special), the special tokens the data uses
    (pad, EOS, what the tokenizer adds to a text), and the three latent tokens in
    methods that use them. Other special tokens (Gemma 3's image tokens, say) never
    occur in text data and may lie past the embeddings."""
    special = {i for i, token in tokenizer.added_tokens_decoder.items() if token.special}
    used = {tokenizer.pad_token_id, tokenizer.eos_token_id, *tokenizer.encode("", add_special_tokens=True)}
    if config.method.latent_tokens:
        used |= {tokens.start_id, tokens.end_id, tokens.latent_id}
    ids = {token: i for token, i in tokenizer.get_vocab().items() if i not in special or i in used}
    largest = max(ids, key=ids.get)
    if ids[largest] >= rows:
        raise UserError(
            f"{source}: its tokenizer gives token ids up to {ids[largest]} ({largest!r}) but the model's input "
            f"embeddings have {rows} rows, and a {config.method} run adds none: is the tokenizer the model's own?")


# ------------------------------------------------------------------ the run folder
def check_writable(config) -> None:
    """Create save_path/name and write (then remove) a file in it."""
    folder = config.save_dir
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        why = e.strerror or type(e).__name__
    else:
        why = cannot_write_in(folder)
    if why is not None:
        raise UserError(f"save_path {config.save_path}: cannot write checkpoints into {folder} ({why})")
