"""Print ProsQA statistics for one or two data files, side by side.

    python preprocessing/prosqa_stats.py data/prosqa_valid.json
    python preprocessing/prosqa_stats.py generated.json data/prosqa_valid.json

Rows: graph size (nodes, edges), hops to the answer, people per graph, where the
answer sits in the question, vocabulary, and how the question was picked (the
asked person's index, whether the answer is the deepest concept reachable only
from that person that is a category of nothing). Used to tune prosqa.py against
the published files (the paper: 22.8 nodes, 36 edges, 40/43/14/2.4% of
examples at 3/4/5/6 steps, 2 to 6 people, 17 names and 38 concept words).
"""

import argparse
import os
import statistics
import sys
from collections import Counter

if __name__ == "__main__":  # run as a script: the repository root holds our modules
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cli import OneLineParser, UserError, main_guard, read_json_list
from preprocessing.prosqa import bfs_distances

# what example_stats reads: the keys prosqa.py writes besides question, steps and answer
PROSQA_KEYS = ("question", "steps", "idx_to_symbol", "edges", "root", "target", "neg_target")


def read_examples(path):
    """A ProsQA file's examples; UserError (one line) for a missing, empty or other file."""
    data = read_json_list(path, "ProsQA examples")
    for i, ex in enumerate(data):
        missing = [key for key in PROSQA_KEYS if not isinstance(ex, dict) or key not in ex]
        if missing:
            raise UserError(f"{path}: example {i} is not a ProsQA example as prosqa.py writes them "
                            f"(no {missing[0]!r})")
    return data


def example_stats(ex):
    """The per-example numbers the table summarises."""
    n, edges = len(ex["idx_to_symbol"]), ex["edges"]
    children, indegree = [[] for _ in range(n)], [0] * n
    for u, v in edges:
        children[u].append(v)
        indegree[v] += 1
    people = [v for v in range(n) if indegree[v] == 0]
    root, target = ex["root"], ex["target"]
    near = bfs_distances(children, root)
    others = [p for p in people if p != root and ex["neg_target"] in bfs_distances(children, p)]
    far = bfs_distances(children, others[0]) if others else {}
    only_root = [v for v in range(n) if v in near and v not in far and indegree[v] and not children[v]]
    deepest = max(near[v] for v in only_root) if only_root else -1
    question = ex["question"]
    choice = question[question.rindex(" Is "):]
    target_word = ex["idx_to_symbol"][target]
    return {
        "nodes": n,
        "edges": len(edges),
        "steps": len(ex["steps"]),
        "people": len(people),
        "answer_first": choice.split(" a ", 1)[1].startswith(target_word + " or "),
        "root_is_1": root == 1,
        "target_deepest": near.get(target) == deepest,
        "neg_depth": far.get(ex["neg_target"], 0),
        "facts_match_edges": question.count(".") == len(edges),
        "names": {ex["idx_to_symbol"][p] for p in people},
        "words": {ex["idx_to_symbol"][v] for v in range(n) if indegree[v]},
    }


def summarise(rows, step_values, people_values):
    """Table rows (label -> text) for one file's example stats."""
    total = len(rows)

    def mean_range(key):
        vals = [r[key] for r in rows]
        return f"{statistics.mean(vals):.2f} ({min(vals)}-{max(vals)})"

    def share(key):
        return f"{100 * sum(r[key] for r in rows) / total:.1f}%"

    out = {"examples": str(total), "nodes mean (range)": mean_range("nodes"),
           "edges mean (range)": mean_range("edges"), "steps mean (range)": mean_range("steps")}
    steps = Counter(r["steps"] for r in rows)
    for k in step_values:
        out[f"  steps = {k}"] = f"{100 * steps[k] / total:.1f}%"
    out["people mean (range)"] = mean_range("people")
    people = Counter(r["people"] for r in rows)
    for k in people_values:
        out[f"  people = {k}"] = f"{100 * people[k] / total:.1f}%"
    out["answer first in question"] = share("answer_first")
    out["asked person is node 1"] = share("root_is_1")
    out["answer = deepest own sink"] = share("target_deepest")
    out["distractor depth mean"] = f"{statistics.mean(r['neg_depth'] for r in rows):.2f}"
    out["one fact per edge"] = share("facts_match_edges")
    out["distinct names"] = str(len(set().union(*(r["names"] for r in rows))))
    out["distinct concept words"] = str(len(set().union(*(r["words"] for r in rows))))
    return out


def format_table(columns, headers):
    """Align the rows of several summaries side by side."""
    labels = list(columns[0])
    width = max(len(k) for k in labels) + 2
    colw = [max(len(h), *(len(c[k]) for k in labels)) + 2 for h, c in zip(headers, columns)]
    lines = ["".ljust(width) + "".join(h.rjust(w) for h, w in zip(headers, colw))]
    for k in labels:
        lines.append(k.ljust(width) + "".join(c[k].rjust(w) for c, w in zip(columns, colw)))
    return "\n".join(lines)


def main(argv=None):
    parser = OneLineParser(prog="prosqa_stats.py", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+", metavar="FILE", help="one or two ProsQA JSON files")
    args = parser.parse_args(argv)
    if len(args.files) > 2:
        parser.error("give one or two files")
    return main_guard(lambda: report(args.files))


def file_stats(path):
    """example_stats of every example of `path`; UserError naming the first example whose
    graph or question is not as prosqa.py writes them (an edge past the nodes, a question
    without its " Is ... or ...?" choice, ...)."""
    rows = []
    for i, ex in enumerate(read_examples(path)):
        try:
            rows.append(example_stats(ex))
        except (ValueError, IndexError, TypeError, KeyError, AttributeError) as e:
            raise UserError(f"{path}: example {i} is not a ProsQA example as prosqa.py writes them "
                            f"({type(e).__name__}: {e})") from None
    return rows


def report(files):
    per_file = [file_stats(path) for path in files]
    step_values = sorted({r["steps"] for rows in per_file for r in rows})
    people_values = sorted({r["people"] for rows in per_file for r in rows})
    columns = [summarise(rows, step_values, people_values) for rows in per_file]
    print(format_table(columns, files))
    return 0


if __name__ == "__main__":
    sys.exit(main())
