"""The per-epoch loop of run.py: stage the data, train, save, evaluate (DESIGN §5).

`run.py` checks the config and the data first and imports this module only then, so
a bad input fails in a second. `main(config, data)` joins the process group torchrun
describes (if any), builds a `TrainingRun` and runs every epoch from the resume point:

    for epoch in range(start, num_epochs):
        optimizer for the epoch (kept, restored or new: Config.optimizer_carries_over)
        train, save checkpoint_{epoch+1}, validation loss, generation accuracy
"""

import os
from typing import Optional

import torch
from tqdm import tqdm

import checkpoint
import distributed
from cli import UserError, fail
from dataset import MyCollator, Staging, get_dataset, question_dataset, training_dataset
from evaluate import generation_accuracy, loss_only, report, validation_loss
from layout import PromptLayout
from startup import Start, build_and_place, evaluation_decoder, find_start, launch_record
from utils import DEBUG_TRAIN_SIZE, DEBUG_VAL_SIZE, set_seed
from wandb_setup import init_wandb

# .state files (AdamW's moments: twice the model's size) kept for the newest checkpoints
# only: the resume point and the one it falls back to if that does not load
STATES_KEPT = 2


def log_on(env):
    def log(message):
        if env.is_main:
            print(message, flush=True)

    return log


# ------------------------------------------------------------------ data per stage
class Stager:
    """The staged data sets of DESIGN §2 for one run: train, validation loss, questions."""

    def __init__(self, config, tokenizer, layout: PromptLayout, data):
        """data: run.py's parsed files, {"val": [...], "train": [...] unless only_eval}."""
        self.staging = Staging(layout, config.uniform_prob, drop_steps=not config.method.keeps_steps, seed=config.seed)
        self.val_base = get_dataset(config.val_path, tokenizer, DEBUG_VAL_SIZE if config.debug else 10**9, data["val"])
        self.train_base = None
        if not config.only_eval:
            self.train_base = get_dataset(config.train_path, tokenizer, DEBUG_TRAIN_SIZE if config.debug else 10**9,
                                          data["train"])

    def train(self, stage, epoch):
        return training_dataset(self.train_base, self.staging, stage, epoch, shuffle=True)

    def validation(self, stage, epoch):
        return training_dataset(self.val_base, self.staging, stage, epoch)

    def questions(self, stage):
        return question_dataset(self.val_base, self.staging.layout, stage)


# ------------------------------------------------------------------ the run
class TrainingRun:
    """One training (or evaluation) run: its process, model, data, optimizer and logs."""

    def __init__(self, config, data, env):
        self.config, self.env, self.log = config, env, log_on(env)
        set_seed(config.seed)  # identical initial weights on every process
        if not (config.debug or config.only_eval):  # every process writes into the run folder
            distributed.check_shared_folder(config.save_dir, env)
        self.start = find_start(config, self.log, env)
        built, self.model = build_and_place(config, self.start, env, self.log)
        self.start.model_state = None  # the model holds the weights now
        self.tokenizer = built.tokenizer
        self.collator = MyCollator(self.tokenizer, latent_id=built.tokens.latent_id, label_pad_token_id=-100)
        self.stager = Stager(config, self.tokenizer, PromptLayout.for_config(config, built.tokens), data)
        self.val_examples = data["val"][: len(self.stager.val_base)]
        self.generator = evaluation_decoder(self.model, built, config, env)
        self.wandb = init_wandb(config, env, self.log)
        if not config.only_eval:  # per process in the config: the published configs' 128 assumed 4 GPUs
            per_step = config.batch_size_training * config.gradient_accumulation_steps * env.world_size
            self.log(f"effective batch: {config.batch_size_training} per process x {config.gradient_accumulation_steps} "
                     f"accumulation step(s) x {env.world_size} process(es) = {per_step} examples per optimizer step")
            n_train = len(self.stager.train_base)
            if per_step > n_train:  # a typo'd batch size, or a debug run's data
                self.log(f"warning: the effective batch ({per_step}) is larger than the training set ({n_train} "
                         "examples): one optimizer step per epoch")
        self.saving = not (config.debug or config.only_eval)
        self.optimizer = None
        train_state = self.start.train_state
        self.best_acc = train_state["best_acc"] if train_state else 0.0
        # the run folder's newest checkpoint (unusable files in the folder skipped): a
        # save_only_improve run's best, which its progress record names
        self.newest_checkpoint = self.start.newest_saved
        self.launch_recorded = False  # config.yaml: written at this launch's first save

    def run(self) -> None:
        config = self.config
        if self.start.unevaluated:
            self.evaluate_unfinished(self.start.epoch - 1)
        for epoch in range(self.start.epoch, config.num_epochs):
            stage = config.scheduled_stage(epoch)
            set_seed(config.seed + epoch)  # per-epoch randomness: a resumed epoch repeats exactly
            if not config.only_eval:
                self.optimizer = self.optimizer_for(epoch)
                self.train_epoch(stage, epoch)
                if self.saving and not config.save_only_improve:
                    self.save(epoch + 1)
            metrics = self.validate(stage, epoch)
            if config.only_eval:
                break
            self.finish_epoch(epoch, metrics, saved=not config.save_only_improve)
        if self.wandb is not None:
            self.wandb.finish()

    def evaluate_unfinished(self, epoch: int) -> None:
        """The evaluation of an epoch whose checkpoint was saved before the run stopped,
        as the run would have done it: its lines, its accuracy in the best and the record."""
        self.log(f"checkpoint_{epoch + 1} was saved but its epoch's evaluation did not finish: evaluating it first")
        if self.saving and self.env.is_main:  # the stop may have come before its save dropped the old .state
            keep_newest_states(os.path.dirname(self.start.model_path))
        set_seed(self.config.seed + epoch)
        self.finish_epoch(epoch, self.validate(self.config.scheduled_stage(epoch), epoch), saved=True)

    def validate(self, stage: int, epoch: int) -> dict:
        """The validation loss (training runs) and the generation accuracy of `epoch`."""
        if not self.config.only_eval:
            val_loss = validation_loss(self.model, self.stager.validation(stage, epoch), self.collator,
                                       self.config.batch_size_training, self.env)
            self.log_metrics({"eval/loss": val_loss}, f"eval loss {val_loss}")
        metrics = self.evaluate(stage)
        # reshard_after_forward False: evaluation's passes leave the blocks' weights gathered,
        # and a new optimizer or a saved optimizer state needs the sharded parameters back
        distributed.reshard_blocks(self.model)
        return metrics

    def finish_epoch(self, epoch: int, metrics: dict, saved: bool) -> None:
        """save_only_improve's save, the best accuracy, and the progress record. saved: the
        epoch's checkpoint was saved before its evaluation (save_only_improve off, or an
        epoch evaluated on a relaunch), so it is marked evaluated instead."""
        config = self.config
        if self.saving and config.save_only_improve and not saved:
            if metrics["eval/acc"] > self.best_acc:
                self.best_acc = metrics["eval/acc"]
                self.save(epoch + 1)
            else:  # no silent endings: a run may otherwise end without a single checkpoint
                self.log(f"save_only_improve: not saving checkpoint_{epoch + 1}, its accuracy "
                         f"{metrics['eval/acc']} does not beat the best so far ({self.best_acc}); its state is "
                         f"kept in {checkpoint.LATEST_FOLDER} for a resume")
                self.keep_latest(epoch + 1)
        self.best_acc = max(self.best_acc, metrics["eval/acc"])
        if self.saving and self.env.is_main:  # how far the run got, and its best (checkpoint.write_progress)
            # the record first: a stop between the two evaluates this epoch again, the other
            # order would resume with a best accuracy that leaves this epoch's out
            checkpoint.write_progress(config.save_dir, epoch + 1, self.newest_checkpoint, self.best_acc)
            if saved:
                checkpoint.mark_evaluated(config.save_dir, epoch + 1)

    # -------------------------------------------------------------- per epoch
    def optimizer_for(self, epoch: int):
        """The optimizer of `epoch`: the running one, a restored one, or a new AdamW."""
        if self.optimizer is not None and self.config.optimizer_carries_over(epoch):
            return self.optimizer
        return new_optimizer(self.model, self.config, self.start, epoch, self.env, self.log)

    def train_epoch(self, stage: int, epoch: int) -> None:
        config, env, model, optimizer = self.config, self.env, self.model, self.optimizer
        train_loader = distributed.loader(self.stager.train(stage, epoch), config.batch_size_training, self.collator, env)
        model.train()
        accumulation = config.gradient_accumulation_steps
        n_batches = len(train_loader)
        forward_options = loss_only(model)
        # one tick per optimizer step: the last partial group steps too
        bar = tqdm(total=-(-n_batches // accumulation), desc=f"Training Epoch: {epoch + 1}", colour="blue",
                   dynamic_ncols=True, disable=not env.is_main)
        for step, batch in enumerate(train_loader):
            steps_now = (step + 1) % accumulation == 0 or step == n_batches - 1  # the last partial group steps too
            # no skipped gradient sync on the micro-batches that do not step: FSDP2 would then
            # hold each block's whole unsharded fp32 gradient on every process until the step
            loss = model(**distributed.to_device(batch, env.device), **forward_options).loss / accumulation
            loss.backward()
            if steps_now:
                optimizer_step(model, optimizer)
                bar.update(1)
            shown = round(float(loss.detach().float() * accumulation), 4)
            if self.wandb is not None:
                self.wandb.log({"train/epoch": epoch + 1, "train/step": epoch * n_batches + step, "train/loss": shown})
            bar.set_description(f"Training Epoch: {epoch + 1}/{config.num_epochs}, batch {step}/{n_batches} "
                                f"completed (loss: {shown}")
        bar.close()
        distributed.barrier(env)

    def save(self, epoch_done: int) -> None:
        """checkpoint_{epoch_done} (weights, published layout) and its resume state; rank 0
        writes. The optimizer state is kept only when the next epoch continues with it."""
        # only save_only_improve saves after the evaluation
        self.save_state(self.config.save_dir, epoch_done, evaluated=self.config.save_only_improve)
        self.newest_checkpoint = epoch_done
        if self.env.is_main:  # the run folder's newest is the resume point again: .latest is older now
            checkpoint.remove_checkpoints(checkpoint.latest_folder(self.config.save_dir))
        self.log("saving model.")

    def keep_latest(self, epoch_done: int) -> None:
        """A save_only_improve run's state after `epoch_done` (an epoch that did not improve)
        in checkpoint.latest_folder, replacing the one there, so a stop loses no epoch (save
        empties the folder: the run folder's newest is then newer)."""
        folder = checkpoint.latest_folder(self.config.save_dir)
        self.save_state(folder, epoch_done, evaluated=True)
        if self.env.is_main:
            checkpoint.remove_checkpoints(folder, keep=(epoch_done,))

    def save_state(self, folder: str, epoch_done: int, evaluated: bool) -> None:
        """checkpoint_{epoch_done} and its .state in `folder` (save_run_state), with the
        optimizer state when the next epoch keeps it; then this launch's record."""
        keep_optimizer = self.config.optimizer_carries_over(epoch_done)
        save_run_state(self.model, self.optimizer if keep_optimizer else None, folder, epoch_done, self.best_acc,
                       self.env, evaluated=evaluated)
        self.record_launch()

    def record_launch(self) -> None:
        """This launch's config in the run folder, once it has saved an epoch (rank 0)."""
        if self.env.is_main and not self.launch_recorded:
            checkpoint.write_launch_config(self.config.save_dir, launch_record(self.config, self.env.world_size))
            self.launch_recorded = True

    def evaluate(self, stage: int) -> dict:
        counts = generation_accuracy(self.model, self.generator, self.stager.questions(stage), self.collator,
                                     self.tokenizer, self.val_examples, self.config, self.env, self.log)
        metrics = report(counts, self.log)
        self.log_metrics(metrics, None)
        return metrics

    def log_metrics(self, metrics: dict, line: Optional[str]) -> None:
        if line is not None:
            self.log(line)
        if self.wandb is not None:
            self.wandb.log(metrics)


def optimizer_step(model, optimizer) -> None:
    """One optimizer step, then the gradients cleared. FSDP's blocks first free the weights
    that reshard_after_forward False keeps gathered (nothing to do otherwise): the step
    changes the shards those copies came from."""
    distributed.reshard_blocks(model)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def new_optimizer(model, config, start: Start, epoch: int, env, log):
    """A new AdamW for `epoch`, holding the saved optimizer state when the run resumes at
    `epoch` and the reset rule carries the optimizer over."""
    def fresh():
        return torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)

    optimizer = fresh()
    resumed = start.train_state if epoch == start.epoch else None
    if resumed is not None and config.optimizer_carries_over(epoch):
        if resumed.get("optimizer") is not None:
            try:
                distributed.load_optimizer_state(model, optimizer, resumed["optimizer"], env)
            except checkpoint.StateMismatch as e:  # another model's parameters, say: every process gets it
                log(f"{e}: starting a new AdamW")
                return fresh()  # not the one the failed restore gave DCP's zero moments
            except checkpoint.CheckpointError as e:  # damaged inside (the resume check reads only sizes)
                # the weights are loaded by now, so no stepping back to the checkpoint before
                # it here: say how to, rather than train on with a new AdamW unannounced
                raise UserError(f"{e}; to resume from the checkpoint before it, move {start.model_path} and its "
                                f"{checkpoint.STATE_SUFFIX} out of the run folder") from None
            log(f"restored the optimizer state of epoch {epoch}")
            apply_config_hyperparameters(optimizer, config, log)
        elif "epoch" in resumed:  # its .state holds no optimizer: its own run's rule started a new one here
            log(f"checkpoint_{epoch} was saved without optimizer state (the reset_optimizer rule it was trained "
                "under started a new AdamW at this epoch): starting a new AdamW")
        else:
            log("the checkpoint has no optimizer state (no .state beside it: the published layout, or pruned): "
                "starting a new AdamW")
    return optimizer


def apply_config_hyperparameters(optimizer, config, log) -> None:
    """The config's lr and weight_decay over those a restored state brought back
    (load_state_dict restores its param groups' settings too): a run relaunched with
    another lr trains with it, and says so."""
    for key in ("lr", "weight_decay"):
        wanted = getattr(config, key)
        saved = sorted({group[key] for group in optimizer.param_groups})
        if saved != [wanted]:
            log(f"{key} = {wanted} (the config's) replaces the restored optimizer's {', '.join(map(str, saved))}")
            for group in optimizer.param_groups:
                group[key] = wanted


def save_run_state(model, optimizer, save_dir: str, epoch_done: int, best_acc: float, env,
                   evaluated: bool = True) -> None:
    """Write checkpoint_{epoch_done} (the weights in the published layout, gathered to rank
    0 one tensor at a time) and its .state (the optimizer sharded, each rank writing its
    part, when one is given), then drop the .state of all but the STATES_KEPT newest.
    evaluated=False: saved before its epoch's evaluation (checkpoint.mark_evaluated)."""
    sharded = {"optimizer": distributed.optimizer_state(model, optimizer)} if optimizer is not None else None
    model_state = distributed.full_model_state(model)
    train_state = {"epoch": epoch_done, "best_acc": best_acc, "evaluated": evaluated}
    checkpoint.save_checkpoint(save_dir, epoch_done, model_state, train_state,
                               sharded, is_main=env.is_main, barrier=lambda: distributed.barrier(env))
    del model_state
    if env.is_main:
        keep_newest_states(save_dir, epoch_done)
    distributed.barrier(env)


def keep_newest_states(save_dir: str, *also: int) -> None:
    """Drop the .state of every checkpoint in save_dir but the STATES_KEPT newest (and `also`)."""
    newest = checkpoint.list_checkpoints(save_dir)[-STATES_KEPT:]
    checkpoint.prune_train_states(save_dir, {*also, *newest})


def main(config, data) -> int:
    env = distributed.setup()
    try:
        TrainingRun(config, data, env).run()
    except UserError as error:  # raised after the process group exists: still one line
        return fail(error)
    finally:
        distributed.teardown()
    return 0
