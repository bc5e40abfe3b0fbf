"""Export a trained checkpoint as a standard Hugging Face model folder.

    python export.py CONFIG.yaml CHECKPOINT OUT_DIR
    python export.py args/prosqa_coconut.yaml checkpoints/prosqa-coconut/checkpoint_50 exported/prosqa

The model is built exactly as run.py builds it for CONFIG (tokenizer with the three
latent tokens, resized embeddings, the checkpoint's weights by the same loading
rules), then OUT_DIR gets:

- the base model, `save_pretrained` (safetensors; `config.json`), so that
  `AutoModelForCausalLM.from_pretrained(OUT_DIR)` loads it;
- the tokenizer, with `<|start-latent|>`, `<|end-latent|>`, `<|latent|>`;
- `coconut_config.json`: latent_token_id, start_latent_id, end_latent_id,
  eos_token_id, c_thought, max_latent_stage, pad_latent_to_max, method.

`Coconut.from_pretrained(OUT_DIR)` loads it all back in one call; generate.py and
analysis/probe_prosqa.py read it.

Other methods export too. `pause_as_thought` keeps the coconut prompt layout (its
`<|latent|>` tokens are ordinary tokens). `cot`, `no_cot` and `no_thoughts` models
never see latent tokens or markers at evaluation, so they are exported with
c_thought 0 and max_latent_stage 0: the prompt is the question alone and the only
stage is 0.

Errors (bad config, missing or unusable checkpoint, weights that do not fit the
config): one line on stderr, exit status 2.
"""

import argparse
import os
import sys

import checkpoint
import preflight
from cli import OneLineParser, cannot_write_in, main_guard, quiet_transformers
from coconut import Coconut
from modeling import build_model
from utils import ConfigError, load_config


def exported_settings(config) -> dict:
    """The Coconut settings stored in coconut_config.json for this run's method, and the
    generation budget its evaluation used (generate.py's default)."""
    method = config.method
    budget = {"max_new_tokens": config.max_new_tokens}
    if method.latent_tokens:
        return {"c_thought": config.c_thought, "max_latent_stage": config.max_latent_stage,
                "pad_latent_to_max": config.pad_latent_to_max, "method": method.name, **budget}
    # cot / no_cot / no_thoughts: evaluated on the bare question at stage 0
    return {"c_thought": 0, "max_latent_stage": 0, "pad_latent_to_max": False, "method": method.name, **budget}


def _note(message: str) -> None:
    # build_model's "no weights ... from scratch" line is about training; here the
    # checkpoint supplies every weight
    if not message.startswith("no weights in"):
        print(f"note: {message}", file=sys.stderr)


def export(config_path: str, checkpoint_path: str, out_dir: str, log=_note) -> dict:
    """Build the model of config_path with checkpoint_path's weights; write out_dir.

    Returns the coconut_config written. Raises ConfigError, CheckpointError or
    ModelLoadError (one-line messages) for bad input.
    """
    config = load_config(config_path)
    if os.path.isdir(checkpoint_path):  # checkpoint_N.state, say: the weights are the file beside it
        raise checkpoint.CheckpointError(checkpoint_path, "is a folder, not a checkpoint file "
                                                          "(the weights are checkpoint_N, beside checkpoint_N.state)")
    if not os.path.isfile(checkpoint_path):
        raise checkpoint.CheckpointError(checkpoint_path, "no such file")
    source = preflight.model_source(config)
    check_out_dir(out_dir, source)
    preflight.resolve_model(*source)  # a folder that is not there, an offline hub: one line
    preflight.check_weight_files(*source)  # a Git LFS pointer, a file cut short
    state = checkpoint.load_model_state(checkpoint_path)
    built = build_model(config, state, checkpoint_path, log)
    del state
    model = built.model
    if not isinstance(model, Coconut):  # a plain base model: wrap it to save the ids
        tokens = built.tokens
        model = Coconut(built.base_causallm, tokens.latent_id, tokens.start_id, tokens.end_id,
                        built.tokenizer.eos_token_id)
    settings = exported_settings(config)
    model.save_pretrained(out_dir, tokenizer=built.tokenizer, **settings)
    return Coconut.read_coconut_config(out_dir)


def check_out_dir(out_dir: str, model_source: tuple) -> None:
    """ConfigError unless out_dir is a folder, or can be made one, that this process
    can write (checked before the model is built; nothing is created here); and one that
    is empty or an earlier export (it holds coconut_config.json): the run's own model
    folder (model_source: the key and the folder the config names) or another folder of
    files would have its config, tokenizer and weights overwritten."""
    path = os.path.abspath(out_dir)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"{out_dir}: exists and is not a folder")
    key, model_folder = model_source
    if model_folder and os.path.isdir(model_folder) and os.path.isdir(path) and os.path.samefile(path, model_folder):
        raise ConfigError(f"{out_dir}: is the config's {key}, the model the run started from: export to another folder")
    if os.path.isdir(path) and os.listdir(path) and not os.path.isfile(os.path.join(path, Coconut.COCONUT_CONFIG_NAME)):
        raise ConfigError(f"{out_dir}: holds other files and no earlier export ({Coconut.COCONUT_CONFIG_NAME}): "
                          "export to a new or empty folder")
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ConfigError(f"{out_dir}: cannot be made, {existing} is a file")
    why = cannot_write_in(existing)
    if why is not None:
        raise ConfigError(f"{out_dir}: cannot be written, {existing} is not writable ({why})")


def main(argv=None) -> int:
    parser = OneLineParser(prog="export.py", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", metavar="CONFIG", help="the run's YAML config")
    parser.add_argument("checkpoint", metavar="CHECKPOINT", help="a checkpoint_N file of that run")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="folder to write (created if missing)")
    args = parser.parse_args(argv)
    quiet_transformers()
    # what transformers says while building (e.g. how resized rows start) is moot: the
    # checkpoint supplies every weight
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    return main_guard(lambda: report(args))


def report(args) -> int:
    written = export(args.config, args.checkpoint, args.out_dir)
    print(f"exported {written['method']} model to {args.out_dir} "
          f"(c_thought {written['c_thought']}, max_latent_stage {written['max_latent_stage']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
