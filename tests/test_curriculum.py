"""The curriculum driver and jobs/self_improve.py, in one process (backend=local): phases, counts, resume, gate,
bad input. The Ray path (driver actor, Serve, Data, Train, ray job submit, kill and resume) is in
test_curriculum_ray.py. The tiny random model accepts and rejects its images at random and the shapes oracle
rejects them all, which is what the gate test needs."""

import hashlib
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from gapray.curriculum import plan_phases
from gapray.data.ledger import VerdictLedger
from gapray.metrics import non_unification, win_rate

REPO = Path(__file__).resolve().parent.parent
N_PROMPTS, N, N_EVAL, K_EVAL = 6, 3, 4, 2
ARGS = ["model=tiny", "backend=local", "train.backend=local", f"max_prompts={N_PROMPTS}", f"images_per_prompt={N}",
        f"max_eval_prompts={N_EVAL}", f"eval_images_per_prompt={K_EVAL}", "train.epochs=2", "train.micro_batch_size=2",
        "batch_prompts=4", "gate.min_precision=0", "mode=c-sft", "composition_prompts=gapray/world/data/composition.jsonl"]


def self_improve(args, capsys=None):
    import sys
    sys.path.insert(0, str(REPO / "jobs"))
    from self_improve import main
    return main(list(args))


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("curriculum") / "run"
    assert self_improve(ARGS + [f"run_dir={run_dir}"]) == 0
    return run_dir


def test_phases_follow_the_algorithms():
    from types import SimpleNamespace as S
    assert plan_phases(S(rounds=1, mode="sft")) == ["measure/0", "sample/0", "gate/0", "train/0/a", "measure/1", "report"]
    assert plan_phases(S(rounds=2, mode="c-dpo")) == [
        "measure/0", "sample/0", "gate/0", "train/0/a", "replay/0", "train/0/b", "measure/1",
        "sample/1", "gate/1", "train/1/a", "replay/1", "train/1/b", "measure/2", "report"]


def test_run_directory_holds_everything(local_run):
    for rel in ("config.yaml", "state.json", "summary.json", "report.md", "data/round=0/sft.parquet",
                "data/round=0/dpo.parquet", "data/round=0/discard.parquet", "checkpoints/round=0/b/model/config.json"):
        assert (local_run / rel).is_file(), rel
    assert VerdictLedger(local_run / "ledger").parts(0)
    assert {p.name for p in (local_run / "plots").glob("*.png")} == {"measures.png", "train_loss.png"}
    grids = {p.name for p in (local_run / "grids").glob("*.png")}
    assert any(g.startswith("base_") for g in grids) and any(g.startswith("final_") for g in grids)
    state = json.loads((local_run / "state.json").read_text())
    assert state["status"] == "done" and state["completed"] == plan_phases(type("C", (), {"rounds": 1, "mode": "c-sft"}))
    assert state["policy_version"] == 2  # one per training phase


def test_counts_are_exact(local_run):
    ledger = VerdictLedger(local_run / "ledger").read(0).to_pylist()
    assert len(ledger) == N_PROMPTS * N and len({(r["prompt_id"], r["sample_idx"]) for r in ledger}) == N_PROMPTS * N
    accepted = [r for r in ledger if r["verdict"] == 1]
    data = local_run / "data" / "round=0"
    assert pq.read_table(data / "sft.parquet").num_rows == len(accepted)
    pool = {r["prompt_id"] for r in ledger} - {r["prompt_id"] for r in accepted}
    assert set(pq.read_table(data / "discard.parquet").column("prompt_id").to_pylist()) == pool
    # replay: the pool drawn again (N each), admitted prompts' accepted images added to the SFT data
    replay = VerdictLedger(local_run / "replay").read(0).to_pylist()
    assert len(replay) == len(pool) * N and {r["prompt_id"] for r in replay} == pool
    admitted = {r["prompt_id"] for r in replay if r["verdict"] == 1}
    assert pq.read_table(data / "with_replay" / "sft.parquet").num_rows == len(accepted) + sum(r["verdict"] == 1 for r in replay)
    state = json.loads((local_run / "state.json").read_text())
    assert state["rounds"]["0"]["replay"]["admitted"] == len(admitted)
    assert set(state["discard_pool"]) == pool - admitted
    for i in (0, 1):
        assert VerdictLedger(local_run / "eval" / "ledger").count(i) == N_EVAL * K_EVAL
    assert VerdictLedger(local_run / "eval" / "rescore").count(1) == N_EVAL * K_EVAL


def test_summary_is_recomputed_from_the_ledgers(local_run):
    summary = json.loads((local_run / "summary.json").read_text())
    ev = VerdictLedger(local_run / "eval" / "ledger")
    base, final = ev.read(0).to_pylist(), ev.read(1).to_pylist()
    overall = summary["table"][-1]
    assert overall["task"] == "overall"
    assert overall["non_base"] == non_unification([r["verdict"] for r in base])["value"]
    assert overall["non_final"] == non_unification([r["verdict"] for r in final])["value"]
    assert overall["gen_base"] == sum(r["oracle_verdict"] for r in base) / len(base)
    # win rate: the final policy's verdicts on the base images (rescore ledger) against the base verdicts
    now = {(r["prompt_id"], r["sample_idx"]): r["verdict"] for r in VerdictLedger(local_run / "eval" / "rescore").read(1).to_pylist()}
    paired = [{**r, "base_verdict": r["verdict"], "verdict": now[(r["prompt_id"], r["sample_idx"])]} for r in base]
    assert overall["win_n"] == win_rate(paired)["n"]
    assert "| overall |" in (local_run / "report.md").read_text()
    # the composition stress test: measured like eval, its own ledger, summarised apart
    comp = VerdictLedger(local_run / "composition" / "ledger")
    for i in ("0", "1"):
        rows = comp.read(int(i)).to_pylist()
        assert len(rows) == N_EVAL * K_EVAL and all(r["prompt_id"].startswith("composition-") for r in rows)
        assert summary["evals"][i]["composition"]["non_unification"] == non_unification([r["verdict"] for r in rows])["value"]
    assert "## Composition split" in (local_run / "report.md").read_text()


def test_a_finished_run_resubmitted_changes_nothing(local_run, capsys):
    before = tree_digest(local_run)
    assert self_improve(ARGS + [f"run_dir={local_run}"]) == 0
    assert tree_digest(local_run) == before
    assert f"[gapray] {local_run}: intact (" in capsys.readouterr().out  # its files verified first


def test_gapray_verify_finds_every_file_of_a_finished_run_intact(local_run, capsys):
    from gapray.cli import main as gapray

    assert gapray(["verify", str(local_run)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith(f"{local_run}: intact (") and "safetensors" in out[0], out


def test_a_finished_run_with_a_damaged_ledger_part_is_refused(local_run, tmp_path, capsys):
    """Before gapray.data.integrity the damage went unnoticed: every phase is complete, the job exited 0."""
    import shutil

    run_dir = tmp_path / "copy"
    shutil.copytree(local_run, run_dir)
    part = VerdictLedger(run_dir / "ledger").parts(0)[0]
    part.write_bytes(part.read_bytes()[:100])
    before = tree_digest(run_dir)
    assert self_improve(ARGS + [f"run_dir={run_dir}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{part}: not a readable Parquet file" in err[0] and "sample/0 is complete" in err[0], err
    assert tree_digest(run_dir) == before


def test_gate_stops_a_run_trained_on_wrong_self_verdicts(tmp_path, capsys):
    run_dir = tmp_path / "gated"
    args = [a for a in ARGS if not a.startswith("gate.")] + ["gate.min_precision=0.5", f"run_dir={run_dir}"]
    assert self_improve(args) == 3
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("jobs/self_improve.py")]
    assert len(err) == 1 and "data-quality gate" in err[0] and "precision 0.00" in err[0], err  # (progress bars aside)
    state = json.loads((run_dir / "state.json").read_text())
    assert state["status"] == "stopped" and state["completed"] == ["measure/0", "sample/0"]
    assert state["rounds"]["0"]["gate"]["audited"] > 0 and state["rounds"]["0"]["gate"]["right"] == 0
    assert not (run_dir / "checkpoints").exists()  # nothing trained on the bad data
    assert VerdictLedger(run_dir / "ledger").count(0) == N_PROMPTS * N  # and nothing already written lost
    assert self_improve(args) == 3  # resubmitting does not train through the gate


@pytest.mark.parametrize("override, names", [
    ("mode=ppo", "mode"),
    ("prompts=/nonexistent/prompts.jsonl", "prompts"),
    ("model=/nonexistent/checkpoint", "model.path"),
    ("replay_epoch=2", "replay_epoch"),
    ("train.deepspeed.zero_stage=4", "train.deepspeed.zero_stage"),
    ("gate.min_precison=0.5", "gate.min_precision"),  # misspelled: did-you-mean
])
def test_bad_config_is_one_line_and_writes_nothing(tmp_path, capsys, override, names):
    run_dir = tmp_path / "bad"
    assert self_improve(ARGS + [f"run_dir={run_dir}", override]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and names in err[0], err
    assert not run_dir.exists()


def test_unreadable_prompt_file(tmp_path, capsys):
    bad = tmp_path / "prompts.jsonl"
    bad.write_text('{"prompt": "a photo of a circle", "tag": "single_object", "include": [{"class": "circle", "count": 1}]}\n'
                   '{not json\n')
    assert self_improve(ARGS + [f"run_dir={tmp_path / 'run'}", f"prompts={bad}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{bad}:2: not valid JSON" in err[0], err


def test_resuming_with_another_config_is_refused(local_run, capsys):
    before = tree_digest(local_run)
    assert self_improve(ARGS + [f"run_dir={local_run}", "images_per_prompt=5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "images_per_prompt" in err[0]
    assert tree_digest(local_run) == before


def test_training_rows_carry_the_reencoded_pictures(local_run):
    """data.reencode_images (default): an SFT row's tokens are the VQ tokens of the picture its sampled tokens
    decode to, not the sampled tokens themselves."""
    import torch
    from omegaconf import OmegaConf

    from gapray.models.loading import load_model
    model = load_model(OmegaConf.create({"path": "tiny", "dtype": "float32", "device": "cpu"}))
    sampled = {(r["prompt_id"], r["sample_idx"]): r["image_tokens"]
               for r in VerdictLedger(local_run / "ledger").read(0).to_pylist()}
    sft = pq.read_table(local_run / "data" / "round=0" / "sft.parquet").to_pylist()
    assert sft
    tokens = torch.tensor([sampled[(r["prompt_id"], r["sample_idx"])] for r in sft])
    assert [r["image_tokens"] for r in sft] == model.reencode(tokens).tolist()
    assert [r["image_tokens"] for r in sft] != tokens.tolist()
