"""
Tests of the shapes world: grammar and splits, renderer, and the oracle judge's agreement with
the scene it was given, on clean and degraded renders (pytest -s prints the confusion matrices).
"""

import io
import json
import os

import numpy as np
import pytest
from PIL import Image, ImageFilter

from gapray.world import (BACKGROUND, COLORS, RELATIONS, SHAPES, TASKS, explain, inspect, judge,
                          load_world_prompts, make_prompts, render)
from gapray.world import grammar
from gapray.world.grammar import perturbations
from gapray.world.oracle import IMPOSTORS, relative_position

# -----------------------------------------------------------------------------
# grammar


def test_grammar_is_deterministic_and_shipped_files_match(tmp_path):
    a, b = make_prompts(0), make_prompts(0)
    assert a == b and list(a) == list(grammar.SPLITS)
    assert make_prompts(1) != a  # the seed matters
    assert all(load_world_prompts(s) == a[s] for s in grammar.SPLITS)
    grammar.main(["--seed", "0", "--out", str(tmp_path)])
    for split in grammar.SPLITS:
        with open(tmp_path / f"{split}.jsonl", "rb") as f, open(os.path.join(grammar.DATA_DIR, f"{split}.jsonl"), "rb") as g:
            assert f.read() == g.read()
    with pytest.raises(ValueError):
        load_world_prompts("test")


def _expected_prompt(row):
    """The prompt text the schema says a row must have, rebuilt independently."""
    art = lambda w: ("an " if w[0] in "aeiou" else "a ") + w
    col = lambda it, w: f"{it['color']} {w}" if "color" in it else w
    inc = row["include"]
    tag = row["tag"]
    if tag == "single_object":
        return f"a photo of {art(inc[0]['class'])}"
    if tag == "two_object":
        return f"a photo of {art(inc[0]['class'])} and {art(inc[1]['class'])}"
    if tag == "counting":
        c = inc[0]["class"]
        return f"a photo of {grammar.NUMBERS[inc[0]['count']]} {col(inc[0], c + 'es' if c.endswith('s') else c + 's')}"
    if tag == "colors":
        return f"a photo of {art(inc[0]['color'])} {inc[0]['class']}"
    if tag == "position":
        return f"a photo of {art(col(inc[1], inc[1]['class']))} {inc[1]['position'][0]} {art(col(inc[0], inc[0]['class']))}"
    return f"a photo of {art(inc[0]['color'])} {inc[0]['class']} and {art(inc[1]['color'])} {inc[1]['class']}"


@pytest.mark.parametrize("split", ["train", "eval", "composition"])
def test_schema(split):
    rows = load_world_prompts(split)
    ids = [r["prompt_id"] for r in rows]
    assert len(set(ids)) == len(ids) and all(i.startswith(split + "-") for i in ids)
    for r in rows:
        assert list(r)[:2] == ["tag", "include"] and set(r) <= {"tag", "include", "exclude", "prompt", "prompt_id"}
        assert r["tag"] in TASKS
        n_items = {"single_object": 1, "counting": 1, "colors": 1}.get(r["tag"], 2)
        assert len(r["include"]) == n_items
        for i, it in enumerate(r["include"]):
            assert set(it) <= {"class", "count", "color", "position"}
            assert it["class"] in SHAPES and isinstance(it["count"], int) and it["count"] >= 1
            assert it.get("color", "red") in COLORS
            if "position" in it:
                rel, j = it["position"]
                assert rel in RELATIONS and 0 <= j < i
        coloured = ["color" in it for it in r["include"]]
        if r["tag"] in ("colors", "color_attr"):
            assert all(coloured)
        elif r["tag"] == "position":  # both objects or neither
            assert len(set(coloured)) == 1
        elif r["tag"] != "counting":
            assert not any(coloured)
        assert ("exclude" in r) == (r["tag"] == "counting")
        if r["tag"] == "counting":
            assert r["exclude"] == [{"class": r["include"][0]["class"], "count": r["include"][0]["count"] + 1}]
            assert 2 <= r["include"][0]["count"] <= 4
        if n_items == 2:
            assert r["include"][0]["class"] != r["include"][1]["class"]
            if r["tag"] == "color_attr":
                assert r["include"][0]["color"] != r["include"][1]["color"]
        assert r["prompt"] == _expected_prompt(r)


def test_prompt_space_is_large_and_distinct():
    space = [r["prompt"] for rows in grammar.prompt_space().values() for r in rows]
    assert len(space) == len(set(space)) == 2260


def test_splits_are_the_papers_regime_plus_a_composition_stress_test():
    rows = {s: load_world_prompts(s) for s in grammar.SPLITS}
    texts = {s: [r["prompt"] for r in rs] for s, rs in rows.items()}
    for s in grammar.SPLITS:
        assert len(set(texts[s])) == len(texts[s])  # no duplicate inside a split
    for s, t in (("train", "eval"), ("train", "composition"), ("eval", "composition")):
        assert not set(texts[s]) & set(texts[t]), (s, t)  # disjoint prompt texts
    sizes = {s: grammar.split_sizes(rs) for s, rs in rows.items()}
    print("\nsplit sizes:", sizes)
    assert all(n >= 2 for n in sizes["eval"].values())  # every task in eval ...
    assert all(n <= grammar.EVAL_PER_TASK for s in ("eval", "composition") for n in sizes[s].values())
    assert len(rows["train"]) >= 1000 and 100 <= len(rows["eval"]) <= 300

    # the main split: eval's bindings, shape pairs, relation scenes and (shape, count)s all recur in train
    def keys(r):
        inc = r["include"]
        out = {("binding", it["color"], it["class"]) for it in inc if "color" in it}
        if len(inc) == 2:
            out.add(("pair", inc[0]["class"], inc[1]["class"]))
        if r["tag"] == "position":
            out.add(("scene", inc[0]["class"], inc[1]["position"][0], inc[1]["class"]))
        if r["tag"] == "counting":
            out.add(("count", inc[0]["class"], inc[0]["count"]))
        return out
    in_train = set().union(*map(keys, rows["train"]))
    for r in rows["eval"]:
        assert keys(r) <= in_train, r["prompt"]
    # the stress test: each composition prompt names a binding that no train or eval prompt names
    def binds(rs):
        return {(it["color"], it["class"]) for r in rs for it in r["include"] if "color" in it}
    held = binds(rows["composition"]) - binds(rows["train"]) - binds(rows["eval"])
    assert held == grammar.heldout_bindings(0) and len(held) == grammar.HELDOUT_BINDINGS
    assert all({(it.get("color"), it["class"]) for it in r["include"]} & held for r in rows["composition"])


def test_dev_split_comes_from_train_and_covers_every_task():
    train = load_world_prompts("train")
    rest, dev = grammar.dev_split(train, 60)
    assert len(rest) + len(dev) == len(train) and not {r["prompt_id"] for r in rest} & {r["prompt_id"] for r in dev}
    assert {r["tag"] for r in dev} == set(TASKS) and 55 <= len(dev) <= 70
    assert grammar.dev_split(train, 60) == (rest, dev)


# -----------------------------------------------------------------------------
# degradations a VQ generator's images show, implemented here (never in the oracle's code)

def blur(img, rng):
    return np.asarray(Image.fromarray(img).filter(ImageFilter.GaussianBlur(0.7)))


def noise(img, rng):
    return np.clip(img + rng.normal(0.0, 12.0, img.shape), 0, 255).astype(np.uint8)


_k = np.arange(8)
_DCT = np.sqrt(2.0 / 8) * np.cos(np.pi * (2 * _k[None, :] + 1) * _k[:, None] / 16)
_DCT[0] /= np.sqrt(2.0)
_QSTEP = 12.0 + 10.0 * (_k[:, None] + _k[None, :])  # coarser for higher frequencies, like JPEG


def blocks(img, rng):
    """8x8 block DCT, quantised and inverted per channel: blocking and ringing artefacts."""
    h, w, c = img.shape
    x = img.astype(np.float64).reshape(h // 8, 8, w // 8, 8, c).transpose(0, 2, 4, 1, 3)
    coef = np.round((_DCT @ x @ _DCT.T) / _QSTEP) * _QSTEP
    y = (_DCT.T @ coef @ _DCT).transpose(0, 3, 1, 4, 2).reshape(h, w, c)
    return np.clip(np.rint(y), 0, 255).astype(np.uint8)


def jpeg(img, rng):
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=30)  # also subsamples chroma 2x
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


def shift(img, rng):
    return np.clip(img.astype(np.int16) + rng.integers(-20, 21, 3), 0, 255).astype(np.uint8)


DEGRADATIONS = {"clean": lambda img, rng: img, "blur": blur, "noise": noise, "blocks": blocks,
                "jpeg": jpeg, "shift": shift}

# -----------------------------------------------------------------------------
# perturbed prompts: render the perturbed scene, judge it against the original prompt


KINDS = ("positive", "color", "count", "relation", "shape")
SEEDS = (0, 1)  # several seeds ...
RENDERS = 2  # ... and several renders each


@pytest.fixture(scope="module")
def validation_set():
    """[(kind, original row, image)] for every eval prompt: renders of it (positives) and of its
    perturbations (negatives), several seeds x renders each, 64 px."""
    items = []
    for seed in SEEDS:
        rng = np.random.default_rng(seed)
        for row in load_world_prompts("eval"):
            metas = [("positive", row)] + [(k, m) for k, ms in perturbations(row, rng).items() for m in ms]
            for kind, meta in metas:
                for _ in range(RENDERS):
                    items.append((kind, row, render(meta, 64, rng)))
    return items


@pytest.mark.parametrize("degradation", list(DEGRADATIONS))
def test_oracle_agreement(validation_set, degradation):
    rng = np.random.default_rng(123)
    counts = {k: [0, 0] for k in KINDS}  # kind -> [judged aligned, judged not aligned]
    wrong = []
    for kind, row, img in validation_set:
        img = DEGRADATIONS[degradation](img, rng)
        ok = judge(img, row)
        counts[kind][0 if ok else 1] += 1
        if ok != (kind == "positive") and len(wrong) < 5:
            wrong.append(f"  {kind}: {row['prompt']}: {explain(img, row)}")
    print(f"\n[{degradation}] confusion matrix (truth x oracle verdict)")
    print(f"  {'kind':10s} {'n':>5s} {'accept':>7s} {'reject':>7s} {'agree':>7s}")
    agree = {}
    for k in KINDS:
        acc, rej = counts[k]
        n = acc + rej
        agree[k] = (acc if k == "positive" else rej) / max(n, 1)
        print(f"  {k:10s} {n:5d} {acc:7d} {rej:7d} {agree[k]:7.2%}")
    print("\n".join(wrong))
    for k in KINDS:
        assert sum(counts[k]) > 0
        assert agree[k] >= 0.99, (degradation, k, agree[k], wrong)


# -----------------------------------------------------------------------------
# renderer


@pytest.mark.parametrize("size", [32, 64, 128])
def test_render_shapes_and_oracle(size):
    rows = load_world_prompts("eval") + load_world_prompts("train")[::4]
    rng = np.random.default_rng(size)
    for row in rows:
        img = render(row, size, rng)
        assert img.shape == (size, size, 3) and img.dtype == np.uint8
        assert judge(img, row), (size, row["prompt"], explain(img, row))


def test_render_randomness():
    row = load_world_prompts("eval")[0]
    imgs = [render(row, 64, np.random.default_rng(s)) for s in range(5)]
    assert all(not np.array_equal(imgs[0], im) for im in imgs[1:])
    assert np.array_equal(render(row, 64, np.random.default_rng(3)), imgs[3])  # same seed, same image


def test_render_relations_hold_by_genevals_rule_with_margin():
    # the renderer's margin is what lets degraded images still pass: check it from the pixels, with the
    # boxes grown by 2 px each way (a blur's worth) and GenEval's threshold doubled
    rng = np.random.default_rng(7)
    for row in [r for r in load_world_prompts("train") if r["tag"] == "position"][::4]:
        objs = inspect(render(row, 64, rng))
        by = {o["class"]: o["bbox"] for o in objs}
        a, b = by[row["include"][0]["class"]], by[row["include"][1]["class"]]
        grow = lambda bx: (bx[0] - 2, bx[1] - 2, bx[2] + 2, bx[3] + 2)
        rel = row["include"][1]["position"][0]
        assert rel in relative_position(grow(b), grow(a)), (row["prompt"], a, b)


def test_relative_position_is_genevals_formula():
    # boxes (x0, y0, x1, y1), 10 px wide: centres 30 px apart along x, 10 along y
    a, b = (0, 10, 10, 20), (30, 0, 40, 10)
    # offset (-30, 10); shrunk by 0.1 * (10 + 10) = 2 per axis -> (-28, 8), over |offset| = 31.6
    assert relative_position(a, b) == {"left of"}  # -28 / 31.6 = -0.89; 8 / 31.6 = 0.25
    assert relative_position(b, a) == {"right of"}
    assert relative_position((0, 0, 10, 10), (20, 20, 30, 30)) == {"left of", "above"}  # diagonal: both (0.64)
    assert relative_position((0, 0, 10, 10), (1, 1, 11, 11)) == set()  # too close on both axes
    assert relative_position((0, 0, 10, 10), (0, 30, 10, 40)) == {"above"}


def test_inspect_reads_the_scene():
    meta = {"include": [{"class": "circle", "count": 1, "color": "red"},
                        {"class": "cross", "count": 2, "color": "blue"},
                        {"class": "triangle", "count": 1, "color": "white"}]}
    objs = inspect(render(meta, 64, np.random.default_rng(0)))
    got = sorted((o["color"], o["class"]) for o in objs)
    assert got == [("blue", "cross"), ("blue", "cross"), ("red", "circle"), ("white", "triangle")]
    assert all(0 <= o["centroid"][0] < 64 and o["area"] > 0 for o in objs)


# -----------------------------------------------------------------------------
# explicit negatives


def test_empty_image_rejected_for_every_prompt():
    empty = np.zeros((64, 64, 3), np.uint8) + np.array(BACKGROUND, np.uint8)
    assert inspect(empty) == []
    for row in load_world_prompts("train") + load_world_prompts("eval"):
        assert not judge(empty, row)
    assert "found 0" in explain(empty, load_world_prompts("eval")[0])


def test_unnamed_objects_pass_by_genevals_rule_and_fail_when_strict():
    rng = np.random.default_rng(11)
    for row in load_world_prompts("eval"):
        named = {it["class"] for it in row["include"]}
        extras = [str(rng.choice([s for s in SHAPES if s not in named]))]
        if row["tag"] not in ("counting", "position"):  # one more of a named class: include is ">= count"
            extras.append(row["include"][0]["class"])  # (position: GenEval relates the first-found objects)
        for cls in extras:
            meta = json.loads(json.dumps(row))
            meta["include"].append({"class": cls, "count": 1})
            img = render(meta, 64, rng)
            assert judge(img, row), (row["prompt"], cls, explain(img, row))
            assert not judge(img, row, strict=True), (row["prompt"], cls, explain(img, row, strict=True))
    row = {"tag": "single_object", "include": [{"class": "circle", "count": 1}], "prompt": "a photo of a circle"}
    img = render({"include": [{"class": "circle", "count": 1}, {"class": "square", "count": 1}]}, 64, rng)
    assert "not named by the prompt" in explain(img, row, strict=True) and explain(img, row).startswith("ok")
    # counting's exclude still makes it exact
    three = {"tag": "counting", "include": [{"class": "circle", "count": 3}], "exclude": [{"class": "circle", "count": 4}]}
    img = render({"include": [{"class": "circle", "count": 4}]}, 64, rng)
    assert not judge(img, three) and "circle<4, found 4" in explain(img, three)


# -----------------------------------------------------------------------------
# what the world never draws: a diamond (a turned square), an "x" (a turned cross), two squares merged into
# one blob, an off-palette colour. Drawn here with the renderer's own code and the oracle's impostor
# masks; each must not be read as the world shape or colour it resembles. At 80 px, so that every object is
# at least oracle.SMALL_SIDE px across: below that the oracle does not tell a turned shape from a world one
# (at 32 px an 8 px cross and an 8 px diamond are within its noise), which test_small_impostors_... states.

OFF_PALETTE = {"orange": (245, 130, 30), "brown": (140, 80, 30), "grey": (128, 128, 128), "pink": (250, 150, 190),
               "teal": (20, 150, 150)}  # each >= 75 RGB units from every palette colour


@pytest.fixture
def impostor_renderer(monkeypatch):
    from gapray.world import render as _  # noqa: F401  (the package re-exports the function under the module's name)
    import importlib
    mod = importlib.import_module("gapray.world.render")
    world_inside = mod.inside
    monkeypatch.setattr(mod, "inside", lambda shape, u, v: IMPOSTORS[shape](u, v) if shape in IMPOSTORS
                        else world_inside(shape, u, v))
    for name, rgb in OFF_PALETTE.items():
        monkeypatch.setitem(mod.PALETTE, name, rgb)
    return mod.render


LOOKALIKE = {"diamond": "cross", "x": "square", "merged squares (diagonal)": "square",
             "merged squares (side by side)": "square"}


@pytest.mark.parametrize("degradation", ["clean", "blur", "noise", "blocks", "shift"])
def test_impostors_are_not_read_as_world_shapes_or_colours(impostor_renderer, degradation):
    rng = np.random.default_rng(5)
    wrong, n = [], 0
    for impostor, lookalike in LOOKALIKE.items():
        for color in COLORS:
            for _ in range(8):
                prompt = {"include": [{"class": lookalike, "count": 1, "color": color}]}
                img = DEGRADATIONS[degradation](impostor_renderer({"include": [{"class": impostor, "count": 1, "color": color}]}, 80, rng), rng)
                n += 1
                if judge(img, prompt):
                    wrong.append(f"{impostor} read as {color} {lookalike}: {explain(img, prompt)}")
    for off in OFF_PALETTE:
        for shape in SHAPES:
            for _ in range(4):
                img = DEGRADATIONS[degradation](impostor_renderer({"include": [{"class": shape, "count": 1, "color": off}]}, 32, rng), rng)
                for color in COLORS:
                    n += 1
                    if judge(img, {"include": [{"class": shape, "count": 1, "color": color}]}):
                        wrong.append(f"{off} {shape} read as {color}")
    print(f"\n[{degradation}] {n - len(wrong)}/{n} impostors rejected", *wrong[:5], sep="\n  ")
    assert len(wrong) <= 0.01 * n, wrong[:5]


def test_small_impostors_merged_and_off_palette_are_caught_at_the_worlds_size(impostor_renderer):
    """At 32 px (the world model's images) turned shapes are below the oracle's resolution (pytest -s prints
    how a diamond reads there), but two merged squares, >= 12 px across, are still rejected; off-palette
    colours are drawn at 32 px in the test above."""
    rng = np.random.default_rng(6)
    as_square = {"include": [{"class": "square", "count": 1}]}
    merged = [judge(impostor_renderer({"include": [{"class": m, "count": 1}]}, 32, rng), as_square)
              for m in ("merged squares (diagonal)", "merged squares (side by side)") for _ in range(30)]
    assert sum(merged) == 0
    diamonds = [inspect(impostor_renderer({"include": [{"class": "diamond", "count": 1}]}, 32, rng))[0]["class"]
                for _ in range(30)]
    print(f"\n32 px diamonds read as: {sorted(diamonds)}")
