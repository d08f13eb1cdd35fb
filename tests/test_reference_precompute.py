"""data.ref_logprobs: DPO pairs carry the reference log-probs of the policy that drew them, computed while the
pairs are built, so that training holds no frozen second model (the Janus-Pro-7B presets turn it on). Before,
the driver ignored the key: the columns stayed empty and the trainer silently kept its reference copy."""

import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parent.parent
ARGS = ["model=tiny", "backend=local", "train.backend=local", "max_prompts=6", "images_per_prompt=4",
        "max_eval_prompts=2", "eval_images_per_prompt=1", "train.epochs=1", "train.micro_batch_size=1",
        "batch_prompts=6", "gate.min_precision=0", "mode=dpo", "data.ref_logprobs=true",
        "scoring.threshold=0.529"]  # the random tiny model's p_aligned sit around 0.529: about half accepted


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory):
    sys.path.insert(0, str(REPO / "jobs"))
    from self_improve import main

    run_dir = tmp_path_factory.mktemp("ref") / "run"
    assert main(ARGS + [f"run_dir={run_dir}"]) == 0
    return run_dir


def test_pairs_carry_the_starting_policys_reference_logprobs(dpo_run):
    from gapray.models.loading import load_model
    from gapray.models.base import conditional_logprobs

    pairs = pq.read_table(dpo_run / "data" / "round=0" / "dpo.parquet").to_pylist()
    assert pairs, "the tiny model produced no DPO pair"
    assert all(p["ref_chosen_logp"] is not None and p["ref_rejected_logp"] is not None for p in pairs)
    cfg = OmegaConf.load(dpo_run / "config.yaml")
    base = load_model(cfg.model)  # round 0's DPO starts from the base model: it is the reference
    prompts = [p["prompt"] for p in pairs]
    chosen = conditional_logprobs(base, prompts, [p["chosen_tokens"] for p in pairs])
    rejected = conditional_logprobs(base, prompts, [p["rejected_tokens"] for p in pairs])
    np.testing.assert_allclose([p["ref_chosen_logp"] for p in pairs], chosen, rtol=0, atol=1e-3)
    np.testing.assert_allclose([p["ref_rejected_logp"] for p in pairs], rejected, rtol=0, atol=1e-3)


def test_training_uses_the_stored_reference(dpo_run):
    import json

    from gapray.config import TrainConfig

    state = json.loads((dpo_run / "state.json").read_text())
    assert state["rounds"]["0"]["train_a"]["reference"] == "data"  # the driver trained on them, no frozen copy
    from gapray.train.loop import plan_run

    cfg = OmegaConf.merge(OmegaConf.structured(TrainConfig),
                          {"data": str(dpo_run / "data" / "round=0"), "objective": "dpo", "run_dir": str(dpo_run / "x"),
                           "backend": "local", "micro_batch_size": 1})
    plan = plan_run(cfg)
    assert plan.reference == "data" and "ref_chosen_logp" in plan.columns
