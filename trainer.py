"""The per-epoch loop of run.py: stage the data, train, save, evaluate (SPEC 5).

`run.py` checks the config and the data first and imports this module only then, so
a bad input fails in a second. `main(config, data)` joins the process group torchrun
describes (if any), builds the model and runs every epoch from the resume point.
"""

import dataclasses
import os
import sys

import torch
from tqdm import tqdm

import checkpoint
import distributed
from coconut import Coconut
from dataset import MyCollator, get_cot_latent_dataset, get_dataset, get_question_latent_dataset
from evaluate import generation_accuracy, generator_for, report, to_device, validation_loss
from modeling import ModelLoadError, build_model, uses_latent_tokens
from utils import set_seed

DEBUG_TRAIN_SIZE, DEBUG_VAL_SIZE = 5000, 32
# .state files (AdamW's moments: twice the model's size) kept for the newest checkpoints
# only: the resume point and the one it falls back to if that does not load
STATES_KEPT = 2
# raised after the process group exists: still one line and exit status 2
LATE_USER_ERRORS = (ModelLoadError, checkpoint.CheckpointError)


def log_on(env):
    def log(message):
        if env.is_main:
            print(message, flush=True)

    return log


# ------------------------------------------------------------------ setup
def init_wandb(config, env, log):
    if not env.is_main or config.debug or config.only_eval:
        return None
    import wandb

    if "WANDB_MODE" not in os.environ and not _wandb_logged_in():
        os.environ["WANDB_MODE"] = "offline"
        log("wandb: not logged in and WANDB_MODE unset, logging offline (run `wandb login` or set WANDB_MODE)")
    return wandb.init(project=config.project, name=config.name, config=config.to_dict())


def _wandb_logged_in() -> bool:
    netrc = os.path.expanduser("~/.netrc")
    return bool(os.environ.get("WANDB_API_KEY")) or (os.path.isfile(netrc) and "api.wandb.ai" in open(netrc).read())


def find_start(config, log):
    """(first epoch, model state, its path, training state) for this run."""
    if not config.only_eval and not config.debug:
        found = checkpoint.find_resume_point(config.save_dir, warn=log)
        if found is not None:
            epoch, state, train_state = found
            log(f"Warning: found previous run and gonna resume from that. the inputted `resume` argument is ignored!")
            log(f"Loading from previous run epoch_{epoch}!")
            # {} (not None) for a published-layout checkpoint, which has no .state: it is a resume
            return epoch, state, checkpoint.checkpoint_path(config.save_dir, epoch), train_state or {}
    state = None
    if config.load_model_path is not None:
        log(f"Loading from {config.load_model_path} and skip the first {config.resume} epochs")
        state = checkpoint.load_model_state(config.load_model_path)
    elif config.resume:
        log(f"Warning: you want to skip the first {config.resume} but you are not loading any existing checkpoint!")
    return config.resume, state, config.load_model_path, None


def data_config(config):
    """The published `no_thoughts` runs the curriculum with zero thoughts per step."""
    return dataclasses.replace(config, c_thought=0) if config.no_thoughts else config


# ------------------------------------------------------------------ training
def new_optimizer(model, config):
    return torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)


def train_one_epoch(model, optimizer, train_loader, config, epoch, env, wandb_run):
    distributed.unwrap(model).train()
    accumulation = config.gradient_accumulation_steps
    n_batches = len(train_loader)
    # Coconut computes the LM head only where the loss needs it, not full logits
    skip_logits = {"return_logits": False} if isinstance(distributed.unwrap(model), Coconut) else {}
    bar = tqdm(total=n_batches // accumulation, desc=f"Training Epoch: {epoch + 1}", colour="blue",
               dynamic_ncols=True, disable=not env.is_main)
    for step, batch in enumerate(train_loader):
        steps_now = (step + 1) % accumulation == 0 or step == n_batches - 1  # the last partial group steps too
        distributed.set_gradient_sync(model, steps_now)
        loss = model(**to_device(batch, env.device), **skip_logits).loss / accumulation
        loss.backward()
        if steps_now:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            bar.update(1)
        shown = round(float(loss.detach().float() * accumulation), 4)
        if wandb_run is not None:
            wandb_run.log({"train/epoch": epoch + 1, "train/step": epoch * n_batches + step, "train/loss": shown})
        bar.set_description(f"Training Epoch: {epoch + 1}/{config.num_epochs}, batch {step}/{n_batches} completed (loss: {shown}")
    bar.close()


def save(model, optimizer, config, epoch_done, best_acc, keep_optimizer, env, log):
    """checkpoint_{epoch_done} (weights, published layout) and its resume state; rank 0 writes."""
    model_state = distributed.full_model_state(model)
    optimizer_state = distributed.full_optimizer_state(model, optimizer) if keep_optimizer else None
    if env.is_main:
        train_state = {"epoch": epoch_done, "best_acc": best_acc, "optimizer": optimizer_state}
        checkpoint.save_checkpoint(config.save_dir, epoch_done, model_state, train_state)
        newest = checkpoint.list_checkpoints(config.save_dir)[-STATES_KEPT:]
        checkpoint.prune_train_states(config.save_dir, {epoch_done, *newest})
        log("saving model.")
    distributed.barrier(env)


# ------------------------------------------------------------------ data per stage
class Stager:
    """The staged data sets of SPEC 2 for one run: train, validation loss, questions."""

    def __init__(self, config, tokenizer, tokens, data):
        """data: run.py's parsed files, {"val": [...], "train": [...] unless only_eval}."""
        self.config = data_config(config)
        self.marker_free = not uses_latent_tokens(config)  # no start/end markers either
        self.ids = (tokens.start_id, tokens.latent_id, tokens.end_id)
        self.val_base = get_dataset(config.val_path, tokenizer, DEBUG_VAL_SIZE if config.debug else 10**9, data["val"])
        self.train_base = None
        if not config.only_eval:
            self.train_base = get_dataset(config.train_path, tokenizer, DEBUG_TRAIN_SIZE if config.debug else 10**9,
                                          data["train"])

    def train(self, stage, epoch):
        return get_cot_latent_dataset(stage, self.train_base, self.config, *self.ids,
                                      no_special_marker=self.marker_free, shuffle=True, epoch=epoch)

    def validation(self, stage, epoch):
        return get_cot_latent_dataset(stage, self.val_base, self.config, *self.ids,
                                      no_special_marker=self.marker_free, epoch=epoch)

    def questions(self, stage):
        return get_question_latent_dataset(stage, self.val_base, self.config, *self.ids,
                                           no_special_marker=self.marker_free)


# ------------------------------------------------------------------ main loop
def place_model(built, config, env, log):
    """On the device; FSDP2 for training and DDP for only_eval when several processes."""
    model = built.model.to(env.device)
    if isinstance(model, Coconut):  # FSDP: every process runs as many base-model passes
        model.sync_passes_across_ranks = env.distributed
    if not env.distributed:
        log("Running on one process")
        return model
    log(f"Running {'DDP' if config.only_eval else 'FSDP'} on rank = {env.rank}, world size = {env.world_size}")
    return distributed.replicate(model, env) if config.only_eval else distributed.shard(model, built.base_causallm)


def run(config, data, env) -> None:
    log = log_on(env)
    set_seed(config.seed)  # identical initial weights on every process
    start_epoch, state, state_path, train_state = find_start(config, log)
    built = build_model(config, state, state_path, log)
    del state
    if config.compile:  # regional torch.compile of the transformer blocks, before sharding
        import compiling

        compiling.compile_blocks(built.model)
    model = place_model(built, config, env, log)
    tokenizer = built.tokenizer
    collator = MyCollator(tokenizer, latent_id=built.tokens.latent_id, label_pad_token_id=-100)
    stager = Stager(config, tokenizer, built.tokens, data)
    val_examples = data["val"][: len(stager.val_base)]
    generator = generator_for(model, built.base_causallm, built.tokens, tokenizer.eos_token_id)
    wandb_run = init_wandb(config, env, log)
    saving = not (config.debug or config.only_eval)

    optimizer, previous_stage, keep_optimizer = None, None, False
    best_acc = train_state["best_acc"] if train_state else 0.0
    for epoch in range(start_epoch, config.num_epochs):
        stage = config.scheduled_stage(epoch)
        set_seed(config.seed + epoch)  # per-epoch randomness: a resumed epoch repeats exactly
        if not config.only_eval:
            optimizer = stage_optimizer(model, optimizer, config, stage, previous_stage, epoch, train_state, env, log)
            previous_stage, train_state = stage, None
            train_one_epoch(model, optimizer, distributed.loader(stager.train(stage, epoch), config.batch_size_training, collator, env),
                            config, epoch, env, wandb_run)
            distributed.barrier(env)
            keep_optimizer = not (config.reset_optimizer and config.scheduled_stage(epoch + 1) != stage)
            if saving and not config.save_only_improve:
                save(model, optimizer, config, epoch + 1, best_acc, keep_optimizer, env, log)
            val_loss = validation_loss(model, stager.validation(stage, epoch), collator, config.batch_size_training, env)
            log_metrics({"eval/loss": val_loss}, f"eval loss {val_loss}", wandb_run, log)
        counts = generation_accuracy(model, generator, stager.questions(stage), collator, tokenizer, val_examples, config, env, log)
        metrics = report(counts, log)
        log_metrics(metrics, None, wandb_run, log)
        if config.only_eval:
            break
        if saving and config.save_only_improve and metrics["eval/acc"] > best_acc:
            save(model, optimizer, config, epoch + 1, metrics["eval/acc"], keep_optimizer, env, log)
        best_acc = max(best_acc, metrics["eval/acc"])
    if wandb_run is not None:
        wandb_run.finish()


def log_metrics(metrics: dict, line, wandb_run, log) -> None:
    if line is not None:
        log(line)
    if wandb_run is not None:
        wandb_run.log(metrics)


def stage_optimizer(model, optimizer, config, stage, previous_stage, epoch, train_state, env, log):
    """Keep the optimizer within a stage; a new AdamW when the stage changes (reset_optimizer)."""
    if optimizer is not None and not (config.reset_optimizer and stage != previous_stage):
        return optimizer
    optimizer = new_optimizer(model, config)
    resumed_state = train_state.get("optimizer") if train_state else None
    same_stage = not config.reset_optimizer or config.scheduled_stage(epoch - 1) == stage
    if resumed_state is not None and same_stage:
        distributed.load_optimizer_state(model, optimizer, resumed_state, env)
        log(f"restored the optimizer state of epoch {epoch}")
    elif train_state is not None and resumed_state is None and same_stage and epoch > 0:
        log("the checkpoint has no optimizer state (published layout): starting a new AdamW")
    return optimizer


def main(config, data) -> int:
    env = distributed.setup()
    try:
        run(config, data, env)
    except LATE_USER_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    finally:
        distributed.teardown()
    return 0
