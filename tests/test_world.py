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
from gapray.world.oracle import DEAD_ZONE

# -----------------------------------------------------------------------------
# grammar


def test_grammar_is_deterministic_and_shipped_files_match(tmp_path):
    a, b = make_prompts(0), make_prompts(0)
    assert a == b
    assert make_prompts(1) != a  # the seed matters
    assert load_world_prompts("train") == a[0] and load_world_prompts("eval") == a[1]
    grammar.main(["--seed", "0", "--out", str(tmp_path)])
    for split in ("train", "eval"):
        with open(tmp_path / f"{split}.jsonl", "rb") as f, open(os.path.join(grammar.DATA_DIR, f"{split}.jsonl"), "rb") as g:
            assert f.read() == g.read()
    with pytest.raises(ValueError):
        load_world_prompts("test")


def _expected_prompt(row):
    """The prompt text the schema says a row must have, rebuilt independently."""
    art = lambda w: ("an " if w[0] in "aeiou" else "a ") + w
    inc = row["include"]
    tag = row["tag"]
    if tag == "single_object":
        return f"a photo of {art(inc[0]['class'])}"
    if tag == "two_object":
        return f"a photo of {art(inc[0]['class'])} and {art(inc[1]['class'])}"
    if tag == "counting":
        c = inc[0]["class"]
        return f"a photo of {grammar.NUMBERS[inc[0]['count']]} {c + 'es' if c.endswith('s') else c + 's'}"
    if tag == "colors":
        return f"a photo of {art(inc[0]['color'])} {inc[0]['class']}"
    if tag == "position":
        return f"a photo of {art(inc[1]['class'])} {inc[1]['position'][0]} {art(inc[0]['class'])}"
    return f"a photo of {art(inc[0]['color'])} {inc[0]['class']} and {art(inc[1]['color'])} {inc[1]['class']}"


@pytest.mark.parametrize("split", ["train", "eval"])
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
        assert ("color" in r["include"][0]) == (r["tag"] in ("colors", "color_attr"))
        assert ("exclude" in r) == (r["tag"] == "counting")
        if r["tag"] == "counting":
            assert r["exclude"] == [{"class": r["include"][0]["class"], "count": r["include"][0]["count"] + 1}]
            assert 2 <= r["include"][0]["count"] <= 4
        if n_items == 2:
            assert r["include"][0]["class"] != r["include"][1]["class"]
            if r["tag"] == "color_attr":
                assert r["include"][0]["color"] != r["include"][1]["color"]
        assert r["prompt"] == _expected_prompt(r)


def test_splits_are_disjoint_and_cover_every_task():
    train, eval_ = load_world_prompts("train"), load_world_prompts("eval")
    for rows in (train, eval_):
        texts = [r["prompt"] for r in rows]
        assert len(set(texts)) == len(texts)  # no duplicate prompt inside a split
        assert {r["tag"] for r in rows} == set(TASKS)  # every task in both splits
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in eval_}
    print("\nsplit sizes:", {"train": grammar.split_sizes(train), "eval": grammar.split_sizes(eval_)})
    assert 200 <= len(train) <= 600 and 60 <= len(eval_) <= 200

    # the pairing rule, checked from the metadata itself, not through grammar's helpers:
    # (colour, shape) bindings never occur in both splits (any task)
    def binds(rows):
        return {(it["color"], it["class"]) for r in rows for it in r["include"] if "color" in it}
    assert binds(train) and binds(eval_) and not binds(train) & binds(eval_)
    # two_object: unordered shape pairs
    def pairs(rows):
        return {frozenset(it["class"] for it in r["include"]) for r in rows if r["tag"] == "two_object"}
    assert not pairs(train) & pairs(eval_)
    # position: the scene up to the converse relation ("A left of B" == "B right of A")
    converse = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
    def scenes(rows):
        out = set()
        for r in rows:
            if r["tag"] == "position":
                a, b = r["include"][0]["class"], r["include"][1]["class"]
                rel = r["include"][1]["position"][0]
                out |= {(b, rel, a), (a, converse[rel], b)}
        return out
    assert not scenes(train) & scenes(eval_)
    # color_attr: no binding shared (implied by the binding check) and so no pair of bindings
    def attr(rows):
        return {frozenset((it["color"], it["class"]) for it in r["include"]) for r in rows if r["tag"] == "color_attr"}
    assert not attr(train) & attr(eval_)
    # grammar's own key function agrees
    keys = lambda rows: {grammar.pairing_key(r) for r in rows} - {None}
    assert not keys(train) & keys(eval_)


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


def test_render_relations_clear_the_dead_zone():
    # the renderer's margin is what lets degraded images still pass: check it from the pixels
    rng = np.random.default_rng(7)
    for row in [r for r in load_world_prompts("train") if r["tag"] == "position"]:
        objs = inspect(render(row, 64, rng))
        by = {o["class"]: o["centroid"] for o in objs}
        a, b = by[row["include"][0]["class"]], by[row["include"][1]["class"]]
        dx, dy = (b[0] - a[0]) / 64, (b[1] - a[1]) / 64
        rel = row["include"][1]["position"][0]
        along, side = {"left of": (-dx, dy), "right of": (dx, dy), "above": (-dy, dx), "below": (dy, dx)}[rel]
        assert along >= 2 * DEAD_ZONE and abs(side) <= 0.7 * along, (row["prompt"], along, side)


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


def test_extra_object_rejected():
    rng = np.random.default_rng(11)
    for row in load_world_prompts("eval"):
        named = {it["class"] for it in row["include"]}
        for cls in (str(rng.choice([s for s in SHAPES if s not in named])), row["include"][0]["class"]):
            meta = json.loads(json.dumps(row))
            meta["include"].append({"class": cls, "count": 1})
            img = render(meta, 64, rng)
            assert not judge(img, row), (row["prompt"], cls, explain(img, row))
    row = {"tag": "single_object", "include": [{"class": "circle", "count": 1}], "prompt": "a photo of a circle"}
    img = render({"include": [{"class": "circle", "count": 1}, {"class": "square", "count": 1}]}, 64, rng)
    assert "not named by the prompt" in explain(img, row)
