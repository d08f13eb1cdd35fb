"""
Prompt grammar of the shapes world (v2), and its three seeded splits.

Every prompt is one row of GenEval's metadata schema (djghosh13/geneval,
prompts/create_prompts.py), plus our own stable "prompt_id":

    single_object  include [{class: A, count: 1}]                       "a photo of a circle"
    two_object     include [{A, 1}, {B, 1}]                             "a photo of a circle and a square"
    counting       include [{A, N, color?: C}]  exclude [{A, N+1}]      "a photo of three (red) circles"
    colors         include [{A, 1, color: C}]                           "a photo of a red circle"
    position       include [{A, 1, color?}, {B, 1, color?, position: [REL, 0]}]
                                                                        "a photo of a (red) B REL a (blue) A"
    color_attr     include [{A, 1, color: C1}, {B, 1, color: C2}]       "a photo of a C1 A and a C2 B"

As in GenEval: the two objects of a two-object prompt are different shapes, the two colours of a
color_attr prompt are different colours, counting uses N in 2..4 with number words and plurals
("crosses"), and "position" names the object it is relative to by its index in "include". Beyond
GenEval, as T2I-CompBench's numeracy and spatial prompts do, counting and position prompts may also
bind colours (counting: one colour for the group; position: a colour on both objects, the same colour
allowed): they are the bulk of the prompt space, so that bindings recur across many prompt texts.

Vocabulary (closed; defined in render.py next to how it is drawn, re-exported here):
    SHAPES    circle, square, triangle, cross: axis-aligned, a square bounding box, told apart by
              their coarse mass distribution (oracle.py); what survives blur and 8x8 blocks at 8 px.
    COLORS    red, green, blue, yellow, purple, white on a near-black background.
    RELATIONS left of, right of, above, below (image coordinates: "above" = nearer the top).
The space has 2,260 distinct prompts (4 + 12 + 84 + 24 + 1,776 + 360; prompt_space()).

Splits (make_prompts), everything drawn from numpy's default_rng(seed):
  composition  the stress test: a seeded set of HELDOUT_BINDINGS (colour, shape) bindings, one per
               shape and each with a different colour, is held out of train and eval altogether; the
               composition split is up to EVAL_PER_TASK prompts per task among the prompts naming at
               least one of them (tasks that bind no colour have none). The other prompts naming a
               held-out binding are used nowhere.
  eval         the main held-out split (the paper's regime, as T2I-CompBench++'s train and evaluation
               prompts): a seeded random sample, per task, of the remaining prompts: a quarter of each
               task, at least 2 and at most EVAL_PER_TASK prompts. Disjoint prompt texts over a shared
               vocabulary: eval's bindings, pairs and scenes all recur in train, in other prompts.
  train        everything else. A dev set for choices is drawn from train (dev_split), never from eval.
Rows are shuffled inside each task, then the tasks interleaved round-robin, so that the first N rows of a split
are as task-balanced as N allows (max_prompts=N takes them); prompt ids are "<split>-<index>".

CLI: python -m gapray.world.grammar --seed 0 --out gapray/world/data
writes train.jsonl, eval.jsonl and composition.jsonl (one json.dumps row a line, like GenEval's metadata).
"""

import argparse
import json
import os
from itertools import permutations

import numpy as np

from .render import COLORS, RELATIONS, SHAPES  # the vocabulary is defined next to how it is drawn

TASKS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six")
COUNTS = (2, 3, 4)  # counting task, as in GenEval (max_count=4)
SPLITS = ("train", "eval", "composition")

# the split's sizes (see the module docstring); change here, not in the code below
HELDOUT_BINDINGS = 4  # (colour, shape) bindings only the composition split names
EVAL_FRACTION = 0.25  # of each task's prompts, clipped to [EVAL_MIN, EVAL_PER_TASK]
EVAL_MIN = 2
EVAL_PER_TASK = 48

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")

def with_article(word):
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def plural(word):
    return f"{word}es" if word.endswith("s") else f"{word}s"


# -----------------------------------------------------------------------------
# one row per task, in GenEval's schema and key order

def single_object(a):
    return {"tag": "single_object", "include": [{"class": a, "count": 1}],
            "prompt": f"a photo of {with_article(a)}"}


def two_object(a, b):
    return {"tag": "two_object", "include": [{"class": a, "count": 1}, {"class": b, "count": 1}],
            "prompt": f"a photo of {with_article(a)} and {with_article(b)}"}


def _item(cls, count=1, color=None):
    return {"class": cls, "count": count} if color is None else {"class": cls, "count": count, "color": color}


def _coloured(word, color):
    return word if color is None else f"{color} {word}"


def counting(a, n, c=None):
    return {"tag": "counting", "include": [_item(a, n, c)],
            "exclude": [{"class": a, "count": n + 1}],
            "prompt": f"a photo of {NUMBERS[n]} {_coloured(plural(a), c)}"}


def colors(a, c):
    return {"tag": "colors", "include": [{"class": a, "count": 1, "color": c}],
            "prompt": f"a photo of {with_article(c)} {a}"}


def position(a, rel, b, ca=None, cb=None):
    # "a photo of a B REL a A": B is REL of object 0 (A), as GenEval writes it; colours on both or neither
    return {"tag": "position",
            "include": [_item(a, 1, ca), {**_item(b, 1, cb), "position": [rel, 0]}],
            "prompt": f"a photo of {with_article(_coloured(b, cb))} {rel} {with_article(_coloured(a, ca))}"}


def color_attr(a, c1, b, c2):
    return {"tag": "color_attr",
            "include": [{"class": a, "count": 1, "color": c1}, {"class": b, "count": 1, "color": c2}],
            "prompt": f"a photo of {with_article(c1)} {a} and {with_article(c2)} {b}"}


# -----------------------------------------------------------------------------

def bindings(row):
    """The (colour, shape) bindings a prompt names."""
    return {(it["color"], it["class"]) for it in row["include"] if "color" in it}


def prompt_space():
    """{task: every distinct row of that task}, in a fixed order."""
    shapes, ordered = list(SHAPES), list(permutations(SHAPES, 2))
    return {
        "single_object": [single_object(a) for a in shapes],
        "two_object": [two_object(a, b) for a, b in ordered],
        "counting": [counting(a, n, c) for a in shapes for n in COUNTS for c in (None, *COLORS)],
        "colors": [colors(a, c) for a in shapes for c in COLORS],
        "position": [position(a, rel, b, ca, cb) for a, b in ordered for rel in RELATIONS
                     for ca, cb in [(None, None), *((x, y) for x in COLORS for y in COLORS)]],
        "color_attr": [color_attr(a, c1, b, c2) for a, b in ordered for c1, c2 in permutations(COLORS, 2)],
    }


def heldout_bindings(seed=0):
    """The composition split's bindings: one per shape, each with a different colour."""
    rng = np.random.default_rng(seed)
    colours = rng.permutation(len(COLORS))[:HELDOUT_BINDINGS]
    shapes = rng.permutation(len(SHAPES))[:HELDOUT_BINDINGS]
    return {(COLORS[c], SHAPES[s]) for c, s in zip(colours, shapes)}


def make_prompts(seed=0):
    """{split: list of GenEval metadata rows with "prompt_id"} for SPLITS, deterministic in seed."""
    held = heldout_bindings(seed)
    rng = np.random.default_rng([seed, 1])
    per_task = {s: [] for s in SPLITS}
    for tag, rows in prompt_space().items():
        novel = [r for r in rows if bindings(r) & held]
        rest = [r for r in rows if not bindings(r) & held]
        n_eval = int(np.clip(round(EVAL_FRACTION * len(rest)), EVAL_MIN, EVAL_PER_TASK))
        order = rng.permutation(len(rest))
        per_task["eval"].append([rest[i] for i in order[:n_eval]])
        per_task["train"].append([rest[i] for i in order[n_eval:]])
        per_task["composition"].append([novel[i] for i in rng.permutation(len(novel))[:EVAL_PER_TASK]])
    out = {}
    for s, groups in per_task.items():
        # round-robin over tasks: every prefix of a split file is as task-balanced as it can be, so that
        # max_prompts=N takes a balanced subset (position prompts are most of the train split)
        out[s] = [g[i] for i in range(max(map(len, groups))) for g in groups if i < len(g)]
        for i, row in enumerate(out[s]):
            row["prompt_id"] = f"{s}-{i:05d}"
    return out


def dev_split(rows, n, seed=0):
    """(rest, dev): n train prompts drawn for choices (recipes, checkpoints), stratified by task."""
    rng = np.random.default_rng([seed, 2])
    by_task = {t: [i for i, r in enumerate(rows) if r["tag"] == t] for t in TASKS}
    share = {t: len(ix) / len(rows) for t, ix in by_task.items()}
    # every task gets at least one dev prompt where it can spare one; the rest in proportion
    quota = {t: min(len(ix) - 1, max(1, round(share[t] * n))) for t, ix in by_task.items()}
    picked = {i for t, ix in by_task.items() for i in rng.choice(ix, quota[t], replace=False)}
    return [r for i, r in enumerate(rows) if i not in picked], [r for i, r in enumerate(rows) if i in picked]


def _copy(row):
    return json.loads(json.dumps(row))


def perturbations(row, rng):
    """{kind: [perturbed rows]}: near-miss scenes that must NOT satisfy `row` under GenEval's rules (a colour
    replaced or two colours swapped, one object fewer, for counting one more, the relation flipped, a shape
    replaced). Hard negatives for training understanding and validating the oracle. (One object more is
    not a negative outside counting: GenEval's include clause is "at least count".)"""
    out = {"color": [], "count": [], "relation": [], "shape": []}
    inc = row["include"]
    coloured = [i for i, it in enumerate(inc) if "color" in it]
    if coloured:
        m = _copy(row)  # one colour replaced by a colour the prompt does not name
        i = int(rng.choice(coloured))
        m["include"][i]["color"] = str(rng.choice([c for c in COLORS if c not in {it.get("color") for it in inc}]))
        out["color"].append(m)
        if len(coloured) == 2 and inc[0]["color"] != inc[1]["color"]:  # the two colours swapped
            m = _copy(row)
            m["include"][0]["color"], m["include"][1]["color"] = inc[1]["color"], inc[0]["color"]
            out["color"].append(m)
    if row["tag"] != "position":
        m = _copy(row)  # one object fewer (of the last item)
        m["include"][-1]["count"] -= 1
        out["count"].append(m)
        if "exclude" in row:  # counting is exact: one more is wrong too
            m = _copy(row)
            m["include"][0]["count"] += 1
            out["count"].append(m)
    if row["tag"] == "position":
        flip = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
        m = _copy(row)
        m["include"][1]["position"][0] = flip[inc[1]["position"][0]]
        out["relation"].append(m)
    for i in range(len(inc)):  # one object's shape replaced by a shape the prompt does not name
        m = _copy(row)
        m["include"][i]["class"] = str(rng.choice([s for s in SHAPES if s not in {it["class"] for it in inc}]))
        out["shape"].append(m)
    return out


def split_sizes(rows):
    """{task: number of rows} in TASKS order."""
    return {t: sum(r["tag"] == t for r in rows) for t in TASKS}


def write_jsonl(rows, path):
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def load_world_prompts(split="train"):
    """The shipped prompt rows of one split (see SPLITS), as a list of dicts."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
    return read_jsonl(os.path.join(DATA_DIR, f"{split}.jsonl"))


def main(argv=None):
    ap = argparse.ArgumentParser(description="write the shapes-world prompt splits (GenEval metadata JSONL)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=DATA_DIR, help="output folder for the split files")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    for name, rows in make_prompts(args.seed).items():
        path = os.path.join(args.out, f"{name}.jsonl")
        write_jsonl(rows, path)
        sizes = " ".join(f"{t}={n}" for t, n in split_sizes(rows).items())
        print(f"wrote {len(rows)} prompts to {path} ({sizes})")


if __name__ == "__main__":
    main()
