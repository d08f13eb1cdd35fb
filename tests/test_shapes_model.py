"""The shipped shapes-world model and the issue's four criteria for the embedded default.

Measured exactly as a user would: `gapray measure model=shapes` on the held-out eval split, 8 images per
prompt, default sampling (CFG 5, temperature 1), seed 0. The checkpoint and the seeds are fixed, so the
figures are deterministic on a given torch build; the thresholds are the issue's, not tuned values.
Criteria the shipped model does not meet yet are marked xfail(strict=True) with the measured figure: they
fail loudly (XPASS) the day a better checkpoint meets them, and nobody mistakes them for passing.
"""

import json
from pathlib import Path

import pytest

from gapray.cli import main
from gapray.config import SHIPPED_MODELS

EVAL = Path(__file__).resolve().parent.parent / "gapray/world/data/eval.jsonl"
NOT_MET = "the shipped checkpoint does not meet this yet (README, 'The shapes world'): measured {}"


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


def test_non_unification_at_least_15_percent(summary):
    assert summary["non_unification"] >= 0.15, summary["overall"]


def test_the_gap_is_weak_generation(summary):
    assert overall(summary, "weak_generation_rate") >= 0.70


@pytest.mark.xfail(strict=True, reason=NOT_MET.format("5.4% on the eval split (26.5% on the train split)"))
def test_generation_has_room_to_improve(summary):
    assert 0.25 <= overall(summary, "generation_accuracy") <= 0.75


def test_geneval_score_weighs_tasks_not_images(summary):
    """The eval split's tasks differ in size (color_attr: 56% of the images), so GenEval's overall (the mean
    of the per-task accuracies) and the share of images must differ here; this is the measure on which the
    two definitions can be told apart."""
    tasks = summary["oracle"]["per_task"].values()
    mean_of_tasks = sum(t["generation_accuracy"]["value"] for t in tasks) / len(tasks)
    assert summary["oracle"]["geneval_score"] == {"value": pytest.approx(mean_of_tasks), "n_tasks": 6}
    assert abs(mean_of_tasks - overall(summary, "generation_accuracy")) > 0.05


@pytest.mark.xfail(strict=True, reason=NOT_MET.format("15.9% (the mean of the six tasks' accuracies)"))
def test_geneval_score_has_room_to_improve(summary):
    """GenEval's own overall (the mean over tasks): color_attr, 56% of the eval images, weighs one sixth."""
    assert 0.25 <= summary["oracle"]["geneval_score"]["value"] <= 0.75


@pytest.mark.xfail(strict=True, reason=NOT_MET.format("67.6%"))
def test_understanding_judges_its_own_generations(summary):
    assert overall(summary, "understanding_accuracy") >= 0.85
