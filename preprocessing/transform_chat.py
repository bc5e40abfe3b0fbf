"""Turn chat traces (JSONL) into coconut JSON: question, reasoning steps, answer (DESIGN §7).

    python preprocessing/transform_chat.py --input traces.jsonl --output data/chat.json
    python preprocessing/transform_chat.py --input traces.jsonl --output out.json \\
        --spacy_model en_core_web_sm      # an installed trained pipeline instead

Each input line is ``{"messages": [{"role": ..., "content": ...}, ...]}``:

* question = the user message (a record with more than one is skipped: a
  follow-up's answer does not answer the first question);
* trace = the last assistant message up to its summary marker ``In summary:``
  or ``In summary,`` (the last marker that is not inside a tag span);
  answer = what follows the marker, stripped;
* steps = the trace's sentences.  Segmentation runs offline: by default
  ``spacy.blank("en")`` with the rule-based "sentencizer", or the pipeline
  named by ``--spacy_model``.  Around it:
  - tag spans such as ``<citation>...</citation>`` or ``<reasoning>...</reasoning>``
    (any ``<tag ...>...</tag>``, outermost pair) are swapped for placeholders
    before segmentation and restored verbatim after, so a span always stays
    whole inside one step; a span that follows a sentence's end on the same
    line ("Claim. <citation>..</citation> Next.") stays with that sentence;
  - dots of common abbreviations ("e.g.", "Dr.", "U.S.", "et al.", "Fig. 3",
    "No. 5", "etc." before a lower-case word) and of decimals ("3.14") are
    hidden from the segmenter the same way;
  - a blank line always ends a step; a "sentence" that starts with a lower-case
    letter or holds only punctuation is joined to the one before it;
  - runs of whitespace outside tag spans become one space.

Examples with no summary marker, an empty answer, fewer than ``--min_steps``
(2) steps, more than one user message, or a malformed line (bad JSON, no user
or assistant message) are skipped; a summary of kept and skipped examples, with
reasons and line numbers of malformed lines, is printed at the end.
"""

import argparse
import json
import os
import re
import sys
from collections import Counter

from tqdm import tqdm

if __name__ == "__main__":  # run as a script: the repository root holds our modules
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cli import OneLineParser, write_json  # noqa: E402 - usage errors in one line, as the other scripts
from layout import is_text  # noqa: E402

SUMMARY_MARKER = re.compile(r"In summary[:,]")
OPEN_TAG = r"<(?P<open>[A-Za-z][\w.:-]*)(?:\s[^<>]*)?(?<!/)>"
CLOSE_TAG = r"</(?P<close>[A-Za-z][\w.:-]*)\s*>"
TAG = re.compile(f"{OPEN_TAG}|{CLOSE_TAG}")

TITLES = "Mr|Mrs|Ms|Dr|Prof|Sr|Jr|St|Mt|Gen|Capt|Col|Lt|Sgt|Rev|Hon|Gov|Sen|Rep|Pres|Messrs"
ALWAYS = r"e\.g|i\.e|cf|viz|approx|vs|ca|et al|[Ff]igs?|[Ee]qs?|Ph\.D"
BEFORE_NUMBER = (r"No|no|Nos|Vol|vol|pp?|Sec|sec|Ch|ch|Art|[Rr]ef|Tab|Ex"
                 r"|Jan|Feb|Mar|Apr|Jun|Jul|Aug|Sept?|Oct|Nov|Dec")
ABBREVIATIONS = [
    re.compile(rf"\b(?:{TITLES})\.(?=\s+[A-Z])"),  # Dr. Smith
    re.compile(rf"(?<![\w.])(?:{ALWAYS})\."),  # e.g. / et al. / Fig.
    re.compile(rf"\b(?:{BEFORE_NUMBER})\.(?=\s*\d)"),  # No. 5 / p. 12 / Jan. 5
    re.compile(r"(?<![\w.])(?:[A-Za-z]\.){2,}"),  # U.S. / a.m. / U.K.
    re.compile(r"\betc\.(?!\s+[A-Z]|\s*$)"),  # etc. and so on (not: etc. Then)
    re.compile(r"(?<=\d)\.(?=\d)"),  # 3.14
]
MIN_STEPS = 2


# ---------------------------------------------------------------- tag spans

def tag_spans(text):
    """(start, end) of each outermost <tag ...>...</tag> pair, in order.

    A close tag pairs with the nearest open tag of its name; open tags that never close
    (`List<String>`, a stray `<br>`) and close tags with no open one are plain text, and
    leave the pairs around and after them intact.
    """
    pairs, stack = [], []
    for m in TAG.finditer(text):
        if m.group("open"):
            stack.append((m.group("open"), m.start()))
            continue
        names = [name for name, _ in stack]
        if m.group("close") not in names:
            continue  # a close tag with no open one: plain text
        depth = len(names) - 1 - names[::-1].index(m.group("close"))
        pairs.append((stack[depth][1], m.end()))
        del stack[depth:]  # opens inside the pair that never closed: plain text
    spans = []
    for start, end in sorted(pairs):  # pairs nest or are disjoint: keep the outermost
        if not spans or start >= spans[-1][1]:
            spans.append((start, end))
    return spans


def unique_marker(text, base):
    """A letters-only marker that does not occur in text."""
    marker = base
    while marker in text:
        marker += "Q"
    return marker


class Protector:
    """Hide tag spans and abbreviation dots from the segmenter, and bring them back."""

    def __init__(self, text):
        self.tag = unique_marker(text, "QzTAGz")
        self.dot = unique_marker(text, "QzDOTzQ")
        self.spans = []
        self.text = self._protect(text)

    def _protect(self, text):
        pieces, last = [], 0
        for start, end in tag_spans(text):
            pieces.append(self._hide_dots(text[last:start]))
            pieces.append(f"{self.tag}{len(self.spans)}{self.tag}")
            self.spans.append(text[start:end])
            last = end
        pieces.append(self._hide_dots(text[last:]))
        return "".join(pieces)

    def _hide_dots(self, text):
        for pattern in ABBREVIATIONS:
            text = pattern.sub(lambda m: m.group(0).replace(".", self.dot), text)
        return text

    def restore(self, text):
        """Protected sentence text -> original text, whitespace outside spans collapsed."""
        text = " ".join(text.split()).replace(self.dot, ".")
        pattern = re.compile(rf"{self.tag}(\d+){self.tag}")
        return pattern.sub(lambda m: self.spans[int(m.group(1))], text)


# ---------------------------------------------------------------- sentences

def load_pipeline(model_name=None):
    """A spaCy pipeline that sets sentence boundaries, offline."""
    import spacy

    if model_name:
        return spacy.load(model_name)
    nlp = spacy.blank("en")
    nlp.add_pipe("sentencizer")
    return nlp


ENUMERATOR = re.compile(r"\(?\d+[.)]")  # "1." "2)" "(3)": a numbered list item's number


def join_fragments(sentences):
    """Join a piece that starts lower-case or is bare punctuation to the one before, and
    a bare list number ("2.", "3)") to the one after."""
    out, pending = [], None
    for s in sentences:
        if pending is not None:
            s, pending = f"{pending} {s}", None
        if ENUMERATOR.fullmatch(s):
            pending = s
            continue
        fragment = s[0].islower() or not any(c.isalnum() for c in s)
        if out and fragment:
            out[-1] = f"{out[-1]} {s}"
        else:
            out.append(s)
    if pending is not None:  # a last enumerator with nothing after it
        if out:
            out[-1] = f"{out[-1]} {pending}"
        else:
            out.append(pending)
    return out


def move_line_enumerators(pieces):
    """A list item's number that the segmenter left at the end of the piece before
    ("Steps:\n1." then "Add the numbers.") goes to the item it numbers."""
    trailing = re.compile(rf"\n[ \t]*({ENUMERATOR.pattern})[ \t]*$")
    pieces = list(pieces)
    for i in range(len(pieces) - 1):
        m = trailing.search(pieces[i])
        if m:
            pieces[i], pieces[i + 1] = pieces[i][: m.start()], f"{m.group(1)} {pieces[i + 1].lstrip()}"
    return pieces


def attach_trailing_spans(pieces, guard):
    """Move tag spans that open a sentence on the line where the previous sentence
    ended ("Claim. <citation>..</citation> Next.") to the end of that sentence."""
    leading = re.compile(rf"[ \t]*(?:{guard.tag}\d+{guard.tag}[ \t]*)+")
    out = []
    for piece in pieces:
        m = leading.match(piece)
        if out and m and "\n" not in out[-1][len(out[-1].rstrip()):]:
            out[-1] = out[-1].rstrip() + " " + m.group(0).strip() + " "
            piece = piece[m.end():]
        if piece.strip():
            out.append(piece)
    return out


def split_sentences(text, nlp):
    """The text's sentences; tag spans whole, abbreviations and decimals intact."""
    guard = Protector(text)
    steps = []
    for paragraph in re.split(r"\n\s*\n", guard.text):
        if not paragraph.strip():
            continue
        starts = [sent.start_char for sent in nlp(paragraph).sents] + [len(paragraph)]
        pieces = move_line_enumerators([paragraph[a:b] for a, b in zip(starts, starts[1:])])
        pieces = [guard.restore(p) for p in attach_trailing_spans(pieces, guard)]
        steps += join_fragments([p for p in pieces if p])
    return steps


# ---------------------------------------------------------------- examples

class Skip(Exception):
    """An example left out; the message is the reason (a summary key)."""


def content_text(content):
    """Message content as text (a string, or a list of {"text": ...} parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        return "".join(p.get("text", "") for p in content if isinstance(p.get("text", ""), str))
    raise Skip("malformed")


def split_summary(text):
    """(trace, answer) around the last summary marker outside tag spans."""
    spans = tag_spans(text)
    markers = [m for m in SUMMARY_MARKER.finditer(text)
               if not any(s <= m.start() < e for s, e in spans)]
    if not markers:
        raise Skip("no summary marker")
    last = markers[-1]
    return text[:last.start()], text[last.end():].strip()


def convert_line(line, nlp, min_steps=MIN_STEPS):
    """One JSONL line -> {"question", "steps", "answer"}, or Skip(reason)."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        raise Skip("malformed") from None
    messages = record.get("messages") if isinstance(record, dict) else None
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise Skip("malformed")
    users = [m for m in messages if m.get("role") == "user"]
    assistants = [m for m in messages if m.get("role") == "assistant"]
    if not users or not assistants:
        raise Skip("malformed")
    if len(users) > 1:  # the last assistant message answers the last question, not the first
        raise Skip("more than one user message")
    question = content_text(users[0].get("content")).strip()
    reply = content_text(assistants[-1].get("content"))
    if not (is_text(question) and is_text(reply)):  # a lone surrogate: JSON allows it, UTF-8 does not
        raise Skip("malformed")
    trace, answer = split_summary(reply)
    if not question:
        raise Skip("malformed")
    if not answer:
        raise Skip("empty answer")
    steps = split_sentences(trace, nlp)
    if len(steps) < min_steps:
        raise Skip(f"fewer than {min_steps} steps")
    return {"question": question, "steps": steps, "answer": answer}


def convert_file(path, nlp, min_steps=MIN_STEPS, progress=True):
    """(examples, skipped reason counts, malformed line numbers) for a JSONL file."""
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    examples, skipped, malformed = [], Counter(), []
    for number, line in enumerate(tqdm(lines, desc="traces", unit="ex", disable=not progress), start=1):
        if not line.strip():
            continue
        try:
            examples.append(convert_line(line, nlp, min_steps))
        except Skip as reason:
            skipped[str(reason)] += 1
            if str(reason) == "malformed":
                malformed.append(number)
    return examples, skipped, malformed


def summary(kept, skipped, malformed):
    """Human-readable report of what was kept and why the rest was skipped."""
    lines = [f"kept {kept} examples, skipped {sum(skipped.values())}"]
    for reason, count in sorted(skipped.items()):
        where = ""
        if reason == "malformed":
            shown = ", ".join(map(str, malformed[:20])) + (", ..." if len(malformed) > 20 else "")
            where = f" (line{'s' if len(malformed) > 1 else ''} {shown})"
        lines.append(f"  {reason}: {count}{where}")
    return "\n".join(lines)


def build_parser():
    p = OneLineParser(prog="transform_chat.py", description=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="JSONL of {'messages': [...]} records")
    p.add_argument("--output", required=True, help="JSON list to write")
    p.add_argument("--spacy_model",
                   help="an installed spaCy pipeline (default: blank 'en' + sentencizer)")
    p.add_argument("--min_steps", type=int, default=MIN_STEPS,
                   help="skip traces with fewer steps (default %(default)s)")
    p.add_argument("--no_progress", action="store_true", help="no tqdm bar")
    return p


def output_problem(input_path, output_path):
    """Why --output cannot be written without harm (None when it can): the input
    itself (however spelled: a symlink, another relative path, a hard link) or a folder."""
    same = os.path.realpath(input_path) == os.path.realpath(output_path)
    if not same and os.path.exists(input_path) and os.path.exists(output_path):
        same = os.path.samefile(input_path, output_path)
    if same:
        return f"--output {output_path} is the input file {input_path}: it would be overwritten"
    if output_path.endswith(("/", os.sep)) or os.path.isdir(output_path):
        return f"--output {output_path} is a folder; name the JSON file to write"
    return None


def main(argv=None):
    args = build_parser().parse_args(argv)
    problem = output_problem(args.input, args.output)
    if problem:  # before any work, so that nothing is read for nothing or overwritten
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        nlp = load_pipeline(args.spacy_model)
    except ImportError:
        print("spaCy is not installed: pip install spacy", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"cannot load spaCy pipeline {args.spacy_model!r}: {err}", file=sys.stderr)
        return 2
    try:
        examples, skipped, malformed = convert_file(args.input, nlp, args.min_steps, not args.no_progress)
    except OSError as err:
        print(f"{args.input}: {err.strerror}", file=sys.stderr)
        return 2
    except UnicodeDecodeError:
        print(f"{args.input}: not UTF-8 text (a compressed file?)", file=sys.stderr)
        return 2
    try:
        write_json(args.output, examples, ensure_ascii=False)
    except OSError as err:  # a folder under a file, or not writable
        print(f"{err.filename}: {err.strerror}", file=sys.stderr)
        return 2
    print(summary(len(examples), skipped, malformed))
    print(f"wrote {args.output}")
    return 0 if examples else 1


if __name__ == "__main__":
    sys.exit(main())
