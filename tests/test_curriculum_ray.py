"""The self-improvement job on Ray (CPU, 127.0.0.1 only): `ray job submit` to a local `ray start --head`, its
status and custom metrics read through the dashboard's APIs, and a chaos run (kill -9 of a Serve replica, a
Ray Train worker and the driver, at seeded phases) that, resubmitted, finishes with exactly the ledger, data,
weights and summary of the uninterrupted submitted run."""

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import free_ports
from gapray.data.ledger import VerdictLedger

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
# 8 prompts x 4 images: up to 16 optimizer steps per epoch (2 workers x 1 row), a checkpoint every 4 steps, so
# that training is still running when the chaos test kills a worker after the first one (fewer checkpoints: each
# is a DeepSpeed save and a Ray Train report barrier).
SETTING = ["model=tiny", "mode=c-sft", "max_prompts=8", "images_per_prompt=4", "max_eval_prompts=3",
           "eval_images_per_prompt=2", "train.epochs=2", "train.micro_batch_size=1", "train.checkpoint.every_n_steps=4",
           "train.checkpoint.num_to_keep=null", "gate.min_precision=0", "batch_prompts=4", "data.concurrency=1",
           "serve.route_prefix=null",
           # a CPU rehearsal of a GPU cluster's scheduling: the head has 2 logical GPUs, the replica reserves 1 and
           # each of the 2 training workers 1, so training schedules only because the driver deletes the Serve
           # app first (serve.release_for_training=auto; issue 15: a trainer beside a GPU replica never started)
           "serve.num_gpus=1", "train.scaling.gpus_per_worker=1"]


TOKEN = secrets.token_hex(32)  # Ray 2.60 turns token authentication on for new clusters: the head uses this one


def get_json(url: str):
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(request, timeout=10) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def head():
    """`ray start --head --block` on 127.0.0.1 with its dashboard and metrics endpoints; stopped by ending that
    process (never `ray stop`, which would also stop the test session's own Ray)."""
    gcs, dash, metrics, agent, agent_grpc, renv = free_ports(6)
    temp = tempfile.mkdtemp(prefix="gh", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "HF_HUB_OFFLINE": "1",
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": TOKEN,  # the head, and `ray job submit` authenticating to it
           "PATH": f"{BIN}:{os.environ['PATH']}",  # the job's `python` is this environment's
           "RAY_metrics_report_interval_ms": "1000"}
    proc = subprocess.Popen([str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
                             f"--port={gcs}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
                             f"--metrics-export-port={metrics}", f"--dashboard-agent-listen-port={agent}",
                             f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={renv}",
                             "--num-cpus=6", "--num-gpus=2", f"--temp-dir={temp}", "--disable-usage-stats",
                             '--resources={"gapray_train": 2}'],  # a training node, as cluster/'s advertise
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    for _ in range(120):
        try:
            get_json(f"{url}/api/version")
            break
        except OSError:
            time.sleep(1)
    else:
        proc.kill()
        pytest.fail("the local Ray head's dashboard did not come up")
    yield {"url": url, "metrics": f"http://127.0.0.1:{metrics}/metrics", "env": env}
    proc.terminate()  # `ray start --block` drains the node and stops the processes it started
    try:
        proc.wait(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
    shutil.rmtree(temp, ignore_errors=True)


def submit(head, run_dir: Path, setting: list[str] = SETTING) -> str:
    out = subprocess.run([str(BIN / "ray"), "job", "submit", "--address", head["url"], "--working-dir", ".",
                          "--no-wait", "--", "python", "jobs/self_improve.py", *setting, f"run_dir={run_dir}"],
                         cwd=REPO, env=head["env"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return re.search(r"raysubmit_\w+", out.stdout + out.stderr).group(0)


def wait(head, job_id: str, until=None, timeout: float = 900, scrape_after_s: float = 0) -> dict:
    """Poll the job's status (and the metrics endpoint, once a second) until it ends or `until()` holds; then
    go on scraping for `scrape_after_s` (what a scraper sees of the run's last values)."""
    statuses, samples = [], []
    deadline, ended = time.time() + timeout, None
    while time.time() < deadline:
        if ended is None:
            status = get_json(f"{head['url']}/api/jobs/{job_id}")["status"]
            statuses.append(status)
            if until is not None and until():
                break
        if until is None:
            try:
                with urllib.request.urlopen(head["metrics"], timeout=10) as r:
                    samples.append((time.time(), r.read().decode()))
            except OSError:
                pass
        if ended is None and status in ("SUCCEEDED", "FAILED", "STOPPED"):
            ended = time.time()
        if ended is not None and time.time() >= ended + scrape_after_s:
            break
        time.sleep(0.2 if until is not None else 1.0)
    logs = get_json(f"{head['url']}/api/jobs/{job_id}/logs")["logs"]
    return {"statuses": statuses, "metrics": [text for _, text in samples], "samples": samples, "logs": logs}


@pytest.fixture(scope="module")
def submitted(head, tmp_path_factory):
    """`ray job submit` of self_improve, watched through the dashboard's job API and the metrics endpoint; while it
    runs, a second submission of the same run_dir (another job: another driver process)."""
    import threading

    run_dir = tmp_path_factory.mktemp("submitted") / "run"
    first, second = submit(head, run_dir), {}

    def submit_again():
        deadline = time.time() + 600
        while not (run_dir / "state.json").exists() and time.time() < deadline:  # the first driver is running
            time.sleep(0.5)
        second.update(wait(head, submit(head, run_dir), timeout=600))

    thread = threading.Thread(target=submit_again)
    thread.start()
    out = {"run_dir": run_dir, **wait(head, first, scrape_after_s=SCRAPE_EVERY_S + 5)}
    thread.join(timeout=600)
    return {**out, "second": second}


SCRAPE_EVERY_S = 15  # Prometheus' interval in Ray's default setup


def metric_values(text: str, name: str) -> list[float]:
    return [float(m.group(1)) for m in re.finditer(rf"^{name}\{{[^}}]*\}} ([0-9.e+-]+)$", text, re.M)]


def test_a_second_job_for_a_live_run_is_refused(submitted):
    """The driver is a named actor in the `gapray` namespace: another job's driver for the same run_dir finds it and
    refuses, in one line. Before: each job had its own anonymous namespace, so the check never saw another job's
    driver, and two drivers would have run one run_dir."""
    second = submitted["second"]
    assert second["statuses"][-1] == "FAILED", second["logs"][-2000:]
    assert "is being run by a live driver" in second["logs"], second["logs"][-2000:]
    assert submitted["statuses"][-1] == "SUCCEEDED"  # the first run, untouched


def test_job_submit_succeeds_and_reports_through_the_dashboard(submitted):
    assert submitted["statuses"][-1] == "SUCCEEDED", submitted["logs"][-3000:]
    assert "RUNNING" in submitted["statuses"]
    assert "| overall |" in submitted["logs"]  # the results table, printed by the job
    seen = "\n".join(submitted["metrics"])
    # custom metrics (ray.util.metrics) from the driver actor, the Serve replicas and the pipeline
    assert max(metric_values(seen, "ray_gapray_run_policy_version")) == 2
    assert max(metric_values(seen, "ray_gapray_run_phases_completed")) >= 7
    images = 8 * 4 + 3 * 2 * 2  # sampled: training prompts + both measures (replay adds the discard pool)
    # one counter series per replica lifetime (the app is deleted for each training phase and deployed again)
    series = {}
    for m in re.finditer(r"^ray_gapray_images_sampled_total(\{[^}]*\}) ([0-9.e+-]+)$", seen, re.M):
        series[m.group(1)] = max(series.get(m.group(1), 0.0), float(m.group(2)))
    assert len(series) >= 2 and sum(series.values()) >= images, series
    sft = json.loads((submitted["run_dir"] / "state.json").read_text())["rounds"]["0"]["sample"]["sft"]
    assert sft in metric_values(seen, "ray_gapray_run_sft_samples")  # the driver's gauge carries the real count
    # each logged training step is one line of the job log (Ray Train's patched print() used to print it twice)
    logged = sum(len(p.read_text().splitlines()) for p in submitted["run_dir"].glob("checkpoints/round=*/*/metrics.jsonl"))
    assert logged > 0 and submitted["logs"].count("[train] step ") == logged


def test_replicas_and_train_workers_reserved_gpus_in_turn(head, submitted):
    """Both sides asked Ray for a (logical) GPU, and the trainer's 2 fit on the 2-GPU head: the replica was gone."""
    def listed(what: str) -> list[dict]:
        return get_json(f"{head['url']}/api/v0/{what}?limit=1000&detail=1")["data"]["result"]["result"]

    replicas = {a["required_resources"].get("GPU") for a in listed("actors") if "ServeReplica" in a["class_name"]}
    # Train workers get their resources from the placement group Ray Train makes for the worker group
    groups = [[b["unit_resources"].get("GPU") for b in g["bundles"]] for g in listed("placement_groups")]
    assert replicas == {1.0} and [1.0, 1.0] in groups, (replicas, groups)
    assert submitted["logs"].count("[train] step ") > 0 and submitted["statuses"][-1] == "SUCCEEDED"


def test_run_gauges_are_seen_by_a_scraper_every_15_seconds(submitted):
    """Every run-level gauge the run sets is seen by scrapes 15 s apart, the last measure's too (after the job
    ends). Issue 19 measured the old driver-held gauges visible for only ~1-2 s after each was set."""
    from gapray.gauges import NAMES

    spaced, last = [], -SCRAPE_EVERY_S
    for t, text in submitted["samples"]:
        if t >= last + SCRAPE_EVERY_S:
            spaced.append(text)
            last = t
    assert len(spaced) >= 3, len(spaced)
    seen = "\n".join(spaced)
    missing = [n for n in NAMES if not metric_values(seen, f"ray_gapray_run_{n}")]
    assert not missing, missing
    summary = json.loads((submitted["run_dir"] / "summary.json").read_text())
    state = json.loads((submitted["run_dir"] / "state.json").read_text())
    final = spaced[-1]  # taken after the job ended: the run's last values
    assert metric_values(final, "ray_gapray_run_phases_completed") == [len(state["completed"])]
    assert metric_values(final, "ray_gapray_run_non_unification") == [pytest.approx(summary["final"]["non_unification"], abs=1e-6)]


def test_serve_replicas_reencode_the_training_images(submitted):
    """backend=ray: the SFT rows carry the pictures' VQ tokens, re-encoded by the Serve replicas."""
    import pyarrow.parquet as pq
    import torch
    from omegaconf import OmegaConf

    from gapray.models.loading import load_model
    from gapray.data.ledger import VerdictLedger
    run_dir = submitted["run_dir"]
    sampled = {(r["prompt_id"], r["sample_idx"]): r["image_tokens"]
               for r in VerdictLedger(run_dir / "ledger").read(0).to_pylist()}
    sft = pq.read_table(run_dir / "data" / "round=0" / "sft.parquet").to_pylist()
    tokens = torch.tensor([sampled[(r["prompt_id"], r["sample_idx"])] for r in sft])
    model = load_model(OmegaConf.create({"path": "tiny", "dtype": "float32", "device": "cpu"}))
    assert sft and [r["image_tokens"] for r in sft] == model.reencode(tokens).tolist()
    assert [r["image_tokens"] for r in sft] != tokens.tolist()  # re-encoding changed them: the check has teeth


def alive_pids(head, class_name: str) -> list[int]:
    """The PIDs of the live actors of a class (Ray's state API through the dashboard)."""
    actors = get_json(f"{head['url']}/api/v0/actors?limit=1000&detail=1")["data"]["result"]["result"]
    return [a["pid"] for a in actors if a["state"] == "ALIVE" and class_name in a["class_name"] and a.get("pid")]


def chaos_schedule(seed: int) -> list[tuple[str, str]]:
    """(phase, what to kill -9), in run order: a Serve replica in a sampling phase, a Ray Train worker in a
    training phase once it has a complete checkpoint, then the CurriculumDriver in a later phase."""
    import random

    rng = random.Random(seed)
    order = ["measure/0", "sample/0", "gate/0", "train/0/a", "replay/0", "train/0/b", "measure/1"]
    replica = rng.choice(["measure/0", "sample/0"])
    worker = rng.choice(["train/0/a", "train/0/b"])
    driver = rng.choice([p for p in ("replay/0", "train/0/b", "measure/1") if order.index(p) > order.index(worker)])
    return [(replica, "ServeReplica"), (worker, "RayTrainWorker"), (driver, "CurriculumDriver")]


CHAOS_SEED = 0


def test_chaos_kills_give_the_same_result(head, submitted, tmp_path):
    """kill -9 of a Serve replica, a Ray Train worker and the driver actor, at phases drawn with a seed: Serve
    restarts the replica, Ray Train restarts its workers from the newest complete checkpoint, the failed job
    is submitted again and resumes. Ledgers, training data, trained weights and summary equal the undisturbed
    submitted run's."""
    run_dir = tmp_path / "chaos"
    schedule, killed = chaos_schedule(CHAOS_SEED), []

    def current() -> str | None:
        try:
            return json.loads((run_dir / "state.json").read_text()).get("current")
        except (OSError, ValueError):
            return None

    def ready(phase: str, what: str) -> bool:
        if current() != phase:
            return False
        if what == "RayTrainWorker":  # right after a checkpoint write (issue 19: the one Ray had not registered)
            ckpts = run_dir / "checkpoints" / "round=0" / phase[-1] / "checkpoints"
            return any(ckpts.glob("checkpoint_*/complete.json"))
        return True

    def kill_next() -> bool:
        """Kill the next scheduled victim once its moment has come; True (stop waiting) after the driver."""
        phase, what = schedule[len(killed)]
        if ready(phase, what) and (pids := alive_pids(head, what)):
            os.kill(pids[0], 9)
            killed.append((phase, what))
        return len(killed) == len(schedule)

    first = submit(head, run_dir)
    wait(head, first, until=kill_next)
    assert killed == schedule, (killed, schedule, current())
    assert wait(head, first)["statuses"][-1] == "FAILED"  # the driver actor died: the job fails
    second = wait(head, submit(head, run_dir))  # the same run_dir: resumes
    assert second["statuses"][-1] == "SUCCEEDED", second["logs"][-3000:]
    assert "resuming after" in second["logs"]

    ref = submitted["run_dir"]
    for root, rounds in (("ledger", [0]), ("replay", [0]), ("eval/ledger", [0, 1]), ("eval/rescore", [1])):
        for r in rounds:
            a, b = (sorted(VerdictLedger(d / root).read(r).to_pylist(), key=lambda x: (x["prompt_id"], x["sample_idx"]))
                    for d in (ref, run_dir))
            assert len(a) == len(b)
            for x, y in zip(a, b):
                assert x["image_tokens"] == y["image_tokens"] and x["verdict"] == y["verdict"], (root, r)
                assert x["oracle_verdict"] == y["oracle_verdict"] and x["policy_version"] == y["policy_version"]
                assert abs(x["p_aligned"] - y["p_aligned"]) < 1e-5
    assert VerdictLedger(run_dir / "eval" / "ledger").count(1) == 3 * 2  # measured after the resumed training
    for rel in ("round=0/sft.parquet", "round=0/dpo.parquet", "round=0/discard.parquet", "round=0/with_replay/sft.parquet"):
        a, b = (pq.read_table(d / "data" / rel).drop_columns(["p_aligned"] if "sft" in rel else []) for d in (ref, run_dir))
        assert a.equals(b), rel
    for part in ("a", "b"):  # the trained weights, bit for bit
        a, b = ((d / "checkpoints" / "round=0" / part / "model" / "model.safetensors").read_bytes() for d in (ref, run_dir))
        assert a == b, part
    summary, expected = (json.loads((d / "summary.json").read_text()) for d in (run_dir, ref))
    assert summary["table"] == expected["table"] and summary["final"] == expected["final"]
    assert summary["rounds_data"]["0"]["sample"] == expected["rounds_data"]["0"]["sample"]


def test_the_7b_preset_runs_whole_at_reduced_size(head, tmp_path):
    """`experiment=janus-pro-7b` as a user submits it, with only its sizes cut to fit this CPU: the tiny policy in
    float32 and a tiny random Idefics3 VLM as its judge, 2 logical-GPU training workers on gloo. Everything else
    is the preset's: DPO pairs with reference log-probs from the replicas, ZeRO-3 with gradient checkpointing and
    its 16-bit export, the VLM judge's JudgeServer auditing the gate, replicas sized by their memory and
    autoscaled, workers placed by gapray_train, Serve released for training. (Run this way it found the
    JudgeServer refusing a policy batch larger than judge.batch_size.)"""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from test_vlm_judge import make_judge

    judge = make_judge("idefics3", seed=0)
    judge.model.save_pretrained(tmp_path / "judge")
    judge.processor.save_pretrained(tmp_path / "judge")
    reduced = ["experiment=janus-pro-7b", "model=tiny", "model.dtype=float32", "mode=dpo",
               "prompts=conf/prompts/geneval_sample.jsonl", "eval_prompts=conf/prompts/geneval_sample.jsonl",
               "max_prompts=6", "images_per_prompt=4", "max_eval_prompts=2", "eval_images_per_prompt=1",
               "batch_prompts=6", "scoring.threshold=0.529",  # about half of the random tiny model's images accepted
               "train.epochs=1", "train.gradient_accumulation_steps=1", "train.deepspeed.bf16=false",
               "train.scaling.num_workers=2", "train.scaling.use_gpu=false", "train.scaling.gpus_per_worker=1",
               "train.scaling.cpus_per_worker=1", "serve.num_cpus=1", "serve.autoscaling_config.max_replicas=1",
               f"judge.model={tmp_path / 'judge'}", "judge.dtype=float32", "judge.device=cpu", "gate.min_precision=0",
               "data.concurrency=1", "serve.route_prefix=null"]
    run_dir = tmp_path / "run"
    out = wait(head, submit(head, run_dir, reduced), until=lambda: False, timeout=600)
    assert out["statuses"][-1] == "SUCCEEDED", out["logs"][-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["mode"] == "dpo" and summary["judge"]["model"] == str(tmp_path / "judge")
    pairs = pq.read_table(run_dir / "data/round=0/dpo.parquet").to_pylist()
    assert len(pairs) >= 2 and all(p["ref_chosen_logp"] is not None and p["ref_rejected_logp"] is not None for p in pairs)
    assert (run_dir / "checkpoints/round=0/a/model/model.safetensors").stat().st_size > 0  # ZeRO-3's export
    assert "'gapray_train': 1.0" in out["logs"] and "[train] step " in out["logs"]

