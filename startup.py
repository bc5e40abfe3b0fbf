"""Where a run starts, and its model on every process (DESIGN §5).

- `find_start`: this run's own newest checkpoint (preemption), else `load_model_path`
  and `resume`. Under sharded training only rank 0 reads the files; the others learn
  the epoch and the training state without the weights.
- `build_and_place`: the model this process trains. One process, or a replica per
  process for only_eval: the whole model on the device (under torchrun rank 0's,
  broadcast to the others, which build it on the meta device). Sharded training (FSDP2): rank 0 builds the
  whole model as a lone process would, the others only its structure on the meta
  device (no memory); every rank shards it, then rank 0's weights fill the shards one
  tensor at a time. `fused_gelu`, `activation_checkpointing`, `compile`,
  `mixed_precision` and `reshard_after_forward` apply here.
"""

from dataclasses import dataclass
from typing import Optional

import checkpoint
import distributed
from cli import UserError
from coconut import Coconut
from evaluate import generator_for
from modeling import BuiltModel, ModelLoadError, build_empty_model, build_model, checkpoint_blocks, fuse_gelu

REGATHER_NOTE = "FSDP gathers each block's weights again for every latent pass and its backward"


@dataclass
class Start:
    """Where a run starts: its first epoch and the weights (and training state) it loads."""

    epoch: int = 0
    model_state: Optional[dict] = None  # None on ranks > 0 of a sharded run
    model_path: Optional[str] = None
    train_state: Optional[dict] = None  # not None: resuming this run's own checkpoint
    # the checkpoint was saved before its epoch's evaluation, which never finished: the run evaluates it first
    unevaluated: bool = False
    # the run folder's own newest checkpoint (checkpoint.ResumePoint.newest_saved), if it resumes
    newest_saved: Optional[int] = None


def sharded_training(config, env) -> bool:
    """FSDP: every process holds a shard of the model, none but rank 0 the whole."""
    return env.distributed and not config.only_eval


def on_main(fn, env):
    """fn() on rank 0 only (None elsewhere); a user error there stops every process."""
    result, error = None, None
    if env.is_main:
        try:
            result = fn()
        except UserError as e:
            error = e
    message = distributed.share(None if error is None else str(error), env)
    if error is not None:
        raise error
    if message is not None:
        raise ModelLoadError(message)
    return result


def find_start(config, log, env) -> Start:
    if not env.distributed:
        return _find_start(config, log, env.world_size)
    found = on_main(lambda: _find_start(config, log, env.world_size), env)  # None on ranks > 0
    shared = distributed.share(found and _without_weights(found), env)
    return found if env.is_main else shared


def _without_weights(start: Start) -> Start:
    """What ranks > 0 need of rank 0's start: no weights, and no earlier version's whole
    optimizer state ({} instead: rank 0 broadcasts it when loading)."""
    train_state = start.train_state
    if train_state and isinstance(train_state.get("optimizer"), dict):
        train_state = {**train_state, "optimizer": {}}
    return Start(start.epoch, None, start.model_path, train_state, start.unevaluated, start.newest_saved)


def _find_start(config, log, processes: int = 1) -> Start:
    if not config.only_eval and not config.debug:  # rank 0 only, under sharded training
        found = checkpoint.find_run_resume_point(config.save_dir, warn=log)
        if found is not None:
            say_config_changes(config, processes, found.epoch, log)
            epoch = found.epoch
            log("Warning: found previous run and gonna resume from that. the inputted `resume` argument is ignored!")
            log(f"Loading from previous run epoch_{epoch}!")
            if config.load_model_path is not None:
                log(f"load_model_path {config.load_model_path} is not loaded either: the run goes on from its own "
                    f"checkpoint_{epoch}")
            _say_what_is_trained_again(config, found.newest_saved, epoch, log)
            # {} (not None) for a published-layout checkpoint, which has no .state: it is a resume
            return Start(epoch, found.model_state, found.path,
                         _with_recorded_best(config, found.newest_saved, found.train_state or {}),
                         unevaluated=never_evaluated(found.train_state), newest_saved=found.newest_saved)
        _say_what_is_trained_again(config, None, None, log)
    if config.load_model_path is not None:
        log(f"Loading from {config.load_model_path} and skip the first {config.resume} epochs")
        return Start(config.resume, checkpoint.load_model_state(config.load_model_path), config.load_model_path)
    if config.resume:
        log(f"Warning: you want to skip the first {config.resume} but you are not loading any existing checkpoint!")
    return Start(config.resume)


# keys a resume ignores (said on their own): a change there changes nothing
_IGNORED_ON_RESUME = ("resume", "load_model_path")


def launch_record(config, processes: int) -> dict:
    """What the run folder keeps of the launch that saved its newest epoch (config.yaml,
    checkpoint.write_launch_config: the trainer writes it at the launch's first save)."""
    return {**config.to_dict(), "processes": processes}


def say_config_changes(config, processes: int, resumed_epoch: int, log) -> None:
    """When a run resumes from checkpoint_{resumed_epoch}, say in one line what differs from
    the launch that saved the folder's newest epoch: a relaunch after an edit of the YAML,
    or on another number of GPUs (another effective batch), trains its remaining epochs
    under the new values, which the run folder's checkpoints do not show."""
    previous = checkpoint.read_launch_config(config.save_dir)
    changed = [f"{key} {previous[key]!r} -> {value!r}" for key, value in launch_record(config, processes).items()
               if key not in _IGNORED_ON_RESUME and key in previous and previous[key] != value]
    if changed:
        log(f"the config differs from the launch that saved this run folder's newest epoch ({', '.join(changed)}): "
            f"from epoch {resumed_epoch + 1} on, the run trains with the new values")


def never_evaluated(train_state: Optional[dict]) -> bool:
    """Whether the run stopped between saving this checkpoint and the end of its epoch's
    evaluation: a run that saves before evaluating writes `evaluated: False` in its train
    state and sets it once the evaluation is done (checkpoint.mark_evaluated); the
    published code's checkpoints and earlier versions' have no such key."""
    return bool(train_state) and train_state.get("evaluated") is False


def _with_recorded_best(config, newest_saved: Optional[int], train_state: dict) -> dict:
    """train_state with the best accuracy the progress record holds, when it is higher: a
    checkpoint saved before its epoch's evaluation (save_only_improve off) leaves that
    epoch's accuracy out of its own best_acc."""
    recorded = checkpoint.read_recorded_best(config.save_dir, newest_saved)
    if recorded is None or recorded <= train_state.get("best_acc", 0.0):
        return train_state
    return {**train_state, "best_acc": recorded}


def _say_what_is_trained_again(config, newest_saved: Optional[int], resumed: Optional[int], log) -> None:
    """A run resumes from an epoch older than the last it trained when the state of the
    later ones was not kept (a save_only_improve folder of an earlier version, which kept
    no .latest): say which epochs run again (they repeat: each epoch reseeds)."""
    trained = checkpoint.read_progress(config.save_dir, newest_saved)
    first = resumed if resumed is not None else config.resume
    if trained > first:
        since = (f"resumes from checkpoint_{resumed}" if resumed is not None
                 else "saved no checkpoint and starts again")
        again = f"epoch {trained} is" if trained == first + 1 else f"epochs {first + 1} to {trained} are"
        log(f"save_only_improve: this run had trained {trained} epochs; it {since}, so {again} trained again")


def build_and_place(config, start: Start, env, log) -> tuple:
    """(BuiltModel, the model this process runs: sharded, replicated or whole). Under
    torchrun only rank 0 builds the model from the files; the others build its structure
    on the meta device and get rank 0's weights."""
    if not env.distributed:
        built = build_model(config, start.model_state, start.model_path, log)
        return built, _place_whole(built, config, env, log)
    source = on_main(lambda: build_model(config, start.model_state, start.model_path, log), env)
    # rank 0's dtype and embedding rows (the loading rules may add the new tokens' rows)
    dtype, rows = distributed.share(source and (next(source.model.parameters()).dtype,
                                                source.base_causallm.get_input_embeddings().weight.shape[0]), env)
    if not sharded_training(config, env):  # only_eval: a whole replica on every process
        built = source if env.is_main else build_empty_model(config, dtype, rows)
        distributed.replicate_from_main(built.model, env)
        return built, _place_whole(built, config, env, log)
    built = build_empty_model(config, dtype, rows)
    _prepare(built, config, env, sharded=True)
    log(f"Running FSDP on rank = {env.rank}, world size = {env.world_size}")
    compute_dtype = distributed.COMPUTE_DTYPES[config.mixed_precision]
    if config.method.fills_latents and config.reshard_after_forward:
        log(regather_note(built.base_causallm, compute_dtype or dtype))
    model = distributed.shard(built.model, built.base_causallm, compute_dtype, config.reshard_after_forward)
    distributed.fill_from_main(model, source and source.model, env)
    return built, model


def regather_note(base_causallm, compute_dtype) -> str:
    """The startup line under FSDP for a method with latent passes, with what keeping the
    gathered weights would cost this model (its blocks' weights in the compute dtype)."""
    params = sum(p.numel() for block in distributed.transformer_blocks(base_causallm) for p in block.parameters())
    size = params * compute_dtype.itemsize
    shown = f"{size / 2**30:.1f} GiB" if size >= 2**30 else f"{size / 2**20:.0f} MiB"
    return (f"{REGATHER_NOTE}; reshard_after_forward: False gathers them once a step and keeps them: the blocks' "
            f"whole weights, {shown}, on each process during the step (README, \"FSDP and latent passes\")")


def _prepare(built: BuiltModel, config, env, sharded: bool) -> None:
    """What applies to the blocks before sharding: the fused activation, checkpointing,
    then compilation: the whole decoder pass as one graph, or (FSDP2's units,
    checkpointed blocks) each block."""
    if config.fused_gelu:
        fuse_gelu(built.base_causallm)
    if config.activation_checkpointing:
        checkpoint_blocks(built.base_causallm)
    if config.compile:
        import compiling

        if sharded or config.activation_checkpointing:
            compiling.compile_blocks(built.model)
        else:
            compiling.compile_decoder(built.model)
    if isinstance(built.model, Coconut):  # FSDP: every process runs as many base-model passes
        built.model.sync_passes_across_ranks = env.distributed


def autocast_like_the_run(module, config, env) -> None:
    """Mixed precision without FSDP: `module`'s forward and generate under autocast, as
    the run's model (also for the plain decoder evaluate.generator_for builds beside it)."""
    compute_dtype = distributed.COMPUTE_DTYPES[config.mixed_precision]
    if compute_dtype is not None and not sharded_training(config, env):
        distributed.autocast_forward(module, compute_dtype, env.device)


def evaluation_decoder(model, built: BuiltModel, config, env):
    """What generates the evaluation's answers: the run's model, or for a method without
    latents a plain-decoding view of its base model (evaluate.generator_for), in the
    run's precision too."""
    generator = generator_for(model, built.base_causallm, built.tokens, built.tokenizer.eos_token_id)
    if generator is not model:
        autocast_like_the_run(generator, config, env)
        if config.compile:  # its base is compiled: the caches and passes that compilation needs
            import compiling

            compiling.match_compiled_base(generator)
    return generator


def _place_whole(built: BuiltModel, config, env, log):
    """One process, or a replica per process for only_eval: the whole model on the device;
    mixed precision through autocast (parameters and optimizer stay fp32)."""
    _prepare(built, config, env, sharded=False)
    model = built.model.to(env.device)
    autocast_like_the_run(built.model, config, env)
    if not env.distributed:
        log("Running on one process")
        return model
    # the published line: its only_eval replicated the model with DDP
    log(f"Running DDP on rank = {env.rank}, world size = {env.world_size}")
    return model
