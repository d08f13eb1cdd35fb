"""The Ray Data verdict pipeline through Serve: exactly P x N ledger rows, equal to the local backend's,
preference data that follows the verdicts, idempotent re-runs, and a replica killed mid-round."""

import json
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from gapray.cli import main
from gapray.config import MeasureConfig, load_config
from gapray.data.ledger import VerdictLedger
from gapray.backends.ray import run_round
from gapray.data.schemas import LEDGER_SCHEMA
from gapray.selfjudge import sample_and_score, summarize
from gapray.models import SamplingParams
from gapray.prompts import load_prompts
from gapray.serve.judge import judge_spec
from gapray.serve.server import deploy, free_port, replica_actor_names
from gapray.verdict import to_verdict

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "conf/prompts/geneval_sample.jsonl"
APP, K, SEED = "gapray-data-test", 4, 7
key = lambda r: (r["prompt_id"], r["sample_idx"])


@pytest.fixture(scope="module")
def prompts():
    return load_prompts(SAMPLE)


@pytest.fixture(scope="module")
def local(tiny, prompts):
    """The local backend's rows for the same seeds, and a threshold that splits them near the median.

    The random tiny model's p_aligned values sit close together; the threshold goes in the widest gap of
    the middle half, far from any value, so that float noise between backends cannot flip a verdict and
    the round has accepted and rejected images, prompts with pairs and prompts in the discard pool.
    """
    from gapray.judges.oracle import OracleJudge  # the external judge the Ray path builds from config (judge.kind)

    rows = sample_and_score(tiny, prompts, K, SamplingParams(), SEED, judge=OracleJudge())
    ps = sorted(r["p_aligned"] for r in rows)
    mid = range(len(ps) // 4, 3 * len(ps) // 4)
    i = max(mid, key=lambda i: ps[i + 1] - ps[i])
    threshold = (ps[i] + ps[i + 1]) / 2
    for r in rows:
        r["verdict"] = to_verdict(r["p_aligned"], threshold)
    return sorted(rows, key=key), threshold


def make_cfg(tiny_dir, threshold, *extra):
    return load_config(MeasureConfig, None, [
        f"model={tiny_dir}", f"images_per_prompt={K}", f"seed={SEED}", "batch_prompts=2",
        f"scoring.threshold={threshold}", f"serve.app_name={APP}", "serve.route_prefix=null",
        f"serve.http_port={free_port()}", "serve.max_batch_size=16", "data.ref_logprobs=true", "data.concurrency=1", *extra])


@pytest.fixture(scope="module")
def app(ray_cluster, tiny_dir, local):
    from ray import serve

    cfg = make_cfg(tiny_dir, local[1])
    deploy(cfg.model, cfg.serve, route_prefix=None, judge=judge_spec(cfg))
    yield cfg
    serve.delete(APP)


def files(root: Path) -> dict:
    return {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in root.rglob("*") if p.is_file()}


def test_round_is_exact_and_equals_the_local_backend(app, local, prompts, tiny, tmp_path):
    cfg, (want, _) = app, local
    summary = run_round(cfg, prompts, tmp_path, round=0)
    ledger = VerdictLedger(tmp_path / "ledger")
    table = ledger.read(0)
    assert table.schema.equals(LEDGER_SCHEMA)
    got = sorted(table.to_pylist(), key=key)
    assert len(got) == len(prompts) * K == summary["rows"] == summary["new_rows"]
    assert [key(r) for r in got] == sorted((p.prompt_id, j) for p in prompts for j in range(K))
    assert {r["round"] for r in got} == {0} and {r["policy_version"] for r in got} == {0}
    # the same images and verdicts as the single-process path
    for g, w in zip(got, want):
        assert g["image_tokens"] == w["image_tokens"] and g["seed"] == w["seed"]
        assert g["p_aligned"] == pytest.approx(w["p_aligned"], rel=1e-5)
        assert g["logprob"] == pytest.approx(w["logprob"], rel=1e-6)
        assert (g["verdict"], g["oracle_verdict"], g["answer"]) == (w["verdict"], w["oracle_verdict"], w["answer"])

    data = tmp_path / "data/round=0"
    sft = pq.read_table(data / "sft.parquet").to_pylist()
    dpo = {r["prompt_id"]: r for r in pq.read_table(data / "dpo.parquet").to_pylist()}
    discard = pq.read_table(data / "discard.parquet").to_pylist()
    by_prompt = {p.prompt_id: [r for r in got if r["prompt_id"] == p.prompt_id] for p in prompts}
    tokens = {key(r): r["image_tokens"] for r in got}
    # SFT: every accepted image (Algorithm 1)
    assert sorted(key(r) for r in sft) == sorted(key(r) for r in got if r["verdict"] == 1)
    assert all(r["image_tokens"] == tokens[key(r)] for r in sft)
    # DPO: one pair per prompt with both verdicts, most confident accepted vs least confident rejected
    both = {pid for pid, rs in by_prompt.items() if {r["verdict"] for r in rs} == {0, 1}}
    assert set(dpo) == both
    for pid, pair in dpo.items():
        acc = [r for r in by_prompt[pid] if r["verdict"] == 1]
        rej = [r for r in by_prompt[pid] if r["verdict"] == 0]
        best, worst = max(acc, key=lambda r: r["p_aligned"]), min(rej, key=lambda r: r["p_aligned"])
        assert (pair["chosen_p"], pair["rejected_p"]) == (best["p_aligned"], worst["p_aligned"])
        assert pair["chosen_tokens"] == best["image_tokens"] and pair["rejected_tokens"] == worst["image_tokens"]
        # reference log-probs from the replicas, in the same pass: the model's conditional log-probs
        with torch.no_grad():
            ref = tiny.image_logprobs([pair["prompt"]] * 2, torch.tensor([pair["chosen_tokens"], pair["rejected_tokens"]]),
                                      sampling=None).sum(-1).tolist()
        np.testing.assert_allclose([pair["ref_chosen_logp"], pair["ref_rejected_logp"]], ref, rtol=1e-4)
    # discard pool: prompts with no accepted image
    assert sorted(r["prompt_id"] for r in discard) == sorted(
        pid for pid, rs in by_prompt.items() if not any(r["verdict"] == 1 for r in rs))
    assert dpo and discard and len(sft) < len(got)  # the threshold made a real mix
    assert (summary["sft"], summary["dpo"], summary["discard"]) == (len(sft), len(dpo), len(discard))

    # the same round again: no work, no file written or touched
    before = files(tmp_path)
    again = run_round(cfg, prompts, tmp_path, round=0)
    assert again["new_rows"] == 0 and again["rows"] == len(prompts) * K and ledger.count(0) == len(got)
    assert files(tmp_path) == before


def test_killed_replica_is_replaced_and_the_round_is_exact(app, local, prompts, tmp_path):
    import ray

    cfg = make_cfg(app.model.path, local[1], "batch_prompts=1", "data.ref_logprobs=false")
    ledger = VerdictLedger(tmp_path / "ledger")
    result, errors = {}, []

    def work():
        try:
            result.update(run_round(cfg, prompts, tmp_path, round=1))
        except BaseException as e:  # surfaced below
            errors.append(e)

    thread = threading.Thread(target=work)
    thread.start()
    deadline = time.monotonic() + 240
    while ledger.count(1) == 0 and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    at_kill, alive = ledger.count(1), thread.is_alive()
    victims = replica_actor_names(APP)
    ray.kill(ray.get_actor(victims[0], namespace="serve"), no_restart=True)
    thread.join(timeout=300)
    assert not thread.is_alive() and not errors, errors
    assert alive and 0 < at_kill < len(prompts) * K, "the kill did not land in the middle of the round"
    assert result["rows"] == ledger.count(1) == len(prompts) * K
    rows = sorted(ledger.read(1).to_pylist(), key=key)
    assert [key(r) for r in rows] == sorted((p.prompt_id, j) for p in prompts for j in range(K))
    # a replacement replica serves the rest, with the same policy and therefore the same images
    assert replica_actor_names(APP) and victims[0] not in replica_actor_names(APP)
    assert [r["image_tokens"] for r in rows] == [r["image_tokens"] for r in local[0]]
    assert {r["policy_version"] for r in rows} == {0}


def test_replicas_reencode_in_slices_in_order(app, local, tiny):
    """serve_reencode: 10 images in calls of 3 (the last one short) come back in order, equal to the
    model's own re-encoding, i.e. what the local backend writes into training rows."""
    from gapray.backends.ray import serve_reencode

    tokens = [r["image_tokens"] for r in local[0][:10]]
    got = serve_reencode(APP, retries=0, images_per_call=3)(tokens)
    assert got == tiny.reencode(torch.tensor(tokens)).tolist() and got != tokens


def test_measure_backend_ray_equals_backend_local(ray_cluster, tiny, tiny_dir, local, tmp_path, monkeypatch):
    import gapray.measure
    from gapray.report import write_verdict_grids

    # the Serve replicas hold the model; the driver must not load it (a Janus-Pro-7B need not fit there)
    monkeypatch.setattr(gapray.measure, "load_model", lambda cfg: pytest.fail("backend=ray loaded the model"))
    # replicas sized by their memory (serve.max_batch_size=null): the blocks grow to keep them fed
    import gapray.backends.ray as ray_backend

    blocks = []
    real = ray_backend.prompts_per_block
    monkeypatch.setattr(ray_backend, "prompts_per_block", lambda *a: blocks.append((a, real(*a))) or blocks[-1][1])
    want, threshold = local
    rc = main(["measure", f"model={tiny_dir}", f"prompts={SAMPLE}", f"images_per_prompt={K}", f"seed={SEED}",
               "batch_prompts=3", f"scoring.threshold={threshold}", "backend=ray", f"run_dir={tmp_path}",
               "serve.max_batch_size=null", f"serve.http_port={free_port()}", "data.concurrency=1"])
    assert rc == 0
    [((batch, tasks, k, replicas, replica_images), per_block)] = blocks
    assert (batch, tasks, k, replicas) == (3, 1, K, 1) and replica_images > 1000  # a CPU's free memory: many rows
    assert per_block == -(-2 * replica_images // K)
    summary = json.loads((tmp_path / "summary.json").read_text())
    expected = summarize(want)  # what backend=local reports for these seeds
    assert {k: summary[k] for k in expected} == expected
    got = sorted(pq.read_table(tmp_path / "verdicts.parquet").to_pylist(), key=key)
    assert [r["image_tokens"] for r in got] == [r["image_tokens"] for r in want]
    np.testing.assert_allclose([r["p_aligned"] for r in got], [r["p_aligned"] for r in want], rtol=1e-5)
    # the grids, decoded by a replica, are the pictures the model's own decode gives
    ours = write_verdict_grids(tiny.decode, pq.read_table(tmp_path / "verdicts.parquet").to_pylist(),
                               tmp_path / "local_grids", MeasureConfig.grid_prompts)
    assert ours and [p.read_bytes() for p in ours] == [(tmp_path / "grids" / p.name).read_bytes() for p in ours]


def test_blocks_keep_twice_what_the_replicas_batch_in_flight():
    from gapray.backends.ray import prompts_per_block

    # 4 replicas x 241 guided images (483 rows: Janus-Pro-1B on 80 GB), 2 tasks, 10 images a prompt: 97 prompts a
    # block, 1940 images in flight for 964 batched at once
    assert prompts_per_block(8, 2, 10, 4, 241) == 97
    assert prompts_per_block(8, 2, 10, 1, 8) == 8  # never below batch_prompts


def test_measure_backend_ray_with_a_vlm_judge_equals_backend_local(ray_cluster, tiny_dir, tmp_path):
    """judge.kind=vlm on the Ray path: a JudgeServer app holds the judge (loaded by path) and judges the pixels the
    policy replicas decode, inside their self_judge call; the rows' judge columns are the local backend's."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from test_vlm_judge import make_judge

    judge = make_judge("idefics3", seed=0)
    judge.model.save_pretrained(tmp_path / "judge")
    judge.processor.save_pretrained(tmp_path / "judge")
    # judge.batch_size=2: a policy batch of 6 images calls the judge with more than one judge batch (Serve refused
    # such a call as one item: "Size of item is greater than max_batch_size"); the JudgeServer cuts it up
    args = [f"model={tiny_dir}", f"prompts={SAMPLE}", "max_prompts=3", "images_per_prompt=2", f"seed={SEED}",
            "batch_prompts=3", f"judge.model={tmp_path / 'judge'}", "judge.dtype=float32", "judge.device=cpu",
            "judge.batch_size=2"]
    assert main(["measure", *args, f"run_dir={tmp_path / 'local'}"]) == 0
    assert main(["measure", *args, f"run_dir={tmp_path / 'ray'}", "backend=ray", "serve.max_batch_size=8",
                 f"serve.http_port={free_port()}", "data.concurrency=1", "judge.autoscaling_config.min_replicas=1",
                 "judge.autoscaling_config.max_replicas=2"]) == 0
    # ... through a JudgeServer deployed with Serve's autoscaling (1-2 replicas), not a fixed count
    from gapray.serve.judge import judge_replicas

    assert judge_replicas({"num_replicas": 3, "autoscaling_config": {"min_replicas": 1, "max_replicas": 2,
                                                                     "initial_replicas": None}}) == \
        {"autoscaling_config": {"min_replicas": 1, "max_replicas": 2}}
    assert judge_replicas({"num_replicas": 3, "autoscaling_config": None}) == {"num_replicas": 3}
    want, got = (sorted(pq.read_table(tmp_path / d / "verdicts.parquet").to_pylist(), key=key) for d in ("local", "ray"))
    assert len(got) == 6 and [r["image_tokens"] for r in got] == [r["image_tokens"] for r in want]
    assert {r["judge_model"] for r in got} == {str(tmp_path / "judge")}
    np.testing.assert_allclose([r["judge_p"] for r in got], [r["judge_p"] for r in want], atol=1e-5)
    assert [r["oracle_verdict"] for r in got] == [r["oracle_verdict"] for r in want]
    assert json.loads((tmp_path / "ray" / "summary.json").read_text())["judge_model"] == str(tmp_path / "judge")
