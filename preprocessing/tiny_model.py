"""Build the offline demo model folder: a tokenizer for the ProsQA vocabulary and a
small GPT-2 config, no weights (run.py trains it from scratch and says so).

    python preprocessing/tiny_model.py --output models/prosqa-gpt2-tiny

The tokenizer is a byte-level BPE (GPT-2's scheme, so every string round-trips:
newlines, '#', digits) trained on generated ProsQA text until each name, concept
word and '<<' is a single token. Pieces tokenize like the whole text (DESIGN §1).
"""

import json
import os
import sys

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, PreTrainedTokenizerFast

if __name__ == "__main__":  # run as a script: the repository root holds our modules
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import prosqa  # noqa: E402
from cli import OneLineParser  # noqa: E402 - usage errors in one line, as the other scripts

EOS = "<|endoftext|>"


def corpus_texts(num_examples: int, seed: int) -> list:
    """ProsQA text as the model sees it, plus every word once and '<<' (DESIGN §1 init row)."""
    # answers at any distance, the generator's default when the checked-in tokenizer was
    # trained: a bound would change the corpus, the merges and so every token id
    examples = prosqa.generate(num_examples, seed, opts=prosqa.Options(max_steps=0))
    texts = [ex["question"] + "\n" + "\n".join(ex["steps"]) + "\n### " + ex["answer"] for ex in examples]
    words = prosqa.NAMES + prosqa.CONCEPTS
    return texts + [" ".join(words), "\n".join(words), "<< >> ### #"]


def train_tokenizer(texts: list, vocab_size: int) -> PreTrainedTokenizerFast:
    """GPT-2 style byte-level BPE with one special token serving as BOS, EOS and UNK."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, unk_token=EOS)


def gpt2_config(vocab_size: int, n_layer: int, n_embd: int, n_head: int, n_positions: int) -> GPT2Config:
    return GPT2Config(
        vocab_size=vocab_size, n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_positions=n_positions,
        bos_token_id=0, eos_token_id=0,
        # no dropout: the tiny demo model underfits rather than overfits in its CPU budget
        attn_pdrop=0.0, embd_pdrop=0.0, resid_pdrop=0.0, summary_first_dropout=0.0,
    )


def build_parser():
    parser = OneLineParser(prog="tiny_model.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default="models/prosqa-gpt2-tiny", help="folder to write")
    parser.add_argument("--vocab_size", type=int, default=512)
    parser.add_argument("--n_layer", type=int, default=4)
    parser.add_argument("--n_embd", type=int, default=128)
    parser.add_argument("--n_head", type=int, default=4)
    parser.add_argument("--n_positions", type=int, default=1024)
    parser.add_argument("--corpus_examples", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    tokenizer = train_tokenizer(corpus_texts(args.corpus_examples, args.seed), args.vocab_size)
    missing = [w for w in prosqa.NAMES + prosqa.CONCEPTS if len(tokenizer.encode(" " + w)) != 1]
    if missing:
        print(f"error: --vocab_size {args.vocab_size} leaves words in pieces: {missing[:5]}", file=sys.stderr)
        return 2
    config = gpt2_config(len(tokenizer), args.n_layer, args.n_embd, args.n_head, args.n_positions)
    try:
        os.makedirs(args.output, exist_ok=True)
        tokenizer.save_pretrained(args.output)
        config.save_pretrained(args.output)
    except OSError as err:  # --output a file, or under one
        print(f"error: {err.filename or args.output}: {err.strerror}", file=sys.stderr)
        return 2
    print(json.dumps({"output": args.output, "vocab": len(tokenizer), "n_layer": args.n_layer, "n_embd": args.n_embd}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
