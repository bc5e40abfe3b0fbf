"""Convert the official ProntoQA generator's output to coconut JSON (DESIGN §7).

Generate the raw file with the ProntoQA repository (asaparov/prontoqa, 5-hop,
fictional ontology):

    python run_experiment.py --model-name json --model-size dummy --ordering random \\
        --num-trials 10000 --few-shot-examples 0 --ontology fictional \\
        --min-hops 5 --max-hops 5 --hops-skip 1

copy its ``5hop_0shot_random.json`` to ``data/`` and run

    python preprocessing/prontoqa.py            # -> data/prontoqa_{train,valid,test}.json
    python preprocessing/prontoqa.py --input raw.json --output_dir out --train_size 90 --valid_size 5

The raw file is a JSON object ``id -> {"test_example": {"question", "query",
"chain_of_thought": [sentence, ...], "answer"}, ...}``. Each example becomes
question = question + " " + query; steps = the chain-of-thought sentences
joined in consecutive pairs (sentences 1-2, 3-4, ...; a lone last sentence
stays alone); answer as given. In file order, the first 9,000 examples are
train, the next 200 valid, the rest test. A malformed entry stops the
conversion with its id on stderr and exit status 2.
"""

import argparse
import json
import os
import sys

if __name__ == "__main__":  # run as a script: the repository root holds our modules
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cli import OneLineParser, write_json  # noqa: E402 - usage errors in one line, as the other scripts

SPLIT_NAMES = ("train", "valid", "test")


class MalformedEntry(ValueError):
    """An entry that is not in the generator's test_example shape."""


def sentence_pairs(sentences):
    """['a', 'b', 'c'] -> ['a b', 'c']."""
    return [" ".join(sentences[i:i + 2]) for i in range(0, len(sentences), 2)]


def convert_entry(key, entry):
    """One raw entry -> {"question", "steps", "answer"}."""
    example = entry.get("test_example") if isinstance(entry, dict) else None
    if not isinstance(example, dict):
        raise MalformedEntry(f"entry {key!r}: no 'test_example' object")
    for field, kind in (("question", str), ("query", str), ("chain_of_thought", list), ("answer", str)):
        if not isinstance(example.get(field), kind):
            raise MalformedEntry(f"entry {key!r}: test_example.{field} missing or not a {kind.__name__}")
    cot = example["chain_of_thought"]
    if not all(isinstance(s, str) for s in cot):
        raise MalformedEntry(f"entry {key!r}: chain_of_thought holds a non-string")
    return {
        "question": example["question"] + " " + example["query"],
        "steps": sentence_pairs(cot),
        "answer": example["answer"],
    }


def convert(raw):
    """The raw object -> examples in file order."""
    if not isinstance(raw, dict):
        raise MalformedEntry("the file must hold a JSON object of id -> entry")
    if not raw:
        raise MalformedEntry("the file holds no entries (an empty JSON object)")
    return [convert_entry(key, entry) for key, entry in raw.items()]


def split(examples, train_size, valid_size):
    """(train, valid, test) slices in order; test is whatever is left."""
    return (examples[:train_size], examples[train_size:train_size + valid_size],
            examples[train_size + valid_size:])


def build_parser():
    p = OneLineParser(prog="prontoqa.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", default="data/5hop_0shot_random.json")
    p.add_argument("--output_dir", default="data", help="writes prontoqa_{train,valid,test}.json")
    p.add_argument("--train_size", type=int, default=9000)
    p.add_argument("--valid_size", type=int, default=200)
    return p


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.train_size < 0 or args.valid_size < 0:
        parser.error("sizes must be non-negative")
    try:
        with open(args.input, encoding="utf-8") as f:
            examples = convert(json.load(f))
    except OSError as err:
        print(f"{args.input}: {err.strerror}", file=sys.stderr)
        return 2
    except UnicodeDecodeError:
        print(f"{args.input}: not UTF-8 text (a compressed file?)", file=sys.stderr)
        return 2
    except (json.JSONDecodeError, MalformedEntry) as err:
        print(f"{args.input}: {err}", file=sys.stderr)
        return 2
    try:
        os.makedirs(args.output_dir, exist_ok=True)
        for name, part in zip(SPLIT_NAMES, split(examples, args.train_size, args.valid_size)):
            path = os.path.join(args.output_dir, f"prontoqa_{name}.json")
            write_json(path, part)
            print(f"wrote {len(part)} examples to {path}")
    except OSError as err:  # --output_dir a file, or not writable
        print(f"{err.filename}: {err.strerror}", file=sys.stderr)
        return 2
    if len(examples) < args.train_size + args.valid_size:
        print(f"warning: only {len(examples)} examples, fewer than train + valid sizes", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
