"""
Oracle judge of the shapes world: reads an image's pixels and says whether it satisfies a GenEval
metadata row. It plays the role of GenEval's detector + CLIP colour classifier, exactly, for this
closed world, and must stay right on blurry / noisy / blocky images from a VQ-token generator.

Pipeline (inspect):
  1. Background: the per-channel median of the image (objects cover well under half of it), so a
     tinted or shifted background still reads as background.
  2. Foreground: a pixel is foreground if its nearest colour among {background} + the 6 palette
     colours is not the background. A blurred edge between an object and the background thus
     flips at the 50% blend, whatever the object's colour.
  3. Objects: 8-connected components of the foreground (label propagation with pointer jumping in
     numpy); components smaller than MIN_AREA_FRAC of the image (0.35%, i.e. 14 px at 64 px,
     about a quarter of the smallest object the renderer draws) are specks and dropped.
  4. Colour: majority vote of the nearest palette colour over the component's "core" pixels (within
     CORE_DIST = 62 RGB units of a palette colour; blurred rims, which can be nearer to a third
     colour, are left out). Purity below MIN_PURITY (0.6) -> colour "mixed"; fewer core pixels than
     MIN_CORE_FRAC (20%) of the component -> "off-palette" (an orange, a brown, a grey: colours the
     world never draws, at least 75 units from every palette colour, are not read as the nearest one);
     neither matches a name.
  5. Shape: a soft mask (each pixel's blend fraction between the background and the object's own
     median colour, read from luminance, which JPEG-like coders keep sharper than chroma, over the
     component grown by one pixel to take in its blurred rim) gives five moment features that do
     not depend on position or scale (see moments()), and a sixth, the share of the bounding box
     filled. The class is the ideal shape (render.inside, integrated on a fine grid) whose features
     are nearest, in units of FEATURE_SCALE (their spread under degradation). Nearest distance above
     MAX_SHAPE_DIST (4.0) -> "unknown": the ideal world shapes are 7.4 to 18 units apart, and renders
     at 64 px are read right under blur, noise, 8x8 block DCT quantisation and JPEG q30 (>= 99.8%,
     tests/test_world.py). Shapes the world never draws have references too (IMPOSTORS: a rotated square, i.e. a
     diamond, and a rotated cross, an "x"; two squares merged into one blob): when one of them is the
     nearest by IMPOSTOR_MARGIN (0.6 units), on objects SMALL_SIDE (11) px across or more, the
     class is "unknown", so a diamond is not read as a cross nor two merged squares as one square.
     Two features beyond the moments tell them apart: xxyy in axes turned by 45 degrees (a diamond
     1.0, a cross 1.1) and the share of its bounding box the object fills (a square 1.0, an "x"
     0.55). Below SMALL_SIDE the turned shapes are within the features' noise of the world ones and
     are not checked (at 32 px a diamond reads as a cross); merged squares are 12 px or more there.
     Moments integrate over the whole object, so the outline's blur, noise and blockiness move
     them little; an earlier outline/bounding-box template match failed on ~5-15% of such images.
  6. Centroid: the soft-mask-weighted mean pixel centre (x right, y down, in pixels); area: the
     component's pixel count.

Judging (judge / explain), GenEval's rules (djghosh13/geneval, evaluation/evaluate_images.py):
  - every include item {class, count, color?} must be met: at least `count` objects of that class
    (and colour, if given) that no earlier item used; more are fine;
  - every exclude item {class, count} must NOT be reached (counting's "exactly N": count N + 1);
  - "position": [REL, j]: each object of this item is REL of each object of item j, by GenEval's
    relative_position(): with the offset between the two bounding-box centres shrunk on each axis
    by POSITION_THRESHOLD (0.1) times the sum of the two boxes' sizes (clipped at 0) and divided by
    the length of the full offset, "left of" holds iff its x part is below -0.5 (right of, above,
    below alike; y down); objects too close on both axes stand in no relation;
  - unnamed objects, and "unknown" shapes or colours, are ignored, as GenEval's detector does not
    report what it has no class for. `strict=True` adds the first world's stricter rule: every
    detected object must be used by an include item.
Include items are matched in order, items with a colour before items without (a grammar row never
names the same class twice, so greedy matching is exact for its prompts).
"""

import numpy as np

from .render import COLORS, PALETTE, SHAPES, inside

POSITION_THRESHOLD = 0.1  # GenEval's
MIN_AREA_FRAC = 0.0035
MIN_AREA_PX = 4
CORE_DIST = 62.0
MIN_CORE_FRAC = 0.2
MIN_PURITY = 0.6
FEATURE_SCALE = np.array([0.08, 0.15, 0.15, 0.12, 0.05, 0.08])  # typical spread of each feature under degradation
MAX_SHAPE_DIST = 4.0
IMPOSTOR_MARGIN = 0.6  # how much nearer an impostor must be than the nearest world shape to win ...
SMALL_SIDE = 11  # ... on objects at least this many px across; smaller ones are not checked (see classify)


def _merged_squares(dx, dy):
    """Two unit squares whose centres are (dx, dy) apart (in half-sides), as one blob."""
    s = 1 / (1 + max(dx, dy) / 2)  # scaled into the [-1, 1] box
    return lambda u, v: (((np.abs(u / s + dx / 2) <= 1) & (np.abs(v / s + dy / 2) <= 1))
                         | ((np.abs(u / s - dx / 2) <= 1) & (np.abs(v / s - dy / 2) <= 1)))


# shapes the world never draws, known so that they are not read as the nearest world shape
IMPOSTORS = {"diamond": lambda u, v: np.abs(u) + np.abs(v) <= 1.0,
             "x": lambda u, v: inside("cross", (u + v) / np.sqrt(2), (u - v) / np.sqrt(2)),
             "merged squares (diagonal)": _merged_squares(1.0, 1.0),
             "merged squares (side by side)": _merged_squares(1.0, 0.0)}

_PAL = np.array([PALETTE[c] for c in COLORS], np.float32)  # (6, 3)
LUMA = np.array([0.299, 0.587, 0.114], np.float32)  # ITU-R BT.601, JPEG's Y
MIN_LUMA_CONTRAST = 30.0  # every palette colour is >= 70 above the background in Y


def _as_float(image):
    img = np.asarray(image)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 image, got shape {img.shape}")
    img = img.astype(np.float32)
    if np.issubdtype(np.asarray(image).dtype, np.floating) and img.max() <= 1.0:
        img = img * 255  # floats in [0, 1] are accepted too (uint8 is the norm)
    return img


def _components(mask):
    """8-connected component labels of a boolean mask: (labels per pixel, -1 off the mask)."""
    h, w = mask.shape
    n = h * w
    big = n
    lab = np.where(mask, np.arange(n).reshape(h, w), big)
    while True:
        p = np.pad(lab, 1, constant_values=big)
        m = lab.copy()
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                if dy or dx:
                    np.minimum(m, p[1 + dy:1 + dy + h, 1 + dx:1 + dx + w], out=m)
        m[~mask] = big
        # pointer jumping: a label is the index of a pixel of the same component, whose own label
        # is no larger; following it twice halves the remaining distance to the component minimum
        f = m.ravel()
        on = f < big
        for _ in range(2):
            f[on] = f[f[on]]
        if np.array_equal(m, lab):
            break
        lab = m
    return np.where(mask, lab, -1)


def moments(w, xs, ys):
    """Shape features of a weighted point set, invariant to position and scale:
    (xxyy, skew, aspect, kurt, diag), with x, y centred at the weighted centroid:
      xxyy   E[x^2 y^2] / (E[x^2] E[y^2])  1 for a square, 2/3 a circle, 0.35 a cross, 0.4 a diamond
      skew   E[y^3] / E[y^2]^1.5          -0.57 for an upward triangle (mass low), 0 otherwise
      aspect log(E[x^2] / E[y^2])          -0.29 for the triangle, 0 otherwise, large for two merged objects
      kurt   (E[x^4]/E[x^2]^2 + E[y^4]/E[y^2]^2) / 2
      diag   xxyy in axes turned by 45 degrees: 0.4 a square, 1.1 a cross, 1.0 a diamond
    Being integrals over the whole object, they barely move under blur, noise or block artefacts,
    unlike anything read off the object's outline or bounding box."""
    a = w.sum()
    x = xs - (w * xs).sum() / a
    y = ys - (w * ys).sum() / a
    xx, yy = max((w * x * x).sum() / a, 1e-6), max((w * y * y).sum() / a, 1e-6)
    p, q = x + y, x - y  # the turned axes (unnormalised: diag is scale-free)
    pp, qq = max((w * p * p).sum() / a, 1e-6), max((w * q * q).sum() / a, 1e-6)
    return np.array([
        (w * x * x * y * y).sum() / a / (xx * yy),
        (w * y ** 3).sum() / a / yy ** 1.5,
        np.log(xx / yy),
        ((w * x ** 4).sum() / a / xx ** 2 + (w * y ** 4).sum() / a / yy ** 2) / 2,
        (w * p * p * q * q).sum() / a / (pp * qq),
    ])


def features(w, xs, ys, fill):
    """moments() and the share of its bounding box the object fills (1 a square, 0.79 a circle, 0.59 a
    cross, 0.5 a triangle or a diamond, 0.55 an "x"): what tells an "x" from a square."""
    return np.append(moments(w, xs, ys), fill)


def _reference_features(n=400):
    """The features of each ideal shape (world shapes, then impostors), integrated on an n x n grid over its box."""
    g = (np.arange(n) + 0.5) / n * 2 - 1
    u, v = np.meshgrid(g, g)
    masks = {**{s: inside(s, u, v) for s in SHAPES}, **{s: f(u, v) for s, f in IMPOSTORS.items()}}
    out = {}
    for s, m in masks.items():
        rows, cols = np.nonzero(m.any(1))[0], np.nonzero(m.any(0))[0]
        fill = m.sum() / ((rows[-1] - rows[0] + 1) * (cols[-1] - cols[0] + 1))
        out[s] = features(m.astype(np.float64).ravel(), u.ravel(), v.ravel(), fill)
    return out


_REF = _reference_features()


def classify(features, side=SMALL_SIDE):
    """(nearest reference shape, world shape or impostor; its scaled distance; all scaled distances).
    An impostor wins only by IMPOSTOR_MARGIN, and only on objects of SMALL_SIDE px or more: below that
    (the 8 px objects of 32 px images) a cross and a diamond are within a unit of each other, some renders
    of a cross even nearer the diamond, so the check would reject true crosses. Two merged squares are
    12 px or more across at 32 px: they are still caught there."""
    dist = {s: float(np.sqrt((((features - r) / FEATURE_SCALE) ** 2).sum())) for s, r in _REF.items()}
    world = min(SHAPES, key=dist.get)
    impostor = min(IMPOSTORS, key=dist.get)
    best = impostor if side >= SMALL_SIDE and dist[impostor] + IMPOSTOR_MARGIN < dist[world] else world
    return best, dist[best], dist


def inspect(image):
    """Detected objects, largest first: dicts with class, color, centroid (x, y), area (pixels),
    bbox (x0, y0, x1, y1 exclusive), nearest (the nearest reference shape, impostors included),
    shape_dist (scaled distance to it), color_purity, features."""
    img = _as_float(image)
    h, w, _ = img.shape
    bg = np.median(img.reshape(-1, 3), axis=0)
    refs = np.concatenate([bg[None], _PAL])  # (7, 3): background, then the palette
    d2 = ((img[:, :, None, :] - refs[None, None]) ** 2).sum(-1)  # (h, w, 7)
    fg = d2.argmin(-1) > 0
    if not fg.any():
        return []
    pal_lab = d2[:, :, 1:].argmin(-1)  # nearest palette colour, ignoring the background
    core = d2[:, :, 1:].min(-1) <= CORE_DIST ** 2

    lab = _components(fg)
    ids, inv, area = np.unique(lab[fg], return_inverse=True, return_counts=True)
    ys, xs = np.nonzero(fg)  # same (row-major) order as lab[fg]
    min_area = max(MIN_AREA_PX, MIN_AREA_FRAC * h * w)
    objects = []
    for k in np.nonzero(area >= min_area)[0]:
        sel = inv == k
        py, px = ys[sel], xs[sel]
        # colour: majority over core pixels (all pixels if too few are core)
        c = core[py, px]
        if c.sum() >= max(3, MIN_CORE_FRAC * len(c)):
            hist = np.bincount(pal_lab[py, px][c], minlength=len(COLORS))
            purity = float(hist.max() / hist.sum())
            color = COLORS[int(hist.argmax())] if purity >= MIN_PURITY else "mixed"
        else:  # hardly a pixel near any palette colour: a colour the world does not have
            purity, color = 0.0, "off-palette"
        # soft mask: each pixel's blend fraction between background and the object's own colour,
        # over the component grown by one pixel (to take in its blurred rim)
        col = np.median(img[py[c], px[c]] if c.sum() >= 3 else img[py, px], axis=0)
        e = col - bg
        y0, y1 = max(py.min() - 1, 0), min(py.max() + 2, h)
        x0, x1 = max(px.min() - 1, 0), min(px.max() + 2, w)
        win = lab[y0:y1, x0:x1]
        own = np.pad(win == ids[k], 1)
        wh, ww = win.shape
        grown = np.zeros_like(win, dtype=bool)
        for dy in (0, 1, 2):
            for dx in (0, 1, 2):
                grown |= own[dy:dy + wh, dx:dx + ww]
        grown &= (win == ids[k]) | (win < 0)
        gy, gx = np.nonzero(grown)
        # the blend read from luminance: JPEG-like coders (and VQ decoders) smear chroma more than luma
        e_y = float(e @ LUMA)
        if abs(e_y) >= MIN_LUMA_CONTRAST:
            alpha = np.clip(((img[y0:y1, x0:x1][gy, gx] - bg) @ LUMA) / e_y, 0.0, 1.0)
        else:
            alpha = np.clip(((img[y0:y1, x0:x1][gy, gx] - bg) @ e) / max(float(e @ e), 1.0), 0.0, 1.0)
        if alpha.sum() < 1.0:  # a colour the blend model cannot explain: fall back to the hard mask
            alpha = (win[gy, gx] == ids[k]).astype(np.float32)
        fill = area[k] / ((px.max() - px.min() + 1) * (py.max() - py.min() + 1))
        feats = features(alpha, gx + x0 + 0.5, gy + y0 + 0.5, fill)
        best, dist, _ = classify(feats, side=max(px.max() - px.min(), py.max() - py.min()) + 1)
        a = alpha.sum()
        objects.append({
            "class": best if best in SHAPES and dist <= MAX_SHAPE_DIST else "unknown", "color": color,
            "centroid": (float((alpha * (gx + x0 + 0.5)).sum() / a), float((alpha * (gy + y0 + 0.5)).sum() / a)),
            "area": int(area[k]),
            "bbox": (int(px.min()), int(py.min()), int(px.max()) + 1, int(py.max()) + 1),
            "nearest": best, "shape_dist": round(dist, 3), "color_purity": round(purity, 3),
            "features": tuple(round(float(f), 3) for f in feats),
        })
    objects.sort(key=lambda o: -o["area"])
    return objects


def relative_position(box_a, box_b):
    """The relations in which the object with bounding box box_a stands to the one with box_b: GenEval's
    relative_position() (boxes as (x0, y0, x1, y1), y down)."""
    a, b = np.asarray(box_a, float).reshape(2, 2), np.asarray(box_b, float).reshape(2, 2)
    offset = a.mean(0) - b.mean(0)
    dims = (a[1] - a[0]) + (b[1] - b[0])
    revised = np.maximum(np.abs(offset) - POSITION_THRESHOLD * dims, 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    return {rel for rel, holds in (("left of", dx < -0.5), ("right of", dx > 0.5), ("above", dy < -0.5),
                                   ("below", dy > 0.5)) if holds}


def _name(o):
    return f"{o['color']} {o['class']} at ({o['centroid'][0]:.0f},{o['centroid'][1]:.0f})"


def evaluate(image, meta, objects=None, strict=False):
    """(ok, reasons): the verdict and, if it fails, why (a list of strings). strict: every detected
    object must be named by the prompt (the first world's rule; GenEval ignores unnamed objects)."""
    if objects is None:
        objects = inspect(image)
    reasons, used = [], set()
    inc = meta.get("include", [])
    groups = [None] * len(inc)
    order = sorted(range(len(inc)), key=lambda i: "color" not in inc[i])  # coloured items first
    for i in order:
        req = inc[i]
        want = f"{req.get('color', '') + ' ' if 'color' in req else ''}{req['class']}"
        cand = [j for j, o in enumerate(objects) if j not in used and o["class"] == req["class"]
                and ("color" not in req or o["color"] == req["color"])]
        if len(cand) < req["count"]:
            reasons.append(f"expected {want}>={req['count']}, found {len(cand)}")
            continue
        groups[i] = cand[:req["count"]]
        used.update(groups[i])
    for i, req in enumerate(inc):
        if "position" not in req or groups[i] is None:
            continue
        rel, j = req["position"]
        if groups[j] is None:
            reasons.append(f"no target for {req['class']} to be {rel}")
            continue
        for a in groups[i]:
            for b in groups[j]:
                if rel not in relative_position(objects[a]["bbox"], objects[b]["bbox"]):
                    reasons.append(f"expected {_name(objects[a])} {rel} {_name(objects[b])}")
    for req in meta.get("exclude", []):
        n = sum(o["class"] == req["class"] and ("color" not in req or o["color"] == req["color"])
                for o in objects)
        if n >= req["count"]:
            reasons.append(f"expected {req['class']}<{req['count']}, found {n}")
    extra = [_name(objects[j]) for j in range(len(objects)) if j not in used]
    if strict and extra:
        reasons.append("objects not named by the prompt: " + ", ".join(extra))
    return not reasons, reasons


def judge(image, meta, strict=False):
    """True iff the image satisfies the metadata row (GenEval's rules; strict: and no unnamed objects)."""
    return evaluate(image, meta, strict=strict)[0]


def explain(image, meta, strict=False):
    """One line: 'ok' or why the image fails, followed by what was detected."""
    objects = inspect(image)
    ok, reasons = evaluate(image, meta, objects, strict)
    seen = "; ".join(_name(o) for o in objects) or "nothing"
    return ("ok" if ok else "fail: " + "; ".join(reasons)) + f" [detected: {seen}]"


def in_world(meta):
    """True when GenEval metadata speaks only of this world's shapes and colours, so the oracle can judge it."""
    if not meta or not meta.get("include"):
        return False
    items = list(meta.get("include", [])) + list(meta.get("exclude", []))
    return all(o.get("class") in SHAPES and o.get("color", COLORS[0]) in COLORS for o in items)
