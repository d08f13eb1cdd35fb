import math

import pytest

from gapray.metrics import non_unification, rate, wilson_interval
from gapray.verdict import VERDICT_QUESTION, parse_answer, to_verdict, verdict_question


def test_question_is_the_papers_verbatim():
    q = verdict_question("a photo of a red circle")
    assert q.startswith("You are a helpful language and vision assistant. You are able to understand the visual")
    assert "Does this image describe a photo of a red circle? If it describes the scene, score 1; if it does " \
           "not fully describe, score 0. Please answer in the following format: The score is {your score}." in q
    assert "{prompt}" in VERDICT_QUESTION


@pytest.mark.parametrize("text,expected", [
    ("The score is 1.", 1.0), ("The score is 0.", 0.0), ("Looking closely... The score is 1", 1.0),
    ("the score is: 0", 0.0), ("The score is {1}.", 1.0), ("Yes, it shows a dog.", 1.0), ("No.", 0.0),
    ("The score is 10.", math.nan), ("The score is 0.5", math.nan), ("The score is {your score}.", math.nan),
    ("I think it might", math.nan), ("", math.nan), ("Nobody knows", math.nan),
])
def test_parse_answer(text, expected):
    got = parse_answer(text)
    assert (math.isnan(got) and math.isnan(expected)) or got == expected


def test_verdict_threshold_and_unparsed():
    assert to_verdict(0.5) == 1 and to_verdict(0.49) == 0 and to_verdict(0.7, threshold=0.8) == 0
    assert to_verdict(math.nan) is None


def test_wilson_interval_known_values():
    lo, hi = wilson_interval(5, 10)  # textbook: 0.2366, 0.7634
    assert lo == pytest.approx(0.2366, abs=1e-4) and hi == pytest.approx(0.7634, abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    lo, hi = wilson_interval(0, 20)
    assert lo == 0.0 and hi == pytest.approx(0.1611, abs=1e-4)


def test_non_unification_counts_unparsed_apart():
    nu = non_unification([1, 0, 0, None, 1, None])
    assert nu["value"] == 0.5 and nu["k"] == 2 and nu["n"] == 4 and nu["unparsed"] == 2
    assert rate(0, 0)["value"] is None


def test_oracle_figures_by_hand():
    from gapray.metrics import oracle_figures

    rows = [  # (self verdict, oracle verdict)
        {"verdict": 1, "oracle_verdict": 1}, {"verdict": 1, "oracle_verdict": 0}, {"verdict": 0, "oracle_verdict": 0},
        {"verdict": 0, "oracle_verdict": 0}, {"verdict": 0, "oracle_verdict": 1}, {"verdict": None, "oracle_verdict": 1},
        {"verdict": 1, "oracle_verdict": None},
    ]
    f = oracle_figures(rows)
    assert (f["generation_accuracy"]["k"], f["generation_accuracy"]["n"]) == (3, 6)
    assert (f["understanding_accuracy"]["k"], f["understanding_accuracy"]["n"]) == (3, 5)
    assert (f["weak_generation_rate"]["k"], f["weak_generation_rate"]["n"]) == (2, 3)
    assert (f["false_acceptance_rate"]["k"], f["false_acceptance_rate"]["n"]) == (1, 2)


def test_geneval_score_is_the_mean_over_tasks_not_over_images():
    from gapray.metrics import by_task, geneval_score, oracle_figures

    # task a: 3 of 4 images right, task b: 0 of 1, task c: no judged image (left out)
    rows = [{"task": "a", "verdict": 1, "oracle_verdict": v} for v in (1, 1, 1, 0)]
    rows += [{"task": "b", "verdict": 0, "oracle_verdict": 0}, {"task": "c", "verdict": 1, "oracle_verdict": None}]
    figures = by_task(rows, oracle_figures)
    assert figures["overall"]["generation_accuracy"]["value"] == 3 / 5
    assert geneval_score(figures["per_task"]) == {"value": (3 / 4 + 0 / 1) / 2, "n_tasks": 2}
