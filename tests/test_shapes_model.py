"""The shipped shapes-world model against the issue's targets for the embedded default (World 2).

Measured exactly as a user would: `gapray measure model=shapes` on the held-out eval split, 8 images per
prompt, default sampling (CFG 5, temperature 1), seed 0. The checkpoint and the seeds are fixed, so the
figures are deterministic on a given torch build; the thresholds are the issue's, not tuned values.
Targets the shipped model does not meet yet are marked xfail(strict=True) with the measured figure: they
fail loudly (XPASS) the day a better checkpoint meets them, and nobody mistakes them for passing.
"""

import json
from pathlib import Path

import pytest

from gapray.cli import main
from gapray.config import SHIPPED_MODELS

EVAL = Path(__file__).resolve().parent.parent / "gapray/world/data/eval.jsonl"
NOT_MET = "the shipped checkpoint does not meet this yet (README, 'The shapes world'): measured {}"
# The shipped checkpoint's figures for the targets it misses (README's table; 992 images): the xfail reasons.
MEASURED = {
    "generation_accuracy": "11.8% (117/992)",
    "understanding_balanced_accuracy": "66.5% (accepts 51 of 117 right images, rejects 783 of 875 wrong ones)",
    "accepted_precision": "0.36 (51 of 143 accepted images right)",
}


@pytest.fixture(scope="module")
def summary(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("shapes") / "eval"
    assert main(["measure", "model=shapes", f"prompts={EVAL}", "images_per_prompt=8", "seed=0",
                 f"run_dir={run_dir}"]) == 0
    return json.loads((run_dir / "summary.json").read_text())


def overall(summary, name):
    return summary["oracle"]["overall"][name]["value"]


def test_checkpoint_ships_small_and_loads_as_a_save_pretrained_dir():
    path = SHIPPED_MODELS["shapes"]
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()
    assert sum(f.stat().st_size for f in path.iterdir()) <= 20 * 2**20


def test_the_whole_eval_split_is_measured(summary):
    n_prompts = sum(1 for line in EVAL.read_text().splitlines() if line.strip())
    assert summary["n_prompts"] == n_prompts and summary["n_images"] == 8 * n_prompts
    assert set(summary["oracle"]["per_task"]) == {"single_object", "two_object", "counting", "colors", "position",
                                                  "color_attr"}


# The targets (World 2), on the eval split; a target the shipped checkpoint misses is a strict xfail
# carrying its measured figure (MEASURED).
TARGETS = {
    "generation_accuracy": (0.20, 0.50),  # Gen., the share of images the oracle accepts
    "geneval_score": (0.20, 0.50),  # GenEval's overall: the mean of the per-task accuracies
    "understanding_balanced_accuracy": (0.90, 1.0),  # on its own images: a reject-everything judge scores 0.5
    "accepted_precision": (0.80, 1.0),  # of the images it accepts: what its SFT data would be
    "non_unification": (0.30, 1.0),
    "weak_generation_rate": (0.80, 1.0),
}


def figure(summary, name):
    if name == "geneval_score":
        return summary["oracle"]["geneval_score"]["value"]
    if name == "accepted_precision":
        fa = overall(summary, "false_acceptance_rate")
        return None if fa is None else 1 - fa
    if name == "non_unification":
        return summary["non_unification"]
    return overall(summary, name)


def target(name):
    lo, hi = TARGETS[name]
    marks = [] if name not in MEASURED else [pytest.mark.xfail(strict=True, reason=NOT_MET.format(MEASURED[name]))]
    return pytest.param(name, lo, hi, marks=marks, id=name)


@pytest.mark.parametrize("name,lo,hi", [target(n) for n in TARGETS])
def test_target_on_the_eval_split(summary, name, lo, hi):
    value = figure(summary, name)
    assert value is not None and lo <= value <= hi, (name, value)


def test_geneval_score_weighs_tasks_not_images(summary):
    """The eval split's tasks differ in size (position and color_attr: 77% of the prompts), so GenEval's overall
    (the mean of the per-task accuracies) is recomputed here from the per-task figures, not the share of images."""
    tasks = summary["oracle"]["per_task"].values()
    mean_of_tasks = sum(t["generation_accuracy"]["value"] for t in tasks) / len(tasks)
    assert summary["oracle"]["geneval_score"] == {"value": pytest.approx(mean_of_tasks), "n_tasks": 6}
