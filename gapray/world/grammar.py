"""
Prompt grammar of the shapes world, and its deterministic train / eval split.

Every prompt is one row of GenEval's metadata schema (djghosh13/geneval,
prompts/create_prompts.py), plus our own stable "prompt_id":

    single_object  include [{class: A, count: 1}]                       "a photo of a circle"
    two_object     include [{A, 1}, {B, 1}]                             "a photo of a circle and a square"
    counting       include [{A, N}]  exclude [{A, N+1}]                 "a photo of three circles"
    colors         include [{A, 1, color: C}]                           "a photo of a red circle"
    position       include [{A, 1}, {B, 1, position: [REL, 0]}]         "a photo of a B REL a A"
    color_attr     include [{A, 1, color: C1}, {B, 1, color: C2}]       "a photo of a C1 A and a C2 B"

As in GenEval: the two objects of a two-object prompt are different shapes, the two colours
of a color_attr prompt are different colours, counting uses N in 2..4 (N = 1 would be the
single_object prompt again) with number words and plurals ("crosses"), and "position" names
the object it is relative to by its index in "include".

Vocabulary (closed; defined in render.py next to how it is drawn, re-exported here):
    SHAPES    circle, square, triangle, cross. All four are drawn axis-aligned with a square
              bounding box and differ in their coarse mass distribution, which survives blur, noise
              and 8x8 block artefacts at 10-20 px: a square fills its box, a circle leaves its
              corners partly empty, a cross leaves them fully empty (its mass sits on the two axes),
              and a triangle's mass sits low in its box. The oracle reads exactly these differences
              as whole-object moments (oracle.py). No rotation: a rotated square would be a diamond,
              a rotated cross an "x". Shapes with thin parts (lines, rings, stars) are avoided
              because blur at 10 px erases them.
    COLORS    red, green, blue, yellow, purple, white on a near-black background: six hues at least
              154 RGB units apart from each other (blue-purple the closest) and 177 from the
              background, far beyond noise of sigma 12 or a colour shift of 20.
    RELATIONS left of, right of, above, below (image coordinates: "above" = nearer the top).

Split rule (train vs held-out eval), exactly:
  1. No prompt text is in both splits, and no prompt text appears twice inside a split.
  2. (colour, shape) bindings are partitioned: a seeded set H_cs of 8 of the 24 bindings (each
     shape loses exactly 2 colours; each colour is held out for 1 or 2 shapes) appears only in eval.
     A colors prompt is in eval iff its binding is in H_cs. A color_attr prompt is in eval iff BOTH
     its bindings are in H_cs, in train iff NEITHER is; prompts with one binding on each side are
     not used. So no (colour, shape) binding occurs in both splits, across all tasks.
  3. two_object: the unordered shape pair {A, B} is the key; 2 of the 6 pairs (disjoint, so all
     four shapes occur in eval) are eval-only. Both word orders of a pair go to the same split.
  4. position: the key is the scene up to converse, (axis, left-or-top shape, right-or-bottom
     shape), so "a circle left of a square" and "a square right of a circle" share one key; 4 of
     the 12 ordered shape pairs per axis (8 of 24 keys) are eval-only.
  5. counting: one (shape, count) per shape is eval-only, the counts chosen so 2, 3 and 4 all
     occur in eval.
  6. single_object has only 4 distinct prompts, so they cannot be in both splits: 2 shapes go to
     train, 2 to eval (each shape still occurs in both splits through the other tasks).
Everything the split needs (which bindings, pairs, scenes, counts are held out, and the order of
rows) is drawn from numpy's default_rng(seed). The vocabulary has only 460 distinct prompts in
all (4 + 12 + 12 + 24 + 48 + 360), and rule 2 discards the color_attr prompts that straddle the
split, so with seed 0 the splits are 230 train / 78 eval prompts (see split_sizes()).

CLI: python -m gapray.world.grammar --seed 0 --out gapray/world/data
writes train.jsonl and eval.jsonl (one json.dumps row a line, like GenEval's metadata file).
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
SPLITS = ("train", "eval")

# how much each rule holds out (see the module docstring); change here, not in the code below
HELDOUT_COLORS_PER_SHAPE = 2
HELDOUT_SHAPE_PAIRS = 2
HELDOUT_SCENES_PER_AXIS = 4
HELDOUT_SINGLE = 2

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")

# relation -> (axis, True if the positioned object is the first = left/top one)
_REL_AXIS = {"left of": ("x", True), "right of": ("x", False), "above": ("y", True), "below": ("y", False)}


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


def counting(a, n):
    return {"tag": "counting", "include": [{"class": a, "count": n}],
            "exclude": [{"class": a, "count": n + 1}],
            "prompt": f"a photo of {NUMBERS[n]} {plural(a)}"}


def colors(a, c):
    return {"tag": "colors", "include": [{"class": a, "count": 1, "color": c}],
            "prompt": f"a photo of {with_article(c)} {a}"}


def position(a, rel, b):
    # "a photo of a B REL a A": B is REL of object 0 (A), as GenEval writes it
    return {"tag": "position",
            "include": [{"class": a, "count": 1}, {"class": b, "count": 1, "position": [rel, 0]}],
            "prompt": f"a photo of {with_article(b)} {rel} {with_article(a)}"}


def color_attr(a, c1, b, c2):
    return {"tag": "color_attr",
            "include": [{"class": a, "count": 1, "color": c1}, {"class": b, "count": 1, "color": c2}],
            "prompt": f"a photo of {with_article(c1)} {a} and {with_article(c2)} {b}"}


# -----------------------------------------------------------------------------
# the keys the split rule is stated in (also used by the tests to check it)

def bindings(row):
    """The (colour, shape) bindings a prompt names."""
    return {(it["color"], it["class"]) for it in row["include"] if "color" in it}


def pairing_key(row):
    """The key that decides the split of a two-object prompt (None for other tasks)."""
    tag, inc = row["tag"], row["include"]
    if tag == "two_object":
        return ("pair",) + tuple(sorted((inc[0]["class"], inc[1]["class"])))
    if tag == "position":
        a, b, rel = inc[0]["class"], inc[1]["class"], inc[1]["position"][0]
        axis, b_first = _REL_AXIS[rel]
        return ("scene", axis) + ((b, a) if b_first else (a, b))
    if tag == "color_attr":
        return ("bindings",) + tuple(sorted(bindings(row)))
    return None


# -----------------------------------------------------------------------------

def make_prompts(seed=0):
    """Returns (train, eval): lists of GenEval metadata rows with "prompt_id", deterministic in seed."""
    rng = np.random.default_rng(seed)
    shapes, ncol = list(SHAPES), len(COLORS)

    # draw every held-out set first, in a fixed order, so the split depends on the seed only
    single_eval = {shapes[i] for i in rng.permutation(len(shapes))[:HELDOUT_SINGLE]}
    p = [shapes[i] for i in rng.permutation(len(shapes))]
    pair_eval = {tuple(sorted(p[2 * k:2 * k + 2])) for k in range(HELDOUT_SHAPE_PAIRS)}  # disjoint pairs
    cperm = list(rng.permutation(len(COUNTS)))
    cperm += list(rng.permutation(len(COUNTS)))  # 4 shapes, 3 counts: every count held out at least once
    count_eval = {(shapes[i], COUNTS[cperm[i]]) for i in range(len(shapes))}
    colp, shp = rng.permutation(ncol), rng.permutation(len(shapes))
    h = HELDOUT_COLORS_PER_SHAPE
    held_cs = {(COLORS[colp[(h * i + k) % ncol]], shapes[shp[i]]) for i in range(len(shapes)) for k in range(h)}
    ordered = list(permutations(shapes, 2))  # 12 ordered (first, second) pairs per axis
    scene_eval = set()
    for axis in ("x", "y"):
        for i in rng.choice(len(ordered), size=HELDOUT_SCENES_PER_AXIS, replace=False):
            scene_eval.add(("scene", axis) + ordered[i])

    def split_of(row):
        tag = row["tag"]
        if tag == "single_object":
            return "eval" if row["include"][0]["class"] in single_eval else "train"
        if tag == "two_object":
            return "eval" if pairing_key(row)[1:] in pair_eval else "train"
        if tag == "counting":
            it = row["include"][0]
            return "eval" if (it["class"], it["count"]) in count_eval else "train"
        if tag == "position":
            return "eval" if pairing_key(row) in scene_eval else "train"
        held = [bd in held_cs for bd in bindings(row)]  # colors, color_attr
        return "eval" if all(held) else "train" if not any(held) else None

    # enumerate the whole grammar, task by task
    every = {
        "single_object": [single_object(a) for a in shapes],
        "two_object": [two_object(a, b) for a, b in ordered],
        "counting": [counting(a, n) for a in shapes for n in COUNTS],
        "colors": [colors(a, c) for a in shapes for c in COLORS],
        "position": [position(a, rel, b) for a, b in ordered for rel in RELATIONS],
        "color_attr": [color_attr(a, c1, b, c2) for a, b in ordered for c1, c2 in permutations(COLORS, 2)],
    }
    out = {"train": [], "eval": []}
    for tag in TASKS:
        rows = {"train": [], "eval": []}
        for row in every[tag]:
            s = split_of(row)
            if s is not None:
                rows[s].append(row)
        for s in SPLITS:
            order = rng.permutation(len(rows[s]))
            out[s].extend(rows[s][i] for i in order)
    for s in SPLITS:
        for i, row in enumerate(out[s]):
            row["prompt_id"] = f"{s}-{i:05d}"
    return out["train"], out["eval"]


def _copy(row):
    return json.loads(json.dumps(row))


def perturbations(row, rng):
    """{kind: [perturbed rows]}: near-miss scenes that must NOT satisfy `row` (colour swapped, count +-1,
    relation flipped, shape swapped). Hard negatives for training understanding and validating the oracle."""
    out = {"color": [], "count": [], "relation": [], "shape": []}
    inc = row["include"]
    if row["tag"] in ("colors", "color_attr"):
        m = _copy(row)  # one colour replaced by another
        i = int(rng.integers(len(inc)))
        m["include"][i]["color"] = str(rng.choice([c for c in COLORS if c not in {it["color"] for it in inc}]))
        out["color"].append(m)
        if row["tag"] == "color_attr":  # the two colours swapped between the objects
            m = _copy(row)
            m["include"][0]["color"], m["include"][1]["color"] = inc[1]["color"], inc[0]["color"]
            out["color"].append(m)
    if row["tag"] != "position":
        for i, dn in ((0, +1), (len(inc) - 1, -1)):  # one object more, one fewer
            m = _copy(row)
            m["include"][i]["count"] += dn
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
    """The shipped prompt rows of one split ("train" or "eval"), as a list of dicts."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
    return read_jsonl(os.path.join(DATA_DIR, f"{split}.jsonl"))


def main(argv=None):
    ap = argparse.ArgumentParser(description="write the shapes-world prompt splits (GenEval metadata JSONL)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=DATA_DIR, help="output folder for train.jsonl and eval.jsonl")
    args = ap.parse_args(argv)
    train, eval_ = make_prompts(args.seed)
    os.makedirs(args.out, exist_ok=True)
    for name, rows in (("train", train), ("eval", eval_)):
        path = os.path.join(args.out, f"{name}.jsonl")
        write_jsonl(rows, path)
        sizes = " ".join(f"{t}={n}" for t, n in split_sizes(rows).items())
        print(f"wrote {len(rows)} prompts to {path} ({sizes})")


if __name__ == "__main__":
    main()
