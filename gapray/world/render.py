"""
Renderer of the shapes world: draws a random scene that satisfies one GenEval metadata row.

render(meta, size, rng) places exactly the objects that meta's "include" names ("count" copies
of each; "exclude" needs nothing drawn) on a plain near-black background, with random size,
sub-pixel position and a small colour jitter, and a random palette colour where the row gives
none, so many different images satisfy one prompt. Assumptions and guarantees:
  - Shapes are axis-aligned with a square bounding box of side d, d uniform in
    [0.17, 0.27] * size (at least 8 px, so 32 px images stay legible); 4 objects fit at 64 px
    easily and up to 6 fit with retries (the sizes shrink if a layout keeps failing).
  - Objects never overlap: their bounding boxes are at least GAP = max(2 px, 0.04 * size) apart
    (Chebyshev distance between centres >= (d1 + d2) / 2 + GAP), and keep a margin to the border.
  - "position": [REL, j] puts the object REL of the first object of item j with an offset along
    the relation axis of at least max(0.3 * size, what non-overlap needs) and a sideways offset of
    at most half that, so that GenEval's relative_position (oracle.py) holds with a clear margin:
    the offset along the axis, shrunk by 0.1 x the two objects' sizes, stays above 0.5 of the
    offset's length (tests/test_world.py checks it with boxes grown by a blur's worth).
  - Edges are anti-aliased: each pixel's coverage is computed on a 4x4 sub-pixel grid.
The vocabulary (SHAPES, COLORS, RELATIONS), the palette and the shape geometry (inside()) live
here: they are the world's definition of what things look like. The oracle derives its reference
shape features from inside(), never from a scene.
"""

import numpy as np

# The world's visual vocabulary (grammar.py words prompts with these names).
SHAPES = ("circle", "square", "triangle", "cross")
COLORS = ("red", "green", "blue", "yellow", "purple", "white")
RELATIONS = ("left of", "right of", "above", "below")
PALETTE = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (40, 90, 240),
    "yellow": (240, 210, 40),
    "purple": (190, 60, 220),
    "white": (235, 235, 235),
}
BACKGROUND = (18, 18, 24)
CROSS_ARM = 0.36  # half-width of a cross's arms, as a fraction of its half-size
SIZE_RANGE = (0.17, 0.27)  # object side, as a fraction of the image size
MIN_SIDE = 8.0  # px
COLOR_JITTER = 12  # max per-channel offset of an object's colour
BG_JITTER = 4
REL_MIN_ALONG = 0.3  # min offset along a relation's axis, as a fraction of the image size
REL_MAX_SIDEWAYS = 0.5  # max sideways offset, as a fraction of the offset along the axis
SUPERSAMPLE = 4

# relation -> unit vector from the reference object to the positioned one (x right, y down)
REL_DIR = {"left of": (-1.0, 0.0), "right of": (1.0, 0.0), "above": (0.0, -1.0), "below": (0.0, 1.0)}
assert tuple(PALETTE) == COLORS and tuple(REL_DIR) == RELATIONS


def inside(shape, u, v):
    """Boolean mask: which points (u, v) of the box [-1, 1]^2 (v down) are inside the shape."""
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape == "square":
        return (np.abs(u) <= 1.0) & (np.abs(v) <= 1.0)
    if shape == "triangle":  # pointing up, apex at the top centre, base along the bottom edge
        return (v <= 1.0) & (np.abs(u) <= (v + 1.0) / 2.0)
    if shape == "cross":  # a plus sign
        return (np.maximum(np.abs(u), np.abs(v)) <= 1.0) & ((np.abs(u) <= CROSS_ARM) | (np.abs(v) <= CROSS_ARM))
    raise ValueError(f"unknown shape {shape!r}; valid: {', '.join(SHAPES)}")


def coverage(shape, x0, y0, w, h, cx, cy, half, ss=SUPERSAMPLE):
    """Fraction of each pixel of the w x h block at (x0, y0) covered by the shape centred at
    (cx, cy) with half-size `half` (pixel (i, j) spans [j, j+1) x [i, i+1))."""
    off = (np.arange(ss) + 0.5) / ss
    xs = (x0 + np.arange(w)[:, None] + off[None, :]).ravel()  # (w*ss,)
    ys = (y0 + np.arange(h)[:, None] + off[None, :]).ravel()
    u = (xs[None, :] - cx) / half
    v = (ys[:, None] - cy) / half
    m = inside(shape, u, v).astype(np.float32)
    return m.reshape(h, ss, w, ss).mean(axis=(1, 3))


def _objects(meta):
    """Flatten meta["include"] into one entry per object to draw."""
    objs, first = [], []
    for gi, item in enumerate(meta["include"]):
        first.append(len(objs))
        rel = item.get("position")
        if rel is not None:
            if rel[1] >= gi:
                raise ValueError(f"position of include[{gi}] refers to a later item {rel[1]}")
            rel = (rel[0], first[rel[1]])  # relative to the first object of the target item
        for _ in range(int(item["count"])):
            objs.append({"class": item["class"], "color": item.get("color"), "rel": rel})
    return objs


def _layout(objs, size, rng):
    """Centres and sides for objs; rejection sampling, shrinking objects if it keeps failing."""
    gap = max(2.0, 0.04 * size)
    margin = max(1.0, 0.02 * size)
    lo_d = max(MIN_SIDE, SIZE_RANGE[0] * size)
    hi_d = max(lo_d, SIZE_RANGE[1] * size)

    def place(ob, d, placed):
        lo_c, hi_c = margin + d / 2, size - margin - d / 2
        for _ in range(60):
            if ob["rel"] is None:
                c = rng.uniform(lo_c, hi_c, size=2)
            else:
                rel, ti = ob["rel"]
                t = placed[ti]
                along_lo = max(REL_MIN_ALONG * size, (d + t["d"]) / 2 + gap)
                along_hi = size - 2 * margin - (d + t["d"]) / 2
                if along_lo > along_hi:
                    return None
                along = rng.uniform(along_lo, along_hi)
                side = rng.uniform(-REL_MAX_SIDEWAYS, REL_MAX_SIDEWAYS) * along
                dx, dy = REL_DIR[rel]
                c = t["c"] + np.array([dx * along - dy * side, dy * along + dx * side])
            if np.any(c < lo_c) or np.any(c > hi_c):
                continue
            if all(np.max(np.abs(c - p["c"])) >= (d + p["d"]) / 2 + gap for p in placed):
                return c
        return None

    for attempt in range(600):
        scale = 0.92 ** (attempt // 50)
        placed = []
        for ob in objs:
            d = rng.uniform(lo_d, hi_d) * scale
            c = place(ob, d, placed)
            if c is None:
                break  # no room for this object: start the scene again
            placed.append({"c": c, "d": d})
        if len(placed) == len(objs):
            return placed
    raise RuntimeError(f"could not lay out {len(objs)} objects at size {size}")


def render(meta, size=64, rng=None):
    """A (size, size, 3) uint8 image of a random scene that satisfies the metadata row `meta`.
    rng: numpy Generator (or int seed); None draws a fresh unseeded one."""
    rng = np.random.default_rng(rng)
    objs = _objects(meta)
    bg = np.clip(np.array(BACKGROUND) + rng.integers(-BG_JITTER, BG_JITTER + 1, 3), 0, 255)
    img = np.empty((size, size, 3), np.float32)
    img[:] = bg
    for ob, pl in zip(objs, _layout(objs, size, rng)):
        name = ob["color"] or COLORS[rng.integers(len(COLORS))]
        col = np.clip(np.array(PALETTE[name]) + rng.integers(-COLOR_JITTER, COLOR_JITTER + 1, 3), 0, 255)
        (cx, cy), half = pl["c"], pl["d"] / 2
        x0, y0 = int(np.floor(cx - half)), int(np.floor(cy - half))
        x1, y1 = int(np.ceil(cx + half)), int(np.ceil(cy + half))
        x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, size), min(y1, size)
        a = coverage(ob["class"], x0, y0, x1 - x0, y1 - y0, cx, cy, half)[..., None]
        img[y0:y1, x0:x1] = img[y0:y1, x0:x1] * (1 - a) + col * a
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)
