"""Generate ProsQA-style data (Coconut paper, appendix A.2; DESIGN §7).

Each example is a small "is-a" ontology (a random DAG), a question about one
person in it, and the shortest chain of facts that answers it:

    python preprocessing/prosqa.py --num_examples 1000 --seed 0 --output data/prosqa_x.json
    python preprocessing/prosqa.py --split --output_dir data --seed 0
        # writes prosqa_train.json / prosqa_valid.json / prosqa_test.json (17,886 / 300 / 500)
    python preprocessing/prosqa.py --split --split_sizes 2000,200,0 --num_nodes 12 \\
        --max_steps 4 --output_dir data/demo
        # small graphs for quick experiments; every answer still >= --min_steps (3) hops away

Generation, as in the paper, with the details fixed by matching the published
validation set (compare with `python preprocessing/prosqa_stats.py`):

* The DAG is grown node by node from two people, node 0 and node 1.  Every new
  node gets Poisson(1.5) "in-nodes" among the existing nodes, drawn without
  replacement with weight ``1.5 * depth + 1`` (depth = hops from the nearest
  parentless node), which favours deep chains.  An edge ``(u, v)`` means
  "u is a v": the new node is a category of its in-nodes.
* Candidates: a first draw below 0.35 restricts them to nodes reachable from
  node 0 only (the new node may not descend from node 1); otherwise a second
  draw below 0.7 restricts them to nodes reachable from node 1 only; otherwise
  any node.  Reachability labels (bit 0: from node 0, bit 1: from node 1)
  propagate by bitwise OR.  The two successive draws (0.35 / 0.455 / 0.195 in
  all) are what reproduce the asymmetry of the published data, where the asked
  person is node 1 about two times in three.
* A node that gets no in-node is a person (a name); the others are concepts.
  ``--num_nodes`` (28) nodes are grown; people that nothing points from are
  dropped, which leaves 22.8 nodes and 36 edges on average.  Graphs left
  with more than ``--max_people`` (6) people are drawn again (0.05% of them).
* The question asks about whichever of node 0 / node 1 reaches, among the
  concepts only it reaches and that are not a category of anything
  ("sinks"), the deepest one (ties at random); that concept is the answer and
  must be ``--min_steps`` .. ``--max_steps`` hops away, else the graph is
  drawn again.  The distractor is a random sink reachable only from the other
  person.  The steps are a shortest path, uniformly among shortest paths.
* The question lists one fact per edge in random order ("Every X is a Y." /
  "Tom is a X.") and ends "Is Tom a A or B?" with answer and distractor in
  random order; the answer is "Tom is a A.".  Each example also carries
  ``idx_to_symbol``, ``edges`` (in growth order), ``root``, ``target`` and
  ``neg_target`` as in the published files.
"""

import argparse
import math
import os
import random
import sys
from dataclasses import dataclass

if __name__ == "__main__":  # run as a script: the repository root holds our modules
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cli import OneLineParser, write_json  # noqa: E402 - usage errors in one line, as the other scripts

NAMES = [
    "Alex", "Bob", "Carol", "Davis", "Eva", "Fae", "Gabriel", "Jack", "Max",
    "Oliver", "Polly", "Rex", "Sally", "Sam", "Stella", "Tom", "Wren",
]
CONCEPTS = [
    "bompus", "boompus", "brimpus", "chorpus", "dumpus", "felpus", "fompus",
    "gerpus", "gorpus", "grimpus", "gwompus", "hilpus", "impus", "jelpus",
    "jompus", "kerpus", "lempus", "lorpus", "numpus", "quimpus", "rempus",
    "rompus", "rorpus", "scrompus", "shumpus", "sterpus", "storpus", "terpus",
    "timpus", "tumpus", "vumpus", "worpus", "wumpus", "yerpus", "yimpus",
    "yumpus", "zhorpus", "zumpus",
]
SPLIT_NAMES = ("train", "valid", "test")
PUBLISHED_SPLIT_SIZES = (17886, 300, 500)
MAX_TRIES = 100_000  # graphs drawn for one example before giving up


@dataclass(frozen=True)
class Options:
    """Knobs of the generator; the defaults reproduce the published statistics."""

    num_nodes: int = 28  # nodes grown per graph, before unlinked people are dropped
    min_steps: int = 3
    max_steps: int = 6  # the published set stops at 6 (unbounded, 0.3% lie 7 or 8 away); 0: no bound
    max_people: int = 6  # the published graphs hold 2 to 6 people
    mean_in_nodes: float = 1.5
    depth_weight: float = 1.5
    p_only0: float = 0.35  # first draw: new node may not descend from node 1
    p_only1: float = 0.7  # second draw: new node may not descend from node 0


class Graph:
    """A grown DAG: per node its in-nodes (in draw order) and reachability label."""

    def __init__(self, parents, labels):
        self.parents = parents
        self.labels = labels
        self.children = [[] for _ in parents]
        for node, ins in enumerate(parents):
            for u in ins:
                self.children[u].append(node)

    def __len__(self):
        return len(self.parents)


# ---------------------------------------------------------------- sampling

MAX_MEAN_IN_NODES = 5


def poisson(rng, mean):
    """Knuth's Poisson sampler (small means only)."""
    limit, k, p = math.exp(-mean), 0, rng.random()
    while p > limit:
        k += 1
        p *= rng.random()
    return k


def weighted_sample(rng, items, weights, k):
    """k distinct items drawn one after another with probability ~ weight."""
    items, weights, chosen = list(items), list(weights), []
    for _ in range(min(k, len(items))):
        x = rng.random() * sum(weights)
        j = 0
        while j < len(items) - 1 and x >= weights[j]:
            x -= weights[j]
            j += 1
        chosen.append(items.pop(j))
        weights.pop(j)
    return chosen


def candidates(rng, opts, groups, num_existing):
    """The nodes a new node may take as in-nodes (DESIGN §7, see module doc)."""
    if rng.random() < opts.p_only0:
        return groups[1]
    if rng.random() < opts.p_only1:
        return groups[2]
    return range(num_existing)


def grow_graph(rng, opts):
    """Grow one DAG of opts.num_nodes nodes from the two people 0 and 1."""
    parents, labels, depth = [[], []], [1, 2], [0, 0]
    groups = {0: [], 1: [0], 2: [1], 3: []}
    for node in range(2, opts.num_nodes):
        k = poisson(rng, opts.mean_in_nodes)
        cands = candidates(rng, opts, groups, node)
        weights = [opts.depth_weight * depth[c] + 1 for c in cands]
        ins = weighted_sample(rng, cands, weights, k)
        label = 0
        for u in ins:
            label |= labels[u]
        parents.append(ins)
        labels.append(label)
        depth.append(min(depth[u] for u in ins) + 1 if ins else 0)
        groups[label].append(node)
    return Graph(parents, labels)


# ---------------------------------------------------------------- questions

def bfs_distances(children, source):
    """Hop distance from source to every node it reaches; children[u]: the nodes u -> v."""
    dist, queue = {source: 0}, [source]
    for u in queue:
        for v in children[u]:
            if v not in dist:
                dist[v] = dist[u] + 1
                queue.append(v)
    return dist


def exclusive_sinks(graph, label):
    """Concepts that are a category of nothing and reachable from one person only."""
    return [v for v in range(len(graph))
            if graph.labels[v] == label and graph.parents[v] and not graph.children[v]]


def pick_question(rng, graph, opts):
    """(root, target, neg_target) in grown indices, or None to reject the graph."""
    dists = [bfs_distances(graph.children, 0), bfs_distances(graph.children, 1)]
    sinks = [exclusive_sinks(graph, 1), exclusive_sinks(graph, 2)]
    if not sinks[0] or not sinks[1]:
        return None
    deepest = [max(dists[r][v] for v in sinks[r]) for r in (0, 1)]
    if deepest[0] != deepest[1]:
        root = 0 if deepest[0] > deepest[1] else 1
    else:
        root = rng.randrange(2)
    steps = deepest[root]
    if steps < opts.min_steps or (opts.max_steps and steps > opts.max_steps):
        return None
    target = rng.choice([v for v in sinks[root] if dists[root][v] == steps])
    neg_target = rng.choice(sinks[1 - root])
    return root, target, neg_target


def sample_shortest_path(rng, graph, source, target):
    """A shortest source -> target path, uniform over all shortest paths."""
    dist = bfs_distances(graph.children, source)
    count = {source: 1}
    for v in sorted(dist, key=dist.get):
        if v != source:
            count[v] = sum(count[u] for u in graph.parents[v] if dist.get(u) == dist[v] - 1)
    path = [target]
    while path[-1] != source:
        v = path[-1]
        preds = [u for u in graph.parents[v] if dist.get(u) == dist[v] - 1]
        path.append(rng.choices(preds, weights=[count[u] for u in preds])[0])
    return path[::-1]


# ---------------------------------------------------------------- rendering

def drop_unlinked(graph):
    """Old indices of the nodes that take part in at least one edge, in order."""
    return [v for v in range(len(graph)) if graph.parents[v] or graph.children[v]]


def name_nodes(rng, graph, kept, max_people):
    """A symbol per kept node (distinct names for people, words for concepts), or
    None when the graph holds more people or concepts than allowed."""
    people = [v for v in kept if not graph.parents[v]]
    if len(people) > min(max_people, len(NAMES)) or len(kept) - len(people) > len(CONCEPTS):
        return None
    names = iter(rng.sample(NAMES, len(people)))
    words = iter(rng.sample(CONCEPTS, len(kept) - len(people)))
    return {v: next(names) if not graph.parents[v] else next(words) for v in kept}


def fact(graph, symbol, u, v):
    """The sentence for edge u -> v."""
    if graph.parents[u]:
        return f"Every {symbol[u]} is a {symbol[v]}."
    return f"{symbol[u]} is a {symbol[v]}."


def render(rng, graph, kept, symbol, root, target, neg_target, path):
    """The example dict in the published shape (indices renumbered over kept)."""
    new = {v: i for i, v in enumerate(kept)}
    edges = [(u, v) for v in kept for u in graph.parents[v]]
    facts = [fact(graph, symbol, u, v) for u, v in edges]
    rng.shuffle(facts)
    options = [symbol[target], symbol[neg_target]]
    rng.shuffle(options)
    person = symbol[root]
    question = " ".join(facts) + f" Is {person} a {options[0]} or {options[1]}?"
    return {
        "question": question,
        "answer": f"{person} is a {symbol[target]}.",
        "steps": [fact(graph, symbol, u, v) for u, v in zip(path, path[1:])],
        "idx_to_symbol": [symbol[v] for v in kept],
        "edges": [[new[u], new[v]] for u, v in edges],
        "root": new[root],
        "target": new[target],
        "neg_target": new[neg_target],
    }


def generate_example(rng, opts):
    """Draw graphs until one yields a valid question; return the example."""
    for _ in range(MAX_TRIES):
        graph = grow_graph(rng, opts)
        picked = pick_question(rng, graph, opts)
        if picked is None:
            continue
        kept = drop_unlinked(graph)
        symbol = name_nodes(rng, graph, kept, opts.max_people)
        if symbol is None:
            continue
        root, target, neg_target = picked
        path = sample_shortest_path(rng, graph, root, target)
        return render(rng, graph, kept, symbol, root, target, neg_target, path)
    raise RuntimeError(
        f"no graph with an answer {opts.min_steps}..{opts.max_steps or 'any'} steps away "
        f"in {MAX_TRIES} tries with {opts.num_nodes} nodes: raise --num_nodes or lower --min_steps"
        + ("" if opts.mean_in_nodes >= 1 else f", or raise --mean_in_nodes ({opts.mean_in_nodes}: few edges)")
    )


def generate(num_examples, seed, opts=Options()):
    """num_examples distinct examples (no repeated question), deterministic for a seed."""
    rng = random.Random(seed)
    examples, seen = [], set()
    while len(examples) < num_examples:
        example = generate_example(rng, opts)
        if example["question"] not in seen:
            seen.add(example["question"])
            examples.append(example)
    return examples


# ---------------------------------------------------------------- command line

def parse_sizes(text):
    """'17886,300,500' -> (17886, 300, 500)."""
    try:
        sizes = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected three integers like 17886,300,500, got {text!r}")
    if len(sizes) != 3 or min(sizes) < 0:
        raise argparse.ArgumentTypeError(f"expected three non-negative integers, got {text!r}")
    return sizes


def build_parser():
    p = OneLineParser(prog="prosqa.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num_examples", type=int, default=1000, help="examples for --output")
    p.add_argument("--output", help="write one JSON file of --num_examples examples")
    p.add_argument("--split", action="store_true",
                   help="write prosqa_{train,valid,test}.json into --output_dir")
    p.add_argument("--output_dir", default="data")
    p.add_argument("--split_sizes", type=parse_sizes, default=PUBLISHED_SPLIT_SIZES,
                   help="train,valid,test sizes for --split (default 17886,300,500)")
    d = Options()
    p.add_argument("--num_nodes", type=int, default=d.num_nodes,
                   help="nodes grown per graph before unlinked people are dropped (default %(default)s)")
    p.add_argument("--min_steps", type=int, default=d.min_steps,
                   help="fewest hops from the person to the answer (default %(default)s)")
    p.add_argument("--max_steps", type=int, default=d.max_steps,
                   help="most hops to the answer; 0 = no bound (default %(default)s)")
    p.add_argument("--max_people", type=int, default=d.max_people,
                   help="redraw graphs with more people than this (default %(default)s)")
    p.add_argument("--mean_in_nodes", type=float, default=d.mean_in_nodes,
                   help="Poisson mean of in-nodes per new node (default %(default)s)")
    return p


def check_args(parser, args):
    if not args.split and not args.output:
        parser.error("give --output FILE, or --split with --output_dir")
    if args.num_examples < 0:
        parser.error("--num_examples must be >= 0")
    if not 4 <= args.num_nodes <= 2 + len(CONCEPTS):
        parser.error(f"--num_nodes must be in 4..{2 + len(CONCEPTS)}")
    if args.min_steps < 1 or (args.max_steps and args.max_steps < args.min_steps):
        parser.error("need 1 <= --min_steps <= --max_steps (or --max_steps 0)")
    if args.max_people < 2:
        parser.error("--max_people must be at least 2")
    if args.min_steps > args.num_nodes - 2:
        parser.error("--min_steps cannot exceed --num_nodes - 2")
    # 0 grows no edges (no answer ever); dense graphs put the answer near the person, so
    # the tries for one 3 to 6 hops away grow steeply with the mean (measured: 20 examples
    # 0.1 s at 5, 13 s at 10; the published split is 18,686)
    if not 0 < args.mean_in_nodes <= MAX_MEAN_IN_NODES:  # NaN fails too
        parser.error(f"--mean_in_nodes must be above 0 and at most {MAX_MEAN_IN_NODES}")


def write_splits(args, opts):
    """One stream of distinct examples cut into the train / valid / test files."""
    examples = generate(sum(args.split_sizes), args.seed, opts)
    start = 0
    for name, size in zip(SPLIT_NAMES, args.split_sizes):
        path = os.path.join(args.output_dir, f"prosqa_{name}.json")
        write_json(path, examples[start:start + size])
        print(f"wrote {size} examples to {path}")
        start += size


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    opts = Options(num_nodes=args.num_nodes, min_steps=args.min_steps,
                   max_steps=args.max_steps, max_people=args.max_people,
                   mean_in_nodes=args.mean_in_nodes)
    try:
        if args.split:
            write_splits(args, opts)
        else:
            write_json(args.output, generate(args.num_examples, args.seed, opts))
            print(f"wrote {args.num_examples} examples to {args.output}")
    except RuntimeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # an output folder under a file, a file where a folder is wanted, ...
        print(f"error: {err.filename}: {err.strerror}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
