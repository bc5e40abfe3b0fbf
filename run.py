"""Train and evaluate Coconut (and its baselines) from one YAML config.

    python run.py args/demo.yaml                                 # one process
    torchrun --nproc_per_node 4 run.py args/prosqa_coconut.yaml   # one node
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d \\
        --rdzv_endpoint HOST:29500 run.py args/gsm_coconut.yaml    # several nodes

Every epoch (SPEC 5): build the stage's data, train, save `checkpoint_{epoch+1}`,
validation loss, then generation accuracy and CoT match. A run whose folder already
holds checkpoints resumes from the newest complete one. Bad configs and data stop
before any model is loaded, with one line and exit status 2.
"""

import dataclasses
import os
import sys

import torch
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

import checkpoint
import distributed
from dataset import DataError, MyCollator, get_cot_latent_dataset, get_dataset, get_question_latent_dataset, load_data_file
from evaluate import generation_accuracy, generator_for, report, to_device, validation_loss
from modeling import ModelLoadError, build_model
from utils import ConfigError, load_config, set_seed

USAGE = "usage: python run.py CONFIG.yaml   (or: torchrun --nproc_per_node N run.py CONFIG.yaml)"
DEBUG_TRAIN_SIZE, DEBUG_VAL_SIZE = 5000, 32
USER_ERRORS = (ConfigError, DataError, ModelLoadError, checkpoint.CheckpointError)


def log_on(env):
    def log(message):
        if env.is_main:
            print(message, flush=True)

    return log


# ------------------------------------------------------------------ preflight
def preflight(config, config_path) -> dict:
    """Check paths and data before any heavy work; returns the parsed data files."""
    needed = [("val_path", config.val_path)]
    if not config.only_eval:
        needed.insert(0, ("train_path", config.train_path))
    if config.load_model_path is not None:
        needed.append(("load_model_path", config.load_model_path))
    for key, path in needed:
        if not os.path.isfile(path):
            raise ConfigError(f"config {config_path}: key '{key}' names a file that does not exist: {path}")
    data = {"val": load_data_file(config.val_path)}
    if not config.only_eval:
        data["train"] = load_data_file(config.train_path)
    return data


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
            return epoch, state, checkpoint.checkpoint_path(config.save_dir, epoch), train_state
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


def no_special_marker(config) -> bool:
    return config.cot or config.no_cot or config.no_thoughts


def loader(dataset, batch_size, collator, env):
    sampler = DistributedSampler(dataset, env.world_size, env.rank, shuffle=False) if env.distributed else None
    return DataLoader(dataset, batch_size=batch_size, collate_fn=collator, sampler=sampler)


# ------------------------------------------------------------------ training
def new_optimizer(model, config):
    return torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)


def train_one_epoch(model, optimizer, train_loader, config, epoch, env, wandb_run):
    distributed.unwrap(model).train()
    accumulation = config.gradient_accumulation_steps
    n_batches = len(train_loader)
    bar = tqdm(total=n_batches // accumulation, desc=f"Training Epoch: {epoch + 1}", colour="blue",
               dynamic_ncols=True, disable=not env.is_main)
    for step, batch in enumerate(train_loader):
        steps_now = (step + 1) % accumulation == 0 or step == n_batches - 1  # the last partial group steps too
        distributed.set_gradient_sync(model, steps_now)
        loss = model(**to_device(batch, env.device)).loss / accumulation
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
        log("saving model.")
    distributed.barrier(env)


# ------------------------------------------------------------------ main loop
def run(config, data, env) -> None:
    log = log_on(env)
    set_seed(config.seed)  # identical initial weights on every process
    start_epoch, state, state_path, train_state = find_start(config, log)
    built = build_model(config, state, state_path, log)
    del state
    model = built.model.to(env.device)
    if isinstance(model, torch.nn.Module) and hasattr(model, "sync_passes_across_ranks"):
        model.sync_passes_across_ranks = env.distributed
    if env.distributed:
        model = distributed.replicate(model, env) if config.only_eval else distributed.shard(model, built.base_causallm)
    log(f"Running {'DDP' if config.only_eval else 'FSDP'} on rank = {env.rank}, world size = {env.world_size}" if env.distributed else "Running on one process")

    tokens, tokenizer = built.tokens, built.tokenizer
    staging = data_config(config)
    marker_free = no_special_marker(config)
    collator = MyCollator(tokenizer, latent_id=tokens.latent_id, label_pad_token_id=-100)
    val_base = get_dataset(config.val_path, tokenizer, DEBUG_VAL_SIZE if config.debug else 10**9)
    val_examples = data["val"][: len(val_base)]
    train_base = None if config.only_eval else get_dataset(config.train_path, tokenizer, DEBUG_TRAIN_SIZE if config.debug else 10**9)
    generator = generator_for(model, built.base_causallm, tokens, tokenizer.eos_token_id)
    wandb_run = init_wandb(config, env, log)
    saving = not (config.debug or config.only_eval)

    optimizer, previous_stage = None, None
    best_acc = train_state["best_acc"] if train_state else 0.0
    for epoch in range(start_epoch, config.num_epochs):
        stage = config.scheduled_stage(epoch)
        set_seed(config.seed + epoch)  # per-epoch randomness: a resumed epoch repeats exactly
        if not config.only_eval:
            optimizer = stage_optimizer(model, optimizer, config, stage, previous_stage, epoch, train_state, env, log)
            previous_stage, train_state = stage, None
            train_data = get_cot_latent_dataset(stage, train_base, staging, tokens.start_id, tokens.latent_id,
                                                tokens.end_id, no_special_marker=marker_free, shuffle=True, epoch=epoch)
            train_one_epoch(model, optimizer, loader(train_data, config.batch_size_training, collator, env), config, epoch, env, wandb_run)
            distributed.barrier(env)
            keep_optimizer = not (config.reset_optimizer and config.scheduled_stage(epoch + 1) != stage)
            if saving and not config.save_only_improve:
                save(model, optimizer, config, epoch + 1, best_acc, keep_optimizer, env, log)
            val_loss_data = get_cot_latent_dataset(stage, val_base, staging, tokens.start_id, tokens.latent_id,
                                                   tokens.end_id, no_special_marker=marker_free, epoch=epoch)
            val_loss = validation_loss(model, val_loss_data, collator, config.batch_size_training, env)
            log(f"eval loss {val_loss}")
            if wandb_run is not None:
                wandb_run.log({"eval/loss": val_loss})
        questions = get_question_latent_dataset(stage, val_base, staging, tokens.start_id, tokens.latent_id,
                                                tokens.end_id, no_special_marker=marker_free)
        counts = generation_accuracy(model, generator, questions, collator, tokenizer, val_examples, config, env, log)
        metrics = report(counts, log)
        if wandb_run is not None:
            wandb_run.log(metrics)
        if config.only_eval:
            break
        accuracy = metrics["eval/acc"]
        if saving and config.save_only_improve and accuracy > best_acc:
            save(model, optimizer, config, epoch + 1, accuracy, keep_optimizer, env, log)
        best_acc = max(best_acc, accuracy)
    if wandb_run is not None:
        wandb_run.finish()


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


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0] in ("-h", "--help"):
        print(USAGE, file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    try:
        config = load_config(argv[0])
        data = preflight(config, argv[0])
    except USER_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    env = distributed.setup()
    try:
        run(config, data, env)
    except USER_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    finally:
        distributed.teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
