"""Convert the Internalize-CoT GSM8k-Aug text files to coconut JSON (DESIGN §7).

Each input line is ``question||<<a*b=c>> <<c+d=e>> #### answer``; the output is a
JSON list of ``{"question", "steps", "answer"}`` with question = the text before
``||``, steps = the whitespace-separated ``<<...>>`` items between ``||`` and
``####``, answer = the text after ``####``, stripped. A malformed line (no
``||``, no ``####``, empty answer) stops the conversion with ``FILE:LINE: why``
on stderr and exit status 2.

    python preprocessing/gsm_icot.py                  # data/gsm_{train,valid,test}.txt -> .json
    python preprocessing/gsm_icot.py valid test --data_dir data
    python preprocessing/gsm_icot.py --input some.txt --output some.json

`bash preprocessing/gsm_icot.bash` downloads the three files and runs this.
"""

import argparse
import os
import sys

if __name__ == "__main__":  # run as a script: the repository root holds our modules
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cli import OneLineParser, write_json  # noqa: E402 - usage errors in one line, as the other scripts

SPLITS = ("train", "valid", "test")
QUESTION_SEP = "||"
ANSWER_SEP = "####"


class MalformedLine(ValueError):
    """A line that is not in the `question||steps #### answer` format."""


def parse_line(line):
    """One text line -> {"question", "steps", "answer"}; MalformedLine if it does not parse."""
    line = line.rstrip("\r\n")
    if QUESTION_SEP not in line:
        raise MalformedLine(f"no '{QUESTION_SEP}' between question and steps")
    question, rest = line.split(QUESTION_SEP, 1)
    if ANSWER_SEP not in rest:
        raise MalformedLine(f"no '{ANSWER_SEP}' before the answer")
    steps_text, answer = rest.split(ANSWER_SEP, 1)
    answer = answer.strip()
    if not question.strip():
        raise MalformedLine("empty question")
    if not answer:
        raise MalformedLine(f"empty answer after '{ANSWER_SEP}'")
    return {"question": question, "steps": steps_text.split(), "answer": answer}


def convert_file(src, dst):
    """Convert one text file; return the number of examples written."""
    examples = []
    with open(src, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                examples.append(parse_line(line))
            except MalformedLine as err:
                raise MalformedLine(f"{src}:{number}: malformed line: {err}") from None
    if not examples:  # an empty download, say: run.py would refuse the file only later
        raise MalformedLine(f"{src}: holds no examples (only blank lines, or nothing)")
    write_json(dst, examples)
    return len(examples)


def build_parser():
    p = OneLineParser(prog="gsm_icot.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("splits", nargs="*", default=[], metavar="SPLIT",
                   help="train, valid and/or test (default: all three)")
    p.add_argument("--data_dir", default="data", help="reads gsm_SPLIT.txt, writes gsm_SPLIT.json")
    p.add_argument("--input", help="convert this one file instead of splits")
    p.add_argument("--output", help="with --input: the JSON file to write")
    return p


def jobs(parser, args):
    """(source, destination) pairs the arguments ask for."""
    if args.input or args.output:
        if not (args.input and args.output) or args.splits:
            parser.error("--input and --output go together, without SPLIT names")
        return [(args.input, args.output)]
    unknown = [s for s in args.splits if s not in SPLITS]
    if unknown:
        parser.error(f"unknown split {unknown[0]!r}: choose from {', '.join(SPLITS)}")
    splits = args.splits or SPLITS
    return [(os.path.join(args.data_dir, f"gsm_{s}.txt"), os.path.join(args.data_dir, f"gsm_{s}.json"))
            for s in splits]


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    for src, dst in jobs(parser, args):
        try:
            count = convert_file(src, dst)
        except MalformedLine as err:
            print(err, file=sys.stderr)
            return 2
        except OSError as err:  # reading src or writing dst: the file it names
            print(f"{err.filename or src}: {err.strerror}", file=sys.stderr)
            return 2
        except UnicodeDecodeError:
            print(f"{src}: not UTF-8 text (a compressed file?)", file=sys.stderr)
            return 2
        print(f"{src}: wrote {count} examples to {dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
