"""Latent search on ProsQA: what each continuous thought puts on each concept.

    python analysis/probe_prosqa.py MODEL_DIR DATA.json --index I [--stage K] [--plot out.png] [--json out.json]

The paper's analysis (Hao et al. 2024, section 5): decode each continuous thought
through the language-model head and read off the probability of every concept of the
example's graph. A model that searches breadth-first spreads the i-th thought over
the "frontier" - the concepts i hops from the asked person - rather than over the
other reachable concepts or the ones it cannot reach.

MODEL_DIR is a folder written by export.py (a coconut model); DATA.json a ProsQA-style
file whose examples carry `idx_to_symbol`, `edges` ([u, v] means "u is a v"), `root`
and, optionally, `target` / `neg_target` (preprocessing/prosqa.py writes them).

- Prompt: DESIGN §2's evaluation prompt at --stage (default max_latent_stage), with the
  example's own number of steps capping the thoughts unless the model was trained
  with pad_latent_to_max, exactly as run.py evaluates it.
- Value of a concept at thought t: the thought's next-token distribution is the
  logits of the position before the latent (the thought is that position's last
  hidden state), and the value is the plain softmax probability, over the whole
  vocabulary, of the first token of " " + concept (a concept's first token is how
  it would start in the language chain of thought; with the ProsQA tokenizers every
  concept is one token). Concepts sharing a first token are pointed out.
- Thought t (1-based) stands for reasoning step ceil(t / c_thought); its frontier is
  the set of concepts at BFS depth ceil(t / c_thought) from the root. People (nodes
  nothing points to) are not concepts and are left out.

Prints a table (one row per concept, one column per thought; `*` marks frontier
cells) and per thought the mass on frontier / other reachable / unreachable concepts
and the frontier's share of the mass on concepts; --plot writes the same as a PNG.
Bad input: one line on stderr, exit status 2.
"""

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Optional

if __name__ == "__main__":  # run as a script: the repository root holds our modules
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from cli import OneLineParser, UserError, main_guard, quiet_transformers, read_json_list
from inference import (answer_batch, check_context, check_output_file, open_exported, pad_batch, prompt_ids,
                       resolve_stage, thought_distributions)
from preprocessing.prosqa import bfs_distances
from utils import DEFAULT_MAX_NEW_TOKENS

GRAPH_KEYS = ("question", "idx_to_symbol", "edges", "root")
GROUPS = ("frontier", "reachable", "unreachable")
GROUP_LABELS = {"frontier": "frontier", "reachable": "other reachable", "unreachable": "unreachable"}


# ---------------------------------------------------------------------------------
# The example's graph


def load_example(path: str, index: int) -> dict:
    """Example `index` of a ProsQA-style file; UserError (one line) if unusable."""
    data = read_json_list(path, "examples")
    if not -len(data) <= index < len(data):
        raise UserError(f"--index {index} is out of range: {path} holds {len(data)} examples")
    example = data[index]
    where = f"{path}: example {index}"
    if not isinstance(example, dict):
        raise UserError(f"{where} is not a JSON object")
    missing = [key for key in GRAPH_KEYS if key not in example]
    if missing:
        raise UserError(f"{where} has no {', '.join(missing)} (a ProsQA example with its graph is needed)")
    symbols, edges, root = example["idx_to_symbol"], example["edges"], example["root"]
    n = len(symbols) if isinstance(symbols, list) else 0
    if not n or not all(isinstance(s, str) for s in symbols):
        raise UserError(f"{where}: 'idx_to_symbol' must be a non-empty list of strings")
    good_edge = lambda e: isinstance(e, list) and len(e) == 2 and all(isinstance(x, int) and 0 <= x < n for x in e)  # noqa: E731
    if not isinstance(edges, list) or not all(good_edge(e) for e in edges):
        raise UserError(f"{where}: 'edges' must be a list of [u, v] node indices below {n}")
    if not isinstance(root, int) or not 0 <= root < n:
        raise UserError(f"{where}: 'root' must be a node index below {n}")
    return example


def bfs_depths(n_nodes: int, edges: list, root: int) -> dict:
    """Hops from root to every node it reaches (edge [u, v]: u is a v, u -> v)."""
    children = [[] for _ in range(n_nodes)]
    for u, v in edges:
        children[u].append(v)
    return bfs_distances(children, root)


def concept_nodes(n_nodes: int, edges: list) -> list:
    """Nodes something points to (concepts); the others are people."""
    targets = {v for _, v in edges}
    return [v for v in range(n_nodes) if v in targets]


def group_of(depth: Optional[int], frontier_depth: int) -> str:
    """A concept's group at a thought, from its depth (None: unreachable from the root)."""
    if depth is None:
        return "unreachable"
    return "frontier" if depth == frontier_depth else "reachable"


# ---------------------------------------------------------------------------------
# Probing


@dataclass
class Probe:
    index: int
    question: str
    reference: Optional[str]
    model_answer: str
    stage: int
    c_thought: int
    symbols: list  # per concept row
    nodes: list  # node index per concept row
    depths: list  # BFS depth per concept row, None if unreachable
    roles: list  # "answer" / "distractor" / "" per row
    probs: list  # [thought][row] softmax probability of the concept's first token
    frontier_depths: list  # per thought
    shared_first_tokens: list = field(default_factory=list)  # groups of concepts sharing one

    @property
    def n_thoughts(self) -> int:
        return len(self.probs)

    def group(self, thought: int, row: int) -> str:
        return group_of(self.depths[row], self.frontier_depths[thought])

    def masses(self, thought: int) -> dict:
        """Probability mass on each group of concepts at one thought."""
        out = {g: 0.0 for g in GROUPS}
        for row, p in enumerate(self.probs[thought]):
            out[self.group(thought, row)] += p
        return out

    def to_dict(self) -> dict:
        return {
            "index": self.index,
            "question": self.question,
            "reference": self.reference,
            "model_answer": self.model_answer,
            "stage": self.stage,
            "c_thought": self.c_thought,
            "frontier_depths": self.frontier_depths,
            "concepts": [
                {"node": n, "symbol": s, "depth": d, "role": r, "probs": [self.probs[t][row] for t in range(self.n_thoughts)],
                 "groups": [self.group(t, row) for t in range(self.n_thoughts)]}
                for row, (n, s, d, r) in enumerate(zip(self.nodes, self.symbols, self.depths, self.roles))
            ],
            "masses": [self.masses(t) for t in range(self.n_thoughts)],
        }


def first_token_ids(tokenizer, symbols: list) -> list:
    """The first token of " " + symbol (how the concept starts inside a sentence), past a
    leading token that is only the space (SentencePiece tokenizers, Llama 2 and Mistral,
    may give a lone "▁" first: the same token for every concept)."""
    ids = []
    for s in symbols:
        pieces = tokenizer.encode(" " + s, add_special_tokens=False)
        if len(pieces) > 1 and not tokenizer.decode(pieces[:1]).strip():
            pieces = pieces[1:]
        ids.append(pieces[0])
    return ids


@torch.no_grad()
def probe(exported, example: dict, index: int = 0, stage: Optional[int] = None, device="cpu") -> Probe:
    """Run the thoughts of one example; `exported` from generate.open_exported (weights
    are loaded here, after the input is checked)."""
    settings = exported.settings
    if not exported.method.fills_latents:
        raise UserError(f"the model was trained with {settings['method']}: it has no continuous thoughts to probe")
    stage = resolve_stage(settings, stage)
    steps = example.get("steps")
    ids = prompt_ids(exported, example["question"], stage, len(steps) if isinstance(steps, list) else None)
    check_context([ids], exported.context)
    k = ids.count(settings["latent_token_id"])
    if k == 0:
        raise UserError(f"the prompt at stage {stage} has no continuous thoughts (use --stage 1 or more)")

    exported.load_model(device)
    symbols, edges, root = example["idx_to_symbol"], example["edges"], example["root"]
    depths = bfs_depths(len(symbols), edges, root)
    nodes = concept_nodes(len(symbols), edges)
    # rows: reachable concepts by depth, then the unreachable ones
    nodes.sort(key=lambda v: (v not in depths, depths.get(v, 0), v))
    token_ids = first_token_ids(exported.tokenizer, [symbols[v] for v in nodes])

    device = next(exported.model.parameters()).device
    batch = pad_batch([ids], exported.tokenizer.pad_token_id, settings["latent_token_id"], device)
    thought_probs = thought_distributions(exported.model, *batch)[0]  # (k, vocab)
    probs = thought_probs[:, token_ids].tolist()
    # the run's answer budget, as generate.py and the run's evaluation give the model
    max_new_tokens = settings.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
    answer = answer_batch(exported, [example["question"]], [ids], max_new_tokens=max_new_tokens)[0].answer

    roles = {example.get("target"): "answer", example.get("neg_target"): "distractor"}
    shared = {}
    for v, t in zip(nodes, token_ids):
        shared.setdefault(t, []).append(symbols[v])
    return Probe(
        index=index,
        question=example["question"],
        reference=example.get("answer") if isinstance(example.get("answer"), str) else None,
        model_answer=answer,
        stage=stage,
        c_thought=settings["c_thought"],
        symbols=[symbols[v] for v in nodes],
        nodes=nodes,
        depths=[depths.get(v) for v in nodes],
        roles=[roles.get(v, "") for v in nodes],
        probs=probs,
        frontier_depths=[math.ceil((t + 1) / settings["c_thought"]) for t in range(k)],
        shared_first_tokens=[group for group in shared.values() if len(group) > 1],
    )


# ---------------------------------------------------------------------------------
# Report


def _cell(p: float) -> str:
    """9 characters: fixed point, or scientific below 0.001 so small values stay visible."""
    return f"{p:>9.4f}" if p == 0 or p >= 1e-3 else f"{p:>9.1e}"


def format_table(result: Probe, root_symbol: str) -> str:
    k = result.n_thoughts
    names = [s + (f" ({r})" if r else "") for s, r in zip(result.symbols, result.roles)]
    width = max([len(n) for n in names] + [len("frontier share of concepts"), 7])
    lines = [
        f"Example {result.index}: {result.question}",
        f"Reference: {result.reference}    Model: {result.model_answer}",
        f"Root: {root_symbol}; {k} continuous thought(s) at stage {result.stage} (c_thought {result.c_thought}); "
        "value = LM-head probability of the concept's first token",
        "",
        f"{'concept':<{width}}  depth" + "".join(f"  thought {t + 1:<2}" for t in range(k)),
    ]
    for row, name in enumerate(names):
        depth = "-" if result.depths[row] is None else str(result.depths[row])
        cells = ""
        for t in range(k):
            mark = "*" if result.group(t, row) == "frontier" else " "
            cells += f"  {_cell(result.probs[t][row])}{mark}"
        lines.append(f"{name:<{width}}  {depth:>5}{cells}")
    lines.append("")
    for group in GROUPS:
        label = f"{GROUP_LABELS[group]} (sum)"
        lines.append(f"{label:<{width}}  {'':>5}" + "".join(f"  {_cell(result.masses(t)[group])} " for t in range(k)))
    shares = []
    for t in range(k):
        m = result.masses(t)
        total = sum(m.values())
        shares.append(m["frontier"] / total if total > 0 else 0.0)
    lines.append(f"{'frontier share of concepts':<{width}}  {'':>5}" + "".join(f"  {s:>9.4f} " for s in shares))
    lines.append(f"{'frontier depth':<{width}}  {'':>5}" + "".join(f"  {d:>9d} " for d in result.frontier_depths))
    lines.append("(* frontier: the concepts at the thought's depth from the root; depth '-': unreachable)")
    for group in result.shared_first_tokens:
        lines.append(f"note: {', '.join(group)} share their first token, so they share one value")
    return "\n".join(lines)


def save_plot(result: Probe, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = result.n_thoughts
    fig, (ax_bar, ax_map) = plt.subplots(1, 2, figsize=(6 + 1.2 * k, max(3.5, 0.28 * len(result.symbols) + 1.5)),
                                         gridspec_kw={"width_ratios": [1, 1.3]})
    xs = list(range(1, k + 1))
    colours = {"frontier": "tab:orange", "reachable": "tab:blue", "unreachable": "tab:gray"}
    bottom = [0.0] * k
    for group in GROUPS:
        values = [result.masses(t)[group] for t in range(k)]
        ax_bar.bar(xs, values, bottom=bottom, color=colours[group], label=GROUP_LABELS[group])
        bottom = [b + v for b, v in zip(bottom, values)]
    ax_bar.set_xticks(xs)
    ax_bar.set_xlabel("continuous thought")
    ax_bar.set_ylabel("probability mass on concepts")
    ax_bar.set_title("mass per group")
    ax_bar.legend(fontsize=8)

    grid = [[result.probs[t][row] for t in range(k)] for row in range(len(result.symbols))]
    image = ax_map.imshow(grid, aspect="auto", cmap="viridis", vmin=0.0)
    for row in range(len(result.symbols)):
        for t in range(k):
            if result.group(t, row) == "frontier":
                ax_map.add_patch(plt.Rectangle((t - 0.5, row - 0.5), 1, 1, fill=False, edgecolor="tab:orange", linewidth=2))
    labels = [f"{s} [{'-' if d is None else d}]" + (f" ({r})" if r else "")
              for s, d, r in zip(result.symbols, result.depths, result.roles)]
    ax_map.set_yticks(range(len(labels)))
    ax_map.set_yticklabels(labels, fontsize=7)
    ax_map.set_xticks(range(k))
    ax_map.set_xticklabels([str(x) for x in xs])
    ax_map.set_xlabel("continuous thought (orange box: frontier)")
    ax_map.set_title("probability per concept [depth]")
    fig.colorbar(image, ax=ax_map, fraction=0.05)
    fig.suptitle(f"ProsQA example {result.index}: latent search", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="probe_prosqa.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir", metavar="MODEL_DIR", help="a coconut model folder written by export.py")
    p.add_argument("data", metavar="DATA.json", help="ProsQA-style data with idx_to_symbol, edges, root")
    p.add_argument("--index", type=int, default=0, help="which example (default 0)")
    p.add_argument("--stage", type=int, default=None, help="prompt stage (default: the model's max_latent_stage)")
    p.add_argument("--plot", metavar="OUT.png", help="write the plot here")
    p.add_argument("--json", metavar="OUT.json", help="write the numbers here")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    quiet_transformers()
    return main_guard(lambda: report(args))


def report(args) -> int:
    for flag, path in (("--plot", args.plot), ("--json", args.json)):
        if path:  # before the work, not after it
            check_output_file(flag, path, args.data)
    example = load_example(args.data, args.index)
    exported = open_exported(args.model_dir)
    result = probe(exported, example, args.index, args.stage, args.device)
    print(format_table(result, example["idx_to_symbol"][example["root"]]))
    if args.plot:
        save_plot(result, args.plot)
        print(f"wrote {args.plot}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result.to_dict(), f, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
