"""The paper's measurements as plain functions over verdict rows (PAPER.md, "Metrics").

- non-unification: share of a model's own generations that its own understanding rejects;
- weak-generation rate: P(external judge rejects | model rejects);
- generation accuracy: share of generations the external judge accepts, per task and over all images;
- GenEval score: GenEval's own "Gen." overall, the mean over tasks of each task's generation accuracy;
- understanding accuracy: share of the model's verdicts on its own images that agree with the judge;
- understanding win rate: on the base model's images, where the base and the improved model disagree,
  the share where the improved model agrees with the judge (the base model scores 50 by definition);
Every rate comes with its count and a 95% Wilson interval: denominators can be small.
"""

from __future__ import annotations

import math
from collections import defaultdict


def wilson_interval(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, center - half), min(1.0, center + half))


def rate(k: int, n: int) -> dict:
    return {"value": k / n if n else None, "k": k, "n": n, "ci95": list(wilson_interval(k, n))}


def non_unification(verdicts: list[int | None]) -> dict:
    """Rejected share among parsed verdicts; unparsed answers (None) are counted apart."""
    parsed = [v for v in verdicts if v is not None]
    out = rate(sum(1 for v in parsed if v == 0), len(parsed))
    out["unparsed"] = len(verdicts) - len(parsed)
    return out


def by_task(rows: list[dict], fn, key: str = "task") -> dict:
    """Apply `fn(rows)` overall and per task: {"overall": ..., "per_task": {task: ...}}."""
    groups = defaultdict(list)
    for r in rows:
        groups[r[key]].append(r)
    return {"overall": fn(rows), "per_task": {t: fn(g) for t, g in sorted(groups.items())}}


def oracle_figures(rows: list[dict]) -> dict:
    """Figures that need an external judge; rows without an oracle verdict or with an unparsed self-verdict
    are left out of the pairs that need both."""
    judged = [r for r in rows if r.get("oracle_verdict") is not None]
    both = [r for r in judged if r["verdict"] is not None]
    self_rejected = [r for r in both if r["verdict"] == 0]
    self_accepted = [r for r in both if r["verdict"] == 1]
    tpr = rate(sum(r["verdict"] == 1 for r in both if r["oracle_verdict"] == 1), sum(r["oracle_verdict"] == 1 for r in both))
    tnr = rate(sum(r["verdict"] == 0 for r in both if r["oracle_verdict"] == 0), sum(r["oracle_verdict"] == 0 for r in both))
    return {
        "generation_accuracy": rate(sum(r["oracle_verdict"] == 1 for r in judged), len(judged)),
        "understanding_accuracy": rate(sum(r["verdict"] == r["oracle_verdict"] for r in both), len(both)),
        "weak_generation_rate": rate(sum(r["oracle_verdict"] == 0 for r in self_rejected), len(self_rejected)),
        "false_acceptance_rate": rate(sum(r["oracle_verdict"] == 0 for r in self_accepted), len(self_accepted)),
        # accuracy that a judge which rejects (or accepts) everything cannot game: the mean of the rates at
        # which it accepts the right images and rejects the wrong ones (None when either class is absent)
        "understanding_balanced_accuracy": {
            "value": (tpr["value"] + tnr["value"]) / 2 if tpr["n"] and tnr["n"] else None,
            "true_acceptance": tpr, "true_rejection": tnr},
    }


def geneval_score(per_task: dict) -> dict:
    """GenEval's overall score from `by_task(rows, oracle_figures)["per_task"]`: the unweighted mean over
    tasks of each task's image accuracy (GenEval's evaluation/summary_scores.py), so a task with many
    prompts counts no more than one with few. The image-weighted share is `generation_accuracy` overall;
    the two differ whenever the tasks differ in size. Tasks with no judged image are left out."""
    accs = {t: f["generation_accuracy"]["value"] for t, f in per_task.items()
            if f["generation_accuracy"]["value"] is not None}
    return {"value": sum(accs.values()) / len(accs) if accs else None, "n_tasks": len(accs)}


def win_rate(rows: list[dict]) -> dict:
    """Understanding win rate (PAPER.md, co-improvement). Rows: one per base-model image with `base_verdict`
    (the base model's), `verdict` (the improved model's, on the same image) and `oracle_verdict`.

    Among images both judged (parsed, judge known) and on which the two models disagree, the share where
    the improved verdict is the judge's. `fixed_false_accepts` counts wins that reject an image the base
    wrongly accepted; `fixed_false_rejects` wins that accept an image the base wrongly rejected."""
    known = [r for r in rows if None not in (r["base_verdict"], r["verdict"], r.get("oracle_verdict"))]
    differ = [r for r in known if r["base_verdict"] != r["verdict"]]
    wins = [r for r in differ if r["verdict"] == r["oracle_verdict"]]
    out = rate(len(wins), len(differ))
    out["fixed_false_accepts"] = sum(r["verdict"] == 0 for r in wins)
    out["fixed_false_rejects"] = sum(r["verdict"] == 1 for r in wins)
    return out
